"""One data node: recover the store, take the role, serve clients and replication."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from cluster.config import Address, NodeConfig
from cluster.errors import (
    BadRequest,
    Behind,
    InternalError,
    NetworkError,
    NoQuorum,
    ShuttingDown,
    StorageFailure,
    reason,
)
from cluster.net.stream import FramedStream
from cluster.node.durability import Durability
from cluster.node.master import MasterRole, not_master
from cluster.node.slave import SlaveRole
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

Role = MasterRole | SlaveRole


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

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    def stop(self) -> None:
        self._stop.set()

    async def run(self, on_ready: Callable[[Address], None] = lambda a: None) -> None:
        cfg = self.config
        self.store = await asyncio.to_thread(Store.open, cfg.data_dir, cfg.node_id)
        try:
            await self._serve(on_ready)
        finally:
            self.store.close()

    async def _serve(self, on_ready: Callable[[Address], None]) -> None:
        cfg = self.config
        if cfg.is_master:
            epoch = self.store.epoch + 1
            self.store.set_epoch(epoch)
            log.info("%s starts as master in epoch %d at index %d", cfg.node_id, epoch,
                     self.store.log.last_index)
        else:
            log.info("%s starts as slave of %s at index %d (epoch %d)", cfg.node_id,
                     cfg.master, self.store.log.last_index, self.store.epoch)
        self.durability = Durability(self.store, cfg.fsync, self._on_durable)
        self.role = MasterRole(self) if cfg.is_master else SlaveRole(self)
        server = await asyncio.start_server(self._handle, cfg.listen.host, cfg.listen.port,
                                            limit=256 * 1024, reuse_address=True)
        sock = server.sockets[0].getsockname()
        self.address = Address(cfg.listen.host, sock[1])
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        on_ready(self.address)
        try:
            async with asyncio.TaskGroup() as tg:
                durability = tg.create_task(self.durability.run(), name="durability")
                role = tg.create_task(self.role.run(), name="role")
                await self._stop.wait()
                log.info("%s shutting down", cfg.node_id)
                server.close()
                self._draining = True
                role.cancel()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await self.durability.flush()
                durability.cancel()
                if self._snapshot_task is not None:
                    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                        async with asyncio.timeout(10.0):
                            await self._snapshot_task
        finally:
            server.close()
            await asyncio.gather(*(stream.close() for stream in list(self._streams)))
            with contextlib.suppress(asyncio.CancelledError):
                await server.wait_closed()

    # --- durability and snapshots -------------------------------------------------------------

    def _on_durable(self, index: int) -> None:
        self.role.on_durable(index)

    def maybe_snapshot(self) -> None:
        if self.store.snapshot_due(self.config.snapshot_every) and not self._draining:
            self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshot())

    async def settle_snapshot(self) -> None:
        """Wait for a snapshot being written, before replacing or cutting the log."""
        task = self._snapshot_task
        if task is not None and not task.done():
            await asyncio.shield(task)

    async def _snapshot(self) -> None:
        """Write a snapshot in a worker thread. A failure (a full disk, say) is logged and
        the next write tries again; the log keeps growing meanwhile and loses nothing."""
        store = self.store
        try:
            job = store.begin_snapshot()
        except (StorageFailure, OSError) as exc:
            log.error("could not start a snapshot at index %d: %s", store.kv.applied, reason(exc))
            return
        try:
            await asyncio.to_thread(store.write_snapshot, job)
        except OSError as exc:
            store.abort_snapshot()
            log.error("snapshot at index %d failed: %s; will retry", job.meta.index, reason(exc))
            return
        store.finish_snapshot(job)

    # --- client connections ------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = FramedStream(reader, writer, self.config.limits)
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
                if isinstance(self.role, MasterRole):
                    await self.role.replicate(stream, msg)
                else:
                    stream.send(not_master(msg.id, self.config.master))
                return
            reply = self.dispatch(msg, stream)
            if reply is not None:
                stream.send(reply)
                if isinstance(reply, ErrorReply) and reply.code == BadRequest.code:
                    return

    def dispatch(self, msg: Message, stream: FramedStream) -> Reply | ErrorReply | None:
        """Answer one request, or return None when the reply will be sent later."""
        try:
            match msg:
                case Get():
                    return self._get(msg)
                case Set() | Delete():
                    if self._draining:
                        raise ShuttingDown("the node is shutting down")
                    if isinstance(self.role, MasterRole):
                        return self.role.write(msg, stream)
                    return not_master(msg.id, self.config.master)
                case Scan(id=rid, after=after, limit=limit, min_index=min_index):
                    self._check_applied(min_index)
                    items, more = self.store.kv.scan(after, limit,
                                                     self.config.limits.max_frame // 2)
                    return Reply(rid, {"items": [list(i) for i in items], "more": more,
                                       "index": self.store.kv.applied,
                                       "node": self.config.node_id})
                case Status(id=rid):
                    return Reply(rid, self.status())
                case Ping(id=rid):
                    return Reply(rid, {"node": self.config.node_id, "role": self.role.name})
            return ErrorReply(getattr(msg, "id", 0), BadRequest.code,
                              f"{type(msg).__name__} is not a request a node serves")
        except (Behind, NoQuorum, ShuttingDown) as exc:
            return ErrorReply(msg.id, exc.code, str(exc))  # type: ignore[union-attr]
        except Exception as exc:  # a bug must not take the node down for everyone
            log.exception("internal error serving %r", msg)
            return ErrorReply(getattr(msg, "id", 0), InternalError.code, reason(exc))

    def _get(self, msg: Get) -> Reply | ErrorReply:
        kv = self.store.kv
        if msg.consistency is Consistency.STRONG:
            if not isinstance(self.role, MasterRole):
                return not_master(msg.id, self.config.master)
            self.role.confirm_strong()
        self._check_applied(msg.min_index)
        value = kv.get(msg.key)
        fields: dict[str, Any] = {"found": value is not None, "index": kv.applied,
                                  "node": self.config.node_id}
        if value is not None:
            fields["value"] = value
        return Reply(msg.id, fields)

    def _check_applied(self, min_index: int) -> None:
        applied = self.store.kv.applied
        if applied < min_index:
            raise Behind(f"{self.config.node_id} has applied {applied}, "
                         f"the read needs {min_index}")

    def status(self) -> dict[str, Any]:
        cfg = self.config
        store = self.store
        out: dict[str, Any] = {
            "node": cfg.node_id,
            "role": self.role.name,
            "address": str(cfg.cluster[cfg.node_id]),
            "master": cfg.master,
            "epoch": store.epoch,
            "last_index": store.log.last_index,
            "applied_index": store.kv.applied,
            "durable_index": self.durability.durable,
            "snapshot_index": store.snapshot_index,
            "log_first_index": store.log.base + 1,
            "keys": len(store.kv.data),
            "fsync": cfg.fsync.value,
            "time_ms": self.now_ms(),
        }
        out.update(self.role.status())
        return out
