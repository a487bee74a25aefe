"""The bus's Postgres side: handler transactions with inbox and outbox, the outbox relay, and the retention
that deletes the rows of both once they are of no more use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from contracts.envelope import DEFAULT_MAX_EVENT_BYTES, CloudEvent
from contracts.topics import DEAD_LETTER
from libs.bus import metrics
from libs.bus.core import (
    LEGACY_SOURCE,
    Claim,
    Held,
    InboxEntry,
    InboxKeyTooLarge,
    RawSender,
    Record,
    TransactionFactory,
    encode_outgoing,
    judge_claims,
    stop_if_being_cancelled,
)
from libs.bus.kafka import RECORD_HEADROOM_BYTES, TOO_LARGE, write_dead_letter
from libs.bus.retention import InboxClass
from libs.db import Listening, Migration, check_schema_name, migrations_in, notify_channel
from libs.logging import get_logger

log = get_logger(__name__)

BUS_MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def bus_migrations() -> list[Migration]:
    """The inbox and outbox tables; every service applies them in its own schema, before its own."""
    return migrations_in(BUS_MIGRATIONS_DIR, source="bus")


def outbox_channel(schema: str) -> str:
    """The NOTIFY channel on which a committed outbox row wakes the schema's relay."""
    return notify_channel("driftloop_outbox_", schema)


# A row stored before the inbox recorded sources (LEGACY_SOURCE) still stands for its event id. Only a
# consumer that has such rows pays for looking them up: the first condition is evaluated once per statement
# (through the partial index of such rows), and while it is false, OR never evaluates the per-event probe.
_CLAIM_SQL = f"""
INSERT INTO inbox (consumer, source, event_id, payload_sha256, event_type)
SELECT $1, t.source, t.event_id, t.sha, t.event_type
FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS t(source, event_id, sha, event_type)
WHERE NOT EXISTS (SELECT 1 FROM inbox WHERE consumer = $1 AND source = '{LEGACY_SOURCE}')
   OR NOT EXISTS (
       SELECT 1 FROM inbox AS held
       WHERE held.consumer = $1 AND held.event_id = t.event_id AND held.source = '{LEGACY_SOURCE}'
   )
ON CONFLICT DO NOTHING
RETURNING source, event_id
"""

_HELD_SQL = """
SELECT source, event_id, payload_sha256, event_type FROM inbox
WHERE consumer = $1 AND event_id = ANY($2::text[])
"""


# The rows as arrays (headers as JSON text), and the NOTIFY, in one statement: one round trip whatever the
# count. The CTE's INSERT runs though nothing reads it; unnest gives the rows, and so their seq, in order.
# NOTIFY is delivered at commit, so the relay wakes exactly when the rows become visible.
_OUTBOX_SQL = """
WITH written AS (
    INSERT INTO outbox (event_id, topic, key, value, headers)
    SELECT e, t, k, v, h::jsonb
    FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bytea[], $5::text[])
        WITH ORDINALITY AS r(e, t, k, v, h, n)
    ORDER BY n
)
SELECT pg_notify($6, '')
"""

OUTBOX_STATEMENT_BYTES = 64 * 2**20
"""How many bytes of rows (key, value and headers) :meth:`PgTransaction.flush` writes per statement at
most (a larger row alone): a transaction's events are written in as many statements as that takes, in
order; a typical transaction's take one. Postgres takes at most 1 GB in one protocol message (and in one
value): past that it does not answer with an error but closes the connection, which the bus reads as the
database being away and retries for ever. One row stays within it because ``max_event_bytes`` does
(``KafkaSettings``)."""


OutboxRow = tuple[str, str, bytes | None, bytes, str]
"""An event as :meth:`PgTransaction.flush` writes it: event id, topic, key, value, headers as JSON text."""


def _row_bytes(key: bytes | None, value: bytes, headers: str) -> int:
    return len(key or b"") + len(value) + len(headers)


def _statements(rows: list[OutboxRow], max_bytes: int) -> Iterator[list[OutboxRow]]:
    """The rows in order, in runs of at most ``max_bytes`` (a larger row alone)."""
    run: list[OutboxRow] = []
    size = 0
    for row in rows:
        n = _row_bytes(row[2], row[3], row[4])
        if run and size + n > max_bytes:
            yield run
            run, size = [], 0
        run.append(row)
        size += n
    if run:
        yield run


class PgTransaction:
    """An open transaction on one connection; ``publish`` adds to the outbox inside it. The published
    events are written together by :meth:`flush`, which :func:`pg_transactions` calls before the commit."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        schema: str,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_statement_bytes: int = OUTBOX_STATEMENT_BYTES,
    ) -> None:
        self.conn = conn
        self.max_event_bytes = max_event_bytes
        self.max_statement_bytes = max_statement_bytes
        self._channel = outbox_channel(schema)
        self._outbox: list[OutboxRow] = []
        self._after_commit: list[Callable[[], None]] = []

    async def publish(self, event: CloudEvent[Any]) -> None:
        """Add the event to the outbox; the relay sends it after this transaction commits. An event that
        consumers would refuse as oversized is refused here (:class:`~libs.bus.core.EventTooLarge`), so it
        never holds up the outbox and the input that made it is dead-lettered with the reason."""
        key, value, headers = encode_outgoing(event, max_bytes=self.max_event_bytes)
        text = orjson.dumps([[k, v.decode()] for k, v in headers]).decode()
        self._outbox.append((event.id, event.topic, key, value, text))

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once this transaction has committed (:func:`pg_transactions` does)."""
        self._after_commit.append(callback)

    def committed(self) -> None:
        """The transaction committed: call what waited for it."""
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            callback()

    async def flush(self) -> None:
        """Write the events published since the last flush to the outbox, in order, in one statement per
        ``max_statement_bytes`` of rows (one, for all but huge transactions): a feedback request of 500
        labels made 500 INSERTs, one after the other (bench/bus/outbox.py). One statement for all rows
        failed past Postgres' 1 GB message limit, as a lost connection: retried for ever."""
        if not self._outbox:
            return
        rows, self._outbox = self._outbox, []
        # Each statement NOTIFYs too: Postgres delivers one notification per channel and payload per
        # transaction, at commit.
        for chunk in _statements(rows, self.max_statement_bytes):
            await self.conn.execute(_OUTBOX_SQL, *map(list, zip(*chunk, strict=True)), self._channel)

    async def claim(self, consumer: str, items: Sequence[InboxEntry]) -> list[Claim]:
        """Record handled events in the inbox, telling new ones from redeliveries and reused ids."""
        try:
            claimed = await self.conn.fetch(
                _CLAIM_SQL,
                consumer,
                [i.source for i in items],
                [i.event_id for i in items],
                [i.sha256 for i in items],
                [i.event_type for i in items],
            )
        except asyncpg.ProgramLimitExceededError as exc:
            # Which of several events it was, the statement does not say: the dispatcher replays a failed
            # poll one event per transaction, and then the one that cannot be keyed is named.
            if len(items) > 1:
                raise InboxKeyTooLarge(f"the inbox cannot record one of {len(items)} events: {exc}") from exc
            item = items[0]
            raise InboxKeyTooLarge(
                f"the inbox cannot record event id {item.event_id!r:.80} from source {item.source!r:.80}: "
                f"together they are {len(item.source.encode()) + len(item.event_id.encode())} bytes in "
                f"UTF-8, more than a Postgres index entry holds ({exc})"
            ) from exc
        new = {(r["source"], r["event_id"]) for r in claimed}
        held: dict[tuple[str, str], Held] = {}
        if len(new) < len(items):
            # Only redeliveries pay for this second look-up.
            rows = await self.conn.fetch(
                _HELD_SQL, consumer, list({i.event_id for i in items if (i.source, i.event_id) not in new})
            )
            held = {(r["source"], r["event_id"]): (r["payload_sha256"], r["event_type"]) for r in rows}
        return judge_claims(items, new, held)


def pg_transactions(
    pool: asyncpg.Pool, schema: str, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> TransactionFactory:
    """A factory of handler transactions on the service's pool. ``max_event_bytes`` is the consumers' limit
    (``KafkaSettings.max_event_bytes``: a service passes its own)."""

    @asynccontextmanager
    async def begin() -> AsyncIterator[PgTransaction]:
        async with pool.acquire() as conn:
            async with conn.transaction():
                tx = PgTransaction(conn, schema, max_event_bytes=max_event_bytes)
                yield tx
                # Only when the work succeeded: an exception leaves the transaction at the yield, rolled back.
                await tx.flush()
            tx.committed()

    return begin


RELAY_BATCH_BYTES = 64 * 2**20
"""How many bytes of rows (keys and values) :class:`OutboxRelay` takes per batch at most, besides the first
row, which it always takes. A batch is held in memory twice (the rows, and the producer's records): 500 rows
of events near ``max_event_bytes`` were 500 MB, or, with the limit raised, more than a service has, and a
relay killed for it would take the same batch again on restart."""

# The batch's rows are chosen among the first batch_size unsent ones, in order, until their sizes pass the
# budget (octet_length reads a stored value's size without reading the value); FOR UPDATE locks only them.
_RELAY_BATCH_SQL = """
WITH head AS (
    SELECT seq, coalesce(octet_length(key), 0) + octet_length(value) AS size
    FROM outbox WHERE sent_at IS NULL ORDER BY seq LIMIT $1
), chosen AS (
    SELECT seq, row_number() OVER w AS n, sum(size) OVER w AS upto FROM head WINDOW w AS (ORDER BY seq)
)
SELECT outbox.seq, topic, key, value, headers
FROM outbox JOIN chosen USING (seq)
WHERE chosen.n = 1 OR chosen.upto <= $2
ORDER BY outbox.seq
FOR UPDATE OF outbox SKIP LOCKED
"""


BACKLOG_COUNT_S = 5.0
"""How often at most :class:`OutboxRelay` counts its backlog (``driftloop_bus_outbox_backlog``) while it keeps
sending or keeps failing; an idle relay counts it each time it goes idle. A count reads an index entry per
unsent row: a relay catching up on a large backlog spends its time sending it."""


class OutboxRelay:
    """Publishes a service's outbox in order. One relay per schema works at a time (advisory lock), so
    per-model order survives several replicas; rows are claimed with FOR UPDATE SKIP LOCKED and marked
    sent only after the broker acknowledged them. A relay killed mid-batch republishes the unmarked
    rows on restart; consumers absorb the duplicates through their inbox."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        sender: RawSender,
        *,
        batch_size: int = 500,
        batch_bytes: int = RELAY_BATCH_BYTES,
        idle_s: float = 1.0,
        max_record_bytes: int = DEFAULT_MAX_EVENT_BYTES + RECORD_HEADROOM_BYTES,
        backlog_count_s: float = BACKLOG_COUNT_S,
    ) -> None:
        self.pool = pool
        self.schema = check_schema_name(schema)
        self.sender = sender
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.idle_s = idle_s
        self.max_record_bytes = max_record_bytes
        self.backlog_count_s = backlog_count_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._counted_at: float | None = None

    async def flush_once(self) -> int:
        """Publish up to one batch; returns how many rows were sent."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", self._lock_name):
                return 0
            rows = await conn.fetch(_RELAY_BATCH_SQL, self.batch_size, self.batch_bytes)
            if not rows:
                return 0
            items = [
                (r["topic"], r["key"], r["value"], [(k, v.encode()) for k, v in r["headers"]]) for r in rows
            ]
            try:
                await self.sender.send_many(items)
            except TOO_LARGE:
                # One row Kafka refuses must not hold up the rows behind it (nor, retried, the outbox for
                # good): send them one by one, in order, and set the refused ones aside.
                for row, item in zip(rows, items, strict=True):
                    try:
                        await self.sender.send_many([item])
                    except TOO_LARGE as exc:
                        await self._set_aside(row["seq"], item, exc)
            await conn.execute(
                "UPDATE outbox SET sent_at = now() WHERE seq = ANY($1::bigint[])", [r["seq"] for r in rows]
            )
        return len(rows)

    async def _set_aside(
        self, seq: int, item: tuple[str, bytes | None, bytes, list[tuple[str, bytes]]], exc: Exception
    ) -> None:
        """Dead-letter an outbox row Kafka refused as too large (``output-oversized``); it is then marked sent
        with the rest, and stays in the outbox table as it was written."""
        topic, key, value, headers = item
        error = (
            f"outbox row {seq} of schema {self.schema} ({len(value)} bytes) was refused by Kafka as too "
            f"large: {exc!r}"
        )
        await write_dead_letter(
            self.sender,
            Record(topic, -1, -1, key, value, tuple(headers)),
            topic=DEAD_LETTER,
            consumer=f"{self.schema}-outbox",
            reason="output-oversized",
            error=error,
            max_bytes=self.max_record_bytes,
        )
        metrics.OUTBOX_SET_ASIDE.labels(self.schema, topic).inc()
        log.error("outbox row set aside as a dead letter", seq=seq, topic=topic, error=repr(exc))

    @property
    def _lock_name(self) -> str:
        return f"driftloop-outbox-{self.schema}"

    async def backlog(self) -> int:
        """Rows not yet published."""
        async with self.pool.acquire() as conn:
            n = int(await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL"))
        metrics.OUTBOX_BACKLOG.labels(self.schema).set(n)
        self._counted_at = asyncio.get_running_loop().time()
        return n

    async def _count_backlog_when_due(self) -> None:
        """:meth:`backlog`, if it was last counted (or tried) ``backlog_count_s`` ago or more."""
        now = asyncio.get_running_loop().time()
        if self._counted_at is not None and now - self._counted_at < self.backlog_count_s:
            return
        self._counted_at = now  # tried: a database that is away is not asked again at every retry
        await self.backlog()

    async def run(self) -> None:
        """Relay until stopped; wakes on NOTIFY from committing transactions, or every ``idle_s``. A failed
        round, a stray CancelledError included (:func:`~libs.bus.core.stop_if_being_cancelled`), is counted
        and retried."""
        listening = Listening(self.pool, outbox_channel(self.schema), self._on_notify)
        delay = 0.2
        while not self._stopping:
            try:
                await listening.ensure()
                # Cleared before the look, not after it: a NOTIFY of a row committed after the look's
                # snapshot (during it, or the backlog's count) must cut the wait short, not be cleared with
                # it, or that row waits the whole idle_s.
                self._wake.clear()
                sent = await self.flush_once()
                delay = 0.2
                if sent:
                    # Counted while it keeps sending too, not only once idle: a relay falling behind (a slow
                    # broker) showed the backlog it last had when idle, 0, until it caught up.
                    await self._count_backlog_when_due()
                    continue
                await self.backlog()
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.idle_s)
            except (Exception, asyncio.CancelledError) as exc:
                stop_if_being_cancelled(exc)
                metrics.OUTBOX_RELAY_FAILURES.labels(self.schema).inc()
                log.warning("outbox relay error, retrying", error=repr(exc), delay_s=delay)
                await listening.close()
                # Kafka away, the database still answering: the rows pile up, and the gauge must say so (it
                # held the count of the last idle round, 0, for as long as no round succeeded). With the
                # database away too there is nothing to count; the failures' counter says why.
                with suppress(Exception):
                    await self._count_backlog_when_due()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        await listening.close()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()


RETENTION_BATCH_ROWS = 10_000
"""Rows :class:`BusRetention` deletes per statement at most, each statement its own short transaction: a
first run over a table that grew for months deletes it a batch at a time, never holding its locks (or a
transaction that VACUUM must wait for) long. About 10 ms a batch (bench: 3 million rows in 3.5 s)."""

_EPOCH = datetime(1, 1, 1, tzinfo=UTC)

# Each statement takes one batch of rows between a lower bound (where the previous complete round stopped)
# and the cutoff: the BRIN index (bus migration 0004) reads only the page ranges holding such times, and the
# lower bound keeps it from reading again the ranges earlier rounds emptied. ctid = ANY(ARRAY(...)) deletes
# the rows the subquery found by their place (a TID scan), without looking them up again.
_PRUNE_INBOX_SQL = """
DELETE FROM inbox WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM inbox
    WHERE processed_at >= $1 AND processed_at < $2 AND event_type = ANY($3::text[])
    LIMIT $4
))
"""

# Unsent rows are never deleted, whatever their age: the relay has yet to publish them.
_PRUNE_OUTBOX_SQL = """
DELETE FROM outbox WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM outbox
    WHERE created_at >= $1 AND created_at < $2 AND sent_at IS NOT NULL
    LIMIT $3
))
"""


class BusRetention:
    """Deletes the bus's rows that are of no more use, every ``interval_s``: inbox rows of events Kafka can no
    longer deliver again (:mod:`libs.bus.retention`'s classes) and outbox rows sent more than
    ``outbox_keep`` ago (None: kept for ever). One replica of a service prunes its schema at a time
    (advisory lock); a failed round is logged, counted and tried again at the next one."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        *,
        inbox: Sequence[InboxClass],
        outbox_keep: timedelta | None,
        interval_s: float = 600.0,
        batch_rows: int = RETENTION_BATCH_ROWS,
    ) -> None:
        self.pool = pool
        self.schema = check_schema_name(schema)
        self.inbox = list(inbox)
        self.outbox_keep = outbox_keep
        self.interval_s = interval_s
        self.batch_rows = batch_rows
        # Per statement, the cutoff of its last complete round: no row it deletes is older any more (new
        # rows are stamped now(), far later). Kept in memory: a restarted service's first round looks from
        # the beginning again, once.
        self._floors: dict[str, datetime] = {}
        self._wake = asyncio.Event()
        self._stopping = False

    async def prune_once(self) -> dict[str, int]:
        """One round: every row past its cutoff, a batch per transaction; returns the rows deleted per table.
        Stops early (its floors kept where they were) if another replica is pruning, or on :meth:`stop`."""
        deleted = {"inbox": 0, "outbox": 0}
        async with self.pool.acquire() as conn:
            # Postgres' clock, which stamped the rows; the oldest unsent row bounds where the outbox's next
            # round may start, as it may be sent (and then deletable) after this round.
            now, unsent = await conn.fetchrow(
                "SELECT now(), (SELECT min(created_at) FROM outbox WHERE sent_at IS NULL)"
            )
        if self.outbox_keep is not None:
            cutoff = now - self.outbox_keep
            n = await self._prune("outbox", _PRUNE_OUTBOX_SQL, cutoff, min(cutoff, unsent or cutoff))
            deleted["outbox"] += n
        for cls in self.inbox:
            cutoff = now - cls.keep
            n = await self._prune(
                f"inbox {cls.keep}", _PRUNE_INBOX_SQL, cutoff, cutoff, list(cls.event_types)
            )
            deleted["inbox"] += n
        for table, n in deleted.items():
            if n:
                metrics.ROWS_PRUNED.labels(self.schema, table).inc(n)
        if any(deleted.values()):
            log.info("bus retention deleted rows", schema=self.schema, **deleted)
        return deleted

    async def _prune(self, name: str, sql: str, cutoff: datetime, next_floor: datetime, *args: Any) -> int:
        """Delete a statement's rows below ``cutoff``, a batch per transaction, until a batch comes short;
        then the statement's next round starts at ``next_floor``."""
        floor = self._floors.get(name, _EPOCH)
        total = 0
        while not self._stopping:
            async with self.pool.acquire() as conn, conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", self._lock_name):
                    return total
                status = await conn.execute(sql, floor, cutoff, *args, self.batch_rows)
            n = int(status.rpartition(" ")[2])
            total += n
            if n < self.batch_rows:
                self._floors[name] = next_floor
                break
        return total

    @property
    def _lock_name(self) -> str:
        return f"driftloop-retention-{self.schema}"

    async def run(self) -> None:
        """Prune now and every ``interval_s`` until stopped; a failed round, a stray CancelledError included
        (:func:`~libs.bus.core.stop_if_being_cancelled`), waits for the next."""
        while not self._stopping:
            try:
                await self.prune_once()
            except (Exception, asyncio.CancelledError) as exc:
                stop_if_being_cancelled(exc)
                metrics.PRUNING_FAILURES.labels(self.schema).inc()
                log.warning("bus retention failed, trying again later", error=repr(exc), in_s=self.interval_s)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
