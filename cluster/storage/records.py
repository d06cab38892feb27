"""Checksummed records, the unit of every file replkv writes.

A record is an 8-byte header, ``length`` (u32 big-endian) and ``crc32(length bytes +
payload)`` (u32 big-endian), followed by ``length`` bytes of payload.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

RECORD_HEADER = struct.Struct(">II")
MAX_RECORD = 64 * 1024 * 1024


def encode_record(payload: bytes) -> bytes:
    length = len(payload)
    lb = length.to_bytes(4, "big")
    return RECORD_HEADER.pack(length, zlib.crc32(payload, zlib.crc32(lb))) + payload


@dataclass(frozen=True, slots=True)
class Damage:
    """Where reading stopped early: a damaged record at ``offset``."""

    offset: int
    reason: str
    at_tail: bool  # nothing valid could follow it: a torn write, not corruption


def iter_records(data: bytes, start: int,
                 belongs: Callable[[bytes], bool] = lambda payload: True,
                 ) -> Iterator[tuple[int, bytes] | Damage]:
    """Yield ``(offset, payload)`` for each record from ``start``, then a :class:`Damage`
    if the data does not end exactly at a record boundary.

    Damage is a torn final write (``at_tail``) unless a valid record that ``belongs`` to
    the file (checked on its payload when the damage is found) starts somewhere after it:
    a record whose bytes merely appear inside a torn record's value does not count."""
    pos = start
    end = len(data)
    while pos < end:
        if end - pos < RECORD_HEADER.size:
            yield Damage(pos, "partial record header", at_tail=True)
            return
        length, crc = RECORD_HEADER.unpack_from(data, pos)
        body = pos + RECORD_HEADER.size
        if length == 0 and crc == 0 and not any(data[pos:]):
            yield Damage(pos, "zero-filled tail", at_tail=True)
            return
        if length > MAX_RECORD:
            yield Damage(pos, f"record length {length} is impossible", at_tail=False)
            return
        if body + length > end:
            # a torn write, or a damaged length field with good records after it
            yield Damage(pos, "record cut short",
                         at_tail=not _record_follows(data, pos + 1, belongs))
            return
        payload = data[body : body + length]
        if zlib.crc32(payload, zlib.crc32(length.to_bytes(4, "big"))) != crc:
            yield Damage(pos, "checksum mismatch", at_tail=body + length == end
                         and not _record_follows(data, pos + 1, belongs))
            return
        yield pos, payload
        pos = body + length


def _record_follows(data: bytes, start: int, belongs: Callable[[bytes], bool]) -> bool:
    """Whether a whole, valid record of this file begins anywhere from ``start``: then the
    damage before it is not a torn final write. Only runs when damage was found."""
    end = len(data)
    for pos in range(start, end - RECORD_HEADER.size):
        length, crc = RECORD_HEADER.unpack_from(data, pos)
        body = pos + RECORD_HEADER.size
        if 0 < length <= end - body:
            payload = data[body : body + length]
            if zlib.crc32(payload, zlib.crc32(length.to_bytes(4, "big"))) == crc \
                    and belongs(payload):
                return True
    return False


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, chunks: Iterator[bytes] | list[bytes]) -> None:
    """Write a file so that after a crash it is either the old one or the whole new one:
    a temporary file, fsync, rename over the target, fsync of the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in chunks:
            write_all(fd, chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
