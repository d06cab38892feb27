"""The data model shared by every layer: identifiers and the log entry."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, NewType

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


@dataclass(frozen=True, slots=True)
class Acks:
    """How many copies of a write the master waits for before it replies (``value``):

    - ``"async"``: the master's own (durable per its fsync policy);
    - ``N`` (an integer >= 1): the master's and ``N`` slaves';
    - ``"majority"``: a majority of the cluster, the master included;
    - ``"all"``: every node of the cluster.

    ``Acks("majority")`` and ``Acks(2)`` build one; :meth:`parse` also reads ``"2"`` and
    ``0`` (which is ``async``)."""

    value: str | int

    ASYNC: ClassVar[Acks]
    MAJORITY: ClassVar[Acks]
    ALL: ClassVar[Acks]
    NAMES: ClassVar[tuple[str, ...]] = ("async", "majority", "all")

    def __post_init__(self) -> None:
        v = self.value
        if isinstance(v, bool) or not (v in self.NAMES or (type(v) is int and v >= 1)):
            raise ValueError(f"acks must be one of {', '.join(self.NAMES)} or a number of "
                             f"slaves >= 1, not {v!r}")

    @classmethod
    def parse(cls, raw: str | int) -> Acks:
        """``async``, ``majority``, ``all`` or a number of slaves (``0`` is ``async``)."""
        if isinstance(raw, str) and raw.strip().isdigit():
            raw = int(raw)
        if raw == 0 and type(raw) is int:
            return cls.ASYNC
        return cls(raw)

    def copies(self, cluster_size: int, majority: int) -> int:
        """The copies (nodes holding the entry, the master included) this level needs."""
        match self.value:
            case "async":
                return 1
            case "majority":
                return majority
            case "all":
                return cluster_size
        assert isinstance(self.value, int)
        return 1 + self.value

    def __str__(self) -> str:
        return str(self.value)


Acks.ASYNC = Acks("async")
Acks.MAJORITY = Acks("majority")
Acks.ALL = Acks("all")


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
    # how many nodes held the write when the master replied (0: not known, as for a token
    # typed in); not part of the token's identity
    copies: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"{self.epoch}:{self.index}"
