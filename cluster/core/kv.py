"""The replicated map: the result of applying the log in order.

Besides each key's value the map keeps the log index of the entry that last set it; with
the epoch of that entry (which the log's epoch history gives, see
:meth:`~cluster.core.log.Log.epoch_at`) it is the key's token, which ``get`` and ``scan``
return. The indexes live in a second dict beside the values: measured, that costs about
60 bytes a key where a ``(value, index)`` tuple in the one dict costs about 90
(docs/PERFORMANCE.md).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from cluster.types import Entry, Op, Value


class KV:
    """``data[key]`` is the key's value and ``indexes[key]`` the index of the entry that
    last set it; both hold the same keys. :meth:`apply` is the one way to change the map,
    :meth:`get`, :meth:`scan` and :meth:`items` the ways to read it."""

    __slots__ = ("applied", "data", "indexes")

    def __init__(self, data: dict[str, Value] | None = None, applied: int = 0,
                 indexes: dict[str, int] | None = None) -> None:
        """The map at index ``applied``. Keys given without ``indexes`` are taken as set by
        entry ``applied`` itself, the newest entry that can have set them (what a map read
        from a version-1 snapshot knows)."""
        self.data: dict[str, Value] = data if data is not None else {}
        self.indexes: dict[str, int] = (indexes if indexes is not None
                                        else dict.fromkeys(self.data, applied))
        if len(self.indexes) != len(self.data):
            raise ValueError(f"{len(self.data)} keys but {len(self.indexes)} key indexes")
        self.applied = applied

    def apply(self, entry: Entry) -> None:
        if entry.index != self.applied + 1:
            raise ValueError(f"applying entry {entry.index} after {self.applied}")
        if entry.op is Op.SET:
            assert entry.value is not None
            self.data[entry.key] = entry.value
            self.indexes[entry.key] = entry.index
        elif entry.op is Op.DELETE:
            self.data.pop(entry.key, None)
            self.indexes.pop(entry.key, None)
        self.applied = entry.index

    def get(self, key: str) -> tuple[Value, int] | None:
        """The key's value and the index of the entry that set it; None when it is absent."""
        value = self.data.get(key)
        return None if value is None else (value, self.indexes[key])

    def scan(self, after: str | None, limit: int, max_bytes: int = 1 << 62
             ) -> tuple[list[tuple[str, Value, int]], bool]:
        """Up to ``limit`` items ``(key, value, index)`` with keys sorted and greater than
        ``after``, stopping early (after at least one item) once they exceed ``max_bytes``;
        and whether more remain."""
        keys = self.data.keys() if after is None else (k for k in self.data if k > after)
        page = heapq.nsmallest(limit + 1, keys)
        items: list[tuple[str, Value, int]] = []
        size = 0
        for k in page[:limit]:
            v = self.data[k]
            # 32: the item's framing and its token (docs/PROTOCOL.md, scan's byte bound)
            size += 32 + 4 * len(k) + len(v) * (4 if isinstance(v, str) else 1)
            if size > max_bytes and items:
                return items, True
            items.append((k, v, self.indexes[k]))
        return items, len(page) > limit

    def items(self) -> Iterator[tuple[str, Value, int]]:
        """Every ``(key, value, index)``, in no particular order (for a snapshot)."""
        indexes = self.indexes
        for k, v in self.data.items():
            yield k, v, indexes[k]

    def copy(self) -> KV:
        """An independent copy (two C-level dict copies: cheap enough for the event loop)."""
        return KV(dict(self.data), self.applied, dict(self.indexes))

    def __len__(self) -> int:
        return len(self.data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KV):
            return NotImplemented
        return (self.applied, self.data, self.indexes) == (other.applied, other.data,
                                                           other.indexes)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"KV(applied={self.applied}, {len(self.data)} keys)"
