"""RESP2: the request decoder (whole, byte by byte, split anywhere, garbage, limits), the
reply encoders, SCAN cursors and glob patterns."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.config import Limits
from cluster.router import resp as front
from cluster.wire import resp
from cluster.wire.resp import RequestDecoder, RespProtocolError, encode_command

LIMITS = Limits(max_frame=4096, max_key=64, max_value=1024)

COMMANDS = [
    [b"PING"],
    [b"SET", b"key", b"value"],
    [b"SET", b"", b""],
    [b"GET", bytes(range(256))[:64]],
    [b"ECHO", b"a\r\nb"],
    [b"MSET", *[b"k%d" % i for i in range(20)]],
]
STREAM = b"".join(encode_command(c) for c in COMMANDS)


def feed_in_pieces(dec: RequestDecoder, data: bytes, cuts: list[int]) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        out.extend(dec.feed(data[prev:cut]))
        prev = cut
    return out


def test_whole_input_in_one_feed() -> None:
    dec = RequestDecoder(LIMITS)
    assert dec.feed(STREAM) == COMMANDS
    assert not dec.incomplete


def test_byte_by_byte() -> None:
    dec = RequestDecoder(LIMITS)
    out: list[list[bytes]] = []
    for i in range(len(STREAM)):
        out.extend(dec.feed(STREAM[i:i + 1]))
    assert out == COMMANDS
    assert not dec.incomplete


def test_each_command_completes_on_its_last_byte() -> None:
    dec = RequestDecoder(LIMITS)
    data = encode_command([b"SET", b"k", b"v"])
    for b in data[:-1]:
        assert dec.feed(bytes([b])) == []
        assert dec.incomplete
    assert dec.feed(data[-1:]) == [[b"SET", b"k", b"v"]]
    assert not dec.incomplete


def test_trailing_partial_command_is_kept_for_the_next_feed() -> None:
    dec = RequestDecoder(LIMITS)
    tail = encode_command([b"GET", b"k"])
    assert dec.feed(STREAM + tail[:7]) == COMMANDS
    assert dec.incomplete
    assert dec.feed(tail[7:]) == [[b"GET", b"k"]]


def test_inline_commands_split_as_redis_does() -> None:
    dec = RequestDecoder(LIMITS)
    data = (b"PING\r\n"
            b"set  k   v\n"
            b'set k "a b\\n\\x41\\"" \'c\\\'d\'\r\n'
            b"\r\n"  # an empty line: ignored
            + encode_command([b"GET", b"k"]) +
            b"get k\r\n")
    assert dec.feed(data) == [[b"PING"], [b"set", b"k", b"v"],
                              [b"set", b"k", b'a b\nA"', b"c'd"], [b"GET", b"k"],
                              [b"get", b"k"]]


def test_empty_arrays_are_skipped() -> None:
    dec = RequestDecoder(LIMITS)
    assert dec.feed(b"*0\r\n*-1\r\n" + encode_command([b"PING"])) == [[b"PING"]]


@pytest.mark.parametrize(("data", "message"), [
    (b"$3\r\nfoo\r\n", "expected '*'"),
    (b":1\r\n", "expected '*'"),
    (b"+PING\r\n", "expected '*'"),
    (b"%1\r\n", "expected '*'"),
    (b"*1\r\n*1\r\n$4\r\nPING\r\n", "expected '$', got '*'"),  # nested: refused at depth 2
    (b"*1\r\n:1\r\n", "expected '$', got ':'"),
    (b"*x\r\n", "invalid multibulk length"),
    (b"*1\r\n$-1\r\n", "invalid bulk length"),
    (b"*1\r\n$abc\r\n", "invalid bulk length"),
    (b"*1\r\n$3\r\nfooXX", "not followed by CRLF"),  # a length one too short
    (b"*2\r\n$2\r\nfoo\r\n$1\r\nx\r\n", "not followed by CRLF"),
    (b"*1\r\n$" + b"9" * 40, "header line longer"),
    (b'SET k "abc\r\n', "unbalanced quotes"),
    (b'SET k "abc"x\r\n', "closing quote"),
])
def test_bad_requests_are_refused(data: bytes, message: str) -> None:
    dec = RequestDecoder(LIMITS)
    with pytest.raises(RespProtocolError, match=re.escape(message)):
        dec.feed(data)
    with pytest.raises(RespProtocolError, match=re.escape(message)):  # and stays refused
        dec.feed(encode_command([b"PING"]))


def test_a_huge_bulk_string_is_refused_from_its_header_alone() -> None:
    dec = RequestDecoder(LIMITS)
    with pytest.raises(RespProtocolError, match="invalid bulk length 1025"):
        dec.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1025\r\n")
    # at the limit it is accepted
    dec = RequestDecoder(LIMITS)
    value = b"v" * 1024
    assert dec.feed(encode_command([b"SET", b"k", value])) == [[b"SET", b"k", value]]


def test_a_request_over_max_frame_is_refused_before_its_body_arrives() -> None:
    dec = RequestDecoder(LIMITS)
    head = b"*5\r\n" + b"".join(b"$1000\r\n" + b"x" * 1000 + b"\r\n" for _ in range(4))
    with pytest.raises(RespProtocolError, match="more than 4096 bytes"):
        dec.feed(head + b"$1000\r\n")


def test_too_many_elements_and_too_long_inline_lines() -> None:
    dec = RequestDecoder(LIMITS, max_args=8)
    with pytest.raises(RespProtocolError, match="9 elements exceeds the limit of 8"):
        dec.feed(b"*9\r\n")
    dec = RequestDecoder(LIMITS, max_inline=100)
    assert dec.feed(b"x" * 100) == []
    with pytest.raises(RespProtocolError, match="inline request longer than 100"):
        dec.feed(b"x")


def test_commands_before_a_fault_come_first_then_the_error() -> None:
    dec = RequestDecoder(LIMITS)
    assert dec.feed(STREAM + b"$1\r\nx\r\n") == COMMANDS
    assert dec.error is not None
    with pytest.raises(RespProtocolError, match="expected '\\*'"):
        dec.feed(b"")


def test_memory_held_is_bounded_by_the_unchecked_tail() -> None:
    """Body bytes go on to hiredis as they arrive; the guard keeps at most a header."""
    dec = RequestDecoder(LIMITS)
    dec.feed(b"*2\r\n$3\r\nGET\r\n$1000\r\n" + b"x" * 999)
    assert len(dec._buf) == 0
    dec.feed(b"x\r")
    assert len(dec._buf) == 1
    assert dec.feed(b"\n") == [[b"GET", b"x" * 1000]]


args_st = st.lists(st.binary(max_size=40), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(args_st, min_size=1, max_size=10), st.data())
def test_round_trip_with_random_split_points(commands: list[list[bytes]],
                                             data: st.DataObject) -> None:
    stream = b"".join(encode_command(c) for c in commands)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert feed_in_pieces(RequestDecoder(LIMITS), stream, cuts) == commands


words = st.binary(min_size=1, max_size=10).filter(
    lambda w: not any(b in w for b in b" \t\r\n\v\f\"'"))


@settings(max_examples=200, deadline=None)
@given(st.lists(words, min_size=1, max_size=6))
def test_inline_words_round_trip(args: list[bytes]) -> None:
    line = b" ".join(args) + b"\r\n"
    if line[0] in b"*$+-:_,#!=(%~>|":
        return  # a RESP type byte first: not an inline command
    assert RequestDecoder(LIMITS).feed(line) == [args]


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.data())
def test_random_garbage_never_crashes(garbage: bytes, data: st.DataObject) -> None:
    dec = RequestDecoder(LIMITS)
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=6))
    try:
        for args in feed_in_pieces(dec, garbage, cuts):
            assert args and all(isinstance(a, bytes) for a in args)
    except RespProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(args_st, min_size=1, max_size=4), st.integers(0, 200), st.binary(max_size=8))
def test_corrupted_streams_never_crash(commands: list[list[bytes]], at: int,
                                       junk: bytes) -> None:
    stream = b"".join(encode_command(c) for c in commands)
    at = min(at, len(stream))
    with contextlib.suppress(RespProtocolError):
        RequestDecoder(LIMITS).feed(stream[:at] + junk + stream[at:])


# --- replies -------------------------------------------------------------------------------


def parse(reply: bytes) -> object:
    reader = hiredis.Reader()
    reader.feed(reply)
    return reader.gets()


def test_reply_encoders() -> None:
    assert resp.simple("OK") == b"+OK\r\n"
    assert resp.error("ERR bad\r\nthing") == b"-ERR bad  thing\r\n"
    assert resp.integer(-3) == b":-3\r\n"
    assert resp.bulk(b"") == b"$0\r\n\r\n"
    assert resp.bulk(None) == b"$-1\r\n"
    assert resp.array(None) == b"*-1\r\n"
    assert resp.array([]) == b"*0\r\n"
    nested = resp.array([resp.bulk(b"0"), resp.array([resp.bulk(b"a\r\n"), resp.NIL]),
                         resp.integer(7)])
    assert parse(nested) == [b"0", [b"a\r\n", None], 7]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=50) | st.none(), max_size=10))
def test_bulk_arrays_round_trip_through_hiredis(items: list[bytes | None]) -> None:
    assert parse(resp.array([resp.bulk(i) for i in items])) == items


# --- SCAN cursors ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_cursors_round_trip(key: str) -> None:
    if len(key.encode()) > 64:
        return
    cursor = resp.cursor_for(key)
    assert cursor.isdigit() and cursor != b"0"
    assert int(cursor.decode()) > 0  # clients (redis-py) read cursors with int()
    assert resp.cursor_key(cursor, 64) == key


def test_cursor_edge_cases() -> None:
    assert resp.cursor_key(b"0", 64) is None
    assert resp.cursor_key(b"000", 64) is None
    assert resp.cursor_key(resp.cursor_for(""), 64) == ""
    assert resp.cursor_key(resp.cursor_for("\x00\x00a"), 64) == "\x00\x00a"
    key = "é" * 2048  # 4096 bytes: a cursor of some 9,900 digits, past int()'s default limit
    assert resp.cursor_key(resp.cursor_for(key), 4096) == key
    for bad in (b"-1", b"abc", b"1.5", b"2", b"9" * 500):
        with pytest.raises(ValueError):
            resp.cursor_key(bad, 64)


# --- glob patterns ---------------------------------------------------------------------------


def reference_match(pattern: bytes, key: bytes) -> bool:
    """Redis's stringmatchlen, transcribed recursively (exponential, for tiny inputs)."""
    if not pattern:
        return not key
    c = pattern[0]
    if c == ord("*"):
        return any(reference_match(pattern[1:], key[i:]) for i in range(len(key) + 1))
    if not key:
        return False
    if c == ord("?"):
        return reference_match(pattern[1:], key[1:])
    if c == ord("["):
        i = 1
        negate = i < len(pattern) and pattern[i] == ord("^")
        if negate:
            i += 1
        hit = False
        while True:
            if i < len(pattern) and pattern[i] == ord("\\") and i + 1 < len(pattern):
                hit |= pattern[i + 1] == key[0]
                i += 2
            elif i >= len(pattern):
                break
            elif pattern[i] == ord("]"):
                i += 1
                break
            elif len(pattern) - i >= 3 and pattern[i + 1] == ord("-"):
                low, high = sorted((pattern[i], pattern[i + 2]))
                hit |= low <= key[0] <= high
                i += 3
            else:
                hit |= pattern[i] == key[0]
                i += 1
        if hit == negate:
            return False
        return reference_match(pattern[i:], key[1:])
    if c == ord("\\") and len(pattern) >= 2:
        return key[0] == pattern[1] and reference_match(pattern[2:], key[1:])
    return key[0] == c and reference_match(pattern[1:], key[1:])


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=8).map(lambda b: bytes(b"ab*?[]^-\\"[x % 9] for x in b)),
       st.binary(max_size=8).map(lambda b: bytes(b"ab-]^\\"[x % 6] for x in b)))
def test_glob_matches_as_redis_does(pattern: bytes, key: bytes) -> None:
    assert resp.glob(pattern)(key) == reference_match(pattern, key)


def test_glob_examples() -> None:
    assert resp.glob(b"user:*")(b"user:1")
    assert not resp.glob(b"user:*")(b"users")
    assert resp.glob(b"h?llo")(b"hallo")
    assert resp.glob(b"h[ae]llo")(b"hello") and not resp.glob(b"h[ae]llo")(b"hillo")
    assert resp.glob(b"h[^e]llo")(b"hallo") and not resp.glob(b"h[^e]llo")(b"hello")
    assert resp.glob(b"h[a-b]llo")(b"hbllo")
    assert resp.glob(b"a\\*")(b"a*") and not resp.glob(b"a\\*")(b"ab")


def test_glob_has_no_backtracking_blow_up() -> None:
    pattern = b"*a" * 30 + b"*b"
    assert not resp.glob(pattern)(b"a" * 4000)  # quadratic at worst: well under a second


# --- docs/RESP.md ----------------------------------------------------------------------------


def test_the_command_table_names_every_command_served() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "RESP.md").read_text()
    table = doc.split("<!-- resp-commands -->")[1].split("<!-- /resp-commands -->")[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = {word.strip().strip("`").split()[0].lower() for row in rows
             for word in row.split(", ")}
    assert {name.decode() for name in front._COMMANDS} <= named
    for refused in front._REASONS:
        assert refused.decode().upper() in table or refused in {b"pexpire", b"expireat",
                                                                b"pexpireat", b"pttl",
                                                                b"persist", b"psetex",
                                                                b"getex"}
    limits = doc.split("<!-- resp-limits -->")[1].split("<!-- /resp-limits -->")[0]
    assert f"{resp.MAX_ARGS:,}" in limits and f"{resp.MAX_INLINE // 1024} KiB" in limits
    assert f"{front.KEYS_LIMIT:,}" in table and f"{front.SCAN_COUNT_MAX:,}" in table


def test_the_redis_port_must_differ_from_the_routers_own() -> None:
    from cluster.config import Address, RouterConfig
    from cluster.errors import ConfigError
    from cluster.types import NodeId

    cluster = {NodeId("n1"): Address("127.0.0.1", 7001)}
    same = RouterConfig(Address("127.0.0.1", 7000), cluster,
                        resp_listen=Address("127.0.0.1", 7000))
    with pytest.raises(ConfigError, match="give --resp-listen another port"):
        same.validate()
    RouterConfig(Address("127.0.0.1", 7000), cluster,
                 resp_listen=Address("127.0.0.1", 6379)).validate()
    RouterConfig(Address("127.0.0.1", 0), cluster, resp_listen=Address("127.0.0.1", 0)).validate()


def test_a_signed_length_other_than_minus_one_is_a_protocol_error_not_a_crash() -> None:
    """hiredis refuses "$-0"; the guard must refuse it first, as the decoder's own error."""
    for bad in (b"$-0", b"$-2", b"*-0"):
        dec = RequestDecoder(Limits())
        with pytest.raises(RespProtocolError):
            dec.feed(b"*2\r\n$3\r\nGET\r\n" + bad + b"\r\n\r\n" if bad[:1] == b"$"
                     else bad + b"\r\n")
