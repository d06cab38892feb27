"""Full disks, paused slaves, fsync policies, many clients."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cluster.client import Client, Token
from cluster.errors import StorageFailure
from cluster.local import LocalCluster
from tests.e2e.conftest import (
    cluster_on_disks,
    node_items,
    node_status,
    wait_applied,
    wait_for,
)

pytestmark = pytest.mark.e2e
MakeCluster = Callable[..., Awaitable[LocalCluster]]


async def test_a_full_disk_fails_the_write_and_loses_nothing(
        tmp_path: Path, tmpfs: Callable[[str], Path]) -> None:
    tiny_disk = tmpfs("1m")  # the master's data directory
    cl = await cluster_on_disks(tmp_path / "c", {"n1": tiny_disk})
    try:
        async with await Client.connect(cl.router_address) as c:
            acked: dict[str, Token] = {}
            with pytest.raises(StorageFailure, match="No space left"):
                for i in range(200):
                    acked[f"big{i}"] = await c.set(f"big{i}", "x" * 20_000)
            assert 10 < len(acked) < 200
            # reads still work, and the master still answers
            assert (await c.get("big0", strong=True)).found
            with pytest.raises(StorageFailure):
                await c.set("one-more", "x" * 20_000)
            # free space: the node takes writes again without a restart
            subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_disk)], check=True)
            after = await c.set("after", "space")
            assert after.index == max(t.index for t in acked.values()) + 1
        # the log on the full disk is readable: a restart recovers every acknowledged write
        await cl.restart("n1")
        items = await node_items(cl.addresses["n1"])
        assert all(k in items for k in acked) and items["after"] == "space"
        assert "one-more" not in items
        await wait_applied(cl, "n2", after)
        assert await node_items(cl.addresses["n2"]) == items
    finally:
        await cl.stop()


async def test_a_paused_slave_is_marked_down_and_bounded(make_cluster: MakeCluster) -> None:
    cl = await make_cluster()
    async with await Client.connect(cl.router_address) as c:
        first = (await c.set("start", "1")).index
        await wait_applied(cl, "n2", first)
        cl.signal("n2", signal.SIGSTOP)
        try:
            async def n2_down() -> bool:
                slaves = (await node_status(cl.addresses["n1"]))["slaves"]
                return not next(s for s in slaves if s["id"] == "n2")["up"]

            await wait_for(n2_down, "the master to mark the paused slave down")
            last = max(await asyncio.gather(*(c.set(f"p{i}", "v" * 100) for i in range(3000))))
            status = await node_status(cl.addresses["n1"])
            n2 = next(s for s in status["slaves"] if s["id"] == "n2")
            assert n2["acked"] <= first and n2["lag_entries"] >= 3000
            # reads are not sent to a node that is down
            served = {(await c.get("start")).node for _ in range(30)}
            assert "n2" not in served
        finally:
            cl.signal("n2", signal.SIGCONT)
        await wait_applied(cl, "n2", last)
        assert len(await node_items(cl.addresses["n2"])) == 3001


@pytest.mark.parametrize("fsync", ["everysec", "no"])
async def test_other_fsync_policies_replicate_and_survive_a_clean_restart(
        make_cluster: MakeCluster, fsync: str) -> None:
    cl = await make_cluster(fsync=fsync)
    async with await Client.connect(cl.router_address) as c:
        last = max(await asyncio.gather(*(c.set(f"f{i}", str(i)) for i in range(500))))
    for node in cl.node_ids:
        await wait_applied(cl, node, last)
    await cl.kill("n1", signal.SIGTERM)  # a clean stop syncs the log
    await cl.start_child("n1")
    assert len(await node_items(cl.addresses["n1"])) == 500
    assert (await node_status(cl.addresses["n1"]))["fsync"] == fsync


async def test_many_pipelining_clients_through_the_router(cluster: LocalCluster) -> None:
    async def one_client(n: int) -> None:
        async with await Client.connect(cluster.router_address) as c:
            indexes = await asyncio.gather(*(c.set(f"c{n}-{i}", f"{n}:{i}") for i in range(100)))
            assert len(set(indexes)) == 100
            results = await asyncio.gather(*(c.get(f"c{n}-{i}", min_index=max(indexes))
                                             for i in range(100)))
            assert [r.value for r in results] == [f"{n}:{i}" for i in range(100)]

    await asyncio.gather(*(one_client(n) for n in range(20)))
