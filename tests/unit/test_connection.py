"""The client connection names a peer that does not speak replkv, and only such a peer.

Each test runs a real server on 127.0.0.1:0 that answers with the given bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from cluster.client import Client
from cluster.config import Address, Limits
from cluster.errors import FrameTooLarge, ProtocolError, ReplError
from cluster.wire import codec
from cluster.wire.framing import encode_frame, is_text_header
from cluster.wire.messages import Ping, Reply

Answer = Callable[[bytes], bytes]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Awaitable[Address]]]:
    """Start servers that read one chunk and write ``answer(chunk)``, then keep the
    connection open until the client closes it."""
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> Address:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(answer(data))
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return Address("127.0.0.1", server.sockets[0].getsockname()[1])

    try:
        yield start
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


def _request_id(data: bytes) -> int:
    msg = codec.decode(data[4:], Limits())
    assert isinstance(msg, Ping)
    return msg.id


@pytest.mark.parametrize("answer,shown", [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "'HTTP/1.1 400 Bad Request'"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "'SSH-2.0-OpenSSH_9.2'"),
    (b"-ERR unknown command\r\n", "'-ERR unknown command'"),
    (b"x" * 100, "'" + "x" * 60 + "'..."),
])
async def test_a_text_answer_is_a_peer_that_speaks_another_protocol(
        serve: Callable[[Answer], Awaitable[Address]], answer: bytes, shown: str) -> None:
    addr = await serve(lambda _: answer)
    async with await Client.connect(addr, timeout=5) as c:
        with pytest.raises(ProtocolError) as err:
            await c.ping()
    assert str(err.value) == f"{addr} does not speak the replkv protocol (it answered {shown})"


async def test_a_first_frame_that_is_not_msgpack_is_a_foreign_peer(
        serve: Callable[[Answer], Awaitable[Address]]) -> None:
    addr = await serve(lambda _: encode_frame(b"\xc1\xc1garbage"))
    async with await Client.connect(addr, timeout=5) as c:
        with pytest.raises(ProtocolError, match=r"does not speak the replkv protocol "
                                                r"\(it answered '\\xc1\\xc1garbage'\)"):
            await c.ping()


async def test_a_binary_length_over_the_limit_stays_frame_too_large(
        serve: Callable[[Answer], Awaitable[Address]]) -> None:
    """A replkv peer with a larger frame limit is not called foreign."""
    addr = await serve(lambda _: b"\x01\x00\x00\x00" + b"\x00" * 16)
    async with await Client.connect(addr, timeout=5) as c:
        with pytest.raises(FrameTooLarge, match="frame of 16777216 bytes"):
            await c.ping()


async def test_text_after_a_valid_reply_is_a_broken_peer_not_a_foreign_one(
        serve: Callable[[Answer], Awaitable[Address]]) -> None:
    def answer(data: bytes) -> bytes:
        reply = codec.frame(Reply(_request_id(data), {"node": "n1", "role": "master"}))
        return reply + b"HTTP/1.0 200 OK\r\n"

    addr = await serve(answer)
    async with await Client.connect(addr, timeout=5) as c:
        assert (await c.ping())["node"] == "n1"
        with pytest.raises(ReplError, match="frame of 1213486160 bytes") as err:
            await c.ping()
    assert "does not speak" not in str(err.value)


def test_text_headers() -> None:
    assert is_text_header(b"HTTP/1.0")
    assert is_text_header(b"SSH-")
    assert not is_text_header(b"\x00\x00\x00\x10abcd")
    assert not is_text_header(b"HT")  # too short to tell
