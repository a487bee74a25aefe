"""The inbox on the real Postgres: events keyed by CloudEvents source and id, and rows kept from before the
inbox recorded sources still standing for their events."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import asyncpg

from contracts.envelope import MAX_ATTRIBUTE_CHARS, CloudEvent, new_event
from libs.bus.core import Claim, Dispatcher, InboxEntry, Subscription, Transaction
from libs.bus.postgres import PgTransaction, bus_migrations, pg_transactions
from libs.db import apply_migrations, create_pool
from tests.integration.kafka_tools import unique
from tests.unit.test_bus import REGISTRY, ThingHappened, thing
from tests.unit.test_bus_dead_letters import Sink, record_of


def entry(source: str, event_id: str, value: bytes, event_type: str | None = None) -> InboxEntry:
    return InboxEntry(source, event_id, hashlib.sha256(value).hexdigest(), event_type)


async def claim(pool: asyncpg.Pool, schema: str, *items: InboxEntry) -> list[Claim]:
    async with pool.acquire() as conn, conn.transaction():
        return await PgTransaction(conn, schema).claim("consumer", items)


async def record_as_before(pool: asyncpg.Pool, handled: InboxEntry, *, with_source: bool = False) -> None:
    """What the inbox recorded before it knew sources (bus migration 0001's statement), or ``with_source``,
    before it knew types (0002's)."""
    columns, values = ("source, ", "$3, ") if with_source else ("", "")
    async with pool.acquire() as conn:
        await conn.execute(
            f"INSERT INTO inbox (consumer, {columns}event_id, payload_sha256)"
            f" VALUES ('consumer', {values}$1, $2)",
            handled.event_id,
            handled.sha256,
            *([handled.source] if with_source else []),
        )


async def test_the_inbox_keys_on_source_and_id(database_url: str) -> None:
    schema = unique("t_inbox")
    pool = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(pool, schema, bus_migrations())
        a, b = entry("/team-a", "1", b'{"n":1}'), entry("/team-b", "1", b'{"n":1}')
        assert await claim(pool, schema, a, b, a) == [Claim.NEW, Claim.NEW, Claim.DUPLICATE]
        other = entry("/team-b", "1", b'{"n":2}')
        assert await claim(pool, schema, b, a, other) == [Claim.DUPLICATE, Claim.DUPLICATE, Claim.REUSED_ID]
        c = entry("/team-c", "1", b'{"n":2}')
        assert await claim(pool, schema, c) == [Claim.NEW]
    finally:
        await pool.close()


async def test_rows_from_before_the_upgrade_still_absorb_their_redeliveries(database_url: str) -> None:
    schema = unique("t_inbox")
    pool = await create_pool(database_url, schema=schema)
    try:
        first, *later = bus_migrations()
        assert first.id == "bus/0001_inbox_outbox.sql"
        await apply_migrations(pool, schema, [first])
        handled = entry("/team-a", "old-1", b'{"n":1}')
        await record_as_before(pool, handled)
        assert await apply_migrations(pool, schema, bus_migrations()) == [m.id for m in later]
        # A replica still running the former code during a rolling upgrade records the same way.
        handled_meanwhile = entry("/team-b", "old-2", b'{"n":1}')
        await record_as_before(pool, handled_meanwhile)

        # Those events, redelivered: a no-op, or refused if the payload changed.
        changed = entry("/team-a", "old-1", b'{"n":2}')
        assert await claim(pool, schema, handled, changed, handled_meanwhile) == [
            Claim.DUPLICATE,
            Claim.REUSED_ID,
            Claim.DUPLICATE,
        ]
        # New events are keyed by source and id.
        fresh_a, fresh_b = entry("/team-a", "new-1", b"{}"), entry("/team-b", "new-1", b"{}")
        assert await claim(pool, schema, fresh_a, fresh_b) == [Claim.NEW, Claim.NEW]
        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT source, event_id FROM inbox ORDER BY event_id, source")
        assert [tuple(r) for r in rows] == [
            ("/team-a", "new-1"),
            ("/team-b", "new-1"),
            ("", "old-1"),
            ("", "old-2"),
        ]
    finally:
        await pool.close()


async def test_the_inbox_tells_another_type_from_a_redelivery_and_rows_without_a_type_go_by_payload(
    database_url: str,
) -> None:
    """Same source, id and bytes under another type is another event; a row stored without a type (before
    bus migration 0003, or by a replica still running the former code) is compared by its payload alone."""
    schema = unique("t_inbox")
    pool = await create_pool(database_url, schema=schema)
    try:
        migrations = bus_migrations()
        assert migrations[2].id == "bus/0003_inbox_event_type.sql"
        await apply_migrations(pool, schema, migrations[:2])
        value = b'{"model":"churn","model_version":7,"reason":"x"}'
        promote, rollback = "io.driftloop.PromoteRequested.v1", "io.driftloop.RollbackRequested.v1"
        await record_as_before(pool, entry("/cli", "before", value), with_source=True)
        await apply_migrations(pool, schema, migrations)
        await record_as_before(pool, entry("/cli", "meanwhile", value), with_source=True)

        handled = entry("/cli", "now", value, promote)
        assert await claim(pool, schema, handled) == [Claim.NEW]
        assert await claim(pool, schema, handled, entry("/cli", "now", value, rollback)) == [
            Claim.DUPLICATE,
            Claim.REUSED_ID,
        ]
        assert await claim(
            pool,
            schema,
            entry("/cli", "before", value, rollback),
            entry("/cli", "meanwhile", value, promote),
            entry("/cli", "meanwhile", b"{}", promote),
        ) == [Claim.DUPLICATE, Claim.DUPLICATE, Claim.REUSED_ID]
    finally:
        await pool.close()


async def test_an_event_whose_source_and_id_the_inbox_cannot_key_is_dead_lettered_as_oversized(
    database_url: str,
) -> None:
    """Each attribute is within its 512 characters, but in 4-byte UTF-8 (and too random to compress) the two
    together pass the 2,704 bytes a Postgres index entry may have: the event is refused, not retried as a
    failing handler."""
    schema = unique("t_inbox")
    pool = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(pool, schema, bus_migrations())
        rnd = random.Random(7)
        wide = "".join(chr(rnd.randrange(0x10000, 0x110000)) for _ in range(MAX_ATTRIBUTE_CHARS))
        handled: list[int] = []

        async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
            handled.append(event.data.n)

        sink = Sink()
        dispatcher = Dispatcher(
            Subscription(consumer="counter", topics=["test.things"], handlers={ThingHappened: on_thing}),
            registry=REGISTRY,
            begin=pg_transactions(pool, schema),
            dead_letters=sink,
        )
        unkeyable = new_event(ThingHappened(n=1), source=wide, event_id=wide)

        await dispatcher.dispatch([record_of(unkeyable, 0), record_of(thing(2), 1)])

        assert handled == [2]
        assert sink.written == [(0, "oversized")]
    finally:
        await pool.close()
