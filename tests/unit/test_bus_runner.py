"""The Kafka consumer runner on input aiokafka cannot parse, on records too large to copy whole, when a
rebalance takes a partition mid-batch, and on a poll whose handling outlasts half of ``max_poll_interval_ms``:
it settles every offset, never leaves ``run``, and keeps polling (its partitions paused) while it handles.
Its lag gauge counts what is not settled, a poll in hand included, and leaves with the partition.

aiokafka is replaced by :class:`FakeConsumer`, which reproduces what aiokafka 0.14's fetcher does (read in
``.venv/.../aiokafka/consumer/fetcher.py``); the last test pins the one fact of it the runner builds on."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    IllegalStateError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from prometheus_client import REGISTRY as PROMETHEUS
from structlog.testing import capture_logs

from contracts.envelope import CloudEvent
from libs.bus import Subscription, Transaction
from libs.bus.kafka import (
    MAX_POLL_INTERVAL_MS,
    ConsumerRunner,
    KafkaDeadLetters,
    KafkaPublisher,
    _CommitOnRevoke,
)
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
        self.paused_partitions: set[TopicPartition] = set()
        # Every getmany: the partitions paused when it was called, and those it returned records of.
        self.polls: list[tuple[set[TopicPartition], set[TopicPartition]]] = []
        # Run as each getmany starts: what happens while it waits (a rebalance).
        self.on_getmany: Callable[[], Awaitable[None]] = _nothing
        self.end_offsets_error: Exception | None = None
        self._polled = asyncio.Event()

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
        await self.on_getmany()
        await asyncio.sleep(0)
        left = max_records or 10_000
        out: dict[TopicPartition, list[Message]] = {}
        for p in sorted(partitions or self.assigned):
            if p not in self.assigned or p in self.paused_partitions or left == 0:
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
        self.polls.append((set(self.paused_partitions), set(out)))
        self._polled.set()
        self._polled = asyncio.Event()
        if not out:
            await asyncio.sleep(min(timeout_ms, 5) / 1000)
        return out

    async def until_polled(self, enough: Callable[[], bool]) -> None:
        """Return once ``enough()`` holds, checked after each getmany."""
        while not enough():
            await self._polled.wait()

    def pause(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.update(p for p in partitions if p in self.assigned)

    def resume(self, *partitions: TopicPartition) -> None:
        self.paused_partitions.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return self.paused_partitions & self.assigned

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

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        if self.end_offsets_error is not None:
            raise self.end_offsets_error
        return {p: self.end(p) for p in partitions}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed_offsets.update(offsets)


async def _nothing() -> None:
    return None


class DeadLetterTopic(KafkaPublisher):
    """The runner's producer, keeping what it sends; it refuses records as aiokafka's producer does, by
    aiokafka's own size estimate (its limit: ``kafka``'s ``max_event_bytes`` plus the headroom), and, with
    ``broker_limit``, as a broker with a smaller limit would."""

    def __init__(self, broker_limit: int | None = None, *, kafka: KafkaSettings | None = None) -> None:
        super().__init__(kafka or KafkaSettings())
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


# --- a poll handled for longer than half of max_poll_interval_ms ------------------------------------------


def slow_runner(consumer: FakeConsumer, sub: Subscription) -> ConsumerRunner:
    """A runner that holds a poll after 10 ms of handling, taking one record per poll."""
    runner = ConsumerRunner(
        sub,
        kafka=KafkaSettings(),
        registry=REGISTRY,
        begin=Store().begin,
        dead_letters=KafkaDeadLetters(DeadLetterTopic()),
        max_records=1,
        poll_timeout_ms=5,
        commit_interval_s=0.01,
        max_poll_interval_ms=20,
    )
    runner.consumer = consumer
    return runner


def held_polls(consumer: FakeConsumer, since: int) -> list[tuple[set[TopicPartition], set[TopicPartition]]]:
    """The getmany calls since the ``since``-th made with every assigned partition paused."""
    return [(paused, got) for paused, got in consumer.polls[since:] if paused and paused >= consumer.assigned]


async def test_a_long_handling_polls_with_every_partition_paused_and_takes_no_record_until_it_is_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = FakeConsumer({tp(0): [[good(1)], [good(2)]], tp(1): [[good(3)]]})
    order: list[int] = []
    during: list[tuple[set[TopicPartition], set[TopicPartition]]] = []

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        if event.data.n == 1:
            # Handled until the runner has polled three times meanwhile (it must, or aiokafka drops it).
            since = len(consumer.polls)
            await consumer.until_polled(lambda: len(held_polls(consumer, since)) >= 3)
            during.extend(consumer.polls[since:])
        order.append(event.data.n)

    runner = slow_runner(
        consumer, Subscription(consumer="c", topics=[TOPIC], handlers={ThingHappened: on_thing})
    )

    await run_until(runner, lambda: len(order) == 3, monkeypatch)

    assert order == [1, 2, 3]
    assert all(got == set() for _, got in during), "a poll during the handling returned records"
    assert consumer.paused() == set(), "the partitions were not resumed"


@pytest.mark.parametrize("listener_told", [True, False], ids=["assigned-by-listener", "assigned-mid-poll"])
async def test_a_partition_assigned_while_a_poll_is_held_is_read_after_it_from_its_first_record(
    listener_told: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rebalance while a held poll waits gives this member partition 1. Its records wait for the poll in
    # hand: the rebalance listener pauses it; if a poll returns its records all the same, they are read again
    # later, none skipped.
    consumer = FakeConsumer({tp(0): [[good(1)], [good(2)]], tp(1): [[good(10)], [good(11)]]})
    consumer.assigned.discard(tp(1))
    order: list[int] = []
    during: list[tuple[set[TopicPartition], set[TopicPartition]]] = []

    async def rebalance() -> None:
        if tp(1) not in consumer.assigned:
            consumer.assigned.add(tp(1))
            if listener_told:  # as aiokafka does, before the fetcher can fetch the partition
                await consumer.listener.on_partitions_assigned({tp(1)})

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        if event.data.n == 1:
            since = len(consumer.polls)
            await consumer.until_polled(lambda: bool(held_polls(consumer, since)))
            consumer.on_getmany = rebalance
            await consumer.until_polled(lambda: len(held_polls(consumer, since)) >= 3)
            during.extend(consumer.polls[since:])
        order.append(event.data.n)

    runner = slow_runner(
        consumer, Subscription(consumer="c", topics=[TOPIC], handlers={ThingHappened: on_thing})
    )

    await run_until(runner, lambda: len(order) == 4, monkeypatch)

    assert order[0] == 1
    assert [n for n in order if n >= 10] == [10, 11]
    assert [n for n in order if n < 10] == [1, 2]
    if listener_told:  # paused at once: nothing fetched for nothing
        assert all(got == set() for _, got in during)
    else:
        assert any(tp(1) in got for _, got in during), "the case meant: a poll that returned partition 1"


async def test_a_poll_fetched_ahead_loses_the_partitions_a_rebalance_took_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The poll ahead holds partition 1; a rebalance takes it while the poll before is handled. Its new owner
    # reads it from the committed offset: handling the records ahead here too would race it.
    consumer = FakeConsumer({tp(0): [[good(1)]], tp(1): [[good(2)]]})
    handled_now: list[int] = []
    polls_at_revoke: list[int] = []

    async def handle(deliveries: Sequence[Any], tx: Transaction) -> None:
        handled_now.extend(d.event.data.n for d in deliveries)
        if 1 in handled_now and not polls_at_revoke:
            consumer.assigned.discard(tp(1))
            await consumer.listener.on_partitions_revoked({tp(1)})
            polls_at_revoke.append(len(consumer.polls))

    async def prepare(deliveries: Sequence[Any]) -> None:
        return None

    runner = slow_runner(
        consumer,
        Subscription(consumer="c", topics=[TOPIC], batch_handler=handle, batch_prepare=prepare),
    )
    runner.max_poll_interval_ms = MAX_POLL_INTERVAL_MS  # this poll is not held

    # Two polls after the revocation: a poll ahead still handed out is dispatched before the second.
    await run_until(
        runner, lambda: bool(polls_at_revoke) and len(consumer.polls) > polls_at_revoke[0] + 2, monkeypatch
    )

    assert handled_now == [1]


# --- consumer lag ------------------------------------------------------------------------------------------


def lag(consumer: str, partition: int) -> float | None:
    """The lag series of ``consumer`` on a partition of the test topic (None: no such series)."""
    return PROMETHEUS.get_sample_value(
        "driftloop_bus_consumer_lag", {"consumer": consumer, "topic": TOPIC, "partition": str(partition)}
    )


def lag_runner(consumer: FakeConsumer, name: str, on_thing: Any = None) -> ConsumerRunner:
    """A runner named ``name`` that measures its lag every 10 ms."""

    async def count(event: CloudEvent[Any], tx: Transaction) -> None:
        return None

    runner = ConsumerRunner(
        Subscription(consumer=name, topics=[TOPIC], handlers={ThingHappened: on_thing or count}),
        kafka=KafkaSettings(),
        registry=REGISTRY,
        begin=Store().begin,
        dead_letters=KafkaDeadLetters(DeadLetterTopic()),
        poll_timeout_ms=5,
        commit_interval_s=0.01,
        lag_interval_s=0.01,
    )
    runner.consumer = consumer
    return runner


async def test_the_lag_is_the_end_offset_minus_the_settled_position_a_poll_in_hand_included() -> None:
    consumer = FakeConsumer({tp(0): [[good(1), good(2), good(3)], [good(4), good(5)]], tp(1): [[good(6)]]})
    consumer.positions[tp(1)] = 1  # where its committed offset has it start
    runner = lag_runner(consumer, "lag-settled")

    await runner.report_lag()
    assert (lag("lag-settled", 0), lag("lag-settled", 1)) == (5, 0)

    poll = runner._poll(await consumer.getmany(tp(0), max_records=3))
    assert poll is not None
    await runner.report_lag()
    assert lag("lag-settled", 0) == 5, "the poll handed out but not settled is still behind"

    assert await runner._settle(poll) is True
    await runner.report_lag()
    assert lag("lag-settled", 0) == 2


async def test_a_revoked_partition_loses_its_lag_series() -> None:
    consumer = FakeConsumer({tp(0): [[good(1)]], tp(1): [[good(2)]]})
    runner = lag_runner(consumer, "lag-revoked")
    consumer.listener = _CommitOnRevoke(runner)
    await runner.report_lag()
    assert (lag("lag-revoked", 0), lag("lag-revoked", 1)) == (1, 1)

    consumer.assigned.discard(tp(1))
    await consumer.listener.on_partitions_revoked({tp(1)})

    assert (lag("lag-revoked", 0), lag("lag-revoked", 1)) == (1, None)


async def test_a_partition_gone_without_a_revocation_loses_its_series_at_the_next_measurement() -> None:
    # A partition revoked while a measurement awaited the broker: that measurement must not set it again.
    consumer = FakeConsumer({tp(0): [[good(1)]], tp(1): [[good(2)]]})
    runner = lag_runner(consumer, "lag-lost")
    await runner.report_lag()
    consumer.assigned.discard(tp(1))

    await runner.report_lag()

    assert (lag("lag-lost", 0), lag("lag-lost", 1)) == (1, None)


async def test_the_lag_moves_while_a_handler_is_stuck_and_its_series_leave_when_the_consumer_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = FakeConsumer({tp(0): [[good(1)]]})
    release = asyncio.Event()

    async def stuck(event: CloudEvent[Any], tx: Transaction) -> None:
        await release.wait()

    runner = lag_runner(consumer, "lag-stuck", stuck)

    seen: list[float | None] = []

    def stuck_behind_then_released() -> bool:
        now = lag("lag-stuck", 0)
        if not seen or now != seen[-1]:
            seen.append(now)
        if now == 1 and consumer.end(tp(0)) == 1:
            consumer.batches[tp(0)].append([good(2), good(3)])  # produced while the handler waits
        elif now == 3 and not release.is_set():
            assert runner._settled == {}, "the handler was not stuck"
            release.set()
        return release.is_set() and now == 0

    await run_until(runner, stuck_behind_then_released, monkeypatch)

    assert seen[:3] == [None, 1, 3] and seen[-1] == 0, seen
    assert lag("lag-stuck", 0) is None, "the stopped consumer still reports a lag"


async def test_a_lag_that_cannot_be_measured_is_warned_of_once_and_consuming_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consumer = FakeConsumer({tp(0): [[good(1)], [good(2)]]})
    consumer.end_offsets_error = KafkaTimeoutError("Failed to get offsets by times in 40000 ms")
    runner = lag_runner(consumer, "lag-failing")

    def levels() -> list[str]:
        return [e["log_level"] for e in logs if e["event"] == "consumer lag not measured, trying again later"]

    with capture_logs() as logs:
        await run_until(runner, lambda: runner._settled.get(tp(0)) == 2 and len(levels()) >= 3, monkeypatch)

    assert levels()[0] == "warning"
    assert set(levels()[1:]) == {"debug"}
    assert lag("lag-failing", 0) is None


async def test_a_commit_round_that_fails_otherwise_than_kafka_is_logged_and_the_next_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stray CancelledError of the client (not this task's cancellation) ended the committer: offsets went
    # uncommitted until a revocation or the stop, and nothing said so.
    consumer = FakeConsumer({tp(0): [[good(1)], [good(2)]]})
    commit = consumer.commit
    failures = [asyncio.CancelledError(), RuntimeError("the client's own bug")]

    async def failing_first(offsets: dict[TopicPartition, int]) -> None:
        if failures:
            raise failures.pop(0)
        await commit(offsets)

    consumer.commit = failing_first  # type: ignore[method-assign]
    runner = lag_runner(consumer, "commit-failing")
    with capture_logs() as logs:
        await run_until(runner, lambda: consumer.committed_offsets.get(tp(0)) == 2, monkeypatch)
    failed = [e for e in logs if e["event"] == "offset commit failed"]
    assert [e["log_level"] for e in failed] == ["warning", "warning"]
    assert failures == []
