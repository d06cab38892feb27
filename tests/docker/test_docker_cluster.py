"""The four-node cluster in real containers, driven the way docs/DOCKER.md tells a user to.

One cluster (module scope), brought up by the page's offline walk-through as written, goes
through the steps in order: write through the router's published port; kill a slave, write
more, start it, see it catch up by id; pause a slave, see it DOWN, unpause it, see it catch up;
crash a node and see Docker restart it; scale a slave to two containers on one volume and see
the second exit for good with a clear error; kill the master and see clear errors on writes
and reads, then start it and lose nothing; `down` then `up` and keep every entry. Then
a build that fails, and a check that the tier's builds left no dangling image and no stopped
build container. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.docker.conftest import (
    COMPOSE_FILE,
    OUR_LABEL,
    REPO,
    WHEELHOUSE,
    Leftovers,
    doc_block,
    free_port,
    replctl_command,
    run,
)

# The first test also pays for the session's setup (apt-get, debootstrap, the image build and
# `up`), so it gets far more than the suite's default pytest-timeout; every wait inside has its
# own deadline anyway.
pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

WRITERS = 4


def write_many(cluster: Any, prefix: str, count: int) -> None:
    """Write `count` keys through the published port with the host's replctl; all must succeed."""
    items = {f"{prefix}-{i:03d}": f"value of {prefix} {i}" for i in range(count)}

    def one(kv: tuple[str, str]) -> tuple[str, str, Any]:
        return kv[0], kv[1], cluster.ctl("write", kv[0], kv[1])

    with ThreadPoolExecutor(WRITERS) as pool:
        for key, value, proc in pool.map(one, items.items()):
            assert proc.returncode == 0, f"write {key} failed: {proc.stdout}{proc.stderr}"
            cluster.acked[key] = value


def node_items(cluster: Any, service: str) -> dict[str, str]:
    """Every key and value one node holds, asked of that node alone from inside its container."""
    proc = cluster.node_ctl(service, "show", "--json", check=True)
    data = json.loads(proc.stdout)
    if isinstance(data, dict) and "items" in data:
        data = data["items"]
    if isinstance(data, list):
        return {item["key"]: item["value"] for item in data}
    return dict(data)


def missing_on(cluster: Any, service: str) -> dict[str, str]:
    held = node_items(cluster, service)
    return {k: v for k, v in cluster.acked.items() if held.get(k) != v}


def own_status(cluster: Any, service: str) -> dict[str, Any]:
    """The node's own row of `replctl status --json`, asked of that node directly."""
    proc = cluster.node_ctl(service, "status", "--json", check=True)
    rows = {n["id"]: n for n in json.loads(proc.stdout)["nodes"]}
    return rows[cluster.node_id[service]]


def master_last_index(cluster: Any) -> int:
    return int(own_status(cluster, "master")["last_index"])


def caught_up(cluster: Any, service: str, index: int) -> bool:
    try:
        row = own_status(cluster, service)
    except AssertionError:
        return False
    return row.get("applied_index", -1) >= index


def one_line_error(proc: Any) -> str:
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode != 0, f"expected a failure, got exit 0: {out!r}"
    assert len(out.splitlines()) == 1, f"expected one line, got:\n{out}"
    return out


# ---------------------------------------------------------------------------------------------


def test_cluster_up_and_status_from_host_and_inside(cluster: Any) -> None:
    nodes = cluster.status()
    assert set(nodes) == {"n1", "n2", "n3", "n4"}
    assert nodes["n1"]["role"] == "master"
    assert all(n["up"] for n in nodes.values()), nodes
    # The command docs/DOCKER.md gives: replctl inside the router's container, human output.
    inside = cluster.compose("exec", "-T", "router", "replctl", "status")
    for node_id in ("n1", "n2", "n3", "n4"):
        assert node_id in inside.stdout
    # The image runs as a non-root user.
    uid = cluster.compose("exec", "-T", "master", "id", "-u").stdout.strip()
    assert uid != "0"


def test_writes_through_the_published_port(cluster: Any) -> None:
    write_many(cluster, "first", 30)
    got = cluster.ctl("read", "first-007", check=True).stdout.strip()
    assert got == cluster.acked["first-007"]
    missing = cluster.ctl("read", "no-such-key")
    assert missing.returncode == 1, missing
    index = master_last_index(cluster)
    assert index >= 30
    for service in ("slave1", "slave2", "slave3"):
        cluster.wait_for(
            f"{service} to apply {index}",
            lambda s=service: caught_up(cluster, s, index),
            timeout=60,
        )


def test_redis_cli_through_the_published_resp_port(cluster: Any) -> None:
    """redis-cli on the host, through the router's RESP2 port as the compose file publishes it;
    what it wrote is read back with replctl (and kept in `acked`: no step may lose it)."""
    run(["bash", REPO / "scripts" / "ensure_apt.sh", "redis-tools"], timeout=300)
    cli = ["redis-cli", "-h", "127.0.0.1", "-p", str(cluster.resp_port)]
    assert run([*cli, "ping"]).stdout.strip() == "PONG"
    assert run([*cli, "set", "via-redis", "hello from redis-cli"]).stdout.strip() == "OK"
    cluster.acked["via-redis"] = "hello from redis-cli"
    assert run([*cli, "get", "via-redis"]).stdout.strip() == "hello from redis-cli"
    got = cluster.ctl("read", "via-redis", check=True).stdout.strip()
    assert got == "hello from redis-cli"


# Run inside the router's container (its image has Python): GET /metrics of each service
# named, by its name on the compose network; prints {service: body} as JSON.
SCRAPE = """
import json, sys, urllib.request
out = {}
for service in sys.argv[1:]:
    with urllib.request.urlopen(f"http://{service}:9100/metrics", timeout=10) as r:
        out[service] = r.read().decode()
print(json.dumps(out))
"""


def scrape_all(cluster: Any) -> dict[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """Every process's metrics, scraped from inside the compose network: service ->
    {(sample name, labels): value}, parsed with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    proc = cluster.compose(
        "exec", "-T", "router", "python3", "-c", SCRAPE, *cluster.services, timeout=60
    )
    return {
        service: {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }
        for service, body in json.loads(proc.stdout).items()
    }


def test_every_process_serves_metrics_inside_the_network(cluster: Any) -> None:
    index = master_last_index(cluster)

    def check() -> bool:
        samples = scrape_all(cluster)
        for service in cluster.node_services:
            node = cluster.node_id[service]
            applied = samples[service].get(("replkv_applied_index", frozenset({("node", node)})))
            assert applied is not None and applied >= index, f"{service}: applied {applied}"
        router = samples["router"]
        for node in cluster.node_id.values():
            up = router.get(("replkv_router_node_up", frozenset({("target", node)})))
            assert up == 1, f"the router sees {node} as up={up}"
        sets = router.get(
            ("replkv_requests_total",
             frozenset({("node", "router"), ("type", "set"), ("outcome", "ok")}))
        )  # fmt: skip
        assert sets is not None and sets >= 1, f"router's ok sets: {sets}"
        return True

    cluster.wait_for("every process's metrics", check, timeout=60)


def test_monitoring_profile_scrapes_every_process(cluster: Any) -> None:
    """`--profile monitoring`: Prometheus, built here from Debian's package on the same base,
    scrapes all five processes; its HTTP API, on a published loopback port, says each is up."""
    port = free_port()
    env = dict(cluster.env, REPL_PROMETHEUS_PORT=str(port))  # the image: the test's own tag
    compose: list[str | Path] = ["docker-compose", "-f", COMPOSE_FILE, "-p", cluster.project,
                                 "--ansi", "never", "--profile", "monitoring"]
    expected = {f"{s}:9100" for s in cluster.services}

    def targets() -> dict[str, str]:
        url = f"http://127.0.0.1:{port}/api/v1/targets"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                data = json.load(r)
        except OSError as exc:
            return {"error": str(exc)}
        return {t["labels"]["instance"]: t["health"] for t in data["data"]["activeTargets"]}

    try:
        built = run([*compose, "build", "--force-rm", "prometheus"], env=env, timeout=600)
        cluster.build_output += built.stdout + built.stderr
        run([*compose, "up", "-d", "--no-deps", "prometheus"], env=env, timeout=120)
        cluster.wait_for(
            "Prometheus to scrape all five processes as up",
            lambda: targets() == dict.fromkeys(expected, "up"),
            timeout=90,
            describe=lambda: str(targets()),
        )
    finally:
        run([*compose, "rm", "--stop", "--force", "-v", "prometheus"], env=env, check=False,
            timeout=120)
        cluster.engine.docker("image", "rm", "-f", env["REPL_PROMETHEUS_IMAGE"], check=False)


def test_killed_slave_catches_up_by_id(cluster: Any) -> None:
    cluster.compose("kill", "slave2")
    # A container you kill yourself stays down (whatever the restart policy); the router sees it.
    cluster.wait_for(
        "the router to see n3 down", lambda: not cluster.status()["n3"]["up"], timeout=30
    )
    assert cluster.inspect("slave2")["State"]["Running"] is False

    write_many(cluster, "while-slave2-down", 30)
    index = master_last_index(cluster)
    assert cluster.inspect("slave2")["State"]["Running"] is False, (
        "Docker restarted a killed container"
    )

    cluster.compose("start", "slave2")
    cluster.wait_healthy(["slave2"], timeout=90)
    cluster.wait_for(
        "slave2 to apply every id", lambda: caught_up(cluster, "slave2", index), timeout=60
    )
    assert missing_on(cluster, "slave2") == {}
    row = own_status(cluster, "slave2")
    assert row["last_index"] >= index and row["applied_index"] >= index
    cluster.wait_for(
        "the router to see n3 up again", lambda: cluster.status()["n3"]["up"], timeout=30
    )


def test_paused_slave_is_down_then_catches_up(cluster: Any) -> None:
    """`docker compose pause` (docs/DOCKER.md), not `kill -s SIGSTOP`, which with `init: true`
    stops only the container's init and leaves replnode serving."""
    cluster.compose("pause", "slave1")
    try:
        cluster.wait_for(
            "the router to see paused n2 down",
            lambda: not cluster.status()["n2"]["up"],
            timeout=30,
        )
        assert cluster.inspect("slave1")["State"]["Paused"] is True
        write_many(cluster, "while-slave1-paused", 20)
        index = master_last_index(cluster)
        assert not cluster.status()["n2"]["up"]
    finally:
        cluster.compose("unpause", "slave1", check=False)
    cluster.wait_for(
        "slave1 to apply every id after unpause",
        lambda: caught_up(cluster, "slave1", index),
        timeout=60,
    )
    assert missing_on(cluster, "slave1") == {}
    cluster.wait_for(
        "the router to see n2 up again", lambda: cluster.status()["n2"]["up"], timeout=30
    )


def test_crashed_node_is_restarted_by_docker(cluster: Any) -> None:
    before = cluster.inspect("slave3")
    restarts = before["RestartCount"]
    # A crash, not a `docker kill`: the container's main process dies on its own.
    os.kill(before["State"]["Pid"], signal.SIGKILL)
    cluster.wait_for(
        "Docker to restart slave3",
        lambda: (
            cluster.inspect("slave3")["RestartCount"] > restarts
            and cluster.inspect("slave3")["State"]["Running"]
        ),
        timeout=60,
    )
    cluster.wait_healthy(["slave3"], timeout=90)
    write_many(cluster, "after-slave3-crash", 5)
    index = master_last_index(cluster)
    cluster.wait_for("slave3 to catch up", lambda: caught_up(cluster, "slave3", index), timeout=60)
    assert missing_on(cluster, "slave3") == {}


def test_scaled_slave_on_a_locked_volume_exits_instead_of_looping(cluster: Any) -> None:
    """`--scale slave3=2` starts a second container on slave3's volume: it must fail to lock
    the data directory, say so in one line, and stay exited after the restart policy's tries,
    while the first keeps running."""
    first = cluster.inspect("slave3")
    cluster.compose("up", "-d", "--no-deps", "--scale", "slave3=2", "slave3")
    try:
        second = cluster.engine.docker(
            "ps",
            "-a",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={cluster.project}",
            "--filter",
            "label=com.docker.compose.service=slave3",
            "--filter",
            "label=com.docker.compose.container-number=2",
        ).stdout.strip()
        assert second, "no second slave3 container"

        def gave_up() -> dict[str, Any] | None:
            info = json.loads(cluster.engine.docker("inspect", second).stdout)[0]
            state = info["State"]
            if state["Status"] == "exited" and not state["Restarting"]:
                return dict(info)
            return None

        info = cluster.wait_for("the second slave3 to give up", gave_up, timeout=90)
        policy = info["HostConfig"]["RestartPolicy"]
        assert policy == {"Name": "on-failure", "MaximumRetryCount": 5}, policy
        assert info["RestartCount"] == 5, info["RestartCount"]
        assert info["State"]["ExitCode"] != 0
        logs = cluster.engine.docker("logs", second).stderr.strip().splitlines()
        errors = [ln for ln in logs if ln.startswith("Error:")]
        assert len(errors) == 6, logs  # one clear line per try, no traceback
        assert all("/data" in ln and "config" in ln for ln in errors), errors
        assert not any("Traceback" in ln for ln in logs), logs
        now = json.loads(cluster.engine.docker("inspect", first["Id"]).stdout)[0]["State"]
        assert now["Running"] and now["StartedAt"] == first["State"]["StartedAt"], now
    finally:
        cluster.compose("up", "-d", "--no-deps", "--scale", "slave3=1", "slave3")
    assert cluster.container("slave3") == first["Id"]
    cluster.wait_healthy(["slave3"], timeout=60)


def test_killed_master_writes_fail_clearly_reads_go_on_nothing_lost(cluster: Any) -> None:
    index = master_last_index(cluster)
    for service in ("slave1", "slave2", "slave3"):
        cluster.wait_for(
            f"{service} at {index}", lambda s=service: caught_up(cluster, s, index), timeout=60
        )

    cluster.compose("kill", "master")
    assert cluster.inspect("master")["State"]["Running"] is False

    def write_refused() -> str | None:
        proc = cluster.ctl("write", "during-master-down", "x")
        if proc.returncode == 0:
            return None
        return one_line_error(proc)

    message = cluster.wait_for("writes to be refused", write_refused, timeout=30)
    assert "unavailable" in message.lower(), message
    assert message.startswith("Error:"), message
    # Every write while the master is down gets the same clear answer, not a hang or a traceback.
    for _ in range(3):
        message = one_line_error(cluster.ctl("write", "during-master-down", "x", timeout=30))
        assert "unavailable" in message.lower(), message
    cluster.wait_for(
        "the router to see n1 down", lambda: not cluster.status()["n1"]["up"], timeout=30
    )
    # Reads fail as clearly: no slave is in contact with a master (the router's
    # --max-lag-ms); they come back with the master, and nothing is lost.
    for key in ("first-000", "while-slave2-down-029", "after-slave3-crash-004"):
        message = one_line_error(cluster.ctl("read", key, timeout=30))
        assert "unavailable: no master is reachable" in message, message

    cluster.compose("start", "master")
    cluster.wait_healthy(["master"], timeout=90)

    def write_accepted() -> bool:
        return cluster.ctl("write", "after-master-back", "y").returncode == 0

    cluster.wait_for("writes to be accepted again", write_accepted, timeout=60)
    cluster.acked["after-master-back"] = "y"
    assert missing_on(cluster, "master") == {}
    assert master_last_index(cluster) > index
    new_index = master_last_index(cluster)
    for service in ("slave1", "slave2", "slave3"):
        cluster.wait_for(
            f"{service} at {new_index}",
            lambda s=service: caught_up(cluster, s, new_index),
            timeout=60,
        )
        assert missing_on(cluster, service) == {}


def test_down_then_up_keeps_the_data(cluster: Any) -> None:
    index = master_last_index(cluster)
    cluster.compose("down", "--timeout", "10")
    assert cluster.compose("ps", "-q").stdout.strip() == ""
    cluster.compose("up", "-d")
    cluster.wait_healthy(timeout=120)
    assert master_last_index(cluster) >= index
    for service in cluster.node_services:
        cluster.wait_for(
            f"{service} at {index}", lambda s=service: caught_up(cluster, s, index), timeout=60
        )
        assert missing_on(cluster, service) == {}
    for key in ("first-001", "after-master-back"):
        assert cluster.ctl("read", key, check=True).stdout.strip() == cluster.acked[key]


def test_generated_file_runs_a_master_and_five_slaves(cluster: Any, tmp_path: Path) -> None:
    """`scripts/compose_gen.py 5` (docs/DOCKER.md, "Another number of slaves") on the image the
    walk-through built: six nodes that all see each other and all apply a write."""
    path = tmp_path / "docker-compose.five.yml"
    path.write_text(run([sys.executable, REPO / "scripts" / "compose_gen.py", "5"]).stdout)
    port = free_port()
    env = dict(cluster.env, REPL_ROUTER_PORT=str(port), REPL_RESP_PORT=str(free_port()))
    # Its paths (build contexts, Prometheus's configuration) are relative to the repository,
    # where the page writes the file.
    compose: list[str | Path] = ["docker-compose", "-f", path, "--project-directory", REPO,
                                 "-p", f"{cluster.project}five", "--ansi", "never"]
    ctl = [*replctl_command(), "--router", f"127.0.0.1:{port}"]
    nodes = {f"n{i}" for i in range(1, 7)}

    def status() -> dict[str, Any]:
        proc = run([*ctl, "status", "--json"], env=env, timeout=30, check=False)
        if proc.returncode != 0:
            return {}
        return {n["id"]: n for n in json.loads(proc.stdout)["nodes"]}

    try:
        run([*compose, "up", "-d", "--no-build"], env=env, timeout=300)
        cluster.wait_for(
            "six nodes up behind the router",
            lambda: set(status()) == nodes and all(n["up"] for n in status().values()),
            timeout=120,
            describe=lambda: str(status()),
        )
        wrote = run([*ctl, "write", "five-slaves", "yes"], env=env, timeout=30)
        index = int(wrote.stdout.split("index=")[1].split()[0])
        cluster.wait_for(
            f"every node to apply {index}",
            lambda: all(n.get("applied_index", -1) >= index for n in status().values()),
            timeout=60,
            describe=lambda: str(status()),
        )
    finally:
        run([*compose, "down", "-v", "--timeout", "5"], env=env, timeout=300, check=False)


def test_failed_build_leaves_no_container_and_prune_removes_its_image(
    cluster: Any, tmp_path: Path
) -> None:
    """The walk-through's build command on a wheelhouse that lacks msgpack (as when it holds
    wheels for another Python): it fails with pip's message, `--force-rm` removes the failed
    step's container, and the page's prune command removes the image of its last good step."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in (
        "Dockerfile",
        ".dockerignore",
        "docker-compose.yml",
        "pyproject.toml",
        "README.md",
    ):
        shutil.copy2(REPO / name, ctx / name)
    shutil.copytree(
        REPO / "cluster", ctx / "cluster", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    shutil.copytree(REPO / "deploy" / "compose", ctx / "deploy" / "compose")  # the file names it
    wheels = ctx / ".wheelhouse"
    wheels.mkdir()
    for wheel in WHEELHOUSE.glob("*.whl"):
        if not wheel.name.startswith("msgpack-"):
            shutil.copy2(wheel, wheels / wheel.name)
    before = Leftovers.now(cluster.engine)
    build = next(
        ln
        for ln in doc_block("offline-walkthrough").splitlines()
        if ln.startswith("docker-compose build")
    )
    args = build.split("#")[0].split()[1:]  # ["build", "--force-rm"]
    env = dict(cluster.env, REPL_IMAGE=f"{cluster.image}-broken")
    compose: list[str | Path] = ["docker-compose", "-f", ctx / "docker-compose.yml",
                                 "-p", f"{cluster.project}b"]
    proc = run([*compose, *args], env=env, cwd=ctx, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    cluster.build_output += output
    assert proc.returncode != 0, "the build with no msgpack wheel succeeded"
    assert "No matching distribution found for msgpack" in output
    left = Leftovers.now(cluster.engine).new_since(before).made_by(output)
    assert left.stopped == set(), f"the failed build left:\n{left.describe(cluster.engine)}"
    assert left.dangling, "the failed build left no image to prune: is the test still right?"

    prune = next(
        ln
        for ln in doc_block("offline-cleanup").splitlines()
        if ln.startswith("docker image prune")
    )
    assert OUR_LABEL in prune
    cluster.engine.docker(*prune.split("#")[0].split()[1:])
    left = Leftovers.now(cluster.engine).new_since(before).made_by(output)
    assert left.dangling == set(), f"after the prune:\n{left.describe(cluster.engine)}"


def test_builds_left_no_dangling_image_or_stopped_container(cluster: Any) -> None:
    """After every build of the tier (the walk-through's, the failed one) and the prune the
    page gives: no untagged image and no stopped container that those builds made. (On an
    engine this session started, nothing new at all.)"""
    left = Leftovers.now(cluster.engine).new_since(cluster.leftovers_before)
    if not cluster.engine.started_here:  # other sessions may be building on it too
        left = left.made_by(cluster.build_output)
    assert left.dangling == set() and left.stopped == set(), left.describe(cluster.engine)
