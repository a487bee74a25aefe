"""The stored record and the hash chain: exactly what outside verifiers recompute (docs/audit.md)."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from contracts.envelope import MalformedEvent, NotJson
from contracts.monitoring import DriftDetected
from contracts.registry import EVENT_TYPES
from contracts.topics import DEAD_LETTER
from libs.bus.core import Record
from services.audit.domain import (
    FORMAT,
    GENESIS,
    Attributes,
    ChainHead,
    HeldAt,
    Incoming,
    KafkaPosition,
    Kind,
    Sealer,
    StoredRow,
    chain_hash,
    chain_rows,
    column_mismatch,
    decode_record,
    encode_record,
    event_view,
    kafka_content,
    new_positions,
    record_content,
    record_meta,
)
from tests.unit.audit.fakes import SEED, example, record_of
from tests.unit.event_times import ACCEPTED, REFUSED

AT = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def test_row_hash_is_sha256_of_previous_hash_seq_and_record_digest() -> None:
    record = b'{"format":"driftloop-audit/1"}\n{"n":1}'
    expected = hashlib.sha256(GENESIS + (1).to_bytes(8, "big") + hashlib.sha256(record).digest()).digest()
    assert chain_hash(GENESIS, 1, record) == expected
    # The worked example of docs/audit.md.
    assert expected.hex() == "347c728484ce5a970260c43c206b083a53669b3d491656ef87c753cdd9e5d744"


def test_record_is_one_line_of_sorted_meta_then_the_value_bytes_exactly() -> None:
    event = example(DriftDetected, actor="user:alice")
    r = record_of(event, partition=2, offset=41)
    meta, kind = record_meta(Incoming(r), recorded_at=AT, dead_letter_topic=DEAD_LETTER)
    record = encode_record(meta, r.value)

    meta_line, _, value = record.partition(b"\n")
    assert value == r.value
    assert meta_line == orjson.dumps(meta, option=orjson.OPT_SORT_KEYS)
    assert list(orjson.loads(meta_line)) == sorted(meta)
    assert kind is Kind.EVENT
    assert meta["format"] == FORMAT
    assert meta["recorded_at"] == "2025-03-01T12:00:00.123456Z"
    assert meta["kafka"] == {
        "key": "churn",
        "offset": 41,
        "partition": 2,
        "timestamp_ms": r.timestamp_ms,
        "tombstone": False,
        "topic": "mlops.monitoring",
    }
    assert meta["headers"]["ce_id"] == event.id
    assert meta["headers"]["ce_actor"] == "user:alice"
    assert meta["error"] is None
    assert decode_record(record) == (meta, r.value)


def test_undecodable_record_is_kept_with_its_reason_and_binary_bytes_as_base64() -> None:
    r = Record("mlops.models", 0, 5, b"\xff\xfe", b"\x00\x01 not json", (("ce_id", b"\xc3\x28"),))
    error = NotJson("value is not JSON")
    meta, kind = record_meta(Incoming(r, error), recorded_at=AT, dead_letter_topic=DEAD_LETTER)
    assert kind is Kind.UNDECODABLE
    assert meta["error"] == {"reason": "not-json", "detail": "value is not JSON"}
    assert meta["kafka"]["key"] == {"base64": base64.b64encode(b"\xff\xfe").decode()}
    assert meta["headers"]["ce_id"] == {"base64": base64.b64encode(b"\xc3\x28").decode()}
    assert decode_record(encode_record(meta, r.value))[1] == b"\x00\x01 not json"


def test_tombstone_and_empty_value_are_told_apart() -> None:
    tombstone = Record("mlops.models", 0, 1, b"churn", None, ())
    empty = Record("mlops.models", 0, 2, b"churn", b"", ())
    for r, expected in ((tombstone, None), (empty, b"")):
        meta, _ = record_meta(Incoming(r), recorded_at=AT, dead_letter_topic=DEAD_LETTER)
        assert decode_record(encode_record(meta, r.value))[1] == expected


def test_dead_letter_keeps_why_it_was_dead_lettered() -> None:
    event = example(DriftDetected)
    key, value, headers = event.to_kafka()
    dlq = [*headers, ("dlq_reason", b"handler-failed"), ("dlq_error", b"boom"), ("dlq_consumer", b"training")]
    r = Record(DEAD_LETTER, 1, 9, key, value, tuple(dlq))
    meta, kind = record_meta(Incoming(r), recorded_at=AT, dead_letter_topic=DEAD_LETTER)
    assert kind is Kind.DEAD_LETTER
    assert meta["error"] == {"reason": "handler-failed", "detail": "boom"}
    assert meta["headers"]["dlq_consumer"] == "training"


def test_repeated_header_keeps_every_value_in_order() -> None:
    r = Record("t", 0, 0, None, b"{}", (("x", b"1"), ("x", b"2"), ("x", b"3")))
    meta, _ = record_meta(Incoming(r), recorded_at=AT, dead_letter_topic=DEAD_LETTER)
    assert meta["headers"]["x"] == ["1", "2", "3"]


def test_rows_are_numbered_after_the_head_and_chained_and_sealed() -> None:
    events = [example(DriftDetected) for _ in range(3)]
    incoming = [Incoming(record_of(e, offset=i)) for i, e in enumerate(events)]
    head = ChainHead(10, hashlib.sha256(b"row 10").digest())
    sealer = Sealer(SEED)
    rows = chain_rows(head, incoming, recorded_at=AT, sealer=sealer, dead_letter_topic=DEAD_LETTER)

    assert [r.seq for r in rows] == [11, 12, 13]
    prev = head.row_hash
    for r in rows:
        assert r.row_hash == chain_hash(prev, r.seq, r.record)
        assert r.seal == sealer.seal(r.row_hash)
        prev = r.row_hash
    assert rows[0].attributes.event_id == events[0].id
    assert rows[0].attributes.subject == "churn"
    assert rows[0].attributes.event_type == "io.driftloop.DriftDetected.v1"
    assert rows[0].attributes.correlation_id == events[0].id
    assert rows[0].attributes.event_time == events[0].time


def test_indexed_copies_never_hold_nul_or_overlong_text() -> None:
    r = Record("t", 0, 0, None, b"{}", (("ce_id", b"a\x00b"), ("ce_subject", b"m" * 5000)))
    [row] = chain_rows(
        ChainHead(), [Incoming(r)], recorded_at=AT, sealer=Sealer(SEED), dead_letter_topic=DEAD_LETTER
    )
    assert row.attributes.event_id == "ab"
    assert row.attributes.subject is not None and len(row.attributes.subject) == 512
    assert b"a\\u0000b" in row.record  # the record keeps the exact header


def _reference_rows(head: ChainHead, incoming: list[Incoming], sealer: Sealer) -> list[tuple[Any, ...]]:
    """The rows spelled out from record_meta, encode_record and Attributes.of, one step at a time."""
    prev, rows = head.row_hash, list[tuple[Any, ...]]()
    for seq, item in enumerate(incoming, start=head.seq + 1):
        meta, kind = record_meta(item, recorded_at=AT, dead_letter_topic=DEAD_LETTER)
        record = encode_record(meta, item.record.value)
        prev = chain_hash(prev, seq, record)
        r = item.record
        attributes = Attributes.of(meta["headers"])
        rows.append(
            (
                seq,
                record,
                prev,
                sealer.seal(prev),
                r.topic,
                r.partition,
                r.offset,
                kind.value,
                *attributes,
                AT,
                item.reuse,
            )
        )
    return rows


def test_the_builders_fast_path_makes_the_same_rows_as_the_general_one() -> None:
    drift = example(DriftDetected, actor="user:alice")
    key, value, headers = drift.to_kafka()
    h = dict(headers)

    def with_headers(**changed: bytes | None) -> tuple[tuple[str, bytes | None], ...]:
        return tuple({**h, **changed}.items())

    records = [
        record_of(drift),
        Record("mlops.models", 0, 1, b"churn", None, tuple(headers)),  # tombstone
        Record("mlops.models", 0, 2, None, b"", tuple(headers)),  # no key, empty value
        Record("mlops.models", 0, 3, b"\xff\xfe", value, tuple(headers)),  # binary key
        Record("mlops.models", 0, 4, key, value, with_headers(ce_subject="m\u00fc\u00df".encode())),
        Record("mlops.models", 0, 5, key, value, with_headers(ce_id=b"a\x00b", ce_actor=b"x" * 600)),
        Record("mlops.models", 0, 6, key, value, with_headers(ce_time=b"2025-03-01T12:00:00")),  # naive
        Record("mlops.models", 0, 7, key, value, with_headers(ce_time=b"yesterday", ce_correlationid=b"")),
        Record("mlops.models", 0, 8, key, value, with_headers(ce_subject=b"\xc3\x28")),  # not UTF-8
        Record("mlops.models", 0, 9, key, value, with_headers(ce_actor=None)),  # a null header
        Record("mlops.models", 0, 10, key, value, (*headers, ("ce_subject", b"again"))),  # repeated
        Record("mlops.models", 0, 11, key, value, ()),  # no headers at all
        Record(DEAD_LETTER, 0, 12, key, value, (*headers, ("dlq_reason", b"rejected"))),
    ]
    incoming = [Incoming(r) for r in records]
    incoming += [
        Incoming(records[0], NotJson("value is not JSON"), decoded=False),
        Incoming(records[0], decoded=False),
        Incoming(records[0], reuse=2),
    ]
    head = ChainHead(41, hashlib.sha256(b"row 41").digest())
    sealer = Sealer(SEED)
    rows = chain_rows(head, incoming, recorded_at=AT, sealer=sealer, dead_letter_topic=DEAD_LETTER)
    assert [tuple(r) for r in rows] == _reference_rows(head, incoming, sealer)
    assert [r.kind for r in rows[-4:]] == ["dead-letter", "undecodable", "undecodable", "event"]
    assert [r.reuse for r in rows[-2:]] == [0, 2]


def test_redelivered_positions_and_repeats_within_a_batch_are_dropped() -> None:
    a, b, c = (Record("t", 0, n, None, b"{}", ()) for n in (1, 2, 3))
    held: dict[KafkaPosition, HeldAt] = {KafkaPosition("t", 0, 1): [(0, record_content(a))]}
    fresh = new_positions([Incoming(a), Incoming(b), Incoming(b), Incoming(c)], held)
    assert [(i.record.offset, i.reuse) for i in fresh] == [(2, 0), (3, 0)]


def test_another_record_at_a_held_position_is_new_and_numbered_after_those_held_there() -> None:
    # The topic was deleted and created again: offset 1 holds another record now.
    held_record = Record("t", 0, 1, b"k", b'{"n":1}', (("ce_id", b"a"),), 1_000)
    held: dict[KafkaPosition, HeldAt] = {
        KafkaPosition("t", 0, 1): [(0, record_content(held_record)), (1, None)]
    }
    others = [
        replace(held_record, timestamp_ms=2_000),  # the same bytes, written later
        replace(held_record, value=b'{"n":2}'),
        replace(held_record, key=None),
        replace(held_record, value=None),  # a tombstone
        replace(held_record, headers=(("ce_id", b"b"),)),
    ]
    for other in others:
        [fresh] = new_positions([Incoming(other)], held)
        assert fresh.record is other and fresh.reuse == 2  # after the highest held (unreadable or not)
    assert new_positions([Incoming(held_record)], held) == []
    # Two records at one taken position in a batch: each is new once, numbered in order.
    again = [Incoming(others[0]), Incoming(others[1]), Incoming(others[0]), Incoming(held_record)]
    assert [i.reuse for i in new_positions(again, held)] == [2, 3]
    # ... and a record first seen in the batch, then another at its position.
    first = Record("t", 0, 7, None, b"{}", (), 5)
    kept = new_positions([Incoming(first), Incoming(replace(first, timestamp_ms=6)), Incoming(first)], {})
    assert [(i.record.timestamp_ms, i.reuse) for i in kept] == [(5, 0), (6, 1)]


def test_a_record_at_a_reused_position_says_so_and_the_stored_record_gives_the_same_content() -> None:
    r = Record("t", 0, 1, b"\xff", None, (("ce_id", b"a"), ("x", b"\xfe"), ("x", None)), 1_000)
    [row] = chain_rows(
        ChainHead(), [Incoming(r, reuse=3)], recorded_at=AT, sealer=Sealer(SEED), dead_letter_topic=""
    )
    meta, value = decode_record(row.record)
    assert meta["kafka"]["reuse"] == row.reuse == 3
    assert kafka_content(meta, hashlib.sha256(value or b"").digest()) == record_content(r)
    [first] = chain_rows(
        ChainHead(), [Incoming(r)], recorded_at=AT, sealer=Sealer(SEED), dead_letter_topic=""
    )
    assert "reuse" not in decode_record(first.record)[0]["kafka"] and first.reuse == 0


def _with_time(record: Record, ce_time: str) -> Record:
    headers = tuple((name, ce_time.encode() if name == "ce_time" else raw) for name, raw in record.headers)
    return replace(record, headers=headers)


@pytest.mark.parametrize("ce_time", [text for text, _ in ACCEPTED] + REFUSED)
def test_the_trail_indexes_ce_time_exactly_when_the_bus_decodes_it(ce_time: str) -> None:
    r = _with_time(record_of(example(DriftDetected)), ce_time)
    try:
        decoded: datetime | None = EVENT_TYPES.decode(r.value, r.headers).time
        incoming = Incoming(r)
    except MalformedEvent as exc:
        decoded, incoming = None, Incoming(r, exc, decoded=False)
    # As the audit consumer sees it (the decoder's verdict), and as if decoded (the builder's fast path).
    for item in (incoming, Incoming(r)):
        [row] = chain_rows(
            ChainHead(0, GENESIS), [item], recorded_at=AT, sealer=Sealer(SEED), dead_letter_topic=DEAD_LETTER
        )
        meta, _ = decode_record(row.record)
        assert row.event_time == decoded
        assert Attributes.of(meta["headers"]).event_time == decoded
    assert (decoded is not None) == (ce_time in dict(ACCEPTED))
    if decoded is not None:
        assert decoded == dict(ACCEPTED)[ce_time]


def _stored(row: Any) -> StoredRow:
    """A chained row as the trail reads it back."""
    return StoredRow(
        seq=row.seq,
        record=row.record,
        row_hash=row.row_hash,
        topic=row.topic,
        partition=row.partition,
        offset=row.offset,
        kind=row.kind,
        attributes=Attributes(*row[8:15]),
        recorded_at=row.recorded_at,
    )


def test_a_time_copy_made_before_the_trail_read_ce_time_as_the_bus_does_still_verifies() -> None:
    # Until then, the copy of "2025-03-01 12:00:00Z" (no RFC 3339: the bus refuses it now) was a time.
    r = _with_time(record_of(example(DriftDetected)), "2025-03-01 12:00:00Z")
    [row] = chain_rows(
        ChainHead(0, GENESIS),
        [Incoming(r)],
        recorded_at=AT,
        sealer=Sealer(SEED),
        dead_letter_topic=DEAD_LETTER,
    )
    stored = _stored(row)
    assert stored.attributes.event_time is None
    assert column_mismatch(stored) is None
    old_copy = stored.attributes._replace(event_time=datetime(2025, 3, 1, 12, tzinfo=UTC))
    assert column_mismatch(replace(stored, attributes=old_copy)) is None
    moved = stored.attributes._replace(event_time=datetime(2025, 3, 1, 13, tzinfo=UTC))
    assert column_mismatch(replace(stored, attributes=moved)) == "event_time"


def test_an_event_taken_in_structured_mode_is_indexed_and_shown_as_its_binary_twin() -> None:
    drift = example(DriftDetected, actor="user:alice")
    key, value, headers = drift.to_kafka()
    h = dict(headers)
    event = {name[3:]: text.decode() for name, text in h.items() if name.startswith("ce_")}
    event |= {"datacontenttype": "application/json", "data": orjson.loads(value)}
    content_type = ("content-type", b"application/cloudevents+json")
    structured = Record("mlops.monitoring", 0, 7, key, orjson.dumps(event), (content_type,))
    binary = record_of(drift, offset=8)
    refused = replace(structured, offset=9)
    incoming = [Incoming(structured), Incoming(binary), Incoming(refused, NotJson("not JSON"), decoded=False)]

    rows = chain_rows(
        ChainHead(0, GENESIS), incoming, recorded_at=AT, sealer=Sealer(SEED), dead_letter_topic=DEAD_LETTER
    )

    assert rows[0][8:15] == rows[1][8:15]  # the same indexed copies
    assert rows[0].event_id == drift.id and rows[0].correlation_id == drift.correlationid
    assert rows[2].kind == "undecodable" and rows[2].event_id is None  # not taken by the bus: headers alone
    assert [column_mismatch(_stored(row)) for row in rows] == [None, None, None]
    forged = _stored(rows[0])
    forged = replace(forged, attributes=forged.attributes._replace(actor="user:mallory"))
    assert column_mismatch(forged) == "actor"
    views = [event_view(_stored(row)) for row in rows[:2]]
    for field in ("id", "type", "source", "subject", "time", "correlationid", "actor", "data"):
        assert views[0][field] == views[1][field], field
    assert views[0]["data"] == orjson.loads(value)
