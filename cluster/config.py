"""Configuration: frozen dataclasses built once by the CLI and passed down.

Everything that parses a user-supplied string (an address, a cluster map) lives here and
raises :class:`ConfigError` with a message that names the bad value.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from cluster.errors import ConfigError
from cluster.types import NodeId

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6 literals)."""
        text = text.strip()
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
        else:
            host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"invalid address {text!r}: expected HOST:PORT")
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"invalid port in address {text!r}") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"port out of range in address {text!r}")
        return cls(host, port)


def parse_cluster(text: str) -> dict[NodeId, Address]:
    """Parse ``n1=host:port,n2=host:port,...`` into an ordered map."""
    nodes: dict[NodeId, Address] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, addr = item.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(f"invalid cluster member {item!r}: expected ID=HOST:PORT")
        if not _NODE_ID.match(name):
            raise ConfigError(f"invalid node id {name!r}: use letters, digits, '_', '.', '-'")
        if name in nodes:
            raise ConfigError(f"node id {name!r} appears twice in the cluster map")
        nodes[NodeId(name)] = Address.parse(addr)
    if not nodes:
        raise ConfigError("the cluster map is empty: expected n1=HOST:PORT,n2=HOST:PORT,...")
    return nodes


def format_cluster(nodes: Mapping[str, Address]) -> str:
    return ",".join(f"{node}={addr}" for node, addr in nodes.items())


class FsyncPolicy(enum.Enum):
    ALWAYS = "always"  # fsync before replying; concurrent writes share one fsync
    EVERYSEC = "everysec"  # fsync once a second in the background
    NO = "no"  # leave it to the operating system


@dataclass(frozen=True, slots=True)
class Limits:
    """Sizes enforced on everything that arrives from the network."""

    max_frame: int = 8 * 1024 * 1024
    max_key: int = 4 * 1024
    max_value: int = 1024 * 1024

    def validate(self) -> None:
        if self.max_key < 1 or self.max_value < 0:
            raise ConfigError("max key size must be >= 1 and max value size >= 0")
        if self.max_frame < 1024:
            raise ConfigError("max frame size must be at least 1024 bytes")
        if self.max_key + self.max_value + 256 > self.max_frame:
            raise ConfigError(
                f"max frame size {self.max_frame} cannot hold a key of {self.max_key} "
                f"and a value of {self.max_value} bytes"
            )


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: NodeId
    listen: Address
    data_dir: Path
    cluster: dict[NodeId, Address]
    bootstrap_master: NodeId  # the master of a brand-new cluster (--master)
    fsync: FsyncPolicy = FsyncPolicy.ALWAYS
    limits: Limits = field(default_factory=Limits)
    heartbeat_interval: float = 0.1  # seconds between heartbeats on an idle link
    peer_timeout: float = 1.0  # a link silent this long is dead
    snapshot_every: int = 100_000  # entries appended between snapshots
    batch_entries: int = 2048  # most entries in one replication frame
    window_entries: int = 32_768  # most entries sent to a slave and not yet acknowledged
    metrics_listen: Address | None = None  # serve Prometheus metrics here (off when None)

    def validate(self) -> None:
        self.limits.validate()
        _check_cluster(self.cluster)
        if self.node_id not in self.cluster:
            raise ConfigError(
                f"node id {self.node_id!r} is not in the cluster map "
                f"({', '.join(self.cluster)})"
            )
        _check_listen(self.listen, self.node_id, self.cluster[self.node_id])
        _check_metrics(self.metrics_listen, self.listen)
        if self.bootstrap_master not in self.cluster:
            raise ConfigError(
                f"master {self.bootstrap_master!r} is not in the cluster map "
                f"({', '.join(self.cluster)})"
            )
        if not 0 < self.heartbeat_interval < self.peer_timeout:
            raise ConfigError("the heartbeat interval must be positive and below the peer timeout")
        if self.snapshot_every < 1:
            raise ConfigError("snapshot-every must be at least 1 entry")
        if not 1 <= self.batch_entries <= self.window_entries:
            raise ConfigError("batch size must be >= 1 and no larger than the window")

    @property
    def majority(self) -> int:
        return len(self.cluster) // 2 + 1


@dataclass(frozen=True, slots=True)
class RouterConfig:
    listen: Address
    cluster: dict[NodeId, Address]
    limits: Limits = field(default_factory=Limits)
    health_interval: float = 0.2  # seconds between health probes of each node
    node_timeout: float = 1.0  # a node that has not answered for this long is down
    max_lag: int = 10_000  # slaves further behind than this many entries get no reads
    # a slave that has not heard from the master within this many milliseconds (or that the
    # master reports lagging by more) gets no default reads; 0 turns the bound off
    max_lag_ms: int = 1_000
    seed: int | None = None  # for the random choice of slave, in tests
    # seconds a forwarded request may wait for its node's reply (a write that names a longer
    # timeout_ms gets that plus a second); above the master's default write timeout (5 s)
    request_timeout: float = 8.0
    metrics_listen: Address | None = None  # serve Prometheus metrics here (off when None)
    resp_listen: Address | None = None  # where Redis (RESP2) clients connect; None: nowhere

    def validate(self) -> None:
        self.limits.validate()
        _check_cluster(self.cluster)
        _check_metrics(self.metrics_listen, self.listen)
        if not 0 < self.health_interval < self.node_timeout:
            raise ConfigError("the health interval must be positive and below the node timeout")
        if not self.request_timeout > 0:
            raise ConfigError("the request timeout must be positive")
        if self.max_lag < 0:
            raise ConfigError("max lag must be >= 0")
        if self.max_lag_ms < 0:
            raise ConfigError("max-lag-ms must be >= 0 (0 turns the time bound off)")
        if self.resp_listen is not None and self.resp_listen.port != 0 and \
                self.resp_listen == self.listen:
            raise ConfigError(f"the Redis listen address {self.resp_listen} is the router's "
                              "own listen address: give --resp-listen another port")
        if 0 < self.max_lag_ms <= self.health_interval * 1000:
            raise ConfigError(
                f"max-lag-ms {self.max_lag_ms} must exceed the health interval "
                f"({self.health_interval * 1000:g} ms), or be 0 to turn the time bound off: "
                f"a slave's figures are up to one interval old when a read is routed")


_WILDCARDS = {"0.0.0.0", "::"}


def _check_cluster(cluster: dict[NodeId, Address]) -> None:
    """Any number of nodes is a cluster (a majority is ``N // 2 + 1``), but no two may share
    an address."""
    seen: dict[Address, NodeId] = {}
    for node, addr in cluster.items():
        if addr.port == 0:
            raise ConfigError(f"node {node!r} has port 0 in the cluster map: give its real port")
        if addr in seen:
            raise ConfigError(f"nodes {seen[addr]!r} and {node!r} have the same address "
                              f"{addr} in the cluster map")
        seen[addr] = node


def _check_metrics(metrics: Address | None, listen: Address) -> None:
    """The metrics endpoint needs a port of its own."""
    if metrics is None or metrics.port == 0 or metrics.port != listen.port:
        return
    if metrics.host == listen.host or {metrics.host, listen.host} & _WILDCARDS:
        raise ConfigError(f"metrics address {metrics} is the listen address {listen}: give "
                          f"the metrics another port")


def _check_listen(listen: Address, node: NodeId, own: Address) -> None:
    """A node listens where the cluster map says it is: the same port (0 picks a free one,
    for tests), and the same host unless it listens on every interface (``0.0.0.0`` in a
    container whose map entry is a service name) or one of the two is a host name, which
    is not resolved here."""
    if listen.port not in (0, own.port):
        raise ConfigError(
            f"listen address {listen} does not match {node}={own} in the cluster map: the "
            f"other nodes and the router would look for {node} on port {own.port}")
    if listen.host in _WILDCARDS or listen.host == own.host:
        return
    try:
        differ = ipaddress.ip_address(listen.host) != ipaddress.ip_address(own.host)
    except ValueError:
        return  # a host name on either side
    if differ:
        raise ConfigError(
            f"listen address {listen} does not match {node}={own} in the cluster map: the "
            f"other nodes and the router would look for {node} at {own.host}")
