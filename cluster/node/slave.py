"""The slave role: hold one connection to the master, apply what it streams, acknowledge."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from cluster.core.slave import SlaveCore
from cluster.errors import (
    CorruptLog,
    NetworkError,
    ProtocolError,
    ReplError,
    StaleEpoch,
    error_for_code,
)
from cluster.net.stream import FramedStream
from cluster.node.stats import DelayStats
from cluster.storage.records import write_all
from cluster.wire import codec
from cluster.wire.messages import Append, ErrorReply, Reply, SnapshotChunk

if TYPE_CHECKING:
    from cluster.node.runtime import Node

log = logging.getLogger(__name__)

MAX_BACKOFF = 0.5


class Resync(Exception):
    """The local state changed under the sync handshake; start a new one at once."""


class SlaveRole:
    name = "slave"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.core = SlaveCore(node.config.node_id, node.store.epoch, node.store.log,
                              node.store.kv)
        self.core.persisted(node.durability.durable)
        self.master = node.config.master
        self.delays = DelayStats()
        self._link: FramedStream | None = None
        self.last_contact_ms = 0
        self.syncs = 0  # handshakes completed, for status and tests
        self.last_sync_from = -1  # the last index this node had when it last asked

    @property
    def connected(self) -> bool:
        return self._link is not None

    async def run(self) -> None:
        """Keep a replication session with the master, reconnecting at once when it drops
        and backing off briefly only while the master stays unreachable."""
        backoff = 0.0
        addr = self.node.config.cluster[self.master]
        while True:
            got_data = False
            try:
                got_data = await self._session(addr)
            except Resync:
                backoff = 0.0
                continue
            except StaleEpoch as exc:
                log.warning("master %s is stale: %s", self.master, exc)
            except (NetworkError, ProtocolError, OSError, ConnectionError, TimeoutError,
                    ReplError) as exc:
                if isinstance(exc, CorruptLog):
                    raise
                log.warning("replication from %s interrupted: %s", self.master,
                            exc or type(exc).__name__)
            finally:
                self._link = None
            backoff = 0.0 if got_data and backoff == 0.0 else min(
                MAX_BACKOFF, max(0.02, backoff * 2))
            await asyncio.sleep(backoff)

    async def _session(self, addr: Any) -> bool:
        cfg = self.node.config
        store = self.node.store
        stream = await FramedStream.connect(addr, cfg.limits, cfg.peer_timeout)
        try:
            self.last_sync_from = store.log.last_index
            stream.send(self.core.sync_request(1))
            async with asyncio.timeout(cfg.peer_timeout * 2):
                reply = await stream.read_message()
            if isinstance(reply, ErrorReply):
                raise error_for_code(reply.code, reply.message)
            if not isinstance(reply, Reply):
                raise ProtocolError(f"master answered sync with {type(reply).__name__}")
            epoch, match = int(reply.fields["epoch"]), int(reply.fields["match"])
            await self.node.settle_snapshot()
            if self.core.check_epoch(epoch):
                store.set_epoch(epoch)
            if match < store.log.last_index:
                wiped = match < store.snapshot_index
                store.truncate_after(match)
                self.node.durability.reset(store.log.last_index)
                self.core.durable = store.log.last_index
                if wiped:
                    raise Resync()
            self.syncs += 1
            log.info("syncing from master %s after index %d (epoch %d)", self.master, match,
                     epoch)
            if reply.fields.get("snapshot"):
                await self._receive_snapshot(stream)
            self._link = stream
            self._send_ack()
            await self._stream_loop(stream)
            return True
        finally:
            await stream.close()

    async def _receive_snapshot(self, stream: FramedStream) -> None:
        cfg = self.node.config
        store = self.node.store
        tmp = store.directory / "snapshot.recv"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            offset = 0
            while True:
                async with asyncio.timeout(cfg.peer_timeout * 2):
                    msg = await stream.read_message()
                if not isinstance(msg, SnapshotChunk) or msg.offset != offset:
                    raise ProtocolError("expected the next snapshot chunk")
                self.core.check_epoch(msg.epoch)
                await asyncio.to_thread(write_all, fd, msg.data)
                offset += len(msg.data)
                if msg.done:
                    break
            await asyncio.to_thread(os.fsync, fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        meta = await asyncio.to_thread(store.install_snapshot, tmp)
        if meta.index != msg.index:
            raise ProtocolError(f"snapshot claims index {msg.index} but holds {meta.index}")
        self.node.durability.reset(meta.index)
        self.core.durable = meta.index

    async def _stream_loop(self, stream: FramedStream) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.node.config
        store = self.node.store
        async with asyncio.timeout(loop.time() + cfg.peer_timeout) as deadline:
            async for payloads in stream.read_payloads():
                deadline.reschedule(loop.time() + cfg.peer_timeout)
                self.last_contact_ms = self.node.now_ms()
                for payload in payloads:
                    msg = codec.decode(payload, cfg.limits)
                    if not isinstance(msg, Append):
                        raise ProtocolError(f"master sent {type(msg).__name__} mid-stream")
                    entries = self.core.on_append(msg)
                    if not entries:
                        self._send_ack()
                        continue
                    store.append(entries)
                    self.core.accept(entries)
                    now = self.node.now_ms()
                    for e in entries:
                        self.delays.add(now - e.ts)
                    self.node.durability.wrote(entries[-1].index)
        raise NetworkError(f"master {self.master} closed the connection")

    def _send_ack(self) -> None:
        if self._link is not None:
            self._link.send(self.core.ack())

    def on_durable(self, index: int) -> None:
        self.core.persisted(index)
        self._send_ack()
        self.node.maybe_snapshot()

    def status(self) -> dict[str, Any]:
        now = self.node.now_ms()
        return {
            "master_link": {
                "up": self.connected,
                "last_contact_ms": now - self.last_contact_ms if self.last_contact_ms else None,
                "syncs": self.syncs,
                "last_sync_from": self.last_sync_from,
            },
            "master_commit": self.core.master_commit,
            "repl_delay_ms": self.delays.summary(),
        }

