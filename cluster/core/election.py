"""Who leads: elections by majority with pre-votes, one vote per epoch, and the master's
step-down when it loses its majority. Not yet used by the nodes in 0.2.

A pure state machine in the style of etcd-io/raft (``becomePreCandidate``,
``becomeCandidate``, ``Step``): the shell feeds it ticks (:meth:`ElectionCore.tick`),
election messages (:meth:`ElectionCore.step`), contact with the master or the slaves
(:meth:`~ElectionCore.heard_from_leader`, :meth:`~ElectionCore.heard_from_follower`) and
persistence acknowledgements (:meth:`~ElectionCore.advance`); each returns a
:class:`~cluster.core.state.Ready` carried out like the replication cores' (persist
``epoch`` and ``vote`` first, then swap roles on ``become``, then send ``to_peers``). There
is no clock (time is ticks) and no randomness but the ``random.Random`` passed in.

The rules:

- A follower (or a candidate whose round went nowhere) that has not heard from a master
  for its election timeout, drawn per node and per round from ``[base, 2 * base)`` ticks,
  starts a **pre-vote** for ``epoch + 1``: it changes and persists nothing, and asks every
  peer whether it *would* vote for it.
- A peer grants a pre-vote when it has not heard from a master for ``base`` ticks (a master
  never does while it still has its majority), the epoch asked about is above its own, it
  may vote, and the candidate's log is at least as up to date as its own: ``(last_epoch,
  last_index)`` compared as a pair, as in Raft. So a node that was cut off, or a slave that
  merely restarted, cannot disturb a master the others still hear: it never gets its
  pre-votes, and never raises its epoch.
- With pre-votes from a majority of the whole cluster (itself included) it becomes a
  **candidate**: ``epoch + 1``, a vote for itself, both persisted (fsync) before its vote
  requests go out.
- A voter grants at most one vote per epoch (persisted before it answers), only to a
  candidate at least as up to date as itself, and not while it still hears a master
  (``base`` ticks, as for pre-votes; such a request does not raise its epoch either).
- With votes from a majority of the whole cluster (3 of 4) the candidate becomes
  **leader**; its first act is an entry of its own (``Op.NOOP``) in the new epoch, so that
  the entries before it become committed in that epoch.
- Any other message with a higher epoch (a vote request outside a master's lease, a
  rejection, word from a master, an acknowledgement from a slave) makes the node a follower
  in that epoch. A master steps down (``Become.FOLLOWER``) as soon as it has not heard from
  a majority, itself included, for ``base`` ticks (:meth:`ElectionCore.has_quorum`).
- ``priority`` 0: the node never stands (it still votes). ``can_vote`` False (a node whose
  data directory was empty and that does not hold the log yet): it neither votes nor
  stands until the shell sets it.

The shell must keep one epoch per node: the replication cores' epoch and this core's are the
same number, persisted once with the vote (see :class:`~cluster.core.state.Ready`).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, assert_never

from cluster.core.state import Become, Ready
from cluster.errors import ConfigError, RemoteProtocolError
from cluster.types import Entry, NodeId, Op
from cluster.wire.messages import Election, Vote, VoteReply


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"  # asking whether it would win; nothing changed yet
    CANDIDATE = "candidate"  # standing in its own new epoch, having voted for itself
    LEADER = "leader"


class LogTip(Protocol):
    """The end of a node's log, all an election needs of it (a :class:`Log` is one)."""

    @property
    def last_index(self) -> int: ...
    @property
    def last_epoch(self) -> int: ...


def up_to_date(last_epoch: int, last_index: int, tip: LogTip) -> bool:
    """Whether a log ending at (``last_epoch``, ``last_index``) is at least as up to date as
    the log ending at ``tip``: the later last epoch wins, then the longer log."""
    return (last_epoch, last_index) >= (tip.last_epoch, tip.last_index)


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    election_ticks: int = 10  # the base timeout: 10 ticks of the node's 100 ms = 1 s
    priority: int = 1  # 0: never stands for election

    def validate(self) -> None:
        if self.election_ticks < 1:
            raise ConfigError("the election timeout must be at least one tick")
        if self.priority < 0:
            raise ConfigError("the priority must be 0 (never master) or more")


class ElectionCore:
    def __init__(self, node_id: NodeId, nodes: Sequence[NodeId], epoch: int,
                 vote: NodeId | None, rng: random.Random,
                 config: ElectionConfig = ElectionConfig(), *, can_vote: bool = True) -> None:
        """A node as it restarts: ``epoch`` and ``vote`` as persisted, a follower that knows
        no master yet. ``nodes`` is the whole cluster, this node included."""
        config.validate()
        if node_id not in nodes or len(set(nodes)) != len(nodes):
            raise ConfigError(f"node {node_id!r} must appear once in the cluster "
                              f"({', '.join(nodes)})")
        self.node_id = node_id
        self.peers = [n for n in nodes if n != node_id]
        self.majority = len(nodes) // 2 + 1
        self.config = config
        self.can_vote = can_vote  # False until a node that started empty holds the log
        self._rng = rng
        self.epoch = epoch
        self.vote = vote  # whom this node voted for in ``epoch``
        self.role = Role.FOLLOWER
        self.leader: NodeId | None = None  # the master of ``epoch``, once heard from
        self.elapsed = 0  # ticks since the master was last heard (or the last round began)
        self.timeout = self._draw_timeout()
        self.ticks = 0  # every tick, for the master's view of its slaves
        self.why = "started"  # why the role last changed, for logs and status
        self._answers: dict[NodeId, bool] = {}  # this round: who granted, who refused
        self._contact: dict[NodeId, int] = {}  # master: the tick each slave was last heard

    def _draw_timeout(self) -> int:
        base = self.config.election_ticks
        return self._rng.randrange(base, 2 * base)

    @property
    def promotable(self) -> bool:
        """Whether this node may stand for election."""
        return self.can_vote and self.config.priority > 0

    def has_quorum(self) -> bool:
        """A master: whether a majority, itself included, was heard within ``base`` ticks."""
        if self.role is not Role.LEADER:
            return False
        base = self.config.election_ticks
        heard = sum(1 for t in self._contact.values() if self.ticks - t < base)
        return 1 + heard >= self.majority

    def _in_lease(self) -> bool:
        """Whether a master is still heard: then no one else may stand."""
        if self.role is Role.LEADER:
            return self.has_quorum()
        return self.leader is not None and self.elapsed < self.config.election_ticks

    # --- inputs ------------------------------------------------------------------------------

    def tick(self, log: LogTip, wall_ms: int) -> Ready:
        """One tick of the node's clock. A follower past its timeout starts a pre-vote; a
        master that lost its majority steps down. ``wall_ms`` stamps a master's first entry
        (a one-node cluster wins at once)."""
        self.ticks += 1
        if self.role is Role.LEADER:
            if not self.has_quorum():
                return self._follow(self.epoch, None, "lost contact with a majority", Ready())
            return Ready()
        self.elapsed += 1
        if self.elapsed >= self.timeout and self.promotable:
            return self._pre_campaign(log, wall_ms)
        return Ready()

    def step(self, msg: Election, log: LogTip, wall_ms: int) -> Ready:
        """An election message from a peer."""
        match msg:
            case Vote():
                return self._on_vote(msg, log)
            case VoteReply():
                return self._on_reply(msg, log, wall_ms)
        assert_never(msg)

    def heard_from_leader(self, leader: NodeId, epoch: int) -> Ready:
        """A master's message in ``epoch`` arrived (an append, a heartbeat, a snapshot chunk
        or a sync reply). One of an older epoch changes nothing here (the replication core
        refuses it)."""
        out = Ready()
        if epoch < self.epoch:
            return out
        if epoch > self.epoch or self.role is not Role.FOLLOWER:
            if self.role is Role.LEADER and epoch == self.epoch:
                raise RemoteProtocolError(f"{leader} claims to be master in epoch {epoch}, "
                                          f"which {self.node_id} leads")
            self._follow(epoch, leader, f"{leader} is master in epoch {epoch}", out)
        self.leader = leader
        self.elapsed = 0
        return out

    def heard_from_follower(self, peer: NodeId, epoch: int) -> Ready:
        """A slave's message (an acknowledgement, a sync request) in ``epoch``. A higher
        epoch deposes this master."""
        if epoch > self.epoch:
            return self._follow(epoch, None, f"{peer} is in epoch {epoch}", Ready())
        if self.role is Role.LEADER and epoch == self.epoch and peer in self._contact:
            self._contact[peer] = self.ticks
        return Ready()

    def advance(self, ready: Ready) -> Ready:
        """``ready``'s epoch and vote are on stable storage. Nothing waits for it here (its
        messages go once it is carried out); kept so the shell treats every core alike."""
        return Ready()

    # --- votes -------------------------------------------------------------------------------

    def _on_vote(self, msg: Vote, log: LogTip) -> Ready:
        out = Ready()
        candidate = NodeId(msg.candidate)
        if candidate == self.node_id or candidate not in self.peers:
            return out
        if msg.epoch > self.epoch:
            if self._in_lease():
                return self._answer(msg, False, out)  # a master is heard: ignore the epoch
            if not msg.pre_vote:
                self._follow(msg.epoch, None, f"{candidate} stands in epoch {msg.epoch}", out)
        elif msg.epoch < self.epoch:
            return self._answer(msg, False, out)
        fresh = up_to_date(msg.last_epoch, msg.last_index, log)
        if msg.pre_vote:
            return self._answer(msg, self.can_vote and fresh and msg.epoch > self.epoch, out)
        free = self.vote == candidate or (self.vote is None and self.leader is None)
        if not (self.can_vote and fresh and free):
            return self._answer(msg, False, out)
        self.vote = candidate
        self.elapsed = 0
        out.epoch, out.vote = self.epoch, candidate  # persisted before the answer goes
        return self._answer(msg, True, out)

    def _answer(self, msg: Vote, granted: bool, out: Ready) -> Ready:
        epoch = msg.epoch if granted else self.epoch
        out.to_peers.append((msg.candidate, VoteReply(epoch, self.node_id, granted,
                                                      msg.pre_vote)))
        return out

    def _on_reply(self, msg: VoteReply, log: LogTip, wall_ms: int) -> Ready:
        out = Ready()
        voter = NodeId(msg.voter)
        if msg.epoch > self.epoch and not (msg.pre_vote and msg.granted):
            return self._follow(msg.epoch, None, f"{voter} is in epoch {msg.epoch}", out)
        if voter not in self.peers:
            return out
        if self.role is Role.PRE_CANDIDATE and msg.pre_vote:
            asked = self.epoch + 1
        elif self.role is Role.CANDIDATE and not msg.pre_vote:
            asked = self.epoch
        else:
            return out  # an answer to a round that is over
        if msg.epoch != (asked if msg.granted else self.epoch):
            return out
        self._answers.setdefault(voter, msg.granted)
        return self._poll(log, wall_ms, out)

    def _poll(self, log: LogTip, wall_ms: int, out: Ready) -> Ready:
        granted = sum(self._answers.values())
        if granted >= self.majority:
            if self.role is Role.PRE_CANDIDATE:
                return self._campaign(log, wall_ms, out)
            return self._lead(log, wall_ms, out)
        refused = len(self._answers) - granted
        if refused > len(self.peers) + 1 - self.majority:
            kind = "pre-votes" if self.role is Role.PRE_CANDIDATE else "votes"
            self._follow(self.epoch, None, f"refused {kind} by {refused} nodes", out)
        return out

    # --- role changes ------------------------------------------------------------------------

    def _new_round(self, role: Role) -> None:
        self.role = role
        self.leader = None
        self.elapsed = 0
        self.timeout = self._draw_timeout()
        self._answers = {self.node_id: True}
        self._contact = {}

    def _pre_campaign(self, log: LogTip, wall_ms: int) -> Ready:
        self._new_round(Role.PRE_CANDIDATE)
        self.why = f"no master heard for {self.timeout} ticks"
        out = Ready(to_peers=[
            (p, Vote(self.epoch + 1, self.node_id, log.last_epoch, log.last_index, True))
            for p in self.peers])
        return self._poll(log, wall_ms, out)

    def _campaign(self, log: LogTip, wall_ms: int, out: Ready) -> Ready:
        self._new_round(Role.CANDIDATE)
        self.epoch += 1
        self.vote = self.node_id
        self.why = f"won the pre-vote for epoch {self.epoch}"
        out.epoch, out.vote = self.epoch, self.node_id  # fsynced before the requests go
        out.to_peers.extend(
            (p, Vote(self.epoch, self.node_id, log.last_epoch, log.last_index, False))
            for p in self.peers)
        return self._poll(log, wall_ms, out)

    def _lead(self, log: LogTip, wall_ms: int, out: Ready) -> Ready:
        votes = sum(self._answers.values())
        self.role = Role.LEADER
        self.leader = self.node_id
        self._answers = {}
        self._contact = {p: self.ticks for p in self.peers}  # one timeout's grace
        self.why = f"elected in epoch {self.epoch} by {votes} of {len(self.peers) + 1} nodes"
        out.become = Become.LEADER
        out.entries.append(Entry(log.last_index + 1, self.epoch, wall_ms, Op.NOOP, "", None))
        return out

    def _follow(self, epoch: int, leader: NodeId | None, why: str, out: Ready) -> Ready:
        """Become a follower in ``epoch`` (persisted, with no vote, when it is new)."""
        if self.role is Role.LEADER:
            out.become = Become.FOLLOWER
        if epoch > self.epoch:
            self.epoch, self.vote = epoch, None
            out.epoch, out.vote = epoch, None
        self._new_round(Role.FOLLOWER)
        self._answers = {}
        self.leader = leader
        self.why = why
        return out

    def status(self) -> dict[str, Any]:
        return {"role": self.role.value, "epoch": self.epoch, "vote": self.vote,
                "leader": self.leader, "why": self.why, "can_vote": self.can_vote,
                "priority": self.config.priority}
