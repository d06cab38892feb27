"""What every command shares: option types, logging, running a coroutine, error mapping."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import sys
import time
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

import click

from cluster.config import Address, Limits, parse_cluster
from cluster.errors import NetworkError, ReplError
from cluster.types import NodeId, Token, Value

T = TypeVar("T")


class AddressType(click.ParamType):  # type: ignore[type-arg]
    name = "HOST:PORT"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Address:
        if isinstance(value, Address):
            return value
        try:
            return Address.parse(str(value))
        except ReplError as exc:
            self.fail(str(exc), param, ctx)


class ClusterType(click.ParamType):  # type: ignore[type-arg]
    name = "ID=HOST:PORT,..."

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> dict[NodeId, Address]:
        if isinstance(value, dict):
            return value
        try:
            return parse_cluster(str(value))
        except ReplError as exc:
            self.fail(str(exc), param, ctx)


class TokenType(click.ParamType):  # type: ignore[type-arg]
    """A read token as ``write`` prints it, ``EPOCH:INDEX``; a bare ``INDEX`` matches an
    entry of any epoch."""

    name = "EPOCH:INDEX"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Token | int:
        if isinstance(value, Token | int):
            return value
        epoch, sep, index = str(value).strip().rpartition(":")
        try:
            token = Token(int(epoch), int(index)) if sep else int(index)
        except ValueError:
            self.fail(f"{value!r} is not a read token: expected EPOCH:INDEX (as `write` "
                      "prints it) or INDEX", param, ctx)
        if (isinstance(token, Token) and (token.epoch < 0 or token.index < 0)) or \
                (isinstance(token, int) and token < 0):
            self.fail(f"{value!r}: epoch and index must be >= 0", param, ctx)
        return token


ADDRESS = AddressType()
CLUSTER = ClusterType()
TOKEN = TokenType()


def limit_options(f: Any) -> Any:
    d = Limits()
    f = click.option("--max-frame", type=click.IntRange(1024), default=d.max_frame,
                     envvar="REPL_MAX_FRAME", show_default=True,
                     help="Largest frame accepted, in bytes.")(f)
    f = click.option("--max-key-size", type=click.IntRange(1), default=d.max_key,
                     envvar="REPL_MAX_KEY_SIZE", show_default=True,
                     help="Largest key, in bytes.")(f)
    f = click.option("--max-value-size", type=click.IntRange(0), default=d.max_value,
                     envvar="REPL_MAX_VALUE_SIZE", show_default=True,
                     help="Largest value, in bytes.")(f)
    return f


def limits_from(max_frame: int, max_key_size: int, max_value_size: int) -> Limits:
    return Limits(max_frame=max_frame, max_key=max_key_size, max_value=max_value_size)


LOG_FORMATS = ("text", "json")


def server_options(f: Any) -> Any:
    """What ``replnode`` and ``replrouter`` share besides the limits: log format, metrics."""
    f = click.option("--log-format", type=click.Choice(LOG_FORMATS, case_sensitive=False),
                     default="text", envvar="REPL_LOG_FORMAT", show_default=True,
                     help="Log lines on stderr as text, or as one JSON object per line "
                     "(time, level, node or router, logger, event and the event's "
                     "fields).")(f)
    f = click.option("--metrics-listen", type=ADDRESS, default=None,
                     envvar="REPL_METRICS_LISTEN",
                     help="Serve Prometheus metrics over HTTP at HOST:PORT/metrics (off "
                     "unless given).")(f)
    return f


def setup_logging(level: str, log_format: str = "text",
                  process: Mapping[str, str] | None = None) -> None:
    """Log to stderr at ``level``, as text or as JSON lines; ``process`` (``{"node": ID}``
    or ``{"router": ADDRESS}``) names the process in each JSON line."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process or {}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


# what every LogRecord has; anything else on a record came in through ``extra``
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601 with milliseconds), ``level``,
    the process's own keys, ``logger``, ``event`` (the message) and the fields the call
    passed as ``extra``; ``exc`` holds a traceback when there is one."""

    def __init__(self, process: Mapping[str, str]) -> None:
        super().__init__()
        self._process = dict(process)

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            **self._process,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS:
                out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed (the ``fast`` extra)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def fail(exc: BaseException, debug: bool) -> click.ClickException:
    """A library error as one clear line (a traceback too with ``--debug``)."""
    if debug:
        import traceback

        traceback.print_exception(exc)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ReplError) and not text.startswith(exc.code):
        text = f"{exc.code}: {text}"
    return click.ClickException(text)


_LISTEN_ERRORS = {
    errno.EADDRINUSE: "the port is already in use (by another replnode, replrouter or program)",
    errno.EADDRNOTAVAIL: "this machine has no such address",
    errno.EACCES: "permission denied (ports below 1024 need root)",
}


def listen_error(exc: BaseException, listen: Address) -> BaseException:
    """A failure to listen on ``listen`` as one line that names it; other errors as they are."""
    if isinstance(exc, socket.gaierror):
        return NetworkError(f"cannot listen on {listen}: unknown host {listen.host!r}")
    if isinstance(exc, OSError) and exc.filename is None and exc.errno in _LISTEN_ERRORS:
        return NetworkError(f"cannot listen on {listen}: {_LISTEN_ERRORS[exc.errno]}")
    return exc


def show_value(value: Value | None) -> str:
    """A value for the terminal: text as is, binary decoded with escapes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return "" if value is None else value
