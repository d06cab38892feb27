"""The epoch history of a log: where each epoch's entries begin.

``(epoch, first_index)`` pairs, increasing in both. Two logs that hold an entry with the
same index and epoch hold the same entries up to it (one master writes each epoch, and a
master restarts in a new epoch), so comparing histories finds where two logs diverge without
comparing entries.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable


class EpochHistory:
    __slots__ = ("_epochs", "_starts")

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()) -> None:
        self._epochs: list[int] = []
        self._starts: list[int] = []
        for epoch, start in pairs:
            self.record(epoch, start)

    def pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self._epochs, self._starts, strict=True))

    def __repr__(self) -> str:
        return f"EpochHistory({list(self.pairs())})"

    def record(self, epoch: int, index: int) -> None:
        """Note that the entry at ``index`` has ``epoch`` (entries are recorded in order)."""
        if self._epochs and epoch == self._epochs[-1]:
            return
        if self._epochs and (epoch < self._epochs[-1] or index <= self._starts[-1]):
            raise ValueError(
                f"epoch {epoch} at index {index} goes backwards after {self.pairs()[-1]}"
            )
        self._epochs.append(epoch)
        self._starts.append(index)

    def epoch_at(self, index: int) -> int:
        """The epoch of the entry at ``index`` (0 before the first entry)."""
        pos = bisect.bisect_right(self._starts, index) - 1
        return self._epochs[pos] if pos >= 0 else 0

    def truncate_after(self, index: int) -> None:
        """Forget epochs that begin after ``index``."""
        pos = bisect.bisect_right(self._starts, index)
        del self._epochs[pos:]
        del self._starts[pos:]

    def match(self, last: int, other: EpochHistory, other_last: int) -> int:
        """The highest index at which this log (ending at ``last``) and another agree."""
        limit = min(last, other_last)
        bounds = sorted({s for s in self._starts + other._starts if s <= limit})
        hi = limit
        for lo in reversed(bounds):
            if self.epoch_at(lo) == other.epoch_at(lo):
                return hi
            hi = lo - 1
        return hi if hi >= 0 and self.epoch_at(hi) == other.epoch_at(hi) else 0
