"""Group commit: writes reach the OS at once; one fsync covers every write made before it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cluster.config import FsyncPolicy
from cluster.storage.base import LogStore

log = logging.getLogger(__name__)


class Durability:
    def __init__(self, store: LogStore, policy: FsyncPolicy, durable: int,
                 on_durable: Callable[[int], None],
                 on_sync: Callable[[float], None] | None = None) -> None:
        self._store = store
        self._policy = policy
        self._on_durable = on_durable
        self._on_sync = on_sync  # told how many seconds each fsync took (for metrics)
        self.written = durable
        self.durable = self.written
        self._dirty = asyncio.Event()
        self._generation = 0  # bumped when the log is cut: a sync begun before covers nothing

    def wrote(self, index: int) -> None:
        """Entries up to ``index`` were written to the OS."""
        self.written = index
        if self._policy is FsyncPolicy.ALWAYS:
            self._dirty.set()
        else:
            self._advance(index)

    def reset(self, index: int) -> None:
        """The log was cut or replaced and is durable up to ``index``."""
        self._generation += 1
        self.written = self.durable = index

    def _advance(self, index: int) -> None:
        if index > self.durable:
            self.durable = index
            self._on_durable(index)

    async def run(self) -> None:
        """Sync in the background; an fsync error stops the node (the data on disk can no
        longer be trusted to match what was acknowledged)."""
        if self._policy is FsyncPolicy.ALWAYS:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                target, generation = self.written, self._generation
                await self._sync()
                if generation == self._generation:
                    self._advance(target)
        elif self._policy is FsyncPolicy.EVERYSEC:
            synced = self.written
            while True:
                await asyncio.sleep(1.0)
                if self.written != synced:
                    synced = self.written
                    await self._sync()

    async def flush(self) -> None:
        """Make everything written so far durable (at shutdown)."""
        target, generation = self.written, self._generation
        await self._sync()
        if generation == self._generation:
            self._advance(target)

    async def _sync(self) -> None:
        """fsync in a worker thread, timing the call itself (not the wait for a thread)."""
        seconds = await asyncio.to_thread(self._timed_sync)
        if self._on_sync is not None:
            self._on_sync(seconds)

    def _timed_sync(self) -> float:
        started = time.perf_counter()
        self._store.sync()
        return time.perf_counter() - started
