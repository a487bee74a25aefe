"""The Kafka consumer runner on input aiokafka cannot parse, on records too large to copy whole, and when a
rebalance takes a partition mid-batch: it settles every offset and never leaves ``run``.

aiokafka is replaced by :class:`FakeConsumer`, which reproduces what aiokafka 0.14's fetcher does (read in
``.venv/.../aiokafka/consumer/fetcher.py``); the last test pins the one fact of it the runner builds on."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CorruptRecordException, IllegalStateError, MessageSizeTooLargeError
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from contracts.envelope import CloudEvent
from libs.bus import Subscription, Transaction
from libs.bus.kafka import ConsumerRunner, KafkaDeadLetters, KafkaPublisher
from libs.settings import KafkaSettings
from tests.unit.bus_fakes import NullTransaction
from tests.unit.test_bus import REGISTRY, ThingHappened, thing

TOPIC = "test.things"


def tp(partition: int) -> TopicPartition:
    return TopicPartition(TOPIC, partition)


@dataclass
class Message:
    """A record as aiokafka hands it out (the attributes the runner reads)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp: int = 0


class Unparsable:
    """A record aiokafka's parser fails on, with the error it raises."""

    def __init__(self, error: Exception) -> None:
        self.error = error


NOT_UTF8_KEY = Unparsable(UnicodeDecodeError("utf-8", b"ce_\xff", 3, 4, "invalid start byte"))
BAD_CRC = Unparsable(CorruptRecordException("Invalid CRC"))


class FakeConsumer:
    """aiokafka's consumer as the runner sees it, over record batches held in memory.

    As aiokafka does: a fetch returns the record batches from the one holding the position on, and parsing
    a batch parses every record of it, those before the position too, so an unparsable record fails every
    fetch that touches its batch. ``getmany`` walks the partitions in order; one that fails makes it raise,
    after the positions of the partitions before it moved past records it never returns."""

    def __init__(self, batches: dict[TopicPartition, list[list[Any]]]) -> None:
        self.batches = batches
        self.assigned: set[TopicPartition] = set(batches)
        self.positions: dict[TopicPartition, int] = dict.fromkeys(batches, 0)
        self.committed_offsets: dict[TopicPartition, int] = {}
        self.fetched: set[TopicPartition] = set()
        self.getmany_errors = 0
        self.listener: Any = None

    # -- the log --------------------------------------------------------------------------------------

    def end(self, partition: TopicPartition) -> int:
        return sum(len(b) for b in self.batches[partition])

    def _parse_from(self, partition: TopicPartition, position: int) -> Iterator[tuple[int, Any]]:
        """The records from ``position`` on, parsed batch by batch; raises where parsing fails."""
        base = 0
        for batch in self.batches[partition]:
            last = base + len(batch)
            if last > position:
                for i, item in enumerate(batch):
                    if isinstance(item, Unparsable):
                        raise item.error
                    if base + i >= position:
                        yield base + i, item
            base = last

    # -- the consumer API the runner uses ----------------------------------------------------------------

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Message]]:
        await asyncio.sleep(0)
        left = max_records or 10_000
        out: dict[TopicPartition, list[Message]] = {}
        for p in sorted(partitions or self.assigned):
            if p not in self.assigned or left == 0:
                continue
            self.fetched.add(p)
            got: list[Message] = []
            try:
                for offset, item in self._parse_from(p, self.positions[p]):
                    got.append(Message(TOPIC, p.partition, offset, *item))
                    if len(got) == left:
                        break
            except Exception:
                # What this call parsed is lost, the positions of the partitions before this one moved on.
                self.getmany_errors += 1
                raise
            if got:
                self.positions[p] = got[-1].offset + 1
                out[p] = got
                left -= len(got)
        if not out:
            await asyncio.sleep(min(timeout_ms, 5) / 1000)
        return out

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if partition not in self.assigned:
            raise IllegalStateError(f"No current assignment for partition {partition}")
        self.positions[partition] = offset

    async def position(self, partition: TopicPartition) -> int:
        if partition not in self.assigned:
            raise IllegalStateError(f"Partition {partition} is not assigned")
        return self.positions[partition]

    async def committed(self, partition: TopicPartition) -> int | None:
        return self.committed_offsets.get(partition)

    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool:
        for p in partitions:
            self.seek(p, 0)
        return True

    def highwater(self, partition: TopicPartition) -> int | None:
        return self.end(partition) if partition in self.fetched else None

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed_offsets.update(offsets)


class DeadLetterTopic(KafkaPublisher):
    """The runner's producer, keeping what it sends; it refuses records as aiokafka's producer does, by
    aiokafka's own size estimate, and, with ``broker_limit``, as a broker with a smaller limit would."""

    def __init__(self, broker_limit: int | None = None) -> None:
        super().__init__(KafkaSettings())
        self.broker_limit = broker_limit
        self.sent: list[tuple[str, bytes | None, bytes | None, dict[str, bytes]]] = []

    async def send_many(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, Sequence[tuple[str, bytes | None]]]]
    ) -> None:
        for topic, key, value, headers in items:
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers))
            for limit in (self.max_record_bytes, self.broker_limit):
                if limit is not None and size > limit:
                    raise MessageSizeTooLargeError(f"The message is {size} bytes when serialized")
            self.sent.append((topic, key, value, {k: v or b"" for k, v in headers}))


class Store:
    """The service's database: events handled (inbox always new), and a switch that makes it go away."""

    def __init__(self) -> None:
        self.handled: list[tuple[int, int]] = []
        self.down = False

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        if self.down:
            raise ConnectionRefusedError("the database is away")
        yield NullTransaction()

    def subscription(self) -> Subscription:
        async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
            self.handled.append((event.data.n, 0))

        return Subscription(
            consumer="counter", topics=[TOPIC], handlers={ThingHappened: on_thing}, retry_backoff_s=0
        )


def good(n: int) -> tuple[bytes | None, bytes, tuple[tuple[str, bytes], ...]]:
    key, value, headers = thing(n).to_kafka()
    return key, value, tuple(headers)


def runner_on(consumer: FakeConsumer, store: Store, dead: DeadLetterTopic) -> ConsumerRunner:
    runner = ConsumerRunner(
        store.subscription(),
        kafka=KafkaSettings(),
        registry=REGISTRY,
        begin=store.begin,
        dead_letters=KafkaDeadLetters(dead),
        poll_timeout_ms=5,
        commit_interval_s=0.01,
    )
    runner.consumer = consumer
    return runner


async def run_until(
    runner: ConsumerRunner, done: Callable[[], bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the runner on its fake consumer until ``done()``, then stop it; fails if it never is."""
    from libs.bus import kafka

    consumer = runner.consumer
    monkeypatch.setattr(kafka, "AIOKafkaConsumer", lambda **_: consumer)
    task = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(10):
            while not done():
                assert not task.done(), task.exception()
                await asyncio.sleep(0.005)
    finally:
        runner.stop()
        await asyncio.wait_for(task, 5)


def handled(store: Store) -> list[int]:
    return [n for n, _ in store.handled]


def dead_letters(dead: DeadLetterTopic) -> list[tuple[int, int, str]]:
    """(partition, offset, reason) of each dead letter sent."""
    return [
        (int(h["dlq_origin_partition"]), int(h["dlq_origin_offset"]), h["dlq_reason"].decode())
        for _, _, _, h in dead.sent
    ]


# --- unparsable records ------------------------------------------------------------------------------


async def test_a_record_aiokafka_cannot_parse_is_dead_lettered_and_the_partition_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Partition 0: [10, 11]. Partition 1, by record batch: [1, 2] [3, <header key not UTF-8>, 4] [5].
    consumer = FakeConsumer(
        {
            tp(0): [[good(10), good(11)]],
            tp(1): [[good(1), good(2)], [good(3), NOT_UTF8_KEY, good(4)], [good(5)]],
        }
    )
    store, dead = Store(), DeadLetterTopic()
    runner = runner_on(consumer, store, dead)

    await run_until(runner, lambda: runner._settled.get(tp(1)) == 6, monkeypatch)

    assert consumer.getmany_errors > 0
    # Every readable record once, in order per partition: partition 0's, consumed and lost by the getmany
    # that failed on partition 1, are read again.
    assert [n for n in handled(store) if n >= 10] == [10, 11]
    assert [n for n in handled(store) if n < 10] == [1, 2, 3, 5]
    # The unparsable record, and the one after it in its batch, which aiokafka cannot reach either.
    assert dead_letters(dead) == [(1, 3, "unreadable"), (1, 4, "unreadable")]
    _, key, value, headers = dead.sent[0]
    assert (key, value) == (None, b"")
    assert b"UnicodeDecodeError" in headers["dlq_error"]
    await runner.commit_settled()
    assert consumer.committed_offsets == {tp(0): 2, tp(1): 6}


async def test_a_record_batch_with_a_bad_crc_is_dead_lettered_offset_by_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = FakeConsumer({tp(0): [[good(1)], [BAD_CRC, good(2)], [good(3)]]})
    store, dead = Store(), DeadLetterTopic()
    runner = runner_on(consumer, store, dead)

    await run_until(runner, lambda: runner._settled.get(tp(0)) == 4, monkeypatch)

    assert handled(store) == [1, 3]
    assert dead_letters(dead) == [(0, 1, "unreadable"), (0, 2, "unreadable")]


async def test_an_unreadable_offset_is_counted() -> None:
    from libs.bus import metrics

    before = metrics.UNREADABLE.labels("counter", TOPIC)._value.get()
    consumer = FakeConsumer({tp(0): [[NOT_UTF8_KEY]]})
    runner = runner_on(consumer, Store(), DeadLetterTopic())

    poll = await runner._fetch(0)

    assert poll is not None
    assert [(r.offset, type(r).__name__) for r in poll.records] == [(0, "UnreadableRecord")]
    assert metrics.UNREADABLE.labels("counter", TOPIC)._value.get() == before + 1


async def test_a_raw_subscription_gets_the_unreadable_offset_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = FakeConsumer({tp(0): [[good(1), NOT_UTF8_KEY]]})
    got: list[tuple[int, str | None]] = []

    async def keep(deliveries: Any, tx: Transaction) -> None:
        got.extend((d.record.offset, d.error.reason if d.error else None) for d in deliveries)

    store, dead = Store(), DeadLetterTopic()
    runner = ConsumerRunner(
        Subscription(consumer="trail", topics=[TOPIC], batch_handler=keep, raw=True),
        kafka=KafkaSettings(),
        registry=REGISTRY,
        begin=store.begin,
        dead_letters=KafkaDeadLetters(dead),
        poll_timeout_ms=5,
    )
    runner.consumer = consumer

    await run_until(runner, lambda: runner._settled.get(tp(0)) == 2, monkeypatch)

    assert got == [(0, None), (1, "unreadable")]
    assert dead.sent == []


async def test_aiokafka_parses_a_whole_batch_so_records_after_an_unparsable_one_are_unreachable() -> None:
    """The fact about aiokafka 0.14 the runner's isolation rests on (FakeConsumer reproduces it): fetching
    from an offset after the unparsable record, in the same batch, fails too."""
    from aiokafka.consumer.fetcher import PartitionRecords
    from aiokafka.record.memory_records import MemoryRecords
    from aiokafka.record.util import calc_crc32c

    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for offset, name in enumerate(["ce_id", "ce_\u00ff", "ce_id"]):
        builder.append(offset, timestamp=None, key=b"k", value=b"{}", headers=[(name, b"x")])
    raw = bytearray(builder.build())
    raw[raw.index("ce_\u00ff".encode()) + 3] = 0xFF  # c3 bf -> c3 ff: the key is no longer UTF-8
    struct.pack_into(">I", raw, 17, calc_crc32c(bytes(raw[21:])))  # a valid CRC: a client wrote it so

    def read_from(position: int) -> list[int]:
        records = PartitionRecords(tp(0), MemoryRecords(bytes(raw)), [], position, None, None, True, 0)
        return [r.offset for r in records]

    with pytest.raises(UnicodeDecodeError):
        read_from(0)
    with pytest.raises(UnicodeDecodeError):
        read_from(2)


# --- records too large to copy whole --------------------------------------------------------------------


async def test_an_oversized_record_is_dead_lettered_truncated_and_the_partition_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, _, headers = good(1)
    huge = b'{"n": 1, "pad": "' + b"x" * 1_500_000 + b'"}'
    consumer = FakeConsumer({tp(0): [[(key, huge, headers)], [good(2)]]})
    store, dead = Store(), DeadLetterTopic()
    runner = runner_on(consumer, store, dead)

    await run_until(runner, lambda: runner._settled.get(tp(0)) == 2, monkeypatch)

    assert handled(store) == [2]
    assert dead_letters(dead) == [(0, 0, "oversized")]
    [(_, _, value, dlq)] = dead.sent
    assert value is not None and len(value) < len(huge)
    assert dlq["dlq_truncated"] == b"value"
    assert dlq["dlq_original_value_bytes"] == str(len(huge)).encode()


async def test_a_dead_letter_the_broker_refuses_as_too_large_goes_out_without_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, _, headers = good(1)
    big = b'{"n": 1, "pad": "' + b"x" * 200_000 + b'"}'
    consumer = FakeConsumer({tp(0): [[(key, big, headers)], [good(2)]]})
    store, dead = Store(), DeadLetterTopic(broker_limit=100_000)
    runner = runner_on(consumer, store, dead)
    runner.sub.max_event_bytes = 100_000

    await run_until(runner, lambda: runner._settled.get(tp(0)) == 2, monkeypatch)

    assert handled(store) == [2]
    [(_, _, value, dlq)] = dead.sent
    assert value == b""
    assert dlq["dlq_reason"] == b"oversized"
    assert dlq["dlq_truncated"] == b"value"


# --- rebalances ----------------------------------------------------------------------------------------


async def test_a_failed_batch_whose_partition_was_revoked_is_not_sought_and_the_runner_goes_on() -> None:
    consumer = FakeConsumer({tp(0): [[good(1)]], tp(1): [[good(2)]]})
    store, dead = Store(), DeadLetterTopic()
    runner = runner_on(consumer, store, dead)
    runner.consumer = consumer
    polled = await consumer.getmany(max_records=10)
    poll = runner._poll(polled)
    assert poll is not None
    store.down = True
    consumer.assigned.discard(tp(0))  # a rebalance took it while the batch was in flight
    runner.stop()  # no endless retry of the database: the batch fails at once

    settled = await runner._settle(poll)

    assert settled is False
    assert consumer.positions == {tp(0): 1, tp(1): 0}  # only the partition still owned is read again
    assert runner._settled == {}


async def test_a_revoked_partition_forgets_what_its_failed_poll_dead_lettered() -> None:
    # Remembered by position, so that reading the failed poll again skips it; once the partition is gone, a
    # record read there later (a topic deleted and created again hands out its offsets again) is a delivery.
    key, _, headers = good(1)
    consumer = FakeConsumer({tp(0): [[(key, b"not json", headers), good(1), good(2)]]})
    store, dead = Store(), DeadLetterTopic()
    runner = runner_on(consumer, store, dead)
    poll = runner._poll(await consumer.getmany(max_records=10))
    assert poll is not None
    store.down = True
    assert await runner._settle(poll) is False
    assert dead_letters(dead) == [(0, 0, "not-json")]
    store.down = False

    runner.forget([tp(0)])  # what a rebalance's revocation does
    later = runner._poll({tp(0): [Message(TOPIC, 0, 0, *good(9))]})
    assert later is not None
    assert await runner._settle(later) is True

    assert handled(store) == [9]
