"""Fixtures for the Docker tier: a private Docker engine, the project's image, the cluster.

The engine is the one `scripts/docker_engine.sh` starts (own data-root, socket and pidfile under
$REPL_DOCKER_DIR, default /tmp/replkv-docker); it is stopped by its PID at the end of the session
and the host firewall is checked to be what it was. No image can be pulled on the machines this
runs on, so the base image is built offline with debootstrap and the project is installed in the
image from wheels made on the host (`.wheelhouse/` in the build context, see the Dockerfile).

Without root, and outside CI, these tests skip. With CI set they never skip: a missing engine
is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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
    env: dict[str, str]
    # What the tests wrote and were told succeeded: key -> value. Nothing here may be lost.
    acked: dict[str, str] = field(default_factory=dict)
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


def build_wheelhouse(engine: Engine) -> None:
    """Wheels for replkv and its dependencies, for the base image's Python, in .wheelhouse/."""
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    WHEELHOUSE.mkdir()
    py = engine.docker(
        "run",
        "--rm",
        BASE_IMAGE,
        "python3",
        "-c",
        "import sys, platform; print('%d.%d' % sys.version_info[:2], platform.machine())",
        timeout=60,
    ).stdout.split()
    version, machine = py[0], py[1]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # Build from a copy of what the image needs, so no build/ or *.egg-info lands in the repo.
    with tempfile.TemporaryDirectory(prefix="replkv-src-") as tmp:
        src = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        shutil.copytree(
            REPO / "cluster", src / "cluster", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        run([*pip, "wheel", "-q", "--no-deps", "-w", WHEELHOUSE, src], timeout=300)
    wheels = sorted(WHEELHOUSE.glob("replkv-*.whl"))
    assert wheels, "pip wheel made no replkv wheel"
    platforms: list[str] = []
    for tag in (
        "manylinux_2_36",
        "manylinux_2_28",
        "manylinux_2_17",
        "manylinux2014",
        "manylinux_2_5",
        "linux",
    ):
        platforms += ["--platform", f"{tag}_{machine}"]
    run(
        [
            *pip,
            "download",
            "-q",
            "--only-binary=:all:",
            "--python-version",
            version,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            WHEELHOUSE,
            wheels[0],
        ],
        timeout=300,
    )


@pytest.fixture(scope="module")
def cluster(docker_engine: Engine) -> Iterator[Cluster]:
    assert shutil.which("docker-compose"), "docker-compose missing after the engine's install step"
    project = f"replkvtest{uuid.uuid4().hex[:8]}"
    image = f"replkv-test:{project}"
    env = dict(
        docker_engine.env,
        REPL_IMAGE=image,
        REPL_BASE_IMAGE=BASE_IMAGE,
        REPL_ROUTER_PORT=str(free_port()),
        DOCKER_BUILDKIT="0",
        COMPOSE_DOCKER_CLI_BUILD="0",
    )
    c = Cluster(docker_engine, project, image, int(env["REPL_ROUTER_PORT"]), env)
    timings = docker_engine.timings
    made_wheelhouse = not WHEELHOUSE.exists()
    try:
        t = time.monotonic()
        build_wheelhouse(docker_engine)
        timings["wheelhouse"] = time.monotonic() - t
        t = time.monotonic()
        # The compose file as shipped builds the image; only the base image is substituted.
        c.compose("build", "--force-rm", "master", timeout=600)
        timings["image build"] = time.monotonic() - t
        t = time.monotonic()
        c.compose("up", "-d", timeout=300)
        c.wait_healthy(timeout=180)
        timings["compose up until healthy"] = time.monotonic() - t
        yield c
    except BaseException:
        log(c.logs(tail=80))
        raise
    finally:
        t = time.monotonic()
        c.compose("down", "-v", "--rmi", "all", "--timeout", "5", timeout=300, check=False)
        if docker_engine.started_here:  # the build stage's untagged images; not on others' engines
            docker_engine.docker("image", "prune", "-f", timeout=120, check=False)
        timings["compose down -v"] = time.monotonic() - t
        if made_wheelhouse:
            shutil.rmtree(WHEELHOUSE, ignore_errors=True)
