"""The trail on Postgres: append with COPY under a chain lock, queries, and verification scans.

Every transaction of the service runs as the writer role (SET LOCAL ROLE), which may SELECT and INSERT
on the trail and never UPDATE, DELETE or TRUNCATE it.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from pydantic import ValidationError

from contracts.audit import AuditCheckpoint
from contracts.predictions import TOPIC as PREDICTIONS_TOPIC
from contracts.predictions import PredictionsLogged
from libs.db import check_schema_name
from libs.logging import get_logger
from services.audit.domain import (
    GENESIS,
    SEQ_MAX,
    Attributes,
    ChainHead,
    EventQuery,
    HeldAt,
    HeldEvent,
    KafkaContent,
    KafkaPosition,
    Kind,
    NotACheckpoint,
    StoredCheckpoint,
    StoredRow,
    TrailRow,
    held_event,
    kafka_content,
)
from services.audit.verification import Finding, LinkScanner, RecordScanner

log = get_logger(__name__)

TRAIL_COLUMNS = (
    "seq",
    "record",
    "row_hash",
    "seal",
    "topic",
    "kafka_partition",
    "kafka_offset",
    "kind",
    "event_id",
    "event_type",
    "subject",
    "correlation_id",
    "causation_id",
    "actor",
    "event_time",
    "recorded_at",
    "kafka_reuse",
)
# The order append() sends the columns in: the fixed-size ones first, so one struct packs them.
COPY_COLUMNS = (
    "seq",
    "row_hash",
    "seal",
    "kafka_partition",
    "kafka_offset",
    "kafka_reuse",
    "recorded_at",
    "record",
    "topic",
    "kind",
    "event_id",
    "event_type",
    "subject",
    "correlation_id",
    "causation_id",
    "actor",
    "event_time",
)
_STORED = (
    "seq, record, row_hash, topic, kafka_partition, kafka_offset, kind, event_id, event_type, subject, "
    "correlation_id, causation_id, actor, event_time, recorded_at, kafka_reuse"
)

# Binary COPY: an 11-byte signature, 4 bytes of flags, a 4-byte header-extension length (then the
# extension), tuples, and a 16-bit -1 at the end. Each link tuple is: 1 field, 72 bytes.
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
# The partial indexes on type and correlation id leave the predictions topic out (see the migration).
_NOT_PREDICTIONS = f"topic <> '{PREDICTIONS_TOPIC}'"
PREDICTIONS_TYPE = PredictionsLogged.event_type()
# The checkpoint's columns under their own names, as _stored_checkpoint reads them (``seq`` is the
# checkpoint's): read under the head's sequence, every checkpoint failed its signature check.
_HEAD_SQL = """
SELECT t.seq AS head_seq, t.row_hash AS head_row_hash, c.seq, c.head_hash, c.row_count, c.signed_at,
    c.key_id, c.signature, c.trail_row_hash
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (SELECT seq, row_hash FROM trail ORDER BY seq DESC LIMIT 1) AS t ON true
LEFT JOIN LATERAL ({checkpoints} ORDER BY c.seq DESC LIMIT 1) AS c ON true
"""
# A checkpoint with the trail's row hash at its sequence (NULL: no such row): what a writer judges it by.
_STORED_CHECKPOINTS = """
SELECT c.seq, c.head_hash, c.row_count, c.signed_at, c.key_id, c.signature, t.row_hash AS trail_row_hash
FROM checkpoints c LEFT JOIN trail t ON t.seq = c.seq
"""
_HEAD_SQL = _HEAD_SQL.format(checkpoints=_STORED_CHECKPOINTS)
# A stored record's meta line and the SHA-256 of its value, split at the first LF in the database, so that
# a look-up of what the trail holds never brings a value back (a record without an LF has no meta, and
# holds nothing). _META_LINE_END goes after the trail's alias ``t`` in FROM.
_META_AND_DIGEST = "substr(t.record, 1, n.at - 1) AS meta, sha256(substr(t.record, n.at + 1)) AS value_digest"
_META_LINE_END = """CROSS JOIN LATERAL (
    SELECT greatest(position(decode('0a', 'hex') IN t.record), 1) AS at
) AS n"""
_LINK_PREFIX = struct.pack("!hi", 1, 72)
_COPY_TRAILER = b"\xff\xff"
_COPY_HEADER = _COPY_SIGNATURE + bytes(8)  # no flags, no header extension
_NULL = b"\xff\xff\xff\xff"
# Field count, then seq, row_hash, seal, kafka_partition, kafka_offset, kafka_reuse, recorded_at, each after
# its length, then the record's length.
_FIXED = struct.Struct("!hiqi32si16siiiqiiiqi")
_LENGTH = struct.Struct("!i")
_TIMESTAMP = struct.Struct("!iq")
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
COPY_CHUNK_BYTES = 64 * 1024
"""How much COPY data goes out at once: small enough that Postgres writes the first rows of a batch
while the next are built, large enough that sending costs little (each send wakes the backend)."""
ROW_AT_A_TIME = "random() >= 0"
"""The trail's COPY clause ``WHERE``: always true, and volatile, which is its point. Postgres holds the
rows of a binary COPY until 1,000 are buffered or the data ends (it counts buffered bytes only for text
input), so a poll's COPY would be written only once its last byte arrived: Postgres idle while this
process builds the rows, then this process idle while Postgres writes them. A volatile ``WHERE`` makes
Postgres insert each row as it is read (copyfrom.c: no multi-insert buffer then), so the two work side
by side. docs/benchmarks.md (Audit) has the numbers."""
_TEXT_CACHE_MAX = 4096
READ_ROWS = 2000
"""Most rows one read of an export or a full verification brings back."""
SEAL_ROWS = 10_000
"""Most rows whose seals one read brings back (about 100 bytes each): a verification checks the seals of
the rows no checkpoint vouches for, all of a trail whose checkpoints were deleted."""
READ_BYTES = 8 * 1024 * 1024
"""About how many bytes of records one such read holds (beyond its first row): a count of rows alone would
hold 2,000 records at once whatever their size, 20 GB of records near the broker's 10 MiB, in the process
that also writes the trail."""
_ROWS_BETWEEN = """
SELECT {columns} FROM (
    SELECT *, sum(coalesce(octet_length(record), 0)) OVER (ORDER BY seq) AS bytes_through
    FROM trail WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3
) AS page
-- octet_length reads a stored value's size, not the value: rows past the budget are never fetched whole
WHERE bytes_through - coalesce(octet_length(record), 0) < $4
ORDER BY seq
"""

_BUDGETED = """
SELECT {columns}, more AND bytes_through >= {budget} AS budget_cut FROM (
    SELECT *, sum(coalesce(octet_length(record), 0)) OVER w AS bytes_through,
        lead(seq) OVER w IS NOT NULL AS more
    FROM trail WHERE {where}
    WINDOW w AS (ORDER BY seq {order})
    ORDER BY seq {order} LIMIT {limit}
) AS page
-- as _ROWS_BETWEEN: the rows past the budget are never fetched whole; the last row taken says whether the
-- rows go on past it (a row follows, and the budget is spent)
WHERE bytes_through - coalesce(octet_length(record), 0) < {budget}
ORDER BY seq {order}
"""
"""Rows matching ``where`` in seq ``order``, at most ``limit`` and as many as start before their records add
up to ``budget`` bytes (the first always), each with ``budget_cut``: true on the last row taken when rows
after it were left out for the budget."""

_CHECKPOINTS_BETWEEN = "SELECT * FROM checkpoints WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3"
"""The checkpoints of rows ``$1+1 .. $2`` in sequence order, the first ``$3`` (NULL: every one)."""

_CASCADE = _BUDGETED.format(
    columns=_STORED, where=f"correlation_id = $1 AND {_NOT_PREDICTIONS}", order="ASC", limit="$2", budget="$3"
)


def _text(value: str | None) -> bytes:
    if value is None:
        return _NULL
    raw = value.encode()
    return _LENGTH.pack(len(raw)) + raw


async def copy_data(rows: Iterable[TrailRow], chunk_bytes: int = COPY_CHUNK_BYTES) -> AsyncIterator[bytes]:
    """Trail rows as PostgreSQL binary COPY data (columns in COPY_COLUMNS order), about ``chunk_bytes``
    at a time, each chunk built only when the previous one is on its way."""
    fixed, length, text, timestamp = _FIXED.pack, _LENGTH.pack, _text, _TIMESTAMP.pack
    epoch, microsecond, null = _PG_EPOCH, _MICROSECOND, _NULL
    # Topics, kinds, types, models and actors repeat from row to row: encode each once.
    cache: dict[str, bytes] = {}
    out = [_COPY_HEADER]
    size = 0
    stamped: datetime | None = None
    stamp = 0
    for row in rows:
        (seq, record, row_hash, seal, topic, partition, offset, kind, event_id, event_type, subject,
         correlation_id, causation_id, actor, event_time, recorded_at, reuse) = row  # fmt: skip
        if recorded_at is not stamped:
            stamped, stamp = recorded_at, (recorded_at - epoch) // microsecond
        # Ids are new on every row: encoded inline, as a Python call per field costs more than the field.
        if event_id is None:
            encoded_id = null
        else:
            raw_id = event_id.encode()
            encoded_id = length(len(raw_id)) + raw_id
        out += (
            fixed(
                17, 8, seq, 32, row_hash, 16, seal, 4, partition, 8, offset, 4, reuse, 8, stamp, len(record)
            ),
            record,
            cache.get(topic) or cache.setdefault(topic, text(topic)),
            cache.get(kind) or cache.setdefault(kind, text(kind)),
            encoded_id,
            null
            if event_type is None
            else cache.get(event_type) or cache.setdefault(event_type, text(event_type)),
            null if subject is None else cache.get(subject) or cache.setdefault(subject, text(subject)),
            encoded_id if correlation_id == event_id else text(correlation_id),
            null if causation_id is None else text(causation_id),
            null if actor is None else cache.get(actor) or cache.setdefault(actor, text(actor)),
            null if event_time is None else timestamp(8, (event_time - epoch) // microsecond),
        )
        size += len(record)
        if size >= chunk_bytes:
            yield b"".join(out)
            out, size = [], 0
            if len(cache) > _TEXT_CACHE_MAX:
                cache.clear()
    out.append(_COPY_TRAILER)
    yield b"".join(out)


class InsufficientRole(RuntimeError):
    """The database user cannot create or use the writer role."""


async def enter_writer_role(conn: asyncpg.Connection, role: str) -> None:
    """Run the rest of the current transaction as the writer role."""
    await conn.execute(f"SET LOCAL ROLE {check_schema_name(role)}")


async def prepare_writer_role(pool: asyncpg.Pool, schema: str, role: str) -> None:
    """Create the writer role if needed and give it exactly what the service does: read and append."""
    schema, role = check_schema_name(schema), check_schema_name(role)
    async with pool.acquire() as conn, conn.transaction():
        # Roles are cluster-wide and concurrent GRANTs on one object fail; one preparer at a time.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('driftloop-audit-writer-role'))")
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            try:
                await conn.execute(f"CREATE ROLE {role} NOLOGIN")
            except asyncpg.InsufficientPrivilegeError as exc:
                raise InsufficientRole(
                    f"role {role} does not exist and the database user may not create it: create it "
                    f"once (CREATE ROLE {role} NOLOGIN; GRANT {role} TO <service user>) or give the user "
                    "CREATEROLE"
                ) from exc
        await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
        for table in ("trail", "checkpoints"):
            await conn.execute(f"REVOKE ALL ON {schema}.{table} FROM PUBLIC, {role}")
            await conn.execute(f"GRANT SELECT, INSERT ON {schema}.{table} TO {role}")
        # Checkpoints leave through the outbox, in the same transaction as the rows they cover.
        await conn.execute(f"GRANT INSERT ON {schema}.outbox TO {role}")
        await conn.execute(f"GRANT USAGE ON SEQUENCE {schema}.outbox_seq_seq TO {role}")
        if not await conn.fetchval("SELECT pg_has_role(current_user, $1, 'MEMBER')", role):
            try:
                await conn.execute(f"GRANT {role} TO CURRENT_USER")
            except asyncpg.InsufficientPrivilegeError as exc:
                raise InsufficientRole(
                    f"the database user is not a member of {role} and may not join it: GRANT {role} TO "
                    "<service user>"
                ) from exc


def _stored(row: asyncpg.Record) -> StoredRow:
    return StoredRow(
        seq=row["seq"],
        record=row["record"],
        row_hash=row["row_hash"],
        topic=row["topic"],
        partition=row["kafka_partition"],
        offset=row["kafka_offset"],
        kind=row["kind"],
        attributes=Attributes(
            event_id=row["event_id"],
            event_type=row["event_type"],
            subject=row["subject"],
            correlation_id=row["correlation_id"],
            causation_id=row["causation_id"],
            actor=row["actor"],
            event_time=row["event_time"],
        ),
        recorded_at=row["recorded_at"],
        reuse=row["kafka_reuse"],
    )


def _checkpoint(row: asyncpg.Record) -> AuditCheckpoint:
    return AuditCheckpoint(
        sequence=row["seq"],
        head_hash=row["head_hash"],
        row_count=row["row_count"],
        signed_at=row["signed_at"],
        key_id=row["key_id"],
        signature=row["signature"],
    )


def _readable_checkpoint(row: asyncpg.Record) -> AuditCheckpoint | None:
    """A row of the checkpoints table for a reader: None, with a warning, for one whose columns are not a
    checkpoint (written in the database)."""
    try:
        return _checkpoint(row)
    except ValidationError as exc:
        log.warning(
            "a row of the checkpoints table is not a checkpoint (written in the database), skipped: it "
            "vouches for nothing (docs/audit.md)",
            seq=row["seq"],
            error=str(exc),
        )
        return None


def _stored_checkpoint(row: asyncpg.Record) -> StoredCheckpoint:
    """A row of the checkpoints table as a writer judges it: one whose columns are not a checkpoint (written
    in the database) is an untrusted one, never an error that would fail the writer's transaction."""
    try:
        checkpoint = _checkpoint(row)
    except ValidationError as exc:
        return StoredCheckpoint(row["seq"], None, row["trail_row_hash"], str(exc))
    return StoredCheckpoint(row["seq"], checkpoint, row["trail_row_hash"])


class PgTrail:
    """The trail on one connection, inside the caller's transaction (already in the writer role)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    # -- writing --------------------------------------------------------------------------------------

    async def lock_head(self) -> tuple[ChainHead, StoredCheckpoint | None]:
        """Wait for the chain lock (one writer per schema, replicas included), then read the head and the
        newest checkpoint (the primary key's last entry) with the row hash at its sequence.

        Two statements: a statement's snapshot is taken when it starts, so the head must be read by one
        that starts after the lock is held.
        """
        await self.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('driftloop-audit-chain-' || current_schema()))"
        )
        row = await self.conn.fetchrow(_HEAD_SQL)
        newest = None if row["seq"] is None else _stored_checkpoint(row)
        return ChainHead(row["head_seq"] or 0, row["head_row_hash"] or GENESIS), newest

    async def checkpoints_below(self, seq: int, *, limit: int) -> list[StoredCheckpoint]:
        """A backward range scan of the primary key, each checkpoint with its row's hash."""
        rows = await self.conn.fetch(
            f"{_STORED_CHECKPOINTS} WHERE c.seq < $1 ORDER BY c.seq DESC LIMIT $2", seq, limit
        )
        return [_stored_checkpoint(r) for r in rows]

    async def partition_ends(self, partitions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """One index probe per partition (the unique Kafka position)."""
        if not partitions:
            return {}
        rows = await self.conn.fetch(
            """SELECT g.topic, g.kafka_partition,
                      (SELECT max(t.kafka_offset) FROM trail t
                        WHERE t.topic = g.topic AND t.kafka_partition = g.kafka_partition) AS last
               FROM unnest($1::text[], $2::int[]) AS g(topic, kafka_partition)""",
            [t for t, _ in partitions],
            [p for _, p in partitions],
        )
        return {(r["topic"], r["kafka_partition"]): -1 if r["last"] is None else r["last"] for r in rows}

    async def held_at(self, positions: Sequence[KafkaPosition]) -> dict[KafkaPosition, HeldAt]:
        """Exact look-ups through the unique Kafka position. Only the meta line and the SHA-256 of the value
        come back (the database hashes the value): a batch of redelivered predictions costs no more than
        their meta on the wire. A row whose record cannot be read holds a position with no content."""
        if not positions:
            return {}
        rows = await self.conn.fetch(
            f"""SELECT t.topic, t.kafka_partition, t.kafka_offset, t.kafka_reuse, t.seq, {_META_AND_DIGEST}
               FROM unnest($1::text[], $2::int[], $3::bigint[]) AS g(topic, kafka_partition, kafka_offset)
               JOIN trail t USING (topic, kafka_partition, kafka_offset)
               {_META_LINE_END}""",
            [p.topic for p in positions],
            [p.partition for p in positions],
            [p.offset for p in positions],
        )
        held: dict[KafkaPosition, HeldAt] = {}
        for r in rows:
            content: KafkaContent | None
            try:
                content = kafka_content(orjson.loads(r["meta"]), bytes(r["value_digest"]))
            except Exception as exc:
                log.warning(
                    "a trail row cannot be read; it holds its position", seq=r["seq"], error=repr(exc)
                )
                content = None
            position = KafkaPosition(r["topic"], r["kafka_partition"], r["kafka_offset"])
            held.setdefault(position, []).append((r["kafka_reuse"], content))
        return held

    async def held_events(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[HeldEvent]]:
        """Headers and the SHA-256 of the value of each row holding these (topic, event id) pairs, through the
        partial event-id index. The database hashes the values (as :meth:`held_at` does): a record can be as
        large as the broker's largest message, and the whole records of every row holding a re-sent id came
        over the wire to be compared here. A row whose record cannot be read (changed in the database) holds
        no copy of anything: it is left out, and verification names it."""
        if not keys:
            return {}
        wanted = set(keys)
        rows = await self.conn.fetch(
            f"""SELECT t.topic, t.event_id, t.seq, {_META_AND_DIGEST}
               FROM trail t {_META_LINE_END}
               WHERE t.event_id = ANY($1::text[]) AND t.topic = ANY($2::text[]) AND {_NOT_PREDICTIONS}""",
            sorted({event_id for _, event_id in keys}),
            sorted({topic for topic, _ in keys}),
        )
        held: dict[tuple[str, str], list[HeldEvent]] = {}
        for r in rows:
            key = (r["topic"], r["event_id"])
            if key not in wanted:
                continue  # the same id on another of the topics: another event
            try:
                event = held_event(orjson.loads(r["meta"]), bytes(r["value_digest"]))
            except Exception as exc:
                log.warning("a trail row cannot be read; it holds no copy", seq=r["seq"], error=repr(exc))
                continue
            held.setdefault(key, []).append(event)
        return held

    async def append(self, rows: Iterable[TrailRow]) -> None:
        """COPY the rows in (binary); the chain lock is held, so their numbers follow the head.

        The rows are built as the COPY data is, one chunk at a time, and each chunk is sent as soon as it
        is made: Postgres writes the first rows of the batch while this process builds the next
        (:data:`ROW_AT_A_TIME`).
        """
        await self.conn.copy_to_table(
            "trail", source=copy_data(rows), columns=COPY_COLUMNS, format="binary", where=ROW_AT_A_TIME
        )

    async def add_checkpoint(self, checkpoint: AuditCheckpoint, event_id: str) -> bool:
        """Keep a signed checkpoint, unless its sequence holds one already (a row written in the database:
        a conflict would fail the transaction, and the consumer would retry it for ever)."""
        status = await self.conn.execute(
            """INSERT INTO checkpoints (seq, head_hash, row_count, signed_at, key_id, signature, event_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (seq) DO NOTHING""",
            checkpoint.sequence,
            checkpoint.head_hash,
            checkpoint.row_count,
            checkpoint.signed_at,
            checkpoint.key_id,
            checkpoint.signature,
            event_id,
        )
        return bool(status == "INSERT 0 1")

    async def seals(
        self, after: int, upto: int, *, rows: int = SEAL_ROWS
    ) -> AsyncGenerator[list[tuple[int, bytes, bytes]], None]:
        """(seq, row_hash, seal) of rows after..upto, ``rows`` at a time, in this transaction."""
        while after < upto:
            batch = await self.conn.fetch(
                "SELECT seq, row_hash, seal FROM trail WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
                after,
                upto,
                rows,
            )
            if not batch:
                return
            yield [(r["seq"], r["row_hash"], r["seal"]) for r in batch]
            after = batch[-1]["seq"]

    # -- reading --------------------------------------------------------------------------------------

    async def row_hashes(self, seqs: Sequence[int]) -> dict[int, bytes]:
        """Row hashes at these sequence numbers (absent rows left out, a nulled hash as None)."""
        if not seqs:
            return {}
        rows = await self.conn.fetch(
            "SELECT seq, row_hash FROM trail WHERE seq = ANY($1::bigint[])", list(seqs)
        )
        return {r["seq"]: r["row_hash"] for r in rows}

    async def head(self) -> ChainHead:
        """The last row."""
        row = await self.conn.fetchrow("SELECT seq, row_hash FROM trail ORDER BY seq DESC LIMIT 1")
        return ChainHead(row["seq"], row["row_hash"]) if row else ChainHead()

    async def find(self, query: EventQuery, *, budget: int) -> tuple[list[StoredRow], bool]:
        """Rows matching every given filter, in seq order (newest first by default), bounded in count and
        bytes of records in SQL (:data:`_BUDGETED`), and whether rows after those were left out for the
        budget."""
        clauses: list[str] = []
        args: list[Any] = []

        def where(sql: str, value: Any) -> None:
            args.append(value)
            clauses.append(sql.replace("?", f"${len(args)}"))

        if query.model is not None:
            where("subject = ?", query.model)
        if query.event_type is not None:
            where("event_type = ?", query.event_type)
            if query.event_type != PREDICTIONS_TYPE:
                clauses.append(_NOT_PREDICTIONS)
        if query.actor is not None:
            where("actor = ? AND actor IS NOT NULL", query.actor)
        if query.correlation_id is not None:
            where("correlation_id = ?", query.correlation_id)
            clauses.append(_NOT_PREDICTIONS)
        if query.kind is not None:
            where("kind = ?", query.kind.value)
            if query.kind is not Kind.EVENT:
                clauses.append("kind <> 'event'")  # lets the planner use the partial index
        if query.since is not None:
            where("event_time >= ?", query.since)
        if query.until is not None:
            where("event_time < ?", query.until)
        if query.after is not None:
            where("seq > ?", query.after)
        if query.before is not None:
            where("seq < ?", query.before)
        args += [query.limit, budget]
        sql = _BUDGETED.format(
            columns=_STORED,
            where=" AND ".join(clauses) or "true",
            order="DESC" if query.newest_first else "ASC",
            limit=f"${len(args) - 1}",
            budget=f"${len(args)}",
        )
        rows = await self.conn.fetch(sql, *args)
        return [_stored(r) for r in rows], bool(rows) and rows[-1]["budget_cut"]

    async def row(self, seq: int) -> StoredRow | None:
        """One row by sequence number."""
        r = await self.conn.fetchrow(f"SELECT {_STORED} FROM trail WHERE seq = $1", seq)
        return _stored(r) if r else None

    async def cascade(self, correlation_id: str, *, limit: int, budget: int) -> tuple[list[StoredRow], bool]:
        """Rows of one correlation id, in trail order, bounded in count and bytes of records in SQL."""
        rows = await self.conn.fetch(_CASCADE, correlation_id, limit, budget)
        return [_stored(r) for r in rows], bool(rows) and rows[-1]["budget_cut"]

    async def checkpoints(
        self, *, limit: int | None = None, after: int = 0, upto: int | None = None, page: int | None = None
    ) -> list[AuditCheckpoint]:
        """The newest ``limit`` checkpoints (newest first), or those of ``after+1 .. upto`` in sequence
        order, the first ``page`` of them (an index range scan of the primary key).

        A row that is not a checkpoint (written in the database) is skipped with a warning, as a line of the
        checkpoint file that is not one is: it vouches for nothing, and must fail none of these reads
        (/v1/head, /v1/checkpoints, the export; a verification names it, :meth:`checkpoint_rows`). The rows
        after it are read on, so that a page short of ``page`` still means the end of the range."""
        newest_first = limit is not None
        wanted = limit if newest_first else page
        last = SEQ_MAX if upto is None else upto
        found: list[AuditCheckpoint] = []
        while True:
            count = None if wanted is None else wanted - len(found)
            if newest_first:
                rows = await self.conn.fetch(
                    "SELECT * FROM checkpoints WHERE seq <= $1 ORDER BY seq DESC LIMIT $2", last, count
                )
            else:
                rows = await self.conn.fetch(
                    _CHECKPOINTS_BETWEEN,
                    after,
                    last,
                    count,  # NULL: no limit
                )
            found += [c for c in map(_readable_checkpoint, rows) if c is not None]
            if count is None or len(rows) < count or len(found) == wanted:
                return found
            if newest_first:
                last = rows[-1]["seq"] - 1
            else:
                after = rows[-1]["seq"]

    async def checkpoint_rows(
        self, *, after: int, upto: int | None, page: int | None
    ) -> list[AuditCheckpoint | NotACheckpoint]:
        """The rows of ``after+1 .. upto`` in sequence order, the first ``page`` of them, as a verification
        reads them: a row that is not a checkpoint (written in the database) comes as one, to be named."""
        rows = await self.conn.fetch(
            _CHECKPOINTS_BETWEEN,
            after,
            SEQ_MAX if upto is None else upto,
            page,  # NULL: no limit
        )
        read: list[AuditCheckpoint | NotACheckpoint] = []
        for r in rows:
            try:
                read.append(_checkpoint(r))
            except ValidationError as exc:
                read.append(NotACheckpoint(r["seq"], str(exc)))
        return read

    async def checkpoints_above(self, seq: int, *, page: int | None = None) -> list[StoredCheckpoint]:
        """The checkpoints of a sequence above ``seq``, in sequence order, the first ``page`` of them (None:
        every one), each with its row's hash, as a writer judges them: a row that is not a checkpoint comes
        as an untrusted one."""
        rows = await self.conn.fetch(
            f"{_STORED_CHECKPOINTS} WHERE c.seq > $1 ORDER BY c.seq LIMIT $2",
            seq,
            page,  # NULL: no limit
        )
        return [_stored_checkpoint(r) for r in rows]

    async def export_rows(self, after: int, upto: int) -> AsyncIterator[list[tuple[int, bytes, bytes]]]:
        """(seq, record, row_hash) in batches (:meth:`rows_between`)."""
        async for batch in self.rows_between("seq, record, row_hash", after, upto):
            yield [(r["seq"], r["record"], r["row_hash"]) for r in batch]

    async def rows_between(
        self, columns: str, after: int, upto: int, *, rows: int = READ_ROWS, budget: int = READ_BYTES
    ) -> AsyncIterator[list[asyncpg.Record]]:
        """Rows after..upto in sequence order, ``columns`` of each, in batches of at most ``rows`` rows and
        about ``budget`` bytes of records (at least one row); in a repeatable-read transaction, every batch
        reads the same snapshot."""
        sql = _ROWS_BETWEEN.format(columns=columns)
        while after < upto:
            batch = await self.conn.fetch(sql, after, upto, rows, budget)
            if not batch:
                return  # the rows left are missing: the reader's own count says so
            yield batch
            after = batch[-1]["seq"]


@asynccontextmanager
async def reading(pool: asyncpg.Pool, role: str, *, snapshot: bool = False) -> AsyncIterator[PgTrail]:
    """A read-only transaction in the writer role; ``snapshot``: one consistent view for long reads."""
    async with pool.acquire() as conn:
        isolation = "repeatable_read" if snapshot else "read_committed"
        async with conn.transaction(isolation=isolation, readonly=True):
            await enter_writer_role(conn, role)
            yield PgTrail(conn)


class PgChain:
    """Verification reads on a pool: each scan takes its own connection, so ranges run side by side."""

    def __init__(self, pool: asyncpg.Pool, role: str, *, seal_rows: int = SEAL_ROWS) -> None:
        self.pool = pool
        self.role = role
        self.seal_rows = seal_rows

    async def head_seq(self) -> int:
        """The highest sequence number (0: empty)."""
        async with reading(self.pool, self.role) as trail:
            return int(await trail.conn.fetchval("SELECT coalesce(max(seq), 0) FROM trail"))

    async def row_hashes(self, seqs: Sequence[int]) -> dict[int, bytes]:
        """Row hashes at these sequence numbers."""
        if not seqs:
            return {}
        async with reading(self.pool, self.role) as trail:
            return await trail.row_hashes(seqs)

    async def scan_links(self, scanner: LinkScanner) -> Finding | None:
        """Stream the range's links with binary COPY: the database hashes each record, this process
        chains the digests. Feeds the scanner chunk by chunk as they arrive."""
        header: bytearray | None = bytearray()
        scanner.frame(_LINK_PREFIX)

        async def sink(chunk: bytes) -> None:
            nonlocal header
            if header is None:
                scanner.feed(chunk)
                return
            header += chunk
            if len(header) < 19:
                return
            if bytes(header[:11]) != _COPY_SIGNATURE:
                raise RuntimeError("unexpected COPY stream: not PostgreSQL binary format")
            start = 19 + int.from_bytes(header[15:19], "big")
            if len(header) < start:
                return
            rest, header = bytes(header[start:]), None
            scanner.feed(rest)

        async with reading(self.pool, self.role) as trail:
            await trail.conn.copy_from_query(
                "SELECT int8send(seq) || pg_catalog.sha256(record) || row_hash FROM trail "
                "WHERE seq > $1 AND seq <= $2 ORDER BY seq",
                scanner.after,
                scanner.upto,
                output=sink,
                format="binary",
            )
        return scanner.finish(trailer=_COPY_TRAILER)

    async def scan_rows(self, scanner: RecordScanner) -> Finding | None:
        """Read whole rows a batch at a time from one snapshot; the scanner hashes the records itself."""
        async with reading(self.pool, self.role, snapshot=True) as trail:
            async for batch in trail.rows_between(_STORED, scanner.after, scanner.upto):
                scanner.feed(_stored(r) for r in batch)
                if scanner.finding is not None:
                    break
        return scanner.finish()

    async def seals(self, after: int, upto: int) -> AsyncGenerator[list[tuple[int, bytes, bytes]], None]:
        """(seq, row_hash, seal) of rows after..upto, ``seal_rows`` at a time, from one snapshot."""
        async with (
            reading(self.pool, self.role, snapshot=True) as trail,
            aclosing(trail.seals(after, upto, rows=self.seal_rows)) as batches,
        ):
            async for batch in batches:
                yield batch

    async def newest_checkpoint(self) -> int:
        """The highest sequence of a checkpoint (0: none): the primary key's last entry."""
        async with reading(self.pool, self.role) as trail:
            return int(await trail.conn.fetchval("SELECT coalesce(max(seq), 0) FROM checkpoints"))

    async def checkpoints(
        self, *, after: int, upto: int | None, page: int | None = None
    ) -> list[AuditCheckpoint | NotACheckpoint]:
        """The database's checkpoints for rows ``after+1 .. upto``, the first ``page`` of them, a row that is
        not a checkpoint included as such."""
        async with reading(self.pool, self.role) as trail:
            return await trail.checkpoint_rows(after=after, upto=upto, page=page)
