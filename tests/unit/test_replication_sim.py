"""A deterministic in-memory cluster that runs the real node logic: one MasterCore and three
SlaveCores, each over a MemoryStore, persisted through the same ``carry_out`` as the asyncio
runtime.

In the spirit of etcd-raft's interaction tests: no sockets, no clock, no threads. Every
decision (what to persist, what to cut, when to acknowledge, which replies to release) is
made by the cores; this module only moves messages. Each slave has one link to the master
with an explicit, ordered list of messages in flight each way. A schedule is a sequence of
steps (propose, persist, deliver, pump, drop, tick, crash, snapshot); invariants are checked
after every step. Schedules come from seeds and from Hypothesis (which shrinks a failing one
to a short list of steps).

The master's fsync policy is modelled both ways: ``always`` (an entry is durable only once
its store synced it) and ``no`` (durable as soon as it is written, so a crash of the machine
can lose entries that slaves already hold; those slaves must then cut them back through the
sync handshake, into their rollback files).

How this was checked against mutations of the product code (each made by hand, the suite
run, the change reverted):

| mutation | caught by |
|---|---|
| ``SlaveCore.on_sync_reply`` cuts at ``match < last - 1`` | test_random_schedules (prefix check) |
| ``os._exit(99)`` inside the truncation branch of ``on_sync_reply`` | every schedule that cuts |
| ``SlaveCore.advance`` no longer sets ``_durable`` after a cut | majority-on-disk invariant |
| ``SlaveCore.ack`` acknowledges written (not durable) entries | majority-on-disk invariant |
| ``MasterCore.on_sync`` resumes at ``match + 2`` | prefix and convergence checks |
| ``MasterCore.majority_index`` off by one | majority-on-disk invariant |
| an entry applied twice (``advance`` applies ``ready.entries`` again) | KV.apply raises |
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import Limits
from cluster.core.history import EpochHistory
from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.core.master import MasterCore, SyncPlan
from cluster.core.slave import LinkState, SlaveCore
from cluster.core.state import NO_SNAPSHOT, Ready, Recovered, Replica, SnapshotMeta
from cluster.errors import LocalProtocolError, RemoteProtocolError, StaleEpoch, StorageFailure
from cluster.storage.base import carry_out
from cluster.storage.memory import MemoryStore
from cluster.types import Acks, Entry, NodeId, Op, Value
from cluster.wire import codec
from cluster.wire.messages import Ack, Append, ErrorReply, Reply, Sync

MASTER = NodeId("m")
SLAVES = [NodeId("s1"), NodeId("s2"), NodeId("s3")]
MAJORITY = 3  # of four nodes
LIMITS = Limits()
KEYS = ["a", "b", "c", "d", "e", "f"]
LEVELS = [Acks.MAJORITY, Acks.ALL, Acks(1), Acks(2), Acks(3)]  # besides async
HEARTBEAT_MS = 50
PEER_TIMEOUT_MS = 300

# --- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncReply:
    epoch: int
    plan: SyncPlan


@dataclass(frozen=True)
class SnapshotMsg:
    epoch: int
    meta: SnapshotMeta
    data: KV


@dataclass
class Link:
    to_slave: deque[Any] = field(default_factory=deque)
    to_master: deque[Any] = field(default_factory=deque)
    open: bool = False  # the slave has a connection (it sent a Sync on it)
    linked: bool = False  # the master has answered that Sync


def wire(msg: Append | Sync | Ack) -> Any:
    """Every protocol message crosses the codec, as it would on a socket."""
    return codec.decode(codec.encode(msg), LIMITS)


def log_entries(lg: Log) -> list[Entry]:
    return lg.slice(lg.base + 1, lg.last_index) if lg.last_index > lg.base else []


class Client:
    """Where a master's replies go: the writes each was for."""

    def __init__(self) -> None:
        self.replies: list[Reply | ErrorReply] = []

    def send(self, reply: Reply | ErrorReply) -> None:
        self.replies.append(reply)


class Sim:
    def __init__(self, seed: int, *, fsync_always: bool, window: int = 6, batch: int = 3
                 ) -> None:
        self.rng = random.Random(seed)
        self.fsync_always = fsync_always
        self.window = window
        self.batch = batch
        self.now = 1_000
        self.rid = 0
        self.writes = 0
        self.trace: list[str] = []
        self.stores: dict[NodeId, MemoryStore] = {n: MemoryStore() for n in [MASTER, *SLAVES]}
        self.links: dict[NodeId, Link] = {n: Link() for n in SLAVES}
        self.client = Client()
        self.master = self._start_master()
        self.slaves: dict[NodeId, SlaveCore] = {
            n: SlaveCore(n, Replica.recovered(self.stores[n].crash())) for n in SLAVES}
        # every entry ever created, by (index, epoch): one master writes each epoch
        self.created: dict[tuple[int, int], Entry] = {}
        self.proposed: dict[int, tuple[int, Acks]] = {}  # request id -> (index, acks)
        self.answered: set[int] = set()  # request ids replied to (once each)
        self.acked: dict[int, Entry] = {}  # writes replied to that need fewer than a majority
        # writes replied to that need a majority of copies or more (acks=majority, all, N)
        self.majority_acked: dict[int, Entry] = {}

    def _start_master(self) -> MasterCore:
        """What Node does for the bootstrap master: recover, then a new epoch, persisted."""
        store = self.stores[MASTER]
        replica = Replica.recovered(store.crash())
        replica.epoch += 1
        store.set_epoch(replica.epoch)
        return MasterCore(MASTER, list(SLAVES), replica, majority=MAJORITY,
                          peer_timeout_ms=PEER_TIMEOUT_MS, heartbeat_ms=HEARTBEAT_MS,
                          batch_entries=self.batch, window_entries=self.window)

    def note(self, text: str) -> None:
        self.trace.append(text)

    # --- the shell's part, as the runtime does it ----------------------------------------------

    def _carry_out(self, node: NodeId, core: MasterCore | SlaveCore, ready: Ready) -> Ready:
        return carry_out(self.stores[node], core, ready,
                         wrote=lambda ix: self._wrote(node, ix), reset=lambda ix: None)

    def _wrote(self, node: NodeId, index: int) -> None:
        """Durability: with fsync=no the master counts what it wrote as durable at once."""
        if node == MASTER and not self.fsync_always:
            self._deliver_replies(self.master.persisted(index))

    def _deliver_replies(self, ready: Ready) -> None:
        for client, reply in ready.replies:
            client.send(reply)
            assert reply.id not in self.answered, f"request {reply.id} answered twice"
            self.answered.add(reply.id)
            if reply.id not in self.proposed:  # refused up front: it made no entry
                assert isinstance(reply, ErrorReply) and reply.applied == "no", reply
                continue
            index, acks = self.proposed[reply.id]
            if isinstance(reply, ErrorReply):  # timed out, or lost its nodes, or storage
                assert reply.applied in ("no", "unknown"), reply
                if reply.applied == "unknown":
                    assert (reply.index, reply.epoch) == (index, self.master.epoch), reply
                continue
            assert reply.fields["index"] == index
            assert self.master.log.epoch_at(index) == reply.fields["epoch"]
            entry = self.created[(index, reply.fields["epoch"])]
            # copies is truthful: at least what the level needs, at most the disks holding it
            need = acks.copies(1 + len(SLAVES), MAJORITY)
            holders = sum(1 for n in SLAVES if self._on_disk(n, entry))
            holders += 1 if (not self.fsync_always or self._on_disk(MASTER, entry)) else 0
            assert need <= reply.fields["copies"] <= holders, (reply, need, holders)
            (self.majority_acked if need >= MAJORITY else self.acked)[index] = entry

    def _send_to_master(self, node: NodeId, ready: Ready) -> None:
        link = self.links[node]
        for msg in ready.messages:
            if link.open:
                link.to_master.append(wire(msg))  # type: ignore[arg-type]

    # --- steps -----------------------------------------------------------------------------

    def propose(self) -> None:
        m = self.master
        self.writes += 1
        self.rid += 1
        key = self.rng.choice(KEYS)
        acks = self.rng.choice(LEVELS) if self.rng.random() < 0.4 else Acks.ASYNC
        timeout_ms = self.rng.choice([None, None, 20, 100, 400])
        if self.rng.random() < 0.2:
            op, value = Op.DELETE, None
        else:
            op = Op.SET
            value = f"v{self.writes}" if self.rng.random() < 0.5 else f"v{self.writes}".encode()
        ready = m.propose(self.client, self.rid, op, key, value, acks, self.now, self.now,
                          timeout_ms)
        if not ready.entries:
            self._deliver_replies(ready)  # refused: too few slaves in contact for the level
            self.note(f"propose refused ({acks.value})")
            return
        e = ready.entries[0]
        assert (e.index, e.epoch) not in self.created
        self.created[(e.index, e.epoch)] = e
        self.proposed[self.rid] = (e.index, acks)
        try:
            ready = self._carry_out(MASTER, m, ready)
        except StorageFailure as exc:
            ready = m.failed(ready, exc)
        self._deliver_replies(ready)
        self.note(f"propose {e.index}/{e.epoch} {acks.value}")

    def persist(self, node: NodeId) -> None:
        """The node's fsync completes: everything written so far is durable."""
        self.note(f"persist {node}")
        store = self.stores[node]
        store.sync()
        if node == MASTER:
            self._deliver_replies(self.master.persisted(self.master.log.last_index))
            return
        s = self.slaves[node]
        if s.log.last_index > s.durable:  # the runtime reports when durability advances
            self._send_to_master(node, self._carry_out(node, s, s.persisted(s.log.last_index)))

    def connect(self, node: NodeId) -> None:
        link = self.links[node]
        assert not link.open
        link.open = True
        self.rid += 1
        link.to_master.append(wire(self.slaves[node].connect(self.rid)))
        self.note(f"connect {node}")

    def drop(self, node: NodeId) -> None:
        """The connection breaks: everything in flight on it is lost."""
        if self.links[node].open:
            self.slaves[node].disconnected()
        self.links[node] = Link()
        self.master.disconnected(node)
        self.note(f"drop {node}")

    def tick(self, ms: int) -> None:
        self.now += ms
        self.note(f"tick {ms}")
        ready = self.master.tick(self.now)
        for n in ready.close:
            self.drop(NodeId(n))
        self._deliver_replies(ready)

    def pump(self, node: NodeId) -> bool:
        """One turn of the master's send loop for ``node``; whether it sent something."""
        link = self.links[node]
        if not link.linked:
            return False
        f = self.master.followers[node]
        if f.needs_snapshot:
            self._send_snapshot(node)
            return True
        msg = self.master.next_append(node, self.now)
        if msg is None:
            if f.needs_snapshot:
                self._send_snapshot(node)
                return True
            return False
        if msg.entries:  # only what is durable on the master is sent
            assert msg.entries[-1].index <= self.master.durable
            if self.fsync_always:
                assert self._on_disk(MASTER, msg.entries[-1]), "sent before it was on disk"
        link.to_slave.append(wire(msg))
        self.note(f"append {node} {msg.prev_index}+{len(msg.entries)}")
        return True

    def _send_snapshot(self, node: NodeId) -> None:
        meta, data = self.stores[MASTER].snapshot
        assert meta.index > 0, "the master needs a snapshot it never wrote"
        self.links[node].to_slave.append(SnapshotMsg(self.master.epoch, meta, data.copy()))
        self.master.snapshot_sent(node, meta.index)
        self.note(f"snapshot {node} at {meta.index}")

    def deliver(self, node: NodeId, to_master: bool) -> None:
        link = self.links[node]
        q = link.to_master if to_master else link.to_slave
        msg = q.popleft()
        self.note(f"deliver {node} {'->m' if to_master else '->s'} {type(msg).__name__}")
        if to_master:
            self._master_receives(node, msg)
        else:
            self._slave_receives(node, msg)

    def _master_receives(self, node: NodeId, msg: Any) -> None:
        m = self.master
        if isinstance(msg, Sync):
            plan = m.on_sync(msg, self.now)
            link = self.links[node]
            link.linked = True
            link.to_slave.append(SyncReply(m.epoch, plan))
            if plan.snapshot:
                self._send_snapshot(node)
        else:
            assert isinstance(msg, Ack)
            self._deliver_replies(m.on_ack(node, msg.epoch, msg.index, self.now))

    def _slave_receives(self, node: NodeId, msg: Any) -> None:
        """What SlaveRole does with each message, minus the socket."""
        s = self.slaves[node]
        store = self.stores[node]
        if isinstance(msg, SyncReply):
            ready = self._carry_out(node, s, s.on_sync_reply(msg.epoch, msg.plan.match,
                                                             msg.plan.snapshot))
            if ready.resync:  # a new handshake at once
                self.links[node] = Link()
                self.master.disconnected(node)
                self.connect(node)
                return
            self._send_to_master(node, ready)
        elif isinstance(msg, SnapshotMsg):
            self._carry_out(node, s, s.on_chunk(msg.epoch, done=True))
            rec = store.install_snapshot(msg.meta, msg.data)
            self._send_to_master(node, s.snapshot_installed(msg.meta.index, rec))
        else:
            assert isinstance(msg, Append)
            assert s.state is LinkState.STREAMING, "an append before the sync reply"
            self._send_to_master(node, self._carry_out(node, s, s.on_append(msg)))

    def snapshot(self, node: NodeId) -> None:
        """Node._snapshot: the core's snapshot point, the store writes it, the core
        compacts."""
        core: MasterCore | SlaveCore = self.master if node == MASTER else self.slaves[node]
        store = self.stores[node]
        if not store.snapshot_due(core.kv.applied, 1) or core.kv.applied < core.log.last_index:
            return
        job = store.begin_snapshot(*core.snapshot_point())
        store.write_snapshot(job)
        store.finish_snapshot(job)
        core.compacted(job.meta.index, job.drop_through)
        self.note(f"{node} snapshot at {job.meta.index}, log base {core.log.base}")

    def crash(self, node: NodeId) -> None:
        self.note(f"crash {node}")
        if node == MASTER:
            for n in SLAVES:
                self.drop(n)
            self.master = self._start_master()
            return
        self.drop(node)
        self.slaves[node] = SlaveCore(node, Replica.recovered(self.stores[node].crash()))

    # --- invariants ------------------------------------------------------------------------

    def lineage(self, upto: int) -> list[Entry]:
        """The master's log as entries 1..upto, compacted ones included."""
        lg = self.master.log
        return [self.created[(i, lg.epoch_at(i))] for i in range(1, upto + 1)]

    def replay(self, lg: Log) -> KV:
        kv = KV()
        for i in range(1, lg.last_index + 1):
            kv.apply(self.created[(i, lg.epoch_at(i))])
        return kv

    def check(self) -> None:
        m = self.master
        lineage = self.lineage(m.log.last_index)
        # every node's map is its log replayed, and the log is the entries created
        for lg, kv in [(m.log, m.kv), *((s.log, s.kv) for s in self.slaves.values())]:
            assert kv.applied == lg.last_index
            for e in log_entries(lg):
                assert self.created[(e.index, e.epoch)] == e
            replayed = self.replay(lg)  # values and the index that set each key
            assert (kv.data, kv.indexes) == (replayed.data, replayed.indexes)
        # a slave in sync with this master holds a prefix of its log
        for n, s in self.slaves.items():
            if not self.links[n].linked or s.state is not LinkState.STREAMING:
                continue
            assert s.log.last_index <= m.log.last_index, n
            for i in range(1, s.log.last_index + 1):
                assert s.log.epoch_at(i) == lineage[i - 1].epoch, (n, i)
            for e in log_entries(s.log):
                assert e == lineage[e.index - 1], (n, e.index)
        # what a node counts as durable is on its disk
        for n, s in self.slaves.items():
            if s.durable > s.snapshot_index:
                assert self._on_disk(n, s.log.get(s.durable)), (n, s.durable)
        # the majority index is durable on a majority, for real
        mi = m.majority_index()
        assert mi <= m.log.last_index
        if mi > 0:
            target = lineage[mi - 1]
            holders = sum(1 for n in SLAVES if self._on_disk(n, target))
            holders += 1 if (not self.fsync_always or self._on_disk(MASTER, target)) else 0
            assert holders >= MAJORITY, f"majority index {mi} is on {holders} disks"
        # acknowledged writes are never lost
        if self.fsync_always:
            for i, e in self.acked.items():
                assert i <= len(lineage) and lineage[i - 1] == e, f"acked write {i} lost"
        for i, e in self.majority_acked.items():
            assert i <= len(lineage) and lineage[i - 1] == e, f"majority write {i} lost"
        for n, f in m.followers.items():
            assert f.acked <= m.log.last_index
            # no more than a window of entries is ever in flight to a slave
            in_flight = sum(len(x.entries) for x in self.links[n].to_slave
                            if isinstance(x, Append))
            assert in_flight <= self.window, (n, in_flight)
        # whatever was cut from a slave's log went to its rollback file
        for n in SLAVES:
            for cut in self.stores[n].rollback:
                for e in cut:
                    assert self.created[(e.index, e.epoch)] == e

    def _on_disk(self, node: NodeId, e: Entry) -> bool:
        store = self.stores[node]
        if any(d == e for d in store.synced):
            return True
        meta = store.snapshot[0]
        return meta.index >= e.index and EpochHistory(meta.epochs).epoch_at(e.index) == e.epoch

    # --- schedules -------------------------------------------------------------------------

    def step(self, code: int) -> None:
        """One step chosen by ``code`` (0..999): the kind of step and, where it needs one,
        the node it concerns. Hypothesis shrinks lists of codes."""
        busy = [(n, to_m) for n, link in self.links.items()
                for to_m, q in ((True, link.to_master), (False, link.to_slave)) if q]
        r, pick = code % 1000, code // 7
        nodes = [MASTER, *SLAVES]
        if r < 200:
            self.propose()
        elif r < 500:
            if busy:
                n, to_m = busy[pick % len(busy)]
                self.deliver(n, to_m)
        elif r < 620:
            self.pump(SLAVES[pick % 3])
        elif r < 740:
            self.persist(nodes[pick % 4])
        elif r < 820:
            closed = [n for n, link in self.links.items() if not link.open]
            if closed:
                self.connect(closed[pick % len(closed)])
        elif r < 880:
            self.tick([5, 20, 60, 120][pick % 4])
        elif r < 910:
            self.drop(SLAVES[pick % 3])
        elif r < 935:
            self.crash(SLAVES[pick % 3])
        elif r < 950:
            self.crash(MASTER)
        elif r < 985:
            self.snapshot(MASTER)
        else:
            self.snapshot(SLAVES[pick % 3])

    def heal(self, max_rounds: int = 2_000) -> None:
        """No more faults: run until every slave holds the master's whole log."""
        for _ in range(max_rounds):
            for n, link in self.links.items():
                if not link.open:
                    self.connect(n)
            for n in [MASTER, *SLAVES]:
                self.persist(n)
            moved = False
            for n in SLAVES:
                link = self.links[n]
                while link.to_master or link.to_slave:
                    if link.to_master:
                        self.deliver(n, True)
                    if link.to_slave:
                        self.deliver(n, False)
                    link = self.links[n]
                    moved = True
                moved |= self.pump(n)
            self.check()
            m = self.master
            if not moved and all(
                s.log.last_index == m.log.last_index and s.state is LinkState.STREAMING
                and m.followers[n].acked == m.log.last_index
                for n, s in self.slaves.items()
            ):
                return
            if not moved:
                self.tick(HEARTBEAT_MS)
        raise AssertionError("the cluster did not converge:\n" + "\n".join(self.trace[-60:]))


def run_steps(codes: list[int], *, fsync_always: bool, seed: int = 0) -> Sim:
    sim = Sim(seed, fsync_always=fsync_always)
    for n in SLAVES:
        sim.connect(n)
    try:
        for code in codes:
            sim.step(code)
            sim.check()
        sim.heal()
    except Exception as exc:
        trace = "\n".join(sim.trace[-40:])
        raise AssertionError(f"{exc!r}\nlast steps:\n{trace}") from exc
    m = sim.master
    for n, s in sim.slaves.items():
        assert s.log.last_index == m.log.last_index, n
        assert s.kv.data == m.kv.data, n
        assert s.kv.indexes == m.kv.indexes, n
        assert s.kv.applied == m.kv.applied, n
        for i in range(1, m.log.last_index + 1):
            assert s.log.epoch_at(i) == m.log.epoch_at(i), (n, i)
        for e in log_entries(s.log):
            if m.log.has(e.index):
                assert m.log.get(e.index) == e
    return sim


def run_schedule(seed: int, steps: int, *, fsync_always: bool) -> Sim:
    rng = random.Random(seed)
    codes = [rng.randrange(1000) + 1000 * rng.randrange(64) for _ in range(steps)]
    try:
        return run_steps(codes, fsync_always=fsync_always, seed=seed)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from exc


# --- random schedules ----------------------------------------------------------------------------

SEEDS = 200  # per fsync policy
STEPS = 300
CHUNKS = 4


@pytest.mark.parametrize("fsync_always", [True, False], ids=["fsync-always", "fsync-no"])
@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_schedules(fsync_always: bool, chunk: int) -> None:
    per = SEEDS // CHUNKS
    totals = {"entries": 0, "crashes": 0, "snapshots": 0, "cuts": 0}
    for seed in range(chunk * per, (chunk + 1) * per):
        sim = run_schedule(seed, STEPS, fsync_always=fsync_always)
        totals["entries"] += sim.master.log.last_index
        totals["crashes"] += sum(1 for t in sim.trace if t.startswith("crash"))
        totals["snapshots"] += sum(1 for t in sim.trace if t.startswith("snapshot"))
        totals["cuts"] += sum(len(sim.stores[n].rollback) for n in SLAVES)
    # the schedules did something
    assert totals["entries"] > 10 * per
    assert totals["crashes"] > per
    assert totals["snapshots"] > per // 2
    if not fsync_always:  # the master loses unsynced entries that slaves hold: cuts happen
        assert totals["cuts"] > 0, totals


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codes=st.lists(st.integers(0, 63_999), max_size=250), fsync_always=st.booleans())
def test_hypothesis_schedules(codes: list[int], fsync_always: bool) -> None:
    """The same steps, chosen by Hypothesis: a failing schedule shrinks to a few steps."""
    run_steps(codes, fsync_always=fsync_always)


def test_a_cut_slave_keeps_what_it_lost_in_its_rollback_file() -> None:
    """Scripted: the master (fsync=no) loses entries 3..4 that slave s1 holds; after the
    master restarts, s1 cuts them into its rollback file, converges, and its map is rebuilt
    from what remains."""
    sim = Sim(0, fsync_always=False)
    for n in SLAVES:
        sim.connect(n)
        sim.deliver(n, True)  # sync
        sim.deliver(n, False)  # sync reply
    for _ in range(4):
        sim.propose()
    sim.stores[MASTER].sync()
    sim.stores[MASTER].synced = sim.stores[MASTER].synced[:2]  # the OS lost 3..4
    s1 = SLAVES[0]
    sim.pump(s1)
    sim.pump(s1)
    while sim.links[s1].to_slave:
        sim.deliver(s1, False)
    sim.persist(s1)
    assert sim.slaves[s1].log.last_index == 4
    sim.crash(MASTER)
    sim.check()
    sim.heal()
    assert [[e.index for e in cut] for cut in sim.stores[s1].rollback] == [[3, 4]]
    assert sim.slaves[s1].kv == sim.master.kv
    assert sim.slaves[s1].log.last_index == sim.master.log.last_index == 2


# --- scripted ------------------------------------------------------------------------------------


def empty() -> Replica:
    return Replica.recovered(Recovered(0, NO_SNAPSHOT, KV(), []))


def make_master(*, entries: int = 0, durable: bool = True, window: int = 100, batch: int = 100,
                epoch: int = 1, batch_bytes: int = 1 << 20) -> MasterCore:
    replica = empty()
    replica.epoch = epoch
    m = MasterCore(MASTER, list(SLAVES), replica, majority=MAJORITY,
                   peer_timeout_ms=PEER_TIMEOUT_MS, heartbeat_ms=HEARTBEAT_MS,
                   batch_entries=batch, window_entries=window, batch_bytes=batch_bytes)
    write(m, entries, durable=durable)
    return m


def write(m: MasterCore, n: int, *, durable: bool = True, now: int = 0,
          value: Value = "v", acks: Acks = Acks.ASYNC, client: Any = None) -> Ready:
    out = Ready()
    for i in range(n):
        ready = m.propose(client or Client(), i + 1, Op.SET, f"k{m.log.last_index + 1}",
                          value, acks, now, now)
        out.merge(ready).merge(m.advance(ready))
    if durable:
        out.merge(m.persisted(m.log.last_index))
    return out


def fresh_slave(node: NodeId = SLAVES[0], epoch: int = 0) -> SlaveCore:
    replica = empty()
    replica.epoch = epoch
    return SlaveCore(node, replica)


def sync(m: MasterCore, s: SlaveCore, now: int = 0) -> SyncPlan:
    """The handshake, both sides (the slave's answer carried out without a store)."""
    if s.state is not LinkState.IDLE:
        s.disconnected()
    plan = m.on_sync(wire(s.connect(1)), now)
    ready = s.on_sync_reply(m.epoch, plan.match, plan.snapshot)
    s.advance(ready, KV() if ready.truncate else None)
    return plan


def accept(s: SlaveCore, msg: Append) -> Ready:
    """An append carried out without a store: validate, then advance."""
    ready = s.on_append(msg)
    return ready.merge(s.advance(ready))


def drain(m: MasterCore, node: NodeId, now: int) -> list[Append]:
    out = []
    while (msg := m.next_append(node, now)) is not None:
        out.append(msg)
        if not msg.entries:
            break
    return out


def test_streams_in_batches_within_the_window() -> None:
    m = make_master(entries=20, window=5, batch=2)
    s = fresh_slave()
    assert sync(m, s) == SyncPlan(0, False)
    sent = [msg for msg in drain(m, SLAVES[0], 0) if msg.entries]
    assert [len(a.entries) for a in sent] == [2, 2, 1]
    assert m.next_append(SLAVES[0], 0) is None  # window full, heartbeat not due
    for a in sent:
        accept(s, a)
    assert s.log.last_index == 5
    s.persisted(5)
    m.on_ack(SLAVES[0], s.epoch, s.ack().index, 1)
    more = drain(m, SLAVES[0], 1)
    assert sum(len(a.entries) for a in more) == 5
    assert more[0].prev_index == 5 and more[0].entries[0].index == 6


def test_a_slave_that_never_acks_gets_at_most_a_window() -> None:
    m = make_master(entries=50, window=7, batch=3)
    sync(m, fresh_slave())
    total = 0
    for now in range(0, 10 * HEARTBEAT_MS, 10):
        for a in drain(m, SLAVES[0], now):
            total += len(a.entries)
        write(m, 1, now=now)
    assert total == 7


def test_batches_stay_under_the_byte_budget() -> None:
    m = make_master(batch_bytes=300)  # an entry here counts 32 + 4 * 2 + 100 bytes
    write(m, 6, value=b"x" * 100)
    sync(m, fresh_slave())
    sizes = [len(a.entries) for a in drain(m, SLAVES[0], 0)]
    assert sizes == [2, 2, 2]
    m2 = make_master(batch_bytes=10)
    write(m2, 2, value=b"x" * 100)
    sync(m2, fresh_slave())
    assert [len(a.entries) for a in drain(m2, SLAVES[0], 0)] == [1, 1]  # at least one each


def test_only_durable_entries_are_sent() -> None:
    m = make_master(entries=3)
    write(m, 4, durable=False)
    sync(m, fresh_slave())
    sent = drain(m, SLAVES[0], 0)
    assert [e.index for a in sent for e in a.entries] == [1, 2, 3]
    assert all(a.commit == 3 for a in sent)
    m.persisted(5)
    assert [e.index for e in m.next_append(SLAVES[0], 0).entries] == [4, 5]  # type: ignore


def test_replies_wait_for_their_acknowledgement_level() -> None:
    m = make_master()
    c = Client()
    sync(m, fresh_slave(SLAVES[0]))
    sync(m, fresh_slave(SLAVES[1]))
    assert write(m, 1, durable=False, client=c).replies == []  # not yet fsynced
    out = m.persisted(1)
    assert [r for _, r in out.replies] == [Reply(1, {"index": 1, "epoch": 1, "copies": 1})]
    assert write(m, 1, acks=Acks.MAJORITY, client=c).replies == []  # durable here only
    m.on_ack(SLAVES[0], 1, 2, 0)
    assert m.on_ack(SLAVES[0], 1, 2, 0).replies == []  # 2 of 4
    (released,) = m.on_ack(SLAVES[1], 1, 2, 0).replies
    assert released == (c, Reply(1, {"index": 2, "epoch": 1, "copies": 3}))


def test_majority_writes_fail_when_the_quorum_is_lost_and_when_the_role_ends() -> None:
    m = make_master()
    c = Client()
    (refused,) = write(m, 1, acks=Acks.MAJORITY, client=c).replies
    assert isinstance(refused[1], ErrorReply) and refused[1].code == "no_quorum"
    sync(m, fresh_slave(SLAVES[0]), now=0)
    sync(m, fresh_slave(SLAVES[1]), now=0)
    assert write(m, 1, acks=Acks.MAJORITY, client=c).replies == []
    (failed,) = m.tick(PEER_TIMEOUT_MS + 1).replies
    assert isinstance(failed[1], ErrorReply) and failed[1].code == "no_quorum"
    write(m, 1, durable=False, client=c)
    (closed,) = m.close(ErrorReply(0, "shutting_down", "bye")).replies
    assert closed[1] == ErrorReply(1, "shutting_down", "bye", applied="unknown", index=2,
                                   epoch=1)


def test_a_failed_write_releases_its_waiter_with_the_error() -> None:
    m = make_master()
    c = Client()
    ready = m.propose(c, 7, Op.SET, "k", "v", Acks.ASYNC, 0, 0)
    out = m.failed(ready, StorageFailure("disk full"))
    assert [r for _, r in out.replies] == [ErrorReply(7, "storage", "disk full", applied="no")]
    assert m.log.last_index == 0 and m.persisted(1).replies == []


def test_heartbeat_after_an_idle_interval() -> None:
    m = make_master(entries=2)
    sync(m, fresh_slave(), now=100)
    first = m.next_append(SLAVES[0], 100)
    assert first is not None and len(first.entries) == 2
    assert m.next_append(SLAVES[0], 100 + HEARTBEAT_MS - 1) is None
    hb = m.next_append(SLAVES[0], 100 + HEARTBEAT_MS)
    assert hb == Append(1, 2, 1, (), 2)
    assert m.next_append(SLAVES[0], 100 + HEARTBEAT_MS) is None
    assert m.next_append(SLAVES[0], 100 + 2 * HEARTBEAT_MS) is not None


def test_nothing_is_sent_to_a_slave_that_has_not_synced_or_is_down() -> None:
    m = make_master(entries=2)
    assert m.next_append(SLAVES[0], 10_000) is None
    sync(m, fresh_slave())
    m.disconnected(SLAVES[0])
    assert m.next_append(SLAVES[0], 10_000) is None


def test_needs_snapshot_when_the_next_entry_was_compacted() -> None:
    m = make_master(entries=10)
    sync(m, fresh_slave())
    m.compacted(8, 6)
    assert m.next_append(SLAVES[0], 0) is None
    f = m.followers[SLAVES[0]]
    assert f.needs_snapshot
    assert m.next_append(SLAVES[0], 10_000) is None  # not even heartbeats meanwhile
    m.snapshot_sent(SLAVES[0], 8)
    assert not f.needs_snapshot and f.next_index == 9
    # a freshly installed slave acks the snapshot and then gets the rest
    s = fresh_slave()
    s.disconnected()
    s.connect(1)
    s.on_sync_reply(1, 0, snapshot=True)
    s.on_chunk(1, done=True)
    meta, data = m.snapshot_point()
    out = s.snapshot_installed(8, Recovered(1, SnapshotMeta(8, 1, ((1, 1),)), KV(
        {k: v for k, v, i in data.items() if i <= 8}, 8,
        {k: i for k, _, i in data.items() if i <= 8}), []))
    assert out.messages == [Ack(1, 8)]
    m.on_ack(SLAVES[0], s.epoch, s.ack().index, 1)
    a = m.next_append(SLAVES[0], 1)
    assert a is not None and a.prev_index == 8 and a.prev_epoch == 1
    accept(s, a)
    assert s.log.last_index == 10 and meta.index == 10


def test_sync_from_behind_the_compaction_point_plans_a_snapshot() -> None:
    m = make_master(entries=10)
    m.compacted(10, 6)
    s = fresh_slave()
    plan = sync(m, s)
    assert plan == SyncPlan(0, True)
    f = m.followers[SLAVES[0]]
    assert f.needs_snapshot and f.acked == 0
    assert s.state is LinkState.SNAPSHOT
    # a slave at the compaction point itself needs no snapshot
    s2 = fresh_slave(SLAVES[1])
    s2.connect(1)
    s2.on_sync_reply(1, 0, snapshot=False)
    accept(s2, Append(1, 0, 0, tuple(Entry(i, 1, 0, Op.SET, f"k{i}", "v")
                                     for i in range(1, 7)), 6))
    assert sync(m, s2) == SyncPlan(6, False)


def test_sync_of_a_slave_that_is_level_or_ahead_cuts_its_extra_entries() -> None:
    m = make_master(entries=4)
    s = fresh_slave()
    sync(m, s)
    for a in drain(m, SLAVES[0], 0):
        accept(s, a)
    s.persisted(4)
    assert sync(m, s) == SyncPlan(4, False)
    # the master lost entries 3..4 (fsync=no and a crash) and restarted in epoch 2
    replica = Replica.recovered(Recovered(1, NO_SNAPSHOT, KV(),
                                          [m.log.get(1), m.log.get(2)]))
    replica.epoch = 2
    m2 = MasterCore(MASTER, list(SLAVES), replica, majority=MAJORITY,
                    peer_timeout_ms=PEER_TIMEOUT_MS, heartbeat_ms=HEARTBEAT_MS,
                    batch_entries=10, window_entries=10)
    s.disconnected()
    plan = m2.on_sync(wire(s.connect(1)), 0)
    assert plan == SyncPlan(2, False)
    ready = s.on_sync_reply(2, plan.match, plan.snapshot)
    assert ready.epoch == 2 and ready.truncate is not None
    assert [e.index for e in ready.truncate.removed] == [3, 4]
    assert not ready.messages  # no ack before the cut is on disk
    follow = s.advance(ready, KV())
    assert follow.messages == [Ack(2, 2)]
    assert (s.log.last_index, s.kv.applied, s.durable) == (2, 2, 2)
    assert s.kv.data == {"k1": "v", "k2": "v"}
    write(m2, 3)
    assert sync(m2, s) == SyncPlan(2, False)


def test_a_cut_below_the_local_snapshot_wipes_and_resyncs() -> None:
    s = fresh_slave()
    s.connect(1)
    s.on_sync_reply(1, 0, snapshot=False)
    accept(s, Append(1, 0, 0, tuple(Entry(i, 1, 0, Op.SET, "k", str(i))
                                    for i in range(1, 6)), 5))
    s.persisted(5)
    s.compacted(4, 0)
    s.disconnected()
    s.connect(2)
    ready = s.on_sync_reply(2, 3, snapshot=False)
    assert ready.wipe and ready.resync and ready.epoch == 2
    assert ready.truncate is not None and [e.index for e in ready.truncate.removed] == [
        1, 2, 3, 4, 5]
    assert s.log.last_index == 5  # nothing changes before the shell made the wipe durable
    s.advance(ready)
    assert (s.log.last_index, len(s.kv.data), s.snapshot_index, s.durable) == (0, 0, 0, 0)
    assert s.state is LinkState.IDLE


def test_link_state_machine_refuses_what_is_out_of_turn() -> None:
    s = fresh_slave(epoch=1)
    with pytest.raises(RemoteProtocolError):  # an append before any handshake
        s.on_append(Append(1, 0, 0, (), 0))
    with pytest.raises(LocalProtocolError):  # installing a snapshot nobody sent
        s.snapshot_installed(0, Recovered(1, NO_SNAPSHOT, KV(), []))
    s.connect(1)
    with pytest.raises(LocalProtocolError):  # a second handshake on the same link
        s.connect(2)
    s.on_sync_reply(1, 0, snapshot=True)
    with pytest.raises(RemoteProtocolError):  # entries while a snapshot is owed
        s.on_append(Append(1, 0, 0, (), 0))
    s.disconnected()
    assert s.state is LinkState.IDLE


def test_sync_from_an_unknown_node_or_a_newer_epoch_is_refused() -> None:
    m = make_master(entries=1, epoch=3)
    with pytest.raises(KeyError):
        m.on_sync(Sync(1, "stranger", 3, 0, ()), 0)
    with pytest.raises(StaleEpoch):
        m.on_sync(Sync(1, SLAVES[0], 4, 0, ()), 0)
    with pytest.raises(StaleEpoch):
        m.on_ack(SLAVES[0], 4, 1, 0)


def test_sync_does_not_count_unpersisted_slave_entries_as_acknowledged() -> None:
    """Bug: on_sync sets ``acked = match`` although the slave's Sync reports its last
    *written* index, not its durable one. A slave that reconnects before its fsync counts
    towards the majority for entries it may still lose."""
    m = make_master(entries=3)
    s = fresh_slave()
    sync(m, s)
    for a in drain(m, SLAVES[0], 0):
        accept(s, a)
    assert s.log.last_index == 3 and s.durable == 0  # written, not yet synced to disk
    m.disconnected(SLAVES[0])  # the link drops; the slave reconnects at once
    assert sync(m, s, now=1) == SyncPlan(3, False)
    assert m.followers[SLAVES[0]].acked <= s.durable
    m.on_ack(SLAVES[1], 1, 3, 1)  # one more slave has them on disk: 3 of 4 only with s1
    assert m.majority_index() == 0


def test_majority_index_and_quorum() -> None:
    m = make_master(entries=10)
    assert m.majority_index() == 0
    m.on_ack(SLAVES[0], 1, 10, 0)
    assert m.majority_index() == 0
    m.on_ack(SLAVES[1], 1, 5, 0)
    assert m.majority_index() == 5
    m.on_ack(SLAVES[2], 1, 7, 0)
    assert m.majority_index() == 7
    m.on_ack(SLAVES[2], 1, 99, 0)  # capped at the log
    assert m.followers[SLAVES[2]].acked == 10
    m.on_ack(SLAVES[2], 1, 3, 0)  # never backwards
    assert m.followers[SLAVES[2]].acked == 10


def test_has_quorum_and_expiry() -> None:
    m = make_master()
    assert not m.has_quorum(0)
    sync(m, fresh_slave(SLAVES[0]), now=100)
    assert not m.has_quorum(100)  # 2 of 4
    sync(m, fresh_slave(SLAVES[1]), now=150)
    assert m.has_quorum(150)
    assert m.has_quorum(100 + PEER_TIMEOUT_MS)
    assert not m.has_quorum(101 + PEER_TIMEOUT_MS)
    assert m.tick(100 + PEER_TIMEOUT_MS).close == []
    assert m.tick(101 + PEER_TIMEOUT_MS).close == [SLAVES[0]]
    assert not m.followers[SLAVES[0]].up
    later = 200 + PEER_TIMEOUT_MS
    m.on_ack(SLAVES[0], 1, 0, later)  # an ack brings it back
    assert m.followers[SLAVES[0]].up
    assert not m.has_quorum(later)  # s2 has been silent too long by now
    assert m.tick(later).close == [SLAVES[1]]
    sync(m, fresh_slave(SLAVES[2]), now=later)
    assert m.has_quorum(later)


def test_lag_ms() -> None:
    m = make_master()
    write(m, 2, now=1_000)
    write(m, 2, now=2_000)
    f = m.followers[SLAVES[0]]
    assert m.lag_ms(f, 0, 2_500) == 1_500  # missing entry 1, written at 1000
    m.on_ack(SLAVES[0], 1, 2, 2_500)
    assert m.lag_ms(f, 0, 2_500) == 500
    m.on_ack(SLAVES[0], 1, 4, 2_500)
    assert m.lag_ms(f, 0, 9_999) == 0
    f.acked = 0
    m.compacted(4, 3)
    assert m.lag_ms(f, 0, 2_500) == 500  # the oldest entry still in memory
    assert m.lag_ms(f, 0, 0) == 0  # never negative
    (row,) = [r for r in m.status(2_500, 2_500)["slaves"] if r["id"] == SLAVES[0]]
    assert row["lag_entries"] == 4 and row["lag_ms"] == 500


def test_slave_rejects_messages_from_an_older_epoch_and_persists_a_newer_one() -> None:
    s = fresh_slave(epoch=5)
    s.connect(1)
    with pytest.raises(StaleEpoch):
        s.on_sync_reply(4, 0, snapshot=False)
    assert s.epoch == 5
    ready = s.on_sync_reply(6, 0, snapshot=False)
    assert ready.epoch == 6 and s.epoch == 6  # persisted before the ack goes out
    assert ready.messages == [Ack(6, 0)]
    with pytest.raises(StaleEpoch):
        s.on_append(Append(5, 0, 0, (), 0))
    assert s.on_append(Append(6, 0, 0, (), 0)).epoch is None


def test_slave_rejects_appends_that_do_not_continue_its_log() -> None:
    s = fresh_slave(epoch=1)
    s.connect(1)
    s.on_sync_reply(1, 0, snapshot=False)
    e1 = Entry(1, 1, 0, Op.SET, "a", "1")
    accept(s, Append(1, 0, 0, (e1,), 1))
    e2 = Entry(2, 1, 0, Op.SET, "b", "2")
    with pytest.raises(RemoteProtocolError):  # a gap
        s.on_append(Append(1, 2, 1, (Entry(3, 1, 0, Op.SET, "c", "3"),), 3))
    with pytest.raises(RemoteProtocolError):  # the previous entry's epoch differs
        s.on_append(Append(1, 1, 0, (e2,), 2))
    with pytest.raises(RemoteProtocolError):  # an entry from a later epoch than the master's
        s.on_append(Append(1, 1, 1, (Entry(2, 2, 0, Op.SET, "b", "2"),), 2))
    with pytest.raises(RemoteProtocolError):  # entries out of order inside the frame
        s.on_append(Append(1, 1, 1, (e2, e2), 2))
    assert s.log.last_index == 1 and s.kv.data == {"a": "1"}
    assert s.on_append(Append(1, 1, 1, (e2,), 7)).entries == [e2]
    assert s.log.last_index == 1  # nothing is applied before the shell persisted it
    assert s.master_commit == 7
    s.on_append(Append(1, 1, 1, (), 3))
    assert s.master_commit == 7  # never backwards


def test_slave_acks_only_what_is_durable_and_applied() -> None:
    s = fresh_slave(epoch=2)
    s.connect(1)
    s.on_sync_reply(2, 0, snapshot=False)
    es = [Entry(i, 2, 0, Op.SET, "k", str(i)) for i in (1, 2, 3)]
    accept(s, Append(2, 0, 0, tuple(es), 3))
    assert s.ack() == Ack(2, 0)
    assert s.persisted(2).messages == [Ack(2, 2)]
    assert s.persisted(1).messages == [Ack(2, 2)]
    assert s.persisted(3).messages == [Ack(2, 3)]
    s.disconnected()
    assert s.persisted(3).messages == []  # no link, nothing to send
    assert s.connect(9) == Sync(9, SLAVES[0], 2, 3, ((2, 1),))


def test_memory_store_crash_loses_exactly_what_was_not_synced() -> None:
    store = MemoryStore()
    es = [Entry(i, 1, 0, Op.SET, "k", str(i)) for i in (1, 2, 3)]
    store.append(es[:2])
    store.sync()
    store.append(es[2:])
    rec = store.crash()
    assert rec.entries == es[:2]


def test_a_cut_that_fails_in_storage_changes_nothing() -> None:
    """The core changes its log only once the shell has made the cut durable: a cut that
    fails (a full disk while writing the rollback file) leaves the slave as it was, and
    the next handshake cuts again instead of acknowledging entries it no longer holds."""

    class FailingCut(MemoryStore):
        fail = True

        def truncate_after(self, index: int, removed: tuple[Entry, ...]) -> KV:
            if self.fail:
                self.fail = False
                raise OSError(28, "No space left on device")
            return super().truncate_after(index, removed)

    old = [Entry(i, 1, 0, Op.SET, f"k{i}", "old") for i in range(1, 6)]
    store = FailingCut()
    store.append(old)
    store.sync()
    s = SlaveCore(SLAVES[0], Replica.recovered(store.crash()))

    def carry(ready: Ready) -> Ready:
        return carry_out(store, s, ready, wrote=lambda ix: None, reset=lambda ix: None)

    s.connect(1)
    with pytest.raises(OSError):
        carry(s.on_sync_reply(2, 3, snapshot=False))
    s.disconnected()
    assert (s.log.last_index, s.kv.applied, s.durable) == (5, 5, 5)
    s.connect(2)
    ready = carry(s.on_sync_reply(2, 3, snapshot=False))  # the cut, again, and it works
    assert ready.messages == [Ack(2, 3)]
    assert [[e.index for e in cut] for cut in store.rollback] == [[4, 5]]
    new = Entry(4, 2, 0, Op.SET, "k4", "new")
    carry(s.on_append(Append(2, 3, 1, (new,), 4)))
    assert s.kv.get("k4") == ("new", 4) and s.log.last_index == 4
