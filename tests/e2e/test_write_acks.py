"""Acknowledgement levels and write outcomes with real processes: a paused slave makes
``acks=all`` time out with ``applied: unknown`` (and the write still lands once it
resumes), ``acks=2`` needs only two of three slaves, the router's deadline answers
``unknown`` for a write to a paused master, and ``replctl`` prints the outcome."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from cluster.client import Client
from cluster.config import Address, Limits
from cluster.errors import BadRequest, NetworkError, RequestTimeout
from cluster.local import LocalCluster
from cluster.types import Acks, Consistency
from cluster.wire import codec
from cluster.wire.framing import FrameDecoder
from cluster.wire.messages import ErrorReply, Get, Ping, Reply, Set
from tests.e2e.conftest import FAST_ROUTER, node_items, wait_applied

pytestmark = pytest.mark.e2e

# a paused slave stays "in contact" for the master (no fail-fast no_quorum) while a write's
# short timeout_ms runs out
PATIENT_NODE = ["--heartbeat-interval", "0.05", "--peer-timeout", "5"]
# the router's probes outlast a short pause of the master; its request deadline does not
DEADLINE_ROUTER = ["--health-interval", "0.5", "--node-timeout", "5",
                   "--request-timeout", "0.5"]

MakeCluster = Callable[[list[str]], Awaitable[LocalCluster]]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[MakeCluster]:
    started: list[LocalCluster] = []

    async def start(router_args: list[str]) -> LocalCluster:
        cl = LocalCluster(tmp_path / f"c{len(started)}", base_port=0,
                          extra_node_args=PATIENT_NODE, extra_router_args=router_args)
        started.append(cl)
        await cl.start()
        return cl

    try:
        yield start
    finally:
        for cl in started:
            for name in cl.children:  # a paused process would not stop on SIGTERM
                cl.signal(name, signal.SIGCONT)
            await cl.stop()


def replctl(router: Address, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli.ctl", "--router", str(router),
                           *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ})


async def test_acks_all_times_out_as_unknown_while_a_slave_is_paused_and_applies_later(
        make: MakeCluster) -> None:
    cl = await make(FAST_ROUTER)
    async with await Client.connect(cl.router_address, timeout=10) as c:
        first = await c.set("k", "all four", Acks.ALL)
        assert first.copies == 4
        cl.signal("n3", signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout) as info:
                await c.set("k", "paused", Acks.ALL, timeout_ms=300)
            exc = info.value
            assert (exc.applied, exc.index, exc.epoch) == ("unknown", first.index + 1, 1)
            assert str(exc).endswith(f"(applied: unknown, index {first.index + 1})"), exc
            # the master applied it; only the confirmation is missing
            assert (await c.get("k", strong=True)).value == "paused"

            # replctl says the same, in words and in JSON
            out = await asyncio.to_thread(replctl, cl.router_address, "write", "k", "cli",
                                          "--acks", "all", "--timeout-ms", "300")
            assert out.returncode == 1
            assert out.stderr.startswith("Error: timeout: "), out.stderr
            assert out.stderr.rstrip().endswith(
                f"(applied: unknown, index {first.index + 2})"), out.stderr
            out = await asyncio.to_thread(replctl, cl.router_address, "delete", "k",
                                          "--acks", "3", "--timeout-ms", "300", "--json")
            assert out.returncode == 1
            fields = json.loads(out.stdout)
            assert {k: fields[k] for k in ("ok", "code", "applied", "index", "epoch")} == {
                "ok": False, "code": "timeout", "applied": "unknown",
                "index": first.index + 3, "epoch": 1}
        finally:
            cl.signal("n3", signal.SIGCONT)
        await wait_applied(cl, "n3", first.index + 3)
        assert await node_items(cl.addresses["n3"]) == {}  # the delete landed last
        assert (await c.set("k", "back", Acks.ALL)).copies == 4


async def test_acks_2_is_met_with_one_slave_paused(make: MakeCluster) -> None:
    cl = await make(FAST_ROUTER)
    async with await Client.connect(cl.router_address, timeout=10) as c:
        cl.signal("n4", signal.SIGSTOP)
        try:
            token = await c.set("k", "two slaves", Acks(2), timeout_ms=3000)
            assert token.copies == 3
            out = await asyncio.to_thread(replctl, cl.router_address, "write", "k", "again",
                                          "--acks", "2")
            assert out.returncode == 0, out
            assert out.stdout.strip().endswith("copies=3"), out.stdout
            # four slaves cannot be asked of a cluster of three: refused, not applied
            with pytest.raises(BadRequest) as info:
                await c.set("k", "four", Acks(4))
            assert info.value.applied == "no" and info.value.index is None
        finally:
            cl.signal("n4", signal.SIGCONT)


async def _read_frame(reader: asyncio.StreamReader, decoder: FrameDecoder,
                      pending: list[bytes]) -> Reply | ErrorReply:
    while not pending:
        chunk = await reader.read(65536)
        assert chunk, "the router closed the connection"
        pending.extend(decoder.feed(chunk))
    msg = codec.decode(pending.pop(0), Limits())
    assert isinstance(msg, Reply | ErrorReply), msg
    return msg


async def test_the_router_answers_unknown_when_the_master_does_not_answer_in_time(
        make: MakeCluster) -> None:
    cl = await make(DEADLINE_ROUTER)
    r = cl.router_address
    reader, writer = await asyncio.open_connection(r.host, r.port)
    decoder, pending = FrameDecoder(1 << 24), list[bytes]()
    try:
        cl.signal("n1", signal.SIGSTOP)
        try:
            writer.write(codec.frame(Set(7, "k", "late")))
            async with asyncio.timeout(10):
                reply = await _read_frame(reader, decoder, pending)
            assert isinstance(reply, ErrorReply), reply
            assert (reply.id, reply.code, reply.applied) == (7, "timeout", "unknown")
            assert "did not answer within 0.5s" in reply.message
            # a strong read goes to the master too: a plain timeout, no outcome
            writer.write(codec.frame(Get(8, "k", consistency=Consistency.STRONG)))
            async with asyncio.timeout(10):
                read = await _read_frame(reader, decoder, pending)
            assert isinstance(read, ErrorReply), read
            assert (read.id, read.code, read.applied) == (8, "timeout", None)
        finally:
            cl.signal("n1", signal.SIGCONT)
        # the master carries the write out after all; its late reply goes nowhere
        await wait_applied(cl, "n1", 1)
        assert await node_items(cl.addresses["n1"]) == {"k": "late"}
        writer.write(codec.frame(Ping(10)) + codec.frame(Set(9, "k", "next")))
        async with asyncio.timeout(10):
            ping = await _read_frame(reader, decoder, pending)
            second = await _read_frame(reader, decoder, pending)
        assert isinstance(ping, Reply) and ping.id == 10, ping
        assert isinstance(second, Reply) and second.id == 9 and second.fields["index"] == 2
    finally:
        writer.close()


# --- what the client library says when no reply comes ---------------------------------------------


async def test_the_client_reports_its_own_give_ups_as_unknown_and_unsent_writes_as_no(
) -> None:
    """A server that reads and never answers: the client's own timeout makes a write
    `unknown` (it was sent); after the connection is gone, a write is `no` (never sent)."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        addr = Address("127.0.0.1", server.sockets[0].getsockname()[1])
        c = await Client.connect(addr, timeout=0.2)
        with pytest.raises(RequestTimeout) as info:
            await c.set("k", "v")
        assert (info.value.applied, info.value.index) == ("unknown", None)
        assert str(info.value).endswith("(applied: unknown)")
        await c.close()
        with pytest.raises(NetworkError) as closed:
            await c.delete("k")
        assert closed.value.applied == "no"
        async with await Client.connect(addr, timeout=0.2) as reader:
            with pytest.raises(RequestTimeout) as read:  # a read has no outcome to report
                await reader.get("k")
        assert read.value.applied is None
    finally:
        server.close()
        await server.wait_closed()
