"""Waiting on a condition with a deadline (never a fixed sleep), for in-process tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    """Re-check ``check`` every few milliseconds; fail naming ``what`` after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None
