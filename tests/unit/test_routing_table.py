"""The router's routing decisions, with time passed in: no clock, no sockets."""

from __future__ import annotations

import random
from typing import Any

import pytest
from click.testing import CliRunner

from cluster.cli.router import main as router_main
from cluster.config import Address, RouterConfig
from cluster.router.table import RoutingTable
from cluster.types import NodeId
from tests.unit.test_protocol_doc import DOC, _table

N1, N2, N3 = NodeId("n1"), NodeId("n2"), NodeId("n3")
NODES = {n: Address("127.0.0.1", 7001 + i) for i, n in enumerate((N1, N2, N3))}
T0 = 100.0  # the probes' send time, monotonic seconds


def master(last: int = 10, lag_ms: dict[str, int] | None = None) -> dict[str, Any]:
    lag_ms = lag_ms or {}
    return {"role": "master", "epoch": 1, "last_index": last, "applied_index": last,
            "majority_index": last,
            "slaves": [{"id": s, "up": True, "acked": last, "lag_entries": 0,
                        "lag_ms": lag_ms.get(s, 0), "last_contact_ms": 5}
                       for s in ("n2", "n3")]}


def slave(applied: int = 10, contact: int | None = 50, up: bool = True) -> dict[str, Any]:
    return {"role": "slave", "epoch": 1, "last_index": applied, "applied_index": applied,
            "master_link": {"up": up, "state": "streaming" if up else "idle",
                            "last_contact_ms": contact, "syncs": 1, "last_sync_from": 0}}


def table(max_lag_ms: int = 1000, max_lag: int = 100) -> RoutingTable:
    return RoutingTable(dict(NODES), max_lag, max_lag_ms, random.Random(1))


def picks(t: RoutingTable, now: float, min_index: int = 0,
          exclude: frozenset[NodeId] = frozenset()) -> set[NodeId | None]:
    """Every node ``pick_read`` chooses over many tries (it picks at random)."""
    return {t.pick_read(now, min_index, exclude) for _ in range(50)}


def test_a_fresh_slave_serves_default_reads() -> None:
    t = table()
    t.update(N1, master(), T0)
    t.update(N2, slave(contact=50), T0)
    t.update(N3, slave(contact=50), T0)
    assert picks(t, T0 + 0.2) == {N2, N3}


def test_a_slave_that_has_not_heard_from_the_master_is_skipped() -> None:
    t = table()
    t.update(N1, master(), T0)
    t.update(N2, slave(contact=50), T0)
    t.update(N3, slave(contact=1001), T0)
    assert picks(t, T0) == {N2}
    t.update(N3, slave(contact=None), T0)  # never heard from it
    assert picks(t, T0) == {N2}
    t.update(N3, slave(contact=10, up=False), T0)  # its replication session is down
    assert picks(t, T0) == {N2}


def test_the_bound_is_inclusive() -> None:
    t = table()
    t.update(N1, master(), T0)
    t.update(N2, slave(contact=1000), T0)
    t.update(N3, slave(contact=1001), T0)
    assert picks(t, T0) == {N2}


def test_the_age_of_the_probe_counts() -> None:
    """A slave that had heard from the master 600 ms before a probe sent 500 ms ago has
    not heard from it for 1100 ms now, as far as the router knows."""
    t = table()
    t.update(N1, master(), T0 + 0.4)
    t.update(N2, slave(contact=600), T0)
    t.update(N3, slave(contact=600), T0 + 0.4)
    assert picks(t, T0 + 0.39) == {N2, N3}
    assert picks(t, T0 + 0.41) == {N3}
    assert picks(t, T0 + 0.79) == {N3}
    assert picks(t, T0 + 0.81) == {N1}  # no slave qualifies: the master


def test_the_masters_view_of_lag_counts_too() -> None:
    t = table()
    t.update(N1, master(lag_ms={"n2": 1500, "n3": 900}), T0)
    t.update(N2, slave(contact=20), T0)
    t.update(N3, slave(contact=20), T0)
    assert picks(t, T0) == {N3}
    assert picks(t, T0 + 0.2) == {N1}  # the master's figure ages as well


def test_with_no_slave_within_the_bound_reads_go_to_the_master() -> None:
    t = table()
    t.update(N1, master(), T0)
    t.update(N2, slave(contact=5000), T0)
    t.update(N3, slave(contact=5000), T0)
    assert picks(t, T0) == {N1}
    assert picks(t, T0, exclude=frozenset({N1})) == {None}


def test_with_no_master_and_stale_slaves_the_read_fails_and_says_why() -> None:
    t = table()
    t.update(N1, master(), T0)
    t.update(N2, slave(contact=100), T0)
    t.update(N3, slave(contact=100), T0)
    t.failed(N1, "timed out")
    assert picks(t, T0 + 0.5) == {N2, N3}  # heard from the master 600 ms ago: still fine
    assert picks(t, T0 + 1.0) == {None}
    reason = t.no_read_reason(T0 + 1.0)
    assert "no master is reachable" in reason and "1000 ms, max-lag-ms" in reason, reason
    assert "n2, n3" in reason, reason


def test_max_lag_ms_zero_turns_the_time_bound_off() -> None:
    t = table(max_lag_ms=0)
    t.update(N1, master(lag_ms={"n2": 99_999}), T0)
    t.update(N2, slave(contact=None, up=False), T0)
    t.update(N3, slave(contact=99_999), T0)
    t.failed(N1, "gone")
    assert picks(t, T0 + 3600) == {N2, N3}
    assert t.no_read_reason(T0 + 3600, exclude=frozenset({N2, N3})) == (
        "no node that can serve this read is reachable")


def test_the_entry_bound_and_the_time_bound_hold_together() -> None:
    t = table(max_lag=5)
    t.update(N1, master(last=100), T0)
    t.update(N2, slave(applied=94, contact=10), T0)  # fresh, but 6 entries behind
    t.update(N3, slave(applied=95, contact=2000), T0)  # 5 behind, but stale
    assert picks(t, T0) == {N1}
    t.update(N3, slave(applied=95, contact=10), T0)
    assert picks(t, T0) == {N3}
    t.update(N2, slave(applied=100, contact=10), T0)
    assert picks(t, T0) == {N2, N3}


def test_read_your_writes_reads_are_not_held_to_the_time_bound() -> None:
    """A token read goes to a slave whatever its contact age (the entry bound still
    holds): the node itself serves it only when it holds that write and is in sync."""
    t = table(max_lag=5)
    t.update(N1, master(last=100), T0)
    t.update(N2, slave(applied=100, contact=5000), T0)
    t.update(N3, slave(applied=90, contact=5000), T0)
    assert picks(t, T0, min_index=100) == {N2}
    assert picks(t, T0, min_index=0) == {N1}
    t.failed(N1, "gone")
    assert picks(t, T0 + 10, min_index=100) == {N2}
    assert "no master" not in t.no_read_reason(T0 + 10, 100, frozenset({N2}))


def test_a_malformed_status_makes_no_slave_fresh() -> None:
    t = table()
    t.update(N1, master(), T0)
    t.update(N2, {**slave(), "master_link": "yes"}, T0)
    t.update(N3, {**slave(), "master_link": {"up": True, "last_contact_ms": "5"}}, T0)
    assert picks(t, T0) == {N1}


# --- the router's status rows ----------------------------------------------------------------


def test_status_rows_carry_the_majority_index_and_the_slaves_contact_age() -> None:
    t = table()
    t.update(N1, master(last=12), T0)
    t.update(N2, slave(applied=12, contact=40), T0)
    t.update(N3, slave(applied=11, contact=70), T0)
    rows = {r["id"]: r for r in t.view()}
    assert (rows["n1"]["majority_index"], rows["n1"]["last_contact_ms"]) == (12, None)
    assert (rows["n2"]["majority_index"], rows["n2"]["last_contact_ms"]) == (None, 40)
    assert rows["n3"]["last_contact_ms"] == 70
    assert rows["n1"]["epoch"] == 1


@pytest.mark.parametrize("up", [True, False])
def test_status_rows_have_the_documented_fields(up: bool) -> None:
    documented = {r[0].strip("`") for r in _table(DOC.read_text(encoding="utf-8"),
                                                   "status-router-node")}
    t = table()
    t.update(N1, master(), T0)
    t.update(N2, slave(), T0)
    if not up:
        t.failed(N2, "timed out")
    row = next(r for r in t.view() if r["id"] == "n2")
    assert set(row) == documented - ({"error"} if up else set())


# --- the option ------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--max-lag-ms", "150"], "max-lag-ms 150 must exceed the health interval (200 ms)"),
    (["--max-lag-ms", "600", "--health-interval", "0.6", "--node-timeout", "2"],
     "must exceed the health interval (600 ms)"),
    (["--max-lag-ms", "-1"], "-1 is not in the range x>=0"),
    (["--max-lag-ms", "soon"], "'soon' is not a valid integer"),
])
def test_a_bad_max_lag_ms_is_one_clear_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(router_main, [
        "--listen", "127.0.0.1:0", "--cluster", "n1=127.0.0.1:7001", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output


def test_max_lag_ms_defaults_to_1000_and_0_is_accepted() -> None:
    assert RouterConfig(Address("127.0.0.1", 0), dict(NODES)).max_lag_ms == 1000
    option = next(p for p in router_main.params if p.name == "max_lag_ms")
    assert option.default == 1000 and option.envvar == "REPL_MAX_LAG_MS"
    RouterConfig(Address("127.0.0.1", 0), dict(NODES), max_lag_ms=0).validate()
