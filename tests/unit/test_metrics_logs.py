"""The pieces of metrics and structured logs that need no process: the JSON log formatter,
the metrics endpoint's answers, fsync timing, the counting of requests on a stream, and the
configuration checks. tests/e2e/test_metrics.py runs them in real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.cli.common import JsonFormatter
from cluster.config import Address, FsyncPolicy, Limits, NodeConfig, RouterConfig
from cluster.errors import ClusterError, ConfigError, NetworkError
from cluster.local import LocalCluster
from cluster.metrics import MeteredStream, NodeMetrics, RouterMetrics, _answer, serve_metrics
from cluster.node.durability import Durability
from cluster.types import Consistency, NodeId
from cluster.wire import codec
from cluster.wire.messages import ErrorReply, Get, Ping, Reply, Request

A = Address("127.0.0.1", 7001)


def record(msg: str, *args: object, extra: dict[str, object] | None = None,
           exc: bool = False) -> logging.LogRecord:
    logger = logging.getLogger("cluster.test")
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, args, exc_info,
                             extra=extra)


def test_a_json_log_line_has_the_documented_keys_and_the_extra_fields() -> None:
    fmt = JsonFormatter({"node": "n1"})
    line = fmt.format(record("slave %s is down\nreally", "n2",
                             extra={"slave": "n2", "epoch": 3, "path": Path("/x")}))
    assert "\n" not in line
    obj = json.loads(line)
    assert list(obj)[:5] == ["time", "level", "node", "logger", "event"]
    assert obj["level"] == "warning" and obj["node"] == "n1" and obj["logger"] == "cluster.test"
    assert obj["event"] == "slave n2 is down\nreally"
    assert (obj["slave"], obj["epoch"], obj["path"]) == ("n2", 3, "/x")
    assert "args" not in obj and "msg" not in obj and "exc" not in obj


def test_a_json_log_line_carries_the_traceback_and_keeps_its_own_keys() -> None:
    obj = json.loads(JsonFormatter({"router": "127.0.0.1:7000"}).format(
        record("failed", extra={"level": "spoofed", "router": "other"}, exc=True)))
    assert obj["level"] == "warning" and obj["router"] == "127.0.0.1:7000"
    assert "ValueError: boom" in obj["exc"] and "Traceback" in obj["exc"]


def _node_metrics(status: dict[str, object] | None = None) -> NodeMetrics:
    st = {"node": "n1", "role": "master", "epoch": 2, "last_index": 7, "applied_index": 7,
          "durable_index": 6, "snapshot_index": 0, "keys": 3, "majority_index": 5,
          "slaves": [{"id": "n2", "up": True, "lag_entries": 2, "lag_ms": 40},
                     {"id": "n3", "up": False, "lag_entries": 7, "lag_ms": None}],
          **(status or {})}
    return NodeMetrics("n1", lambda: st, lambda: 4, lambda: [Path("/nonexistent.wal")])


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def test_the_endpoint_serves_the_state_read_at_scrape_time() -> None:
    m = _node_metrics()
    m.synced(0.002)
    m.snapshot(1.5)
    m.snapshot(None)
    status, body, ctype = _answer(m.registry, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "200 OK" and ctype.startswith("text/plain")
    s = _samples(body)
    n1 = (("node", "n1"),)
    assert s[("replkv_log_last_index", n1)] == 7 and s[("replkv_durable_index", n1)] == 6
    assert s[("replkv_majority_index", n1)] == 5 and s[("replkv_open_connections", n1)] == 4
    assert s[("replkv_slave_lag_entries", (("node", "n1"), ("slave", "n3")))] == 7
    assert s[("replkv_slave_lag_ms", (("node", "n1"), ("slave", "n2")))] == 40
    assert ("replkv_slave_lag_ms", (("node", "n1"), ("slave", "n3"))) not in s  # unknown
    assert s[("replkv_slave_up", (("node", "n1"), ("slave", "n3")))] == 0
    assert s[("replkv_role", (("node", "n1"), ("role", "master")))] == 1
    assert s[("replkv_wal_bytes", n1)] == 0  # a segment dropped since it was listed
    assert s[("replkv_fsync_duration_seconds_count", n1)] == 1
    assert s[("replkv_snapshots_total", (("node", "n1"), ("outcome", "written")))] == 1
    assert s[("replkv_snapshots_total", (("node", "n1"), ("outcome", "failed")))] == 1
    assert s[("replkv_snapshot_duration_seconds_sum", n1)] == 1.5


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    _, body, ctype = _answer(_node_metrics().registry, b"GET /metrics HTTP/1.1\r\n"
                             b"Accept: application/openmetrics-text; version=1.0.0\r\n\r\n")
    assert ctype.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


@pytest.mark.parametrize("head,status", [
    (b"GET / HTTP/1.1\r\n\r\n", "200 OK"),
    (b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n", "200 OK"),
    (b"GET /other HTTP/1.1\r\n\r\n", "404 Not Found"),
    (b"POST /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed"),
    (b"\xff\xfe garbage\r\n\r\n", "405 Method Not Allowed"),
])
def test_the_endpoint_answers_other_requests_plainly(head: bytes, status: str) -> None:
    assert _answer(_node_metrics().registry, head)[0] == status


def test_a_collector_that_fails_fails_the_scrape_only() -> None:
    m = NodeMetrics("n1", lambda: {}, lambda: 0, lambda: [])
    status, body, _ = _answer(m.registry, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status.startswith("500") and b"failed" in body


class _Store:
    def __init__(self) -> None:
        self.syncs = 0

    def sync(self) -> None:
        self.syncs += 1


async def test_every_fsync_is_timed() -> None:
    timed: list[float] = []
    store = _Store()
    d = Durability(store, FsyncPolicy.ALWAYS, 0, lambda i: None,  # type: ignore[arg-type]
                   timed.append)
    task = asyncio.create_task(d.run())
    try:
        for index in (1, 2):
            d.wrote(index)
            async with asyncio.timeout(10):
                while d.durable < index:
                    await asyncio.sleep(0.001)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await d.flush()  # at shutdown
    assert len(timed) == store.syncs == 3 and all(0 <= t < 5 for t in timed)


async def test_a_metered_stream_times_each_request_to_its_reply() -> None:
    """Replies may come out of order (a write waits, a read does not); each is matched to
    its request by id, and a reply to no counted request (a sync's) is not counted."""
    m = RouterMetrics(lambda: {"n1": True}, lambda: 1)
    reader = asyncio.StreamReader()
    for msg in (Get(1, "k", 0, Consistency.ANY, 0), Ping(2), Get(3, "j", 0, Consistency.ANY, 0)):
        reader.feed_data(codec.frame(msg))
    reader.feed_eof()

    class _Transport(asyncio.Transport):
        def get_write_buffer_size(self) -> int:
            return 0

        def write(self, data: bytes | bytearray | memoryview) -> None:
            pass

        def is_closing(self) -> bool:
            return False

    class _Writer:
        transport = _Transport()

        def get_extra_info(self, name: str) -> object:
            return None

        def is_closing(self) -> bool:
            return False

        def write(self, data: bytes) -> None:
            pass

    writer: asyncio.StreamWriter = _Writer()  # type: ignore[assignment]
    stream = MeteredStream(reader, writer, Limits(), m.requests)
    seen = [msg async for msg in _take(stream, 3)]
    assert [type(x).__name__ for x in seen] == ["Get", "Ping", "Get"]
    stream.send(ErrorReply(3, "behind", "not yet"))
    stream.send(Reply(2, {}))
    stream.send(Reply(1, {}))
    stream.send(Reply(99, {}))  # answers nothing counted
    m.forwarded("n1", seen[0], "ok")
    m.timed_out("n1", seen[2])
    s = _samples(_answer(m.registry, b"GET /metrics HTTP/1.1\r\n\r\n")[1])

    def requests(op: str, outcome: str) -> float:
        return s.get(("replkv_requests_total",
                      (("node", "router"), ("outcome", outcome), ("type", op))), 0)

    assert (requests("get", "ok"), requests("get", "behind"), requests("ping", "ok")) == (1, 1, 1)
    assert s[("replkv_request_duration_seconds_count",
              (("node", "router"), ("type", "get")))] == 2
    assert s[("replkv_router_forwarded_total",
              (("outcome", "timeout"), ("target", "n1"), ("type", "get")))] == 1
    assert s[("replkv_router_node_up", (("target", "n1"),))] == 1


async def _take(stream: MeteredStream, n: int) -> AsyncIterator[Request]:
    async for msg in stream.requests(frozenset({"get", "ping"})):
        yield msg
        n -= 1
        if n == 0:
            return


def test_the_metrics_address_needs_a_port_of_its_own() -> None:
    cluster = {NodeId("n1"): A}
    for metrics in (A, Address("0.0.0.0", 7001)):
        with pytest.raises(ConfigError, match="is the listen address"):
            NodeConfig(NodeId("n1"), A, Path("d"), cluster, NodeId("n1"),
                       metrics_listen=metrics).validate()
    NodeConfig(NodeId("n1"), A, Path("d"), cluster, NodeId("n1"),
               metrics_listen=Address("127.0.0.1", 9100)).validate()
    with pytest.raises(ConfigError, match="is the listen address"):
        RouterConfig(Address("::", 7000), cluster,
                     metrics_listen=Address("127.0.0.1", 7000)).validate()
    RouterConfig(Address("127.0.0.1", 7000), cluster,
                 metrics_listen=Address("127.0.0.2", 7000)).validate()


async def test_an_unusable_metrics_address_is_one_clear_error() -> None:
    registry = _node_metrics().registry
    server = await serve_metrics(registry, Address("127.0.0.1", 0))
    taken = Address("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        with pytest.raises(NetworkError, match=f"^cannot listen on {taken} for metrics: "
                                               "Address already in use$"):
            await serve_metrics(registry, taken)
    finally:
        server.close()
    with pytest.raises(NetworkError, match=re.escape("unknown host 'no.such.host.invalid'")):
        await serve_metrics(registry, Address("no.such.host.invalid", 0))


def test_local_cluster_passes_metrics_and_log_format_only_when_asked(tmp_path: Path) -> None:
    plain = LocalCluster(tmp_path, base_port=7000, nodes=2)
    assert plain.metrics_addresses == {}
    for child in plain.children.values():
        assert "--metrics-listen" not in child.args and "--log-format" not in child.args
    cl = LocalCluster(tmp_path, base_port=7000, nodes=2, metrics=True, log_format="json")
    assert cl.metrics_addresses == {"router": Address("127.0.0.1", 7100),
                                    "n1": Address("127.0.0.1", 7101),
                                    "n2": Address("127.0.0.1", 7102)}
    for name, child in cl.children.items():
        args = " ".join(child.args)
        assert f"--metrics-listen {cl.metrics_addresses[name]}" in args
        assert "--log-format json" in args
    free = LocalCluster(tmp_path, base_port=0, nodes=2, metrics=True)
    ports = [a.port for a in (free.router_address, *free.addresses.values(),
                              *free.metrics_addresses.values())]
    assert len(set(ports)) == 6
    LocalCluster(tmp_path, base_port=65450, nodes=4)  # fits without metrics
    with pytest.raises(ClusterError, match="leaves no room"):
        LocalCluster(tmp_path, base_port=65450, nodes=4, metrics=True)
