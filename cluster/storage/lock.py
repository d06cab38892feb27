"""The lock on a data directory: ``DIR/LOCK``, held with ``flock`` while a node runs, holds
the PID of the process that holds it, so the error for a directory in use can name it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from cluster.errors import ConfigError


def acquire(path: Path) -> int:
    """Take the lock at ``path`` (created if missing) and write this process's PID into it;
    return the open file descriptor, which holds the lock until it is closed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise ConfigError(in_use_message(path.parent, pid)) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def holder(path: Path) -> int | None:
    """Whether the lock at ``path`` is held right now: the holder's PID (0 when it has not
    written it yet), or None when the lock is free or missing. Creates nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # missing, or not ours to read: the node that opens it will say so
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def remove_unless_locked(tree: Path, locks: list[Path]) -> bool:
    """Delete ``tree`` unless a process holds one of ``locks`` (the LOCK files of the data
    directories in it). They are held while it is deleted, so a node that starts on one of
    them at the same time fails instead of losing its files. Whether it was deleted."""
    fds: list[int] = []
    try:
        for path in locks:
            try:
                fds.append(acquire(path))
            except FileNotFoundError:
                continue  # no such directory: nothing there to protect
            except ConfigError:
                return False
        shutil.rmtree(tree, ignore_errors=True)
        return True
    finally:
        for fd in fds:
            os.close(fd)


def in_use_message(directory: Path, pid: int | None) -> str:
    who = f"process {pid}" if pid else "another process"
    return f"data directory {directory} is in use by {who} (it holds {directory / 'LOCK'})"


def _read_pid(fd: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return 0
