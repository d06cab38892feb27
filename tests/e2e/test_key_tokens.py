"""Reads say which write produced each value: ``get`` and ``scan`` return, per key, the
token (epoch, index) of the entry that last set it, the same on every node, through the
router, and after a node recovered from a snapshot (its own, or the master's)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from click.testing import CliRunner

from cluster.cli.ctl import main
from cluster.client import Client, Token
from cluster.config import Address
from cluster.local import LocalCluster
from cluster.types import Value
from tests.e2e.conftest import node_status, wait_applied

pytestmark = pytest.mark.e2e

SNAPSHOT_EVERY = 5
MakeCluster = Callable[..., Awaitable[LocalCluster]]


async def tokens_of(address: Address, page: int = 3) -> dict[str, tuple[Value, Token]]:
    """Every key of one node (or the router) with its value and token, by ``scan``."""
    async with await Client.connect(address, timeout=5) as c:
        return {k: (v, t) async for k, v, t in c.items_with_tokens(page)}


async def get_token(address: Address, key: str, min_index: Token | int = 0) -> Token | None:
    async with await Client.connect(address, timeout=5) as c:
        result = await c.get(key, min_index=min_index)
        return result.token


async def test_get_and_scan_return_the_token_of_the_write_that_set_each_key(
        make_cluster: MakeCluster) -> None:
    cl = await make_cluster(["--snapshot-every", str(SNAPSHOT_EVERY)])
    await cl.kill("n4")  # it comes back after the master compacted: it needs a snapshot
    expected: dict[str, tuple[Value, Token]] = {}
    async with await Client.connect(cl.router_address) as c:
        first = await c.set("k", "first")
        expected["other"] = ("x", await c.set("other", "x"))
        second = await c.set("k", "second")
        assert second.index > first.index
        expected["k"] = ("second", second)
        await c.set("gone", "soon")
        await c.delete("gone")
        expected["bin"] = (b"\x00\xff", await c.set("bin", b"\x00\xff"))
        last = second
        for i in range(4 * SNAPSHOT_EVERY):  # snapshots on every node, past k's writes
            last = await c.set(f"fill{i:02d}", str(i))
            expected[f"fill{i:02d}"] = (str(i), last)

        # through the router, with the last write's token so the node has all of them
        got = await c.get("k", min_index=last)
        assert (got.value, got.token) == ("second", second)
        assert (await c.get("gone", min_index=last)).token is None  # not found: no token
        assert await tokens_of(cl.router_address) == expected

    for node in ("n1", "n2", "n3"):  # and from each node directly
        await wait_applied(cl, node, last)
        assert await get_token(cl.addresses[node], "k") == second, node
        assert await tokens_of(cl.addresses[node]) == expected, node

    # n2 restarts from its own snapshot, which holds k's write: its token comes from there
    status = await node_status(cl.addresses["n2"])
    assert status["snapshot_index"] > second.index, status
    await cl.kill("n2")
    await cl.start_child("n2")
    await wait_applied(cl, "n2", last)
    status = await node_status(cl.addresses["n2"])
    assert status["log_first_index"] > second.index, "k's write should be compacted"
    assert await get_token(cl.addresses["n2"], "k") == second
    assert await tokens_of(cl.addresses["n2"]) == expected

    # n4 was down all along: it installs the master's snapshot and reports the same
    assert (await node_status(cl.addresses["n1"]))["log_first_index"] > 1
    await cl.start_child("n4")
    await wait_applied(cl, "n4", last)
    assert "installed the master's snapshot" in cl.children["n4"].log_path.read_text()
    assert await get_token(cl.addresses["n4"], "k") == second
    assert await tokens_of(cl.addresses["n4"]) == expected

    # a later write moves the key's token on every node
    async with await Client.connect(cl.router_address) as c:
        third = await c.set("k", "third")
    for node in ("n1", "n2", "n3", "n4"):
        await wait_applied(cl, node, third)
        assert await get_token(cl.addresses[node], "k") == third, node


async def test_replctl_read_and_show_print_key_tokens(cluster: LocalCluster) -> None:
    async def ctl(*args: str) -> str:
        result = await asyncio.to_thread(CliRunner().invoke, main,
                                         ["--router", str(cluster.router_address), *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    async with await Client.connect(cluster.router_address) as c:
        await c.set("a", "1")
        token = await c.set("b", "2")
        await c.set("a", "3")
        last = await c.set("a", "4")
    await wait_applied(cluster, "n2", last)
    await wait_applied(cluster, "n3", last)
    await wait_applied(cluster, "n4", last)

    read = json.loads(await ctl("read", "b", "--json", "--min-index", str(last)))
    assert (read["token"], read["key_epoch"], read["key_index"]) == (
        str(token), token.epoch, token.index)
    shown = json.loads(await ctl("show", "--tokens", "--json", "--min-index", str(last)))
    assert shown == [
        {"key": "a", "value": "4", "token": str(last), "epoch": last.epoch,
         "index": last.index},
        {"key": "b", "value": "2", "token": str(token), "epoch": token.epoch,
         "index": token.index}]
    text = (await ctl("show", "--tokens", "--min-index", str(last))).splitlines()
    assert text == [f"a  {last}  4", f"b  {token}  2"]
    # without --tokens, show keeps its shape
    assert json.loads(await ctl("show", "--json")) == {"a": "4", "b": "2"}

    missing = await asyncio.to_thread(CliRunner().invoke, main,
                                      ["--router", str(cluster.router_address), "read", "zz",
                                       "--json"])
    assert missing.exit_code == 1 and json.loads(missing.stdout)["token"] is None
