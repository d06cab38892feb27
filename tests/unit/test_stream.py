"""FramedStream.requests(), the one request loop of nodes and the router, over a real
loopback socket: every reply owed is sent before the connection ends, whether the client
half-closes its side, breaks the protocol, or half-closes in the middle of a frame; a
stream that is closed (a server shutting down) stops waiting at once.

The test server answers pings at once and holds every other request until the test answers
it, as a node holds a write until it is durable."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from cluster.config import Limits
from cluster.net.stream import FramedStream
from cluster.wire import codec
from cluster.wire.framing import FrameDecoder, encode_frame
from cluster.wire.messages import ErrorReply, Message, Ping, Reply, Request, Set
from tests.waiting import until

pytestmark = pytest.mark.timeout(20)


@dataclass
class Server:
    port: int = 0
    streams: list[FramedStream] = field(default_factory=list)
    held: list[Request] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, Limits())
        self.streams.append(stream)
        try:
            async for msg in stream.requests(codec.NODE_REQUESTS):
                if isinstance(msg, Ping):
                    stream.send(Reply(msg.id, {}))
                else:
                    self.held.append(msg)
        finally:
            await stream.close()
            self.ended.set()

    def answer_held(self) -> None:
        stream = self.streams[0]
        for msg in self.held:
            stream.send(Reply(msg.id, {"index": 1}))
        self.held.clear()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    tcp = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    srv.port = tcp.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        tcp.close()
        for stream in srv.streams:
            stream.abort()



async def exchange(srv: Server, data: bytes, *, half_close: bool,
                   meanwhile: Callable[[], Awaitable[None]]) -> list[Message]:
    """Send ``data`` (then shut down the writing side if ``half_close``), let
    ``meanwhile`` act on the server, and return every message received until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()  # shutdown(SHUT_WR)
        await writer.drain()
        received = asyncio.create_task(reader.read())  # everything until EOF
        await meanwhile()
        async with asyncio.timeout(5):
            raw = await received
    finally:
        writer.close()
    decoder = FrameDecoder(Limits().max_frame)
    frames = decoder.feed(raw)
    assert decoder.buffered == 0
    return [codec.decode(f, Limits()) for f in frames]


async def test_half_close_gets_every_reply_owed_then_eof(server: Server) -> None:
    data = codec.frame(Set(1, "k", "v")) + codec.frame(Ping(2)) + codec.frame(Set(3, "k", "w"))

    async def answer_after_eof() -> None:
        await until(lambda: len(server.held) == 2, "both writes to arrive")
        await until(lambda: server.streams[0].reader.at_eof(), "the server to see EOF")
        assert not server.ended.is_set(), "closed with two replies owed"
        server.answer_held()

    got = await exchange(server, data, half_close=True, meanwhile=answer_after_eof)
    assert got == [Reply(2, {}), Reply(1, {"index": 1}), Reply(3, {"index": 1})]
    await server.ended.wait()


async def test_half_close_with_nothing_owed_closes_at_once(server: Server) -> None:
    async def nothing() -> None:
        pass

    got = await exchange(server, codec.frame(Ping(1)), half_close=True, meanwhile=nothing)
    assert got == [Reply(1, {})]


async def test_protocol_error_comes_after_the_replies_owed(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "cluster.net.stream")
    data = codec.frame(Set(1, "k", "v")) + encode_frame(b"\xc1")

    async def answer_after_refusal() -> None:
        await until(lambda: "closing" in caplog.text, "the server to refuse the frame")
        server.answer_held()

    got = await exchange(server, data, half_close=False, meanwhile=answer_after_refusal)
    assert got[0] == Reply(1, {"index": 1})
    assert isinstance(got[1], ErrorReply) and (got[1].id, got[1].code) == (0, "bad_frame")
    assert len(got) == 2


async def test_half_close_mid_frame_gets_the_replies_owed_then_bad_frame(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "cluster.net.stream")
    data = codec.frame(Set(1, "k", "v")) + codec.frame(Ping(2))[:6]

    async def answer_after_refusal() -> None:
        await until(lambda: "closing" in caplog.text, "the server to refuse the torn frame")
        server.answer_held()

    got = await exchange(server, data, half_close=True, meanwhile=answer_after_refusal)
    assert got[0] == Reply(1, {"index": 1})
    assert isinstance(got[1], ErrorReply) and (got[1].id, got[1].code) == (0, "bad_frame")
    assert "6 bytes into a frame" in got[1].message
    assert len(got) == 2


async def test_closing_the_stream_stops_waiting_for_replies_owed(server: Server) -> None:
    async def shut_down() -> None:
        await until(lambda: len(server.held) == 1, "the write to arrive")
        await until(lambda: server.streams[0].reader.at_eof(), "the server to see EOF")
        await server.streams[0].close()  # what a node does to every stream on shutdown
        await server.ended.wait()

    got = await exchange(server, codec.frame(Set(1, "k", "v")), half_close=True,
                         meanwhile=shut_down)
    assert got == []


@pytest.mark.parametrize("op, payload", [
    ("append", {"op": "append", "id": 5, "epoch": 1, "prev_index": 0, "prev_epoch": 0,
                "entries": [], "commit": 0}),
    ("ack", {"op": "ack", "id": 5, "epoch": 1, "index": 0}),
    ("reply", {"id": 5, "ok": True}),
])
async def test_a_message_that_is_not_a_request_is_refused_with_its_id(
        server: Server, op: str, payload: dict[str, object]) -> None:
    async def nothing() -> None:
        pass

    got = await exchange(server, encode_frame(codec.pack_obj(payload)), half_close=False,
                         meanwhile=nothing)
    assert len(got) == 1 and isinstance(got[0], ErrorReply), got
    assert (got[0].id, got[0].code) == (5, "bad_request"), op
