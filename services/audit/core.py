"""The audit service's read side, shared by the HTTP API and the `driftloop audit` commands: queries,
causal traces, verification and exports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from contracts.audit import AuditCheckpoint
from libs.errors import InvalidInput, NotFound
from services.audit.domain import (
    GENESIS,
    EventQuery,
    KeyRing,
    Sealer,
    causal_tree,
    check_indexed_filter,
    checked_view,
    encode_cursor,
    export_header,
    export_row,
)
from services.audit.ports import ChainSource, TrailReader
from services.audit.verification import (
    Finding,
    LinkScanner,
    Problem,
    RecordScanner,
    VerifyReport,
    check_checkpoints,
    first_bad_seal,
    first_finding,
    rewritten_at,
    split_ranges,
)


async def query_events(trail: TrailReader, query: EventQuery) -> tuple[list[dict[str, Any]], str | None]:
    """One page of events and the cursor of the next page (None on the last page)."""
    rows = await trail.find(query)
    views = [checked_view(row) for row in rows]
    more = bool(rows) and len(rows) == query.limit
    return views, encode_cursor(query.newest_first, rows[-1].seq) if more else None


async def event_at(trail: TrailReader, seq: int) -> dict[str, Any]:
    """One event by sequence number, or 404."""
    row = await trail.row(seq)
    if row is None:
        raise NotFound(f"the trail has no row {seq}")
    return checked_view(row)


async def trace(trail: TrailReader, correlation_id: str, *, max_events: int) -> dict[str, Any]:
    """The causal tree of one cascade, or 404 when the trail has none of its events."""
    check_indexed_filter("correlation_id", correlation_id)
    rows = await trail.cascade(correlation_id, max_events + 1)
    if not rows:
        raise NotFound(
            f"no event with correlation id {correlation_id!r} in the trail: pass the correlationid of an "
            "event (GET /v1/events shows it)"
        )
    return causal_tree(correlation_id, rows[:max_events], truncated=len(rows) > max_events)


async def verify_trail(
    chain: ChainSource,
    *,
    keys: KeyRing,
    sealer: Sealer | None,
    archived: Sequence[AuditCheckpoint] = (),
    from_seq: int = 1,
    to_seq: int | None = None,
    full: bool = False,
    parallelism: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> VerifyReport:
    """Check the chain from ``from_seq`` (trusting the row before it) to ``to_seq`` (default: the end),
    then every signed checkpoint in that range, then the seals where no checkpoint vouches for the rows.

    ``full`` hashes every record in this process and compares the indexed columns with the records;
    the default lets the database hash the records while this process chains the digests.
    """
    if from_seq < 1:
        raise InvalidInput("from_seq must be 1 or more", field="from_seq")
    if to_seq is not None and to_seq < from_seq:
        raise InvalidInput("to_seq must not be below from_seq", field="to_seq")
    started = clock()
    after = from_seq - 1
    # Checkpoints first, then the head: every checkpoint read here was written after its rows, so any that
    # lies beyond the head read next means rows are gone, never that the trail grew between two reads.
    # Only the range's are read (a trail kept for years has millions): those are all the checks below use,
    # those beyond the last row included, which show a cut tail.
    known_checkpoints = [*await chain.checkpoints(after=after, upto=to_seq), *archived]
    head = await chain.head_seq()
    if after > head:
        # As /export: a range cannot start after a row that does not exist (from_seq = head + 1 is the
        # empty range of a trail that has not grown since).
        raise NotFound(
            f"the trail has no row {after} to start the verification after: it ends at {head} (a "
            "verification from row 1 names any rows cut off its end)"
        )
    upto = head if to_seq is None else to_seq
    findings: list[Finding | None] = []
    scanned_upto = min(upto, head)
    ranges = split_ranges(after, scanned_upto, parallelism) if scanned_upto > after else []
    # The row the verification trusts is read even when no row follows it (from_seq one past the end): its
    # hash is then the head, as the header of an export of that range gives it.
    starts = await chain.row_hashes(sorted({after, *(lo for lo, _ in ranges)} - {0}))
    rows_checked = 0
    # An empty range's head is the hash it trusts: all zeros for an empty trail, as GET /v1/head says.
    last_hash: bytes | None = GENESIS if after == 0 else starts.get(after)
    scans: list[Any] = []
    if not ranges and last_hash is None:
        findings.append(_unusable_start(after, starts))
    for lo, hi in ranges:
        prev = GENESIS if lo == 0 else starts.get(lo)
        if prev is None:
            findings.append(_unusable_start(lo, starts))
            continue
        scans.append(
            RecordScanner(after=lo, upto=hi, prev=prev) if full else LinkScanner(after=lo, upto=hi, prev=prev)
        )
    await asyncio.gather(
        *(chain.scan_rows(s) if isinstance(s, RecordScanner) else chain.scan_links(s) for s in scans)
    )
    for s in scans:
        findings.append(s.finding)
        rows_checked += s.rows
    if scans:
        last_hash = scans[-1].prev if scans[-1].finding is None else None
    if upto > head:
        findings.append(
            Finding(head + 1, Problem.MISSING_ROW, f"row {head + 1} is missing: the trail ends at {head}")
        )
    chain_finding = first_finding(findings)
    checked_upto = chain_finding.seq - 1 if chain_finding is not None else scanned_upto

    checkpoints = [
        c for c in known_checkpoints if c.sequence > after and (to_seq is None or c.sequence <= to_seq)
    ]
    stored = await chain.row_hashes(sorted({c.sequence for c in checkpoints if c.sequence <= checked_upto}))
    verdict = check_checkpoints(
        checkpoints, after=after, checked_upto=checked_upto, head_seq=head, stored_hash=stored, keys=keys
    )
    checkpoint_finding = verdict.finding
    if sealer is not None and verdict.suspect_range is not None:
        lo, hi = verdict.suspect_range
        bad = first_bad_seal(await chain.seals(lo, hi), sealer)
        if bad is not None:
            checkpoint_finding = rewritten_at(bad, hi)
    tail_finding = None
    if sealer is not None and verdict.finding is None and checked_upto > verdict.covered_up_to:
        # No checkpoint vouches for these rows yet; only the seals show a chain recomputed here.
        bad = first_bad_seal(await chain.seals(verdict.covered_up_to, checked_upto), sealer)
        if bad is not None:
            tail_finding = rewritten_at(bad, None)
    finding = first_finding([chain_finding, checkpoint_finding, tail_finding])
    return VerifyReport(
        ok=finding is None,
        mode="full" if full else "fast",
        from_seq=from_seq,
        to_seq=upto,
        rows_checked=rows_checked,
        checkpoints_checked=verdict.checked,
        # What a checkpoint of the range vouches for: a range trusts the row before it, no checkpoint does.
        covered_by_checkpoint=verdict.covered_up_to if verdict.covered_up_to > after else 0,
        head_hash=last_hash.hex() if last_hash is not None and finding is None else None,
        first_bad_seq=finding.seq if finding else None,
        problem=finding.problem.value if finding else None,
        detail=finding.detail if finding else None,
        exact=finding.exact if finding else True,
        seals_checked=sealer is not None,
        elapsed_s=clock() - started,
    )


def _unusable_start(seq: int, starts: Mapping[int, bytes]) -> Finding:
    """Why a verification range cannot start after row ``seq``: the row is absent, or present with its hash
    nulled in the database (malformed)."""
    if seq not in starts:
        return Finding(
            seq, Problem.MISSING_ROW, f"row {seq} is missing: a verification range starts after it"
        )
    return Finding(
        seq, Problem.MALFORMED_ROW, f"row {seq} has no row hash: a verification range starts after it"
    )


async def head_view(trail: TrailReader) -> dict[str, Any]:
    """The last row's sequence number and hash (null if it was nulled in the database), and the newest
    checkpoint."""
    head = await trail.head()
    newest = await trail.checkpoints(limit=1)
    return {
        "seq": head.seq,
        "row_hash": head.row_hash.hex() if head.row_hash is not None else None,
        "last_checkpoint": newest[0] if newest else None,
    }


async def export_lines(
    trail: TrailReader,
    *,
    from_seq: int = 1,
    to_seq: int | None = None,
    archived: Sequence[AuditCheckpoint] = (),
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> AsyncIterator[bytes]:
    """The NDJSON export: a header line, then each row, each signed checkpoint right after its row. Known
    checkpoints of the range that no row of it came before (rows cut off the end) follow the last row: a
    reader of the export alone sees that rows it covers are gone."""
    if from_seq < 1:
        raise InvalidInput("from_seq must be 1 or more", field="from_seq")
    if to_seq is not None and to_seq < from_seq:
        raise InvalidInput("to_seq must not be below from_seq", field="to_seq")
    head = await trail.head()
    upto = head.seq if to_seq is None else min(to_seq, head.seq)
    after = from_seq - 1
    prev = GENESIS
    if after > 0:
        row = await trail.row(after)
        if row is None:
            raise NotFound(f"the trail has no row {after} to start the export after")
        prev = row.row_hash
    # Bounded by to_seq, not by upto: beyond the head is where a cut tail's checkpoints are.
    in_range = await trail.checkpoints(after=after, upto=to_seq)
    known = {(c.sequence, c.signature): c for c in [*in_range, *archived]}
    pending = sorted(
        (c for c in known.values() if after < c.sequence and (to_seq is None or c.sequence <= to_seq)),
        key=lambda c: c.sequence,
    )
    yield _line(export_header(from_seq=from_seq, to_seq=upto, prev_hash=prev, exported_at=now()))
    i = 0
    async for batch in trail.export_rows(after, upto):
        out = []
        for seq, record, row_hash in batch:
            out.append(_line(export_row(seq, record, row_hash)))
            while i < len(pending) and pending[i].sequence <= seq:
                out.append(_line({"checkpoint": pending[i].model_dump(mode="json")}))
                i += 1
        yield b"".join(out)
    if i < len(pending):
        yield b"".join(_line({"checkpoint": c.model_dump(mode="json")}) for c in pending[i:])


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"
