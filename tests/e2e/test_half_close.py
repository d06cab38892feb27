"""A client that sends its requests and then half-closes its socket (``shutdown(SHUT_WR)``,
as ``nc -q`` and many scripts do) gets every reply, then end of file, from the master and
from the router: writes that wait for the fsync or for a majority, and requests the router
forwards to a node, included."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import Address, Limits
from cluster.local import LocalCluster
from cluster.types import Acks
from cluster.wire import codec
from cluster.wire.framing import FrameDecoder
from cluster.wire.messages import Get, Message, Reply, Request, Set, Status

pytestmark = pytest.mark.e2e


async def send_then_half_close(addr: Address, requests: list[Request]) -> list[Message]:
    """Send ``requests`` in one write, shut down the writing side, and return every message
    received until the server closes."""
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    try:
        writer.write(b"".join(codec.frame(r) for r in requests))
        writer.write_eof()
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read()  # until EOF
    finally:
        writer.close()
    decoder = FrameDecoder(Limits().max_frame)
    frames = decoder.feed(raw)
    assert decoder.buffered == 0, "the connection ended mid-frame"
    return [codec.decode(f, Limits()) for f in frames]


@pytest.mark.parametrize("acks", [Acks.ASYNC, Acks.MAJORITY])
@pytest.mark.parametrize("target", ["node", "router"])
async def test_half_closed_client_gets_its_replies_then_eof(
        cluster: LocalCluster, target: str, acks: Acks) -> None:
    addr = cluster.addresses["n1"] if target == "node" else cluster.router_address
    key = f"half-close {target} {acks.value}"
    got = await send_then_half_close(addr, [
        Set(1, key, "v1", acks),
        Set(2, key, "v2", acks),
        Get(3, key),
        Status(4),
    ])
    replies = {m.id: m for m in got if isinstance(m, Reply)}
    assert sorted(replies) == [1, 2, 3, 4], got
    assert replies[2].fields["index"] == replies[1].fields["index"] + 1
    assert ("nodes" if target == "router" else "role") in replies[4].fields
    # the writes were applied, and their replies said where
    async with asyncio.timeout(10):
        check = await send_then_half_close(cluster.addresses["n1"], [Get(1, key)])
    assert isinstance(check[0], Reply) and check[0].fields["value"] == "v2"
