"""The slave role: hold one connection to the master, apply what it streams, acknowledge."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.core.slave import SlaveCore
from cluster.errors import (
    CorruptLog,
    NetworkError,
    ProtocolError,
    ReplError,
    StaleEpoch,
    StorageFailure,
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
        self._progressed = False  # this session stored entries, installed or heartbeated
        self._receiving: _SnapshotFile | None = None  # a snapshot arriving from the master

    @property
    def connected(self) -> bool:
        return self._link is not None

    async def run(self) -> None:
        """Keep a replication session with the master. After a session that made progress
        drops, reconnect at once; back off briefly while the master stays unreachable or a
        session fails before storing anything (a full disk here, say)."""
        backoff = 0.0
        addr = self.node.config.cluster[self.master]
        while True:
            self._progressed = False
            try:
                await self._session(addr)
            except Resync:
                continue
            except CorruptLog:
                raise
            except StaleEpoch as exc:
                log.warning("master %s is stale: %s", self.master, exc)
            except StorageFailure as exc:
                log.error("cannot store what the master sends: %s", exc)
            except (ReplError, OSError, ConnectionError, TimeoutError) as exc:
                log.warning("replication from %s interrupted: %s", self.master,
                            exc or type(exc).__name__)
            finally:
                self._link = None
            if self._progressed:
                backoff = 0.0
                continue
            backoff = min(MAX_BACKOFF, max(0.02, backoff * 2))
            await asyncio.sleep(backoff)

    async def _session(self, addr: Any) -> None:
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
            try:
                epoch, match = int(reply.fields["epoch"]), int(reply.fields["match"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ProtocolError(f"malformed sync reply from the master: {exc!r}") from exc
            await self.node.settle_snapshot()
            self._adopt_epoch(epoch)
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
            self._link = stream
            if not reply.fields.get("snapshot"):
                self._send_ack()
            await self._stream_loop(stream)
        finally:
            if self._receiving is not None:
                self._receiving.discard()
                self._receiving = None
            await stream.close()

    def _adopt_epoch(self, epoch: int) -> None:
        """Refuse an older master; durably record a newer epoch before acting in it."""
        if epoch > self.core.epoch:
            self.node.store.set_epoch(epoch)
        self.core.check_epoch(epoch)

    async def _stream_loop(self, stream: FramedStream) -> None:
        """Apply what the master streams: appends, and a snapshot when it sends one (right
        after the handshake, or later when this slave fell behind a compaction)."""
        loop = asyncio.get_running_loop()
        cfg = self.node.config
        store = self.node.store
        receiving: _SnapshotFile | None = None
        async with asyncio.timeout(loop.time() + cfg.peer_timeout) as deadline:
            async for payloads in stream.read_payloads():
                deadline.reschedule(loop.time() + cfg.peer_timeout)
                self.last_contact_ms = self.node.now_ms()
                for payload in payloads:
                    msg = codec.decode(payload, cfg.limits)
                    if isinstance(msg, SnapshotChunk):
                        self._adopt_epoch(msg.epoch)
                        if receiving is None:
                            receiving = self._receiving = _SnapshotFile(
                                store.directory / "snapshot.recv")
                        if await receiving.add(msg):
                            deadline.reschedule(None)  # a big install may outlast a timeout
                            await self._install(receiving, msg.index)
                            self._progressed = True
                            receiving = self._receiving = None
                            deadline.reschedule(loop.time() + cfg.peer_timeout)
                        else:
                            self._send_ack()  # keeps the master's side of the link alive
                        continue
                    if not isinstance(msg, Append) or receiving is not None:
                        raise ProtocolError(f"master sent {type(msg).__name__} out of turn")
                    self._adopt_epoch(msg.epoch)
                    entries = self.core.on_append(msg)
                    if not entries:
                        if self.core.durable >= self.core.master_commit:
                            self._progressed = True  # caught up: a healthy, idle session
                        self._send_ack()
                        continue
                    store.append(entries)
                    self._progressed = True
                    self.core.accept(entries)
                    now = self.node.now_ms()
                    for e in entries:
                        self.delays.add(now - e.ts)
                    self.node.durability.wrote(entries[-1].index)
        raise NetworkError(f"master {self.master} closed the connection")

    async def _install(self, received: _SnapshotFile, index: int) -> None:
        await self.node.settle_snapshot()
        store = self.node.store
        store.snapshotting = True  # no local snapshot may read the map while it is replaced
        try:
            meta = await asyncio.to_thread(store.install_snapshot, received.path)
        finally:
            store.snapshotting = False
        if meta.index != index:
            raise ProtocolError(f"snapshot claims index {index} but holds {meta.index}")
        self.node.durability.reset(meta.index)
        self.core.durable = meta.index
        self._send_ack()

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



class _SnapshotFile:
    """A snapshot arriving in chunks, written to a temporary file and synced at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._offset = 0

    async def add(self, chunk: SnapshotChunk) -> bool:
        """Write one chunk; True when the snapshot is complete and synced."""
        try:
            if chunk.offset != self._offset:
                raise ProtocolError(f"snapshot chunk at {chunk.offset}, expected {self._offset}")
            await asyncio.to_thread(write_all, self._fd, chunk.data)
            self._offset += len(chunk.data)
            if chunk.done:
                await asyncio.to_thread(os.fsync, self._fd)
                os.close(self._fd)
                self._fd = -1
            return chunk.done
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)
