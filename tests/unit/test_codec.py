"""The codec: every message round-trips, and anything else raises a ProtocolError."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import Limits
from cluster.errors import BadFrame, BadRequest, ProtocolError, TooLarge, UnknownOp
from cluster.types import Acks, Consistency, Entry, Op
from cluster.wire import codec
from cluster.wire.framing import FrameDecoder
from cluster.wire.messages import (
    Ack,
    Append,
    Delete,
    ErrorReply,
    Get,
    Message,
    Ping,
    Reply,
    Scan,
    Set,
    SnapshotChunk,
    Status,
    Sync,
    Vote,
    VoteReply,
)

MAX_ID = 2**63 - 1
LIMITS = Limits()

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

ids = st.integers(0, MAX_ID)
small_ints = st.integers(0, 2**40)
keys = st.text(max_size=40)
values: st.SearchStrategy[bytes | str] = st.one_of(st.binary(max_size=64), st.text(max_size=64))


@st.composite
def entries(draw: st.DrawFn, index: int | None = None) -> Entry:
    op = draw(st.sampled_from(Op))
    return Entry(
        index if index is not None else draw(st.integers(1, MAX_ID)),
        draw(small_ints),
        draw(st.integers(0, 2**50)),
        op,
        "" if op is Op.NOOP else draw(keys),  # a noop has no key
        draw(values) if op is Op.SET else None,
    )


@st.composite
def appends(draw: st.DrawFn) -> Append:
    prev = draw(st.integers(0, 2**40))
    n = draw(st.integers(0, 5))
    es = tuple(draw(entries(prev + 1 + i)) for i in range(n))
    return Append(draw(small_ints), prev, draw(small_ints), es, draw(small_ints))


reply_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), MAX_ID),
                          st.text(max_size=10), st.binary(max_size=10))
reply_values = st.recursive(
    reply_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=10,
)
reply_fields = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k not in ("id", "ok", "op")), reply_values, max_size=5
)

def epoch_histories() -> st.SearchStrategy[tuple[tuple[int, int], ...]]:
    """Valid histories: epochs and first indexes both strictly increasing."""
    steps = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 50)), max_size=5)

    def build(pairs: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
        epoch = index = 0
        out = []
        for de, di in pairs:
            epoch, index = epoch + de, index + di
            out.append((epoch, index))
        return tuple(out)

    return steps.map(build)


acks_levels = st.sampled_from([Acks.ASYNC, Acks.MAJORITY, Acks.ALL]) | st.builds(
    Acks, st.integers(1, 1000))
write_timeouts = st.none() | st.integers(1, codec.MAX_TIMEOUT_MS)
outcomes = st.none() | st.sampled_from(["no", "yes", "unknown"])

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Set, ids, keys, values, acks_levels, write_timeouts),
    st.builds(Delete, ids, keys, acks_levels, write_timeouts),
    st.builds(Get, ids, keys, st.integers(0, MAX_ID), st.sampled_from(Consistency)),
    st.builds(Scan, ids, st.none() | keys, st.integers(1, 100_000)),
    st.builds(Status, ids),
    st.builds(Ping, ids),
    st.builds(Sync, ids, st.text(max_size=20), small_ints, small_ints, epoch_histories()),
    appends(),
    st.builds(SnapshotChunk, small_ints, small_ints, small_ints, st.binary(max_size=100),
              st.booleans()),
    st.builds(Ack, small_ints, small_ints),
    st.builds(Reply, ids, reply_fields),
    st.builds(ErrorReply, ids, st.text(max_size=20), st.text(max_size=50),
              st.none() | st.text(max_size=10), outcomes, st.none() | small_ints,
              st.none() | small_ints),
    st.builds(Vote, small_ints, st.text(max_size=20), small_ints, small_ints, st.booleans()),
    st.builds(VoteReply, small_ints, st.text(max_size=20), st.booleans(), st.booleans()),
)


def raw(m: object) -> bytes:
    """A hand-made map (or any other value) as a payload."""
    return codec.pack_obj(m)


# --- round trips ---------------------------------------------------------------------------------


@FAST
@given(messages)
def test_every_message_round_trips(msg: Message) -> None:
    assert codec.decode(codec.encode(msg), LIMITS) == msg


@FAST
@given(st.lists(messages, max_size=8), st.data())
def test_frames_round_trip_through_the_decoder_split_anywhere(
    msgs: list[Message], data: st.DataObject
) -> None:
    stream = b"".join(codec.frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder(LIMITS.max_frame)
    out: list[Message] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out.extend(codec.decode(p, LIMITS) for p in dec.feed(stream[prev:cut]))
        prev = cut
    assert out == msgs


@pytest.mark.parametrize(
    "msg",
    [
        Set(1, "k", b"\x00\xff"),
        Set(2, "k", "text"),
        Set(3, "ключ", "значение", Acks.MAJORITY),
        Delete(4, "k", Acks.MAJORITY),
        Set(3, "k", "v", Acks.ALL, 250),
        Set(3, "k", "v", Acks(2)),
        Delete(4, "k", Acks(1), 86_400_000),
        Get(5, "k"),
        Get(6, "k", 17, Consistency.STRONG),
        Scan(7),
        Scan(8, "after", 5),
        Status(9),
        Ping(MAX_ID),
        Sync(10, "n2", 3, 42, ((1, 1), (3, 40))),
        Append(3, 41, 3, (Entry(42, 3, 1000, Op.SET, "a", b"1"),
                          Entry(43, 3, 1001, Op.DELETE, "a", None)), 43),
        Append(3, 43, 3, (), 43),
        SnapshotChunk(3, 43, 0, b"abc", False),
        Ack(3, 43),
        Reply(11, {"index": 5, "items": [["a", b"b"]], "more": False}),
        # get and scan replies with key tokens (docs/PROTOCOL.md)
        Reply(11, {"found": True, "index": 42, "node": "n2", "value": b"\x00",
                   "key_epoch": 3, "key_index": 40}),
        Reply(11, {"index": 9, "items": [["a", b"b"], ["c", "d"]], "more": True,
                   "node": "n3", "key_tokens": [[1, 2], [3, 2**40]]}),
        Reply(12, {}),
        ErrorReply(13, "not_master", "go away", "n1"),
        ErrorReply(14, "bad_request", "nope"),
        ErrorReply(15, "timeout", "slow", applied="unknown", index=12, epoch=3),
        ErrorReply(16, "storage", "disk full", applied="no"),
        ErrorReply(17, "not_master", "go away", "n1", applied="no"),
    ],
)
def test_examples_round_trip(msg: Message) -> None:
    assert codec.decode(codec.encode(msg), LIMITS) == msg
    assert codec.frame(msg)[4:] == codec.encode(msg)
    assert int.from_bytes(codec.frame(msg)[:4], "big") == len(codec.encode(msg))


def test_bytes_and_str_values_stay_distinct() -> None:
    a = codec.decode(codec.encode(Set(1, "k", b"v")), LIMITS)
    b = codec.decode(codec.encode(Set(1, "k", "v")), LIMITS)
    assert isinstance(a, Set) and isinstance(b, Set)
    assert type(a.value) is bytes and type(b.value) is str


@FAST
@given(entries())
def test_pack_entry_round_trips(e: Entry) -> None:
    assert codec.unpack_entry(codec.pack_entry(e)) == e


# --- garbage -------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_raise_only_protocol_errors(payload: bytes) -> None:
    try:
        msg = codec.decode(payload, LIMITS)
    except ProtocolError as exc:
        assert not str(exc).endswith(": "), "the error gives no reason"
        return
    assert isinstance(msg, (Reply, ErrorReply, Set, Delete, Get, Scan, Status, Ping, Sync,
                            Append, SnapshotChunk, Ack, Vote, VoteReply))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_in_storage_helpers_raise_only_protocol_errors(payload: bytes) -> None:
    try:
        assert isinstance(codec.unpack_entry(payload), Entry)
    except ProtocolError as exc:
        assert not str(exc).endswith(": "), "the error gives no reason"
    try:
        codec.unpack_obj(payload)
    except ProtocolError as exc:
        assert not str(exc).endswith(": "), "the error gives no reason"


_any_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
              st.floats(allow_nan=False), st.text(max_size=8), st.binary(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=6),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=12,
)
_field_names = st.sampled_from([
    "id", "op", "key", "value", "acks", "min_index", "consistency", "after", "limit", "node",
    "epoch", "last_index", "epochs", "prev_index", "prev_epoch", "entries", "commit", "index",
    "offset", "data", "done", "ok", "code", "message", "master",
    "candidate", "last_epoch", "pre_vote", "voter", "granted",
])
_ops = st.sampled_from(["set", "delete", "get", "scan", "status", "ping", "sync", "append",
                        "snapshot", "ack", "vote", "vote_reply", "nope", ""])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_field_names, _any_value, max_size=8), st.none() | _ops)
def test_random_maps_raise_only_protocol_errors(m: dict[str, Any], op: str | None) -> None:
    if op is not None:
        m["op"] = op
    for decode in (codec.decode, _decode_node_request):
        try:
            decode(raw(m), Limits(max_key=16, max_value=16))
        except ProtocolError as exc:
            rid = m.get("id")
            if codec.request_id_of(exc) is not None:
                assert codec.request_id_of(exc) == rid


def _decode_node_request(payload: bytes, limits: Limits) -> Message:
    return codec.decode_request(payload, limits, codec.NODE_REQUESTS)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", b"\x92\x01", raw([1, 2]), raw("text"), raw(5), b"\x81", b"\xde\x00\x01"],
)
def test_non_maps_and_truncated_msgpack_are_bad_frames(payload: bytes) -> None:
    with pytest.raises(BadFrame) as info:
        codec.decode(payload, LIMITS)
    assert codec.request_id_of(info.value) is None
    assert not str(info.value).endswith(": "), "the error gives no reason"


PING = b"\x82\xa2op\xa4ping\xa2id\x01"  # {"op": "ping", "id": 1}, then one more pair follows


def _ping_with(extra_key: bytes, extra_value: bytes) -> bytes:
    return b"\x83" + PING[1:] + extra_key + extra_value


@pytest.mark.parametrize("value", [
    b"\xca\x3f\x80\x00\x00",  # float32 1.0
    b"\xcb" + bytes(8),  # float64 0.0
    b"\xd4\x05\x00",  # fixext1 of application type 5
    b"\xd6\xff\x00\x00\x00\x00",  # a valid timestamp (extension type -1)
])
def test_floats_and_extension_types_in_unknown_fields_are_ignored(value: bytes) -> None:
    assert codec.decode(_ping_with(b"\xa1x", value), LIMITS) == Ping(1)


@pytest.mark.parametrize("payload, why", [
    (_ping_with(b"\xa1x", b"\xd4\xff\x00"), "invalid timestamp"),
    (_ping_with(b"\x91\x01", b"\x01"), "a map key is an array or a map"),
    (_ping_with(b"\x81\x01\x01", b"\x01"), "a map key is an array or a map"),
    (b"\xc1", "byte 0xc1 starts no msgpack value"),
    (PING + b"\x00", "bytes follow the first value"),
])
def test_undecodable_payloads_say_why(payload: bytes, why: str) -> None:
    with pytest.raises(BadFrame, match=why):
        codec.decode(payload, LIMITS)


def test_nesting_is_limited_to_max_depth() -> None:
    def nested(depth: int) -> bytes:  # the message map plus depth - 1 arrays
        return _ping_with(b"\xa1x", b"\x91" * (depth - 1) + b"\x01")

    assert codec.decode(nested(codec.MAX_DEPTH), LIMITS) == Ping(1)
    with pytest.raises(BadFrame, match=f"nested more than {codec.MAX_DEPTH} deep"):
        codec.decode(nested(codec.MAX_DEPTH + 1), LIMITS)


@pytest.mark.parametrize("m, ops", [
    ({"op": "append", "id": 5, "epoch": 1, "prev_index": 0, "prev_epoch": 0, "entries": [],
      "commit": 0}, codec.NODE_REQUESTS),
    ({"op": "snapshot", "id": 5}, codec.NODE_REQUESTS),  # refused before its fields count
    ({"op": "ack", "id": 5, "epoch": 1, "index": 0}, codec.NODE_REQUESTS),
    ({"id": 5, "ok": True}, codec.NODE_REQUESTS),
    ({"id": 5, "ok": False, "code": "x", "message": "y"}, codec.NODE_REQUESTS),
    ({"op": "sync", "id": 5, "node": "n2", "epoch": 1, "last_index": 0, "epochs": []},
     codec.CLIENT_REQUESTS),
])
def test_a_message_that_is_not_a_request_served_is_refused_with_its_id(
        m: dict[str, Any], ops: frozenset[str]) -> None:
    with pytest.raises(BadRequest) as info:
        codec.decode_request(raw(m), LIMITS, ops)
    assert type(info.value) is BadRequest
    assert codec.request_id_of(info.value) == 5


def test_decode_request_decodes_the_requests_served() -> None:
    requests: list[Message] = [Set(1, "k", "v"), Delete(2, "k"), Get(3, "k"), Scan(4),
                               Status(5), Ping(6)]
    for msg in requests:
        assert codec.decode_request(codec.encode(msg), LIMITS, codec.CLIENT_REQUESTS) == msg
    sync = Sync(7, "n2", 1, 0, ())
    assert codec.decode_request(codec.encode(sync), LIMITS, codec.NODE_REQUESTS) == sync


def test_trailing_bytes_after_a_map_are_a_bad_frame() -> None:
    with pytest.raises(BadFrame):
        codec.decode(codec.encode(Ping(1)) + b"\x00", LIMITS)


def test_invalid_utf8_is_a_bad_frame() -> None:
    # fixstr of 2 bytes holding an invalid UTF-8 sequence
    payload = b"\x82\xa2op\xa3set\xa3key\xa2\xff\xfe"
    with pytest.raises(BadFrame):
        codec.decode(payload, LIMITS)


WRONG: list[tuple[dict[str, Any], type[ProtocolError], int | None]] = [
    ({"op": "set", "id": 7, "key": 5, "value": "v"}, BadRequest, 7),
    ({"op": "set", "id": 7, "key": "k", "value": [1]}, BadRequest, 7),
    ({"op": "set", "id": 7, "key": "k", "value": None}, BadRequest, 7),
    ({"op": "set", "id": 7, "key": "k"}, BadRequest, 7),
    ({"op": "set", "id": 7, "value": "v"}, BadRequest, 7),
    ({"op": "set", "id": 7, "key": "k", "value": "v", "acks": "bogus"}, BadRequest, 7),
    ({"op": "set", "id": 7, "key": "k", "value": "v", "acks": ["majority"]}, BadRequest, 7),
    ({"op": "set", "id": 7, "key": "k", "value": "v", "acks": -1}, BadRequest, 7),
    ({"op": "set", "id": 7, "key": "k", "value": "v", "acks": "2"}, BadRequest, 7),
    ({"op": "set", "id": 7, "key": "k", "value": "v", "acks": True}, BadRequest, 7),
    ({"op": "set", "id": 7, "key": "k", "value": "v", "acks": 1.5}, BadRequest, 7),
    ({"op": "set", "id": 7, "key": "k", "value": "v", "timeout_ms": 0}, BadRequest, 7),
    ({"op": "set", "id": 7, "key": "k", "value": "v", "timeout_ms": "5"}, BadRequest, 7),
    ({"op": "delete", "id": 7, "key": "k", "timeout_ms": 86_400_001}, BadRequest, 7),
    ({"op": "set", "id": -1, "key": "k", "value": "v"}, BadRequest, None),
    ({"op": "set", "id": 1.0, "key": "k", "value": "v"}, BadRequest, None),
    ({"op": "set", "id": 2**63, "key": "k", "value": "v"}, BadRequest, None),
    ({"op": "set", "id": True, "key": "k", "value": "v"}, BadRequest, None),
    ({"op": "set", "id": "7", "key": "k", "value": "v"}, BadRequest, None),
    ({"op": "set", "key": "k", "value": "v"}, BadRequest, None),
    ({"op": "delete", "id": 8, "key": b"k"}, BadRequest, 8),
    ({"op": "get", "id": 9, "key": "k", "min_index": -1}, BadRequest, 9),
    ({"op": "get", "id": 9, "key": "k", "min_index": "1"}, BadRequest, 9),
    ({"op": "get", "id": 9, "key": "k", "consistency": "eventual"}, BadRequest, 9),
    ({"op": "scan", "id": 10, "after": 3}, BadRequest, 10),
    ({"op": "scan", "id": 10, "limit": 0}, BadRequest, 10),
    ({"op": "scan", "id": 10, "limit": 100_001}, BadRequest, 10),
    ({"op": "sync", "id": 11, "node": "n2", "epoch": 1, "last_index": 0, "epochs": [[1]]},
     BadRequest, 11),
    ({"op": "sync", "id": 11, "node": "n2", "epoch": 1, "last_index": 0, "epochs": [[1, -1]]},
     BadRequest, 11),
    ({"op": "sync", "id": 11, "node": "n2", "epoch": 1, "last_index": 0, "epochs": "x"},
     BadRequest, 11),
    ({"op": "sync", "id": 11, "node": "n2", "epoch": 2, "last_index": 3,
      "epochs": [[2, 1], [1, 3]]}, BadRequest, 11),
    ({"op": "sync", "id": 11, "node": "n2", "epoch": 2, "last_index": 3,
      "epochs": [[1, 3], [2, 3]]}, BadRequest, 11),
    ({"op": "sync", "id": 11, "node": 2, "epoch": 1, "last_index": 0, "epochs": []},
     BadRequest, 11),
    ({"op": "append", "epoch": 1, "prev_index": 0, "prev_epoch": 0, "commit": 0,
      "entries": [[1, 1, 0, "set", "k"]]}, BadRequest, None),
    ({"op": "append", "epoch": 1, "prev_index": 0, "prev_epoch": 0, "commit": 0,
      "entries": [[0, 1, 0, "set", "k", "v"]]}, BadRequest, None),
    ({"op": "append", "epoch": 1, "prev_index": 0, "prev_epoch": 0, "commit": 0,
      "entries": [[1, 1, 0, "put", "k", "v"]]}, BadRequest, None),
    ({"op": "append", "epoch": 1, "prev_index": 0, "prev_epoch": 0, "commit": 0,
      "entries": [[1, 1, 0, "del", "k", "v"]]}, BadRequest, None),
    ({"op": "append", "epoch": 1, "prev_index": 0, "prev_epoch": 0, "commit": 0,
      "entries": [[1, 1, 0, "set", "k", None]]}, BadRequest, None),
    ({"op": "append", "epoch": 1, "prev_index": 0, "prev_epoch": 0, "commit": 0,
      "entries": "nope"}, BadRequest, None),
    ({"op": "append", "epoch": -1, "prev_index": 0, "prev_epoch": 0, "commit": 0,
      "entries": []}, BadRequest, None),
    ({"op": "snapshot", "epoch": 1, "index": 1, "offset": 0, "data": "text", "done": True},
     BadRequest, None),
    ({"op": "snapshot", "epoch": 1, "index": 1, "offset": 0, "data": b"", "done": 1},
     BadRequest, None),
    ({"op": "ack", "epoch": 1}, BadRequest, None),
    ({"op": 5, "id": 12}, BadRequest, 12),
    ({"op": "frobnicate", "id": 13}, UnknownOp, 13),
    ({"op": "frobnicate", "id": -13}, UnknownOp, None),
    ({"op": "frobnicate"}, UnknownOp, None),
    ({"id": 14}, BadRequest, 14),
    ({"id": 15, "ok": False, "code": 1, "message": "m"}, BadFrame, 15),
    ({"id": 15, "ok": False, "code": "c", "message": "m", "applied": "maybe"}, BadFrame, 15),
    ({"id": 15, "ok": False, "code": "c", "message": "m", "applied": True}, BadFrame, 15),
    ({"id": 15, "ok": False, "code": "c", "message": "m", "index": -1}, BadFrame, 15),
    ({"id": 15, "ok": False, "code": "c", "message": "m", "epoch": "1"}, BadFrame, 15),
    ({"id": "x", "ok": True}, BadFrame, None),
]


@pytest.mark.parametrize(("m", "cls", "rid"), WRONG, ids=[repr(w[0])[:70] for w in WRONG])
def test_wrong_field_types(m: dict[str, Any], cls: type[ProtocolError], rid: int | None) -> None:
    with pytest.raises(cls) as info:
        codec.decode(raw(m), LIMITS)
    assert type(info.value) is cls
    assert codec.request_id_of(info.value) == rid
    assert str(info.value)


@pytest.mark.parametrize(
    ("m", "expected"),
    [
        ({"op": "set", "id": 1, "key": "k", "value": "v", "acks": None}, Set(1, "k", "v")),
        ({"op": "set", "id": 1, "key": "k", "value": "v", "acks": 0, "timeout_ms": None},
         Set(1, "k", "v")),
        ({"op": "delete", "id": 1, "key": "k", "acks": 3}, Delete(1, "k", Acks(3))),
        ({"id": 1, "ok": False, "code": "c", "message": "m", "applied": None, "index": None},
         ErrorReply(1, "c", "m")),
        ({"op": "get", "id": 1, "key": "k", "min_index": None, "consistency": None},
         Get(1, "k")),
        ({"op": "scan", "id": 1, "after": None, "limit": None}, Scan(1)),
    ],
)
def test_nil_means_the_default(m: dict[str, Any], expected: Message) -> None:
    assert codec.decode(raw(m), LIMITS) == expected


def test_write_fields_are_left_out_at_their_defaults() -> None:
    assert codec.to_wire(Set(1, "k", "v")) == {"op": "set", "id": 1, "key": "k", "value": "v"}
    assert codec.to_wire(Delete(1, "k", Acks(2), 300)) == {
        "op": "delete", "id": 1, "key": "k", "acks": 2, "timeout_ms": 300}
    assert codec.to_wire(ErrorReply(1, "c", "m", applied="unknown", index=4, epoch=2)) == {
        "id": 1, "ok": False, "code": "c", "message": "m", "applied": "unknown", "index": 4,
        "epoch": 2}
    assert codec.to_wire(ErrorReply(1, "c", "m")) == {
        "id": 1, "ok": False, "code": "c", "message": "m"}


def test_acks_levels_are_parsed_and_refused_clearly() -> None:
    assert Acks.parse("async") == Acks.ASYNC and Acks.parse("0") is Acks.ASYNC
    assert Acks.parse(" 2 ") == Acks(2) and Acks.parse("all") == Acks.ALL
    assert [Acks.parse(a).copies(5, 3) for a in ("async", "1", "3", "majority", "all")] == [
        1, 2, 4, 3, 5]
    for bad in ("some", "-1", "", True, 2.0):
        with pytest.raises(ValueError, match="acks must be one of"):
            Acks.parse(bad)  # type: ignore[arg-type]


def test_bad_request_names_the_field() -> None:
    with pytest.raises(BadRequest, match="min_index"):
        codec.decode(raw({"op": "get", "id": 1, "key": "k", "min_index": -1}), LIMITS)
    with pytest.raises(BadRequest, match="acks"):
        codec.decode(raw({"op": "set", "id": 1, "key": "k", "value": "v", "acks": "bogus"}),
                     LIMITS)


def test_request_id_of_ignores_foreign_exceptions() -> None:
    assert codec.request_id_of(ValueError("x")) is None
    err = BadRequest("x")
    err.request_id = "7"  # type: ignore[attr-defined]
    assert codec.request_id_of(err) is None


# --- size limits ---------------------------------------------------------------------------------

SMALL = Limits(max_key=4, max_value=8)


@pytest.mark.parametrize(
    "m",
    [
        {"op": "set", "id": 1, "key": "abcd", "value": b"12345678"},
        {"op": "set", "id": 1, "key": "ab", "value": "€€"},  # 6 bytes
        {"op": "set", "id": 1, "key": "éé", "value": ""},  # key of exactly 4 bytes
        {"op": "get", "id": 1, "key": "abcd"},
        {"op": "scan", "id": 1, "after": "abcd"},
    ],
)
def test_at_the_limits_is_accepted(m: dict[str, Any]) -> None:
    codec.decode(raw(m), SMALL)


@pytest.mark.parametrize(
    "m",
    [
        {"op": "set", "id": 21, "key": "abcde", "value": b""},
        {"op": "set", "id": 21, "key": "ééé", "value": b""},  # 3 characters, 6 bytes
        {"op": "set", "id": 21, "key": "k", "value": b"123456789"},
        {"op": "set", "id": 21, "key": "k", "value": "123456789"},
        {"op": "set", "id": 21, "key": "k", "value": "€€€"},  # 3 characters, 9 bytes
        {"op": "delete", "id": 21, "key": "😀😀"},  # 2 characters, 8 bytes
        {"op": "get", "id": 21, "key": "abcde"},
        {"op": "scan", "id": 21, "after": "ééé"},
    ],
)
def test_over_the_limits_is_too_large(m: dict[str, Any]) -> None:
    with pytest.raises(TooLarge) as info:
        codec.decode(raw(m), SMALL)
    assert codec.request_id_of(info.value) == 21
    assert isinstance(info.value, BadRequest)


@FAST
@given(st.text(max_size=12), st.one_of(st.text(max_size=12), st.binary(max_size=12)))
def test_limits_count_encoded_bytes(key: str, value: str | bytes) -> None:
    key_len = len(key.encode())
    value_len = len(value.encode()) if isinstance(value, str) else len(value)
    payload = codec.encode(Set(3, key, value))
    if key_len > SMALL.max_key or value_len > SMALL.max_value:
        with pytest.raises(TooLarge):
            codec.decode(payload, SMALL)
    else:
        assert codec.decode(payload, SMALL) == Set(3, key, value)


# --- elections and noop entries (not yet used by nodes in 0.2) -----------------------------------


@pytest.mark.parametrize("msg", [
    Vote(7, "n2", 6, 120, True),
    Vote(7, "n2", 6, 120, False),
    Vote(1, "n1", 0, 0, False),
    VoteReply(7, "n3", True, True),
    VoteReply(6, "n3", False, False),
])
def test_election_messages_round_trip(msg: Message) -> None:
    assert codec.decode(codec.encode(msg), LIMITS) == msg
    assert codec.decode(FrameDecoder(LIMITS.max_frame).feed(codec.frame(msg))[0], LIMITS) == msg


def test_vote_is_encoded_with_every_field() -> None:
    assert codec.to_wire(Vote(7, "n2", 6, 120, True)) == {
        "op": "vote", "epoch": 7, "candidate": "n2", "last_epoch": 6, "last_index": 120,
        "pre_vote": True}
    assert codec.to_wire(VoteReply(7, "n3", False, True)) == {
        "op": "vote_reply", "epoch": 7, "voter": "n3", "granted": False, "pre_vote": True}


@pytest.mark.parametrize(("m", "field"), [
    ({"op": "vote", "epoch": 1, "last_epoch": 0, "last_index": 0, "pre_vote": False},
     "candidate"),
    ({"op": "vote", "epoch": -1, "candidate": "n1", "last_epoch": 0, "last_index": 0,
      "pre_vote": False}, "epoch"),
    ({"op": "vote", "epoch": 1, "candidate": "n1", "last_epoch": 0, "last_index": "0",
      "pre_vote": False}, "last_index"),
    ({"op": "vote", "epoch": 1, "candidate": "n1", "last_epoch": 0, "last_index": 0,
      "pre_vote": 1}, "pre_vote"),
    ({"op": "vote_reply", "epoch": 1, "voter": "n1", "pre_vote": False}, "granted"),
    ({"op": "vote_reply", "epoch": 1, "voter": 3, "granted": True, "pre_vote": False}, "voter"),
])
def test_bad_election_messages_name_the_field(m: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest, match=field):
        codec.decode(raw(m), LIMITS)


@pytest.mark.parametrize("op", ["vote", "vote_reply"])
def test_nodes_do_not_serve_election_messages_yet(op: str) -> None:
    with pytest.raises(BadRequest, match="not a request this server serves") as info:
        codec.decode_request(raw({"op": op, "id": 9}), LIMITS, codec.NODE_REQUESTS)
    assert codec.request_id_of(info.value) == 9


def test_protocol_doc_lists_the_election_fields() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    section = doc.split("### Elections (not yet used by nodes in 0.2)")[1].split("\n## ")[0]
    for msg in (Vote(1, "n1", 0, 0, True), VoteReply(1, "n2", True, True)):
        wire = codec.to_wire(msg)
        table = section.split(f"#### `{wire['op']}` (")[1].split("\n\n")[1]
        names = re.findall(r"^\| `(\w+)` +\|", table, re.MULTILINE)
        assert names == list(wire), wire["op"]


def test_noop_entries_round_trip_and_are_strict() -> None:
    noop = Entry(8, 3, 1_700_000_000_000, Op.NOOP, "", None)
    assert codec.unpack_entry(codec.pack_entry(noop)) == noop
    assert codec.entry_from_wire([8, 3, 0, "noop", "", None]).op is Op.NOOP
    for bad in ([8, 3, 0, "noop", "k", None], [8, 3, 0, "noop", "", "v"]):
        with pytest.raises(BadRequest, match="noop"):
            codec.entry_from_wire(bad)
