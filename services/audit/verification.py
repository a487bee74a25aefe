"""Verification of the trail, free of I/O: chain links, whole rows, signed checkpoints and seals.

A verifier streams the trail in sequence order. The fast path reads fixed-size links
(``uint64_be(seq) ‖ SHA-256(record) ‖ row_hash``) that the database prepares, and chains them here; the
thorough path hashes every record here and checks the indexed copies too. Signed checkpoints then prove
the rows up to them, show a truncated tail, and bound a recomputed chain, which the seals pin down.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from contracts.audit import AuditCheckpoint
from services.audit.domain import (
    DIGEST_BYTES,
    LINK_BYTES,
    SEQ_BYTES,
    KeyRing,
    NotACheckpoint,
    Sealer,
    StoredRow,
    chain_hash,
    column_mismatch,
    utc_text,
)

_SEQ = struct.Struct(">Q")


class Problem(StrEnum):
    """Why a trail fails verification."""

    MISSING_ROW = "missing-row"
    HASH_MISMATCH = "hash-mismatch"
    MALFORMED_ROW = "malformed-row"
    COLUMN_MISMATCH = "column-mismatch"
    TRUNCATED = "truncated"
    REWRITTEN = "rewritten"
    BAD_CHECKPOINT = "bad-checkpoint"


@dataclass(frozen=True)
class Finding:
    """The first sequence number found bad, why, and whether it is exactly the first (or only a bound)."""

    seq: int
    problem: Problem
    detail: str
    exact: bool = True


def first_finding(findings: Iterable[Finding | None]) -> Finding | None:
    """The finding with the lowest sequence number (exact ones first on a tie)."""
    present = [f for f in findings if f is not None]
    return min(present, key=lambda f: (f.seq, not f.exact)) if present else None


class LinkScanner:
    """Checks a stream of chain links of rows ``after+1 .. upto``, in order, as fast as Python allows.

    Each link is ``prefix ‖ uint64_be(seq) ‖ SHA-256(record) ‖ row_hash``; ``prefix`` is whatever fixed
    framing the source puts before each link (a binary COPY tuple header, or nothing). Bytes may arrive
    in chunks cut anywhere. Scanning stops at the first bad link.
    """

    def __init__(self, *, after: int, upto: int, prev: bytes, prefix: bytes = b"") -> None:
        self.after = after
        self.upto = upto
        self.prev = prev
        self.frame(prefix)
        self.rows = 0
        self.finding: Finding | None = None
        self._rest = b""

    @property
    def last_seq(self) -> int:
        """The last sequence number checked good."""
        return self.after + self.rows

    def frame(self, prefix: bytes) -> None:
        """Say what fixed bytes the source puts before each link (set before the first chunk)."""
        self.prefix = prefix
        self.stride = len(prefix) + LINK_BYTES
        self._layout = f"{len(prefix)}s{SEQ_BYTES}s{DIGEST_BYTES}s{DIGEST_BYTES}s"

    def feed(self, chunk: bytes) -> None:
        """Check every whole link in ``chunk`` (plus what was left over from the previous chunk)."""
        if self.finding is not None:
            return
        buf = self._rest + chunk if self._rest else chunk
        sha256, pack_seq = hashlib.sha256, _SEQ.pack
        whole = len(buf) - len(buf) % self.stride
        prev, seq = self.prev, self.after + self.rows
        # struct.iter_unpack cuts the links apart in C: about half again as fast as slicing each one here.
        links = struct.iter_unpack(self._layout, memoryview(buf)[:whole])
        for prefix, seq_bytes, digest, row_hash in links:
            seq += 1
            computed = sha256(prev + seq_bytes + digest).digest()
            # A wrong prefix (a NULL column) misaligns the link, so the hash check catches it too.
            if computed != row_hash or seq_bytes != pack_seq(seq):
                self.finding = self._diagnose(prefix + seq_bytes + digest + row_hash, seq)
                seq -= 1
                break
            prev = computed
        self.rows = seq - self.after
        self.prev = prev
        self._rest = b"" if self.finding is not None else buf[whole:]

    def finish(self, trailer: bytes = b"") -> Finding | None:
        """Call after the last chunk: the leftover must be ``trailer`` and every row must have come."""
        if self.finding is None and self._rest != trailer:
            self.finding = Finding(
                self.last_seq + 1, Problem.MALFORMED_ROW, f"row {self.last_seq + 1} could not be read"
            )
        if self.finding is None and self.last_seq < self.upto:
            self.finding = Finding(
                self.last_seq + 1,
                Problem.MISSING_ROW,
                f"row {self.last_seq + 1} is missing: the trail stops at {self.last_seq} in a range "
                f"that should reach {self.upto}",
            )
        return self.finding

    def _diagnose(self, link: bytes, expected: int) -> Finding:
        plen = len(self.prefix)
        if plen and link[:plen] != self.prefix:
            return Finding(expected, Problem.MALFORMED_ROW, f"row {expected} has no record or no row hash")
        found = int.from_bytes(link[plen : plen + SEQ_BYTES], "big")
        if found > expected:
            return Finding(
                expected, Problem.MISSING_ROW, f"row {expected} is missing: the next row is {found}"
            )
        if found != expected:
            return Finding(expected, Problem.MALFORMED_ROW, f"row {found} appears where {expected} should be")
        return Finding(
            expected,
            Problem.HASH_MISMATCH,
            f"row {expected}: its hash is not SHA-256(previous hash ‖ seq ‖ SHA-256(record)); the row's "
            "record or hash was changed, or it stands where another row was",
        )


class RecordScanner:
    """The thorough check: hashes each record here (not in the database) and compares every indexed
    column with the record it was copied from."""

    def __init__(self, *, after: int, upto: int, prev: bytes) -> None:
        self.after = after
        self.upto = upto
        self.prev = prev
        self.rows = 0
        self.finding: Finding | None = None

    @property
    def last_seq(self) -> int:
        """The last sequence number checked good."""
        return self.after + self.rows

    def feed(self, rows: Iterable[StoredRow]) -> None:
        """Check rows in sequence order; stops at the first bad one."""
        for row in rows:
            if self.finding is not None:
                return
            expected = self.last_seq + 1
            if row.seq != expected:
                self.finding = Finding(
                    expected, Problem.MISSING_ROW, f"row {expected} is missing: the next row is {row.seq}"
                )
                return
            if row.record is None or row.row_hash is None:
                self.finding = Finding(
                    expected, Problem.MALFORMED_ROW, f"row {expected} has no record or no row hash"
                )
                return
            computed = chain_hash(self.prev, row.seq, row.record)
            if computed != row.row_hash:
                self.finding = Finding(
                    expected,
                    Problem.HASH_MISMATCH,
                    f"row {expected}: its hash is not SHA-256(previous hash ‖ seq ‖ SHA-256(record)); the "
                    "row's record or hash was changed, or it stands where another row was",
                )
                return
            column = column_mismatch(row)
            if column is not None:
                self.finding = Finding(
                    expected,
                    Problem.COLUMN_MISMATCH,
                    f"row {expected}: column {column} does not match the row's hashed record",
                )
                return
            self.prev = computed
            self.rows += 1

    def finish(self) -> Finding | None:
        """Call after the last row: every row of the range must have come."""
        if self.finding is None and self.last_seq < self.upto:
            self.finding = Finding(
                self.last_seq + 1,
                Problem.MISSING_ROW,
                f"row {self.last_seq + 1} is missing: the trail stops at {self.last_seq}",
            )
        return self.finding


@dataclass(frozen=True)
class CheckpointVerdict:
    """What the checkpoints say about a chain whose links were checked up to ``head_seq``."""

    checked: int
    finding: Finding | None
    covered_up_to: int
    """Highest sequence a good checkpoint vouches for (0: none)."""
    suspect_range: tuple[int, int] | None = None
    """(after, upto]: where a rewrite must be, when a checkpoint's head does not match."""


class CheckpointChecker:
    """Compares signed checkpoints after ``after``, fed in sequence order a page at a time, with the trail:
    signature, then the row hash at its sequence (the links up to ``checked_upto`` were found consistent).

    A checkpoint beyond the trail's head means rows were cut off the end; one whose head hash differs
    means the chain was recomputed after the last checkpoint that still matches. Holds no checkpoint
    between pages: only counts, and the first and the last trusted one beyond the head.
    """

    def __init__(self, *, after: int, checked_upto: int, head_seq: int, keys: KeyRing) -> None:
        self.after = after
        self.checked_upto = checked_upto
        self.head_seq = head_seq
        self.keys = keys
        self.checked = 0
        self.covered = after
        self.finding: Finding | None = None
        self.suspect: tuple[int, int] | None = None
        self._first_beyond: AuditCheckpoint | NotACheckpoint | None = None
        self._last_signed_beyond: AuditCheckpoint | None = None

    def wanted(self, page: Iterable[AuditCheckpoint | NotACheckpoint]) -> list[int]:
        """The sequences of ``page`` whose row hash :meth:`feed` needs."""
        return sorted({c.sequence for c in page if self.after < c.sequence <= self.checked_upto})

    def feed(
        self, page: Iterable[AuditCheckpoint | NotACheckpoint], stored_hash: Mapping[int, bytes]
    ) -> bool:
        """Check the next checkpoints (sequence order, each after the previous page's), ``stored_hash``
        holding the row hashes at :meth:`wanted`'s sequences; False once there is a finding (read no more)."""
        for cp in page:
            if self.finding is not None:
                break
            if cp.sequence <= self.after or self.checked_upto < cp.sequence <= self.head_seq:
                continue  # outside the range, or past a broken link where nothing can be vouched for
            if cp.sequence > self.head_seq:
                self.checked += 1
                if self._first_beyond is None:
                    self._first_beyond = cp
                if isinstance(cp, AuditCheckpoint) and self.keys.check(cp) is None:
                    self._last_signed_beyond = cp
                continue
            self.checked += 1
            bad_signature = self.keys.check(cp)
            if bad_signature is not None or isinstance(cp, NotACheckpoint):
                self.finding = Finding(
                    cp.sequence, Problem.BAD_CHECKPOINT, f"the checkpoint at {cp.sequence}: {bad_signature}"
                )
                break
            actual = stored_hash.get(cp.sequence)
            if actual is None or actual.hex() != cp.head_hash:
                self.suspect = (self.covered, cp.sequence)
                self.finding = Finding(
                    self.covered + 1,
                    Problem.REWRITTEN,
                    f"the chain was recomputed: row {cp.sequence}'s hash differs from the checkpoint signed "
                    f"at {utc_text(cp.signed_at)}; the change lies in rows {self.covered + 1}..{cp.sequence}",
                    exact=False,
                )
                break
            self.covered = cp.sequence
        return self.finding is None

    def finish(self) -> CheckpointVerdict:
        """What the checkpoints fed say."""
        if self.finding is None and self._first_beyond is not None:
            self.finding = _cut_tail(
                self._first_beyond, self._last_signed_beyond, head_seq=self.head_seq, keys=self.keys
            )
        return CheckpointVerdict(self.checked, self.finding, self.covered, self.suspect)


def _cut_tail(
    first: AuditCheckpoint | NotACheckpoint,
    last_signed: AuditCheckpoint | None,
    *,
    head_seq: int,
    keys: KeyRing,
) -> Finding:
    """What checkpoints beyond the trail's end say: the rows up to the highest one a trusted key signed
    (``last_signed``) are gone (the full extent known, not only up to the first), or, when none is, the
    first is a bad checkpoint (one signed by a key not trusted is no proof of anything)."""
    if last_signed is None:
        return Finding(
            first.sequence, Problem.BAD_CHECKPOINT, f"the checkpoint at {first.sequence}: {keys.check(first)}"
        )
    return Finding(
        head_seq + 1,
        Problem.TRUNCATED,
        f"rows {head_seq + 1}..{last_signed.sequence} are gone: the trail ends at {head_seq}, but a "
        f"checkpoint signed at {utc_text(last_signed.signed_at)} covers rows up to {last_signed.sequence}",
    )


def first_bad_seal(rows: Iterable[tuple[int, bytes, bytes]], sealer: Sealer) -> int | None:
    """The first (seq, row_hash, seal) whose seal was not made with this trail's key for that hash; a row
    whose hash was nulled in the database has none."""
    for seq, row_hash, seal in rows:
        if row_hash is None or sealer.seal(row_hash) != seal:
            return seq
    return None


async def first_bad_seal_in(
    batches: AsyncGenerator[list[tuple[int, bytes, bytes]], None], sealer: Sealer
) -> int | None:
    """:func:`first_bad_seal` of rows read a batch at a time; a batch left unread is closed at once (it
    frees its connection)."""
    try:
        async for batch in batches:
            bad = first_bad_seal(batch, sealer)
            if bad is not None:
                return bad
        return None
    finally:
        await batches.aclose()


def rewritten_at(seq: int, checkpoint_seq: int | None) -> Finding:
    """The exact first row of a recomputed chain, named by its seal."""
    where = f"before the checkpoint at {checkpoint_seq}" if checkpoint_seq else "after the last checkpoint"
    return Finding(
        seq,
        Problem.REWRITTEN,
        f"row {seq} and the rows after it were re-hashed without the signing key ({where}): row {seq}'s "
        "seal does not match its hash",
    )


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of one verification."""

    ok: bool
    mode: str
    from_seq: int
    to_seq: int
    rows_checked: int
    checkpoints_checked: int
    covered_by_checkpoint: int
    head_hash: str | None
    first_bad_seq: int | None
    problem: str | None
    detail: str | None
    exact: bool
    seals_checked: bool
    elapsed_s: float

    @property
    def rows_per_s(self) -> float:
        """Verification speed."""
        return self.rows_checked / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        """The report as the API and the CLI print it."""
        return {
            "ok": self.ok,
            "mode": self.mode,
            "from_seq": self.from_seq,
            "to_seq": self.to_seq,
            "rows_checked": self.rows_checked,
            "checkpoints_checked": self.checkpoints_checked,
            "covered_by_checkpoint": self.covered_by_checkpoint,
            "head_hash": self.head_hash,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
            "detail": self.detail,
            "exact": self.exact,
            "seals_checked": self.seals_checked,
            "elapsed_s": round(self.elapsed_s, 4),
            "rows_per_s": round(self.rows_per_s),
        }


def split_ranges(after: int, upto: int, parts: int, *, min_rows: int = 50_000) -> list[tuple[int, int]]:
    """(after, upto] cut into at most ``parts`` ranges of at least ``min_rows`` rows each."""
    total = upto - after
    parts = max(1, min(parts, total // max(min_rows, 1)))
    bounds = [after + total * k // parts for k in range(parts + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(parts)]
