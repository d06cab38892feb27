"""RESP2, the Redis protocol, as the router's Redis front end speaks it. No I/O here.

:class:`RequestDecoder` is fed the bytes a Redis client sends and returns its commands,
each a list of byte strings: arrays of bulk strings (what every client library sends),
parsed by ``hiredis``, and inline commands (``PING`` typed into ``nc``), split here. In front
of hiredis, which enforces no limit of its own, a guard reads every array and bulk-string
header as it arrives and rejects, before buffering the body, a bulk string over the key or
value limit, a request over ``max_frame`` bytes, an array of more than :data:`MAX_ARGS`
elements, a nested array, and a request that is not an array or an inline command.

The reply encoders (:func:`simple`, :func:`error`, :func:`integer`, :func:`bulk`,
:func:`array`) return bytes. :func:`cursor_for` and :func:`cursor_key` turn a scan position
(the last key returned) into a ``SCAN`` cursor and back; :func:`glob` matches keys against
a Redis ``MATCH``/``KEYS`` pattern. See docs/RESP.md.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence

import hiredis

from cluster.config import Limits
from cluster.errors import RemoteProtocolError

MAX_ARGS = 1024 * 1024  # elements of one request array (Redis has the same bound)
MAX_INLINE = 64 * 1024  # bytes of one inline command line (Redis: PROTO_INLINE_MAX_SIZE)
_MAX_HEADER = 32  # bytes of a '*N' or '$N' header line, CRLF included
# first bytes of RESP2 and RESP3 values other than an array: a request that starts with one
# is neither an array of bulk strings nor an inline command
_NOT_A_REQUEST = frozenset(b"$+-:_,#!=(%~>|")


class RespProtocolError(RemoteProtocolError):
    """The client's bytes are not a RESP request; the connection is answered and closed."""


class _State(enum.Enum):
    BOUNDARY = "between requests"
    HEADER = "expecting a bulk string header"
    BODY = "in a bulk string"


class RequestDecoder:
    """Commands from a byte stream, with the limits of ``limits``.

    :meth:`feed` returns every command the bytes complete, in order. When the bytes break
    the protocol, the commands completed before the fault are returned first, the error is
    kept in :attr:`error`, and the next call raises it.
    """

    def __init__(self, limits: Limits, max_args: int = MAX_ARGS,
                 max_inline: int = MAX_INLINE) -> None:
        self.max_bulk = max(limits.max_key, limits.max_value)
        self.max_request = limits.max_frame
        self.max_args = max_args
        self.max_inline = max_inline
        self.error: RespProtocolError | None = None
        self._reader = hiredis.Reader()
        self._buf = bytearray()  # bytes received and not yet handed on or dropped
        self._pos = 0  # how far the guard has checked ``_buf``
        self._passed = 0  # checked bytes of the current array before this are in hiredis
        self._state = _State.BOUNDARY
        self._args_left = 0  # elements of the current array still to come
        self._body_left = 0  # bytes of the current bulk string still to come, CRLF included
        self._size = 0  # bytes of the current array request so far

    @property
    def incomplete(self) -> bool:
        """Whether part of a request has been fed and not yet returned."""
        return self._state is not _State.BOUNDARY or bool(self._buf)

    def feed(self, data: bytes) -> list[list[bytes]]:
        if self.error is not None:
            raise self.error
        self._buf += data
        commands: list[list[bytes]] = []
        try:
            self._scan(commands)
        except RespProtocolError as exc:
            self.error = exc
            self._buf.clear()
            if not commands:
                raise
            return commands
        # hand the checked part of an unfinished array to hiredis, keep only what is unchecked
        self._pass_on()
        del self._buf[:self._pos]
        self._pos = self._passed = 0
        return commands

    def _scan(self, commands: list[list[bytes]]) -> None:
        buf = self._buf
        while True:
            if self._state is _State.BOUNDARY:
                if self._pos >= len(buf):
                    return
                if buf[self._pos] == 0x2A:  # '*'
                    count = self._header(b"*")
                    if count is None:
                        return
                    if count <= 0:  # '*0' and '*-1' are empty: nothing to do (as Redis)
                        self._passed = self._pos
                        continue
                    if count > self.max_args:
                        raise RespProtocolError(
                            f"Protocol error: an array of {count} elements exceeds the limit "
                            f"of {self.max_args}")
                    self._args_left = count
                    self._size = self._pos - self._passed
                    self._state = _State.HEADER
                elif buf[self._pos] in _NOT_A_REQUEST:
                    raise RespProtocolError(
                        f"Protocol error: expected '*' (an array of bulk strings) or an "
                        f"inline command, got {chr(buf[self._pos])!r}")
                else:
                    line = self._inline_line()
                    if line is None:
                        return
                    self._passed = self._pos
                    args = split_inline(line)
                    if args:
                        commands.append(args)
            elif self._state is _State.HEADER:
                if self._pos >= len(buf):
                    return
                if buf[self._pos] != 0x24:  # '$'
                    raise RespProtocolError(
                        f"Protocol error: expected '$', got {chr(buf[self._pos])!r}")
                start = self._pos
                length = self._header(b"$")
                if length is None:
                    return
                if not 0 <= length <= self.max_bulk:
                    raise RespProtocolError(
                        f"Protocol error: invalid bulk length {length} (the limit is "
                        f"{self.max_bulk} bytes: --max-key-size, --max-value-size)")
                self._size += self._pos - start + length + 2
                if self._size > self.max_request:
                    raise RespProtocolError(
                        f"Protocol error: a request of more than {self.max_request} bytes "
                        f"(--max-frame)")
                self._body_left = length + 2
                self._state = _State.BODY
            else:
                available = len(buf) - self._pos
                if self._body_left > 2:
                    step = min(available, self._body_left - 2)
                    self._pos += step
                    self._body_left -= step
                    if self._body_left > 2:
                        return
                if len(buf) - self._pos < 2:
                    return
                if buf[self._pos:self._pos + 2] != b"\r\n":
                    raise RespProtocolError(
                        "Protocol error: a bulk string is not followed by CRLF (wrong length?)")
                self._pos += 2
                self._body_left = 0
                self._args_left -= 1
                if self._args_left:
                    self._state = _State.HEADER
                    continue
                self._pass_on()
                command = self._reader.gets()
                if not isinstance(command, list):  # pragma: no cover - the guard checked it
                    raise AssertionError(f"hiredis returned {command!r} for a whole request")
                commands.append(command)
                self._state = _State.BOUNDARY
                self._size = 0

    def _pass_on(self) -> None:
        """Give hiredis the checked bytes of the current array request."""
        if self._pos > self._passed:
            # hiredis reads any buffer, a bytearray too (its stub says bytes)
            self._reader.feed(self._buf, self._passed,  # type: ignore[arg-type]
                              self._pos - self._passed)
            self._passed = self._pos

    def _header(self, kind: bytes) -> int | None:
        """The number on a ``*N`` or ``$N`` line at the guard's position (which moves past
        it), or None when the line is not complete yet."""
        buf = self._buf
        end = buf.find(b"\r\n", self._pos, self._pos + _MAX_HEADER)
        if end < 0:
            if len(buf) - self._pos >= _MAX_HEADER:
                raise RespProtocolError(f"Protocol error: a '{kind.decode()}' header line "
                                        f"longer than {_MAX_HEADER - 2} bytes")
            return None
        text = bytes(buf[self._pos + 1:end])
        # digits, or -1 (a null); hiredis refuses other signed forms such as "-0"
        if not (text.isdigit() or text == b"-1"):
            what = "multibulk" if kind == b"*" else "bulk"
            raise RespProtocolError(f"Protocol error: invalid {what} length {text!r}")
        self._pos = end + 2
        return int(text)

    def _inline_line(self) -> bytes | None:
        """The inline command line at the guard's position, without its line ending (the
        position moves past it), or None when it is not complete yet."""
        buf = self._buf
        end = buf.find(b"\n", self._pos, self._pos + self.max_inline + 1)
        if end < 0:
            if len(buf) - self._pos > self.max_inline:
                raise RespProtocolError(
                    f"Protocol error: an inline request longer than {self.max_inline} bytes")
            return None
        line = bytes(buf[self._pos:end])
        self._pos = end + 1
        return line[:-1] if line.endswith(b"\r") else line


# --- inline commands -----------------------------------------------------------------------

_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b",
            ord("a"): b"\a"}
_HEX = b"0123456789abcdefABCDEF"
_SPACE = b" \t\r\n\v\f"


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command as Redis does (``sdssplitargs``): words separated by white
    space; "double quotes" with backslash escapes (``\\n``, ``\\xHH``, ...), 'single quotes'
    with ``\\'``. A closing quote must be followed by a space or the end of the line."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return args
        word = bytearray()
        quote = 0
        while True:
            if quote == 0x22:  # in "..."
                if i >= n:
                    raise RespProtocolError("Protocol error: unbalanced quotes in request")
                c = line[i]
                if (c == 0x5C and i + 3 < n and line[i + 1] == ord("x")
                        and line[i + 2] in _HEX and line[i + 3] in _HEX):
                    word.append(int(line[i + 2:i + 4], 16))
                    i += 4
                    continue
                if c == 0x5C and i + 1 < n:
                    word += _ESCAPES.get(line[i + 1], bytes([line[i + 1]]))
                    i += 2
                    continue
                if c == 0x22:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise RespProtocolError(
                            "Protocol error: a closing quote must be followed by a space")
                    i += 1
                    break
                word.append(c)
                i += 1
            elif quote == 0x27:  # in '...'
                if i >= n:
                    raise RespProtocolError("Protocol error: unbalanced quotes in request")
                c = line[i]
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    word.append(0x27)
                    i += 2
                    continue
                if c == 0x27:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise RespProtocolError(
                            "Protocol error: a closing quote must be followed by a space")
                    i += 1
                    break
                word.append(c)
                i += 1
            else:
                if i >= n or line[i] in _SPACE:
                    break
                if line[i] in (0x22, 0x27):
                    quote = line[i]
                else:
                    word.append(line[i])
                i += 1
        args.append(bytes(word))


def encode_command(args: Sequence[bytes]) -> bytes:
    """A command as a client sends it: an array of bulk strings."""
    return array([bulk(a) for a in args])


# --- replies -------------------------------------------------------------------------------

OK = b"+OK\r\n"
NIL = b"$-1\r\n"


def _line(text: str) -> bytes:
    """``text`` on one line: a simple string or error cannot hold CR or LF."""
    return text.replace("\r", " ").replace("\n", " ").encode("utf-8", "backslashreplace")


def simple(text: str) -> bytes:
    return b"+" + _line(text) + b"\r\n"


def error(text: str) -> bytes:
    """An error reply; its first word is the error's code (``ERR``, ``WRONGTYPE``, ...)."""
    return b"-" + _line(text) + b"\r\n"


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk(data: bytes | None) -> bytes:
    """A bulk string, or the null bulk string for None."""
    if data is None:
        return NIL
    return b"$%d\r\n%s\r\n" % (len(data), data)


def array(items: Iterable[bytes] | None) -> bytes:
    """An array of already encoded replies, or the null array for None."""
    if items is None:
        return b"*-1\r\n"
    parts = list(items)
    return b"*%d\r\n" % len(parts) + b"".join(parts)


# --- SCAN cursors --------------------------------------------------------------------------
# A cursor is the last key a page returned, as a decimal number (clients such as redis-py
# parse cursors with int()): the key's UTF-8 bytes after a 0x01 byte (so that leading zero
# bytes survive), read as a big-endian integer. "0" starts a scan and ends it.

_CHUNK = 1000  # decimal digits converted at a time, far below Python's int/str limit


def cursor_for(key: str) -> bytes:
    """The cursor that continues a scan after ``key``."""
    n = int.from_bytes(b"\x01" + key.encode("utf-8"), "big")
    chunks: list[str] = []
    base = 10**_CHUNK
    while n >= base:
        n, low = divmod(n, base)
        chunks.append(f"{low:0{_CHUNK}d}")
    chunks.append(str(n))
    return "".join(reversed(chunks)).encode("ascii")


def cursor_key(cursor: bytes, max_key: int) -> str | None:
    """The key a cursor continues after; None for ``0`` (the start). Raises
    :class:`ValueError` for anything that is not a cursor :func:`cursor_for` made of a key
    of at most ``max_key`` bytes."""
    # a key of b bytes makes a number of about 2.41 * (b + 1) digits
    if not cursor.isdigit() or len(cursor) > 3 * (max_key + 1):
        raise ValueError("invalid cursor")
    text = cursor.decode("ascii").lstrip("0")
    if not text:
        return None
    head = len(text) % _CHUNK or _CHUNK
    n = int(text[:head])
    for i in range(head, len(text), _CHUNK):
        n = n * 10**_CHUNK + int(text[i:i + _CHUNK])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    if not raw.startswith(b"\x01"):
        raise ValueError("invalid cursor")
    try:
        return raw[1:].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("invalid cursor") from None


# --- glob patterns -------------------------------------------------------------------------

_Token = Callable[[int], bool] | None  # one byte's test, or None for '*'


def glob(pattern: bytes) -> Callable[[bytes], bool]:
    """A test of whether a key's bytes match the Redis glob ``pattern``: ``*`` any bytes,
    ``?`` one byte, ``[abc]``, ``[^abc]``, ``[a-z]`` one byte of (not of) a set, ``\\x``
    the byte ``x``. Matching takes time linear in the pattern times the key, whatever the
    pattern (no backtracking blow-up)."""
    tokens = _glob_tokens(pattern)
    if tokens == [None]:  # "*": everything
        return lambda key: True
    return lambda key: _match(tokens, key)


def _glob_tokens(pattern: bytes) -> list[_Token]:
    """The pattern as one test per byte of the key, and None per run of stars; the same
    reading as Redis's ``stringmatchlen`` (a ``[`` with no ``]`` runs to the end)."""
    tokens: list[_Token] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == 0x2A:  # '*'
            if not tokens or tokens[-1] is not None:
                tokens.append(None)
            i += 1
        elif c == 0x3F:  # '?'
            tokens.append(_any_byte)
            i += 1
        elif c == 0x5B:  # '['
            i += 1
            negate = i < n and pattern[i] == 0x5E  # '^'
            if negate:
                i += 1
            members: set[int] = set()
            while i < n:
                if pattern[i] == 0x5C and i + 1 < n:  # '\x'
                    members.add(pattern[i + 1])
                    i += 2
                elif pattern[i] == 0x5D:  # ']'
                    i += 1
                    break
                elif n - i >= 3 and pattern[i + 1] == 0x2D:  # 'a-z'
                    low, high = sorted((pattern[i], pattern[i + 2]))
                    members.update(range(low, high + 1))
                    i += 3
                else:
                    members.add(pattern[i])
                    i += 1
            tokens.append(_byte_set(frozenset(members), negate))
        else:
            if c == 0x5C and i + 1 < n:  # '\x'
                i += 1
                c = pattern[i]
            tokens.append(_byte_set(frozenset((c,)), False))
            i += 1
    return tokens


def _any_byte(b: int) -> bool:
    return True


def _byte_set(members: frozenset[int], negate: bool) -> Callable[[int], bool]:
    if negate:
        return lambda b: b not in members
    return members.__contains__


def _match(tokens: list[_Token], key: bytes) -> bool:
    """Wildcard matching that remembers only the last star: each star's match only ever
    grows, so the time is at most the pattern's length times the key's."""
    t = k = 0
    star = -1  # the token index after the last star seen
    resume = 0  # where in the key that star's match ends now
    while k < len(key):
        token = tokens[t] if t < len(tokens) else _END
        if token is None:
            star = t + 1
            resume = k
            t += 1
        elif token is not _END and token(key[k]):
            t += 1
            k += 1
        elif star >= 0:
            resume += 1
            k = resume
            t = star
        else:
            return False
    while t < len(tokens) and tokens[t] is None:
        t += 1
    return t == len(tokens)


def _END(b: int) -> bool:  # past the last token: matches nothing
    return False
