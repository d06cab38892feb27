"""The router's Redis front end (--resp-listen) against real Redis clients: redis-cli,
redis-cli --pipe, redis-benchmark (Debian's redis-tools) and redis-py; bad RESP input."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis

from cluster.client import Client
from cluster.config import Address
from cluster.local import LocalCluster, free_ports
from cluster.wire.resp import encode_command
from tests.e2e.conftest import (
    FAST_NODE,
    FAST_ROUTER,
    happens_within,
    node_items,
    node_status,
    wait_applied,
)

pytestmark = pytest.mark.e2e


class RespCluster:
    def __init__(self, cluster: LocalCluster, resp: Address) -> None:
        self.cluster = cluster
        self.resp = resp

    def redis(self) -> redis.Redis:
        # RESP2: replkv does not speak RESP3, which redis-py 8 asks for by default
        return redis.Redis(host=self.resp.host, port=self.resp.port, protocol=2,
                           socket_timeout=10)


@pytest.fixture
async def rc(tmp_path: Path) -> AsyncIterator[RespCluster]:
    resp = Address("127.0.0.1", free_ports(1)[0])
    cl = LocalCluster(tmp_path / "c", base_port=0, extra_node_args=FAST_NODE,
                      extra_router_args=[*FAST_ROUTER, "--resp-listen", str(resp)])
    try:
        await cl.start()
        yield RespCluster(cl, resp)
    finally:
        await cl.stop()


def redis_tool(name: str) -> str:
    """The path of a redis-tools program; absent, a skip (a failure in CI, whose
    scripts/ensure_apt.sh installs it)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: .ci/run installs redis-tools with "
                        "scripts/ensure_apt.sh")
        pytest.skip(f"{name} is not installed (apt-get install redis-tools)")
    return path


async def run(*argv: str, stdin: bytes = b"", timeout: float = 120) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode("utf-8", "replace")


async def cli(rc: RespCluster, *args: str, stdin: bytes = b"") -> str:
    code, out = await run(redis_tool("redis-cli"), "-h", rc.resp.host, "-p",
                          str(rc.resp.port), *args, stdin=stdin)
    assert code == 0, out
    return out


async def test_redis_cli_set_get_del_scan_and_info(rc: RespCluster) -> None:
    assert await cli(rc, "ping") == "PONG\n"
    assert await cli(rc, "set", "city:paris", "France") == "OK\n"
    # one connection reads its own writes, whichever slave serves the read
    session = await cli(rc, stdin=b"set greeting 'hello world'\nget greeting\nget city:paris\n")
    assert session.splitlines() == ["OK", "hello world", "France"]
    assert await cli(rc, "set", "city:rome", "Italy") == "OK\n"
    assert (await cli(rc, stdin=b"del city:rome nothing\nexists city:rome\n")).split() == [
        "1", "0"]
    # other connections read from any slave: let every slave catch up before scanning
    head = (await node_status(rc.cluster.addresses["n1"]))["last_index"]
    for node in rc.cluster.node_ids[1:]:
        await wait_applied(rc.cluster, node, head)
    # SCAN, two keys a page: the cursor goes round until it is 0 again
    keys: list[str] = []
    cursor = "0"
    for _ in range(10):
        page = (await cli(rc, "scan", cursor, "count", "2")).splitlines()
        cursor, keys = page[0], keys + page[1:]
        if cursor == "0":
            break
    assert sorted(keys) == ["city:paris", "greeting"]
    assert (await cli(rc, "scan", "0", "match", "city:*")).splitlines() == ["0", "city:paris"]
    assert (await cli(rc, "dbsize")).strip() == "2"
    info = await cli(rc, "info", "replication")
    assert "role:master" in info and "connected_slaves:3" in info
    for node in rc.cluster.node_ids:
        assert f"id={node},address={rc.cluster.addresses[node]}," in info
    assert "node0:id=n1" in info and "role=master,state=up" in info
    assert "master_repl_offset:" in info and "lag_entries=" in info
    # errors leave the connection going
    session = await cli(rc, stdin=b"nosuchcommand a\nset a b nx\nselect 1\nget city:paris\n")
    lines = [line for line in session.splitlines() if line]  # redis-cli adds blank lines
    assert lines[0].startswith("ERR unknown command 'nosuchcommand'")
    assert "NX is not supported" in lines[1] and "out of range" in lines[2]
    assert lines[3] == "France"


async def test_redis_cli_pipe_loads_10000_keys_readable_with_replkv_client(
        rc: RespCluster) -> None:
    load = b"".join(encode_command([b"SET", b"pipe:%05d" % i, b"value %d" % i])
                    for i in range(10_000))
    code, out = await run(redis_tool("redis-cli"), "-h", rc.resp.host, "-p",
                          str(rc.resp.port), "--pipe", stdin=load)
    assert code == 0, out
    assert "errors: 0, replies: 10000" in out, out
    head = (await node_status(rc.cluster.addresses["n1"]))["last_index"]
    for node in rc.cluster.node_ids[1:]:
        await wait_applied(rc.cluster, node, head)
    async with await Client.connect(rc.cluster.router_address, timeout=10) as client:
        items = {k: v async for k, v in client.items()}
    assert items == {f"pipe:{i:05d}": f"value {i}".encode() for i in range(10_000)}
    assert await node_items(rc.cluster.addresses["n4"]) == items


async def test_redis_benchmark_runs_to_the_end_without_errors(rc: RespCluster) -> None:
    code, out = await run(redis_tool("redis-benchmark"), "-h", rc.resp.host, "-p",
                          str(rc.resp.port), "-t", "set,get", "-n", "20000", "-q")
    assert code == 0, out
    lines = [line for line in out.replace("\r", "\n").splitlines()
             if "requests per second" in line]
    assert [line.strip()[:4] for line in lines] == ["SET:", "GET:"], out
    assert "error" not in out.lower() and "warning" not in out.lower(), out


def redis_py_session(rc: RespCluster) -> None:
    r = rc.redis()
    assert r.ping() is True
    assert r.echo("hi") == b"hi"
    assert r.set("a", "1") is True
    assert r.get("a") == b"1"
    assert r.set("bin", bytes(range(256))) and r.get("bin") == bytes(range(256))
    assert r.mset({"b": "2", "c": "3"}) is True
    assert r.mget("a", "b", "nope", "c") == [b"1", b"2", None, b"3"]
    assert r.exists("a", "b", "nope") == 2
    assert r.delete("a", "nope") == 1
    assert r.get("a") is None
    for i in range(30):
        r.set(f"user:{i:02d}", i)
    assert sorted(r.scan_iter(match="user:1*", count=7)) == [
        f"user:{i:02d}".encode() for i in range(10, 20)]
    assert len(r.keys("user:*")) == 30
    assert r.dbsize() == 33
    assert r.wait(3, 5000) == 3  # every slave holds this connection's last write
    info = r.info()
    assert info["connected_slaves"] == 3 and info["role"] == "master"
    assert info["db0"]["keys"] == 33
    assert r.client_setname("tester") and r.client_getname() == "tester"
    r.select(0)
    with pytest.raises(redis.ResponseError, match="not supported"):
        r.set("k", "v", nx=True)
    with pytest.raises(redis.ResponseError, match="do not expire"):
        r.set("k", "v", ex=10)
    with pytest.raises(redis.ResponseError, match="unknown command"):
        r.execute_command("LPUSH", "l", "x")  # type: ignore[no-untyped-call]
    assert r.get("b") == b"2"  # the connection goes on

    # pipelines: replies in request order, reads after writes see them
    pipe = r.pipeline(transaction=False)
    for i in range(300):
        pipe.set(f"p{i}", i)
        pipe.get(f"p{i}")
    pipe.get("p-none")
    results = pipe.execute()
    assert results[0::2][:300] == [True] * 300
    assert results[1::2] == [str(i).encode() for i in range(300)]
    assert results[-1] is None
    # a transaction is refused whole: the SET inside MULTI is not run
    with pytest.raises(redis.ResponseError, match="no transactions"):
        transaction = r.pipeline()
        transaction.set("in-multi", 1)
        transaction.execute()
    assert r.get("in-multi") is None
    # RESP3 is refused clearly
    with pytest.raises(redis.ResponseError, match="RESP2 only"):
        redis.Redis(host=rc.resp.host, port=rc.resp.port, protocol=3).ping()
    r.close()


async def test_redis_py_api_and_pipelines(rc: RespCluster) -> None:
    await asyncio.to_thread(redis_py_session, rc)


async def test_wait_counts_the_slaves_that_hold_the_write(rc: RespCluster) -> None:
    r = rc.redis()
    try:
        assert await asyncio.to_thread(r.set, "w", "1")
        assert await asyncio.to_thread(r.wait, 3, 5000) == 3
        # n4 paused: the master still counts it in contact for a while, but it has not
        # acknowledged the new write, so it is not counted
        rc.cluster.signal("n4", signal.SIGSTOP)
        try:
            assert await asyncio.to_thread(r.set, "w", "2")
            assert await asyncio.to_thread(r.wait, 2, 5000) >= 2
            assert await asyncio.to_thread(r.wait, 3, 300) == 2  # the timeout passes
        finally:
            rc.cluster.signal("n4", signal.SIGCONT)
        assert await asyncio.to_thread(r.wait, 3, 5000) == 3  # n4 catches up
    finally:
        r.close()


async def raw(rc: RespCluster, data: bytes) -> tuple[bytes, bool]:
    """Send bytes; return everything the router answers and whether it then closed."""
    reader, writer = await asyncio.open_connection(rc.resp.host, rc.resp.port)
    try:
        writer.write(data)
        await writer.drain()
        got = b""
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                got += chunk
        return got, True
    except TimeoutError:
        return got, False
    finally:
        writer.close()


@pytest.mark.parametrize(("data", "answer"), [
    (b"$3\r\nfoo\r\n", b"-ERR Protocol error: expected '*'"),
    (b"*1\r\n*1\r\n$4\r\nPING\r\n", b"-ERR Protocol error: expected '$', got '*'"),
    (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$999999999\r\n", b"-ERR Protocol error: invalid bulk"),
    (b"*2\r\n$3\r\nGET\r\n$5\r\nab\r\n", None),  # wrong length: waits for more, like Redis
    (b"*2\r\n$3\r\nGET\r\n$1\r\nab\r\n", b"-ERR Protocol error: a bulk string is not"),
    (b"*99999999\r\n", b"-ERR Protocol error: an array of 99999999 elements"),
    (b"PING\r\n*1\r\n$4\r\nPING\r\n" + b"x" * 70_000, b"+PONG\r\n+PONG\r\n-ERR Protocol error:"
                                                       b" an inline request longer"),
])
async def test_bad_resp_input_gets_an_error_and_a_closed_connection(
        rc: RespCluster, data: bytes, answer: bytes | None) -> None:
    if answer is None:
        reader, writer = await asyncio.open_connection(rc.resp.host, rc.resp.port)
        writer.write(data)
        writer.write_eof()  # half-close mid-request: an error, then the close
        got = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert got.startswith(b"-ERR Protocol error: the client closed its side"), got
    else:
        got, closed = await raw(rc, data)
        assert got.startswith(answer), got
        assert closed
    got, _ = await raw(rc, b"PING\r\nQUIT\r\n")  # the router goes on serving
    assert got == b"+PONG\r\n+OK\r\n"


async def test_inline_commands_and_pipelined_replies_in_order(rc: RespCluster) -> None:
    sets = b"".join(encode_command([b"SET", b"k%d" % i, b"%d" % i]) for i in range(200))
    gets = b"".join(b"GET k%d\r\n" % i for i in range(200))
    got, closed = await raw(rc, b"HELLO 2\r\n" + sets + gets + b"DBSIZE\r\nQUIT\r\nPING\r\n")
    assert closed
    assert got.startswith(b"*14\r\n$6\r\nserver\r\n$6\r\nreplkv\r\n")
    rest = got[got.index(b"+OK\r\n"):]
    assert rest == b"+OK\r\n" * 200 + b"".join(
        b"$%d\r\n%d\r\n" % (len(b"%d" % i), i) for i in range(200)) + b":200\r\n+OK\r\n"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")  # pragma: no cover


async def test_a_client_that_stops_reading_costs_the_router_bounded_memory(
        rc: RespCluster) -> None:
    """1,000 GETs of a 256 KiB value (250 MiB of replies) from a client that reads nothing:
    the router pauses it instead of buffering; every reply arrives once it reads."""
    value = b"v" * (256 * 1024)
    r = rc.redis()
    try:
        await asyncio.to_thread(r.set, "big", value)
        assert await asyncio.to_thread(r.wait, 3, 5000) == 3
    finally:
        r.close()
    pid = rc.cluster.children["router"].pid
    assert pid is not None
    before = rss_mib(pid)
    reader, writer = await asyncio.open_connection(rc.resp.host, rc.resp.port,
                                                   limit=1 << 20)
    try:
        writer.write(encode_command([b"GET", b"big"]) * 1000)

        async def swollen() -> bool:
            return rss_mib(pid) - before > 120

        assert not await happens_within(swollen, 3.0), rss_mib(pid) - before
        reply = b"$%d\r\n%s\r\n" % (len(value), value)
        for _ in range(1000):
            assert await asyncio.wait_for(reader.readexactly(len(reply)), 30) == reply
    finally:
        writer.close()


async def test_a_busy_resp_port_is_one_clear_error(tmp_path: Path) -> None:
    busy, listen = free_ports(2)
    holder = await asyncio.start_server(lambda r, w: None, "127.0.0.1", busy)
    try:
        code, out = await run(sys.executable, "-m", "cluster.cli.router", "--listen",
                              f"127.0.0.1:{listen}", "--cluster", "n1=127.0.0.1:1",
                              "--resp-listen", f"127.0.0.1:{busy}", timeout=30)
    finally:
        holder.close()
    assert code != 0
    assert f"cannot listen on 127.0.0.1:{busy} for Redis clients (--resp-listen)" in out, out
    assert "Traceback" not in out
