"""A node's data directory: metadata, snapshot, write-ahead log and rollback files.

``Store.open`` recovers the in-memory :class:`~cluster.core.log.Log` and
:class:`~cluster.core.kv.KV`; afterwards the runtime appends through the store and decides
when to sync and when to snapshot.

Layout::

    DIR/LOCK          held with flock while a node runs
    DIR/meta          {node, epoch}: the highest epoch this node has seen
    DIR/snapshot      the newest snapshot
    DIR/wal/*.wal     log segments
    DIR/rollback/*    entries cut from this node's log when it diverged from the master
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.core.history import EpochHistory
from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.errors import BadFrame, ConfigError, CorruptLog
from cluster.storage import lock
from cluster.storage.records import Damage, encode_record, fsync_dir, iter_records, write_atomic
from cluster.storage.snapshot import SnapshotMeta, read_snapshot, write_snapshot
from cluster.storage.wal import MAGIC as WAL_MAGIC
from cluster.storage.wal import WAL, encode_entries
from cluster.types import Entry, Value
from cluster.wire import codec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SnapshotJob:
    """A snapshot to write in a worker thread: a copy of the map at ``meta.index``."""

    meta: SnapshotMeta
    data: dict[str, Value]
    drop_through: int  # log entries up to here may go once the snapshot is on disk


class Store:
    def __init__(self, directory: Path, node: str, lock_fd: int, epoch: int, wal: WAL,
                 log_: Log, kv: KV, snapshot_index: int) -> None:
        self.directory = directory
        self.node = node
        self._lock_fd = lock_fd
        self.epoch = epoch
        self.wal = wal
        self.log = log_
        self.kv = kv
        self.snapshot_index = snapshot_index
        self.snapshotting = False  # a snapshot is being written or installed: no other starts

    @property
    def snapshot_path(self) -> Path:
        return self.directory / "snapshot"

    @classmethod
    def open(cls, directory: Path, node: str) -> Store:
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = lock.acquire(directory / "LOCK")
        try:
            return cls._recover(directory, node, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _recover(cls, directory: Path, node: str, lock_fd: int) -> Store:
        epoch = 0
        meta_path = directory / "meta"
        if meta_path.exists():
            meta = _read_meta(meta_path)
            if meta.get("node") != node:
                raise ConfigError(f"data directory {directory} belongs to node "
                                  f"{meta.get('node')!r}, not {node!r}")
            epoch = meta["epoch"]
        snap_index, snap_epoch, history = 0, 0, EpochHistory()
        data: dict[str, Value] = {}
        if (directory / "snapshot").exists():
            smeta, data = read_snapshot(directory / "snapshot")
            snap_index, snap_epoch = smeta.index, smeta.epoch
            history = EpochHistory(smeta.epochs)
        wal, entries = WAL.open(directory / "wal", after=snap_index)
        if entries and entries[-1].index < snap_index:
            # a crash while installing a snapshot from the master: it is in place, the old
            # log (all of it older) was not yet replaced
            log.warning("%s: the log ends at %d, before the snapshot at %d; starting the "
                        "log after the snapshot", directory, entries[-1].index, snap_index)
            wal.reset(snap_index + 1)
            entries = []
        base = entries[0].index - 1 if entries else snap_index
        base_epoch = snap_epoch if base == snap_index else entries[0].epoch
        if base < snap_index:
            history.truncate_after(base)
            base_epoch = history.epoch_at(base)
        mem = Log(base, base_epoch, history)
        kv = KV(data, snap_index)
        for e in entries:
            mem.append(e)
            if e.index > snap_index:
                kv.apply(e)
        store = cls(directory, node, lock_fd, max(epoch, mem.last_epoch), wal, mem, kv,
                    snap_index)
        if not meta_path.exists():
            store.set_epoch(store.epoch)
        log.info("recovered %s: snapshot at %d, log %d..%d, epoch %d, %d keys", directory,
                 snap_index, base + 1, mem.last_index, store.epoch, len(kv.data))
        return store

    # --- metadata ----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Durably record the highest epoch seen, before acting in it."""
        write_atomic(self.directory / "meta",
                     [encode_record(codec.pack_obj({"node": self.node, "epoch": epoch}))])
        self.epoch = epoch

    # --- the log -----------------------------------------------------------------------------

    def append(self, entries: list[Entry]) -> None:
        """Write to the log (unsynced); raises StorageFailure and leaves no trace on error."""
        self.wal.append(entries)

    def sync(self) -> None:
        self.wal.sync()

    def truncate_after(self, index: int) -> list[Entry]:
        """Cut the log after ``index`` (it diverged from the master's), keeping the cut
        entries in a rollback file, and rebuild the map. Returns the cut entries."""
        if index < self.snapshot_index:
            return self.wipe()
        removed = self.log.truncate_after(index)
        if not removed:
            return []
        self._save_rollback(removed)
        self.wal.truncate_after(index)
        self._rebuild_kv()
        return removed

    def wipe(self) -> list[Entry]:
        """Forget everything (the snapshot itself diverged); the master will resend it all."""
        removed = self.log.truncate_after(self.log.base)
        if removed:
            self._save_rollback(removed)
        log.warning("%s: the local snapshot is not a prefix of the master's log; discarding "
                    "local state to resynchronise", self.directory)
        self.snapshot_path.unlink(missing_ok=True)
        self._start_from(SnapshotMeta(0, 0, ()), {})
        return removed

    def _start_from(self, meta: SnapshotMeta, data: dict[str, Value]) -> None:
        """All state is now ``data`` at ``meta.index``; the log continues after it."""
        self.wal.reset(meta.index + 1)
        self.log.reset(meta.index, meta.epoch, EpochHistory(meta.epochs))
        self.kv.data = data
        self.kv.applied = meta.index
        self.snapshot_index = meta.index

    def _rebuild_kv(self) -> None:
        data: dict[str, Value] = {}
        if self.snapshot_path.exists():
            _, data = read_snapshot(self.snapshot_path)
        kv = KV(data, self.snapshot_index)
        for i in range(self.snapshot_index + 1, self.log.last_index + 1):
            kv.apply(self.log.get(i))
        self.kv.data, self.kv.applied = kv.data, kv.applied

    def _save_rollback(self, removed: list[Entry]) -> None:
        folder = self.directory / "rollback"
        folder.mkdir(exist_ok=True)
        path = folder / f"rollback-{removed[0].index}-{removed[-1].index}-e{self.epoch}.wal"
        write_atomic(path, [WAL_MAGIC, encode_entries(removed)])
        log.warning("cut %d entries (%d..%d) that the master does not have; kept in %s",
                    len(removed), removed[0].index, removed[-1].index, path)

    # --- snapshots ---------------------------------------------------------------------------

    def snapshot_due(self, every: int) -> bool:
        return not self.snapshotting and self.kv.applied - self.snapshot_index >= every

    def begin_snapshot(self) -> SnapshotJob:
        """Capture the map now and start a new log segment; write the job in a thread,
        then call :meth:`finish_snapshot`."""
        index = self.kv.applied
        assert index == self.log.last_index
        self.wal.roll(index + 1)
        self.snapshotting = True
        history = EpochHistory(self.log.history.pairs())
        history.truncate_after(index)
        meta = SnapshotMeta(index, self.log.epoch_at(index), history.pairs())
        return SnapshotJob(meta, dict(self.kv.data), drop_through=self.snapshot_index)

    def write_snapshot(self, job: SnapshotJob) -> None:
        """The slow part, safe in a worker thread."""
        write_snapshot(self.snapshot_path, job.meta, job.data)

    def finish_snapshot(self, job: SnapshotJob) -> None:
        """The snapshot is durable: drop what the previous one already covered. Entries
        between the two snapshots stay, so a slave a little behind needs no snapshot."""
        self.snapshot_index = job.meta.index
        self.wal.drop_through(job.drop_through)
        self.log.compact_to(job.drop_through)
        self.snapshotting = False  # a snapshot is being written or installed: no other starts
        log.info("snapshot at index %d written (%d keys); log now %d..%d", job.meta.index,
                 len(job.data), self.log.base + 1, self.log.last_index)

    def abort_snapshot(self) -> None:
        self.snapshotting = False  # a snapshot is being written or installed: no other starts

    def install_snapshot(self, raw_path: Path) -> SnapshotMeta:
        """Replace all state with a snapshot received from the master (already verified
        and fsynced at ``raw_path``)."""
        meta, data = read_snapshot(raw_path)
        os.replace(raw_path, self.snapshot_path)
        fsync_dir(self.directory)
        self._start_from(meta, data)
        log.info("installed the master's snapshot at index %d (%d keys)", meta.index, len(data))
        return meta

    def close(self) -> None:
        self.wal.close()
        os.close(self._lock_fd)


def _read_meta(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    for rec in iter_records(raw, 0):
        if isinstance(rec, Damage):
            break
        try:
            obj = codec.unpack_obj(rec[1])
        except BadFrame:
            break
        if isinstance(obj, dict) and isinstance(obj.get("epoch"), int):
            return obj
    raise CorruptLog(f"{path} is damaged; it holds only the node id and epoch: rewrite it by "
                     "deleting it (the epoch is recovered from the log)")
