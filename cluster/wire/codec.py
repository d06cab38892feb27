"""msgpack encoding and validation of every message. The only module that imports msgpack.

``decode`` turns a frame's payload into a typed message or raises a
:class:`~cluster.errors.ProtocolError` whose ``request_id`` is set when the payload was a
map with a usable ``id``, so the server can address its error reply. ``decode_request`` is
what a server's request loop uses: it also refuses, with that id, a message that is not a
request the server serves (a reply, or a replication message).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn, assert_never

import msgpack

from cluster.config import Limits
from cluster.errors import BadFrame, BadRequest, ProtocolError, TooLarge, UnknownOp, reason
from cluster.types import Acks, Consistency, Entry, Op
from cluster.wire.framing import encode_frame
from cluster.wire.messages import (
    APPLIED,
    Ack,
    Append,
    Delete,
    ErrorReply,
    Get,
    Message,
    Ping,
    Reply,
    Request,
    Scan,
    Set,
    SnapshotChunk,
    Status,
    Sync,
    Vote,
    VoteReply,
)

MAX_ID = 2**63 - 1
MAX_TIMEOUT_MS = 86_400_000  # a write's timeout_ms: at most a day
MAX_DEPTH = 1024  # arrays and maps nested in one payload, its own map included (msgpack's)
CLIENT_REQUESTS = frozenset({"set", "delete", "get", "scan", "status", "ping"})
NODE_REQUESTS = CLIENT_REQUESTS | {"sync"}  # what a node's request loop serves
ELECTION_OPS = frozenset({"vote", "vote_reply"})  # between nodes; not yet served in 0.2
_KNOWN_OPS = NODE_REQUESTS | {"append", "snapshot", "ack"} | ELECTION_OPS
_OPS = {op.value: op for op in Op}


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True)


_pack: Callable[[Any], bytes] = _packer().pack


def _unpack(payload: bytes, what: str) -> Any:
    """One msgpack value, or :class:`BadFrame` saying why ``payload`` is not one."""
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        raise BadFrame(f"{what} is not valid msgpack: {_undecodable(exc)}") from exc


def _undecodable(exc: Exception) -> str:
    """Why msgpack refused a payload, in words (some of its errors carry no text)."""
    match exc:
        case msgpack.StackError():
            return f"arrays and maps nested more than {MAX_DEPTH} deep"
        case msgpack.FormatError():
            return "byte 0xc1 starts no msgpack value"
        case msgpack.ExtraData():
            return "bytes follow the first value"
        case TypeError() if "unhashable" in str(exc):
            return "a map key is an array or a map"
    return reason(exc)


# --- encoding ------------------------------------------------------------------------------------


def entry_to_wire(e: Entry) -> list[Any]:
    return [e.index, e.epoch, e.ts, e.op.value, e.key, e.value]


def to_wire(msg: Message) -> dict[str, Any]:
    """The msgpack map for a message, before packing."""
    if isinstance(msg, Vote | VoteReply):
        return _election_to_wire(msg)
    match msg:
        case Set(id=i, key=k, value=v, acks=a, timeout_ms=t):
            return _write_fields({"op": "set", "id": i, "key": k, "value": v}, a, t)
        case Delete(id=i, key=k, acks=a, timeout_ms=t):
            return _write_fields({"op": "delete", "id": i, "key": k}, a, t)
        case Get(id=i, key=k, min_index=m, consistency=c, min_epoch=me):
            out = {"op": "get", "id": i, "key": k}
            if m:
                out["min_index"] = m
            if me:
                out["min_epoch"] = me
            if c is not Consistency.ANY:
                out["consistency"] = c.value
            return out
        case Scan(id=i, after=after, limit=limit, min_index=m, min_epoch=me):
            out = {"op": "scan", "id": i, "after": after, "limit": limit}
            if m:
                out["min_index"] = m
            if me:
                out["min_epoch"] = me
            return out
        case Status(id=i):
            return {"op": "status", "id": i}
        case Ping(id=i):
            return {"op": "ping", "id": i}
        case Sync(id=i, node=n, epoch=ep, last_index=li, epochs=eps):
            return {
                "op": "sync",
                "id": i,
                "node": n,
                "epoch": ep,
                "last_index": li,
                "epochs": [list(p) for p in eps],
            }
        case Append(epoch=ep, prev_index=pi, prev_epoch=pe, entries=es, commit=c):
            return {
                "op": "append",
                "epoch": ep,
                "prev_index": pi,
                "prev_epoch": pe,
                "entries": [entry_to_wire(e) for e in es],
                "commit": c,
            }
        case SnapshotChunk(epoch=ep, index=ix, offset=off, data=d, done=done):
            return {"op": "snapshot", "epoch": ep, "index": ix, "offset": off, "data": d,
                    "done": done}
        case Ack(epoch=ep, index=ix):
            return {"op": "ack", "epoch": ep, "index": ix}
        case Reply(id=i, fields=f):
            return {**f, "id": i, "ok": True}
        case ErrorReply(id=i, code=code, message=text, master=master, applied=applied,
                        index=index, epoch=epoch):
            out = {"id": i, "ok": False, "code": code, "message": text}
            for name, value in (("master", master), ("applied", applied), ("index", index),
                                ("epoch", epoch)):
                if value is not None:
                    out[name] = value
            return out
    raise TypeError(f"not a message: {msg!r}")  # pragma: no cover


def _write_fields(out: dict[str, Any], acks: Acks, timeout_ms: int | None) -> dict[str, Any]:
    """A write's optional fields, left out at their defaults."""
    if acks != Acks.ASYNC:
        out["acks"] = acks.value
    if timeout_ms is not None:
        out["timeout_ms"] = timeout_ms
    return out


def encode(msg: Message) -> bytes:
    """The msgpack payload of ``msg`` (no length prefix)."""
    return _pack(to_wire(msg))


def frame(msg: Message) -> bytes:
    """``msg`` as a complete frame, ready for the socket."""
    return encode_frame(_pack(to_wire(msg)))


def frame_with_id(msg: Message, new_id: int) -> bytes:
    """``msg`` as a frame, under another request id (the router's on its link to a node)."""
    data = to_wire(msg)
    data["id"] = new_id
    return encode_frame(_pack(data))


# --- decoding ------------------------------------------------------------------------------------


def _fail(cls: type[ProtocolError], text: str, request_id: int | None) -> NoReturn:
    err = cls(text)
    err.request_id = request_id  # type: ignore[attr-defined]
    raise err


def request_id_of(err: BaseException) -> int | None:
    """The request id a decoding error belongs to, when it could be read."""
    rid = getattr(err, "request_id", None)
    return rid if isinstance(rid, int) else None


class _Fields:
    """Typed access to a decoded map, raising BadRequest that names the field."""

    __slots__ = ("_m", "_op", "_rid")

    def __init__(self, m: dict[Any, Any], rid: int | None, op: str) -> None:
        self._m = m
        self._rid = rid
        self._op = op

    def bad(self, text: str, cls: type[ProtocolError] = BadRequest) -> NoReturn:
        _fail(cls, f"{self._op}: {text}", self._rid)

    def integer(self, name: str, default: int | None = None, lo: int = 0, hi: int = MAX_ID) -> int:
        v = self._m.get(name)
        if v is None:
            v = default
        if v is None:
            self.bad(f"missing field {name!r}")
        if type(v) is not int:
            self.bad(f"field {name!r} must be an integer, not {type(v).__name__}")
        if not lo <= v <= hi:
            self.bad(f"field {name!r} out of range [{lo}, {hi}]")
        return v

    def boolean(self, name: str) -> bool:
        v = self._m.get(name)
        if type(v) is not bool:
            self.bad(f"field {name!r} must be a boolean")
        return v

    def string(self, name: str, optional: bool = False) -> str | None:
        v = self._m.get(name)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            self.bad(f"field {name!r} must be a string")
        return v

    def key(self, limits: Limits, name: str = "key") -> str:
        v = self.string(name)
        assert v is not None
        if len(v) > limits.max_key or len(v.encode()) > limits.max_key:
            self.bad(f"{name} is longer than the limit of {limits.max_key} bytes", TooLarge)
        return v

    def value(self, limits: Limits) -> bytes | str:
        v = self._m.get("value")
        if not isinstance(v, bytes | str):
            self.bad("field 'value' must be a string or binary")
        if len(v) > limits.max_value or (isinstance(v, str) and len(v.encode()) > limits.max_value):
            self.bad(f"value is longer than the limit of {limits.max_value} bytes", TooLarge)
        return v

    def acks(self) -> Acks:
        v = self._m.get("acks")
        if v is None:
            return Acks.ASYNC
        if not isinstance(v, str) and type(v) is not int:
            self.bad("field 'acks' must be 'async', 'majority', 'all' or a number of slaves")
        try:
            return Acks.parse(v) if type(v) is int else Acks(v)
        except ValueError as exc:
            self.bad(str(exc))

    def optional_int(self, name: str, lo: int, hi: int) -> int | None:
        return None if self._m.get(name) is None else self.integer(name, lo=lo, hi=hi)

    def enum(self, name: str, cls: type[Consistency], default: Any) -> Any:
        v = self._m.get(name)
        if v is None:
            return default
        try:
            return cls(v)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            self.bad(f"field {name!r} must be one of {allowed}")

    def binary(self, name: str) -> bytes:
        v = self._m.get(name)
        if not isinstance(v, bytes):
            self.bad(f"field {name!r} must be binary")
        return v

    def array(self, name: str) -> list[Any]:
        v = self._m.get(name)
        if not isinstance(v, list):
            self.bad(f"field {name!r} must be an array")
        return v


def entry_from_wire(raw: Any) -> Entry:
    """An entry from its 6-element array; raises BadRequest when it is not one."""
    if not isinstance(raw, list) or len(raw) != 6:
        raise BadRequest("an entry must be an array of 6 items")
    index, epoch, ts, op, key, value = raw
    if type(index) is not int or type(epoch) is not int or type(ts) is not int:
        raise BadRequest("entry index, epoch and ts must be integers")
    if index < 1 or epoch < 0:
        raise BadRequest("entry index must be >= 1 and epoch >= 0")
    kind = _OPS.get(op) if isinstance(op, str) else None
    if kind is None:
        raise BadRequest(f"unknown entry op {op!r}")
    if not isinstance(key, str):
        raise BadRequest("entry key must be a string")
    if kind is Op.SET and not isinstance(value, bytes | str):
        raise BadRequest("a set entry's value must be a string or binary")
    if kind is Op.DELETE and value is not None:
        raise BadRequest("a delete entry's value must be nil")
    if kind is Op.NOOP and (key or value is not None):
        raise BadRequest("a noop entry's key must be empty and its value nil")
    return Entry(index, epoch, ts, kind, key, value)


def _epochs(f: _Fields, raw: list[Any]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for pair in raw:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(type(x) is int and x >= 0 for x in pair)
        ):
            f.bad("epochs must be an array of [epoch, first_index] integer pairs")
        if out and (pair[0] <= out[-1][0] or pair[1] <= out[-1][1]):
            f.bad("epochs must increase in both epoch and first index")
        out.append((pair[0], pair[1]))
    return tuple(out)


def _decode_map(payload: bytes) -> tuple[dict[Any, Any], int | None, Any]:
    """The payload's map, its request id when usable, and its ``op``."""
    m = _unpack(payload, "payload")
    if not isinstance(m, dict):
        _fail(BadFrame, f"payload must be a msgpack map, not {type(m).__name__}", None)
    rid_raw = m.get("id")
    rid = rid_raw if type(rid_raw) is int and 0 <= rid_raw <= MAX_ID else None
    return m, rid, m.get("op")


def decode(payload: bytes, limits: Limits) -> Message:
    """Decode and validate one frame's payload."""
    m, rid, op = _decode_map(payload)
    return _message(m, rid, op, limits)


def decode_request(payload: bytes, limits: Limits, ops: frozenset[str]) -> Request:
    """Decode and validate a request to a server that serves the ops in ``ops``.

    Anything else that decodes (a reply, a replication message, a known op not served
    here) is refused with :class:`BadRequest`, addressed to the map's ``id`` when it has a
    usable one, before its other fields are checked."""
    m, rid, op = _decode_map(payload)
    if op is None and "ok" in m:
        _fail(BadRequest, "a reply is not a request", rid)
    if isinstance(op, str) and op in _KNOWN_OPS and op not in ops:
        _fail(BadRequest, f"{op!r} is not a request this server serves", rid)
    msg = _message(m, rid, op, limits)
    assert isinstance(msg, Request)
    return msg


def _message(m: dict[Any, Any], rid: int | None, op: Any, limits: Limits) -> Message:
    if op is None and "ok" in m:
        return _decode_reply(m, rid)
    f = _Fields(m, rid, str(op))
    if not isinstance(op, str):
        _fail(BadRequest, "field 'op' must be a string", rid)
    if op in ELECTION_OPS:
        return _election_from_wire(f, op)
    match op:
        case "set":
            return Set(f.integer("id"), f.key(limits), f.value(limits), f.acks(),
                       f.optional_int("timeout_ms", 1, MAX_TIMEOUT_MS))
        case "delete":
            return Delete(f.integer("id"), f.key(limits), f.acks(),
                          f.optional_int("timeout_ms", 1, MAX_TIMEOUT_MS))
        case "get":
            return Get(f.integer("id"), f.key(limits), f.integer("min_index", 0),
                       f.enum("consistency", Consistency, Consistency.ANY),
                       f.integer("min_epoch", 0))
        case "scan":
            after = f.string("after", optional=True)
            if after is not None and len(after.encode()) > limits.max_key:
                f.bad(f"'after' is longer than the limit of {limits.max_key} bytes", TooLarge)
            return Scan(f.integer("id"), after, f.integer("limit", 1000, lo=1, hi=100_000),
                        f.integer("min_index", 0), f.integer("min_epoch", 0))
        case "status":
            return Status(f.integer("id"))
        case "ping":
            return Ping(f.integer("id"))
        case "sync":
            node = f.string("node")
            assert node is not None
            return Sync(f.integer("id"), node, f.integer("epoch"), f.integer("last_index"),
                        _epochs(f, f.array("epochs")))
        case "append":
            try:
                entries = tuple(entry_from_wire(e) for e in f.array("entries"))
            except BadRequest as exc:
                f.bad(str(exc))
            return Append(f.integer("epoch"), f.integer("prev_index"),
                          f.integer("prev_epoch"), entries, f.integer("commit"))
        case "snapshot":
            return SnapshotChunk(f.integer("epoch"), f.integer("index"), f.integer("offset"),
                                 f.binary("data"), f.boolean("done"))
        case "ack":
            return Ack(f.integer("epoch"), f.integer("index"))
    _fail(UnknownOp, f"unknown op {op!r}", rid)


def _decode_reply(m: dict[Any, Any], rid: int | None) -> Reply | ErrorReply:
    if rid is None:
        _fail(BadFrame, "a reply must carry an integer 'id'", None)
    ok = m.pop("ok")
    m.pop("id")
    if ok is True:
        return Reply(rid, m)
    code, text, master = m.get("code"), m.get("message"), m.get("master")
    if not isinstance(code, str) or not isinstance(text, str):
        _fail(BadFrame, "an error reply must carry string 'code' and 'message'", rid)
    applied, index, epoch = m.get("applied"), m.get("index"), m.get("epoch")
    if applied is not None and applied not in APPLIED:
        _fail(BadFrame, f"an error reply's 'applied' must be one of {', '.join(APPLIED)}", rid)
    for name, value in (("index", index), ("epoch", epoch)):
        if value is not None and (type(value) is not int or value < 0):
            _fail(BadFrame, f"an error reply's {name!r} must be an integer >= 0", rid)
    return ErrorReply(rid, code, text, master if isinstance(master, str) else None,
                      applied, index, epoch)


# --- elections -----------------------------------------------------------------------------------


def _election_to_wire(msg: Vote | VoteReply) -> dict[str, Any]:
    match msg:
        case Vote(epoch=ep, candidate=c, last_epoch=le, last_index=li, pre_vote=pv):
            return {"op": "vote", "epoch": ep, "candidate": c, "last_epoch": le,
                    "last_index": li, "pre_vote": pv}
        case VoteReply(epoch=ep, voter=v, granted=g, pre_vote=pv):
            return {"op": "vote_reply", "epoch": ep, "voter": v, "granted": g, "pre_vote": pv}
    assert_never(msg)


def _election_from_wire(f: _Fields, op: str) -> Vote | VoteReply:
    if op == "vote":
        candidate = f.string("candidate")
        assert candidate is not None
        return Vote(f.integer("epoch"), candidate, f.integer("last_epoch"),
                    f.integer("last_index"), f.boolean("pre_vote"))
    voter = f.string("voter")
    assert voter is not None
    return VoteReply(f.integer("epoch"), voter, f.boolean("granted"), f.boolean("pre_vote"))


# --- storage records -----------------------------------------------------------------------------


def pack_entry(e: Entry) -> bytes:
    return _pack(entry_to_wire(e))


def unpack_entry(data: bytes) -> Entry:
    return entry_from_wire(_unpack(data, "entry"))


def pack_obj(obj: Any) -> bytes:
    """Plain data (maps, arrays, strings, numbers, binary) for storage files."""
    return _pack(obj)


def unpack_obj(data: bytes) -> Any:
    return _unpack(data, "record")
