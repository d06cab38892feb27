"""``replctl cluster up``: run a local cluster in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import click

from cluster.local import LocalCluster


async def cluster_up(data_dir: Path, host: str, base_port: int, fsync: str) -> None:
    local = LocalCluster(data_dir.resolve(), host=host, base_port=base_port, fsync=fsync)
    click.echo(f"starting a master, {len(local.node_ids) - 1} slaves and a router; "
               f"data in {local.data_dir}")
    await local.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    click.echo(f"router  {local.router_address}   (replctl --router {local.router_address} ...)")
    for n in local.node_ids:
        child = local.children[n]
        role = "master" if n == local.master else "slave"
        click.echo(f"{n}      {local.addresses[n]}   {role:6}  pid {child.pid}  "
                   f"log {child.log_path}")
    click.echo("cluster is up; press Ctrl-C to stop it")
    crash = asyncio.ensure_future(local.wait_crash())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            done, _ = await asyncio.wait({crash, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if crash in done:
                name, code = crash.result()
                click.echo(f"!! {name} exited with code {code}; it is not restarted. "
                           f"Last log lines: {local.tail(name, 3)}", err=True)
                crash = asyncio.ensure_future(local.wait_crash())
    finally:
        crash.cancel()
        stopped.cancel()
        click.echo("stopping the cluster")
        with contextlib.suppress(asyncio.CancelledError):
            await local.stop()
        click.echo("stopped")
