"""``replctl status`` and ``replctl health``: the state of the nodes."""

from __future__ import annotations

from typing import Any

import click

from cluster.cli.common import ADDRESS
from cluster.cli.context import Ctx, echo_json, output_options
from cluster.config import Address

# What a down node's row cannot know: the router's last figures for it are old, and shown
# beside the live nodes' they read as lost data.
UNKNOWN_WHEN_DOWN = ("epoch", "last_index", "applied_index", "lag_entries", "lag_ms",
                     "majority_index", "last_contact_ms")
HEALTH_TIMEOUT = 3.0


def status_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The router's per-node view (None for what is unknown about a down node), or one row
    when talking to a node directly."""
    if "nodes" not in status:
        row = {k: status.get(k) for k in ("address", "role", "epoch", "last_index",
                                          "applied_index")}
        link = status.get("master_link")
        row.update(id=status.get("node"), up=True, lag_entries=None, lag_ms=None,
                   majority_index=status.get("majority_index"),
                   last_contact_ms=link.get("last_contact_ms")
                   if isinstance(link, dict) else None)
        return [row]
    rows = []
    for node in status["nodes"]:
        row = dict(node)
        if not row.get("up"):
            row.update(dict.fromkeys(UNKNOWN_WHEN_DOWN))
        rows.append(row)
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """The status table, ``-`` for what is unknown."""
    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    headers = ["ID", "ADDRESS", "ROLE", "STATE", "EPOCH", "LAST ID", "APPLIED", "MAJORITY",
               "LAG", "LAG MS", "HEARD MS"]
    table = [headers]
    for r in rows:
        table.append([cell(r["id"]), cell(r["address"]), str(r.get("role") or "?"),
                      "up" if r["up"] else "DOWN", cell(r.get("epoch")),
                      cell(r.get("last_index")), cell(r.get("applied_index")),
                      cell(r.get("majority_index")), cell(r.get("lag_entries")),
                      cell(r.get("lag_ms")), cell(r.get("last_contact_ms"))])
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in table)


@click.command()
@output_options
@click.pass_obj
def status(ctx: Ctx) -> None:
    """For each node: id, address, role, up or down, epoch, last log id, applied id, the
    master's majority id, lag, and how long ago a slave last heard from the master (``-``
    when unknown, as for a node that is down)."""
    data = ctx.run(lambda c: c.status())
    rows = status_rows(data)
    if ctx.json:
        echo_json({"nodes": rows, "master": data.get("master")})
    else:
        click.echo(format_status(rows))


@click.command()
@click.argument("address", type=ADDRESS, required=False)
@output_options
@click.pass_obj
def health(ctx: Ctx, address: Address | None) -> None:
    """Exit 0 when the node or router at ADDRESS (default: --router) answers, for
    container healthchecks."""
    target = address or ctx.router
    reply = ctx.run(lambda c: c.ping(), address=target,
                    timeout=min(ctx.timeout, HEALTH_TIMEOUT))
    if ctx.json:
        echo_json({"address": str(target), "node": reply.get("node"),
                   "role": reply.get("role"), "up": True})
    else:
        click.echo(f"{reply.get('node')} ({reply.get('role')}) is up")


COMMANDS = (status, health)
