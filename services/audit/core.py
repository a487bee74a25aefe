"""The audit service's read side, shared by the HTTP API and the `driftloop audit` commands: queries,
causal traces, verification and exports."""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_right
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from contracts.audit import AuditCheckpoint
from libs.errors import InvalidInput, NotFound
from services.audit.domain import (
    GENESIS,
    EventQuery,
    KeyRing,
    NotACheckpoint,
    Sealer,
    StoredCheckpoint,
    TraceCut,
    causal_tree,
    check_indexed_filter,
    checked_view,
    encode_cursor,
    export_header,
    export_row,
)
from services.audit.ports import ChainSource, CheckpointArchive, TrailReader
from services.audit.verification import (
    CheckpointChecker,
    Finding,
    LinkScanner,
    Problem,
    RecordScanner,
    VerifyReport,
    first_bad_seal_in,
    first_finding,
    rewritten_at,
    split_ranges,
)


async def query_events(
    trail: TrailReader, query: EventQuery, *, max_bytes: int, traffic_data: bool = True
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of events and the cursor of the next page (None on the last page); without
    ``traffic_data``, traffic rows' payloads withheld (the HTTP API's callers without the auditor role).

    At most ``query.limit`` events, and records of about ``max_bytes`` (the first event's whole, however
    large): a record can be near the broker's message size, and the page holds them all at once. A page
    the bytes ended early still has a cursor, which goes on right after its last event."""
    rows, budget_cut = await trail.find(query, budget=max_bytes)
    views = [checked_view(row, traffic_data=traffic_data) for row in rows]
    more = budget_cut or (bool(rows) and len(rows) == query.limit)
    return views, encode_cursor(query.newest_first, rows[-1].seq) if more else None


async def event_at(trail: TrailReader, seq: int, *, traffic_data: bool = True) -> dict[str, Any]:
    """One event by sequence number, or 404; without ``traffic_data``, a traffic row's payload withheld."""
    row = await trail.row(seq)
    if row is None:
        raise NotFound(f"the trail has no row {seq}")
    return checked_view(row, traffic_data=traffic_data)


async def trace(
    trail: TrailReader, correlation_id: str, *, max_events: int, max_bytes: int, traffic_data: bool = True
) -> dict[str, Any]:
    """The causal tree of one cascade, or 404 when the trail has none of its events; without
    ``traffic_data``, traffic rows' payloads withheld.

    At most ``max_events`` events, and records of about ``max_bytes`` (the first event's whole, however
    large): a cascade's events can each be near the broker's message size, and the tree holds them all at
    once. The answer says which bound cut it."""
    check_indexed_filter("correlation_id", correlation_id)
    rows, budget_cut = await trail.cascade(correlation_id, limit=max_events + 1, budget=max_bytes)
    if not rows:
        raise NotFound(
            f"no event with correlation id {correlation_id!r} in the trail: pass the correlationid of an "
            "event (GET /v1/events shows it)"
        )
    rest = "GET /v1/events?correlation_id=...&order=oldest pages through every event of the cascade"
    cut = None
    if len(rows) > max_events:
        cut = TraceCut(
            "trace_max_events",
            f"the cascade has more than {max_events} events (DRIFTLOOP_AUDIT_TRACE_MAX_EVENTS): {rest}",
        )
    elif budget_cut:
        cut = TraceCut(
            "trace_max_bytes",
            f"the records of the events up to seq {rows[-1].seq} reached {max_bytes} bytes "
            f"(DRIFTLOOP_AUDIT_TRACE_MAX_BYTES) and the cascade has more: {rest}",
        )
    return causal_tree(correlation_id, rows[:max_events], truncation=cut, traffic_data=traffic_data)


CHECKPOINT_PAGE = 1000
"""Most checkpoints a verification, an export or the copy to the checkpoint file reads from one source (the
database, a file) at once: a
trail kept for years has a checkpoint every few thousand rows, a billion rows 100,000 or more, and they are
read a page at a time alongside the rows, never all together."""

CheckpointRead = AuditCheckpoint | NotACheckpoint
"""A checkpoint as a source gives it: the database's rows that are not checkpoints come as such, for a
verification to name."""

Read = TypeVar("Read", AuditCheckpoint, CheckpointRead, StoredCheckpoint)
"""What a reader of checkpoints takes: checkpoints (an export), rows that may not be ones (a verification),
or rows with the trail's row hash at their sequence, as a writer judges them (the copy to the checkpoint
file, ``bootstrap.sync_archive``)."""

Checked = TypeVar("Checked", AuditCheckpoint, CheckpointRead)
"""What a verification or an export reads from the database and the files alike."""

ReadCheckpoints = Callable[[int, int], Awaitable[Sequence[Read]]]
"""(after, page): the first ``page`` checkpoints of one source above ``after``, in sequence order (more when
the last sequence has several, fewer only at the source's end)."""


async def checkpoint_pages(
    sources: Sequence[ReadCheckpoints[Read]], *, after: int, page: int = CHECKPOINT_PAGE
) -> AsyncGenerator[list[Read], None]:
    """The checkpoints of every source above ``after`` merged in sequence order, a page at a time, the same
    checkpoint (sequence and signature) once: at most a page per source is held at once.

    A page ends at the lowest sequence a source not yet at its end has read up to: what it holds above
    that comes in a later page, beside what the others hold there. On one sequence, the earlier source's
    checkpoints come first."""
    held: list[list[Read]] = [[] for _ in sources]
    read_to = [after] * len(sources)
    ended = [False] * len(sources)
    while True:
        for i, read in enumerate(sources):
            if not held[i] and not ended[i]:
                got = await read(read_to[i], page)
                held[i] = sorted((c for c in got if c.sequence > read_to[i]), key=lambda c: c.sequence)
                ended[i] = len(got) < page or not held[i]
                read_to[i] = held[i][-1].sequence if held[i] else read_to[i]
        if not any(held):
            return
        bound = min((read_to[i] for i in range(len(sources)) if not ended[i]), default=None)
        taken: list[Read] = []
        for i, mine in enumerate(held):
            cut = len(mine) if bound is None else bisect_right([c.sequence for c in mine], bound)
            taken += mine[:cut]
            held[i] = mine[cut:]
        merged = sorted({(c.sequence, c.signature): c for c in taken}.values(), key=lambda c: c.sequence)
        del taken  # the copies left out are let go before the next pages are read
        if merged:
            yield merged


def _reads(
    chain_read: Callable[..., Awaitable[Sequence[Checked]]],
    database_upto: int | None,
    archives: Sequence[tuple[CheckpointArchive, int | None]],
) -> list[ReadCheckpoints[Checked]]:
    """The database's pages (``chain_read``), then each archive's, read in a thread: a file of years of
    checkpoints is searched on disk, and the trail's writer may share this event loop."""

    def database(lo: int, n: int) -> Awaitable[Sequence[Checked]]:
        return chain_read(after=lo, upto=database_upto, page=n)

    def archive_read(archive: CheckpointArchive, upto: int | None) -> ReadCheckpoints[AuditCheckpoint]:
        async def read(lo: int, n: int) -> list[AuditCheckpoint]:
            return await asyncio.to_thread(archive.read, after=lo, upto=upto, page=n)

        return read

    return [database, *(archive_read(a, upto) for a, upto in archives)]


def check_range(from_seq: int, to_seq: int | None) -> None:
    """422 for a range of rows that holds none (``to_seq`` below ``from_seq``) or starts before row 1: what a
    verification or an export refuses before it reads anything (a checkpoint file, a database snapshot)."""
    if from_seq < 1:
        raise InvalidInput("from_seq must be 1 or more", field="from_seq")
    if to_seq is not None and to_seq < from_seq:
        raise InvalidInput("to_seq must not be below from_seq", field="to_seq")


async def _all_or_none(scans: Sequence[Awaitable[Any]]) -> None:
    """Run the ranges' scans side by side; when one fails, stop the others before its error is raised. Each
    holds a connection of the writer's pool, counted against it only while the verification's slot is held
    (verify_concurrency x verify_parallelism): ``asyncio.gather`` left them reading after the first error,
    after the slot came back, and every retry of the verification left as many more."""
    tasks = [asyncio.ensure_future(scan) for scan in scans]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _archive_bounds(
    archives: Sequence[CheckpointArchive], to_seq: int | None
) -> list[tuple[CheckpointArchive, int]]:
    """Each archive with the highest sequence to read from it: its newest checkpoint now, so that one
    appended after the trail's head is read next is never taken for a checkpoint of rows gone."""
    bounds = []
    for archive in archives:
        newest = await asyncio.to_thread(archive.last_sequence)
        bounds.append((archive, newest if to_seq is None else min(newest, to_seq)))
    return bounds


async def verify_trail(
    chain: ChainSource,
    *,
    keys: KeyRing,
    sealer: Sealer | None,
    archives: Sequence[CheckpointArchive] = (),
    from_seq: int = 1,
    to_seq: int | None = None,
    full: bool = False,
    parallelism: int = 1,
    checkpoint_page: int = CHECKPOINT_PAGE,
    clock: Callable[[], float] = time.perf_counter,
) -> VerifyReport:
    """Check the chain from ``from_seq`` (trusting the row before it) to ``to_seq`` (default: the end),
    then every signed checkpoint in that range (the database's and the ``archives``'), then the seals where
    no checkpoint vouches for the rows.

    ``full`` hashes every record in this process and compares the indexed columns with the records;
    the default lets the database hash the records while this process chains the digests. The checkpoints
    are read ``checkpoint_page`` at a time from each source, the seals a batch of rows at a time: memory
    does not grow with the trail.
    """
    check_range(from_seq, to_seq)
    started = clock()
    after = from_seq - 1
    # The newest checkpoint of each source first, then the head: every checkpoint up to those was written
    # after its rows, so any that lies beyond the head read next means rows are gone, never that the trail
    # grew between two reads. Only the range's are read (a trail kept for years has millions), those beyond
    # the last row included, which show a cut tail, and a page at a time.
    newest = await chain.newest_checkpoint()
    database_upto = newest if to_seq is None else min(newest, to_seq)
    archive_bounds = await _archive_bounds(archives, to_seq)
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
    await _all_or_none(
        [chain.scan_rows(s) if isinstance(s, RecordScanner) else chain.scan_links(s) for s in scans]
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

    checker = CheckpointChecker(after=after, checked_upto=checked_upto, head_seq=head, keys=keys)
    pages = checkpoint_pages(
        _reads(chain.checkpoints, database_upto, archive_bounds), after=after, page=checkpoint_page
    )
    async for page in pages:
        if not checker.feed(page, await chain.row_hashes(checker.wanted(page))):
            break
    await pages.aclose()
    verdict = checker.finish()
    checkpoint_finding = verdict.finding
    if sealer is not None and verdict.suspect_range is not None:
        lo, hi = verdict.suspect_range
        bad = await first_bad_seal_in(chain.seals(lo, hi), sealer)
        if bad is not None:
            checkpoint_finding = rewritten_at(bad, hi)
    tail_finding = None
    if sealer is not None and verdict.finding is None and checked_upto > verdict.covered_up_to:
        # No checkpoint vouches for these rows yet; only the seals show a chain recomputed here.
        bad = await first_bad_seal_in(chain.seals(verdict.covered_up_to, checked_upto), sealer)
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
    archives: Sequence[CheckpointArchive] = (),
    checkpoint_page: int = CHECKPOINT_PAGE,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> AsyncIterator[bytes]:
    """The NDJSON export: a header line, then each row, each signed checkpoint right after its row. Known
    checkpoints of the range that no row of it came before (rows cut off the end) follow the last row: a
    reader of the export alone sees that rows it covers are gone. Checkpoints are read a page at a time
    (``checkpoint_page`` per source), as the rows are."""
    check_range(from_seq, to_seq)
    # Before the trail's snapshot (its first read): a checkpoint archived later is of rows it does not hold.
    archive_bounds = await _archive_bounds(archives, to_seq)
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
    reads = _reads(trail.checkpoints, to_seq, archive_bounds)
    pages = checkpoint_pages(reads, after=after, page=checkpoint_page)
    try:
        pending: list[AuditCheckpoint] = await anext(pages, [])  # a file that cannot be read fails here
        i = 0
        yield _line(export_header(from_seq=from_seq, to_seq=upto, prev_hash=prev, exported_at=now()))
        async for batch in trail.export_rows(after, upto):
            out = []
            for seq, record, row_hash in batch:
                out.append(_line(export_row(seq, record, row_hash)))
                while pending and pending[i].sequence <= seq:
                    out.append(_line({"checkpoint": pending[i].model_dump(mode="json")}))
                    i += 1
                    if i == len(pending):
                        pending, i = await anext(pages, []), 0
            yield b"".join(out)
        while pending:
            yield b"".join(_line({"checkpoint": c.model_dump(mode="json")}) for c in pending[i:])
            pending, i = await anext(pages, []), 0
    finally:
        await pages.aclose()


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"
