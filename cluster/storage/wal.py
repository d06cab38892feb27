"""The write-ahead log: segment files of checksummed entry records.

Segments are named by the index of their first entry (``00000000000000000001.wal``) and
begin with the magic ``RKVWAL1\\n``. Only the newest segment is written to. Writes go to
the OS with ``os.write`` on the event loop; :meth:`WAL.sync` (fsync) may run in a worker
thread while later writes continue.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import CorruptLog, ProtocolError, StorageFailure, reason
from cluster.storage.records import Damage, encode_record, fsync_dir, iter_records, write_all
from cluster.types import Entry
from cluster.wire import codec

log = logging.getLogger(__name__)

MAGIC = b"RKVWAL1\n"
SUFFIX = ".wal"


def segment_name(first_index: int) -> str:
    return f"{first_index:020d}{SUFFIX}"


@dataclass(slots=True)
class Segment:
    first: int
    path: Path


def encode_entries(entries: list[Entry]) -> bytes:
    return b"".join(encode_record(codec.pack_entry(e)) for e in entries)


class WAL:
    def __init__(self, directory: Path, segments: list[Segment], fd: int, size: int) -> None:
        self.directory = directory
        self._segments = segments
        self._fd = fd
        self._size = size  # bytes in the current segment
        self._lock = threading.Lock()  # fsync in a thread vs. rolling segments

    # --- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, after: int) -> tuple[WAL, list[Entry]]:
        """Open the log, recovering every entry it holds.

        ``after`` is the snapshot's index: entries must continue from there or overlap it.
        A torn final record is cut off with a warning; damage anywhere else raises
        :class:`CorruptLog`.
        """
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.tmp"):
            stale.unlink()
        segments = sorted(
            (Segment(int(p.name[: -len(SUFFIX)]), p) for p in directory.glob("*" + SUFFIX)
             if p.name[: -len(SUFFIX)].isdigit()),
            key=lambda s: s.first,
        )
        entries: list[Entry] = []
        for n, seg in enumerate(segments):
            entries.extend(cls._read_segment(seg, last=n == len(segments) - 1,
                                             expect=entries[-1].index + 1 if entries else None))
        if entries and entries[0].index > after + 1:
            raise CorruptLog(
                f"the log in {directory} starts at entry {entries[0].index} but the snapshot "
                f"ends at {after}: entries are missing. Delete the data directory to "
                "resynchronise this node from the master."
            )
        if not segments:
            segments = [cls._create(directory, after + 1)]
        fd = os.open(segments[-1].path, os.O_WRONLY | os.O_APPEND)
        os.fsync(fd)  # what was recovered may be acknowledged to a master: make it durable
        size = os.fstat(fd).st_size
        return cls(directory, segments, fd, size), entries

    @staticmethod
    def _create(directory: Path, first: int) -> Segment:
        path = directory / segment_name(first)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, MAGIC)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(directory)
        return Segment(first, path)

    @staticmethod
    def _read_segment(seg: Segment, *, last: bool, expect: int | None) -> list[Entry]:
        data = seg.path.read_bytes()
        advice = ("Restore the data directory from a backup, or delete it to resynchronise "
                  "this node from the master.")
        if len(data) < len(MAGIC):
            if last and MAGIC.startswith(data):
                log.warning("%s: empty segment with a torn header; recreating it", seg.path)
                seg.path.write_bytes(MAGIC)
                return []
            raise CorruptLog(f"{seg.path}: not a replkv log segment. {advice}")
        if not data.startswith(MAGIC):
            raise CorruptLog(f"{seg.path}: not a replkv log segment (bad magic). {advice}")
        if expect is not None and seg.first != expect:
            raise CorruptLog(f"{seg.path}: expected a segment starting at {expect}. {advice}")
        entries: list[Entry] = []
        want = seg.first

        def later_entry(payload: bytes) -> bool:
            """A valid record after damage is this log's only if it holds a later entry
            (not, say, bytes of a record stored inside the torn entry's value)."""
            try:
                return codec.unpack_entry(payload).index > want
            except ProtocolError:
                return False

        for rec in iter_records(data, len(MAGIC), later_entry):
            if isinstance(rec, Damage):
                if last and rec.at_tail:
                    log.warning("%s: %s at offset %d after entry %d; truncating the torn "
                                "tail (%d bytes)", seg.path, rec.reason, rec.offset, want - 1,
                                len(data) - rec.offset)
                    os.truncate(seg.path, rec.offset)
                    break
                raise CorruptLog(
                    f"{seg.path}: {rec.reason} at offset {rec.offset} (after entry {want - 1}),"
                    f" with {len(data) - rec.offset} bytes after it: the log is corrupt in the "
                    f"middle and entries after it cannot be trusted. {advice}"
                )
            offset, payload = rec
            try:
                entry = codec.unpack_entry(payload)
            except ProtocolError as exc:
                raise CorruptLog(f"{seg.path}: bad entry at offset {offset}: {exc}. {advice}")\
                    from exc
            if entry.index != want:
                raise CorruptLog(f"{seg.path}: entry {entry.index} at offset {offset} where "
                                 f"{want} was expected. {advice}")
            entries.append(entry)
            want += 1
        return entries

    # --- writing -----------------------------------------------------------------------------

    def append(self, entries: list[Entry]) -> None:
        """Write entries to the OS (not yet synced). On failure nothing is left behind."""
        data = encode_entries(entries)
        try:
            write_all(self._fd, data)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.exception("could not cut a failed write back out of %s", self.directory)
            raise StorageFailure(f"could not write to the log: {exc.strerror or reason(exc)}") \
                from exc
        self._size += len(data)

    def sync(self) -> None:
        """fsync the current segment; safe to call from a worker thread."""
        with self._lock:
            os.fsync(self._fd)

    def roll(self, first: int) -> None:
        """Start a new segment whose first entry will be ``first``. If that fails (a full
        disk), the current segment stays in use and nothing changes."""
        with self._lock:
            os.fsync(self._fd)
            seg, fd = self._open_new(first)
            os.close(self._fd)
            self._segments.append(seg)
            self._fd = fd
            self._size = len(MAGIC)

    def _open_new(self, first: int) -> tuple[Segment, int]:
        """Create a segment and open it for appending, or raise leaving nothing behind."""
        try:
            seg = self._create(self.directory, first)
        except OSError as exc:
            (self.directory / segment_name(first)).unlink(missing_ok=True)
            raise StorageFailure(
                f"could not start a new log segment: {exc.strerror or reason(exc)}") from exc
        return seg, os.open(seg.path, os.O_WRONLY | os.O_APPEND)

    def drop_through(self, index: int) -> None:
        """Delete segments whose entries are all at or below ``index``."""
        keep = []
        for n, seg in enumerate(self._segments):
            nxt = self._segments[n + 1].first if n + 1 < len(self._segments) else None
            if nxt is not None and nxt - 1 <= index:
                seg.path.unlink(missing_ok=True)
            else:
                keep.append(seg)
        if len(keep) != len(self._segments):
            self._segments = keep
            fsync_dir(self.directory)

    def truncate_after(self, index: int) -> None:
        """Remove every entry after ``index`` from disk, durably."""
        with self._lock:
            while len(self._segments) > 1 and self._segments[-1].first > index:
                seg = self._segments.pop()
                os.close(self._fd)
                seg.path.unlink()
                self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
            seg = self._segments[-1]
            if seg.first > index + 1:
                raise ValueError(f"cannot truncate to {index}: the log starts at {seg.first}")
            data = seg.path.read_bytes()
            cut = len(data)
            for rec in iter_records(data, len(MAGIC)):
                if isinstance(rec, Damage):
                    break
                offset, payload = rec
                if codec.unpack_entry(payload).index > index:
                    cut = offset
                    break
            os.ftruncate(self._fd, cut)
            os.fsync(self._fd)
            self._size = cut
            fsync_dir(self.directory)

    def reset(self, first: int) -> None:
        """Delete every segment and start empty, next entry ``first`` (after a snapshot
        install)."""
        with self._lock:
            old = [s for s in self._segments if s.first != first]
            for s in self._segments:
                if s.first == first:  # the new segment takes this name: move it aside
                    s.path.unlink()
            seg, fd = self._open_new(first)
            os.close(self._fd)
            self._fd = fd
            for s in old:
                s.path.unlink(missing_ok=True)
            fsync_dir(self.directory)
            self._segments = [seg]
            self._size = len(MAGIC)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1

    @property
    def segments(self) -> list[Path]:
        return [s.path for s in self._segments]
