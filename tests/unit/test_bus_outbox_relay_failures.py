"""The outbox relay's loop counts each failed round, so an operator can alert on a relay that publishes
nothing (the log alone said only "retrying")."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import REGISTRY

from libs.bus.postgres import OutboxRelay
from tests.waiting import eventually


class UnreachablePool:
    """A pool whose database is away: every acquire fails as asyncpg's does when Postgres is down."""

    def __init__(self) -> None:
        self.tries = 0

    async def acquire(self) -> Any:
        self.tries += 1
        raise ConnectionRefusedError("Postgres is restarting")


def relay_failures(schema: str) -> float:
    labels = {"schema": schema}
    return REGISTRY.get_sample_value("driftloop_bus_outbox_relay_failures_total", labels) or 0.0


async def test_each_failed_relay_round_is_counted_by_schema_and_the_relay_goes_on() -> None:
    pool = UnreachablePool()
    relay = OutboxRelay(pool, "relayfailures", sender=None)  # type: ignore[arg-type]
    before = relay_failures("relayfailures")

    async def failed_twice() -> bool:
        return relay_failures("relayfailures") >= before + 2

    running = asyncio.create_task(relay.run())
    try:
        await eventually(failed_twice, deadline_s=10.0, interval_s=0.02)
    finally:
        relay.stop()
        await asyncio.wait_for(running, timeout=10.0)
    assert relay_failures("relayfailures") - before == pool.tries
