"""Every message on the wire, one frozen dataclass each. See docs/PROTOCOL.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cluster.types import Acks, Consistency, Entry

# --- client requests ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Set:
    id: int
    key: str
    value: bytes | str
    acks: Acks = Acks.ASYNC
    timeout_ms: int | None = None  # how long the master waits for ``acks`` (None: default)


@dataclass(frozen=True, slots=True)
class Delete:
    id: int
    key: str
    acks: Acks = Acks.ASYNC
    timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Get:
    id: int
    key: str
    min_index: int = 0  # read token: serve only from a node that has applied this index
    consistency: Consistency = Consistency.ANY
    min_epoch: int = 0  # read token: ... and holds it in this epoch (0: any epoch)


@dataclass(frozen=True, slots=True)
class Scan:
    """A page of keys in sorted order, strictly after ``after``."""

    id: int
    after: str | None = None
    limit: int = 1000
    min_index: int = 0  # read token: serve only from a node that has applied this index
    min_epoch: int = 0  # read token: ... and holds it in this epoch (0: any epoch)


@dataclass(frozen=True, slots=True)
class Status:
    id: int


@dataclass(frozen=True, slots=True)
class Ping:
    id: int


# --- replication, between a slave and the master -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sync:
    """A slave asks the master to stream entries after the point where their logs match.

    ``epochs`` is the slave's epoch history: ``(epoch, first index of that epoch)`` pairs,
    so the master can find the last index where both logs agree in one round trip.
    """

    id: int
    node: str
    epoch: int
    last_index: int
    epochs: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Append:
    """Entries ``prev_index + 1 ...`` from the master; empty as a heartbeat."""

    epoch: int
    prev_index: int
    prev_epoch: int
    entries: tuple[Entry, ...]
    commit: int  # the master's highest durable index (not the majority index), for lag


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """Part of the master's snapshot file; ``done`` on the last part."""

    epoch: int
    index: int  # the last log index the snapshot covers
    offset: int
    data: bytes
    done: bool


@dataclass(frozen=True, slots=True)
class Ack:
    """A slave has durably stored and applied every entry up to ``index``."""

    epoch: int
    index: int


# --- elections, between nodes (not yet used by nodes in 0.2) -------------------------------------


@dataclass(frozen=True, slots=True)
class Vote:
    """``candidate`` asks for a vote in ``epoch``; with ``pre_vote``, only whether it would
    get one (the voter changes nothing). ``last_epoch``/``last_index`` describe its log."""

    epoch: int
    candidate: str
    last_epoch: int
    last_index: int
    pre_vote: bool = False


@dataclass(frozen=True, slots=True)
class VoteReply:
    """``voter``'s answer: ``epoch`` is the epoch asked about when ``granted``, else the
    voter's own epoch."""

    epoch: int
    voter: str
    granted: bool
    pre_vote: bool = False


# --- replies -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    id: int
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorReply:
    id: int
    code: str
    message: str
    master: str | None = None  # for not_master: the node this one believes is master
    # for set/delete: whether the write took effect ("no", "yes" or "unknown") and, when it
    # got one, where its entry is in the log
    applied: str | None = None
    index: int | None = None
    epoch: int | None = None


APPLIED = ("no", "yes", "unknown")


Request = Set | Delete | Get | Scan | Status | Ping | Sync
Stream = Append | SnapshotChunk | Ack
Election = Vote | VoteReply
Message = Request | Stream | Reply | ErrorReply | Election
