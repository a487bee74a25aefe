"""The operator's dead-letter tool: which dead letters a selection takes, and what a replay produces from
each (the original without its dlq_* headers, to its topic, with its key), passes over (tombstones,
unreadable, not-json, truncated ones whose original is gone or changed) or stops at (a failed send)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from contracts.envelope import DEFAULT_MAX_EVENT_BYTES, CloudEvent, record_bytes
from contracts.topics import DEAD_LETTER
from libs.bus import InMemoryBus, Record, Subscription, Transaction
from libs.bus.core import UnreadableRecord
from libs.bus.dead_letters import (
    REPLAYED_FROM,
    DeadLetterEntry,
    DeadLetterSelection,
    OriginRecords,
    OriginUnavailable,
    Replay,
    Skip,
    plan_replay,
    replay,
)
from libs.bus.kafka import dead_letter_message
from libs.settings import KafkaSettings
from tests.unit.test_bus import REGISTRY, ThingHappened, thing
from tests.unit.test_bus_runner import DeadLetterTopic

LIMIT = 1_000_000 + 64 * 1024


def original(offset: int = 5, event: CloudEvent[Any] | None = None, **changes: Any) -> Record:
    key, value, headers = (event or thing(1)).to_kafka()
    fields: dict[str, Any] = {
        "key": key,
        "value": value,
        "headers": (*headers, ("traceparent", b"\xff\x00")),
        **changes,
    }
    return Record("test.things", 2, offset, **fields)


def filed(
    record: Record,
    *,
    at: int = 0,
    partition: int = 1,
    reason: str = "handler-failed",
    consumer: str = "counter",
    max_bytes: int = LIMIT,
    timestamp_ms: int = 1_700_000_000_000,
) -> DeadLetterEntry:
    """``record``'s dead letter as the writer makes it, read back from the dead-letter topic at ``at``."""
    key, value, headers = dead_letter_message(
        record, consumer=consumer, reason=reason, error="boom", max_bytes=max_bytes
    )
    return DeadLetterEntry.of(Record(DEAD_LETTER, partition, at, key, value, tuple(headers), timestamp_ms))


class Origins:
    """The origin topics, by position; a position not held is gone."""

    def __init__(self, *records: Record, topics: frozenset[str] = frozenset({"test.things"})) -> None:
        self.records = {(r.topic, r.partition, r.offset): r for r in records}
        self.topics = topics
        self.asked: list[tuple[str, int, int]] = []

    async def has_topic(self, topic: str) -> bool:
        return topic in self.topics

    async def __call__(self, topic: str, partition: int, offset: int) -> Record:
        self.asked.append((topic, partition, offset))
        if (found := self.records.get((topic, partition, offset))) is None:
            raise OriginUnavailable(f"({topic} {partition}:{offset}) is gone")
        return found


class Sender:
    """Records what is sent; refuses with ``errors`` in turn (None: accepted)."""

    def __init__(self, errors: Sequence[BaseException | None] = ()) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.errors = list(errors)

    async def send_many(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]]
    ) -> None:
        if self.errors and (error := self.errors.pop(0)) is not None:
            raise error
        self.sent.extend(items)


# --- reading ------------------------------------------------------------------------------------------


def test_a_dead_letter_is_read_with_why_where_from_and_which_event() -> None:
    event = thing(1)
    entry = filed(original(event=event), at=7)

    assert (entry.position, entry.reason, entry.error, entry.consumer) == (
        "1:7",
        "handler-failed",
        "boom",
        "counter",
    )
    assert (entry.origin_topic, entry.origin_partition, entry.origin_offset) == ("test.things", 2, 5)
    assert (entry.event_id, entry.event_type) == (event.id, "io.driftloop.ThingHappened.v1")
    assert (entry.truncated, entry.kind) == ((), None)
    assert entry.as_json()["tombstone"] is False


def at(hour: int) -> datetime:
    return datetime(2026, 12, 2, hour, tzinfo=UTC)


@pytest.mark.parametrize(
    ("selection", "taken"),
    [
        (DeadLetterSelection(), True),
        (DeadLetterSelection(topics=frozenset({"test.things", "mlops.models"})), True),
        (DeadLetterSelection(topics=frozenset({"mlops.models"})), False),
        (DeadLetterSelection(consumers=frozenset({"counter"})), True),
        (DeadLetterSelection(consumers=frozenset({"registry"})), False),
        (DeadLetterSelection(reasons=frozenset({"handler-failed"})), True),
        (DeadLetterSelection(reasons=frozenset({"rejected"})), False),
        (DeadLetterSelection(event_types=frozenset({"ThingHappened"})), True),
        (DeadLetterSelection(event_types=frozenset({"io.driftloop.ThingHappened.v1"})), True),
        (DeadLetterSelection(event_types=frozenset({"Thing"})), False),
        (DeadLetterSelection(since=at(10), until=at(11)), True),
        (DeadLetterSelection(since=at(11)), False),
        (DeadLetterSelection(until=at(10)), False),
        (DeadLetterSelection(after=(1, 6)), True),
        (DeadLetterSelection(after=(1, 7)), False),
        (DeadLetterSelection(after=(0, 99)), True),
        (DeadLetterSelection(after=(2, 0)), False),
        (DeadLetterSelection(named=frozenset({(1, 7)})), True),
        (DeadLetterSelection(named=frozenset({(0, 7), (1, 8)})), False),
        (DeadLetterSelection(named=frozenset({(1, 7)}), reasons=frozenset({"rejected"})), False),
    ],
)
def test_a_selection_takes_a_dead_letter_only_when_every_filter_given_holds(
    selection: DeadLetterSelection, taken: bool
) -> None:
    entry = filed(original(), at=7, timestamp_ms=int(at(10).timestamp() * 1000) + 1)

    assert selection.matches(entry) is taken


def test_where_reading_starts_and_stops_follows_after_and_the_named_positions() -> None:
    going_on = DeadLetterSelection(after=(1, 41))
    assert [going_on.first_offset(p) for p in (0, 1, 2)] == [None, 42, 0]
    named = DeadLetterSelection(named=frozenset({(1, 3), (1, 9)}))
    assert [named.first_offset(p) for p in (0, 1)] == [None, 3]
    assert [named.last_offset(p) for p in (0, 1)] == [None, 9]


# --- the replay plan ----------------------------------------------------------------------------------


async def test_a_replay_is_the_original_to_its_topic_with_its_key_and_without_the_dlq_headers() -> None:
    record = original()
    step = await plan_replay(filed(record, at=7), named=False, origin_of=Origins())

    assert isinstance(step, Replay)
    assert (step.topic, step.key, step.value, step.from_origin) == (
        "test.things",
        b"model-a",
        record.value,
        False,
    )
    assert step.headers == [*record.headers, (REPLAYED_FROM, b"1:7")]
    assert REGISTRY.decode(step.value, step.headers).id == REGISTRY.decode(record.value, record.headers).id


async def test_a_replayed_dead_letter_dead_lettered_again_carries_only_its_new_reason() -> None:
    first = filed(original(), at=7)
    step = await plan_replay(first, named=False, origin_of=Origins())
    assert isinstance(step, Replay)

    again = filed(
        Record("test.things", 2, 30, step.key, step.value, tuple(step.headers)), reason="rejected", at=8
    )
    replayed_again = await plan_replay(again, named=False, origin_of=Origins())

    assert isinstance(replayed_again, Replay)
    assert [name for name, _ in again.record.headers].count("dlq_reason") == 1
    assert again.reason == "rejected" and again.origin_offset == 30
    assert [v for n, v in replayed_again.headers if n == REPLAYED_FROM] == [b"1:8"]


@pytest.mark.parametrize(
    ("record", "reason", "kind"),
    [
        (original(value=None), "not-json", "tombstone"),
        (original(value=b"\x00 not json"), "not-json", "not-json"),
        (
            UnreadableRecord("test.things", 2, 5, None, None, (), error="cannot parse"),
            "unreadable",
            "unreadable",
        ),
    ],
)
async def test_tombstones_unreadable_and_not_json_are_passed_over_unless_named(
    record: Record, reason: str, kind: str
) -> None:
    entry = filed(record, at=7, reason=reason)
    readable_now = original(value=b"{}")

    passed = await plan_replay(entry, named=False, origin_of=Origins(readable_now))
    named = await plan_replay(entry, named=True, origin_of=Origins(readable_now))

    assert isinstance(passed, Skip) and (passed.reason, entry.kind) == (kind, kind)
    assert "--at 1:7" in passed.detail
    assert isinstance(named, Replay)
    if kind == "unreadable":  # its dead letter holds nothing: the original is read from its topic
        assert (named.from_origin, named.value) == (True, b"{}")
    else:
        assert (named.from_origin, named.value) == (False, record.value)


async def test_a_truncated_dead_letter_is_replayed_from_its_original_when_the_hash_matches() -> None:
    record = original(value=b'{"n": 1, "pad": "' + b"x" * 5000 + b'"}')
    entry = filed(record, max_bytes=2000)
    origins = Origins(record)
    assert "value" in entry.truncated and len(entry.record.value or b"") < len(record.value or b"")

    step = await plan_replay(entry, named=False, origin_of=origins)

    assert isinstance(step, Replay) and step.from_origin
    assert (step.key, step.value) == (record.key, record.value)
    assert origins.asked == [("test.things", 2, 5)]


async def test_a_truncated_dead_letter_whose_original_is_gone_or_another_is_not_replayed_and_says_why() -> (
    None
):
    record = original(value=b'{"n": 1, "pad": "' + b"x" * 5000 + b'"}')
    entry = filed(record, max_bytes=2000)
    other = original(value=b'{"n": 2}')

    gone = await plan_replay(entry, named=False, origin_of=Origins())
    changed = await plan_replay(entry, named=True, origin_of=Origins(other))

    assert isinstance(gone, Skip) and gone.reason == "origin-unavailable"
    assert "cut to fit (value)" in gone.detail and "is gone" in gone.detail
    assert isinstance(changed, Skip) and changed.reason == "origin-changed"
    assert hashlib.sha256(record.value or b"").hexdigest() in changed.detail


async def test_a_record_without_an_origin_or_whose_topic_is_gone_is_not_replayed() -> None:
    entry = DeadLetterEntry.of(Record(DEAD_LETTER, 0, 3, b"k", b"{}", (("ce_id", b"x"),)))

    no_origin = await plan_replay(entry, named=True, origin_of=Origins())
    no_topic = await plan_replay(filed(original()), named=True, origin_of=Origins(topics=frozenset()))

    assert isinstance(no_origin, Skip) and no_origin.reason == "no-origin"
    assert isinstance(no_topic, Skip) and no_topic.reason == "no-topic"


# --- the replay ---------------------------------------------------------------------------------------


async def test_a_replay_sends_each_selected_one_in_order_and_counts_what_it_passed_over() -> None:
    entries = [
        filed(original(1), at=0),
        filed(original(2, value=None), at=1, reason="not-json"),
        filed(original(3), at=2),
    ]
    sender = Sender()

    report = await replay(entries, named=False, origin_of=Origins(), sender=sender)

    assert [(topic, key) for topic, key, _, _ in sender.sent] == [("test.things", b"model-a")] * 2
    assert [dict(h)[REPLAYED_FROM] for *_, h in sender.sent] == [b"1:0", b"1:2"]
    assert (report.replayed, dict(report.skipped), report.failure) == (2, {"tombstone": 1}, None)
    assert report.last_replayed is entries[2]


async def test_a_dry_run_sends_nothing_and_says_what_it_would_do() -> None:
    steps: list[Replay | Skip] = []

    report = await replay(
        [filed(original(1))], named=False, origin_of=Origins(), sender=None, on_step=steps.append
    )

    assert report.replayed == 1 and [type(s) for s in steps] == [Replay]


async def test_a_send_that_fails_stops_the_replay_saying_the_last_one_replayed() -> None:
    entries = [filed(original(n), at=n) for n in range(4)]
    sender = Sender([None, MessageSizeTooLargeError(), None, KafkaConnectionError("broker gone")])

    report = await replay(entries, named=False, origin_of=Origins(), sender=sender)

    assert (report.replayed, dict(report.skipped)) == (2, {"too-large": 1})
    assert report.last_replayed is entries[2]
    assert report.failure is not None and report.failure.startswith("replaying 1:3 to test.things failed")


class BrokerGone(Origins):
    """Origin topics whose broker stops answering: reading a record fails as aiokafka's consumer does."""

    async def __call__(self, topic: str, partition: int, offset: int) -> Record:
        raise KafkaConnectionError("broker gone")


async def test_an_origin_record_the_broker_fails_to_read_stops_the_replay_saying_the_last_one_replayed() -> (
    None
):
    truncated = original(3, value=b'{"n": 3, "pad": "' + b"x" * 5000 + b'"}')
    entries = [filed(original(n), at=n) for n in range(3)] + [filed(truncated, at=3, max_bytes=2000)]
    steps: list[Replay | Skip] = []

    report = await replay(entries, named=False, origin_of=BrokerGone(), sender=Sender(), on_step=steps.append)

    assert (report.replayed, report.last_replayed) == (3, entries[2])
    assert report.failure is not None
    assert report.failure.startswith("reading the original of 1:3 (test.things 2:3) failed: KafkaConnection")
    assert isinstance(steps[-1], Skip) and steps[-1].reason == "failed"


async def test_a_dead_letter_the_broker_fails_to_read_stops_the_replay_saying_the_last_one_replayed() -> None:
    entries = [filed(original(n), at=n) for n in range(2)]

    async def reading() -> AsyncIterator[DeadLetterEntry]:
        for entry in entries:
            yield entry
        raise TimeoutError("no record of mlops.deadletter partition 1 came in 30s")

    report = await replay(reading(), named=False, origin_of=Origins(), sender=Sender())

    assert (report.replayed, report.last_replayed) == (2, entries[1])
    assert report.failure is not None
    assert report.failure.startswith("reading the dead letters after 1:1 failed: TimeoutError")


class BuggyCounter:
    """An in-memory bus whose consumer "counter" dead-letters every ThingHappened (no retries) while
    ``broken``, and counts the ``n`` of each it handles once fixed."""

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.broken = True
        self.handled: list[int] = []
        self.bus = InMemoryBus(REGISTRY, max_event_bytes=max_event_bytes)
        self.bus.subscribe(
            Subscription(
                consumer="counter",
                topics=["test.things"],
                handlers={ThingHappened: self.on_thing},
                max_retries=0,
                retry_backoff_s=0,
                max_event_bytes=max_event_bytes,
            )
        )

    async def on_thing(self, event: CloudEvent[Any], tx: Transaction) -> None:
        if self.broken:
            raise RuntimeError("a bug")
        self.handled.append(event.data.n)


async def test_a_fixed_handler_handles_a_replayed_dead_letter_once_however_often_it_is_replayed() -> None:
    counter = BuggyCounter()
    bus, handled = counter.bus, counter.handled
    await bus.publish(thing(7))
    await bus.drain()
    [dead] = bus.dead_letters
    entry = filed(dead.record, reason=dead.reason, consumer=dead.consumer, at=0)
    assert entry.reason == "handler-failed" and handled == []

    class ToBus:
        async def send_many(
            self, items: Sequence[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]]
        ) -> None:
            for topic, key, value, headers in items:
                bus.append_raw(topic, key, value, headers)

    counter.broken = False
    for _ in range(2):
        report = await replay([entry], named=False, origin_of=Origins(), sender=ToBus())
        await bus.drain()
        assert report.replayed == 1

    assert handled == [7]
    assert len(bus.dead_letters) == 1


async def test_an_event_at_the_size_limit_is_sent_and_handled_when_its_dead_letter_is_replayed() -> None:
    """The replay's dlq_replayed_from header is not counted by consumers, and is within the producer's
    headroom: an event exactly at max_event_bytes comes back whole, not oversized."""
    event = thing(7)
    _, value, headers = event.to_kafka()
    limit = record_bytes(value, headers)
    counter = BuggyCounter(max_event_bytes=limit)
    bus, handled = counter.bus, counter.handled
    await bus.publish(event)
    await bus.drain()
    [dead] = bus.dead_letters
    entry = filed(dead.record, reason=dead.reason, consumer=dead.consumer, partition=11, at=9_876_543_210)

    class ProducerToBus(DeadLetterTopic):
        """Refuses records as aiokafka's producer does, puts the ones it sends on the bus."""

        async def send_many(
            self, items: Sequence[tuple[str, bytes | None, bytes | None, Sequence[tuple[str, bytes | None]]]]
        ) -> None:
            await super().send_many(items)
            for topic, key, value, headers in items:
                bus.append_raw(topic, key, value, headers)  # type: ignore[arg-type]

    producer = ProducerToBus(kafka=KafkaSettings(max_event_bytes=limit))
    counter.broken = False
    report = await replay([entry], named=False, origin_of=Origins(), sender=producer)
    await bus.drain()

    assert (report.replayed, dict(report.skipped), report.failure) == (1, {}, None)
    [(_, _, _, sent_headers)] = producer.sent
    assert sent_headers[REPLAYED_FROM] == b"11:9876543210"
    assert handled == [7]
    assert len(bus.dead_letters) == 1


async def test_a_reader_whose_start_fails_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker away: the reader's and the origin records' consumers are stopped, not left open (aiokafka
    warned "Unclosed AIOKafkaConsumer" at the command's exit)."""
    stopped: list[AIOKafkaConsumer] = []

    async def start(self: AIOKafkaConsumer) -> None:
        raise KafkaConnectionError("Unable to bootstrap")

    async def stop(self: AIOKafkaConsumer) -> None:
        stopped.append(self)

    monkeypatch.setattr(AIOKafkaConsumer, "start", start)
    monkeypatch.setattr(AIOKafkaConsumer, "stop", stop)
    with pytest.raises(KafkaConnectionError):
        async with OriginRecords(KafkaSettings(bootstrap="127.0.0.1:1")):
            pass
    assert len(stopped) == 1
