"""Replication delay as measured on a slave: apply time minus the entry's master timestamp."""

from __future__ import annotations

from collections import deque
from typing import Any


class DelayStats:
    def __init__(self, keep: int = 200_000) -> None:
        self._delays: deque[int] = deque(maxlen=keep)
        self.count = 0

    def add(self, delay_ms: int) -> None:
        self._delays.append(delay_ms)
        self.count += 1

    def summary(self) -> dict[str, Any]:
        if not self._delays:
            return {"count": self.count, "window": 0, "p50": None, "p99": None, "max": None}
        ordered = sorted(self._delays)
        n = len(ordered)
        return {
            "count": self.count,
            "window": n,
            "p50": ordered[n // 2],
            "p99": ordered[min(n - 1, (n * 99) // 100)],
            "max": ordered[-1],
        }
