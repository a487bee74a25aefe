"""Errors of the database's state (away, failing over, busy, out of resources) are retried until they clear,
never dead-lettered; errors of the event are retried a bounded number of times, then dead-lettered. An
OSError about a path (FileNotFoundError, PermissionError, ...) is the event's; an OSError or a timeout a
handler raises that may be an outage or its own doing, a statement timeout included, is retried as an outage
for a while, then dead-lettered."""

from __future__ import annotations

import errno
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from asyncpg.exceptions import _base as asyncpg_base

from contracts.envelope import CloudEvent
from libs.artifacts import StoreUnavailable
from libs.bus import Dispatcher, InMemoryBus, Subscription, Transaction
from libs.bus.core import TransactionFailed, Transience, is_transient, transience
from libs.bus.memory import DeadLetter
from libs.db import DatabaseUnreachable, create_pool
from tests.unit.bus_fakes import NullTransaction
from tests.unit.test_bus import REGISTRY, ThingHappened, thing
from tests.unit.test_bus_dead_letters import Sink, record_of

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
    # Read-only during failover, lock timeouts, crash shutdown, out of resources.
    E.ReadOnlySQLTransactionError,
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


@pytest.mark.parametrize("error", [E.ReadOnlySQLTransactionError, E.LockNotAvailableError], ids=str)
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


# --- OSErrors and timeouts ------------------------------------------------------------------------------

OF_THE_INPUT: dict[str, BaseException] = {
    "file-not-found": FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/a.parquet"),
    "permission": PermissionError(errno.EACCES, "Permission denied", "/data/a.parquet"),
    "is-a-directory": IsADirectoryError(errno.EISDIR, "Is a directory", "/data"),
    "not-a-directory": NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/a.parquet/x"),
    "exists": FileExistsError(errno.EEXIST, "File exists", "/data/a.parquet"),
    "name-too-long": OSError(errno.ENAMETOOLONG, "File name too long"),
    "unsupported-operation": io.UnsupportedOperation("not readable"),
    "query-argument": asyncpg_base.DataError("invalid input for query argument $1: 'x' (an int is required)"),
}


@pytest.mark.parametrize("error", OF_THE_INPUT.values(), ids=OF_THE_INPUT.keys())
def test_an_oserror_about_a_path_or_a_value_is_the_events_not_an_outage(error: BaseException) -> None:
    assert transience(error) is None
    assert not is_transient(error)


OUTAGES: dict[str, BaseException] = {
    "refused": ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
    "reset": ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "connection-closed": asyncpg.InterfaceError("connection is closed"),
    "connection-lost": asyncpg.ConnectionDoesNotExistError(
        "connection was closed in the middle of operation"
    ),
    "postgres-restarting": asyncpg.CannotConnectNowError("the database system is starting up"),
    # Whatever the error underneath, code that knows it is an outage says so.
    "store": StoreUnavailable("the artifact store failed on reading ... (PermissionError: denied)"),
    "unix-socket-gone": DatabaseUnreachable("cannot connect to the database: FileNotFoundError: ..."),
    "transaction": TransactionFailed("the consumer's transaction failed: TimeoutError: "),
}


@pytest.mark.parametrize("error", OUTAGES.values(), ids=OUTAGES.keys())
def test_errors_of_the_infrastructure_are_outages(error: BaseException) -> None:
    assert transience(error) is Transience.OUTAGE


STATEMENT_TIMEOUT = E.QueryCanceledError("canceling statement due to statement timeout")

UNCERTAIN: dict[str, BaseException] = {
    "timeout": TimeoutError("timed out"),
    "io-error": OSError(errno.EIO, "Input/output error"),
    "no-errno": OSError("Multiple exceptions: [Errno 111] Connect call failed"),
    # 57014: a handler's query past statement_timeout, on every try for a huge or hostile event.
    "statement-timeout": STATEMENT_TIMEOUT,
    # The server's own failures: a disk failing under a table, a corrupted page or index, an internal error.
    "postgres-io-error": E.PostgresIOError("could not read block 7 in file base/16384/16385: I/O error"),
    "postgres-system-error": E.PostgresSystemError("could not open file"),
    "data-corrupted": E.DataCorruptedError("invalid page in block 7 of relation base/16384/16385"),
    "index-corrupted": E.IndexCorruptedError("index contains unexpected zero page"),
    "internal-error": E.InternalServerError("unexpected chunk number 0 (expected 1) for toast value"),
}


@pytest.mark.parametrize("error", UNCERTAIN.values(), ids=UNCERTAIN.keys())
def test_other_oserrors_and_timeouts_are_uncertain(error: BaseException) -> None:
    assert transience(error) is Transience.UNCERTAIN
    assert is_transient(error)


def raising(errors: list[BaseException]) -> tuple[list[int], Any]:
    """A handler that raises ``errors``, one a call in order, then handles the event; and its calls."""
    calls: list[int] = []

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        calls.append(event.data.n)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]

    return calls, on_thing


def failing(error: BaseException, times: int) -> tuple[list[int], Any]:
    """A handler that raises ``error`` on its first ``times`` calls, then handles the event; and its calls."""
    return raising([error] * times)


def subscription(handler: Any) -> Subscription:
    return Subscription(
        consumer="c",
        topics=["test.things"],
        handlers={ThingHappened: handler},
        max_retries=2,
        max_uncertain_retries=5,
        retry_backoff_s=0.0,
    )


async def one_event_raising(errors: list[BaseException]) -> tuple[int, list[DeadLetter]]:
    """One event through a handler that raises ``errors``, one a call: how often it was called, and the
    dead letters."""
    bus = InMemoryBus(REGISTRY)
    calls, handler = raising(errors)
    bus.subscribe(subscription(handler))
    await bus.publish(thing(1))
    await bus.drain()
    return len(calls), bus.dead_letters


async def one_event_failing(error: BaseException, times: int) -> tuple[int, list[DeadLetter]]:
    """One event through a handler that raises ``error`` ``times`` times: how often it was called, and the
    dead letters."""
    return await one_event_raising([error] * times)


@pytest.mark.parametrize("error", OF_THE_INPUT.values(), ids=OF_THE_INPUT.keys())
async def test_a_handler_raising_an_oserror_about_a_path_has_its_event_dead_lettered_with_the_reason(
    error: BaseException,
) -> None:
    # It would raise it for ever; the 50 times are only there so that a bus retrying it without limit ends.
    calls, [dead] = await one_event_failing(error, times=50)

    assert (dead.reason, dead.error) == ("handler-failed", f"{type(error).__name__}: {error}")
    assert calls == 3  # max_retries=2


@pytest.mark.parametrize("error", OUTAGES.values(), ids=OUTAGES.keys())
async def test_a_handler_raising_a_connection_error_is_retried_past_every_bound(error: BaseException) -> None:
    assert await one_event_failing(error, times=30) == (31, [])


@pytest.mark.parametrize("error", UNCERTAIN.values(), ids=UNCERTAIN.keys())
async def test_an_uncertain_error_that_clears_within_its_bound_loses_nothing(error: BaseException) -> None:
    # More often than max_retries, within max_uncertain_retries.
    assert await one_event_failing(error, times=5) == (6, [])


@pytest.mark.parametrize("error", UNCERTAIN.values(), ids=UNCERTAIN.keys())
async def test_an_uncertain_error_that_outlasts_its_bound_is_dead_lettered_saying_so(
    error: BaseException,
) -> None:
    # A handler's own wait that never ends (a timeout) must not hold its partition for ever.
    calls, [dead] = await one_event_failing(error, times=50)

    assert dead.reason == "handler-failed"
    assert dead.error.startswith(f"{type(error).__name__}: {error} (on 6 attempts in a row;")
    assert calls == 6


async def test_an_outage_between_uncertain_errors_starts_their_count_again() -> None:
    # A database failing over times statements out, then drops connections, then times them out again while
    # it warms up: 10 timeouts in all, more than the bound of 5, but never 6 in a row.
    timeouts, lost = [STATEMENT_TIMEOUT] * 5, [OUTAGES["connection-lost"]] * 3

    assert await one_event_raising(timeouts + lost + timeouts) == (14, [])


async def test_an_outage_before_a_statement_that_always_times_out_does_not_spend_its_bound() -> None:
    calls, [dead] = await one_event_raising([OUTAGES["connection-lost"]] * 8 + [STATEMENT_TIMEOUT] * 50)

    assert dead.error.startswith(f"QueryCanceledError: {STATEMENT_TIMEOUT} (on 6 attempts in a row;")
    assert calls == 8 + 6


@pytest.mark.parametrize(
    "error",
    [TimeoutError("waiting for a lock of its own that never comes"), STATEMENT_TIMEOUT],
    ids=["timeout", "statement-timeout"],
)
async def test_one_event_timing_out_in_a_group_commit_holds_up_neither_the_poll_nor_its_partition(
    error: BaseException,
) -> None:
    bus = InMemoryBus(REGISTRY)
    handled: list[int] = []

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        if event.data.n == 2:
            raise error
        tx.after_commit(lambda: handled.append(event.data.n))

    bus.subscribe(subscription(on_thing))
    for n in (1, 2, 3):
        await bus.publish(thing(n))

    await bus.drain()

    assert [d.record.offset for d in bus.dead_letters] == [1]
    assert handled == [1, 3]


class Database:
    """Consumer transactions whose opening fails ``fail_next`` times with ``error``, as connecting to Postgres
    over a unix socket fails while the server restarts (the socket file is gone: FileNotFoundError)."""

    def __init__(self, error: BaseException, fail_next: int) -> None:
        self.error = error
        self.fail_next = fail_next

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        if self.fail_next:
            self.fail_next -= 1
            raise self.error
        yield NullTransaction()


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        TimeoutError(),
        OSError("Multiple exceptions"),
    ],
    ids=["unix-socket-gone", "timeout", "no-errno"],
)
async def test_the_consumers_own_transaction_failing_is_an_outage_whatever_the_oserror(
    error: BaseException,
) -> None:
    db, sink = Database(error, fail_next=30), Sink()
    calls, handler = failing(RuntimeError("never raised"), times=0)
    d = Dispatcher(subscription(handler), registry=REGISTRY, begin=db.begin, dead_letters=sink)

    await d.dispatch([record_of(thing(1), 0)])

    assert sink.written == []
    assert calls == [1] and db.fail_next == 0


async def test_a_pool_that_cannot_reach_postgres_over_its_unix_socket_says_the_database_is_away(
    tmp_path: Path,
) -> None:
    # While Postgres restarts, its unix socket file is gone: connecting raises FileNotFoundError, which from a
    # handler would be the event's fault. The pool's connections say what it is: an outage.
    pool = await create_pool(f"postgresql://driftloop@/driftloop?host={tmp_path}", schema="s", min_size=0)
    try:
        with pytest.raises(DatabaseUnreachable, match="FileNotFoundError") as failed:
            async with pool.acquire(timeout=10):
                pass
    finally:
        await pool.close()
    assert isinstance(failed.value.__cause__, FileNotFoundError)
    assert transience(failed.value) is Transience.OUTAGE
