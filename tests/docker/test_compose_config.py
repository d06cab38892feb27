"""Fast, offline checks of docker-compose.yml and the Dockerfile: no daemon, no image.

`docker-compose config` validates the file against Compose's schema and resolves anchors and
`${VAR:-default}` interpolation; the structural checks read what it resolved. Compose v2
(`docker compose`) is checked too when the machine has it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.docker.conftest import (
    COMPOSE_FILE,
    ENGINE,
    NODE_ID,
    NODE_PORT,
    NODE_SERVICES,
    REPO,
    SERVICES,
    run,
    skip_unless_allowed,
)

OFFLINE = {"DOCKER_HOST": "unix:///nonexistent"}
PROMETHEUS_FILE = REPO / "deploy" / "compose" / "prometheus.yml"
METRICS_PORT = 9100

try:
    import yaml
except ImportError:  # PyYAML is in the `test` extra; CI installs it, so never skip there
    if os.environ.get("CI"):
        raise
    pytest.skip("PyYAML is not installed (pip install -e '.[test]')", allow_module_level=True)


def compose_v1() -> str:
    found = shutil.which("docker-compose")
    if found:
        return found
    skip_unless_allowed("installing docker-compose")
    run(["bash", ENGINE, "install"], timeout=300)
    found = shutil.which("docker-compose")
    assert found, "scripts/docker_engine.sh install did not provide docker-compose"
    return found


def config(extra_env: dict[str, str] | None = None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPL_")}
    env.update(OFFLINE)
    env.update(extra_env or {})
    return run(
        [compose_v1(), "-f", COMPOSE_FILE, "config", *args], env=env, timeout=60, check=False
    )


def resolved(extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = config(extra_env)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_compose_file_is_valid_offline() -> None:
    proc = config(None, "-q")
    assert proc.returncode == 0, f"docker-compose config -q failed:\n{proc.stderr}"
    assert proc.stdout == ""
    # Compose v2 reads the same file; checked too where the machine has the plugin.
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        env = dict(os.environ, **OFFLINE)
        proc = run([docker, "compose", "-f", COMPOSE_FILE, "config", "-q"], env=env, check=False)
        assert proc.returncode == 0, f"docker compose (v2) config -q failed:\n{proc.stderr}"


def test_the_offline_check_catches_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE_FILE.read_text().replace("restart: on-failure:5", "restart: [oops]", 1)
    )
    env = dict(os.environ, **OFFLINE)
    proc = run([compose_v1(), "-f", broken, "config", "-q"], env=env, check=False)
    assert proc.returncode != 0 and "restart" in proc.stderr, proc.stderr


def test_file_has_no_version_key_and_parses_as_plain_yaml() -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "version" not in raw, "the `version:` key is obsolete in v2 and not needed by v1.27+"
    assert set(raw["services"]) == {*SERVICES, "prometheus"}


def test_five_services_one_image_restart_policy_and_init() -> None:
    services = resolved()["services"]
    assert set(services) == {*SERVICES, "prometheus"}
    images = {services[s]["image"] for s in SERVICES}
    assert images == {"replkv:latest"}
    for name, svc in services.items():
        # A crash is restarted; a process that cannot start (a locked data directory, a bad
        # setting) gives up after a few tries instead of looping (docs/DOCKER.md says why).
        assert svc["restart"] == "on-failure:5", name
        assert svc.get("init") is True, f"{name}: PID 1 should be an init that forwards signals"
    # One service builds the image (v2 would otherwise build it once per service); the others
    # never try to pull it (it is on no registry) and start after the one that builds it.
    build = services["master"]["build"]
    assert build["args"]["BASE_IMAGE"] == "python:3.12-slim"
    assert Path(build["context"]) == REPO
    for name in SERVICES:
        assert "profiles" not in services[name], f"{name} must start without a profile"
        if name == "master":
            continue
        assert "build" not in services[name], name
        assert services[name].get("pull_policy") == "never", name
        assert "master" in services[name]["depends_on"], name


def test_named_volume_per_node_mounted_at_data() -> None:
    cfg = resolved()
    services = cfg["services"]
    sources = []
    for name in NODE_SERVICES:
        vols = services[name].get("volumes", [])
        data = [
            v for v in vols if (v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/data"
        ]
        assert len(data) == 1, f"{name} has no volume at /data: {vols}"
        v = data[0]
        source = v["source"] if isinstance(v, dict) else v.split(":")[0]
        if isinstance(v, dict):
            assert v.get("type", "volume") == "volume", (
                f"{name}: /data must be a named volume, not {v}"
            )
        assert source in cfg["volumes"], f"{name}: {source} is not a declared named volume"
        sources.append(source)
        assert services[name]["environment"]["REPL_DATA_DIR"] == "/data"
    assert len(set(sources)) == 4, f"each node needs its own volume: {sources}"
    assert "volumes" not in services["router"] or not services["router"]["volumes"]


def test_router_port_published_on_loopback_and_overridable() -> None:
    def published(cfg: dict[str, Any]) -> list[tuple[str, str, str]]:
        out = []
        for p in cfg["services"]["router"]["ports"]:
            if isinstance(p, dict):
                out.append((p.get("host_ip", ""), str(p["published"]), str(p["target"])))
            else:  # v1 prints "127.0.0.1:7000:7000/tcp"
                m = re.fullmatch(r"(?:(.+):)?(\d+):(\d+)(?:/tcp)?", p)
                assert m, p
                out.append((m.group(1) or "", m.group(2), m.group(3)))
        return out

    # The native port and the Redis (RESP2) port, each on a host port of its own.
    assert published(resolved()) == [("127.0.0.1", "7000", "7000"), ("127.0.0.1", "6380", "6379")]
    overridden = resolved(
        {"REPL_ROUTER_PORT": "17123", "REPL_RESP_PORT": "16379", "REPL_ROUTER_BIND": "0.0.0.0"}
    )
    assert published(overridden) == [("0.0.0.0", "17123", "7000"), ("0.0.0.0", "16379", "6379")]
    for name in NODE_SERVICES:
        assert not resolved()["services"][name].get("ports"), f"{name} should not be published"


def test_healthchecks_use_replctl_health_on_each_own_port() -> None:
    services = resolved()["services"]
    ports = dict(NODE_PORT, router=7000)
    for name in SERVICES:
        hc = services[name].get("healthcheck")
        assert hc, f"{name} has no healthcheck"
        assert hc["test"] == ["CMD", "replctl", "health", f"127.0.0.1:{ports[name]}"], name
        assert not hc.get("disable")


def test_environment_describes_one_consistent_cluster() -> None:
    services = resolved()["services"]
    cluster = services["master"]["environment"]["REPL_CLUSTER"]
    members = dict(item.split("=", 1) for item in cluster.split(","))
    assert members == {NODE_ID[s]: f"{s}:{NODE_PORT[s]}" for s in NODE_SERVICES}
    for name in NODE_SERVICES:
        env = services[name]["environment"]
        assert services[name]["command"] == ["replnode"]
        assert env["REPL_ID"] == NODE_ID[name]
        assert env["REPL_LISTEN"] == f"0.0.0.0:{NODE_PORT[name]}"
        assert env["REPL_CLUSTER"] == cluster
        assert env["REPL_MASTER"] == "n1"
        assert env["REPL_FSYNC"] in {"always", "everysec", "no"}
    router = services["router"]
    assert router["command"] == ["replrouter"]
    assert router["environment"]["REPL_LISTEN"] == "0.0.0.0:7000"
    assert router["environment"]["REPL_RESP_LISTEN"] == "0.0.0.0:6379"
    # Every process serves its metrics on the same port of its own container.
    for name in SERVICES:
        env = services[name]["environment"]
        assert env["REPL_METRICS_LISTEN"] == f"0.0.0.0:{METRICS_PORT}", name
    assert router["environment"]["REPL_CLUSTER"] == cluster
    assert router["depends_on"]["master"]["condition"] == "service_healthy"


def test_image_and_base_are_substitutable_for_the_offline_build() -> None:
    cfg = resolved(
        {
            "REPL_IMAGE": "replkv-test:x",
            "REPL_BASE_IMAGE": "local/base:latest",
            "REPL_FSYNC": "always",
        }
    )
    assert cfg["services"]["master"]["build"]["args"]["BASE_IMAGE"] == "local/base:latest"
    # Prometheus is built from the same base (it installs Debian's package there).
    assert cfg["services"]["prometheus"]["build"]["args"]["BASE_IMAGE"] == "local/base:latest"
    for name in SERVICES:
        svc = cfg["services"][name]
        assert svc["image"] == "replkv-test:x", name
        if name != "router":
            assert svc["environment"]["REPL_FSYNC"] == "always"


def test_dockerfile_base_is_an_argument_and_runs_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    first_from = next(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    assert "ARG BASE_IMAGE=python:3.12-slim" in lines[:first_from]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    # One stage: a build stage would be left behind as a dangling image after every build.
    assert froms == ["FROM ${BASE_IMAGE}"], froms
    # The label goes first, so every intermediate image and build container carries it and
    # `docker image prune --filter label=org.opencontainers.image.title=replkv` finds them.
    assert lines[first_from + 1].startswith('LABEL org.opencontainers.image.title="replkv"')
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}, users
    ignore = (REPO / ".dockerignore").read_text().split()
    assert "*" in ignore and "!cluster" in ignore and "!pyproject.toml" in ignore


def mount(v: str | dict[str, Any]) -> tuple[str, str, str]:
    """(source, target, mode) of a volume as `config` prints it (v1: short syntax)."""
    if isinstance(v, dict):
        return v["source"], v["target"], "ro" if v.get("read_only") else "rw"
    source, target, *mode = v.split(":")
    return source, target, mode[0] if mode else "rw"


def test_monitoring_profile_runs_prometheus_built_here_on_the_shipped_config() -> None:
    services = resolved()["services"]
    prom = services["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert prom["image"] == "replkv-prometheus:latest"
    assert Path(prom["build"]["context"]) == REPO / "deploy" / "compose" / "prometheus"
    assert prom["build"]["args"]["BASE_IMAGE"] == "python:3.12-slim"
    assert prom["restart"] == "on-failure:5"
    assert prom.get("init") is True
    mounts = {target: (source, mode) for source, target, mode in map(mount, prom["volumes"])}
    assert mounts["/etc/prometheus/prometheus.yml"] == (str(PROMETHEUS_FILE), "ro"), (
        "the configuration is mounted read-only"
    )
    assert mounts["/var/lib/prometheus"][0] in resolved()["volumes"], "data in a named volume"
    assert prom["ports"] == ["127.0.0.1:9090:9090/tcp"]
    other = resolved({"REPL_PROMETHEUS_PORT": "19090", "REPL_PROMETHEUS_CONFIG": "/x/p.yml"})
    other_prom = other["services"]["prometheus"]
    assert other_prom["ports"] == ["127.0.0.1:19090:9090/tcp"]
    assert ("/x/p.yml", "/etc/prometheus/prometheus.yml", "ro") in map(mount, other_prom["volumes"])
    # Its Dockerfile builds from the same base argument as replkv's, without a registry.
    text = (REPO / "deploy" / "compose" / "prometheus" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.12-slim" in text and "FROM ${BASE_IMAGE}" in text
    assert "apt-get install" in text and " prometheus" in text


def test_prometheus_config_scrapes_every_process_of_the_cluster() -> None:
    cfg = yaml.safe_load(PROMETHEUS_FILE.read_text())
    (job,) = cfg["scrape_configs"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == sorted(f"{s}:{METRICS_PORT}" for s in SERVICES)
    services = resolved()["services"]
    for target in targets:
        service, port = target.split(":")
        listen = services[service]["environment"]["REPL_METRICS_LISTEN"]
        assert listen.rsplit(":", 1)[1] == port, f"{service} serves metrics on {listen}"


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, REPO / "scripts" / "compose_gen.py", *args], check=False)


def test_compose_file_is_the_generator_output_for_three_slaves() -> None:
    proc = generate("3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == COMPOSE_FILE.read_text(), (
        "docker-compose.yml differs from `python3 scripts/compose_gen.py 3`: change the "
        "generator, then regenerate the file"
    )
    proc = generate("--prometheus", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PROMETHEUS_FILE.read_text(), (
        "deploy/compose/prometheus.yml differs from `python3 scripts/compose_gen.py "
        "--prometheus 3`: regenerate it"
    )


@pytest.mark.parametrize("slaves", [1, 5])
def test_generated_file_for_another_number_of_slaves(tmp_path: Path, slaves: int) -> None:
    proc = generate(str(slaves))
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / f"docker-compose.{slaves}.yml"
    path.write_text(proc.stdout)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPL_")}
    env.update(OFFLINE)
    # Paths in the file (the build contexts, Prometheus's configuration) are relative to the
    # repository, where docs/DOCKER.md says to write it.
    out = run(
        [compose_v1(), "-f", path, "--project-directory", REPO, "config"], env=env, timeout=60
    )
    services = yaml.safe_load(out.stdout)["services"]
    slave_names = [f"slave{i}" for i in range(1, slaves + 1)]
    assert set(services) == {"master", "router", "prometheus", *slave_names}
    services.pop("prometheus")
    members = {f"n{i + 2}": f"slave{i + 1}:{7002 + i}" for i in range(slaves)}
    members["n1"] = "master:7001"
    volumes = set()
    for name, svc in services.items():
        cluster = svc["environment"]["REPL_CLUSTER"]
        assert dict(item.split("=", 1) for item in cluster.split(",")) == members, name
        assert svc["restart"] == "on-failure:5", name
        if name != "router":
            volumes.add(
                svc["volumes"][0]["source"]
                if isinstance(svc["volumes"][0], dict)
                else svc["volumes"][0].split(":")[0]
            )
    assert len(volumes) == slaves + 1, "each node needs its own volume"
    assert set(services["router"]["depends_on"]) == {"master", *slave_names}
    # The scrape configuration for the same cluster names every process.
    prom = generate("--prometheus", str(slaves))
    assert prom.returncode == 0, prom.stderr
    (job,) = yaml.safe_load(prom.stdout)["scrape_configs"]
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{s}:{METRICS_PORT}" for s in services}


@pytest.mark.parametrize(
    "bad", [["0"], ["21"], ["three"], [""], ["--prometheus", "0"], ["--prometheus"], ["3", "4"]]
)
def test_generator_refuses_a_bad_count_in_one_line(bad: list[str]) -> None:
    proc = generate(*bad)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
