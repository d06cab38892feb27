"""End-to-end fixtures: real node and router processes on 127.0.0.1 with free ports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cluster.client import Client
from cluster.config import Address
from cluster.errors import ReplError
from cluster.local import LocalCluster

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


async def node_status(address: Address) -> dict[str, Any]:
    async with await Client.connect(address, timeout=3) as c:
        return await c.status()


async def applied(address: Address) -> int:
    return int((await node_status(address))["applied_index"])


async def wait_applied(cluster: LocalCluster, node: str, index: int,
                       timeout: float = 20.0) -> None:
    addr = cluster.addresses[node]

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
