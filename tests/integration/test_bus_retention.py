"""The bus's retention on the real Postgres: old sent outbox rows and old inbox rows of events Kafka no
longer holds are deleted, a batch per transaction; unsent rows, recent rows, rows of events on topics kept
for ever, untyped rows and rows of unknown types stay. And the deletes find their rows through the BRIN
indexes of bus migration 0004, not by reading the whole table."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
from prometheus_client import REGISTRY

from contracts.models import ModelVersionRegistered
from contracts.monitoring import DriftDetected
from contracts.predictions import PredictionsLogged
from contracts.registry import EVENT_TYPES
from contracts.topics import TOPICS
from libs.bus.postgres import _PRUNE_INBOX_SQL, _PRUNE_OUTBOX_SQL, BusRetention, bus_migrations
from libs.bus.retention import inbox_classes
from libs.db import apply_migrations, create_pool
from tests.integration.kafka_tools import unique

PREDICTIONS = PredictionsLogged.event_type()  # a 7-day topic: rows kept 15 days
DRIFT = DriftDetected.event_type()  # a 30-day topic: rows kept 61 days
REGISTERED = ModelVersionRegistered.event_type()  # a topic kept for ever


async def handled(conn: asyncpg.Connection, event_id: str, event_type: str | None, days_ago: float) -> None:
    await conn.execute(
        "INSERT INTO inbox (consumer, source, event_id, payload_sha256, event_type, processed_at)"
        " VALUES ('monitoring', '/driftloop/serving', $1, 'sha', $2, now() - $3::interval)",
        event_id,
        event_type,
        timedelta(days=days_ago),
    )


async def written(conn: asyncpg.Connection, event_id: str, *, sent: bool, days_ago: float) -> None:
    await conn.execute(
        "INSERT INTO outbox (event_id, topic, value, headers, created_at, sent_at)"
        " VALUES ($1, 'mlops.monitoring', '{}', '[]', now() - $2::interval,"
        " CASE WHEN $3 THEN now() - $2::interval END)",
        event_id,
        timedelta(days=days_ago),
        sent,
    )


def pruned(schema: str, table: str) -> float:
    return (
        REGISTRY.get_sample_value("driftloop_bus_rows_pruned_total", {"schema": schema, "table": table}) or 0
    )


async def test_old_rows_go_and_the_rest_stays(database_url: str) -> None:
    schema = unique("t_retention")
    pool = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(pool, schema, bus_migrations())
        async with pool.acquire() as conn:
            for n in range(5):  # more than a batch: deleted in three
                await handled(conn, f"old-prediction-{n}", PREDICTIONS, 16)
            await handled(conn, "recent-prediction", PREDICTIONS, 14)
            await handled(conn, "old-drift", DRIFT, 62)
            await handled(conn, "recent-drift", DRIFT, 59)
            await handled(conn, "registered", REGISTERED, 400)
            await handled(conn, "untyped", None, 400)
            await handled(conn, "unknown-type", "io.driftloop.FromANewerRelease.v1", 400)
            for n in range(3):
                await written(conn, f"old-sent-{n}", sent=True, days_ago=8)
            await written(conn, "old-unsent", sent=False, days_ago=30)
            await written(conn, "recent-sent", sent=True, days_ago=6)

        retention = BusRetention(
            pool,
            schema,
            inbox=inbox_classes(TOPICS, EVENT_TYPES.wire_types()),
            outbox_keep=timedelta(days=7),
            batch_rows=2,
        )
        assert await retention.prune_once() == {"inbox": 6, "outbox": 3}

        async with pool.acquire() as conn:
            inbox = {r["event_id"] for r in await conn.fetch("SELECT event_id FROM inbox")}
            outbox = {r["event_id"] for r in await conn.fetch("SELECT event_id FROM outbox")}
        assert inbox == {"recent-prediction", "recent-drift", "registered", "untyped", "unknown-type"}
        assert outbox == {"old-unsent", "recent-sent"}
        assert (pruned(schema, "inbox"), pruned(schema, "outbox")) == (6, 3)

        # The unsent row, once sent, goes at the next round: the outbox's lower bound waited for it.
        async with pool.acquire() as conn:
            await conn.execute("UPDATE outbox SET sent_at = now() WHERE event_id = 'old-unsent'")
        assert await retention.prune_once() == {"inbox": 0, "outbox": 1}
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()


async def test_the_deletes_find_their_rows_through_the_brin_indexes(database_url: str) -> None:
    schema = unique("t_retention")
    pool = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(pool, schema, bus_migrations())
        async with pool.acquire() as conn, conn.transaction():
            # Planned on an empty table, a sequential scan is cheapest; forbid it to see what else serves.
            await conn.execute("SET LOCAL enable_seqscan = off")
            plans = {}
            for table, sql, args in (
                ("inbox", _PRUNE_INBOX_SQL, ["{" + PREDICTIONS + "}", 10_000]),
                ("outbox", _PRUNE_OUTBOX_SQL, [10_000]),
            ):
                await conn.execute(f"PREPARE prune_{table} AS {sql}")
                literals = ", ".join(["'2025-01-01T00:00:00Z'", "'2025-02-01T00:00:00Z'", *map(repr, args)])
                rows = await conn.fetch(f"EXPLAIN EXECUTE prune_{table}({literals})")
                plans[table] = "\n".join(r[0] for r in rows)
                await conn.execute(f"DEALLOCATE prune_{table}")
        assert "Bitmap Index Scan on inbox_processed_at" in plans["inbox"], plans["inbox"]
        assert "Bitmap Index Scan on outbox_created_at" in plans["outbox"], plans["outbox"]
        assert "Tid Scan" in plans["inbox"] and "Tid Scan" in plans["outbox"]
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await pool.close()
