"""Rebuild monitoring's memory after a restart: re-read the predictions topic from the offsets the memory
depended on up to what the consumer group had committed, without committing anything."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OffsetOutOfRangeError
from prometheus_client import Counter

from contracts.envelope import EventPayload, EventTypeRegistry, MalformedEvent, PayloadReader
from contracts.predictions import PredictionColumns, PredictionsLogged, read_prediction_columns
from libs.logging import get_logger
from libs.settings import KafkaSettings
from services.monitoring.ports import ReplayReport

log = get_logger(__name__)

NOT_REPLAYED = Counter(
    "driftloop_monitoring_replay_records_not_replayed_total",
    "Records of the predictions topic a restart's replay had to read to rebuild memory (open windows, canary "
    "traffic, label joins) and did not: reason `deadline` when replay_deadline_seconds passed first, "
    "`deleted` when the broker no longer held them (retention, or a truncated log). Logged as a warning.",
    ["reason"],
)

Request = tuple[PredictionColumns | PredictionsLogged, int, int]
# The live consumer's reader (see services.monitoring.bootstrap): payloads as columns, full validation's
# answer for anything it cannot prove valid.
READERS: dict[type[EventPayload], PayloadReader] = {
    PredictionsLogged: cast(PayloadReader, read_prediction_columns)
}

POLL_MS = 1_000


class ReplayConsumer(Protocol):
    """What a replay asks of its consumer: aiokafka's, or a fake in unit tests."""

    async def committed(self, partition: TopicPartition) -> int | None:
        """The group's committed offset of a partition."""
        ...

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The first offset the broker still holds, per partition."""
        ...

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """The offset the next record will take, per partition."""
        ...

    def assign(self, partitions: list[TopicPartition]) -> None:
        """Read these partitions (no group membership)."""
        ...

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Read a partition from an offset on."""
        ...

    async def position(self, partition: TopicPartition) -> int:
        """The offset of the next record a poll gives of a partition."""
        ...

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int, max_records: int
    ) -> dict[TopicPartition, list[Any]]:
        """The records fetched, per partition; empty when none came within ``timeout_ms``."""
        ...


async def replay_predictions(
    kafka: KafkaSettings,
    *,
    topic: str,
    group: str,
    start: dict[int, int],
    registry: EventTypeRegistry,
    feed: Callable[[Sequence[Request]], Any],
    deadline_s: float,
    batch: int = 500,
) -> ReplayReport:
    """Feed the records in [start, committed) of every partition to ``feed``, for up to ``deadline_s``;
    returns what was read, and what was not (logged as a warning and counted)."""
    if not start:
        return ReplayReport()
    consumer = AIOKafkaConsumer(
        group_id=group,
        enable_auto_commit=False,
        # An offset the broker no longer holds is an error to count, not a jump: aiokafka's default
        # ("latest") would skip to the end of the log, past every record still held, and say nothing.
        auto_offset_reset="none",
        **kafka.consumer_options(),
    )
    await consumer.start()
    try:
        return await replay(
            consumer,
            topic=kafka.physical(topic),
            start=start,
            registry=registry,
            feed=feed,
            max_event_bytes=kafka.max_event_bytes,
            deadline_s=deadline_s,
            batch=batch,
        )
    finally:
        await consumer.stop()


async def replay(
    consumer: ReplayConsumer,
    *,
    topic: str,
    start: dict[int, int],
    registry: EventTypeRegistry,
    feed: Callable[[Sequence[Request]], Any],
    max_event_bytes: int,
    deadline_s: float,
    batch: int = 500,
    clock: Callable[[], float] = time.monotonic,
) -> ReplayReport:
    """The replay on a started consumer: read every partition up to its committed offset, through empty
    polls (a slow broker, a fetch held up by another partition), until the deadline."""
    began = clock()
    report = ReplayReport()
    ends: dict[TopicPartition, int] = {}
    for partition, offset in start.items():
        tp = TopicPartition(topic, partition)
        committed = await consumer.committed(tp)
        if committed is not None and committed > offset:
            ends[tp] = committed
    positions = {tp: start[tp.partition] for tp in ends}
    remaining: set[TopicPartition] = set()
    if ends:
        consumer.assign(list(ends))
        remaining = await _held(consumer, ends, positions, ends, report)
    while remaining and (left := began + deadline_s - clock()) > 0:
        try:
            polled = await consumer.getmany(
                *sorted(remaining), timeout_ms=max(1, min(POLL_MS, int(left * 1_000))), max_records=batch
            )
        except OffsetOutOfRangeError:
            # Retention deleted records ahead of where the replay was reading.
            remaining = await _held(consumer, remaining, positions, ends, report)
            continue
        requests: list[Request] = []
        for tp, messages in polled.items():
            for m in messages:
                if m.offset >= ends[tp]:
                    break
                positions[tp] = m.offset + 1
                try:
                    event = registry.decode(
                        m.value, m.headers or (), max_bytes=max_event_bytes, readers=READERS
                    )
                except MalformedEvent:
                    continue  # the live consumer dead-lettered it the first time
                if isinstance(event.data, PredictionColumns | PredictionsLogged):
                    requests.append((event.data, m.partition, m.offset))
        for tp in list(remaining):
            # The consumer's position also passes offsets that hold no record for us (transaction markers).
            positions[tp] = max(positions[tp], await consumer.position(tp))
            if positions[tp] >= ends[tp]:
                remaining.discard(tp)
        report.records += len(requests)
        if requests:
            feed(requests)
    report.unread = {tp.partition: ends[tp] - positions[tp] for tp in sorted(remaining)}
    report.seconds = round(clock() - began, 2)
    _tell(report, topic, deadline_s)
    return report


async def _held(
    consumer: ReplayConsumer,
    partitions: Iterable[TopicPartition],
    positions: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
    report: ReplayReport,
) -> set[TopicPartition]:
    """Move each partition's position and end to the records the broker still holds, counting the ones it
    does not as deleted, and seek there; returns the partitions with records left to read."""
    tps = sorted(partitions)
    firsts = await consumer.beginning_offsets(tps)
    lasts = await consumer.end_offsets(tps)
    left = set()
    for tp in tps:
        at, end = positions[tp], ends[tp]
        held_from, held_to = max(at, firsts[tp]), min(end, lasts[tp])
        held = max(0, held_to - held_from)
        if end - at > held:
            report.deleted[tp.partition] = report.deleted.get(tp.partition, 0) + end - at - held
        positions[tp], ends[tp] = held_from, held_from + held
        if held:
            consumer.seek(tp, held_from)
            left.add(tp)
    return left


def _tell(report: ReplayReport, topic: str, deadline_s: float) -> None:
    log.info("memory rebuilt from the predictions topic", records=report.records, seconds=report.seconds)
    if report.unread:
        NOT_REPLAYED.labels("deadline").inc(sum(report.unread.values()))
    if report.deleted:
        NOT_REPLAYED.labels("deleted").inc(sum(report.deleted.values()))
    if not report.complete:
        log.warning(
            "predictions not replayed: memory was rebuilt without them",
            topic=topic,
            past_deadline={str(p): n for p, n in report.unread.items()},
            deleted={str(p): n for p, n in report.deleted.items()},
            deadline_s=deadline_s,
            hint="open windows and watched canary steps miss these records' rows, and labels waiting for "
            "them expire as unmatched; records past the deadline were still on the broker (raise "
            "DRIFTLOOP_MONITORING_REPLAY_DEADLINE_SECONDS), deleted ones are gone (the topic's retention)",
        )
