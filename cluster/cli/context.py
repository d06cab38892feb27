"""The object every ``replctl`` command gets (``@click.pass_obj``), and the options every
command that prints data shares."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from cluster.cli.common import fail, run_async, show_value
from cluster.client import Client
from cluster.config import Address
from cluster.errors import ReplError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Ctx:
    router: Address
    timeout: float
    debug: bool = False
    router_given: bool = False  # --router or REPL_ROUTER was set (not the default)
    json: bool = False

    def run(self, fn: Callable[[Client], Awaitable[T]], address: Address | None = None,
            timeout: float | None = None) -> T:
        """Connect (to the router unless ``address`` is given), run ``fn``, close; library
        errors become one clear line."""
        async def go() -> T:
            async with await Client.connect(address or self.router,
                                            timeout=timeout or self.timeout) as client:
                return await fn(client)
        try:
            return run_async(go())
        except ReplError as exc:
            raise fail(exc, self.debug) from exc

    def set_debug(self) -> None:
        self.debug = True
        logging.getLogger().setLevel(logging.DEBUG)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=show_value))


def _obj(ctx: click.Context) -> Ctx:
    obj = ctx.find_object(Ctx)
    assert obj is not None, "the root group builds the Ctx before any command parses"
    return obj


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _obj(ctx).json = True


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        _obj(ctx).set_debug()


JSON_OPTION = click.option("--json", is_flag=True, expose_value=False, callback=_set_json,
                           help="Print JSON (also accepted before the command).")
DEBUG_OPTION = click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug,
                            help="Show tracebacks on errors (also accepted before the "
                                 "command).")


def output_options(f: F) -> F:
    """``--json`` and ``--debug`` after the command name, as well as before it."""
    return JSON_OPTION(DEBUG_OPTION(f))
