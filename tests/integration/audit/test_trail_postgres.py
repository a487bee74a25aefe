"""The trail on the real Postgres: COPY append, redeliveries, serialised writers, the role and triggers."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from asyncpg.connection import LoggedQuery
from prometheus_client import REGISTRY

from contracts.envelope import NotJson
from contracts.monitoring import DriftDetected
from contracts.predictions import PredictionsLogged
from contracts.topics import DEAD_LETTER
from contracts.training import TrainingRequested
from libs.bus.core import Delivery, Record
from services.audit import core, handlers
from services.audit.adapters.postgres import READ_BYTES, PgChain, PgTrail, reading
from services.audit.bootstrap import show_stored_head
from services.audit.domain import (
    GENESIS,
    ChainBuilder,
    ChainHead,
    EventQuery,
    Incoming,
    PartitionEnds,
    StoredRow,
    decode_cursor,
)
from services.audit.verification import Problem, RecordScanner
from tests.integration.audit.conftest import ROLE, TrailDb
from tests.unit.audit.fakes import (
    PAGE_BYTES,
    TRACE_BYTES,
    dead_letters_of,
    delivery,
    example,
    record_of,
    small_and_large,
)


async def test_records_are_appended_in_order_and_the_trail_verifies(trail_db: TrailDb) -> None:
    events = await trail_db.fill(23)
    poison = Record("mlops.models", 0, 999, b"\xff", b"\x00\x01 not json", (("ce_id", b"\xc3\x28"),))
    await trail_db.record([Delivery(poison, None, NotJson("value is not JSON"))])
    rows = await trail_db.pool.fetch("SELECT seq, event_id, kind FROM trail ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(1, 25))
    assert [r["event_id"] for r in rows[:23]] == [e.id for e in events]
    assert rows[23]["kind"] == "undecodable"
    for full in (False, True):
        report = await trail_db.verify(full=full)
        assert report.ok, report
        assert (report.rows_checked, report.checkpoints_checked) == (24, 2)


async def test_verify_and_get_head_agree_on_the_head_of_an_empty_trail_and_of_an_empty_range(
    trail_db: TrailDb,
) -> None:
    for rows in (0, 5):  # empty: the 64 zeros of row_hash(0); then the range from one past the end
        await trail_db.fill(rows)
        async with reading(trail_db.pool, ROLE) as trail:
            head = await core.head_view(trail)
        report = await trail_db.verify(from_seq=rows + 1)
        assert report.ok and report.head_hash == head["row_hash"], (report, head)
    assert head["row_hash"] != "0" * 64


async def test_a_starting_service_shows_the_stored_head_on_its_gauge(trail_db: TrailDb) -> None:
    # What build() does before the service answers ready: a restart showed 0 until the first append or the
    # keeper's first timed look.
    await trail_db.fill(7)
    handlers.HEAD_SEQUENCE.set(0)  # a new process: its gauge starts at 0
    await show_stored_head(trail_db.pool, ROLE)
    assert REGISTRY.get_sample_value("driftloop_audit_head_sequence") == 7


async def test_redelivered_records_add_nothing_and_a_position_is_unique(trail_db: TrailDb) -> None:
    batch = [delivery(example(DriftDetected), offset=i) for i in range(5)]
    assert await trail_db.record(batch) == 5
    assert await trail_db.record(batch[2:]) == 0
    assert await trail_db.pool.fetchval("SELECT count(*) FROM trail") == 5
    with pytest.raises(asyncpg.UniqueViolationError):
        await trail_db.pool.execute(
            """INSERT INTO trail (seq, record, row_hash, seal, topic, kafka_partition, kafka_offset, kind,
                                  recorded_at)
               SELECT 6, record, row_hash, seal, topic, kafka_partition, kafka_offset, kind, recorded_at
               FROM trail WHERE seq = 3"""
        )


async def test_records_at_positions_a_recreated_topic_uses_again_are_recorded_once_each(
    trail_db: TrailDb,
) -> None:
    ends = PartitionEnds()
    old = [delivery(example(DriftDetected), offset=i) for i in range(4)]
    assert await trail_db.record(old, ends=ends) == 4
    # The topic was deleted and created again: offsets 0..2 hold new records, written later.
    recreated = [
        Delivery(replace(d.record, timestamp_ms=d.record.timestamp_ms + 60_000), d.event)
        for d in (delivery(example(DriftDetected), offset=i) for i in range(3))
    ]
    assert await trail_db.record(recreated, ends=ends) == 3
    assert await trail_db.record([*old, *recreated], ends=ends) == 0  # redeliveries of either
    assert await trail_db.record([*old, *recreated]) == 0  # ... by a writer that knows no ends
    rows = await trail_db.pool.fetch(
        "SELECT kafka_offset, kafka_reuse, event_id, record FROM trail ORDER BY seq"
    )
    assert [(r["kafka_offset"], r["kafka_reuse"]) for r in rows[4:]] == [(0, 1), (1, 1), (2, 1)]
    assert [r["event_id"] for r in rows] == [d.event.id for d in [*old, *recreated] if d.event is not None]
    assert orjson.loads(bytes(rows[4]["record"]).partition(b"\n")[0])["kafka"]["reuse"] == 1
    report = await trail_db.verify(full=True)
    assert report.ok, report
    # The reuse number is a copy of a record field like the others: the full verification checks it.
    await trail_db.superuser("UPDATE trail SET kafka_reuse = 7 WHERE seq = 6")
    report = await trail_db.verify(full=True)
    assert report.first_bad_seq == 6 and report.problem == Problem.COLUMN_MISMATCH, report


async def test_a_row_that_cannot_be_read_still_holds_its_position(trail_db: TrailDb) -> None:
    batch = [delivery(example(DriftDetected), offset=i) for i in range(2)]
    assert await trail_db.record(batch) == 2
    await trail_db.superuser("UPDATE trail SET record = convert_to('not a record', 'UTF8') WHERE seq = 1")
    # Whatever comes at offset 0 now is not taken for what the row held: it is recorded after it.
    assert await trail_db.record(batch) == 1
    rows = await trail_db.pool.fetch("SELECT kafka_offset, kafka_reuse FROM trail ORDER BY seq")
    assert [tuple(r) for r in rows] == [(0, 0), (1, 0), (0, 1)]


async def test_a_resent_copy_of_an_event_at_new_offsets_adds_nothing(trail_db: TrailDb) -> None:
    # What an outbox relay does when it dies between sending a batch and marking it sent.
    events = [example(TrainingRequested) for _ in range(4)]
    assert await trail_db.record([delivery(e, offset=i) for i, e in enumerate(events)]) == 4
    resent = [delivery(e, offset=100 + i) for i, e in enumerate(events[1:3])]
    assert await trail_db.record([*resent, delivery(example(TrainingRequested), offset=200)]) == 1
    ids = [r["event_id"] for r in await trail_db.pool.fetch("SELECT event_id FROM trail ORDER BY seq")]
    assert len(ids) == len(set(ids)) == 5
    report = await trail_db.verify(full=True)
    assert report.ok, report


async def test_a_resent_copy_is_told_by_its_value_s_digest_and_no_record_leaves_the_database(
    trail_db: TrailDb,
) -> None:
    # Dead letters are looked up by event id and can be as large as the broker allows (a predictions batch
    # refused): every held record of a re-sent id came back whole to be compared. Now the database sends
    # each one's headers and the SHA-256 of its value, and the verdicts are the same.
    event = example(TrainingRequested)
    letters = dead_letters_of(event, count=2, size=1024 * 1024)  # one id, two values: two records
    assert await trail_db.record(letters) == 2
    resent = [Delivery(replace(d.record, offset=100 + i), None) for i, d in enumerate(letters)]
    value = letters[0].record.value or b""
    changed = Delivery(replace(letters[0].record, offset=200, value=value[:-1] + b"!"), None)
    assert await trail_db.record([*resent, changed]) == 1  # the copies skipped, the other bytes kept
    async with reading(trail_db.pool, ROLE) as trail:
        held = await trail.held_events([(DEAD_LETTER, event.id)])
    digests = [hashlib.sha256(d.record.value or b"").digest() for d in [*letters, changed]]
    assert sorted(v for _, v in held[(DEAD_LETTER, event.id)]) == sorted(digests)
    report = await trail_db.verify(full=True)
    assert report.ok, report


async def test_another_sources_event_with_the_same_id_and_payload_is_recorded(trail_db: TrailDb) -> None:
    # CloudEvents identify an event by source and id: these are three events, not copies of one.
    first = example(TrainingRequested)
    second, third = (first.model_copy(update={"source": s}) for s in ("/team-b", "/team-c"))
    assert await trail_db.record([delivery(first, offset=0)]) == 1
    assert (
        await trail_db.record([delivery(e, offset=1 + i) for i, e in enumerate([second, second, third])]) == 2
    )
    rows = await trail_db.pool.fetch("SELECT event_id, record FROM trail ORDER BY seq")
    assert {r["event_id"] for r in rows} == {first.id}
    assert [orjson.loads(bytes(r["record"]).partition(b"\n")[0])["headers"]["ce_source"] for r in rows] == [
        "/driftloop/test",
        "/team-b",
        "/team-c",
    ]
    assert (await trail_db.verify(full=True)).ok


async def test_concurrent_writers_never_fork_the_chain(trail_db: TrailDb) -> None:
    async def writer(partition: int) -> None:
        for start in range(0, 40, 4):
            await trail_db.record(
                [delivery(example(DriftDetected), partition=partition, offset=start + k) for k in range(4)]
            )

    await asyncio.gather(writer(0), writer(1), writer(2))
    seqs = [r["seq"] for r in await trail_db.pool.fetch("SELECT seq FROM trail ORDER BY seq")]
    assert seqs == list(range(1, 121))
    assert (await trail_db.verify()).ok


async def test_a_replica_notices_the_other_moved_the_head_before_it_trusts_the_ends_it_left(
    trail_db: TrailDb,
) -> None:
    # Two consumers holding the same partition for a while (a rebalance). Predictions, which only their
    # Kafka position tells apart (they are not looked up by event id).
    polls = [
        [delivery(example(PredictionsLogged), offset=start + k) for k in range(4)] for start in (0, 4, 8)
    ]
    mine, theirs = PartitionEnds(), PartitionEnds()
    assert await trail_db.record(polls[0], ends=mine) == 4
    assert await trail_db.record(polls[1], ends=theirs) == 4
    assert await trail_db.record([*polls[1], *polls[2]], ends=mine) == 4  # the ends it left are 3, not 7
    assert await trail_db.record(polls[2], ends=theirs) == 0
    offsets = [
        r["kafka_offset"] for r in await trail_db.pool.fetch("SELECT kafka_offset FROM trail ORDER BY seq")
    ]
    assert offsets == list(range(12))
    assert (await trail_db.verify()).ok


async def test_checkpoints_leave_through_the_outbox_in_the_same_transaction(trail_db: TrailDb) -> None:
    await trail_db.fill(20)
    rows = await trail_db.pool.fetch("SELECT topic, value FROM outbox ORDER BY seq")
    assert [r["topic"] for r in rows] == ["mlops.audit", "mlops.audit"]
    assert [orjson.loads(r["value"])["sequence"] for r in rows] == [10, 20]
    assert await trail_db.pool.fetchval("SELECT array_agg(seq ORDER BY seq) FROM checkpoints") == [10, 20]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE trail SET record = 'x'::bytea WHERE seq = 1",
        "DELETE FROM trail WHERE seq = 1",
        "TRUNCATE trail",
        "UPDATE checkpoints SET head_hash = 'x'",
        "DELETE FROM checkpoints",
        "TRUNCATE checkpoints",
    ],
)
async def test_service_role_is_denied_update_delete_and_truncate(trail_db: TrailDb, statement: str) -> None:
    await trail_db.fill(10)
    async with trail_db.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL ROLE {ROLE}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE trail SET record = 'x'::bytea WHERE seq = 1",
        "DELETE FROM trail WHERE seq = 1",
        "TRUNCATE trail",
        "DELETE FROM checkpoints",
    ],
)
async def test_triggers_refuse_changes_even_to_the_owner(trail_db: TrailDb, statement: str) -> None:
    await trail_db.fill(10)
    async with trail_db.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")  # ENABLE ALWAYS still fires
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute(statement)
    assert await trail_db.pool.fetchval("SELECT count(*) FROM trail") == 10


async def test_service_role_may_read_and_append_only(trail_db: TrailDb) -> None:
    rows = await trail_db.pool.fetch(
        """SELECT table_name, privilege_type FROM information_schema.role_table_grants
           WHERE grantee = $1 AND table_schema = $2 ORDER BY 1, 2""",
        ROLE,
        trail_db.schema,
    )
    assert [(r["table_name"], r["privilege_type"]) for r in rows] == [
        ("checkpoints", "INSERT"),
        ("checkpoints", "SELECT"),
        ("outbox", "INSERT"),
        ("trail", "INSERT"),
        ("trail", "SELECT"),
    ]


async def test_a_batch_larger_than_a_copy_buffer_streams_in_and_stays_gapless(trail_db: TrailDb) -> None:
    batch = [delivery(example(DriftDetected), offset=i) for i in range(900)]  # records of 1.8 kB: 1.6 MB
    assert await trail_db.record(batch, every=100) == len(batch)
    assert await trail_db.pool.fetchval("SELECT max(seq) = count(*) FROM trail")
    assert (await trail_db.verify(full=True)).ok


async def test_a_batch_that_fails_part_way_leaves_nothing_of_it(trail_db: TrailDb) -> None:
    head = ChainHead()
    incoming = [Incoming(record_of(example(DriftDetected), offset=i)) for i in range(600)]
    incoming.append(incoming[3])  # the same Kafka position twice, after the first COPY buffer went out
    builder = ChainBuilder(
        head, recorded_at=datetime.now(UTC), sealer=trail_db.signer.sealer, dead_letter_topic=""
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        async with trail_db.pool.acquire() as conn, conn.transaction():
            await PgTrail(conn).append(builder.rows(incoming))
    assert await trail_db.pool.fetchval("SELECT count(*) FROM trail") == 0
    assert await trail_db.record([delivery(example(DriftDetected))]) == 1


async def test_predictions_are_found_by_model_and_type_and_stay_out_of_cascades(trail_db: TrailDb) -> None:
    drift = example(DriftDetected)
    retrain = example(TrainingRequested, cause=drift)
    prediction = example(PredictionsLogged)
    await trail_db.record([delivery(drift), delivery(retrain, offset=1), delivery(prediction)])
    async with reading(trail_db.pool, ROLE) as trail:
        found, _ = await core.query_events(
            trail, EventQuery(event_type=PredictionsLogged.event_type()), max_bytes=PAGE_BYTES
        )
        assert [e["id"] for e in found] == [prediction.id]
        found, _ = await core.query_events(
            trail, EventQuery(model="churn", event_type="io.driftloop.DriftDetected.v1"), max_bytes=PAGE_BYTES
        )
        assert [e["id"] for e in found] == [drift.id]
        tree = await core.trace(trail, drift.id, max_events=10, max_bytes=TRACE_BYTES)
        assert tree["events"] == 2
        await trail.conn.execute("SET LOCAL enable_seqscan = off")  # usable at all, whatever the table size
        plan = "\n".join(
            r[0]
            for r in await trail.conn.fetch(
                "EXPLAIN SELECT * FROM trail WHERE correlation_id = $1 AND topic <> 'mlops.predictions'", "x"
            )
        )
        assert "trail_correlation" in plan


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


async def _plan(conn: asyncpg.Connection, query: LoggedQuery, *, generic: bool) -> list[dict[str, Any]]:
    """The nodes of the plan Postgres makes of a query the trail ran: for these argument values, or the
    generic plan a connection settles on once it has run the statement a few times (asyncpg keeps its
    statements prepared), which knows no value and expects an average cascade."""
    if not generic:
        [row] = await conn.fetch(f"EXPLAIN (FORMAT JSON) {query.query}", *query.args)
    else:
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE planned AS {query.query}")
        # EXECUTE takes no bound parameters: each value goes in as a quoted literal of the parameter's type.
        values = [await conn.fetchval("SELECT quote_literal($1::text)", str(a)) for a in query.args]
        [row] = await conn.fetch(f"EXPLAIN (FORMAT JSON) EXECUTE planned({', '.join(values)})")
        await conn.execute("DEALLOCATE planned")
        await conn.execute("RESET plan_cache_mode")
    return list(_plan_nodes(row[0][0]["Plan"]))


async def test_a_cascade_is_read_from_its_index_in_trail_order_and_never_sorted(trail_db: TrailDb) -> None:
    # A long cascade among many short ones (and predictions, left out of the index). Before the index held
    # seq, Postgres read every row of the cascade and sorted them before the limit could stop it: a cascade
    # of millions of events cost a trace millions of row reads, however small trace_max_events. (Planned
    # for its own id, a cascade the statistics know to be a large share of the trail can still be read by
    # walking the primary key: in order too, and not what this test is about.)
    drifts = [example(DriftDetected) for _ in range(300)]
    root = drifts[0]
    retrains = [example(TrainingRequested, cause=root) for _ in range(150)]
    predictions = [example(PredictionsLogged) for _ in range(50)]
    deliveries = [delivery(e, offset=i) for i, e in enumerate(drifts)]
    for i, retrain in enumerate(retrains):
        deliveries.insert(2 * i + 1, delivery(retrain, offset=i))
    deliveries += [delivery(e, offset=i) for i, e in enumerate(predictions)]
    for first in range(0, len(deliveries), 100):
        await trail_db.record(deliveries[first : first + 100], every=1000)
    await trail_db.pool.execute("ANALYZE trail")
    short, long = drifts[-1].id, root.id
    queries: list[LoggedQuery] = []
    async with reading(trail_db.pool, ROLE) as trail:
        with trail.conn.query_logger(queries.append):
            tree = await core.trace(trail, long, max_events=10, max_bytes=TRACE_BYTES)
            await core.trace(trail, short, max_events=10, max_bytes=TRACE_BYTES)
            query = EventQuery(correlation_id=long, newest_first=False, limit=5)
            oldest, _ = await trail.find(query, budget=PAGE_BYTES)
            query = EventQuery(correlation_id=long, before=oldest[-1].seq, limit=5)
            newest, _ = await trail.find(query, budget=PAGE_BYTES)
        assert tree["events"] == 10 and tree["truncated_by"] == "trace_max_events"
        assert [r.seq for r in newest] == [r.seq for r in oldest[-2::-1]]
        await trail.conn.execute("SET LOCAL enable_seqscan = off")  # a table this small is read whole
        plans = {
            "trace (generic)": await _plan(trail.conn, queries[0], generic=True),
            "trace of a short cascade": await _plan(trail.conn, queries[1], generic=False),
            "oldest first (generic)": await _plan(trail.conn, queries[2], generic=True),
            "newest first, after a cursor (generic)": await _plan(trail.conn, queries[3], generic=True),
        }
    scans: dict[str, dict[str, Any]] = {}
    for name, nodes in plans.items():
        summary = [(n["Node Type"], n.get("Index Name"), n.get("Index Cond")) for n in nodes]
        assert not any("Sort" in n["Node Type"] for n in nodes), (name, summary)
        [scans[name]] = [n for n in nodes if "Relation Name" in n]
        assert scans[name]["Node Type"] == "Index Scan", (name, summary)
        assert scans[name]["Index Name"] == "trail_correlation", (name, summary)
        assert "correlation_id" in scans[name]["Index Cond"], (name, summary)
    cursor_scan = scans["newest first, after a cursor (generic)"]
    assert cursor_scan["Scan Direction"] == "Backward", cursor_scan
    assert "seq <" in cursor_scan["Index Cond"], cursor_scan  # a bound of the scan, not a filter


async def test_a_ce_time_with_no_utc_form_is_indexed_as_no_time_and_the_trail_stays_readable(
    trail_db: TrailDb,
) -> None:
    # Year 10000 in UTC: the decoder refuses it, and the trail keeps the record with no event time.
    r = record_of(example(DriftDetected), offset=0)
    headers = tuple((n, b"9999-12-31T23:30:00-01:00" if n == "ce_time" else v) for n, v in r.headers)
    assert await trail_db.record([Delivery(replace(r, headers=headers), None)]) == 1
    async with reading(trail_db.pool, ROLE) as trail:
        [row], _ = await trail.find(EventQuery(), budget=PAGE_BYTES)
    assert row.attributes.event_time is None
    assert (await trail_db.verify(full=True)).ok


class MeasuredScanner(RecordScanner):
    """A full verification's scanner that notes how many bytes of records each batch it is fed holds."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.batch_bytes: list[int] = []

    def feed(self, rows: Iterable[StoredRow]) -> None:
        batch = list(rows)
        self.batch_bytes.append(sum(len(r.record) for r in batch))
        super().feed(batch)


async def test_an_export_and_a_full_verification_of_large_records_hold_a_bounded_batch(
    trail_db: TrailDb,
) -> None:
    # Both read 2,000 rows at a time: of records near the broker's 10 MiB (the trail keeps whatever comes,
    # predictions of a large request included), 20 GB in the audit service, which runs the writer too.
    size, rows = 1_000_000, 30
    for first in range(0, rows, 5):
        await trail_db.record(
            [
                Delivery(Record("mlops.models", 0, i, b"churn", b"x" * size, ()), None, NotJson("not JSON"))
                for i in range(first, first + 5)
            ]
        )
    one_row = size + 2_000  # the record's meta line, and the export line's framing
    async with reading(trail_db.pool, ROLE, snapshot=True) as trail:
        chunks = [len(chunk) async for chunk in core.export_lines(trail)]
    assert sum(chunks) > rows * size
    assert max(chunks) <= READ_BYTES + one_row

    scanner = MeasuredScanner(after=0, upto=rows, prev=GENESIS)
    assert await PgChain(trail_db.pool, ROLE).scan_rows(scanner) is None
    assert scanner.rows == rows
    assert max(scanner.batch_bytes) <= READ_BYTES + one_row


async def test_a_trace_of_large_records_reads_a_bounded_cascade_and_says_the_bytes_cut_it(
    trail_db: TrailDb,
) -> None:
    # One correlation id, records near a megabyte each: counted by events alone, a trace would read them
    # all (10,000 of them near the broker's 10 MiB is 100 GB) into the service that also writes the trail.
    size, letters, budget = 1_000_000, 12, 3_000_000
    drift = example(DriftDetected)
    await trail_db.record([delivery(drift), *dead_letters_of(drift, count=letters, size=size)])
    async with reading(trail_db.pool, ROLE) as trail:
        rows, budget_cut = await trail.cascade(drift.id, limit=10_000, budget=budget)
        # Taken while the records before a row hold less than the budget: the budget and one record at most.
        held = [len(r.record or b"") for r in rows]
        assert budget_cut and sum(held[:-1]) < budget <= sum(held)
        assert 1 < len(rows) < 1 + letters and [r.seq for r in rows] == list(range(1, len(rows) + 1))

        tree = await core.trace(trail, drift.id, max_events=10_000, max_bytes=budget)
        assert tree["truncated_by"] == "trace_max_bytes"
        assert 1 + len(tree["roots"][0]["dead_letters"]) == len(rows)

        # The cascade's every byte as the budget: nothing left out, so nothing is said to be.
        total = await trail.conn.fetchval("SELECT sum(octet_length(record)) FROM trail")
        rows, budget_cut = await trail.cascade(drift.id, limit=10_000, budget=total)
        assert len(rows) == 1 + letters and not budget_cut
        # The count cuts first: the bytes did not.
        tree = await core.trace(trail, drift.id, max_events=2, max_bytes=budget)
        assert (tree["events"], tree["truncated_by"]) == (1, "trace_max_events")


@pytest.mark.parametrize("newest_first", [True, False], ids=["newest", "oldest"])
@pytest.mark.parametrize("by_cascade", [False, True], ids=["all", "by-correlation-id"])
async def test_event_pages_of_large_records_hold_the_byte_budget_in_sql_and_page_through_every_row_once(
    trail_db: TrailDb, newest_first: bool, by_cascade: bool
) -> None:
    # Counted by events alone, a page of 1,000 records near the broker's 10 MiB is 10 GB, read whole into
    # the service that also writes the trail.
    sizes = [0, 1_000_000, 0, 1_000_000, 1_000_000, 0, 4_000_000, 1_000_000, 0, 0, 1_000_000, 1_000_000, 0]
    deliveries = small_and_large(sizes)
    await trail_db.record(deliveries)
    correlation_id = deliveries[0].event.correlationid if deliveries[0].event else None
    budget, limit = 3_000_000, 5
    async with reading(trail_db.pool, ROLE) as trail:
        size = dict(await trail.conn.fetch("SELECT seq, octet_length(record) FROM trail"))
        pages: list[list[int]] = []
        cuts: list[bool] = []
        at: int | None = None
        while True:
            query = EventQuery(
                correlation_id=correlation_id if by_cascade else None,
                newest_first=newest_first,
                after=None if newest_first else at,
                before=at if newest_first else None,
                limit=limit,
            )
            rows, budget_cut = await trail.find(query, budget=budget)
            pages.append([r.seq for r in rows])
            cuts.append(budget_cut)
            views, cursor = await core.query_events(trail, query, max_bytes=budget)
            assert [v["seq"] for v in views] == pages[-1]
            if cursor is None:
                break
            at = decode_cursor(cursor, newest_first=newest_first)
            assert at == pages[-1][-1]  # the next page starts right after this one's last row
    assert [seq for page in pages for seq in page] == sorted(size, reverse=newest_first)
    for page, cut in zip(pages, cuts, strict=True):
        held = [size[seq] for seq in page]
        assert 1 <= len(page) <= limit and sum(held[:-1]) < budget
        assert cut == (page is not pages[-1] and sum(held) >= budget)
    assert any(cuts) and any(len(page) < limit for page in pages[:-1])
