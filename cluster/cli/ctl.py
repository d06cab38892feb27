"""``replctl``: the client (write, read, delete, show, status, shell) and local tooling
(``cluster up``, ``demo``, ``health``)."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from cluster.cli.common import ADDRESS, fail, run_async, setup_logging, show_value
from cluster.cli.local_cmd import cluster
from cluster.client import Client
from cluster.config import Address
from cluster.errors import ReplError
from cluster.types import Acks, Value

T = TypeVar("T")


@dataclass
class Ctx:
    router: Address
    timeout: float
    debug: bool
    router_given: bool = False

    def run(self, fn: Callable[[Client], Awaitable[T]]) -> T:
        """Connect, run ``fn``, close; library errors become one clear line."""
        async def go() -> T:
            async with await Client.connect(self.router, timeout=self.timeout) as client:
                return await fn(client)
        try:
            return run_async(go())
        except ReplError as exc:
            raise fail(exc, self.debug) from exc


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=show_value))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--router", type=ADDRESS, default="127.0.0.1:7000", envvar="REPL_ROUTER",
              show_default=True, help="The router (or any node) to talk to.")
@click.option("--timeout", type=click.FloatRange(0.1), default=10.0, envvar="REPL_TIMEOUT",
              show_default=True, help="Seconds to wait for a reply.")
@click.option("--debug", is_flag=True, envvar="REPL_DEBUG", help="Show tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, router: Address, timeout: float, debug: bool) -> None:
    """replkv client and tools. Options also come from REPL_* environment variables."""
    setup_logging("debug" if debug else "warning")
    source = ctx.get_parameter_source("router")
    given = source not in (None, click.core.ParameterSource.DEFAULT)
    ctx.obj = Ctx(router, timeout, debug, given)


# --- data commands -------------------------------------------------------------------------------

ACKS = click.Choice([a.value for a in Acks])


@main.command()
@click.argument("key")
@click.argument("value")
@click.option("--acks", type=ACKS, default="async", show_default=True,
              help="async: durable on the master; majority: on a majority of nodes.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def write(ctx: Ctx, key: str, value: str, acks: str, as_json: bool) -> None:
    """Set KEY to VALUE."""
    index = ctx.run(lambda c: c.set(key, value, Acks(acks)))
    echo_json({"index": index}) if as_json else click.echo(f"OK index={index}")


@main.command()
@click.argument("key")
@click.option("--min-index", type=click.IntRange(0), default=0,
              help="Only from a node that has applied this index (read your writes).")
@click.option("--strong", is_flag=True, help="From the master, after it confirms a majority.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def read(ctx: Ctx, key: str, min_index: int, strong: bool, as_json: bool) -> None:
    """Print the value of KEY (exit 1 when it does not exist)."""
    result = ctx.run(lambda c: c.get(key, min_index=min_index, strong=strong))
    if as_json:
        echo_json({"key": key, "found": result.found, "value": result.value,
                   "index": result.index, "node": result.node})
    elif result.found:
        click.echo(show_value(result.value))
    if not result.found:
        if not as_json:
            click.echo(f"Error: not found: {key}", err=True)
        sys.exit(1)


@main.command()
@click.argument("key")
@click.option("--acks", type=ACKS, default="async", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def delete(ctx: Ctx, key: str, acks: str, as_json: bool) -> None:
    """Delete KEY (a no-op entry when it does not exist)."""
    index = ctx.run(lambda c: c.delete(key, Acks(acks)))
    echo_json({"index": index}) if as_json else click.echo(f"OK index={index}")


@main.command()
@click.option("--min-index", type=click.IntRange(0), default=0,
              help="Only from a node that has applied this index.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_obj
def show(ctx: Ctx, min_index: int, as_json: bool) -> None:
    """Print every key and value, in key order."""
    async def collect(c: Client) -> list[tuple[str, Value]]:
        return [item async for item in c.items(min_index=min_index)]
    items = ctx.run(collect)
    if as_json:
        echo_json({k: show_value(v) for k, v in items})
        return
    width = max((len(k) for k, _ in items), default=0)
    for k, v in items:
        click.echo(f"{k.ljust(width)}  {show_value(v)}")
    click.echo(f"({len(items)} keys)", err=True)


def status_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The router's per-node view, or one row when talking to a node directly."""
    if "nodes" in status:
        return list(status["nodes"])
    row = {k: status.get(k) for k in ("address", "role", "epoch", "last_index",
                                      "applied_index")}
    row.update(id=status.get("node"), up=True, lag_entries=None, lag_ms=None)
    return [row]


def format_status(rows: list[dict[str, Any]]) -> str:
    headers = ["ID", "ADDRESS", "ROLE", "STATE", "LAST ID", "APPLIED", "LAG", "LAG MS"]
    table = [headers]
    for r in rows:
        def num(v: Any) -> str:
            return "-" if v is None else str(v)
        table.append([str(r["id"]), str(r["address"]), str(r.get("role") or "?"),
                      "up" if r["up"] else "DOWN", num(r.get("last_index")),
                      num(r.get("applied_index")), num(r.get("lag_entries")),
                      num(r.get("lag_ms"))])
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def status(ctx: Ctx, as_json: bool) -> None:
    """For each node: id, address, role, up or down, last log id, applied id and lag."""
    data = ctx.run(lambda c: c.status())
    rows = status_rows(data)
    if as_json:
        echo_json({"nodes": rows, "master": data.get("master")})
    else:
        click.echo(format_status(rows))


@main.command()
@click.argument("address", type=ADDRESS)
@click.pass_obj
def health(ctx: Ctx, address: Address) -> None:
    """Exit 0 when the node or router at ADDRESS answers (for container healthchecks)."""
    reply = Ctx(address, min(ctx.timeout, 3.0), ctx.debug).run(lambda c: c.ping())
    click.echo(f"{reply.get('node')} ({reply.get('role')}) is up")


# --- the shell -------------------------------------------------------------------------------

SHELL_HELP = """Commands:
  write KEY VALUE     set a key
  read KEY            print a key's value
  delete KEY          delete a key
  show                every key and value
  status              every node's state
  help                this text
  exit                leave (Ctrl-D works too)"""


@main.command()
@click.pass_obj
def shell(ctx: Ctx) -> None:
    """An interactive prompt with line editing and history."""
    import asyncio

    try:
        import readline
    except ImportError:  # pragma: no cover - not on Linux
        readline = None  # type: ignore[assignment]
    history = Path.home() / ".replkv_history"
    if readline is not None:
        with __import__("contextlib").suppress(OSError):
            readline.read_history_file(history)
    interactive = sys.stdin.isatty()
    with asyncio.Runner() as runner:
        try:
            client = runner.run(Client.connect(ctx.router, timeout=ctx.timeout))
        except ReplError as exc:
            raise fail(exc, ctx.debug) from exc
        click.echo(f"connected to {ctx.router}; type 'help' for commands")
        session = _ShellSession()
        try:
            while True:
                try:
                    line = input("replkv> " if interactive else "")
                except EOFError:
                    break
                try:
                    words = shlex.split(line)
                except ValueError as exc:
                    click.echo(f"Error: {exc}")
                    continue
                if not words:
                    continue
                if words[0] in ("exit", "quit"):
                    break
                try:
                    click.echo(runner.run(session.run(client, words)))
                except ReplError as exc:
                    click.echo(f"Error: {exc}")
                    if exc.code == "network":
                        client = runner.run(Client.connect(ctx.router, timeout=ctx.timeout))
        finally:
            runner.run(client.close())
            if readline is not None:
                with __import__("contextlib").suppress(OSError):
                    readline.write_history_file(history)


class _ShellSession:
    """One shell session: it reads its own writes (every read and show asks for a node that
    has applied the session's last write, as a user at a prompt expects)."""

    def __init__(self) -> None:
        self.last_index = 0

    async def run(self, client: Client, words: list[str]) -> str:
        cmd, args = words[0], words[1:]
        match cmd, args:
            case "write", [key, value]:
                self.last_index = await client.set(key, value)
                return f"OK index={self.last_index}"
            case "read", [key]:
                r = await client.get(key, min_index=self.last_index)
                return show_value(r.value) if r.found else f"(not found: {key})"
            case "delete", [key]:
                self.last_index = await client.delete(key)
                return f"OK index={self.last_index}"
            case "show", []:
                lines = [f"{k}  {show_value(v)}"
                         async for k, v in client.items(min_index=self.last_index)]
                return "\n".join([*lines, f"({len(lines)} keys)"])
            case "status", []:
                return format_status(status_rows(await client.status()))
            case "help", _:
                return SHELL_HELP
        return f"Error: bad command {' '.join(words)!r}; type 'help'"


# --- local cluster and demo --------------------------------------------------------------------


main.add_command(cluster)  # cluster up, cluster restart


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the demo cluster keeps its data (default: a temporary directory).")
@click.option("--base-port", type=click.IntRange(0, 65530), default=0,
              help="Router port for the demo cluster (default: free ports).")
@click.pass_obj
def demo(ctx: Ctx, data_dir: Path | None, base_port: int) -> None:
    """The narrated demonstration: replication, a slave crash and catch-up by id, a master
    crash and restart, and every node's final state side by side.

    With --router (or REPL_ROUTER) it uses that running cluster and skips the crashes."""
    from cluster.cli.demo import run_demo
    try:
        run_async(run_demo(data_dir, base_port, ctx.router if ctx.router_given else None))
    except ReplError as exc:
        raise fail(exc, ctx.debug) from exc


if __name__ == "__main__":
    main()
