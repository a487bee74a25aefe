"""Audit benchmark: appending to the hash chain vs a raw COPY of the same rows, and verification speed,
on the same Postgres in one run.

    deploy/local/driftloop infra up
    .venv/bin/python -m bench.audit.run [--events 200000] [--batch 1000] [--repeat 3]

Ingest, our side: the audit service's write path exactly as its consumer runs it — its subscription
(``trail_subscription``) on the bus's dispatcher with the service's transaction factory, one transaction
per batch of records (a poll: ``MAX_POLL_RECORDS``, what its consumer takes at a time from a backlog):
SET LOCAL ROLE to the writer role, the chain lock, the head, the redelivery
check, building each row (meta JSON, SHA-256 of the record, the chain hash, the seal), COPY into the
trail with its unique Kafka position and indexes, checkpoints every 10,000 rows into the outbox. As the
Kafka runner does when the next poll is already fetched, each poll is dispatched with the next one as
``upcoming``. With the default settings the service ignores it (one poll at a time); with
``look_ahead=True`` it prepares the next poll's rows while this one's transaction is in flight. Both are
measured; the ratio is the default's. Records are decoded beforehand (the decoder hands back the events
it decoded before the clock started), as before.

Ingest, the baseline: the very same rows, already built, COPY'd in the same batches into a plain table
with the same columns and no index, no constraint but NOT NULL, no chain, no lock, by the same COPY
encoder and chunking the trail uses, both as Postgres does by default (rows buffered until the COPY
ends) and row at a time as the trail's COPY asks (``ROW_AT_A_TIME``); and for reference by asyncpg's own
record encoder too. The ratio is taken against the fastest of the three. Also reported, not a baseline
of the targets: the same COPY, row at a time, into a table of the trail's own shape (``LIKE trail
INCLUDING ALL``: its keys, indexes and constraints), so the chain's own cost shows apart from what the
table's indexes cost.

Verification: the fast path (the database hashes each record, this process chains the digests, over
``verify_parallelism`` ranges at once) and the full path (every record hashed here, indexed columns
compared), both over the trail just written, checkpoints and seals included.

The records are what the platform publishes: 90% PredictionsLogged (one row each, as the contracts'
example), 10% the other event types, in their Kafka binary-mode form.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from contracts.envelope import CloudEvent, new_event
from contracts.examples import EXAMPLES
from contracts.predictions import PredictionsLogged
from contracts.registry import EVENT_TYPES
from contracts.topics import DEAD_LETTER, TOPICS
from libs.bus.core import Dispatcher, Record
from libs.bus.kafka import MAX_POLL_RECORDS
from libs.bus.postgres import bus_migrations, pg_transactions
from libs.db import apply_migrations, create_pool
from services.audit.adapters.postgres import (
    COPY_COLUMNS,
    ROW_AT_A_TIME,
    TRAIL_COLUMNS,
    PgChain,
    copy_data,
    prepare_writer_role,
)
from services.audit.bootstrap import MIGRATIONS, trail_subscription
from services.audit.core import verify_trail
from services.audit.domain import ChainHead, Incoming, KeyRing, Signer, TrailRow, chain_rows
from services.audit.settings import AuditSettings

DATABASE = os.environ.get("DRIFTLOOP_DATABASE_URL", "postgresql://driftloop@127.0.0.1:54329/driftloop")
ROLE = "driftloop_audit_writer"


def platform_records(n: int, seed: int = 1) -> list[Record]:
    """``n`` Kafka records as the platform's topics carry them, with per-partition offsets."""
    rng = random.Random(seed)
    others = [cls for cls in EXAMPLES if cls is not PredictionsLogged and cls.topic in TOPICS]
    offsets: dict[tuple[str, int], int] = {}
    records = []
    for i in range(n):
        cls = PredictionsLogged if rng.random() < 0.9 else rng.choice(others)
        event: CloudEvent[Any] = new_event(EXAMPLES[cls], source="/driftloop/bench")
        key, value, headers = event.to_kafka()
        partition = i % TOPICS[cls.topic].partitions
        offset = offsets.get((cls.topic, partition), 0)
        offsets[(cls.topic, partition)] = offset + 1
        records.append(
            Record(cls.topic, partition, offset, key, value, tuple(headers), 1_740_830_400_000 + i)
        )
    return records


class Predecoded:
    """The platform's decoder, its work done before the clock starts: hands back each record's event."""

    def __init__(self, records: Sequence[Record]) -> None:
        self._events = {id(r.value): EVENT_TYPES.decode(r.value, r.headers) for r in records}

    def decode(self, value: bytes | None, headers: Any, **_: Any) -> CloudEvent[Any]:
        return self._events[id(value)]


class NoDeadLetters:
    """Every bench record decodes: a dead letter would be a bug."""

    async def dead_letter(self, record: Record, *, consumer: str, reason: str, error: str) -> None:
        raise AssertionError(f"dead-lettered {record.topic}/{record.offset}: {reason}: {error}")


async def fresh_schema(pools: list[asyncpg.Pool]) -> tuple[str, asyncpg.Pool]:
    """A migrated audit schema with the writer role, on a pool of one connection (its CPU is measurable)."""
    schema = f"bench_audit_{uuid.uuid4().hex[:8]}"
    pool = await create_pool(DATABASE, schema=schema, min_size=1, max_size=1)
    await apply_migrations(pool, schema, [*bus_migrations(), *MIGRATIONS])
    await prepare_writer_role(pool, schema, ROLE)
    pools.append(pool)
    return schema, pool


@dataclass(frozen=True)
class Run:
    """One side's run: wall time, and CPU time of this process and of its Postgres backend."""

    events: int
    wall_s: float
    python_cpu_s: float
    postgres_cpu_s: float | None

    @property
    def rate(self) -> float:
        return self.events / self.wall_s

    def per_row(self) -> str:
        py = self.python_cpu_s / self.events * 1e6
        pg = "?" if self.postgres_cpu_s is None else f"{self.postgres_cpu_s / self.events * 1e6:.1f}"
        return f"CPU per row: Python {py:.1f} us, Postgres {pg} us"


def backend_cpu_s(pid: int) -> float | None:
    """CPU seconds a local Postgres backend used so far (None when its /proc entry is not readable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measured(pool: asyncpg.Pool, events: int, work: Any) -> Run:
    """Run ``work()`` on the pool (of one connection) and measure it."""
    pid = await pool.fetchval("SELECT pg_backend_pid()")
    pg0, py0, wall0 = backend_cpu_s(pid), time.process_time(), time.perf_counter()
    await work()
    wall, py, pg1 = time.perf_counter() - wall0, time.process_time() - py0, backend_cpu_s(pid)
    return Run(events, wall, py, None if pg0 is None or pg1 is None else pg1 - pg0)


async def chain_ingest(
    pool: asyncpg.Pool,
    schema: str,
    polls: list[list[Record]],
    signer: Signer,
    decoder: Predecoded,
    *,
    look_ahead: bool,
) -> Run:
    """Every poll through the audit service's subscription on the bus's dispatcher, one transaction each,
    on the service's transaction factory (the pool has one connection, so its backend's CPU is known)."""
    settings = AuditSettings(writer_role=ROLE, checkpoint_every_rows=10_000, look_ahead=look_ahead)
    dispatcher = Dispatcher(
        trail_subscription(settings, signer, "/driftloop/audit"),
        registry=decoder,  # type: ignore[arg-type]
        begin=pg_transactions(pool, schema),
        dead_letters=NoDeadLetters(),
    )

    async def work() -> None:
        for i, poll in enumerate(polls):
            upcoming = polls[i + 1] if i + 1 < len(polls) else ()  # as the runner, when it has it
            await dispatcher.dispatch(poll, upcoming=upcoming)

    return await measured(pool, sum(len(p) for p in polls), work)


async def raw_copy(
    pool: asyncpg.Pool, batches: list[list[TrailRow]], table: str = "raw_trail", where: str | None = None
) -> Run:
    """COPY the same rows, already built, into ``table``, one transaction per batch, with the trail's own
    COPY encoder and chunks (and ``where``: ``ROW_AT_A_TIME`` or none). ``raw_trail`` is a plain table
    (NOT NULL only); ``raw_indexed`` has the trail's own shape: its primary key, unique Kafka position,
    indexes and CHECK constraints, but no lock, no head, no checks before the COPY and no chain."""

    async def work() -> None:
        async with pool.acquire() as conn:
            for batch in batches:
                async with conn.transaction():
                    await conn.copy_to_table(
                        table,
                        source=copy_data(batch),
                        columns=list(COPY_COLUMNS),
                        format="binary",
                        where=where,
                    )

    return await measured(pool, sum(len(b) for b in batches), work)


async def raw_copy_records(pool: asyncpg.Pool, batches: list[list[TrailRow]]) -> Run:
    """The same, with asyncpg's record encoder (one send per 512 KiB)."""

    async def work() -> None:
        async with pool.acquire() as conn:
            for batch in batches:
                async with conn.transaction():
                    await conn.copy_records_to_table("raw_trail", records=batch, columns=list(TRAIL_COLUMNS))

    return await measured(pool, sum(len(b) for b in batches), work)


def built_rows(records: Sequence[Record], batch: int, signer: Signer) -> list[list[TrailRow]]:
    """The trail rows the chain path makes from these records, as COPY tuples, in the same batches."""
    head = ChainHead()
    out = []
    for i in range(0, len(records), batch):
        rows = chain_rows(
            head,
            [Incoming(r) for r in records[i : i + batch]],
            recorded_at=datetime.now(UTC),
            sealer=signer.sealer,
            dead_letter_topic=DEAD_LETTER,
        )
        head = ChainHead(rows[-1].seq, rows[-1].row_hash)
        out.append(rows)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--batch",
        type=int,
        default=MAX_POLL_RECORDS,
        help="records per transaction: what the service's consumer takes per poll in a backlog",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side; the best counts")
    parser.add_argument("--parallelism", type=int, default=3, help="verification ranges at once")
    args = parser.parse_args()

    signer = Signer(os.urandom(32))
    print(f"building {args.events:,} platform records ...", flush=True)
    records = platform_records(args.events)
    total = sum(len(r.value or b"") + sum(len(k) + len(v or b"") for k, v in r.headers) for r in records)
    size = total / len(records)
    polls = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    decoder = Predecoded(records)
    raw_batches = built_rows(records, args.batch, signer)
    # The service holds one poll at a time; this process holds every input of every run. Keep those out of
    # the garbage collector's scans, or it measures the collector walking them.
    gc.freeze()
    pools: list[asyncpg.Pool] = []
    admin = await asyncpg.connect(DATABASE)
    schemas: list[str] = []
    try:
        raw_schema, raw_pool = await fresh_schema(pools)
        schemas.append(raw_schema)
        await raw_pool.execute("CREATE TABLE raw_trail (LIKE trail)")
        raws, raw_rows, raw_records, raw_indexed, chains, look_aheads = [], [], [], [], [], []
        pool: asyncpg.Pool | None = None
        for run in range(args.repeat):
            await raw_pool.execute("TRUNCATE raw_trail")
            raws.append(await raw_copy(raw_pool, raw_batches))
            await raw_pool.execute("TRUNCATE raw_trail")
            raw_rows.append(await raw_copy(raw_pool, raw_batches, where=ROW_AT_A_TIME))
            await raw_pool.execute("TRUNCATE raw_trail")
            raw_records.append(await raw_copy_records(raw_pool, raw_batches))
            await raw_pool.execute("TRUNCATE raw_trail")
            # Same shape as the trail, indexes and constraints included (its triggers fire on no INSERT).
            await raw_pool.execute("DROP TABLE IF EXISTS raw_indexed")
            await raw_pool.execute("CREATE TABLE raw_indexed (LIKE trail INCLUDING ALL)")
            raw_indexed.append(
                await raw_copy(raw_pool, raw_batches, table="raw_indexed", where=ROW_AT_A_TIME)
            )
            await raw_pool.execute("DROP TABLE raw_indexed")
            schema, pool = await fresh_schema(pools)
            schemas.append(schema)
            chains.append(await chain_ingest(pool, schema, polls, signer, decoder, look_ahead=False))
            await pool.close()
            await admin.execute(f"DROP SCHEMA {schemas.pop()} CASCADE")  # 200,000 rows are 330 MB
            schema, pool = await fresh_schema(pools)
            schemas.append(schema)
            look_aheads.append(await chain_ingest(pool, schema, polls, signer, decoder, look_ahead=True))
            print(
                f"  run {run + 1}: raw COPY {raws[-1].rate:,.0f}/s (row at a time "
                f"{raw_rows[-1].rate:,.0f}/s, asyncpg records {raw_records[-1].rate:,.0f}/s, "
                f"trail-shaped {raw_indexed[-1].rate:,.0f}/s), "
                f"chain {chains[-1].rate:,.0f}/s "
                f"(look-ahead {look_aheads[-1].rate:,.0f}/s)",
                flush=True,
            )
        assert pool is not None
        await pool.execute("VACUUM ANALYZE trail")  # what autovacuum does soon after a burst
        verify_pool = await create_pool(DATABASE, schema=schemas[-1], max_size=args.parallelism + 1)
        pools.append(verify_pool)
        keys = KeyRing([signer.public_raw])

        async def verify(**kw: Any) -> Any:
            report = await verify_trail(PgChain(verify_pool, ROLE), keys=keys, sealer=signer.sealer, **kw)
            assert report.ok, report
            return report

        fast = max([await verify(parallelism=args.parallelism) for _ in range(args.repeat)], key=_speed)
        single = max([await verify(parallelism=1) for _ in range(args.repeat)], key=_speed)
        full = await verify(full=True)

        raw, chain = max(raws, key=lambda r: r.rate), max(chains, key=lambda r: r.rate)
        raw_row = max(raw_rows, key=lambda r: r.rate)
        raw_record = max(raw_records, key=lambda r: r.rate)
        indexed = max(raw_indexed, key=lambda r: r.rate)
        look_ahead = max(look_aheads, key=lambda r: r.rate)
        print()
        shape = f"mean record {size:,.0f} B, batches of {args.batch}, best of {args.repeat}"
        print(f"events: {args.events:,} ({shape})")
        print(f"raw COPY of the same rows   {raw.rate:>10,.0f} rows/s   {raw.per_row()}")
        print(f"  (row at a time)           {raw_row.rate:>10,.0f} rows/s   {raw_row.per_row()}")
        print(f"  (asyncpg's encoder)       {raw_record.rate:>10,.0f} rows/s   {raw_record.per_row()}")
        print(f"raw COPY, trail-shaped      {indexed.rate:>10,.0f} rows/s   {indexed.per_row()}")
        print(f"ingest with the chain       {chain.rate:>10,.0f} rows/s   {chain.per_row()}")
        print(f"  (look_ahead=true)         {look_ahead.rate:>10,.0f} rows/s   {look_ahead.per_row()}")
        ratio = chain.rate / max(raw.rate, raw_row.rate, raw_record.rate)
        print(f"chain / raw COPY            {ratio:>10.0%}          (targets: >= 40%, >= 50,000 rows/s)")
        shaped = chain.rate / indexed.rate
        print(
            f"chain / trail-shaped COPY   {shaped:>10.0%}          (what the chain costs beyond the indexes)"
        )
        print(
            f"verify, fast, {args.parallelism} ranges       {fast.rows_per_s:>10,.0f} rows/s   "
            f"({fast.checkpoints_checked} checkpoints, seals of the tail; target >= 500,000 rows/s)"
        )
        print(f"verify, fast, 1 range       {single.rows_per_s:>10,.0f} rows/s")
        print(f"verify, full (hashed here)  {full.rows_per_s:>10,.0f} rows/s")
    finally:
        for p in pools:
            await p.close()
        for s in schemas:
            await admin.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        await admin.close()


def _speed(report: Any) -> float:
    return float(report.rows_per_s)


if __name__ == "__main__":
    asyncio.run(main())
