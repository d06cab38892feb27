"""The master role: accept writes, stream the log to each slave, release replies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cluster.core.master import MasterCore
from cluster.errors import (
    BadRequest,
    NetworkError,
    NoQuorum,
    NotMaster,
    ProtocolError,
    ReplError,
    StaleEpoch,
    StorageFailure,
    reason,
)
from cluster.net.stream import FramedStream
from cluster.storage.records import RECORD_HEADER
from cluster.storage.snapshot import MAGIC as SNAPSHOT_MAGIC
from cluster.types import Acks, NodeId, Op
from cluster.wire import codec
from cluster.wire.messages import (
    Ack,
    Delete,
    ErrorReply,
    Reply,
    Set,
    SnapshotChunk,
    Sync,
)

if TYPE_CHECKING:
    from cluster.node.runtime import Node

log = logging.getLogger(__name__)



@dataclass(eq=False)
class Link:
    """The master's end of one slave's replication connection."""

    node: NodeId
    stream: FramedStream
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class MasterRole:
    name = "master"

    def __init__(self, node: Node) -> None:
        self.node = node
        cfg = node.config
        self.core = MasterCore(
            cfg.node_id, [n for n in cfg.cluster if n != cfg.node_id], node.store.epoch,
            node.store.log, node.store.kv, majority=cfg.majority,
            peer_timeout_ms=int(cfg.peer_timeout * 1000),
            heartbeat_ms=int(cfg.heartbeat_interval * 1000),
            batch_entries=cfg.batch_entries, window_entries=cfg.window_entries,
            batch_bytes=cfg.limits.max_frame // 2,
        )
        self.core.persisted(node.durability.durable)
        # replies waiting, in index order: for the local fsync, then (acks=majority) for
        # a majority of the cluster
        self._local: deque[tuple[int, FramedStream, int, Acks]] = deque()
        self._majority: deque[tuple[int, FramedStream, int]] = deque()
        self._links: dict[NodeId, Link] = {}
        self._chunk_size = min(1024 * 1024, cfg.limits.max_frame // 2)

    # --- client writes -----------------------------------------------------------------------

    def write(self, msg: Set | Delete, stream: FramedStream) -> ErrorReply | None:
        """Append and apply now; the reply goes out once the acks level is met."""
        now = self.node.now_ms()
        if msg.acks is Acks.MAJORITY and not self.core.has_quorum(now):
            return ErrorReply(msg.id, NoQuorum.code,
                              "the master is not in contact with a majority of the cluster")
        if isinstance(msg, Set):
            entry = self.core.next_entry(Op.SET, msg.key, msg.value, now)
        else:
            entry = self.core.next_entry(Op.DELETE, msg.key, None, now)
        try:
            self.node.store.append([entry])
        except StorageFailure as exc:
            log.error("write %d failed: %s", entry.index, reason(exc))
            return ErrorReply(msg.id, exc.code, str(exc))
        self.core.accept(entry)
        self._local.append((entry.index, stream, msg.id, msg.acks))
        self.node.durability.wrote(entry.index)
        return None

    def on_durable(self, index: int) -> None:
        self.core.persisted(index)
        local = self._local
        while local and local[0][0] <= index:
            ix, stream, rid, acks = local.popleft()
            if acks is Acks.ASYNC:
                stream.send(Reply(rid, {"index": ix}))
            else:
                self._majority.append((ix, stream, rid))
        self._release_majority()
        for link in self._links.values():
            link.wake.set()
        self.node.maybe_snapshot()

    def _release_majority(self) -> None:
        if not self._majority:
            return
        done = self.core.majority_index()
        while self._majority and self._majority[0][0] <= done:
            ix, stream, rid = self._majority.popleft()
            stream.send(Reply(rid, {"index": ix}))

    def _fail_majority_waiters(self) -> None:
        while self._majority:
            ix, stream, rid = self._majority.popleft()
            stream.send(ErrorReply(
                rid, NoQuorum.code,
                f"entry {ix} is durable on the master but a majority could not be confirmed; "
                "it may or may not survive a failover"))

    # --- reads -------------------------------------------------------------------------------

    def confirm_strong(self) -> None:
        """A strong read is served only while a majority is in contact (a lease of one peer
        timeout)."""
        if not self.core.has_quorum(self.node.now_ms()):
            raise NoQuorum("the master is not in contact with a majority; strong reads are off")

    # --- replication -------------------------------------------------------------------------

    async def replicate(self, stream: FramedStream, msg: Sync) -> None:
        """Serve one slave's replication connection until it closes or goes silent."""
        now = self.node.now_ms()
        try:
            plan = self.core.on_sync(msg, now)
        except KeyError as exc:
            stream.send(ErrorReply(msg.id, BadRequest.code, str(exc.args[0])))
            return
        except StaleEpoch as exc:
            stream.send(ErrorReply(msg.id, exc.code, str(exc)))
            return
        node = NodeId(msg.node)
        old = self._links.get(node)
        if old is not None:
            await old.stream.close()
        link = Link(node, stream)
        self._links[node] = link
        log.info("slave %s connected from %s: last index %d, resuming after %d%s", node,
                 stream.peer, msg.last_index, plan.match,
                 " (snapshot first)" if plan.snapshot else "")
        stream.send(Reply(msg.id, {"epoch": self.core.epoch, "match": plan.match,
                                   "snapshot": plan.snapshot}))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._send_loop(link))
                tg.create_task(self._ack_loop(link))
        except* (ReplError, OSError, ConnectionError, TimeoutError) as eg:
            log.warning("replication link to %s closed: %s", node, reason(eg.exceptions[0]))
        finally:
            if self._links.get(node) is link:
                del self._links[node]
                self.core.disconnected(node)
                log.warning("slave %s is down", node)

    async def _send_loop(self, link: Link) -> None:
        core = self.core
        hb = self.node.config.heartbeat_interval
        while True:
            if core.followers[link.node].needs_snapshot:
                await self._send_snapshot(link)
                continue
            msg = core.next_append(link.node, self.node.now_ms())
            if msg is None:
                link.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(hb):
                        await link.wake.wait()
                continue
            link.stream.send(msg)
            await link.stream.drain()

    async def _ack_loop(self, link: Link) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.node.config.peer_timeout
        limits = self.node.config.limits
        async with asyncio.timeout(loop.time() + timeout) as deadline:
            async for payloads in link.stream.read_payloads():
                deadline.reschedule(loop.time() + timeout)
                for payload in payloads:
                    msg = codec.decode(payload, limits)
                    if not isinstance(msg, Ack):
                        raise ProtocolError(f"slave {link.node} sent {type(msg).__name__}")
                    self.core.on_ack(link.node, msg.epoch, msg.index, self.node.now_ms())
                self._release_majority()
                link.wake.set()
        raise NetworkError(f"slave {link.node} closed the connection")

    async def _send_snapshot(self, link: Link) -> None:
        path = self.node.store.snapshot_path
        with open(path, "rb") as f:  # an open file survives a newer snapshot's rename
            size = os.fstat(f.fileno()).st_size
            head = f.read(len(SNAPSHOT_MAGIC) + RECORD_HEADER.size)
            length, _ = RECORD_HEADER.unpack_from(head, len(SNAPSHOT_MAGIC))
            index = int(codec.unpack_obj(f.read(length))["index"])
            f.seek(0)
            log.info("sending snapshot at index %d (%d bytes) to %s", index, size, link.node)
            offset = 0
            while True:
                chunk = await asyncio.to_thread(f.read, self._chunk_size)
                done = offset + len(chunk) >= size
                link.stream.send(SnapshotChunk(self.core.epoch, index, offset, chunk, done))
                await link.stream.drain()
                offset += len(chunk)
                if done:
                    break
        self.core.snapshot_sent(link.node, index)

    # --- housekeeping ------------------------------------------------------------------------

    async def run(self) -> None:
        """Mark silent slaves down and fail majority writes when the quorum is gone."""
        while True:
            await asyncio.sleep(self.node.config.heartbeat_interval)
            now = self.node.now_ms()
            for node in self.core.expired(now):
                log.warning("slave %s silent for over %.1fs: marked down", node,
                            self.node.config.peer_timeout)
                link = self._links.get(node)
                if link is not None:
                    await link.stream.close()
            if self._majority and not self.core.has_quorum(now):
                self._fail_majority_waiters()

    def status(self) -> dict[str, Any]:
        now = self.node.now_ms()
        return {"commit_index": self.core.majority_index(),
                "quorum": self.core.has_quorum(now),
                "slaves": self.core.status(now)}


def not_master(rid: int, master: str) -> ErrorReply:
    return ErrorReply(rid, NotMaster.code, f"this node is a slave; writes go to {master}",
                      master)

