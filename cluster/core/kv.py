"""The replicated map: the result of applying the log in order."""

from __future__ import annotations

import heapq

from cluster.types import Entry, Op, Value


class KV:
    __slots__ = ("applied", "data")

    def __init__(self, data: dict[str, Value] | None = None, applied: int = 0) -> None:
        self.data: dict[str, Value] = data if data is not None else {}
        self.applied = applied

    def apply(self, entry: Entry) -> None:
        if entry.index != self.applied + 1:
            raise ValueError(f"applying entry {entry.index} after {self.applied}")
        if entry.op is Op.SET:
            assert entry.value is not None
            self.data[entry.key] = entry.value
        elif entry.op is Op.DELETE:
            self.data.pop(entry.key, None)
        self.applied = entry.index

    def get(self, key: str) -> Value | None:
        return self.data.get(key)

    def scan(self, after: str | None, limit: int, max_bytes: int = 1 << 62
             ) -> tuple[list[tuple[str, Value]], bool]:
        """Up to ``limit`` items with keys sorted and greater than ``after``, stopping early
        (after at least one item) once they exceed ``max_bytes``; and whether more remain."""
        keys = self.data.keys() if after is None else (k for k in self.data if k > after)
        page = heapq.nsmallest(limit + 1, keys)
        items: list[tuple[str, Value]] = []
        size = 0
        for k in page[:limit]:
            v = self.data[k]
            size += 16 + 4 * len(k) + len(v) * (4 if isinstance(v, str) else 1)
            if size > max_bytes and items:
                return items, True
            items.append((k, v))
        return items, len(page) > limit
