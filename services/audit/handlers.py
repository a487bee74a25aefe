"""The audit service's handlers: every record of its topics goes through one batch handler.

Audit does not react to event types: it keeps whatever arrives, decodable or not, exactly once. One
transaction per poll appends the batch to the chain, so the database commit and the offsets the runner
commits afterwards move together; a redelivered record finds itself at its Kafka position and adds nothing,
and a re-sent copy of an event (an outbox relay's retry: same topic, id and bytes) finds the event held. A
record at a position the trail holds another record at (the topic was deleted and created again, or its log
truncated) is new: it is recorded with its reuse number, counted and logged.

While one poll's transaction is in flight, the next poll's rows are prepared (:func:`prepare_records`):
everything but their sequence numbers, chain hashes and seals, which only the transaction can know once
it holds the chain lock. So nothing made ahead can fork the chain: the head is always the one read under
the lock, and the redelivery and re-sent-copy checks decide in the transaction which prepared rows go in.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial

from prometheus_client import Counter, Gauge

from contracts.audit import AuditCheckpoint
from contracts.envelope import new_event
from libs.bus.core import Delivery, Record
from libs.logging import get_logger
from services.audit.domain import (
    ChainBuilder,
    ChainHead,
    CheckpointTrust,
    HeldAt,
    Incoming,
    KafkaPosition,
    KeyRing,
    PartitionEnds,
    PreparedRows,
    Refusal,
    RefusedHead,
    SealedHead,
    Signer,
    StoredCheckpoint,
    checkpoint_due,
    event_keys,
    new_positions,
    unchained_rows,
    without_resent_copies,
)
from services.audit.ports import AfterCommit, Clock, Publish, TrailReader, TrailWriter
from services.audit.verification import first_bad_seal_in

log = get_logger(__name__)

CHECKPOINTS_REFUSED = Counter(
    "driftloop_audit_checkpoints_refused_total",
    "Checkpoints not signed because a row since the newest checkpoint does not bear this trail's seal: rows "
    "changed in the database with their hashes recomputed, or a signing key rotated without the old key's "
    "final checkpoint. The trail goes on; verification names the row. Any increase wants an operator's "
    "look: docs/audit.md.",
)
CHECKPOINTS_UNTRUSTED = Counter(
    "driftloop_audit_checkpoints_untrusted_total",
    "Checkpoints in the database the audit service does not trust, by the step that met them (sign: the "
    "newest checkpoint, which the writer would build on; archive: one to copy to the checkpoint file): not "
    "signed over their contents by a trusted key, or not matching the trail's row at their sequence. Written "
    "or changed in the database; neither built on nor copied. Any increase wants an operator's look: "
    "docs/audit.md.",
    ["step"],
)
POSITIONS_REUSED = Counter(
    "driftloop_audit_positions_reused_total",
    "Records read at a Kafka position the trail holds another record at (the topic was deleted and created "
    "again, or its log truncated): recorded, each with its reuse number. Any increase wants an operator's "
    "look: docs/operations.md.",
    ["topic"],
)

ROWS_APPENDED = Counter(
    "driftloop_audit_rows_appended_total",
    "Rows appended to the trail, by the topic of their record (an event, an undecodable record or a dead "
    "letter, each once): redeliveries and re-sent copies add none. Counted once the poll's transaction "
    "commits.",
    ["topic"],
)
CHECKPOINTS_SIGNED = Counter(
    "driftloop_audit_checkpoints_signed_total",
    "Checkpoints signed and published, by trigger (rows: checkpoint_every_rows rows appended since the last "
    "one, by the consumer; timer: the checkpoint keeper's timed or final one). Counted once committed.",
    ["trigger"],
)
for _trigger in ("rows", "timer"):  # exported at 0 from the start: a dashboard reads the first rise
    CHECKPOINTS_SIGNED.labels(_trigger)
HEAD_SEQUENCE = Gauge(
    "driftloop_audit_head_sequence",
    "The sequence of the trail's head (its number of rows) as this replica last committed or read it: as it "
    "starts (before it answers ready), by the consumer's appends and by the checkpoint keeper's timed look "
    "under the chain lock (every checkpoint_every_s).",
)


def _appended(topics: collections.Counter[str], head: int) -> None:
    """Count the rows a committed poll appended, and show the head it left."""
    for topic, rows in topics.items():
        ROWS_APPENDED.labels(topic).inc(rows)
    HEAD_SEQUENCE.set(head)


async def show_head(trail: TrailReader) -> None:
    """Show the head the trail holds, as the service starts: the gauge read 0 after a restart until the
    first append or the keeper's first timed look, which on an idle trail is ``checkpoint_every_s`` away."""
    HEAD_SEQUENCE.set((await trail.head()).seq)


async def on_records(
    deliveries: Sequence[Delivery],
    *,
    trail: TrailWriter,
    signer: Signer,
    publish: Publish,
    source: str,
    clock: Clock,
    dead_letter_topic: str,
    checkpoint_every_rows: int,
    after_commit: AfterCommit,
    prepared: PreparedRows | None = None,
    ends: PartitionEnds | None = None,
    sealed: SealedHead | None = None,
    trust: CheckpointTrust | None = None,
) -> int:
    """Append the records the trail does not hold yet, in delivery order; sign a checkpoint when due.

    Rows ``prepared`` for these records are used instead of making them again. ``ends``: what this writer
    knows of the partitions' ends from its previous transactions (the same object each time); ``sealed``:
    the head it left with its rows known sealed, so a checkpoint need not check their seals again (without
    it, every checkpoint does); ``trust``: which checkpoints of the database it builds on, by the keys it
    trusts (without it, the signer's own key only). Returns how many rows were appended; they, the head and
    a checkpoint signed are counted through ``after_commit``.
    """
    incoming = [Incoming(d.record, d.error, d.event is not None) for d in deliveries]
    trust = trust or CheckpointTrust(KeyRing([signer.public_raw]))
    head = await lock_trusted_head(trail, trust)
    positions = [KafkaPosition(d.record.topic, d.record.partition, d.record.offset) for d in deliveries]
    if ends is None:
        ends = PartitionEnds()
    fresh = new_positions(incoming, await _held(trail, ends.at(head), positions), positions)
    if len(fresh) < len(incoming):
        log.info("redelivered records skipped", skipped=len(incoming) - len(fresh))
    if reused := [item.record for item in fresh if item.reuse]:
        _count_reused(reused)
    keys = event_keys(fresh)
    if checked := [k for k in keys if k is not None]:
        firsts = without_resent_copies(fresh, keys, await trail.held_events(checked))
        if len(firsts) < len(fresh):
            log.info("re-sent copies of recorded events skipped", skipped=len(fresh) - len(firsts))
        fresh = firsts
    if prepared and len(fresh) < len(incoming):
        # Only appended records take their prepared rows: a skipped one's would stay held, record and all,
        # until the limit's worth of later rows pushed it out.
        appended = {id(item.record) for item in fresh}
        for item in incoming:
            if id(item.record) not in appended:
                prepared.take(item.record)
    if not fresh:
        return 0
    builder = ChainBuilder(
        head, recorded_at=clock(), sealer=signer.sealer, dead_letter_topic=dead_letter_topic
    )
    known = sealed is not None and sealed.knows(head)
    await trail.append(builder.rows(fresh, prepared))
    ends.left(builder.head, fresh)
    after_commit(
        partial(_appended, collections.Counter(item.record.topic for item in fresh), builder.head.seq)
    )
    if checkpoint_due(builder.head.seq, head.checkpoint_seq, checkpoint_every_rows):
        # The rows of this transaction are sealed: only those under the head it found are in question.
        known = known or await _sealed_since_checkpoint(head, trail=trail, signer=signer, sealed=sealed)
        if known:
            await _sign(
                builder.head,
                trail=trail,
                signer=signer,
                publish=publish,
                source=source,
                clock=clock,
                trust=trust,
                counted=partial(after_commit, CHECKPOINTS_SIGNED.labels("rows").inc),
            )
    if known and sealed is not None:
        sealed.left(builder.head)
    return builder.head.seq - head.seq


FALLBACK_PAGE = 100
"""Checkpoints one read brings back when a writer looks below an untrusted newest one for one it trusts."""


async def lock_trusted_head(trail: TrailWriter, trust: CheckpointTrust) -> ChainHead:
    """Take the chain lock and read the head, with the newest checkpoint ``trust`` lets this writer build on:
    the newest the database holds, or, when that one is untrusted (logged and counted once), the newest
    trusted one below it. Its sequence decides when the next checkpoint is due and from which row on the
    seals are checked before it is signed, so an untrusted one must never stand for it: one forged far
    ahead stopped every checkpoint, one forged at the head let the next vouch for rows rewritten below it."""
    head, newest = await trail.lock_head()
    return await _trusted_head(head, newest, trail=trail, trust=trust)


async def _trusted_head(
    head: ChainHead, newest: StoredCheckpoint | None, *, trail: TrailWriter, trust: CheckpointTrust
) -> ChainHead:
    """``head``, read under the chain lock, with the newest checkpoint ``trust`` lets this writer build on
    (:func:`lock_trusted_head`); ``newest``: the newest the database holds."""
    if newest is None:
        return head
    why = trust.distrust(newest)
    if why is None:
        return replace(head, checkpoint_seq=newest.seq)
    known = trust.fallback(newest)
    if known is not None and (known == 0 or await _still_trusted(known, trail=trail, trust=trust)):
        return replace(head, checkpoint_seq=known)
    trusted_seq, passed = await _newest_trusted(newest.seq, trail=trail, trust=trust)
    trust.fell_back(newest, trusted_seq)
    if known is None:
        CHECKPOINTS_UNTRUSTED.labels("sign").inc()
        log.error(
            "untrusted checkpoint: the newest checkpoint in the database is not signed over its contents "
            "by a trusted key, or does not match the trail's row at its sequence (written or changed in the "
            "database); the writer builds on the newest checkpoint it trusts instead, and checks the seals "
            "of every row since that one before it signs; driftloop audit verify names it (docs/audit.md)",
            checkpoint_seq=newest.seq,
            why=why,
            trusted_checkpoint_seq=trusted_seq,
            untrusted_below=passed,
            head_seq=head.seq,
        )
    return replace(head, checkpoint_seq=trusted_seq)


async def _still_trusted(seq: int, *, trail: TrailWriter, trust: CheckpointTrust) -> bool:
    """Whether the trusted checkpoint at ``seq``, fallen back to before, is still there and trusted."""
    found = await trail.checkpoints_below(seq + 1, limit=1)
    return bool(found) and found[0].seq == seq and trust.distrust(found[0]) is None


async def _newest_trusted(below: int, *, trail: TrailWriter, trust: CheckpointTrust) -> tuple[int, int]:
    """The sequence of the newest trusted checkpoint below ``below`` (0: none), and how many untrusted ones
    were passed over on the way, read a page at a time."""
    passed = 0
    while True:
        page = await trail.checkpoints_below(below, limit=FALLBACK_PAGE)
        for stored in page:
            if trust.distrust(stored) is None:
                return stored.seq, passed
            passed += 1
        if len(page) < FALLBACK_PAGE:
            return 0, passed
        below = page[-1].seq


def trusted_to_archive(stored: Sequence[StoredCheckpoint], trust: CheckpointTrust) -> list[AuditCheckpoint]:
    """The checkpoints of ``stored`` the checkpoint file may take: the trusted ones. Each untrusted one is
    logged and counted once: copied, one forged far ahead would end the file, which takes only checkpoints
    newer than its newest."""
    trusted = []
    for s in stored:
        why = trust.distrust(s)
        if why is None and s.checkpoint is not None:
            trusted.append(s.checkpoint)
        elif trust.refused(s):
            CHECKPOINTS_UNTRUSTED.labels("archive").inc()
            log.error(
                "untrusted checkpoint not copied to the checkpoint file: it is not signed over its contents "
                "by a trusted key, or does not match the trail's row at its sequence (written or changed in "
                "the database); driftloop audit verify names it (docs/audit.md)",
                checkpoint_seq=s.seq,
                why=why,
            )
    return trusted


async def _sealed_since_checkpoint(
    head: ChainHead, *, trail: TrailWriter, signer: Signer, sealed: SealedHead | None = None
) -> bool:
    """Whether every row after the newest checkpoint up to ``head`` bears this trail's seal, so a checkpoint
    may vouch for them; when one does not, the checkpoint is refused (counted) and verification names the
    row: a checkpoint over it would hide it, as the seals are checked only after the newest. A checkpoint
    stays due on every later poll: a row ``sealed`` already knows of is not read again, nor logged again."""
    bad = sealed.unsealed(head.checkpoint_seq) if sealed is not None else None
    if bad is not None:
        CHECKPOINTS_REFUSED.inc()
        return False
    bad = await first_bad_seal_in(trail.seals(head.checkpoint_seq, head.seq), signer.sealer)
    if bad is None:
        return True
    CHECKPOINTS_REFUSED.inc()
    if sealed is not None:
        sealed.found_unsealed(head.checkpoint_seq, bad)
    log.error(
        "checkpoint refused: a row since the newest checkpoint does not bear this trail's seal, so a "
        "checkpoint over it would vouch for rows this key never wrote (rows changed in the database with "
        "their hashes recomputed, or the signing key rotated without a final checkpoint of the old one); the "
        "trail is still recorded, and driftloop audit verify names the row (docs/audit.md)",
        first_unsealed_seq=bad,
        checkpoint_seq=head.checkpoint_seq,
        head_seq=head.seq,
        key_id=signer.key_id,
    )
    return False


async def _held(
    trail: TrailWriter, ends: dict[tuple[str, int], int], positions: Sequence[KafkaPosition]
) -> dict[KafkaPosition, HeldAt]:
    """What the trail holds at these positions: only those at or below their partition's end can be taken,
    so only they are looked up; the ends not known yet are read first (and kept in ``ends``)."""
    if unknown := sorted({(p.topic, p.partition) for p in positions}.difference(ends)):
        ends.update(await trail.partition_ends(unknown))
    maybe = [p for p in positions if p.offset <= ends[(p.topic, p.partition)]]
    return await trail.held_at(maybe) if maybe else {}


def _count_reused(records: Sequence[Record]) -> None:
    """Count and log records at reused positions, one line per partition: the trail keeps them, but the
    reason (a recreated topic, a truncated log) is an operator's to know."""
    by_partition: dict[tuple[str, int], list[int]] = {}
    for r in records:
        by_partition.setdefault((r.topic, r.partition), []).append(r.offset)
        POSITIONS_REUSED.labels(r.topic).inc()
    for (topic, partition), offsets in by_partition.items():
        log.warning(
            "records at Kafka positions the trail holds other records at: recorded as new, with their reuse "
            "number (was the topic deleted and created again, or its log truncated?)",
            topic=topic,
            partition=partition,
            records=len(offsets),
            first_offset=min(offsets),
            last_offset=max(offsets),
        )


PREPARE_STEP = 50
"""Records prepared between two looks at the transaction in flight: its statements wait for this process
at most this long (about half a millisecond)."""


async def prepare_records(
    deliveries: Sequence[Delivery], *, prepared: PreparedRows, clock: Clock, dead_letter_topic: str
) -> None:
    """Make the rows of a poll whose transaction has not begun, all but what depends on the head, and
    keep them in ``prepared`` for :func:`on_records`; lets the transaction in flight go on as it works."""
    incoming = [Incoming(d.record, d.error, d.event is not None) for d in deliveries]
    recorded_at = clock()
    for i in range(0, len(incoming), PREPARE_STEP):
        part = incoming[i : i + PREPARE_STEP]
        rows = unchained_rows(part, recorded_at=recorded_at, dead_letter_topic=dead_letter_topic)
        prepared.add([item.record for item in part], rows)
        await asyncio.sleep(0)


async def seal_head(
    *,
    trail: TrailWriter,
    signer: Signer,
    publish: Publish,
    source: str,
    clock: Clock,
    after_commit: AfterCommit,
    trust: CheckpointTrust | None = None,
    refused: RefusedHead | None = None,
) -> AuditCheckpoint | None:
    """Sign a checkpoint of the head if rows were appended since the last trusted one (timer and shutdown),
    and every one of them bears this trail's seal.

    ``refused``: the keeper's memory of the head its last checkpoint was refused at (the same object each
    tick). At that very head, under the same checkpoints, the checkpoint is refused again without reading
    the seals or trying the sequence, and without a log line: logged once when found, the refusal is
    counted on each tick as before (a row without its seal) and tried afresh once the head or the
    checkpoints move. Without it, every call tries in full. The head read, and a checkpoint signed, are
    shown through ``after_commit``."""
    trust = trust or CheckpointTrust(KeyRing([signer.public_raw]))
    locked, newest = await trail.lock_head()
    after_commit(partial(HEAD_SEQUENCE.set, locked.seq))
    head = await _trusted_head(locked, newest, trail=trail, trust=trust)
    if head.seq == 0 or head.seq <= head.checkpoint_seq:
        return None
    if refused is not None and (why := refused.at(head, newest)) is not None:
        if why is Refusal.UNSEALED:
            CHECKPOINTS_REFUSED.inc()
        return None
    if not await _sealed_since_checkpoint(head, trail=trail, signer=signer):
        if refused is not None:
            refused.refused(head, newest, Refusal.UNSEALED)
        return None
    checkpoint = await _sign(
        head,
        trail=trail,
        signer=signer,
        publish=publish,
        source=source,
        clock=clock,
        trust=trust,
        counted=partial(after_commit, CHECKPOINTS_SIGNED.labels("timer").inc),
    )
    if checkpoint is None and refused is not None:
        refused.refused(head, newest, Refusal.TAKEN)
    return checkpoint


async def _sign(
    head: ChainHead,
    *,
    trail: TrailWriter,
    signer: Signer,
    publish: Publish,
    source: str,
    clock: Clock,
    trust: CheckpointTrust,
    counted: Callable[[], None],
) -> AuditCheckpoint | None:
    """Sign and publish a checkpoint of ``head``; ``counted`` once it is kept (None when its sequence holds
    one this writer did not sign)."""
    checkpoint = signer.checkpoint(head, signed_at=clock())
    event = new_event(checkpoint, source=source)
    if not await trail.add_checkpoint(checkpoint, event.id):
        # The writer signs above the newest checkpoint it trusts: the row at this sequence is one it did not
        # build on. A conflict would fail the transaction, and the consumer would retry it for ever.
        log.error(
            "checkpoint not kept: its sequence holds a checkpoint this writer did not sign (written in the "
            "database); the next checkpoint is signed at a later head (docs/audit.md)",
            sequence=head.seq,
        )
        return None
    trust.signed(checkpoint)
    await publish(event)
    counted()
    log.info("checkpoint signed", sequence=head.seq, head_hash=checkpoint.head_hash, key_id=signer.key_id)
    return checkpoint


BATCH_HANDLER = on_records
"""Audit's whole subscription: one raw batch handler for every record of every recorded topic."""
