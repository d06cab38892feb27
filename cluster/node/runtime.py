"""One data node: recover the store, take a role, serve clients and replication.

The node is the asyncio shell around a role's pure core: it persists what the core's
``Ready`` says (:meth:`Node.carry_out`), then the role sends and replies. The role can be
swapped at run time (:meth:`Node.become`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from cluster.config import Address, NodeConfig
from cluster.core.kv import KV
from cluster.core.log import Log
from cluster.core.state import Ready, Replica, SnapshotMeta
from cluster.errors import (
    BadRequest,
    InternalError,
    NetworkError,
    RequestFailed,
    ShuttingDown,
    StorageFailure,
    reason,
)
from cluster.metrics import MeteredStream, NodeMetrics, serve_metrics
from cluster.net.stream import FramedStream
from cluster.node.durability import Durability
from cluster.storage.base import carry_out
from cluster.storage.store import Store
from cluster.types import Consistency
from cluster.wire import codec
from cluster.wire.messages import (
    Delete,
    ErrorReply,
    Get,
    Message,
    Ping,
    Reply,
    Scan,
    Set,
    Status,
    Sync,
)

log = logging.getLogger(__name__)


class Core(Protocol):
    """What the node needs of either role's core."""

    @property
    def log(self) -> Log: ...
    @property
    def kv(self) -> KV: ...
    @property
    def durable(self) -> int: ...

    def snapshot_point(self) -> tuple[SnapshotMeta, KV]: ...
    def advance(self, ready: Ready, snapshot_data: KV | None = None) -> Ready: ...
    def handover(self) -> Replica: ...
    def compacted(self, snapshot_index: int, drop_through: int) -> None: ...


class Role(Protocol):
    """A node's behaviour while it is master or slave."""

    name: str

    @property
    def core(self) -> Core: ...

    async def run(self) -> None:
        """The role's own loop (replication to or from the master, its timers)."""

    async def aclose(self) -> None:
        """The role ends: fail its waiting clients, close its replication links."""

    def write(self, msg: Set | Delete, client: FramedStream) -> Reply | ErrorReply | None:
        """A client write: the reply now, or None when it comes later."""

    async def replicate(self, stream: FramedStream, msg: Sync) -> None:
        """A slave asks for the log on ``stream``: serve it until the link ends."""

    def check_read(self, consistency: Consistency, min_epoch: int, min_index: int) -> None:
        """Raise a :class:`~cluster.errors.RequestFailed` when this node may not serve the
        read."""

    def on_durable(self, index: int) -> None: ...

    def master_hint(self) -> str:
        """The node this one believes is master."""

    def status(self) -> dict[str, Any]: ...


class Node:
    def __init__(self, config: NodeConfig) -> None:
        config.validate()
        self.config = config
        self._stop = asyncio.Event()
        self._streams: set[FramedStream] = set()
        self._snapshot_task: asyncio.Task[None] | None = None
        self.address: Address | None = None
        self._draining = False
        # set in run(), once the store is recovered
        self.store: Store
        self.durability: Durability
        self.role: Role
        self._tg: asyncio.TaskGroup
        self._role_task: asyncio.Task[None] | None = None
        self.metrics = None if config.metrics_listen is None else NodeMetrics(
            config.node_id, self.status, lambda: len(self._streams),
            lambda: self.store.wal.segments)

    @staticmethod
    def now_ms() -> int:
        """Milliseconds of a monotonic clock: for timeouts and leases."""
        return int(time.monotonic() * 1000)

    @staticmethod
    def wall_ms() -> int:
        """Wall-clock milliseconds: stamped on entries, for lag reports."""
        return int(time.time() * 1000)

    def stop(self) -> None:
        self._stop.set()

    async def run(self, on_ready: Callable[[Address], None] = lambda a: None) -> None:
        cfg = self.config
        self.store, recovered = await asyncio.to_thread(Store.open, cfg.data_dir, cfg.node_id)
        try:
            replica = Replica.recovered(recovered)
            log.info("recovered %s: snapshot at %d, log %d..%d, epoch %d, %d keys",
                     cfg.data_dir, replica.snapshot_index, replica.log.base + 1,
                     replica.log.last_index, replica.epoch, len(replica.kv.data),
                     extra={"snapshot_index": replica.snapshot_index,
                            "last_index": replica.log.last_index, "epoch": replica.epoch})
            await self._serve(replica, on_ready)
        finally:
            self.store.close()

    def _first_role(self, replica: Replica) -> Role:
        from cluster.node.master import MasterRole
        from cluster.node.slave import SlaveRole

        cfg = self.config
        if cfg.node_id == cfg.bootstrap_master:
            replica.epoch += 1
            self.store.set_epoch(replica.epoch)
            log.info("%s starts as master in epoch %d at index %d", cfg.node_id,
                     replica.epoch, replica.log.last_index,
                     extra={"role": "master", "epoch": replica.epoch,
                            "last_index": replica.log.last_index})
            return MasterRole(self, replica)
        log.info("%s starts as slave of %s at index %d (epoch %d)", cfg.node_id,
                 cfg.bootstrap_master, replica.log.last_index, replica.epoch,
                 extra={"role": "slave", "master": cfg.bootstrap_master, "epoch": replica.epoch,
                        "last_index": replica.log.last_index})
        return SlaveRole(self, replica, cfg.bootstrap_master)

    async def _serve(self, replica: Replica, on_ready: Callable[[Address], None]) -> None:
        cfg = self.config
        self.durability = Durability(self.store, cfg.fsync, replica.durable, self._on_durable,
                                     None if self.metrics is None else self.metrics.synced)
        self.role = self._first_role(replica)
        server = await asyncio.start_server(self._handle, cfg.listen.host, cfg.listen.port,
                                            limit=256 * 1024, reuse_address=True)
        sock = server.sockets[0].getsockname()
        self.address = Address(cfg.listen.host, sock[1])
        metrics_server = None
        if self.metrics is not None and cfg.metrics_listen is not None:
            try:
                metrics_server = await serve_metrics(self.metrics.registry, cfg.metrics_listen)
            except BaseException:
                server.close()
                raise
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        on_ready(self.address)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                durability = tg.create_task(self.durability.run(), name="durability")
                self._role_task = tg.create_task(self.role.run(), name="role")
                await self._stop.wait()
                log.info("%s shutting down", cfg.node_id)
                server.close()
                self._draining = True
                self._role_task.cancel()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await self.durability.flush()
                await self.role.aclose()
                durability.cancel()
                if self._snapshot_task is not None:
                    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                        async with asyncio.timeout(10.0):
                            await self._snapshot_task
        finally:
            server.close()
            if metrics_server is not None:
                metrics_server.close()
            await asyncio.gather(*(stream.close() for stream in list(self._streams)))
            with contextlib.suppress(asyncio.CancelledError):
                await server.wait_closed()

    async def become(self, make: Callable[[Replica], Role]) -> None:
        """Swap the role: the old one ends (its waiters fail, its links close) and hands its
        state to the new one, which starts its loop."""
        old, task = self.role, self._role_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await old.aclose()
        self.role = make(old.core.handover())
        log.info("%s is now %s", self.config.node_id, self.role.name)
        self._role_task = self._tg.create_task(self.role.run(), name="role")

    # --- carrying out a core's decisions ------------------------------------------------------

    def carry_out(self, core: Core, ready: Ready) -> Ready:
        """Persist what ``ready`` says and advance ``core`` (see
        :func:`~cluster.storage.base.carry_out`); the role then sends and replies."""
        return carry_out(self.store, core, ready, wrote=self.durability.wrote,
                         reset=self.durability.reset)

    def _on_durable(self, index: int) -> None:
        self.role.on_durable(index)

    # --- snapshots ----------------------------------------------------------------------------

    def maybe_snapshot(self, applied: int) -> None:
        """Start a snapshot when one is due and none is being written (one at a time: the
        store only marks itself busy once the task runs)."""
        running = self._snapshot_task is not None and not self._snapshot_task.done()
        if not running and not self._draining \
                and self.store.snapshot_due(applied, self.config.snapshot_every):
            self._snapshot_task = self._tg.create_task(self._snapshot(), name="snapshot")

    async def settle_snapshot(self) -> None:
        """Wait for a snapshot being written, before replacing or cutting the log."""
        task = self._snapshot_task
        if task is not None and not task.done():
            await asyncio.shield(task)

    async def _snapshot(self) -> None:
        """Write a snapshot in a worker thread. A failure (a full disk, say) is logged and
        the next write tries again; the log keeps growing meanwhile and loses nothing."""
        store = self.store
        core = self.role.core
        started = time.perf_counter()
        meta, data = core.snapshot_point()
        try:
            job = store.begin_snapshot(meta, data)
        except (StorageFailure, OSError) as exc:
            log.error("could not start a snapshot at index %d: %s", meta.index,
                      reason(exc))
            if self.metrics is not None:
                self.metrics.snapshot(None)
            return
        try:
            await asyncio.to_thread(store.write_snapshot, job)
        except OSError as exc:
            store.abort_snapshot()
            log.error("snapshot at index %d failed: %s; will retry", job.meta.index, reason(exc))
            if self.metrics is not None:
                self.metrics.snapshot(None)
            return
        store.finish_snapshot(job)
        self.role.core.compacted(job.meta.index, job.drop_through)
        if self.metrics is not None:
            self.metrics.snapshot(time.perf_counter() - started)

    # --- client connections -------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits = self.config.limits
        stream = FramedStream(reader, writer, limits) if self.metrics is None else \
            MeteredStream(reader, writer, limits, self.metrics.requests)
        self._streams.add(stream)
        try:
            await self._serve_stream(stream)
        except (NetworkError, OSError, ConnectionError):
            pass
        finally:
            self._streams.discard(stream)
            await stream.close()

    async def _serve_stream(self, stream: FramedStream) -> None:
        async for msg in stream.requests(codec.NODE_REQUESTS):
            if isinstance(msg, Sync):
                await self.role.replicate(stream, msg)
                return
            reply = self.dispatch(msg, stream)
            if reply is not None:
                stream.send(reply)
                if isinstance(reply, ErrorReply) and reply.code == BadRequest.code:
                    return

    def dispatch(self, msg: Message, stream: FramedStream) -> Reply | ErrorReply | None:
        """Answer one request, or return None when the reply will be sent later."""
        rid = getattr(msg, "id", 0)
        try:
            match msg:
                case Get():
                    return self._get(msg)
                case Set() | Delete():
                    if self._draining:
                        raise ShuttingDown("the node is shutting down")
                    return self.role.write(msg, stream)
                case Scan(after=after, limit=limit):
                    self.role.check_read(Consistency.ANY, msg.min_epoch, msg.min_index)
                    core = self.role.core
                    items, more = core.kv.scan(after, limit, self.config.limits.max_frame // 2)
                    epoch_at = core.log.epoch_at
                    return Reply(rid, {"items": [[k, v] for k, v, _ in items], "more": more,
                                       "index": core.kv.applied, "node": self.config.node_id,
                                       "key_tokens": [[epoch_at(i), i] for _, _, i in items]})
                case Status():
                    return Reply(rid, self.status())
                case Ping():
                    return Reply(rid, {"node": self.config.node_id, "role": self.role.name})
            return ErrorReply(rid, BadRequest.code,
                              f"{type(msg).__name__} is not a request a node serves")
        except RequestFailed as exc:  # a write refused before it was proposed: not applied
            return ErrorReply(rid, exc.code, str(exc), getattr(exc, "master", None),
                              applied="no" if isinstance(msg, Set | Delete) else None)
        except Exception as exc:  # a bug must not take the node down for everyone
            log.exception("internal error serving %r", msg)
            return ErrorReply(rid, InternalError.code, reason(exc),
                              applied="unknown" if isinstance(msg, Set | Delete) else None)

    def _get(self, msg: Get) -> Reply:
        self.role.check_read(msg.consistency, msg.min_epoch, msg.min_index)
        core = self.role.core
        found = core.kv.get(msg.key)
        fields: dict[str, Any] = {"found": found is not None, "index": core.kv.applied,
                                  "node": self.config.node_id}
        if found is not None:
            value, index = found
            fields["value"] = value
            fields["key_epoch"] = core.log.epoch_at(index)
            fields["key_index"] = index
        return Reply(msg.id, fields)

    def status(self) -> dict[str, Any]:
        cfg = self.config
        store = self.store
        core = self.role.core
        log_ = self.role.core.log
        out: dict[str, Any] = {
            "node": cfg.node_id,
            "role": self.role.name,
            "address": str(cfg.cluster[cfg.node_id]),
            "master": self.role.master_hint(),
            "epoch": store.epoch,
            "last_index": log_.last_index,
            "last_epoch": log_.last_epoch,
            "applied_index": self.role.core.kv.applied,
            "durable_index": core.durable,
            "snapshot_index": store.snapshot_index,
            "log_first_index": log_.base + 1,
            "keys": len(self.role.core.kv.data),
            "fsync": cfg.fsync.value,
            "time_ms": self.wall_ms(),
        }
        out.update(self.role.status())
        return out

