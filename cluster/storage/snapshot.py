"""Snapshots: the whole map at one log index, written atomically.

File layout: the magic ``RKVSNAP1``, then records: a header map ``{index, epoch, epochs,
count}``, item records (each an array ``[key, value, key, value, ...]``), and an end record
``{"end": count}``. A snapshot is only used when every record checks out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import BadFrame, CorruptLog
from cluster.storage.records import Damage, encode_record, iter_records, write_atomic
from cluster.types import Value
from cluster.wire import codec

MAGIC = b"RKVSNAP1"
ITEMS_PER_RECORD = 4096


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    index: int  # the last log index included
    epoch: int  # the epoch of that entry
    epochs: tuple[tuple[int, int], ...]  # epoch history up to ``index``


def _chunks(meta: SnapshotMeta, data: dict[str, Value]) -> Iterator[bytes]:
    yield MAGIC
    yield encode_record(codec.pack_obj({
        "index": meta.index, "epoch": meta.epoch,
        "epochs": [list(p) for p in meta.epochs], "count": len(data),
    }))
    batch: list[Any] = []
    for key, value in data.items():
        batch.append(key)
        batch.append(value)
        if len(batch) >= 2 * ITEMS_PER_RECORD:
            yield encode_record(codec.pack_obj(batch))
            batch = []
    if batch:
        yield encode_record(codec.pack_obj(batch))
    yield encode_record(codec.pack_obj({"end": len(data)}))


def write_snapshot(path: Path, meta: SnapshotMeta, data: dict[str, Value]) -> None:
    """Write atomically. ``data`` must not change meanwhile (pass a copy)."""
    write_atomic(path, _chunks(meta, data))


def read_snapshot(path: Path) -> tuple[SnapshotMeta, dict[str, Value]]:
    """Load and verify a snapshot; :class:`CorruptLog` if any part is damaged."""
    raw = path.read_bytes()
    return parse_snapshot(raw, str(path))


def parse_snapshot(raw: bytes, name: str) -> tuple[SnapshotMeta, dict[str, Value]]:
    def corrupt(why: str) -> CorruptLog:
        return CorruptLog(f"snapshot {name} is damaged ({why}); delete it and the node's "
                          "wal/ directory to resynchronise this node from the master")

    if not raw.startswith(MAGIC):
        raise corrupt("bad magic")
    meta: SnapshotMeta | None = None
    data: dict[str, Value] = {}
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
    return meta, data
