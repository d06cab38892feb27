"""Files on disk: the write-ahead log, snapshots and the store that ties them together.

Everything runs in ``tmp_path``; damage is made by editing the files' bytes directly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.core.slave import SlaveCore
from cluster.core.state import Ready, Recovered, Replica, snapshot_point
from cluster.errors import ConfigError, CorruptLog
from cluster.storage.base import SnapshotJob, persist
from cluster.storage.records import (
    RECORD_HEADER,
    Damage,
    encode_record,
    iter_records,
    write_atomic,
)
from cluster.storage.snapshot import SnapshotMeta, parse_snapshot, read_snapshot, write_snapshot
from cluster.storage.store import Store
from cluster.storage.wal import MAGIC, WAL, encode_entries, segment_name
from cluster.types import Entry, NodeId, Op, Value

WAL_LOGGER = "cluster.storage.wal"


def put(index: int, key: str | None = None, value: Value | None = None,
        epoch: int = 1) -> Entry:
    return Entry(index, epoch, 1_000 + index, Op.SET, key if key is not None else f"k{index}",
                 value if value is not None else f"value-{index}")


def delete(index: int, key: str, epoch: int = 1) -> Entry:
    return Entry(index, epoch, 1_000 + index, Op.DELETE, key, None)


def puts(first: int, last: int, epoch: int = 1) -> list[Entry]:
    return [put(i, epoch=epoch) for i in range(first, last + 1)]


def record_offsets(data: bytes) -> list[int]:
    """Offsets of the records in a segment's bytes."""
    out = []
    for rec in iter_records(data, len(MAGIC)):
        assert not isinstance(rec, Damage)
        out.append(rec[0])
    return out


def wal_with(directory: Path, entries: list[Entry]) -> Path:
    """A closed single-segment log holding ``entries``; returns the segment's path."""
    wal, got = WAL.open(directory, after=0)
    assert got == []
    wal.append(entries)
    wal.sync()
    wal.close()
    (seg,) = wal.segments
    return seg


# --- records -------------------------------------------------------------------------------------


def test_records_round_trip_and_report_a_clean_end() -> None:
    data = b"HEAD" + encode_record(b"one") + encode_record(b"") + encode_record(b"three")
    got = list(iter_records(data, 4))
    assert [r[1] for r in got if not isinstance(r, Damage)] == [b"one", b"", b"three"]
    assert len(got) == 3


def test_record_header_layout() -> None:
    rec = encode_record(b"abc")
    length, _crc = RECORD_HEADER.unpack_from(rec)
    assert length == 3 and rec[RECORD_HEADER.size :] == b"abc"


def test_write_atomic_failure_keeps_the_old_file_and_no_tmp(tmp_path: Path) -> None:
    target = tmp_path / "file"
    write_atomic(target, [b"old"])

    def chunks() -> Iterator[bytes]:
        yield b"new"
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, chunks())
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --- WAL -----------------------------------------------------------------------------------------


def test_wal_new_directory_is_empty_and_starts_after_the_snapshot(tmp_path: Path) -> None:
    wal, entries = WAL.open(tmp_path / "wal", after=7)
    assert entries == []
    assert [p.name for p in wal.segments] == [segment_name(8)]
    assert wal.segments[0].read_bytes() == MAGIC
    wal.close()


def test_wal_reopen_and_append(tmp_path: Path) -> None:
    d = tmp_path / "wal"
    wal, _ = WAL.open(d, after=0)
    wal.append(puts(1, 3))
    wal.close()
    wal, entries = WAL.open(d, after=0)
    assert entries == puts(1, 3)
    wal.append(puts(4, 5))
    wal.append([delete(6, "k1")])
    wal.close()
    wal, entries = WAL.open(d, after=0)
    assert entries == [*puts(1, 5), delete(6, "k1")]
    wal.close()


def test_wal_keeps_bytes_and_str_values_apart(tmp_path: Path) -> None:
    es = [put(1, "a", b"\x00bin"), put(2, "b", "text"), put(3, "ключ", "значение")]
    wal_with(tmp_path, es)
    wal, entries = WAL.open(tmp_path, after=0)
    wal.close()
    assert entries == es
    assert type(entries[0].value) is bytes and type(entries[1].value) is str


def test_wal_torn_tail_at_every_byte_of_the_last_record(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    es = puts(1, 4)
    seg = wal_with(tmp_path, es)
    whole = seg.read_bytes()
    last = record_offsets(whole)[-1]
    assert len(whole) - last > RECORD_HEADER.size + 4
    for cut in range(last + 1, len(whole)):
        seg.write_bytes(whole[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=WAL_LOGGER):
            wal, entries = WAL.open(tmp_path, after=0)
        assert entries == es[:-1], cut
        assert seg.stat().st_size == last, cut
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "torn" in warnings[0].getMessage(), cut
        assert str(seg) in warnings[0].getMessage()
        # appending after the repair continues the log, and survives a reopen
        wal.append([put(4, "new", "after-repair")])
        wal.close()
        wal, entries = WAL.open(tmp_path, after=0)
        wal.close()
        assert entries == [*es[:-1], put(4, "new", "after-repair")], cut


def test_wal_cut_at_a_record_boundary_needs_no_repair(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    seg = wal_with(tmp_path, puts(1, 4))
    whole = seg.read_bytes()
    seg.write_bytes(whole[: record_offsets(whole)[-1]])
    with caplog.at_level(logging.WARNING, logger=WAL_LOGGER):
        wal, entries = WAL.open(tmp_path, after=0)
    wal.close()
    assert entries == puts(1, 3)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_wal_flipped_byte_in_the_last_record_is_a_torn_tail(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seg = wal_with(tmp_path, puts(1, 4))
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0xFF
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=WAL_LOGGER):
        wal, entries = WAL.open(tmp_path, after=0)
    wal.close()
    assert entries == puts(1, 3)
    assert "checksum" in caplog.text


@pytest.mark.parametrize("zeros", [1, 7, 8, 9, 4096])
def test_wal_zero_filled_tail_is_cut(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     zeros: int) -> None:
    seg = wal_with(tmp_path, puts(1, 3))
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(b"\x00" * zeros)
    with caplog.at_level(logging.WARNING, logger=WAL_LOGGER):
        wal, entries = WAL.open(tmp_path, after=0)
    assert entries == puts(1, 3)
    assert seg.stat().st_size == size
    assert "torn" in caplog.text
    wal.append([put(4)])
    wal.close()
    wal, entries = WAL.open(tmp_path, after=0)
    wal.close()
    assert entries == puts(1, 4)


def test_wal_zeroed_block_in_the_middle_is_corruption(tmp_path: Path) -> None:
    seg = wal_with(tmp_path, puts(1, 6))
    data = bytearray(seg.read_bytes())
    offsets = record_offsets(bytes(data))
    data[offsets[1] : offsets[3]] = bytes(offsets[3] - offsets[1])
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptLog):
        WAL.open(tmp_path, after=0)


def _assert_says_what_to_do(err: CorruptLog, path: Path) -> None:
    text = str(err)
    assert str(path) in text
    assert "delete" in text.lower() or "restore" in text.lower()


def test_wal_flipped_byte_in_an_early_payload_is_corruption(tmp_path: Path) -> None:
    seg = wal_with(tmp_path, puts(1, 6))
    whole = seg.read_bytes()
    offsets = record_offsets(whole)
    start, end = offsets[1] + RECORD_HEADER.size, offsets[2]
    for pos in range(start, end):
        data = bytearray(whole)
        data[pos] ^= 0x20
        seg.write_bytes(bytes(data))
        with pytest.raises(CorruptLog) as info:
            WAL.open(tmp_path, after=0)
        _assert_says_what_to_do(info.value, seg)
        assert seg.read_bytes() == bytes(data), "a corrupt log must be left as it is"


def test_wal_flipped_bit_in_an_early_record_header_is_corruption(tmp_path: Path) -> None:
    """A damaged length field must not pass for a torn tail: that would silently drop every
    good record after it. Bug: a length that points past the end of the file is taken for a
    torn write, and the rest of the log is truncated away."""
    seg = wal_with(tmp_path, puts(1, 6))
    whole = seg.read_bytes()
    start = record_offsets(whole)[1]
    lost: list[tuple[int, int]] = []
    for pos in range(start, start + RECORD_HEADER.size):
        for bit in range(8):
            data = bytearray(whole)
            data[pos] ^= 1 << bit
            seg.write_bytes(bytes(data))
            try:
                wal, _ = WAL.open(tmp_path, after=0)
            except CorruptLog as exc:
                _assert_says_what_to_do(exc, seg)
                continue
            wal.close()
            lost.append((pos - start, bit))
    assert lost == [], f"(header byte, bit) flips taken for a torn tail, log cut: {lost}"


def test_wal_corrupt_entry_with_a_good_checksum(tmp_path: Path) -> None:
    seg = wal_with(tmp_path, puts(1, 2))
    with seg.open("ab") as f:
        f.write(encode_record(b"\x93\x01\x02\x03"))  # msgpack [1, 2, 3]: not an entry
        f.write(encode_entries([put(4)]))
    with pytest.raises(CorruptLog) as info:
        WAL.open(tmp_path, after=0)
    _assert_says_what_to_do(info.value, seg)


def test_wal_entry_out_of_sequence_is_corruption(tmp_path: Path) -> None:
    seg = wal_with(tmp_path, puts(1, 2))
    with seg.open("ab") as f:
        f.write(encode_entries([put(5)]))
    with pytest.raises(CorruptLog, match="expected"):
        WAL.open(tmp_path, after=0)


def test_wal_bad_magic_is_corruption(tmp_path: Path) -> None:
    seg = wal_with(tmp_path, puts(1, 2))
    seg.write_bytes(b"NOTAWAL!" + seg.read_bytes()[len(MAGIC) :])
    with pytest.raises(CorruptLog, match="magic"):
        WAL.open(tmp_path, after=0)


def test_wal_torn_magic_of_an_empty_last_segment_is_recreated(tmp_path: Path) -> None:
    seg = wal_with(tmp_path, [])
    seg.write_bytes(MAGIC[:3])
    wal, entries = WAL.open(tmp_path, after=0)
    assert entries == []
    wal.append(puts(1, 1))
    wal.close()
    _, entries = WAL.open(tmp_path, after=0)
    assert entries == puts(1, 1)


def test_wal_roll_and_drop_through(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path, after=0)
    wal.append(puts(1, 3))
    wal.roll(4)
    wal.append(puts(4, 6))
    wal.roll(7)
    wal.append(puts(7, 8))
    assert [p.name for p in wal.segments] == [segment_name(1), segment_name(4), segment_name(7)]
    wal.drop_through(5)  # segment 4..6 still holds 6
    assert [p.name for p in wal.segments] == [segment_name(4), segment_name(7)]
    assert not (tmp_path / segment_name(1)).exists()
    wal.drop_through(6)
    assert [p.name for p in wal.segments] == [segment_name(7)]
    wal.drop_through(100)  # never the segment being written
    assert [p.name for p in wal.segments] == [segment_name(7)]
    wal.close()
    wal, entries = WAL.open(tmp_path, after=6)
    assert entries == puts(7, 8)
    wal.append(puts(9, 9))
    wal.close()
    wal, entries = WAL.open(tmp_path, after=8)
    wal.close()
    assert entries == puts(7, 9)


def test_wal_missing_entries_before_the_first_segment(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path, after=0)
    wal.append(puts(1, 3))
    wal.roll(4)
    wal.append(puts(4, 5))
    wal.drop_through(3)
    wal.close()
    with pytest.raises(CorruptLog, match="missing"):
        WAL.open(tmp_path, after=0)
    wal, entries = WAL.open(tmp_path, after=3)
    wal.close()
    assert entries == puts(4, 5)


def test_wal_torn_tail_in_an_older_segment_is_corruption(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path, after=0)
    wal.append(puts(1, 3))
    wal.roll(4)
    wal.append(puts(4, 5))
    wal.close()
    old = tmp_path / segment_name(1)
    data = old.read_bytes()
    old.write_bytes(data[:-3])
    with pytest.raises(CorruptLog) as info:
        WAL.open(tmp_path, after=0)
    _assert_says_what_to_do(info.value, old)


def test_wal_flipped_byte_in_an_older_segment_is_corruption(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path, after=0)
    wal.append(puts(1, 3))
    wal.roll(4)
    wal.append(puts(4, 5))
    wal.close()
    old = tmp_path / segment_name(1)
    data = bytearray(old.read_bytes())
    data[-1] ^= 0x01  # the last record of an older segment
    old.write_bytes(bytes(data))
    with pytest.raises(CorruptLog):
        WAL.open(tmp_path, after=0)


def test_wal_missing_middle_segment_is_corruption(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path, after=0)
    wal.append(puts(1, 3))
    wal.roll(4)
    wal.append(puts(4, 5))
    wal.roll(6)
    wal.append(puts(6, 6))
    wal.close()
    (tmp_path / segment_name(4)).unlink()
    with pytest.raises(CorruptLog):
        WAL.open(tmp_path, after=0)


@pytest.mark.parametrize("keep", [0, 1, 2, 3, 4, 5, 6, 7, 8])
def test_wal_truncate_after_across_segments(tmp_path: Path, keep: int) -> None:
    wal, _ = WAL.open(tmp_path, after=0)
    wal.append(puts(1, 3))
    wal.roll(4)
    wal.append(puts(4, 6))
    wal.roll(7)
    wal.append(puts(7, 8))
    wal.truncate_after(keep)
    wal.append(puts(keep + 1, keep + 1, epoch=2))
    wal.close()
    wal, entries = WAL.open(tmp_path, after=0)
    wal.close()
    assert entries == [*puts(1, keep), *puts(keep + 1, keep + 1, epoch=2)]


def test_wal_truncate_below_the_first_segment_is_refused(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path, after=0)
    wal.append(puts(1, 3))
    wal.roll(4)
    wal.append(puts(4, 5))
    wal.drop_through(3)
    with pytest.raises(ValueError):
        wal.truncate_after(2)
    wal.close()


def test_wal_reset(tmp_path: Path) -> None:
    wal, _ = WAL.open(tmp_path, after=0)
    wal.append(puts(1, 3))
    wal.roll(4)
    wal.append(puts(4, 5))
    wal.reset(20)
    assert [p.name for p in wal.segments] == [segment_name(20)]
    wal.append(puts(20, 21))
    wal.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [segment_name(20)]
    wal, entries = WAL.open(tmp_path, after=19)
    wal.close()
    assert entries == puts(20, 21)


def test_wal_stale_tmp_files_are_removed(tmp_path: Path) -> None:
    wal_with(tmp_path, puts(1, 1))
    (tmp_path / "whatever.tmp").write_bytes(b"junk")
    wal, entries = WAL.open(tmp_path, after=0)
    wal.close()
    assert entries == puts(1, 1)
    assert not (tmp_path / "whatever.tmp").exists()


# --- snapshots -----------------------------------------------------------------------------------

META = SnapshotMeta(index=42, epoch=3, epochs=((1, 1), (3, 30)))
VALUES: dict[str, Value] = {"a": b"\x00\x01", "b": "text", "ключ": "значение", "": b""}
# the map at index 42: each key with the index of the entry that last set it
DATA = KV(VALUES, 42, {"a": 7, "b": 42, "ключ": 30, "": 1})


def write_v1_snapshot(path: Path, meta: SnapshotMeta, values: dict[str, Value]) -> None:
    """A snapshot file as replkv 0.2 wrote it (magic RKVSNAP1, items without indexes)."""
    from cluster.storage.snapshot import MAGIC_V1
    from cluster.wire import codec

    header = {"index": meta.index, "epoch": meta.epoch,
              "epochs": [list(p) for p in meta.epochs], "count": len(values)}
    items = [x for kv in values.items() for x in kv]
    write_atomic(path, [MAGIC_V1, encode_record(codec.pack_obj(header)),
                        *([encode_record(codec.pack_obj(items))] if items else []),
                        encode_record(codec.pack_obj({"end": len(values)}))])


def test_snapshot_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "snapshot"
    write_snapshot(path, META, DATA)
    assert path.read_bytes().startswith(b"RKVSNAP2")
    meta, data = read_snapshot(path)
    assert meta == META
    assert data == DATA  # values, applied and each key's index
    assert data.indexes == {"a": 7, "b": 42, "ключ": 30, "": 1}
    assert type(data.data["a"]) is bytes and type(data.data["b"]) is str
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot"]


def test_a_version_1_snapshot_is_read_with_its_own_index_for_every_key(tmp_path: Path) -> None:
    path = tmp_path / "snapshot"
    write_v1_snapshot(path, META, VALUES)
    meta, data = read_snapshot(path)
    assert meta == META
    assert data.data == VALUES and data.applied == 42
    assert data.indexes == dict.fromkeys(VALUES, 42)  # the newest each can have been set at
    with path.open("rb") as f:  # the master reads the index of the file it streams
        from cluster.storage.snapshot import read_index
        assert read_index(f) == 42


def test_snapshot_of_an_empty_map(tmp_path: Path) -> None:
    path = tmp_path / "snapshot"
    write_snapshot(path, SnapshotMeta(0, 0, ()), KV())
    assert read_snapshot(path) == (SnapshotMeta(0, 0, ()), KV())
    write_v1_snapshot(path, SnapshotMeta(0, 0, ()), {})
    assert read_snapshot(path) == (SnapshotMeta(0, 0, ()), KV())


def test_snapshot_with_many_records(tmp_path: Path) -> None:
    data = KV({f"key-{i:05d}": str(i) for i in range(10_000)}, 42,
              {f"key-{i:05d}": i % 42 + 1 for i in range(10_000)})
    path = tmp_path / "snapshot"
    write_snapshot(path, META, data)
    assert read_snapshot(path) == (META, data)


def test_snapshot_overwrite_is_atomic_and_leaves_no_tmp(tmp_path: Path) -> None:
    path = tmp_path / "snapshot"
    write_snapshot(path, META, DATA)
    newer = SnapshotMeta(50, 4, ((1, 1), (3, 30), (4, 45)))
    write_snapshot(path, newer, KV({"x": "y"}, 50, {"x": 45}))
    assert read_snapshot(path) == (newer, KV({"x": "y"}, 50, {"x": 45}))
    assert not list(tmp_path.glob("*.tmp"))


@pytest.fixture(params=["v2", "v1"])
def snapshot_file(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A snapshot of META/DATA as this version writes it, and as 0.2 did."""
    path = tmp_path / "snapshot"
    if request.param == "v2":
        write_snapshot(path, META, DATA)
    else:
        write_v1_snapshot(path, META, VALUES)
    return path


def test_snapshot_flipped_byte_anywhere_is_corruption(snapshot_file: Path) -> None:
    path = snapshot_file
    raw = path.read_bytes()
    for pos in range(len(raw)):
        for mask in (0x01, 0x80):
            data = bytearray(raw)
            data[pos] ^= mask
            with pytest.raises(CorruptLog) as info:
                parse_snapshot(bytes(data), str(path))
            assert str(path) in str(info.value) and "delete" in str(info.value)
    # and through the file, once
    data = bytearray(raw)
    data[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptLog):
        read_snapshot(path)


def test_snapshot_cut_short_anywhere_is_corruption(snapshot_file: Path) -> None:
    path = snapshot_file
    raw = path.read_bytes()
    for cut in range(len(raw)):
        with pytest.raises(CorruptLog):
            parse_snapshot(raw[:cut], "snap")
    path.write_bytes(raw[:-1])
    with pytest.raises(CorruptLog):
        read_snapshot(path)


def test_snapshot_with_trailing_bytes_is_corruption(snapshot_file: Path) -> None:
    from cluster.storage.snapshot import MAGIC as SNAP_MAGIC
    from cluster.storage.snapshot import MAGIC_V1

    assert (SNAP_MAGIC, MAGIC_V1) == (b"RKVSNAP2", b"RKVSNAP1")
    raw = snapshot_file.read_bytes()
    with pytest.raises(CorruptLog):
        parse_snapshot(raw + encode_record(b"\x90"), "snap")
    with pytest.raises(CorruptLog):
        parse_snapshot(raw + b"\x01", "snap")


def test_snapshot_with_the_wrong_count_is_corruption() -> None:
    from cluster.storage.snapshot import MAGIC as SNAP_MAGIC
    from cluster.storage.snapshot import MAGIC_V1
    from cluster.wire import codec

    def parse(magic: bytes, *items: list[Any]) -> tuple[SnapshotMeta, KV]:
        header = encode_record(codec.pack_obj({"index": 5, "epoch": 1, "epochs": [[1, 1]],
                                               "count": 2}))
        end = encode_record(codec.pack_obj({"end": 2}))
        return parse_snapshot(magic + header + b"".join(encode_record(codec.pack_obj(i))
                                                        for i in items) + end, "snap")

    with pytest.raises(CorruptLog, match="expected 2 items"):
        parse(SNAP_MAGIC, ["a", "1", 3])
    with pytest.raises(CorruptLog, match="expected 2 items"):
        parse(SNAP_MAGIC, ["a", "1", 3, "a", "2", 4])  # one key twice
    assert parse(SNAP_MAGIC, ["a", "1", 3, "b", "2", 5])[1] == KV({"a": "1", "b": "2"}, 5,
                                                                  {"a": 3, "b": 5})
    for bad in (["a", 1, 3, "b", "2", 4],  # a value that is neither str nor bin
                ["a", "1", "3", "b", "2", 4],  # an index that is not an int
                ["a", "1", True, "b", "2", 4],
                ["a", "1", 0, "b", "2", 4],  # no entry 0
                ["a", "1", 6, "b", "2", 4],  # set after the snapshot's own index
                ["a", "1", "b", "2"]):  # version-1 items in a version-2 file
        with pytest.raises(CorruptLog, match=r"wrong type|zip\(\)"):
            parse(SNAP_MAGIC, bad)
    with pytest.raises(CorruptLog, match="expected 2 items"):
        parse(MAGIC_V1, ["a", "1"])
    with pytest.raises(CorruptLog, match="wrong type"):
        parse(MAGIC_V1, ["a", 1, "b", "2"])
    assert parse(MAGIC_V1, ["a", "1", "b", "2"])[1] == KV({"a": "1", "b": "2"}, 5)


# --- the store -----------------------------------------------------------------------------------


class Opened:
    """A store as a node holds it: the files plus the log and map a core builds from what
    the store recovered. Cuts go through the real slave core and :func:`persist`."""

    def __init__(self, store: Store, rec: Recovered) -> None:
        self.files = store
        self.replica = Replica.recovered(rec)

    @classmethod
    def open(cls, directory: Path, node: str) -> Opened:
        return cls(*Store.open(directory, node))

    def __getattr__(self, name: str) -> Any:  # the store's own methods and attributes
        return getattr(self.files, name)

    @property
    def log(self) -> Log:
        return self.replica.log

    @property
    def kv(self) -> KV:
        return self.replica.kv

    def cut(self, match: int) -> list[Entry]:
        """What a slave does when the master answers its sync with ``match``."""
        core = SlaveCore(NodeId(self.files.node), self.replica)
        core.connect(1)
        ready = core.on_sync_reply(self.files.epoch, match, snapshot=False)
        core.advance(ready, persist(self.files, ready))
        self.replica = core.handover()
        return list(ready.truncate.removed) if ready.truncate else []

    def begin(self) -> SnapshotJob:
        return self.files.begin_snapshot(*snapshot_point(self.log, self.kv))

    def finish(self, job: SnapshotJob) -> None:
        self.files.finish_snapshot(job)
        self.replica.snapshot_index = job.meta.index
        self.log.compact_to(job.drop_through)

    def install(self, path: Path) -> SnapshotMeta:
        rec = self.files.install_snapshot(path)
        self.replica = Replica.recovered(rec)
        return rec.snapshot


def write(store: Opened, entries: list[Entry]) -> None:
    """What the runtime does with a write: log it, then append and apply it in memory."""
    store.append(entries)
    for e in entries:
        store.log.append(e)
        store.kv.apply(e)


def state(store: Opened) -> tuple[list[Entry], dict[str, Value], dict[str, int], int]:
    """The log, and the map with the index that set each key."""
    lg = store.log
    kv = store.kv
    return lg.slice(lg.base + 1, lg.last_index), dict(kv.data), dict(kv.indexes), kv.applied


def reopen(store: Opened) -> Opened:
    store.close()
    return Opened.open(store.directory, store.node)


def test_store_new_directory(tmp_path: Path) -> None:
    store = Opened.open(tmp_path / "n1", "n1")
    assert (store.log.last_index, store.kv.applied, store.epoch) == (0, 0, 0)
    assert (tmp_path / "n1" / "meta").exists()
    store.close()


def test_store_recovers_log_and_kv(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    write(store, [put(1, "a", "1"), put(2, "b", b"2"), put(3, "a", "3", epoch=2),
                  delete(4, "b", epoch=2)])
    store.sync()
    before = state(store)
    store = reopen(store)
    assert state(store) == before
    assert store.kv.data == {"a": "3"} and store.kv.indexes == {"a": 3}
    assert store.log.history.pairs() == ((1, 1), (2, 3))
    assert store.epoch == 2  # at least the newest epoch in the log
    write(store, [put(5, "c", "5", epoch=2)])
    store = reopen(store)
    assert store.kv.data == {"a": "3", "c": "5"}
    store.close()


def test_store_epoch_is_durable(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    store.set_epoch(7)
    store = reopen(store)
    assert store.epoch == 7
    store.close()


def test_store_vote_is_durable_with_its_epoch(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    persist(store.files, Ready(epoch=3, vote="n2"))
    store = reopen(store)
    assert (store.epoch, store.vote, store.replica.epoch) == (3, "n2", 3)
    files, rec = store.files, None
    files.close()
    files, rec = Store.open(tmp_path, "n1")
    assert (rec.epoch, rec.vote) == (3, "n2")
    persist(files, Ready(epoch=4))  # a newer epoch: no vote cast in it yet
    files.close()
    files, rec = Store.open(tmp_path, "n1")
    assert (rec.epoch, rec.vote) == (4, None)
    files.append([put(1, epoch=6)])  # the log is ahead of the meta file: no vote known
    files.sync()
    files.close()
    files, rec = Store.open(tmp_path, "n1")
    assert (rec.epoch, rec.vote) == (6, None)
    files.close()


def test_store_second_open_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    with pytest.raises(ConfigError, match="in use"):
        Store.open(tmp_path, "n1")
    store.close()
    Opened.open(tmp_path, "n1").close()


def test_store_of_another_node_is_refused(tmp_path: Path) -> None:
    Opened.open(tmp_path, "n1").close()
    with pytest.raises(ConfigError, match="n1"):
        Store.open(tmp_path, "n2")
    # the refusal released the lock
    Opened.open(tmp_path, "n1").close()


def test_store_damaged_meta_is_corruption(tmp_path: Path) -> None:
    Opened.open(tmp_path, "n1").close()
    (tmp_path / "meta").write_bytes(b"\x00\x00\x00\x05garbage")
    with pytest.raises(CorruptLog, match="meta") as info:
        Store.open(tmp_path, "n1")
    assert "delet" in str(info.value)


def test_store_corrupt_log_stops_the_open_and_releases_the_lock(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    write(store, puts(1, 5))
    store.close()
    (seg,) = (tmp_path / "wal").glob("*.wal")
    data = bytearray(seg.read_bytes())
    data[len(MAGIC) + RECORD_HEADER.size + 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptLog):
        Store.open(tmp_path, "n1")
    with pytest.raises(CorruptLog):  # not ConfigError: the lock was released
        Store.open(tmp_path, "n1")


def snapshot(store: Opened) -> None:
    job = store.begin()
    assert store.snapshotting
    store.write_snapshot(job)
    store.finish(job)
    assert not store.snapshotting


def test_store_snapshot_cycle(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    write(store, puts(1, 5))
    snapshot(store)
    assert store.snapshot_index == 5
    assert store.log.base == 0  # the first snapshot has no predecessor to drop through
    write(store, [put(6, "k1", "changed"), delete(7, "k2")])
    before = state(store)
    store = reopen(store)
    assert state(store) == before
    assert store.snapshot_index == 5
    assert store.kv.data["k1"] == "changed" and "k2" not in store.kv.data
    assert store.kv.indexes == {"k1": 6, "k3": 3, "k4": 4, "k5": 5}
    assert store.kv.applied == 7
    store.close()


def test_store_two_snapshot_cycles_drop_old_segments(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    write(store, puts(1, 5))
    snapshot(store)
    write(store, puts(6, 8, epoch=2))
    snapshot(store)
    # entries between the previous snapshot (5) and this one (8) stay; older ones go
    assert store.snapshot_index == 8
    assert store.log.base == 5
    assert store.log.last_index == 8
    assert store.log.epoch_at(5) == 1
    wal_files = sorted(p.name for p in (tmp_path / "wal").glob("*.wal"))
    assert wal_files == [segment_name(6), segment_name(9)]
    write(store, puts(9, 10, epoch=2))
    before = state(store)
    history = store.log.history.pairs()
    store = reopen(store)
    assert state(store) == before
    assert store.log.base == 5
    assert store.log.history.pairs() == history == ((1, 1), (2, 6))
    assert store.log.epoch_at(5) == 1 and store.log.epoch_at(6) == 2
    # a third cycle drops the segment of 6..8
    snapshot(store)
    assert sorted(p.name for p in (tmp_path / "wal").glob("*.wal")) == [segment_name(9),
                                                                        segment_name(11)]
    store = reopen(store)
    assert store.log.base == 8 and store.kv.applied == 10
    store.close()


def test_store_snapshot_with_nothing_after_it_reopens(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    write(store, puts(1, 3))
    snapshot(store)
    snapshot(store)  # the second at the same index drops 1..3
    assert store.log.base == 3
    store = reopen(store)
    assert (store.log.base, store.log.last_index, store.kv.applied) == (3, 3, 3)
    assert store.log.epoch_at(3) == 1
    write(store, puts(4, 4))
    store = reopen(store)
    assert store.kv.applied == 4 and len(store.kv.data) == 4
    store.close()


def test_store_snapshot_due(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    write(store, puts(1, 3))
    assert not store.snapshot_due(store.kv.applied, 4)
    write(store, puts(4, 4))
    assert store.snapshot_due(store.kv.applied, 4)
    job = store.begin()
    assert not store.snapshot_due(store.kv.applied, 4)  # one at a time
    store.abort_snapshot()
    assert store.snapshot_due(store.kv.applied, 4)
    store.write_snapshot(job)
    store.finish(job)
    assert not store.snapshot_due(store.kv.applied, 1)
    store.close()


def test_store_truncate_after_keeps_a_rollback_file_and_rebuilds_the_map(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    write(store, [put(1, "kept", "1"), put(2, "over", "old"), put(3, "over", "new"),
                  put(4, "late", "x"), delete(5, "kept")])
    removed = store.cut(2)
    assert [e.index for e in removed] == [3, 4, 5]
    assert store.kv.data == {"kept": "1", "over": "old"}
    assert store.kv.indexes == {"kept": 1, "over": 2}
    assert store.kv.applied == 2 and store.log.last_index == 2
    (rb,) = (tmp_path / "rollback").iterdir()
    assert rb.name.startswith("rollback-3-5")
    # the rollback file is a log segment holding exactly the cut entries
    assert _read_rollback(rb) == removed
    write(store, [put(3, "other", "y", epoch=2)])
    before = state(store)
    store = reopen(store)
    assert state(store) == before
    assert store.kv.data == {"kept": "1", "over": "old", "other": "y"}
    assert store.cut(3) == []
    store.close()


def _read_rollback(path: Path) -> list[Entry]:
    from cluster.storage.wal import Segment

    return WAL._read_segment(Segment(int(path.name.split("-")[1]), path), last=False,
                             expect=None)


def test_store_truncate_after_a_snapshot(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    write(store, [put(1, "a", "1"), put(2, "b", "2")])
    snapshot(store)
    write(store, [put(3, "a", "3"), put(4, "c", "4")])
    store.cut(3)
    assert store.kv.data == {"a": "3", "b": "2"} and store.kv.indexes == {"a": 3, "b": 2}
    store.cut(2)  # the map is rebuilt from the snapshot, with its indexes
    assert store.kv.data == {"a": "1", "b": "2"} and store.kv.indexes == {"a": 1, "b": 2}
    assert store.snapshot_index == 2
    store = reopen(store)
    assert store.kv.data == {"a": "1", "b": "2"} and store.log.last_index == 2
    write(store, [put(3, "d", "new", epoch=2)])
    store = reopen(store)
    assert store.kv.data == {"a": "1", "b": "2", "d": "new"}
    store.close()


def test_store_truncate_below_the_snapshot_wipes(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    store = Opened.open(tmp_path, "n1")
    write(store, puts(1, 4))
    snapshot(store)
    write(store, puts(5, 6))
    with caplog.at_level(logging.WARNING):
        removed = store.cut(2)
    assert [e.index for e in removed] == [1, 2, 3, 4, 5, 6]
    assert (store.log.base, store.log.last_index, store.kv.data, store.kv.applied) == (
        0, 0, {}, 0)
    assert store.snapshot_index == 0
    assert not store.snapshot_path.exists()
    assert "discarding" in caplog.text
    # the snapshot is kept beside the cut entries: what was compacted is not lost silently
    kept = tmp_path / "rollback" / "snapshot-4-e0"
    assert read_snapshot(kept)[1].data == {f"k{i}": f"value-{i}" for i in range(1, 5)}
    store = reopen(store)
    assert (store.log.last_index, store.kv.data, store.snapshot_index) == (0, {}, 0)
    write(store, puts(1, 1, epoch=3))
    store = reopen(store)
    assert store.kv.data == {"k1": "value-1"}
    store.close()


def test_store_install_snapshot(tmp_path: Path) -> None:
    store = Opened.open(tmp_path / "n2", "n2")
    write(store, puts(1, 3))
    received = tmp_path / "n2" / "snapshot.recv"
    write_snapshot(received, META, DATA)
    meta = store.install(received)
    assert meta == META
    assert not received.exists()
    assert (store.log.base, store.log.last_index, store.log.last_epoch) == (42, 42, 3)
    assert store.log.history.pairs() == META.epochs
    assert store.kv == DATA and store.snapshot_index == 42
    write(store, [put(43, "after", "snap", epoch=3)])
    store = reopen(store)
    assert store.kv.data == {**VALUES, "after": "snap"}
    assert store.kv.indexes == {**DATA.indexes, "after": 43}
    assert (store.log.base, store.log.last_index, store.snapshot_index) == (42, 43, 42)
    assert store.log.epoch_at(42) == 3 and store.log.epoch_at(29) == 1
    store.close()


def test_store_install_of_a_damaged_snapshot_changes_nothing(tmp_path: Path) -> None:
    store = Opened.open(tmp_path / "n2", "n2")
    write(store, puts(1, 3))
    received = tmp_path / "snapshot.recv"
    write_snapshot(received, META, DATA)
    received.write_bytes(received.read_bytes()[:-2])
    before = state(store)
    with pytest.raises(CorruptLog):
        store.install(received)
    assert state(store) == before
    store = reopen(store)
    assert state(store) == before
    store.close()


def test_store_damaged_snapshot_stops_the_open(tmp_path: Path) -> None:
    store = Opened.open(tmp_path, "n1")
    write(store, puts(1, 3))
    snapshot(store)
    store.close()
    raw = bytearray((tmp_path / "snapshot").read_bytes())
    raw[-3] ^= 0x10
    (tmp_path / "snapshot").write_bytes(bytes(raw))
    with pytest.raises(CorruptLog, match="snapshot"):
        Store.open(tmp_path, "n1")


def test_store_installs_a_version_1_snapshot_from_an_older_master(tmp_path: Path) -> None:
    """The master streams its snapshot file byte for byte: a master not yet upgraded sends
    version 1, which an upgraded slave installs (each key at the snapshot's index)."""
    store = Opened.open(tmp_path / "n2", "n2")
    received = tmp_path / "n2" / "snapshot.recv"
    write_v1_snapshot(received, META, VALUES)
    assert store.install(received) == META
    assert store.kv == KV(VALUES, 42) and store.kv.get("a") == (b"\x00\x01", 42)
    assert store.log.epoch_at(42) == 3  # so each key's token is 3:42
    write(store, [put(43, "a", "newer", epoch=3)])
    store = reopen(store)
    assert store.kv.indexes == {**dict.fromkeys(VALUES, 42), "a": 43}
    store.close()


def test_an_upgraded_node_recovers_from_a_version_1_data_directory(tmp_path: Path) -> None:
    """A data directory of 0.2: a version-1 snapshot at 3 and the log after it. The keys of
    the snapshot get its index, later keys their own; the next snapshot is version 2 and
    keeps exactly those."""
    store = Opened.open(tmp_path, "n1")
    write(store, [put(1, "a", "1"), put(2, "b", "2"), put(3, "c", "3")])
    snapshot(store)
    write(store, [put(4, "c", "4"), put(5, "d", "5")])
    store.sync()
    store.close()
    write_v1_snapshot(tmp_path / "snapshot", SnapshotMeta(3, 1, ((1, 1),)),
                      {"a": "1", "b": "2", "c": "3"})  # what 0.2 wrote at 3
    store = Opened.open(tmp_path, "n1")
    assert store.kv.data == {"a": "1", "b": "2", "c": "4", "d": "5"}
    # a and b were set at 1 and 2, which the old snapshot does not say: 3 is the best known
    assert store.kv.indexes == {"a": 3, "b": 3, "c": 4, "d": 5}
    assert store.kv.applied == 5
    write(store, [put(6, "d", "6")])
    snapshot(store)
    assert (tmp_path / "snapshot").read_bytes().startswith(b"RKVSNAP2")
    before = state(store)
    store = reopen(store)
    assert state(store) == before
    store.close()


def test_store_install_of_a_snapshot_of_another_index_changes_nothing(tmp_path: Path) -> None:
    """A snapshot whose header names another index than the master announced is refused
    before it replaces anything."""
    store = Opened.open(tmp_path / "n2", "n2")
    write(store, puts(1, 3))
    received = tmp_path / "n2" / "snapshot.recv"
    write_snapshot(received, META, DATA)
    before = state(store)
    with pytest.raises(CorruptLog, match=f"covers index {META.index}, not the 7"):
        store.files.install_snapshot(received, expect_index=7)
    assert state(store) == before and not store.snapshot_path.exists()
    store = reopen(store)
    assert state(store) == before
    store.close()
