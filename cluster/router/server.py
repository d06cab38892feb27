"""The router process: probes every node, forwards each request to the right one, and
relays the reply on the client's connection (pipelining preserved: replies are matched by
id and forwarded as they come)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cluster.client.connection import Connection
from cluster.config import Address, RouterConfig
from cluster.errors import (
    Behind,
    NetworkError,
    NotMaster,
    ReplError,
    RequestTimeout,
    Unavailable,
    reason,
)
from cluster.metrics import MeteredStream, RouterMetrics, outcome_of, serve_metrics
from cluster.net.stream import FramedStream
from cluster.router.resp import RespFrontEnd
from cluster.router.table import RoutingTable
from cluster.types import Consistency, NodeId
from cluster.wire import codec
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
    Sync,
)

log = logging.getLogger(__name__)


class ReplyTo(Protocol):
    """Where a routed request's one reply goes: a client connection of the native protocol
    or of the Redis front end (cluster/router/resp.py)."""

    def finished(self, reply: Reply | ErrorReply) -> None: ...


class Router:
    def __init__(self, config: RouterConfig) -> None:
        config.validate()
        self.config = config
        self.table = RoutingTable(config.cluster, config.max_lag, config.max_lag_ms,
                                  random.Random(config.seed))
        self._links: dict[NodeId, Connection] = {}
        self._stop = asyncio.Event()
        self._streams: set[FramedStream] = set()
        self.address: Address | None = None
        self._probed: set[NodeId] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._first_round = asyncio.Event()
        self.metrics = None if config.metrics_listen is None else RouterMetrics(
            lambda: {n: v.up for n, v in self.table.views.items()}, lambda: len(self._streams))

    def stop(self) -> None:
        self._stop.set()

    async def run(self, on_ready: Callable[[Address], None] = lambda a: None) -> None:
        cfg = self.config
        server = await asyncio.start_server(self._handle, cfg.listen.host, cfg.listen.port,
                                            limit=256 * 1024, reuse_address=True)
        self.address = Address(cfg.listen.host, server.sockets[0].getsockname()[1])
        metrics_server = None
        if self.metrics is not None and cfg.metrics_listen is not None:
            try:
                metrics_server = await serve_metrics(self.metrics.registry, cfg.metrics_listen)
            except BaseException:
                server.close()
                raise
        resp = RespFrontEnd(self, MAX_IN_FLIGHT) if cfg.resp_listen is not None else None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        try:
            if resp is not None:
                await resp.start()
            async with asyncio.TaskGroup() as tg:
                probes = [tg.create_task(self._probe_loop(n)) for n in cfg.cluster]
                # one round of probes tells where the master is before clients arrive
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(cfg.node_timeout * 2):
                        await self._first_round.wait()
                on_ready(self.address)
                await self._stop.wait()
                server.close()
                for t in probes:
                    t.cancel()
        finally:
            server.close()
            if metrics_server is not None:
                metrics_server.close()
            if resp is not None:
                await resp.close()
            await asyncio.gather(*(stream.close() for stream in list(self._streams)))
            for conn in self._links.values():
                await conn.close()

    # --- health ------------------------------------------------------------------------------

    async def _probe_loop(self, node: NodeId) -> None:
        cfg = self.config
        addr = cfg.cluster[node]
        while True:
            started = time.monotonic()
            conn = self._links.get(node)
            if conn is None or conn.closed:
                try:
                    conn = await Connection.open(addr, cfg.limits, timeout=cfg.node_timeout)
                except ReplError as exc:
                    conn = None
                    self._node_failed(node, None, reason(exc))
                else:
                    self._links[node] = conn
            if conn is not None:
                await self._probe(node, conn)
            self._probed.add(node)
            if len(self._probed) == len(cfg.cluster):
                self._first_round.set()
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, cfg.health_interval - elapsed))

    async def _probe(self, node: NodeId, conn: Connection) -> None:
        """Ask one node for its status and record it; a failure marks the node down."""
        sent = time.monotonic()
        try:
            reply = await conn.call(Status(conn.next_id()), timeout=self.config.node_timeout)
            if isinstance(reply, ErrorReply):
                raise ReplError(f"{reply.code}: {reply.message}")
        except ReplError as exc:
            self._node_failed(node, conn, reason(exc))
            return
        was_up = self.table.views[node].up
        self.table.update(node, reply.fields, sent)
        if not was_up:
            log.info("node %s at %s is up (%s)", node, self.config.cluster[node],
                     reply.fields.get("role"))

    def _node_failed(self, node: NodeId, conn: Connection | None, error: str) -> None:
        """A probe or a forwarded request found the node unreachable (``conn`` is the link
        that failed, if any): drop the link; the node is down until a probe says otherwise.
        Whichever finds it first logs it."""
        if conn is not None:
            if self._links.get(node) is conn:
                del self._links[node]
            conn.abort()
        if self.table.failed(node, error):
            log.warning("node %s at %s is down: %s", node, self.config.cluster[node], error)

    # --- clients -----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits = self.config.limits
        client = _Client(FramedStream(reader, writer, limits) if self.metrics is None else
                         MeteredStream(reader, writer, limits, self.metrics.requests))
        stream = client.stream
        self._streams.add(stream)
        try:
            async for msg in stream.requests(codec.CLIENT_REQUESTS):
                self._route(msg, client)
                await client.wait_for_room()
        except (NetworkError, OSError, ConnectionError):
            pass
        finally:
            self._streams.discard(stream)
            await stream.close()

    def submit(self, msg: Request, client: ReplyTo, node: NodeId | None = None) -> None:
        """Route ``msg`` for a client of another front end (its reply goes to ``client``),
        or with ``node``, send it to that node (a read of the master, its status)."""
        if node is None:
            self._route(msg, client)
        else:
            self._forward(msg, node, client, frozenset())

    def _route(self, msg: Request, client: ReplyTo) -> None:
        """Forward or answer one request; its reply goes to ``client`` when it comes."""
        match msg:
            case Set() | Delete():
                master = self.table.master()
                if master is None:
                    client.finished(ErrorReply(
                        msg.id, Unavailable.code,
                        "no master is reachable; the write was not applied", applied="no"))
                else:
                    self._forward(msg, master, client, frozenset())
            case Get() | Scan():
                self._read(msg, client, frozenset())
            case Status(id=rid):
                task = asyncio.get_running_loop().create_task(self._status(rid, client))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            case Ping(id=rid):
                client.finished(Reply(rid, {"node": "router", "role": "router"}))
            case Sync():  # pragma: no cover - requests(CLIENT_REQUESTS) refuses it
                raise AssertionError("the router's request loop let a sync through")

    async def _status(self, rid: int, client: ReplyTo) -> None:
        """Answer ``status`` from a fresh probe of every node the router is connected to."""
        await asyncio.gather(*(self._probe(n, c) for n, c in list(self._links.items())))
        client.finished(Reply(rid, {"router": str(self.address), "master": self.table.master(),
                                    "nodes": self.table.view()}))

    def _read(self, msg: Get | Scan, client: ReplyTo, tried: frozenset[NodeId]) -> None:
        why = "no node that can serve this read is reachable"
        if isinstance(msg, Get) and msg.consistency is Consistency.STRONG:
            node = self.table.master() if not tried else None
        else:
            now = time.monotonic()
            node = self.table.pick_read(now, msg.min_index, tried)
            if node is None:
                why = self.table.no_read_reason(now, msg.min_index, tried)
        if node is None:
            client.finished(ErrorReply(msg.id, Unavailable.code, why))
            return
        self._forward(msg, node, client, tried)

    def _forward(self, msg: Request, node: NodeId, client: ReplyTo,
                 tried: frozenset[NodeId]) -> None:
        conn = self._links.get(node)
        if conn is None or conn.closed:
            self._node_failed(node, conn, "no open connection to it")
            self._retry_or_fail(msg, node, client, tried, "no connection to it", sent=False)
            return
        rid = conn.next_id()

        def done(reply: Reply | ErrorReply | ReplError) -> None:
            deadline.cancel()
            if self.metrics is not None:
                self.metrics.forwarded(node, msg, outcome_of(reply))
            if isinstance(reply, ReplError):
                self._node_failed(node, conn, reason(reply))
                self._retry_or_fail(msg, node, client, tried, str(reply), sent=True)
                return
            if isinstance(reply, ErrorReply):
                if reply.code in (Behind.code, NotMaster.code) and isinstance(msg, Get | Scan):
                    self._retry_or_fail(msg, node, client, tried, reply.message, sent=True,
                                        behind=reply.code == Behind.code)
                    return
                client.finished(dataclasses.replace(reply, id=msg.id))
                return
            if "index" in reply.fields and isinstance(msg, Get | Scan):
                self.table.applied(node, int(reply.fields["index"]))
            client.finished(Reply(msg.id, reply.fields))

        def expired() -> None:
            """The node did not answer in time: the client hears so now, and the node's
            reply, should it come, is dropped."""
            if not conn.forget(rid):
                return  # answered meanwhile
            if self.metrics is not None:
                self.metrics.timed_out(node, msg)
            client.finished(_timed_out(msg, node, seconds))

        seconds = self._deadline(msg)
        deadline = asyncio.get_running_loop().call_later(seconds, expired)
        conn.send_frame(rid, codec.frame_with_id(msg, rid), done)

    def _deadline(self, msg: Request) -> float:
        """Seconds ``msg`` may wait for its node: the request timeout, or for a write that
        names a longer ``timeout_ms``, that and a second (the master answers it itself)."""
        seconds = self.config.request_timeout
        if isinstance(msg, Set | Delete) and msg.timeout_ms is not None:
            seconds = max(seconds, msg.timeout_ms / 1000 + 1.0)
        return seconds

    def _retry_or_fail(self, msg: Request, node: NodeId, client: ReplyTo,
                       tried: frozenset[NodeId], why: str, *, sent: bool,
                       behind: bool = False) -> None:
        tried = tried | {node}
        if isinstance(msg, Get | Scan) and len(tried) < len(self.config.cluster):
            self._read(msg, client, tried)
            return
        if behind and isinstance(msg, Get | Scan):
            # no node failed: the read asked for an index no node has applied yet, so the
            # client gets `behind` (wait for replication and retry), not `unavailable`
            client.finished(ErrorReply(msg.id, Behind.code,
                                       f"no node has applied index {msg.min_index} yet "
                                       f"(last asked: {why}); retry once it is replicated"))
            return
        outcome: str | None = None
        if isinstance(msg, Set | Delete):
            outcome = "unknown" if sent else "no"
            what = ("the write may or may not have been applied" if sent
                    else "the write was not applied")
        else:
            what = "the read failed"
        client.finished(ErrorReply(msg.id, Unavailable.code,
                                   f"node {node} failed ({why}); {what}",
                                   applied=outcome))


def _timed_out(msg: Request, node: NodeId, seconds: float) -> ErrorReply:
    """The answer to a request whose node did not reply within ``seconds``."""
    if isinstance(msg, Set | Delete):
        return ErrorReply(msg.id, RequestTimeout.code,
                          f"master {node} did not answer within {seconds:g}s; the write may "
                          "or may not have been applied", applied="unknown")
    return ErrorReply(msg.id, RequestTimeout.code,
                      f"node {node} did not answer within {seconds:g}s; the read failed")


MAX_IN_FLIGHT = 64  # requests of one client connection the router holds at once: with the
# 4 MiB high-water mark this bounds what a client that stops reading can make it buffer


@dataclass(eq=False)
class _Client:
    """A client connection; its stream counts the requests still awaiting their reply."""

    stream: FramedStream

    def finished(self, reply: Reply | ErrorReply) -> None:
        """Send the one reply a request gets."""
        self.stream.send(reply)

    async def wait_for_room(self) -> None:
        """Hold the client's next request while it has too many awaiting a node."""
        await self.stream.wait_replies(MAX_IN_FLIGHT - 1)
