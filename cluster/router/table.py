"""Which node serves what, from the health probes. Pure: time and randomness come in.

Times are the router's monotonic clock in seconds (``time.monotonic()``), passed in by the
caller: when a probe was sent (:meth:`RoutingTable.update`) and when a read is routed
(:meth:`RoutingTable.pick_read`)."""

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
    probed_at: float = 0.0  # when the probe behind ``status`` was sent (monotonic seconds)
    # a slave's own report: whether its replication session is up, and milliseconds since
    # the master last sent it anything (None: never), as of ``probed_at``
    link_up: bool = False
    last_contact_ms: int | None = None
    # a master's report: the highest index on a majority, and each slave's lag in ms
    majority_index: int | None = None
    lag_ms: dict[str, int] = field(default_factory=dict)


class RoutingTable:
    def __init__(self, nodes: dict[NodeId, Address], max_lag: int, max_lag_ms: int,
                 rng: random.Random) -> None:
        self.views = {n: NodeView(n, a) for n, a in nodes.items()}
        self.max_lag = max_lag  # entries; reads skip slaves further behind the master
        self.max_lag_ms = max_lag_ms  # milliseconds, 0 = off; see pick_read
        self._rng = rng

    def update(self, node: NodeId, status: dict[str, Any], probed_at: float) -> None:
        """Record the ``status`` a probe sent at ``probed_at`` got back. The send time,
        not the arrival, dates the node's figures: they are at most that old."""
        v = self.views[node]
        v.up = True
        v.error = None
        v.role = str(status.get("role"))
        v.epoch = int(status.get("epoch", 0))
        v.last_index = int(status.get("last_index", 0))
        v.applied_index = int(status.get("applied_index", 0))
        v.status = status
        v.probed_at = probed_at
        link = status.get("master_link")
        link = link if isinstance(link, dict) else {}
        v.link_up = link.get("up") is True
        v.last_contact_ms = _count(link.get("last_contact_ms"))
        v.majority_index = _count(status.get("majority_index"))
        slaves = status.get("slaves")
        v.lag_ms = {
            str(s.get("id")): lag for s in (slaves if isinstance(slaves, list) else [])
            if isinstance(s, dict) and (lag := _count(s.get("lag_ms"))) is not None
        }

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

    def pick_read(self, now: float, min_index: int = 0,
                  exclude: frozenset[NodeId] = frozenset()) -> NodeId | None:
        """A random live slave within the lag bounds, preferring those known to have applied
        ``min_index`` (the node itself refuses a read it cannot serve, and the router then
        tries another); the master when no slave qualifies; None when no master is up
        either (or it is in ``exclude``).

        The entry bound (``max_lag``) holds for every read. The time bound (``max_lag_ms``)
        holds for a default read (``min_index`` 0): see :meth:`within_time_bound`. A
        read-your-writes read is checked by the node that serves it."""
        master = self.master()
        head = self.views[master].last_index if master else max(
            (v.last_index for v in self.views.values() if v.up), default=0)
        slaves = [
            v for v in self.views.values()
            if v.up and v.role == "slave" and v.node not in exclude
            and head - v.applied_index <= self.max_lag
            and (min_index > 0 or self.within_time_bound(v.node, now))
        ]
        known = [v.node for v in slaves if v.applied_index >= min_index]
        if known or slaves:
            return self._rng.choice(known or [v.node for v in slaves])
        if master is not None and master not in exclude:
            return master
        return None

    def within_time_bound(self, node: NodeId, now: float) -> bool:
        """Whether the slave ``node`` may serve a default read at ``now``: its replication
        session is up and, by its own report, it heard from the master within ``max_lag_ms``
        (the report's age, ``now`` minus the probe's send time, counts too); and the master,
        if one is up, does not report it lagging more than that (its figure aged the same
        way). Always True when the bound is off (0)."""
        if self.max_lag_ms == 0:
            return True
        v = self.views[node]
        contact = v.last_contact_ms
        if not v.link_up or contact is None:
            return False
        if _age_ms(v, now) + contact > self.max_lag_ms:
            return False
        master = self.master()
        if master is None:
            return True
        m = self.views[master]
        lag = m.lag_ms.get(node)
        return lag is None or _age_ms(m, now) + lag <= self.max_lag_ms

    def no_read_reason(self, now: float, min_index: int = 0,
                       exclude: frozenset[NodeId] = frozenset()) -> str:
        """Why :meth:`pick_read` found no node, for the error message."""
        stale = [v.node for v in self.views.values()
                 if v.up and v.role == "slave" and v.node not in exclude
                 and not self.within_time_bound(v.node, now)]
        if min_index == 0 and stale and self.master() is None:
            return (f"no master is reachable, and no slave is in contact with one (a "
                    f"replication session up and word from the master within "
                    f"{self.max_lag_ms} ms, max-lag-ms): {', '.join(stale)} may be stale")
        return "no node that can serve this read is reachable"

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
                "majority_index": v.majority_index if v.node == master else None,
                "last_contact_ms": v.last_contact_ms if v.role == "slave" else None,
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


def _count(value: Any) -> int | None:
    """A non-negative int from a node's status, or None (absent, or not a count)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _age_ms(v: NodeView, now: float) -> float:
    """How old ``v``'s figures are at ``now``, in milliseconds."""
    return max(0.0, now - v.probed_at) * 1000
