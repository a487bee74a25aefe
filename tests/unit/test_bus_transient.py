"""Errors of the database's state (away, failing over, busy, out of resources) are retried until they clear,
never dead-lettered; errors of the event are retried a bounded number of times, then dead-lettered."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from contracts.envelope import CloudEvent
from libs.bus import InMemoryBus, Subscription, Transaction
from libs.bus.core import is_transient
from tests.unit.test_bus import REGISTRY, ThingHappened, thing

E = asyncpg.exceptions

TRANSIENT = [
    # Already classified so before: connection, cannot connect now, too many connections, admin shutdown,
    # serialization failure, deadlock.
    E.PostgresConnectionError,
    E.ConnectionDoesNotExistError,
    E.CannotConnectNowError,
    E.TooManyConnectionsError,
    E.AdminShutdownError,
    E.SerializationError,
    E.DeadlockDetectedError,
    # Read-only during failover, cancelled statements and lock timeouts, crash shutdown, out of resources.
    E.ReadOnlySQLTransactionError,
    E.QueryCanceledError,
    E.LockNotAvailableError,
    E.CrashShutdownError,
    E.DiskFullError,
    E.OutOfMemoryError,
    E.InsufficientResourcesError,
    E.TransactionRollbackError,
    E.ConnectionFailureError,
    E.IdleSessionTimeoutError,
]

OF_THE_EVENT = [
    E.UniqueViolationError,
    E.ForeignKeyViolationError,
    E.CheckViolationError,
    E.NumericValueOutOfRangeError,
    E.InvalidTextRepresentationError,
    E.UndefinedTableError,
    E.DatabaseDroppedError,
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda c: c.__name__)
def test_database_errors_of_the_infrastructure_are_transient(error: type[Exception]) -> None:
    assert is_transient(error("the database is not itself"))


@pytest.mark.parametrize("error", OF_THE_EVENT, ids=lambda c: c.__name__)
def test_database_errors_of_the_event_are_not(error: type[Exception]) -> None:
    assert not is_transient(error("this event cannot be stored"))


def test_client_side_connection_errors_are_transient() -> None:
    assert is_transient(asyncpg.InterfaceError("connection is closed"))
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert not is_transient(ValueError("bad"))


@pytest.mark.parametrize(
    "error", [E.ReadOnlySQLTransactionError, E.QueryCanceledError, E.LockNotAvailableError], ids=str
)
async def test_a_good_event_outlasts_a_failover_longer_than_the_retry_budget(error: type[Exception]) -> None:
    bus = InMemoryBus(REGISTRY)
    attempts: list[int] = []

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        attempts.append(event.data.n)
        if len(attempts) <= 6:
            raise error("cannot execute INSERT in a read-only transaction")

    bus.subscribe(
        Subscription(
            consumer="c",
            topics=["test.things"],
            handlers={ThingHappened: on_thing},
            max_retries=2,
            retry_backoff_s=0.0,
        )
    )
    await bus.publish(thing(1))

    await bus.drain()

    assert bus.dead_letters == []
    assert len(attempts) == 7


async def test_an_error_of_the_event_is_dead_lettered_after_the_retries() -> None:
    bus = InMemoryBus(REGISTRY)

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        raise E.CheckViolationError('new row violates check constraint "positive"')

    bus.subscribe(
        Subscription(
            consumer="c",
            topics=["test.things"],
            handlers={ThingHappened: on_thing},
            max_retries=1,
            retry_backoff_s=0.0,
        )
    )
    await bus.publish(thing(1))

    await bus.drain()

    assert [d.reason for d in bus.dead_letters] == ["handler-failed"]
