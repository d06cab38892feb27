"""The master role: accept writes, stream the log to each slave, release replies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cluster.core.master import MasterCore
from cluster.core.state import Ready, Replica, check_read
from cluster.errors import (
    BadRequest,
    NetworkError,
    RemoteProtocolError,
    ReplError,
    ShuttingDown,
    StaleEpoch,
    StorageFailure,
    reason,
)
from cluster.net.stream import FramedStream
from cluster.types import Consistency, NodeId, Op
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

    def __init__(self, node: Node, replica: Replica) -> None:
        self.node = node
        cfg = node.config
        self.core = MasterCore(
            cfg.node_id, [n for n in cfg.cluster if n != cfg.node_id], replica,
            majority=cfg.majority,
            peer_timeout_ms=int(cfg.peer_timeout * 1000),
            heartbeat_ms=int(cfg.heartbeat_interval * 1000),
            batch_entries=cfg.batch_entries, window_entries=cfg.window_entries,
            batch_bytes=cfg.limits.max_frame // 2,
        )
        self._links: dict[NodeId, Link] = {}
        self._closing = False  # aclose() began: no new writes or slaves
        self._chunk_size = min(1024 * 1024, cfg.limits.max_frame // 2)

    def master_hint(self) -> str:
        return self.node.config.node_id

    def _deliver(self, ready: Ready) -> None:
        """Send the replies a core released (after it persisted what they depend on)."""
        for client, reply in ready.replies:
            client.send(reply)

    # --- client writes -----------------------------------------------------------------------

    def write(self, msg: Set | Delete, client: FramedStream) -> ErrorReply | None:
        """Append and apply now; the reply goes out once the acks level is met."""
        if self._closing:
            return ErrorReply(msg.id, ShuttingDown.code,
                              "the master is stepping down; the write was not applied",
                              applied="no")
        value = msg.value if isinstance(msg, Set) else None
        op = Op.SET if isinstance(msg, Set) else Op.DELETE
        ready = self.core.propose(client, msg.id, op, msg.key, value, msg.acks,
                                  self.node.now_ms(), self.node.wall_ms(), msg.timeout_ms)
        try:
            ready = self.node.carry_out(self.core, ready)
        except StorageFailure as exc:
            log.error("write %d failed: %s", ready.entries[0].index, reason(exc))
            ready = self.core.failed(ready, exc)
        self._deliver(ready)
        return None

    def on_durable(self, index: int) -> None:
        self._deliver(self.core.persisted(index))
        for link in self._links.values():
            link.wake.set()
        self.node.maybe_snapshot(self.core.kv.applied)

    # --- reads -------------------------------------------------------------------------------

    def check_read(self, consistency: Consistency, min_epoch: int, min_index: int) -> None:
        """A strong read is served only while a majority is in contact (a lease of one peer
        timeout); a read token only when this log holds the write it names."""
        core = self.core
        if consistency is Consistency.STRONG:
            core.confirm_strong(self.node.now_ms())
        check_read(self.node.config.node_id, core.log, core.kv, min_epoch, min_index)

    # --- replication -------------------------------------------------------------------------

    async def replicate(self, stream: FramedStream, msg: Sync) -> None:
        """Serve one slave's replication connection until it closes or goes silent."""
        if self._closing:
            stream.send(ErrorReply(msg.id, ShuttingDown.code, "the master is stepping down"))
            return
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
        link = Link(node, stream)
        self._links[node] = link  # first: the old link's end must not mark the slave down
        if old is not None:
            await old.stream.close()
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
                        raise RemoteProtocolError(f"slave {link.node} sent {type(msg).__name__}")
                    self._deliver(self.core.on_ack(link.node, msg.epoch, msg.index,
                                                   self.node.now_ms()))
                link.wake.set()
        raise NetworkError(f"slave {link.node} closed the connection")

    async def _send_snapshot(self, link: Link) -> None:
        f, index, size = self.node.store.open_snapshot()
        with f:
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
        """Mark silent slaves down, time writes out, and fail the writes waiting for more
        nodes than are in contact."""
        while True:
            await asyncio.sleep(self.node.config.heartbeat_interval)
            ready = self.core.tick(self.node.now_ms())
            for node in ready.close:
                log.warning("slave %s silent for over %.1fs: marked down", node,
                            self.node.config.peer_timeout)
                link = self._links.get(NodeId(node))
                if link is not None:
                    await link.stream.close()
            self._deliver(ready)

    async def aclose(self) -> None:
        """The role is over: take no more writes or slaves, close the replication links,
        then fail every waiting writer (nothing can be proposed after that)."""
        self._closing = True
        for link in list(self._links.values()):
            await link.stream.close()
        self._deliver(self.core.close(ErrorReply(
            0, ShuttingDown.code,
            "the master stepped down or is shutting down before the write was confirmed; "
            "it may or may not have been applied")))

    def status(self) -> dict[str, Any]:
        return self.core.status(self.node.now_ms(), self.node.wall_ms())



