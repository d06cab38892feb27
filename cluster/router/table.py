"""Which node serves what, from the health probes. Pure: time and randomness come in."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from cluster.config import Address
from cluster.types import NodeId


@dataclass(slots=True)
class NodeView:
    node: NodeId
    address: Address
    up: bool = False
    role: str | None = None
    epoch: int = 0
    last_index: int = 0
    applied_index: int = 0
    error: str | None = None
    status: dict[str, Any] = field(default_factory=dict)


class RoutingTable:
    def __init__(self, nodes: dict[NodeId, Address], max_lag: int, rng: random.Random) -> None:
        self.views = {n: NodeView(n, a) for n, a in nodes.items()}
        self.max_lag = max_lag
        self._rng = rng

    def update(self, node: NodeId, status: dict[str, Any]) -> None:
        v = self.views[node]
        v.up = True
        v.error = None
        v.role = str(status.get("role"))
        v.epoch = int(status.get("epoch", 0))
        v.last_index = int(status.get("last_index", 0))
        v.applied_index = int(status.get("applied_index", 0))
        v.status = status

    def failed(self, node: NodeId, error: str) -> bool:
        """Mark ``node`` down; True when it was up."""
        v = self.views[node]
        was_up = v.up
        v.up = False
        v.error = error
        return was_up

    def applied(self, node: NodeId, index: int) -> None:
        """A reply showed ``node`` has applied ``index``."""
        v = self.views[node]
        v.applied_index = max(v.applied_index, index)

    def master(self) -> NodeId | None:
        masters = [v for v in self.views.values() if v.up and v.role == "master"]
        if not masters:
            return None
        return max(masters, key=lambda v: v.epoch).node

    def pick_read(self, min_index: int = 0, exclude: frozenset[NodeId] = frozenset()
                  ) -> NodeId | None:
        """A random live slave within the lag bound, preferring those known to have applied
        ``min_index`` (the node itself refuses a read it cannot serve, and the router then
        tries another); the master when no slave qualifies; None when nothing is up."""
        master = self.master()
        head = self.views[master].last_index if master else max(
            (v.last_index for v in self.views.values() if v.up), default=0)
        slaves = [
            v for v in self.views.values()
            if v.up and v.role == "slave" and v.node not in exclude
            and head - v.applied_index <= self.max_lag
        ]
        known = [v.node for v in slaves if v.applied_index >= min_index]
        if known or slaves:
            return self._rng.choice(known or [v.node for v in slaves])
        if master is not None and master not in exclude:
            return master
        return None

    def view(self) -> list[dict[str, Any]]:
        """Every node as ``replctl status`` shows it."""
        master = self.master()
        lag: dict[str, dict[str, Any]] = {}
        head = 0
        if master is not None:
            mstatus = self.views[master].status
            head = int(mstatus.get("last_index", 0))
            lag = {str(s["id"]): s for s in mstatus.get("slaves", [])}
        out = []
        for v in self.views.values():
            row: dict[str, Any] = {
                "id": v.node, "address": str(v.address), "role": v.role, "up": v.up,
                "epoch": v.epoch, "last_index": v.last_index,
                "applied_index": v.applied_index, "lag_entries": None, "lag_ms": None,
            }
            if v.node == master:
                row["lag_entries"], row["lag_ms"] = 0, 0
            elif v.node in lag and v.up:
                row["lag_entries"] = max(0, head - v.applied_index)
                row["lag_ms"] = lag[v.node]["lag_ms"] if row["lag_entries"] else 0
            if not v.up:
                row["error"] = v.error
            out.append(row)
        return out
