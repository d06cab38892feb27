"""The master's replication state: the log and the map, what each slave has, what to send it
next, which writes a majority holds, and which client replies may go out.

Every input is a method call that returns a :class:`~cluster.core.state.Ready`; the shell
persists, sends and replies what it says and calls :meth:`MasterCore.advance`. Time comes in
as milliseconds of a monotonic clock; nothing here blocks or does I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from cluster.core.history import EpochHistory
from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.core.state import Ready, Replica, SnapshotMeta, snapshot_point
from cluster.errors import NoQuorum, StaleEpoch, StorageFailure
from cluster.types import Acks, Entry, NodeId, Op, Value
from cluster.wire.messages import Append, ErrorReply, Reply, Sync


@dataclass(slots=True)
class Follower:
    node: NodeId
    up: bool = False
    acked: int = 0  # highest index the slave has durably stored and applied
    next_index: int = 1  # next index to send on the current link
    last_contact: int = 0  # ms
    last_sent: int = 0  # ms, for heartbeats
    needs_snapshot: bool = False


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """The master's answer to a slave's :class:`Sync`."""

    match: int  # the slave keeps its entries up to here and drops the rest
    snapshot: bool  # the entries after ``match`` were compacted: send the snapshot first


@dataclass(frozen=True, slots=True)
class Waiter:
    """A client write waiting for its acknowledgement level."""

    index: int
    client: Any  # the shell's handle for the connection; opaque here
    rid: int
    acks: Acks


class MasterCore:
    def __init__(self, node_id: NodeId, slaves: list[NodeId], replica: Replica, *,
                 majority: int, peer_timeout_ms: int, heartbeat_ms: int,
                 batch_entries: int, window_entries: int,
                 batch_bytes: int = 4 * 1024 * 1024) -> None:
        """``replica.epoch`` must already be this master's own epoch, persisted."""
        self.node_id = node_id
        self._epoch = replica.epoch
        self.log: Log = replica.log
        self.kv: KV = replica.kv
        self.snapshot_index = replica.snapshot_index
        self._durable = replica.durable  # the highest index on stable storage here
        self.majority = majority
        self.peer_timeout_ms = peer_timeout_ms
        self.heartbeat_ms = heartbeat_ms
        self.batch_entries = batch_entries
        self.window_entries = window_entries
        self.batch_bytes = batch_bytes  # an append frame stays under this (one entry at least)
        self.followers = {n: Follower(n) for n in slaves}
        # replies waiting, in index order: for the local fsync, then (acks=majority) for a
        # majority of the cluster
        self._local: deque[Waiter] = deque()
        self._majority: deque[Waiter] = deque()

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def durable(self) -> int:
        return self._durable

    # --- writes ------------------------------------------------------------------------------

    def propose(self, client: Any, rid: int, op: Op, key: str, value: Value | None,
                acks: Acks, now_ms: int, wall_ms: int) -> Ready:
        """A client write: the entry to persist, or the reply refusing it. The entry carries
        the wall clock (``wall_ms``) for lag reports; timeouts use ``now_ms``."""
        if acks is Acks.MAJORITY and not self.has_quorum(now_ms):
            return Ready(replies=[(client, ErrorReply(
                rid, NoQuorum.code,
                "the master is not in contact with a majority of the cluster"))])
        entry = Entry(self.log.last_index + 1, self._epoch, wall_ms, op, key, value)
        self._local.append(Waiter(entry.index, client, rid, acks))
        return Ready(entries=[entry])

    def advance(self, ready: Ready, snapshot_data: dict[str, Value] | None = None) -> Ready:
        """The shell wrote ``ready.entries`` to the log (not yet synced): apply them."""
        for e in ready.entries:
            self.log.append(e)
            self.kv.apply(e)
        return Ready()

    def failed(self, ready: Ready, exc: StorageFailure) -> Ready:
        """Writing ``ready.entries`` failed and nothing was stored: their writers get the
        error."""
        out = Ready()
        for e in reversed(ready.entries):
            w = self._local.pop()  # each proposal is carried out before the next is made
            assert w.index == e.index
            out.replies.append((w.client, ErrorReply(w.rid, exc.code, str(exc))))
        return out

    def persisted(self, index: int) -> Ready:
        """Entries up to ``index`` are durable here: release the replies that waited for it."""
        out = Ready()
        if index <= self._durable:
            return out
        self._durable = index
        local = self._local
        while local and local[0].index <= index:
            w = local.popleft()
            if w.acks is Acks.ASYNC:
                out.replies.append((w.client, self._ok(w)))
            else:
                self._majority.append(w)
        self._release_majority(out)
        return out

    def _ok(self, w: Waiter) -> Reply:
        return Reply(w.rid, {"index": w.index, "epoch": self.log.epoch_at(w.index)})

    def _release_majority(self, out: Ready) -> None:
        if not self._majority:
            return
        done = self.majority_index()
        while self._majority and self._majority[0].index <= done:
            w = self._majority.popleft()
            out.replies.append((w.client, self._ok(w)))

    def _fail_majority(self, out: Ready) -> None:
        while self._majority:
            w = self._majority.popleft()
            out.replies.append((w.client, ErrorReply(
                w.rid, NoQuorum.code,
                f"entry {w.index} is durable on the master but a majority could not be "
                "confirmed; it may or may not survive a failover")))

    def close(self, why: ErrorReply) -> Ready:
        """The role ends: every waiting writer gets ``why`` (with its own request id)."""
        out = Ready()
        for w in [*self._majority, *self._local]:
            out.replies.append((w.client, ErrorReply(w.rid, why.code, why.message, why.master)))
        self._majority.clear()
        self._local.clear()
        return out

    # --- slaves ------------------------------------------------------------------------------

    def on_sync(self, msg: Sync, now_ms: int) -> SyncPlan:
        node = NodeId(msg.node)
        f = self.followers.get(node)
        if f is None:
            raise KeyError(f"node {msg.node!r} is not a slave in this cluster")
        if msg.epoch > self._epoch:
            raise StaleEpoch(f"slave {node} is at epoch {msg.epoch}, master at {self._epoch}")
        match = self.log.history.match(self.log.last_index, EpochHistory(msg.epochs),
                                       msg.last_index)
        snapshot = not self.log.has(match + 1) and match < self.log.last_index
        f.up = True
        f.last_contact = now_ms
        # only what the slave acknowledges from now on counts: its log may hold entries it
        # wrote but has not yet made durable
        f.acked = 0 if snapshot else min(f.acked, match)
        f.next_index = match + 1
        f.needs_snapshot = snapshot
        return SyncPlan(match, snapshot)

    def snapshot_sent(self, node: NodeId, index: int) -> None:
        f = self.followers[node]
        f.needs_snapshot = False
        f.next_index = index + 1

    def next_append(self, node: NodeId, now_ms: int) -> Append | None:
        """The next frame for ``node``: entries within its window, or a due heartbeat."""
        f = self.followers[node]
        if not f.up or f.needs_snapshot:
            return None
        if f.next_index <= self.log.base:
            f.needs_snapshot = True
            return None
        room = self.window_entries - (f.next_index - 1 - f.acked)
        count = min(self.batch_entries, room, self._durable - f.next_index + 1)
        if count <= 0 and now_ms - f.last_sent < self.heartbeat_ms:
            return None
        entries = self._fit(self.log.slice(f.next_index, count)) if count > 0 else []
        prev = f.next_index - 1
        msg = Append(self._epoch, prev, self.log.epoch_at(prev), tuple(entries),
                     self._durable)
        f.next_index += len(entries)
        f.last_sent = now_ms
        return msg

    def _fit(self, entries: list[Entry]) -> list[Entry]:
        """The longest prefix of ``entries`` within the byte budget (at least one entry)."""
        total = 0
        for n, e in enumerate(entries):
            total += e.size()
            if total > self.batch_bytes and n > 0:
                return entries[:n]
        return entries

    def on_ack(self, node: NodeId, epoch: int, index: int, now_ms: int) -> Ready:
        f = self.followers[node]
        if epoch > self._epoch:
            raise StaleEpoch(f"slave {node} acknowledged at epoch {epoch} > {self._epoch}")
        f.last_contact = now_ms
        f.up = True
        if index > f.acked:
            f.acked = min(index, self.log.last_index)
        out = Ready()
        self._release_majority(out)
        return out

    def disconnected(self, node: NodeId) -> None:
        self.followers[node].up = False

    def tick(self, now_ms: int) -> Ready:
        """Slaves silent past the timeout are marked down (their links closed); majority
        writes fail while no majority is in contact."""
        out = Ready()
        for f in self.followers.values():
            if f.up and now_ms - f.last_contact > self.peer_timeout_ms:
                f.up = False
                out.close.append(f.node)
        if self._majority and not self.has_quorum(now_ms):
            self._fail_majority(out)
        return out

    # --- majority ----------------------------------------------------------------------------

    def majority_index(self) -> int:
        """The highest index durably stored on a majority of the cluster, this node included."""
        indexes = sorted([self._durable, *(f.acked for f in self.followers.values())],
                         reverse=True)
        return indexes[self.majority - 1]

    def has_quorum(self, now_ms: int) -> bool:
        """Whether a majority (this node included) has been in contact within the timeout."""
        live = 1 + sum(1 for f in self.followers.values()
                       if f.up and now_ms - f.last_contact <= self.peer_timeout_ms)
        return live >= self.majority

    def confirm_strong(self, now_ms: int) -> None:
        """A strong read is served only while a majority is in contact (a lease of one peer
        timeout)."""
        if not self.has_quorum(now_ms):
            raise NoQuorum("the master is not in contact with a majority; strong reads are off")

    # --- snapshots ---------------------------------------------------------------------------

    def compacted(self, snapshot_index: int, drop_through: int) -> None:
        """A local snapshot at ``snapshot_index`` is durable; entries up to ``drop_through``
        may leave memory."""
        self.snapshot_index = snapshot_index
        self.log.compact_to(drop_through)

    def snapshot_point(self) -> tuple[SnapshotMeta, dict[str, Value]]:
        return snapshot_point(self.log, self.kv)

    def handover(self) -> Replica:
        return Replica(self.log, self.kv, self._epoch, self.snapshot_index, self._durable)

    # --- status ------------------------------------------------------------------------------

    def lag_ms(self, f: Follower, now_ms: int, wall_ms: int) -> int:
        """How long the oldest entry the slave lacks has been waiting (entries carry wall
        clock times)."""
        if f.acked >= self.log.last_index:
            return 0
        first_missing = f.acked + 1
        if not self.log.has(first_missing):
            first_missing = self.log.base + 1
        return max(0, wall_ms - self.log.get(first_missing).ts)

    def status(self, now_ms: int, wall_ms: int) -> dict[str, Any]:
        return {
            "majority_index": self.majority_index(),
            "quorum": self.has_quorum(now_ms),
            "slaves": [
                {
                    "id": f.node,
                    "up": f.up,
                    "acked": f.acked,
                    "lag_entries": self.log.last_index - f.acked,
                    "lag_ms": self.lag_ms(f, now_ms, wall_ms),
                    "last_contact_ms": now_ms - f.last_contact if f.last_contact else None,
                }
                for f in self.followers.values()
            ],
        }
