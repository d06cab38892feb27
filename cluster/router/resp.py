"""The router's Redis front end (``--resp-listen``): RESP2 commands become replkv requests
that the router routes as it routes its own clients' (writes to the master, reads to a
random live slave), and each command's reply goes back in request order.

One :class:`_Connection` per Redis client. Its request loop decodes commands
(:class:`cluster.wire.resp.RequestDecoder`), gives each a slot in the queue of replies and
sends the replkv requests it needs through :meth:`Router.submit`; a slot is filled when its
replies come back, and the queue is written out from its head as far as it is filled.
The memory bounds are the native port's: at most ``max_in_flight`` requests awaiting a
node and as many replies queued, and no reading while more than
:data:`~cluster.net.stream.HIGH_WATER` bytes wait for a client that does not read.

Reads on a connection see that connection's writes: a read waits until the connection's
writes in flight are answered, then carries the last one's read token. See docs/RESP.md.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from cluster.config import Address
from cluster.errors import NetworkError
from cluster.net.stream import READ_SIZE, FramedStream
from cluster.types import NodeId, Token
from cluster.wire import resp
from cluster.wire.messages import Delete, ErrorReply, Get, Reply, Request, Scan, Set, Status
from cluster.wire.resp import NIL, OK, RespProtocolError, array, bulk, error, integer, simple

if TYPE_CHECKING:
    from cluster.router.server import Router

log = logging.getLogger(__name__)

REDIS_VERSION = "7.0.0"  # the Redis whose protocol and commands this follows (docs/RESP.md)
KEYS_LIMIT = 10_000  # KEYS refuses a pattern that matches more keys than this
KEYS_PAGE = 1_000  # keys per scan page that KEYS asks for
SCAN_COUNT = 10  # SCAN's default COUNT (as Redis)
SCAN_COUNT_MAX = 100_000  # a larger COUNT is taken as this (the native scan's limit)
WAIT_POLL = 0.01  # seconds between WAIT's looks at the master's status

NativeReply = Reply | ErrorReply


def _version() -> str:
    try:
        return importlib.metadata.version("replkv")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "unknown"


class RespFrontEnd:
    """The listener for Redis clients and their connections."""

    def __init__(self, router: Router, max_in_flight: int) -> None:
        self.router = router
        self.max_in_flight = max_in_flight
        self.address: Address | None = None
        self.started = time.monotonic()
        self.version = _version()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._clients = 0  # connections accepted so far: the next one's CLIENT ID

    @property
    def clients(self) -> int:
        return len(self._connections)

    async def start(self) -> Address:
        """Listen on the router's ``resp_listen`` address."""
        listen = self.router.config.resp_listen
        if listen is None:
            raise ValueError("the router has no resp_listen address")
        try:
            self._server = await asyncio.start_server(self._handle, listen.host, listen.port,
                                                      limit=READ_SIZE, reuse_address=True)
        except OSError as exc:
            raise NetworkError(f"cannot listen on {listen} for Redis clients "
                               f"(--resp-listen): {exc.strerror or exc}") from exc
        self.address = Address(listen.host, self._server.sockets[0].getsockname()[1])
        log.info("serving Redis (RESP2) clients on %s", self.address)
        return self.address

    async def close(self) -> None:
        """Stop accepting and close every connection (replies not yet sent are dropped)."""
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(c.close() for c in list(self._connections)))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        conn = _Connection(self, FramedStream(reader, writer, self.router.config.limits),
                           self._clients)
        self._connections.add(conn)
        try:
            await conn.serve()
        finally:
            self._connections.discard(conn)
            await conn.close()


class _Refused(Exception):
    """A command refused before anything was sent: its text is the error reply's."""


class _Slot:
    """A command's place in the queue of replies; ``data`` once its reply is known."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: bytes | None = None


Handler = Callable[["_Connection", list[bytes], _Slot], Awaitable[bytes | None]]


class _Batch:
    """Several replkv requests for one command: ``finish`` makes the command's reply from
    their replies, in the order they were added, once every one has come back. A batch
    whose replies' values pass ``max_bytes`` stops keeping them (``overflow``)."""

    def __init__(self, conn: _Connection, slot: _Slot,
                 finish: Callable[[list[NativeReply]], bytes],
                 max_bytes: int | None = None) -> None:
        self.conn = conn
        self.slot = slot
        self.finish = finish
        self.replies: list[NativeReply | None] = []
        self.waiting = 1  # the requests not yet answered, plus one until close()
        self.max_bytes = max_bytes
        self.size = 0
        self.overflow = False

    async def add(self, msg: Request, *, node: NodeId | None = None,
                  write: bool = False) -> None:
        await self.conn.room(queue=False)
        i = len(self.replies)
        self.replies.append(None)
        self.waiting += 1

        def done(reply: NativeReply) -> None:
            if self.max_bytes is not None and isinstance(reply, Reply):
                self.size += len(_value_bytes(reply) or b"")
                if self.size > self.max_bytes:
                    self.overflow = True
                    self.replies.clear()
            if not self.overflow:
                self.replies[i] = reply
            self._answered()

        self.conn.send(msg, done, self.slot, node=node, write=write)

    def close(self) -> None:
        """Every request has been added."""
        self._answered()

    def _answered(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            replies = [r for r in self.replies if r is not None]
            self.conn.fill(self.slot, self.finish(replies))


class _Connection:
    """One Redis client: its request loop, its queue of replies and what it remembers (its
    last write's read token, its name)."""

    def __init__(self, front: RespFrontEnd, stream: FramedStream, number: int) -> None:
        self.front = front
        self.router = front.router
        self.limits = front.router.config.limits
        self.stream = stream
        self.number = number
        self.name: bytes | None = None
        self._decoder = resp.RequestDecoder(self.limits)
        self._queue: deque[_Slot] = deque()
        self._pending: dict[int, tuple[Callable[[NativeReply], None], _Slot]] = {}
        self._next_id = 0
        self._writes = 0  # writes sent and not yet answered
        self._token: Token | None = None  # where the last write answered landed
        self._progress = asyncio.Event()  # set when a reply comes, a slot is sent, on close
        self._tasks: set[asyncio.Task[None]] = set()
        self._eof = False
        self.quit = False
        self._closing = False
        # after a MULTI (refused: no transactions), the commands up to EXEC or DISCARD are
        # refused too rather than run one by one outside the transaction the client meant
        self._in_multi = False

    # --- the request loop ------------------------------------------------------------------

    async def serve(self) -> None:
        """Serve commands until the client closes (or half-closes) its side, sends QUIT
        or breaks the protocol; then send the replies owed, and return."""
        stream = self.stream
        failure: str | None = None
        try:
            while not self.quit:
                await stream.wait_writable()
                data = await stream.reader.read(READ_SIZE)
                if not data:
                    self._eof = True
                    if self._decoder.incomplete:
                        failure = ("Protocol error: the client closed its side in the "
                                   "middle of a request")
                    break
                try:
                    commands = self._decoder.feed(data)
                except RespProtocolError as exc:
                    failure = str(exc)
                    break
                for args in commands:
                    await self.room()
                    await self._execute(args)
                    if self.quit or self._closing:
                        break
                    await stream.wait_writable()
                if self._decoder.error is not None and not self.quit:
                    failure = str(self._decoder.error)
                    break
            if failure is not None:
                log.warning("closing Redis client %s: %s", stream.peer, failure)
                self.fill(self._new_slot(), error(f"ERR {failure}"))
            self._eof = True
            while self._queue and not self._closing:
                self._progress.clear()
                await self._progress.wait()
        except (NetworkError, OSError, ConnectionError):
            pass

    async def close(self) -> None:
        self._closing = True
        self._progress.set()
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()
        await self.stream.close()

    async def room(self, queue: bool = True) -> None:
        """Wait while ``max_in_flight`` requests await a node (and, with ``queue``, while
        as many replies are queued)."""
        cap = self.front.max_in_flight
        while (len(self._pending) >= cap or (queue and len(self._queue) >= cap)) \
                and not self._closing:
            self._progress.clear()
            await self._progress.wait()

    async def settled(self) -> None:
        """Wait until this connection's writes in flight are answered (a read then carries
        the last one's token: the client reads its own writes)."""
        while self._writes and not self._closing:
            self._progress.clear()
            await self._progress.wait()

    def gone(self) -> bool:
        """Whether the client has closed its side (or the connection is closing)."""
        return (self._closing or self._eof or self.stream.reader.at_eof()
                or self.stream.writer.is_closing())

    async def _execute(self, args: list[bytes]) -> None:
        slot = self._new_slot()
        name = args[0].lower()
        spec = _COMMANDS.get(name)
        try:
            if name == b"multi":
                self._in_multi = True
            elif name in (b"exec", b"discard"):
                self._in_multi = False
            elif self._in_multi:
                raise _Refused(f"ERR {_text(args[0][:128])!r} was not run: it follows a "
                               "MULTI, and replkv has no transactions")
            if spec is None:
                raise _Refused(_unknown(args))
            if not spec.arity_ok(len(args)):
                raise _Refused(f"ERR wrong number of arguments for '{spec.name}' command")
            reply = await spec.handler(self, args, slot)
        except _Refused as exc:
            reply = error(str(exc))
        except Exception:
            log.exception("Redis client %s: %r failed", self.stream.peer, name)
            reply = error(f"ERR internal error while serving {_text(name)!r} (a bug in "
                          "the router; see its log)")
        if reply is not None:
            self.fill(slot, reply)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a command that takes several round trips (KEYS, WAIT) beside the loop."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the queue of replies --------------------------------------------------------------

    def _new_slot(self) -> _Slot:
        slot = _Slot()
        self._queue.append(slot)
        return slot

    def fill(self, slot: _Slot, data: bytes) -> None:
        """Give ``slot`` its reply (once) and send what the queue's head has ready."""
        if slot.data is not None:
            return
        slot.data = data
        queue = self._queue
        while queue and queue[0].data is not None:
            self.stream.send_raw(queue.popleft().data or b"")
        self._progress.set()

    # --- replkv requests -------------------------------------------------------------------

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def send(self, msg: Request, on_reply: Callable[[NativeReply], None], slot: _Slot, *,
             node: NodeId | None = None, write: bool = False) -> None:
        """Route ``msg`` (to ``node`` when given); ``on_reply`` gets its reply. A write
        counts as in flight until then, and its token is remembered."""
        if write:
            self._writes += 1

            def done(reply: NativeReply) -> None:
                self._writes -= 1
                if isinstance(reply, Reply):
                    self._note_write(reply.fields)
                on_reply(reply)

            self._pending[msg.id] = (done, slot)
        else:
            self._pending[msg.id] = (on_reply, slot)
        self.router.submit(msg, self, node)

    def finished(self, reply: NativeReply) -> None:
        """The router's answer to a request of this connection (the router's ReplyTo)."""
        entry = self._pending.pop(reply.id, None)
        if entry is None:
            return  # closed meanwhile
        callback, slot = entry
        try:
            callback(reply)
        except Exception:
            log.exception("Redis client %s: handling a reply failed", self.stream.peer)
            self.fill(slot, error("ERR internal error while handling a reply (a bug in the "
                                  "router; see its log)"))
        self._progress.set()

    def ask(self, msg: Request, slot: _Slot, node: NodeId | None = None
            ) -> asyncio.Future[NativeReply]:
        """``msg``'s reply as a future."""
        future: asyncio.Future[NativeReply] = asyncio.get_running_loop().create_future()

        def done(reply: NativeReply) -> None:
            if not future.done():
                future.set_result(reply)

        self.send(msg, done, slot, node=node)
        return future

    def _note_write(self, fields: dict[str, Any]) -> None:
        epoch, index = fields.get("epoch"), fields.get("index")
        if isinstance(epoch, int) and isinstance(index, int):
            token = Token(epoch, index)
            if self._token is None or token > self._token:
                self._token = token

    def get(self, key: str) -> Get:
        """A read of ``key`` that sees this connection's writes."""
        if self._token is None:
            return Get(self.new_id(), key)
        return Get(self.new_id(), key, min_index=self._token.index, min_epoch=self._token.epoch)

    def scan(self, after: str | None, limit: int) -> Scan:
        if self._token is None:
            return Scan(self.new_id(), after, limit)
        return Scan(self.new_id(), after, limit, min_index=self._token.index,
                    min_epoch=self._token.epoch)

    def failure(self, reply: ErrorReply, note: str = "") -> bytes:
        """A replkv error as a Redis error: its code, upper case, then its message."""
        if reply.code == "write_lost":
            self._token = None  # the write is gone: later reads need not wait for it
        text = f"{reply.code.upper()} {reply.message}"
        if reply.applied is not None:
            text += f" (applied: {reply.applied})"
        return error(text + note)

    def key(self, arg: bytes) -> str:
        try:
            key = arg.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused("ERR keys must be UTF-8 text: replkv keys are strings") from None
        if len(arg) > self.limits.max_key:
            raise _Refused(f"ERR a key of {len(arg)} bytes is over the limit of "
                           f"{self.limits.max_key} bytes (--max-key-size)")
        return key

    def value(self, arg: bytes) -> bytes:
        if len(arg) > self.limits.max_value:
            raise _Refused(f"ERR a value of {len(arg)} bytes is over the limit of "
                           f"{self.limits.max_value} bytes (--max-value-size)")
        return arg

    def master(self) -> NodeId:
        master = self.router.table.master()
        if master is None:
            raise _Refused("UNAVAILABLE no master is reachable; nothing was done")
        return master

    def read_reply(self, reply: NativeReply) -> bytes:
        """A GET's reply."""
        if isinstance(reply, ErrorReply):
            return self.failure(reply)
        return bulk(_value_bytes(reply))

    async def copies(self, token: Token | None, slot: _Slot) -> int:
        """How many slaves hold ``token``'s write, by the master's own status (a slave
        counts once the master has its acknowledgement). 0 when the master is not reachable
        or is not the one that took the write (a newer epoch): then nobody can say."""
        master = self.router.table.master()
        if master is None:
            return 0
        await self.room(queue=False)
        reply = await self.ask(Status(self.new_id()), slot, node=master)
        if isinstance(reply, ErrorReply):
            return 0
        fields = reply.fields
        if token is not None and fields.get("epoch") != token.epoch:
            return 0
        index = token.index if token is not None else 0
        slaves = fields.get("slaves")
        return sum(1 for s in (slaves if isinstance(slaves, list) else [])
                   if isinstance(s, dict) and s.get("up") is True
                   and isinstance(s.get("acked"), int) and s["acked"] >= index)

    def token(self) -> Token | None:
        return self._token


# --- the commands -----------------------------------------------------------------------------


async def _ping(c: _Connection, args: list[bytes], slot: _Slot) -> bytes:
    if len(args) > 2:
        raise _Refused("ERR wrong number of arguments for 'ping' command")
    return b"+PONG\r\n" if len(args) == 1 else bulk(args[1])


async def _echo(c: _Connection, args: list[bytes], slot: _Slot) -> bytes:
    return bulk(args[1])


async def _quit(c: _Connection, args: list[bytes], slot: _Slot) -> bytes:
    c.quit = True
    return OK


async def _select(c: _Connection, args: list[bytes], slot: _Slot) -> bytes:
    if _integer(args[1]) != 0:
        raise _Refused("ERR DB index is out of range (replkv has one keyspace, database 0)")
    return OK


async def _hello(c: _Connection, args: list[bytes], slot: _Slot) -> bytes:
    if len(args) > 1:
        try:
            version = int(args[1])
        except ValueError:
            raise _Refused("NOPROTO the protocol version is not a number") from None
        if version != 2:
            raise _Refused(f"NOPROTO replkv speaks RESP2 only: HELLO {version} is not "
                           "supported (use HELLO 2, or a client's RESP2 mode)")
        rest = args[2:]
        name = c.name
        while rest:
            option = rest[0].upper()
            if option == b"AUTH" and len(rest) >= 3:
                raise _Refused("ERR AUTH is not supported: replkv has no authentication")
            if option == b"SETNAME" and len(rest) >= 2:
                name = _client_name(rest[1])
                rest = rest[2:]
            else:
                raise _Refused(f"ERR syntax error in HELLO option {_text(rest[0])!r}")
        c.name = name
    return array([
        bulk(b"server"), bulk(b"replkv"), bulk(b"version"), bulk(REDIS_VERSION.encode()),
        bulk(b"proto"), integer(2), bulk(b"id"), integer(c.number),
        bulk(b"mode"), bulk(b"standalone"), bulk(b"role"), bulk(b"master"),
        bulk(b"modules"), array([]),
    ])


def _client_name(arg: bytes) -> bytes | None:
    if any(b < 0x21 or b > 0x7E for b in arg):
        raise _Refused("ERR Client names cannot contain spaces, newlines or special "
                       "characters.")
    return arg or None


async def _client(c: _Connection, args: list[bytes], slot: _Slot) -> bytes:
    sub = args[1].upper()
    if sub == b"SETNAME" and len(args) == 3:
        c.name = _client_name(args[2])
        return OK
    if sub == b"GETNAME" and len(args) == 2:
        return bulk(c.name)
    if sub == b"ID" and len(args) == 2:
        return integer(c.number)
    if sub == b"SETINFO" and len(args) == 4:
        return OK  # a client library's name and version: accepted, not kept
    if sub == b"HELP" and len(args) == 2:
        return array([simple(line) for line in (
            "CLIENT <subcommand> [<arg> ...]. Subcommands are:",
            "SETNAME <name>", "GETNAME", "ID", "SETINFO <LIB-NAME|LIB-VER> <value>", "HELP")])
    raise _Refused(f"ERR unknown subcommand or wrong number of arguments for "
                   f"'{_text(args[1])}'. Try CLIENT HELP.")


async def _command(c: _Connection, args: list[bytes], slot: _Slot) -> bytes:
    sub = args[1].upper() if len(args) > 1 else b""
    if sub == b"":
        return array([spec.info() for spec in _SPECS])
    if sub == b"COUNT" and len(args) == 2:
        return integer(len(_SPECS))
    if sub == b"LIST" and len(args) == 2:
        return array([bulk(spec.name.encode()) for spec in _SPECS])
    if sub == b"INFO":
        if len(args) == 2:
            return array([spec.info() for spec in _SPECS])
        return array([spec.info() if (spec := _COMMANDS.get(a.lower())) else NIL
                      for a in args[2:]])
    if sub == b"DOCS":
        wanted = [s for s in _SPECS if len(args) == 2 or s.name.encode() in
                  {a.lower() for a in args[2:]}]
        return array([part for s in wanted for part in (bulk(s.name.encode()), s.docs())])
    raise _Refused(f"ERR unknown subcommand or wrong number of arguments for "
                   f"'{_text(args[1])}'. Try COMMAND HELP.")


# what CONFIG GET answers (redis-benchmark asks for these two): replkv always keeps a
# write-ahead log, and snapshots by entry count (--snapshot-every), not on a save schedule
_CONFIG = {b"save": b"", b"appendonly": b"yes"}


async def _config(c: _Connection, args: list[bytes], slot: _Slot) -> bytes:
    if args[1].upper() == b"GET" and len(args) >= 3:
        matches = [resp.glob(p.lower()) for p in args[2:]]
        return array([bulk(part) for name, value in _CONFIG.items()
                      if any(m(name) for m in matches) for part in (name, value)])
    raise _Refused("ERR CONFIG SET, RESETSTAT and REWRITE are not supported: configure "
                   "replkv with replnode/replrouter options")


async def _get(c: _Connection, args: list[bytes], slot: _Slot) -> None:
    key = c.key(args[1])
    await c.settled()
    c.send(c.get(key), lambda r: c.fill(slot, c.read_reply(r)), slot)


_NOT_ATOMIC = {b"NX", b"XX", b"GET"}
_EXPIRY = {b"EX", b"PX", b"EXAT", b"PXAT", b"KEEPTTL"}


async def _set(c: _Connection, args: list[bytes], slot: _Slot) -> None:
    key, value = c.key(args[1]), c.value(args[2])
    for option in (a.upper() for a in args[3:]):
        if option in _NOT_ATOMIC:
            raise _Refused(f"ERR SET {option.decode()} is not supported: replkv cannot "
                           "read and write a key in one atomic step")
        if option in _EXPIRY:
            raise _Refused(f"ERR SET {option.decode()} is not supported: replkv keys "
                           "do not expire")
        raise _Refused("ERR syntax error")

    def done(reply: NativeReply) -> None:
        c.fill(slot, c.failure(reply) if isinstance(reply, ErrorReply) else OK)

    c.send(Set(c.new_id(), key, value), done, slot, write=True)


async def _mset(c: _Connection, args: list[bytes], slot: _Slot) -> None:
    if len(args) % 2 == 0:
        raise _Refused("ERR wrong number of arguments for 'mset' command")
    pairs = [(c.key(args[i]), c.value(args[i + 1])) for i in range(1, len(args), 2)]

    def finish(replies: list[NativeReply]) -> bytes:
        failed = [r for r in replies if isinstance(r, ErrorReply)]
        if not failed:
            return OK
        done = len(replies) - len(failed)
        return c.failure(failed[0], f" (MSET is not atomic: {done} of {len(replies)} keys "
                                    "were set)")

    batch = _Batch(c, slot, finish)
    for key, value in pairs:
        await batch.add(Set(c.new_id(), key, value), write=True)
    batch.close()


async def _del(c: _Connection, args: list[bytes], slot: _Slot) -> None:
    keys = [c.key(a) for a in args[1:]]
    master = c.master()

    def finish(replies: list[NativeReply]) -> bytes:
        reads, deletes = replies[0::2], replies[1::2]
        failed = [r for r in deletes if isinstance(r, ErrorReply)]
        if failed:
            return c.failure(failed[0])
        if any(isinstance(r, ErrorReply) for r in reads):
            return error("ERR the keys were deleted, but how many existed is not known "
                         "(reading them first failed)")
        return integer(sum(1 for r in reads if isinstance(r, Reply) and r.fields.get("found")))

    # each key is read on the master just before its delete, on the same link, so the count
    # is of keys that existed then (not atomic with the delete: see docs/RESP.md)
    batch = _Batch(c, slot, finish)
    for key in keys:
        await batch.add(Get(c.new_id(), key), node=master)
        await batch.add(Delete(c.new_id(), key), write=True)
    batch.close()


async def _exists(c: _Connection, args: list[bytes], slot: _Slot) -> None:
    keys = [c.key(a) for a in args[1:]]
    await c.settled()

    def finish(replies: list[NativeReply]) -> bytes:
        for r in replies:
            if isinstance(r, ErrorReply):
                return c.failure(r)
        return integer(sum(1 for r in replies if isinstance(r, Reply) and r.fields.get("found")))

    batch = _Batch(c, slot, finish)
    for key in keys:
        await batch.add(c.get(key))
    batch.close()


async def _mget(c: _Connection, args: list[bytes], slot: _Slot) -> None:
    keys = [c.key(a) for a in args[1:]]
    await c.settled()
    limit = c.limits.max_frame

    def finish(replies: list[NativeReply]) -> bytes:
        if batch.overflow:
            return error(f"ERR the values of these keys pass {limit} bytes (--max-frame): "
                         "ask for fewer keys at a time")
        for r in replies:
            if isinstance(r, ErrorReply):
                return c.failure(r)
        return array([c.read_reply(r) for r in replies])

    batch = _Batch(c, slot, finish, max_bytes=limit)
    for key in keys:
        if batch.overflow:
            break
        await batch.add(c.get(key))
    batch.close()


async def _scan(c: _Connection, args: list[bytes], slot: _Slot) -> None:
    try:
        after = resp.cursor_key(args[1], c.limits.max_key)
    except ValueError:
        raise _Refused("ERR invalid cursor") from None
    match, count, only_strings = _scan_options(args[2:])
    await c.settled()

    def done(reply: NativeReply) -> None:
        if isinstance(reply, ErrorReply):
            c.fill(slot, c.failure(reply))
            return
        items = reply.fields.get("items") or []
        keys = [str(item[0]) for item in items]
        cursor = resp.cursor_for(keys[-1]) if keys and reply.fields.get("more") else b"0"
        found = [k.encode() for k in keys] if only_strings else []
        c.fill(slot, array([bulk(cursor), array([bulk(k) for k in found if match(k)])]))

    c.send(c.scan(after, count), done, slot)


def _scan_options(options: list[bytes]) -> tuple[Callable[[bytes], bool], int, bool]:
    match: Callable[[bytes], bool] = resp.glob(b"*")
    count = SCAN_COUNT
    only_strings = True
    if len(options) % 2:
        raise _Refused("ERR syntax error")
    for name, value in zip(options[0::2], options[1::2], strict=True):
        option = name.upper()
        if option == b"MATCH":
            match = resp.glob(value)
        elif option == b"COUNT":
            count = _integer(value)
            if count < 1:
                raise _Refused("ERR syntax error")
            count = min(count, SCAN_COUNT_MAX)
        elif option == b"TYPE":
            only_strings = value.lower() == b"string"  # replkv has strings only
        else:
            raise _Refused("ERR syntax error")
    return match, count, only_strings


async def _keys(c: _Connection, args: list[bytes], slot: _Slot) -> None:
    match = resp.glob(args[1])
    await c.settled()
    c.spawn(_keys_pages(c, match, slot))


async def _keys_pages(c: _Connection, match: Callable[[bytes], bool], slot: _Slot) -> None:
    found: list[bytes] = []
    size = 0
    after: str | None = None
    while True:
        await c.room(queue=False)
        reply = await c.ask(c.scan(after, KEYS_PAGE), slot)
        if isinstance(reply, ErrorReply):
            c.fill(slot, c.failure(reply))
            return
        items = reply.fields.get("items") or []
        for item in items:
            key = str(item[0]).encode()
            if match(key):
                found.append(key)
                size += len(key) + 16
        if len(found) > KEYS_LIMIT or size > c.limits.max_frame:
            c.fill(slot, error(f"ERR KEYS matched more than {KEYS_LIMIT} keys (or "
                               f"{c.limits.max_frame} bytes): use SCAN"))
            return
        if not items or not reply.fields.get("more"):
            c.fill(slot, array([bulk(k) for k in found]))
            return
        after = str(items[-1][0])


async def _dbsize(c: _Connection, args: list[bytes], slot: _Slot) -> None:
    def done(reply: NativeReply) -> None:
        if isinstance(reply, ErrorReply):
            c.fill(slot, c.failure(reply))
        else:
            c.fill(slot, integer(int(reply.fields.get("keys", 0))))

    c.send(Status(c.new_id()), done, slot, node=c.master())


_SECTIONS = ("server", "clients", "replication", "keyspace")


async def _info(c: _Connection, args: list[bytes], slot: _Slot) -> None:
    asked = {a.decode("utf-8", "replace").lower() for a in args[1:]}
    if not asked or asked & {"all", "default", "everything"}:
        asked = set(_SECTIONS)

    def done(reply: NativeReply) -> None:
        if isinstance(reply, ErrorReply):
            c.fill(slot, c.failure(reply))
        else:
            c.fill(slot, bulk(_info_text(c, reply.fields, asked).encode()))

    c.send(Status(c.new_id()), done, slot)  # the router's status: a fresh probe of every node


def _info_text(c: _Connection, fields: dict[str, Any], asked: set[str]) -> str:
    front = c.front
    lines: list[str] = []
    master = fields.get("master")
    rows: list[dict[str, Any]] = [r for r in fields.get("nodes") or [] if isinstance(r, dict)]
    if "server" in asked:
        port = front.address.port if front.address else 0
        lines += ["# Server", f"redis_version:{REDIS_VERSION}",
                  f"replkv_version:{front.version}", "redis_mode:standalone",
                  f"process_id:{os.getpid()}", f"tcp_port:{port}",
                  f"uptime_in_seconds:{int(time.monotonic() - front.started)}",
                  f"router:{fields.get('router')}", ""]
    if "clients" in asked:
        lines += ["# Clients", f"connected_clients:{front.clients}", ""]
    if "replication" in asked:
        head = next((r for r in rows if r.get("id") == master), None)
        slaves = [r for r in rows if r.get("id") != master and r.get("up")
                  and r.get("role") == "slave"]
        lines += ["# Replication", "role:master", f"connected_slaves:{len(slaves)}"]
        for i, r in enumerate(slaves):
            host, _, port_text = str(r.get("address")).rpartition(":")
            lag_ms = r.get("lag_ms") or 0
            lines.append(f"slave{i}:ip={host.strip('[]')},port={port_text},state=online,"
                         f"offset={r.get('applied_index')},lag={lag_ms // 1000}")
        lines += [f"master_node:{master or ''}",
                  f"master_repl_offset:{head.get('last_index', 0) if head else 0}",
                  f"master_majority_offset:{_dash(head.get('majority_index') if head else None)}"]
        for i, r in enumerate(rows):
            lines.append(
                f"node{i}:id={r.get('id')},address={r.get('address')},"
                f"role={_dash(r.get('role'))},state={'up' if r.get('up') else 'down'},"
                f"epoch={r.get('epoch')},last_index={r.get('last_index')},"
                f"applied_index={r.get('applied_index')},"
                f"lag_entries={_dash(r.get('lag_entries'))},lag_ms={_dash(r.get('lag_ms'))}")
        lines.append("")
    if "keyspace" in asked:
        lines.append("# Keyspace")
        view = c.router.table.views.get(NodeId(master)) if isinstance(master, str) else None
        keys = view.status.get("keys") if view is not None else None
        if isinstance(keys, int) and keys > 0:
            lines.append(f"db0:keys={keys},expires=0,avg_ttl=0")
        lines.append("")
    return "\r\n".join(lines)


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


async def _wait(c: _Connection, args: list[bytes], slot: _Slot) -> None:
    needed, timeout_ms = _integer(args[1]), _integer(args[2])
    if needed < 0 or timeout_ms < 0:
        raise _Refused("ERR timeout is negative" if timeout_ms < 0 else
                       "ERR numreplicas is negative")
    await c.settled()
    c.spawn(_wait_copies(c, c.token(), needed, timeout_ms, slot))


async def _wait_copies(c: _Connection, token: Token | None, needed: int, timeout_ms: int,
                       slot: _Slot) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_ms / 1000 if timeout_ms else None
    while True:
        count = await c.copies(token, slot)
        left = None if deadline is None else deadline - loop.time()
        if count >= needed or c.gone() or (left is not None and left <= 0):
            c.fill(slot, integer(count))
            return
        await asyncio.sleep(WAIT_POLL if left is None else min(WAIT_POLL, left))


_REASONS = {
    **{name: "ERR {} is not supported: replkv has no transactions (with redis-py, use "
             "pipeline(transaction=False))"
       for name in (b"multi", b"exec", b"discard", b"watch", b"unwatch")},
    b"auth": "ERR {} is not supported: replkv has no authentication",
    **{name: "ERR {} is not supported: replkv keys do not expire"
       for name in (b"expire", b"pexpire", b"expireat", b"pexpireat", b"ttl", b"pttl",
                    b"persist", b"setex", b"psetex", b"getex")},
}


def _unknown(args: list[bytes]) -> str:
    name = args[0].lower()
    if name in _REASONS:
        return _REASONS[name].format(_text(args[0]).upper())
    shown = "".join(f"'{_text(a[:128])}' " for a in args[1:])
    return f"ERR unknown command '{_text(args[0][:128])}', with args beginning with: {shown}"


def _text(arg: bytes) -> str:
    return arg.decode("utf-8", "backslashreplace")


def _integer(arg: bytes) -> int:
    try:
        return int(arg)
    except ValueError:
        raise _Refused("ERR value is not an integer or out of range") from None


def _value_bytes(reply: Reply) -> bytes | None:
    """A GET reply's value as bytes (text values are sent as their UTF-8), None if absent."""
    if not reply.fields.get("found"):
        return None
    value = reply.fields.get("value")
    if isinstance(value, str):
        return value.encode("utf-8")
    return value if isinstance(value, bytes) else None


class _Spec:
    """A command: its handler, arity (Redis's: N exactly, -N at least), flags and keys."""

    def __init__(self, name: str, handler: Handler, arity: int, flags: tuple[str, ...],
                 keys: tuple[int, int, int], group: str, summary: str) -> None:
        self.name = name
        self.handler = handler
        self.arity = arity
        self.flags = flags
        self.keys = keys
        self.group = group
        self.summary = summary

    def arity_ok(self, n: int) -> bool:
        return n == self.arity if self.arity >= 0 else n >= -self.arity

    def info(self) -> bytes:
        """``COMMAND INFO``'s entry (Redis 7: ten fields)."""
        first, last, step = self.keys
        return array([bulk(self.name.encode()), integer(self.arity),
                      array([simple(f) for f in self.flags]),
                      integer(first), integer(last), integer(step),
                      array([]), array([]), array([]), array([])])

    def docs(self) -> bytes:
        """``COMMAND DOCS``'s entry."""
        return array([bulk(b"summary"), bulk(self.summary.encode()),
                      bulk(b"since"), bulk(b"1.0.0"), bulk(b"group"), bulk(self.group.encode())])


_SPECS = [
    _Spec("get", _get, 2, ("readonly", "fast"), (1, 1, 1), "string",
          "The value of a key (from a live slave; it sees this connection's writes)."),
    _Spec("set", _set, -3, ("write",), (1, 1, 1), "string",
          "Set a key's value (no NX, XX, GET or expiry)."),
    _Spec("del", _del, -2, ("write",), (1, -1, 1), "generic",
          "Delete keys; the count is read just before, not atomically."),
    _Spec("exists", _exists, -2, ("readonly", "fast"), (1, -1, 1), "generic",
          "How many of the keys exist."),
    _Spec("mget", _mget, -2, ("readonly", "fast"), (1, -1, 1), "string",
          "The values of several keys."),
    _Spec("mset", _mset, -3, ("write",), (1, -1, 2), "string",
          "Set several keys (not atomic: one log entry per key)."),
    _Spec("scan", _scan, -2, ("readonly",), (0, 0, 0), "generic",
          "A page of keys; the cursor is the last key returned."),
    _Spec("keys", _keys, 2, ("readonly",), (0, 0, 0), "generic",
          f"Keys matching a pattern (refused above {KEYS_LIMIT} matches)."),
    _Spec("dbsize", _dbsize, 1, ("readonly", "fast"), (0, 0, 0), "server",
          "The number of keys, by the master."),
    _Spec("info", _info, -1, ("loading", "stale"), (0, 0, 0), "server",
          "Sections server, clients, replication (every node) and keyspace."),
    _Spec("wait", _wait, 3, (), (0, 0, 0), "generic",
          "Wait until N slaves hold this connection's last write, or the timeout."),
    _Spec("ping", _ping, -1, ("fast", "stale"), (0, 0, 0), "connection", "PONG."),
    _Spec("echo", _echo, 2, ("fast",), (0, 0, 0), "connection", "The argument, back."),
    _Spec("select", _select, 2, ("fast",), (0, 0, 0), "connection",
          "Database 0 only."),
    _Spec("hello", _hello, -1, ("fast", "no-auth"), (0, 0, 0), "connection",
          "HELLO 2 (RESP2) only."),
    _Spec("client", _client, -2, (), (0, 0, 0), "connection",
          "SETNAME, GETNAME, ID, SETINFO."),
    _Spec("command", _command, -1, ("loading", "stale"), (0, 0, 0), "server",
          "The commands served here."),
    _Spec("config", _config, -2, (), (0, 0, 0), "server",
          "CONFIG GET answers save and appendonly only."),
    _Spec("quit", _quit, -1, ("fast", "no-auth"), (0, 0, 0), "connection",
          "Close the connection after the replies owed."),
]
_COMMANDS = {spec.name.encode(): spec for spec in _SPECS}
