"""Rows prepared ahead of their transaction: the same rows, chained on the head read under the lock."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from contracts.envelope import NotJson
from contracts.monitoring import DriftDetected
from contracts.predictions import PredictionsLogged
from contracts.topics import DEAD_LETTER
from contracts.training import TrainingRequested
from libs.bus import Delivery
from libs.bus.core import Record
from services.audit import handlers
from services.audit.core import verify_trail
from services.audit.domain import (
    ChainBuilder,
    ChainHead,
    Incoming,
    KeyRing,
    PreparedRows,
    Sealer,
    Signer,
    chain_rows,
    unchained_rows,
)
from tests.unit.audit.fakes import SEED, Clock, FakeTrail, delivery, example, record, record_of

AT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def mixed_incoming() -> list[Incoming]:
    drift = example(DriftDetected)
    records = [
        record_of(drift, offset=0),
        record_of(example(PredictionsLogged), offset=1),
        Record("mlops.models", 0, 2, None, b"\x00 not json", (("ce_id", b"\xc3\x28"),)),
        Record(DEAD_LETTER, 0, 3, None, b"{}", (("dlq_reason", b"rejected"),)),
    ]
    return [
        Incoming(records[0]),
        Incoming(records[1]),
        Incoming(records[2], NotJson("value is not JSON"), decoded=False),
        Incoming(records[3]),
    ]


def test_prepared_rows_are_the_rows_made_in_the_transaction() -> None:
    incoming = mixed_incoming()
    head = ChainHead(7, hashlib.sha256(b"row 7").digest())
    sealer = Sealer(SEED)
    prepared = PreparedRows()
    prepared.add(
        [i.record for i in incoming],
        unchained_rows(incoming, recorded_at=AT, dead_letter_topic=DEAD_LETTER),
    )
    builder = ChainBuilder(head, recorded_at=datetime.now(UTC), sealer=sealer, dead_letter_topic=DEAD_LETTER)
    rows = list(builder.rows(incoming, prepared))
    assert rows == chain_rows(head, incoming, recorded_at=AT, sealer=sealer, dead_letter_topic=DEAD_LETTER)
    assert builder.head.seq == 11 and builder.head.row_hash == rows[-1].row_hash
    assert len(prepared) == 0  # each prepared row is taken once


def test_a_prepared_row_serves_only_the_record_it_was_made_from() -> None:
    original = record_of(example(DriftDetected), offset=5)
    other = record_of(example(DriftDetected), offset=5)  # the same position, another record
    prepared = PreparedRows()
    prepared.add([original], unchained_rows([Incoming(original)], recorded_at=AT, dead_letter_topic=""))
    assert prepared.take(other) is None
    prepared.add([original], unchained_rows([Incoming(original)], recorded_at=AT, dead_letter_topic=""))
    row = prepared.take(original)
    assert row is not None and row.offset == 5
    assert prepared.take(original) is None


def test_prepared_rows_beyond_the_limit_forget_the_oldest() -> None:
    records = [record_of(example(DriftDetected), offset=i) for i in range(5)]
    prepared = PreparedRows(limit=3)
    prepared.add(
        records, unchained_rows([Incoming(r) for r in records], recorded_at=AT, dead_letter_topic="")
    )
    assert len(prepared) == 3
    assert prepared.take(records[1]) is None
    assert prepared.take(records[4]) is not None


async def prepare(deliveries: list[Delivery], prepared: PreparedRows) -> None:
    await handlers.prepare_records(
        deliveries, prepared=prepared, clock=Clock(), dead_letter_topic=DEAD_LETTER
    )


async def verified(trail: FakeTrail) -> None:
    report = await verify_trail(trail, keys=KeyRing([Signer(SEED).public_raw]), sealer=Signer(SEED).sealer)
    assert report.ok, report


async def test_rows_prepared_before_another_writer_moved_the_head_follow_the_new_head() -> None:
    trail = FakeTrail()
    prepared = PreparedRows()
    poll = [delivery(example(DriftDetected), offset=i) for i in range(3)]
    await prepare(poll, prepared)
    # Between the preparation and this poll's transaction, another writer (a replica, or a poll whose
    # transaction was retried) appends rows: the prepared rows must not fork the chain.
    await record(
        trail,
        Signer(SEED),
        [delivery(example(TrainingRequested), topic="mlops.training", offset=i) for i in range(2)],
        every=4,
    )
    n, _ = await record(trail, Signer(SEED), poll, every=4, prepared=prepared)
    assert n == 3 and sorted(trail.rows) == [1, 2, 3, 4, 5]
    assert [trail.rows[s].row.offset for s in (3, 4, 5)] == [0, 1, 2]
    assert len(prepared) == 0
    await verified(trail)


async def test_a_prepared_poll_read_again_adds_nothing() -> None:
    trail = FakeTrail()
    prepared = PreparedRows()
    poll = [delivery(example(DriftDetected), offset=i) for i in range(3)]
    await prepare(poll, prepared)
    assert (await record(trail, Signer(SEED), poll, every=4, prepared=prepared))[0] == 3
    await prepare(poll, prepared)  # the runner read the poll again after its offsets went uncommitted
    assert (await record(trail, Signer(SEED), poll, every=4, prepared=prepared))[0] == 0
    resent = [delivery(e, offset=10 + i) for i, e in enumerate(d.event for d in poll if d.event)]
    await prepare(resent, prepared)  # an outbox relay's re-sent copies at new positions
    assert (await record(trail, Signer(SEED), resent, every=4, prepared=prepared))[0] == 0
    assert sorted(trail.rows) == [1, 2, 3]
    await verified(trail)


async def test_rows_prepared_for_records_the_trail_holds_already_are_let_go() -> None:
    # A redelivered record or a re-sent copy is skipped, so its prepared row is never taken: it stayed held,
    # record and all, until 20,000 later rows pushed it out.
    trail = FakeTrail()
    prepared = PreparedRows()
    poll = [delivery(example(DriftDetected), offset=i) for i in range(3)]
    await prepare(poll, prepared)
    await record(trail, Signer(SEED), poll, every=4, prepared=prepared)
    await prepare(poll, prepared)  # read again: every record held already
    assert (await record(trail, Signer(SEED), poll, every=4, prepared=prepared))[0] == 0
    assert len(prepared) == 0
    resent = [delivery(e, offset=10 + i) for i, e in enumerate(d.event for d in poll if d.event)]
    new = delivery(example(DriftDetected), offset=13)
    await prepare([*resent, new], prepared)  # copies at new positions, and one new event
    assert (await record(trail, Signer(SEED), [*resent, new], every=4, prepared=prepared))[0] == 1
    assert len(prepared) == 0
    await verified(trail)


async def test_a_poll_prepared_in_part_is_made_whole_in_the_transaction() -> None:
    trail = FakeTrail()
    prepared = PreparedRows()
    poll = [delivery(example(DriftDetected), offset=i) for i in range(6)]
    await prepare(poll[1:4], prepared)
    n, published = await record(trail, Signer(SEED), poll, every=4, prepared=prepared)
    assert n == 6 and sorted(trail.rows) == list(range(1, 7))
    assert [trail.rows[s].row.offset for s in range(1, 7)] == list(range(6))
    assert [e.data.sequence for e in published] == [6]
    await verified(trail)
