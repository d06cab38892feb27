"""What a core hands its shell, and what the shell hands back.

A core (:class:`~cluster.core.master.MasterCore`, :class:`~cluster.core.slave.SlaveCore`)
takes every input and returns one :class:`Ready`: what to persist, what to cut, what to send,
which client replies to release. The shell carries it out in that order (persist before
sending, so nothing is acknowledged that is not stored) and then calls the core's
``advance``. Storage hands a node its state as a :class:`Recovered`, which :func:`restore`
turns into the core's log and map; the cores are the only owners of both.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from cluster.core.history import EpochHistory
from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.errors import Behind, WriteLost
from cluster.types import Entry
from cluster.wire.messages import ErrorReply, Message, Reply


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int  # the last log index included
    epoch: int  # the epoch of that entry
    epochs: tuple[tuple[int, int], ...]  # epoch history up to ``index``


NO_SNAPSHOT = SnapshotMeta(0, 0, ())


@dataclass(frozen=True, slots=True)
class Recovered:
    """A node's stored state: the highest epoch seen, the newest snapshot and the log.

    ``entries`` may begin before the snapshot's index (the log keeps the entries between
    the last two snapshots, so a slave a little behind needs no snapshot)."""

    epoch: int
    snapshot: SnapshotMeta
    data: KV  # the snapshot's map, at ``snapshot.index`` (not to be changed: restore copies)
    entries: list[Entry]
    vote: str | None = None  # whom this node voted for in ``epoch`` (None: nobody)


def restore(rec: Recovered) -> tuple[Log, KV]:
    """The log and the map a node holds after recovering ``rec``."""
    snap = rec.snapshot
    history = EpochHistory(snap.epochs)
    base = rec.entries[0].index - 1 if rec.entries else snap.index
    base_epoch = snap.epoch
    if base < snap.index:
        history.truncate_after(base)
        base_epoch = history.epoch_at(base)
    log = Log(base, base_epoch, history)
    assert rec.data.applied == snap.index, "a snapshot's map is at the snapshot's index"
    kv = rec.data.copy()
    for e in rec.entries:
        log.append(e)
        if e.index > snap.index:
            kv.apply(e)
    return log, kv


@dataclass(slots=True)
class Replica:
    """The state a core owns while its role lasts, and hands to the next role's core."""

    log: Log
    kv: KV
    epoch: int  # the highest epoch seen, as persisted
    snapshot_index: int  # the newest snapshot on stable storage
    durable: int  # the highest log index on stable storage

    @classmethod
    def recovered(cls, rec: Recovered) -> Replica:
        """Everything recovered is on stable storage."""
        log, kv = restore(rec)
        return cls(log, kv, max(rec.epoch, log.last_epoch), rec.snapshot.index, log.last_index)


def rebuild_kv(log: Log, snapshot_index: int, data: KV) -> KV:
    """The map at the end of ``log``: the snapshot's map ``data`` (a copy of it) plus the
    entries after it."""
    assert data.applied == snapshot_index, "a snapshot's map is at the snapshot's index"
    kv = data.copy()
    for i in range(snapshot_index + 1, log.last_index + 1):
        kv.apply(log.get(i))
    return kv


def snapshot_point(log: Log, kv: KV) -> tuple[SnapshotMeta, KV]:
    """What a snapshot taken now holds: the map (a copy, with each key's index) at the end
    of the log."""
    index = kv.applied
    assert index == log.last_index, "a snapshot is taken with every entry applied"
    history = EpochHistory(log.history.pairs())
    history.truncate_after(index)
    return SnapshotMeta(index, log.epoch_at(index), history.pairs()), kv.copy()


def check_read(node: str, log: Log, kv: KV, min_epoch: int, min_index: int) -> None:
    """Refuse a read-your-writes read this node cannot serve: the token (``min_epoch``,
    ``min_index``) names a write this log does not hold (yet, or ever)."""
    if min_index <= 0:
        return
    if min_epoch and log.holds(min_epoch, min_index) is False:
        raise WriteLost(f"the write at index {min_index} in epoch {min_epoch} is not in "
                        f"{node}'s history (entry {min_index} there is from epoch "
                        f"{log.epoch_at(min(min_index, log.last_index))} or later): it was "
                        "lost when its master failed before the write reached a majority")
    if kv.applied < min_index:
        raise Behind(f"{node} has applied {kv.applied}, the read needs {min_index}")


@dataclass(frozen=True, slots=True)
class Truncate:
    """Cut the stored log after ``index``; ``removed`` goes to a rollback file."""

    index: int
    removed: tuple[Entry, ...]


class Become(enum.Enum):
    """A role change the election core asks of the shell (:meth:`Node.become`)."""

    LEADER = "leader"  # this node won its epoch: become master
    FOLLOWER = "follower"  # this node was master and is no longer: become a slave


@dataclass(slots=True)
class Ready:
    """One batch of work for the shell, carried out in field order.

    1. ``epoch``: record durably as the highest epoch seen;
    2. ``wipe``: discard the snapshot and the log (they diverged below the snapshot), keeping
       ``truncate.removed`` in a rollback file; or ``truncate``: cut the log;
    3. ``entries``: append to the log (synced per the fsync policy, which then reports back);
    4. then call ``advance(ready)`` (the core applies what was persisted), and only then
    5. ``messages``: send to the peer of the replication link;
    6. ``replies``: send each reply to the client connection it belongs to;
    7. ``close``: close these replication links (slaves silent past the timeout);
    8. ``resync``: a slave starts a new handshake at once.

    From the election core (:mod:`cluster.core.election`) come three more fields:

    - ``vote`` goes with ``epoch`` in step 1: whenever ``epoch`` is set, ``vote`` is this
      node's vote in that epoch (None: none cast) and both are written together, atomically
      and fsynced, before anything else, so a restarted node never votes twice in an epoch
      (the replication cores set ``epoch`` without a vote only for an epoch newer than any
      the node has recorded, where it cannot have voted yet);
    - ``become``, right after step 1: swap the node's role; with ``LEADER`` the ``entries``
      are the new master's first entry, persisted by the new role's core;
    - ``to_peers``, with step 5: election messages, each to the node it names.
    """

    epoch: int | None = None
    wipe: bool = False
    truncate: Truncate | None = None
    entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    replies: list[tuple[Any, Reply | ErrorReply]] = field(default_factory=list)
    close: list[str] = field(default_factory=list)
    resync: bool = False
    vote: str | None = None
    become: Become | None = None
    to_peers: list[tuple[str, Message]] = field(default_factory=list)

    @property
    def must_persist(self) -> bool:
        return self.epoch is not None or self.wipe or self.truncate is not None \
            or bool(self.entries)

    def merge(self, other: Ready) -> Ready:
        """``other``'s work after this one's (both already advanced)."""
        self.messages.extend(other.messages)
        self.replies.extend(other.replies)
        self.close.extend(other.close)
        self.resync = self.resync or other.resync
        self.to_peers.extend(other.to_peers)
        return self
