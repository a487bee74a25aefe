"""Dead letters are always writable and written once: a record too large to copy whole is copied truncated
(with its size and hash), a write that failed is not reported as done, a poll read again after a failure
does not dead-letter its records twice, and an outbox row Kafka refuses is set aside instead of holding
up the rows behind it."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
from aiokafka.errors import MessageSizeTooLargeError, OutOfOrderSequenceNumber
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from structlog.testing import capture_logs

from contracts.envelope import CloudEvent
from contracts.topics import DEAD_LETTER
from libs.bus import Dispatcher, Record, Subscription, Transaction, metrics
from libs.bus.kafka import (
    DEAD_LETTER_HEADER_VALUE_BYTES,
    KafkaDeadLetters,
    KafkaPublisher,
    dead_letter_message,
)
from libs.bus.postgres import OutboxRelay
from libs.settings import KafkaSettings
from tests.unit.bus_fakes import NullTransaction
from tests.unit.test_bus import REGISTRY, ThingHappened, thing

LIMIT = 1_000_000 + 64 * 1024  # the producer's, for the default max_event_bytes


def record_of(event: CloudEvent[Any], offset: int, **changes: Any) -> Record:
    key, value, headers = event.to_kafka()
    fields: dict[str, Any] = {"key": key, "value": value, "headers": tuple(headers), **changes}
    return Record("test.things", 0, offset, **fields)


def size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]) -> int:
    return DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers)


def letter(
    record: Record, max_bytes: int = LIMIT
) -> tuple[bytes | None, bytes | None, dict[str, bytes | None]]:
    key, value, headers = dead_letter_message(
        record, consumer="counter", reason="oversized", error="too big", max_bytes=max_bytes
    )
    assert size(key, value, headers) <= max(max_bytes, 64 * 1024)
    return key, value, dict(headers)


# --- what a dead letter holds ---------------------------------------------------------------------------


def test_a_record_that_fits_is_dead_lettered_whole_with_why_and_where_from() -> None:
    record = record_of(thing(1), 7, headers=(*thing(1).to_kafka()[2], ("dlq_reason", b"spoofed")))

    key, value, headers = letter(record)

    assert (key, value) == (record.key, record.value)
    assert headers["dlq_reason"] == b"oversized"
    assert headers["dlq_origin_offset"] == b"7"
    assert headers["ce_id"] == dict(record.headers)["ce_id"]
    assert "dlq_truncated" not in headers


def test_a_value_too_large_to_copy_is_cut_with_its_size_and_hash_kept() -> None:
    huge = b'{"n": 1, "pad": "' + b"x" * 1_500_000 + b'"}'
    record = record_of(thing(1), 41, value=huge)

    key, value, headers = letter(record)

    assert value is not None and huge.startswith(value) and 1_000_000 < len(value) < len(huge)
    assert headers["dlq_truncated"] == b"value"
    assert headers["dlq_original_value_bytes"] == b"1500019"
    assert headers["dlq_original_value_sha256"] == hashlib.sha256(huge).hexdigest().encode()
    assert headers["ce_id"] == dict(record.headers)["ce_id"]  # the original headers are kept
    assert key == record.key


def test_oversized_headers_and_key_are_cut_too() -> None:
    event = thing(1)
    hostile = [(n, b"c" * 1_200_000 if n == "ce_correlationid" else v) for n, v in event.to_kafka()[2]]
    record = record_of(event, 3, key=b"k" * 100_000, headers=(*hostile, ("x" * 1000, b"long name")))

    key, value, headers = letter(record)

    assert headers["dlq_truncated"] == b"key,headers"
    assert value == record.value
    assert key == b"k" * 2048
    assert headers["ce_correlationid"] == b"c" * DEAD_LETTER_HEADER_VALUE_BYTES
    assert "x" * 1000 not in headers
    assert int(headers["dlq_original_headers_bytes"] or b"0") > 1_200_000


@pytest.mark.parametrize("max_bytes", [LIMIT, 0], ids=["whole", "truncated"])
def test_the_dead_letter_of_a_tombstone_is_a_tombstone(max_bytes: int) -> None:
    # An empty value is another record: replayed, it would not delete what the tombstone deletes.
    record = record_of(thing(1), 5, value=None)

    _, value, headers = letter(record, max_bytes=max_bytes)

    assert value is None
    assert headers["dlq_reason"] == b"oversized"


def test_the_smallest_dead_letter_has_no_value_but_says_what_it_was() -> None:
    record = record_of(thing(1), 3)

    _, value, headers = letter(record, max_bytes=0)

    assert value == b""
    assert headers["dlq_truncated"] == b"value"
    assert headers["dlq_original_value_sha256"] == hashlib.sha256(record.value or b"").hexdigest().encode()


# --- when it is written ---------------------------------------------------------------------------------


class Sink:
    """A dead-letter topic that may be unreachable."""

    def __init__(self) -> None:
        self.written: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self.down = False

    async def dead_letter(self, record: Record, *, consumer: str, reason: str, error: str) -> None:
        if self.down:
            raise ConnectionError("the broker is away")
        self.written.append((record.offset, reason))
        self.errors.append(error)


class Database:
    """Handler transactions (every event new to the inbox); ``fail_next`` fails that many as the database
    going away would."""

    def __init__(self) -> None:
        self.fail_next = 0

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        yield NullTransaction()
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionResetError("the database went away before commit")


async def test_a_dead_letter_that_could_not_be_written_is_neither_logged_nor_counted_as_written() -> None:
    sink, db = Sink(), Database()
    sink.down = True
    sub = Subscription(consumer="counter", topics=["test.things"], handlers={})
    d = Dispatcher(sub, registry=REGISTRY, begin=db.begin, dead_letters=sink)
    counted = metrics.DEAD_LETTERED.labels("counter", "test.things", "not-json")
    before = counted._value.get()

    with capture_logs() as logs, pytest.raises(ConnectionError):
        await d.dispatch([record_of(thing(0), 0, value=b"not json")])

    assert [line for line in logs if line["event"] == "dead-lettered"] == []
    assert counted._value.get() == before
    sink.down = False
    with capture_logs() as logs:
        await d.dispatch([record_of(thing(0), 0, value=b"not json")])
    assert [line["reason"] for line in logs if line["event"] == "dead-lettered"] == ["not-json"]
    assert counted._value.get() == before + 1


async def test_a_poll_read_again_after_a_failure_does_not_dead_letter_its_records_twice() -> None:
    sink, db = Sink(), Database()
    attempts: list[int] = []
    stopping = False

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        attempts.append(event.data.n)
        if event.data.n == 13:
            raise RuntimeError("unlucky")

    sub = Subscription(
        consumer="counter",
        topics=["test.things"],
        handlers={ThingHappened: on_thing},
        max_retries=1,
        retry_backoff_s=0,
    )
    d = Dispatcher(sub, registry=REGISTRY, begin=db.begin, dead_letters=sink, stopping=lambda: stopping)
    poll = [
        record_of(thing(0), 0, value=b"not json"),
        record_of(thing(13), 1),
        record_of(thing(14), 2),
    ]
    # The group commit fails on 13, which is then dead-lettered alone; 14's own transaction loses the
    # database while the service stops: the poll is not settled, and the runner will read it again.
    db.fail_next = 2
    stopping = True
    with pytest.raises(ConnectionResetError):
        await d.dispatch(poll)
    assert sink.written == [(0, "not-json"), (1, "handler-failed")]
    tried = attempts.count(13)

    stopping = False
    await d.dispatch(list(poll))

    assert sink.written == [(0, "not-json"), (1, "handler-failed")]
    assert attempts.count(13) == tried
    assert attempts[-1] == 14


async def test_a_poll_read_again_after_another_partitions_does_not_dead_letter_its_records_twice() -> None:
    sink, db = Sink(), Database()

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        return None

    sub = Subscription(
        consumer="counter", topics=["test.things"], handlers={ThingHappened: on_thing}, retry_backoff_s=0
    )
    d = Dispatcher(sub, registry=REGISTRY, begin=db.begin, dead_letters=sink)
    poll = [record_of(thing(0), 0, value=b"not json"), record_of(thing(1), 1), record_of(thing(2), 2)]
    # The malformed record is dead-lettered, then the group commit loses the database: the poll is not
    # settled, and the runner seeks partition 0 back to read it again.
    db.fail_next = 1
    with pytest.raises(ConnectionResetError):
        await d.dispatch(poll)
    assert sink.written == [(0, "not-json")]

    # Kafka hands out what it had fetched of another partition before partition 0's records come again.
    await d.dispatch([replace(record_of(thing(7), 0), partition=1)])
    await d.dispatch(list(poll))

    assert sink.written == [(0, "not-json")]


async def test_a_consumers_own_dead_letter_that_fails_again_is_left_not_written_again() -> None:
    """A consumer that reads the dead-letter topic (audit records it) never feeds its own failures back."""
    sink, db = Sink(), Database()

    async def failing(deliveries: Sequence[Any], tx: Transaction) -> None:
        raise RuntimeError("cannot record it")

    sub = Subscription(
        consumer="audit",
        topics=[DEAD_LETTER],
        batch_handler=failing,
        raw=True,
        max_retries=0,
        retry_backoff_s=0,
    )
    d = Dispatcher(sub, registry=REGISTRY, begin=db.begin, dead_letters=sink)
    original = record_of(thing(1), 3)
    theirs = dead_letter_message(original, consumer="counter", reason="x", error="y", max_bytes=LIMIT)
    ours = dead_letter_message(original, consumer="audit", reason="x", error="y", max_bytes=LIMIT)
    left = metrics.DEAD_LETTERS_LEFT.labels("audit", DEAD_LETTER)
    before = left._value.get()

    await d.dispatch([Record(DEAD_LETTER, 0, 0, theirs[0], theirs[1], tuple(theirs[2]))])
    await d.dispatch([Record(DEAD_LETTER, 0, 1, ours[0], ours[1], tuple(ours[2]))])

    assert sink.written == [(0, "handler-failed")]  # another consumer's dead letter: dead-lettered once
    assert left._value.get() == before + 1


async def test_a_dead_letter_replayed_to_its_topic_that_fails_again_is_dead_lettered_again() -> None:
    """Only the dead-letter topic's own records are left where they are: an operator who copies a dead letter
    back to its topic, headers and all, and sees it fail again gets a new dead letter with the new reason."""
    sink, db = Sink(), Database()

    async def failing(event: CloudEvent[Any], tx: Transaction) -> None:
        raise RuntimeError("still cannot handle it")

    sub = Subscription(
        consumer="counter",
        topics=["test.things"],
        handlers={ThingHappened: failing},
        max_retries=0,
        retry_backoff_s=0,
    )
    d = Dispatcher(sub, registry=REGISTRY, begin=db.begin, dead_letters=sink)
    key, value, headers = dead_letter_message(
        record_of(thing(1), 3), consumer="counter", reason="handler-failed", error="boom", max_bytes=LIMIT
    )
    left = metrics.DEAD_LETTERS_LEFT.labels("counter", "test.things")
    before = left._value.get()

    await d.dispatch([Record("test.things", 0, 9, key, value, tuple(headers))])

    assert sink.written == [(9, "handler-failed")]
    assert left._value.get() == before


# --- the outbox ---------------------------------------------------------------------------------------


class _OutboxConn:
    """The outbox table: rows with seq, topic, key, value, headers and sent_at."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    async def fetchval(self, sql: str, *args: Any) -> bool:
        return True

    async def fetch(self, sql: str, limit: int, max_bytes: int) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["sent_at"] is None][:limit]

    async def execute(self, sql: str, seqs: list[int]) -> None:
        assert sql.startswith("UPDATE outbox SET sent_at")
        for r in self.rows:
            if r["seq"] in seqs:
                r["sent_at"] = "now"


class _Pool:
    def __init__(self, conn: _OutboxConn) -> None:
        self.conn = conn

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[_OutboxConn]:
        yield self.conn


class Broker:
    """Takes records up to its size limit, as aiokafka's producer checks it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.log: list[tuple[str, bytes | None, dict[str, bytes]]] = []

    async def send_many(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]]
    ) -> None:
        for topic, key, value, headers in items:
            if size(key, value, list(headers)) > self.limit:
                raise MessageSizeTooLargeError("The message is too large")
            self.log.append((topic, value, dict(headers)))


async def test_an_outbox_row_kafka_refuses_is_set_aside_and_the_rows_behind_it_go_out() -> None:
    headers = [["ce_id", "e-1"], ["ce_type", "io.driftloop.DriftDetected.v1"]]
    rows = [
        {"seq": 1, "topic": "mlops.monitoring", "key": b"churn", "value": b"{" + b" " * 300_000 + b"}"},
        {"seq": 2, "topic": "mlops.monitoring", "key": b"churn", "value": b"{}"},
    ]
    for row in rows:
        row.update(headers=headers, sent_at=None)
    broker = Broker(limit=200_000)
    relay = OutboxRelay(_Pool(_OutboxConn(rows)), "monitoring", broker, max_record_bytes=200_000)
    set_aside = metrics.OUTBOX_SET_ASIDE.labels("monitoring", "mlops.monitoring")
    before = set_aside._value.get()

    assert await relay.flush_once() == 2
    assert await relay.flush_once() == 0

    assert [r["sent_at"] for r in rows] == ["now", "now"]
    [(topic, value, dlq), (sent_topic, sent_value, _)] = broker.log
    assert value is not None and 0 < len(value) < 300_002
    assert (topic, dlq["dlq_reason"], dlq["dlq_consumer"]) == (
        DEAD_LETTER,
        b"output-oversized",
        b"monitoring-outbox",
    )
    assert dlq["dlq_origin_topic"] == b"mlops.monitoring" and dlq["dlq_truncated"] == b"value"
    assert dlq["dlq_original_value_bytes"] == b"300002"
    assert (sent_topic, sent_value) == ("mlops.monitoring", b"{}")
    assert set_aside._value.get() == before + 1


# --- the producer after a refusal -----------------------------------------------------------------------


class IdempotentProducer:
    """aiokafka's idempotent producer as the broker answers it: a batch over the topic's limit is refused,
    and its sequence numbers stay taken, so every later batch to that partition is refused as out of order
    (read in aiokafka 0.14's message_accumulator.py and sender.py; the real broker does it in
    tests/integration/test_bus_broker_refusals.py)."""

    def __init__(self, topic_limit: int, log: list[tuple[str, bytes]]) -> None:
        self.topic_limit = topic_limit
        self.log = log
        self.broken: set[str] = set()
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def send(
        self, topic: str, *, value: bytes, key: bytes | None, headers: Sequence[tuple[str, bytes | None]]
    ) -> asyncio.Future[None]:
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if topic in self.broken:
            answer.set_exception(OutOfOrderSequenceNumber())
        elif size(key, value, list(headers)) > self.topic_limit:
            self.broken.add(topic)
            answer.set_exception(MessageSizeTooLargeError())
        else:
            self.log.append((topic, value))
            answer.set_result(None)
        return answer


class FakeBrokerPublisher(KafkaPublisher):
    """The real publisher, started, on :class:`IdempotentProducer` instead of aiokafka's."""

    def __init__(self, topic_limit: int) -> None:
        super().__init__(KafkaSettings())
        self.topic_limit = topic_limit
        self.log: list[tuple[str, bytes]] = []
        self.producers: list[IdempotentProducer] = []
        self._producer = self._new_producer()

    def _new_producer(self) -> Any:
        self.producers.append(IdempotentProducer(self.topic_limit, self.log))
        return self.producers[-1]


async def test_a_batch_the_broker_refuses_costs_its_records_and_not_the_partition() -> None:
    publisher = FakeBrokerPublisher(topic_limit=100_000)
    await publisher.send_many([("t", None, b"before", [])])

    with pytest.raises(MessageSizeTooLargeError):
        await publisher.send_many([("t", None, b"x" * 200_000, []), ("t", None, b"behind it", [])])
    await publisher.send_many([("t", None, b"after", [])])

    assert publisher.log == [("t", b"before"), ("t", b"after")]
    first, second = publisher.producers
    assert first.stopped and not second.stopped


async def test_a_dead_letter_the_broker_refuses_goes_without_its_value_and_the_next_one_whole() -> None:
    publisher = FakeBrokerPublisher(topic_limit=100_000)
    writer = KafkaDeadLetters(publisher)
    for offset, value in enumerate([b"not json", b"x" * 200_000, b"not json either"]):
        record = Record("test.things", 0, offset, b"churn", value, ())
        await writer.dead_letter(record, consumer="counter", reason="not-json", error="value is not JSON")

    assert [(topic, value) for topic, value in publisher.log] == [
        (DEAD_LETTER, b"not json"),
        (DEAD_LETTER, b""),
        (DEAD_LETTER, b"not json either"),
    ]


async def test_an_outbox_row_the_broker_refuses_is_set_aside_and_the_rows_behind_it_go_out_after_it() -> None:
    rows: list[dict[str, Any]] = [
        {"seq": n, "topic": "mlops.monitoring", "key": b"churn", "value": value, "sent_at": None}
        for n, value in enumerate([b"{}", b"{" + b" " * 200_000 + b"}", b"[]"], start=1)
    ]
    for row in rows:
        row["headers"] = [["ce_id", f"e-{row['seq']}"]]
    publisher = FakeBrokerPublisher(topic_limit=100_000)
    relay = OutboxRelay(_Pool(_OutboxConn(rows)), "monitoring", publisher)

    assert await relay.flush_once() == 3

    # The first row went out with the refused batch and again alone: consumers absorb the repeat.
    assert publisher.log == [
        ("mlops.monitoring", b"{}"),
        ("mlops.monitoring", b"{}"),
        (DEAD_LETTER, b""),
        ("mlops.monitoring", b"[]"),
    ]
    assert [r["sent_at"] for r in rows] == ["now", "now", "now"]
