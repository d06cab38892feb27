"""Replication with real processes: reads everywhere, crashes by SIGKILL, catch-up by id."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cluster.client import Client, Token
from cluster.errors import Behind, NoQuorum, NotMaster, ReplError
from cluster.local import LocalCluster
from cluster.types import Acks
from tests.e2e.conftest import node_items, node_status, wait_applied, wait_for

pytestmark = pytest.mark.e2e
MakeCluster = Callable[..., Awaitable[LocalCluster]]


async def test_a_write_is_readable_from_every_slave(cluster: LocalCluster,
                                                    client: Client) -> None:
    index = await client.set("colour", "blue")
    for node in cluster.node_ids:
        await wait_applied(cluster, node, index)
        async with await Client.connect(cluster.addresses[node]) as direct:
            result = await direct.get("colour")
        assert (result.found, result.value, result.node) == (True, "blue", node)


async def test_reads_through_the_router_go_to_slaves(cluster: LocalCluster,
                                                     client: Client) -> None:
    index = (await client.set("k", "v")).index
    for node in cluster.node_ids:
        await wait_applied(cluster, node, index)
    await wait_for(lambda: _router_sees_applied(client, index), "the router to see the slaves")
    served = {(await client.get("k", min_index=index)).node for _ in range(60)}
    assert served <= {"n2", "n3", "n4"} and len(served) >= 2


async def _router_sees_applied(client: Client, index: int) -> bool:
    nodes = (await client.status())["nodes"]
    return all(n["up"] and n["applied_index"] >= index for n in nodes)


async def test_reads_and_scans_wait_for_min_index(cluster: LocalCluster,
                                                  client: Client) -> None:
    index = (await client.set("mine", "1")).index
    ahead = index + 1000  # no node has applied this yet
    async with await Client.connect(cluster.addresses["n3"]) as direct:
        with pytest.raises(Behind):
            await direct.get("mine", min_index=ahead)
        with pytest.raises(Behind):
            await direct.scan(min_index=ahead)
    with pytest.raises(Behind, match=f"no node has applied index {ahead} yet"):
        await client.scan(min_index=ahead)  # every node refused: the router says so
    items, _ = await client.scan(min_index=index)  # some node has it: served
    assert ("mine", "1") in items


async def test_a_slave_rejects_writes(cluster: LocalCluster) -> None:
    async with await Client.connect(cluster.addresses["n2"]) as direct:
        with pytest.raises(NotMaster, match="n1"):
            await direct.set("k", "v")
        assert not (await direct.get("k")).found


async def test_killed_slave_catches_up_by_id(cluster: LocalCluster, client: Client) -> None:
    first = (await client.set("before", "crash")).index
    await wait_applied(cluster, "n3", first)
    before = (await node_status(cluster.addresses["n3"]))["last_index"]
    await cluster.kill("n3")

    indexes = await asyncio.gather(*(client.set(f"key{i}", f"value{i}") for i in range(1000)))
    assert sorted(t.index for t in indexes) == list(range(first + 1, first + 1001))

    await cluster.start_child("n3")
    await wait_applied(cluster, "n3", max(indexes))
    status = await node_status(cluster.addresses["n3"])
    # it replayed its own log and then asked for the entries after its last one
    assert status["master_link"]["last_sync_from"] == before
    assert status["snapshot_index"] == 0
    items = await node_items(cluster.addresses["n3"])
    assert all(items[f"key{i}"] == f"value{i}" for i in range(1000))
    assert items["before"] == "crash"


async def test_killed_master_keeps_every_acknowledged_write(cluster: LocalCluster,
                                                            client: Client) -> None:
    acked: dict[str, Token] = {}

    async def writer(n: int) -> None:
        for i in range(10_000):
            key = f"w{n}-{i}"
            try:
                acked[key] = await client.set(key, str(i))
            except ReplError:
                return

    writers = [asyncio.create_task(writer(n)) for n in range(8)]
    await wait_for(_at_least(acked, 300), "some writes to be acknowledged")
    await cluster.kill("n1")
    await asyncio.wait_for(asyncio.gather(*writers), 20)
    assert len(acked) >= 300

    await cluster.start_child("n1")
    items = await node_items(cluster.addresses["n1"])
    missing = [k for k in acked if items.get(k) is None]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    # and the slaves converge on the restarted master's log, which may also hold writes
    # that reached its disk but were never acknowledged
    top = (await node_status(cluster.addresses["n1"]))["last_index"]
    assert top >= max(t.index for t in acked.values())
    for node in cluster.node_ids:
        await wait_applied(cluster, node, top)
    assert await node_items(cluster.addresses["n4"]) == items


def _at_least(d: dict[str, Any], n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(d) >= n
    return check


async def test_writes_fail_clearly_while_the_master_is_down(cluster: LocalCluster,
                                                            client: Client) -> None:
    index = await client.set("stable", "yes")
    await wait_applied(cluster, "n2", index)
    await cluster.kill("n1")

    async def master_marked_down() -> bool:
        return (await client.status())["master"] is None

    await wait_for(master_marked_down, "the router to mark the master down")
    with pytest.raises(ReplError, match="unavailable"):
        await client.set("lost", "no")
    # the slaves' sessions closed with the master: default reads fail too (--max-lag-ms),
    # once the router's probes have seen that
    async def reads_refused() -> bool:
        try:
            await client.get("stable")
        except ReplError as exc:
            return "unavailable: no master is reachable, and no slave" in str(exc)
        return False

    await wait_for(reads_refused, "default reads to be refused", timeout=5)


async def test_slave_behind_a_compaction_gets_snapshot_then_tail(
        make_cluster: MakeCluster) -> None:
    cl = await make_cluster(["--snapshot-every", "100"])
    async with await Client.connect(cl.router_address) as c:
        await c.set("early", "1")
        await cl.kill("n4")
        last = 0
        for batch in range(6):
            idx = await asyncio.gather(*(c.set(f"k{batch}-{i}", str(i)) for i in range(100)))
            last = max(t.index for t in idx)
        await c.delete("early")
        last += 1
    master = await node_status(cl.addresses["n1"])
    assert master["log_first_index"] > 2, "the master should have compacted its log"

    await cl.start_child("n4")
    await wait_applied(cl, "n4", last)
    assert "installed the master's snapshot" in cl.children["n4"].log_path.read_text()
    assert await node_items(cl.addresses["n4"]) == await node_items(cl.addresses["n1"])
    status = await node_status(cl.addresses["n4"])
    assert status["snapshot_index"] > 0 and status["last_index"] == last


async def test_majority_writes_need_a_majority(make_cluster: MakeCluster) -> None:
    cl = await make_cluster()
    async with await Client.connect(cl.router_address) as c:
        index = await c.set("m", "1", Acks.MAJORITY)
        assert (index.epoch, index.index) == (1, 1)
        await cl.kill("n2")
        await cl.kill("n3")

        async def no_quorum() -> bool:
            return not (await node_status(cl.addresses["n1"]))["quorum"]

        await wait_for(no_quorum, "the master to lose its majority")
        with pytest.raises(NoQuorum):
            await c.set("m", "2", Acks.MAJORITY)
        assert await c.set("m", "3") > index  # acks=async still works
        await cl.start_child("n2")

        async def quorum() -> bool:
            return bool((await node_status(cl.addresses["n1"]))["quorum"])

        await wait_for(quorum, "the master to regain its majority")
        assert await c.set("m", "4", Acks.MAJORITY) > index


async def test_restarted_slaves_converge_after_repeated_crashes(
        make_cluster: MakeCluster) -> None:
    cl = await make_cluster(["--snapshot-every", "300"])
    async with await Client.connect(cl.router_address) as c:
        last = 0
        for round_ in range(3):
            victim = ["n2", "n3", "n4"][round_]
            await cl.kill(victim)
            idx = await asyncio.gather(*(c.set(f"r{round_}-{i}", "x" * (i % 50))
                                         for i in range(400)))
            last = max(t.index for t in idx)
            await cl.start_child(victim)
    for node in cl.node_ids:
        await wait_applied(cl, node, last)
    reference = await node_items(cl.addresses["n1"])
    assert len(reference) == 1200
    for other in ("n2", "n3", "n4"):
        assert await node_items(cl.addresses[other]) == reference
