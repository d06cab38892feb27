"""A whole cluster as child processes on this machine: ``replctl cluster up``, the demo and
the end-to-end tests all start nodes through :class:`LocalCluster`.

``replctl cluster up`` also opens a control channel (:func:`control_channel`) through which
``replctl cluster restart NODE`` asks it to restart one of its processes; the channel's
address and a random token are in ``DATA/cluster-up.json`` while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import random
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cluster.config import Address, format_cluster
from cluster.errors import ClusterError, ReplError
from cluster.storage import lock
from cluster.types import NodeId

log = logging.getLogger(__name__)

CONTROL_FILE = "cluster-up.json"
METRICS_OFFSET = 100  # with a base port, metrics ports start this far above it
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports no server listens on now, chosen at random outside the
    ephemeral range: the kernel picks the local ports of outgoing connections there, so on
    a busy machine one of them could take a port between this choice and the server's
    bind. Probed with SO_REUSEADDR as the servers bind, so TIME-WAIT does not count."""
    lo, hi = _ephemeral_range()
    candidates = [*range(10_000, lo), *range(hi + 1, 65_536)]
    rng = random.SystemRandom()
    chosen: list[int] = []
    for _ in range(100 * count + 100):
        port = rng.choice(candidates)
        if port not in chosen and not port_in_use(Address(host, port)):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise ClusterError(f"found no {count} free ports on {host} outside the ephemeral range")


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default
    return lo, hi


def port_in_use(address: Address) -> bool:
    """Whether a server could not listen on ``address`` now. Probes as the servers bind
    (with SO_REUSEADDR), so connections in TIME-WAIT on the port do not count."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address.host, address.port))
        except socket.gaierror:
            raise ClusterError(f"unknown host {address.host!r}") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise ClusterError(f"cannot listen on {address}: {exc.strerror}") from None
    return False


def _die_with(parent: int) -> None:
    """Run in a child before it executes: SIGTERM it when ``parent`` dies, so no node
    outlives the `cluster up`, demo or test that started it, even one killed by SIGKILL."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass(eq=False)
class Child:
    name: str
    args: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    expected_exit: bool = False
    log_file: IO[bytes] | None = field(default=None, repr=False)
    log_offset: int = 0  # where this run's lines start in the log file
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class LocalCluster:
    """A master, slaves and a router as child processes with their own data directories.

    ``nodes`` counts the master too: ``n1`` is the master, ``n2``..``nN`` the slaves. With
    ``base_port`` 0 every process gets a free port; otherwise the router listens on
    ``base_port`` and node ``nK`` on ``base_port + K``. With ``metrics``, each process
    serves Prometheus metrics too (:attr:`metrics_addresses`), on free ports or on
    ``base_port + METRICS_OFFSET`` (the router) and ``base_port + METRICS_OFFSET + K``.
    ``log_format`` (``text`` or ``json``) is passed to every process."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", base_port: int = 7000,
                 nodes: int = 4, fsync: str = "always", extra_node_args: list[str] | None = None,
                 extra_router_args: list[str] | None = None, ready_timeout: float = 20.0,
                 log_format: str = "text", metrics: bool = False) -> None:
        if nodes < 1:
            raise ClusterError(f"a cluster needs at least one node, not {nodes}")
        last = base_port + nodes + (METRICS_OFFSET if metrics else 0)
        if base_port and last > 65535:
            raise ClusterError(f"base port {base_port} leaves no room for {nodes} nodes "
                               f"(the last port would be {last})")
        self.data_dir = data_dir
        self.host = host
        count = (nodes + 1) * (2 if metrics else 1)
        ports = free_ports(count, host) if base_port == 0 else [
            base_port + i for i in range(nodes + 1)] + [
            base_port + METRICS_OFFSET + i for i in range(count - nodes - 1)]
        self.router_address = Address(host, ports[0])
        self.node_ids = [NodeId(f"n{i}") for i in range(1, nodes + 1)]
        self.addresses: dict[str, Address] = {
            n: Address(host, ports[i + 1]) for i, n in enumerate(self.node_ids)}
        # where each process serves its metrics (empty without ``metrics``)
        self.metrics_addresses: dict[str, Address] = {} if not metrics else {
            name: Address(host, port)
            for name, port in zip(["router", *self.node_ids], ports[nodes + 1:], strict=True)}
        common = ["--log-format", log_format] if log_format != "text" else []
        self.master = self.node_ids[0]
        self.ready_timeout = ready_timeout
        cluster_arg = format_cluster(self.addresses)
        logs = data_dir / "logs"
        self.children: dict[str, Child] = {}
        for n in self.node_ids:
            self.children[n] = Child(n, [
                "-m", "cluster.cli.node", "--id", n, "--listen", str(self.addresses[n]),
                "--data-dir", str(data_dir / n), "--cluster", cluster_arg,
                "--master", self.master, "--fsync", fsync, *common,
                *self._metrics_args(n), *(extra_node_args or []),
            ], logs / f"{n}.log")
        self.children["router"] = Child("router", [
            "-m", "cluster.cli.router", "--listen", str(self.router_address),
            "--cluster", cluster_arg, *common, *self._metrics_args("router"),
            *(extra_router_args or []),
        ], logs / "router.log")
        self._crashes: asyncio.Queue[tuple[str, int]] = asyncio.Queue()

    def _metrics_args(self, name: str) -> list[str]:
        addr = self.metrics_addresses.get(name)
        return [] if addr is None else ["--metrics-listen", str(addr)]

    def address_of(self, name: str) -> Address:
        return self.router_address if name == "router" else self.addresses[name]

    async def start(self) -> None:
        """Start every node, then the router. Refuses, before it creates anything, a data
        directory in use or a port taken; when a process then fails to start, it stops the
        others and removes the directories this call created."""
        self._check_free()
        created = self._missing_dirs()
        try:
            (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
            await asyncio.gather(*(self.start_child(n) for n in self.node_ids))
            await self.start_child("router")
        except BaseException:
            await self.stop()
            for path in created:
                lock.remove_unless_locked(path, [
                    self.data_dir / n / "LOCK" for n in self.node_ids
                    if (self.data_dir / n).is_relative_to(path)])
            raise

    def _check_free(self) -> None:
        for n in self.node_ids:
            directory = self.data_dir / n
            pid = lock.holder(directory / "LOCK")
            if pid is not None:
                raise ClusterError(f"{lock.in_use_message(directory, pid)}; is another "
                                   f"`replctl cluster up` running on {self.data_dir}?")
        for name, addr in [*((n, self.address_of(n)) for n in self.children),
                           *((f"{n}'s metrics", a) for n, a in self.metrics_addresses.items())]:
            if port_in_use(addr):
                raise ClusterError(f"port {addr.port} on {addr.host} (for {name}) is already "
                                   f"in use; choose another --base-port (0 picks free ports)")

    def _missing_dirs(self) -> list[Path]:
        """The directories :meth:`start` would create: the outermost missing ancestor of the
        data directory, or else the ones inside it."""
        top = None
        for p in (self.data_dir, *self.data_dir.parents):
            if p.exists():
                break
            top = p
        if top is not None:
            return [top]
        inside = [self.data_dir / "logs", *(self.data_dir / n for n in self.node_ids)]
        return [p for p in inside if not p.exists()]

    async def start_child(self, name: str) -> None:
        """Start (or restart) one process and wait for its READY line."""
        child = self.children[name]
        if child.running:
            raise ClusterError(f"{name} is already running (pid {child.pid})")
        if child.watcher is not None:
            await child.watcher  # the last run's, done or about to be: its process has exited
            child.watcher = None
        child.expected_exit = False
        if child.log_file is None:
            child.log_file = open(child.log_path, "ab")  # noqa: SIM115 - kept for the child's life
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        child.log_file.write(f"---- {stamp} starting {name} ----\n".encode())
        child.log_file.flush()
        child.log_offset = child.log_file.tell()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = child.proc = await asyncio.create_subprocess_exec(
            sys.executable, *child.args, stdout=asyncio.subprocess.PIPE,
            stderr=child.log_file, env=env, start_new_session=True,
            preexec_fn=functools.partial(_die_with, os.getpid()),
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(self.ready_timeout):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        await proc.wait()
                        raise ClusterError(f"{name} could not start: {self._why(name)}")
                    if line.startswith(b"READY "):
                        break
        except TimeoutError:
            await self.kill(name)
            raise ClusterError(f"{name} was not ready within {self.ready_timeout:g}s: "
                               f"{self.tail(name)}") from None
        child.watcher = asyncio.create_task(self._watch(child, proc), name=f"watch {name}")

    def _why(self, name: str) -> str:
        """Why a process exited at start, in one line: its own error line if it wrote one."""
        child = self.children[name]
        lines = self.log_lines(name)
        errors = [line for line in lines if line.startswith("Error: ")]
        code = child.proc.returncode if child.proc else None
        reason = errors[-1][len("Error: "):] if errors else \
            f"it exited with code {code}: {' | '.join(lines[-3:])}"
        return f"{reason} (log: {child.log_path})"

    async def _watch(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if not child.expected_exit and child.proc is proc:
            self._crashes.put_nowait((child.name, code))

    def log_lines(self, name: str) -> list[str]:
        """What the process logged since it was last started (earlier runs' lines are in
        the same file, before :attr:`Child.log_offset`)."""
        child = self.children[name]
        try:
            with open(child.log_path, "rb") as f:
                f.seek(child.log_offset)
                return f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return []

    def tail(self, name: str, lines: int = 5) -> str:
        """The last lines the process logged since it was last started, joined by `` | ``."""
        return " | ".join(self.log_lines(name)[-lines:])

    async def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL by default: a crash) and wait for the process to go."""
        child = self.children[name]
        if not child.running:
            return
        assert child.proc is not None
        child.expected_exit = True
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            await child.proc.wait()

    def signal(self, name: str, sig: int) -> None:
        """Send a signal without waiting (SIGSTOP / SIGCONT for a pause)."""
        child = self.children[name]
        if child.proc is not None and child.running:
            child.proc.send_signal(sig)

    async def restart(self, name: str) -> None:
        """Stop the process if it runs (SIGTERM, SIGKILL after 10 s), then start it again."""
        if name not in self.children:
            raise ClusterError(f"there is no {name!r} in this cluster; it has "
                               f"{', '.join(self.children)}")
        await self._stop_children([self.children[name]], 10.0)
        await self.start_child(name)

    async def wait_crash(self) -> tuple[str, int]:
        """Wait until any child exits unexpectedly; return its name and exit code."""
        return await self._crashes.get()

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child, then SIGKILL what is still running after ``timeout``."""
        await self._stop_children(list(self.children.values()), timeout)
        for c in self.children.values():
            if c.watcher is not None:
                c.watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await c.watcher
                c.watcher = None
            if c.log_file is not None:
                c.log_file.close()
                c.log_file = None

    async def _stop_children(self, children: list[Child], timeout: float) -> None:
        running = [c for c in children if c.running]
        for c in running:
            c.expected_exit = True
            assert c.proc is not None
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGCONT)
                c.proc.send_signal(signal.SIGTERM)
        for c in running:
            assert c.proc is not None
            try:
                async with asyncio.timeout(timeout):
                    await c.proc.wait()
            except TimeoutError:
                log.warning("%s did not stop within %gs; killing it", c.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
                await c.proc.wait()


# --- the control channel of `replctl cluster up` ---------------------------------------------


@contextlib.asynccontextmanager
async def control_channel(data_dir: Path, restart: Callable[[str], Awaitable[dict[str, Any]]]
                          ) -> AsyncIterator[Path]:
    """Serve restart requests while the block runs: a listener on 127.0.0.1 whose port and
    a random token are in ``DATA/cluster-up.json`` (readable by this user only), removed at
    the end. Each request is one JSON line ``{"token", "restart": NAME}``; the answer is one
    JSON line, ``restart(NAME)``'s result with ``"ok": true`` or ``{"ok": false, "error"}``."""
    token = secrets.token_hex(16)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply: dict[str, Any]
        try:
            async with asyncio.timeout(5):
                request = json.loads(await reader.readline())
            if not isinstance(request, dict) or not isinstance(request.get("restart"), str):
                raise ValueError("not a restart request")
            if not secrets.compare_digest(str(request.get("token")), token):
                raise ValueError("wrong token")
            reply = {"ok": True, **await restart(request["restart"])}
        except ReplError as exc:
            reply = {"ok": False, "error": str(exc)}
        except (ValueError, TimeoutError, OSError) as exc:
            reply = {"ok": False, "error": f"bad control request: {exc}"}
        with contextlib.suppress(OSError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    path = data_dir / CONTROL_FILE
    try:
        port = server.sockets[0].getsockname()[1]
        tmp = path.with_name(f".{CONTROL_FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "port": port, "token": token}, f)
        os.replace(tmp, path)
        yield path
    finally:
        server.close()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("token") == token:
                path.unlink()


async def request_restart(data_dir: Path, name: str, timeout: float = 60.0) -> dict[str, Any]:
    """Ask the ``replctl cluster up`` running on ``data_dir`` to restart ``name``; return its
    answer (``pid``, ``log``) once the process is ready again."""
    path = data_dir / CONTROL_FILE
    try:
        info = json.loads(path.read_text())
        pid, port, token = int(info["pid"]), int(info["port"]), str(info["token"])
    except FileNotFoundError:
        raise ClusterError(f"no `replctl cluster up` is running on {data_dir} "
                           f"({path} does not exist)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"cannot read {path}: {exc}") from None
    gone = ClusterError(f"the `replctl cluster up` (pid {pid}) that wrote {path} is no "
                        f"longer running")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise gone from None
    except PermissionError:
        pass
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        raise gone from None
    try:
        writer.write(json.dumps({"token": token, "restart": name}).encode() + b"\n")
        async with asyncio.timeout(timeout):
            await writer.drain()
            line = await reader.readline()
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise ValueError(line)
    except TimeoutError:
        raise ClusterError(f"no answer from `replctl cluster up` (pid {pid}) within "
                           f"{timeout:g}s") from None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"bad answer from `replctl cluster up` (pid {pid}): {exc!r}") \
            from None
    finally:
        writer.close()
    if not reply.get("ok"):
        raise ClusterError(str(reply.get("error")))
    return reply
