"""An in-memory trail implementing the audit ports, with the tampering a superuser could do in SQL, and
builders of the records the audit service consumes."""

from __future__ import annotations

import hashlib
import random
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from contracts.audit import AuditCheckpoint
from contracts.envelope import CloudEvent, EventPayload, new_event
from contracts.examples import EXAMPLES
from contracts.monitoring import DriftDetected
from contracts.topics import DEAD_LETTER
from libs.bus.core import Delivery, Record
from services.audit import handlers
from services.audit.domain import (
    SEQ_MAX,
    ChainHead,
    CheckpointTrust,
    EventQuery,
    HeldAt,
    HeldEvent,
    KafkaPosition,
    Kind,
    PartitionEnds,
    PreparedRows,
    SealedHead,
    Signer,
    StoredCheckpoint,
    StoredRow,
    TrailRow,
    chain_hash,
    decode_record,
    held_event,
    kafka_content,
)
from services.audit.verification import Finding, LinkScanner, RecordScanner

SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))
TRACE_BYTES = 64 * 1024 * 1024
"""A trace's byte budget no test cascade reaches but one made to."""
PAGE_BYTES = 64 * 1024 * 1024
"""A query page's byte budget no test page reaches but one made to."""


@dataclass
class Stored:
    """One row as the fake database holds it (what SQL could change)."""

    row: StoredRow
    seal: bytes


@dataclass
class Materialised:
    """How many of the checkpoints readers were handed are alive at once: each is handed as a copy of its
    own, counted until the reader lets go of it."""

    live: int = 0
    peak: int = 0

    def hand(self, checkpoints: Iterable[AuditCheckpoint]) -> list[AuditCheckpoint]:
        copies = [c.model_copy() for c in checkpoints]
        for c in copies:
            self.live += 1
            weakref.finalize(c, self._freed)
        self.peak = max(self.peak, self.live)
        return copies

    def _freed(self) -> None:
        self.live -= 1


def first_page(ordered: Sequence[AuditCheckpoint], page: int | None) -> list[AuditCheckpoint]:
    """The first ``page`` of checkpoints in sequence order, with every other one of the last's sequence."""
    if page is None or len(ordered) <= page:
        return list(ordered)
    end = page
    while end < len(ordered) and ordered[end].sequence == ordered[page - 1].sequence:
        end += 1
    return list(ordered[:end])


@dataclass
class FakeArchive:
    """A checkpoint archive (CheckpointArchive) in a list, in the list's order."""

    checkpoints: list[AuditCheckpoint]
    materialised: Materialised = field(default_factory=Materialised)

    def read(
        self, *, after: int = 0, upto: int | None = None, page: int | None = None
    ) -> list[AuditCheckpoint]:
        in_range = [
            c for c in self.checkpoints if after < c.sequence and (upto is None or c.sequence <= upto)
        ]
        return self.materialised.hand(first_page(sorted(in_range, key=lambda c: c.sequence), page))

    def last_sequence(self) -> int:
        return max((c.sequence for c in self.checkpoints), default=0)

    def append(self, checkpoints: Sequence[AuditCheckpoint]) -> int:
        last = self.last_sequence()
        newer = [c for c in checkpoints if c.sequence > last]
        self.checkpoints += newer
        return len(newer)


def budgeted(rows: list[StoredRow], *, limit: int, budget: int) -> tuple[list[StoredRow], bool]:
    """What the trail's bounded queries take of ``rows`` (in the query's order): at most ``limit``, while
    the records before a row hold less than ``budget`` bytes, and whether rows after those were left out
    for the budget."""
    taken: list[StoredRow] = []
    held = 0
    for row in rows[:limit]:
        if held >= budget:
            break
        taken.append(row)
        held += len(row.record or b"")
    return taken, len(rows) > len(taken) and held >= budget


@dataclass
class FakeTrail:
    """TrailWriter, TrailReader and ChainSource over a dict; scans cut their bytes at random places."""

    rows: dict[int, Stored] = field(default_factory=dict)
    checkpoint_rows: list[tuple[AuditCheckpoint, str]] = field(default_factory=list)
    chunk_seed: int = 7
    locks: int = 0
    end_lookups: int = 0
    exact_lookups: int = 0
    checkpoints_read: list[int] = field(default_factory=list)
    """The sequence of every checkpoint a reader was handed, as a database would send them."""
    materialised: Materialised = field(default_factory=Materialised)
    seal_batch: int = 7
    seal_reads: list[tuple[int, int]] = field(default_factory=list)
    """The (after, upto) of every read of seals, by a verification or a writer about to sign."""
    after_head: Callable[[], Awaitable[None]] | None = None
    """Run once, right after the head is next read: the writer going on meanwhile."""

    # -- TrailWriter ---------------------------------------------------------------------------------

    async def lock_head(self) -> tuple[ChainHead, StoredCheckpoint | None]:
        self.locks += 1
        head = self._head()
        newest = await self.checkpoints_below(SEQ_MAX, limit=1)
        return replace(head, checkpoint_seq=0), newest[0] if newest else None

    async def checkpoints_below(self, seq: int, *, limit: int) -> list[StoredCheckpoint]:
        below = sorted((c for c, _ in self.checkpoint_rows if c.sequence < seq), key=lambda c: -c.sequence)
        return [
            StoredCheckpoint(
                c.sequence, c, self.rows[c.sequence].row.row_hash if c.sequence in self.rows else None
            )
            for c in below[:limit]
        ]

    def _head(self) -> ChainHead:
        checkpoint_seq = max((c.sequence for c, _ in self.checkpoint_rows), default=0)
        if not self.rows:
            return ChainHead(checkpoint_seq=checkpoint_seq)
        last = self.rows[max(self.rows)].row
        return ChainHead(last.seq, last.row_hash, checkpoint_seq)

    async def partition_ends(self, partitions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        self.end_lookups += 1
        ends = dict.fromkeys(partitions, -1)
        for s in self.rows.values():
            key = (s.row.topic, s.row.partition)
            if key in ends:
                ends[key] = max(ends[key], s.row.offset)
        return ends

    async def held_at(self, positions: Sequence[KafkaPosition]) -> dict[KafkaPosition, HeldAt]:
        self.exact_lookups += 1
        wanted = set(positions)
        held: dict[KafkaPosition, HeldAt] = {}
        for s in self.rows.values():
            position = KafkaPosition(s.row.topic, s.row.partition, s.row.offset)
            if position in wanted:
                meta, value = decode_record(s.row.record)
                content = kafka_content(meta, hashlib.sha256(value or b"").digest())
                held.setdefault(position, []).append((s.row.reuse, content))
        return held

    async def held_events(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[HeldEvent]]:
        wanted = set(keys)
        held: dict[tuple[str, str], list[HeldEvent]] = {}
        for s in self.rows.values():
            key = (s.row.topic, s.row.attributes.event_id)
            if key in wanted:
                meta, _ = decode_record(s.row.record)
                value_digest = hashlib.sha256(s.row.record.partition(b"\n")[2]).digest()
                held.setdefault(key, []).append(held_event(meta, value_digest))
        return held

    async def append(self, rows: Iterable[TrailRow]) -> None:
        for r in rows:
            assert r.seq not in self.rows, "a fork: two rows with one sequence number"
            self.rows[r.seq] = Stored(
                StoredRow(
                    seq=r.seq,
                    record=r.record,
                    row_hash=r.row_hash,
                    topic=r.position.topic,
                    partition=r.position.partition,
                    offset=r.position.offset,
                    kind=r.kind,
                    attributes=r.attributes,
                    recorded_at=r.recorded_at,
                    reuse=r.reuse,
                ),
                r.seal,
            )

    async def add_checkpoint(self, checkpoint: AuditCheckpoint, event_id: str) -> bool:
        if any(c.sequence == checkpoint.sequence for c, _ in self.checkpoint_rows):
            return False  # the primary key's ON CONFLICT DO NOTHING
        self.checkpoint_rows.append((checkpoint, event_id))
        return True

    # -- TrailReader ---------------------------------------------------------------------------------

    async def head(self) -> ChainHead:
        return self._head()

    async def find(self, query: EventQuery, *, budget: int) -> tuple[list[StoredRow], bool]:
        def matches(r: StoredRow) -> bool:
            a = r.attributes
            return (
                (query.model is None or a.subject == query.model)
                and (query.event_type is None or a.event_type == query.event_type)
                and (query.actor is None or a.actor == query.actor)
                and (query.correlation_id is None or a.correlation_id == query.correlation_id)
                and (query.kind is None or r.kind == query.kind.value)
                and (query.since is None or (a.event_time is not None and a.event_time >= query.since))
                and (query.until is None or (a.event_time is not None and a.event_time < query.until))
                and (query.after is None or r.seq > query.after)
                and (query.before is None or r.seq < query.before)
            )

        found = sorted((s.row for s in self.rows.values() if matches(s.row)), key=lambda r: r.seq)
        if query.newest_first:
            found.reverse()
        return budgeted(found, limit=query.limit, budget=budget)

    async def row(self, seq: int) -> StoredRow | None:
        stored = self.rows.get(seq)
        return stored.row if stored else None

    async def cascade(self, correlation_id: str, *, limit: int, budget: int) -> tuple[list[StoredRow], bool]:
        rows = [s.row for s in self.rows.values() if s.row.attributes.correlation_id == correlation_id]
        return budgeted(sorted(rows, key=lambda r: r.seq), limit=limit, budget=budget)

    async def checkpoints(
        self, *, limit: int | None = None, after: int = 0, upto: int | None = None, page: int | None = None
    ) -> list[AuditCheckpoint]:
        ordered = sorted(
            (
                c
                for c, _ in self.checkpoint_rows
                if after < c.sequence and (upto is None or c.sequence <= upto)
            ),
            key=lambda c: c.sequence,
        )
        handed = first_page(ordered, page) if limit is None else list(reversed(ordered))[:limit]
        self.checkpoints_read += [c.sequence for c in handed]
        return self.materialised.hand(handed)

    async def export_rows(self, after: int, upto: int) -> AsyncIterator[list[tuple[int, bytes, bytes]]]:
        rows = [self.rows[s].row for s in sorted(self.rows) if after < s <= upto]
        for i in range(0, len(rows), 3):
            yield [(r.seq, r.record, r.row_hash) for r in rows[i : i + 3]]

    # -- ChainSource ---------------------------------------------------------------------------------

    async def head_seq(self) -> int:
        head = max(self.rows, default=0)
        if self.after_head is not None:
            writer, self.after_head = self.after_head, None
            await writer()
        return head

    async def row_hashes(self, seqs: Sequence[int]) -> dict[int, bytes]:
        return {s: self.rows[s].row.row_hash for s in seqs if s in self.rows}

    async def scan_links(self, scanner: LinkScanner) -> Finding | None:
        links = b"".join(
            scanner.prefix
            + s.to_bytes(8, "big")
            + hashlib.sha256(self.rows[s].row.record).digest()
            + self.rows[s].row.row_hash
            for s in sorted(self.rows)
            if scanner.after < s <= scanner.upto
        )
        cut = random.Random(self.chunk_seed)
        pos = 0
        while pos < len(links):
            size = cut.randint(1, 200)
            scanner.feed(links[pos : pos + size])
            pos += size
        return scanner.finish()

    async def scan_rows(self, scanner: RecordScanner) -> Finding | None:
        rows = [self.rows[s].row for s in sorted(self.rows) if scanner.after < s <= scanner.upto]
        for i in range(0, len(rows), 4):
            scanner.feed(rows[i : i + 4])
        return scanner.finish()

    async def seals(self, after: int, upto: int) -> AsyncGenerator[list[tuple[int, bytes, bytes]], None]:
        self.seal_reads.append((after, upto))
        seqs = [s for s in sorted(self.rows) if after < s <= upto]
        for i in range(0, len(seqs), self.seal_batch):
            yield [(s, self.rows[s].row.row_hash, self.rows[s].seal) for s in seqs[i : i + self.seal_batch]]

    async def newest_checkpoint(self) -> int:
        return max((c.sequence for c, _ in self.checkpoint_rows), default=0)

    # -- what a superuser can do in SQL -------------------------------------------------------------

    def update_record(self, seq: int, record: bytes) -> None:
        self.rows[seq].row = replace(self.rows[seq].row, record=record)

    def null_row_hash(self, seq: int) -> None:
        """What `UPDATE trail SET row_hash = NULL` does once the NOT NULL constraint is dropped."""
        self.rows[seq].row = replace(self.rows[seq].row, row_hash=cast(bytes, None))

    def delete(self, *seqs: int) -> None:
        for s in seqs:
            del self.rows[s]

    def swap(self, a: int, b: int) -> None:
        """Exchange everything but the sequence numbers (hashes included)."""
        ra, rb = self.rows[a], self.rows[b]
        self.rows[a] = Stored(replace(rb.row, seq=a), rb.seal)
        self.rows[b] = Stored(replace(ra.row, seq=b), ra.seal)

    def recompute_from(self, seq: int) -> None:
        """Re-hash rows seq.. so the chain is consistent again (the seals cannot be redone)."""
        prev = self.rows[seq - 1].row.row_hash if seq > 1 else bytes(32)
        for s in sorted(x for x in self.rows if x >= seq):
            stored = self.rows[s]
            prev = chain_hash(prev, s, stored.row.record)
            stored.row = replace(stored.row, row_hash=prev)

    def insert_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        """What `INSERT INTO checkpoints` does: any row, signed or not, at a sequence no row holds."""
        assert all(c.sequence != checkpoint.sequence for c, _ in self.checkpoint_rows)
        self.checkpoint_rows.append((checkpoint, "inserted-in-the-database"))

    def delete_checkpoint(self, seq: int) -> None:
        self.checkpoint_rows = [(c, e) for c, e in self.checkpoint_rows if c.sequence != seq]

    def drop_checkpoints_after(self, seq: int) -> None:
        self.checkpoint_rows = [(c, e) for c, e in self.checkpoint_rows if c.sequence <= seq]


class Clock:
    """A clock that moves one millisecond per reading."""

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


def record_of(
    event: CloudEvent[Any], *, topic: str | None = None, partition: int = 0, offset: int = 0
) -> Record:
    """The Kafka record of an event, as the consumer would see it."""
    key, value, headers = event.to_kafka()
    return Record(topic or event.topic, partition, offset, key, value, tuple(headers), 1_740_830_400_000)


def delivery(event: CloudEvent[Any], **where: Any) -> Delivery:
    """A decoded delivery of an event."""
    return Delivery(record_of(event, **where), event)


def dead_letters_of(event: CloudEvent[Any], *, count: int, size: int) -> list[Delivery]:
    """``count`` dead letters of ``event`` at offsets 0.., each with a value of about ``size`` bytes: what a
    producer publishing large records under one correlation id leaves."""
    key, _, headers = event.to_kafka()
    return [
        Delivery(
            # Each its own value: the same event id with the same value again is a re-sent copy, skipped.
            Record(
                DEAD_LETTER, 0, i, key, b"%08d" % i + b"x" * size, (*headers, ("dlq_reason", b"too-large"))
            ),
            None,
        )
        for i in range(count)
    ]


def small_and_large(sizes: Sequence[int]) -> list[Delivery]:
    """A delivery per size, at offset i: a small event for 0, else a dead letter of about that many bytes;
    rows of one correlation id, as a page of the trail can hold when dead letters carry large records."""
    drift = example(DriftDetected)
    key, _, headers = drift.to_kafka()
    deliveries = []
    for i, size in enumerate(sizes):
        if size == 0:
            event = example(DriftDetected).model_copy(update={"correlationid": drift.id})
            deliveries.append(delivery(event, offset=i))
        else:
            dead = Record(
                DEAD_LETTER, 0, i, key, b"%08d" % i + b"x" * size, (*headers, ("dlq_reason", b"big"))
            )
            deliveries.append(Delivery(dead, None))
    return deliveries


def example(
    cls: type[EventPayload], *, cause: CloudEvent[Any] | None = None, actor: str | None = None
) -> Any:
    """An event with the contracts' example payload of ``cls``."""
    return new_event(EXAMPLES[cls], source="/driftloop/test", cause=cause, actor=actor)


def changed_payload(record: bytes) -> bytes:
    """The record with its payload's model name changed, meta untouched (what a forger would edit)."""
    meta, _, value = record.partition(b"\n")
    assert b'"churn"' in value
    return meta + b"\n" + value.replace(b'"churn"', b'"chum"', 1)


def kind_of(trail: FakeTrail, seq: int) -> Kind:
    """The kind of a stored row."""
    return Kind(trail.rows[seq].row.kind)


async def record(
    trail: FakeTrail,
    signer: Signer,
    deliveries: Sequence[Delivery],
    *,
    every: int = 1000,
    prepared: PreparedRows | None = None,
    ends: PartitionEnds | None = None,
    sealed: SealedHead | None = None,
    trust: CheckpointTrust | None = None,
) -> tuple[int, list[CloudEvent[Any]]]:
    """Record a poll through the audit handler, committed; the count of new rows and the checkpoints
    published."""
    published: list[CloudEvent[Any]] = []
    committed: list[Callable[[], None]] = []

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    n = await handlers.on_records(
        deliveries,
        trail=trail,
        signer=signer,
        publish=publish,
        source="/driftloop/audit",
        clock=Clock(),
        dead_letter_topic=DEAD_LETTER,
        checkpoint_every_rows=every,
        after_commit=committed.append,
        prepared=prepared,
        ends=ends,
        sealed=sealed,
        trust=trust,
    )
    for callback in committed:
        callback()
    return n, published
