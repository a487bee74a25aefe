"""Waiting in tests by polling with a deadline, never by a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, deadline_s: float = 30.0, interval_s: float = 0.1
) -> T:
    """Poll ``check`` until it returns a truthy value; fail with the last value at the deadline."""
    until = time.monotonic() + deadline_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > until:
            raise AssertionError(f"condition not met within {deadline_s}s (last value: {value!r})")
        await asyncio.sleep(interval_s)
