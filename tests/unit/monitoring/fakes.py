"""What the monitoring tests' fake stores share."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from contracts.envelope import CloudEvent


class NoPolicies:
    """The MonitoringStore calls a housekeeping tick, a restore or a rollout's start makes about policies,
    registered models, labels joined lately and rollout steps kept for their start, answered as by a store
    that has none, and Postgres' clock, as this host's (``time.time``, which a test may set): the part of a
    fake store no test here is about."""

    async def now(self) -> datetime:
        return datetime.fromtimestamp(time.time(), UTC)

    async def policies_fingerprint(self) -> str:
        return ""

    async def policies(self) -> dict[str, Any]:
        return {}

    async def models(self) -> list[Any]:
        return []

    async def rollouts_watched(self, *, besides: str) -> int:
        return 0

    async def watched_beyond(self, most: int) -> list[Any]:
        return []

    async def labels_joined_since(self, received_since: datetime) -> list[tuple[str, str, datetime, bool]]:
        return []

    async def take_early_steps(self, rollout_id: str) -> list[Any]:
        return []

    async def expire_early_steps(self, received_before: float) -> list[Any]:
        return []

    async def kept_steps(self) -> list[Any]:
        return []

    async def take_given_up(self, rollout_id: str) -> Any:
        return None


async def publish_nothing(event: CloudEvent[Any]) -> None:
    """A handler's ``publish`` where the test expects nothing published (a rollout step watched)."""
    raise AssertionError(f"nothing should be published here, yet {event.type} was")


class TableRuntime:
    """A runtime whose ``begin()`` hands a fake table over as the transaction's store (the retention tests
    patch ``PgMonitoringStore`` to take the connection as it is)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        yield type("Tx", (), {"conn": self.table})()
