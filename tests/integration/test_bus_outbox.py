"""The outbox on the real Postgres: a handler transaction's events are written at its end, in order, and
only if its work succeeded."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from contracts.envelope import DEFAULT_MAX_EVENT_BYTES
from libs.bus.core import encode_outgoing
from libs.bus.postgres import OutboxRelay, PgTransaction, bus_migrations, outbox_channel, pg_transactions
from libs.db import apply_migrations, create_pool
from tests.integration.kafka_tools import eventually, unique
from tests.unit.test_bus import thing


async def test_a_transaction_writes_its_events_in_order_a_failed_one_none(database_url: str) -> None:
    schema = unique("t_outbox")
    pool = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(pool, schema, bus_migrations())
        begin = pg_transactions(pool, schema)
        woken = asyncio.Event()
        async with pool.acquire() as listener:

            def wake(*_: object) -> None:
                woken.set()

            await listener.add_listener(outbox_channel(schema), wake)

            events = [thing(n) for n in range(300)]
            async with begin() as tx:
                for event in events:
                    await tx.publish(event)
            await asyncio.wait_for(woken.wait(), timeout=10)

            with pytest.raises(RuntimeError):
                async with begin() as tx:
                    await tx.publish(thing(1_000))
                    raise RuntimeError("the handler failed after publishing")

            async with pool.acquire() as conn:
                rows = await conn.fetch("SELECT * FROM outbox ORDER BY seq")
            await listener.remove_listener(outbox_channel(schema), wake)
        assert [r["event_id"] for r in rows] == [e.id for e in events]
        assert {r["topic"] for r in rows} == {events[0].topic} and all(r["sent_at"] is None for r in rows)
        # Stored as sent: the relay hands Kafka the key, value and headers as encode_outgoing made them.
        for r, event in zip(rows, events, strict=True):
            key, value, headers = encode_outgoing(event, max_bytes=DEFAULT_MAX_EVENT_BYTES)
            assert (r["key"], r["value"], [(k, v.encode()) for k, v in r["headers"]]) == (key, value, headers)
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()


async def test_a_schema_with_the_longest_name_postgres_allows_publishes_and_wakes_its_relay(
    database_url: str,
) -> None:
    # 63 characters, as many as a schema name may have: driftloop_outbox_ + it was a channel pg_notify
    # refused ("channel name too long"), so every transaction that published failed.
    schema = unique("t_outbox_long").ljust(63, "x")
    pool = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(pool, schema, bus_migrations())
        woken = asyncio.Event()

        def wake(*_: object) -> None:
            woken.set()

        async with pool.acquire() as listener:
            await listener.add_listener(outbox_channel(schema), wake)
            async with pg_transactions(pool, schema)() as tx:
                await tx.publish(thing(1))
            await asyncio.wait_for(woken.wait(), timeout=10)
            await listener.remove_listener(outbox_channel(schema), wake)
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM outbox") == 1
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()


async def test_a_transaction_past_the_statement_budget_is_written_whole_in_order(database_url: str) -> None:
    # One statement for all rows closed the connection past Postgres' 1 GB message limit (retried for ever);
    # the budget here is small so that 300 events take many statements.
    schema = unique("t_outbox")
    pool = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(pool, schema, bus_migrations())
        events = [thing(n) for n in range(300)]
        notified: list[str] = []

        def wake(*_: object) -> None:
            notified.append("woken")

        async def woken() -> bool:
            return bool(notified)

        async with pool.acquire() as listener:
            await listener.add_listener(outbox_channel(schema), wake)
            async with pool.acquire() as conn, conn.transaction():
                tx = PgTransaction(conn, schema, max_statement_bytes=20_000)
                for event in events:
                    await tx.publish(event)
                await tx.flush()
            async with pool.acquire() as conn:
                rows = await conn.fetch("SELECT event_id FROM outbox ORDER BY seq")
            await eventually(woken, deadline_s=30)
            # A round trip on the listener's connection: any other notification of that commit came before it.
            await listener.fetchval("SELECT 1")
            await listener.remove_listener(outbox_channel(schema), wake)
        assert [r["event_id"] for r in rows] == [e.id for e in events]
        assert notified == ["woken"]  # the relay is woken once, at commit
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()


class BatchRecorder:
    """A sender that keeps each batch the relay hands it."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []

    async def send_many(self, items: Sequence[tuple[str, bytes | None, bytes | None, list[Any]]]) -> None:
        self.batches.append([value or b"" for _, _, value, _ in items])


async def test_the_relay_takes_a_batch_of_at_most_its_byte_budget_and_a_larger_row_alone(
    database_url: str,
) -> None:
    # 500 rows of events near max_event_bytes made a 500 MB batch, held twice; with the limit raised, more
    # than a service has: a relay killed for it takes the same batch on restart.
    schema = unique("t_outbox")
    pool = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(pool, schema, bus_migrations())
        sizes = [1_000] * 7 + [10_000] + [1_000] * 2
        async with pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO outbox (event_id, topic, key, value, headers) VALUES ($1, 't', NULL, $2, '[]')",
                [(f"e{n}", bytes([65 + n]) * size) for n, size in enumerate(sizes)],
            )
        sender = BatchRecorder()
        relay = OutboxRelay(pool, schema, sender, batch_size=500, batch_bytes=3_500)
        while await relay.flush_once():
            pass
        assert [[len(v) for v in batch] for batch in sender.batches] == [
            [1_000] * 3,
            [1_000] * 3,
            [1_000],  # the next row alone passes the budget: it waits for the next batch
            [10_000],  # larger than the budget: alone
            [1_000] * 2,
        ]
        sent = [value for batch in sender.batches for value in batch]
        assert [v[:1] for v in sent] == [bytes([65 + n]) for n in range(len(sizes))]  # in order
        assert await relay.backlog() == 0
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()
