"""Prometheus metrics of one node or router process, served over HTTP (``--metrics-listen``).

Each process builds its own :class:`~prometheus_client.CollectorRegistry` (nothing global).
What happens on the hot path is counted there and then, through label children looked up
once (an increment is a fraction of a microsecond): requests by type and outcome and their
latency (:class:`MeteredStream`), fsyncs, snapshots, the router's forwarded requests. What
is a state (log ids, lag, WAL bytes, connections, which nodes are up) is read from the live
process at scrape time by a custom collector, so it costs nothing between scrapes.

The scrape is served by :func:`serve_metrics`, a tiny HTTP/1.1 handler on the process's own
event loop, rather than by ``prometheus_client.start_http_server``: that runs collectors in
a thread of its own, and ours read state (the followers map, the open connections) that
only the loop thread may touch safely. Building the text takes well under a millisecond.

Metric names and labels are listed in docs/OPERATIONS.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from cluster.config import Address, Limits
from cluster.errors import NetworkError, ReplError, RequestTimeout
from cluster.net.stream import FramedStream
from cluster.wire.messages import (
    Delete,
    ErrorReply,
    Get,
    Message,
    Ping,
    Reply,
    Request,
    Scan,
    Set,
    Status,
)

log = logging.getLogger(__name__)

# seconds; requests are answered in tens of microseconds (a read) to seconds (a write that
# waits for every slave), fsyncs in microseconds (tmpfs) to a second (a busy disk)
REQUEST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FSYNC_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                 0.1, 0.25, 0.5, 1.0, 2.5)
SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# the requests a client sends, by the name they have on the wire (sync is replication,
# not a request: it is not counted)
OP_NAMES: dict[type, str] = {Set: "set", Delete: "delete", Get: "get", Scan: "scan",
                             Status: "status", Ping: "ping"}

ROUTER = "router"  # the ``node`` label of the router's own metrics


def outcome_of(reply: Reply | ErrorReply | ReplError) -> str:
    """``ok`` for a reply, else the error's code (``not_master``, ``timeout``, ...)."""
    return "ok" if isinstance(reply, Reply) else reply.code


class RequestMetrics:
    """Requests a process answered, by type and outcome, and how long each took."""

    def __init__(self, registry: CollectorRegistry, process: str) -> None:
        self._process = process
        self._total = Counter(
            "replkv_requests", "Requests answered, by type and outcome (ok or the error code).",
            ["node", "type", "outcome"], registry=registry)
        self._seconds = Histogram(
            "replkv_request_duration_seconds",
            "Seconds from a request's arrival to its reply being sent.",
            ["node", "type"], buckets=REQUEST_BUCKETS, registry=registry)
        self._counts: dict[tuple[str, str], Any] = {}  # label children, looked up once
        self._times: dict[str, Any] = {}

    def done(self, op: str, outcome: str, seconds: float) -> None:
        key = (op, outcome)
        count = self._counts.get(key)
        if count is None:
            count = self._counts[key] = self._total.labels(self._process, op, outcome)
        count.inc()
        timer = self._times.get(op)
        if timer is None:
            timer = self._times[op] = self._seconds.labels(self._process, op)
        timer.observe(seconds)


class MeteredStream(FramedStream):
    """A server's client connection that counts each request and times it from its arrival
    to its reply (which may come later, as a write's does)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 limits: Limits, metrics: RequestMetrics) -> None:
        super().__init__(reader, writer, limits)
        self._metrics = metrics
        self._started: dict[int, tuple[str, float]] = {}

    async def requests(self, ops: frozenset[str]) -> AsyncIterator[Request]:
        async for msg in super().requests(ops):
            op = OP_NAMES.get(type(msg))
            if op is not None:
                self._started[msg.id] = (op, time.perf_counter())
            yield msg

    def send(self, msg: Message) -> None:
        if isinstance(msg, Reply | ErrorReply):
            started = self._started.pop(msg.id, None)
            if started is not None:
                self._metrics.done(started[0], outcome_of(msg),
                                   time.perf_counter() - started[1])
        super().send(msg)


def _gauge(name: str, doc: str, labels: Mapping[str, str], value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=list(labels))
    g.add_metric(list(labels.values()), value)
    return g


def _wal_bytes(files: Iterable[Path]) -> int:
    total = 0
    for path in files:
        with contextlib.suppress(FileNotFoundError):  # dropped since it was listed
            total += os.stat(path).st_size
    return total


class _NodeState(Collector):
    """A node's ids, lag, WAL size and connections, read from the node at each scrape."""

    def __init__(self, node: str, status: Callable[[], dict[str, Any]],
                 connections: Callable[[], int], wal_files: Callable[[], list[Path]]) -> None:
        self._node = node
        self._status = status
        self._connections = connections
        self._wal_files = wal_files

    def collect(self) -> Iterable[Metric]:
        st = self._status()
        node = {"node": self._node}
        yield _gauge("replkv_epoch", "The highest epoch this node has seen.", node, st["epoch"])
        yield _gauge("replkv_log_last_index", "The id of the last entry in this node's log.",
                     node, st["last_index"])
        yield _gauge("replkv_applied_index", "The id of the last entry applied to the map.",
                     node, st["applied_index"])
        yield _gauge("replkv_durable_index",
                     "The id of the last entry durable on this node (per its fsync policy).",
                     node, st["durable_index"])
        yield _gauge("replkv_snapshot_index", "The id the newest snapshot covers.", node,
                     st["snapshot_index"])
        yield _gauge("replkv_keys", "Keys in the map.", node, st["keys"])
        role = GaugeMetricFamily("replkv_role", "1 for the role this node has now.",
                                 labels=["node", "role"])
        role.add_metric([self._node, str(st["role"])], 1)
        yield role
        files = self._wal_files()
        yield _gauge("replkv_wal_bytes", "Bytes in the write-ahead log's segment files.", node,
                     _wal_bytes(files))
        yield _gauge("replkv_wal_segments", "Segment files of the write-ahead log.", node,
                     len(files))
        yield _gauge("replkv_open_connections",
                     "Connections open to this node (clients, router, replication).", node,
                     self._connections())
        if st.get("majority_index") is not None:
            yield _gauge("replkv_majority_index",
                         "The highest id durable on a majority of the nodes (master).",
                         node, st["majority_index"])
        slaves = st.get("slaves")
        if isinstance(slaves, list):
            up = GaugeMetricFamily("replkv_slave_up",
                                   "1 while the slave's replication link is up (master's view).",
                                   labels=["node", "slave"])
            entries = GaugeMetricFamily("replkv_slave_lag_entries",
                                        "Entries the slave has not acknowledged (master's view).",
                                        labels=["node", "slave"])
            ms = GaugeMetricFamily("replkv_slave_lag_ms",
                                   "Milliseconds the oldest entry the slave lacks has waited "
                                   "(master's view).", labels=["node", "slave"])
            for s in slaves:
                labels = [self._node, str(s["id"])]
                up.add_metric(labels, 1 if s.get("up") else 0)
                entries.add_metric(labels, s["lag_entries"])
                if s.get("lag_ms") is not None:
                    ms.add_metric(labels, s["lag_ms"])
            yield from (up, entries, ms)
        link = st.get("master_link")
        if isinstance(link, dict):
            yield _gauge("replkv_master_link_up",
                         "1 while this slave's replication session with the master is up.",
                         node, 1 if link.get("up") else 0)


class NodeMetrics:
    """The metrics of one node process. ``status`` is the node's status map (as the
    ``status`` request returns it), read at each scrape with ``connections`` and
    ``wal_files``."""

    def __init__(self, node: str, status: Callable[[], dict[str, Any]],
                 connections: Callable[[], int], wal_files: Callable[[], list[Path]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry, node)
        self._fsync = Histogram(
            "replkv_fsync_duration_seconds", "Seconds each fsync of the log took.",
            ["node"], buckets=FSYNC_BUCKETS, registry=self.registry).labels(node)
        snapshots = Counter("replkv_snapshots",
                            "Snapshots this node started, by outcome (written or failed).",
                            ["node", "outcome"], registry=self.registry)
        self._written = snapshots.labels(node, "written")
        self._failed = snapshots.labels(node, "failed")
        self._snapshot_seconds = Histogram(
            "replkv_snapshot_duration_seconds", "Seconds each snapshot written took.",
            ["node"], buckets=SNAPSHOT_BUCKETS, registry=self.registry).labels(node)
        self.registry.register(_NodeState(node, status, connections, wal_files))
        ProcessCollector(registry=self.registry)

    def synced(self, seconds: float) -> None:
        """One fsync of the log took ``seconds``."""
        self._fsync.observe(seconds)

    def snapshot(self, seconds: float | None) -> None:
        """A snapshot was written in ``seconds``, or failed (None)."""
        if seconds is None:
            self._failed.inc()
        else:
            self._written.inc()
            self._snapshot_seconds.observe(seconds)


class _RouterState(Collector):
    def __init__(self, nodes_up: Callable[[], Mapping[str, bool]],
                 connections: Callable[[], int]) -> None:
        self._nodes_up = nodes_up
        self._connections = connections

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("replkv_router_node_up",
                               "1 while the router's probes of the node succeed.",
                               labels=["target"])
        for target, is_up in self._nodes_up().items():
            up.add_metric([target], 1 if is_up else 0)
        yield up
        yield _gauge("replkv_open_connections", "Client connections open to the router.",
                     {"node": ROUTER}, self._connections())


class RouterMetrics:
    """The metrics of the router: its own requests (``node="router"``) and what it
    forwarded to each node (``target``)."""

    def __init__(self, nodes_up: Callable[[], Mapping[str, bool]],
                 connections: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry, ROUTER)
        self._forwarded = Counter(
            "replkv_router_forwarded",
            "Requests forwarded to a node, by target, type and outcome (ok, the node's error "
            "code, network when the link failed, timeout when it did not answer in time).",
            ["target", "type", "outcome"], registry=self.registry)
        self._children: dict[tuple[str, str, str], Any] = {}
        self.registry.register(_RouterState(nodes_up, connections))
        ProcessCollector(registry=self.registry)

    def forwarded(self, target: str, msg: Request, outcome: str) -> None:
        key = (target, OP_NAMES.get(type(msg), "other"), outcome)
        count = self._children.get(key)
        if count is None:
            count = self._children[key] = self._forwarded.labels(*key)
        count.inc()

    def timed_out(self, target: str, msg: Request) -> None:
        self.forwarded(target, msg, RequestTimeout.code)


# --- the HTTP endpoint -------------------------------------------------------------------------

MAX_HEAD = 8192  # bytes of request line and headers a scrape may send
HEAD_TIMEOUT = 5.0  # seconds a scraper has to send them


async def serve_metrics(registry: CollectorRegistry, address: Address) -> asyncio.Server:
    """Serve ``GET /metrics`` (the Prometheus text format) on ``address``; the caller closes
    the server. A failure to listen is a :class:`~cluster.errors.NetworkError` that names
    the address."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = b""
        try:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                status, body, ctype = "400 Bad Request", b"bad request\n", "text/plain"
            else:
                status, body, ctype = _answer(registry, head)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + (b"" if head.startswith(b"HEAD ") else body))
            await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(handle, address.host, address.port,
                                            limit=MAX_HEAD, reuse_address=True)
    except socket.gaierror as exc:
        raise NetworkError(f"cannot listen on {address} for metrics: unknown host "
                           f"{address.host!r}") from exc
    except OSError as exc:  # asyncio words it "error while attempting to bind on ...": not again
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise NetworkError(f"cannot listen on {address} for metrics: {why}") from exc
    port = server.sockets[0].getsockname()[1]
    log.info("metrics at http://%s/metrics", Address(address.host, port),
             extra={"metrics": str(Address(address.host, port))})
    return server


def _answer(registry: CollectorRegistry, head: bytes) -> tuple[str, bytes, str]:
    """The status, body and content type for a request whose head is ``head``: the format
    follows the Accept header as prometheus_client's own server does (the text format, or
    OpenMetrics when the scraper asks for it)."""
    request, *lines = head.decode("latin-1").split("\r\n")
    method, _, rest = request.partition(" ")
    path = rest.partition(" ")[0].partition("?")[0]
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", b"only GET\n", "text/plain"
    if path not in ("/metrics", "/"):
        return "404 Not Found", b"metrics are at /metrics\n", "text/plain"
    accept = next((value for name, _, value in (line.partition(":") for line in lines)
                   if name.strip().lower() == "accept"), "")
    try:
        encode, content_type = choose_encoder(accept.strip())
        return "200 OK", encode(registry), content_type
    except Exception:  # a collector's bug fails the scrape, not the process
        log.exception("collecting metrics failed")
        return "500 Internal Server Error", b"collecting metrics failed\n", "text/plain"
