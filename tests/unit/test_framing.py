"""FrameDecoder: whole input, byte by byte, with trailing bytes, and at the size limit."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.errors import FrameTooLarge, ProtocolError
from cluster.wire.framing import HEADER_SIZE, FrameDecoder, encode_frame

PAYLOADS = [b"", b"a", b"hello", bytes(range(256)), b"\x00" * 7, b"x" * 1000]


def stream_of(payloads: list[bytes]) -> bytes:
    return b"".join(encode_frame(p) for p in payloads)


def feed_in_pieces(dec: FrameDecoder, data: bytes, cuts: list[int]) -> list[bytes]:
    out: list[bytes] = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        out.extend(dec.feed(data[prev:cut]))
        prev = cut
    return out


def test_encode_frame_is_big_endian_length_then_payload() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frame(b"x" * 0x01020304)[:4] == b"\x01\x02\x03\x04"


def test_whole_input_in_one_feed() -> None:
    dec = FrameDecoder(max_frame=4096)
    assert dec.feed(stream_of(PAYLOADS)) == PAYLOADS
    assert dec.buffered == 0


def test_byte_by_byte() -> None:
    dec = FrameDecoder(max_frame=4096)
    data = stream_of(PAYLOADS)
    out: list[bytes] = []
    for i in range(len(data)):
        out.extend(dec.feed(data[i : i + 1]))
    assert out == PAYLOADS
    assert dec.buffered == 0


def test_byte_by_byte_completes_each_frame_on_its_last_byte() -> None:
    dec = FrameDecoder(max_frame=100)
    frame = encode_frame(b"hello")
    for b in frame[:-1]:
        assert dec.feed(bytes([b])) == []
    assert dec.feed(frame[-1:]) == [b"hello"]


@pytest.mark.parametrize("extra", [1, 2, 3, 4, 5, 9])
def test_trailing_partial_frame_is_kept_for_the_next_feed(extra: int) -> None:
    dec = FrameDecoder(max_frame=4096)
    nxt = encode_frame(b"next-frame")
    data = stream_of(PAYLOADS) + nxt[:extra]
    assert dec.feed(data) == PAYLOADS
    assert dec.buffered == extra
    assert dec.feed(nxt[extra:]) == [b"next-frame"]
    assert dec.buffered == 0


def test_many_frames_in_one_feed() -> None:
    payloads = [str(i).encode() * (i % 5) for i in range(1000)]
    dec = FrameDecoder(max_frame=100)
    assert dec.feed(stream_of(payloads)) == payloads


def test_empty_feed_returns_nothing() -> None:
    dec = FrameDecoder(max_frame=10)
    assert dec.feed(b"") == []
    dec.feed(b"\x00\x00")
    assert dec.feed(b"") == []
    assert dec.buffered == 2


def test_zero_length_frames() -> None:
    dec = FrameDecoder(max_frame=0)
    assert dec.feed(encode_frame(b"") * 3) == [b"", b"", b""]
    assert dec.buffered == 0


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    dec = FrameDecoder(max_frame=64)
    assert dec.feed(encode_frame(b"z" * 64)) == [b"z" * 64]


def test_one_byte_over_the_limit_raises() -> None:
    dec = FrameDecoder(max_frame=64)
    with pytest.raises(FrameTooLarge) as info:
        dec.feed(encode_frame(b"z" * 65))
    assert "65" in str(info.value) and "64" in str(info.value)
    assert isinstance(info.value, ProtocolError)


def test_oversized_frame_is_rejected_from_its_header_alone() -> None:
    dec = FrameDecoder(max_frame=1024)
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack(">I", 2**32 - 1))


def test_oversized_header_arriving_byte_by_byte_raises_on_its_fourth_byte() -> None:
    dec = FrameDecoder(max_frame=1024)
    header = struct.pack(">I", 1025)
    for b in header[:-1]:
        assert dec.feed(bytes([b])) == []
    with pytest.raises(FrameTooLarge):
        dec.feed(header[-1:])


def test_frames_before_an_oversized_header_are_served_then_the_error_is_raised() -> None:
    dec = FrameDecoder(max_frame=8)
    assert dec.feed(encode_frame(b"ok") + encode_frame(b"") + struct.pack(">I", 9)) == [
        b"ok", b""]
    assert isinstance(dec.error, FrameTooLarge)
    with pytest.raises(FrameTooLarge):
        dec.feed(b"")
    with pytest.raises(FrameTooLarge):  # and every call after that
        dec.feed(encode_frame(b"late"))


def test_no_error_is_kept_for_good_input() -> None:
    dec = FrameDecoder(max_frame=8)
    dec.feed(encode_frame(b"12345678"))
    assert dec.error is None


def test_header_size_is_four() -> None:
    assert HEADER_SIZE == 4


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=64), max_size=20),
    data=st.data(),
)
def test_random_payloads_split_at_random_points(payloads: list[bytes], data: st.DataObject) -> None:
    stream = stream_of(payloads)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    dec = FrameDecoder(max_frame=64)
    assert feed_in_pieces(dec, stream, cuts) == payloads
    assert dec.buffered == 0


@settings(max_examples=100, deadline=None)
@given(payloads=st.lists(st.binary(max_size=32), min_size=1, max_size=10),
       tail=st.binary(min_size=1, max_size=3))
def test_random_payloads_with_a_trailing_partial_header(payloads: list[bytes],
                                                        tail: bytes) -> None:
    dec = FrameDecoder(max_frame=32)
    assert dec.feed(stream_of(payloads) + tail) == payloads
    assert dec.buffered == len(tail)
