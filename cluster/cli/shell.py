"""``replctl shell``: an interactive prompt that reads its own writes."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
from pathlib import Path
from types import ModuleType

import click

from cluster.cli.common import fail, show_value
from cluster.cli.context import DEBUG_OPTION, Ctx
from cluster.cli.kv_cmd import format_items, written
from cluster.cli.status_cmd import format_status, status_rows
from cluster.client import Client
from cluster.errors import NetworkError, ReplError
from cluster.types import Token

# Each command's arguments and what it does: the one source of `help` and of the errors
# for a wrong number of words.
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "write": (("KEY", "VALUE"), "set a key"),
    "read": (("KEY",), "print a key's value"),
    "delete": (("KEY",), "delete a key"),
    "show": ((), "every key and value"),
    "status": ((), "every node's state"),
    "help": ((), "this text"),
    "exit": ((), "leave (Ctrl-D works too)"),
}
QUOTING = "Quote a key or value that has spaces: write greeting 'hello world'"


def shell_help() -> str:
    lines = ["Commands:"]
    for name, (args, what) in COMMANDS.items():
        lines.append(f"  {' '.join([name, *args]):<20}{what}")
    return "\n".join([*lines, QUOTING])


def check_words(words: list[str]) -> str | None:
    """What is wrong with a command line (split into words), or None when it is right."""
    cmd, args = words[0], words[1:]
    if cmd == "quit":
        cmd = "exit"
    if cmd not in COMMANDS:
        return f"unknown command {cmd!r}; type 'help' for the commands"
    wanted, _ = COMMANDS[cmd]
    if cmd == "help" or len(args) == len(wanted):
        return None
    usage = " ".join([cmd, *wanted])
    if len(args) < len(wanted):
        missing = wanted[len(args):]
        return (f"{cmd} needs {' '.join(wanted)}: {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing (usage: {usage})")
    if not wanted:
        return f"{cmd} takes no arguments"
    keep = len(wanted) - 1
    grouped = [cmd, *args[:keep], " ".join(args[keep:])]
    return (f"{cmd} takes {' '.join(wanted)} but got {len(args)} words; quotes group "
            f"words into one: {shlex.join(grouped)}")


class ShellSession:
    """One shell session: it reads its own writes (every read and show asks for a node that
    has applied the session's last write, as a user at a prompt expects)."""

    def __init__(self) -> None:
        self.last_index: Token | int = 0  # the read token of this shell's last write

    async def run(self, client: Client, words: list[str]) -> str:
        """Run one checked command line and return what to print."""
        problem = check_words(words)
        if problem is not None:
            return f"Error: {problem}"
        match words:
            case ["write", key, value]:
                self.last_index = token = await client.set(key, value)
                return written(token)
            case ["read", key]:
                r = await client.get(key, min_index=self.last_index)
                return show_value(r.value) if r.found else f"(not found: {key})"
            case ["delete", key]:
                self.last_index = token = await client.delete(key)
                return written(token)
            case ["show"]:
                items = [item async for item in client.items(min_index=self.last_index)]
                return "\n".join([*format_items(items), f"({len(items)} keys)"])
            case ["status"]:
                return format_status(status_rows(await client.status()))
        return shell_help()


@click.command()
@DEBUG_OPTION
@click.pass_obj
def shell(ctx: Ctx) -> None:
    """An interactive prompt with line editing and history (commands from stdin when it is
    not a terminal)."""
    interactive = sys.stdin.isatty()
    history = Path.home() / ".replkv_history"
    readline = _readline() if interactive else None
    if readline is not None:
        with contextlib.suppress(OSError):
            readline.read_history_file(history)
    with asyncio.Runner() as runner:
        try:
            client: Client | None = runner.run(Client.connect(ctx.router, timeout=ctx.timeout))
        except ReplError as exc:
            raise fail(exc, ctx.debug) from exc
        click.echo(f"connected to {ctx.router}; type 'help' for commands")
        session = ShellSession()
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
                if words[0] in ("exit", "quit") and check_words(words) is None:
                    break
                try:
                    if client is None:  # the last command lost the connection
                        client = runner.run(Client.connect(ctx.router, timeout=ctx.timeout))
                    click.echo(runner.run(session.run(client, words)))
                except ReplError as exc:
                    click.echo(f"Error: {exc}")
                    if isinstance(exc, NetworkError) and client is not None:
                        runner.run(client.close())
                        client = None
        finally:
            if client is not None:
                runner.run(client.close())
            if readline is not None:
                with contextlib.suppress(OSError):
                    readline.write_history_file(history)


def _readline() -> ModuleType | None:
    try:
        import readline
    except ImportError:  # pragma: no cover - not on Linux
        return None
    return readline
