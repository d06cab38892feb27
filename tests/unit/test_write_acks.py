"""The master core's acknowledgement levels, with no shell: which reply goes out when.

A write waits for ``k`` copies (nodes holding its entry, the master included): 1 for
``async``, 1 + N for ``N``, a majority, or every node for ``all``; past its ``timeout_ms``
(checked by ``tick``) it gets ``timeout`` with ``applied: unknown``; a level that cannot be
met is refused up front (``applied: no``) or, while waiting, fails with ``no_quorum``.
"""

from __future__ import annotations

from typing import Any

import pytest

from cluster.core.kv import KV
from cluster.core.master import DEFAULT_WRITE_TIMEOUT_MS, MasterCore
from cluster.core.state import NO_SNAPSHOT, Ready, Recovered, Replica
from cluster.errors import StorageFailure
from cluster.types import Acks, NodeId, Op
from cluster.wire.messages import ErrorReply, Reply, Sync

MASTER = NodeId("m")
SLAVES = [NodeId("s1"), NodeId("s2"), NodeId("s3")]
PEER_TIMEOUT_MS = 300


def make(slaves: list[NodeId] = SLAVES, *, connect: bool = True) -> MasterCore:
    replica = Replica.recovered(Recovered(0, NO_SNAPSHOT, KV(), []))
    replica.epoch = 1
    m = MasterCore(MASTER, list(slaves), replica, majority=(len(slaves) + 1) // 2 + 1,
                   peer_timeout_ms=PEER_TIMEOUT_MS, heartbeat_ms=50, batch_entries=100,
                   window_entries=100)
    if connect:
        for s in slaves:
            m.on_sync(Sync(1, s, 0, 0, ()), 0)
    return m


def propose(m: MasterCore, rid: int, acks: Acks, *, now: int = 0, timeout_ms: int | None = None,
            persist: bool = True, client: Any = "c") -> list[Reply | ErrorReply]:
    """One write, carried out (and made durable here unless ``persist`` is false); the
    replies released on the way."""
    ready = m.propose(client, rid, Op.SET, f"k{rid}", "v", acks, now, now, timeout_ms)
    out = list(ready.replies)
    if ready.entries:
        m.advance(ready)
        if persist:
            out += m.persisted(m.log.last_index).replies
    return [r for _, r in out]


def ack(m: MasterCore, node: NodeId, index: int, now: int = 0) -> list[Reply | ErrorReply]:
    return [r for _, r in m.on_ack(node, 1, index, now).replies]


def ok(rid: int, index: int, copies: int) -> Reply:
    return Reply(rid, {"index": index, "epoch": 1, "copies": copies})


def ids(replies: list[Reply | ErrorReply]) -> list[int]:
    return [r.id for r in replies]


# --- levels --------------------------------------------------------------------------------------


def test_async_is_released_once_durable_on_the_master() -> None:
    m = make()
    assert propose(m, 1, Acks.ASYNC, persist=False) == []
    assert [r for _, r in m.persisted(1).replies] == [ok(1, 1, 1)]
    assert m.tick(10 * DEFAULT_WRITE_TIMEOUT_MS).replies == []  # no timeout by default


@pytest.mark.parametrize(("acks", "slaves_needed"), [
    (Acks(1), 1), (Acks(2), 2), (Acks.MAJORITY, 2), (Acks(3), 3), (Acks.ALL, 3)])
def test_each_level_is_released_when_its_copies_exist_and_not_before(
        acks: Acks, slaves_needed: int) -> None:
    m = make()
    assert propose(m, 1, acks) == []
    for n, s in enumerate(SLAVES[:slaves_needed - 1]):
        assert ack(m, s, 1) == [], f"released after {n + 1} of {slaves_needed} slaves"
    assert ack(m, SLAVES[slaves_needed - 1], 1) == [ok(1, 1, 1 + slaves_needed)]
    assert [ack(m, s, 1) for s in SLAVES[slaves_needed:]] == [[]] * (3 - slaves_needed)


def test_copies_counts_every_node_holding_the_entry_at_release() -> None:
    m = make()
    propose(m, 1, Acks.ASYNC)
    ack(m, SLAVES[0], 1)
    ack(m, SLAVES[1], 1)
    assert propose(m, 2, Acks(1)) == []  # entry 2 is on the master alone
    assert ack(m, SLAVES[2], 2) == [ok(2, 2, 2)]


def test_replies_of_a_level_go_out_in_index_order_and_levels_do_not_block_each_other() -> None:
    m = make()
    assert propose(m, 1, Acks.ALL) == []
    assert propose(m, 2, Acks(1)) == []
    assert propose(m, 3, Acks.ALL) == []
    assert propose(m, 4, Acks(1)) == []
    assert propose(m, 5, Acks.ASYNC) == [ok(5, 5, 1)]  # the master's copy is enough
    assert ack(m, SLAVES[0], 4) == [ok(2, 2, 2), ok(4, 4, 2)]  # `all` 1 and 3 still wait
    assert ack(m, SLAVES[1], 5) == []
    assert ack(m, SLAVES[2], 3) == [ok(1, 1, 4), ok(3, 3, 4)]


# --- timeouts ------------------------------------------------------------------------------------


def test_a_write_past_its_timeout_gets_timeout_with_applied_unknown_once() -> None:
    m = make()
    assert propose(m, 1, Acks.ALL, now=100, timeout_ms=150) == []
    ack(m, SLAVES[0], 1, now=200)
    assert m.tick(249).replies == []
    (late,) = [r for _, r in m.tick(250).replies]
    assert isinstance(late, ErrorReply)
    assert (late.id, late.code, late.applied, late.index, late.epoch) == (
        1, "timeout", "unknown", 1, 1)
    assert "on 2 of the 4 nodes" in late.message
    assert ack(m, SLAVES[1], 1, now=260) + ack(m, SLAVES[2], 1, now=260) == []  # answered
    assert m.tick(270).replies == []


def test_levels_that_need_slaves_time_out_by_default() -> None:
    m = make()
    propose(m, 1, Acks.MAJORITY)
    propose(m, 2, Acks.ASYNC, persist=False)
    for s in SLAVES:  # every slave stays in contact and holds nothing
        ack(m, s, 0, now=DEFAULT_WRITE_TIMEOUT_MS - 1)
    assert m.tick(DEFAULT_WRITE_TIMEOUT_MS - 1).replies == []
    assert ids([r for _, r in m.tick(DEFAULT_WRITE_TIMEOUT_MS).replies]) == [1]


def test_an_async_write_with_a_timeout_times_out_while_its_disk_is_slow() -> None:
    m = make()
    assert propose(m, 1, Acks.ASYNC, timeout_ms=50, persist=False) == []
    (late,) = [r for _, r in m.tick(50).replies]
    assert isinstance(late, ErrorReply) and (late.code, late.applied) == ("timeout", "unknown")
    assert "on 0 of the 1 nodes" in late.message
    assert m.persisted(1).replies == []  # the sync completes later: nothing more to say


def test_a_write_released_in_time_does_not_time_out_later() -> None:
    m = make()
    assert propose(m, 1, Acks.ASYNC, timeout_ms=50) == [ok(1, 1, 1)]
    assert propose(m, 2, Acks(1), timeout_ms=50) == []
    assert ack(m, SLAVES[0], 2) == [ok(2, 2, 2)]
    assert m.tick(100).replies == []


def test_timeouts_are_released_in_deadline_order() -> None:
    m = make()
    propose(m, 1, Acks.ALL, timeout_ms=300)
    propose(m, 2, Acks(1), timeout_ms=100)
    propose(m, 3, Acks.ALL, timeout_ms=200)
    for s in SLAVES:
        ack(m, s, 0, now=250)
    assert ids([r for _, r in m.tick(250).replies]) == [2, 3]


def test_answered_writes_do_not_pile_up_in_the_deadline_heap() -> None:
    m = make()
    for s in SLAVES:
        ack(m, s, 0)
    for i in range(1, 5001):
        propose(m, i, Acks(1), timeout_ms=60_000)
        assert ack(m, SLAVES[0], i) == [ok(i, i, 2)]
    assert len(m._deadlines) <= 1025


# --- what cannot be met ----------------------------------------------------------------------


def test_more_slaves_than_the_cluster_has_is_refused_up_front() -> None:
    m = make()
    (refused,) = propose(m, 1, Acks(4))
    assert isinstance(refused, ErrorReply)
    assert (refused.code, refused.applied, refused.index) == ("bad_request", "no", None)
    assert "needs 4 slaves, but the cluster has 3" in refused.message
    assert m.log.last_index == 0


def test_a_cluster_of_one_meets_all_and_majority_with_the_master_alone() -> None:
    m = make([])
    assert propose(m, 1, Acks.ALL) == [ok(1, 1, 1)]
    assert propose(m, 2, Acks.MAJORITY) == [ok(2, 2, 1)]
    (refused,) = propose(m, 3, Acks(1))
    assert isinstance(refused, ErrorReply) and refused.code == "bad_request"


@pytest.mark.parametrize(("acks", "up"), [
    (Acks.ALL, 2), (Acks(3), 2), (Acks(2), 1), (Acks.MAJORITY, 1), (Acks(1), 0)])
def test_a_level_the_nodes_in_contact_cannot_meet_is_refused_with_no_quorum(
        acks: Acks, up: int) -> None:
    m = make(connect=False)
    for s in SLAVES[:up]:
        m.on_sync(Sync(1, s, 0, 0, ()), 0)
    (refused,) = propose(m, 1, acks)
    assert isinstance(refused, ErrorReply)
    assert (refused.code, refused.applied) == ("no_quorum", "no")
    assert m.log.last_index == 0
    m.on_sync(Sync(1, SLAVES[up], 0, 0, ()), 0)
    assert propose(m, 2, acks) == []  # one more in contact: accepted


def test_waiting_writes_fail_once_too_few_nodes_are_in_contact() -> None:
    m = make()
    propose(m, 1, Acks.ALL)
    propose(m, 2, Acks(2))
    propose(m, 3, Acks(1))
    ack(m, SLAVES[0], 0, now=PEER_TIMEOUT_MS)  # s1 alone stays in touch
    assert m.tick(PEER_TIMEOUT_MS).replies == []
    failed = [r for _, r in m.tick(PEER_TIMEOUT_MS + 1).replies]
    assert ids(failed) == [1, 2]
    assert all(isinstance(r, ErrorReply) and (r.code, r.applied) == ("no_quorum", "unknown")
               for r in failed)
    assert [(r.index, r.epoch) for r in failed if isinstance(r, ErrorReply)] == [(1, 1), (2, 1)]
    assert ack(m, SLAVES[0], 3, now=PEER_TIMEOUT_MS + 1) == [ok(3, 3, 2)]


# --- errors and the end of the role ------------------------------------------------------------


def test_a_failed_write_is_not_applied_and_its_deadline_is_moot() -> None:
    m = make()
    ready = m.propose("c", 7, Op.SET, "k", "v", Acks.ALL, 0, 0, 100)
    replies = [r for _, r in m.failed(ready, StorageFailure("disk full")).replies]
    assert replies == [ErrorReply(7, "storage", "disk full", applied="no")]
    assert m.tick(100).replies == []


def test_closing_answers_every_waiting_write_in_index_order_as_unknown() -> None:
    m = make()
    propose(m, 1, Acks.ALL)
    propose(m, 2, Acks(1), persist=False)
    propose(m, 3, Acks.MAJORITY, persist=False)
    out: Ready = m.close(ErrorReply(0, "shutting_down", "bye"))
    assert [r for _, r in out.replies] == [
        ErrorReply(i, "shutting_down", "bye", applied="unknown", index=i, epoch=1)
        for i in (1, 2, 3)]
    assert m.tick(10 * DEFAULT_WRITE_TIMEOUT_MS).replies == []
