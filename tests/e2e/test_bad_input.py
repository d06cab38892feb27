"""Garbage sent to a node and to the router gets an error and a closed connection; the
cluster keeps serving everyone else and loses nothing. Damaged files are handled at start."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest

from cluster.client import Client
from cluster.local import LocalCluster
from cluster.wire import codec
from cluster.wire.framing import encode_frame
from tests.e2e.conftest import node_items, raw_exchange, wait_applied

pytestmark = pytest.mark.e2e
MakeCluster = Callable[..., Awaitable[LocalCluster]]

GARBAGE = {
    "not msgpack": (encode_frame(b"\xc1\xc1\xc1"), "bad_frame"),
    "not a map": (encode_frame(codec.pack_obj([1, 2, 3])), "bad_frame"),
    "unknown op": (encode_frame(codec.pack_obj({"op": "explode", "id": 7})), "unknown_op"),
    "key of wrong type": (encode_frame(codec.pack_obj({"op": "set", "id": 8, "key": 5,
                                                       "value": "v"})), "bad_request"),
    "value too large": (encode_frame(codec.pack_obj({"op": "set", "id": 9, "key": "k",
                                                     "value": "x" * 2_000_000})),
                        "too_large"),
    "oversized frame": (struct.pack(">I", 1 << 30) + b"\x80", "frame_too_large"),
    "empty frame": (encode_frame(b""), "bad_frame"),
    "nested too deep": (encode_frame(b"\x81\xa1x" + b"\x91" * codec.MAX_DEPTH + b"\x01"),
                        "bad_frame"),
    "replication message": (encode_frame(codec.pack_obj({"op": "ack", "id": 12, "epoch": 1,
                                                         "index": 0})), "bad_request"),
    "a reply": (encode_frame(codec.pack_obj({"id": 13, "ok": True})), "bad_request"),
}


@pytest.mark.parametrize("target", ["node", "router"])
async def test_garbage_gets_an_error_and_the_cluster_keeps_working(
        cluster: LocalCluster, target: str) -> None:
    addr = cluster.addresses["n1"] if target == "node" else cluster.router_address
    async with await Client.connect(cluster.router_address) as bystander:
        before = await bystander.set("safe", "data")
        for name, (data, code) in GARBAGE.items():
            reply, closed = await raw_exchange(addr, data)
            assert reply.code == code, name
            assert closed, f"{name}: the connection should be closed"
            # the open connection of another client is unaffected
            index = await bystander.set(f"after {name}", "ok")
            assert index > before
    await wait_applied(cluster, "n2", index)
    items = await node_items(cluster.addresses["n2"])
    assert items["safe"] == "data" and len(items) == 1 + len(GARBAGE)


@pytest.mark.parametrize("target", ["node", "router"])
async def test_error_reply_carries_the_request_id(cluster: LocalCluster, target: str) -> None:
    """Also for messages that have no id of their own (an ack) but were sent with one."""
    addr = cluster.addresses["n1"] if target == "node" else cluster.router_address
    for name, rid in [("unknown op", 7), ("replication message", 12), ("a reply", 13)]:
        reply, _ = await raw_exchange(addr, GARBAGE[name][0])
        assert reply.id == rid, name


@pytest.mark.parametrize("target", ["node", "router"])
async def test_undecodable_payloads_say_why(cluster: LocalCluster, target: str) -> None:
    addr = cluster.addresses["n1"] if target == "node" else cluster.router_address
    reply, _ = await raw_exchange(addr, GARBAGE["nested too deep"][0])
    assert reply.message.endswith(f"nested more than {codec.MAX_DEPTH} deep"), reply.message
    reply, _ = await raw_exchange(addr, GARBAGE["not msgpack"][0])
    assert not reply.message.endswith(": "), reply.message


async def test_torn_tail_is_truncated_at_start(cluster: LocalCluster) -> None:
    async with await Client.connect(cluster.router_address) as c:
        last = max(await asyncio.gather(*(c.set(f"k{i}", "v") for i in range(50))))
    await wait_applied(cluster, "n3", last)
    await cluster.kill("n3")
    segment = sorted((cluster.data_dir / "n3" / "wal").glob("*.wal"))[-1]
    with segment.open("ab") as f:
        f.write(struct.pack(">II", 100, 12345) + b"half a rec")  # a torn append
    await cluster.start_child("n3")
    await wait_applied(cluster, "n3", last)
    assert "truncating the torn tail" in cluster.children["n3"].log_path.read_text()
    assert len(await node_items(cluster.addresses["n3"])) == 50


async def test_corruption_in_the_middle_stops_the_node_with_a_clear_message(
        cluster: LocalCluster) -> None:
    async with await Client.connect(cluster.router_address) as c:
        for i in range(20):
            last = await c.set(f"k{i}", "value")
    await wait_applied(cluster, "n2", last)
    await cluster.kill("n2")
    segment = sorted((cluster.data_dir / "n2" / "wal").glob("*.wal"))[-1]
    data = bytearray(segment.read_bytes())
    data[40] ^= 0xFF  # inside the first record
    segment.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, *cluster.children["n2"].args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "corrupt in the middle" in proc.stderr
    assert "delete it to resynchronise" in proc.stderr
    assert "Traceback" not in proc.stderr
