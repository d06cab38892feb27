"""Failure modes at the edges: clients that never read, full disks at a log roll, paused
nodes during status, malformed syncs, majority writes across a master crash.

Each test drives real processes on 127.0.0.1 through the fixtures in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import struct
import termios
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cluster.client import Client, Token
from cluster.errors import StorageFailure
from cluster.local import LocalCluster
from cluster.wire import codec
from cluster.wire.framing import encode_frame
from cluster.wire.messages import Get
from tests.e2e.conftest import (
    cluster_on_disks,
    happens_within,
    node_status,
    raw_exchange,
    wait_applied,
    wait_for,
)

pytestmark = pytest.mark.e2e
MakeCluster = Callable[..., Awaitable[LocalCluster]]

MIB = 1024 * 1024


def _pid(cl: LocalCluster, name: str) -> int:
    pid = cl.children[name].pid
    assert pid is not None
    return pid


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in our receive queue (FIONREAD)."""
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def _non_reading_client(host: str, port: int) -> socket.socket:
    """A blocking socket with a small receive buffer that the test never reads from."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, port))
    return s


def _gets(key: str, count: int, first_id: int = 1) -> bytes:
    return b"".join(codec.frame(Get(first_id + i, key)) for i in range(count))


# --- the router keeps no connection it gave up on ------------------------------------------


async def test_router_status_during_a_paused_node_leaks_no_connections(
        cluster: LocalCluster) -> None:
    """`replctl status` while a node is paused: the router's probe times out and it gives
    up on that connection. It must close it (socket and reader task), not just forget it:
    repeated status calls during pauses must not leak connections."""
    router = _pid(cluster, "router")
    async with await Client.connect(cluster.router_address, timeout=10) as c:
        await c.set("k", "v")

        async def all_up() -> bool:
            return all(n["up"] for n in (await c.status())["nodes"])

        await wait_for(all_up, "every node up")
        baseline = _fd_count(router)
        for _ in range(15):
            # the node stops answering while the router's probe loop sleeps between probes:
            # the status call's probe times out first and drops the link without closing it
            cluster.signal("n3", signal.SIGSTOP)
            try:
                await c.status()
            finally:
                cluster.signal("n3", signal.SIGCONT)
            await wait_for(all_up, "n3 up again after SIGCONT")

        async def fds_back() -> bool:
            return _fd_count(router) <= baseline + 1

        assert await happens_within(fds_back, 5), (
            f"router holds {_fd_count(router) - baseline} more fds than before the pause: "
            "links dropped by _status() were never closed")


# --- SIGTERM stops a process even when a client does not read its replies ------------------


@pytest.mark.parametrize("target", ["n2", "router"])
async def test_sigterm_does_not_hang_on_a_client_that_never_reads(
        cluster: LocalCluster, target: str) -> None:
    """DESIGN: 'SIGTERM or SIGINT stops it cleanly', even with a client connected that sent
    reads and never reads the replies: closing that connection must not wait forever for
    a write buffer that will never drain."""
    async with await Client.connect(cluster.router_address) as c:
        index = await c.set("big", b"x" * MIB)
    await wait_applied(cluster, "n2", index)
    addr = cluster.addresses[target] if target != "router" else cluster.router_address
    pid = _pid(cluster, target)
    sock = _non_reading_client(addr.host, addr.port)
    try:
        sock.sendall(_gets("big", 24))  # 24 MiB of replies, far above every buffer
        async def queued() -> bool:
            return _rss_mib(pid) > 12 and _unread(sock) > 0

        await wait_for(queued, f"{target} to queue the replies")
        proc = cluster.children[target].proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(6):
                await proc.wait()
        except TimeoutError:
            pytest.fail(f"{target} did not exit within 6 s of SIGTERM: shutdown is stuck "
                        "closing the connection of a client that does not read")
    finally:
        sock.close()


# --- a client that does not read costs bounded memory --------------------------------------


@pytest.mark.parametrize("target", ["n2", "router"])
async def test_memory_stays_bounded_for_a_client_that_never_reads(
        cluster: LocalCluster, target: str) -> None:
    """README: a client that stops reading costs bounded memory. The hard case: one read
    of small `get` frames (400 gets of a 1 MiB value, about 6 KiB) asks for 400 MiB of
    replies; the pause must apply between requests, and the router must not hold more of
    one client's requests than it can afford to answer."""
    async with await Client.connect(cluster.router_address) as c:
        index = await c.set("big", b"x" * MIB)
    await wait_applied(cluster, "n2", index)
    addr = cluster.addresses[target] if target != "router" else cluster.router_address
    pid = _pid(cluster, target)
    before = _rss_mib(pid)
    sock = _non_reading_client(addr.host, addr.port)
    try:
        sock.sendall(_gets("big", 400))
        peak = before

        async def grew() -> bool:
            nonlocal peak
            peak = max(peak, _rss_mib(pid))
            return peak - before > 100

        assert not await happens_within(grew, 8), (
            f"{target} grew by {peak - before:.0f} MiB buffering replies for one client "
            "that never reads")
    finally:
        sock.close()


# --- a malformed sync gets an error reply ---------------------------------------------------


async def test_malformed_sync_epochs_get_an_error_reply(cluster: LocalCluster) -> None:
    """DESIGN: 'wrong types get a clear error reply where the protocol allows, and the
    offending connection is closed'. A sync whose epoch history goes backwards gets
    bad_request, and the master keeps serving everyone else."""
    addr = cluster.addresses["n1"]
    reply, closed = await raw_exchange(addr, encode_frame(codec.pack_obj({
        "op": "sync", "id": 7, "node": "n2", "epoch": 0, "last_index": 5,
        "epochs": [[2, 1], [1, 3]]})))
    assert (reply.id, reply.code, closed) == (7, "bad_request", True)
    # the master still serves everyone else
    async with await Client.connect(addr) as c:
        assert (await c.ping())["role"] == "master"


# --- majority writes across a paused slave and a master crash -------------------------------


async def test_majority_writes_survive_master_sigkill_during_a_slave_pause(
        make_cluster: MakeCluster) -> None:
    """A slave paused while majority writes flow, the master SIGKILLed and restarted:
    every acknowledged majority write is on the master and on at least two slaves."""
    cl = await make_cluster(["--snapshot-every", "300"])
    acked: dict[str, Token] = {}
    async with await Client.connect(cl.router_address, timeout=10) as c:
        cl.signal("n4", signal.SIGSTOP)
        try:
            from cluster.types import Acks
            results = await asyncio.gather(
                *(c.set(f"m{i}", str(i), acks=Acks.MAJORITY) for i in range(1000)),
                return_exceptions=True)
            for i, r in enumerate(results):
                if isinstance(r, Token):
                    acked[f"m{i}"] = r
        finally:
            cl.signal("n4", signal.SIGCONT)
    assert acked
    await cl.kill("n1")
    await cl.start_child("n1")
    last = max(t.index for t in acked.values())
    for n in cl.node_ids:
        await wait_applied(cl, n, last)
    for n in cl.node_ids:
        async with await Client.connect(cl.addresses[n]) as c:
            for k in list(acked)[::50]:
                assert (await c.get(k)).value == k[1:], (n, k)


# --- a full disk at the moment the log rolls to a new segment -----------------------------


def _fill(path) -> None:  # type: ignore[no-untyped-def]
    """Take every free byte of the file system ``path`` is on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for size in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


async def test_writes_resume_after_a_full_disk_hits_a_log_roll(
        tmp_path: Path, tmpfs: Callable[[str], Path]) -> None:
    """DESIGN: 'A full disk fails the write with an error and leaves the log readable';
    README: 'the node ... takes writes again once there is space'. Here the disk fills up
    exactly when a snapshot rolls the log to a new segment: the roll must fail without
    leaving the log on a closed descriptor, and writes (and snapshots) resume once space
    is freed."""
    tiny_disk = tmpfs("4m")
    cl = await cluster_on_disks(tmp_path / "c", {"n1": tiny_disk}, ["--snapshot-every", "40"])
    filler = tiny_disk / "filler"
    try:
        async with await Client.connect(cl.router_address) as c:
            for i in range(30):
                await c.set(f"a{i}", "v")
            _fill(filler)  # the disk is now full; the current log page still has room
            for i in range(30, 40):  # entry 40 makes a snapshot due: the roll fails
                with contextlib.suppress(StorageFailure):
                    await c.set(f"a{i}", "v")
            filler.unlink()  # space again

            async def write_ok() -> bool:
                try:
                    await c.set("after", "space")
                    return True
                except StorageFailure:
                    return False

            await happens_within(write_ok, 8)  # the assertion below says what went wrong
            status = await node_status(cl.addresses["n1"])
            assert status["last_index"] >= 40 and (await c.get("after", strong=True)).found, (
                f"writes still fail after space was freed; master log: {cl.tail('n1', 6)}")
    finally:
        filler.unlink(missing_ok=True)
        await cl.stop()


# --- a slave whose disk is full backs off --------------------------------------------------


async def test_a_slave_with_a_full_disk_does_not_reconnect_in_a_hot_loop(
        tmp_path: Path, tmpfs: Callable[[str], Path]) -> None:
    """A slave reconnects at once only after a session that made progress. One whose disk
    is full (a persistent, local failure) must back off, not resync hundreds of times a
    second with the master re-sending the same batch."""
    disks = [tmpfs("4m"), tmpfs("4m")]
    cl = await cluster_on_disks(tmp_path / "c", {"n2": disks[0], "n3": disks[1]})
    try:
        async with await Client.connect(cl.router_address) as c:
            index = await c.set("x", "y")
            await wait_applied(cl, "n2", index)
            _fill(disks[0] / "filler")
            for i in range(5):
                await c.set(f"big{i}", "z" * 20_000)  # n2 cannot store these
        addr = cl.addresses["n2"]
        first = (await node_status(addr))["master_link"]["syncs"]
        count = first

        async def storm() -> bool:
            nonlocal count
            count = (await node_status(addr))["master_link"]["syncs"]
            return count - first > 30

        assert not await happens_within(storm, 3), (
            f"n2 completed {count - first} sync handshakes within 3 s while its disk is "
            "full: a hot reconnect loop")
    finally:
        await cl.stop()

