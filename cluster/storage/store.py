"""A node's data directory: metadata, snapshot, write-ahead log and rollback files.

``Store.open`` returns what it recovered as a :class:`~cluster.core.state.Recovered`; the
cores build their log and map from it and own them from then on. Afterwards the store only
carries out what a core's :class:`~cluster.core.state.Ready` says (see
:func:`cluster.storage.base.persist`), and writes snapshots of the state it is handed.

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
from pathlib import Path
from typing import IO, Any

from cluster.core.kv import KV
from cluster.core.state import NO_SNAPSHOT, Recovered, SnapshotMeta
from cluster.errors import BadFrame, ConfigError, CorruptLog
from cluster.storage import lock
from cluster.storage.base import SnapshotJob
from cluster.storage.records import Damage, encode_record, fsync_dir, iter_records, write_atomic
from cluster.storage.snapshot import read_index, read_snapshot, write_snapshot
from cluster.storage.wal import MAGIC as WAL_MAGIC
from cluster.storage.wal import WAL, encode_entries
from cluster.types import Entry
from cluster.wire import codec

log = logging.getLogger(__name__)


class Store:
    """The files of one node's data directory, a :class:`~cluster.storage.base.LogStore`."""

    def __init__(self, directory: Path, node: str, lock_fd: int, epoch: int, wal: WAL,
                 snapshot_index: int) -> None:
        self.directory = directory
        self.node = node
        self._lock_fd = lock_fd
        self.epoch = epoch
        self.wal = wal
        self.snapshot_index = snapshot_index
        self.vote: str | None = None  # this node's vote in ``epoch``
        self.snapshotting = False  # a snapshot is being written or installed: no other starts

    @property
    def snapshot_path(self) -> Path:
        return self.directory / "snapshot"

    @classmethod
    def open(cls, directory: Path, node: str) -> tuple[Store, Recovered]:
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = lock.acquire(directory / "LOCK")
        try:
            return cls._recover(directory, node, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _recover(cls, directory: Path, node: str, lock_fd: int) -> tuple[Store, Recovered]:
        epoch, vote = 0, None
        meta_path = directory / "meta"
        if meta_path.exists():
            meta = _read_meta(meta_path)
            if meta.get("node") != node:
                raise ConfigError(f"data directory {directory} belongs to node "
                                  f"{meta.get('node')!r}, not {node!r}")
            epoch = meta["epoch"]
            vote = meta.get("vote") if isinstance(meta.get("vote"), str) else None
        snap, data = NO_SNAPSHOT, KV()
        if (directory / "snapshot").exists():
            snap, data = read_snapshot(directory / "snapshot")
        wal, entries = WAL.open(directory / "wal", after=snap.index)
        if entries and entries[-1].index < snap.index:
            # a crash while installing a snapshot from the master: it is in place, the old
            # log (all of it older) was not yet replaced
            log.warning("%s: the log ends at %d, before the snapshot at %d; starting the "
                        "log after the snapshot", directory, entries[-1].index, snap.index)
            wal.reset(snap.index + 1)
            entries = []
        meta_epoch = epoch
        epoch = max(epoch, entries[-1].epoch if entries else snap.epoch)
        if epoch != meta_epoch:
            vote = None  # the log holds a newer epoch than the meta file: no vote in it
        store = cls(directory, node, lock_fd, epoch, wal, snap.index)
        store.vote = vote
        if not meta_path.exists():
            store.set_epoch(epoch)
        return store, Recovered(epoch, snap, data, entries, vote)

    # --- metadata ----------------------------------------------------------------------------

    def set_epoch(self, epoch: int, vote: str | None = None) -> None:
        """Durably record the highest epoch seen and this node's vote in it (None: none
        cast), atomically, before acting in that epoch or answering a vote request."""
        write_atomic(self.directory / "meta", [encode_record(codec.pack_obj(
            {"node": self.node, "epoch": epoch, "vote": vote}))])
        self.epoch = epoch
        self.vote = vote

    # --- the log -----------------------------------------------------------------------------

    def append(self, entries: list[Entry]) -> None:
        """Write to the log (unsynced); raises StorageFailure and leaves no trace on error."""
        self.wal.append(entries)

    def sync(self) -> None:
        self.wal.sync()

    def truncate_after(self, index: int, removed: tuple[Entry, ...]) -> KV:
        """Cut the log after ``index`` (it diverged from the master's), keeping ``removed``
        in a rollback file; everything left is durable. Returns the snapshot's map, from
        which the caller rebuilds its own."""
        if removed:
            self._save_rollback(removed)
        self.wal.truncate_after(index)
        if self.snapshot_path.exists():
            return read_snapshot(self.snapshot_path)[1]
        return KV()

    def wipe(self, removed: tuple[Entry, ...]) -> None:
        """Forget everything (the snapshot itself diverged); the master will resend it all.
        The log's entries go to a rollback file, and the snapshot itself too: entries that
        exist only in it (compacted away) are kept as the map they produced."""
        if removed:
            self._save_rollback(removed)
        if self.snapshot_path.exists():
            folder = self.directory / "rollback"
            folder.mkdir(exist_ok=True)
            kept = folder / f"snapshot-{self.snapshot_index}-e{self.epoch}"
            os.replace(self.snapshot_path, kept)
            fsync_dir(folder)
            log.warning("%s: the local snapshot at %d is not a prefix of the master's log; "
                        "kept it as %s", self.directory, self.snapshot_index, kept)
        log.warning("%s: discarding local state to resynchronise from the master",
                    self.directory)
        fsync_dir(self.directory)
        self.wal.reset(1)
        self.snapshot_index = 0

    def _save_rollback(self, removed: tuple[Entry, ...]) -> None:
        folder = self.directory / "rollback"
        folder.mkdir(exist_ok=True)
        path = folder / f"rollback-{removed[0].index}-{removed[-1].index}-e{self.epoch}.wal"
        write_atomic(path, [WAL_MAGIC, encode_entries(list(removed))])
        log.warning("cut %d entries (%d..%d) that the master does not have; kept in %s",
                    len(removed), removed[0].index, removed[-1].index, path)

    # --- snapshots ---------------------------------------------------------------------------

    def snapshot_due(self, applied: int, every: int) -> bool:
        return not self.snapshotting and applied - self.snapshot_index >= every

    def begin_snapshot(self, meta: SnapshotMeta, data: KV) -> SnapshotJob:
        """Start a new log segment after ``meta.index`` (the end of the log); write the job
        in a thread, then call :meth:`finish_snapshot`. ``data`` must be a copy."""
        self.wal.roll(meta.index + 1)
        self.snapshotting = True
        return SnapshotJob(meta, data, drop_through=self.snapshot_index)

    def write_snapshot(self, job: SnapshotJob) -> None:
        """The slow part, safe in a worker thread."""
        write_snapshot(self.snapshot_path, job.meta, job.data)

    def finish_snapshot(self, job: SnapshotJob) -> None:
        """The snapshot is durable: drop the segments the previous one already covered.
        Entries between the two snapshots stay, so a slave a little behind needs no
        snapshot; the caller compacts its log to ``job.drop_through``."""
        self.snapshot_index = job.meta.index
        self.wal.drop_through(job.drop_through)
        self.snapshotting = False
        log.info("snapshot at index %d written (%d keys)", job.meta.index, len(job.data))

    def abort_snapshot(self) -> None:
        self.snapshotting = False

    def install_snapshot(self, raw_path: Path, expect_index: int | None = None) -> Recovered:
        """Replace all state with a snapshot received from the master (fsynced at
        ``raw_path``). It is verified first, and nothing changes when it is damaged or
        covers another index than ``expect_index`` (what the master announced)."""
        meta, data = read_snapshot(raw_path)
        if expect_index is not None and meta.index != expect_index:
            raise CorruptLog(f"the snapshot received covers index {meta.index}, not the "
                             f"{expect_index} announced")
        os.replace(raw_path, self.snapshot_path)
        fsync_dir(self.directory)
        self.wal.reset(meta.index + 1)
        self.snapshot_index = meta.index
        log.info("installed the master's snapshot at index %d (%d keys)", meta.index, len(data))
        return Recovered(self.epoch, meta, data, [], self.vote)

    def open_snapshot(self) -> tuple[IO[bytes], int, int]:
        """The newest snapshot for sending: an open file (it survives a newer snapshot's
        rename), the index it covers and its size."""
        f = open(self.snapshot_path, "rb")  # noqa: SIM115 - the caller closes it
        try:
            return f, read_index(f), os.fstat(f.fileno()).st_size
        except BaseException:
            f.close()
            raise

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
    raise CorruptLog(f"{path} is damaged; it holds only the node id, the epoch and this node's "
                     "vote: rewrite it by deleting it (the epoch is recovered from the log, the "
                     "vote is forgotten)")
