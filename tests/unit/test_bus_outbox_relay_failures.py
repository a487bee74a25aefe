"""The outbox relay's loop counts each failed round, so an operator can alert on a relay that publishes
nothing (the log alone said only "retrying"), and its backlog while rounds fail or keep sending (the gauge
was set only when the relay went idle, so it read 0 while the rows piled up). A CancelledError its round
raises while the relay is not being cancelled is such a failed round; a real cancellation ends it at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from aiokafka.errors import KafkaConnectionError
from prometheus_client import REGISTRY

from libs.bus.postgres import OutboxRelay
from libs.db import release_listener
from tests.unit.test_bus_cancelled import awaits_a_future_cancelled_elsewhere
from tests.waiting import eventually


class UnreachablePool:
    """A pool whose database is away: every acquire fails as asyncpg's does when Postgres is down, awaited
    (the relay's listener: counted in ``tries``, one a round) or in ``async with``."""

    def __init__(self) -> None:
        self.tries = 0

    def acquire(self) -> Any:
        return _Refused(self)


class _Refused:
    def __init__(self, pool: UnreachablePool) -> None:
        self.pool = pool

    def __await__(self) -> Generator[Any, None, Any]:
        self.pool.tries += 1
        raise ConnectionRefusedError("Postgres is restarting")
        yield  # a generator, as __await__ must return

    async def __aenter__(self) -> Any:
        raise ConnectionRefusedError("Postgres is restarting")

    async def __aexit__(self, *exc: object) -> None:
        return None


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


class Outbox:
    """A service's schema as the relay's connection sees it: ``unsent`` rows waiting in the outbox."""

    def __init__(self, unsent: int) -> None:
        self.rows = [
            {"seq": n, "topic": "mlops.models", "key": b"churn", "value": b"{}", "headers": [], "sent": False}
            for n in range(1, unsent + 1)
        ]

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    async def add_listener(self, channel: str, callback: Callable[..., None]) -> None:
        return None

    async def remove_listener(self, channel: str, callback: Callable[..., None]) -> None:
        return None

    def is_closed(self) -> bool:
        return False

    async def fetchval(self, sql: str, *args: Any) -> Any:
        if "pg_try_advisory_xact_lock" in sql:
            return True
        return sum(1 for r in self.rows if not r["sent"])  # the backlog's count

    async def fetch(self, sql: str, batch_size: int, batch_bytes: int) -> list[dict[str, Any]]:
        return [r for r in self.rows if not r["sent"]][:batch_size]

    async def execute(self, sql: str, seqs: list[int]) -> None:
        for r in self.rows:
            if r["seq"] in seqs:
                r["sent"] = True

    def acquire(self) -> Outbox:
        """The pool's acquire: the connection, awaited or in ``async with``."""
        return self

    def __await__(self) -> Generator[Any, None, Outbox]:
        return self._itself().__await__()

    async def _itself(self) -> Outbox:
        return self

    async def __aenter__(self) -> Outbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def release(self, conn: Outbox) -> None:
        return None


def backlog(schema: str) -> float | None:
    return REGISTRY.get_sample_value("driftloop_bus_outbox_backlog", {"schema": schema})


class KafkaAway:
    async def send_many(self, items: Sequence[Any]) -> None:
        raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 19092)]")


async def test_the_backlog_rises_while_every_round_fails_to_send() -> None:
    outbox = Outbox(unsent=3)
    relay = OutboxRelay(outbox, "backlogkafkaaway", KafkaAway())

    async def counted() -> bool:
        return backlog("backlogkafkaaway") == 3

    running = asyncio.create_task(relay.run())
    try:
        await eventually(counted, deadline_s=5.0, interval_s=0.02)
    finally:
        relay.stop()
        await asyncio.wait_for(running, timeout=10.0)


class SlowBroker:
    """Acknowledges the first batch, then holds the next until ``go`` is set."""

    def __init__(self) -> None:
        self.batches = 0
        self.go = asyncio.Event()

    async def send_many(self, items: Sequence[Any]) -> None:
        self.batches += 1
        if self.batches > 1:
            await self.go.wait()


async def test_the_backlog_is_counted_while_the_relay_keeps_sending() -> None:
    outbox, broker = Outbox(unsent=3), SlowBroker()
    relay = OutboxRelay(outbox, "backlogcatchingup", broker, batch_size=1)

    async def counted() -> bool:
        # The first batch is sent and the second held: the relay has been sending all along, never idle.
        return broker.batches == 2 and backlog("backlogcatchingup") == 2

    running = asyncio.create_task(relay.run())
    try:
        await eventually(counted, deadline_s=5.0, interval_s=0.02)
    finally:
        broker.go.set()
        relay.stop()
        await asyncio.wait_for(running, timeout=10.0)


class ListenerStuck(Outbox):
    """A live connection whose listener cannot be removed (the statement times out); the pool counts what
    is given back to it."""

    def __init__(self) -> None:
        super().__init__(unsent=0)
        self.released = 0

    async def remove_listener(self, channel: str, callback: Callable[..., None]) -> None:
        raise TimeoutError

    async def release(self, conn: Outbox) -> None:
        self.released += 1


async def test_a_listener_that_cannot_be_removed_is_still_given_back_to_the_pool() -> None:
    # Skipped after the removal failed, the connection's slot was lost to the pool for good.
    pool = ListenerStuck()
    await release_listener(cast(Any, pool), cast(Any, pool), "outbox_listenerstuck", lambda *_: None)
    assert pool.released == 1


class CancelledOnce:
    """A broker client whose first send is cancelled by something else (its send future cancelled by another
    task, as aiokafka's may be), while the relay's own task is not being cancelled; then it acknowledges."""

    def __init__(self) -> None:
        self.sends = 0

    async def send_many(self, items: Sequence[Any]) -> None:
        self.sends += 1
        if self.sends == 1:
            await awaits_a_future_cancelled_elsewhere()


async def test_a_round_cancelled_by_what_it_awaited_is_a_failed_round_and_the_relay_goes_on() -> None:
    # Let through as a stop, it ended the relay, and the service with it (status 1).
    outbox = Outbox(unsent=2)
    relay = OutboxRelay(outbox, "relaystraycancel", CancelledOnce())
    before = relay_failures("relaystraycancel")

    async def all_sent() -> bool:
        return all(r["sent"] for r in outbox.rows)

    running = asyncio.create_task(relay.run())
    try:
        await eventually(all_sent, deadline_s=5.0, interval_s=0.02)
        assert not running.done()
    finally:
        relay.stop()
        await asyncio.wait_for(running, timeout=10.0)
    assert relay_failures("relaystraycancel") - before == 1


class Hangs:
    """A broker that acknowledges nothing until ``released``; cancelled, its client lets the CancelledError
    through (``error`` None) or raises ``error`` instead, as a library turning a cancellation into its own
    error."""

    def __init__(self, error: type[Exception] | None) -> None:
        self.error = error
        self.started = asyncio.Event()
        self.released = asyncio.Event()

    async def send_many(self, items: Sequence[Any]) -> None:
        self.started.set()
        try:
            await self.released.wait()
        except asyncio.CancelledError as exc:
            if self.error is None:
                raise
            raise self.error("send aborted") from exc


@pytest.mark.parametrize("error", [None, KafkaConnectionError], ids=["let-through", "turned-into-an-error"])
async def test_cancelling_the_relay_ends_it_at_once_counting_no_failure(
    error: type[Exception] | None,
) -> None:
    broker = Hangs(error)
    relay = OutboxRelay(Outbox(unsent=1), "relaycancelled", broker)
    before = relay_failures("relaycancelled")
    running = asyncio.create_task(relay.run())
    await broker.started.wait()

    running.cancel()

    async def ended() -> bool:
        return running.done()

    try:
        await eventually(ended, deadline_s=5.0, interval_s=0.02)
    finally:  # a relay that did not end must not outlive the test
        relay.stop()
        broker.released.set()
        await asyncio.gather(running, return_exceptions=True)
    assert running.cancelled()
    assert relay_failures("relaycancelled") == before
