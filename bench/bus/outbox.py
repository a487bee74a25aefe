"""Outbox write cost per event, side by side on the same Postgres in one run.

    deploy/local/driftloop infra up
    .venv/bin/python -m bench.bus.outbox [--events 1 10 500] [--rounds 40]

Each round publishes ``n`` fresh events (a ``GroundTruthReceived`` each, as one feedback request of ``n``
labels makes) in one transaction, in three schemas with the bus's tables, in alternating order so that all
three see the same moments of this shared machine:

  raw         the same rows, already encoded, in one INSERT of arrays: what writing them costs at the least
  one by one  each event encoded and INSERTed as it is published, then one NOTIFY of the relay, as
              ``PgTransaction.publish`` did before
  outbox      ``PgTransaction.publish`` for each event, then its ``flush`` (what ``pg_transactions`` does
              before the commit): encoded as published, written with the NOTIFY in one statement

The two publishing sides include encoding each event (``encode_outgoing``) and the NOTIFY; ``raw`` does
neither. Prints µs per event (median, p10–p90 over the rounds after the first 10) and the ratios to ``raw``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from bench.bus import print_per_event
from contracts.envelope import CloudEvent, new_event
from contracts.feedback import GroundTruthReceived
from deploy.local.postgres import drop_schemas
from libs.bus.core import encode_outgoing
from libs.bus.postgres import PgTransaction, bus_migrations, outbox_channel
from libs.db import apply_migrations, create_pool

DATABASE = os.environ.get("DRIFTLOOP_DATABASE_URL", "postgresql://driftloop@127.0.0.1:54329/driftloop")
RUN = uuid.uuid4().hex[:8]
WARM_UP_ROUNDS = 10
INSERT = "INSERT INTO outbox (event_id, topic, key, value, headers) VALUES ($1, $2, $3, $4, $5)"
MAX_BYTES = 1 << 20
# The rows' columns as arrays, the headers as JSON text: one statement, nothing left to encode.
RAW_INSERT = """
INSERT INTO outbox (event_id, topic, key, value, headers)
SELECT e, t, k, v, h::jsonb
FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::text[]) AS r(e, t, k, v, h)
"""

Write = Callable[[asyncpg.Connection, str, list[CloudEvent[Any]]], Awaitable[object]]


def labels(n: int) -> list[CloudEvent[Any]]:
    """``n`` events as one feedback request of ``n`` labels makes them."""
    now = datetime.now(UTC)
    return [
        new_event(
            GroundTruthReceived(
                prediction_id=f"churn:3:{uuid.uuid4().hex[:16]}-{i}",
                model="churn",
                model_version=3,
                label=i % 2,
                observed_at=now,
            ),
            source="/driftloop/serving",
            actor="user:bench",
        )
        for i in range(n)
    ]


def row(event: CloudEvent[Any]) -> tuple[str, str, bytes | None, bytes, list[list[str]]]:
    key, value, headers = encode_outgoing(event, max_bytes=MAX_BYTES)
    return event.id, event.topic, key, value, [[k, v.decode()] for k, v in headers]


async def raw(conn: asyncpg.Connection, schema: str, rows: list[Any]) -> object:
    columns = list(zip(*rows, strict=True))
    return await conn.execute(RAW_INSERT, *columns)


async def one_by_one(conn: asyncpg.Connection, schema: str, events: list[CloudEvent[Any]]) -> object:
    for event in events:
        await conn.execute(INSERT, *row(event))
    await conn.execute("SELECT pg_notify($1, '')", outbox_channel(schema))  # once, as it was
    return None


async def outbox(conn: asyncpg.Connection, schema: str, events: list[CloudEvent[Any]]) -> object:
    tx = PgTransaction(conn, schema, max_event_bytes=MAX_BYTES)
    for event in events:
        await tx.publish(event)
    await tx.flush()
    return None


async def measure(n: int, rounds: int, pools: dict[str, asyncpg.Pool]) -> dict[str, list[float]]:
    writes: dict[str, Write] = {"raw": raw, "one by one": one_by_one, "outbox": outbox}
    seconds: dict[str, list[float]] = {name: [] for name in writes}
    names = list(writes)
    for round_ in range(rounds):
        for name in names if round_ % 2 else reversed(names):
            events = labels(n)
            # The raw side writes rows encoded beforehand, the JSON headers as text.
            items: list[Any] = events
            if name == "raw":
                items = [(*r[:4], orjson.dumps(r[4]).decode()) for r in map(row, events)]
            schema = f"bench_outbox_{name.replace(' ', '_')}_{RUN}"
            async with pools[name].acquire() as conn:
                start = time.perf_counter()
                async with conn.transaction():
                    await writes[name](conn, schema, items)
                seconds[name].append(time.perf_counter() - start)
    return seconds


async def main(sizes: list[int], rounds: int) -> None:
    pools: dict[str, asyncpg.Pool] = {}
    try:
        for name in ("raw", "one by one", "outbox"):
            schema = f"bench_outbox_{name.replace(' ', '_')}_{RUN}"
            pools[name] = await create_pool(DATABASE, schema=schema, min_size=1, max_size=1)
            await apply_migrations(pools[name], schema, bus_migrations())
        for n in sizes:
            seconds = await measure(n, rounds, pools)
            print_per_event("outbox", seconds, n, warm_up=WARM_UP_ROUNDS)
    finally:
        for pool in pools.values():
            await pool.close()
        drop_schemas(DATABASE, lambda schema: schema.startswith("bench_outbox_") and schema.endswith(RUN))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, nargs="+", default=[1, 10, 500], help="events per transaction")
    parser.add_argument(
        "--rounds", type=int, default=40, help="transactions per side and size (the first 10 warm up)"
    )
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds))
