"""The bus's Kafka side: an idempotent producer, the dead-letter writer, and the consumer runner."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from contracts.envelope import CloudEvent, EventTypeRegistry
from contracts.topics import DEAD_LETTER
from libs.bus import metrics
from libs.bus.core import Dispatcher, Record, Subscription, TransactionFactory
from libs.logging import get_logger
from libs.settings import KafkaSettings

log = get_logger(__name__)


class KafkaPublisher:
    """An idempotent producer (acks=all): a retried send never duplicates a record in the log."""

    def __init__(self, kafka: KafkaSettings, *, linger_ms: int = 2, client_id: str = "driftloop") -> None:
        self.kafka = kafka
        self.linger_ms = linger_ms
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            enable_idempotence=True,
            acks="all",
            linger_ms=self.linger_ms,
            max_request_size=self.kafka.max_event_bytes + 64 * 1024,
            client_id=self.client_id,
            **self.kafka.client_options(),
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("KafkaPublisher.start() was not awaited")
        return self._producer

    async def publish(self, event: CloudEvent[Any]) -> None:
        """Send one event and wait for the broker's acknowledgement."""
        key, value, headers = event.to_kafka()
        await self.send_many([(event.topic, key, value, headers)])

    async def send_many(
        self, items: Sequence[tuple[str, bytes | None, bytes, Sequence[tuple[str, bytes | None]]]]
    ) -> None:
        """Send records (in order per partition) and wait until all are acknowledged."""
        futures = [
            await self.producer.send(self.kafka.physical(topic), value=value, key=key, headers=headers)
            for topic, key, value, headers in items
        ]
        await asyncio.gather(*futures)
        for topic, *_ in items:
            metrics.PUBLISHED.labels(topic).inc()


class KafkaDeadLetters:
    """Writes unhandleable records to the dead-letter topic with their origin and the reason."""

    def __init__(self, publisher: KafkaPublisher, topic: str = DEAD_LETTER) -> None:
        self.publisher = publisher
        self.topic = topic

    async def dead_letter(self, record: Record, *, consumer: str, reason: str, error: str) -> None:
        headers = [h for h in record.headers if not h[0].startswith("dlq_")]
        headers += [
            ("dlq_reason", reason.encode()),
            ("dlq_error", error[:4000].encode()),
            ("dlq_consumer", consumer.encode()),
            ("dlq_origin_topic", record.topic.encode()),
            ("dlq_origin_partition", str(record.partition).encode()),
            ("dlq_origin_offset", str(record.offset).encode()),
        ]
        await self.publisher.send_many([(self.topic, record.key, record.value or b"", headers)])


MAX_POLL_RECORDS = 1000
"""Records a consumer takes per poll at most: a backlog is settled this many at a time (one transaction
per poll for a batch handler)."""


class ConsumerRunner:
    """Runs one subscription on Kafka: poll, dispatch, and commit offsets by hand.

    An offset is committed only after its record is settled (its transaction committed, or it was durably
    dead-lettered). Settled offsets are committed every ``commit_interval_s``, when partitions are revoked,
    and on stop — not after every poll, which would add a broker round trip to each batch. A crash
    therefore re-delivers at most the last interval's events, and the inbox makes them no-ops. If settling
    fails for reasons outside the event (the database or the broker is away), the runner seeks back and
    reads the same records again.
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
    ) -> None:
        self.sub = subscription
        self.kafka = kafka
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.commit_interval_s = commit_interval_s
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
        self._commit_lock = asyncio.Lock()

    def stop(self) -> None:
        """Finish the batch in hand, commit, and leave the group."""
        self._stopping = True

    async def run(self) -> None:
        self.consumer = AIOKafkaConsumer(
            group_id=self.sub.consumer,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **self.kafka.consumer_options(),
        )
        self.consumer.subscribe(
            [self.kafka.physical(t) for t in self.sub.topics], listener=_CommitOnRevoke(self)
        )
        await self._start_with_retry()
        committer = asyncio.create_task(self._commit_periodically())
        # With a batch_prepare, the next poll (when already fetched) is taken before this one is settled,
        # so it can be prepared while this one's transaction is in flight.
        ahead: _Poll | None = None
        current: _Poll | None
        try:
            while not self._stopping:
                if ahead is not None:
                    current, ahead = ahead, None
                else:
                    polled = await self.consumer.getmany(
                        timeout_ms=self.poll_timeout_ms, max_records=self.max_records
                    )
                    if self.consumer.assignment():
                        self.ready.set()
                    current = self._poll(polled)
                if current is None:
                    continue
                if self.sub.batch_prepare is not None:
                    fetched = await self.consumer.getmany(timeout_ms=0, max_records=self.max_records)
                    ahead = self._poll(fetched)
                if not await self._settle(current, ahead):
                    ahead = None  # seeked back before it: it is read again
        finally:
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
            await self.commit_settled()
            await self.consumer.stop()

    async def _start_with_retry(self) -> None:
        assert self.consumer is not None
        delay = 0.5
        while True:
            try:
                await self.consumer.start()
                return
            except KafkaError as exc:
                if self._stopping:
                    raise
                log.warning("broker unavailable, retrying", consumer=self.sub.consumer, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _poll(self, batches: dict[TopicPartition, list[Any]]) -> _Poll | None:
        """One poll's messages by partition and as records in dispatch order (None when empty)."""
        batches = {tp: msgs for tp, msgs in batches.items() if msgs}
        if not batches:
            return None
        records = [
            Record(
                topic=self.kafka.logical(m.topic),
                partition=m.partition,
                offset=m.offset,
                key=m.key,
                value=m.value,
                headers=tuple(m.headers or ()),
                timestamp_ms=m.timestamp,
            )
            for messages in batches.values()
            for m in messages
        ]
        return _Poll(batches, records)

    async def _settle(self, current: _Poll, ahead: _Poll | None = None) -> bool:
        """Dispatch one poll's records (each partition in order) and mark their offsets settled.

        On failure nothing of this poll is settled: it and the poll ``ahead`` are read again after a
        pause (returns False).
        """
        assert self.consumer is not None
        try:
            await self.dispatcher.dispatch(current.records, upcoming=ahead.records if ahead else ())
        except Exception as exc:
            log.error("batch not settled, will re-read it", error=repr(exc))
            for tp, messages in current.batches.items():
                self.consumer.seek(tp, messages[0].offset)
            for tp, messages in (ahead.batches if ahead else {}).items():
                if tp not in current.batches:
                    self.consumer.seek(tp, messages[0].offset)
            await asyncio.sleep(1.0)
            return False
        # A rebalance during the look-ahead poll may have taken a partition away: its new owner re-reads it.
        assigned = self.consumer.assignment()
        for tp, messages in current.batches.items():
            if tp in assigned:
                self._settled[tp] = messages[-1].offset + 1
        return True

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
        while True:
            await asyncio.sleep(self.commit_interval_s)
            await self.commit_settled()

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self._settled.pop(tp, None)
            self._committed.pop(tp, None)


@dataclass(frozen=True)
class _Poll:
    """What one getmany returned: messages by partition, and the same as records in dispatch order."""

    batches: dict[TopicPartition, list[Any]]
    records: list[Record]


class _CommitOnRevoke(ConsumerRebalanceListener):
    """Before partitions move to another member, commit what this member settled on them."""

    def __init__(self, runner: ConsumerRunner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = list(revoked)
        await self.runner.commit_settled(revoked)
        self.runner.forget(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        return None
