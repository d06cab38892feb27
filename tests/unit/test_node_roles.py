"""A node's role swaps at run time (Node.become): the old role ends, hands its log and map to
the new one, and the node keeps serving on the same port. In-process, with a real store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cluster.client import Client, Token
from cluster.config import Address, NodeConfig
from cluster.core.state import Replica
from cluster.errors import NotMaster
from cluster.local import free_ports
from cluster.node.master import MasterRole
from cluster.node.runtime import Node
from cluster.node.slave import SlaveRole
from cluster.types import NodeId

pytestmark = pytest.mark.timeout(30)


async def test_a_slave_becomes_master_and_back(tmp_path: Path) -> None:
    me, other = NodeId("n2"), NodeId("n1")
    nobody, mine = (Address("127.0.0.1", p) for p in free_ports(2))  # nobody listens there
    cfg = NodeConfig(me, mine, tmp_path / "n2", {other: nobody, me: mine},
                     bootstrap_master=other,
                     heartbeat_interval=0.05, peer_timeout=0.5)
    node = Node(cfg)
    up = asyncio.Event()
    task = asyncio.create_task(node.run(lambda _: up.set()))
    try:
        async with asyncio.timeout(10):
            await up.wait()
        assert node.address is not None
        async with await Client.connect(node.address, timeout=5) as c:
            with pytest.raises(NotMaster, match="n1"):
                await c.set("k", "v")

            def promote(replica: Replica) -> MasterRole:
                replica.epoch += 1
                node.store.set_epoch(replica.epoch)
                return MasterRole(node, replica)

            await node.become(promote)
            assert (await c.ping())["role"] == "master"
            assert await c.set("k", "v") == Token(1, 1)
            assert await c.set("k", "w") == Token(1, 2)
            assert (await c.get("k", min_index=Token(1, 2))).value == "w"

            await node.become(lambda replica: SlaveRole(node, replica, other))
            status = await c.status()
            assert (status["role"], status["last_index"], status["epoch"]) == ("slave", 2, 1)
            with pytest.raises(NotMaster):
                await c.set("k", "x")
            assert (await c.get("k")).value == "w"  # the log and map were handed over
    finally:
        node.stop()
        await asyncio.wait_for(task, 10)
