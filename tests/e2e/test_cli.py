"""``replctl`` as a user runs it: real subprocesses against a real cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local import LocalCluster, free_ports

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
    assert out.returncode == 0 and out.stdout.startswith("OK index=1"), out
    index = int(out.stdout.split("=")[1])
    read = replctl("read", "fruit", "--min-index", str(index), router=r)
    assert (read.returncode, read.stdout) == (0, "apple\n")
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


@pytest.mark.parametrize("args,message", [
    (["--router", "nonsense", "status"], "expected HOST:PORT"),
    (["--router", "127.0.0.1:99999", "status"], "port out of range"),
    (["write", "only-a-key"], "Missing argument 'VALUE'"),
    (["read", "k", "--min-index", "-3"], "-3 is not in the range"),
    (["frobnicate"], "No such command"),
])
def test_bad_arguments_give_one_clear_line(args: list[str], message: str) -> None:
    out = replctl(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


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
    assert "OK index=1" in lines and "OK index=2" in lines
    assert "two words" in lines and "(not found: zzz)" in lines
    assert any(line.startswith("b  two words") for line in lines)
    assert "(1 keys)" in lines and any("n4" in line for line in lines)
    assert any("Commands:" in line for line in lines)
    assert any("bad command" in line for line in lines)


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
