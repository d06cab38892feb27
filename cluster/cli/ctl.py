"""``replctl``: the root group. Each family of commands lives in its own module:
:mod:`~cluster.cli.kv_cmd` (write, read, delete, show), :mod:`~cluster.cli.status_cmd`
(status, health), :mod:`~cluster.cli.shell`, :mod:`~cluster.cli.local_cmd` (``cluster up``)
and :mod:`~cluster.cli.demo`."""

from __future__ import annotations

from pathlib import Path

import click

from cluster.cli import kv_cmd, shell, status_cmd
from cluster.cli.common import ADDRESS, fail, run_async, setup_logging
from cluster.cli.context import Ctx
from cluster.cli.local_cmd import cluster
from cluster.config import Address
from cluster.errors import ReplError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--router", type=ADDRESS, default="127.0.0.1:7000", envvar="REPL_ROUTER",
              show_default=True, help="The router (or any node) to talk to.")
@click.option("--timeout", type=click.FloatRange(0.1), default=10.0, envvar="REPL_TIMEOUT",
              show_default=True, help="Seconds to wait for a reply.")
@click.option("--debug", is_flag=True, envvar="REPL_DEBUG",
              help="Show tracebacks on errors (also accepted after the command).")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (also accepted after the command).")
@click.pass_context
def main(ctx: click.Context, router: Address, timeout: float, debug: bool,
         as_json: bool) -> None:
    """replkv client and tools. Options also come from REPL_* environment variables."""
    setup_logging("debug" if debug else "warning")
    source = ctx.get_parameter_source("router")
    given = source not in (None, click.core.ParameterSource.DEFAULT)
    ctx.obj = Ctx(router, timeout, debug=debug, router_given=given, json=as_json)


for command in (*kv_cmd.COMMANDS, *status_cmd.COMMANDS, shell.shell):
    main.add_command(command)


# --- local cluster and demo ------------------------------------------------------------------
# These two wrappers move into cluster/cli/local_cmd.py and cluster/cli/demo.py (owned
# elsewhere); once they are there this block becomes two main.add_command(...) lines.


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
