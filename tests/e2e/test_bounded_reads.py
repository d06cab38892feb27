"""Reads bounded by time (``replrouter --max-lag-ms``), with real processes: while the master
is stopped (SIGSTOP), default reads leave the slaves once they may not have heard from it
for ``max-lag-ms``, and fail with ``unavailable`` since no master is up; after SIGCONT they
go back to the slaves. A slave that is stopped itself is excluded as down (covered by the
router's probes, see test_resilience.py); this file is about the silent master."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from cluster.client import Client
from cluster.errors import ReplError, Unavailable
from cluster.local import LocalCluster
from tests.e2e.conftest import happens_within, wait_applied, wait_for

pytestmark = pytest.mark.e2e

MAX_LAG_MS = 1500
# The slaves keep their replication link for 5 s of silence, much longer than MAX_LAG_MS,
# so it is the time bound that takes them out of the read rotation, not a link that broke.
SLOW_LINK_NODE = ["--heartbeat-interval", "0.05", "--peer-timeout", "5"]
# Probes far apart, so that a router that forgot the age of a probe would go on sending
# reads to a slave up to 0.5 s past the bound (and be caught); the stopped master is marked
# down (after at most 0.5 + 0.6 s) before the slaves reach the bound.
ROUTER = ["--health-interval", "0.5", "--node-timeout", "0.6"]
SLACK = 0.05  # a heartbeat the master sent just before SIGSTOP may be read just after


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[[int], Awaitable[LocalCluster]]]:
    started: list[LocalCluster] = []

    async def make(max_lag_ms: int) -> LocalCluster:
        cl = LocalCluster(tmp_path / f"c{len(started)}", base_port=0,
                          extra_node_args=SLOW_LINK_NODE,
                          extra_router_args=[*ROUTER, "--max-lag-ms", str(max_lag_ms)])
        started.append(cl)
        await cl.start()
        return cl

    try:
        yield make
    finally:
        for cl in started:
            cl.signal("n1", signal.SIGCONT)
            await cl.stop()


async def _loaded(cl: LocalCluster, c: Client) -> None:
    """One key on every node, and the router sending default reads to slaves."""
    token = await c.set("k", "v")
    for node in cl.node_ids:
        await wait_applied(cl, node, token)

    async def a_slave_serves() -> bool:
        return (await c.get("k")).node != "n1"

    await wait_for(a_slave_serves, "a default read served by a slave")


async def test_reads_leave_slaves_that_have_not_heard_from_a_stopped_master(
        start: Callable[[int], Awaitable[LocalCluster]]) -> None:
    cl = await start(MAX_LAG_MS)
    async with await Client.connect(cl.router_address, timeout=10) as c:
        await _loaded(cl, c)
        served: list[tuple[float, str | None]] = []  # (when the read was sent, by whom)
        errors: list[str] = []

        async def refused() -> bool:
            sent = time.monotonic()
            try:
                r = await c.get("k")
            except Unavailable as exc:
                errors.append(str(exc))
                return True
            served.append((sent, r.node))
            return False

        cl.signal("n1", signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            await wait_for(refused, "default reads to be refused", timeout=20)
            assert "no master is reachable" in errors[0], errors[0]
            assert f"{MAX_LAG_MS} ms, max-lag-ms" in errors[0], errors[0]
            # No slave served a read sent after it may have gone MAX_LAG_MS without the
            # master (the router dates each slave's figure by when it sent the probe).
            late = [(round(t - stopped, 3), n) for t, n in served
                    if t > stopped + MAX_LAG_MS / 1000 + SLACK]
            assert not late, f"served by slaves too long after the master stopped: {late}"

            async def served_again() -> bool:
                try:
                    await c.get("k")
                except Unavailable:
                    return False
                return True

            # still within the slaves' 5 s peer timeout: only the time bound holds them off
            assert not await happens_within(served_again, 1.5)

            async with await Client.connect(cl.router_address, timeout=10) as other:
                rows = {r["id"]: r for r in (await other.status())["nodes"]}
            assert not rows["n1"]["up"]
            for n in ("n2", "n3", "n4"):
                assert rows[n]["up"] and rows[n]["last_contact_ms"] > MAX_LAG_MS, rows[n]
        finally:
            cl.signal("n1", signal.SIGCONT)

        async def back_on_a_slave() -> bool:
            return (await c.get("k")).node in ("n2", "n3", "n4")

        await wait_for(back_on_a_slave, "default reads to go back to the slaves")
        assert (await c.set("after", "1")).index > 1


async def test_read_your_writes_and_strong_reads_are_unaffected(
        start: Callable[[int], Awaitable[LocalCluster]]) -> None:
    """A read with a token is the node's to check, not the time bound's: with the master
    stopped it is still served by a slave that holds the write."""
    cl = await start(MAX_LAG_MS)
    async with await Client.connect(cl.router_address, timeout=10) as c:
        await _loaded(cl, c)
        token = await c.set("mine", "yes")
        for node in cl.node_ids:
            await wait_applied(cl, node, token)
        cl.signal("n1", signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            async def default_refused() -> bool:
                try:
                    await c.get("k")
                except Unavailable:
                    return True
                return False

            await wait_for(default_refused, "default reads to be refused", timeout=20)
            assert time.monotonic() - stopped > MAX_LAG_MS / 1000 - 0.4
            r = await c.get("mine", min_index=token)
            assert r.value == "yes" and r.node in ("n2", "n3", "n4"), r
            with pytest.raises(ReplError, match="unavailable"):
                await c.get("mine", strong=True)
        finally:
            cl.signal("n1", signal.SIGCONT)


async def test_max_lag_ms_0_keeps_reads_on_the_slaves(
        start: Callable[[int], Awaitable[LocalCluster]]) -> None:
    cl = await start(0)
    async with await Client.connect(cl.router_address, timeout=10) as c:
        await _loaded(cl, c)
        cl.signal("n1", signal.SIGSTOP)
        try:
            async def master_down() -> bool:
                return (await c.status())["master"] is None

            await wait_for(master_down, "the router to mark the stopped master down")

            async def refused() -> bool:
                try:
                    await c.get("k")
                except ReplError:
                    return True
                return False

            assert not await happens_within(refused, MAX_LAG_MS / 1000 * 2)
            assert (await c.get("k")).node in ("n2", "n3", "n4")
        finally:
            cl.signal("n1", signal.SIGCONT)
