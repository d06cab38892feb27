"""Snapshots: the whole map at one log index, written atomically.

File layout: the magic ``RKVSNAP2``, then records: a header map ``{index, epoch, epochs,
count}``, item records (each an array ``[key, value, index, key, value, index, ...]``, the
index being that of the entry that last set the key), and an end record ``{"end": count}``.
A snapshot is only used when every record checks out.

Version 1 (magic ``RKVSNAP1``, items ``[key, value, ...]``, written by replkv 0.2 and
earlier) is still read, from a data directory or from a master that streams one: it does not
say which entry set each key, so each key is given the snapshot's own index, the newest
entry that can have set it (its token then names a write at least as new as the real one).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cluster.core.kv import KV
from cluster.core.state import SnapshotMeta
from cluster.errors import BadFrame, CorruptLog
from cluster.storage.records import (
    RECORD_HEADER,
    Damage,
    encode_record,
    iter_records,
    write_atomic,
)
from cluster.types import Value
from cluster.wire import codec

MAGIC = b"RKVSNAP2"  # what is written
MAGIC_V1 = b"RKVSNAP1"  # still read: items without their index
ITEMS_PER_RECORD = 4096


__all__ = ["MAGIC", "MAGIC_V1", "SnapshotMeta", "parse_snapshot", "read_index", "read_snapshot",
           "write_snapshot"]


def _chunks(meta: SnapshotMeta, data: KV) -> Iterator[bytes]:
    yield MAGIC
    yield encode_record(codec.pack_obj({
        "index": meta.index, "epoch": meta.epoch,
        "epochs": [list(p) for p in meta.epochs], "count": len(data),
    }))
    batch: list[Any] = []
    for item in data.items():
        batch.extend(item)
        if len(batch) >= 3 * ITEMS_PER_RECORD:
            yield encode_record(codec.pack_obj(batch))
            batch = []
    if batch:
        yield encode_record(codec.pack_obj(batch))
    yield encode_record(codec.pack_obj({"end": len(data)}))


def write_snapshot(path: Path, meta: SnapshotMeta, data: KV) -> None:
    """Write atomically (always the newest version). ``data`` must not change meanwhile
    (pass a copy)."""
    write_atomic(path, _chunks(meta, data))


def read_snapshot(path: Path) -> tuple[SnapshotMeta, KV]:
    """Load and verify a snapshot of either version; :class:`CorruptLog` if any part is
    damaged."""
    raw = path.read_bytes()
    return parse_snapshot(raw, str(path))


def read_index(f: IO[bytes]) -> int:
    """The log index a snapshot file covers, from its header (the file is left at 0)."""
    head = f.read(len(MAGIC) + RECORD_HEADER.size)
    if not head.startswith((MAGIC, MAGIC_V1)) or len(head) < len(MAGIC) + RECORD_HEADER.size:
        raise CorruptLog(f"snapshot {getattr(f, 'name', '?')} has no valid header")
    length, _ = RECORD_HEADER.unpack_from(head, len(MAGIC))
    try:
        index = int(codec.unpack_obj(f.read(length))["index"])
    except (BadFrame, KeyError, TypeError, ValueError) as exc:
        raise CorruptLog(f"snapshot {getattr(f, 'name', '?')} has a damaged header") from exc
    f.seek(0)
    return index


def parse_snapshot(raw: bytes, name: str) -> tuple[SnapshotMeta, KV]:
    def corrupt(why: str) -> CorruptLog:
        return CorruptLog(f"snapshot {name} is damaged ({why}); delete it and the node's "
                          "wal/ directory to resynchronise this node from the master")

    if raw.startswith(MAGIC):
        width = 3  # key, value, index
    elif raw.startswith(MAGIC_V1):
        width = 2  # key, value
    else:
        raise corrupt("bad magic")
    meta: SnapshotMeta | None = None
    data: dict[str, Value] = {}
    indexes: dict[str, int] = {}
    count = -1
    ended = False
    try:
        for rec in iter_records(raw, len(MAGIC)):
            if isinstance(rec, Damage):
                raise corrupt(f"{rec.reason} at offset {rec.offset}")
            if ended:
                raise corrupt("records after the end")
            obj = codec.unpack_obj(rec[1])
            if meta is None:
                meta = SnapshotMeta(int(obj["index"]), int(obj["epoch"]),
                                    tuple((int(e), int(i)) for e, i in obj["epochs"]))
                count = int(obj["count"])
            elif isinstance(obj, dict):
                if obj.get("end") != count or len(data) != count:
                    raise corrupt(f"expected {count} items, found {len(data)}")
                ended = True
            elif width == 3:
                it = iter(obj)
                for key, value, index in zip(it, it, it, strict=True):
                    if not isinstance(key, str) or not isinstance(value, bytes | str) \
                            or type(index) is not int or not 0 < index <= meta.index:
                        raise corrupt("an item of the wrong type")
                    data[key] = value
                    indexes[key] = index
            else:
                it = iter(obj)
                for key, value in zip(it, it, strict=True):
                    if not isinstance(key, str) or not isinstance(value, bytes | str):
                        raise corrupt("an item of the wrong type")
                    data[key] = value
    except (BadFrame, KeyError, TypeError, ValueError) as exc:
        raise corrupt(str(exc)) from exc
    if meta is None or not ended:
        raise corrupt("it ends early")
    if width == 2:
        indexes = dict.fromkeys(data, meta.index)  # the best known answer: see above
    return meta, KV(data, meta.index, indexes)
