"""The slave role: hold one connection to the master, apply what it streams, acknowledge."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.core.slave import SlaveCore
from cluster.core.state import Ready, Replica, check_read
from cluster.errors import (
    Behind,
    CorruptLog,
    NetworkError,
    NotMaster,
    RemoteProtocolError,
    ReplError,
    StaleEpoch,
    StorageFailure,
    error_for_code,
    reason,
)
from cluster.net.stream import FramedStream
from cluster.node.stats import DelayStats
from cluster.storage.records import write_all
from cluster.types import Consistency, NodeId
from cluster.wire import codec
from cluster.wire.messages import Append, Delete, ErrorReply, Reply, Set, SnapshotChunk, Sync

if TYPE_CHECKING:
    from cluster.node.runtime import Node

log = logging.getLogger(__name__)

MAX_BACKOFF = 0.5


class Resync(Exception):
    """The local state changed under the sync handshake; start a new one at once."""


class SlaveRole:
    name = "slave"

    def __init__(self, node: Node, replica: Replica, master: NodeId) -> None:
        self.node = node
        self.core = SlaveCore(node.config.node_id, replica)
        self.master = master
        self.delays = DelayStats()
        self._link: FramedStream | None = None
        self.last_contact_ms = 0  # monotonic
        self._receiving: _SnapshotFile | None = None  # a snapshot arriving from the master

    def master_hint(self) -> str:
        return self.master

    @property
    def connected(self) -> bool:
        return self._link is not None

    # --- what a slave refuses ----------------------------------------------------------------

    def write(self, msg: Set | Delete, client: FramedStream) -> ErrorReply:
        return dataclasses.replace(not_master(msg.id, self.master), applied="no")

    async def replicate(self, stream: FramedStream, msg: Sync) -> None:
        stream.send(not_master(msg.id, self.master))

    def check_read(self, consistency: Consistency, min_epoch: int, min_index: int) -> None:
        """Strong reads go to the master. A read token is served only while this node is in
        sync with the master: until the handshake, its log may hold entries the master
        no longer has."""
        core = self.core
        if consistency is Consistency.STRONG:
            raise NotMaster(f"this node is a slave; strong reads go to {self.master}",
                            self.master)
        if min_index > 0 and not core.in_sync:
            raise Behind(f"{self.node.config.node_id} is not in sync with a master, so it "
                         f"cannot vouch for entry {min_index}")
        check_read(self.node.config.node_id, core.log, core.kv, min_epoch, min_index)

    # --- replication -------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a replication session with the master. After a session that made progress
        drops, reconnect at once; back off briefly while the master stays unreachable or a
        session fails before storing anything (a full disk here, say)."""
        backoff = 0.0
        addr = self.node.config.cluster[self.master]
        while True:
            self.core.progressed = False  # a session that never connects made no progress
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
                log.warning("replication from %s interrupted: %s", self.master, reason(exc))
            if self.core.progressed:
                backoff = 0.0
                continue
            backoff = min(MAX_BACKOFF, max(0.02, backoff * 2))
            await asyncio.sleep(backoff)

    async def aclose(self) -> None:
        if self._link is not None:
            await self._link.close()

    def _carry_out(self, ready: Ready) -> Ready:
        """Persist, advance, then send: nothing is acknowledged before it is stored."""
        ready = self.node.carry_out(self.core, ready)
        if self._link is not None:
            for msg in ready.messages:
                self._link.send(msg)
        return ready

    async def _session(self, addr: Any) -> None:
        cfg = self.node.config
        core = self.core
        stream = await FramedStream.connect(addr, cfg.limits, cfg.peer_timeout)
        try:
            stream.send(core.connect(1))
            async with asyncio.timeout(cfg.peer_timeout * 2):
                reply = await stream.read_message()
            if isinstance(reply, ErrorReply):
                raise error_for_code(reply.code, reply.message)
            if not isinstance(reply, Reply):
                raise RemoteProtocolError(f"master answered sync with {type(reply).__name__}")
            try:
                epoch, match = int(reply.fields["epoch"]), int(reply.fields["match"])
                snapshot = bool(reply.fields.get("snapshot"))
            except (KeyError, TypeError, ValueError) as exc:
                raise RemoteProtocolError(f"malformed sync reply from the master: {exc!r}") \
                    from exc
            await self.node.settle_snapshot()
            self._link = stream
            ready = self._carry_out(core.on_sync_reply(epoch, match, snapshot))
            if ready.resync:
                raise Resync()
            log.info("syncing from master %s after index %d (epoch %d)", self.master, match,
                     epoch)
            await self._stream_loop(stream)
        finally:
            self._link = None
            core.disconnected()
            if self._receiving is not None:
                self._receiving.discard()
                self._receiving = None
            await stream.close()

    async def _stream_loop(self, stream: FramedStream) -> None:
        """Apply what the master streams: appends, and a snapshot when it sends one (right
        after the handshake, or later when this slave fell behind a compaction)."""
        loop = asyncio.get_running_loop()
        cfg = self.node.config
        core = self.core
        async with asyncio.timeout(loop.time() + cfg.peer_timeout) as deadline:
            async for payloads in stream.read_payloads():
                deadline.reschedule(loop.time() + cfg.peer_timeout)
                self.last_contact_ms = self.node.now_ms()
                for payload in payloads:
                    msg = codec.decode(payload, cfg.limits)
                    if isinstance(msg, SnapshotChunk):
                        self._carry_out(core.on_chunk(msg.epoch, msg.done))
                        if self._receiving is None:
                            self._receiving = _SnapshotFile(
                                self.node.store.directory / "snapshot.recv")
                        if await self._receiving.add(msg):
                            deadline.reschedule(None)  # a big install may outlast a timeout
                            await self._install(self._receiving, msg.index)
                            self._receiving = None
                            deadline.reschedule(loop.time() + cfg.peer_timeout)
                        continue
                    if not isinstance(msg, Append):
                        raise RemoteProtocolError(
                            f"master sent {type(msg).__name__} on the replication link")
                    ready = self._carry_out(core.on_append(msg))
                    if ready.entries:
                        wall = self.node.wall_ms()
                        for e in ready.entries:
                            self.delays.add(wall - e.ts)
        raise NetworkError(f"master {self.master} closed the connection")

    async def _install(self, received: _SnapshotFile, index: int) -> None:
        await self.node.settle_snapshot()
        store = self.node.store
        store.snapshotting = True  # no local snapshot may read the map while it is replaced
        try:
            rec = await asyncio.to_thread(store.install_snapshot, received.path, index)
        except CorruptLog as exc:  # what the master sent is damaged: this node is fine
            raise RemoteProtocolError(f"the master's snapshot is damaged: {exc}") from exc
        finally:
            store.snapshotting = False
        ready = self.core.snapshot_installed(index, rec)
        self.node.durability.reset(self.core.durable)
        self._carry_out(ready)

    def on_durable(self, index: int) -> None:
        self._carry_out(self.core.persisted(index))
        self.node.maybe_snapshot(self.core.kv.applied)

    def status(self) -> dict[str, Any]:
        now = self.node.now_ms()
        core = self.core
        return {
            "master_link": {
                "up": self.connected,
                "state": core.state.value,
                "last_contact_ms": now - self.last_contact_ms if self.last_contact_ms else None,
                "syncs": core.syncs,
                "last_sync_from": core.last_sync_from,
            },
            "master_commit": core.master_commit,
            "repl_delay_ms": self.delays.summary(),
        }


def not_master(rid: int, master: str) -> ErrorReply:
    return ErrorReply(rid, NotMaster.code, f"this node is a slave; writes go to {master}",
                      master)


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
                raise RemoteProtocolError(f"snapshot chunk at {chunk.offset}, "
                                          f"expected {self._offset}")
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
