"""Prometheus metrics (``--metrics-listen``) and JSON logs (``--log-format json``) of real
processes: a known workload through the router, then every process scraped and its text
parsed with prometheus_client's own parser; the figures must match what was done."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cluster.client import Client
from cluster.config import Address
from cluster.local import LocalCluster, free_ports
from tests.e2e.conftest import FAST_NODE, FAST_ROUTER, node_status, wait_applied, wait_for
from tests.e2e.test_local_cluster import cluster_up, listening
from tests.unit.test_protocol_doc import _table

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

NODE = [sys.executable, "-m", "cluster.cli.node"]
ROUTER = [sys.executable, "-m", "cluster.cli.router"]
LOG_KEYS = {"time", "level", "logger", "event"}


async def http_get(addr: Address, path: str = "/metrics", method: str = "GET"
                   ) -> tuple[str, dict[str, str], str]:
    """One HTTP/1.1 request; the status line, the headers and the body."""
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {addr}\r\n"
                     "Accept: text/plain\r\n\r\n".encode())
        async with asyncio.timeout(10):
            raw = await reader.read(-1)
    finally:
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(headers["content-length"]) == len(body.encode()) or method == "HEAD"
    return status, headers, body


async def families(addr: Address) -> list[Metric]:
    status, headers, body = await http_get(addr)
    assert status == "HTTP/1.1 200 OK", (status, body)
    assert headers["content-type"].startswith("text/plain; version=")
    return list(text_string_to_metric_families(body))


async def scrape(addr: Address) -> list[Sample]:
    return [s for family in await families(addr) for s in family.samples]


def exposed(metrics: list[Metric]) -> dict[str, tuple[str, set[str]]]:
    """The replkv metrics: name (a counter's with ``_total``) -> type and label names."""
    out: dict[str, tuple[str, set[str]]] = {}
    for f in metrics:
        if f.name.startswith("replkv_") and not f.name.endswith("_created"):
            name = f"{f.name}_total" if f.type == "counter" else f.name
            labels = {k for s in f.samples for k in s.labels} - {"le"}
            old = out.get(name, (f.type, set()))
            out[name] = (f.type, old[1] | labels)
    return out


def documented() -> dict[str, tuple[str, set[str]]]:
    """The metrics table of docs/OPERATIONS.md: name -> type and label names."""
    rows = _table((ROOT / "docs" / "OPERATIONS.md").read_text(), "metrics")
    return {row[0].strip("`"): (row[1], set(re.findall(r"`(\w+)`", row[2]))) for row in rows}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples
               if s.name == name and labels.items() <= s.labels.items())


def labelled(samples: list[Sample], name: str) -> dict[str, float]:
    """``name``'s samples by the value of their one label besides ``node``."""
    out = {}
    for s in samples:
        if s.name == name:
            rest = {k: v for k, v in s.labels.items() if k != "node"}
            (key,) = rest.values()
            out[key] = s.value
    return out


async def test_metrics_of_every_process_match_a_known_workload(tmp_path: Path) -> None:
    cl = LocalCluster(tmp_path / "c", base_port=0, metrics=True,
                      extra_node_args=[*FAST_NODE, "--snapshot-every", "30"],
                      extra_router_args=FAST_ROUTER)
    assert set(cl.metrics_addresses) == {"router", "n1", "n2", "n3", "n4"}
    await cl.start()
    try:
        served: Counter[str] = Counter()
        async with await Client.connect(cl.router_address) as c:
            for i in range(100):
                token = await c.set(f"k{i:03}", f"v{i}")
            for node in ("n2", "n3", "n4"):
                await wait_applied(cl, node, token)
            for i in range(50):
                got = await c.get(f"k{i:03}")
                assert got.found and got.value == f"v{i}"
                served[str(got.node)] += 1
        assert token.index == 100

        async def caught_up() -> bool:
            m = await scrape(cl.metrics_addresses["n1"])
            return (labelled(m, "replkv_slave_lag_entries") == {"n2": 0, "n3": 0, "n4": 0}
                    and value(m, "replkv_majority_index") == 100)

        await wait_for(caught_up, "the master to see every slave caught up")
        every = {name: await families(addr) for name, addr in cl.metrics_addresses.items()}
        nodes = {n: [s for f in every[n] for s in f.samples] for n in every if n != "router"}
        router = [s for f in every["router"] for s in f.samples]
        # docs/OPERATIONS.md lists exactly what the processes expose
        seen: dict[str, tuple[str, set[str]]] = {}
        for metrics in every.values():
            for name, (kind, labels) in exposed(metrics).items():
                seen[name] = (kind, seen.get(name, (kind, set()))[1] | labels)
        assert seen == documented()

        master = nodes["n1"]
        assert value(master, "replkv_requests_total", type="set", outcome="ok") == 100
        assert value(master, "replkv_request_duration_seconds_count", type="set") == 100
        assert value(master, "replkv_request_duration_seconds_bucket", type="set",
                     le="+Inf") == 100
        assert value(master, "replkv_role", role="master") == 1
        assert labelled(master, "replkv_slave_lag_ms") == {"n2": 0, "n3": 0, "n4": 0}
        assert labelled(master, "replkv_slave_up") == {"n2": 1, "n3": 1, "n4": 1}
        # the router's link and one replication link per slave
        assert value(master, "replkv_open_connections") >= 4
        for node, m in nodes.items():
            status = await node_status(cl.addresses[node])
            assert value(m, "replkv_log_last_index") == status["last_index"] == 100, node
            assert value(m, "replkv_applied_index") == status["applied_index"] == 100, node
            assert value(m, "replkv_durable_index") == status["durable_index"] == 100, node
            assert value(m, "replkv_snapshot_index") == status["snapshot_index"] > 0, node
            assert value(m, "replkv_keys") == 100
            assert value(m, "replkv_epoch", node=node) == status["epoch"] == 1
            # every node served the gets the client saw it serve, and the router counted
            # each as forwarded to it
            gets = value(m, "replkv_requests_total", type="get", outcome="ok")
            assert gets == served[node] == value(
                router, "replkv_router_forwarded_total", target=node, type="get",
                outcome="ok"), node
            assert value(m, "replkv_requests_total", type="get") == gets  # no errors
            if node != "n1":
                assert value(m, "replkv_requests_total", type="set") == 0
                assert value(m, "replkv_role", role="slave") == 1
                assert value(m, "replkv_master_link_up") == 1
            # fsync=always: the log was synced, and each sync was timed
            assert value(m, "replkv_fsync_duration_seconds_count") >= 1
            assert value(m, "replkv_fsync_duration_seconds_sum") > 0
            written = value(m, "replkv_snapshots_total", outcome="written")
            assert written >= 1 and value(m, "replkv_snapshots_total", outcome="failed") == 0
            assert value(m, "replkv_snapshot_duration_seconds_count") == written
            segments = sorted((cl.data_dir / node / "wal").glob("*.wal"))
            assert value(m, "replkv_wal_segments") == len(segments)
            assert value(m, "replkv_wal_bytes") == sum(p.stat().st_size for p in segments)
            assert value(m, "process_resident_memory_bytes") > 0
        assert sum(served.values()) == 50

        assert value(router, "replkv_requests_total", node="router", type="set",
                     outcome="ok") == 100
        assert value(router, "replkv_requests_total", node="router", type="get",
                     outcome="ok") == 50
        assert value(router, "replkv_request_duration_seconds_count", node="router") == 150
        assert value(router, "replkv_router_forwarded_total", target="n1", type="set",
                     outcome="ok") == 100
        assert value(router, "replkv_router_forwarded_total", type="set") == 100
        assert labelled(router, "replkv_router_node_up") == {n: 1 for n in cl.node_ids}

        # a slave that is stopped: the master counts it down and lagging, the router too
        cl.signal("n4", signal.SIGSTOP)
        async with await Client.connect(cl.router_address) as c:
            await c.set("after", "n4 stopped")

        async def n4_down() -> bool:
            m = await scrape(cl.metrics_addresses["n1"])
            r = await scrape(cl.metrics_addresses["router"])
            return (labelled(m, "replkv_slave_up")["n4"] == 0
                    and labelled(m, "replkv_slave_lag_entries")["n4"] == 1
                    and labelled(r, "replkv_router_node_up")["n4"] == 0)

        try:
            await wait_for(n4_down, "n4 to be seen down and lagging")
        finally:
            cl.signal("n4", signal.SIGCONT)
    finally:
        await cl.stop()


async def test_the_metrics_endpoint_answers_only_scrapes(tmp_path: Path) -> None:
    with node_process(tmp_path, "--metrics-listen") as node:
        metrics = node.metrics
        assert (await http_get(metrics, "/nothing"))[0] == "HTTP/1.1 404 Not Found"
        assert (await http_get(metrics, "/metrics", "POST"))[0].startswith("HTTP/1.1 405")
        status, headers, body = await http_get(metrics, "/metrics", "HEAD")
        assert status == "HTTP/1.1 200 OK" and body == "" and int(headers["content-length"])
        # garbage and an endless header get 400, and the endpoint keeps serving
        reader, writer = await asyncio.open_connection(metrics.host, metrics.port)
        writer.write(b"x" * 20_000)
        async with asyncio.timeout(10):
            assert (await reader.read(-1)).startswith(b"HTTP/1.1 400 ")
        writer.close()
        assert value(await scrape(metrics), "replkv_log_last_index", node="n1") == 0


# --- processes started by hand --------------------------------------------------------------


@dataclass
class Started:
    address: Address
    metrics: Address  # where --metrics-listen would serve (if it was given)
    stderr: Path


@contextmanager
def started(command: list[str], stderr_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Run ``command`` until it prints READY; SIGTERM it by its PID at the end."""
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY "), (line, stderr_path.read_text())
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def node_process(tmp_path: Path, *args: str) -> Iterator[Started]:
    """``replnode`` n1 of a one-node cluster, with ``args`` (``--metrics-listen`` gets a free
    port after it); stopped at the end."""
    port, metrics_port = free_ports(2)
    node = Started(Address("127.0.0.1", port), Address("127.0.0.1", metrics_port),
                   tmp_path / "n1.err")
    args = tuple(a for arg in args for a in ([arg, str(node.metrics)]
                                             if arg == "--metrics-listen" else [arg]))
    with started([*NODE, "--id", "n1", "--listen", str(node.address), "--data-dir",
                  str(tmp_path / "n1"), "--cluster", f"n1={node.address}", "--master", "n1",
                  *args], node.stderr):
        yield node


def json_lines(path: Path) -> list[dict[str, object]]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path} is empty"
    objects = [json.loads(line) for line in lines]  # every line is one JSON object
    for obj in objects:
        assert isinstance(obj, dict) and obj.keys() >= LOG_KEYS, obj
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(obj["time"]))
    return objects


async def test_json_logs_of_a_node_and_a_router(tmp_path: Path) -> None:
    (router_port,) = free_ports(1)
    router = Address("127.0.0.1", router_port)
    with node_process(tmp_path, "--log-format", "json") as node:
        router_args = [*ROUTER, "--listen", str(router), "--cluster", f"n1={node.address}"]
        with started([*router_args, "--log-format", "JSON"], tmp_path / "router.err"):
            async with await Client.connect(router) as c:
                await c.set("k", "v")
        with started(router_args, tmp_path / "router-text.err"):
            pass
    lines = json_lines(node.stderr)
    assert {line["node"] for line in lines} == {"n1"}
    assert {line["level"] for line in lines} == {"info"}
    start = next(line for line in lines if "starts as master" in str(line["event"]))
    # the fields the code passes as `extra` are keys of their own
    assert start["logger"] == "cluster.node.runtime"
    assert (start["role"], start["epoch"], start["last_index"]) == ("master", 1, 0)
    assert any(line["event"] == "n1 shutting down" for line in lines)
    # the router names itself by its address (the option's case is ignored)
    lines = json_lines(tmp_path / "router.err")
    assert all(line["router"] == str(router) and "node" not in line for line in lines)
    assert any(str(line["event"]).startswith("node n1 at") for line in lines)
    # text stays the default
    text = (tmp_path / "router-text.err").read_text()
    assert " INFO cluster.router.server: node n1 at" in text and "{" not in text


async def test_cluster_up_passes_log_format_and_metrics_to_every_process(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    with cluster_up("--nodes", "2", "--base-port", "0", "--data-dir", str(data),
                    "--log-format", "json", "--metrics") as (_, out):
        scrapes = dict(re.findall(r"^(\S+) .* metrics http://(\S+)/metrics$", out, re.M))
        assert set(scrapes) == {"n1", "n2", "router"}, out
        for name, addr in scrapes.items():
            samples = await scrape(Address.parse(addr))
            if name == "router":
                assert labelled(samples, "replkv_router_node_up") == {"n1": 1, "n2": 1}
            else:
                role = "master" if name == "n1" else "slave"
                assert value(samples, "replkv_role", node=name, role=role) == 1
        for name, key in (("n1", "node"), ("n2", "node"), ("router", "router")):
            # the file holds the process's lines after a `---- ... starting NAME ----` line
            text = (data / "logs" / f"{name}.log").read_text()
            lines = [json.loads(line) for line in text.splitlines()
                     if line and not line.startswith("---- ")]
            assert lines and all(obj.keys() >= LOG_KEYS | {key} for obj in lines), name


# --- bad option values -------------------------------------------------------------------------


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one ``Error:`` line a refused start prints (after click's usage lines, if any)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.mark.parametrize("program", ["node", "router"])
@pytest.mark.parametrize("args,env,message", [
    (["--log-format", "xml"], {}, "Invalid value for '--log-format': 'xml' is not one of"),
    ([], {"REPL_LOG_FORMAT": "yaml"}, "Invalid value for '--log-format': 'yaml'"),
    (["--metrics-listen", "nonsense"], {}, "'--metrics-listen': invalid address 'nonsense'"),
    (["--metrics-listen", "LISTEN"], {},
     "metrics address 127.0.0.1:PORT is the listen address 127.0.0.1:PORT: give the metrics "
     "another port"),
])
def test_bad_values_are_refused_in_one_line(tmp_path: Path, program: str, args: list[str],
                                            env: dict[str, str], message: str) -> None:
    (port,) = free_ports(1)
    listen = f"127.0.0.1:{port}"
    args = [listen if a == "LISTEN" else a for a in args]
    command = [*NODE, "--id", "n1", "--data-dir", str(tmp_path / "n1"), "--master", "n1"] \
        if program == "node" else ROUTER
    proc = subprocess.run([*command, "--listen", listen, "--cluster", f"n1={listen}", *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert proc.returncode == 2, proc.stderr
    assert message.replace("PORT", str(port)) in one_error_line(proc)
    assert not (tmp_path / "n1").exists()


@pytest.mark.parametrize("program", ["node", "router"])
def test_a_metrics_port_in_use_is_one_line_and_leaves_nothing(tmp_path: Path,
                                                              program: str) -> None:
    port, metrics = free_ports(2)
    listen = f"127.0.0.1:{port}"
    command = [*NODE, "--id", "n1", "--data-dir", str(tmp_path / "n1"), "--master", "n1"] \
        if program == "node" else ROUTER
    with listening(metrics):
        proc = subprocess.run([*command, "--listen", listen, "--cluster", f"n1={listen}",
                               "--metrics-listen", f"127.0.0.1:{metrics}"],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert one_error_line(proc) == (f"Error: network: cannot listen on 127.0.0.1:{metrics} "
                                    "for metrics: Address already in use")
    assert not (tmp_path / "n1").exists()


def test_cluster_up_refuses_a_bad_log_format(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cluster.cli.ctl", "cluster", "up",
                           "--data-dir", str(tmp_path / "data"), "--log-format", "xml"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Invalid value for '--log-format': 'xml'" in one_error_line(proc)
    assert not (tmp_path / "data").exists()
