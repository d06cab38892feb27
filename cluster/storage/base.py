"""What a node needs from its storage, and the one way a core's Ready is persisted.

:class:`LogStore` is implemented by the files of a data directory
(:class:`cluster.storage.store.Store`) and by memory
(:class:`cluster.storage.memory.MemoryStore`, for the deterministic simulation); the node
runtime and the simulation both persist through :func:`persist`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cluster.core.kv import KV
from cluster.core.state import Ready, SnapshotMeta
from cluster.types import Entry


@dataclass(frozen=True, slots=True)
class SnapshotJob:
    """A snapshot to write (in a worker thread, for files): a copy of the map at
    ``meta.index``."""

    meta: SnapshotMeta
    data: KV
    drop_through: int  # log entries up to here may go once the snapshot is on disk


class LogStore(Protocol):
    epoch: int  # the highest epoch recorded
    snapshot_index: int  # the newest snapshot's index (0: none)
    snapshotting: bool  # a snapshot is being written or installed: no other starts

    def set_epoch(self, epoch: int, vote: str | None = None) -> None: ...
    def append(self, entries: list[Entry]) -> None: ...
    def sync(self) -> None: ...
    def truncate_after(self, index: int, removed: tuple[Entry, ...]) -> KV: ...
    def wipe(self, removed: tuple[Entry, ...]) -> None: ...
    def snapshot_due(self, applied: int, every: int) -> bool: ...
    def begin_snapshot(self, meta: SnapshotMeta, data: KV) -> SnapshotJob: ...
    def write_snapshot(self, job: SnapshotJob) -> None: ...
    def finish_snapshot(self, job: SnapshotJob) -> None: ...
    def abort_snapshot(self) -> None: ...


def persist(store: LogStore, ready: Ready) -> KV | None:
    """Carry out the storage part of ``ready`` in its order: the epoch, then a wipe or a cut
    (returning the snapshot's map, from which the core rebuilds its own), then new entries.
    Raises :class:`~cluster.errors.StorageFailure` when the entries could not be written;
    then none of them were."""
    if ready.epoch is not None:
        store.set_epoch(ready.epoch, ready.vote)
    data = None
    if ready.wipe:
        store.wipe(ready.truncate.removed if ready.truncate else ())
    elif ready.truncate is not None:
        data = store.truncate_after(ready.truncate.index, ready.truncate.removed)
    if ready.entries:
        store.append(ready.entries)
    return data


class Advancing(Protocol):
    """A core, as far as :func:`carry_out` needs it."""

    @property
    def durable(self) -> int: ...

    def advance(self, ready: Ready, snapshot_data: KV | None = None) -> Ready: ...


def carry_out(store: LogStore, core: Advancing, ready: Ready, *,
              wrote: Callable[[int], None], reset: Callable[[int], None]) -> Ready:
    """Persist what ``ready`` says (:func:`persist`) and advance ``core``; returns ``ready``
    with what the advance added, for the caller to send and reply. ``wrote(index)`` is told
    of new entries handed to the OS (the fsync policy takes it from there) and
    ``reset(index)`` of a log that was cut or wiped and is durable up to ``index``. Raises
    :class:`~cluster.errors.StorageFailure` when the entries could not be written."""
    if not ready.must_persist:
        return ready
    data = persist(store, ready)
    follow = core.advance(ready, data)
    if ready.wipe or ready.truncate is not None:
        reset(core.durable)
    if ready.entries:
        wrote(ready.entries[-1].index)
    return ready.merge(follow)
