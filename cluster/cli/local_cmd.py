"""``replctl cluster up`` (a local cluster in the foreground) and ``replctl cluster restart``
(restart one of its processes, through the control channel ``cluster up`` opens)."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
from pathlib import Path
from typing import Any, Protocol

import click

from cluster.cli.common import LOG_FORMATS, fail, run_async
from cluster.errors import ClusterError, ReplError
from cluster.local import METRICS_OFFSET, LocalCluster, control_channel, request_restart

DEFAULT_DATA = Path("./data")


class _Obj(Protocol):
    debug: bool


@click.group()
def cluster() -> None:
    """Run a cluster on this machine."""


@cluster.command("up")
@click.option("--nodes", type=click.IntRange(1, 99), default=4, show_default=True,
              help="Data nodes: a master (n1) and NODES-1 slaves. A majority is NODES//2+1.")
@click.option("--base-port", type=click.IntRange(0, 65534), default=7000, show_default=True,
              help="Router on this port, nodes n1..nN on the next ones (0: free ports).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_DATA, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--fsync", type=click.Choice(["always", "everysec", "no"]), default="always",
              show_default=True)
@click.option("--log-format", type=click.Choice(LOG_FORMATS, case_sensitive=False),
              default="text", envvar="REPL_LOG_FORMAT", show_default=True,
              help="How every process writes its log in DATA/logs/: text, or one JSON object "
              "per line.")
@click.option("--metrics", is_flag=True,
              help=f"Every process serves Prometheus metrics: the router on BASE-PORT+"
              f"{METRICS_OFFSET}, nK on BASE-PORT+{METRICS_OFFSET}+K (free ports with "
              "--base-port 0).")
@click.pass_obj
def up(obj: _Obj, nodes: int, base_port: int, data_dir: Path, host: str, fsync: str,
       log_format: str, metrics: bool) -> None:
    """Run a local cluster in the foreground; Ctrl-C stops it.

    A master (n1), NODES-1 slaves and a router, each logging to DATA/logs/."""
    try:
        run_async(cluster_up(data_dir, host, base_port, fsync, nodes, log_format, metrics))
    except ReplError as exc:
        raise fail(exc, obj.debug) from exc
    except KeyboardInterrupt:
        pass


@cluster.command("restart")
@click.argument("name")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_DATA, show_default=True,
              help="The data directory of the running `replctl cluster up`.")
@click.pass_obj
def restart(obj: _Obj, name: str, data_dir: Path) -> None:
    """Restart one process of the running `cluster up`.

    NAME is n1, n2, ... or router, of the `replctl cluster up` running on the data
    directory: after a crash or a kill, or a running one (SIGTERM first). The process logs
    to DATA/logs/ and Ctrl-C of `cluster up` stops it, like the others."""
    try:
        reply = run_async(request_restart(data_dir.resolve(), name))
    except ReplError as exc:
        raise fail(exc, obj.debug) from exc
    click.echo(f"{name} restarted: pid {reply['pid']}, listening on {reply['address']}, "
               f"log {reply['log']}")


def restart_command(name: str, data_dir: Path) -> str:
    """The command line that restarts ``name``, with ``--data-dir`` unless it is the default."""
    cmd = f"replctl cluster restart {name}"
    if data_dir != DEFAULT_DATA.resolve():
        cmd += f" --data-dir {shlex.quote(str(data_dir))}"
    return cmd


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


async def cluster_up(data_dir: Path, host: str, base_port: int, fsync: str,
                     nodes: int = 4, log_format: str = "text", metrics: bool = False) -> None:
    local = LocalCluster(data_dir.resolve(), host=host, base_port=base_port, nodes=nodes,
                         fsync=fsync, log_format=log_format, metrics=metrics)
    click.echo(f"starting a master, {_plural(nodes - 1, 'slave')} and a router "
               f"(a majority is {nodes // 2 + 1} of {nodes} nodes); data in {local.data_dir}")
    await local.start()
    stop = asyncio.Event()
    restarting = asyncio.Lock()  # one restart at a time, and none while stopping
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def restart(name: str) -> dict[str, Any]:
        if name not in local.children:
            raise ClusterError(f"there is no {name!r} in this cluster; it has "
                               f"{', '.join(local.children)}")
        async with restarting:
            if stop.is_set():
                raise ClusterError("the cluster is stopping")
            try:
                await local.restart(name)
            except ClusterError as exc:
                click.echo(f"!! restart of {name} failed: {exc}", err=True)
                raise
        child = local.children[name]
        click.echo(f"{name} restarted (replctl cluster restart): pid {child.pid}")
        return {"pid": child.pid, "log": str(child.log_path),
                "address": str(local.address_of(name))}

    crash: asyncio.Future[tuple[str, int]] | None = None
    stopped = asyncio.ensure_future(stop.wait())
    try:
        async with control_channel(local.data_dir, restart):
            for name, child in local.children.items():
                role = "router" if name == "router" else \
                    "master" if name == local.master else "slave"
                scrape = local.metrics_addresses.get(name)
                click.echo(f"{name:7} {local.address_of(name)!s:21} {role:6}  "
                           f"pid {child.pid:<7}  log {child.log_path}"
                           + (f"  metrics http://{scrape}/metrics" if scrape else ""))
            click.echo(f"use it:  replctl --router {local.router_address} status")
            click.echo(f"restart a process that crashed or that you killed:  "
                       f"{restart_command('NAME', local.data_dir)}")
            click.echo("cluster is up; press Ctrl-C to stop it")
            crash = asyncio.ensure_future(local.wait_crash())
            while not stop.is_set():
                done, _ = await asyncio.wait({crash, stopped},
                                             return_when=asyncio.FIRST_COMPLETED)
                if crash in done:
                    name, code = crash.result()
                    click.echo(f"!! {name} exited with code {code}; it is not restarted: "
                               f"`{restart_command(name, local.data_dir)}` starts it again. "
                               f"Its last log lines: {local.tail(name, 3)}", err=True)
                    crash = asyncio.ensure_future(local.wait_crash())
    finally:
        if crash is not None:
            crash.cancel()
        stopped.cancel()
        stop.set()
        click.echo("stopping the cluster")
        with contextlib.suppress(asyncio.CancelledError):
            async with restarting:
                await local.stop()
        click.echo("stopped")
