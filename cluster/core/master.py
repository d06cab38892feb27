"""The master's replication state: what each slave has, what to send it next, and which
writes a majority holds. Time comes in as milliseconds; nothing here blocks or does I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.core.history import EpochHistory
from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.errors import StaleEpoch
from cluster.types import Entry, NodeId, Op, Value
from cluster.wire.messages import Append, Sync


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


class MasterCore:
    def __init__(self, node_id: NodeId, slaves: list[NodeId], epoch: int, log: Log, kv: KV,
                 *, majority: int, peer_timeout_ms: int, heartbeat_ms: int,
                 batch_entries: int, window_entries: int,
                 batch_bytes: int = 4 * 1024 * 1024) -> None:
        self.node_id = node_id
        self.epoch = epoch
        self.log = log
        self.kv = kv
        self.durable = log.last_index  # highest index on stable storage here
        self.majority = majority
        self.peer_timeout_ms = peer_timeout_ms
        self.heartbeat_ms = heartbeat_ms
        self.batch_entries = batch_entries
        self.window_entries = window_entries
        self.batch_bytes = batch_bytes  # an append frame stays under this (one entry at least)
        self.followers = {n: Follower(n) for n in slaves}

    # --- writes ------------------------------------------------------------------------------

    def next_entry(self, op: Op, key: str, value: Value | None, now_ms: int) -> Entry:
        """The entry a write would become; nothing changes until :meth:`accept`."""
        return Entry(self.log.last_index + 1, self.epoch, now_ms, op, key, value)

    def accept(self, entry: Entry) -> None:
        """The entry is in the write-ahead log (maybe not yet synced): append and apply it."""
        self.log.append(entry)
        self.kv.apply(entry)

    def persisted(self, index: int) -> None:
        self.durable = max(self.durable, index)

    # --- slaves ------------------------------------------------------------------------------

    def on_sync(self, msg: Sync, now_ms: int) -> SyncPlan:
        node = NodeId(msg.node)
        f = self.followers.get(node)
        if f is None:
            raise KeyError(f"node {msg.node!r} is not a slave in this cluster")
        if msg.epoch > self.epoch:
            raise StaleEpoch(f"slave {node} is at epoch {msg.epoch}, master at {self.epoch}")
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
        count = min(self.batch_entries, room, self.durable - f.next_index + 1)
        if count <= 0 and now_ms - f.last_sent < self.heartbeat_ms:
            return None
        entries = self._fit(self.log.slice(f.next_index, count)) if count > 0 else []
        prev = f.next_index - 1
        msg = Append(self.epoch, prev, self.log.epoch_at(prev), tuple(entries), self.durable)
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

    def on_ack(self, node: NodeId, epoch: int, index: int, now_ms: int) -> None:
        f = self.followers[node]
        if epoch > self.epoch:
            raise StaleEpoch(f"slave {node} acknowledged at epoch {epoch} > {self.epoch}")
        f.last_contact = now_ms
        f.up = True
        if index > f.acked:
            f.acked = min(index, self.log.last_index)

    def disconnected(self, node: NodeId) -> None:
        f = self.followers[node]
        f.up = False

    def expired(self, now_ms: int) -> list[NodeId]:
        """Slaves that have been silent past the timeout; they are marked down."""
        out = []
        for f in self.followers.values():
            if f.up and now_ms - f.last_contact > self.peer_timeout_ms:
                f.up = False
                out.append(f.node)
        return out

    # --- majority ----------------------------------------------------------------------------

    def majority_index(self) -> int:
        """The highest index durably stored on a majority of the cluster, this node included."""
        indexes = sorted([self.durable, *(f.acked for f in self.followers.values())],
                         reverse=True)
        return indexes[self.majority - 1]

    def has_quorum(self, now_ms: int) -> bool:
        """Whether a majority (this node included) has been in contact within the timeout."""
        live = 1 + sum(1 for f in self.followers.values()
                       if f.up and now_ms - f.last_contact <= self.peer_timeout_ms)
        return live >= self.majority

    # --- status ------------------------------------------------------------------------------

    def lag_ms(self, f: Follower, now_ms: int) -> int:
        """How long the oldest entry the slave lacks has been waiting."""
        if f.acked >= self.log.last_index:
            return 0
        first_missing = f.acked + 1
        if not self.log.has(first_missing):
            first_missing = self.log.base + 1
        return max(0, now_ms - self.log.get(first_missing).ts)

    def status(self, now_ms: int) -> list[dict[str, Any]]:
        return [
            {
                "id": f.node,
                "up": f.up,
                "acked": f.acked,
                "lag_entries": self.log.last_index - f.acked,
                "lag_ms": self.lag_ms(f, now_ms),
                "last_contact_ms": now_ms - f.last_contact if f.last_contact else None,
            }
            for f in self.followers.values()
        ]
