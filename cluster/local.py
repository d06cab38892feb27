"""A whole cluster as child processes on this machine: ``replctl cluster up``, the demo and
the end-to-end tests all start nodes through :class:`LocalCluster`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cluster.config import Address, format_cluster
from cluster.errors import ReplError
from cluster.types import NodeId

log = logging.getLogger(__name__)


class ClusterError(ReplError):
    code = "cluster"


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the OS reports free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(eq=False)
class Child:
    name: str
    args: list[str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    expected_exit: bool = False
    log_file: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class LocalCluster:
    """A master, slaves and a router as child processes with their own data directories."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", base_port: int = 7000,
                 nodes: int = 4, fsync: str = "always", extra_node_args: list[str] | None = None,
                 extra_router_args: list[str] | None = None, ready_timeout: float = 20.0
                 ) -> None:
        self.data_dir = data_dir
        self.host = host
        ports = free_ports(nodes + 1, host) if base_port == 0 else [
            base_port + i for i in range(nodes + 1)]
        self.router_address = Address(host, ports[0])
        self.node_ids = [NodeId(f"n{i}") for i in range(1, nodes + 1)]
        self.addresses = {n: Address(host, ports[i + 1]) for i, n in enumerate(self.node_ids)}
        self.master = self.node_ids[0]
        self.ready_timeout = ready_timeout
        cluster_arg = format_cluster(self.addresses)
        logs = data_dir / "logs"
        self.children: dict[str, Child] = {}
        for n in self.node_ids:
            self.children[n] = Child(n, [
                "-m", "cluster.cli.node", "--id", n, "--listen", str(self.addresses[n]),
                "--data-dir", str(data_dir / n), "--cluster", cluster_arg,
                "--master", self.master, "--fsync", fsync, *(extra_node_args or []),
            ], logs / f"{n}.log")
        self.children["router"] = Child("router", [
            "-m", "cluster.cli.router", "--listen", str(self.router_address),
            "--cluster", cluster_arg, *(extra_router_args or []),
        ], logs / "router.log")

    async def start(self) -> None:
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            await asyncio.gather(*(self.start_child(n) for n in self.node_ids))
            await self.start_child("router")
        except BaseException:
            await self.stop()
            raise

    async def start_child(self, name: str) -> None:
        """Start (or restart) one process and wait for its READY line."""
        child = self.children[name]
        if child.running:
            raise ClusterError(f"{name} is already running (pid {child.pid})")
        child.expected_exit = False
        if child.log_file is None:
            child.log_file = open(child.log_path, "ab")  # noqa: SIM115 - kept for the child's life
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable, *child.args, stdout=asyncio.subprocess.PIPE,
            stderr=child.log_file, env=env, start_new_session=True,
        )
        assert child.proc.stdout is not None
        try:
            async with asyncio.timeout(self.ready_timeout):
                while True:
                    line = await child.proc.stdout.readline()
                    if not line:
                        await child.proc.wait()
                        raise ClusterError(
                            f"{name} exited with code {child.proc.returncode} before it was "
                            f"ready: {self.tail(name)}")
                    if line.startswith(b"READY "):
                        break
        except TimeoutError:
            await self.kill(name)
            raise ClusterError(f"{name} was not ready within {self.ready_timeout:g}s: "
                               f"{self.tail(name)}") from None

    def tail(self, name: str, lines: int = 5) -> str:
        try:
            text = self.children[name].log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

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
        await self.kill(name)
        await self.start_child(name)

    async def wait_crash(self) -> tuple[str, int]:
        """Wait until any child exits unexpectedly; return its name and exit code."""
        waits = {
            asyncio.ensure_future(c.proc.wait()): c
            for c in self.children.values() if c.proc is not None and c.running
        }
        try:
            while waits:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    child = waits.pop(fut)
                    if not child.expected_exit:
                        return child.name, fut.result()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")
        finally:
            for fut in waits:
                fut.cancel()

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child, then SIGKILL what is still running after ``timeout``."""
        running = [c for c in self.children.values() if c.running]
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
        for c in self.children.values():
            if c.log_file is not None:
                c.log_file.close()
                c.log_file = None
