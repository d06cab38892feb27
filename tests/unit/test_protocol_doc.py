"""docs/PROTOCOL.md must not drift from the code.

The worked examples in the document are hex dumps between markers::

    <!-- frame: NAME -->
    ```text
    00 00 00 1a 84 ...
    ```

    <!-- breakdown: NAME -->
    ```text
    00 00 00 1a        | length prefix ...
    84                 | fixmap, 4 pairs
    ```

Each dump must be exactly what the codec produces for the message registered under NAME
below, and must decode back to that message. Each breakdown must list the same bytes in
the same order. The reply field tables of ``get`` and ``scan`` are checked against what
a node sends. The error code table and the limits table are checked against
:mod:`cluster.errors` and :class:`cluster.config.Limits`; the table of decoder edge cases
is fed to the decoder the servers use; the nesting limit, the fields of a slave's
``repl_delay_ms`` and the half-close rule are checked against the code.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from cluster import errors
from cluster.client.connection import Connection
from cluster.config import Address, Limits, NodeConfig
from cluster.errors import ProtocolError
from cluster.local import free_ports
from cluster.node.runtime import Node
from cluster.node.stats import DelayStats, bucket
from cluster.types import Acks, Entry, NodeId, Op
from cluster.wire import codec
from cluster.wire.framing import HEADER, FrameDecoder
from cluster.wire.messages import (
    Append,
    ErrorReply,
    Get,
    Message,
    Ping,
    Reply,
    Scan,
    Set,
    Sync,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"

# The message each worked example in the document claims to show.
EXAMPLES: dict[str, Message] = {
    "set-request": Set(1, "k", "v"),
    "set-reply": Reply(1, {"index": 42}),
    "set-bin-request": Set(2, "img", b"\x00\xff", Acks.MAJORITY),
    "get-request": Get(3, "k", 42),
    "get-reply": Reply(3, {"found": True, "index": 42, "node": "n2", "value": "v",
                           "key_epoch": 1, "key_index": 40}),
    "error-reply": ErrorReply(1, "not_master", "this node is a slave; writes go to n1", "n1"),
    "append": Append(
        1, 4, 1,
        (Entry(5, 1, 1_700_000_000_000, Op.SET, "k", "v"),
         Entry(6, 1, 1_700_000_000_001, Op.DELETE, "k", None)),
        6,
    ),
}

_HEX_BYTE = re.compile(r"^[0-9a-f]{2}$")


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _blocks(doc: str, kind: str) -> dict[str, str]:
    """``{name: body}`` of each fenced block right after ``<!-- kind: name -->``."""
    pattern = re.compile(
        r"<!--\s*" + kind + r":\s*([\w-]+)\s*-->\s*\n```[a-z]*\n(.*?)\n```", re.DOTALL
    )
    found: dict[str, str] = {}
    for m in pattern.finditer(doc):
        assert m.group(1) not in found, f"two {kind} blocks named {m.group(1)!r}"
        found[m.group(1)] = m.group(2)
    return found


def _hex_bytes(text: str, where: str) -> bytes:
    tokens = text.split()
    bad = [t for t in tokens if not _HEX_BYTE.match(t)]
    assert not bad, f"{where}: not hex bytes: {bad[:5]}"
    return bytes(int(t, 16) for t in tokens)


def _frames(doc: str) -> dict[str, bytes]:
    return {name: _hex_bytes(body, f"frame {name}")
            for name, body in _blocks(doc, "frame").items()}


def _breakdowns(doc: str) -> dict[str, bytes]:
    out = {}
    for name, body in _blocks(doc, "breakdown").items():
        parts = []
        for n, line in enumerate(body.splitlines(), 1):
            if not line.strip():
                continue
            assert "|" in line, f"breakdown {name}, line {n}: no '|' between bytes and comment"
            parts.append(_hex_bytes(line.split("|", 1)[0], f"breakdown {name}, line {n}"))
        out[name] = b"".join(parts)
    return out


def _table(doc: str, marker: str) -> list[list[str]]:
    """The data rows of the markdown table between ``<!-- marker -->`` and
    ``<!-- /marker -->``, as lists of stripped cells."""
    m = re.search(r"<!--\s*" + marker + r"\s*-->(.*?)<!--\s*/" + marker + r"\s*-->", doc,
                  re.DOTALL)
    assert m, f"no <!-- {marker} --> ... <!-- /{marker} --> section in {DOC}"
    rows = []
    for line in m.group(1).strip().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if all(set(c) <= set("-: ") for c in cells):
            continue  # the separator row
        rows.append(cells)
    return rows[1:]  # drop the header row


# --- worked examples ---------------------------------------------------------------------------


def test_every_example_is_in_the_doc(doc: str) -> None:
    assert set(_frames(doc)) == set(EXAMPLES)
    assert set(_breakdowns(doc)) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_frame_is_what_the_codec_produces(doc: str, name: str) -> None:
    assert _frames(doc)[name].hex(" ") == codec.frame(EXAMPLES[name]).hex(" ")


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_frame_decodes_to_the_stated_message(doc: str, name: str) -> None:
    data = _frames(doc)[name]
    (length,) = HEADER.unpack_from(data)
    assert length == len(data) - HEADER.size, "the length prefix does not match the payload"
    payloads = FrameDecoder(Limits().max_frame).feed(data)
    assert len(payloads) == 1
    assert codec.decode(payloads[0], Limits()) == EXAMPLES[name]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_breakdown_lists_the_frame_bytes_in_order(doc: str, name: str) -> None:
    assert _breakdowns(doc)[name].hex(" ") == _frames(doc)[name].hex(" ")


# --- tables ------------------------------------------------------------------------------------


def test_error_table_lists_every_wire_code(doc: str) -> None:
    rows = _table(doc, "error-codes")
    codes = [r[0].strip("`") for r in rows]
    assert len(codes) == len(set(codes)), "a code appears twice in the error table"
    assert set(codes) == set(errors.WIRE_ERROR_CODES)


def test_error_table_retriable_column_matches_the_code(doc: str) -> None:
    for row in _table(doc, "error-codes"):
        code, retriable = row[0].strip("`"), row[1]
        assert retriable in ("yes", "no"), f"{code}: retriable must be yes or no"
        expected = errors.error_for_code(code, "").retriable
        assert (retriable == "yes") == expected, f"{code}: the doc says retriable={retriable}"


def test_limits_table_matches_the_defaults(doc: str) -> None:
    rows = {r[0].strip("`"): r[1] for r in _table(doc, "limits")}
    defaults = Limits()
    assert rows == {
        "max_frame": str(defaults.max_frame),
        "max_key": str(defaults.max_key),
        "max_value": str(defaults.max_value),
    }


def test_every_client_op_has_a_section(doc: str) -> None:
    for op in ("set", "delete", "get", "scan", "status", "ping"):
        assert re.search(rf"^### `{op}`$", doc, re.MULTILINE), f"no section for {op!r}"
    for op in ("sync", "snapshot", "append", "ack"):
        assert re.search(rf"^### `{op}` \(", doc, re.MULTILINE), f"no section for {op!r}"


# --- what the decoder accepts --------------------------------------------------------------------


def _answer(payload: bytes, ops: frozenset[str]) -> str:
    """What a server answers ``payload`` with, written as in the decoder-cases table."""
    try:
        codec.decode_request(payload, Limits(), ops)
    except ProtocolError as exc:
        return f"`{exc.code}`, id {codec.request_id_of(exc) or 0}"
    return "accepted"


def test_decoder_cases_are_what_the_servers_do(doc: str) -> None:
    rows = _table(doc, "decoder-cases")
    assert len(rows) >= 9
    for payload, what, answer in rows:
        data = _hex_bytes(payload.strip("`"), what)
        assert _answer(data, codec.NODE_REQUESTS) == answer, f"node: {what}"
        assert _answer(data, codec.CLIENT_REQUESTS) == answer, f"router: {what}"


def test_the_router_refuses_sync(doc: str) -> None:
    sync = codec.encode(Sync(5, "n2", 1, 0, ()))
    assert _answer(sync, codec.CLIENT_REQUESTS) == "`bad_request`, id 5"
    assert "also refuses `sync`" in doc


def test_nesting_limit_is_the_codec_s(doc: str) -> None:
    stated = {int(n) for n in re.findall(r"at most \*\*(\d+)\*\* levels deep", doc)}
    stated |= {int(n) for n in re.findall(r"nested more than (\d+) deep", doc)}
    stated |= {int(n) for n in re.findall(r"nests deeper than (\d+) levels", doc)}
    assert stated == {codec.MAX_DEPTH}
    ping = codec.encode(Ping(1))
    inner = b"\x91" * (codec.MAX_DEPTH - 1) + b"\x01"  # the map is the first level
    assert _answer(b"\x83" + ping[1:] + b"\xa1x" + inner, codec.NODE_REQUESTS) == "accepted"
    assert _answer(b"\x83" + ping[1:] + b"\xa1x\x91" + inner,
                   codec.NODE_REQUESTS) == "`bad_frame`, id 0"


# --- get and scan replies ---------------------------------------------------------------------


async def test_get_and_scan_reply_fields_are_what_a_node_sends(doc: str,
                                                                tmp_path: Path) -> None:
    """A one-node cluster in this process answers; each reply has exactly the fields the
    tables list (for ``get``: the "always" ones when the key is missing)."""
    get_rows = {r[0].strip("`"): r[2] for r in _table(doc, "get-reply-fields")}
    scan_rows = {r[0].strip("`") for r in _table(doc, "scan-reply-fields")}
    me = NodeId("n1")
    (port,) = free_ports(1)
    node = Node(NodeConfig(me, Address("127.0.0.1", port), tmp_path / "n1",
                           {me: Address("127.0.0.1", port)}, bootstrap_master=me))
    up = asyncio.Event()
    task = asyncio.create_task(node.run(lambda _: up.set()))
    try:
        async with asyncio.timeout(20):
            await up.wait()
            assert node.address is not None
            conn = await Connection.open(node.address, Limits(), timeout=5)
            try:
                async def call(request: Any) -> dict[str, Any]:
                    reply = await conn.call(request)
                    assert isinstance(reply, Reply), reply
                    return reply.fields

                for i, value in enumerate(["first", "second"], start=1):
                    assert (await call(Set(conn.next_id(), "k", value)))["index"] == i
                found = await call(Get(conn.next_id(), "k"))
                missing = await call(Get(conn.next_id(), "nope"))
                page = await call(Scan(conn.next_id()))
            finally:
                await conn.close()
    finally:
        node.stop()
        await asyncio.wait_for(task, 10)
    assert set(found) == set(get_rows)
    assert set(missing) == {f for f, always in get_rows.items() if always == "yes"}
    assert (found["value"], found["key_epoch"], found["key_index"]) == ("second", 1, 2)
    assert set(page) == scan_rows
    assert (page["items"], page["key_tokens"]) == ([["k", "second"]], [[1, 2]])


# --- status --------------------------------------------------------------------------------------


def test_repl_delay_fields_are_what_a_slave_reports(doc: str) -> None:
    rows = {r[0].strip("`"): r[1] for r in _table(doc, "repl-delay-fields")}
    empty = DelayStats().summary()
    assert set(rows) == set(empty)
    stats = DelayStats()
    for ms in (3, 150, 150, 12_000):
        stats.add(ms)
    for name, value in stats.summary().items():
        kind = {"int": int, "array": list}[rows[name].removesuffix("\\|nil")]
        assert isinstance(value, kind), name
        if empty[name] is None:
            assert rows[name].endswith("|nil"), f"{name} is nil while count is 0"
    slave_table = doc.split("<!-- repl-delay-fields -->")[0].rsplit("A slave adds", 1)[1]
    assert "`window`" not in slave_table


def test_repl_delay_buckets_are_as_described(doc: str) -> None:
    assert ("buckets are 1 ms\nwide below 100 ms, 10 ms wide below 1 s, 100 ms wide below 10 s, "
            "then 1 s wide; the last\nbucket starts at 1 hour") in doc
    assert [bucket(ms) for ms in (-5, 0, 99, 100, 109, 110, 999, 1000, 1099, 9999, 10_000,
                                  10_999, 3_600_000, 9_000_000)] == [
        0, 0, 99, 100, 100, 110, 990, 1000, 1000, 9900, 10_000, 10_000, 3_600_000, 3_600_000]


# --- connections ---------------------------------------------------------------------------------


def test_half_close_is_described(doc: str) -> None:
    section = doc.split("\n## 5. Connections")[1].split("\n## 6.")[0]
    m = re.search(r"^\* \*\*Half-close\.\*\*(.*?)(?=^\* )", section, re.MULTILINE | re.DOTALL)
    assert m, "section 5 has no Half-close item"
    text = " ".join(m.group(1).split())
    for words in ("shutdown(SHUT_WR)", "sends every reply it owes", "then end of file",
                  "`bad_frame` error with id 0"):
        assert words in text, words
