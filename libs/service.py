"""How every service runs: one runtime (pool, producer, bus), one HTTP server, its consumers, relay and bus
retention, all in one event loop, stopped gracefully on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import asyncpg
from aiokafka.errors import KafkaError
from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import SettingsError

from contracts.envelope import EventTypeRegistry
from contracts.registry import EVENT_TYPES
from contracts.topics import TOPICS
from libs.auth import TokenFileInvalid, read_token_file
from libs.bus.core import Subscription, TransactionFactory
from libs.bus.kafka import ConsumerRunner, KafkaDeadLetters, KafkaPublisher
from libs.bus.postgres import BusRetention, OutboxRelay, bus_migrations, pg_transactions
from libs.bus.retention import inbox_classes, outbox_keep
from libs.db import Migration, apply_migrations, create_pool, shown_dsn
from libs.http_server import http_server
from libs.logging import configure_logging, get_logger
from libs.settings import ServiceSettings, settings_problems

ABANDON_GRACE_S = 10.0
"""How long a start that failed waits for the pool to close before it terminates it
(:meth:`Runtime.close`)."""

log = get_logger(__name__)

S = TypeVar("S", bound=ServiceSettings)
T = TypeVar("T")


def load_settings(settings_class: type[S]) -> S:
    """A service's settings, its token file read once to check it, before anything connects. What is
    wrong is printed naming the variable (never a secret's value) and the process exits with 2: a
    traceback would bury it."""
    try:
        settings = settings_class()
        read_token_file(settings.auth_tokens_file, named_by="DRIFTLOOP_AUTH_TOKENS_FILE")
    except (ValidationError, SettingsError) as err:
        problems = settings_problems(err)
    except TokenFileInvalid as err:
        problems = [str(err)]
    else:
        return settings
    for problem in problems:
        print(f"driftloop {settings_class.service}: error: {problem}", file=sys.stderr)
    print(
        f"driftloop {settings_class.service}: what to do: correct or unset it; every setting is listed in "
        f"docs/settings.md, from services/{settings_class.service}/settings.py and libs/settings.py.",
        file=sys.stderr,
    )
    raise SystemExit(2)


@dataclass
class Runtime:
    """The connections a service owns. Built by :meth:`start`; nothing connects at import time."""

    settings: ServiceSettings
    pool: asyncpg.Pool
    publisher: KafkaPublisher
    dead_letters: KafkaDeadLetters
    begin: TransactionFactory
    registry: EventTypeRegistry

    @classmethod
    async def start(
        cls, settings: ServiceSettings, migrations: Sequence[Migration], *, connect_deadline_s: float = 60.0
    ) -> Runtime:
        """Connect to Postgres, migrate, and start the producer, waiting up to ``connect_deadline_s`` for each
        of Postgres and Kafka to answer."""
        pool = await _until_reachable(
            f"Postgres at {shown_dsn(settings.database_url)}",
            lambda: create_pool(
                settings.database_url,
                schema=settings.db_schema,
                min_size=settings.db_pool_min,
                max_size=settings.db_pool_max,
            ),
            errors=(OSError, asyncpg.PostgresError),
            deadline_s=connect_deadline_s,
        )
        try:
            await apply_migrations(pool, settings.db_schema, [*bus_migrations(), *migrations])
            publisher = KafkaPublisher(settings.kafka, client_id=f"driftloop-{settings.service}")
            await _until_reachable(
                f"Kafka at {settings.kafka.bootstrap}",
                publisher.start,
                errors=(KafkaError, OSError),
                deadline_s=connect_deadline_s,
            )
        except BaseException:
            await pool.close()
            raise
        return cls(
            settings=settings,
            pool=pool,
            publisher=publisher,
            dead_letters=KafkaDeadLetters(publisher),
            begin=pg_transactions(pool, settings.db_schema, max_event_bytes=settings.kafka.max_event_bytes),
            registry=EVENT_TYPES,
        )

    def source(self) -> str:
        """CloudEvents ``source`` of this service's events."""
        return f"/driftloop/{self.settings.service}"

    def consumer(self, subscription: Subscription) -> ConsumerRunner:
        return ConsumerRunner(
            subscription,
            kafka=self.settings.kafka,
            registry=self.registry,
            begin=self.begin,
            dead_letters=self.dead_letters,
        )

    def relay(self) -> OutboxRelay:
        return OutboxRelay(
            self.pool,
            self.settings.db_schema,
            self.publisher,
            max_record_bytes=self.publisher.max_record_bytes,
        )

    def retention(self) -> BusRetention:
        """The bus's retention on this service's inbox and outbox, as the settings ask."""
        inbox = (
            inbox_classes(TOPICS, self.registry.wire_types())
            if self.settings.inbox_retention == "topics"
            else []
        )
        return BusRetention(
            self.pool,
            self.settings.db_schema,
            inbox=inbox,
            outbox_keep=outbox_keep(self.settings.outbox_keep_sent_days),
            interval_s=self.settings.bus_retention_interval_s,
        )

    async def ready(self) -> dict[str, bool]:
        """Readiness: the database answers (the producer reconnects on its own)."""
        try:
            async with self.pool.acquire(timeout=2) as conn:
                await conn.fetchval("SELECT 1")
            return {"database": True}
        except Exception:
            return {"database": False}

    async def close(self, *, grace_s: float | None = None) -> None:
        """Stop the producer, then close the pool: in the reverse of the order :meth:`start` opened them, the
        pool even when stopping the producer fails. With ``grace_s`` (a start that failed), the pool is
        terminated if it has not closed by then: a connection the build took and still holds (a LISTEN
        connection, a lock's session) would keep ``pool.close()`` waiting for ever, and the process that
        should exit with the build's error would hang instead."""
        try:
            await self.publisher.stop()
        finally:
            if grace_s is None:
                await self.pool.close()
            else:
                try:
                    await asyncio.wait_for(self.pool.close(), timeout=grace_s)
                except TimeoutError:
                    log.error("the pool did not close after a failed start; terminating it", grace_s=grace_s)
                    self.pool.terminate()


async def _until_reachable(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    errors: tuple[type[BaseException], ...],
    deadline_s: float,
) -> T:
    """``attempt()`` until it succeeds, retrying ``errors`` (waiting 0.25 s, doubling up to 3 s) for
    ``deadline_s``; then a RuntimeError naming what could not be reached. Services start in any order
    (compose, the supervisor, a restarted host), so a dependency still coming up is waited for, Kafka as
    Postgres: the producer's start raised at once and the service exited, restarted by its supervisor into
    the same error until the broker was up."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline_s
    delay = 0.25
    while True:
        try:
            return await attempt()
        except errors as exc:
            if loop.time() > until:
                raise RuntimeError(
                    f"cannot reach {what} after {deadline_s:.0f}s: {exc}. "
                    "Is it running? Try `driftloop infra status`."
                ) from exc
            log.warning("not reachable yet, retrying", what=what, error=repr(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)


# The collector's generation-0 threshold in service processes (CPython's default is 700). A consumer
# decodes a poll of events at once (monitoring: about 3,000 prediction rows, a dozen containers each),
# all alive until the poll's transaction commits; at 700 allocations per pass the collector walked them
# again and again and moved them up the generations into full passes: half of the CPU of consuming
# predictions (29 µs per row with the default, 13-16 µs with 10,000; measured in docs/benchmarks.md).
# Cycles are still collected; a pass over 10,000 young objects takes well under a millisecond.
GC_GEN0_THRESHOLD = 10_000


def tune_collector(gen0_threshold: int = GC_GEN0_THRESHOLD) -> None:
    """Freeze what startup built (imported modules, settings, loaded profiles: long-lived, walked by every
    full pass otherwise) and raise generation 0's threshold. Called once the service is built."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


@dataclass
class ServiceParts:
    """What a service's bootstrap hands back: its API, its subscriptions, and any long-running tasks."""

    app: FastAPI
    subscriptions: list[Subscription] = field(default_factory=list)
    tasks: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    relay: bool = True


Build = Callable[[Runtime], Awaitable[ServiceParts]]


async def serve(settings: ServiceSettings, *, migrations: Sequence[Migration], build: Build) -> None:
    """Run a service until SIGTERM/SIGINT; then stop taking requests, finish the batches in hand, exit."""
    configure_logging(settings.service, level=settings.log_level, json=settings.log_json)
    # Until the tasks run, a step that fails (a build that raises) closes what the start opened, in reverse
    # order, and its own error is the one raised: the pool and the producer were left open, unclosed warnings
    # and leaked connections in tests and in-process harnesses. Once the tasks run, the orderly stop below
    # closes them, after the tasks' own ends.
    async with contextlib.AsyncExitStack() as opened:
        runtime = await Runtime.start(settings, migrations)
        opened.push_async_callback(
            _close_after_failure, "runtime", partial(runtime.close, grace_s=ABANDON_GRACE_S)
        )
        parts = await build(runtime)
        tune_collector()
        runners = [runtime.consumer(s) for s in parts.subscriptions]
        relay = runtime.relay() if parts.relay else None
        retention = runtime.retention()
        server = http_server(parts.app, settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        tasks = [asyncio.create_task(server.serve(), name="http")]
        tasks += [asyncio.create_task(r.run(), name=f"consumer:{r.sub.consumer}") for r in runners]
        if relay is not None:
            tasks.append(asyncio.create_task(relay.run(), name="outbox-relay"))
        tasks.append(asyncio.create_task(retention.run(), name="bus-retention"))
        tasks += [asyncio.create_task(t(), name=getattr(t, "__name__", "task")) for t in parts.tasks]
        opened.pop_all()
    log.info("service started", port=settings.http_port, consumers=[r.sub.consumer for r in runners])

    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    crashed = [t for t in done if t is not stopper]
    for t in crashed:
        log.error("task ended, stopping the service", task=t.get_name(), error=why_ended(t))
    log.info("service stopping")
    server.should_exit = True
    for r in runners:
        r.stop()
    if relay is not None:
        relay.stop()
    retention.stop()
    hooks_failed = False
    for hook in parts.on_stop:
        # Each hook on its own: one that fails must not skip the others, the tasks' own ends (offsets
        # committed, the relay's last round) or the connections' close. The service then exits with status 1.
        try:
            await hook()
        except Exception as exc:
            log.error("stop hook failed", hook=getattr(hook, "__qualname__", repr(hook)), error=repr(exc))
            hooks_failed = True
    _, pending = await asyncio.wait(tasks, timeout=15)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    stopper.cancel()
    await runtime.close()
    log.info("service stopped")
    if crashed or hooks_failed:
        raise SystemExit(1)


async def _close_after_failure(what: str, close: Callable[[], Awaitable[None]]) -> None:
    """``close()`` as a start that failed unwinds; a failure of its own is logged, not raised, so the error
    that stopped the start is the one reported, and the exit status the one it gives."""
    try:
        await close()
    except Exception as exc:
        log.error("closing after a failed start failed too", what=what, error=repr(exc))


def why_ended(task: asyncio.Task[Any]) -> str:
    """Why a task of a service (a consumer, the relay, the HTTP server, a background loop) ended before the
    service was asked to stop: each runs until then, so any ending is a crash. ``task.exception()`` raises
    for a cancelled task, which ended ``serve`` with a traceback, skipping the orderly stop and the exit
    status; a task that returned was taken for no crash, and the service stopped with status 0."""
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return repr(exc) if exc is not None else "returned"


def run(settings: ServiceSettings, *, migrations: Sequence[Migration], build: Build) -> None:
    """Entry point for ``python -m services.<name>``."""
    asyncio.run(serve(settings, migrations=migrations, build=build))
