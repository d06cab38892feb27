"""``replctl demo``: the seed system's demonstration, narrated step by step."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import click

from cluster.cli.common import show_value
from cluster.client import Client
from cluster.config import Address
from cluster.errors import ReplError
from cluster.local import LocalCluster
from cluster.types import NodeId, Token, Value

SAMPLE = {
    "city:paris": "France", "city:berlin": "Germany", "city:madrid": "Spain",
    "city:rome": "Italy", "city:lisbon": "Portugal", "city:vienna": "Austria",
    "city:prague": "Czechia", "city:warsaw": "Poland", "city:dublin": "Ireland",
    "city:oslo": "Norway", "city:helsinki": "Finland", "city:athens": "Greece",
}
WAIT = 30.0


class Demo:
    def __init__(self, client: Client, local: LocalCluster | None) -> None:
        self.client = client
        self.local = local
        self.step_no = 0

    def step(self, title: str) -> None:
        self.step_no += 1
        click.secho(f"\n==> Step {self.step_no}: {title}", bold=True)

    @staticmethod
    def say(text: str) -> None:
        click.echo(f"    {text}")

    async def until(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        """Wait for a condition, checking it after each status round trip."""
        async with asyncio.timeout(WAIT):
            while not await check():
                await asyncio.sleep(0.05)
        self.say(f"... {what}")

    async def node_status(self, node: str) -> dict[str, Any]:
        assert self.local is not None
        async with await Client.connect(self.local.addresses[NodeId(node)], timeout=3) as c:
            return await c.status()

    async def router_nodes(self) -> dict[str, dict[str, Any]]:
        st = await self.client.status()
        return {n["id"]: n for n in st["nodes"]}


async def run_demo(data_dir: Path | None, base_port: int, router: Address | None) -> None:
    async with (_cluster(data_dir, base_port, router) as (address, local),
                await Client.connect(address, timeout=10) as client):
        await _script(Demo(client, local))


@contextlib.asynccontextmanager
async def _cluster(data_dir: Path | None, base_port: int, router: Address | None
                   ) -> AsyncIterator[tuple[Address, LocalCluster | None]]:
    if router is not None:
        click.echo(f"Using the running cluster behind the router at {router}.")
        yield router, None
        return
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="replkv-")))
        local = LocalCluster(data_dir, base_port=base_port)
        click.secho("==> Starting a local cluster: a master, three slaves and a router",
                    bold=True)
        await local.start()
        try:
            click.echo(f"    router {local.router_address}")
            for n in local.node_ids:
                role = "master" if n == local.master else "slave "
                click.echo(f"    {n} {role} {local.addresses[n]}  pid {local.children[n].pid}")
            yield local.router_address, local
        finally:
            await local.stop()
            click.echo("\nThe demo cluster was stopped.")


async def _script(d: Demo) -> None:
    c = d.client
    d.step(f"Load {len(SAMPLE)} sample keys through the router (writes go to the master)")
    last = Token(0, 0)
    for k, v in SAMPLE.items():
        last = await c.set(k, v)
    d.say(f"wrote {len(SAMPLE)} keys; the last write is log entry {last.index}")

    d.step("Read them back (each read goes to a random live slave)")
    await d.until(f"the router sees every slave at entry {last.index}",
                  lambda: _router_sees_applied(d, last.index))
    served: Counter[str] = Counter()
    for k in SAMPLE:
        r = await c.get(k, min_index=last)
        served[r.node or "?"] += 1
        d.say(f"{k:14} = {show_value(r.value):9} (served by {r.node}, which has applied "
              f"entry {r.index})")
    d.say(f"{len(SAMPLE)} reads, spread at random: " +
          ", ".join(f"{n} served {served[n]}" for n in sorted(served)))

    d.step("Write and read your own write")
    ix = await c.set("greeting", "hello, replicated world")
    r = await c.get("greeting", min_index=ix)
    d.say(f"wrote entry {ix.index} (epoch {ix.epoch}); read {r.value!r} from {r.node} "
          f"(read token {ix})")

    local = d.local
    if local is None:
        d.say("(crash steps skipped: they need a cluster this demo started)")
        await _final_state(d, None)
        return
    victim = local.node_ids[2]
    master = local.master

    d.step(f"SIGKILL slave {victim} (pid {local.children[victim].pid})")
    before = (await d.node_status(victim))["applied_index"]
    await local.kill(victim)
    d.say(f"{victim} had applied entry {before} when it died")
    await d.until(f"the router marks {victim} down",
                  lambda: _is(d, victim, up=False))

    d.step(f"Write 200 more entries while {victim} is down")
    idx = await asyncio.gather(*(c.set(f"event:{i:04d}", f"payload {i}") for i in range(200)))
    top = max(t.index for t in idx)
    d.say(f"entries {min(t.index for t in idx)}..{top} written and acknowledged by the "
          "master")

    d.step(f"Restart {victim}: it replays its own log, then asks the master for what it missed")
    await local.start_child(victim)
    await d.until(f"{victim} has applied entry {top}", lambda: _applied(d, victim, top))
    st = await d.node_status(victim)
    d.say(f"{victim} asked the master for entries after {st['master_link']['last_sync_from']}"
          f" (its last entry before the crash was {before}) and now holds "
          f"{st['applied_index']} entries")

    d.step(f"SIGKILL the master {master} (pid {local.children[master].pid})")
    await local.kill(master)
    await d.until(f"the router marks {master} down", lambda: _is(d, master, up=False))
    try:
        await c.set("during-outage", "x")
        d.say("unexpected: a write succeeded with the master down")
    except ReplError as exc:
        d.say(f"a write now fails clearly: {exc}")
    try:
        r = await c.get("city:paris")
        d.say(f"a read is still served by {r.node}, which heard from the master within the "
              f"router's --max-lag-ms: city:paris = {show_value(r.value)}")
    except ReplError as exc:
        d.say(f"reads fail too, since no slave is in contact with a master: {exc}")

    d.step(f"Restart the master {master}: every acknowledged write is still there")
    await local.start_child(master)
    await d.until(f"the router sees {master} as master again and the slaves reconnect",
                  lambda: _master_has_quorum(d, master))
    r = await c.get("event:0199", strong=True)
    d.say(f"event:0199 = {r.value!r} (strong read from the master at entry {r.index})")
    ix = await c.set("after-restart", "the master is back")
    d.say(f"wrote after-restart = 'the master is back' as entry {ix.index} "
          f"(read token {ix})")
    await d.until(f"every slave has applied entry {ix.index}",
                  lambda: _all_applied(d, ix.index))
    await _final_state(d, local)


async def _is(d: Demo, node: str, *, up: bool) -> bool:
    view = (await d.router_nodes())[node]
    return bool(view["up"] == up and (not up or view["role"] is not None))


async def _router_sees_applied(d: Demo, index: int) -> bool:
    """Every slave the router sees up has applied ``index``, as far as the router knows: a
    read asking for ``index`` may then go to any of them."""
    slaves = [v for v in (await d.router_nodes()).values() if v["role"] == "slave" and v["up"]]
    return all(v["applied_index"] >= index for v in slaves)


async def _master_has_quorum(d: Demo, master: str) -> bool:
    with contextlib.suppress(ReplError):
        return await _is(d, master, up=True) and bool((await d.node_status(master))["quorum"])
    return False


async def _applied(d: Demo, node: str, index: int) -> bool:
    with contextlib.suppress(ReplError):
        return bool((await d.node_status(node))["applied_index"] >= index)
    return False


async def _all_applied(d: Demo, index: int) -> bool:
    assert d.local is not None
    for n in d.local.node_ids:
        if not await _applied(d, n, index):
            return False
    return True


def _digest(items: list[tuple[str, Value, Token]]) -> str:
    """Of every key, value and token: two nodes agree only when each value came from the
    same write."""
    h = hashlib.sha256()
    for k, v, t in items:
        h.update(repr((k, v, t.epoch, t.index)).encode())
    return h.hexdigest()[:12]


async def _final_state(d: Demo, local: LocalCluster | None) -> None:
    d.step("The final state of every node, side by side")
    targets: dict[str, Address] = {}
    if local is not None:
        targets = {n: local.addresses[n] for n in local.node_ids}
    else:
        for n in (await d.client.status())["nodes"]:
            targets[n["id"]] = Address.parse(n["address"])
    rows = [("NODE", "ROLE", "APPLIED", "KEYS", "DIGEST", "city:paris", "greeting")]
    for node, addr in targets.items():
        try:
            async with await Client.connect(addr, timeout=5) as nc:
                st = await nc.status()
                items = [i async for i in nc.items_with_tokens()]
        except ReplError as exc:
            rows.append((node, "down", "-", "-", "-", "-", str(exc)[:30]))
            continue
        values = {k: v for k, v, _ in items}
        rows.append((node, st["role"], str(st["applied_index"]), str(len(items)),
                     _digest(items), str(values.get("city:paris")),
                     str(values.get("greeting"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        d.say("  ".join(col.ljust(w) for col, w in zip(r, widths, strict=True)).rstrip())
    digests = {r[4] for r in rows[1:] if r[1] != "down"}
    d.say("every node holds the same data" if len(digests) == 1 else
          "the nodes differ (a slave may still be catching up)")
