"""The replkv client: talks to the router (or to one node) over one pipelined connection.

    async with await Client.connect(Address.parse("127.0.0.1:7000")) as kv:
        token = await kv.set("k", "v")                # Token(epoch, index)
        result = await kv.get("k", min_index=token)   # read your own write

Errors of the server are raised as the matching :mod:`cluster.errors` class.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from cluster.client.connection import Connection
from cluster.config import Address, Limits
from cluster.errors import error_for_code
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
        reply = await self._conn.call(request, self.timeout)
        if isinstance(reply, ErrorReply):
            raise error_for_code(reply.code, reply.message)
        assert isinstance(reply, Reply)
        return reply.fields

    async def set(self, key: str, value: Value, acks: Acks = Acks.ASYNC) -> Token:
        """Store ``value``; returns where the write landed, the read token for it."""
        return _token(await self._call(Set(self._id(), key, value, acks)))

    async def delete(self, key: str, acks: Acks = Acks.ASYNC) -> Token:
        return _token(await self._call(Delete(self._id(), key, acks)))

    async def get(self, key: str, *, min_index: Token | int = 0, strong: bool = False
                  ) -> GetResult:
        """Read ``key``. With a :class:`Token` (or a bare index, any epoch) as ``min_index``,
        only a node holding that write serves it."""
        consistency = Consistency.STRONG if strong else Consistency.ANY
        epoch, index = _split(min_index)
        f = await self._call(Get(self._id(), key, index, consistency, epoch))
        return GetResult(bool(f["found"]), f.get("value"), int(f["index"]), f.get("node"))

    async def scan(self, after: str | None = None, limit: int = 1000, *,
                   min_index: Token | int = 0) -> tuple[list[tuple[str, Value]], bool]:
        epoch, index = _split(min_index)
        f = await self._call(Scan(self._id(), after, limit, index, epoch))
        return [(k, v) for k, v in f["items"]], bool(f["more"])

    async def items(self, page: int = 1000, *, min_index: Token | int = 0
                    ) -> AsyncIterator[tuple[str, Value]]:
        """Every key and value, in key order, a page at a time (each page from a node that
        holds the write ``min_index`` names)."""
        after: str | None = None
        while True:
            items, more = await self.scan(after, page, min_index=min_index)
            for item in items:
                yield item
            if not more or not items:
                return
            after = items[-1][0]

    async def status(self) -> dict[str, Any]:
        return await self._call(Status(self._id()))

    async def ping(self) -> dict[str, Any]:
        return await self._call(Ping(self._id()))


def _token(fields: dict[str, Any]) -> Token:
    return Token(int(fields.get("epoch", 0)), int(fields["index"]))


def _split(token: Token | int) -> tuple[int, int]:
    """(epoch, index) of a read token; a bare index matches any epoch."""
    return (token.epoch, token.index) if isinstance(token, Token) else (0, token)
