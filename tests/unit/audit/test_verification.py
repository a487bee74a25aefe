"""Verification on the in-memory trail: every kind of tampering is found, with the first bad row."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.audit import AuditCheckpoint
from contracts.monitoring import DriftDetected
from libs.errors import NotFound
from services.audit import core, handlers
from services.audit.core import CHECKPOINT_PAGE, verify_trail
from services.audit.domain import GENESIS, SEQ_MAX, ChainHead, CheckpointTrust, KeyRing, RefusedHead, Signer
from services.audit.schemas import VerifyPublic
from services.audit.verification import Finding, LinkScanner, Problem, split_ranges
from tests.unit.audit.fakes import (
    OTHER_SEED,
    SEED,
    Clock,
    FakeArchive,
    FakeTrail,
    changed_payload,
    delivery,
    example,
    record,
)

ROWS = 53
EVERY = 10


async def filled(rows: int = ROWS, every: int = EVERY, *, trail: FakeTrail | None = None) -> FakeTrail:
    """A trail of ``rows`` events with a checkpoint every ``every`` rows, written in batches of 5."""
    trail = trail if trail is not None else FakeTrail()
    signer = Signer(SEED)
    batch = [delivery(example(DriftDetected), offset=i) for i in range(rows)]
    for i in range(0, rows, 5):
        await record(trail, signer, batch[i : i + 5], every=every)
    return trail


SIGNER = Signer(SEED)
KEYS = KeyRing([SIGNER.public_raw])


async def verify(trail: FakeTrail, *, full: bool = False, sealed: bool = True, **kw: Any) -> Any:
    """The report of a verification reading the checkpoints a page at a time: the same whatever the size of
    the pages (one checkpoint, two, all of them), which every tampering below shows on several pages."""

    async def run(page: int) -> Any:
        sealer = SIGNER.sealer if sealed else None
        return await verify_trail(trail, keys=KEYS, sealer=sealer, full=full, checkpoint_page=page, **kw)

    read_before = list(trail.checkpoints_read)
    paged = [await run(page) for page in (1, 2)]
    trail.checkpoints_read[:] = read_before  # what the tests look at: the reads of one verification
    report = await run(CHECKPOINT_PAGE)
    for other in paged:
        assert _outcome(other) == _outcome(report)
    return report


def _outcome(report: Any) -> dict[str, Any]:
    return {k: v for k, v in report.as_json().items() if k not in ("elapsed_s", "rows_per_s")}


@pytest.fixture(params=[False, True], ids=["fast", "full"])
def full(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_untouched_trail_verifies(full: bool) -> None:
    trail = await filled()
    report = await verify(trail, full=full)
    assert report.ok, report
    assert report.rows_checked == ROWS
    assert report.head_hash == trail.rows[ROWS].row.row_hash.hex()
    assert report.checkpoints_checked == 5  # at 10, 20, 30, 40 and 50; rows 51..53 wait for the next
    assert report.first_bad_seq is None


async def test_updated_payload_is_found_at_its_row(full: bool) -> None:
    trail = await filled()
    trail.update_record(17, changed_payload(trail.rows[17].row.record))
    report = await verify(trail, full=full)
    assert (report.ok, report.first_bad_seq, report.problem) == (False, 17, Problem.HASH_MISMATCH)


async def test_deleted_row_is_found_at_its_number(full: bool) -> None:
    trail = await filled()
    trail.delete(17)
    report = await verify(trail, full=full)
    assert (report.first_bad_seq, report.problem) == (17, Problem.MISSING_ROW)


async def test_swapped_rows_are_found_at_the_first(full: bool) -> None:
    trail = await filled()
    trail.swap(17, 23)
    report = await verify(trail, full=full)
    assert (report.first_bad_seq, report.problem) == (17, Problem.HASH_MISMATCH)


async def test_truncated_tail_is_found_through_the_checkpoints(full: bool) -> None:
    trail = await filled()
    trail.delete(*range(38, ROWS + 1))
    report = await verify(trail, full=full)
    assert (report.first_bad_seq, report.problem) == (38, Problem.TRUNCATED)
    # Up to the last checkpoint beyond the end (50), the full extent known; it said rows 38..40.
    assert "rows 38..50 are gone: the trail ends at 37" in (report.detail or ""), report


async def test_truncated_tail_with_its_checkpoints_is_found_through_the_archive() -> None:
    trail = await filled()
    archive = await trail.checkpoints()
    trail.delete(*range(38, ROWS + 1))
    trail.drop_checkpoints_after(37)
    assert (await verify(trail)).ok  # what the database alone still shows
    report = await verify(trail, archives=[FakeArchive(archive)])
    assert (report.first_bad_seq, report.problem) == (38, Problem.TRUNCATED)


async def test_chain_recomputed_without_the_key_is_found_at_its_first_row(full: bool) -> None:
    trail = await filled()
    trail.update_record(17, changed_payload(trail.rows[17].row.record))
    trail.recompute_from(17)
    report = await verify(trail, full=full)
    assert (report.first_bad_seq, report.problem, report.exact) == (17, Problem.REWRITTEN, True)


@pytest.mark.parametrize("headers", [["ce_id"], "ce_id", None], ids=["list", "text", "null"])
async def test_a_record_whose_headers_are_no_object_under_a_recomputed_chain_is_found_at_its_row(
    full: bool, headers: Any
) -> None:
    # The full verification compares the indexed columns with the record; it read the headers of a record
    # replaced in the database as an object, and failed (AttributeError: a 500, the CLI a traceback).
    trail = await filled()
    meta, _, value = trail.rows[17].row.record.partition(b"\n")
    trail.update_record(17, orjson.dumps({**orjson.loads(meta), "headers": headers}) + b"\n" + value)
    trail.recompute_from(17)
    report = await verify(trail, full=full)
    expected = Problem.COLUMN_MISMATCH if full else Problem.REWRITTEN
    assert (report.first_bad_seq, report.problem, report.exact) == (17, expected, True), report


async def test_recomputed_chain_without_the_seal_key_is_bounded_by_checkpoints() -> None:
    trail = await filled()
    trail.update_record(17, changed_payload(trail.rows[17].row.record))
    trail.recompute_from(17)
    report = await verify(trail, sealed=False)
    # Checkpoints at 10 and 20: the change lies in 11..20; only the seals could say 17.
    assert (report.first_bad_seq, report.problem, report.exact) == (11, Problem.REWRITTEN, False)
    assert "rows 11..20" in (report.detail or "")


async def test_recomputed_tail_after_the_last_checkpoint_is_found_by_the_seals() -> None:
    trail = await filled()
    trail.update_record(52, changed_payload(trail.rows[52].row.record))
    trail.recompute_from(52)
    report = await verify(trail)
    assert (report.first_bad_seq, report.problem) == (52, Problem.REWRITTEN)
    assert "after the last checkpoint" in (report.detail or "")


async def test_rows_rewritten_after_the_last_checkpoint_are_never_vouched_for_by_the_next_one() -> None:
    trail = await filled()
    trail.update_record(52, changed_payload(trail.rows[52].row.record))
    trail.recompute_from(52)
    # The writer goes on: ten more rows, a checkpoint due at 63, and a timed one and a clean stop's after.
    more = [delivery(example(DriftDetected), offset=i) for i in range(ROWS, ROWS + 10)]
    await record(trail, SIGNER, more, every=EVERY)
    assert (
        await handlers.seal_head(
            trail=trail,
            signer=SIGNER,
            publish=_ignore,
            source="/driftloop/audit",
            clock=Clock(),
            after_commit=_committed,
        )
        is None
    )
    assert max(c.sequence for c, _ in trail.checkpoint_rows) == 50  # neither vouches for row 52
    report = await verify(trail)
    assert (report.first_bad_seq, report.problem, report.exact) == (52, Problem.REWRITTEN, True)
    assert "after the last checkpoint" in (report.detail or "")


async def test_a_row_hash_nulled_after_the_last_checkpoint_refuses_the_next_one_and_the_writer_goes_on() -> (
    None
):
    trail = await filled()
    trail.null_row_hash(52)
    more = [delivery(example(DriftDetected), offset=i) for i in range(ROWS, ROWS + 10)]
    assert (await record(trail, SIGNER, more, every=EVERY))[0] == 10
    assert max(c.sequence for c, _ in trail.checkpoint_rows) == 50
    report = await verify(trail, full=True)  # the fake's links have no NULL; Postgres's are checked too
    assert (report.first_bad_seq, report.problem) == (52, Problem.MALFORMED_ROW)


async def _ignore(event: Any) -> None:
    return None


def _committed(callback: Callable[[], None]) -> None:
    callback()


def untrusted(step: str) -> float:
    return REGISTRY.get_sample_value("driftloop_audit_checkpoints_untrusted_total", {"step": step}) or 0.0


def forged(seq: int, head_hash: bytes) -> AuditCheckpoint:
    """A checkpoint row inserted in the database: this trail's key id, a signature of another key."""
    made = Signer(OTHER_SEED).checkpoint(ChainHead(seq, head_hash), signed_at=datetime.now(UTC))
    return made.model_copy(update={"key_id": SIGNER.key_id})


async def seal_head(trail: FakeTrail, **kw: Any) -> AuditCheckpoint | None:
    """The keeper's timed checkpoint (and a clean stop's)."""
    return await handlers.seal_head(
        trail=trail,
        signer=SIGNER,
        publish=_ignore,
        source="/driftloop/audit",
        clock=Clock(),
        after_commit=_committed,
        **kw,
    )


async def test_a_checkpoint_forged_far_ahead_does_not_stop_the_writer_signing() -> None:
    trail = await filled()
    trail.insert_checkpoint(forged(10**12, bytes(32)))
    before = untrusted("sign")
    trust = CheckpointTrust(KEYS)
    for k in range(3):
        more = [delivery(example(DriftDetected), offset=i) for i in range(ROWS + 5 * k, ROWS + 5 * k + 5)]
        assert (await record(trail, SIGNER, more, every=EVERY, trust=trust))[0] == 5
    ours = sorted(c.sequence for c, _ in trail.checkpoint_rows if c.sequence < 10**12)
    assert ours == [10, 20, 30, 40, 50, 63]
    assert (await seal_head(trail, trust=trust)) is not None  # a timed one too, at 68
    assert untrusted("sign") == before + 1  # logged and counted once, however many polls met it
    report = await verify(trail)  # still named, as it was
    assert (report.first_bad_seq, report.problem) == (10**12, Problem.BAD_CHECKPOINT)


async def test_a_checkpoint_forged_at_the_head_lets_the_next_vouch_for_no_row_rewritten_below_it() -> None:
    trail = await filled()
    trail.update_record(52, changed_payload(trail.rows[52].row.record))
    trail.recompute_from(52)
    trail.insert_checkpoint(forged(ROWS, trail.rows[ROWS].row.row_hash))  # it matches the rewritten head
    more = [delivery(example(DriftDetected), offset=i) for i in range(ROWS, ROWS + 10)]
    assert (await record(trail, SIGNER, more, every=EVERY))[0] == 10  # a checkpoint due at 63
    assert await seal_head(trail) is None
    trail.delete_checkpoint(ROWS)  # before the keeper copies it to the file
    assert max(c.sequence for c, _ in trail.checkpoint_rows) == 50  # nothing vouches for row 52
    report = await verify(trail)
    assert (report.first_bad_seq, report.problem, report.exact) == (52, Problem.REWRITTEN, True)


async def test_a_checkpoint_due_at_a_sequence_a_forged_one_holds_is_signed_at_a_later_head() -> None:
    trail = await filled()
    trail.insert_checkpoint(forged(58, bytes(32)))
    trail.insert_checkpoint(forged(60, bytes(32)))
    polls = [[delivery(example(DriftDetected), offset=i) for i in range(k, k + 5)] for k in range(53, 75, 5)]
    await record(trail, SIGNER, polls[0], every=EVERY)
    _, published = await record(trail, SIGNER, polls[1], every=EVERY)  # due at 63: its sequence is free
    assert [e.data.sequence for e in published] == [63]
    trail.insert_checkpoint(forged(73, bytes(32)))
    await record(trail, SIGNER, polls[2], every=EVERY)
    _, published = await record(trail, SIGNER, polls[3], every=EVERY)  # due at 73, which a forged one holds
    assert published == []
    assert (await seal_head(trail)) is None  # nor at a timed checkpoint: the head is still 73
    _, published = await record(trail, SIGNER, polls[4][:2], every=EVERY)
    assert [e.data.sequence for e in published] == [75]
    assert KEYS.check(published[0].data) is None


def refused_total() -> float:
    return REGISTRY.get_sample_value("driftloop_audit_checkpoints_refused_total") or 0.0


def errors(logs: Sequence[Mapping[str, Any]], starting: str) -> int:
    """How many error lines of the capture start with ``starting``."""
    return sum(1 for e in logs if e["log_level"] == "error" and e["event"].startswith(starting))


async def test_the_timed_checkpoint_reads_the_seals_and_logs_a_refusal_once_per_head() -> None:
    # An idle trail with a row rewritten after the last checkpoint: the timer meets the same head every
    # minute, and read every seal since the checkpoint, and logged the refusal, each time.
    trail = await filled()
    trail.update_record(52, changed_payload(trail.rows[52].row.record))
    trail.recompute_from(52)
    refused, before = RefusedHead(), refused_total()
    trail.seal_reads.clear()
    with capture_logs() as logs:
        assert await seal_head(trail, refused=refused) is None
        assert await seal_head(trail, refused=refused) is None
    assert trail.seal_reads == [(50, 53)]
    assert errors(logs, "checkpoint refused") == 1
    assert refused_total() == before + 2  # still refused, and counted, on every tick
    # A row arrives (no checkpoint due by rows): the next tick checks the seals up to the new head again.
    await record(trail, SIGNER, [delivery(example(DriftDetected), offset=ROWS)], every=EVERY)
    with capture_logs() as logs:
        assert await seal_head(trail, refused=refused) is None
        assert await seal_head(trail, refused=refused) is None
    assert trail.seal_reads == [(50, 53), (50, 54)]
    assert errors(logs, "checkpoint refused") == 1
    assert max(c.sequence for c, _ in trail.checkpoint_rows) == 50  # nothing vouches for row 52
    report = await verify(trail)
    assert (report.first_bad_seq, report.problem, report.exact) == (52, Problem.REWRITTEN, True)


async def test_the_timed_checkpoint_tries_a_sequence_a_forged_row_holds_once_per_head() -> None:
    trail = await filled()
    trail.insert_checkpoint(forged(ROWS, bytes(32)))
    refused, trust = RefusedHead(), CheckpointTrust(KEYS)
    trail.seal_reads.clear()
    with capture_logs() as logs:
        assert await seal_head(trail, trust=trust, refused=refused) is None
        assert await seal_head(trail, trust=trust, refused=refused) is None
    assert trail.seal_reads == [(50, ROWS)]
    assert errors(logs, "checkpoint not kept") == 1
    await record(trail, SIGNER, [delivery(example(DriftDetected), offset=ROWS)], every=EVERY, trust=trust)
    signed = await seal_head(trail, trust=trust, refused=refused)
    assert signed is not None and signed.sequence == ROWS + 1


async def test_the_timed_checkpoint_signs_at_the_same_head_once_the_forged_row_is_gone() -> None:
    trail = await filled()
    trail.insert_checkpoint(forged(ROWS, bytes(32)))
    refused, trust = RefusedHead(), CheckpointTrust(KEYS)
    assert await seal_head(trail, trust=trust, refused=refused) is None
    trail.delete_checkpoint(ROWS)  # an operator removes it: no row arrives, the head stays
    signed = await seal_head(trail, trust=trust, refused=refused)
    assert signed is not None and signed.sequence == ROWS


async def test_a_writer_builds_on_a_checkpoint_of_a_retired_key_it_trusts() -> None:
    new = Signer(OTHER_SEED)
    for keys, signed in [([new.public_raw, SIGNER.public_raw], [(63, new.key_id)]), ([new.public_raw], [])]:
        trail = await filled()  # the old key's checkpoints, up to a clean stop's at 53
        assert await seal_head(trail) is not None
        more = [delivery(example(DriftDetected), offset=i) for i in range(ROWS, ROWS + 10)]
        _, published = await record(trail, new, more, every=EVERY, trust=CheckpointTrust(KeyRing(keys)))
        # Without the old key, its checkpoints vouch for nothing: the rows since the first are the old key's,
        # whose seals the new key cannot check, and the checkpoint is refused.
        assert [(e.data.sequence, e.data.key_id) for e in published] == signed


async def test_the_file_takes_only_trusted_checkpoints_and_names_each_untrusted_one_once() -> None:
    trail = await filled()
    trail.insert_checkpoint(forged(10**12, bytes(32)))
    trail.insert_checkpoint(forged(ROWS, trail.rows[ROWS].row.row_hash))
    archive, trust, before = FakeArchive([]), CheckpointTrust(KEYS), untrusted("archive")

    async def copy() -> int:
        """What the keeper does every second: bootstrap.sync_archive on the fakes."""
        stored = await trail.checkpoints_below(SEQ_MAX, limit=1000)
        taken = handlers.trusted_to_archive(
            [s for s in reversed(stored) if s.seq > archive.last_sequence()], trust
        )
        added = archive.append(taken)
        trust.passed(archive.last_sequence())
        return added

    assert await copy() == 5
    assert await copy() == 0
    assert untrusted("archive") == before + 2
    more = [delivery(example(DriftDetected), offset=i) for i in range(ROWS, ROWS + 10)]
    await record(trail, SIGNER, more, every=EVERY, trust=trust)
    assert await copy() == 1  # the writer's next one, at 63, reaches the file
    assert [c.sequence for c in archive.checkpoints] == [10, 20, 30, 40, 50, 63]
    assert untrusted("archive") == before + 2


async def test_checkpoint_forged_to_match_a_recomputed_chain_is_refused() -> None:
    trail = await filled()
    trail.update_record(17, changed_payload(trail.rows[17].row.record))
    trail.recompute_from(17)
    forged = [
        (c.model_copy(update={"head_hash": trail.rows[c.sequence].row.row_hash.hex()}), e)
        for c, e in trail.checkpoint_rows
    ]
    trail.checkpoint_rows = forged
    report = await verify(trail, sealed=False)
    assert (report.first_bad_seq, report.problem) == (20, Problem.BAD_CHECKPOINT)
    assert "signature does not match" in (report.detail or "")


async def test_checkpoint_of_an_unknown_key_is_reported_as_untrusted() -> None:
    trail = await filled()
    stranger = Signer(OTHER_SEED).checkpoint(
        ChainHead(14, trail.rows[14].row.row_hash), signed_at=datetime.now(UTC)
    )
    report = await verify(trail, archives=[FakeArchive([stranger])])
    assert (report.first_bad_seq, report.problem) == (14, Problem.BAD_CHECKPOINT)
    assert "not trusted here" in (report.detail or "")


async def test_a_cut_tail_is_named_up_to_the_last_trusted_checkpoint_beyond_the_end() -> None:
    trail = await filled()
    trail.delete(*range(38, ROWS + 1))
    stranger = Signer(OTHER_SEED).checkpoint(ChainHead(70, bytes(32)), signed_at=datetime.now(UTC))
    report = await verify(trail, archives=[FakeArchive([stranger])])
    assert (report.first_bad_seq, report.problem) == (38, Problem.TRUNCATED)
    assert "rows 38..50 are gone" in (report.detail or ""), report  # not ..70: that one proves nothing
    trail.drop_checkpoints_after(37)
    report = await verify(trail, archives=[FakeArchive([stranger])])
    assert (report.first_bad_seq, report.problem) == (70, Problem.BAD_CHECKPOINT), report
    assert f"signed by key {stranger.key_id}, which is not trusted here, so it vouches for nothing" in (
        report.detail or ""
    )


async def test_a_range_trusts_the_row_before_it_and_parallel_ranges_agree() -> None:
    trail = await filled()
    report = await verify(trail, from_seq=20, to_seq=40, parallelism=3)
    assert report.ok and report.rows_checked == 21
    trail.update_record(33, b"changed")
    for parallelism in (1, 2, 4):
        report = await verify(trail, parallelism=parallelism)
        assert report.first_bad_seq == 33


class _OneScanFails(FakeTrail):
    """The first range's scan fails (its connection dropped, say) while the others are still reading."""

    def __init__(self, others: int) -> None:
        super().__init__()
        self.others = others
        self.reading = 0
        self.all_reading = asyncio.Event()
        self.read_on = asyncio.Event()

    async def scan_links(self, scanner: LinkScanner) -> Finding | None:
        if scanner.after == 0:
            await self.all_reading.wait()
            raise ConnectionError("connection to the database was lost")
        self.reading += 1
        if self.reading == self.others:
            self.all_reading.set()
        try:
            await self.read_on.wait()
            return await super().scan_links(scanner)
        finally:
            self.reading -= 1


async def test_a_failed_range_stops_the_others_before_the_verification_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each range's scan holds a connection of the writer's pool: the other ranges were left reading after one
    # failed, past the verification's end and its slot, and each retry left as many more.
    monkeypatch.setattr(core, "split_ranges", lambda *a: split_ranges(*a, min_rows=1))
    trail = _OneScanFails(others=3)
    await filled(trail=trail)
    with pytest.raises(ConnectionError):
        await verify_trail(trail, keys=KEYS, sealer=SIGNER.sealer, parallelism=4)
    assert trail.reading == 0


async def test_a_range_that_starts_after_a_nulled_row_hash_names_that_row_malformed() -> None:
    trail = await filled()
    trail.null_row_hash(29)
    report = await verify(trail, from_seq=30)
    assert (report.first_bad_seq, report.problem) == (29, Problem.MALFORMED_ROW), report
    assert report.detail == "row 29 has no row hash: a verification range starts after it"
    trail.delete(29)
    report = await verify(trail, from_seq=30)
    assert (report.first_bad_seq, report.problem) == (29, Problem.MISSING_ROW), report


async def test_verifying_beyond_the_end_reports_the_missing_rows() -> None:
    trail = await filled()
    report = await verify(trail, to_seq=ROWS + 5)
    assert (report.first_bad_seq, report.problem) == (ROWS + 1, Problem.MISSING_ROW)


async def test_verifying_from_beyond_the_end_is_not_found_as_for_an_export() -> None:
    trail = await filled()
    report = await verify(trail, from_seq=ROWS + 1)  # the empty range of a trail that has not grown
    assert report.ok and report.rows_checked == 0
    for to_seq in (None, ROWS + 100):
        with pytest.raises(NotFound, match=f"the trail has no row {ROWS + 1} to start the verification"):
            await verify(trail, from_seq=ROWS + 2, to_seq=to_seq)


async def test_empty_trail_verifies_with_the_genesis_hash_as_its_head_as_get_head_shows_it() -> None:
    trail = FakeTrail()
    report = await verify(trail)
    assert report.ok and report.rows_checked == 0
    assert report.head_hash == GENESIS.hex() == (await core.head_view(trail))["row_hash"]
    VerifyPublic.model_validate(report.as_json())


async def test_an_empty_range_at_the_end_has_the_hash_of_the_row_it_trusts_as_its_head() -> None:
    trail = await filled()
    report = await verify(trail, from_seq=ROWS + 1)
    assert report.ok and report.head_hash == trail.rows[ROWS].row.row_hash.hex(), report
    trail.null_row_hash(ROWS)  # as for a range with rows: the row it starts after has no hash to trust
    report = await verify(trail, from_seq=ROWS + 1)
    assert (report.ok, report.first_bad_seq, report.problem, report.head_hash) == (
        False,
        ROWS,
        Problem.MALFORMED_ROW,
        None,
    ), report


def test_link_scanner_reads_links_cut_anywhere_and_stops_at_a_wrong_prefix() -> None:
    prefix = b"\x00\x01\x00\x00\x00\x48"
    prev, links = GENESIS, []
    for seq in range(1, 4):
        digest = hashlib.sha256(b"r%d" % seq).digest()
        prev = hashlib.sha256(prev + seq.to_bytes(8, "big") + digest).digest()
        links.append(prefix + seq.to_bytes(8, "big") + digest + prev)
    stream = b"".join(links) + b"\xff\xff"
    scanner = LinkScanner(after=0, upto=3, prev=GENESIS, prefix=prefix)
    for i in range(0, len(stream), 5):
        scanner.feed(stream[i : i + 5])
    assert scanner.finish(trailer=b"\xff\xff") is None and scanner.rows == 3

    broken = links[0] + b"\x00\x01\xff\xff\xff\xff" + links[2]  # row 2's column is NULL
    scanner = LinkScanner(after=0, upto=3, prev=GENESIS, prefix=prefix)
    scanner.feed(broken)
    finding = scanner.finish(trailer=b"\xff\xff")
    assert finding is not None and (finding.seq, finding.problem) == (2, Problem.MALFORMED_ROW)


def test_split_ranges_cover_the_range_without_overlap() -> None:
    assert split_ranges(0, 10, 3, min_rows=1) == [(0, 3), (3, 6), (6, 10)]
    assert split_ranges(5, 8, 4, min_rows=50_000) == [(5, 8)]


def test_checkpoint_signature_covers_every_field() -> None:
    cp = SIGNER.checkpoint(ChainHead(3, bytes(32)), signed_at=datetime(2025, 1, 1, tzinfo=UTC))
    assert KEYS.check(cp) is None
    for change in (
        {"sequence": 4, "row_count": 4},
        {"head_hash": "1" * 64},
        {"signed_at": datetime.now(UTC)},
    ):
        assert KEYS.check(AuditCheckpoint.model_validate({**cp.model_dump(), **change})) is not None


async def test_a_range_without_a_checkpoint_says_no_row_is_vouched_for() -> None:
    # A range trusts the row before it; only a checkpoint vouches for rows, and 31..39 hold none. The report
    # said "rows up to 30 vouched for" (the row before the range) though no checkpoint was checked.
    trail = await filled()
    report = await verify(trail, from_seq=31, to_seq=39)
    assert report.ok and (report.checkpoints_checked, report.covered_by_checkpoint) == (0, 0)
    report = await verify(trail, from_seq=31, to_seq=45)
    assert report.ok and (report.checkpoints_checked, report.covered_by_checkpoint) == (1, 40)


async def test_a_ranged_verification_or_export_reads_only_the_range_s_checkpoints() -> None:
    # A trail kept for years has a checkpoint a minute: both read every one of them for a range of a few rows.
    trail = await filled(200, every=5)  # checkpoints at 5, 10, ..., 200
    report = await verify(trail, from_seq=101, to_seq=120)
    assert report.ok and report.checkpoints_checked == 4, report
    assert trail.checkpoints_read == [105, 110, 115, 120]

    trail.checkpoints_read.clear()
    lines = [
        line
        async for chunk in core.export_lines(trail, from_seq=101, to_seq=120)
        for line in chunk.splitlines()
    ]
    assert sum(b'"checkpoint"' in line for line in lines) == 4
    assert trail.checkpoints_read == [105, 110, 115, 120]


async def test_a_ranged_verification_still_finds_a_tail_cut_after_its_start() -> None:
    # The checkpoints beyond the trail's end are in a range without an end: they show the cut.
    trail = await filled(200, every=5)
    trail.delete(*range(153, 201))
    report = await verify(trail, from_seq=141)
    assert (report.first_bad_seq, report.problem) == (153, Problem.TRUNCATED), report
    assert trail.checkpoints_read == list(range(145, 201, 5))
    trail.checkpoints_read.clear()
    report = await verify(trail, from_seq=141, to_seq=160)
    assert (report.first_bad_seq, report.problem) == (153, Problem.MISSING_ROW), report
    assert trail.checkpoints_read == [145, 150, 155, 160]

    lines = [line async for chunk in core.export_lines(trail, from_seq=141) for line in chunk.splitlines()]
    assert [orjson.loads(line)["checkpoint"]["sequence"] for line in lines[-10:]] == list(range(155, 201, 5))


async def test_verifying_the_whole_trail_holds_a_page_of_checkpoints_at_a_time(full: bool) -> None:
    # A billion-row trail has 100,000 checkpoints in the database and as many in the export file: the whole
    # trail's verification held every one of both at once (400 here), with their row hashes.
    trail = await filled(1000, every=5)  # checkpoints at 5, 10, ..., 1000
    archive = FakeArchive([c for c, _ in trail.checkpoint_rows], trail.materialised)
    page = 10
    report = await verify_trail(
        trail, keys=KEYS, sealer=SIGNER.sealer, full=full, archives=[archive], checkpoint_page=page
    )
    assert report.ok and (report.checkpoints_checked, report.covered_by_checkpoint) == (200, 1000), report
    # A page of the database's and one of the file's, while the reader still holds the page before.
    assert 0 < trail.materialised.peak <= 3 * page

    trail.delete(*range(613, 1001))  # the tail cut, its checkpoints beyond the end read a page at a time too
    trail.materialised.peak = 0
    report = await verify_trail(
        trail, keys=KEYS, sealer=SIGNER.sealer, full=full, archives=[archive], checkpoint_page=page
    )
    assert (report.first_bad_seq, report.problem) == (613, Problem.TRUNCATED), report
    assert "rows 613..1000 are gone" in (report.detail or ""), report
    assert 0 < trail.materialised.peak <= 3 * page + 2  # and the first and the last trusted past the end


async def test_an_export_holds_a_page_of_checkpoints_at_a_time_and_places_them_as_before() -> None:
    trail = await filled(300, every=5)  # checkpoints at 5, 10, ..., 300
    archive = FakeArchive([c for c, _ in trail.checkpoint_rows], trail.materialised)
    trail.delete(*range(253, 301))  # the checkpoints of rows cut off the end follow the last row

    async def exported(page: int) -> list[bytes]:
        lines = core.export_lines(
            trail, archives=[archive], checkpoint_page=page, now=lambda: datetime(2025, 1, 1, tzinfo=UTC)
        )
        return [line async for chunk in lines for line in chunk.splitlines()]

    whole = await exported(CHECKPOINT_PAGE)
    trail.materialised.peak = 0
    assert await exported(3) == whole
    assert 0 < trail.materialised.peak <= 3 * 3
    objs = [orjson.loads(line) for line in whole[1:]]
    placed = [(i, o["checkpoint"]["sequence"]) for i, o in enumerate(objs) if "checkpoint" in o]
    assert [seq for _, seq in placed] == list(range(5, 301, 5))  # each once, though in both sources
    assert all(objs[i - 1]["seq"] == seq for i, seq in placed if seq <= 252)
    assert [i for i, seq in placed if seq > 252] == list(range(len(objs) - 10, len(objs)))


async def test_a_checkpoint_signed_while_the_trail_is_verified_is_not_taken_for_a_cut_tail() -> None:
    # Checkpoints are read a page at a time after the head: one signed meanwhile lies beyond the head read.
    trail = await filled()
    archive = FakeArchive([c for c, _ in trail.checkpoint_rows])
    more = [delivery(example(DriftDetected), offset=ROWS + i) for i in range(10)]

    async def writer_goes_on() -> None:
        _, published = await record(trail, SIGNER, more, every=EVERY)
        assert published  # the checkpoint at 63, beyond the head (53) the verification read
        archive.append([c for c, _ in trail.checkpoint_rows])

    trail.after_head = writer_goes_on
    report = await verify_trail(trail, keys=KEYS, sealer=SIGNER.sealer, archives=[archive], checkpoint_page=1)
    assert report.ok and (report.to_seq, report.checkpoints_checked) == (ROWS, 5), report
    assert max(c.sequence for c, _ in trail.checkpoint_rows) == ROWS + 10
