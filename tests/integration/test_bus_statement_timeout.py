"""A handler's statement that runs past Postgres' statement_timeout on every try, as a huge or hostile event's
query would, on the real Postgres: its event is dead-lettered naming the timeout once the uncertain bound is
spent, and the events around it are handled; its partition is not held for good."""

from __future__ import annotations

from typing import Any

from contracts.envelope import CloudEvent
from libs.bus.core import Dispatcher, Subscription, Transaction
from libs.bus.postgres import bus_migrations, pg_transactions
from libs.db import apply_migrations, create_pool
from tests.integration.kafka_tools import unique
from tests.unit.test_bus import REGISTRY, ThingHappened, thing
from tests.unit.test_bus_dead_letters import Sink, record_of


async def test_an_event_whose_statement_always_times_out_is_dead_lettered_naming_the_timeout(
    database_url: str,
) -> None:
    schema = unique("t_timeout")
    pool = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(pool, schema, bus_migrations())
        handled: list[int] = []

        async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
            if event.data.n == 2:
                await tx.conn.execute("SET LOCAL statement_timeout = '10ms'; SELECT pg_sleep(1)")
            tx.after_commit(lambda: handled.append(event.data.n))

        sink = Sink()
        dispatcher = Dispatcher(
            Subscription(
                consumer="c",
                topics=["test.things"],
                handlers={ThingHappened: on_thing},
                max_uncertain_retries=2,
                retry_backoff_s=0.0,
            ),
            registry=REGISTRY,
            begin=pg_transactions(pool, schema),
            dead_letters=sink,
        )

        await dispatcher.dispatch([record_of(thing(n), n - 1) for n in (1, 2, 3)])

        assert handled == [1, 3]
        assert sink.written == [(1, "handler-failed")]
        [error] = sink.errors
        assert error.startswith(
            "QueryCanceledError: canceling statement due to statement timeout (on 3 attempts"
        )
    finally:
        await pool.close()
