"""The slave's side of replication: one link to the master, as a state machine, and every
decision about the local log (what to persist, what to cut, when to acknowledge).

Like :mod:`cluster.core.master`, every input returns a :class:`~cluster.core.state.Ready`
that the shell carries out before calling :meth:`SlaveCore.advance`.
"""

from __future__ import annotations

import enum

from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.core.state import (
    NO_SNAPSHOT,
    Ready,
    Recovered,
    Replica,
    SnapshotMeta,
    Truncate,
    rebuild_kv,
    snapshot_point,
)
from cluster.errors import LocalProtocolError, RemoteProtocolError, StaleEpoch
from cluster.types import Entry, NodeId
from cluster.wire.messages import Ack, Append, Sync


class LinkState(enum.Enum):
    IDLE = "idle"  # no connection to the master
    SYNCING = "syncing"  # connected, the sync request sent, waiting for the master's answer
    SNAPSHOT = "snapshot"  # receiving the master's snapshot
    STREAMING = "streaming"  # in sync: the log is a prefix of the master's; appends flow


class LinkEvent(enum.Enum):
    CONNECT = "connect"  # local: a connection is open and the sync request goes out
    REPLY = "reply"  # remote: the master's answer, entries follow
    REPLY_SNAPSHOT = "reply_snapshot"  # remote: the master's answer, a snapshot follows
    RESYNC = "resync"  # local: the local state was wiped; a new handshake is needed
    APPEND = "append"  # remote: entries or a heartbeat
    CHUNK = "chunk"  # remote: part of a snapshot
    INSTALLED = "installed"  # local: the snapshot is installed
    CLOSE = "close"  # either side: the connection is gone


_S, _E = LinkState, LinkEvent
# Every legal transition; anything else is a protocol error (remote events) or a bug (local).
TRANSITIONS: dict[tuple[LinkState, LinkEvent], LinkState] = {
    (_S.IDLE, _E.CONNECT): _S.SYNCING,
    (_S.SYNCING, _E.REPLY): _S.STREAMING,
    (_S.SYNCING, _E.REPLY_SNAPSHOT): _S.SNAPSHOT,
    (_S.SYNCING, _E.RESYNC): _S.IDLE,
    (_S.SNAPSHOT, _E.CHUNK): _S.SNAPSHOT,
    (_S.SNAPSHOT, _E.INSTALLED): _S.STREAMING,
    (_S.STREAMING, _E.APPEND): _S.STREAMING,
    (_S.STREAMING, _E.CHUNK): _S.SNAPSHOT,  # fell behind a compaction mid-stream
    **{(s, _E.CLOSE): _S.IDLE for s in LinkState},
}
_REMOTE = {_E.REPLY, _E.REPLY_SNAPSHOT, _E.APPEND, _E.CHUNK}


class SlaveCore:
    def __init__(self, node_id: NodeId, replica: Replica) -> None:
        self.node_id = node_id
        self.log: Log = replica.log
        self.kv: KV = replica.kv
        self._epoch = replica.epoch  # the highest master epoch seen, persisted
        self._durable = replica.durable
        self.snapshot_index = replica.snapshot_index
        self.state = LinkState.IDLE
        self.master_commit = 0  # the master's durable index as last heard, for lag
        self.syncs = 0  # handshakes completed, for status and tests
        self.last_sync_from = -1  # the last index this node had when it last asked
        self.progressed = False  # this link stored entries, installed or caught up

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def durable(self) -> int:
        return self._durable

    @property
    def in_sync(self) -> bool:
        """The log is a prefix of the current master's (the handshake is done)."""
        return self.state is LinkState.STREAMING

    def load(self, rec: Recovered) -> None:
        """All state is now ``rec`` (at start, or after installing a snapshot); everything
        in it is on stable storage."""
        r = Replica.recovered(rec)
        self.log, self.kv = r.log, r.kv
        self._epoch = max(self._epoch, r.epoch)
        self.snapshot_index = r.snapshot_index
        self._durable = r.durable

    def snapshot_point(self) -> tuple[SnapshotMeta, KV]:
        return snapshot_point(self.log, self.kv)

    def handover(self) -> Replica:
        return Replica(self.log, self.kv, self._epoch, self.snapshot_index, self._durable)

    def _step(self, event: LinkEvent) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            cls = RemoteProtocolError if event in _REMOTE else LocalProtocolError
            raise cls(f"replication link: {event.value} is not valid while {self.state.value}")
        self.state = new

    def _adopt(self, epoch: int, out: Ready) -> None:
        """Refuse an older master; a newer epoch is persisted before anything else."""
        if epoch < self._epoch:
            raise StaleEpoch(f"message from epoch {epoch}, this node has seen {self._epoch}")
        if epoch > self._epoch:
            self._epoch = epoch
            out.epoch = epoch

    # --- the handshake -----------------------------------------------------------------------

    def connect(self, request_id: int) -> Sync:
        self._step(LinkEvent.CONNECT)
        self.progressed = False
        self.last_sync_from = self.log.last_index
        return Sync(request_id, self.node_id, self._epoch, self.log.last_index,
                    self.log.history.pairs())

    def on_sync_reply(self, epoch: int, match: int, snapshot: bool) -> Ready:
        """The master's answer: keep the log up to ``match``, cut the rest. When the cut
        reaches below the local snapshot the local state is discarded and a new handshake
        follows (``resync``)."""
        out = Ready()
        self._adopt(epoch, out)
        last = self.log.last_index
        if match < last:
            # nothing changes here before the shell has made the cut durable (advance)
            if match < self.snapshot_index:
                out.wipe = True
                out.truncate = Truncate(0, tuple(self._entries_after(self.log.base)))
                out.resync = True
                self._step(LinkEvent.RESYNC)
                return out
            out.truncate = Truncate(match, tuple(self._entries_after(match)))
        self._step(LinkEvent.REPLY_SNAPSHOT if snapshot else LinkEvent.REPLY)
        self.syncs += 1
        if not snapshot and out.truncate is None:
            out.messages.append(self.ack())
        return out

    def _entries_after(self, index: int) -> list[Entry]:
        """The entries a cut after ``index`` removes (all in memory: ``index >= base``)."""
        return self.log.slice(index + 1, self.log.last_index - index)

    # --- the stream --------------------------------------------------------------------------

    def on_append(self, msg: Append) -> Ready:
        """Validate an append: its entries are to be persisted, then :meth:`advance`."""
        self._step(LinkEvent.APPEND)
        out = Ready()
        self._adopt(msg.epoch, out)
        last = self.log.last_index
        if msg.prev_index != last or msg.prev_epoch != self.log.epoch_at(last):
            raise RemoteProtocolError(
                f"append after {msg.prev_index}/{msg.prev_epoch} does not continue the log "
                f"at {last}/{self.log.epoch_at(last)}"
            )
        self.master_commit = max(self.master_commit, msg.commit)
        for i, e in enumerate(msg.entries):
            if e.index != last + 1 + i or e.epoch > msg.epoch:
                raise RemoteProtocolError(f"append carries entry {e.index}/{e.epoch} "
                                          "out of order")
        if msg.entries:
            out.entries = list(msg.entries)
        else:
            if self._durable >= self.master_commit:
                self.progressed = True  # caught up: a healthy, idle link
            out.messages.append(self.ack())
        return out

    def on_chunk(self, epoch: int, done: bool) -> Ready:
        """Part of the master's snapshot arrived (the shell writes it to a file)."""
        self._step(LinkEvent.CHUNK)
        out = Ready()
        self._adopt(epoch, out)
        if not done:
            out.messages.append(self.ack())  # keeps the master's side of the link alive
        return out

    def snapshot_installed(self, expected_index: int, rec: Recovered) -> Ready:
        """The snapshot is in place as the node's whole state."""
        if rec.snapshot.index != expected_index:
            raise RemoteProtocolError(f"snapshot claims index {expected_index} but holds "
                                      f"{rec.snapshot.index}")
        self._step(LinkEvent.INSTALLED)
        self.load(rec)
        self.progressed = True
        return Ready(messages=[self.ack()])

    def advance(self, ready: Ready, snapshot_data: KV | None = None) -> Ready:
        """The shell carried out ``ready``: apply the persisted entries; after a cut, the map
        is rebuilt from the snapshot's ``snapshot_data`` and the cut log is durable."""
        out = Ready()
        if ready.wipe:
            self.load(Recovered(self._epoch, NO_SNAPSHOT, KV(), []))
        elif ready.truncate is not None:
            assert snapshot_data is not None, "a cut log needs the snapshot to rebuild the map"
            self.log.truncate_after(ready.truncate.index)
            self.kv = rebuild_kv(self.log, self.snapshot_index, snapshot_data)
            self._durable = self.log.last_index
            if self.state is LinkState.STREAMING:
                out.messages.append(self.ack())
        for e in ready.entries:
            self.log.append(e)
            self.kv.apply(e)
        if ready.entries:
            self.progressed = True
        return out

    def persisted(self, index: int) -> Ready:
        """Entries up to ``index`` are durable: acknowledge them."""
        self._durable = max(self._durable, min(index, self.log.last_index))
        if self.state in (LinkState.STREAMING, LinkState.SNAPSHOT):
            return Ready(messages=[self.ack()])
        return Ready()

    def disconnected(self) -> None:
        self._step(LinkEvent.CLOSE)

    def ack(self) -> Ack:
        return Ack(self._epoch, min(self._durable, self.kv.applied))

    # --- snapshots ---------------------------------------------------------------------------

    def compacted(self, snapshot_index: int, drop_through: int) -> None:
        """A local snapshot at ``snapshot_index`` is durable; entries up to ``drop_through``
        may leave memory."""
        self.snapshot_index = snapshot_index
        self.log.compact_to(drop_through)
