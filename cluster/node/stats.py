"""Replication delay as measured on a slave: apply time minus the entry's master timestamp.

Kept as a histogram with bounded size, so reporting it costs the same after a billion
entries as after ten: 1 ms buckets below 100 ms, 10 ms below 1 s, 100 ms below 10 s, then
1 s buckets (capped at one hour).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any


def bucket(ms: int) -> int:
    """The lower bound of the bucket ``ms`` falls in."""
    if ms < 100:
        return max(ms, 0)
    if ms < 1000:
        return ms - ms % 10
    if ms < 10_000:
        return ms - ms % 100
    return min(ms - ms % 1000, 3_600_000)


def percentile(buckets: Iterable[tuple[int, int]], q: float) -> int | None:
    """The bucket holding the ``q`` quantile (0 < q <= 1) of ``(bucket, count)`` pairs."""
    ordered = sorted(buckets)
    total = sum(n for _, n in ordered)
    if total <= 0:
        return None
    need = q * total
    seen = 0
    for b, n in ordered:
        seen += n
        if seen >= need:
            return b
    return ordered[-1][0]


class DelayStats:
    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
        self.count = 0
        self.max: int | None = None

    def add(self, delay_ms: int) -> None:
        self._counts[bucket(delay_ms)] += 1
        self.count += 1
        if self.max is None or delay_ms > self.max:
            self.max = delay_ms

    def summary(self) -> dict[str, Any]:
        """Totals since start; ``buckets`` lets a tool subtract two summaries to see only the
        entries applied in between."""
        pairs = sorted(self._counts.items())
        return {
            "count": self.count,
            "p50": percentile(pairs, 0.5),
            "p99": percentile(pairs, 0.99),
            "max": self.max,
            "buckets": [list(p) for p in pairs],
        }
