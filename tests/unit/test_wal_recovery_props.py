"""Property tests of recovery from damaged files: random logs written with the project's own
WAL, then cut at a random byte or hit by a random bit flip, then reopened.

The promises checked (docs/PROTOCOL.md, "Write-ahead log"):

- a cut anywhere in the newest segment is a torn tail: reopening recovers exactly the
  longest prefix of whole records (nothing before the cut lost, nothing invented), warns,
  and the log takes appends that survive another reopen;
- a flipped bit is never read as a wrong entry: recovery either stops with CorruptLog naming
  the file and the damaged record's offset, or (the flip is in the last record) cuts that
  record as a torn tail; damage with a valid record after it is always CorruptLog;
- a flipped bit in the snapshot or in the meta file is a clear CorruptLog.

Each example runs in its own temporary directory (Hypothesis reuses a test's fixtures across
examples, so ``tmp_path`` would be shared). Examples are random locally and derived from the
test under CI (the "ci" profile in tests/conftest.py).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.core.state import Replica, snapshot_point
from cluster.errors import CorruptLog
from cluster.storage.records import RECORD_HEADER, Damage, encode_record, iter_records
from cluster.storage.snapshot import MAGIC as SNAPSHOT_MAGIC
from cluster.storage.store import Store
from cluster.storage.wal import MAGIC, WAL
from cluster.types import Entry, Op

EXAMPLES = 150

keys = st.text(max_size=12)
values = st.one_of(st.text(max_size=40), st.binary(max_size=60))


@st.composite
def entry_lists(draw: st.DrawFn, min_size: int = 1, max_size: int = 25) -> list[Entry]:
    """Consecutive entries from index 1, epochs never decreasing, sets and deletes."""
    n = draw(st.integers(min_size, max_size))
    out: list[Entry] = []
    epoch = draw(st.integers(0, 3))
    for index in range(1, n + 1):
        epoch += draw(st.integers(0, 1))
        key = draw(keys)
        if draw(st.integers(0, 4)) == 0:
            out.append(Entry(index, epoch, draw(st.integers(0, 2**40)), Op.DELETE, key, None))
        else:
            out.append(Entry(index, epoch, draw(st.integers(0, 2**40)), Op.SET, key,
                             draw(values)))
    return out


@contextmanager
def fresh_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="walprop-") as d:
        yield Path(d)


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def wal_warnings() -> Iterator[list[str]]:
    """The WAL's warnings during the block (caplog is per test, not per example)."""
    logger = logging.getLogger("cluster.storage.wal")
    handler = Captured()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def write_log(directory: Path, entries: list[Entry], splits: list[int]) -> list[Path]:
    """Write ``entries`` with the WAL, starting a new segment before each index in
    ``splits``; return the segment files, oldest first."""
    wal, got = WAL.open(directory, after=0)
    assert got == []
    for e in entries:
        if e.index in splits:
            wal.roll(e.index)
        wal.append([e])
    wal.sync()
    paths = wal.segments
    wal.close()
    return paths


def record_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every record in a clean segment's bytes."""
    spans = []
    for rec in iter_records(data, len(MAGIC)):
        assert not isinstance(rec, Damage)
        start, payload = rec
        spans.append((start, start + RECORD_HEADER.size + len(payload)))
    return spans


def reopen(directory: Path) -> list[Entry]:
    wal, got = WAL.open(directory, after=0)
    wal.close()
    return got


def more_entries(after: list[Entry], count: int) -> list[Entry]:
    last = after[-1] if after else None
    first = last.index + 1 if last else 1
    epoch = last.epoch + 1 if last else 1
    return [Entry(first + i, epoch, 7, Op.SET, f"after-{i}", b"\x00new") for i in range(count)]


segment_splits = st.lists(st.integers(2, 25), max_size=2, unique=True)


# --- a cut at any byte of the newest segment --------------------------------------------------


@settings(max_examples=EXAMPLES)
@given(entry_lists(), segment_splits, st.data())
def test_a_cut_at_any_byte_recovers_exactly_the_whole_records_before_it(
        entries: list[Entry], splits: list[int], data: st.DataObject) -> None:
    with fresh_dir() as d:
        paths = write_log(d, entries, splits)
        newest = paths[-1]
        raw = newest.read_bytes()
        cut = data.draw(st.integers(0, len(raw)), label="cut")
        newest.write_bytes(raw[:cut])

        first = int(newest.name.split(".")[0])
        whole = sum(1 for _, end in record_spans(raw) if end <= cut)
        expected = [e for e in entries if e.index < first + whole]
        torn = cut < len(MAGIC) or (cut > len(MAGIC) and cut not in
                                   {end for _, end in record_spans(raw)})

        with wal_warnings() as warned:
            got = reopen(d)
        assert got == expected
        if torn:
            assert len(warned) == 1 and "torn" in warned[0] and newest.name in warned[0], warned
        else:
            assert warned == []

        # the cut log takes appends, and both survive another reopen
        extra = more_entries(expected, 3)
        wal, again = WAL.open(d, after=0)
        assert again == expected
        wal.append(extra)
        wal.sync()
        wal.close()
        with wal_warnings() as warned:
            assert reopen(d) == expected + extra
        assert warned == []


# --- a flipped bit anywhere in the log ---------------------------------------------------------


@settings(max_examples=EXAMPLES)
@given(entry_lists(min_size=2), segment_splits, st.data())
def test_a_flipped_bit_is_corruption_or_a_cut_torn_tail_never_a_wrong_entry(
        entries: list[Entry], splits: list[int], data: st.DataObject) -> None:
    with fresh_dir() as d:
        paths = write_log(d, entries, splits)
        which = data.draw(st.integers(0, len(paths) - 1), label="segment")
        seg = paths[which]
        raw = bytearray(seg.read_bytes())
        spans = record_spans(bytes(raw))
        bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
        raw[bit // 8] ^= 1 << (bit % 8)
        seg.write_bytes(bytes(raw))

        pos = bit // 8
        newest = which == len(paths) - 1
        hit = next((n for n, (s, e) in enumerate(spans) if s <= pos < e), None)
        first = int(seg.name.split(".")[0])

        with wal_warnings() as warned:
            try:
                got = reopen(d)
            except CorruptLog as exc:
                message = str(exc)
                assert str(seg) in message
                if hit is not None:  # damage in a record (not the magic) names its offset
                    assert f"offset {spans[hit][0]}" in message, message
                else:
                    assert "magic" in message
                return
        # recovery went on: only a torn last record of the newest segment may do that, and
        # then exactly the entries before it come back
        assert newest and hit == len(spans) - 1, (
            f"a flip at byte {pos} (record {hit} of {len(spans)}, segment {which}) was not "
            f"reported as corruption; recovered {len(got)} entries")
        assert got == [e for e in entries if e.index < first + hit]
        assert len(warned) == 1 and "torn" in warned[0], warned


@settings(max_examples=EXAMPLES)
@given(entry_lists(min_size=2), st.data())
def test_a_flip_in_any_record_but_the_last_is_always_corruption(
        entries: list[Entry], data: st.DataObject) -> None:
    """The sharp half of the property above: with a valid record after the damage, the
    damage can never pass for a torn write, whichever field the flip hit."""
    with fresh_dir() as d:
        (seg,) = write_log(d, entries, [])
        raw = bytearray(seg.read_bytes())
        spans = record_spans(bytes(raw))
        n = data.draw(st.integers(0, len(spans) - 2), label="record")
        start, end = spans[n]
        bit = data.draw(st.integers(start * 8, end * 8 - 1), label="bit")
        raw[bit // 8] ^= 1 << (bit % 8)
        seg.write_bytes(bytes(raw))
        with pytest.raises(CorruptLog) as info:
            reopen(d)
        assert str(seg) in str(info.value) and f"offset {start}" in str(info.value)
        assert seg.read_bytes() == bytes(raw), "a corrupt log must be left as it was found"


# --- snapshot and meta --------------------------------------------------------------------------


def _store_with_snapshot(d: Path, entries: list[Entry]) -> None:
    store, rec = Store.open(d, "n1")
    try:
        store.append(entries)
        store.sync()
        replica = Replica.recovered(rec)
        for e in entries:
            replica.log.append(e)
            replica.kv.apply(e)
        job = store.begin_snapshot(*snapshot_point(replica.log, replica.kv))
        store.write_snapshot(job)
        store.finish_snapshot(job)
        store.set_epoch(entries[-1].epoch)
    finally:
        store.close()


@settings(max_examples=EXAMPLES)
@given(entry_lists(), st.sampled_from(["snapshot", "meta"]), st.data())
def test_a_flipped_bit_in_the_snapshot_or_meta_file_is_a_clear_corruption_error(
        entries: list[Entry], name: str, data: st.DataObject) -> None:
    with fresh_dir() as d:
        _store_with_snapshot(d, entries)
        reopened, _ = Store.open(d, "n1")  # the undamaged store opens and holds everything
        try:
            assert reopened.snapshot_index == entries[-1].index
        finally:
            reopened.close()
        target = d / name
        raw = bytearray(target.read_bytes())
        bit = data.draw(st.integers(0, len(raw) * 8 - 1), label="bit")
        raw[bit // 8] ^= 1 << (bit % 8)
        target.write_bytes(bytes(raw))
        with pytest.raises(CorruptLog) as info:
            Store.open(d, "n1")[0].close()
        message = str(info.value)
        assert str(target) in message and "\n" not in message
        assert "delet" in message  # says what to do about it: delete it, or its wal
        if name == "snapshot" and bit // 8 < len(SNAPSHOT_MAGIC):
            assert "bad magic" in message


# --- the torn-tail heuristic and records inside values -------------------------------------------


def test_a_torn_entry_whose_value_embeds_a_record_is_still_a_torn_tail(tmp_path: Path) -> None:
    """Damage counts as corruption in the middle only when a later entry of this log
    follows it; a whole valid record stored inside the torn entry's value does not."""
    embedded = encode_record(b"a record stored as a value")
    entries = [Entry(1, 1, 1, Op.SET, "k", "v"),
               Entry(2, 1, 2, Op.SET, "backup", b"\x01" * 8 + embedded + b"\x02" * 64)]
    (seg,) = write_log(tmp_path, entries, [])
    raw = seg.read_bytes()
    seg.write_bytes(raw[:-10])  # the crash tore the last write after the embedded bytes
    assert reopen(tmp_path) == entries[:1]
