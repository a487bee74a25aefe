"""Waiting in tests by polling with a deadline, never by a fixed sleep."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from deploy.loop import poll

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T | None]], *, deadline_s: float = 30.0, interval_s: float = 0.1
) -> T:
    """Poll ``check`` until it returns a truthy value; fail the test (AssertionError, with the last value)
    at the deadline."""
    value: T = await poll(check, deadline_s=deadline_s, interval_s=interval_s, error=AssertionError)
    return value
