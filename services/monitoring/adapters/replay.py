"""Rebuild monitoring's memory after a restart: re-read the predictions topic from the offsets the memory
depended on up to what the consumer group had committed, without committing anything."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition

from contracts.envelope import EventPayload, EventTypeRegistry, MalformedEvent, PayloadReader
from contracts.predictions import PredictionColumns, PredictionsLogged, read_prediction_columns
from libs.logging import get_logger
from libs.settings import KafkaSettings

log = get_logger(__name__)

Request = tuple[PredictionColumns | PredictionsLogged, int, int]
# The live consumer's reader (see services.monitoring.bootstrap): payloads as columns, full validation's
# answer for anything it cannot prove valid.
READERS: dict[type[EventPayload], PayloadReader] = {
    PredictionsLogged: cast(PayloadReader, read_prediction_columns)
}


async def replay_predictions(
    kafka: KafkaSettings,
    *,
    topic: str,
    group: str,
    start: dict[int, int],
    registry: EventTypeRegistry,
    feed: Callable[[Sequence[Request]], Any],
    batch: int = 500,
) -> int:
    """Feed the records in [start, committed) of every partition to ``feed``; returns the records read."""
    if not start:
        return 0
    consumer = AIOKafkaConsumer(
        group_id=group,
        enable_auto_commit=False,
        **kafka.consumer_options(),
    )
    await consumer.start()
    began = time.monotonic()
    read = 0
    try:
        ends: dict[TopicPartition, int] = {}
        for partition, offset in start.items():
            tp = TopicPartition(kafka.physical(topic), partition)
            committed = await consumer.committed(tp)
            if committed is not None and committed > offset:
                ends[tp] = committed
        if not ends:
            return 0
        consumer.assign(list(ends))
        for tp in ends:
            consumer.seek(tp, start[tp.partition])
        remaining = set(ends)
        while remaining:
            polled = await consumer.getmany(*remaining, timeout_ms=1_000, max_records=batch)
            if not polled:
                break
            requests: list[Request] = []
            for tp, messages in polled.items():
                for m in messages:
                    if m.offset >= ends[tp]:
                        remaining.discard(tp)
                        break
                    try:
                        event = registry.decode(
                            m.value, m.headers or (), max_bytes=kafka.max_event_bytes, readers=READERS
                        )
                    except MalformedEvent:
                        continue  # the live consumer dead-lettered it the first time
                    if isinstance(event.data, PredictionColumns | PredictionsLogged):
                        requests.append((event.data, m.partition, m.offset))
                if messages and messages[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
            read += len(requests)
            if requests:
                feed(requests)
    finally:
        await consumer.stop()
    log.info(
        "memory rebuilt from the predictions topic", records=read, seconds=round(time.monotonic() - began, 2)
    )
    return read
