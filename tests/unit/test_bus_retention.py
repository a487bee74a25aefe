"""Which bus rows the retention deletes, and when: inbox rows twice their topic's retention plus a day after
they were handled (never for topics kept for ever, unknown types or untyped rows), sent outbox rows after
``outbox_keep_sent_days``; and its loop, which survives a database that is away and a CancelledError its
round did not ask for, and ends at once when cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from contracts.audit import AuditCheckpoint
from contracts.datasets import DatasetRegistered
from contracts.envelope import EventTypeRegistry
from contracts.models import ModelVersionRegistered
from contracts.monitoring import DriftDetected
from contracts.predictions import PredictionsLogged
from contracts.registry import EVENT_TYPES
from contracts.topics import DAY_MS, FOREVER, TOPICS
from libs.bus.postgres import BusRetention
from libs.bus.retention import INBOX_MARGIN, inbox_classes, inbox_keep, outbox_keep
from libs.service import Runtime
from libs.settings import ServiceSettings
from tests.unit.test_bus_cancelled import awaits_a_future_cancelled_elsewhere
from tests.waiting import eventually


def test_an_inbox_row_is_kept_twice_its_topics_retention_plus_a_day() -> None:
    assert timedelta(days=1) == INBOX_MARGIN
    assert inbox_keep(7 * DAY_MS) == timedelta(days=15)
    assert inbox_keep(30 * DAY_MS) == timedelta(days=61)
    assert inbox_keep(FOREVER) is None


def test_each_known_type_on_a_topic_of_finite_retention_has_a_class_and_no_other() -> None:
    classes = inbox_classes(TOPICS, EVENT_TYPES.wire_types())
    keep = {t: c.keep for c in classes for t in c.event_types}
    assert keep[PredictionsLogged.event_type()] == timedelta(days=15)
    assert keep[DriftDetected.event_type()] == timedelta(days=61)
    # Topics kept for ever: their records can be delivered again at any time.
    for payload in (ModelVersionRegistered, DatasetRegistered, AuditCheckpoint):
        assert payload.event_type() not in keep
    assert [c.keep for c in classes] == sorted(c.keep for c in classes)
    assert len(keep) == sum(len(c.event_types) for c in classes)  # no type in two classes


def test_an_old_version_read_through_an_upcaster_is_kept_as_its_current_type() -> None:
    registry = EventTypeRegistry([PredictionsLogged, ModelVersionRegistered])
    old_predictions = PredictionsLogged.event_type().replace(".v1", ".v0")
    old_registered = ModelVersionRegistered.event_type().replace(".v1", ".v0")
    registry.register_upcaster(old_predictions, PredictionsLogged.event_type(), dict)
    registry.register_upcaster(old_registered, ModelVersionRegistered.event_type(), dict)
    # An upcaster to a type nobody reads any more: its rows stay.
    registry.register_upcaster("io.driftloop.Gone.v1", "io.driftloop.Gone.v2", dict)

    keep = {t: c.keep for c in inbox_classes(TOPICS, registry.wire_types()) for t in c.event_types}

    assert keep == {old_predictions: timedelta(days=15), PredictionsLogged.event_type(): timedelta(days=15)}


def test_a_payload_routed_on_no_topic_is_in_no_class() -> None:
    assert inbox_classes({}, EVENT_TYPES.wire_types()) == []


def test_sent_outbox_rows_are_kept_the_days_set_or_for_ever_at_zero() -> None:
    assert outbox_keep(7) == timedelta(days=7)
    assert outbox_keep(0.5) == timedelta(hours=12)
    assert outbox_keep(0) is None


class UnreachablePool:
    """A pool whose database is away: every connection it hands out fails as Postgres down does."""

    def __init__(self) -> None:
        self.tries = 0

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        self.tries += 1
        raise ConnectionRefusedError("Postgres is restarting")
        yield


def failures(schema: str) -> float:
    return REGISTRY.get_sample_value("driftloop_bus_pruning_failures_total", {"schema": schema}) or 0.0


async def test_a_failed_round_is_counted_and_the_next_round_tries_again_until_stopped() -> None:
    pool = UnreachablePool()
    retention = BusRetention(pool, "retentionfails", inbox=[], outbox_keep=None, interval_s=0.01)
    before = failures("retentionfails")

    async def failed_twice() -> bool:
        return failures("retentionfails") >= before + 2

    running = asyncio.create_task(retention.run())
    try:
        await eventually(failed_twice, deadline_s=10.0, interval_s=0.02)
    finally:
        retention.stop()
        await asyncio.wait_for(running, timeout=10.0)
    assert failures("retentionfails") - before == pool.tries


async def test_stop_ends_the_wait_between_rounds() -> None:
    pool = UnreachablePool()
    retention = BusRetention(pool, "retentionstop", inbox=[], outbox_keep=None, interval_s=3600)

    async def tried() -> bool:
        return pool.tries >= 1

    running = asyncio.create_task(retention.run())
    await eventually(tried, deadline_s=10.0, interval_s=0.01)
    retention.stop()
    await asyncio.wait_for(running, timeout=10.0)
    assert running.exception() is None and pool.tries == 1


def runtime(**settings: Any) -> Runtime:
    return Runtime(
        settings=ServiceSettings(**settings),
        pool=None,
        publisher=None,  # type: ignore[arg-type]
        dead_letters=None,  # type: ignore[arg-type]
        begin=None,  # type: ignore[arg-type]
        registry=EVENT_TYPES,
    )


def test_a_service_prunes_as_its_settings_say() -> None:
    default = runtime().retention()
    assert default.outbox_keep == timedelta(days=7) and default.interval_s == 600
    assert default.inbox == inbox_classes(TOPICS, EVENT_TYPES.wire_types())

    kept = runtime(
        inbox_retention="forever", outbox_keep_sent_days=0, bus_retention_interval_s=60
    ).retention()
    assert (kept.inbox, kept.outbox_keep, kept.interval_s) == ([], None, 60)


class PruningConn:
    """The retention's connection to a database that answers: it holds no row to delete."""

    def __init__(self) -> None:
        self.deletes: list[str] = []

    async def fetchrow(self, sql: str) -> tuple[datetime, None]:
        return datetime.now(UTC), None  # now(), and no unsent outbox row

    async def fetchval(self, sql: str, *args: Any) -> bool:
        return True  # the advisory lock

    async def execute(self, sql: str, *args: Any) -> str:
        self.deletes.append("inbox" if "FROM inbox" in sql else "outbox")
        return "DELETE 0"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield


class PruningPool:
    def __init__(self) -> None:
        self.conn = PruningConn()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[PruningConn]:
        yield self.conn


@pytest.mark.parametrize("days", [1e6, 1e10])
async def test_a_keep_longer_than_a_date_counts_back_keeps_sent_rows_for_ever_and_the_inbox_is_pruned(
    days: float,
) -> None:
    # An operator's "keep them all": 1e10 days made the service crash as it started (timedelta's bound), 1e6
    # days every round fail (a cutoff before year 1) before it reached the inbox, which then grew for ever.
    retention = runtime(outbox_keep_sent_days=days).retention()
    pool = PruningPool()
    retention.pool = pool

    assert await retention.prune_once() == {"inbox": 0, "outbox": 0}
    assert pool.conn.deletes == ["inbox"] * len(retention.inbox)
    assert retention.outbox_keep is None


def test_sent_outbox_rows_are_kept_for_ever_from_a_hundred_years() -> None:
    assert outbox_keep(36_500) is None
    assert outbox_keep(36_499) == timedelta(days=36_499)


class CancelledOncePool(PruningPool):
    """A database that answers, whose first connection is cancelled by something else (asyncpg's connect
    awaiting a future another task cancelled) while the retention's own task is not being cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.tries = 0

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[PruningConn]:
        self.tries += 1
        if self.tries == 1:
            await awaits_a_future_cancelled_elsewhere()
        yield self.conn


async def test_a_round_cancelled_by_what_it_awaited_is_a_failed_round_and_the_next_one_tries_again() -> None:
    # Let through as a stop, it ended the retention, and the service with it (status 1).
    pool = CancelledOncePool()
    retention = BusRetention(
        pool, "retentionstraycancel", inbox=[], outbox_keep=timedelta(days=7), interval_s=0.01
    )
    before = failures("retentionstraycancel")

    async def pruned() -> bool:
        return pool.conn.deletes == ["outbox"]

    running = asyncio.create_task(retention.run())
    try:
        await eventually(pruned, deadline_s=5.0, interval_s=0.01)
        assert not running.done()
    finally:
        retention.stop()
        await asyncio.wait_for(running, timeout=10.0)
    assert failures("retentionstraycancel") - before == 1


class HangingPool:
    """A database that never hands out a connection; cancelled, the wait lets the CancelledError through
    (``error`` None) or raises ``error`` instead, as a library turning a cancellation into its own error."""

    def __init__(self, error: type[Exception] | None) -> None:
        self.error = error
        self.started = asyncio.Event()

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError as exc:
            if self.error is None:
                raise
            raise self.error("connection aborted") from exc
        yield


@pytest.mark.parametrize("error", [None, ConnectionResetError], ids=["let-through", "turned-into-an-error"])
async def test_cancelling_the_retention_ends_it_at_once_counting_no_failure(
    error: type[Exception] | None,
) -> None:
    pool = HangingPool(error)
    retention = BusRetention(pool, "retentioncancelled", inbox=[], outbox_keep=None, interval_s=3600)
    before = failures("retentioncancelled")
    running = asyncio.create_task(retention.run())
    await pool.started.wait()

    running.cancel()

    async def ended() -> bool:
        return running.done()

    try:
        await eventually(ended, deadline_s=5.0, interval_s=0.02)
    finally:  # a retention that did not end must not outlive the test
        retention.stop()
        await asyncio.gather(running, return_exceptions=True)
    assert running.cancelled()
    assert failures("retentioncancelled") == before
