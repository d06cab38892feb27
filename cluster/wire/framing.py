"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes of payload.

:class:`FrameDecoder` is fed bytes as they arrive and returns complete payloads. It rejects
a frame longer than the limit from its header alone, before buffering the body.
"""

from __future__ import annotations

import struct

from cluster.errors import FrameTooLarge

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size


def encode_frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    def __init__(self, max_frame: int) -> None:
        self._max_frame = max_frame
        self._buffer = bytearray()
        self.error: FrameTooLarge | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return every payload it completes, in order.

        Raises :class:`FrameTooLarge` as soon as a header announces more than the limit.
        Frames completed before that header are returned first, with the error kept in
        :attr:`error` and raised by the next call.
        """
        if self.error is not None:
            raise self.error
        buf = self._buffer
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > self._max_frame:
                self.error = FrameTooLarge(
                    f"frame of {length} bytes exceeds the limit of {self._max_frame} bytes"
                )
                if not frames:
                    raise self.error
                break
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            frames.append(bytes(buf[start : start + length]))
            pos = start + length
        if pos:
            del buf[:pos]
        return frames
