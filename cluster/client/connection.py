"""A pipelined request/reply connection: many requests in flight, replies matched by id.

Used by the client library, the router (towards each node) and the tools. When the
connection fails, every pending request fails with one :class:`NetworkError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

from cluster.config import Address, Limits
from cluster.errors import (
    BadFrame,
    ForeignPeer,
    FrameTooLarge,
    NetworkError,
    ProtocolError,
    ReplError,
    RequestTimeout,
    error_for_code,
    reason,
)
from cluster.net.stream import FramedStream
from cluster.wire import codec
from cluster.wire.framing import is_text_header
from cluster.wire.messages import ErrorReply, Reply, Request

log = logging.getLogger(__name__)

ReplyCallback = Callable[[Reply | ErrorReply | ReplError], None]
PREVIEW = 60  # bytes of a foreign peer's answer quoted in the error


def _deliver(callback: ReplyCallback, result: Reply | ErrorReply | ReplError) -> None:
    try:
        callback(result)
    except Exception:  # one caller's bug must not break the connection for the others
        log.exception("reply callback failed")


class Connection:
    def __init__(self, stream: FramedStream, address: Address) -> None:
        self.address = address
        self._stream = stream
        self._ids = itertools.count(1)
        self._pending: dict[int, ReplyCallback] = {}
        self._closed: ReplError | None = None
        self._heard = False  # a valid reply arrived: the peer speaks the protocol
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(cls, address: Address, limits: Limits | None = None,
                   timeout: float = 3.0) -> Connection:
        stream = await FramedStream.connect(address, limits or Limits(), timeout)
        return cls(stream, address)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def next_id(self) -> int:
        return next(self._ids)

    def send_frame(self, request_id: int, frame: bytes, callback: ReplyCallback) -> None:
        """Send an encoded request; ``callback`` gets its reply, or the error that closed
        the connection, straight from the read loop. ``request_id`` must come from
        :meth:`next_id`."""
        if self._closed is not None:
            raise NetworkError(f"connection to {self.address} is closed: {self._closed}")
        self._pending[request_id] = callback
        self._stream.send_raw(frame)

    def forget(self, request_id: int) -> bool:
        """Stop waiting for ``request_id``'s reply (its callback will not be called; a late
        reply is dropped). False when it was no longer pending."""
        return self._pending.pop(request_id, None) is not None

    def send(self, request: Request) -> asyncio.Future[Reply | ErrorReply]:
        """Send now (pipelined) and return a future for the reply."""
        fut: asyncio.Future[Reply | ErrorReply] = asyncio.get_running_loop().create_future()

        def settle(result: Reply | ErrorReply | ReplError) -> None:
            if fut.done():
                return
            if isinstance(result, ReplError):
                fut.set_exception(result)
                fut.exception()  # mark retrieved: the caller may have given up
            else:
                fut.set_result(result)

        self.send_frame(request.id, codec.frame(request), settle)
        return fut

    async def call(self, request: Request, timeout: float = 10.0) -> Reply | ErrorReply:
        fut = self.send(request)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(fut)
        except TimeoutError:
            self.forget(request.id)
            raise RequestTimeout(
                f"no reply from {self.address} within {timeout:g}s") from None

    async def _read_loop(self) -> None:
        error: ReplError = NetworkError(f"connection to {self.address} closed")
        try:
            async for payloads in self._stream.read_payloads():
                for payload in payloads:
                    try:
                        msg = codec.decode(payload, self._stream.limits)
                    except BadFrame as exc:
                        foreign = self._foreign(exc, payload)
                        if foreign is None:
                            raise
                        raise foreign from exc
                    self._heard = True
                    if not isinstance(msg, Reply | ErrorReply):
                        raise ProtocolError(f"{self.address} sent {type(msg).__name__}, "
                                            "not a reply")
                    if isinstance(msg, ErrorReply) and msg.id == 0:
                        # a protocol error the server could not tie to a request: it closes
                        raise error_for_code(msg.code, msg.message)
                    callback = self._pending.pop(msg.id, None)
                    if callback is not None:
                        _deliver(callback, msg)
        except FrameTooLarge as exc:
            error = self._foreign(exc, self._stream.held(PREVIEW + 1)) or exc
        except ReplError as exc:
            error = exc
        except (OSError, ConnectionError) as exc:
            error = NetworkError(f"connection to {self.address} failed: {reason(exc)}")
        finally:
            self._fail_all(error)
            self._stream.writer.close()

    def _foreign(self, exc: ProtocolError, data: bytes) -> ProtocolError | None:
        """For bytes that are not a replkv frame, from ``data`` on: when they are the first
        thing the peer answered (and, for a frame too large, read as text), the peer speaks
        another protocol, and the error says so instead of quoting a nonsense length.
        None when the peer may well speak replkv."""
        if self._heard or (isinstance(exc, FrameTooLarge) and not is_text_header(data)):
            return None
        line = data[:PREVIEW + 1].split(b"\n", 1)[0].rstrip(b"\r")
        shown = repr(line[:PREVIEW])[1:] + ("..." if len(line) > PREVIEW else "")
        return ForeignPeer(f"{self.address} does not speak the replkv protocol "
                           f"(it answered {shown})")

    def _fail_all(self, error: ReplError) -> None:
        self._closed = error
        pending, self._pending = self._pending, {}
        for callback in pending.values():
            _deliver(callback, error)

    def abort(self) -> None:
        """Drop the connection now; pending requests fail with a network error."""
        self._reader.cancel()
        self._stream.abort()
        self._fail_all(NetworkError(f"connection to {self.address} was dropped"))

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._stream.close()
