"""The audit handlers on fakes: each record once, in order, checkpoints when due; and on the in-memory bus."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from contracts.audit import AuditCheckpoint
from contracts.envelope import CloudEvent
from contracts.monitoring import DriftDetected
from contracts.predictions import PredictionsLogged
from contracts.registry import EVENT_TYPES
from contracts.topics import DEAD_LETTER
from contracts.training import TrainingRequested
from libs.bus import Delivery, InMemoryBus, Record, Subscription, Transaction
from libs.bus.kafka import dead_letter_message
from services.audit import handlers
from services.audit.core import verify_trail
from services.audit.domain import (
    KeyRing,
    Kind,
    PartitionEnds,
    PreparedRows,
    SealedHead,
    Signer,
    chain_hash,
    decode_record,
)
from tests.unit.audit.fakes import SEED, Clock, FakeTrail, delivery, example, kind_of, record


@pytest.fixture
def trail() -> FakeTrail:
    return FakeTrail()


@pytest.fixture
def signer() -> Signer:
    return Signer(SEED)


async def test_each_record_becomes_one_row_in_delivery_order(trail: FakeTrail, signer: Signer) -> None:
    events = [example(DriftDetected) for _ in range(5)]
    n, _ = await record(trail, signer, [delivery(e, offset=i) for i, e in enumerate(events)])
    assert n == 5
    assert sorted(trail.rows) == [1, 2, 3, 4, 5]
    assert [trail.rows[s].row.attributes.event_id for s in range(1, 6)] == [e.id for e in events]
    prev = bytes(32)
    for s in range(1, 6):
        row = trail.rows[s].row
        assert row.row_hash == chain_hash(prev, s, row.record)
        prev = row.row_hash


async def test_redelivered_record_changes_nothing(trail: FakeTrail, signer: Signer) -> None:
    batch = [delivery(example(DriftDetected), offset=i) for i in range(3)]
    await record(trail, signer, batch)
    before = dict(trail.rows)
    n, _ = await record(trail, signer, [*batch[1:], delivery(example(DriftDetected), offset=3)])
    assert n == 1
    assert sorted(trail.rows) == [1, 2, 3, 4]
    assert all(trail.rows[s] is before[s] for s in (1, 2, 3))


async def test_a_resent_copy_of_a_recorded_event_at_a_new_position_adds_nothing(
    trail: FakeTrail, signer: Signer
) -> None:
    # An outbox relay that died before marking its batch sent sends the same events again, later.
    events = [example(DriftDetected) for _ in range(3)]
    await record(trail, signer, [delivery(e, offset=i) for i, e in enumerate(events)])
    resent = [delivery(events[0], offset=10), delivery(events[2], offset=11)]
    n, _ = await record(trail, signer, [*resent, delivery(example(DriftDetected), offset=12)])
    assert n == 1
    ids = [trail.rows[s].row.attributes.event_id for s in sorted(trail.rows)]
    assert len(ids) == len(set(ids)) == 4


async def test_a_resent_copy_of_an_event_recorded_in_structured_mode_adds_nothing(
    trail: FakeTrail, signer: Signer
) -> None:
    event = example(DriftDetected)
    key, value, headers = event.to_kafka()
    body = {name[3:]: text.decode() for name, text in headers if name.startswith("ce_")}
    body["data"] = orjson.loads(value)
    structured = Record(
        event.topic, 0, 0, key, orjson.dumps(body), (("content-type", b"application/cloudevents+json"),)
    )
    decoded = EVENT_TYPES.decode(structured.value, structured.headers)
    await record(trail, signer, [Delivery(structured, decoded)])

    n, _ = await record(trail, signer, [Delivery(replace(structured, offset=5), decoded)])

    assert n == 0
    [row] = [held.row for held in trail.rows.values()]
    assert (row.attributes.event_id, row.attributes.event_type) == (event.id, event.type)


async def test_a_copy_within_one_batch_is_kept_once(trail: FakeTrail, signer: Signer) -> None:
    event = example(TrainingRequested)
    n, _ = await record(trail, signer, [delivery(event, offset=0), delivery(event, offset=1)])
    assert n == 1


async def test_same_id_with_other_bytes_or_on_another_topic_is_not_a_copy(
    trail: FakeTrail, signer: Signer
) -> None:
    event = example(DriftDetected)
    original = delivery(event, offset=0)
    value = original.record.value or b""
    assert b'"churn"' in value
    other = Delivery(replace(original.record, offset=1, value=value.replace(b'"churn"', b'"chum"')), None)
    dead_lettered = delivery(event, topic=DEAD_LETTER, offset=0)
    n, _ = await record(trail, signer, [original, other, dead_lettered])
    assert n == 3


async def test_two_consumers_dead_letters_of_one_event_are_both_recorded(
    trail: FakeTrail, signer: Signer
) -> None:
    # The same original headers and value; what differs is who gave up and why (the dlq_* headers).
    original = delivery(example(DriftDetected), offset=5).record
    letters = []
    for i, consumer in enumerate(["monitoring", "registry"]):
        key, value, headers = dead_letter_message(
            original,
            consumer=consumer,
            reason="handler-failed",
            error=f"{consumer} failed",
            max_bytes=2_000_000,
        )
        letters.append(Delivery(Record(DEAD_LETTER, 0, i, key, value, tuple(headers), 1), None))
    assert (await record(trail, signer, letters[:1]))[0] == 1
    assert (await record(trail, signer, letters))[0] == 1  # the first is a redelivery; the second is new
    assert (await record(trail, signer, [replace(letters[1], record=replace(letters[1].record, offset=9))]))[
        0
    ] == 0  # and a re-sent copy of it is not


async def test_ids_that_differ_past_the_indexed_length_or_by_a_nul_are_different_events(
    trail: FakeTrail, signer: Signer
) -> None:
    base = delivery(example(DriftDetected), offset=0).record
    records = []
    for i, event_id in enumerate(["e" * 512 + "-1", "e" * 512 + "-2", "abc", "a\x00bc"]):
        headers = tuple((n, event_id.encode() if n == "ce_id" else v) for n, v in base.headers)
        records.append(Delivery(replace(base, offset=i, headers=headers), None))
    assert (await record(trail, signer, records))[0] == 4


async def test_predictions_are_not_looked_up_by_id(trail: FakeTrail, signer: Signer) -> None:
    # Serving produces predictions directly (no outbox, so no re-sent copies); the index leaves them out.
    prediction = example(PredictionsLogged)
    n, _ = await record(trail, signer, [delivery(prediction, offset=0), delivery(prediction, offset=1)])
    assert n == 2


def reused_count() -> float:
    return (
        REGISTRY.get_sample_value("driftloop_audit_positions_reused_total", {"topic": "mlops.monitoring"})
        or 0.0
    )


def drifts(offsets: range, partition: int = 0) -> list[Delivery]:
    return [delivery(example(DriftDetected), partition=partition, offset=i) for i in offsets]


def positions(trail: FakeTrail) -> list[tuple[str, int, int]]:
    return sorted((s.row.topic, s.row.partition, s.row.offset) for s in trail.rows.values())


async def test_a_writer_that_knows_the_partition_ends_looks_up_only_redeliveries(
    trail: FakeTrail, signer: Signer
) -> None:
    ends = PartitionEnds()
    await record(trail, signer, [*drifts(range(3)), *drifts(range(2), partition=1)], ends=ends)
    assert (trail.end_lookups, trail.exact_lookups) == (1, 0)
    second = drifts(range(3, 6))
    await record(trail, signer, [*second, *drifts(range(2, 4), partition=1)], ends=ends)
    assert (trail.end_lookups, trail.exact_lookups) == (1, 0)  # nothing read: all beyond the ends left
    redelivered = [second[-1], *drifts(range(6, 8))]  # offset 5 is in the trail
    n, _ = await record(trail, signer, redelivered, ends=ends)
    assert (n, trail.end_lookups, trail.exact_lookups) == (2, 1, 1)
    n, _ = await record(trail, signer, drifts(range(1), partition=2), ends=ends)  # a partition not seen yet
    assert (n, trail.end_lookups) == (1, 2)
    assert len(positions(trail)) == len(set(positions(trail))) == 13


async def test_the_ends_are_read_again_when_another_writer_moved_the_head(
    trail: FakeTrail, signer: Signer
) -> None:
    mine, theirs = PartitionEnds(), PartitionEnds()
    await record(trail, signer, drifts(range(3)), ends=mine)
    batch = drifts(range(3, 6))
    await record(trail, signer, batch, ends=theirs)  # a replica appended beyond the ends this one knows
    n, _ = await record(trail, signer, [*batch, *drifts(range(6, 7))], ends=mine)
    assert n == 1
    assert trail.end_lookups == 3
    assert positions(trail) == [("mlops.monitoring", 0, i) for i in range(7)]


async def test_the_ends_are_read_again_after_a_transaction_rolled_back(
    trail: FakeTrail, signer: Signer
) -> None:
    ends = PartitionEnds()
    await record(trail, signer, drifts(range(3)), ends=ends)
    before = dict(trail.rows)
    batch = drifts(range(3, 6))
    await record(trail, signer, batch, ends=ends)
    trail.rows = before  # the commit failed
    n, _ = await record(trail, signer, batch, ends=ends)
    assert n == 3
    assert trail.end_lookups == 2
    assert positions(trail) == [("mlops.monitoring", 0, i) for i in range(6)]


async def test_events_at_offsets_a_recreated_topic_uses_again_are_recorded_not_taken_for_redeliveries(
    trail: FakeTrail, signer: Signer
) -> None:
    ends = PartitionEnds()
    before = reused_count()
    await record(trail, signer, drifts(range(5)), ends=ends)
    # The topic was deleted and created again: its offsets start at 0, and the records there are new.
    events = [example(DriftDetected) for _ in range(3)]
    recreated = [delivery(e, offset=i) for i, e in enumerate(events)]
    n, _ = await record(trail, signer, recreated, ends=ends)
    assert n == 3
    assert [trail.rows[s].row.attributes.event_id for s in (6, 7, 8)] == [e.id for e in events]
    assert [(trail.rows[s].row.offset, trail.rows[s].row.reuse) for s in (6, 7, 8)] == [
        (0, 1),
        (1, 1),
        (2, 1),
    ]
    assert decode_record(trail.rows[6].row.record)[0]["kafka"]["reuse"] == 1
    assert reused_count() == before + 3
    # Their redeliveries, and those of the records they followed, add nothing; beyond the end is the usual.
    n, _ = await record(trail, signer, [*recreated, *drifts(range(5, 6))], ends=ends)
    assert n == 1
    n, _ = await record(trail, signer, [delivery(e, offset=i) for i, e in enumerate(events)])
    assert n == 0
    # Created again once more: offset 0 holds a third record.
    n, _ = await record(trail, signer, drifts(range(1)), ends=ends)
    assert (n, trail.rows[10].row.reuse) == (1, 2)
    report = await verify_trail(trail, keys=KeyRing([signer.public_raw]), sealer=signer.sealer, full=True)
    assert report.ok, report


async def test_a_row_prepared_for_a_record_at_a_reused_position_is_made_again_saying_so(
    trail: FakeTrail, signer: Signer
) -> None:
    await record(trail, signer, drifts(range(2)))
    recreated = drifts(range(2))
    prepared = PreparedRows()
    await handlers.prepare_records(recreated, prepared=prepared, clock=Clock(), dead_letter_topic=DEAD_LETTER)
    n, _ = await record(trail, signer, recreated, prepared=prepared)
    assert n == 2
    assert [decode_record(trail.rows[s].row.record)[0]["kafka"].get("reuse") for s in (3, 4)] == [1, 1]
    report = await verify_trail(trail, keys=KeyRing([signer.public_raw]), sealer=signer.sealer, full=True)
    assert report.ok, report


async def test_checkpoint_is_signed_and_published_every_n_rows(trail: FakeTrail, signer: Signer) -> None:
    _, published = await record(
        trail, signer, [delivery(example(DriftDetected), offset=i) for i in range(3)], every=4
    )
    assert published == []
    _, published = await record(
        trail, signer, [delivery(example(DriftDetected), offset=i) for i in range(3, 5)], every=4
    )
    [event] = published
    checkpoint = event.data
    assert isinstance(checkpoint, AuditCheckpoint)
    assert event.type == "io.driftloop.AuditCheckpoint.v1"
    assert event.subject is None
    assert (checkpoint.sequence, checkpoint.row_count) == (5, 5)
    assert checkpoint.head_hash == trail.rows[5].row.row_hash.hex()
    assert checkpoint.key_id == signer.key_id
    assert KeyRing([signer.public_raw]).check(checkpoint) is None
    assert trail.checkpoint_rows == [(checkpoint, event.id)]


async def test_a_writer_reads_the_seals_before_a_checkpoint_only_under_a_head_it_did_not_leave(
    trail: FakeTrail, signer: Signer
) -> None:
    mine, theirs = SealedHead(), SealedHead()
    polls = [[delivery(example(DriftDetected), offset=i) for i in range(k, k + 3)] for k in range(0, 18, 3)]
    await record(trail, signer, polls[0], every=4, sealed=mine)
    await record(trail, signer, polls[1], every=4, sealed=mine)  # a checkpoint at 6 over rows 1..3 it found
    assert trail.seal_reads == [(0, 3)]
    await record(trail, signer, polls[2], every=4, sealed=mine)
    await record(trail, signer, polls[3], every=4, sealed=mine)  # at 12: every row since 6 is its own
    assert trail.seal_reads == [(0, 3)]
    await record(trail, signer, polls[4], every=4, sealed=theirs)  # another writer appends 13..15
    await record(trail, signer, polls[5], every=4, sealed=mine)
    assert trail.seal_reads == [(0, 3), (12, 15)]
    assert [c.sequence for c, _ in trail.checkpoint_rows] == [6, 12, 18]
    report = await verify_trail(trail, keys=KeyRing([signer.public_raw]), sealer=signer.sealer)
    assert report.ok and report.covered_by_checkpoint == 18, report


async def test_a_writer_that_found_a_row_without_its_seal_refuses_each_later_checkpoint_without_reading(
    trail: FakeTrail, signer: Signer
) -> None:
    polls = [[delivery(example(DriftDetected), offset=i) for i in range(k, k + 3)] for k in range(0, 15, 3)]
    await record(trail, signer, polls[0], every=3)  # a checkpoint at 3
    await record(trail, signer, polls[1], every=5)
    trail.rows[5].seal = bytes(16)  # what rows rewritten in the database leave
    mine = SealedHead()
    trail.seal_reads.clear()
    refused = REGISTRY.get_sample_value("driftloop_audit_checkpoints_refused_total") or 0.0
    for poll in polls[2:]:
        await record(trail, signer, poll, every=5, sealed=mine)
    assert trail.seal_reads == [(3, 6)]  # read once, at the first checkpoint due
    assert REGISTRY.get_sample_value("driftloop_audit_checkpoints_refused_total") == refused + 3
    assert [c.sequence for c, _ in trail.checkpoint_rows] == [3]


async def test_seal_head_signs_only_when_rows_arrived_since_the_last_checkpoint(
    trail: FakeTrail, signer: Signer
) -> None:
    async def publish(event: CloudEvent[Any]) -> None:
        return None

    kw: dict[str, Any] = {
        "trail": trail,
        "signer": signer,
        "publish": publish,
        "source": "/a",
        "clock": Clock(),
        "after_commit": lambda callback: callback(),
    }
    assert await handlers.seal_head(**kw) is None  # empty trail
    await record(trail, signer, [delivery(example(DriftDetected))])
    first = await handlers.seal_head(**kw)
    assert first is not None and first.sequence == 1
    assert await handlers.seal_head(**kw) is None


async def test_on_the_bus_undecodable_records_are_kept_not_dead_lettered(signer: Signer) -> None:
    bus = InMemoryBus(EVENT_TYPES)
    trail = FakeTrail()

    async def on_batch(deliveries: Sequence[Delivery], tx: Transaction) -> None:
        await handlers.on_records(
            deliveries,
            trail=trail,
            signer=signer,
            publish=tx.publish,
            source="/driftloop/audit",
            clock=Clock(),
            dead_letter_topic=DEAD_LETTER,
            checkpoint_every_rows=3,
            after_commit=tx.after_commit,
        )

    bus.subscribe(
        Subscription(
            consumer="audit", topics=["mlops.monitoring", "mlops.training"], batch_handler=on_batch, raw=True
        )
    )
    drift = example(DriftDetected)
    await bus.publish(drift)
    bus.append_raw("mlops.monitoring", b"churn", b"\x00 not json", [("ce_id", b"x")])
    await bus.publish(example(TrainingRequested, cause=drift))
    await bus.drain()

    assert bus.dead_letters == []
    assert [kind_of(trail, s) for s in (1, 2, 3)] == [Kind.EVENT, Kind.UNDECODABLE, Kind.EVENT]
    [checkpoint] = bus.events("mlops.audit", of=AuditCheckpoint)
    assert checkpoint.data.sequence == 3
    report = await verify_trail(trail, keys=KeyRing([signer.public_raw]), sealer=signer.sealer)
    assert report.ok, report
    assert (report.rows_checked, report.checkpoints_checked, report.covered_by_checkpoint) == (3, 1, 3)
