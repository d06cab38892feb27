"""``replctl`` as a user runs it: real subprocesses against a real cluster."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cluster.cli.ctl import main
from cluster.client import Client
from cluster.local import LocalCluster, free_ports
from tests.e2e.conftest import wait_applied, wait_for

pytestmark = pytest.mark.e2e


def replctl(*args: str, router: object = None, env: dict[str, str] | None = None,
            stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cluster.cli.ctl"]
    if router is not None:
        cmd += ["--router", str(router)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, input=stdin,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_write_read_delete_show_status(cluster: LocalCluster) -> None:
    r = cluster.router_address
    out = replctl("write", "fruit", "apple", router=r)
    assert out.returncode == 0 and out.stdout.startswith("OK index=1 epoch=1 token=1:1"), out
    token = out.stdout.split("token=")[1].strip()
    read = replctl("read", "fruit", "--min-index", token, router=r)
    assert (read.returncode, read.stdout) == (0, "apple\n")
    lost = replctl("read", "fruit", "--min-index", "7:1", router=r)  # entry 1 is epoch 1
    assert lost.returncode == 1 and "write_lost" in lost.stderr, lost
    assert replctl("write", "veg", "leek", "--acks", "majority", router=r).returncode == 0

    show = replctl("show", "--json", router=r)
    assert json.loads(show.stdout) == {"fruit": "apple", "veg": "leek"}

    assert replctl("delete", "fruit", router=r).returncode == 0
    missing = replctl("read", "fruit", "--strong", router=r)
    assert missing.returncode == 1 and "not found: fruit" in missing.stderr

    status = json.loads(replctl("status", "--json", router=r).stdout)
    rows = {n["id"]: n for n in status["nodes"]}
    assert status["master"] == "n1" and set(rows) == {"n1", "n2", "n3", "n4"}
    assert rows["n1"]["role"] == "master" and all(n["up"] for n in rows.values())
    for key in ("address", "last_index", "applied_index", "lag_entries", "lag_ms"):
        assert key in rows["n2"]
    table = replctl("status", router=r).stdout
    assert "n4" in table and "LAG MS" in table


def test_options_come_from_the_environment(cluster: LocalCluster) -> None:
    env = {"REPL_ROUTER": str(cluster.router_address)}
    assert replctl("write", "e", "nv", env=env).returncode == 0
    assert replctl("read", "e", "--strong", env=env).stdout == "nv\n"


def test_health(cluster: LocalCluster) -> None:
    ok = replctl("health", str(cluster.addresses["n2"]))
    assert ok.returncode == 0 and "n2 (slave) is up" in ok.stdout
    (port,) = free_ports(1)
    down = replctl("health", f"127.0.0.1:{port}")
    assert down.returncode == 1 and down.stderr.startswith("Error: network: cannot connect")


def test_unreachable_router_is_one_line_and_debug_shows_the_traceback() -> None:
    (port,) = free_ports(1)
    out = replctl("read", "k", router=f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "cannot connect" in out.stderr
    debug = replctl("--debug", "read", "k", router=f"127.0.0.1:{port}")
    assert "Traceback" in debug.stderr


def test_shell(cluster: LocalCluster) -> None:
    script = "write a 1\nwrite b 'two words'\nread b\nread zzz\ndelete a\nshow\nstatus\n" \
             "help\nbogus\nexit\n"
    out = replctl("shell", router=cluster.router_address, stdin=script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "OK index=1 epoch=1 token=1:1" in lines and "OK index=2 epoch=1 token=1:2" in lines
    assert "two words" in lines and "(not found: zzz)" in lines
    assert any(line.startswith("b  two words") for line in lines)
    assert "(1 keys)" in lines and any("n4" in line for line in lines)
    assert any("Commands:" in line for line in lines)
    assert "Error: unknown command 'bogus'; type 'help' for the commands" in lines


# --- in-process with CliRunner (each command runs its own event loop in a worker thread) --


async def ctl(cluster: LocalCluster, *args: str, stdin: str | None = None) -> Result:
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, main,
                                   ["--router", str(cluster.router_address), *args], stdin)


async def test_json_and_debug_go_before_or_after_the_command(cluster: LocalCluster) -> None:
    for args in (["--json", "write", "k", "v"], ["write", "k", "v", "--json"]):
        out = await ctl(cluster, *args)
        assert out.exit_code == 0 and "index" in json.loads(out.stdout), out.output
    before, after = await ctl(cluster, "--json", "show"), await ctl(cluster, "show", "--json")
    assert json.loads(before.stdout) == json.loads(after.stdout) == {"k": "v"}
    for args in (["--json", "status"], ["status", "--json"]):
        out = await ctl(cluster, *args)
        assert json.loads(out.stdout)["master"] == "n1", out.output
    for args in (["--debug", "read", "nope"], ["read", "nope", "--debug"]):
        out = await ctl(cluster, *args)
        assert out.exit_code == 1 and "not found: nope" in out.stderr


async def test_health_asks_the_router_when_no_address_is_given(cluster: LocalCluster) -> None:
    out = await ctl(cluster, "health")
    assert out.exit_code == 0 and out.stdout == "router (router) is up\n", out.output
    out = await ctl(cluster, "health", str(cluster.addresses["n3"]), "--json")
    assert json.loads(out.stdout) == {"address": str(cluster.addresses["n3"]), "node": "n3",
                                      "role": "slave", "up": True}


async def test_status_shows_no_figures_for_a_master_that_is_down(cluster: LocalCluster) -> None:
    """The router's last figures for a dead master, beside slaves that applied more since,
    would read as lost data: the row shows ``-`` (null in JSON) instead."""
    assert (await ctl(cluster, "write", "a", "1")).exit_code == 0
    await wait_applied(cluster, "n2", 1)
    await cluster.kill("n1")

    async def router_sees_n1_down() -> bool:
        async with await Client.connect(cluster.router_address, timeout=3) as c:
            nodes = (await c.status())["nodes"]
        return not next(n for n in nodes if n["id"] == "n1")["up"]

    await wait_for(router_sees_n1_down, "the router to mark n1 down")
    rows = {n["id"]: n for n in json.loads((await ctl(cluster, "status", "--json")).stdout)
            ["nodes"]}
    assert (rows["n1"]["last_index"], rows["n1"]["applied_index"]) == (None, None)
    assert rows["n2"]["applied_index"] == 1
    table = (await ctl(cluster, "status")).stdout.splitlines()
    n1 = next(line for line in table if line.startswith("n1"))
    assert n1.split()[2:] == ["master", "DOWN", *"-" * 7], table


async def test_a_read_no_node_can_serve_yet_says_so(cluster: LocalCluster) -> None:
    assert (await ctl(cluster, "write", "k", "v")).exit_code == 0
    out = await ctl(cluster, "read", "k", "--min-index", "999")
    assert out.exit_code == 1
    assert out.stderr.startswith("Error: behind: no node has applied index 999 yet"), out.stderr
    assert "failed" not in out.stderr


async def test_the_shell_explains_wrong_words_and_aligns_show(cluster: LocalCluster) -> None:
    script = ("write onlykey\nwrite k hello world\nwrite k 'hello world'\n"
              "write longer-key 2\nshow\nhelp\n")
    out = await ctl(cluster, "shell", stdin=script)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert "Error: write needs KEY VALUE: VALUE is missing (usage: write KEY VALUE)" in lines
    assert ("Error: write takes KEY VALUE but got 3 words; quotes group words into one: "
            "write k 'hello world'") in lines
    assert "Quote a key or value that has spaces: write greeting 'hello world'" in lines
    show = (await ctl(cluster, "show", "--min-index", "2")).stdout.splitlines()
    assert show == ["k           hello world", "longer-key  2"]
    at = lines.index(show[0])
    assert lines[at:at + 3] == [*show, "(2 keys)"]


def test_replnode_rejects_bad_configuration(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "cluster.cli.node", "--listen", "127.0.0.1:0",
            "--data-dir", str(tmp_path)]
    cases = [
        (["--id", "n9", "--cluster", "n1=127.0.0.1:1", "--master", "n1"], "not in the cluster"),
        (["--id", "n1", "--cluster", "n1=nohost", "--master", "n1"], "expected HOST:PORT"),
        (["--id", "n1", "--cluster", "n1=127.0.0.1:1", "--master", "n2"], "master 'n2'"),
        (["--id", "n1", "--cluster", "n1=127.0.0.1:1", "--master", "n1", "--fsync", "x"],
         "'x' is not one of"),
    ]
    for args, message in cases:
        out = subprocess.run([*base, *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


async def test_the_shell_outlives_the_router_and_reconnects(cluster: LocalCluster) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cluster.cli.ctl", "--router", str(cluster.router_address),
        "shell", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    stdin, stdout = proc.stdin, proc.stdout
    assert stdin is not None and stdout is not None

    async def answer(line: str | None = None) -> str:
        if line is not None:
            stdin.write(f"{line}\n".encode())
            await stdin.drain()
        async with asyncio.timeout(20):
            return (await stdout.readline()).decode().rstrip("\n")

    try:
        assert (await answer()).startswith("connected to")
        assert await answer("write a 1") == "OK index=1 epoch=1 token=1:1"
        await cluster.kill("router")
        assert (await answer("write b 2")).startswith("Error: ")  # its connection is gone
        assert "cannot connect" in await answer("write c 3")  # no router yet: it says so
        await cluster.start_child("router")
        assert (await answer("write d 4")).startswith("OK index=")
        stdin.close()
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
