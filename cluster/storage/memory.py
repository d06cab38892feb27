"""A :class:`~cluster.storage.base.LogStore` in memory, with a crash that loses exactly what
was not synced: the disk of the deterministic replication simulation."""

from __future__ import annotations

from cluster.core.kv import KV
from cluster.core.state import NO_SNAPSHOT, Recovered, SnapshotMeta
from cluster.errors import StorageFailure
from cluster.storage.base import SnapshotJob
from cluster.types import Entry


class MemoryStore:
    def __init__(self) -> None:
        self.epoch = 0
        self.vote: str | None = None  # this node's vote in ``epoch``
        self.snapshot_index = 0
        self.snapshotting = False
        self.snapshot: tuple[SnapshotMeta, KV] = (NO_SNAPSHOT, KV())
        self.synced: list[Entry] = []  # on "disk"
        self.written: list[Entry] = []  # handed to the "OS", lost by a crash
        self.rollback: list[tuple[Entry, ...]] = []
        self.rollback_snapshots: list[tuple[SnapshotMeta, KV]] = []
        self.fail_writes = False  # a full disk

    # --- recovery ------------------------------------------------------------------------------

    def crash(self) -> Recovered:
        """The process dies: what was not synced is gone. Returns what a restart recovers."""
        self.written = []
        self.snapshotting = False
        meta, data = self.snapshot
        return Recovered(self.epoch, meta, data.copy(), list(self.synced), self.vote)

    @property
    def entries(self) -> list[Entry]:
        return self.synced + self.written

    # --- LogStore ------------------------------------------------------------------------------

    def set_epoch(self, epoch: int, vote: str | None = None) -> None:
        self.epoch = epoch
        self.vote = vote

    def append(self, entries: list[Entry]) -> None:
        if self.fail_writes:
            raise StorageFailure("could not write to the log: No space left on device")
        self.written.extend(entries)

    def sync(self) -> None:
        self.synced.extend(self.written)
        self.written = []

    def truncate_after(self, index: int, removed: tuple[Entry, ...]) -> KV:
        if removed:
            self.rollback.append(removed)
        self.sync()  # the file store fsyncs what it keeps
        self.synced = [e for e in self.synced if e.index <= index]
        return self.snapshot[1].copy()

    def wipe(self, removed: tuple[Entry, ...]) -> None:
        if removed:
            self.rollback.append(removed)
        if self.snapshot_index:
            self.rollback_snapshots.append(self.snapshot)
        self.synced, self.written = [], []
        self.snapshot = (NO_SNAPSHOT, KV())
        self.snapshot_index = 0

    def snapshot_due(self, applied: int, every: int) -> bool:
        return not self.snapshotting and applied - self.snapshot_index >= every

    def begin_snapshot(self, meta: SnapshotMeta, data: KV) -> SnapshotJob:
        self.sync()  # rolling the segment syncs the old one
        self.snapshotting = True
        return SnapshotJob(meta, data, drop_through=self.snapshot_index)

    def write_snapshot(self, job: SnapshotJob) -> None:
        pass  # the snapshot becomes durable in finish_snapshot, atomically

    def finish_snapshot(self, job: SnapshotJob) -> None:
        self.snapshot = (job.meta, job.data)
        self.snapshot_index = job.meta.index
        self.synced = [e for e in self.synced if e.index > job.drop_through]
        self.snapshotting = False

    def abort_snapshot(self) -> None:
        self.snapshotting = False

    def install_snapshot(self, meta: SnapshotMeta, data: KV) -> Recovered:
        self.snapshot = (meta, data.copy())
        self.snapshot_index = meta.index
        self.synced, self.written = [], []
        return Recovered(self.epoch, meta, data.copy(), [], self.vote)
