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


def is_text_header(data: bytes) -> bool:
    """Whether the first bytes of a frame read as text rather than as a length: the answer
    of a peer that speaks a text protocol (HTTP, SSH, SMTP, Redis...), whose "length"
    would be over 150 MB."""
    header = data[:HEADER_SIZE]
    return len(header) == HEADER_SIZE and all(32 <= b < 127 or b in b"\t\r\n" for b in header)


class FrameDecoder:
    def __init__(self, max_frame: int) -> None:
        self._max_frame = max_frame
        self._buffer = bytearray()
        self.error: FrameTooLarge | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a complete frame."""
        return len(self._buffer)

    def held(self, n: int) -> bytes:
        """The first ``n`` bytes held (after an error, from the rejected header on)."""
        return bytes(self._buffer[:n])

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
