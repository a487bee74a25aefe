"""Inbox claim cost per event, side by side on the same Postgres in one run.

    deploy/local/driftloop infra up
    .venv/bin/python -m bench.bus.inbox [--rows 1000] [--rounds 60] [--legacy-rows 200000]

Each round claims ``--rows`` fresh events (one poll's worth) in one transaction, in four schemas, in
alternating order so that all three see the same moments of this shared machine:

  raw       the same rows inserted into a table with no key at all: what writing them costs, no dedupe
  former    the inbox as bus migration 0001 made it, keyed on (consumer, event id), with its statement
  inbox     ``PgTransaction.claim`` on the current inbox, keyed on (consumer, event id, source), which
            also looks for a row stored before sources were (bus migration 0002)
  ... before its BRIN index: the same inbox without bus migration 0004's retention index on processed_at

Then the inbox twice more, holding ``--legacy-rows`` handled events: recorded with their source, and
recorded before sources were, then migrated in place (an inbox upgraded in service). The difference
between those two is what the look-up for rows from before the upgrade costs when there are many.
Prints µs per event (median, p10–p90 over the rounds after the first 10) and the ratios to ``raw``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from bench.bus import print_per_event
from deploy.local.postgres import drop_schemas
from libs.bus.core import InboxEntry
from libs.bus.postgres import PgTransaction, bus_migrations
from libs.db import apply_migrations, create_pool

DATABASE = os.environ.get("DRIFTLOOP_DATABASE_URL", "postgresql://driftloop@127.0.0.1:54329/driftloop")
RUN = uuid.uuid4().hex[:8]
SOURCE = "/driftloop/serving"
WARM_UP_ROUNDS = 10

FORMER_CLAIM = """
INSERT INTO inbox (consumer, event_id, payload_sha256)
SELECT $1, event_id, sha FROM unnest($2::text[], $3::text[]) AS t(event_id, sha)
ON CONFLICT DO NOTHING
RETURNING event_id
"""

RAW_INSERT = """
INSERT INTO inbox (consumer, source, event_id, payload_sha256)
SELECT $1, source, event_id, sha FROM unnest($2::text[], $3::text[], $4::text[]) AS t(source, event_id, sha)
"""

Claim = Callable[[asyncpg.Connection, list[InboxEntry]], Awaitable[object]]


def fresh_entries(rows: int) -> list[InboxEntry]:
    return [
        InboxEntry(SOURCE, str(uuid.uuid4()), hashlib.sha256(str(i).encode()).hexdigest())
        for i in range(rows)
    ]


async def raw(conn: asyncpg.Connection, items: list[InboxEntry]) -> object:
    return await conn.execute(
        RAW_INSERT, "c", [i.source for i in items], [i.event_id for i in items], [i.sha256 for i in items]
    )


async def former(conn: asyncpg.Connection, items: list[InboxEntry]) -> object:
    return await conn.fetch(FORMER_CLAIM, "c", [i.event_id for i in items], [i.sha256 for i in items])


def current(schema: str) -> Claim:
    async def claim(conn: asyncpg.Connection, items: list[InboxEntry]) -> object:
        return await PgTransaction(conn, schema).claim("c", items)

    return claim


async def schema_with(name: str, setup: Callable[[asyncpg.Pool, str], Awaitable[None]]) -> asyncpg.Pool:
    schema = f"bench_inbox_{name}_{RUN}"
    pool = await create_pool(DATABASE, schema=schema, min_size=1, max_size=1)
    await setup(pool, schema)
    return pool


async def main(rows: int, rounds: int, legacy_rows: int) -> None:
    async def raw_table(pool: asyncpg.Pool, schema: str) -> None:
        await pool.execute(f"CREATE SCHEMA {schema}")
        await pool.execute(
            f"CREATE TABLE {schema}.inbox (consumer text, source text, event_id text, payload_sha256 text,"
            " processed_at timestamptz NOT NULL DEFAULT now())"
        )

    def migrated(count: int) -> Callable[[asyncpg.Pool, str], Awaitable[None]]:
        async def setup(pool: asyncpg.Pool, schema: str) -> None:
            await apply_migrations(pool, schema, bus_migrations()[:count])

        return setup

    def filled(source: str | None) -> Callable[[asyncpg.Pool, str], Awaitable[None]]:
        """An inbox in service for a while: ``legacy_rows`` handled events, recorded with that source, or
        before sources were (None) and then migrated in place."""

        async def setup(pool: asyncpg.Pool, schema: str) -> None:
            await apply_migrations(pool, schema, bus_migrations()[: 1 if source is None else None])
            await pool.execute(
                "INSERT INTO inbox (consumer, event_id, payload_sha256)"
                " SELECT 'c', md5(i::text), md5(i::text) FROM generate_series(1, $1) AS i",
                legacy_rows,
            )
            if source is None:
                await apply_migrations(pool, schema, bus_migrations())
            else:
                await pool.execute("UPDATE inbox SET source = $1", source)
            await pool.execute("VACUUM ANALYZE inbox")

        return setup

    full, upgraded = f"inbox holding {legacy_rows:,} events", f"inbox holding {legacy_rows:,} from before"
    pools = {
        "raw": await schema_with("raw", raw_table),
        "former": await schema_with("former", migrated(1)),
        "inbox": await schema_with("current", migrated(len(bus_migrations()))),
        "inbox before its BRIN index (0004)": await schema_with("nobrin", migrated(3)),
        full: await schema_with("full", filled(SOURCE)),
        upgraded: await schema_with("upgraded", filled(None)),
    }
    claims: dict[str, Claim] = {
        "raw": raw,
        "former": former,
        "inbox": current(f"bench_inbox_current_{RUN}"),
        "inbox before its BRIN index (0004)": current(f"bench_inbox_nobrin_{RUN}"),
        full: current(f"bench_inbox_full_{RUN}"),
        upgraded: current(f"bench_inbox_upgraded_{RUN}"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in pools}
    try:
        names = list(pools)
        for round_ in range(rounds):
            for name in names if round_ % 2 else reversed(names):
                items = fresh_entries(rows)
                async with pools[name].acquire() as conn:
                    start = time.perf_counter()
                    async with conn.transaction():
                        await claims[name](conn, items)
                    seconds[name].append(time.perf_counter() - start)
    finally:
        for pool in pools.values():
            await pool.close()
        drop_schemas(DATABASE, lambda schema: schema.startswith("bench_inbox_") and schema.endswith(RUN))

    print_per_event("inbox claim", seconds, rows, warm_up=WARM_UP_ROUNDS, width=40)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1000, help="events claimed per transaction")
    parser.add_argument(
        "--rounds", type=int, default=60, help="transactions per schema (the first 10 warm up)"
    )
    parser.add_argument("--legacy-rows", type=int, default=200_000, help="rows from before sources were kept")
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.rounds, args.legacy_rows))
