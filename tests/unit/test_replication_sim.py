"""A deterministic in-memory cluster: one MasterCore and three SlaveCores.

In the spirit of etcd-raft's interaction tests: no sockets, no clock, no threads. Each node
has a Log and a KV in memory and a "disk" (what it has persisted); each slave has one link to
the master with an explicit, ordered list of messages in flight each way. A schedule is a
sequence of explicit steps (propose, persist, deliver, pump, drop, tick, crash, snapshot),
chosen by a seeded ``random.Random``; invariants are checked after every step.

The master's fsync policy is modelled both ways: ``always`` (the master reports an entry
durable only once it is on its disk) and ``no`` (it reports entries durable as soon as they are
written, so a crash of the machine can lose entries that slaves already hold; those slaves
must then be cut back by the sync handshake).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from cluster.config import Limits
from cluster.core.history import EpochHistory
from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.core.master import MasterCore, SyncPlan
from cluster.core.slave import SlaveCore
from cluster.errors import ProtocolError, StaleEpoch
from cluster.types import Entry, NodeId, Op, Value
from cluster.wire import codec
from cluster.wire.messages import Ack, Append, Sync

MASTER = NodeId("m")
SLAVES = [NodeId("s1"), NodeId("s2"), NodeId("s3")]
MAJORITY = 3  # of four nodes
LIMITS = Limits()
KEYS = ["a", "b", "c", "d", "e", "f"]
HEARTBEAT_MS = 50
PEER_TIMEOUT_MS = 300

# --- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snap:
    index: int
    epoch: int
    epochs: tuple[tuple[int, int], ...]
    data: dict[str, Value]


@dataclass
class Disk:
    """What survives a crash: a snapshot, the entries after the log's base, the epoch."""

    snap: Snap | None = None
    entries: list[Entry] = field(default_factory=list)
    epoch: int = 0


@dataclass(frozen=True)
class SyncReply:
    epoch: int
    plan: SyncPlan


@dataclass(frozen=True)
class SnapshotMsg:
    epoch: int
    snap: Snap


@dataclass
class Link:
    to_slave: deque[Any] = field(default_factory=deque)
    to_master: deque[Any] = field(default_factory=deque)
    open: bool = False  # the slave has a connection (it sent a Sync on it)
    linked: bool = False  # the master has answered that Sync
    synced: bool = False  # the slave has acted on the answer


def wire(msg: Append | Sync | Ack) -> Any:
    """Every protocol message crosses the codec, as it would on a socket."""
    return codec.decode(codec.encode(msg), LIMITS)


def recover(disk: Disk) -> tuple[Log, KV]:
    """Rebuild a node's memory from its disk, as Store.open does."""
    snap = disk.snap
    snap_index, snap_epoch = (snap.index, snap.epoch) if snap else (0, 0)
    history = EpochHistory(snap.epochs if snap else ())
    base = disk.entries[0].index - 1 if disk.entries else snap_index
    base_epoch = snap_epoch
    if base < snap_index:
        history.truncate_after(base)
        base_epoch = history.epoch_at(base)
    lg = Log(base, base_epoch, history)
    kv = KV(dict(snap.data) if snap else {}, snap_index)
    for e in disk.entries:
        lg.append(e)
        if e.index > snap_index:
            kv.apply(e)
    return lg, kv


def log_entries(lg: Log) -> list[Entry]:
    return lg.slice(lg.base + 1, lg.last_index) if lg.last_index > lg.base else []


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
        self.disks: dict[NodeId, Disk] = {n: Disk() for n in [MASTER, *SLAVES]}
        self.links: dict[NodeId, Link] = {n: Link() for n in SLAVES}
        self.master = self._new_master(epoch=1)
        self.disks[MASTER].epoch = 1
        self.slaves: dict[NodeId, SlaveCore] = {}
        for n in SLAVES:
            lg, kv = recover(self.disks[n])
            self.slaves[n] = SlaveCore(n, 0, lg, kv)
        self.snap_index: dict[NodeId, int] = {n: 0 for n in SLAVES}  # installed snapshots
        # every entry ever created, by (index, epoch): one master writes each epoch
        self.created: dict[tuple[int, int], Entry] = {}
        self.acked: dict[int, Entry] = {}  # writes replied to (acks=async)
        self.majority_acked: dict[int, Entry] = {}  # writes replied to (acks=majority)

    def _new_master(self, epoch: int) -> MasterCore:
        lg, kv = recover(self.disks[MASTER])
        return MasterCore(MASTER, list(SLAVES), epoch, lg, kv, majority=MAJORITY,
                          peer_timeout_ms=PEER_TIMEOUT_MS, heartbeat_ms=HEARTBEAT_MS,
                          batch_entries=self.batch, window_entries=self.window)

    def note(self, text: str) -> None:
        self.trace.append(text)

    # --- steps -----------------------------------------------------------------------------

    def propose(self) -> None:
        m = self.master
        self.writes += 1
        key = self.rng.choice(KEYS)
        if self.rng.random() < 0.2:
            e = m.next_entry(Op.DELETE, key, None, self.now)
        else:
            value: Value = (f"v{self.writes}" if self.rng.random() < 0.5
                            else f"v{self.writes}".encode())
            e = m.next_entry(Op.SET, key, value, self.now)
        assert (e.index, e.epoch) not in self.created
        self.created[(e.index, e.epoch)] = e
        m.accept(e)
        if not self.fsync_always:
            m.persisted(e.index)  # fsync=no: durable as far as the master knows
            self._reply(e.index)
        self.note(f"propose {e.index}/{e.epoch}")

    def _reply(self, upto: int) -> None:
        lg = self.master.log
        for i in range(max(lg.base + 1, 1), upto + 1):
            self.acked.setdefault(i, lg.get(i))

    def persist(self, node: NodeId) -> None:
        self.note(f"persist {node}")
        if node == MASTER:
            m = self.master
            self.disks[MASTER].entries = log_entries(m.log)
            m.persisted(m.log.last_index)
            if self.fsync_always:
                self._reply(m.log.last_index)
            return
        s = self.slaves[node]
        self.disks[node].entries = log_entries(s.log)
        if s.log.last_index > s.durable:  # the runtime acks when durability advances
            s.persisted(s.log.last_index)
            self._send_ack(node)

    def _send_ack(self, node: NodeId) -> None:
        link = self.links[node]
        if link.open and link.synced:
            link.to_master.append(wire(self.slaves[node].ack()))

    def connect(self, node: NodeId) -> None:
        link = self.links[node]
        assert not link.open
        link.open = True
        self.rid += 1
        link.to_master.append(wire(self.slaves[node].sync_request(self.rid)))
        self.note(f"connect {node}")

    def drop(self, node: NodeId) -> None:
        """The connection breaks: everything in flight on it is lost."""
        self.links[node] = Link()
        self.master.disconnected(node)
        self.note(f"drop {node}")

    def tick(self, ms: int) -> None:
        self.now += ms
        self.note(f"tick {ms}")
        for n in self.master.expired(self.now):
            self.drop(n)

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
        snap = self.disks[MASTER].snap
        assert snap is not None, "the master needs a snapshot it never wrote"
        self.links[node].to_slave.append(SnapshotMsg(self.master.epoch, snap))
        self.master.snapshot_sent(node, snap.index)
        self.note(f"snapshot {node} at {snap.index}")

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
            m.on_ack(node, msg.epoch, msg.index, self.now)
            self._release_majority()

    def _release_majority(self) -> None:
        lg = self.master.log
        for i in range(max(lg.base + 1, 1), self.master.majority_index() + 1):
            self.majority_acked.setdefault(i, lg.get(i))

    def _slave_receives(self, node: NodeId, msg: Any) -> None:
        s = self.slaves[node]
        link = self.links[node]
        disk = self.disks[node]
        if isinstance(msg, SyncReply):
            s.check_epoch(msg.epoch)
            disk.epoch = s.epoch
            match = msg.plan.match
            if match < s.log.last_index:
                if match < self.snap_index[node]:
                    self._wipe(node)
                    self.links[node] = Link()
                    self.master.disconnected(node)
                    self.connect(node)  # Resync: a new handshake at once
                    return
                s.log.truncate_after(match)
                self._rebuild_kv(node)
                disk.entries = log_entries(s.log)  # the cut is durable, and so is the rest
                s.durable = s.log.last_index
            link.synced = True
            if not msg.plan.snapshot:
                self._send_ack(node)
        elif isinstance(msg, SnapshotMsg):
            s.check_epoch(msg.epoch)
            snap = msg.snap
            s.log.reset(snap.index, snap.epoch, EpochHistory(snap.epochs))
            s.kv.data = dict(snap.data)
            s.kv.applied = snap.index
            self.disks[node] = Disk(snap, [], s.epoch)
            self.snap_index[node] = snap.index
            s.durable = snap.index
            self._send_ack(node)
        else:
            assert isinstance(msg, Append)
            assert link.synced, "an append before the sync reply"
            entries = s.on_append(msg)
            disk.epoch = s.epoch
            if not entries:
                self._send_ack(node)
            else:
                s.accept(entries)

    def _wipe(self, node: NodeId) -> None:
        s = self.slaves[node]
        s.log.reset(0, 0, EpochHistory())
        s.kv.data, s.kv.applied = {}, 0
        self.disks[node] = Disk(None, [], s.epoch)
        self.snap_index[node] = 0
        s.durable = 0

    def _rebuild_kv(self, node: NodeId) -> None:
        s = self.slaves[node]
        snap = self.disks[node].snap
        kv = KV(dict(snap.data) if snap else {}, snap.index if snap else 0)
        for i in range(kv.applied + 1, s.log.last_index + 1):
            kv.apply(s.log.get(i))
        s.kv.data, s.kv.applied = kv.data, kv.applied

    def snapshot_master(self) -> None:
        """begin_snapshot + write + finish_snapshot: the WAL roll makes everything durable;
        the log then keeps the entries after the previous snapshot."""
        m = self.master
        disk = self.disks[MASTER]
        prev = disk.snap.index if disk.snap else 0
        index = m.log.last_index
        if index <= prev:
            return
        history = EpochHistory(m.log.history.pairs())
        history.truncate_after(index)
        disk.entries = log_entries(m.log)
        disk.snap = Snap(index, m.log.epoch_at(index), history.pairs(), dict(m.kv.data))
        m.log.compact_to(prev)
        disk.entries = [e for e in disk.entries if e.index > prev]
        self.note(f"master snapshot at {index}, log base {m.log.base}")

    def crash(self, node: NodeId) -> None:
        self.note(f"crash {node}")
        if node == MASTER:
            for n in SLAVES:
                self.links[n] = Link()
            disk = self.disks[MASTER]
            disk.epoch += 1
            self.master = self._new_master(disk.epoch)
            return
        self.links[node] = Link()
        self.master.disconnected(node)
        lg, kv = recover(self.disks[node])
        self.slaves[node] = SlaveCore(node, self.disks[node].epoch, lg, kv)

    # --- invariants ------------------------------------------------------------------------

    def lineage(self, upto: int) -> list[Entry]:
        """The master's log as entries 1..upto, compacted ones included."""
        lg = self.master.log
        return [self.created[(i, lg.epoch_at(i))] for i in range(1, upto + 1)]

    def replay(self, lg: Log) -> dict[str, Value]:
        kv = KV()
        for i in range(1, lg.last_index + 1):
            kv.apply(self.created[(i, lg.epoch_at(i))])
        return kv.data

    def check(self) -> None:
        m = self.master
        lineage = self.lineage(m.log.last_index)
        # every node's map is its log replayed, and the log is the entries created
        for lg, kv in [(m.log, m.kv), *((s.log, s.kv) for s in self.slaves.values())]:
            assert kv.applied == lg.last_index
            for e in log_entries(lg):
                assert self.created[(e.index, e.epoch)] == e
            assert kv.data == self.replay(lg)
        # a slave that has synced with this master holds a prefix of its log
        for n, s in self.slaves.items():
            if not self.links[n].synced:
                continue
            assert s.log.last_index <= m.log.last_index, n
            for i in range(1, s.log.last_index + 1):
                assert s.log.epoch_at(i) == lineage[i - 1].epoch, (n, i)
            for e in log_entries(s.log):
                assert e == lineage[e.index - 1], (n, e.index)
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
        if self.fsync_always:
            for i, e in self.majority_acked.items():
                assert i <= len(lineage) and lineage[i - 1] == e, f"majority write {i} lost"
        for n, f in m.followers.items():
            assert f.acked <= m.log.last_index
            # no more than a window of entries is ever in flight to a slave
            in_flight = sum(len(x.entries) for x in self.links[n].to_slave
                            if isinstance(x, Append))
            assert in_flight <= self.window, (n, in_flight)

    def _on_disk(self, node: NodeId, e: Entry) -> bool:
        disk = self.disks[node]
        if disk.entries and disk.entries[0].index <= e.index <= disk.entries[-1].index:
            return disk.entries[e.index - disk.entries[0].index] == e
        snap = disk.snap
        if snap is not None and snap.index >= e.index:
            return EpochHistory(snap.epochs).epoch_at(e.index) == e.epoch
        return False

    # --- schedules -------------------------------------------------------------------------

    def random_step(self) -> None:
        rng = self.rng
        busy = [(n, to_m) for n, link in self.links.items()
                for to_m, q in ((True, link.to_master), (False, link.to_slave)) if q]
        r = rng.random()
        if r < 0.20:
            self.propose()
        elif r < 0.50 and busy:
            n, to_m = rng.choice(busy)
            self.deliver(n, to_m)
        elif r < 0.62:
            self.pump(rng.choice(SLAVES))
        elif r < 0.74:
            self.persist(rng.choice([MASTER, *SLAVES]))
        elif r < 0.82:
            closed = [n for n, link in self.links.items() if not link.open]
            if closed:
                self.connect(rng.choice(closed))
        elif r < 0.88:
            self.tick(rng.choice([5, 20, 60, 120]))
        elif r < 0.91:
            self.drop(rng.choice(SLAVES))
        elif r < 0.935:
            self.crash(rng.choice(SLAVES))
        elif r < 0.95:
            self.crash(MASTER)
        else:
            self.snapshot_master()

    def heal(self, max_rounds: int = 2_000) -> None:
        """No more faults: run until every slave holds the master's whole log."""
        for _ in range(max_rounds):
            for n, link in self.links.items():
                if not link.open:
                    self.connect(n)
            for n in [MASTER, *SLAVES]:
                self.persist(n)
            moved = False
            for n, link in self.links.items():
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
                s.log.last_index == m.log.last_index and link.synced
                and m.followers[n].acked == m.log.last_index
                for (n, s), link in zip(self.slaves.items(), self.links.values(), strict=True)
            ):
                return
            if not moved:
                self.tick(HEARTBEAT_MS)
        raise AssertionError("the cluster did not converge:\n" + "\n".join(self.trace[-60:]))


def run_schedule(seed: int, steps: int, *, fsync_always: bool) -> Sim:
    sim = Sim(seed, fsync_always=fsync_always)
    for n in SLAVES:
        sim.connect(n)
    try:
        for _ in range(steps):
            sim.random_step()
            sim.check()
        sim.heal()
    except Exception as exc:
        trace = "\n".join(sim.trace[-40:])
        raise AssertionError(f"seed {seed}: {exc!r}\nlast steps:\n{trace}") from exc
    m = sim.master
    for n, s in sim.slaves.items():
        assert s.log.last_index == m.log.last_index, n
        assert s.kv.data == m.kv.data, n
        assert s.kv.applied == m.kv.applied, n
        for i in range(1, m.log.last_index + 1):
            assert s.log.epoch_at(i) == m.log.epoch_at(i), (n, i)
        for e in log_entries(s.log):
            if m.log.has(e.index):
                assert m.log.get(e.index) == e
    return sim


# --- random schedules ----------------------------------------------------------------------------

SEEDS = 200  # per fsync policy
STEPS = 300
CHUNKS = 4


@pytest.mark.parametrize("fsync_always", [True, False], ids=["fsync-always", "fsync-no"])
@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_schedules(fsync_always: bool, chunk: int) -> None:
    per = SEEDS // CHUNKS
    totals = {"entries": 0, "crashes": 0, "snapshots": 0}
    for seed in range(chunk * per, (chunk + 1) * per):
        sim = run_schedule(seed, STEPS, fsync_always=fsync_always)
        totals["entries"] += sim.master.log.last_index
        totals["crashes"] += sum(1 for t in sim.trace if t.startswith("crash"))
        totals["snapshots"] += sum(1 for t in sim.trace if t.startswith("snapshot"))
    # the schedules did something
    assert totals["entries"] > 10 * per
    assert totals["crashes"] > per
    assert totals["snapshots"] > per // 2


# --- scripted ------------------------------------------------------------------------------------


def make_master(*, entries: int = 0, durable: bool = True, window: int = 100, batch: int = 100,
                epoch: int = 1, batch_bytes: int = 1 << 20) -> MasterCore:
    m = MasterCore(MASTER, list(SLAVES), epoch, Log(), KV(), majority=MAJORITY,
                   peer_timeout_ms=PEER_TIMEOUT_MS, heartbeat_ms=HEARTBEAT_MS,
                   batch_entries=batch, window_entries=window, batch_bytes=batch_bytes)
    write(m, entries, durable=durable)
    return m


def write(m: MasterCore, n: int, *, durable: bool = True, now: int = 0,
          value: Value = "v") -> None:
    for _ in range(n):
        m.accept(m.next_entry(Op.SET, f"k{m.log.last_index + 1}", value, now))
    if durable:
        m.persisted(m.log.last_index)


def fresh_slave(node: NodeId = SLAVES[0], epoch: int = 0) -> SlaveCore:
    return SlaveCore(node, epoch, Log(), KV())


def sync(m: MasterCore, s: SlaveCore, now: int = 0) -> SyncPlan:
    return m.on_sync(wire(s.sync_request(1)), now)


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
        s.accept(s.on_append(a))
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
    m.log.compact_to(6)
    assert m.next_append(SLAVES[0], 0) is None
    f = m.followers[SLAVES[0]]
    assert f.needs_snapshot
    assert m.next_append(SLAVES[0], 10_000) is None  # not even heartbeats meanwhile
    m.snapshot_sent(SLAVES[0], 8)
    assert not f.needs_snapshot and f.next_index == 9
    # a freshly installed slave acks the snapshot and then gets the rest
    s = fresh_slave()
    s.log.reset(8, 1, EpochHistory([(1, 1)]))
    s.kv.applied = 8
    s.durable = 8
    m.on_ack(SLAVES[0], s.epoch, s.ack().index, 1)
    a = m.next_append(SLAVES[0], 1)
    assert a is not None and a.prev_index == 8 and a.prev_epoch == 1
    s.on_append(a)


def test_sync_from_behind_the_compaction_point_plans_a_snapshot() -> None:
    m = make_master(entries=10)
    m.log.compact_to(6)
    s = fresh_slave()
    plan = sync(m, s)
    assert plan == SyncPlan(0, True)
    f = m.followers[SLAVES[0]]
    assert f.needs_snapshot and f.acked == 0
    # a slave at the compaction point itself needs no snapshot
    s2 = fresh_slave(SLAVES[1])
    for i in range(1, 7):
        s2.accept([m.log.get(i)] if m.log.has(i) else [Entry(i, 1, 0, Op.SET, f"k{i}", "v")])
    assert sync(m, s2) == SyncPlan(6, False)


def test_sync_of_a_slave_that_is_level_or_ahead() -> None:
    m = make_master(entries=4)
    s = fresh_slave()
    sync(m, s)
    for a in drain(m, SLAVES[0], 0):
        s.accept(s.on_append(a))
    assert sync(m, s) == SyncPlan(4, False)
    # the master lost entries 3..4 (fsync=no and a crash) and restarted in epoch 2
    lg = Log()
    for i in range(1, 3):
        lg.append(m.log.get(i))
    kv = KV()
    for i in range(1, 3):
        kv.apply(m.log.get(i))
    m2 = MasterCore(MASTER, list(SLAVES), 2, lg, kv, majority=MAJORITY,
                    peer_timeout_ms=PEER_TIMEOUT_MS, heartbeat_ms=HEARTBEAT_MS,
                    batch_entries=10, window_entries=10)
    assert sync(m2, s) == SyncPlan(2, False)
    write(m2, 3)
    assert sync(m2, s) == SyncPlan(2, False)
    s.log.truncate_after(2)
    assert sync(m2, s) == SyncPlan(2, False)


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
        s.accept(s.on_append(a))
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
    assert m.expired(100 + PEER_TIMEOUT_MS) == []
    assert m.expired(101 + PEER_TIMEOUT_MS) == [SLAVES[0]]
    assert not m.followers[SLAVES[0]].up
    later = 200 + PEER_TIMEOUT_MS
    m.on_ack(SLAVES[0], 1, 0, later)  # an ack brings it back
    assert m.followers[SLAVES[0]].up
    assert not m.has_quorum(later)  # s2 has been silent too long by now
    assert m.expired(later) == [SLAVES[1]]
    sync(m, fresh_slave(SLAVES[2]), now=later)
    assert m.has_quorum(later)


def test_lag_ms() -> None:
    m = make_master()
    write(m, 2, now=1_000)
    write(m, 2, now=2_000)
    f = m.followers[SLAVES[0]]
    assert m.lag_ms(f, 2_500) == 1_500  # missing entry 1, written at 1000
    m.on_ack(SLAVES[0], 1, 2, 2_500)
    assert m.lag_ms(f, 2_500) == 500
    m.on_ack(SLAVES[0], 1, 4, 2_500)
    assert m.lag_ms(f, 9_999) == 0
    f.acked = 0
    m.log.compact_to(3)
    assert m.lag_ms(f, 2_500) == 500  # the oldest entry still in memory
    assert m.lag_ms(f, 0) == 0  # never negative
    (row,) = [r for r in m.status(2_500) if r["id"] == SLAVES[0]]
    assert row["lag_entries"] == 4 and row["lag_ms"] == 500


def test_slave_rejects_an_append_from_an_older_epoch() -> None:
    s = fresh_slave(epoch=5)
    with pytest.raises(StaleEpoch):
        s.on_append(Append(4, 0, 0, (), 0))
    with pytest.raises(StaleEpoch):
        s.check_epoch(4)
    assert s.epoch == 5
    assert s.check_epoch(6) is True and s.epoch == 6
    assert s.check_epoch(6) is False
    assert s.on_append(Append(6, 0, 0, (), 0)) == []


def test_a_newer_epoch_is_adopted_even_from_an_append_that_does_not_fit() -> None:
    s = fresh_slave(epoch=1)
    with pytest.raises(ProtocolError):
        s.on_append(Append(3, 5, 3, (), 0))
    assert s.epoch == 3


def test_slave_rejects_appends_that_do_not_continue_its_log() -> None:
    s = fresh_slave(epoch=1)
    e1 = Entry(1, 1, 0, Op.SET, "a", "1")
    s.accept(s.on_append(Append(1, 0, 0, (e1,), 1)))
    e2 = Entry(2, 1, 0, Op.SET, "b", "2")
    with pytest.raises(ProtocolError):  # a gap
        s.on_append(Append(1, 2, 1, (Entry(3, 1, 0, Op.SET, "c", "3"),), 3))
    with pytest.raises(ProtocolError):  # the previous entry's epoch differs
        s.on_append(Append(1, 1, 0, (e2,), 2))
    with pytest.raises(ProtocolError):  # an entry from a later epoch than the master's
        s.on_append(Append(1, 1, 1, (Entry(2, 2, 0, Op.SET, "b", "2"),), 2))
    with pytest.raises(ProtocolError):  # entries out of order inside the frame
        s.on_append(Append(1, 1, 1, (e2, e2), 2))
    assert s.log.last_index == 1 and s.kv.data == {"a": "1"}
    assert s.on_append(Append(1, 1, 1, (e2,), 7)) == [e2]
    assert s.master_commit == 7
    s.on_append(Append(1, 1, 1, (), 3))
    assert s.master_commit == 7  # never backwards


def test_slave_acks_only_what_is_durable_and_applied() -> None:
    s = fresh_slave(epoch=2)
    es = [Entry(i, 2, 0, Op.SET, "k", str(i)) for i in (1, 2, 3)]
    s.accept(s.on_append(Append(2, 0, 0, tuple(es), 3)))
    assert s.ack() == Ack(2, 0)
    s.persisted(2)
    assert s.ack() == Ack(2, 2)
    s.persisted(1)
    assert s.ack() == Ack(2, 2)
    s.persisted(3)
    assert s.ack() == Ack(2, 3)
    req = s.sync_request(9)
    assert req == Sync(9, SLAVES[0], 2, 3, ((2, 1),))
