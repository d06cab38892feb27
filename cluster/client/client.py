"""The replkv client: talks to the router (or to one node) over one pipelined connection.

    async with await Client.connect(Address.parse("127.0.0.1:7000")) as kv:
        token = await kv.set("k", "v")                # Token(epoch, index)
        result = await kv.get("k", min_index=token)   # read your own write
        result.token                                  # the write that set the value

Reads say which write produced each value: ``GetResult.token`` and the tokens of
:meth:`Client.scan_with_tokens` and :meth:`Client.items_with_tokens` are the (epoch, index)
of the log entry that last set the key, the token its ``set`` returned.

Errors of the server are raised as the matching :mod:`cluster.errors` class. An error of
a write says what became of it: ``exc.applied`` is ``"no"`` (safe to retry), ``"yes"`` or
``"unknown"`` (it may still take effect: read before retrying), and ``exc.index`` /
``exc.epoch`` say where its entry is when it got one. A write the client gave up on (no
reply in time, the connection lost after sending) is ``"unknown"`` too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from cluster.client.connection import Connection
from cluster.config import Address, Limits
from cluster.errors import ForeignPeer, ProtocolError, ReplError, error_for_code, with_outcome
from cluster.types import Acks, Consistency, Token, Value
from cluster.wire.messages import (
    Delete,
    ErrorReply,
    Get,
    Ping,
    Reply,
    Request,
    Scan,
    Set,
    Status,
)


@dataclass(frozen=True, slots=True)
class GetResult:
    found: bool
    value: Value | None
    index: int  # the serving node's applied index
    node: str | None  # which node served the read
    # the write that set the value: its entry's (epoch, index); None when not found (or
    # served by an older node, which does not say)
    token: Token | None = None


class Client:
    def __init__(self, conn: Connection, timeout: float) -> None:
        self._conn = conn
        self.timeout = timeout

    @classmethod
    async def connect(cls, address: Address, *, timeout: float = 10.0,
                      limits: Limits | None = None) -> Client:
        conn = await Connection.open(address, limits, timeout=min(timeout, 5.0))
        return cls(conn, timeout)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._conn.close()

    def _id(self) -> int:
        return self._conn.next_id()

    async def _call(self, request: Request) -> dict[str, Any]:
        return _fields(await self._conn.call(request, self.timeout))

    async def _write(self, request: Set | Delete) -> Token:
        # wait past the write's own timeout, so the server's answer (with the outcome and
        # the index) arrives before the client gives up
        timeout = self.timeout
        if request.timeout_ms is not None:
            timeout = max(timeout, request.timeout_ms / 1000 + WRITE_GRACE)
        sent = not self._conn.closed  # a closed connection refuses before sending
        try:
            reply = await self._conn.call(request, timeout)
        except ForeignPeer:
            raise  # not a replkv node: no write to speak of
        except ReplError as exc:  # no reply came: the client cannot know more
            with_outcome(exc, "unknown" if sent else "no")
            raise
        return _token(_fields(reply, write=True))

    async def set(self, key: str, value: Value, acks: Acks = Acks.ASYNC, *,
                  timeout_ms: int | None = None) -> Token:
        """Store ``value``; returns where the write landed, the read token for it (its
        ``copies`` says how many nodes held it when the master replied). The reply waits
        for the copies ``acks`` asks for, at most ``timeout_ms`` (the master's default:
        5000 when it needs slaves); past it the write fails with ``timeout`` and
        ``applied == "unknown"``."""
        return await self._write(Set(self._id(), key, value, acks, timeout_ms))

    async def delete(self, key: str, acks: Acks = Acks.ASYNC, *,
                     timeout_ms: int | None = None) -> Token:
        return await self._write(Delete(self._id(), key, acks, timeout_ms))

    async def get(self, key: str, *, min_index: Token | int = 0, strong: bool = False
                  ) -> GetResult:
        """Read ``key``. With a :class:`Token` (or a bare index, any epoch) as ``min_index``,
        only a node holding that write serves it."""
        consistency = Consistency.STRONG if strong else Consistency.ANY
        epoch, index = _split(min_index)
        f = await self._call(Get(self._id(), key, index, consistency, epoch))
        token = None
        if f["found"] and "key_index" in f:
            token = Token(int(f.get("key_epoch", 0)), int(f["key_index"]))
        return GetResult(bool(f["found"]), f.get("value"), int(f["index"]), f.get("node"),
                         token)

    async def scan(self, after: str | None = None, limit: int = 1000, *,
                   min_index: Token | int = 0) -> tuple[list[tuple[str, Value]], bool]:
        """A page of keys after ``after``, in key order, and whether more follow."""
        f = await self._scan(after, limit, min_index)
        return [(k, v) for k, v in f["items"]], bool(f["more"])

    async def scan_with_tokens(self, after: str | None = None, limit: int = 1000, *,
                               min_index: Token | int = 0
                               ) -> tuple[list[tuple[str, Value, Token]], bool]:
        """As :meth:`scan`, with each key's token: the write that set its value."""
        f = await self._scan(after, limit, min_index)
        items, tokens = f["items"], f.get("key_tokens")
        if not isinstance(tokens, list) or len(tokens) != len(items):
            raise ProtocolError(f"node {f.get('node')} did not send a key token for each "
                                "item (an older node does not)")
        return ([(k, v, Token(int(e), int(i)))
                 for (k, v), (e, i) in zip(items, tokens, strict=True)], bool(f["more"]))

    async def _scan(self, after: str | None, limit: int, min_index: Token | int
                    ) -> dict[str, Any]:
        epoch, index = _split(min_index)
        return await self._call(Scan(self._id(), after, limit, index, epoch))

    def items(self, page: int = 1000, *, min_index: Token | int = 0
              ) -> AsyncIterator[tuple[str, Value]]:
        """Every key and value, in key order, a page at a time (each page from a node that
        holds the write ``min_index`` names)."""
        return _every_page(lambda after: self.scan(after, page, min_index=min_index))

    def items_with_tokens(self, page: int = 1000, *, min_index: Token | int = 0
                          ) -> AsyncIterator[tuple[str, Value, Token]]:
        """As :meth:`items`, with each key's token: the write that set its value."""
        return _every_page(lambda after: self.scan_with_tokens(after, page,
                                                               min_index=min_index))

    async def status(self) -> dict[str, Any]:
        return await self._call(Status(self._id()))

    async def ping(self) -> dict[str, Any]:
        return await self._call(Ping(self._id()))


WRITE_GRACE = 2.0  # seconds the client waits past a write's timeout_ms


def _fields(reply: Reply | ErrorReply, write: bool = False) -> dict[str, Any]:
    """A reply's fields, or its error raised. A write refused as malformed (a protocol
    error) was not applied, though the reply does not say so."""
    if isinstance(reply, Reply):
        return reply.fields
    err = error_for_code(reply.code, reply.message, master=reply.master,
                         applied=reply.applied, index=reply.index, epoch=reply.epoch)
    if write and err.applied is None and isinstance(err, ProtocolError):
        with_outcome(err, "no")
    raise err


def _token(fields: dict[str, Any]) -> Token:
    return Token(int(fields.get("epoch", 0)), int(fields["index"]),
                 int(fields.get("copies", 0)))


_Item = TypeVar("_Item", tuple[str, Value], tuple[str, Value, Token])


async def _every_page(scan: Callable[[str | None], Awaitable[tuple[list[_Item], bool]]]
                      ) -> AsyncIterator[_Item]:
    """Every item of a scan, calling ``scan(after)`` for each page."""
    after: str | None = None
    while True:
        items, more = await scan(after)
        for item in items:
            yield item
        if not more or not items:
            return
        after = items[-1][0]


def _split(token: Token | int) -> tuple[int, int]:
    """(epoch, index) of a read token; a bare index matches any epoch."""
    return (token.epoch, token.index) if isinstance(token, Token) else (0, token)
