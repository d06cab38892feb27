"""Framed message streams over asyncio, and the one way replkv reads frames from a socket."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from cluster.config import Address, Limits
from cluster.errors import BadFrame, FrameTooLarge, NetworkError, ProtocolError, reason
from cluster.wire import codec
from cluster.wire.framing import FrameDecoder
from cluster.wire.messages import ErrorReply, Message, Reply, Request

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
HIGH_WATER = 4 * 1024 * 1024  # pause reading a connection whose replies pile up unread
CLOSE_TIMEOUT = 1.0  # how long a closing connection may take to flush before it is aborted


class FramedStream:
    """One TCP connection carrying frames in both directions.

    Frames sent in one turn of the event loop go out in one write: under load, one syscall
    carries many replies (or many requests, on the router's link to a node).

    On a server's connection, the stream counts the replies it owes: each request that
    :meth:`requests` yields owes one, and each :class:`Reply` or :class:`ErrorReply` sent
    pays one. A peer that half-closes its side, or breaks the protocol, gets every reply
    owed before the connection ends.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 limits: Limits) -> None:
        self.reader = reader
        self.writer = writer
        self.limits = limits
        self._decoder = FrameDecoder(limits.max_frame)
        self._frames: list[bytes] = []
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._owed = 0
        self._answered = asyncio.Event()  # set each time a reply is sent, and on close
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self.peer = _peer_name(writer)

    @classmethod
    async def connect(cls, addr: Address, limits: Limits, timeout: float) -> FramedStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(addr.host, addr.port,
                                                               limit=READ_SIZE)
        except (OSError, TimeoutError) as exc:
            raise NetworkError(f"cannot connect to {addr}: {exc or 'timed out'}") from exc
        return cls(reader, writer, limits)

    async def read_payloads(self) -> AsyncIterator[list[bytes]]:
        """Yield the complete frame payloads in each chunk read, until the peer closes.

        Raises :class:`~cluster.errors.FrameTooLarge` from the decoder, and
        :class:`~cluster.errors.NetworkError` when the peer closes mid-frame."""
        async for frames in self._read_frames():
            yield frames
        if self._decoder.buffered:
            raise NetworkError(f"{self.peer} closed the connection mid-frame")

    async def _read_frames(self) -> AsyncIterator[list[bytes]]:
        """The payloads of each chunk read, until the peer closes (or half-closes) its side."""
        if self._frames:
            yield self.take_buffered()
        while True:
            await self.wait_writable()
            data = await self.reader.read(READ_SIZE)
            if not data:
                return
            frames = self._decoder.feed(data)
            if frames:
                yield frames
            if self._decoder.error is not None:
                raise self._decoder.error

    async def requests(self, ops: frozenset[str]) -> AsyncIterator[Request]:
        """Each request the peer sends, decoded, for a server's request loop; ``ops`` are
        the ops this server serves (``codec.NODE_REQUESTS`` or ``codec.CLIENT_REQUESTS``).

        When the peer closes or half-closes its side, the iteration ends once every reply
        owed has been sent (Redis does the same): a client may send its requests, shut
        down its writing side and read the replies. A frame or message that breaks the
        protocol is answered, after the replies owed, with an error reply (id 0 when its
        id could not be read), and ends the iteration. Either way the caller then closes
        the connection. After each message the loop pauses while replies pile up unread
        (backpressure)."""
        try:
            async for payloads in self._read_frames():
                for payload in payloads:
                    try:
                        msg = codec.decode_request(payload, self.limits, ops)
                    except ProtocolError as exc:
                        await self._refuse(codec.request_id_of(exc) or 0, exc)
                        return
                    self._owed += 1
                    yield msg
                    await self.wait_writable()
        except FrameTooLarge as exc:
            await self._refuse(0, exc)
            return
        if self._decoder.buffered:
            await self._refuse(0, BadFrame(
                f"the peer closed its side {self._decoder.buffered} bytes into a frame"))
            return
        await self.wait_replies()

    async def wait_replies(self, most: int = 0) -> None:
        """Wait until at most ``most`` replies are owed, or the stream is closing."""
        while self._owed > most and not self._closing:
            self._answered.clear()
            await self._answered.wait()

    async def _refuse(self, request_id: int, exc: ProtocolError) -> None:
        log.warning("closing %s: %s", self.peer, reason(exc))
        await self.wait_replies()
        self.send(ErrorReply(request_id, exc.code, str(exc)))

    async def read_message(self) -> Message:
        """The next whole message (for request/reply exchanges, not bulk streams)."""
        while not self._frames:
            data = await self.reader.read(READ_SIZE)
            if not data:
                raise NetworkError(f"{self.peer} closed the connection")
            self._frames.extend(self._decoder.feed(data))
        return codec.decode(self._frames.pop(0), self.limits)

    def held(self, n: int) -> bytes:
        """The first ``n`` bytes read but not returned as a frame (for error messages)."""
        return self._decoder.held(n)

    def take_buffered(self) -> list[bytes]:
        """Frames already read by :meth:`read_message` but not yet returned."""
        frames, self._frames = self._frames, []
        return frames

    def send(self, msg: Message) -> None:
        """Send ``msg``; a reply pays one reply owed (see :meth:`requests`)."""
        if self._owed and isinstance(msg, (Reply, ErrorReply)):
            self._owed -= 1
            self._answered.set()
        self.send_raw(codec.frame(msg))

    def send_raw(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what was sent so far (done at the end of each loop turn anyway)."""
        self._flush_scheduled = False
        if not self._out:
            return
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._out_bytes = 0
        if not self.writer.is_closing():
            self.writer.write(data)

    def backlog(self) -> int:
        """Bytes sent but not yet taken by the peer's socket."""
        return self._out_bytes + self.writer.transport.get_write_buffer_size()

    async def wait_writable(self) -> None:
        """Wait while more than :data:`HIGH_WATER` bytes wait for a peer that does not read:
        a reader of this connection pauses instead of buffering without bound."""
        if self.backlog() > HIGH_WATER:
            await self.drain()

    async def drain(self) -> None:
        self.flush()
        await self.writer.drain()

    async def close(self) -> None:
        """Flush and close; a peer that does not take what is left within
        :data:`CLOSE_TIMEOUT` is cut off. Replies still owed are not waited for."""
        self._stop_waiting()
        self.flush()
        self.writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.writer.wait_closed()
        except (TimeoutError, OSError, ConnectionError):
            self.abort()

    def abort(self) -> None:
        """Close at once, dropping whatever is unsent."""
        self._stop_waiting()
        self._out.clear()
        self._out_bytes = 0
        self.writer.transport.abort()

    def _stop_waiting(self) -> None:
        """A closing stream sends no more replies: nobody waits for them."""
        self._closing = True
        self._answered.set()


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
