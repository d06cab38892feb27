"""``replnode``: run one data node."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from cluster.cli.common import (
    ADDRESS,
    CLUSTER,
    fail,
    limit_options,
    limits_from,
    listen_error,
    run_async,
    server_options,
    setup_logging,
)
from cluster.config import Address, FsyncPolicy, NodeConfig
from cluster.errors import ReplError
from cluster.node.runtime import Node
from cluster.storage import lock
from cluster.types import NodeId


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--id", "node_id", required=True, envvar="REPL_ID", help="This node's id.")
@click.option("--listen", type=ADDRESS, required=True, envvar="REPL_LISTEN",
              help="Address to listen on, HOST:PORT (port 0 picks a free one).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              envvar="REPL_DATA_DIR", help="Directory for the log and snapshots.")
@click.option("--cluster", "cluster_map", type=CLUSTER, required=True, envvar="REPL_CLUSTER",
              help="Every node: n1=HOST:PORT,n2=HOST:PORT,...")
@click.option("--master", required=True, envvar="REPL_MASTER", help="The master's node id.")
@click.option("--fsync", type=click.Choice([p.value for p in FsyncPolicy]),
              default=FsyncPolicy.ALWAYS.value, envvar="REPL_FSYNC", show_default=True,
              help="When the log is synced to disk.")
@click.option("--heartbeat-interval", type=click.FloatRange(0.001), default=0.1,
              envvar="REPL_HEARTBEAT_INTERVAL", show_default=True,
              help="Seconds between heartbeats on an idle replication link.")
@click.option("--peer-timeout", type=click.FloatRange(0.01), default=1.0,
              envvar="REPL_PEER_TIMEOUT", show_default=True,
              help="Seconds of silence after which a link is dead.")
@click.option("--snapshot-every", type=click.IntRange(1), default=100_000,
              envvar="REPL_SNAPSHOT_EVERY", show_default=True,
              help="Entries between snapshots (older log entries are then dropped).")
@limit_options
@server_options
@click.option("--log-level", default="info", envvar="REPL_LOG_LEVEL", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--debug", is_flag=True, envvar="REPL_DEBUG", help="Show tracebacks.")
def main(node_id: str, listen: Address, data_dir: Path, cluster_map: dict[NodeId, Address],
         master: str, fsync: str, heartbeat_interval: float, peer_timeout: float,
         snapshot_every: int, max_frame: int, max_key_size: int, max_value_size: int,
         metrics_listen: Address | None, log_format: str, log_level: str,
         debug: bool) -> None:
    """Run one replkv data node (master or slave, as --master says)."""
    setup_logging(log_level, log_format, {"node": node_id})
    try:
        config = NodeConfig(
            node_id=NodeId(node_id), listen=listen, data_dir=data_dir, cluster=cluster_map,
            bootstrap_master=NodeId(master), fsync=FsyncPolicy(fsync),
            limits=limits_from(max_frame, max_key_size, max_value_size),
            heartbeat_interval=heartbeat_interval, peer_timeout=peer_timeout,
            snapshot_every=snapshot_every, metrics_listen=metrics_listen,
        )
        config.validate()
    except ReplError as exc:
        raise click.UsageError(str(exc)) from exc

    created = _outermost_missing(data_dir)  # removed again if the node never gets ready
    started = False

    def ready(addr: Address) -> None:
        nonlocal started
        started = True
        click.echo(f"READY {addr}")
        sys.stdout.flush()

    try:
        try:
            run_async(_run(config, ready))
        finally:
            if created is not None and not started:
                lock.remove_unless_locked(created, [data_dir / "LOCK"])
    except (ReplError, OSError) as exc:
        raise fail(listen_error(exc, listen), debug) from exc
    except BaseExceptionGroup as eg:
        raise fail(eg.exceptions[0], debug) from eg
    except KeyboardInterrupt:
        pass


def _outermost_missing(path: Path) -> Path | None:
    missing = None
    for p in (path.absolute(), *path.absolute().parents):
        if p.exists():
            break
        missing = p
    return missing


async def _run(config: NodeConfig, ready: Callable[[Address], None]) -> None:
    await Node(config).run(ready)


if __name__ == "__main__":
    main()
