"""The node shell in-process, with real stores and sockets on 127.0.0.1: a slave backs off
while its master is unreachable, snapshots run one at a time, and a master stepping down
answers every write it is handed meanwhile. Regressions found by review."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cluster.client import Client
from cluster.config import Address, FsyncPolicy, NodeConfig
from cluster.errors import ShuttingDown
from cluster.local import free_ports
from cluster.net.stream import FramedStream
from cluster.node.master import MasterRole
from cluster.node.runtime import Node
from cluster.node.slave import SlaveRole
from cluster.storage.store import Store
from cluster.types import Acks, NodeId
from tests.waiting import until

pytestmark = pytest.mark.timeout(60)
M, S = NodeId("n1"), NodeId("n2")


@asynccontextmanager
async def running(cfg: NodeConfig) -> AsyncIterator[Node]:
    node = Node(cfg)
    up = asyncio.Event()
    task = asyncio.create_task(node.run(lambda _: up.set()))
    try:
        async with asyncio.timeout(10):
            await up.wait()
        yield node
    finally:
        node.stop()
        await asyncio.wait_for(task, 10)


def pair(tmp_path: Path, **kw: Any) -> tuple[NodeConfig, NodeConfig]:
    am, as_ = (Address("127.0.0.1", p) for p in free_ports(2))
    cluster = {M: am, S: as_}
    common: dict[str, Any] = {"heartbeat_interval": 0.05, "peer_timeout": 0.5, **kw}
    return (NodeConfig(M, am, tmp_path / "n1", cluster, bootstrap_master=M, **common),
            NodeConfig(S, as_, tmp_path / "n2", cluster, bootstrap_master=M, **common))


async def test_a_slave_backs_off_while_its_master_is_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a session that made progress, a slave reconnects at once, but while the master
    stays unreachable it backs off (20 ms doubling to 500 ms) instead of spinning."""
    attempts: list[float] = []
    connect: Callable[..., Any] = FramedStream.connect.__func__  # type: ignore[attr-defined]

    async def counting(cls: type[FramedStream], *a: Any, **k: Any) -> FramedStream:
        attempts.append(time.monotonic())
        return await connect(cls, *a, **k)

    monkeypatch.setattr(FramedStream, "connect", classmethod(counting))
    mcfg, scfg = pair(tmp_path)
    async with running(scfg) as slave:
        async with running(mcfg):
            role = slave.role
            assert isinstance(role, SlaveRole)
            await until(lambda: role.core.progressed and role.core.in_sync, "the slave to sync")
        first = len(attempts)
        await until(lambda: len(attempts) >= first + 4, "four reconnection attempts")
        gaps = [b - a for a, b in zip(attempts[first + 1:], attempts[first + 2:], strict=False)]
        assert gaps and min(gaps) >= 0.015, f"no backoff between attempts: {gaps}"


async def test_snapshots_run_one_at_a_time(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of writes that crosses --snapshot-every starts one snapshot, not one per
    write: concurrent snapshots would share the temporary file and the new segment."""
    begun: list[bool] = []
    begin = Store.begin_snapshot

    def tracking(self: Store, *a: Any) -> Any:
        begun.append(self.snapshotting)
        return begin(self, *a)

    monkeypatch.setattr(Store, "begin_snapshot", tracking)
    addr = Address("127.0.0.1", free_ports(1)[0])
    cfg = NodeConfig(M, addr, tmp_path / "n1", {M: addr}, bootstrap_master=M,
                     fsync=FsyncPolicy.EVERYSEC, snapshot_every=5)
    async with running(cfg) as node, await Client.connect(addr, timeout=5) as c:
        await asyncio.gather(*(c.set(f"k{i}", "v") for i in range(8)))
        await until(lambda: node.store.snapshot_index >= 5 and not node.store.snapshotting,
                    "a snapshot")
    assert begun and not any(begun), f"a snapshot began while another ran: {begun}"


async def test_a_write_during_a_step_down_is_answered(tmp_path: Path) -> None:
    """While the master role closes its links (which can take a while), a write that
    arrives is refused as not applied, never left without an answer."""
    mcfg, scfg = pair(tmp_path)
    async with running(mcfg) as master, running(scfg):
        role = master.role
        assert isinstance(role, MasterRole)
        await until(lambda: role.core.has_quorum(master.now_ms()), "the slave to link")
        assert master.address is not None
        async with await Client.connect(master.address, timeout=5) as c:
            await c.set("a", "1", Acks.ALL)
            (link,) = role._links.values()
            closing = asyncio.Event()
            close = link.stream.close

            async def slow_close() -> None:
                closing.set()
                await asyncio.sleep(0.3)  # a link that takes its time to close
                await close()

            link.stream.close = slow_close  # type: ignore[method-assign]
            become = asyncio.create_task(master.become(lambda r: SlaveRole(master, r, S)))
            await closing.wait()
            with pytest.raises(ShuttingDown) as err:
                await c.set("b", "2", Acks.ALL, timeout_ms=1000)
            assert err.value.applied == "no"
            await become
