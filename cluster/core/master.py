"""The master's replication state: the log and the map, what each slave has, what to send it
next, how many nodes hold each write, and which client replies may go out (a write waits
for the copies its ``acks`` level needs, at most its timeout).

Every input is a method call that returns a :class:`~cluster.core.state.Ready`; the shell
persists, sends and replies what it says and calls :meth:`MasterCore.advance`. Time comes in
as milliseconds of a monotonic clock; nothing here blocks or does I/O.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any

from cluster.core.history import EpochHistory
from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.core.state import Ready, Replica, SnapshotMeta, snapshot_point
from cluster.errors import BadRequest, NoQuorum, RequestTimeout, StaleEpoch, StorageFailure
from cluster.types import Acks, Entry, NodeId, Op, Value
from cluster.wire.messages import Append, ErrorReply, Reply, Sync

NOT_APPLIED, UNKNOWN = "no", "unknown"  # a write error's ``applied``


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


DEFAULT_WRITE_TIMEOUT_MS = 5000
"""How long a write that needs slaves' copies waits for them when it names no
``timeout_ms`` (an ``async`` write waits for the master's own disk only, with no timeout)."""


@dataclass(slots=True, eq=False)
class Waiter:
    """A client write waiting for ``need`` copies (nodes holding its entry, this one
    included). A waiter answered early (timed out) stays in its queues marked ``done`` and
    is skipped when it comes up: no queue is searched."""

    index: int
    client: Any  # the shell's handle for the connection; opaque here
    rid: int
    need: int
    deadline: int | None  # ms of the monotonic clock; None: no timeout
    done: bool = False


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
        self.size = 1 + len(slaves)  # nodes in the cluster
        # replies waiting, each queue in index order: for the local fsync, then (when they
        # need more copies than this node's) one queue per number of copies needed
        self._local: deque[Waiter] = deque()
        self._copies: dict[int, deque[Waiter]] = {k: deque() for k in range(2, self.size + 1)}
        self._deadlines: list[tuple[int, int, Waiter]] = []  # heap of (deadline, seq, waiter)
        self._seq = itertools.count()

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def durable(self) -> int:
        return self._durable

    # --- writes ------------------------------------------------------------------------------

    def propose(self, client: Any, rid: int, op: Op, key: str, value: Value | None,
                acks: Acks, now_ms: int, wall_ms: int, timeout_ms: int | None = None) -> Ready:
        """A client write: the entry to persist, or the reply refusing it. The entry carries
        the wall clock (``wall_ms``) for lag reports; timeouts use ``now_ms``.

        The reply waits for the copies ``acks`` needs, at most ``timeout_ms`` (by default
        :data:`DEFAULT_WRITE_TIMEOUT_MS` when it needs slaves, none for ``async``). A level
        the cluster cannot meet at all (more slaves than it has) is refused with
        ``bad_request``, one it cannot meet now (too few nodes in contact) with
        ``no_quorum``; neither is applied."""
        need = acks.copies(self.size, self.majority)
        if need > self.size:
            return self._refuse(client, rid, BadRequest.code,
                                f"acks={acks} needs {need - 1} slaves, but the cluster has "
                                f"{self.size - 1}")
        if need > 1 and self.live(now_ms) < need:
            text = ("the master is not in contact with a majority of the cluster"
                    if acks == Acks.MAJORITY else
                    f"acks={acks} needs {need} nodes, but the master is in contact with "
                    f"{self.live(now_ms)} (itself included)")
            return self._refuse(client, rid, NoQuorum.code, text)
        if timeout_ms is None and need > 1:
            timeout_ms = DEFAULT_WRITE_TIMEOUT_MS
        entry = Entry(self.log.last_index + 1, self._epoch, wall_ms, op, key, value)
        w = Waiter(entry.index, client, rid, need,
                   None if timeout_ms is None else now_ms + timeout_ms)
        self._local.append(w)
        if w.deadline is not None:
            heap = self._deadlines
            if len(heap) > 1024 and len(heap) > 2 * self._waiting():
                # answered writes linger in the heap until their deadline: drop them
                heap[:] = [item for item in heap if not item[2].done]
                heapq.heapify(heap)
            heapq.heappush(heap, (w.deadline, next(self._seq), w))
        return Ready(entries=[entry])

    def _waiting(self) -> int:
        return len(self._local) + sum(len(q) for q in self._copies.values())

    @staticmethod
    def _refuse(client: Any, rid: int, code: str, text: str) -> Ready:
        return Ready(replies=[(client, ErrorReply(rid, code, text, applied=NOT_APPLIED))])

    def advance(self, ready: Ready, snapshot_data: KV | None = None) -> Ready:
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
            w.done = True  # its deadline, if any, is now moot
            out.replies.append((w.client, ErrorReply(w.rid, exc.code, str(exc),
                                                     applied=NOT_APPLIED)))
        return out

    def persisted(self, index: int) -> Ready:
        """Entries up to ``index`` are durable here: release the replies that waited for it."""
        out = Ready()
        if index <= self._durable:
            return out
        self._durable = index
        local = self._local
        held: list[int] | None = None
        while local and local[0].index <= index:
            w = local.popleft()
            if w.done:
                continue
            if w.need == 1:
                held = held or self._held()
                out.replies.append((w.client, self._ok(w, held)))
            else:
                self._copies[w.need].append(w)
        self._release(out)
        return out

    def _held(self) -> list[int]:
        """The highest durable index of every node, highest first: entry ``i`` is on
        ``k`` nodes when ``held[k - 1] >= i``."""
        return sorted([self._durable, *(f.acked for f in self.followers.values())],
                      reverse=True)

    def _ok(self, w: Waiter, held: list[int]) -> Reply:
        w.done = True
        return Reply(w.rid, {"index": w.index, "epoch": self._epoch,
                             "copies": _copies(held, w.index)})

    def _release(self, out: Ready) -> None:
        """Release, queue by queue and in index order, the writes with their copies."""
        held: list[int] | None = None
        for need, queue in self._copies.items():
            if not queue:
                continue
            held = held or self._held()
            done = held[need - 1]
            while queue and (queue[0].done or queue[0].index <= done):
                w = queue.popleft()
                if not w.done:
                    out.replies.append((w.client, self._ok(w, held)))

    def _unknown(self, w: Waiter, code: str, text: str) -> ErrorReply:
        """The error for a write whose entry exists here but whose level was not met."""
        w.done = True
        return ErrorReply(w.rid, code, text, applied=UNKNOWN, index=w.index, epoch=self._epoch)

    def _expire(self, now_ms: int, out: Ready) -> None:
        """Writes past their deadline get ``timeout``: they may still take effect."""
        heap = self._deadlines
        held: list[int] | None = None
        while heap and heap[0][0] <= now_ms:
            _, _, w = heapq.heappop(heap)
            if w.done:
                continue
            held = held or self._held()
            copies = _copies(held, w.index)
            out.replies.append((w.client, self._unknown(
                w, RequestTimeout.code,
                f"entry {w.index} was on {copies} of the {w.need} nodes it waits for when its "
                "time ran out; it may still be applied")))

    def _fail_unmet(self, now_ms: int, out: Ready) -> None:
        """Writes waiting for more nodes than are in contact fail at once (they may still
        take effect, should the nodes come back)."""
        live = self.live(now_ms)
        unmet: list[Waiter] = []
        for need, queue in self._copies.items():
            if need > live:
                unmet.extend(w for w in queue if not w.done)
                queue.clear()
        for w in sorted(unmet, key=lambda w: w.index):
            text = (f"entry {w.index} is durable on the master but a majority could not be "
                    "confirmed; it may or may not survive a failover"
                    if w.need == self.majority else
                    f"entry {w.index} is durable on the master but {w.need} nodes could not "
                    f"be confirmed ({live} in contact); it may still be applied")
            out.replies.append((w.client, self._unknown(w, NoQuorum.code, text)))

    def close(self, why: ErrorReply) -> Ready:
        """The role ends: every waiting writer gets ``why`` (with its own request id), in
        index order."""
        out = Ready()
        waiting = sorted((w for q in (self._local, *self._copies.values()) for w in q
                          if not w.done), key=lambda w: w.index)
        for w in waiting:
            w.done = True
            out.replies.append((w.client, ErrorReply(
                w.rid, why.code, why.message, why.master, applied=UNKNOWN, index=w.index,
                epoch=self._epoch)))
        self._local.clear()
        for q in self._copies.values():
            q.clear()
        self._deadlines.clear()
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
        self._release(out)
        return out

    def disconnected(self, node: NodeId) -> None:
        self.followers[node].up = False

    def tick(self, now_ms: int) -> Ready:
        """Slaves silent past the timeout are marked down (their links closed); writes past
        their deadline time out; writes waiting for more nodes than are in contact fail."""
        out = Ready()
        for f in self.followers.values():
            if f.up and now_ms - f.last_contact > self.peer_timeout_ms:
                f.up = False
                out.close.append(f.node)
        self._expire(now_ms, out)
        self._fail_unmet(now_ms, out)
        return out

    # --- majority ----------------------------------------------------------------------------

    def majority_index(self) -> int:
        """The highest index durably stored on a majority of the cluster, this node included."""
        return self._held()[self.majority - 1]

    def live(self, now_ms: int) -> int:
        """The nodes (this one included) in contact within the timeout."""
        return 1 + sum(1 for f in self.followers.values()
                       if f.up and now_ms - f.last_contact <= self.peer_timeout_ms)

    def has_quorum(self, now_ms: int) -> bool:
        """Whether a majority (this node included) has been in contact within the timeout."""
        return self.live(now_ms) >= self.majority

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

    def snapshot_point(self) -> tuple[SnapshotMeta, KV]:
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


def _copies(held: list[int], index: int) -> int:
    """How many nodes hold entry ``index`` (``held`` as :meth:`MasterCore._held` gives it)."""
    return sum(1 for h in held if h >= index)
