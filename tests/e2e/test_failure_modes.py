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

import pytest

from cluster.client import Client
from cluster.config import Limits
from cluster.local import LocalCluster
from cluster.wire import codec
from cluster.wire.framing import FrameDecoder, encode_frame
from cluster.wire.messages import ErrorReply, Get
from tests.e2e.conftest import node_status, wait_applied, wait_for

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


# --- 1. the router leaks a connection per `status` that times out on a slow node -------------


async def test_router_status_during_a_paused_node_leaks_connections(
        cluster: LocalCluster) -> None:
    """`replctl status` when a node stops answering: Router._status's probe times out
    (RequestTimeout), _node_failed() removes the link from _links without closing it, and
    the probe loop, finding no link, opens a new one. The dropped link's socket and reader
    task live on after the node comes back: one leaked connection per such status call."""
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

        with contextlib.suppress(TimeoutError, AssertionError):
            await wait_for(fds_back, "router fds back to baseline", timeout=5)
        assert _fd_count(router) <= baseline + 1, (
            f"router holds {_fd_count(router) - baseline} more fds than before the pause: "
            "links dropped by _status() were never closed")


# --- 2. SIGTERM hangs when one client does not read its replies ------------------------------


@pytest.mark.parametrize("target", ["n2", "router"])
async def test_sigterm_does_not_hang_on_a_client_that_never_reads(
        cluster: LocalCluster, target: str) -> None:
    """DESIGN: 'SIGTERM or SIGINT stops it cleanly'. One client that sent reads and never
    reads the replies keeps the process alive forever: shutdown awaits stream.close(),
    and wait_closed() waits for a write buffer that will never drain."""
    async with await Client.connect(cluster.router_address) as c:
        index = await c.set("big", b"x" * MIB)
    await wait_applied(cluster, "n2", index)
    addr = cluster.addresses[target] if target != "router" else cluster.router_address
    pid = _pid(cluster, target)
    sock = _non_reading_client(addr.host, addr.port)
    try:
        sock.sendall(_gets("big", 24))  # 24 MiB of replies, far above every buffer
        await wait_for(lambda: asyncio.sleep(0, _rss_mib(pid) > 12 and _unread(sock) > 0),
                       f"{target} to queue the replies")
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


# --- 3. one client that does not read makes the node buffer unbounded replies ----------------


@pytest.mark.parametrize("target", ["n2", "router"])
async def test_memory_stays_bounded_for_a_client_that_never_reads(
        cluster: LocalCluster, target: str) -> None:
    """README: a slow client costs bounded memory (reading pauses at HIGH_WATER = 4 MiB).
    But the pause is checked only between 256 KiB reads, and one read of small `get`
    frames can ask for thousands of large values: 400 gets of a 1 MiB value arrive in
    one read (~6 KiB) and the process buffers 400 MiB of replies for a client that never
    reads them."""
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

        with contextlib.suppress(TimeoutError, AssertionError):
            await wait_for(grew, "memory growth", timeout=8)
        assert peak - before <= 100, (
            f"{target} grew by {peak - before:.0f} MiB buffering replies for one client "
            "that never reads")
    finally:
        sock.close()


# --- 4. a malformed sync gets no error reply --------------------------------------------------


async def test_malformed_sync_epochs_get_an_error_reply(cluster: LocalCluster) -> None:
    """DESIGN: 'wrong types get a clear error reply where the protocol allows, and the
    offending connection is closed'. A sync whose epoch history goes backwards passes the
    codec, then EpochHistory raises ValueError inside MasterRole.replicate; nothing
    catches it, so the connection is dropped without a reply (and the handler task dies
    with 'Task exception was never retrieved')."""
    addr = cluster.addresses["n1"]
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    try:
        writer.write(encode_frame(codec.pack_obj({
            "op": "sync", "id": 7, "node": "n2", "epoch": 0, "last_index": 5,
            "epochs": [[2, 1], [1, 3]]})))
        await writer.drain()
        decoder = FrameDecoder(1 << 24)
        frames: list[bytes] = []
        async with asyncio.timeout(5):
            while not frames:
                chunk = await reader.read(65536)
                assert chunk, "the master closed the connection without an error reply"
                frames = decoder.feed(chunk)
        reply = codec.decode(frames[0], Limits())
        assert isinstance(reply, ErrorReply) and reply.id == 7
        assert reply.code == "bad_request"
    finally:
        writer.close()
    # the master still serves everyone else
    async with await Client.connect(addr) as c:
        assert (await c.ping())["role"] == "master"


# --- regression coverage for tricky scenarios that currently pass ----------------------------


async def test_majority_writes_survive_master_sigkill_during_a_slave_pause(
        make_cluster: MakeCluster) -> None:
    """A slave paused while majority writes flow, the master SIGKILLed and restarted:
    every acknowledged majority write is on the master and on at least two slaves."""
    cl = await make_cluster(["--snapshot-every", "300"])
    acked: dict[str, int] = {}
    async with await Client.connect(cl.router_address, timeout=10) as c:
        cl.signal("n4", signal.SIGSTOP)
        try:
            from cluster.types import Acks
            results = await asyncio.gather(
                *(c.set(f"m{i}", str(i), acks=Acks.MAJORITY) for i in range(1000)),
                return_exceptions=True)
            for i, r in enumerate(results):
                if isinstance(r, int):
                    acked[f"m{i}"] = r
        finally:
            cl.signal("n4", signal.SIGCONT)
    assert acked
    await cl.kill("n1")
    await cl.start_child("n1")
    last = max(acked.values())
    for n in cl.node_ids:
        await wait_applied(cl, n, last)
    for n in cl.node_ids:
        async with await Client.connect(cl.addresses[n]) as c:
            for k in list(acked)[::50]:
                assert (await c.get(k)).value == k[1:], (n, k)


# --- 5. a full disk at the moment the log rolls to a new segment breaks writes for good -----


@pytest.fixture
async def tiny_disk(tmp_path):  # type: ignore[no-untyped-def]
    """A 4 MiB tmpfs that the test fills up for real."""
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


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


async def test_writes_resume_after_a_full_disk_hits_a_log_roll(tiny_disk) -> None:  # type: ignore[no-untyped-def]
    """DESIGN: 'A full disk fails the write with an error and leaves the log readable';
    README: 'the node keeps serving reads and later writes'. When the disk is full at the
    moment a snapshot rolls the log (WAL.roll: fsync, close the fd, then create the next
    segment, which fails), the WAL keeps the closed descriptor: every later write fails
    with 'Bad file descriptor' (or lands in whatever file reuses the number) even after
    space is freed, and snapshots stay disabled (store.snapshotting is never cleared)."""
    from cluster.errors import StorageFailure
    from tests.e2e.conftest import FAST_NODE, FAST_ROUTER
    cl = LocalCluster(tiny_disk.parent / "c", base_port=0,
                      extra_node_args=[*FAST_NODE, "--snapshot-every", "40"],
                      extra_router_args=FAST_ROUTER)
    cl.data_dir.mkdir()
    (cl.data_dir / "n1").symlink_to(tiny_disk, target_is_directory=True)
    await cl.start()
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

            with contextlib.suppress(TimeoutError, AssertionError):
                await wait_for(write_ok, "a write to succeed after space was freed", 8)
            status = await node_status(cl.addresses["n1"])
            assert status["last_index"] >= 40 and (await c.get("after", strong=True)).found, (
                f"writes still fail after space was freed; master log: {cl.tail('n1', 6)}")
    finally:
        filler.unlink(missing_ok=True)
        await cl.stop()


# --- 6. slaves whose disk is full: hot reconnect loop, majority writes that never end --------


@pytest.fixture
async def two_tiny_disks(tmp_path):  # type: ignore[no-untyped-def]
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts = []
    try:
        for name in ("d2", "d3"):
            m = tmp_path / name
            m.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(m)],
                           check=True)
            mounts.append(m)
        yield mounts
    finally:
        for m in mounts:
            (m / "filler").unlink(missing_ok=True)
            subprocess.run(["umount", "-l", str(m)], check=False)


async def _cluster_on(tmp_path, disks) -> LocalCluster:  # type: ignore[no-untyped-def]
    from tests.e2e.conftest import FAST_NODE, FAST_ROUTER
    cl = LocalCluster(tmp_path / "c", base_port=0, extra_node_args=FAST_NODE,
                      extra_router_args=FAST_ROUTER)
    cl.data_dir.mkdir()
    for node, disk in zip(("n2", "n3"), disks, strict=True):
        (cl.data_dir / node).symlink_to(disk, target_is_directory=True)
    await cl.start()
    return cl


async def test_a_slave_with_a_full_disk_does_not_reconnect_in_a_hot_loop(
        tmp_path, two_tiny_disks) -> None:  # type: ignore[no-untyped-def]
    """slave.py run(): after an established session ends, the slave reconnects at once
    (backoff 0). When the failure is persistent and local (StorageFailure from
    store.append on a full disk), it resyncs in a tight loop: the master re-sends the same
    batch, the slave fails again, hundreds of handshakes a second, log spam on both."""
    cl = await _cluster_on(tmp_path, two_tiny_disks)
    try:
        async with await Client.connect(cl.router_address) as c:
            index = await c.set("x", "y")
            await wait_applied(cl, "n2", index)
            _fill(two_tiny_disks[0] / "filler")
            for i in range(5):
                await c.set(f"big{i}", "z" * 20_000)  # n2 cannot store these
        addr = cl.addresses["n2"]
        first = (await node_status(addr))["master_link"]["syncs"]
        count = first

        async def storm() -> bool:
            nonlocal count
            count = (await node_status(addr))["master_link"]["syncs"]
            return count - first > 30

        with contextlib.suppress(TimeoutError, AssertionError):
            await wait_for(storm, "a reconnect storm", timeout=3)
        assert count - first <= 30, (
            f"n2 completed {count - first} sync handshakes within 3 s while its disk is "
            "full: a hot reconnect loop")
    finally:
        await cl.stop()

