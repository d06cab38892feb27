"""The router's log tells the story of each node in order: when a forwarded write is what
finds the master gone, "down" is logged before the later "up (master)"; no line ends with
an empty reason.

A router runs in the test's event loop against a fake master on 127.0.0.1, which the test
crashes (closes every connection and stops listening) and restarts on the same port."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from cluster.client import Client
from cluster.config import Address, Limits, RouterConfig
from cluster.errors import Unavailable, reason
from cluster.net.stream import FramedStream
from cluster.router.server import Router
from cluster.types import NodeId
from cluster.wire import codec
from cluster.wire.messages import Reply, Set, Status
from tests.waiting import until

pytestmark = pytest.mark.timeout(30)

N1 = NodeId("n1")


@dataclass
class FakeMaster:
    """Answers status as a master of epoch 1, and writes with index 1."""

    port: int = 0
    server: asyncio.Server | None = None
    streams: set[FramedStream] = field(default_factory=set)
    probed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                 reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def crash(self) -> None:
        assert self.server is not None
        self.server.close()
        for stream in list(self.streams):
            stream.abort()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, Limits())
        self.streams.add(stream)
        try:
            async for msg in stream.requests(codec.NODE_REQUESTS):
                if isinstance(msg, Status):
                    stream.send(Reply(msg.id, {"role": "master", "epoch": 1, "last_index": 0,
                                               "applied_index": 0}))
                    self.probed.set()
                elif isinstance(msg, Set):
                    stream.send(Reply(msg.id, {"index": 1}))
        except OSError:
            pass
        finally:
            self.streams.discard(stream)
            await stream.close()



@pytest.fixture
async def master() -> AsyncIterator[FakeMaster]:
    fake = FakeMaster()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.crash()


@pytest.fixture
async def router(master: FakeMaster) -> AsyncIterator[Router]:
    # probes far apart, so that the write, not a probe, is what finds the master gone
    # (max-lag-ms must exceed the health interval; this test makes no reads: off)
    config = RouterConfig(Address("127.0.0.1", 0), {N1: Address("127.0.0.1", master.port)},
                          health_interval=1.5, node_timeout=3.0, max_lag_ms=0)
    r = Router(config)
    ready = asyncio.Event()
    task = asyncio.create_task(r.run(lambda _: ready.set()))
    try:
        await ready.wait()
        yield r
    finally:
        r.stop()
        await task


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cluster.router.server"]


async def test_a_write_that_finds_the_master_down_logs_it_before_it_is_up_again(
        master: FakeMaster, router: Router, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "cluster.router.server")
    assert router.address is not None
    async with await Client.connect(router.address, timeout=5) as client:
        assert (await client.set("k", "v")).index == 1
        master.probed.clear()
        await master.probed.wait()  # a probe just passed: the next is 1.5 s away
        await master.crash()
        link = router._links[N1]  # the router's connection to n1 sees the close
        await until(lambda: link.closed, "the router's link to n1 to close")
        with pytest.raises(Unavailable, match="no connection to it"):
            await client.set("k", "w")
        down = [n for n, line in enumerate(lines(caplog)) if "n1" in line and "is down" in line]
        assert down, lines(caplog)
        await master.start()  # on the same port
        await until(lambda: any("is up (master)" in line for line in lines(caplog)[down[0]:]),
                    "the router to find n1 up again")
        assert (await client.set("k", "x")).index == 1
    for line in lines(caplog):
        assert not line.rstrip().endswith(":"), f"a log line with an empty reason: {line!r}"


def test_reason_is_never_empty() -> None:
    assert reason(TimeoutError()) == "TimeoutError"
    assert reason(ConnectionResetError()) == "ConnectionResetError"
    assert reason(OSError(5, "Input/output error")) == "[Errno 5] Input/output error"
    assert reason(ValueError("bad")) == "bad"
