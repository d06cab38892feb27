"""Failure modes in storage and durability: a failed log roll, a log cut during an fsync,
a crash in the middle of installing a snapshot. Each test states the promise it checks."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from cluster.config import FsyncPolicy
from cluster.core.kv import KV
from cluster.core.state import Replica
from cluster.errors import StorageFailure
from cluster.node.durability import Durability
from cluster.storage.snapshot import SnapshotMeta, write_snapshot
from cluster.storage.store import Store
from cluster.storage.wal import WAL
from cluster.types import Entry, Op


def put(index: int, epoch: int = 1) -> Entry:
    return Entry(index, epoch, 1_000 + index, Op.SET, f"k{index}", f"value-{index}")


def _store_with(tmp_path: Path, last: int) -> Store:
    store, _ = Store.open(tmp_path / "n", "n2")
    for i in range(1, last + 1):
        store.append([put(i)])
    store.sync()
    return store


def _begin(store: Store, last: int) -> None:
    store.begin_snapshot(SnapshotMeta(last, 1, ((1, 1),)),
                         KV({f"k{i}": f"value-{i}" for i in range(1, last + 1)}, last))


# --- a failed segment roll (full disk) leaves the log writing to a closed fd ----------------


def _fail_create(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(directory: Path, first: int) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(WAL, "_create", staticmethod(no_space))


def test_failed_roll_does_not_send_log_records_to_another_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WAL.roll closes the current segment's fd before creating the new segment. When the
    creation fails (ENOSPC: the disk is full; the README promises a full disk only fails
    the write), self._fd still holds the closed descriptor number. The next descriptor the
    process opens (a client socket, a snapshot file...) reuses that number, and the next
    log append writes the entry into that other file while it is acknowledged as durable."""
    store = _store_with(tmp_path, 5)
    with monkeypatch.context() as m:
        _fail_create(m)
        with pytest.raises((OSError, StorageFailure)):
            _begin(store, 5)  # roll to segment 6 fails: disk full
    other = tmp_path / "unrelated-file"
    fd = os.open(other, os.O_WRONLY | os.O_CREAT, 0o644)  # reuses the lowest free fd
    try:
        e = put(6)
        try:
            store.append([e])
        except StorageFailure:
            pass  # acceptable: the write fails cleanly
        else:
            store.sync()
    finally:
        os.close(fd)
    assert other.stat().st_size == 0, (
        f"a log record ({other.stat().st_size} bytes) was written into an unrelated file "
        "that reused the log's closed descriptor")


def test_failed_roll_does_not_disable_snapshots_forever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """begin_snapshot sets ``snapshotting`` before rolling the log; when the roll raises,
    Node._snapshot (runtime.py) never calls abort_snapshot (begin_snapshot is outside its
    try), so snapshot_due() is False for the rest of the process: no snapshot, no log
    compaction, unbounded log and memory even after space is freed."""
    store = _store_with(tmp_path, 5)
    with monkeypatch.context() as m:
        _fail_create(m)
        with pytest.raises((OSError, StorageFailure)):
            _begin(store, 5)
    # the disk has space again: the next check must be able to snapshot
    assert store.snapshot_due(5, 1), "snapshots stay disabled after one failed roll"


# --- Durability.reset racing an fsync in flight ----------------------------------------------


class _Store:
    """Just enough of a Store for Durability."""

    def sync(self) -> None:  # the fake to_thread below stands for the fsync itself
        pass


async def test_durability_reset_during_an_fsync_does_not_claim_cut_entries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A slave's log is cut back (truncate_after on reconnect) while the fsync of the old
    tail is running in a worker thread. If that fsync's completion then counted, durable
    would be 10, beyond the log's end at 5, and entries 6..10 arriving later would be
    acknowledged before they are fsynced (SlaveCore.ack = min(durable, applied)): an
    acks=majority write counted on a copy that is not durable. The fsync's completion is
    under the test's control, so the interleaving is exact."""
    fsyncs: list[asyncio.Future[None]] = []

    async def controlled_to_thread(fn: Any, *args: Any) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fsyncs.append(done)
        await done

    # the durability loop's fsync goes through asyncio.to_thread (the module it imports)
    monkeypatch.setattr(asyncio, "to_thread", controlled_to_thread)

    async def until(n: int) -> None:
        for _ in range(100):  # a bounded number of loop turns, no clock
            if len(fsyncs) >= n:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"the durability loop never started fsync #{n}")

    seen: list[int] = []
    d = Durability(_Store(), FsyncPolicy.ALWAYS, 10, seen.append)  # type: ignore[arg-type]
    d.written = d.durable = 0
    task = asyncio.create_task(d.run())
    try:
        d.wrote(10)
        await until(1)
        d.reset(5)  # the log was cut to 5 while the fsync of ..10 is in flight
        fsyncs[0].set_result(None)
        d.wrote(7)  # a later write: the loop must go on and sync it
        await until(2)
        assert d.durable == 5 and seen == [], (
            f"durable={d.durable}, on_durable({seen}) after the log was cut to 5")
        fsyncs[1].set_result(None)
        for _ in range(10):
            await asyncio.sleep(0)
        assert d.durable == 7 and seen == [7]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- a crash inside install_snapshot leaves an inconsistent store ----------------------------


def test_crash_between_snapshot_rename_and_wal_reset_recovers_consistently(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Store.install_snapshot renames the master's snapshot (index 10) into place, then
    resets the WAL. A crash between the two leaves the old WAL (entries 1..5) beside a
    snapshot at 10. Store._recover accepts this: log.last_index = 5 but kv.applied = 10,
    so the node reports last_index 5 / applied 10, asks the master for entries after 5,
    and kv.apply(6) raises ValueError (a crash loop) if the master streams them."""
    store = _store_with(tmp_path, 5)
    raw = tmp_path / "n" / "snapshot.recv"
    write_snapshot(raw, SnapshotMeta(10, 1, ((1, 1),)),
                   KV({f"k{i}": f"value-{i}" for i in range(1, 11)}, 10))

    class Crash(BaseException):
        pass

    def crash(first: int) -> None:
        raise Crash()

    monkeypatch.setattr(store.wal, "reset", crash)
    with pytest.raises(Crash):
        store.install_snapshot(raw)
    store.close()
    again, rec = Store.open(tmp_path / "n", "n2")
    r = Replica.recovered(rec)
    try:
        assert r.log.last_index >= r.kv.applied, (
            f"recovered log ends at {r.log.last_index} but the map is at {r.kv.applied}")
    finally:
        again.close()
