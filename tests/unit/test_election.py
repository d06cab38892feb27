"""Scripted interaction tests of :mod:`cluster.core.election`, in the style of etcd-raft's:
every message is delivered (or dropped) by hand, time is ticks, nothing else runs.

``Net`` plays the shell: it persists each Ready's epoch and vote to a per-node "disk"
before it queues the Ready's messages, and it restarts a node from that disk alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster.core.election import ElectionConfig, ElectionCore, Role, up_to_date
from cluster.core.kv import KV
from cluster.core.state import Become, Ready
from cluster.errors import ConfigError, RemoteProtocolError
from cluster.storage.wal import WAL
from cluster.types import Entry, NodeId, Op
from cluster.wire.messages import Message, Vote, VoteReply

BASE = 10
N1, N2, N3, N4 = (NodeId(f"n{i}") for i in range(1, 5))
FOUR = [N1, N2, N3, N4]


@dataclass
class Tip:
    last_epoch: int = 0
    last_index: int = 0


@dataclass
class Disk:
    epoch: int = 0
    vote: NodeId | None = None


@dataclass
class Net:
    nodes: list[NodeId] = field(default_factory=lambda: list(FOUR))
    seed: int = 0
    cores: dict[NodeId, ElectionCore] = field(default_factory=dict)
    tips: dict[NodeId, Tip] = field(default_factory=dict)
    disks: dict[NodeId, Disk] = field(default_factory=dict)
    inflight: list[tuple[NodeId, NodeId, Message]] = field(default_factory=list)
    cut: set[NodeId] = field(default_factory=set)  # nodes cut off from all others
    readies: list[tuple[NodeId, Ready]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for n in self.nodes:
            self.tips[n] = Tip()
            self.disks[n] = Disk()
            self.restart(n)

    def restart(self, n: NodeId, **kw: object) -> ElectionCore:
        d = self.disks[n]
        self.cores[n] = ElectionCore(n, self.nodes, d.epoch, d.vote,
                                     random.Random(f"{self.seed}-{n}-{len(self.readies)}"),
                                     ElectionConfig(BASE, **kw))  # type: ignore[arg-type]
        return self.cores[n]

    def carry(self, n: NodeId, ready: Ready) -> Ready:
        if ready.epoch is not None:
            self.disks[n] = Disk(ready.epoch, NodeId(ready.vote) if ready.vote else None)
        for to, msg in ready.to_peers:
            self.inflight.append((n, NodeId(to), msg))
        self.readies.append((n, ready))
        return ready

    def tick(self, n: NodeId, times: int = 1) -> Ready:
        out = Ready()
        for _ in range(times):
            out = self.carry(n, self.cores[n].tick(self.tips[n], 1_000))
        return out

    def deliver(self) -> None:
        """Deliver every message in flight, and what they cause, until none is left."""
        while self.inflight:
            frm, to, msg = self.inflight.pop(0)
            if frm in self.cut or to in self.cut:
                continue
            assert isinstance(msg, Vote | VoteReply)
            self.carry(to, self.cores[to].step(msg, self.tips[to], 1_000))

    def heartbeat(self) -> None:
        """Every leader reaches every follower it can, and hears back (the shell's
        appends and acks)."""
        for lead, c in self.cores.items():
            if role(c) is not Role.LEADER or lead in self.cut:
                continue
            for p in c.peers:
                if p not in self.cut:
                    self.carry(p, self.cores[p].heard_from_leader(lead, c.epoch))
                    self.carry(lead, c.heard_from_follower(p, self.cores[p].epoch))

    def run(self, ticks: int) -> None:
        """Ticks on every node, with heartbeats and every message delivered."""
        for _ in range(ticks):
            for n in self.nodes:
                self.tick(n)
            self.deliver()
            self.heartbeat()

    def leaders(self) -> list[NodeId]:
        return [n for n, c in self.cores.items() if role(c) is Role.LEADER]

    def elect(self, n: NodeId) -> None:
        """``n`` times out first and wins."""
        self.tick(n, self.cores[n].timeout)
        self.deliver()
        assert self.leaders() == [n]
        self.heartbeat()


def vote(epoch: int, candidate: NodeId, last_epoch: int = 0, last_index: int = 0,
         pre: bool = False) -> Vote:
    return Vote(epoch, candidate, last_epoch, last_index, pre)


def answer(ready: Ready) -> VoteReply:
    [(_, msg)] = ready.to_peers
    assert isinstance(msg, VoteReply)
    return msg


def role(c: ElectionCore) -> Role:
    """The role now (a call, so that mypy does not narrow it across steps)."""
    return c.role


def core(n: NodeId = N2, epoch: int = 0, v: NodeId | None = None, **kw: object
         ) -> ElectionCore:
    return ElectionCore(n, FOUR, epoch, v, random.Random(1),
                        ElectionConfig(BASE, **kw))  # type: ignore[arg-type]


# --- votes ---------------------------------------------------------------------------------------


def test_one_vote_per_epoch_persisted_before_the_answer() -> None:
    c = core()
    r = c.step(vote(1, N1), Tip(), 0)
    assert (r.epoch, r.vote) == (1, N1)  # persisted with the answer, before it goes
    assert r.to_peers == [(N1, VoteReply(1, N2, True, False))]
    assert answer(c.step(vote(1, N3), Tip(), 0)) == VoteReply(1, N2, False, False)
    again = c.step(vote(1, N1), Tip(), 0)  # a repeated request gets the same answer
    assert answer(again).granted and (again.epoch, again.vote) == (1, N1)
    restarted = core(epoch=1, v=N1)  # from the disk alone
    assert not answer(restarted.step(vote(1, N3), Tip(), 0)).granted
    assert answer(restarted.step(vote(2, N3), Tip(), 0)).granted  # a new epoch, a new vote


def test_a_higher_epoch_request_is_persisted_even_when_refused() -> None:
    c = core()
    r = c.step(vote(4, N1, 0, 0), Tip(1, 5), 0)  # N1's log is behind
    assert (r.epoch, r.vote) == (4, None)
    assert answer(r) == VoteReply(4, N2, False, False)
    assert c.epoch == 4 and c.vote is None


@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize(("cand", "granted"), [
    ((2, 9), False),  # same last epoch, shorter
    ((1, 20), False),  # longer but an older last epoch
    ((2, 10), True),  # equal
    ((2, 11), True),  # longer
    ((3, 1), True),  # a later last epoch, however short
])
def test_up_to_date_both_ways(pre: bool, cand: tuple[int, int], granted: bool) -> None:
    c = core(epoch=2)
    r = c.step(vote(3, N1, *cand, pre=pre), Tip(2, 10), 0)
    assert answer(r).granted is granted
    assert up_to_date(*cand, Tip(2, 10)) is granted


def test_a_less_up_to_date_node_cannot_win_but_a_more_up_to_date_one_does() -> None:
    net = Net()
    for n in (N2, N3, N4):
        net.tips[n] = Tip(1, 5)
    net.tips[N1] = Tip(1, 4)
    net.tick(N1, net.cores[N1].timeout)
    net.deliver()
    assert net.leaders() == [] and net.cores[N1].epoch == 0  # refused at the pre-vote
    net.tick(N2, net.cores[N2].timeout)
    net.deliver()
    assert net.leaders() == [N2] and net.cores[N2].epoch == 1


# --- pre-votes -----------------------------------------------------------------------------------


def test_pre_vote_changes_no_epoch_and_persists_nothing() -> None:
    net = Net()
    net.cut = {N1}  # nobody hears it
    r = net.tick(N1, net.cores[N1].timeout)
    assert net.cores[N1].role is Role.PRE_CANDIDATE
    assert r.epoch is None and r.vote is None
    assert {m for _, m in r.to_peers} == {vote(1, N1, pre=True)}
    assert [to for to, _ in r.to_peers] == [N2, N3, N4]
    for _ in range(20):  # round after round, alone
        net.tick(N1, 2 * BASE)
        net.deliver()
    assert net.cores[N1].epoch == 0 and net.disks[N1] == Disk()
    # a granted pre-vote changes nothing at the voter either
    c = core()
    assert answer(c.step(vote(1, N1, pre=True), Tip(), 0)) == VoteReply(1, N2, True, True)
    assert (c.epoch, c.vote, c.role) == (0, None, Role.FOLLOWER)


def test_pre_vote_then_vote_then_leader() -> None:
    net = Net()
    net.tick(N1, net.cores[N1].timeout)
    net.deliver()
    c = net.cores[N1]
    assert role(c) is Role.LEADER and c.epoch == 1 and c.vote == N1
    assert net.disks[N1] == Disk(1, N1)
    asked = [m.pre_vote for n, r in net.readies for _, m in r.to_peers
             if n == N1 and isinstance(m, Vote)]
    assert asked == [True] * 3 + [False] * 3
    assert all(net.disks[n] == Disk(1, N1) for n in (N2, N3, N4))


def test_a_partitioned_node_that_returns_does_not_disrupt_a_healthy_leader() -> None:
    net = Net()
    net.elect(N1)
    net.cut = {N4}
    net.run(10 * BASE)  # N4 pre-votes, alone, many times
    assert [c.epoch for c in net.cores.values()] == [1, 1, 1, 1]
    net.cut = set()
    net.tick(N4, net.cores[N4].timeout)  # it returns in the middle of a round
    net.deliver()
    refusals = [m for n, r in net.readies[-6:] for _, m in r.to_peers
                if isinstance(m, VoteReply)]
    assert refusals and not any(m.granted for m in refusals)
    net.run(5 * BASE)
    assert net.leaders() == [N1] and [c.epoch for c in net.cores.values()] == [1, 1, 1, 1]
    assert net.cores[N4].leader == N1 and net.cores[N4].role is Role.FOLLOWER


def test_a_restarted_slave_does_not_disrupt() -> None:
    net = Net()
    net.elect(N1)
    c = net.restart(N3)
    assert (c.epoch, c.vote, c.leader, c.role) == (1, N1, None, Role.FOLLOWER)
    net.run(5 * BASE)  # heartbeats arrive before its timeout
    assert net.leaders() == [N1] and c.leader == N1 and c.epoch == 1
    # even if its timeout fires before it hears the master, the others refuse it
    c = net.restart(N3)
    net.tick(N3, c.timeout)
    net.deliver()
    assert c.role in (Role.PRE_CANDIDATE, Role.FOLLOWER) and c.epoch == 1
    assert net.leaders() == [N1] and net.cores[N1].epoch == 1


def test_an_unheard_master_lets_the_others_elect() -> None:
    net = Net()
    net.elect(N1)
    net.cut = {N1}
    net.run(3 * BASE)
    assert net.cores[N1].role is not Role.LEADER  # it stepped down (and stands, alone)
    assert net.cores[N1].epoch == 1
    new = net.leaders()
    assert len(new) == 1 and net.cores[new[0]].epoch == 2


def test_votes_are_refused_while_a_master_is_heard() -> None:
    c = core(epoch=1)
    c.heard_from_leader(N1, 1)
    r = c.step(vote(2, N3, 1, 0), Tip(), 0)
    assert answer(r) == VoteReply(1, N2, False, False) and r.epoch is None
    assert (c.epoch, c.leader) == (1, N1)
    c.tick(Tip(), 0)
    assert not answer(c.step(vote(2, N3, 1, 0, pre=True), Tip(), 0)).granted
    for _ in range(BASE - 1):
        c.tick(Tip(), 0)
    assert answer(c.step(vote(2, N3, 1, 0, pre=True), Tip(), 0)).granted  # lease over


def test_a_pre_vote_for_the_voters_own_epoch_is_refused() -> None:
    c = core(epoch=3)
    assert answer(c.step(vote(3, N1, 3, 9, pre=True), Tip(), 0)) == VoteReply(3, N2, False,
                                                                              True)


def test_a_candidate_whose_round_fails_starts_over_with_a_pre_vote() -> None:
    net = Net()
    c = net.cores[N1]
    net.tick(N1, c.timeout)
    grants = [net.cores[to].step(m, Tip(), 0) for _, to, m in net.inflight
              if isinstance(m, Vote)]
    net.inflight.clear()
    for r in grants:  # pre-votes granted ...
        net.carry(N1, c.step(answer(r), Tip(), 0))
    assert role(c) is Role.CANDIDATE and c.epoch == 1
    net.inflight.clear()  # ... and then the vote requests are lost
    r = net.tick(N1, c.timeout)
    assert role(c) is Role.PRE_CANDIDATE and c.epoch == 1 and r.epoch is None
    assert all(isinstance(m, Vote) and m.pre_vote and m.epoch == 2 for _, m in r.to_peers)


def test_refusals_from_a_majority_end_the_round() -> None:
    c = core(N1)
    c.tick(Tip(), 0)
    for _ in range(c.timeout):
        c.tick(Tip(), 0)
    assert role(c) is Role.PRE_CANDIDATE
    c.step(VoteReply(0, N2, False, True), Tip(), 0)
    assert role(c) is Role.PRE_CANDIDATE  # 3 of 4 can still grant
    c.step(VoteReply(0, N3, False, True), Tip(), 0)
    assert role(c) is Role.FOLLOWER and c.epoch == 0


def test_answers_from_an_earlier_round_do_not_count() -> None:
    c = core(N1)
    for _ in range(c.timeout):
        c.tick(Tip(), 0)
    c.step(VoteReply(1, N2, True, True), Tip(), 0)
    c.step(VoteReply(1, N3, True, True), Tip(), 0)
    assert role(c) is Role.CANDIDATE and c.epoch == 1
    for _ in range(c.timeout):  # the round goes nowhere: a pre-vote for epoch 2
        c.tick(Tip(), 0)
    c.step(VoteReply(1, N2, True, True), Tip(), 0)  # a late pre-vote for epoch 1
    assert role(c) is Role.PRE_CANDIDATE
    c.step(VoteReply(2, N2, True, True), Tip(), 0)
    c.step(VoteReply(2, N3, True, True), Tip(), 0)
    assert role(c) is Role.CANDIDATE and c.epoch == 2
    c.step(VoteReply(1, N2, True, False), Tip(), 0)  # a late vote from epoch 1
    c.step(VoteReply(2, N3, True, False), Tip(), 0)
    assert role(c) is Role.CANDIDATE  # 2 of 4
    c.step(VoteReply(2, N4, True, False), Tip(), 0)
    assert role(c) is Role.LEADER


def test_a_majority_of_the_whole_cluster_is_needed() -> None:
    net = Net()
    c = net.cores[N1]
    net.tick(N1, c.timeout)
    net.carry(N1, c.step(VoteReply(1, N2, True, True), Tip(), 0))
    assert role(c) is Role.PRE_CANDIDATE  # 2 of 4 is not a majority
    net.carry(N1, c.step(VoteReply(1, N2, True, True), Tip(), 0))
    assert role(c) is Role.PRE_CANDIDATE  # the same voter twice counts once
    r = net.carry(N1, c.step(VoteReply(1, N3, True, True), Tip(), 0))
    assert role(c) is Role.CANDIDATE and (r.epoch, r.vote) == (1, N1)
    c.step(VoteReply(1, N2, True, False), Tip(), 0)
    c.step(VoteReply(0, N4, True, True), Tip(), 0)  # a stale pre-vote answer
    assert role(c) is Role.CANDIDATE
    r = c.step(VoteReply(1, N3, True, False), Tip(), 0)
    assert role(c) is Role.LEADER and r.become is Become.LEADER


# --- the master ----------------------------------------------------------------------------------


def test_the_leader_s_first_entry_is_its_own_noop() -> None:
    net = Net()
    net.tips[N1] = Tip(1, 41)
    net.tips[N2] = Tip(1, 41)
    net.disks[N1] = Disk(3, None)
    net.restart(N1)
    net.tick(N1, net.cores[N1].timeout)
    net.deliver()
    [won] = [r for n, r in net.readies if n == N1 and r.become is Become.LEADER]
    assert won.entries == [Entry(42, 4, 1_000, Op.NOOP, "", None)]
    # it is applied as nothing, and stored like any entry
    kv = KV({"": "the empty key is a key", "k": "v"}, 41)
    kv.apply(won.entries[0])
    assert kv.data == {"": "the empty key is a key", "k": "v"} and kv.applied == 42


def test_a_noop_entry_survives_the_wal(tmp_path: Path) -> None:
    entries = [Entry(1, 1, 5, Op.SET, "k", "v"), Entry(2, 2, 6, Op.NOOP, "", None)]
    wal, _ = WAL.open(tmp_path, after=0)
    wal.append(entries)
    wal.sync()
    wal.close()
    wal, got = WAL.open(tmp_path, after=0)
    wal.close()
    assert got == entries


def test_a_master_steps_down_when_it_loses_its_majority() -> None:
    net = Net()
    net.elect(N1)
    c = net.cores[N1]
    assert c.has_quorum()
    for _ in range(3 * BASE):  # two of three slaves answer: still a majority of four
        net.tick(N1)
        net.carry(N1, c.heard_from_follower(N2, 1))
        net.carry(N1, c.heard_from_follower(N3, 1))
    assert role(c) is Role.LEADER
    downs = []
    for _ in range(BASE):  # only one answers
        net.carry(N1, c.heard_from_follower(N2, 1))
        downs.append(net.tick(N1).become)
    assert downs == [None] * (BASE - 1) + [Become.FOLLOWER]  # base ticks after the last
    assert role(c) is Role.FOLLOWER and c.leader is None and not c.has_quorum()
    assert c.epoch == 1 and net.disks[N1] == Disk(1, N1)  # the same epoch, the vote kept


def test_a_higher_epoch_makes_a_follower() -> None:
    # from a slave's acknowledgement
    net = Net()
    net.elect(N1)
    r = net.carry(N1, net.cores[N1].heard_from_follower(N3, 5))
    assert r.become is Become.FOLLOWER and (r.epoch, r.vote) == (5, None)
    assert net.cores[N1].role is Role.FOLLOWER and net.disks[N1] == Disk(5, None)
    # from a master
    c = core(epoch=1, v=N1)
    r = c.heard_from_leader(N3, 2)
    assert (r.epoch, r.vote, r.become) == (2, None, None) and c.leader == N3
    # from a refusal, in any role
    for role_epoch in (0, 1):
        c = core(N1)
        c.tick(Tip(), 0)
        for _ in range(c.timeout):
            c.tick(Tip(), 0)
        if role_epoch:
            c.step(VoteReply(1, N2, True, True), Tip(), 0)
            c.step(VoteReply(1, N3, True, True), Tip(), 0)
            assert role(c) is Role.CANDIDATE
        r = c.step(VoteReply(7, N4, False, bool(not role_epoch)), Tip(), 0)
        assert role(c) is Role.FOLLOWER and (r.epoch, c.epoch) == (7, 7)
    # but not from an older master, nor from a granted pre-vote answer
    c = core(epoch=3)
    assert c.heard_from_leader(N1, 2).epoch is None and c.leader is None
    c.step(VoteReply(9, N4, True, True), Tip(), 0)
    assert c.epoch == 3


def test_a_master_refuses_votes_while_it_has_its_majority() -> None:
    net = Net()
    net.elect(N1)
    c = net.cores[N1]
    r = c.step(vote(2, N3, 1, 1), Tip(1, 1), 0)
    assert answer(r) == VoteReply(1, N1, False, False) and r.become is None
    assert role(c) is Role.LEADER and c.epoch == 1


def test_two_masters_in_one_epoch_is_an_error() -> None:
    net = Net()
    net.elect(N1)
    with pytest.raises(RemoteProtocolError, match="master in epoch 1"):
        net.cores[N1].heard_from_leader(N2, 1)


# --- who may stand -------------------------------------------------------------------------------


def test_priority_zero_never_stands_but_votes() -> None:
    c = core(N1, priority=0)
    for _ in range(10 * BASE):
        assert not c.tick(Tip(), 0).to_peers
    assert role(c) is Role.FOLLOWER
    assert answer(c.step(vote(1, N2), Tip(), 0)).granted


def test_a_node_without_the_log_neither_votes_nor_stands_until_it_may() -> None:
    c = ElectionCore(N1, FOUR, 0, None, random.Random(1), ElectionConfig(BASE),
                     can_vote=False)
    for _ in range(10 * BASE):
        assert not c.tick(Tip(), 0).to_peers
    assert not answer(c.step(vote(1, N2, pre=True), Tip(), 0)).granted
    r = c.step(vote(1, N2), Tip(), 0)
    assert not answer(r).granted and r.vote is None and r.epoch == 1  # the epoch it learns
    c.can_vote = True
    assert answer(c.step(vote(2, N2), Tip(), 0)).granted
    assert c.tick(Tip(), 0).to_peers or c.elapsed < c.timeout


def test_a_one_node_cluster_elects_itself() -> None:
    c = ElectionCore(N1, [N1], 0, None, random.Random(1), ElectionConfig(BASE))
    r = Ready()
    while role(c) is not Role.LEADER:
        r = c.tick(Tip(), 7)
    assert (r.epoch, r.vote, r.become) == (1, N1, Become.LEADER)
    assert r.entries == [Entry(1, 1, 7, Op.NOOP, "", None)]
    for _ in range(10 * BASE):
        assert c.tick(Tip(), 7).become is None


def test_timeouts_are_random_in_base_to_twice_base() -> None:
    seen = set()
    for seed in range(50):
        c = ElectionCore(N1, FOUR, 0, None, random.Random(seed), ElectionConfig(BASE))
        assert BASE <= c.timeout < 2 * BASE
        seen.add(c.timeout)
    assert len(seen) > BASE // 2


@pytest.mark.parametrize(("nodes", "config"), [
    ([N2, N3], ElectionConfig(BASE)),
    ([N1, N1, N2], ElectionConfig(BASE)),
    (FOUR, ElectionConfig(0)),
    (FOUR, ElectionConfig(BASE, priority=-1)),
])
def test_bad_configuration_is_refused(nodes: list[NodeId], config: ElectionConfig) -> None:
    with pytest.raises(ConfigError):
        ElectionCore(N1, nodes, 0, None, random.Random(1), config)
