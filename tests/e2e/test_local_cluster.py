"""A cluster on this machine as a new user starts it: ``replctl cluster up`` and
``cluster restart``, ``replnode``/``replrouter`` started by hand, the demo, and clusters of
3, 5 and 7 nodes."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cluster.client import Client
from cluster.config import Address, NodeConfig
from cluster.errors import ClusterError, ConfigError, NoQuorum
from cluster.local import CONTROL_FILE, LocalCluster, free_ports, port_in_use
from cluster.storage import lock
from cluster.types import Acks, NodeId
from tests.e2e.conftest import FAST_NODE, FAST_ROUTER, wait_applied, wait_for

pytestmark = pytest.mark.e2e

NODE = [sys.executable, "-m", "cluster.cli.node"]
ROUTER = [sys.executable, "-m", "cluster.cli.router"]


def replctl(*args: str, router: object = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cluster.cli.ctl"]
    if router is not None:
        cmd += ["--router", str(router)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


def free_run_of_ports(n: int) -> int:
    """The first of ``n`` consecutive ports no server listens on, chosen outside the
    ephemeral range (where the kernel picks the local ports of outgoing connections, so
    thousands of them can sit in TIME-WAIT) and probed with SO_REUSEADDR as the servers
    bind, so TIME-WAIT does not count as in use."""
    lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = [*range(10_000, lo - n), *range(hi + 1, 65_535 - n)]
    for _ in range(200):
        base = random.choice(candidates)
        if not any(port_in_use(Address("127.0.0.1", p)) for p in range(base, base + n)):
            return base
    raise AssertionError("no run of free ports found")


@contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    """Hold ``port`` with a listening socket, as another server would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield s


@contextmanager
def cluster_up(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``replctl cluster up ARGS`` until it says it is up; its output so far. If the test
    did not stop it, it is stopped at the end with Ctrl-C (SIGKILL if that fails: its
    processes then die with it)."""
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli.ctl", "cluster", "up", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "cluster is up" in line:
                break
        else:
            assert proc.stderr is not None
            pytest.fail(f"cluster up did not come up: {''.join(lines)} {proc.stderr.read()}")
        yield proc, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def pids_of(output: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+\S+\s+\S+\s+pid (\d+)", output,
                                                 re.M)}


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by init counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def until(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- cluster up and cluster restart ----------------------------------------------------------


def test_cluster_up_prints_every_pid_restarts_a_killed_node_and_ctrl_c_stops_everything(
        tmp_path: Path) -> None:
    """`cluster up` prints the router's PID too; a node killed is reported with the command
    that restarts it, only with lines of its own run; `cluster restart` brings it back,
    logging to DATA/logs/, and Ctrl-C of `cluster up` stops it like the others."""
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    (data / "logs" / "n3.log").write_text("OLD-RUN-LINE from a run long ago\n")
    base = free_run_of_ports(5)
    router = f"127.0.0.1:{base}"
    with cluster_up("--base-port", str(base), "--data-dir", str(data)) as (proc, out):
        pids = pids_of(out)
        assert set(pids) == {"router", "n1", "n2", "n3", "n4"}, out
        assert re.search(rf"^router\s+{router}\s+router\s+pid {pids['router']}", out, re.M)
        assert replctl("write", "up", "yes", router=router).returncode == 0
        assert replctl("read", "up", "--strong", router=router).stdout == "yes\n"

        os.kill(pids["n3"], signal.SIGKILL)  # a crash is reported, not restarted
        assert proc.stderr is not None
        crash = proc.stderr.readline()
        assert "n3 exited with code -9; it is not restarted" in crash
        assert f"`replctl cluster restart n3 --data-dir {data}`" in crash
        assert "OLD-RUN-LINE" not in crash and "syncing from master n1" in crash

        written = replctl("write", "while-down", "1", router=router)
        index = int(written.stdout.split("index=")[1].split()[0])
        restarted = replctl("cluster", "restart", "n3", "--data-dir", str(data))
        assert restarted.returncode == 0, restarted.stderr
        new_pid = int(restarted.stdout.split("pid ")[1].split(",")[0])
        assert restarted.stdout.startswith(f"n3 restarted: pid {new_pid}, listening on "
                                           f"127.0.0.1:{base + 3}")
        assert (data / "n3" / "LOCK").read_text() == f"{new_pid}\n"
        until(lambda: replctl("read", "while-down", "--min-index", str(index),
                              router=f"127.0.0.1:{base + 3}").stdout == "1\n",
              "the restarted n3 to catch up")
        log = (data / "logs" / "n3.log").read_text()
        assert log.count("starting n3 ----") == 2
        assert "starts as slave" in log.rsplit("starting n3 ----", 1)[1]

        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "n3 restarted (replctl cluster restart)" in out and "stopped" in out
        for pid in [*pids.values(), new_pid]:
            assert gone(pid), pid
        assert not (data / CONTROL_FILE).exists()
    after = replctl("cluster", "restart", "n3", "--data-dir", str(data))
    assert after.returncode == 1
    assert after.stderr.startswith("Error: cluster: no `replctl cluster up` is running")


def test_the_processes_die_with_a_killed_cluster_up(tmp_path: Path) -> None:
    """SIGKILL of `cluster up` leaves no node behind: each gets SIGTERM when it dies."""
    with cluster_up("--base-port", "0", "--data-dir", str(tmp_path / "data"),
                    "--nodes", "2") as (proc, out):
        pids = pids_of(out)
        assert len(pids) == 3
        try:
            proc.kill()
            proc.wait()
            until(lambda: all(gone(p) for p in pids.values()),
                  "the processes of a killed cluster up to exit")
        finally:
            for pid in pids.values():
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)


def test_cluster_restart_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with cluster_up("--base-port", "0", "--data-dir", str(data), "--nodes", "2") as (proc, _):
        unknown = replctl("cluster", "restart", "n9", "--data-dir", str(data))
        assert unknown.returncode == 1
        assert "there is no 'n9' in this cluster; it has n1, n2, router" in unknown.stderr
        info = (data / CONTROL_FILE).read_text()
        assert oct((data / CONTROL_FILE).stat().st_mode & 0o777) == "0o600"
        (data / CONTROL_FILE).write_text(info.replace('"token": "', '"token": "x'))
        forged = replctl("cluster", "restart", "n2", "--data-dir", str(data))
        assert forged.returncode == 1 and "wrong token" in forged.stderr
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


def test_cluster_up_with_three_nodes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with cluster_up("--base-port", "0", "--nodes", "3", "--data-dir", str(data)) as (proc, out):
        assert "a master, 2 slaves and a router (a majority is 2 of 3 nodes)" in out
        pids = pids_of(out)
        assert set(pids) == {"router", "n1", "n2", "n3"}, out
        router = re.search(r"^router\s+(\S+)", out, re.M)[1]  # type: ignore[index]
        assert replctl("write", "k", "v", "--acks", "majority", router=router).returncode == 0

        # restarting a running node stops it first; that is no crash
        again = replctl("cluster", "restart", "n2", "--data-dir", str(data))
        assert again.returncode == 0, again.stderr
        new_pid = int(again.stdout.split("pid ")[1].split(",")[0])
        assert new_pid != pids["n2"] and gone(pids["n2"])
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "!!" not in err, err
        assert all(gone(p) for p in [*pids.values(), new_pid])


def test_cluster_up_on_a_taken_port_is_one_line_and_leaves_nothing_behind(
        tmp_path: Path) -> None:
    base = free_run_of_ports(5)
    data = tmp_path / "new" / "data"
    with listening(base + 3):
        out = replctl("cluster", "up", "--base-port", str(base), "--data-dir", str(data))
    assert out.returncode == 1
    assert out.stderr == (f"Error: cluster: port {base + 3} on 127.0.0.1 (for n3) is already "
                          f"in use; choose another --base-port (0 picks free ports)\n")
    assert not (tmp_path / "new").exists()


def test_cluster_up_on_a_data_directory_in_use_names_the_pid(cluster: LocalCluster) -> None:
    n1 = cluster.children["n1"].pid
    assert (cluster.data_dir / "n1" / "LOCK").read_text() == f"{n1}\n"
    out = replctl("cluster", "up", "--base-port", "0", "--data-dir", str(cluster.data_dir))
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1
    assert f"data directory {cluster.data_dir / 'n1'} is in use by process {n1}" in out.stderr
    assert "is another `replctl cluster up` running on" in out.stderr

    # replnode on a directory in use names the holder too
    n2 = cluster.children["n2"]
    (port,) = free_ports(1)
    args = [a if a != str(cluster.addresses["n2"]) else f"127.0.0.1:{port}" for a in n2.args]
    cmap = args.index("--cluster") + 1
    args[cmap] = args[cmap].replace(str(cluster.addresses["n2"]), f"127.0.0.1:{port}")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert f"is in use by process {n2.pid}" in proc.stderr.splitlines()[-1]


async def test_a_node_that_cannot_start_fails_the_start_in_one_line_and_is_cleaned_up(
        tmp_path: Path) -> None:
    """The race the port check cannot close (a node fails after the checks) ends the same
    way: the node's own error line, everything stopped, the new directory removed."""
    cl = LocalCluster(tmp_path / "fresh", base_port=0, extra_node_args=["--peer-timeout", "0"])
    with pytest.raises(ClusterError) as err:
        await cl.start()
    assert re.fullmatch(r"n\d could not start: Invalid value for '--peer-timeout': 0\.0 is "
                        r"not in the range x>=0\.01\. \(log: .*\)", str(err.value)), err.value
    assert all(not c.running for c in cl.children.values())
    assert not (tmp_path / "fresh").exists()


def test_a_directory_is_not_removed_while_a_node_holds_its_lock(tmp_path: Path) -> None:
    """The clean-up after a failed start must not delete the data of a node that started on
    the same new directory at the same moment."""
    tree = tmp_path / "data"
    (tree / "n1").mkdir(parents=True)
    held = lock.acquire(tree / "n1" / "LOCK")
    try:
        assert not lock.remove_unless_locked(tree, [tree / "n1" / "LOCK", tree / "n2" / "LOCK"])
        assert (tree / "n1" / "LOCK").exists()
    finally:
        os.close(held)
    assert lock.remove_unless_locked(tree, [tree / "n1" / "LOCK", tree / "n2" / "LOCK"])
    assert not tree.exists()


async def test_tail_shows_only_the_current_run(tmp_path: Path) -> None:
    cl = LocalCluster(tmp_path / "d", base_port=0, extra_node_args=FAST_NODE,
                      extra_router_args=FAST_ROUTER, nodes=2)
    (tmp_path / "d" / "logs").mkdir(parents=True)
    (tmp_path / "d" / "logs" / "n2.log").write_text("OLD-RUN-LINE\n")
    await cl.start()
    try:
        await cl.restart("n2")
        assert "OLD-RUN-LINE" in cl.children["n2"].log_path.read_text()
        lines = cl.log_lines("n2")
        assert "OLD-RUN-LINE" not in cl.tail("n2", 100)
        assert lines and not any("shutting down" in line for line in lines)
    finally:
        await cl.stop()


# --- replnode and replrouter started by hand ---------------------------------------------


@pytest.mark.parametrize("program", ["node", "router"])
def test_a_port_in_use_is_one_clear_line(tmp_path: Path, program: str) -> None:
    (port,) = free_ports(1)
    cmap = f"n1=127.0.0.1:{port}"
    cmd = [*NODE, "--id", "n1", "--data-dir", str(tmp_path / "n1"), "--master", "n1"] \
        if program == "node" else ROUTER
    with listening(port):
        out = subprocess.run([*cmd, "--listen", f"127.0.0.1:{port}", "--cluster", cmap],
                             capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        f"Error: network: cannot listen on 127.0.0.1:{port}: the port is already in use "
        f"(by another replnode, replrouter or program)")
    assert "Errno" not in out.stderr
    assert not (tmp_path / "n1").exists()  # the node's new data directory is not left behind


@pytest.mark.parametrize("listen,cmap,message", [
    ("127.0.0.1:7002", "n1=127.0.0.1:7001,n2=127.0.0.1:7002",
     "listen address 127.0.0.1:7002 does not match n1=127.0.0.1:7001 in the cluster map"),
    ("127.0.0.2:7001", "n1=127.0.0.1:7001", "would look for n1 at 127.0.0.1"),
    ("127.0.0.1:7001", "n1=127.0.0.1:7001,n2=127.0.0.1:7001",
     "nodes 'n1' and 'n2' have the same address 127.0.0.1:7001"),
    ("127.0.0.1:7001", "n1=127.0.0.1:7001,n2=127.0.0.1:0", "node 'n2' has port 0"),
])
def test_replnode_refuses_a_listen_address_not_in_the_map(
        tmp_path: Path, listen: str, cmap: str, message: str) -> None:
    out = subprocess.run([*NODE, "--id", "n1", "--listen", listen, "--cluster", cmap,
                          "--master", "n1", "--data-dir", str(tmp_path / "n1")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "n1").exists()


@pytest.mark.parametrize("listen,own", [
    ("0.0.0.0:7001", "master:7001"),  # a container: every interface, the map names a service
    ("[::]:7001", "n1.example:7001"),
    ("127.0.0.1:7001", "localhost:7001"),  # host names are not resolved: accepted
    ("127.0.0.1:0", "127.0.0.1:7001"),  # port 0: a free port, as the help says
])
def test_a_listen_address_that_matches_the_map_is_accepted(listen: str, own: str) -> None:
    NodeConfig(node_id=NodeId("n1"), listen=Address.parse(listen), data_dir=Path("unused"),
               cluster={NodeId("n1"): Address.parse(own)}, bootstrap_master=NodeId("n1")).validate()


def test_cluster_sizes_and_majorities() -> None:
    for size, majority in [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)]:
        cmap = {NodeId(f"n{i}"): Address("127.0.0.1", 7000 + i) for i in range(1, size + 1)}
        cfg = NodeConfig(node_id=NodeId("n1"), listen=cmap[NodeId("n1")], data_dir=Path("x"),
                         cluster=cmap, bootstrap_master=NodeId("n1"))
        cfg.validate()
        assert cfg.majority == majority
    with pytest.raises(ConfigError, match="same address"):
        NodeConfig(node_id=NodeId("n1"), listen=Address("h", 1), data_dir=Path("x"),
                   cluster={NodeId("n1"): Address("h", 1), NodeId("n2"): Address("h", 1)},
                   bootstrap_master=NodeId("n1")).validate()


@pytest.mark.parametrize("size", [3, 5, 7])
async def test_majority_writes_in_clusters_of_3_5_and_7(tmp_path: Path, size: int) -> None:
    """A majority write needs size//2+1 nodes: it succeeds with size//2 slaves down and is
    refused once one more is down."""
    cl = LocalCluster(tmp_path / "d", base_port=0, nodes=size, extra_node_args=FAST_NODE,
                      extra_router_args=FAST_ROUTER)
    await cl.start()
    try:
        async with await Client.connect(cl.router_address, timeout=10) as c:
            ix = await c.set("k", "all up", acks=Acks.MAJORITY)
            for n in cl.node_ids[1:]:
                await wait_applied(cl, n, ix)
            slaves = cl.node_ids[1:]
            for n in slaves[:size // 2]:
                await cl.kill(n)
            master = await Client.connect(cl.addresses[cl.master], timeout=10)
            async with master:
                async def quorum_lost() -> bool:
                    return not (await master.status())["quorum"]
                assert await c.set("k", f"{size // 2} down", acks=Acks.MAJORITY) > ix
                await cl.kill(slaves[size // 2])
                await wait_for(quorum_lost, "the master to see it has lost its majority")
                with pytest.raises(NoQuorum):
                    await c.set("k", "one too many down", acks=Acks.MAJORITY)
    finally:
        await cl.stop()


# --- the demo --------------------------------------------------------------------------------


def test_demo_runs_to_the_end(tmp_path: Path) -> None:
    out = replctl("demo", "--data-dir", str(tmp_path / "demo"), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for expected in ("SIGKILL slave", "asked the master for entries after",
                     "SIGKILL the master", "a write now fails clearly: unavailable",
                     "every acknowledged write is still there", "every node holds the same data",
                     "The demo cluster was stopped"):
        assert expected in text, expected
    served = re.findall(r"\(served by (n\d), which has applied entry 12\)", text)
    assert len(served) == 12 and len(set(served)) >= 2, text  # all the same: p = 3 / 3**12
    assert "12 reads, spread at random" in text
    last = re.search(r"wrote after-restart = 'the master is back' as entry (\d+)", text)
    assert last is not None, text
    assert f"every slave has applied entry {last[1]}" in text


def test_demo_against_a_running_cluster(cluster: LocalCluster) -> None:
    out = replctl("demo", router=cluster.router_address, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "crash steps skipped" in out.stdout and "every node holds the same data" in out.stdout
