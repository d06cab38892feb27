"""``replctl write``, ``read``, ``delete`` and ``show``: the key-value commands."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from cluster.cli.common import TOKEN, show_value
from cluster.cli.context import Ctx, echo_json, output_options
from cluster.client import Client
from cluster.errors import ReplError
from cluster.types import Acks, Token, Value
from cluster.wire.codec import MAX_TIMEOUT_MS

F = TypeVar("F", bound=Callable[..., Any])

class AcksType(click.ParamType):  # type: ignore[type-arg]
    name = "acks"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[async|majority|all|N]"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Acks:
        if isinstance(value, Acks):
            return value
        try:
            return Acks.parse(str(value).strip().lower())
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


ACKS_HELP = ("async: durable on the master; N: on the master and N slaves; majority: on a "
             "majority of the nodes; all: on every node.")
TIMEOUT_HELP = ("How long the master waits for the copies --acks asks for (default 5000 "
                "when it needs slaves); past it the write fails with `timeout` and "
                "applied: unknown.")


def write_options(f: F) -> F:
    """``--acks`` and ``--timeout-ms``, shared by ``write`` and ``delete``."""
    f = click.option("--timeout-ms", type=click.IntRange(1, MAX_TIMEOUT_MS), default=None,
                     help=TIMEOUT_HELP)(f)
    return click.option("--acks", type=AcksType(), default="async", show_default=True,
                        help=ACKS_HELP)(f)


def format_items(items: list[tuple[str, Value]], tokens: list[Token] | None = None
                 ) -> list[str]:
    """Keys and values in two aligned columns (``show`` on the command line and in the
    shell); with ``tokens``, each key's token in a column between them."""
    width = max((len(k) for k, _ in items), default=0)
    if tokens is None:
        return [f"{k.ljust(width)}  {show_value(v)}" for k, v in items]
    twidth = max((len(str(t)) for t in tokens), default=0)
    return [f"{k.ljust(width)}  {str(t).ljust(twidth)}  {show_value(v)}"
            for (k, v), t in zip(items, tokens, strict=True)]


def written(token: Token, copies: bool = False) -> str:
    """A write's outcome: where it landed, which is also its read token (and with
    ``copies``, how many nodes held it when the master replied)."""
    text = f"OK index={token.index} epoch={token.epoch} token={token}"
    return f"{text} copies={token.copies}" if copies else text


def run_write(ctx: Ctx, acks: Acks, fn: Callable[[Client], Awaitable[Token]]) -> None:
    """Run a write and print its outcome; with ``--json`` an error is printed as JSON
    too (its code, message and outcome fields), with exit status 1."""
    try:
        result = ctx.run(fn)
    except click.ClickException as exc:
        err = exc.__cause__
        if not ctx.json or not isinstance(err, ReplError):
            raise
        echo_json({"ok": False, "code": err.code, "message": str(err),
                   # no outcome: the client could not even connect, so nothing was sent
                   "applied": err.applied or "no", "index": err.index, "epoch": err.epoch})
        sys.exit(1)
    if ctx.json:
        echo_json({"index": result.index, "epoch": result.epoch, "token": str(result),
                   "copies": result.copies})
    else:
        click.echo(written(result, copies=acks != Acks.ASYNC))


@click.command()
@click.argument("key")
@click.argument("value")
@write_options
@output_options
@click.pass_obj
def write(ctx: Ctx, key: str, value: str, acks: Acks, timeout_ms: int | None) -> None:
    """Set KEY to VALUE (quote a VALUE with spaces: write greeting 'hello world')."""
    run_write(ctx, acks, lambda c: c.set(key, value, acks, timeout_ms=timeout_ms))


@click.command()
@click.argument("key")
@click.option("--min-index", type=TOKEN, default=0,
              help="Read your writes: only from a node that holds the write with this token "
                   "(EPOCH:INDEX, as `write` prints it; a bare INDEX matches any epoch).")
@click.option("--strong", is_flag=True, help="From the master, after it confirms a majority.")
@output_options
@click.pass_obj
def read(ctx: Ctx, key: str, min_index: Token | int, strong: bool) -> None:
    """Print the value of KEY (exit 1 when it does not exist)."""
    result = ctx.run(lambda c: c.get(key, min_index=min_index, strong=strong))
    if ctx.json:
        token = result.token
        echo_json({"key": key, "found": result.found, "value": result.value,
                   "index": result.index, "node": result.node,
                   "token": None if token is None else str(token),
                   "key_epoch": None if token is None else token.epoch,
                   "key_index": None if token is None else token.index})
    elif result.found:
        click.echo(show_value(result.value))
    else:
        click.echo(f"Error: not found: {key}", err=True)
    if not result.found:
        sys.exit(1)


@click.command()
@click.argument("key")
@write_options
@output_options
@click.pass_obj
def delete(ctx: Ctx, key: str, acks: Acks, timeout_ms: int | None) -> None:
    """Delete KEY (a no-op entry when it does not exist)."""
    run_write(ctx, acks, lambda c: c.delete(key, acks, timeout_ms=timeout_ms))


@click.command()
@click.option("--min-index", type=TOKEN, default=0,
              help="Only from a node that holds the write with this token (EPOCH:INDEX).")
@click.option("--tokens", is_flag=True,
              help="With each key's token EPOCH:INDEX, the write that set its value (--json: "
                   "a list of {key, value, token, epoch, index}).")
@output_options
@click.pass_obj
def show(ctx: Ctx, min_index: Token | int, tokens: bool) -> None:
    """Print every key and value, in key order (--json: one object; with --tokens, a
    list)."""
    if not tokens:
        async def collect(c: Client) -> list[tuple[str, Value]]:
            return [item async for item in c.items(min_index=min_index)]
        items = ctx.run(collect)
        if ctx.json:
            echo_json({k: show_value(v) for k, v in items})
            return
        lines = format_items(items)
    else:
        async def collect_tokens(c: Client) -> list[tuple[str, Value, Token]]:
            return [item async for item in c.items_with_tokens(min_index=min_index)]
        found = ctx.run(collect_tokens)
        if ctx.json:
            echo_json([{"key": k, "value": show_value(v), "token": str(t), "epoch": t.epoch,
                        "index": t.index} for k, v, t in found])
            return
        items = [(k, v) for k, v, _ in found]
        lines = format_items(items, [t for _, _, t in found])
    for line in lines:
        click.echo(line)
    click.echo(f"({len(items)} keys)", err=True)


COMMANDS = (write, read, delete, show)
