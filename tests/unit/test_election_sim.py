"""A deterministic simulation of elections: N election cores (3, 4 or 5), each with a "disk"
holding only its epoch, its vote and a simple log, over a network whose messages are
delivered late, out of order, twice or never, with crashes, restarts and partitions.

In the spirit of etcd-raft's interaction tests: no sockets, no clock, no threads. Every
decision is the cores'; this module plays the shell. It persists each Ready's epoch and
vote before it queues the Ready's messages, restarts a crashed node from its disk alone,
and stands in for the replication cores: a master sends its whole log (as the epochs of its
entries) with every heartbeat, once per tick; a slave keeps the longer of two logs that
agree, takes the master's when they conflict, and answers with its epoch and how much of
the master's log it holds; the master counts an entry of its own epoch committed once a
majority holds it (Raft's rule, which is why a new master starts with an entry of its own).
Election messages cross the real codec.

After every step: at most one leader per epoch, ever; no node grants two votes in one epoch,
across crashes (a grant leaves only once the vote is on its disk, and so does a candidate's
request); a new leader holds every committed entry, its log is what it stood with, and the
voters that elected it (a majority with it) had logs no more up to date than its own; a
committed entry never changes. After the schedule, with every node back and the network
healed, a leader is elected within ``ELECT_WITHIN`` ticks and every node follows it; then,
with the network healthy (a slave restarting, another cut off and returning behind), there
is no election at all: pre-votes keep them from disturbing the master.

Schedules come from seeds and from Hypothesis (which shrinks a failing one to a few steps).

How this was checked against mutations of :mod:`cluster.core.election` (each made by hand,
these tests run, the change reverted):

| mutation of ``cluster/core/election.py`` | caught by |
|---|---|
| two votes per epoch (``free = True``) | the one-vote and one-leader checks |
| a granted vote left out of the Ready | the vote-on-disk check, every test |
| no up-to-date check for votes (kept for pre-votes) | test_random_schedules (committed) |
| no up-to-date check at all | test_random_schedules (committed entries, voters' logs) |
| ``up_to_date`` compares the index before the epoch | test_random_schedules |
| no pre-vote (a timed-out follower stands at once) | test_a_healthy_master_..., others |
| no lease check (votes, pre-votes granted while a master is heard) | ..._healthy_master_ (idle) |
| no lease check for pre-votes only | test_a_healthy_master_is_never_disturbed (idle) |
| a master never steps down | test_the_old_master_cut_off_with_a_tail_... |
| a granted pre-vote raises the voter's epoch | every test |
| half the cluster counts as a majority | the one-leader check |
| the new master's first entry left out | the first-entry check, every test |
| answers from an earlier round counted | test_election.py only (a precise timing) |
| a slave's higher epoch does not depose the master | test_election.py only (see below) |

The last two change only timing here: a stale answer counts only when it arrives just as a
new round begins, and a master no slave answers steps down a timeout later anyway.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import Limits
from cluster.core.election import ElectionConfig, ElectionCore, Role
from cluster.core.state import Become, Ready
from cluster.types import Entry, NodeId, Op
from cluster.wire import codec
from cluster.wire.messages import Vote, VoteReply

BASE = 10  # the base election timeout, in ticks
ELECT_WITHIN = 6 * BASE  # ticks after healing by which all follow one leader (seen: <= 23)
LIMITS = Limits()


@dataclass(frozen=True)
class Heartbeat:
    """A master's append, reduced to what elections need: its epoch and its whole log."""

    epoch: int
    leader: NodeId
    log: tuple[int, ...]


@dataclass(frozen=True)
class HeartbeatAck:
    """A slave's answer: its epoch, and how many of the master's entries it holds."""

    epoch: int
    follower: NodeId
    match: int


Msg = Vote | VoteReply | Heartbeat | HeartbeatAck


@dataclass
class Disk:
    """What survives a crash. The log is durable as soon as it changes."""

    epoch: int = 0
    vote: NodeId | None = None
    log: list[int] = field(default_factory=list)  # the epoch of entry i at i - 1


class Tip:
    def __init__(self, log: list[int]) -> None:
        self.last_index = len(log)
        self.last_epoch = log[-1] if log else 0


def is_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> bool:
    return len(a) <= len(b) and list(b[: len(a)]) == list(a)


def wire(msg: Msg) -> Msg:
    if isinstance(msg, Vote | VoteReply):
        out = codec.decode(codec.encode(msg), LIMITS)
        assert out == msg
        assert isinstance(out, Vote | VoteReply)
        return out
    return msg


class Sim:
    def __init__(self, n: int, seed: int) -> None:
        self.nodes = [NodeId(f"n{i}") for i in range(1, n + 1)]
        self.majority = n // 2 + 1
        self.seed = seed
        self.rng = random.Random(seed)
        self.disks = {x: Disk() for x in self.nodes}
        self.cores: dict[NodeId, ElectionCore | None] = {}
        self.inflight: list[tuple[NodeId, NodeId, Msg]] = []
        self.group = {x: 0 for x in self.nodes}  # nodes in different groups cannot talk
        self.now = 0  # ticks, for wall-clock stamps
        self.restarts = 0
        self.trace: list[str] = []
        # what happened, ever
        self.leaders: dict[int, NodeId] = {}  # epoch -> its leader
        self.votes: dict[tuple[NodeId, int], NodeId] = {}  # (voter, epoch) -> candidate
        self.granted_with: dict[tuple[NodeId, int], dict[NodeId, tuple[int, int]]] = {}
        self.stood_with: dict[tuple[NodeId, int], tuple[int, int]] = {}
        self.committed: dict[int, int] = {}  # index -> epoch
        self.match: dict[NodeId, dict[NodeId, int]] = {}  # leader -> slave -> entries held
        self.elections = 0
        for x in self.nodes:
            self.restart(x)

    # --- the shell -----------------------------------------------------------------------------

    def core(self, x: NodeId) -> ElectionCore:
        c = self.cores[x]
        assert c is not None
        return c

    def restart(self, x: NodeId) -> None:
        d = self.disks[x]
        self.restarts += 1
        self.cores[x] = ElectionCore(x, self.nodes, d.epoch, d.vote,
                                     random.Random(f"{self.seed}/{x}/{self.restarts}"),
                                     ElectionConfig(BASE))
        self.trace.append(f"restart {x} at epoch {d.epoch} vote {d.vote}")

    def crash(self, x: NodeId) -> None:
        self.cores[x] = None
        self.trace.append(f"crash {x}")

    def up(self, x: NodeId) -> bool:
        return self.cores[x] is not None

    def tip(self, x: NodeId) -> tuple[int, int]:
        t = Tip(self.disks[x].log)
        return t.last_epoch, t.last_index

    def carry(self, x: NodeId, ready: Ready) -> None:
        """Persist, then check what is about to be sent, then send."""
        d = self.disks[x]
        c = self.core(x)
        if ready.epoch is not None:
            assert ready.epoch >= d.epoch, f"{x}: epoch went back to {ready.epoch}"
            d.epoch, d.vote = ready.epoch, NodeId(ready.vote) if ready.vote else None
        assert (c.epoch, c.vote) == (d.epoch, d.vote), f"{x}: epoch or vote not persisted"
        if ready.become is Become.LEADER:
            self.elected(x, ready)
        for to, msg in ready.to_peers:
            assert isinstance(msg, Vote | VoteReply)
            if isinstance(msg, Vote) and not msg.pre_vote:
                assert (d.epoch, d.vote) == (msg.epoch, x), f"{x} asks before it persisted"
                self.stood_with.setdefault((x, msg.epoch), (msg.last_epoch, msg.last_index))
            if isinstance(msg, VoteReply) and msg.granted and not msg.pre_vote:
                cand = NodeId(to)
                assert (d.epoch, d.vote) == (msg.epoch, cand), f"{x} grants before persisting"
                before = self.votes.setdefault((x, msg.epoch), cand)
                assert before == cand, f"{x} voted for {before} and {cand} in {msg.epoch}"
                self.granted_with.setdefault((cand, msg.epoch), {})[x] = self.tip(x)
            self.inflight.append((x, NodeId(to), wire(msg)))

    def elected(self, x: NodeId, ready: Ready) -> None:
        c = self.core(x)
        log = self.disks[x].log
        epoch = c.epoch
        self.elections += 1
        self.trace.append(f"{x} elected in epoch {epoch} with log {self.tip(x)}")
        assert self.leaders.setdefault(epoch, x) == x, f"two leaders in epoch {epoch}"
        assert self.stood_with.get((x, epoch), self.tip(x)) == self.tip(x)
        voters = self.granted_with.get((x, epoch), {})
        assert len(voters) + 1 >= self.majority, f"{x} won with {len(voters)} votes"
        for v, t in voters.items():
            assert t <= self.tip(x), f"{x} at {self.tip(x)} elected by {v} at {t}"
        for i, e in self.committed.items():
            assert i <= len(log) and log[i - 1] == e, f"{x} lacks committed entry {i}/{e}"
        assert ready.entries == [Entry(len(log) + 1, epoch, self.now * 100, Op.NOOP, "",
                                       None)]
        log.append(epoch)
        self.match[x] = {p: 0 for p in c.peers}

    def send(self, frm: NodeId, to: NodeId, msg: Msg) -> None:
        self.inflight.append((frm, to, msg))

    def tick(self, x: NodeId) -> None:
        if not self.up(x):
            return
        c = self.core(x)
        self.carry(x, c.tick(Tip(self.disks[x].log), self.now * 100))
        if c.role is Role.LEADER:
            log = tuple(self.disks[x].log)
            for p in c.peers:
                self.send(x, p, Heartbeat(c.epoch, x, log))

    def tick_all(self) -> None:
        self.now += 1
        order = list(self.nodes)
        self.rng.shuffle(order)
        for x in order:
            self.tick(x)

    def deliver(self, i: int, *, keep: bool = False) -> None:
        frm, to, msg = self.inflight[i] if keep else self.inflight.pop(i)
        if not self.up(to) or self.group[frm] != self.group[to]:
            return
        c = self.core(to)
        d = self.disks[to]
        match msg:
            case Vote() | VoteReply():
                self.carry(to, c.step(msg, Tip(d.log), self.now * 100))
            case Heartbeat(epoch=epoch, leader=leader, log=log):
                self.carry(to, c.heard_from_leader(leader, epoch))
                if epoch < c.epoch:  # a deposed master: tell it (as a sync or ack would)
                    self.send(to, frm, HeartbeatAck(c.epoch, to, 0))
                    return
                if not is_prefix(log, d.log):
                    d.log = list(log)
                self.send(to, frm, HeartbeatAck(c.epoch, to, len(log)))
            case HeartbeatAck(epoch=epoch, follower=f, match=held):
                self.carry(to, c.heard_from_follower(f, epoch))
                if c.role is Role.LEADER and epoch == c.epoch:
                    self.match[to][f] = max(self.match[to][f], held)
                    self.commit(to)

    def commit(self, x: NodeId) -> None:
        """Entries of the master's own epoch held by a majority are committed, with all
        before them."""
        log = self.disks[x].log
        epoch = self.core(x).epoch
        for i in range(len(log), 0, -1):
            if log[i - 1] != epoch:
                return
            if 1 + sum(1 for m in self.match[x].values() if m >= i) >= self.majority:
                for j in range(1, i + 1):
                    before = self.committed.setdefault(j, log[j - 1])
                    assert before == log[j - 1], f"committed entry {j} changed"
                return

    def propose(self) -> None:
        for x in self.nodes:
            if self.up(x) and self.core(x).role is Role.LEADER:
                self.disks[x].log.append(self.core(x).epoch)

    def partition(self, cut: list[NodeId]) -> None:
        self.group = {x: 1 if x in cut else 0 for x in self.nodes}
        self.trace.append(f"partition {cut}")

    def heal(self) -> None:
        self.group = {x: 0 for x in self.nodes}

    def check(self) -> None:
        for x in self.nodes:
            if self.up(x):
                c, d = self.core(x), self.disks[x]
                assert (c.epoch, c.vote) == (d.epoch, d.vote)
                if c.role is Role.LEADER:
                    assert self.leaders[c.epoch] == x

    # --- schedules -------------------------------------------------------------------------------

    def step(self, kind: str, a: int, b: int) -> None:
        n = len(self.nodes)
        x = self.nodes[a % n]
        match kind:
            case "tick":
                for _ in range(1 + b % 4):
                    self.tick_all()
            case "tick_one":
                self.tick(x)
            case "deliver" | "dup" | "drop" if self.inflight:
                i = b % len(self.inflight)
                if kind == "drop":
                    self.inflight.pop(i)
                else:
                    self.deliver(i, keep=kind == "dup")
            case "deliver_all":
                self.deliver_all()
            case "crash" if self.up(x):
                self.crash(x)
            case "crash_leader" | "cut_leader":
                for y in self.nodes:
                    if self.up(y) and self.core(y).role is Role.LEADER:
                        self.crash(y) if kind == "crash_leader" else self.partition([y])
            case "restart":
                down = [y for y in self.nodes if not self.up(y)]
                if down:
                    self.restart(down[b % len(down)])
            case "partition":
                self.partition([y for i, y in enumerate(self.nodes) if b >> i & 1])
            case "heal":
                self.heal()
            case "propose":
                self.propose()
        self.check()

    def deliver_all(self, limit: int = 10_000) -> None:
        """Deliver everything in flight (in a random order), and what that causes."""
        for _ in range(limit):
            if not self.inflight:
                return
            self.deliver(self.rng.randrange(len(self.inflight)))
            self.check()
        raise AssertionError("messages never stop")

    def random_steps(self, count: int) -> None:
        kinds = ["tick"] * 6 + ["tick_one"] * 2 + ["deliver"] * 16 + ["dup", "drop"] * 2 \
            + ["deliver_all"] * 4 + ["crash", "restart", "restart", "partition", "heal",
                                     "heal", "propose", "propose", "crash_leader",
                                     "cut_leader"]
        for _ in range(count):
            kind = self.rng.choice(kinds)
            if kind == "partition" and self.rng.random() < 0.5:
                b = 1 << self.rng.randrange(len(self.nodes))  # one node cut off
            else:
                b = self.rng.randrange(1 << 20)
            self.step(kind, self.rng.randrange(len(self.nodes)), b)

    # --- after the schedule ----------------------------------------------------------------------

    def round(self) -> None:
        """One tick everywhere, every message delivered: a healthy network."""
        self.tick_all()
        self.deliver_all()

    def settled(self) -> NodeId | None:
        """The leader every node follows, if there is one."""
        leaders = [x for x in self.nodes if self.up(x) and self.core(x).role is Role.LEADER]
        if len(leaders) != 1:
            return None
        lead = self.core(leaders[0])
        if all(self.core(x).epoch == lead.epoch and self.core(x).leader == leaders[0]
               for x in self.nodes if self.up(x)):
            return leaders[0]
        return None

    def heal_and_elect(self) -> NodeId:
        self.heal()
        for x in self.nodes:
            if not self.up(x):
                self.restart(x)
        for t in range(ELECT_WITHIN):
            self.round()
            if t % 7 == 0:
                self.propose()
            lead = self.settled()
            if lead is not None:
                return lead
        raise AssertionError(f"no leader {ELECT_WITHIN} ticks after healing:\n"
                             + "\n".join(self.trace[-30:]))

    def stays(self, lead: NodeId, ticks: int, *, writes: bool = True) -> None:
        """``ticks`` healthy rounds after which ``lead`` still leads in the same epoch."""
        epoch = self.core(lead).epoch
        for t in range(ticks):
            self.round()
            if writes and t % 3 == 0:
                self.propose()
            assert self.core(lead).role is Role.LEADER and self.core(lead).epoch == epoch, \
                "\n".join(self.trace[-30:])
            assert all(self.core(x).epoch == epoch for x in self.nodes if self.up(x))


# --- seeded schedules ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 4, 5])
@pytest.mark.parametrize("seed", range(30))
def test_random_schedules(n: int, seed: int) -> None:
    sim = Sim(n, seed)
    sim.random_steps(800)
    lead = sim.heal_and_elect()
    sim.stays(lead, 3 * BASE)


@pytest.mark.parametrize("writes", [True, False], ids=["writes", "idle"])
@pytest.mark.parametrize("n", [3, 4, 5])
@pytest.mark.parametrize("seed", range(6))
def test_a_healthy_master_is_never_disturbed(n: int, seed: int, writes: bool) -> None:
    """A slave restarting, and another cut off for many election timeouts and returning
    (behind, or, on an idle cluster, as up to date as the others), never cause an election
    while the master is heard by a majority."""
    sim = Sim(n, 1000 + seed)
    lead = sim.heal_and_elect()
    epoch = sim.core(lead).epoch
    sim.stays(lead, 2, writes=False)  # every log holds the master's first entry
    others = [x for x in sim.nodes if x != lead]
    sim.rng.shuffle(others)
    sim.crash(others[0])
    sim.stays(lead, sim.rng.randrange(2 * BASE), writes=writes)
    sim.restart(others[0])
    sim.stays(lead, 5 * BASE, writes=writes)
    cut = sim.core(others[1])
    sim.partition([others[1]])
    sim.stays(lead, 10 * BASE, writes=writes)  # it pre-votes, alone, again and again
    assert cut.epoch == epoch
    for _ in range(3 * BASE):  # it returns just as it asks for pre-votes again
        sim.tick_all()
        if cut.role is Role.PRE_CANDIDATE and cut.elapsed == 0:
            break
        sim.deliver_all()
    sim.heal()
    while votes := [i for i, (_, _, m) in enumerate(sim.inflight)
                    if isinstance(m, Vote | VoteReply)]:
        sim.deliver(votes[0])  # its round plays out before the master's heartbeats arrive
        sim.check()
    sim.deliver_all()
    sim.stays(lead, 5 * BASE, writes=writes)
    assert sim.elections == 1 and sim.core(others[1]).leader == lead


def test_the_old_master_cut_off_with_a_tail_returns_as_a_follower() -> None:
    sim = Sim(4, 7)
    old = sim.heal_and_elect()
    epoch = sim.core(old).epoch
    sim.partition([old])
    for _ in range(3):
        sim.propose()  # entries only the old master holds
    tail = list(sim.disks[old].log)
    for _ in range(4 * BASE):
        sim.round()
    assert sim.core(old).role is not Role.LEADER  # it stepped down
    new = [x for x in sim.nodes if sim.core(x).role is Role.LEADER]
    assert len(new) == 1 and sim.core(new[0]).epoch > epoch
    assert sim.core(old).epoch == epoch  # its pre-votes, alone, raised nothing
    lead = sim.heal_and_elect()
    assert lead == new[0] and sim.core(old).leader == lead
    assert is_prefix(sim.disks[old].log, sim.disks[lead].log)
    assert not is_prefix(tail, sim.disks[lead].log)  # its tail is gone


# --- Hypothesis ----------------------------------------------------------------------------------

_steps = st.lists(st.tuples(
    st.sampled_from(["tick", "tick_one", "deliver", "deliver", "deliver", "dup", "drop",
                     "deliver_all", "crash", "restart", "partition", "heal", "propose",
                     "crash_leader", "cut_leader"]),
    st.integers(0, 4), st.integers(0, 1 << 10)), max_size=120)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([3, 4, 5]), st.integers(0, 2**16), _steps)
def test_hypothesis_schedules(n: int, seed: int, steps: list[tuple[str, int, int]]) -> None:
    sim = Sim(n, seed)
    for kind, a, b in steps:
        sim.step(kind, a, b)
    lead = sim.heal_and_elect()
    sim.stays(lead, 2 * BASE)
