#!/usr/bin/env python3
"""redis-benchmark against the router's Redis (RESP2) port and against Redis, in one run.

    python scripts/bench_resp.py                  # -n 20000, 50 clients, fsync always
    python scripts/bench_resp.py -n 100000 --fsync no

Runs the same command, ``redis-benchmark -t set,get -c CLIENTS -n N -q``, first against the
``--resp-listen`` port of a replkv cluster started here (``LocalCluster``: a master, three
slaves and the router, data in a temp dir), then against a Redis master with three replicas
started here (scripts/bench.py's ``RedisPeer``, persistence matched to ``--fsync``), and
prints both and the ratio. Each side runs alone: the cluster is stopped before Redis starts.

The command is redis-benchmark's default workload, as docs/PERFORMANCE.md quotes it: one key
(``key:__rand_int__`` without ``-r``), 3-byte values, no pipelining. Through replkv every SET
goes to the master and every GET to a slave, both through the router; against Redis both go
to the master (redis-benchmark talks to one server).

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
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import REDIS_VARIANTS, RedisPeer, Resp, RespError, ensure_redis  # scripts/bench.py

from cluster.config import Address
from cluster.errors import ReplError
from cluster.local import LocalCluster, free_ports

# "SET: 43478.26 requests per second, p50=0.567 msec" (the p50 since Redis 7)
RESULT = re.compile(r"^(?P<test>[A-Z]+): (?P<rps>[\d.]+) requests per second"
                    r"(?:, p50=(?P<p50>[\d.]+) msec)?")


def benchmark(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """redis-benchmark against 127.0.0.1:port; its per-test results and the command."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get",
           "-c", str(args.clients), "-n", str(args.requests), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    # -q rewrites a progress line with \r; the result is the last text on each line.
    lines = [part.strip() for line in proc.stdout.splitlines() for part in line.split("\r")]
    results: dict[str, Any] = {"command": " ".join(cmd[:1] + cmd[5:]), "lines": []}
    for line in lines:
        m = RESULT.match(line)
        if m:
            results["lines"].append(line)
            results[m["test"].lower()] = {
                "ops_per_s": float(m["rps"]),
                "p50_ms": float(m["p50"]) if m["p50"] else None,
            }
    if proc.returncode != 0 or "set" not in results or "get" not in results:
        raise SystemExit(f"redis-benchmark against port {port} failed (exit {proc.returncode}):"
                         f"\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return results


async def wait_replicated(port: int, replicas: int, timeout: float) -> None:
    """Until the router's RESP port answers and reports `replicas` slaves in contact."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ConnectionError, RespError):
            conn = await Resp.connect(port)
            try:
                info = await conn.info("replication")
                last = info.get("connected_slaves")
                if last == str(replicas):
                    return
            finally:
                await conn.close()
        await asyncio.sleep(0.1)
    raise SystemExit(f"the router's RESP port did not report {replicas} slaves within "
                     f"{timeout:.0f}s (last: connected_slaves={last})")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    ensure_redis()
    version = subprocess.run(["redis-server", "--version"], capture_output=True,
                             text=True).stdout.split()
    out: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release(),
                    "redis": next((v[2:] for v in version if v.startswith("v=")), "?")},
        "config": {"clients": args.clients, "requests": args.requests, "fsync": args.fsync},
        "load_before": load(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="replkv-bench-resp-"))
    local: LocalCluster | None = None
    peer: RedisPeer | None = None
    try:
        resp = Address("127.0.0.1", free_ports(1)[0])
        local = LocalCluster(tmp / "cluster", base_port=0, fsync=args.fsync,
                             extra_router_args=["--resp-listen", str(resp)])
        await local.start()
        await wait_replicated(resp.port, len(local.node_ids) - 1, timeout=30)
        out["replkv"] = await asyncio.to_thread(benchmark, resp.port, args)
        await local.stop()
        local = None

        peer = RedisPeer(tmp / "redis", args.fsync)
        peer.start()
        await peer.wait_ready()
        out["redis"] = await asyncio.to_thread(benchmark, peer.ports[0], args)
        out["redis"]["variant"] = " ".join(REDIS_VARIANTS[args.fsync])
    finally:
        if local is not None:
            await local.stop()
        if peer is not None:
            peer.stop()
        if args.keep_dir:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out["load_after"] = load()
    out["ratio_replkv_over_redis"] = {
        t: round(out["replkv"][t]["ops_per_s"] / out["redis"][t]["ops_per_s"], 3)
        for t in ("set", "get")
    }
    return out


def print_text(out: dict[str, Any]) -> None:
    m, cfg = out["machine"], out["config"]
    print(f"bench_resp  {out['started']}  {m['cpus']} cpus  kernel {m['kernel']}  "
          f"python {m['python']}  redis {m['redis']}")
    print(f"{out['replkv']['command'].replace('-h 127.0.0.1 -p', '-p')}  fsync={cfg['fsync']}  "
          f"(Redis: {out['redis']['variant']}, 3 replicas)")
    print(f"load average before {out['load_before']}, after {out['load_after']}")
    print()
    rows = [["", "replkv (router RESP)", "redis + 3 replicas", "replkv/redis"]]
    for t in ("set", "get"):
        r, red = out["replkv"][t], out["redis"][t]
        rows.append([f"{t.upper()} requests/s", f"{r['ops_per_s']:,.0f}",
                     f"{red['ops_per_s']:,.0f}", f"{out['ratio_replkv_over_redis'][t]:.3f}"])
        if r["p50_ms"] is not None and red["p50_ms"] is not None:
            rows.append([f"{t.upper()} p50 ms", f"{r['p50_ms']:.3f}", f"{red['p50_ms']:.3f}",
                         f"{r['p50_ms'] / red['p50_ms']:.2f}" if red["p50_ms"] else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    print()
    for side in ("replkv", "redis"):
        for line in out[side]["lines"]:
            print(f"{side:>6}: {line}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--requests", type=int, default=20_000,
                   help="requests per test, redis-benchmark's -n (default 20000)")
    p.add_argument("-c", "--clients", type=int, default=50,
                   help="connections, redis-benchmark's -c (default 50)")
    p.add_argument("--fsync", choices=["always", "everysec", "no"], default="always",
                   help="the cluster's fsync policy, matched by Redis's appendfsync "
                        "(default always)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds each redis-benchmark may take (default 600)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--keep-dir", action="store_true", help="keep the temp dir (logs, data)")
    a = p.parse_args(argv)
    if a.requests < 1 or a.clients < 1:
        p.error("-n and -c must be at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = asyncio.run(amain(args))
    except (ReplError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench_resp failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
