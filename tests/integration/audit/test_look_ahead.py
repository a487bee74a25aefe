"""The audit subscription's look-ahead on the real Postgres: the next poll is prepared while a poll's
transaction is in flight, and a failure or another writer in between never leaves a gap or a fork."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from contracts.monitoring import DriftDetected
from contracts.registry import EVENT_TYPES
from libs.bus.core import Dispatcher, InboxTransaction, Record
from libs.bus.postgres import pg_transactions
from services.audit.bootstrap import trail_subscription
from services.audit.settings import AuditSettings
from tests.integration.audit.conftest import ROLE, TrailDb
from tests.unit.audit.fakes import delivery, example, record_of


class DeadLetters:
    async def dead_letter(self, record: Record, *, consumer: str, reason: str, error: str) -> None:
        raise AssertionError(f"nothing here is dead-lettered: {reason} {error}")


def service_dispatcher(trail_db: TrailDb, *, fail_commits: int = 0) -> Dispatcher:
    """The service's subscription on the bus's dispatcher; the first ``fail_commits`` transactions are
    lost just before they commit (the connection drops)."""
    base = pg_transactions(trail_db.pool, trail_db.schema)
    left = {"failures": fail_commits}

    @asynccontextmanager
    async def begin() -> AsyncIterator[InboxTransaction]:
        async with base() as tx:
            yield tx
            if left["failures"] > 0:
                left["failures"] -= 1
                raise ConnectionResetError("the database went away before commit")

    settings = AuditSettings(writer_role=ROLE, checkpoint_every_rows=4, look_ahead=True)
    return Dispatcher(
        trail_subscription(settings, trail_db.signer, "/driftloop/audit"),
        registry=EVENT_TYPES,
        begin=begin,
        dead_letters=DeadLetters(),
    )


def polls(n: int, size: int) -> list[list[Record]]:
    return [[record_of(example(DriftDetected), offset=p * size + i) for i in range(size)] for p in range(n)]


async def positions(trail_db: TrailDb) -> list[Any]:
    rows = await trail_db.pool.fetch("SELECT seq, kafka_offset, recorded_at FROM trail ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)), "a gap in the sequence numbers"
    return rows


async def test_a_poll_lost_while_the_next_is_prepared_is_read_again_without_gap_or_fork(
    trail_db: TrailDb,
) -> None:
    first, second, third = polls(3, 6)
    dispatcher = service_dispatcher(trail_db, fail_commits=1)
    try:
        await dispatcher.dispatch(first, upcoming=second)
    except ConnectionResetError:
        pass
    else:
        raise AssertionError("the first poll's transaction should have been lost")
    assert await trail_db.pool.fetchval("SELECT count(*) FROM trail") == 0
    # What the Kafka runner does next: seek back, read both polls again, settle them in order.
    await dispatcher.dispatch(first, upcoming=second)
    before_second = datetime.now(UTC)
    await dispatcher.dispatch(second, upcoming=third)
    await dispatcher.dispatch(third)
    rows = await positions(trail_db)
    assert [r["kafka_offset"] for r in rows] == list(range(18))
    # The second and third polls went in as prepared while the poll before them was in flight.
    assert all(r["recorded_at"] < before_second for r in rows[6:12])
    report = await trail_db.verify(full=True)
    assert report.ok and report.rows_checked == 18 and report.checkpoints_checked == 3, report


async def test_rows_prepared_before_another_writer_appended_follow_its_rows(trail_db: TrailDb) -> None:
    first, second = polls(2, 5)
    dispatcher = service_dispatcher(trail_db)
    await dispatcher.dispatch(first, upcoming=second)
    # Another writer on the same trail (a second replica) takes the chain lock before the second poll.
    others = [
        delivery(example(DriftDetected), topic="mlops.monitoring", partition=2, offset=i) for i in range(3)
    ]
    assert await trail_db.record(others) == 3
    await dispatcher.dispatch(second)
    rows = await positions(trail_db)
    assert len(rows) == 13
    assert [r["kafka_offset"] for r in rows[8:]] == list(range(5, 10))
    assert (await trail_db.verify(full=True)).ok
