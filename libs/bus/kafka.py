"""The bus's Kafka side: an idempotent producer, the dead-letter writer, and the consumer runner."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import random
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    UnsupportedCodecError,
)
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from contracts.envelope import CloudEvent, EventTypeRegistry
from contracts.topics import DEAD_LETTER
from libs.bus import metrics
from libs.bus.core import (
    Dispatcher,
    RawSender,
    Record,
    Subscription,
    TransactionFactory,
    UnreadableRecord,
    being_cancelled,
    encode_outgoing,
    stop_if_being_cancelled,
)
from libs.logging import get_logger
from libs.settings import KafkaSettings

log = get_logger(__name__)

RECORD_HEADROOM_BYTES = 64 * 1024
"""What the producer sends above ``max_event_bytes``: room for the dead-letter headers and the record's
framing, so a dead letter of any event a consumer accepted goes out whole, and so does a replay of one (the
original plus its ``dlq_replayed_from`` header, which consumers do not count either). The broker's (and the
dead-letter topic's) message size limit must be at least ``max_event_bytes`` plus this."""

TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)
"""What aiokafka raises when a record is too large for the producer's limit or the broker's: retrying the
same bytes cannot help."""

UNREADABLE = (
    UnicodeDecodeError,
    CorruptRecordException,
    UnsupportedCodecError,
    zlib.error,
    gzip.BadGzipFile,
    EOFError,
)
"""What aiokafka raises from ``getmany`` when it cannot parse a fetched record batch: a header key that is
not UTF-8, a bad CRC or structure, a compression codec it lacks or data that does not decompress. The
batch is parsed again on every fetch, so the error comes back until the consumer moves past it."""


BATCHED_FROM = 8
"""From this many records, :meth:`KafkaPublisher.send_many` builds the record batches itself. Fewer go one
``send`` each: concurrent single sends then share the accumulator's open batch, where a batch of their own
would wait for the partition's batch before it to be drained."""


class KeyPartitioner:
    """The partition aiokafka's ``send`` chooses for a record (its default partitioner), for code that builds
    its record batches itself: by the murmur2 hash of the key, any partition for a record without one. The
    hash is pure Python (~3.5 µs), so each key's is kept (keys are model names: few, and reused), up to
    ``max_keys`` of them, then it starts again."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self.max_keys = max_keys
        self._hashes: dict[bytes, int] = {}

    def __call__(self, key: bytes | None, partitions: Sequence[int]) -> int:
        """The partition among ``partitions`` (all of the topic's, sorted) for ``key``."""
        if key is None:
            return random.choice(partitions)
        if (hashed := self._hashes.get(key)) is None:
            if len(self._hashes) >= self.max_keys:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return partitions[hashed % len(partitions)]


class _NotSubmitted(Exception):
    """A partition's batches stopped being submitted; the ones before were."""

    def __init__(self, submitted: list[asyncio.Future[Any]]) -> None:
        super().__init__("not every batch was submitted")
        self.submitted = submitted


class KafkaPublisher:
    """An idempotent producer (acks=all): a retried send never duplicates a record in the log.

    A batch the broker refuses (a record over the topic's ``max.message.bytes``) keeps the sequence numbers
    aiokafka gave it, so the broker would refuse every later batch to that partition as out of order for as
    long as the producer lives: after any refused batch, the producer is replaced by a fresh one (a new
    producer id) before the error is raised, and the caller's next send goes through."""

    def __init__(self, kafka: KafkaSettings, *, linger_ms: int = 2, client_id: str = "driftloop") -> None:
        self.kafka = kafka
        self.linger_ms = linger_ms
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._renewing = asyncio.Lock()
        self._partition = KeyPartitioner()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            enable_idempotence=True,
            acks="all",
            linger_ms=self.linger_ms,
            max_request_size=self.max_record_bytes,
            client_id=self.client_id,
            **self.kafka.client_options(),
        )

    async def start(self) -> None:
        producer = self._new_producer()
        try:
            await producer.start()
        except BaseException:
            await producer.stop()  # a failed start leaves its client open; the caller may try again
            raise
        self._producer = producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @property
    def max_record_bytes(self) -> int:
        """The largest record the producer sends (aiokafka's estimate of it, framing included)."""
        return self.kafka.max_event_bytes + RECORD_HEADROOM_BYTES

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("KafkaPublisher.start() was not awaited")
        return self._producer

    async def publish(self, event: CloudEvent[Any]) -> None:
        """Send one event and wait for the broker's acknowledgement; an event consumers would refuse as
        oversized is refused here (:class:`~libs.bus.core.EventTooLarge`)."""
        key, value, headers = encode_outgoing(event, max_bytes=self.kafka.max_event_bytes)
        await self.send_many([(event.topic, key, value, headers)])

    async def send_many(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, Sequence[tuple[str, bytes | None]]]]
    ) -> None:
        """Send records (in order per partition) and wait until all are acknowledged. If the broker refused
        any, the first refusal is raised once every record has its answer and the producer is renewed."""
        producer = self.producer
        not_submitted: BaseException | None = None
        if len(items) >= BATCHED_FROM:
            futures, not_submitted = await self._send_batches(producer, items)
        else:
            futures = [
                await producer.send(self.kafka.physical(topic), value=value, key=key, headers=headers)
                for topic, key, value, headers in items
            ]
        answers = await asyncio.gather(*futures, return_exceptions=True)
        refused = next((a for a in answers if isinstance(a, BaseException)), None)
        if refused is not None:
            await self._renew(producer, refused)
            raise refused
        if not_submitted is not None:
            raise not_submitted
        for topic, count in Counter(topic for topic, *_ in items).items():
            metrics.PUBLISHED.labels(topic).inc(count)

    async def _send_batches(
        self,
        producer: AIOKafkaProducer,
        items: Sequence[tuple[str, bytes | None, bytes | None, Sequence[tuple[str, bytes | None]]]],
    ) -> tuple[list[asyncio.Future[Any]], BaseException | None]:
        """Submit ``items`` as whole record batches, built here per partition in order: what ``send`` does
        per record (a future, the accumulator, the partitioner's pure-Python murmur2) cost more than the
        rest of a small event's publishing. Partitions are chosen as ``send`` chooses them
        (:class:`KeyPartitioner`). Returns the batches' futures, and what stopped a submission (the futures
        submitted before it are still answered)."""
        batches: dict[TopicPartition, list[Any]] = {}
        partitions_of: dict[str, list[int]] = {}
        for topic, key, value, headers in items:
            physical = self.kafka.physical(topic)
            if (partitions := partitions_of.get(physical)) is None:
                partitions = partitions_of[physical] = sorted(await producer.partitions_for(physical))
            tp = TopicPartition(physical, self._partition(key, partitions))
            builders = batches.setdefault(tp, [])
            if (
                not builders
                or builders[-1].append(key=key, value=value, timestamp=None, headers=headers) is None
            ):
                # A batch takes its first record whatever its size (the broker judges it, as with send).
                builders.append(producer.create_batch())
                builders[-1].append(key=key, value=value, timestamp=None, headers=headers)

        async def submit(tp: TopicPartition, builders: list[Any]) -> list[asyncio.Future[Any]]:
            # In order: the accumulator takes a partition's batch once the one before it is drained.
            submitted: list[asyncio.Future[Any]] = []
            try:
                for builder in builders:
                    submitted.append(await producer.send_batch(builder, tp.topic, partition=tp.partition))
            except Exception as exc:
                exc.add_note(f"{len(submitted)} of {len(builders)} batches to {tp} were submitted")
                raise _NotSubmitted(submitted) from exc
            return submitted

        outcomes = await asyncio.gather(*(submit(tp, b) for tp, b in batches.items()), return_exceptions=True)
        futures: list[asyncio.Future[Any]] = []
        failed: BaseException | None = None
        for outcome in outcomes:
            if isinstance(outcome, _NotSubmitted):
                futures += outcome.submitted
                failed = failed or outcome.__cause__
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                futures += outcome
        return futures, failed

    def _is_current(self, producer: AIOKafkaProducer) -> bool:
        return self._producer is producer

    async def _renew(self, broken: AIOKafkaProducer, error: BaseException) -> None:
        """Replace ``broken`` (a producer a batch was refused to) by a fresh one, unless another send did
        already. If the fresh one cannot start, the old one stays: the next refusal tries again."""
        async with self._renewing:
            if not self._is_current(broken):
                return
            fresh = self._new_producer()
            try:
                await fresh.start()
            except KafkaError as exc:
                log.warning("the producer could not be renewed", error=repr(exc), after=repr(error))
                with suppress(Exception):  # what the failed start left open
                    await fresh.stop()
                return
            self._producer = fresh
        log.warning("the broker refused a batch: producer renewed", error=repr(error))
        try:
            # Its other batches are answered before it stops; what it still sends is the caller's to retry.
            await broken.stop()
        except Exception as exc:
            log.warning("the replaced producer did not stop cleanly", error=repr(exc))


DEAD_LETTER_HEADER_BYTES = 16 * 1024
"""A dead letter too large to send whole keeps the original headers, in order, up to this many bytes."""
DEAD_LETTER_HEADER_VALUE_BYTES = 2048
"""... each cut to this many bytes: a CloudEvents attribute within its bound (512 characters) fits whole."""
DEAD_LETTER_HEADER_NAME_CHARS = 256
DEAD_LETTER_KEY_BYTES = 2048
_TRUNCATED_PARTS = "key,value,headers"


def record_of(kafka: KafkaSettings, message: Any) -> Record:
    """An aiokafka ``ConsumerRecord`` as the bus's :class:`Record`, its topic by logical name."""
    return Record(
        topic=kafka.logical(message.topic),
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        headers=tuple(message.headers or ()),
        timestamp_ms=message.timestamp,
    )


def dead_letter_message(
    record: Record, *, consumer: str, reason: str, error: str, max_bytes: int
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]:
    """The dead letter of ``record`` as (key, value, headers): the original with ``dlq_*`` headers saying
    why and where from, or, if that would be larger than ``max_bytes`` (aiokafka's estimate, as its
    producer checks it), a truncated copy that fits.

    A truncated copy keeps a prefix of the value, the original headers (each cut, up to
    :data:`DEAD_LETTER_HEADER_BYTES` in all) and the key (cut), and says what was cut (``dlq_truncated``),
    the original value's size and sha256 and the original headers' size: the original can be found and
    checked in the origin topic by ``dlq_origin_*``. A dead letter must always be writable: one that is not
    blocks its partition. A tombstone's dead letter is a tombstone (a null value), as the record was; an
    unreadable record's value is unknown, and its dead letter's is empty."""
    value = record.value or b""
    tombstone = record.value is None and not isinstance(record, UnreadableRecord)
    original = [(name, raw) for name, raw in record.headers if not name.startswith("dlq_")]
    why: list[tuple[str, bytes | None]] = [
        ("dlq_reason", reason.encode()),
        ("dlq_error", error[:4000].encode()),
        ("dlq_consumer", consumer.encode()),
        ("dlq_origin_topic", record.topic.encode()),
        ("dlq_origin_partition", str(record.partition).encode()),
        ("dlq_origin_offset", str(record.offset).encode()),
    ]
    whole = [*original, *why]
    if DefaultRecordBatchBuilder.estimate_size_in_bytes(record.key, value, whole) <= max_bytes:
        return record.key, None if tombstone else value, whole
    cut: list[str] = []
    key = record.key
    if key is not None and len(key) > DEAD_LETTER_KEY_BYTES:
        key = key[:DEAD_LETTER_KEY_BYTES]
        cut.append("key")
    kept: list[tuple[str, bytes | None]] = []
    room = DEAD_LETTER_HEADER_BYTES
    for name, raw in original:
        short = raw[:DEAD_LETTER_HEADER_VALUE_BYTES] if raw is not None else None
        size = len(name.encode()) + len(short or b"")
        if len(name) > DEAD_LETTER_HEADER_NAME_CHARS or size > room:
            continue
        kept.append((name, short))
        room -= size
    if len(kept) < len(original) or any(k[1] != o[1] for k, o in zip(kept, original, strict=False)):
        cut.append("headers")
    header_bytes = sum(len(name.encode()) + len(raw or b"") for name, raw in original)
    about: list[tuple[str, bytes | None]] = [
        ("dlq_original_value_bytes", str(len(value)).encode()),
        ("dlq_original_value_sha256", hashlib.sha256(value).hexdigest().encode()),
        ("dlq_original_headers_bytes", str(header_bytes).encode()),
    ]
    # Sized with the longest dlq_truncated there can be, so the value's prefix fits whatever is cut.
    framing = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        key, b"", [*kept, *why, *about, ("dlq_truncated", _TRUNCATED_PARTS.encode())]
    )
    # The value's length is a varint: up to 5 bytes instead of the 1 counted for an empty value.
    body = value[: max(0, max_bytes - framing - 4)]
    if len(body) < len(value):
        cut.insert(1 if "key" in cut else 0, "value")
    return key, None if tombstone else body, [*kept, *why, *about, ("dlq_truncated", ",".join(cut).encode())]


async def write_dead_letter(
    sender: RawSender, record: Record, *, topic: str, consumer: str, reason: str, error: str, max_bytes: int
) -> None:
    """Write ``record``'s dead letter (:func:`dead_letter_message`) and return once it is durable. If the
    broker refuses it as too large all the same (its limit is below the producer's), what is left without
    the value is sent instead."""
    for limit in (max_bytes, 0):
        key, value, headers = dead_letter_message(
            record, consumer=consumer, reason=reason, error=error, max_bytes=limit
        )
        try:
            # A null header value goes out null, as it came in (aiokafka's producer takes it).
            await sender.send_many([(topic, key, value, cast(list[tuple[str, bytes]], headers))])
            return
        except TOO_LARGE as exc:
            if limit == 0:
                raise
            log.warning(
                "dead letter refused as too large, sending it without the value",
                error=repr(exc),
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )


class KafkaDeadLetters:
    """Writes unhandleable records to the dead-letter topic with their origin and the reason; a record too
    large to copy whole is copied truncated (see :func:`dead_letter_message`)."""

    def __init__(self, publisher: KafkaPublisher, topic: str = DEAD_LETTER) -> None:
        self.publisher = publisher
        self.topic = topic

    async def dead_letter(self, record: Record, *, consumer: str, reason: str, error: str) -> None:
        await write_dead_letter(
            self.publisher,
            record,
            topic=self.topic,
            consumer=consumer,
            reason=reason,
            error=error,
            max_bytes=self.publisher.max_record_bytes,
        )


MAX_POLL_RECORDS = 1000
"""Records a consumer takes per poll at most: a backlog is settled this many at a time (one transaction
per poll for a batch handler)."""

MAX_POLL_INTERVAL_MS = 300_000
"""How long a consumer may go without calling ``getmany`` before aiokafka takes it for stuck: it leaves its
group, which hands its partitions to the other members (aiokafka's default, Kafka's ``max.poll.interval.ms``).
The runner polls (its partitions paused) while a poll's handling lasts, so it never gets there."""

LAG_INTERVAL_S = 15.0
"""How often a consumer measures its lag (``driftloop_bus_consumer_lag``): Prometheus's scrape interval
(deploy/prometheus/prometheus.yml), so each scrape sees a fresh value, at one small request to the broker
per consumer per interval. A constant rather than a setting: nothing is gained by a different rhythm than
the scrape's."""


class ConsumerRunner:
    """Runs one subscription on Kafka: poll, dispatch, and commit offsets by hand.

    An offset is committed only after its record is settled (its transaction committed, or it was durably
    dead-lettered). Settled offsets are committed every ``commit_interval_s``, when partitions are revoked,
    and on stop — not after every poll, which would add a broker round trip to each batch. A crash
    therefore re-delivers at most the last interval's events, and the inbox makes them no-ops. If settling
    fails for reasons outside the event (the database or the broker is away), the runner seeks back and
    reads the same records again.

    A poll's handling may last (an outage is waited out without limit, an uncertain error retried for
    minutes), and aiokafka has a member that does not call ``getmany`` for ``max_poll_interval_ms`` leave its
    group: its partitions would go to another member, which would start the retries again, and come back when
    it polls, a rebalance every interval for as long as the outage lasts. Once a handling has lasted half the
    interval, the runner pauses every assigned partition and keeps polling, which takes no record and keeps
    the member in its group, until the poll is settled (:meth:`_settle_in_group`).

    A fetched record aiokafka cannot parse (see :data:`UNREADABLE`) makes ``getmany`` raise and lose what it
    had read of that poll; the runner then reads again from the last record it received, one record at a
    time, up to the first offset that cannot be read, and settles that offset as an
    :class:`~libs.bus.core.UnreadableRecord` (dead-lettered as ``unreadable``). aiokafka parses a whole
    record batch on every fetch, so the offsets after an unparsable record in its batch cannot be read
    either: each is dead-lettered the same way, one at a time, until the next batch. Nothing readable is
    skipped, and nothing escapes ``run``.

    Every ``lag_interval_s`` a task of its own measures the lag of each assigned partition
    (:meth:`report_lag`), so the gauge keeps moving while a handling lasts, which is when it matters.
    """

    def __init__(
        self,
        subscription: Subscription,
        *,
        kafka: KafkaSettings,
        registry: EventTypeRegistry,
        begin: TransactionFactory,
        dead_letters: KafkaDeadLetters,
        max_records: int = MAX_POLL_RECORDS,
        poll_timeout_ms: int = 200,
        commit_interval_s: float = 0.2,
        max_poll_interval_ms: int = MAX_POLL_INTERVAL_MS,
        lag_interval_s: float = LAG_INTERVAL_S,
    ) -> None:
        self.sub = subscription
        self.kafka = kafka
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.commit_interval_s = commit_interval_s
        self.max_poll_interval_ms = max_poll_interval_ms
        self.lag_interval_s = lag_interval_s
        self._stopping = False
        self.dispatcher = Dispatcher(
            subscription,
            registry=registry,
            begin=begin,
            dead_letters=dead_letters,
            stopping=lambda: self._stopping,
        )
        self.consumer: AIOKafkaConsumer | None = None
        self.ready = asyncio.Event()
        self._settled: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        # Per partition, the offset after the last record handed to the dispatcher (or sought to): where
        # reading resumes after a failed fetch.
        self._next: dict[TopicPartition, int] = {}
        # Per partition, the offset of the first record handed to the dispatcher since it was assigned: its
        # settled position until a record of it is settled (its lag counts the poll in hand).
        self._first_handed: dict[TopicPartition, int] = {}
        # The partitions whose lag series this runner set, to remove when they leave it.
        self._lag_reported: set[TopicPartition] = set()
        self._commit_lock = asyncio.Lock()
        # While a long handling is held (see _settle_in_group): a partition assigned meanwhile is paused too.
        self._holding = False

    def stop(self) -> None:
        """Finish the batch in hand, commit, and leave the group."""
        self._stopping = True

    async def run(self) -> None:
        self.consumer = AIOKafkaConsumer(
            group_id=self.sub.consumer,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_interval_ms=self.max_poll_interval_ms,
            **self.kafka.consumer_options(),
        )
        self.consumer.subscribe(
            [self.kafka.physical(t) for t in self.sub.topics], listener=_CommitOnRevoke(self)
        )
        await self._start_with_retry()
        committer = asyncio.create_task(self._commit_periodically())
        lag = asyncio.create_task(self._report_lag_periodically())
        # With a batch_prepare, the next poll (when already fetched) is taken before this one is settled,
        # so it can be prepared while this one's transaction is in flight.
        ahead: _Poll | None = None
        current: _Poll | None
        try:
            while not self._stopping:
                if ahead is not None:
                    current, ahead = ahead, None
                else:
                    current = await self._fetch(self.poll_timeout_ms)
                    if self.consumer.assignment():
                        self.ready.set()
                if current is None:
                    continue
                if self.sub.batch_prepare is not None:
                    ahead = await self._fetch(0)
                if not await self._settle_in_group(current, ahead):
                    ahead = None  # seeked back before it: it is read again
                elif ahead is not None:
                    ahead = self._still_assigned(ahead)
        finally:
            committer.cancel()
            lag.cancel()
            await asyncio.gather(committer, lag, return_exceptions=True)
            self._drop_lag(self._lag_reported)
            await self.commit_settled()
            await self.consumer.stop()

    async def _start_with_retry(self) -> None:
        assert self.consumer is not None
        await self._while_broker_away(self.consumer.start)

    async def _while_broker_away(self, action: Callable[[], Awaitable[None]]) -> None:
        """Run ``action`` until the broker lets it finish (KafkaError: wait, doubling up to 5 s), unless
        stopping."""
        delay = 0.5
        while True:
            try:
                await action()
                return
            except KafkaError as exc:
                if self._stopping:
                    raise
                log.warning("broker unavailable, retrying", consumer=self.sub.consumer, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _fetch(self, timeout_ms: int) -> _Poll | None:
        """One poll (None when empty). A record the client cannot parse costs a slower poll, never a crash."""
        assert self.consumer is not None
        try:
            polled = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=self.max_records)
        except UNREADABLE as exc:
            log.warning(
                "a fetched record cannot be parsed, reading again one record at a time",
                consumer=self.sub.consumer,
                error=repr(exc),
            )
            return await self._fetch_isolating()
        return self._poll(polled)

    async def _fetch_isolating(self) -> _Poll | None:
        """A poll read one record at a time, which stops at the first offset of each partition that cannot be
        parsed and stands an :class:`UnreadableRecord` in for it.

        The failed ``getmany`` consumed (and lost) what it had parsed of other partitions: every partition is
        first sought back to what this runner received. Only partitions with records left are read."""
        consumer = self.consumer
        assert consumer is not None
        await self._rewind()
        messages: dict[TopicPartition, list[Any]] = {}
        unreadable: dict[TopicPartition, UnreadableRecord] = {}
        budget = self.max_records
        for tp in sorted(consumer.assignment()):
            got: list[Any] = []
            while budget > 0:
                start = got[-1].offset + 1 if got else self._next.get(tp)
                # A partition that never had a fetch answered, or has nothing left, holds no culprit.
                if start is None or start >= (consumer.highwater(tp) or 0):
                    break
                try:
                    # Records are there (below the high watermark): wait for the fetch, however long the
                    # broker holds the one in flight before it.
                    one = await consumer.getmany(
                        tp, timeout_ms=max(self.poll_timeout_ms, 1000), max_records=1
                    )
                except UNREADABLE as exc:
                    if tp not in consumer.assignment():
                        break
                    # A position moves only past records handed out: it is the offset that failed. Parsed
                    # afresh after the seek back, so a corruption in transit would not have come back.
                    offset = await consumer.position(tp)
                    unreadable[tp] = UnreadableRecord(
                        topic=self.kafka.logical(tp.topic),
                        partition=tp.partition,
                        offset=offset,
                        key=None,
                        value=None,
                        headers=(),
                        error=f"the Kafka client cannot parse the record batch holding offset {offset} (this "
                        f"record or one before it in the batch): {exc!r}",
                    )
                    metrics.UNREADABLE.labels(self.sub.consumer, self.kafka.logical(tp.topic)).inc()
                    log.error(
                        "offset cannot be read, dead-lettering it as unreadable",
                        consumer=self.sub.consumer,
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=offset,
                        error=repr(exc),
                    )
                    break
                if not one.get(tp):
                    break
                got += one[tp]
                budget -= len(one[tp])
            if got:
                messages[tp] = got
        poll = self._poll(messages)
        if poll is None and not unreadable:
            # Nothing to read after all (the partition moved away): do not spin on a getmany that fails.
            await asyncio.sleep(self.poll_timeout_ms / 1000)
            return None
        poll = poll or _Poll({}, [])
        for tp, placeholder in unreadable.items():
            self._first_handed.setdefault(tp, placeholder.offset)
            poll.batches.setdefault(tp, []).append(placeholder)
            poll.records.append(placeholder)
            self._seek(tp, placeholder.offset + 1)
        return poll

    async def _rewind(self) -> None:
        """Seek every assigned partition back to the offset after the last record this runner received (for
        one it received nothing from yet: its committed offset, or its beginning). Not seeking back would skip
        what the failed getmany consumed: with the broker away, it waits for it."""
        consumer = self.consumer
        assert consumer is not None

        async def seek_back() -> None:
            for tp in consumer.assignment():
                offset = self._next.get(tp)
                if offset is None:
                    offset = await consumer.committed(tp)
                if offset is not None:
                    self._seek(tp, offset)
                else:
                    await consumer.seek_to_beginning(tp)
                    self._next[tp] = await consumer.position(tp)

        await self._while_broker_away(seek_back)

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` next, if it is still assigned (a rebalance may have taken it: its new
        owner reads from the committed offset, and seeking it would raise)."""
        assert self.consumer is not None
        if tp in self.consumer.assignment():
            self.consumer.seek(tp, offset)
            self._next[tp] = offset

    def _poll(self, batches: dict[TopicPartition, list[Any]]) -> _Poll | None:
        """One poll's messages by partition and as records in dispatch order (None when empty)."""
        batches = {tp: msgs for tp, msgs in batches.items() if msgs}
        if not batches:
            return None
        for tp, messages in batches.items():
            self._next[tp] = messages[-1].offset + 1
            self._first_handed.setdefault(tp, messages[0].offset)
        records = [record_of(self.kafka, m) for messages in batches.values() for m in messages]
        return _Poll(batches, records)

    async def _settle(self, current: _Poll, ahead: _Poll | None = None) -> bool:
        """Dispatch one poll's records (each partition in order) and mark their offsets settled.

        On failure nothing of this poll is settled: it and the poll ``ahead`` are read again after a
        pause (returns False). A CancelledError is a failure too unless this task is being cancelled
        (:func:`~libs.bus.core.being_cancelled`): one the dead-letter writer's client raised must not end
        ``run``, and the consumer with it.
        """
        assert self.consumer is not None
        try:
            await self.dispatcher.dispatch(current.records, upcoming=ahead.records if ahead else ())
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and being_cancelled():
                raise
            log.error("batch not settled, will re-read it", error=repr(exc))
            for tp, messages in current.batches.items():
                self._seek(tp, messages[0].offset)
            for tp, messages in (ahead.batches if ahead else {}).items():
                if tp not in current.batches:
                    self._seek(tp, messages[0].offset)
            await asyncio.sleep(1.0)
            return False
        # A rebalance during the look-ahead poll may have taken a partition away: its new owner re-reads it.
        assigned = self.consumer.assignment()
        for tp, messages in current.batches.items():
            if tp in assigned:
                self._settled[tp] = messages[-1].offset + 1
        return True

    async def _settle_in_group(self, current: _Poll, ahead: _Poll | None) -> bool:
        """:meth:`_settle`, keeping the member in its group however long it takes: past half of
        ``max_poll_interval_ms``, :meth:`_hold` polls with the partitions paused until it is done."""
        settled = asyncio.Event()
        holding: list[asyncio.Task[None]] = []
        timer = asyncio.get_running_loop().call_later(
            self.max_poll_interval_ms / 2000, lambda: holding.append(asyncio.create_task(self._hold(settled)))
        )
        try:
            return await self._settle(current, ahead)
        finally:
            timer.cancel()
            settled.set()
            # Awaited, not cancelled: a getmany cancelled half-way leaves aiokafka counting a poll in progress
            # (its fetch_context has no finally), and it would never again see this member stuck.
            for task in holding:
                await task

    async def _hold(self, settled: asyncio.Event) -> None:
        """Poll with every assigned partition paused until ``settled``: a poll on paused partitions returns
        nothing, and tells aiokafka the member is alive. A partition assigned meanwhile is paused as well (by
        the rebalance listener, and here before each poll): its records wait until the poll in hand is
        settled, to be handled in order. What a poll returns all the same (a partition assigned while it
        waited) is read again later. The partitions are resumed once the poll is settled."""
        consumer = self.consumer
        assert consumer is not None
        log.warning(
            "poll still in hand after half the poll interval, pausing partitions to stay in the group",
            consumer=self.sub.consumer,
            max_poll_interval_ms=self.max_poll_interval_ms,
        )
        self._holding = True
        try:
            while not settled.is_set():
                consumer.pause(*consumer.assignment())
                polled = await consumer.getmany(timeout_ms=self.poll_timeout_ms)
                for tp, messages in polled.items():
                    if messages:
                        self._seek(tp, messages[0].offset)
        finally:
            self._holding = False
            consumer.resume(*consumer.paused())

    def hold_assigned(self, partitions: Iterable[TopicPartition]) -> None:
        """Pause newly assigned ``partitions`` if a poll's handling is being held (see :meth:`_hold`)."""
        if self._holding and self.consumer is not None:
            self.consumer.pause(*partitions)

    def _still_assigned(self, poll: _Poll) -> _Poll | None:
        """``poll`` without the partitions a rebalance took meanwhile (their new owner reads them from the
        committed offset: handling them here too would race it), or ``poll`` itself if none was taken."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        if all(tp in assigned for tp in poll.batches):
            return poll
        batches = {tp: messages for tp, messages in poll.batches.items() if tp in assigned}
        records = [
            r for r in poll.records if TopicPartition(self.kafka.physical(r.topic), r.partition) in batches
        ]
        return _Poll(batches, records) if records else None

    async def commit_settled(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        """Commit the settled offsets not committed yet (of some partitions, or all)."""
        assert self.consumer is not None
        async with self._commit_lock:
            wanted = set(partitions) if partitions is not None else set(self._settled)
            offsets = {
                tp: off
                for tp, off in self._settled.items()
                if tp in wanted and self._committed.get(tp) != off
            }
            if not offsets:
                return
            try:
                await self.consumer.commit(offsets)
                self._committed.update(offsets)
            except (CommitFailedError, KafkaError) as exc:
                # A rebalance took a partition away: the new owner re-reads, the inbox absorbs the repeat.
                log.warning("offset commit failed", error=repr(exc))

    async def _commit_periodically(self) -> None:
        """:meth:`commit_settled` every ``commit_interval_s``. A round that fails with anything but the
        broker's errors (which :meth:`commit_settled` logs itself), a stray CancelledError of the client's
        included, is logged and the next round goes on: this task ending would leave the offsets
        uncommitted until a revocation or the stop, with nothing to show for it, and a restart would read
        back all of it."""
        while True:
            await asyncio.sleep(self.commit_interval_s)
            try:
                await self.commit_settled()
            except (Exception, asyncio.CancelledError) as exc:
                stop_if_being_cancelled(exc)
                log.warning("offset commit failed", consumer=self.sub.consumer, error=repr(exc))

    async def _report_lag_periodically(self) -> None:
        """:meth:`report_lag` every ``lag_interval_s``. A failed measurement is logged (a warning for the
        first of a run of them, then at debug level) and leaves the gauge as it was; consuming goes on."""
        failing = False
        while True:
            await asyncio.sleep(self.lag_interval_s)
            try:
                await self.report_lag()
            except (Exception, asyncio.CancelledError) as exc:
                stop_if_being_cancelled(exc)
                (log.debug if failing else log.warning)(
                    "consumer lag not measured, trying again later",
                    consumer=self.sub.consumer,
                    error=repr(exc),
                )
                failing = True
            else:
                failing = False

    async def report_lag(self) -> None:
        """Set ``driftloop_bus_consumer_lag`` of each assigned partition: its end offset minus this runner's
        settled position there, and remove the series of partitions no longer assigned.

        The end offsets are asked of the broker (``end_offsets``, a ListOffsets request), not read from
        ``highwater``: aiokafka's fetcher updates the high watermark only from fetch responses, and it fetches
        no partition whose records wait in its buffer for ``getmany``, nor a paused one, which is every
        partition for as long as a handling is held; ``highwater`` stands still exactly while the lag grows.
        ``end_offsets`` reads no fetcher or position state: it sends its request through the client, which
        matches each answer to its request by correlation id, as the fetcher's own ListOffsets (offset
        resets) and fetches and the coordinator's heartbeats and commits already run concurrently with
        ``getmany``; aiokafka bounds it by ``request_timeout_ms``."""
        consumer = self.consumer
        assert consumer is not None
        assigned = consumer.assignment()
        ends = await consumer.end_offsets(sorted(assigned)) if assigned else {}
        # Read after the ends, so a backlog settled meanwhile is not counted as still there.
        lags = {}
        for tp, end in ends.items():
            position = await self._settled_position(tp)
            if position is not None:
                lags[tp] = max(0, end - position)
        # Assigned now, after the awaits: a partition revoked meanwhile is not set again. One set between its
        # revocation and the new assignment (aiokafka replaces the assignment after the listener ran) is
        # removed here, at the next measurement.
        assigned = consumer.assignment()
        self._drop_lag(self._lag_reported - assigned)
        for tp, lag in lags.items():
            if tp in assigned:
                metrics.CONSUMER_LAG.labels(*self._lag_labels(tp)).set(lag)
                self._lag_reported.add(tp)

    async def _settled_position(self, tp: TopicPartition) -> int | None:
        """The offset this runner would commit for ``tp``: after its last settled record; before any, the
        first one it handed out; before that, the consumer's position (where it starts: the committed offset,
        or the beginning). None if ``tp`` was revoked meanwhile."""
        assert self.consumer is not None
        if (settled := self._settled.get(tp)) is not None:
            return settled
        if (first := self._first_handed.get(tp)) is not None:
            return first
        try:
            return await self.consumer.position(tp)
        except IllegalStateError:
            return None

    def _drop_lag(self, partitions: Iterable[TopicPartition]) -> None:
        """Remove the lag series of ``partitions``: another member may own them now, and reports them."""
        for tp in list(partitions):
            if tp in self._lag_reported:
                self._lag_reported.discard(tp)
                metrics.CONSUMER_LAG.remove(*self._lag_labels(tp))

    def _lag_labels(self, tp: TopicPartition) -> tuple[str, str, str]:
        return self.sub.consumer, self.kafka.logical(tp.topic), str(tp.partition)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        partitions = list(partitions)
        self._drop_lag(partitions)
        for tp in partitions:
            self._settled.pop(tp, None)
            self._committed.pop(tp, None)
            self._next.pop(tp, None)
            self._first_handed.pop(tp, None)
        self.dispatcher.forget_partitions((self.kafka.logical(tp.topic), tp.partition) for tp in partitions)


@dataclass(frozen=True)
class _Poll:
    """What one getmany returned: messages by partition, and the same as records in dispatch order."""

    batches: dict[TopicPartition, list[Any]]
    records: list[Record]


class _CommitOnRevoke(ConsumerRebalanceListener):
    """Before partitions move to another member, commit what this member settled on them; pause those it
    gets while a long handling is held (:meth:`ConsumerRunner.hold_assigned`)."""

    def __init__(self, runner: ConsumerRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        await self.runner.commit_settled(revoked)
        self.runner.forget(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.runner.hold_assigned(assigned)
