"""End-to-end fixtures: real node and router processes on 127.0.0.1 with free ports."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.client import Client, Token
from cluster.config import Address, Limits
from cluster.errors import ReplError
from cluster.local import LocalCluster
from cluster.wire import codec
from cluster.wire.framing import FrameDecoder
from cluster.wire.messages import ErrorReply

pytestmark = pytest.mark.e2e

FAST_NODE = ["--heartbeat-interval", "0.05", "--peer-timeout", "0.5"]
FAST_ROUTER = ["--health-interval", "0.05", "--node-timeout", "0.5"]


async def wait_for(check: Callable[[], Awaitable[bool]], what: str,
                   timeout: float = 20.0) -> None:
    """Re-check a condition until it holds; fail with ``what`` after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                if await check():
                    return
            except ReplError:
                pass
            await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")  # pragma: no cover


async def happens_within(check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    """Watch for something that must not happen: True if ``check`` held within ``seconds``."""
    try:
        await wait_for(check, "the watched condition", seconds)
    except (TimeoutError, AssertionError):
        return False
    return True


async def node_status(address: Address) -> dict[str, Any]:
    async with await Client.connect(address, timeout=3) as c:
        return await c.status()


async def applied(address: Address) -> int:
    return int((await node_status(address))["applied_index"])


async def wait_applied(cluster: LocalCluster, node: str, index: int | Token,
                       timeout: float = 20.0) -> None:
    addr = cluster.addresses[node]
    if isinstance(index, Token):
        index = index.index

    async def check() -> bool:
        return await applied(addr) >= index

    try:
        await wait_for(check, f"{node} to apply {index}", timeout)
    except TimeoutError:
        raise AssertionError(f"{node} did not apply {index} in {timeout}s; "
                             f"log: {cluster.tail(node, 10)}") from None


async def node_items(address: Address) -> dict[str, Any]:
    async with await Client.connect(address, timeout=5) as c:
        return {k: v async for k, v in c.items()}


@pytest.fixture
async def make_cluster(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[LocalCluster]]]:
    """Start clusters with extra node options; every one is stopped at the end."""
    started: list[LocalCluster] = []

    async def make(node_args: list[str] | None = None, fsync: str = "always") -> LocalCluster:
        cl = LocalCluster(tmp_path / f"c{len(started)}", base_port=0, fsync=fsync,
                          extra_node_args=[*FAST_NODE, *(node_args or [])],
                          extra_router_args=FAST_ROUTER)
        started.append(cl)
        await cl.start()
        return cl

    try:
        yield make
    finally:
        for cl in started:
            await cl.stop()


@pytest.fixture
async def cluster(make_cluster: Callable[..., Awaitable[LocalCluster]]) -> LocalCluster:
    return await make_cluster()


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[Client]:
    async with await Client.connect(cluster.router_address, timeout=10) as c:
        yield c


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs file systems (``tmpfs("1m")``): disks that fill up for real.
    Needs root; in CI a missing root is a failure, not a skip."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run as root to mount a tmpfs")
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounts)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       check=True)
        mounts.append(path)
        return path

    try:
        yield mount
    finally:
        for path in mounts:
            subprocess.run(["umount", "-l", str(path)], check=False)


async def cluster_on_disks(data_dir: Path, disks: dict[str, Path],
                           node_args: list[str] | None = None) -> LocalCluster:
    """Start a cluster whose nodes named in ``disks`` keep their data on those disks."""
    cl = LocalCluster(data_dir, base_port=0, extra_node_args=[*FAST_NODE, *(node_args or [])],
                      extra_router_args=FAST_ROUTER)
    data_dir.mkdir()
    for node, disk in disks.items():
        (data_dir / node).symlink_to(disk, target_is_directory=True)
    await cl.start()
    return cl


async def raw_exchange(addr: Address, data: bytes) -> tuple[ErrorReply, bool]:
    """Send raw bytes; return the error reply and whether the server then closed."""
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    try:
        writer.write(data)
        await writer.drain()
        decoder = FrameDecoder(1 << 24)
        frames: list[bytes] = []
        async with asyncio.timeout(5):
            while not frames:
                chunk = await reader.read(65536)
                assert chunk, "closed without an error reply"
                frames = decoder.feed(chunk)
            closed = await reader.read(65536) == b""
        reply = codec.decode(frames[0], Limits())
        assert isinstance(reply, ErrorReply), reply
        return reply, closed
    finally:
        writer.close()
