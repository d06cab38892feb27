#!/usr/bin/env python3
"""Throughput, latency, replication lag and memory of replkv, optionally side by side with Redis.

    python scripts/bench.py                              # own cluster in a temp dir, 50 clients
    python scripts/bench.py --clients 50 --ops 20000 --compare-redis
    python scripts/bench.py --router 127.0.0.1:7000 --json   # an already running cluster

Phases, each of ``--ops`` operations spread over ``--clients`` connections with
``--pipeline`` requests in flight on each (1 = unpipelined, like redis-benchmark's default):

1. write: ``set`` through the router (to the master);
2. catch-up: poll every slave until it has applied the last index written;
3. read: ``get`` of the written keys through the router (to a random live slave).

Reported: ops/s and client-side p50/p99/max latency per phase; replication lag as measured by
the slaves themselves (``repl_delay_ms`` in a slave's status: slave apply wall-clock time minus
the entry's master timestamp ``ts``; ``ts`` is taken when the master appends the entry, before
its fsync and its reply, so this is an *upper bound* of "from the master's reply"); a
client-side view of the same lag (the bench polls each slave's applied index every
``--lag-poll-ms`` during the write phase and compares with the time it received each write's
reply: an upper bound with the poll interval as resolution); catch-up time (last write reply
until every slave had applied it); RSS of every process after the write phase; CPU seconds
each process used per phase.

``--compare-redis`` runs the same client loop (a tiny RESP client in this file) against a Redis
master with three replicas started here on free loopback ports (persistence chosen to match
``--fsync``: ``always`` -> ``appendonly yes, appendfsync always``; ``everysec`` -> ``appendfsync
everysec``; ``no`` -> no persistence), plus ``redis-benchmark`` (a C client) against the master,
and prints ratios. Redis is installed with apt-get if missing (only with that flag).

Traffic goes only to 127.0.0.1. Every process started here is stopped by its PID.
Numbers from one run are only comparable with numbers from the same run (shared machines).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.client.client import Client
from cluster.config import Address
from cluster.errors import ReplError
from cluster.local import LocalCluster, free_ports

PROBE_KEY = "__bench_probe__"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- small helpers ---------------------------------------------------------------------------


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def summarize_ms(values: list[float]) -> dict[str, float | int | None]:
    """p50/p99/max of durations given in seconds, in milliseconds."""
    ordered = sorted(values)
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)
    return {"n": len(ordered), "p50_ms": ms(percentile(ordered, 0.50)),
            "p99_ms": ms(percentile(ordered, 0.99)),
            "max_ms": ms(ordered[-1] if ordered else None)}


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process so far."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pid_listening_on(port: int) -> int | None:
    """The PID of the process listening on 127.0.0.1:port (root can see every process)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
    return None


class CpuMeter:
    """CPU seconds per named process between start() and stop()."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self._start: dict[str, float | None] = {}

    def start(self) -> None:
        self._start = {n: cpu_seconds(p) for n, p in self.pids.items()}
        self._start["bench"] = sum(os.times()[:2])

    def stop(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for n, p in self.pids.items():
            now, then = cpu_seconds(p), self._start.get(n)
            out[n] = None if now is None or then is None else round(now - then, 2)
        out["bench"] = round(sum(os.times()[:2]) - (self._start["bench"] or 0), 2)
        return out


# --- the load loop ---------------------------------------------------------------------------


@dataclass
class PhaseResult:
    ops: int
    seconds: float
    latencies: list[float]
    errors: int
    first_errors: list[str]
    reply_times: dict[int, float] = field(default_factory=dict)  # write index -> reply time
    last_reply: float = 0.0
    last_index: int = 0
    cpu: dict[str, float | None] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ops": self.ops, "seconds": round(self.seconds, 3),
                               "ops_per_s": round(self.ops / self.seconds, 1) if self.seconds
                               else None, "errors": self.errors}
        out.update(summarize_ms(self.latencies))
        out.pop("n")
        if self.first_errors:
            out["first_errors"] = self.first_errors
        if self.cpu:
            out["cpu_s"] = self.cpu
        return out


Op = Callable[[Any, int], Awaitable[Any]]



def delays_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The slave-side delay histogram of only the entries applied between two status calls."""
    from cluster.node.stats import percentile
    old = {b: n for b, n in before.get("buckets", [])}
    run = [(b, n - old.get(b, 0)) for b, n in after.get("buckets", []) if n > old.get(b, 0)]
    top = max((b for b, _ in run), default=None)
    return {"entries_in_run": after.get("count", 0) - before.get("count", 0),
            "p50": percentile(run, 0.5), "p99": percentile(run, 0.99),
            "max": after.get("max") if top is not None and after.get("max") != before.get(
                "max") else top}

async def run_phase(conns: list[Any], pipeline: int, ops: int, op: Op,
                    record_index: bool = False) -> PhaseResult:
    """``ops`` calls of ``op(conn, i)`` by ``len(conns) * pipeline`` workers."""
    counter = iter(range(ops))
    latencies: list[float] = []
    errors: list[str] = []
    reply_times: dict[int, float] = {}
    clock = time.perf_counter
    last = [0.0]

    async def worker(conn: Any) -> None:
        for i in counter:
            t0 = clock()
            try:
                res = await op(conn, i)
            except Exception as exc:  # count, keep going: a benchmark reports, not raises
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            t1 = clock()
            latencies.append(t1 - t0)
            last[0] = t1
            if record_index:
                reply_times[res] = t1

    started = clock()
    await asyncio.gather(*(worker(c) for c in conns for _ in range(pipeline)))
    seconds = clock() - started
    return PhaseResult(len(latencies), seconds, latencies, len(errors), errors[:3],
                       reply_times, last[0], max(reply_times, default=0))


# --- replkv ----------------------------------------------------------------------------------


@dataclass
class Target:
    router: Address
    master: Address
    slaves: dict[str, Address]
    pids: dict[str, int | None]
    fsync: str | None = None


class LagSampler:
    """Polls each slave's applied index (a ``get`` of a missing key answers with it)."""

    def __init__(self, slaves: dict[str, Client], interval: float) -> None:
        self.slaves = slaves
        self.interval = interval
        self.samples: dict[str, list[tuple[float, float, int]]] = {n: [] for n in slaves}
        self._task: asyncio.Task[None] | None = None
        self._stop = False

    async def _poll(self, name: str, client: Client) -> None:
        clock = time.perf_counter
        while not self._stop:
            t0 = clock()
            res = await client.get(PROBE_KEY)
            self.samples[name].append((t0, clock(), res.index))
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        async def all_() -> None:
            await asyncio.gather(*(self._poll(n, c) for n, c in self.slaves.items()))
        self._task = asyncio.get_running_loop().create_task(all_())

    async def stop(self) -> None:
        self._stop = True
        if self._task is not None:
            await self._task

    def lags(self, reply_times: dict[int, float]) -> tuple[list[float], list[float]]:
        """Per write, bounds of (every slave has applied it) - (its reply): the upper bound
        is the first poll reply showing it applied everywhere, the lower bound the send time
        of the poll before that (which still saw it missing on the last slave to apply it)."""
        ordered = sorted(reply_times)
        upper: dict[int, float] = {}
        lower: dict[int, float] = {}
        reached: dict[int, int] = {}
        for samples in self.samples.values():
            pos = 0
            prev_sent = 0.0
            for sent, recv, applied in samples:
                while pos < len(ordered) and ordered[pos] <= applied:
                    ix = ordered[pos]
                    upper[ix] = max(upper.get(ix, 0.0), recv)
                    lower[ix] = max(lower.get(ix, 0.0), prev_sent)
                    reached[ix] = reached.get(ix, 0) + 1
                    pos += 1
                prev_sent = sent
        n = len(self.samples)
        done = [ix for ix in reply_times if reached.get(ix) == n]
        return ([max(0.0, lower[ix] - reply_times[ix]) for ix in done],
                [max(0.0, upper[ix] - reply_times[ix]) for ix in done])


async def slave_status(target: Target) -> dict[str, dict[str, Any]]:
    out = {}
    for name, addr in target.slaves.items():
        async with await Client.connect(addr) as c:
            out[name] = await c.status()
    return out


async def bench_replkv(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    value = b"x" * args.value_size
    res: dict[str, Any] = {}
    before = await slave_status(target)
    conns = [await Client.connect(target.router, timeout=60.0) for _ in range(args.clients)]
    probes = {n: await Client.connect(a) for n, a in target.slaves.items()}
    cpu = CpuMeter(target.pids)
    try:
        async def do_set(c: Client, i: int) -> int:
            return (await c.set(f"key:{i:010d}", value)).index

        async def do_get(c: Client, i: int) -> Any:
            r = await c.get(f"key:{i:010d}")
            if not r.found:
                raise LookupError(f"key:{i:010d} not found on {r.node}")
            return r

        sampler = LagSampler(probes, args.lag_poll_ms / 1000) if args.lag_poll_ms else None
        if sampler:
            sampler.start()
        cpu.start()
        write = await run_phase(conns, args.pipeline, args.ops, do_set, record_index=True)
        write.cpu = cpu.stop()
        # catch-up: every slave at the last index written (poll with a deadline)
        target_index = write.last_index
        caught: dict[str, float] = {}
        deadline = time.perf_counter() + args.catchup_timeout
        while len(caught) < len(probes) and time.perf_counter() < deadline:
            for n, c in probes.items():
                if n in caught:
                    continue
                t0 = time.perf_counter()
                applied = (await c.get(PROBE_KEY)).index
                t1 = time.perf_counter()
                if sampler:
                    sampler.samples[n].append((t0, t1, applied))
                if applied >= target_index:
                    caught[n] = t1
            if len(caught) < len(probes):
                await asyncio.sleep(0.001)
        if sampler:
            await sampler.stop()
        res["write"] = write.report()
        res["last_index"] = target_index
        if len(caught) == len(probes):
            res["catch_up_ms"] = round(max(0.0, max(caught.values()) - write.last_reply) * 1000,
                                       1)
        else:
            res["catch_up_ms"] = None
            res["catch_up_error"] = (f"slaves {sorted(set(probes) - set(caught))} did not reach "
                                     f"index {target_index} within {args.catchup_timeout}s")
        res["rss_mb"] = {n: rss_mb(p) for n, p in target.pids.items()}
        after = await slave_status(target)
        per_slave = {}
        for n, st in after.items():
            per_slave[n] = delays_between(before[n].get("repl_delay_ms") or {},
                                          st.get("repl_delay_ms") or {})
        worst = max(per_slave.values(), key=lambda d: (d.get("p99") or 0, d.get("max") or 0),
                    default={})
        res["repl_delay_ms"] = {
            "what": "measured on each slave: apply time - entry ts (ts taken at the master's "
                    "append, before its fsync and reply: an upper bound of the lag from the "
                    "reply); 1 ms resolution; worst = the slave with the highest p99",
            "worst": {k: worst.get(k) for k in ("p50", "p99", "max")},
            "per_slave": per_slave,
        }
        if sampler:
            low, high = sampler.lags(write.reply_times)
            res["client_lag_ms"] = {
                "what": f"bench polls every slave's applied index every {args.lag_poll_ms} ms; "
                        "per write, the time from its reply until every slave had applied it "
                        "lies between 'lower' and 'upper' (poll send / reply times)",
                "upper": summarize_ms(high), "lower": summarize_ms(low)}
        cpu.start()
        read = await run_phase(conns, args.pipeline, args.ops, do_get)
        read.cpu = cpu.stop()
        res["read"] = read.report()
    finally:
        for c in [*conns, *probes.values()]:
            await c.close()
    return res


async def existing_target(router: Address) -> Target:
    async with await Client.connect(router) as c:
        st = await c.status()
    master, slaves = None, {}
    for row in st["nodes"]:
        addr = Address.parse(row["address"])
        if row["id"] == st["master"]:
            master = addr
        elif row.get("up"):
            slaves[row["id"]] = addr
    if master is None:
        raise SystemExit(f"the router at {router} knows no master: {st}")
    pids = {"router": pid_listening_on(router.port)}
    async with await Client.connect(master) as c:
        fsync = (await c.status()).get("fsync")
    pids[str(st["master"])] = pid_listening_on(master.port)
    pids.update({n: pid_listening_on(a.port) for n, a in slaves.items()})
    return Target(router, master, slaves, pids, fsync)


# --- Redis -----------------------------------------------------------------------------------


class RespError(Exception):
    pass


class Resp:
    """A minimal pipelined RESP2 client: commands out, replies matched in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._waiting: list[asyncio.Future[Any]] = []
        self._head = 0
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, port: int) -> Resp:
        r, w = await asyncio.open_connection("127.0.0.1", port, limit=256 * 1024)
        return cls(r, w)

    def call(self, *args: bytes | str) -> asyncio.Future[Any]:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode() if isinstance(a, str) else a
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self.writer.write(b"".join(parts))
        return fut

    def _parse(self, buf: bytes, pos: int) -> tuple[Any, int] | None:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        kind, line = buf[pos:pos + 1], buf[pos + 1:end]
        if kind == b"+":
            return line.decode(), end + 2
        if kind == b"-":
            return RespError(line.decode()), end + 2
        if kind == b":":
            return int(line), end + 2
        if kind == b"$":
            n = int(line)
            if n < 0:
                return None, end + 2
            if len(buf) < end + 4 + n:
                return None  # incomplete
            return buf[end + 2:end + 2 + n], end + 4 + n
        if kind == b"*":
            n = int(line)
            items, p = [], end + 2
            for _ in range(max(n, 0)):
                got = self._parse(buf, p)
                if got is None:
                    return None
                items.append(got[0])
                p = got[1]
            return items, p
        raise RespError(f"bad reply type {kind!r}")

    async def _read_loop(self) -> None:
        buf = b""
        try:
            while True:
                data = await self.reader.read(256 * 1024)
                if not data:
                    raise ConnectionError("redis closed the connection")
                buf += data
                pos = 0
                while pos < len(buf):
                    got = self._parse(buf, pos)
                    if got is None:
                        break
                    value, pos = got
                    fut = self._waiting[self._head]
                    self._head += 1
                    if isinstance(value, RespError):
                        fut.set_exception(value)
                    else:
                        fut.set_result(value)
                buf = buf[pos:]
                if self._head > 4096:
                    del self._waiting[:self._head]
                    self._head = 0
        except Exception as exc:
            for fut in self._waiting[self._head:]:
                if not fut.done():
                    fut.set_exception(ConnectionError(str(exc)))
            raise

    async def info(self, section: str) -> dict[str, str]:
        text = (await self.call("INFO", section)).decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def ensure_redis() -> None:
    if shutil.which("redis-server") and shutil.which("redis-benchmark"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "redis-server", "redis-tools"]
    print("installing redis with apt-get ...", file=sys.stderr)
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, check=True, capture_output=True)


REDIS_VARIANTS = {
    "no": ["--appendonly", "no"],
    "everysec": ["--appendonly", "yes", "--appendfsync", "everysec"],
    "always": ["--appendonly", "yes", "--appendfsync", "always"],
}


class RedisPeer:
    """A Redis master and replicas as child processes, stopped by PID."""

    def __init__(self, workdir: Path, fsync: str, replicas: int = 3) -> None:
        self.workdir = workdir
        self.fsync = fsync
        self.ports = free_ports(replicas + 1)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def pids(self) -> dict[str, int | None]:
        names = ["redis-master", *[f"redis-r{i}" for i in range(1, len(self.ports))]]
        return {n: p.pid for n, p in zip(names, self.procs, strict=False)}

    def start(self) -> None:
        for i, port in enumerate(self.ports):
            d = self.workdir / f"redis{i}"
            d.mkdir(parents=True, exist_ok=True)
            cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                   "--daemonize", "no", "--save", "", "--dir", str(d),
                   "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                   *REDIS_VARIANTS[self.fsync]]
            if i:
                cmd += ["--replicaof", "127.0.0.1", str(self.ports[0])]
            log = open(d / "redis.log", "wb")  # noqa: SIM115 - the child owns it
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until every replica is streaming: after a diskless full sync the master holds the
        stream until the replica's first REPLCONF ACK (sent once a second), so "link up" is
        not enough; a probe write must have reached every replica."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conns: list[Resp] = []
            with contextlib.suppress(OSError, ConnectionError, RespError, KeyError, ValueError):
                try:
                    for p in self.ports:
                        conns.append(await Resp.connect(p))
                    await conns[0].call("SET", "__bench_probe__", "1")
                    offset = int((await conns[0].info("replication"))["master_repl_offset"])
                    ok = True
                    for r in conns[1:]:
                        info = await r.info("replication")
                        ok &= (info.get("master_link_status") == "up"
                               and int(info["slave_repl_offset"]) >= offset)
                    if ok:
                        await conns[0].call("DEL", "__bench_probe__")
                        return
                finally:
                    for c in conns:
                        await c.close()
            for p in self.procs:
                if p.poll() is not None:
                    raise SystemExit(f"redis-server exited with {p.returncode}; see "
                                     f"{self.workdir}")
            await asyncio.sleep(0.1)
        raise SystemExit(f"redis replicas not streaming within {timeout}s")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait()


async def bench_redis(args: argparse.Namespace, peer: RedisPeer) -> dict[str, Any]:
    value = b"x" * args.value_size
    res: dict[str, Any] = {"variant": " ".join(REDIS_VARIANTS[peer.fsync]),
                           "replicas": len(peer.ports) - 1}
    wconns = [await Resp.connect(peer.ports[0]) for _ in range(args.clients)]
    replica_ports = peer.ports[1:]
    rconns = [await Resp.connect(replica_ports[i % len(replica_ports)])
              for i in range(args.clients)]
    admin = await Resp.connect(peer.ports[0])
    radmin = [await Resp.connect(p) for p in replica_ports]
    cpu = CpuMeter(peer.pids)
    try:
        async def do_set(c: Resp, i: int) -> Any:
            return await c.call("SET", f"key:{i:010d}", value)

        async def do_get(c: Resp, i: int) -> Any:
            r = await c.call("GET", f"key:{i:010d}")
            if r is None:
                raise LookupError(f"key:{i:010d} not found")
            return r

        cpu.start()
        write = await run_phase(wconns, args.pipeline, args.ops, do_set)
        write.cpu = cpu.stop()
        offset = int((await admin.info("replication"))["master_repl_offset"])
        caught: dict[int, float] = {}
        deadline = time.perf_counter() + args.catchup_timeout
        while len(caught) < len(radmin) and time.perf_counter() < deadline:
            for i, r in enumerate(radmin):
                if i not in caught and int(
                        (await r.info("replication"))["slave_repl_offset"]) >= offset:
                    caught[i] = time.perf_counter()
            if len(caught) < len(radmin):
                await asyncio.sleep(0.001)
        res["write"] = write.report()
        res["catch_up_ms"] = (round(max(0.0, max(caught.values()) - write.last_reply) * 1000, 1)
                              if len(caught) == len(radmin) else None)
        res["rss_mb"] = {n: rss_mb(p) for n, p in peer.pids.items()}
        res["used_memory_mb"] = round(int((await admin.info("memory"))["used_memory"]) / 2**20,
                                      1)
        res["used_memory_rss_mb"] = round(
            int((await admin.info("memory"))["used_memory_rss"]) / 2**20, 1)
        cpu.start()
        read = await run_phase(rconns, args.pipeline, args.ops, do_get)
        read.cpu = cpu.stop()
        res["read"] = read.report()
    finally:
        for c in [*wconns, *rconns, admin, *radmin]:
            await c.close()
    res["redis_benchmark"] = redis_benchmark(args, peer.ports[0])
    return res


def redis_benchmark(args: argparse.Namespace, port: int) -> dict[str, Any]:
    """The C client against the master (SET and GET both on the master)."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
           "-n", str(args.ops), "-c", str(args.clients), "-d", str(args.value_size),
           "-P", str(args.pipeline), "-r", str(args.ops), "-q", "--csv"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        return {"error": str(exc)}
    rows: dict[str, Any] = {"command": " ".join(cmd)}
    header: list[str] = []
    for line in out.strip().splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells[0] == "test":
            header = cells
            continue
        row = dict(zip(header, cells, strict=False))
        rows[cells[0].lower()] = {"ops_per_s": float(row.get("rps", 0)),
                                  "p50_ms": float(row.get("p50_latency_ms", 0)),
                                  "p99_ms": float(row.get("p99_latency_ms", 0)),
                                  "max_ms": float(row.get("max_latency_ms", 0))}
    return rows


# --- output ----------------------------------------------------------------------------------


def fmt(v: Any, suffix: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}{suffix}" if abs(v) >= 100 else f"{v:.2f}{suffix}"
    return f"{v}{suffix}"


def ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if a and b else None


def print_text(out: dict[str, Any]) -> None:
    cfg = out["config"]
    print(f"replkv bench  {out['started']}  {out['machine']['cpus']} cpus  "
          f"python {out['machine']['python']}  loop={out['machine']['loop']}")
    print(f"clients={cfg['clients']} pipeline={cfg['pipeline']} ops/phase={cfg['ops']} "
          f"value={cfg['value_size']}B fsync={cfg['fsync']}  target={cfg['target']}")
    r = out["replkv"]
    red = out.get("redis")
    cols = ["", "replkv"] + (["redis (same client)", "redis/replkv", "redis-benchmark (C)"]
                            if red else [])
    rows: list[list[str]] = []
    for phase in ("write", "read"):
        rb = (red or {}).get("redis_benchmark", {}).get("set" if phase == "write" else "get",
                                                         {})
        for key, label in (("ops_per_s", f"{phase}s/s"), ("p50_ms", f"{phase} p50 ms"),
                           ("p99_ms", f"{phase} p99 ms"), ("max_ms", f"{phase} max ms")):
            row = [label, fmt(r[phase][key])]
            if red:
                row += [fmt(red[phase][key]), fmt(ratio(red[phase][key], r[phase][key])),
                        fmt(rb.get(key))]
            rows.append(row)
        if r[phase].get("errors") or (red and red[phase].get("errors")):
            rows.append([f"{phase} errors", str(r[phase]["errors"]),
                         *([str(red[phase]["errors"]), "", ""] if red else [])])
    rows.append(["catch-up ms", fmt(r["catch_up_ms"]),
                 *([fmt(red["catch_up_ms"]), fmt(ratio(red["catch_up_ms"], r["catch_up_ms"])),
                    ""] if red else [])])
    node_rss = sum(v for k, v in r["rss_mb"].items() if k != "router" and v)
    row = ["RSS MB (all data procs)", fmt(node_rss)]
    if red:
        redis_rss = sum(v for v in red["rss_mb"].values() if v)
        row += [fmt(redis_rss), fmt(ratio(redis_rss, node_rss)), ""]
    rows.append(row)
    widths = [max(len(x[i]) for x in [cols, *rows]) for i in range(len(cols))]
    print()
    for x in [cols, *rows]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                        enumerate(zip(x, widths, strict=True))))
    d = r["repl_delay_ms"]
    print(f"\nreplication lag, measured on the slaves (apply - entry ts, ms; worst slave): "
          f"p50 {fmt(d['worst']['p50'])}  p99 {fmt(d['worst']['p99'])}  "
          f"max {fmt(d['worst']['max'])}")
    for n, s in d["per_slave"].items():
        print(f"  {n}: p50 {fmt(s.get('p50'))}  p99 {fmt(s.get('p99'))}  max {fmt(s.get('max'))}"
              f"  entries {s.get('entries_in_run')}")
    print("  (entry ts is taken when the master appends, before its fsync and reply: an upper "
          "bound of the lag from the reply)")
    if "client_lag_ms" in r:
        lo, hi = r["client_lag_ms"]["lower"], r["client_lag_ms"]["upper"]
        print(f"replication lag, seen by the bench (write reply -> every slave applied, slaves "
              f"polled every {fmt(cfg['lag_poll_ms'])} ms; lower..upper bound, ms): "
              f"p50 {fmt(lo['p50_ms'])}..{fmt(hi['p50_ms'])}  "
              f"p99 {fmt(lo['p99_ms'])}..{fmt(hi['p99_ms'])}  "
              f"max {fmt(lo['max_ms'])}..{fmt(hi['max_ms'])}  ({hi['n']} writes)")
    print("RSS MB after writes: " + "  ".join(f"{k} {fmt(v)}" for k, v in r["rss_mb"].items()))
    if red:
        print("Redis RSS MB: " + "  ".join(f"{k} {fmt(v)}" for k, v in red["rss_mb"].items())
              + f"  (master used_memory {fmt(red['used_memory_mb'])}, used_memory_rss "
              f"{fmt(red['used_memory_rss_mb'])})")
        print(f"Redis persistence: {red['variant']}")
    for phase in ("write", "read"):
        print(f"CPU s during {phase}: " + "  ".join(
            f"{k} {fmt(v)}" for k, v in r[phase].get("cpu_s", {}).items()))
        if red:
            print("  redis: " + "  ".join(
                f"{k} {fmt(v)}" for k, v in red[phase].get("cpu_s", {}).items()))
    for side, res in (("replkv", r), ("redis", red or {})):
        for phase in ("write", "read"):
            if res.get(phase, {}).get("first_errors"):
                print(f"{side} {phase} errors: {res[phase]['first_errors']}")
    if r.get("catch_up_error"):
        print(r["catch_up_error"])


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=50, help="connections (default 50)")
    p.add_argument("--ops", type=int, default=50_000, help="operations per phase (default 50000)")
    p.add_argument("--value-size", type=int, default=100, help="value bytes (default 100)")
    p.add_argument("--pipeline", type=int, default=1,
                   help="requests in flight per connection (default 1: unpipelined)")
    p.add_argument("--fsync", choices=["always", "everysec", "no"], default="always",
                   help="fsync policy of the cluster started here (and of the Redis peer)")
    p.add_argument("--router", type=Address.parse, default=None,
                   help="HOST:PORT of a running router (else a local cluster is started)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--compare-redis", action="store_true",
                   help="also run a Redis master + 3 replicas (apt-get installs it if missing)")
    p.add_argument("--lag-poll-ms", type=float, default=5.0,
                   help="poll slaves' applied index this often in the write phase; 0 = off")
    p.add_argument("--catchup-timeout", type=float, default=60.0)
    p.add_argument("--keep-dir", action="store_true", help="keep the temp dir (logs, data)")
    a = p.parse_args(argv)
    if a.clients < 1 or a.ops < 1 or a.pipeline < 1 or a.value_size < 0:
        p.error("--clients, --ops and --pipeline must be >= 1 and --value-size >= 0")
    if a.router is not None and a.router.host not in ("127.0.0.1", "localhost", "::1"):
        p.error("this benchmark only sends traffic to the loopback interface")
    return a


async def amain(args: argparse.Namespace, loop_name: str) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    tmp = Path(tempfile.mkdtemp(prefix="replkv-bench-"))
    local: LocalCluster | None = None
    peer: RedisPeer | None = None
    out: dict[str, Any] = {
        "started": started,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loop": loop_name, "kernel": platform.release()},
    }
    try:
        if args.router is None:
            local = LocalCluster(tmp / "cluster", base_port=0, fsync=args.fsync)
            await local.start()
            target = Target(local.router_address, local.addresses[local.master],
                            {n: a for n, a in local.addresses.items() if n != local.master},
                            {"router": local.children["router"].pid,
                             **{n: local.children[n].pid for n in local.node_ids}}, args.fsync)
            await asyncio.sleep(0.5)  # let the slaves connect and the router see them
        else:
            target = await existing_target(args.router)
        out["config"] = {"clients": args.clients, "pipeline": args.pipeline, "ops": args.ops,
                         "value_size": args.value_size, "fsync": target.fsync,
                         "lag_poll_ms": args.lag_poll_ms,
                         "target": "own LocalCluster (4 nodes + router)" if local else
                         f"router {args.router}"}
        out["replkv"] = await bench_replkv(args, target)
        if local is not None:
            await local.stop()
            local = None
        if args.compare_redis:
            ensure_redis()
            peer = RedisPeer(tmp / "redis", target.fsync or args.fsync)
            peer.start()
            await peer.wait_ready()
            version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                     text=True).stdout.split()
            out["redis"] = await bench_redis(args, peer)
            out["redis"]["version"] = next((v[2:] for v in version if v.startswith("v=")), "?")
            r, red = out["replkv"], out["redis"]
            out["ratio_redis_over_replkv"] = {
                "writes_per_s": ratio(red["write"]["ops_per_s"], r["write"]["ops_per_s"]),
                "reads_per_s": ratio(red["read"]["ops_per_s"], r["read"]["ops_per_s"]),
                "write_p50": ratio(red["write"]["p50_ms"], r["write"]["p50_ms"]),
                "read_p50": ratio(red["read"]["p50_ms"], r["read"]["p50_ms"]),
                "rss_all_data_procs": ratio(
                    sum(v for v in red["rss_mb"].values() if v),
                    sum(v for k, v in r["rss_mb"].items() if k != "router" and v)),
            }
    finally:
        if local is not None:
            await local.stop()
        if peer is not None:
            peer.stop()
        if args.keep_dir:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
        runner: Callable[[Any], Any] = uvloop.run
        loop_name = f"uvloop {uvloop.__version__}"
    except ImportError:
        runner = asyncio.run
        loop_name = "asyncio"
    try:
        out = runner(amain(args, loop_name))
    except (ReplError, OSError) as exc:
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
