"""Tampering done directly in SQL by a superuser (triggers disabled first): each kind is found, with the
first bad sequence number, by the fast and the full verification."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.audit import AuditCheckpoint
from contracts.monitoring import DriftDetected
from libs.bus.postgres import pg_transactions
from libs.service import Runtime
from services.audit import core
from services.audit.adapters.files import CheckpointFile
from services.audit.adapters.postgres import PgChain, PgTrail, reading
from services.audit.bootstrap import CheckpointKeeper, sync_archive
from services.audit.domain import EventQuery, NotACheckpoint
from services.audit.schemas import AuditEventPublic, HeadPublic, TracePublic
from services.audit.settings import AuditSettings
from services.audit.verification import Problem
from tests.integration.audit.conftest import ROLE, TrailDb
from tests.unit.audit.fakes import PAGE_BYTES, TRACE_BYTES, delivery, example
from tests.unit.audit.test_docs import consumer

ROWS = 53  # checkpoints at 10, 20, 30, 40, 50; rows 51..53 wait for the next one

# The payload's model name, changed in the value only (the meta line, and so the indexed copies, stay).
CHANGE_PAYLOAD = """
UPDATE trail SET record = overlay(record PLACING convert_to('"chum" ', 'UTF8')
                                  FROM position(convert_to('"model":"churn"', 'UTF8') IN record) + 8)
WHERE seq = $1
"""

# What an attacker who knows the algorithm but not the key does after an edit: re-hash every later row.
RECOMPUTE_FROM = """
DO $$
DECLARE
    prev bytea;
    r record;
BEGIN
    SELECT row_hash INTO prev FROM trail WHERE seq = {start} - 1;
    IF prev IS NULL THEN prev := decode(repeat('00', 32), 'hex'); END IF;
    FOR r IN SELECT seq, record FROM trail WHERE seq >= {start} ORDER BY seq LOOP
        prev := sha256(prev || int8send(r.seq) || sha256(r.record));
        UPDATE trail SET row_hash = prev WHERE seq = r.seq;
    END LOOP;
END
$$;
"""


@pytest.fixture(params=[False, True], ids=["fast", "full"])
def full(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
async def filled(trail_db: TrailDb) -> TrailDb:
    await trail_db.fill(ROWS)
    assert (await trail_db.verify()).ok
    return trail_db


async def test_updated_payload_is_found_at_its_row(filled: TrailDb, full: bool) -> None:
    await filled.superuser(CHANGE_PAYLOAD, 17)
    report = await filled.verify(full=full)
    assert (report.ok, report.first_bad_seq, report.problem) == (False, 17, Problem.HASH_MISMATCH)


async def test_deleted_row_is_found_at_its_number(filled: TrailDb, full: bool) -> None:
    await filled.superuser("DELETE FROM trail WHERE seq = 17")
    report = await filled.verify(full=full)
    assert (report.first_bad_seq, report.problem) == (17, Problem.MISSING_ROW)


async def test_swapped_rows_are_found_at_the_first(filled: TrailDb, full: bool) -> None:
    await filled.superuser(
        """UPDATE trail SET seq = CASE seq WHEN 17 THEN 1000017 ELSE 1000023 END WHERE seq IN (17, 23);
           UPDATE trail SET seq = CASE seq WHEN 1000017 THEN 23 ELSE 17 END WHERE seq > 1000000;"""
    )
    report = await filled.verify(full=full)
    assert (report.first_bad_seq, report.problem) == (17, Problem.HASH_MISMATCH)


async def test_truncated_tail_is_found_through_the_checkpoints(filled: TrailDb, full: bool) -> None:
    await filled.superuser("DELETE FROM trail WHERE seq >= 38")
    report = await filled.verify(full=full)
    assert (report.first_bad_seq, report.problem) == (38, Problem.TRUNCATED)


async def test_tail_truncated_with_its_checkpoints_is_found_through_the_export_file(
    filled: TrailDb, tmp_path: Path
) -> None:
    archive = CheckpointFile(tmp_path / "checkpoints.ndjson")
    assert await sync_archive(filled.pool, ROLE, archive, filled.trust()) == 5
    await filled.superuser("DELETE FROM trail WHERE seq >= 38; DELETE FROM checkpoints WHERE seq >= 38;")
    assert (await filled.verify()).ok  # the database alone no longer shows it
    report = await filled.verify(archives=[archive])
    assert (report.first_bad_seq, report.problem) == (38, Problem.TRUNCATED)


class CountedChain(PgChain):
    """The verification's reads, noting the sequence of every checkpoint the database sends."""

    def __init__(self, trail_db: TrailDb) -> None:
        super().__init__(trail_db.pool, ROLE)
        self.checkpoints_read: list[int] = []

    async def checkpoints(
        self, *, after: int = 0, upto: int | None = None, page: int | None = None
    ) -> list[AuditCheckpoint | NotACheckpoint]:
        found = await super().checkpoints(after=after, upto=upto, page=page)
        self.checkpoints_read += [c.sequence for c in found]
        return found


class CountedTrail(PgTrail):
    """An export's reads, noting the sequence of every checkpoint the database sends."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__(conn)
        self.checkpoints_read: list[int] = []

    async def checkpoints(
        self, *, limit: int | None = None, after: int = 0, upto: int | None = None, page: int | None = None
    ) -> list[AuditCheckpoint]:
        found = await super().checkpoints(limit=limit, after=after, upto=upto, page=page)
        self.checkpoints_read += [c.sequence for c in found]
        return found


async def test_a_ranged_verification_and_export_read_only_the_range_s_checkpoints(
    filled: TrailDb, full: bool
) -> None:
    chain = CountedChain(filled)
    report = await filled.verify(chain=chain, from_seq=21, to_seq=40, full=full)
    assert report.ok and report.checkpoints_checked == 2, report
    assert chain.checkpoints_read == [30, 40]

    async with reading(filled.pool, ROLE, snapshot=True) as trail:
        counted = CountedTrail(trail.conn)
        lines = [
            line
            async for chunk in core.export_lines(counted, from_seq=21, to_seq=40)
            for line in chunk.splitlines()
        ]
    assert [orjson.loads(x)["checkpoint"]["sequence"] for x in lines if b'"checkpoint"' in x] == [30, 40]
    assert counted.checkpoints_read == [30, 40]


async def test_a_ranged_verification_finds_a_tail_cut_after_its_start(filled: TrailDb, full: bool) -> None:
    await filled.superuser("DELETE FROM trail WHERE seq >= 38")
    chain = CountedChain(filled)
    report = await filled.verify(chain=chain, from_seq=21, full=full)
    assert (report.first_bad_seq, report.problem) == (38, Problem.TRUNCATED), report
    assert chain.checkpoints_read == [30, 40, 50]


async def test_chain_recomputed_without_the_key_is_found_at_its_first_row(
    filled: TrailDb, full: bool
) -> None:
    await filled.superuser(CHANGE_PAYLOAD, 17)
    await filled.superuser(RECOMPUTE_FROM.format(start=17))
    report = await filled.verify(full=full)
    assert (report.first_bad_seq, report.problem, report.exact) == (17, Problem.REWRITTEN, True)


async def test_recomputed_chain_is_bounded_by_the_checkpoints_without_the_seal_key(filled: TrailDb) -> None:
    await filled.superuser(CHANGE_PAYLOAD, 17)
    await filled.superuser(RECOMPUTE_FROM.format(start=17))
    report = await filled.verify(sealed=False)
    assert (report.first_bad_seq, report.problem, report.exact) == (11, Problem.REWRITTEN, False)
    assert "rows 11..20" in (report.detail or "")


async def test_recomputed_tail_after_the_last_checkpoint_is_found_by_the_seals(filled: TrailDb) -> None:
    await filled.superuser(CHANGE_PAYLOAD, 52)
    await filled.superuser(RECOMPUTE_FROM.format(start=52))
    report = await filled.verify()
    assert (report.first_bad_seq, report.problem) == (52, Problem.REWRITTEN)


async def test_rows_rewritten_after_the_last_checkpoint_are_never_vouched_for_by_the_next_one(
    filled: TrailDb,
) -> None:
    await filled.superuser(CHANGE_PAYLOAD, 52)
    await filled.superuser(RECOMPUTE_FROM.format(start=52))
    more = [delivery(example(DriftDetected), offset=ROWS + i) for i in range(10)]
    assert await filled.record(more) == 10  # the trail goes on; the checkpoint due at 63 is refused
    assert await filled.pool.fetchval("SELECT max(seq) FROM checkpoints") == 50
    report = await filled.verify()
    assert (report.first_bad_seq, report.problem, report.exact) == (52, Problem.REWRITTEN, True)


FORGED_CHECKPOINT = """
INSERT INTO checkpoints (seq, head_hash, row_count, signed_at, key_id, signature, event_id)
VALUES ($1, $2, $1, now(), $3, $4, 'inserted-in-the-database')
"""
# An Ed25519 signature's length in base64, over nothing this trail's key signed.
FORGED_SIGNATURE = "A" * 86 + "=="


async def test_a_checkpoint_forged_far_ahead_neither_stops_the_checkpoints_nor_reaches_the_file(
    filled: TrailDb, tmp_path: Path
) -> None:
    await filled.superuser(FORGED_CHECKPOINT, 10**12, "ab" * 32, filled.signer.key_id, FORGED_SIGNATURE)
    archive = CheckpointFile(tmp_path / "checkpoints.ndjson", in_order=True)
    trust = filled.trust()
    assert await sync_archive(filled.pool, ROLE, archive, trust) == 5
    more = [delivery(example(DriftDetected), offset=ROWS + i) for i in range(10)]
    assert await filled.record(more) == 10
    assert await sync_archive(filled.pool, ROLE, archive, trust) == 1
    assert [c.sequence for c in archive.read()] == [10, 20, 30, 40, 50, 63]
    seqs = await filled.pool.fetch("SELECT seq FROM checkpoints ORDER BY seq")
    assert [r["seq"] for r in seqs] == [10, 20, 30, 40, 50, 63, 10**12]
    report = await filled.verify(archives=[archive])
    assert (report.first_bad_seq, report.problem) == (10**12, Problem.BAD_CHECKPOINT)


async def test_a_checkpoint_forged_at_the_head_and_deleted_after_the_next_one_hides_no_rewritten_row(
    filled: TrailDb,
) -> None:
    await filled.superuser(CHANGE_PAYLOAD, 52)
    await filled.superuser(RECOMPUTE_FROM.format(start=52))
    head_hash = await filled.pool.fetchval("SELECT encode(row_hash, 'hex') FROM trail WHERE seq = $1", ROWS)
    await filled.superuser(FORGED_CHECKPOINT, ROWS, head_hash, filled.signer.key_id, FORGED_SIGNATURE)
    more = [delivery(example(DriftDetected), offset=ROWS + i) for i in range(10)]
    assert await filled.record(more) == 10  # the checkpoint due at 63 is refused: row 52 has no seal
    await filled.superuser("DELETE FROM checkpoints WHERE seq = $1", ROWS)
    assert await filled.pool.fetchval("SELECT max(seq) FROM checkpoints") == 50
    report = await filled.verify()
    assert (report.first_bad_seq, report.problem, report.exact) == (52, Problem.REWRITTEN, True)


def keeper_of(db: TrailDb, tmp_path: Path) -> CheckpointKeeper:
    """The service's checkpoint keeper on the test's schema: what its timer and its clean stop run."""
    rt = SimpleNamespace(
        pool=db.pool, begin=pg_transactions(db.pool, db.schema), source=lambda: "/driftloop/audit"
    )
    settings = AuditSettings(writer_role=ROLE, checkpoint_file=tmp_path / "checkpoints.ndjson")
    archive = CheckpointFile(settings.checkpoint_file, in_order=True)
    return CheckpointKeeper(cast(Runtime, rt), settings, db.signer, archive, db.trust())


async def test_the_keeper_logs_a_refused_checkpoint_once_while_no_row_arrives(
    filled: TrailDb, tmp_path: Path
) -> None:
    await filled.superuser(CHANGE_PAYLOAD, 52)
    await filled.superuser(RECOMPUTE_FROM.format(start=52))
    keeper = keeper_of(filled, tmp_path)
    with capture_logs() as logs:
        for _ in range(3):  # three ticks of an idle trail
            await keeper.seal_now()
    assert sum(1 for e in logs if e["event"].startswith("checkpoint refused")) == 1
    assert await filled.record([delivery(example(DriftDetected), offset=ROWS)]) == 1
    with capture_logs() as logs:
        await keeper.seal_now()
        await keeper.seal_now()
    assert sum(1 for e in logs if e["event"].startswith("checkpoint refused")) == 1  # the head moved: once
    assert await filled.pool.fetchval("SELECT max(seq) FROM checkpoints") == 50


async def test_the_keeper_tries_a_sequence_a_forged_row_holds_once_per_head(
    filled: TrailDb, tmp_path: Path
) -> None:
    await filled.superuser(FORGED_CHECKPOINT, ROWS, "ab" * 32, filled.signer.key_id, FORGED_SIGNATURE)
    keeper = keeper_of(filled, tmp_path)
    with capture_logs() as logs:
        for _ in range(3):
            await keeper.seal_now()
    assert sum(1 for e in logs if e["event"].startswith("checkpoint not kept")) == 1
    await filled.superuser("DELETE FROM checkpoints WHERE seq = $1", ROWS)
    await keeper.seal_now()  # the same head, the forged row gone: signed there
    seqs = await filled.pool.fetch("SELECT seq, key_id FROM checkpoints WHERE seq > 50")
    assert [(r["seq"], r["key_id"]) for r in seqs] == [(ROWS, filled.signer.key_id)]


async def test_a_checkpoint_row_that_is_no_checkpoint_at_the_writer_s_next_sequence_does_not_stop_it(
    filled: TrailDb,
) -> None:
    await filled.superuser(FORGED_CHECKPOINT, 63, "not a hash", "", "not base64!")
    more = [delivery(example(DriftDetected), offset=ROWS + i) for i in range(12)]
    assert await filled.record(more[:10]) == 10  # due at 63, which the row holds: signed later
    assert await filled.record(more[10:]) == 2
    seqs = await filled.pool.fetch("SELECT seq FROM checkpoints WHERE seq > 50 ORDER BY seq")
    assert [r["seq"] for r in seqs] == [63, 65]
    assert (
        await filled.pool.fetchval("SELECT key_id FROM checkpoints WHERE seq = 65")
    ) == filled.signer.key_id


async def test_a_checkpoint_row_that_is_no_checkpoint_is_named_by_verify_and_fails_no_other_reader(
    filled: TrailDb, tmp_path: Path
) -> None:
    for seq in (35, 10**12):  # between two checkpoints, and the newest
        await filled.superuser(FORGED_CHECKPOINT, seq, "not a hash", "", "not base64!")
    archive, trust = CheckpointFile(tmp_path / "checkpoints.ndjson", in_order=True), filled.trust()
    before = untrusted("archive")
    # What the service does as it starts, then every second: one such row stopped it at its start.
    assert await sync_archive(filled.pool, ROLE, archive, trust) == 5
    assert await sync_archive(filled.pool, ROLE, archive, trust) == 0
    assert untrusted("archive") == before + 2  # each named once
    assert [c.sequence for c in archive.read()] == [10, 20, 30, 40, 50]
    # Verification names each, as it names a forged checkpoint (and the same read a row at a time).
    for from_seq, seq in [(1, 35), (41, 10**12)]:
        report = await filled.verify(archives=[archive], from_seq=from_seq)
        assert (report.first_bad_seq, report.problem) == (seq, Problem.BAD_CHECKPOINT), report
        assert f"the checkpoint at {seq}: its row is not a checkpoint" in (report.detail or "")
    async with reading(filled.pool, ROLE, snapshot=True) as trail:
        head = await core.head_view(trail)
        newest = await trail.checkpoints(limit=2)
        exports = [
            b"".join([line async for line in core.export_lines(trail, checkpoint_page=page)])
            for page in (1000, 1)
        ]
    assert HeadPublic.model_validate(head).last_checkpoint is not None
    assert [head["last_checkpoint"].sequence, *(c.sequence for c in newest)] == [50, 50, 40]
    for export in exports:  # the export carries the signed checkpoints alone
        lines = [orjson.loads(line) for line in export.splitlines()]
        assert [ln["checkpoint"]["sequence"] for ln in lines if "checkpoint" in ln] == [10, 20, 30, 40, 50]


class NotedFile(CheckpointFile):
    """The service's checkpoint file, noting the sequences each append is handed."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, in_order=True)
        self.handed: list[list[int]] = []

    def append(self, checkpoints: Sequence[AuditCheckpoint]) -> int:
        self.handed.append([c.sequence for c in checkpoints])
        return super().append(checkpoints)


async def test_the_file_takes_the_database_s_checkpoints_a_page_at_a_time(
    filled: TrailDb, tmp_path: Path
) -> None:
    # A new file, or one back from a long outage, lacks every checkpoint ever signed: the service read them
    # all at once as it started. A page of rows that are no checkpoints leaves the file's end where it was,
    # and the pages go on after it.
    await filled.superuser(FORGED_CHECKPOINT, 35, "not a hash", "", "not base64!")
    archive, trust = NotedFile(tmp_path / "checkpoints.ndjson"), filled.trust()
    before = untrusted("archive")
    assert await sync_archive(filled.pool, ROLE, archive, trust, page=2) == 5
    assert archive.handed == [[10, 20], [30], [40, 50]]
    assert untrusted("archive") == before + 1
    more = [delivery(example(DriftDetected), offset=ROWS + i) for i in range(10)]
    assert await filled.record(more) == 10
    assert await sync_archive(filled.pool, ROLE, archive, trust, page=2) == 1
    assert archive.handed[3:] == [[63]]
    assert [c.sequence for c in archive.read()] == [10, 20, 30, 40, 50, 63]
    assert untrusted("archive") == before + 1


async def test_a_writer_past_its_newest_checkpoint_trusts_it(filled: TrailDb) -> None:
    """The head's read gives the newest checkpoint under its own sequence: read under the head's (53, not
    50), every checkpoint the writer signed failed its signature check, and each transaction past one logged
    it as forged and fell back to a search below it."""
    async with filled.pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL ROLE {ROLE}")
        head, newest = await PgTrail(conn).lock_head()
    assert head.seq == ROWS
    assert newest is not None and newest.checkpoint is not None
    assert (newest.seq, newest.checkpoint.sequence) == (50, 50)
    assert filled.trust().distrust(newest) is None
    before = untrusted("sign")
    more = [delivery(example(DriftDetected), offset=ROWS + i) for i in range(3)]
    assert await filled.record(more) == 3
    assert untrusted("sign") == before


def untrusted(step: str) -> float:
    return REGISTRY.get_sample_value("driftloop_audit_checkpoints_untrusted_total", {"step": step}) or 0.0


async def test_doctored_indexed_column_is_found_by_the_full_verification(filled: TrailDb) -> None:
    await filled.superuser("UPDATE trail SET actor = 'user:mallory' WHERE seq = 12")
    assert (await filled.verify()).ok  # the chain covers the record, not its indexed copies
    report = await filled.verify(full=True)
    assert (report.first_bad_seq, report.problem) == (12, Problem.COLUMN_MISMATCH)


NULL_RECORD = (
    "ALTER TABLE trail ALTER COLUMN record DROP NOT NULL; UPDATE trail SET record = NULL WHERE seq = 17"
)
GARBLED_RECORD = "UPDATE trail SET record = convert_to('not a record', 'UTF8') WHERE seq = 17"


async def test_a_nulled_record_is_a_malformed_row(filled: TrailDb, full: bool) -> None:
    await filled.superuser(NULL_RECORD)
    report = await filled.verify(full=full)
    assert (report.first_bad_seq, report.problem) == (17, Problem.MALFORMED_ROW)


@pytest.mark.parametrize("tamper", [NULL_RECORD, GARBLED_RECORD], ids=["nulled", "garbled"])
async def test_a_row_whose_record_cannot_be_read_is_shown_flagged_unreadable(
    filled: TrailDb, tamper: str
) -> None:
    first = await filled.pool.fetchval("SELECT correlation_id FROM trail WHERE seq = 17")
    await filled.superuser(tamper)
    async with reading(filled.pool, ROLE) as trail:
        page, _ = await core.query_events(trail, EventQuery(limit=10), max_bytes=PAGE_BYTES)
        one = await core.event_at(trail, 17)
        tree = await core.trace(trail, first, max_events=100, max_bytes=TRACE_BYTES)
    assert [e["seq"] for e in page] == list(range(ROWS, ROWS - 10, -1))
    assert one["unreadable"].startswith("row 17 cannot be read: ") and one["kind"] is None
    assert AuditEventPublic.model_validate(one).unreadable == one["unreadable"]
    assert [r["unreadable"] for r in tree["roots"]] == [one["unreadable"]]
    assert TracePublic.model_validate(tree).events == 1


NULL_ROW_HASH = (
    "ALTER TABLE trail ALTER COLUMN row_hash DROP NOT NULL;"
    " UPDATE trail SET row_hash = NULL WHERE seq = {seq}"
)


async def test_an_export_streams_past_nulled_rows_and_the_outside_consumer_fails_there(
    filled: TrailDb, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await filled.superuser(NULL_RECORD)
    await filled.superuser(NULL_ROW_HASH.format(seq=29))
    async with reading(filled.pool, ROLE, snapshot=True) as trail:
        whole = b"".join([line async for line in core.export_lines(trail)])
        after_nulled_hash = b"".join([line async for line in core.export_lines(trail, from_seq=30)])
    rows = [orjson.loads(line) for line in whole.splitlines()[1:] if b'"seq"' in line]
    assert [r["seq"] for r in rows] == list(range(1, ROWS + 1))
    assert (rows[16]["record"], rows[28]["row_hash"]) == (None, None)
    assert orjson.loads(after_nulled_hash.splitlines()[0])["prev_hash"] is None
    export = tmp_path / "export.ndjson"
    export.write_bytes(whole)
    public_key = base64.b64encode(filled.signer.public_raw).decode()
    assert consumer().main(["--export", str(export), "--public-key", public_key]) == 1
    assert "FAILED at sequence 17" in capsys.readouterr().err
    export.write_bytes(after_nulled_hash)
    assert consumer().main(["--export", str(export), "--public-key", public_key]) == 1
    assert "FAILED at sequence 29: line 1 of the export is a header whose prev_hash is null" in (
        capsys.readouterr().err
    )


async def test_a_verification_that_starts_after_a_nulled_row_hash_names_that_row_malformed(
    filled: TrailDb, full: bool
) -> None:
    await filled.superuser(NULL_ROW_HASH.format(seq=29))
    report = await filled.verify(from_seq=30, full=full)
    assert (report.first_bad_seq, report.problem) == (29, Problem.MALFORMED_ROW), report
    assert report.detail is not None and "missing" not in report.detail


async def test_a_row_hash_nulled_after_the_last_checkpoint_refuses_the_next_one_and_the_writer_goes_on(
    filled: TrailDb, full: bool
) -> None:
    await filled.superuser(NULL_ROW_HASH.format(seq=52))
    assert await filled.record([delivery(example(DriftDetected), offset=ROWS + i) for i in range(10)]) == 10
    assert await filled.pool.fetchval("SELECT max(seq) FROM checkpoints") == 50
    report = await filled.verify(full=full)
    assert (report.first_bad_seq, report.problem) == (52, Problem.MALFORMED_ROW)


async def test_the_head_shows_a_nulled_row_hash_as_null(filled: TrailDb) -> None:
    await filled.superuser(NULL_ROW_HASH.format(seq=ROWS))
    async with reading(filled.pool, ROLE) as trail:
        head = HeadPublic.model_validate(await core.head_view(trail))
    assert (head.seq, head.row_hash) == (ROWS, None)


async def test_a_row_changed_in_the_database_does_not_stop_the_writer(filled: TrailDb) -> None:
    """Another event with the changed row's id, on its topic or another, is still recorded."""
    row = await filled.pool.fetchrow("SELECT topic, event_id FROM trail WHERE seq = 17")
    await filled.superuser(GARBLED_RECORD)
    same_id = example(DriftDetected).model_copy(update={"id": row["event_id"], "source": "/team-b"})
    other_topic = delivery(same_id, offset=900, topic="mlops.training")
    assert await filled.record([delivery(same_id, offset=900), other_topic]) == 2
