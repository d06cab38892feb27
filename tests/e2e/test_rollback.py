"""The slave's rollback path, with real processes: a master that lost the tail of its log
(its WAL cut while it was down, at a record boundary or mid-record as a torn write) restarts
in a new epoch; the slaves that held the lost entries cut them at the sync handshake, keep
them in DATA/<node>/rollback/ and resynchronise (cluster/node/slave.py ``_session``,
cluster/storage/store.py ``truncate_after`` and ``wipe``).

The scenarios put slaves at different points on purpose: n2 holds every lost entry, n3
exactly one (the off-by-one case: its ``match`` is its ``last_index - 1``), n4 none.

How these tests were checked to catch a broken rollback (each mutation applied to
cluster/node/slave.py ``SlaveRole._session`` in a work tree, this module run, the failures
seen, the mutation reverted):

1. ``match < store.log.last_index`` changed to ``match < store.log.last_index - 1``: n3
   keeps its one lost entry. Without a snapshot to follow it never converges (the master's
   appends do not continue its log); with one, no rollback file is written. Fails both
   cases of ``test_slaves_roll_back_what_the_restarted_master_lost`` and
   ``test_a_rollback_meets_a_snapshot_install``.
2. ``os._exit(99)`` inside the truncation branch: the slaves die at the handshake and never
   converge. Fails all four tests that are not xfails.
3. ``self.core.durable = store.log.last_index`` dropped after the cut: the slave's ack is
   ``min(durable, applied)`` with a stale ``durable``, so the new master's entries at the
   lost indexes are acknowledged before they are fsynced. The first test holds n2's fsyncs
   back (``fsync_gate``: a sitecustomize in the node processes) and watches the master's
   view of n2's ack; both of its cases fail. The snapshot tests cannot see it, and need
   not: installing the snapshot sets ``durable`` itself, so on that path the line is
   redundant.

``test_a_read_token_compares_indexes_only`` and
``test_rollback_keeps_the_lost_entries_that_were_only_in_the_slaves_snapshot`` are strict
xfails for product bugs (see their reasons).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.client import Client
from cluster.errors import Behind, WriteLost
from cluster.local import LocalCluster
from cluster.storage.records import RECORD_HEADER, Damage, iter_records
from cluster.storage.snapshot import read_snapshot
from cluster.storage.wal import MAGIC, WAL, Segment
from cluster.types import Acks, Entry, Op
from cluster.wire import codec
from tests.e2e.conftest import happens_within, node_items, node_status, wait_applied, wait_for

pytestmark = pytest.mark.e2e
MakeCluster = Callable[..., Awaitable[LocalCluster]]

SLAVES = ("n2", "n3", "n4")
BASE = {f"base{i}": f"v{i}" for i in range(5)}
# what the lost entries do, in order: overwrite a key, delete one, add one; rolling them back
# must bring the map back to BASE, not only drop new keys
LOST_OPS: list[tuple[Op, str, str | None]] = [
    (Op.SET, "base0", "overwritten"), (Op.DELETE, "base1", None), (Op.SET, "lost-new", "x")]

# Installed in every node process of a test that asks for it: while the file
# $REPLKV_TEST_FSYNC_GATES/<pid> exists, that process's fsyncs wait.
SITECUSTOMIZE = '''
import os, time
_gates = os.environ.get("REPLKV_TEST_FSYNC_GATES")
if _gates:
    _real_fsync = os.fsync
    def _gated_fsync(fd):
        gate = os.path.join(_gates, str(os.getpid()))
        while os.path.exists(gate):
            time.sleep(0.005)
        return _real_fsync(fd)
    os.fsync = _gated_fsync
'''


class FsyncGate:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def hold(self, cl: LocalCluster, node: str) -> Path:
        pid = cl.children[node].pid
        assert pid is not None
        gate = self.directory / str(pid)
        gate.touch()
        return gate

    def release_all(self) -> None:
        for gate in self.directory.iterdir():
            gate.unlink()


@pytest.fixture
def fsync_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FsyncGate]:
    """Node processes started after this can have their fsyncs held back, one by one."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    gates = tmp_path / "fsync-gates"
    gates.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p))
    monkeypatch.setenv("REPLKV_TEST_FSYNC_GATES", str(gates))
    gate = FsyncGate(gates)
    try:
        yield gate
    finally:
        gate.release_all()


# --- helpers -----------------------------------------------------------------------------------


def read_log_file(path: Path) -> list[Entry]:
    """The entries of a WAL-format file (a segment or a rollback file), read by the WAL's own
    reader."""
    first = int(re.findall(r"\d+", path.name)[0])
    return WAL._read_segment(Segment(first, path), last=False, expect=None)


def cut_wal(data_dir: Path, keep_through: int, *, torn: bool) -> list[Entry]:
    """Cut a stopped node's log after entry ``keep_through``: at the next record's start,
    or (``torn``) in the middle of that record, which the node then cuts at start as a torn
    tail. Returns the entries cut off."""
    segment = sorted((data_dir / "wal").glob("*.wal"))[-1]
    raw = segment.read_bytes()
    assert raw.startswith(MAGIC)
    entries: list[tuple[int, Entry]] = []
    for rec in iter_records(raw, len(MAGIC)):
        assert not isinstance(rec, Damage), rec
        entries.append((rec[0], codec.unpack_entry(rec[1])))
    cut = [(offset, e) for offset, e in entries if e.index > keep_through]
    assert cut and cut[0][1].index == keep_through + 1, "the entries to cut are not all in " \
        f"the newest segment {segment.name}"
    at = cut[0][0] + (RECORD_HEADER.size + 3 if torn else 0)
    os.truncate(segment, at)
    return [e for _, e in cut]


async def status(cl: LocalCluster, node: str) -> dict[str, Any]:
    return await node_status(cl.addresses[node])


def rollback_files(cl: LocalCluster, node: str, pattern: str = "*.wal") -> list[Path]:
    """The node's rollback files: cut entries (``*.wal``) or kept snapshots
    (``snapshot-*``)."""
    folder = cl.data_dir / node / "rollback"
    return sorted(folder.glob(pattern)) if folder.exists() else []


def log_text(cl: LocalCluster, node: str) -> str:
    return cl.children[node].log_path.read_text(errors="replace")


def cuts_logged(cl: LocalCluster, node: str) -> list[str]:
    return re.findall(r"cut \d+ entries \(\d+\.\.\d+\) that the master does not have",
                      log_text(cl, node))


async def write_ops(c: Client, ops: list[tuple[Op, str, str | None]], acks: Acks) -> list[int]:
    out = []
    for op, key, value in ops:
        if op is Op.SET:
            assert value is not None
            out.append((await c.set(key, value, acks)).index)
        else:
            out.append((await c.delete(key, acks)).index)
    return out


async def diverge(cl: LocalCluster, lost: int) -> tuple[int, int]:
    """Write BASE with acks=majority to every node, then ``lost`` more entries that n2 holds
    all of and n3 only the first of (n4 is killed first, n3 after the first); n3 and n4 are
    left down. Returns (index of the last BASE entry, the master's epoch)."""
    async with await Client.connect(cl.addresses["n1"]) as c:
        indexes = [(await c.set(k, v, Acks.MAJORITY)).index for k, v in BASE.items()]
        base = indexes[-1]
        for n in SLAVES:
            await wait_applied(cl, n, base)
        await cl.kill("n4")
        # with n4 down a majority write needs both n2 and n3
        assert await write_ops(c, LOST_OPS[:1], Acks.MAJORITY) == [base + 1]
        await wait_applied(cl, "n3", base + 1)
        await cl.kill("n3")
        assert await write_ops(c, LOST_OPS[1:lost], Acks.ASYNC) == list(
            range(base + 2, base + lost + 1))
        await wait_applied(cl, "n2", base + lost)
    return base, int((await status(cl, "n1"))["epoch"])


async def restart_master_without(cl: LocalCluster, base: int, lost: int,
                                 *, torn: bool) -> list[Entry]:
    """SIGKILL the master, cut its log back to ``base`` and start it again."""
    await cl.kill("n1")
    cut = cut_wal(cl.data_dir / "n1", base, torn=torn)
    assert [(e.op, e.key, e.value) for e in cut] == LOST_OPS[:lost]
    await cl.start_child("n1")
    if torn:
        assert "truncating the torn tail" in log_text(cl, "n1")
    return cut


def check_rollback(cl: LocalCluster, node: str, cut: list[Entry], new_epoch: int) -> None:
    """``node`` kept exactly ``cut`` in one rollback file, in the WAL format."""
    (path,) = rollback_files(cl, node)
    assert path.name == f"rollback-{cut[0].index}-{cut[-1].index}-e{new_epoch}.wal"
    assert read_log_file(path) == cut


async def check_converged(cl: LocalCluster, expected: dict[str, Any]) -> int:
    """Every node has the master's last index and exactly ``expected``."""
    top = int((await status(cl, "n1"))["last_index"])
    for n in cl.node_ids:
        await wait_applied(cl, n, top)
    for n in cl.node_ids:
        st = await status(cl, n)
        assert (st["last_index"], st["applied_index"]) == (top, top), (n, st)
        assert await node_items(cl.addresses[n]) == expected, n
    return top


async def check_lost_never_read(cl: LocalCluster) -> None:
    """The lost writes are not visible anywhere: BASE values are back, the new key is gone."""
    for n in cl.node_ids:
        async with await Client.connect(cl.addresses[n]) as c:
            assert (await c.get("base0")).value == "v0", n
            assert (await c.get("base1")).value == "v1", n
            assert not (await c.get("lost-new")).found, n


async def _has_quorum(cl: LocalCluster) -> bool:
    return bool((await status(cl, "n1"))["quorum"])


async def acked_by_master(cl: LocalCluster, node: str) -> int:
    slaves = (await status(cl, "n1"))["slaves"]
    return int(next(s["acked"] for s in slaves if s["id"] == node))


# --- a: the master lost its tail ---------------------------------------------------------------


@pytest.mark.parametrize("lost, torn", [(1, False), (3, True)],
                         ids=["one-entry-cut-at-a-record-boundary", "three-entries-torn"])
async def test_slaves_roll_back_what_the_restarted_master_lost(
        make_cluster: MakeCluster, fsync_gate: FsyncGate, lost: int, torn: bool) -> None:
    cl = await make_cluster()
    base, old_epoch = await diverge(cl, lost)

    cut = await restart_master_without(cl, base, lost, torn=torn)
    master = await status(cl, "n1")
    new_epoch = old_epoch + 1
    assert (master["epoch"], master["last_index"]) == (new_epoch, base)

    # n2 stayed up: it reconnects, cuts the lost entries and syncs from `base`
    async def n2_resynced() -> bool:
        st = await status(cl, "n2")
        return bool(st["last_index"] == base and st["master_link"]["up"]
                    and st["epoch"] == new_epoch)

    await wait_for(n2_resynced, "n2 to cut its log back and resync")

    # Hold n2's fsyncs: the new master's entries at the lost indexes reach n2's map, but n2
    # must not acknowledge them before they are durable (its durable index was reset to
    # `base` by the cut, not left at its old last index).
    gate = fsync_gate.hold(cl, "n2")
    await cl.start_child("n3")
    await cl.start_child("n4")
    async with await Client.connect(cl.addresses["n1"]) as c:
        first_new = (await c.set("new0", "after", Acks.ASYNC)).index
        assert first_new == base + 1  # the new epoch reuses the lost index
        await wait_applied(cl, "n2", first_new)
        n2 = await status(cl, "n2")
        assert n2["durable_index"] == base, "the fsync gate did not hold n2's fsync"

        async def n2_acked_new() -> bool:
            return await acked_by_master(cl, "n2") >= first_new

        assert not await happens_within(n2_acked_new, 1.0), (
            "n2 acknowledged an entry it had not fsynced (its durable index was not reset "
            "when the log was cut)")
        gate.unlink()
        await wait_for(n2_acked_new, "n2 to acknowledge once its fsync completes")

        # new majority writes replicate to everyone
        for i in range(1, 4):
            await c.set(f"new{i}", "after", Acks.MAJORITY)

    expected = {**BASE, **{f"new{i}": "after" for i in range(4)}}
    await check_converged(cl, expected)
    await check_lost_never_read(cl)

    # n2 kept every lost entry, n3 the one it held, n4 (and the master) none
    check_rollback(cl, "n2", cut, new_epoch)
    check_rollback(cl, "n3", cut[:1], new_epoch)
    assert rollback_files(cl, "n4") == [] and rollback_files(cl, "n1") == []
    assert len(cuts_logged(cl, "n2")) == 1 and len(cuts_logged(cl, "n3")) == 1
    assert cuts_logged(cl, "n4") == []
    for n in cl.node_ids:
        assert (await status(cl, n))["epoch"] == new_epoch, n

    # the rolled-back entries never come back: not after another restart of a slave that
    # held them, nor of the master
    await cl.restart("n2")
    await cl.restart("n1")
    await check_converged(cl, expected)
    await check_lost_never_read(cl)
    assert len(rollback_files(cl, "n2")) == 1 and len(cuts_logged(cl, "n2")) == 1


# --- b: the cut meets a snapshot install -------------------------------------------------------


SNAPSHOT_EVERY = 50


async def outrun_compaction(cl: LocalCluster, base: int) -> None:
    """With every slave down, the master writes past several snapshots in its new epoch,
    so entry ``base + 1`` (where the slaves' logs diverge) is compacted out of its log."""
    async with await Client.connect(cl.addresses["n1"]) as c:
        for batch in range(4):
            for i in range(SNAPSHOT_EVERY):
                await c.set(f"e2-{batch}-{i}", str(i))

    async def compacted() -> bool:
        st = await status(cl, "n1")
        return bool(st["log_first_index"] > base + 1)

    await wait_for(compacted, "the master to compact past the divergence")


async def test_a_rollback_meets_a_snapshot_install(make_cluster: MakeCluster) -> None:
    """A slave whose log holds lost entries and whose next entry the master has compacted:
    the handshake answers ``match`` (the last common entry) with ``snapshot: true``. The
    slave cuts its log after ``match`` (rollback file: exactly the lost entries), then
    installs the master's snapshot, which replaces its state, and takes the tail.

    The compaction has to happen in the new epoch, with the diverged slaves down: a cut of
    the master's log can only remove entries after its own snapshot, and a slave that was
    merely behind before the cut holds no lost entries, so it would install a snapshot
    without cutting anything (n4 here does exactly that)."""
    lost = 3
    cl = await make_cluster(["--snapshot-every", str(SNAPSHOT_EVERY)])
    base, old_epoch = await diverge(cl, lost)
    # no local snapshot covers the lost entries: the handshake makes a plain cut
    assert (await status(cl, "n2"))["snapshot_index"] <= base
    await cl.kill("n2")

    cut = await restart_master_without(cl, base, lost, torn=False)
    new_epoch = old_epoch + 1
    await outrun_compaction(cl, base)

    for n in SLAVES:
        await cl.start_child(n)
    async with await Client.connect(cl.addresses["n1"]) as c:
        await c.set("tail", "1", Acks.MAJORITY)
    expected = {**BASE, "tail": "1",
                **{f"e2-{b}-{i}": str(i) for b in range(4) for i in range(SNAPSHOT_EVERY)}}
    await check_converged(cl, expected)
    await check_lost_never_read(cl)

    check_rollback(cl, "n2", cut, new_epoch)
    check_rollback(cl, "n3", cut[:1], new_epoch)
    assert rollback_files(cl, "n4") == []
    for n in SLAVES:
        text = log_text(cl, n)
        assert "installed the master's snapshot" in text, n
        if n != "n4":  # the cut comes first, then the snapshot replaces the rest
            assert text.index("that the master does not have") < text.index(
                "installed the master's snapshot"), n
        assert (await status(cl, n))["snapshot_index"] > base + lost, n


async def diverge_inside_a_snapshot(cl: LocalCluster) -> tuple[int, list[Entry], int]:
    """n2 snapshots after every entry (its own ``--snapshot-every 1``), so when the master
    loses its last three entries, two of them are only in n2's snapshot (its log keeps
    just what came after its previous snapshot) and the handshake's ``match`` is below n2's
    snapshot: n2 must discard its state (``Store.wipe``) and take the master's snapshot.
    Returns (last common index, the entries the master lost, the new epoch)."""
    lost = 3
    await cl.kill("n2")
    cl.children["n2"].args += ["--snapshot-every", "1"]  # the last value of an option wins
    await cl.start_child("n2")

    async def n2_snapshot_at(index: int) -> None:
        async def check() -> bool:
            return bool((await status(cl, "n2"))["snapshot_index"] == index)

        await wait_for(check, f"n2 to snapshot at {index}")

    async with await Client.connect(cl.addresses["n1"]) as c:
        await wait_for(lambda: _has_quorum(cl), "n2 to reconnect")
        # one write at a time, each waiting for n2's snapshot of it, so that every write
        # finds no snapshot of n2 in progress and starts the next one
        for k, v in BASE.items():
            index = (await c.set(k, v, Acks.MAJORITY)).index
            await n2_snapshot_at(index)
        base = index
        await cl.kill("n3")
        await cl.kill("n4")
        for op in LOST_OPS[:lost]:
            (index,) = await write_ops(c, [op], Acks.ASYNC)
            await n2_snapshot_at(index)
    n2 = await status(cl, "n2")
    assert n2["log_first_index"] > base + 1, "the first lost entries should be only in n2's " \
        f"snapshot: {n2}"
    old_epoch = int((await status(cl, "n1"))["epoch"])
    await cl.kill("n2")

    cut = await restart_master_without(cl, base, lost, torn=False)
    await outrun_compaction(cl, base)
    for n in SLAVES:
        await cl.start_child(n)
    return base, cut, old_epoch + 1


async def test_a_slave_whose_snapshot_holds_lost_entries_starts_over_from_the_master(
        make_cluster: MakeCluster) -> None:
    cl = await make_cluster(["--snapshot-every", str(SNAPSHOT_EVERY)])
    _, cut, new_epoch = await diverge_inside_a_snapshot(cl)
    async with await Client.connect(cl.addresses["n1"]) as c:
        await c.set("tail", "1", Acks.MAJORITY)
    expected = {**BASE, "tail": "1",
                **{f"e2-{b}-{i}": str(i) for b in range(4) for i in range(SNAPSHOT_EVERY)}}
    await check_converged(cl, expected)
    await check_lost_never_read(cl)
    text = log_text(cl, "n2")
    assert "discarding local state to resynchronise" in text
    assert text.index("discarding local state") < text.index("installed the master's snapshot")
    # what n2 kept is lost entries only, in the WAL format
    kept = [e for path in rollback_files(cl, "n2") for e in read_log_file(path)]
    assert kept and all(e in cut for e in kept), kept
    assert [f.name for f in rollback_files(cl, "n2")] == [
        f"rollback-{kept[0].index}-{kept[-1].index}-e{new_epoch}.wal"]
    assert all(rollback_files(cl, n) == [] for n in ("n1", "n3", "n4"))


async def test_rollback_keeps_the_lost_entries_that_were_only_in_the_slaves_snapshot(
        make_cluster: MakeCluster) -> None:
    """Lost entries that a slave had already compacted into its own snapshot exist only as
    the map they produced: the wipe keeps that snapshot in rollback/, next to the entries
    its log still held, so nothing lost is discarded silently."""
    cl = await make_cluster(["--snapshot-every", str(SNAPSHOT_EVERY)])
    base, cut, new_epoch = await diverge_inside_a_snapshot(cl)
    await wait_for(lambda: _has_converged(cl, "n2"), "n2 to resync")
    kept = [e for path in rollback_files(cl, "n2") for e in read_log_file(path)]
    assert all(e in cut for e in kept), kept
    (snap,) = rollback_files(cl, "n2", "snapshot-*")
    meta, data = read_snapshot(snap)
    # the snapshot covers every lost entry the rollback log does not hold
    only_in_snapshot = [e for e in cut if e not in kept]
    assert only_in_snapshot and meta.index >= only_in_snapshot[-1].index > base
    assert snap.name == f"snapshot-{meta.index}-e{new_epoch}"  # named like the .wal files
    assert data.data["base0"] == "overwritten" and "base1" not in data.data  # the lost ops
    assert all(snap_ == [] for snap_ in (rollback_files(cl, n, "snapshot-*")
                                         for n in ("n1", "n3", "n4")))


async def _has_converged(cl: LocalCluster, node: str) -> bool:
    top = (await status(cl, "n1"))["last_index"]
    return bool((await status(cl, node))["applied_index"] == top)


# --- c: read-your-writes tokens across a rollback ----------------------------------------------


async def test_read_tokens_name_an_entry_of_one_history(make_cluster: MakeCluster) -> None:
    """A read token is (epoch, index). A slave that still holds the old epoch's entry N (the
    master lost it) must not serve a read that needs the new master's entry N, and the
    token of the lost write is refused everywhere once the history is known: it can never
    be satisfied."""
    cl = await make_cluster()
    async with await Client.connect(cl.addresses["n1"]) as c:
        for k, v in BASE.items():
            await c.set(k, v, Acks.MAJORITY)
        lost = await c.set("mine", "lost", Acks.MAJORITY)
    for n in SLAVES:
        await wait_applied(cl, n, lost)

    # n3 holds the entry the master is about to lose; it is paused so it cannot resync
    cl.signal("n3", signal.SIGSTOP)
    try:
        await cl.kill("n1")
        cut = cut_wal(cl.data_dir / "n1", lost.index - 1, torn=False)
        assert [(e.key, e.value) for e in cut] == [("mine", "lost")]
        await cl.start_child("n1")
        await wait_for(lambda: _has_quorum(cl), "n2 and n4 to resync with the new master")
        async with await Client.connect(cl.addresses["n1"]) as c:
            token = await c.set("mine", "new", Acks.MAJORITY)
        assert token.index == lost.index and token.epoch > lost.epoch  # same index, new epoch
        # the master is paused too: n3 reconnects but cannot finish a handshake
        cl.signal("n1", signal.SIGSTOP)
        cl.signal("n3", signal.SIGCONT)
        async with await Client.connect(cl.addresses["n3"]) as direct:
            with pytest.raises(Behind):  # n3 holds (old epoch, N), not the token's entry
                await direct.get("mine", min_index=token)
            with pytest.raises(Behind):  # out of sync, it cannot vouch for the lost one
                await direct.get("mine", min_index=lost)
            assert (await direct.get("mine")).value == "lost"  # a plain read may be stale
    finally:
        cl.signal("n3", signal.SIGCONT)
        cl.signal("n1", signal.SIGCONT)
    await wait_applied(cl, "n3", token)
    for n in cl.node_ids:
        async with await Client.connect(cl.addresses[n]) as direct:
            assert (await direct.get("mine", min_index=token)).value == "new"
            with pytest.raises(WriteLost):
                await direct.get("mine", min_index=lost)
    async with await Client.connect(cl.router_address) as c:
        with pytest.raises(WriteLost, match=f"index {lost.index} in epoch {lost.epoch}"):
            await c.get("mine", min_index=lost)
