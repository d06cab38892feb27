"""``replrouter``: run the router."""

from __future__ import annotations

import sys

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
from cluster.config import Address, RouterConfig
from cluster.errors import ReplError
from cluster.router.server import Router
from cluster.types import NodeId


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", type=ADDRESS, required=True, envvar="REPL_LISTEN",
              help="Address to listen on, HOST:PORT.")
@click.option("--cluster", "cluster_map", type=CLUSTER, required=True, envvar="REPL_CLUSTER",
              help="Every node: n1=HOST:PORT,n2=HOST:PORT,...")
@click.option("--health-interval", type=click.FloatRange(0.001), default=0.2,
              envvar="REPL_HEALTH_INTERVAL", show_default=True,
              help="Seconds between health probes of each node.")
@click.option("--node-timeout", type=click.FloatRange(0.01), default=1.0,
              envvar="REPL_NODE_TIMEOUT", show_default=True,
              help="A node that does not answer a probe within this many seconds is down.")
@click.option("--max-lag", type=click.IntRange(0), default=10_000, envvar="REPL_MAX_LAG",
              show_default=True, help="Slaves further behind than this many entries get no "
              "reads.")
@click.option("--max-lag-ms", type=click.IntRange(0), default=1_000, envvar="REPL_MAX_LAG_MS",
              show_default=True, help="A slave whose replication session is down, that has "
              "not heard from the master within this many milliseconds, or that the master "
              "reports lagging by more, gets no default reads (they go to the master; with no "
              "master, they fail: unavailable). 0 turns the time bound off.")
@click.option("--request-timeout", type=click.FloatRange(0.001), default=8.0,
              envvar="REPL_REQUEST_TIMEOUT", show_default=True,
              help="Seconds a forwarded request waits for its node; past it a write is "
              "answered `timeout` with applied: unknown (a write with a longer --timeout-ms "
              "gets that plus a second).")
@click.option("--resp-listen", type=ADDRESS, default=None, envvar="REPL_RESP_LISTEN",
              help="Also serve Redis clients (RESP2: redis-cli, redis-py, ...) on this "
              "address, HOST:PORT; off unless given. See docs/RESP.md.")
@limit_options
@server_options
@click.option("--log-level", default="info", envvar="REPL_LOG_LEVEL", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--debug", is_flag=True, envvar="REPL_DEBUG", help="Show tracebacks.")
def main(listen: Address, cluster_map: dict[NodeId, Address], health_interval: float,
         node_timeout: float, max_lag: int, max_lag_ms: int, request_timeout: float,
         resp_listen: Address | None, max_frame: int, max_key_size: int,
         max_value_size: int, metrics_listen: Address | None, log_format: str,
         log_level: str, debug: bool) -> None:
    """Run the replkv router: writes to the master, reads to a random live slave."""
    setup_logging(log_level, log_format, {"router": str(listen)})
    try:
        config = RouterConfig(listen=listen, cluster=cluster_map,
                              limits=limits_from(max_frame, max_key_size, max_value_size),
                              health_interval=health_interval, node_timeout=node_timeout,
                              max_lag=max_lag, max_lag_ms=max_lag_ms,
                              request_timeout=request_timeout, resp_listen=resp_listen,
                              metrics_listen=metrics_listen)
        config.validate()
    except ReplError as exc:
        raise click.UsageError(str(exc)) from exc

    def ready(addr: Address) -> None:
        click.echo(f"READY {addr}")
        sys.stdout.flush()

    try:
        run_async(Router(config).run(ready))
    except (ReplError, OSError) as exc:
        raise fail(listen_error(exc, listen), debug) from exc
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
