"""``replctl write``, ``read``, ``delete`` and ``show``: the key-value commands."""

from __future__ import annotations

import sys

import click

from cluster.cli.common import TOKEN, show_value
from cluster.cli.context import Ctx, echo_json, output_options
from cluster.client import Client
from cluster.types import Acks, Token, Value

ACKS = click.Choice([a.value for a in Acks])
ACKS_HELP = "async: durable on the master; majority: on a majority of nodes."


def format_items(items: list[tuple[str, Value]]) -> list[str]:
    """Keys and values in two aligned columns (``show`` on the command line and in the
    shell)."""
    width = max((len(k) for k, _ in items), default=0)
    return [f"{k.ljust(width)}  {show_value(v)}" for k, v in items]


def written(token: Token) -> str:
    """A write's outcome: where it landed, which is also its read token."""
    return f"OK index={token.index} epoch={token.epoch} token={token}"


def echo_written(ctx: Ctx, token: Token) -> None:
    if ctx.json:
        echo_json({"index": token.index, "epoch": token.epoch, "token": str(token)})
    else:
        click.echo(written(token))


@click.command()
@click.argument("key")
@click.argument("value")
@click.option("--acks", type=ACKS, default="async", show_default=True, help=ACKS_HELP)
@output_options
@click.pass_obj
def write(ctx: Ctx, key: str, value: str, acks: str) -> None:
    """Set KEY to VALUE (quote a VALUE with spaces: write greeting 'hello world')."""
    echo_written(ctx, ctx.run(lambda c: c.set(key, value, Acks(acks))))


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
        echo_json({"key": key, "found": result.found, "value": result.value,
                   "index": result.index, "node": result.node})
    elif result.found:
        click.echo(show_value(result.value))
    else:
        click.echo(f"Error: not found: {key}", err=True)
    if not result.found:
        sys.exit(1)


@click.command()
@click.argument("key")
@click.option("--acks", type=ACKS, default="async", show_default=True, help=ACKS_HELP)
@output_options
@click.pass_obj
def delete(ctx: Ctx, key: str, acks: str) -> None:
    """Delete KEY (a no-op entry when it does not exist)."""
    echo_written(ctx, ctx.run(lambda c: c.delete(key, Acks(acks))))


@click.command()
@click.option("--min-index", type=TOKEN, default=0,
              help="Only from a node that holds the write with this token (EPOCH:INDEX).")
@output_options
@click.pass_obj
def show(ctx: Ctx, min_index: Token | int) -> None:
    """Print every key and value, in key order (--json: one object)."""
    async def collect(c: Client) -> list[tuple[str, Value]]:
        return [item async for item in c.items(min_index=min_index)]
    items = ctx.run(collect)
    if ctx.json:
        echo_json({k: show_value(v) for k, v in items})
        return
    for line in format_items(items):
        click.echo(line)
    click.echo(f"({len(items)} keys)", err=True)


COMMANDS = (write, read, delete, show)
