"""The client reads key tokens from ``get`` and ``scan`` replies, and says clearly when a
node (an older one) sends none. A real server on 127.0.0.1:0 answers as told."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from cluster.client import Client, Token
from cluster.config import Address, Limits
from cluster.errors import ProtocolError
from cluster.wire import codec
from cluster.wire.framing import FrameDecoder
from cluster.wire.messages import Get, Message, Reply, Scan

pytestmark = pytest.mark.timeout(30)

Answer = Callable[[Message], dict[str, Any]]


async def answering(answer: Answer) -> tuple[asyncio.Server, Address]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(Limits().max_frame)
        try:
            while data := await reader.read(65536):
                for payload in decoder.feed(data):
                    msg = codec.decode(payload, Limits())
                    writer.write(codec.frame(Reply(getattr(msg, "id", 0), answer(msg))))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, Address("127.0.0.1", server.sockets[0].getsockname()[1])


@pytest.fixture
async def node() -> AsyncIterator[Callable[[bool], Any]]:
    """A fake node with three keys; ``node(False)`` answers as a node without key tokens."""
    servers: list[asyncio.Server] = []
    data = {"a": ("1", [1, 4]), "b": (b"\x00", [2, 9]), "c": ("3", [2, 10])}

    async def start(tokens: bool) -> Address:
        def answer(msg: Message) -> dict[str, Any]:
            if isinstance(msg, Get):
                if msg.key not in data:
                    return {"found": False, "index": 10, "node": "n2"}
                value, (epoch, index) = data[msg.key]
                out = {"found": True, "index": 10, "node": "n2", "value": value}
                return {**out, "key_epoch": epoch, "key_index": index} if tokens else out
            assert isinstance(msg, Scan)
            keys = sorted(k for k in data if msg.after is None or k > msg.after)
            page = keys[:msg.limit]
            out = {"items": [[k, data[k][0]] for k in page], "more": len(keys) > msg.limit,
                   "index": 10, "node": "n2"}
            return {**out, "key_tokens": [data[k][1] for k in page]} if tokens else out

        server, address = await answering(answer)
        servers.append(server)
        return address

    try:
        yield start
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


async def test_get_and_scan_give_each_key_s_token(node: Callable[[bool], Any]) -> None:
    async with await Client.connect(await node(True), timeout=5) as c:
        got = await c.get("b")
        assert (got.value, got.token) == (b"\x00", Token(2, 9))
        assert (await c.get("zz")).token is None
        assert await c.scan_with_tokens(limit=2) == (
            [("a", "1", Token(1, 4)), ("b", b"\x00", Token(2, 9))], True)
        assert [i async for i in c.items_with_tokens(page=2)] == [
            ("a", "1", Token(1, 4)), ("b", b"\x00", Token(2, 9)), ("c", "3", Token(2, 10))]
        assert [i async for i in c.items(page=1)] == [("a", "1"), ("b", b"\x00"), ("c", "3")]


async def test_a_node_without_key_tokens_is_said_clearly(node: Callable[[bool], Any]) -> None:
    async with await Client.connect(await node(False), timeout=5) as c:
        got = await c.get("a")
        assert (got.found, got.value, got.token) == (True, "1", None)
        assert await c.scan(limit=5) == ([("a", "1"), ("b", b"\x00"), ("c", "3")], False)
        with pytest.raises(ProtocolError, match="n2 did not send a key token for each item"):
            await c.scan_with_tokens()
