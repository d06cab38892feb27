"""The in-memory view of the log: entries after the compaction point, plus epoch history."""

from __future__ import annotations

from cluster.core.history import EpochHistory
from cluster.types import Entry


class Log:
    """Entries ``base + 1 .. last_index``; entries up to ``base`` were compacted away."""

    __slots__ = ("_base", "_base_epoch", "_entries", "history")

    def __init__(self, base: int = 0, base_epoch: int = 0,
                 history: EpochHistory | None = None) -> None:
        self._base = base
        self._base_epoch = base_epoch
        self._entries: list[Entry] = []
        self.history = history if history is not None else EpochHistory()

    @property
    def base(self) -> int:
        return self._base

    @property
    def last_index(self) -> int:
        return self._base + len(self._entries)

    @property
    def last_epoch(self) -> int:
        return self._entries[-1].epoch if self._entries else self._base_epoch

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> None:
        if entry.index != self.last_index + 1:
            raise ValueError(f"entry {entry.index} does not follow {self.last_index}")
        if entry.epoch < self.last_epoch:
            raise ValueError(f"entry {entry.index} has epoch {entry.epoch} < {self.last_epoch}")
        self.history.record(entry.epoch, entry.index)
        self._entries.append(entry)

    def get(self, index: int) -> Entry:
        if not self._base < index <= self.last_index:
            raise IndexError(f"index {index} outside {self._base + 1}..{self.last_index}")
        return self._entries[index - self._base - 1]

    def epoch_at(self, index: int) -> int:
        if index == self._base:
            return self._base_epoch
        if self._base < index <= self.last_index:
            return self._entries[index - self._base - 1].epoch
        return self.history.epoch_at(index)

    def holds(self, epoch: int, index: int) -> bool | None:
        """Whether entry ``index`` of epoch ``epoch`` is in this log: True; False when it
        never can be (another epoch holds that index, or a newer epoch began at or before
        it); None when it may still arrive."""
        if index <= self.last_index:
            return self.epoch_at(index) == epoch
        return None if self.last_epoch <= epoch else False

    def has(self, index: int) -> bool:
        """Whether entries from ``index`` on can be served from memory."""
        return index > self._base

    def slice(self, start: int, max_entries: int) -> list[Entry]:
        """Up to ``max_entries`` entries from ``start``, which must be > ``base``."""
        if start <= self._base:
            raise IndexError(f"index {start} was compacted (base {self._base})")
        lo = start - self._base - 1
        return self._entries[lo : lo + max_entries]

    def truncate_after(self, index: int) -> list[Entry]:
        """Drop entries after ``index`` and return them, oldest first."""
        if index < self._base:
            raise IndexError(f"cannot truncate to {index}, below the compaction point {self._base}")
        cut = index - self._base
        removed = self._entries[cut:]
        del self._entries[cut:]
        self.history.truncate_after(index)
        return removed

    def compact_to(self, index: int) -> None:
        """Forget entries up to ``index`` (they are in a snapshot)."""
        if index <= self._base:
            return
        index = min(index, self.last_index)
        self._base_epoch = self.epoch_at(index)
        del self._entries[: index - self._base]
        self._base = index

    def reset(self, base: int, base_epoch: int, history: EpochHistory) -> None:
        """Start over from a snapshot at ``base``."""
        self._base = base
        self._base_epoch = base_epoch
        self._entries = []
        self.history = history
