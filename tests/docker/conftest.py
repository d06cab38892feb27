"""Fixtures for the Docker tier: a private Docker engine, the project's image, the cluster.

The engine is the one `scripts/docker_engine.sh` starts (own data-root, socket and pidfile under
$REPL_DOCKER_DIR, default /tmp/replkv-docker); it is stopped by its PID at the end of the session
and the host firewall is checked to be what it was. No image can be pulled on the machines this
runs on: the cluster is brought up by running the offline walk-through of docs/DOCKER.md as
written (engine, base image by debootstrap, wheelhouse for the image's Python, build, up), with
only a project name, image tag and router ports of the test's own in the environment; at the end
the page's clean-up block takes it all down.

Without root, and outside CI, these tests skip. With CI set they never skip: a missing engine
is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "scripts" / "docker_engine.sh"
COMPOSE_FILE = REPO / "docker-compose.yml"
WHEELHOUSE = REPO / ".wheelhouse"
BASE_IMAGE = os.environ.get("REPL_BASE_IMAGE", "local/base:latest")
NODE_SERVICES = ("master", "slave1", "slave2", "slave3")
SERVICES = (*NODE_SERVICES, "router")
NODE_PORT = {"master": 7001, "slave1": 7002, "slave2": 7003, "slave3": 7004}
NODE_ID = {"master": "n1", "slave1": "n2", "slave2": "n3", "slave3": "n4"}


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def is_root() -> bool:
    return os.geteuid() == 0


def skip_unless_allowed(what: str) -> None:
    """Skip when this machine may not do `what` (not root, not CI); never skip under CI."""
    if in_ci() or is_root():
        return
    pytest.skip(f"{what} needs root (it installs packages and runs dockerd); set CI=1 to force")


def log(msg: str) -> None:
    print(f"[docker-tier {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline; on failure raise with its output in the message."""
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [str(a) for a in args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"timed out after {timeout:.0f}s: {' '.join(map(str, args))}\n"
            f"stdout: {exc.stdout!r}\nstderr: {exc.stderr!r}"
        ) from exc
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode} after {time.monotonic() - started:.1f}s: "
            f"{' '.join(map(str, args))}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def wait_for(
    what: str,
    probe: Callable[[], Any],
    *,
    timeout: float,
    interval: float = 0.5,
    describe: Callable[[], str] | None = None,
) -> Any:
    """Poll `probe` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except AssertionError as exc:  # a probe may assert; keep the last reason
            last = exc
        if last and not isinstance(last, AssertionError):
            return last
        if time.monotonic() >= deadline:
            extra = f"\n{describe()}" if describe else ""
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}{extra}"
            )
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def replctl_command() -> list[str]:
    """The host's `replctl`: next to this interpreter, else on PATH, else through Python."""
    here = Path(sys.executable).parent / "replctl"
    if here.exists():
        return [str(here)]
    found = shutil.which("replctl")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from cluster.cli.ctl import main; sys.exit(main())"]


# ---------------------------------------------------------------------------------------------
# the engine


@dataclass
class Engine:
    dir: Path
    env: dict[str, str]
    started_here: bool
    timings: dict[str, float] = field(default_factory=dict)

    def docker(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(["docker", *args], env=self.env, timeout=timeout, check=check)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Engine]:
    skip_unless_allowed("the Docker tier")
    engine_dir = Path(os.environ.get("REPL_DOCKER_DIR", "/tmp/replkv-docker"))
    env = dict(os.environ, DOCKER_HOST=f"unix://{engine_dir}/docker.sock")
    already = run(["bash", ENGINE, "status", engine_dir], env=env, check=False).returncode == 0
    engine = Engine(engine_dir, env, started_here=not already)
    timings = engine.timings
    try:
        t = time.monotonic()
        run(["bash", ENGINE, "start", engine_dir], env=env, timeout=300)
        timings["engine start (with install)"] = time.monotonic() - t
        t = time.monotonic()
        run(
            ["bash", ENGINE, "base-image", engine_dir],
            env=dict(env, REPL_BASE_IMAGE=BASE_IMAGE),
            timeout=400,
        )
        timings["base image"] = time.monotonic() - t
        yield engine
    finally:
        for name, secs in timings.items():
            log(f"{name}: {secs:.1f}s")
        if engine.started_here:
            t = time.monotonic()
            stopped = run(["bash", ENGINE, "stop", engine_dir], env=env, timeout=180, check=False)
            log(f"engine stop: {time.monotonic() - t:.1f}s")
            assert stopped.returncode == 0, (
                f"stopping the engine or restoring the host firewall failed:\n{stopped.stderr}"
            )
        else:
            log(f"engine at {engine_dir} was running before the tests: left running")


# ---------------------------------------------------------------------------------------------
# the cluster


@dataclass
class Cluster:
    engine: Engine
    project: str
    image: str
    router_port: int
    resp_port: int
    env: dict[str, str]
    # What the tests wrote and were told succeeded: key -> value. Nothing here may be lost.
    acked: dict[str, str] = field(default_factory=dict)
    # Dangling images and stopped containers on the engine before the tier's builds, and what
    # those builds printed (naming every image and container they made).
    leftovers_before: Leftovers | None = None
    build_output: str = ""
    services = SERVICES
    node_services = NODE_SERVICES
    node_port = NODE_PORT
    node_id = NODE_ID
    wait_for = staticmethod(wait_for)
    log = staticmethod(log)

    @property
    def router(self) -> str:
        return f"127.0.0.1:{self.router_port}"

    def compose(
        self, *args: str, timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(
            ["docker-compose", "-f", COMPOSE_FILE, "-p", self.project, "--ansi", "never", *args],
            env=self.env,
            timeout=timeout,
            check=check,
        )

    def ctl(
        self, *args: str, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """`replctl` on the host, through the router's published port."""
        return run(
            [*replctl_command(), "--router", self.router, *args],
            env=self.env,
            timeout=timeout,
            check=check,
        )

    def node_ctl(
        self, service: str, *args: str, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """`replctl` inside a node's container, talking to that node alone."""
        return self.compose(
            "exec",
            "-T",
            service,
            "replctl",
            "--router",
            f"127.0.0.1:{NODE_PORT[service]}",
            *args,
            timeout=timeout,
            check=check,
        )

    def status(self, via: str | None = None) -> dict[str, dict[str, Any]]:
        """`replctl status --json`, by node id; through the router, or inside one service."""
        if via is None:
            proc = self.ctl("status", "--json", check=True)
        else:
            proc = self.compose("exec", "-T", via, "replctl", "status", "--json", timeout=30)
        return {n["id"]: n for n in json.loads(proc.stdout)["nodes"]}

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def inspect(self, service: str) -> dict[str, Any]:
        cid = self.container(service)
        assert cid, f"no container for {service}"
        return json.loads(self.engine.docker("inspect", cid).stdout)[0]

    def health(self, service: str) -> str:
        state = self.inspect(service)["State"]
        if not state.get("Running"):
            return state.get("Status", "?")
        return state.get("Health", {}).get("Status", "none")

    def healths(self) -> dict[str, str]:
        return {s: self.health(s) for s in SERVICES}

    def logs(self, tail: int = 40) -> str:
        return self.compose("logs", "--no-color", f"--tail={tail}", check=False, timeout=60).stdout

    def wait_healthy(self, services: Sequence[str] = SERVICES, timeout: float = 120) -> None:
        wait_for(
            f"{', '.join(services)} healthy",
            lambda: all(self.health(s) == "healthy" for s in services),
            timeout=timeout,
            describe=lambda: f"health: {self.healths()}\n{self.logs()}",
        )


DOCKER_DOC = REPO / "docs" / "DOCKER.md"
OUR_LABEL = "org.opencontainers.image.title=replkv"


def doc_block(marker: str) -> str:
    """The fenced block that follows `<!-- marker...-->` in docs/DOCKER.md, as written."""
    lines = DOCKER_DOC.read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith(f"<!-- {marker}")), None)
    assert start is not None, f"docs/DOCKER.md has no <!-- {marker} --> block"
    assert lines[start + 1].startswith("```"), f"no fenced block right after <!-- {marker} -->"
    end = next(i for i in range(start + 2, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[start + 2 : end]) + "\n"


def run_doc_block(marker: str, env: dict[str, str], timeout: float) -> str:
    """Run a block of docs/DOCKER.md with bash, stopping at its first failing line; its output."""
    block = doc_block(marker)
    log(f"running the {marker} block of docs/DOCKER.md")
    proc = run(["bash", "-e", "-x", "-c", block], env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(
            f"the {marker} block of docs/DOCKER.md failed (exit {proc.returncode}):\n{block}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return proc.stdout + proc.stderr


# What the classic builder prints for each step's image and container: how a build's leftovers
# are told from those of another session's builds on a shared engine.
BUILD_IDS = re.compile(r"(?:---> |Running in )([0-9a-f]{12})\b")


@dataclass
class Leftovers:
    """Dangling images and stopped containers of no compose project, to compare over time."""

    dangling: set[str]
    stopped: set[str]

    @classmethod
    def now(cls, engine: Engine) -> Leftovers:
        images = engine.docker("images", "-q", "--no-trunc", "--filter", "dangling=true").stdout
        images = images.replace("sha256:", "")
        stopped = set()
        for status in ("exited", "created", "dead"):
            out = engine.docker(
                "ps", "-a", "--no-trunc", "--filter", f"status={status}",
                "--format", '{{.ID}} {{.Label "com.docker.compose.project"}}',
            ).stdout  # fmt: skip
            for line in out.splitlines():
                cid, _, project = line.partition(" ")
                if not project.strip():  # a cluster's stopped nodes are not build leftovers
                    stopped.add(cid)
        return cls(set(images.split()), stopped)

    def new_since(self, before: Leftovers) -> Leftovers:
        return Leftovers(self.dangling - before.dangling, self.stopped - before.stopped)

    def made_by(self, build_output: str) -> Leftovers:
        """Only what those builds made (their output names each step's image and container)."""
        ids = set(BUILD_IDS.findall(build_output))
        return Leftovers(
            {i for i in self.dangling if i[:12] in ids}, {c for c in self.stopped if c[:12] in ids}
        )

    def describe(self, engine: Engine) -> str:
        fmt_image = "image {{.Id}} {{.Config.Labels}}"
        fmt_container = "container {{.Id}} {{.Name}} {{.State.Status}} {{.Config.Cmd}}"
        out = [
            engine.docker("inspect", "--format", fmt_image, i, check=False).stdout.strip()
            for i in sorted(self.dangling)
        ]
        out += [
            engine.docker("inspect", "--format", fmt_container, c, check=False).stdout.strip()
            for c in sorted(self.stopped)
        ]
        return "\n".join(out) or "nothing"


@pytest.fixture(scope="module")
def cluster(docker_engine: Engine) -> Iterator[Cluster]:
    project = f"replkvtest{uuid.uuid4().hex[:8]}"
    image = f"replkv-test:{project}"
    port, resp_port = free_port(), free_port()
    # The walk-through as a user runs it: the page sets REPL_BASE_IMAGE, DOCKER_BUILDKIT and
    # COMPOSE_DOCKER_CLI_BUILD itself, and runs this checkout's python3 (the venv's, with pip).
    walk_env = {
        k: v
        for k, v in docker_engine.env.items()
        if k
        not in {"DOCKER_HOST", "REPL_BASE_IMAGE", "DOCKER_BUILDKIT", "COMPOSE_DOCKER_CLI_BUILD"}
    }
    walk_env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        REPL_DOCKER_DIR=str(docker_engine.dir),
        COMPOSE_PROJECT_NAME=project,
        REPL_IMAGE=image,
        REPL_ROUTER_PORT=str(port),
        REPL_RESP_PORT=str(resp_port),
        # The monitoring profile's image too: the clean-up's `down --rmi all` removes the
        # images the file names, so they must be the test's own, never a user's.
        REPL_PROMETHEUS_IMAGE=f"{image}-prometheus",
    )
    env = dict(
        docker_engine.env,
        COMPOSE_PROJECT_NAME=project,
        REPL_IMAGE=image,
        REPL_BASE_IMAGE=BASE_IMAGE,
        REPL_ROUTER_PORT=str(port),
        REPL_RESP_PORT=str(resp_port),
        REPL_PROMETHEUS_IMAGE=f"{image}-prometheus",
        DOCKER_BUILDKIT="0",
        COMPOSE_DOCKER_CLI_BUILD="0",
    )
    c = Cluster(docker_engine, project, image, port, resp_port, env)
    timings = docker_engine.timings
    had_wheelhouse = WHEELHOUSE.exists()
    c.leftovers_before = Leftovers.now(docker_engine)
    try:
        t = time.monotonic()
        c.build_output += run_doc_block("offline-walkthrough", walk_env, timeout=600)
        timings["walk-through (wheelhouse, build, up)"] = time.monotonic() - t
        t = time.monotonic()
        c.wait_healthy(timeout=180)
        timings["then until healthy"] = time.monotonic() - t
        yield c
    except BaseException:
        log(c.logs(tail=80))
        raise
    finally:
        t = time.monotonic()
        try:
            # In the same shell as the walk-through, as the page says: DOCKER_HOST is set.
            clean_env = dict(walk_env, DOCKER_HOST=docker_engine.env["DOCKER_HOST"])
            run_doc_block("offline-cleanup", clean_env, timeout=300)
        finally:
            timings["clean-up block"] = time.monotonic() - t
            if had_wheelhouse:
                log("note: the walk-through replaced the .wheelhouse/ that was there")
