"""The data model shared by every layer: identifiers and the log entry."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

NodeId = NewType("NodeId", str)

Value = bytes | str
"""A value is stored exactly as the client sent it: a msgpack str or bin."""


class Op(enum.Enum):
    SET = "set"
    DELETE = "del"
    NOOP = "noop"  # a new master's first entry in its epoch (key "", no value); changes nothing


@dataclass(frozen=True, slots=True)
class Entry:
    """One write in the replicated log. ``index`` increases by one per entry."""

    index: int
    epoch: int
    ts: int  # wall-clock milliseconds on the master when the entry was created
    op: Op
    key: str
    value: Value | None  # None for deletes

    def size(self) -> int:
        """A cheap estimate of the entry's encoded size in bytes, for batching."""
        value = self.value
        n = 0 if value is None else len(value) * (4 if isinstance(value, str) else 1)
        return 32 + 4 * len(self.key) + n


class Acks(enum.Enum):
    """How many copies a write needs before the master replies."""

    ASYNC = "async"  # durable on the master (per its fsync policy)
    MAJORITY = "majority"  # durable on a majority of the cluster


class Consistency(enum.Enum):
    ANY = "any"  # any live slave within the router's lag bound
    STRONG = "strong"  # the master, after it confirms it still leads a majority


@dataclass(frozen=True, slots=True, order=True)
class Token:
    """Where a write landed: the epoch and index of its log entry. A read given a token is
    served only by a node whose log holds that very entry (read your writes); an index from
    another history (a write lost in a failover) is refused, not silently matched."""

    epoch: int
    index: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.index}"
