"""The prediction log's producer process on the real broker: a clean stop sends everything handed over,
as the PredictionsLogged monitoring and audit read (full validation and the columnar reader)."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from contracts.envelope import DEFAULT_MAX_EVENT_BYTES
from contracts.predictions import TOPIC, PredictionColumns, PredictionsLogged, read_prediction_columns
from contracts.registry import EVENT_TYPES
from libs.settings import KafkaSettings
from services.serving.adapters.log_producer import _IDLE_POLLS, ProcessPredictionLog
from services.serving.adapters.prediction_log import DROPPED, SENT, encode
from services.serving.domain import LogItem
from tests.integration.kafka_tools import create_topics, read_topic, unique
from tests.unit.serving.test_log_producer import with_body
from tests.unit.serving.test_prediction_log import item, validated
from tests.waiting import eventually


def split_request(n: int) -> list[LogItem]:
    """The two variants of one 10-row request, as the v1 API logs them: one body, rows picked by each."""
    records = [{"tenure_months": i, "monthly_charges": 20.25 * i + n, "plan": "basic"} for i in range(10)]
    body = orjson.dumps({"records": records})
    stable = with_body(item(rows=7), body, [0, 1, 2, 4, 5, 7, 9])
    canary = with_body(item(rows=3), body, [3, 6, 8])
    for part in (stable, canary):
        part.request_id = f"req-{n}"
        part.prediction_ids = [f"churn:7:{n}-{i}" for i in part.body_rows or []]
    return [stable, canary]


async def started_log(
    kafka_bootstrap: str,
    *,
    partitions: int = 1,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    **options: Any,
) -> tuple[ProcessPredictionLog, asyncio.Task[None], str]:
    """A producer process on a topic namespace of its own, started and reading: (log, its run task, the
    prefix)."""
    prefix = f"{unique('plog')}."
    await create_topics(kafka_bootstrap, prefix + TOPIC, partitions=partitions)
    log = ProcessPredictionLog(
        KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix, max_event_bytes=max_event_bytes),
        source="/test/serving",
        buffer=1_000,
        batch=50,
        handoff_bytes=1 << 26,
        **options,
    )
    running = asyncio.create_task(log.run())
    await asyncio.wait_for(log.connected(), timeout=60)
    return log, running, prefix


@pytest.mark.parametrize("poll_s", [0.005, 0.0], ids=["collected-every-5ms", "woken-by-each-write"])
async def test_a_clean_stop_sends_everything_handed_over(kafka_bootstrap: str, poll_s: float) -> None:
    sent_before = SENT._value.get()
    log, running, prefix = await started_log(kafka_bootstrap, linger_ms=50, poll_s=poll_s)
    items = [part for n in range(150) for part in split_request(n)]
    assert all(log.offer(i) for i in items)
    await log.stop()  # at once: what was handed over is still to be read, encoded and sent
    await asyncio.wait_for(running, timeout=30)
    assert SENT._value.get() - sent_before == len(items)

    records = await read_topic(kafka_bootstrap, prefix + TOPIC, expect=len(items))
    assert len(records) == len(items)
    got = [EVENT_TYPES.decode(r.value, r.headers).data for r in records]
    assert all(isinstance(e, PredictionsLogged) for e in got)
    assert got == [validated(i) for i in items]  # one partition: in order
    columns = [read_prediction_columns(r.value) for r in records]
    assert all(isinstance(c, PredictionColumns) for c in columns)
    assert [c.prediction_ids for c in columns if c is not None] == [i.prediction_ids for i in items]


async def test_each_model_keeps_to_one_partition_chosen_by_its_key(kafka_bootstrap: str) -> None:
    # Record batches are built per partition by the log itself: the partition must still be the one the
    # producer's default partitioner gives the key (a model's events stay in order on one partition).
    log, running, prefix = await started_log(kafka_bootstrap, partitions=3, linger_ms=20)
    models = [f"churn-{i}" for i in range(6)]
    items = []
    for n in range(60):
        part = item(rows=2)
        part.model, part.request_id = models[n % len(models)], f"req-{n}"
        items.append(part)
    assert all(log.offer(i) for i in items)
    await log.stop()
    await asyncio.wait_for(running, timeout=30)

    records = await read_topic(kafka_bootstrap, prefix + TOPIC, expect=len(items))
    assert len(records) == len(items)
    partitioner = DefaultPartitioner()
    for model in models:
        mine = [r for r in records if r.key == model.encode()]
        assert {r.partition for r in mine} == {partitioner(model.encode(), [0, 1, 2], [0, 1, 2])}
        in_order = [i.request_id for i in items if i.model == model]
        assert [EVENT_TYPES.decode(r.value, r.headers).data.request_id for r in mine] == in_order


async def test_items_handed_over_after_the_producer_went_idle_are_sent_without_a_stop(
    kafka_bootstrap: str,
) -> None:
    # With no items for a while the child stops polling and waits for the next write; that write must
    # wake it (nothing else would until the stop).
    poll_s = 0.005
    log, running, prefix = await started_log(kafka_bootstrap, linger_ms=10, poll_s=poll_s)
    try:
        first, later = [item(rows=3) for _ in range(5)], [item(rows=100) for _ in range(5)]
        assert all(log.offer(i) for i in first)
        assert len(await read_topic(kafka_bootstrap, prefix + TOPIC, expect=5)) == 5
        # Idle is a matter of time, not of anything serving can see: wait well past the empty polls that
        # send the child to wait on the socket.
        await asyncio.sleep(5 * _IDLE_POLLS * poll_s)
        assert all(log.offer(i) for i in later)
        records = await read_topic(kafka_bootstrap, prefix + TOPIC, expect=10)
        assert len(records) == 10
        got = [EVENT_TYPES.decode(r.value, r.headers).data for r in records]
        assert got == [validated(i) for i in first + later]
    finally:
        await log.stop()
        await asyncio.wait_for(running, timeout=30)


async def test_items_a_killed_producer_was_handed_are_counted_though_earlier_requests_were_split(
    kafka_bootstrap: str,
) -> None:
    # Serving hands over items, the producer sends events, and a request over the event limit is several
    # of them: what a dead producer never settled must still be counted in items, not hidden by the
    # extra events of the requests it did send.
    limit = 3_000
    log, running, _ = await started_log(kafka_bootstrap, linger_ms=10, max_event_bytes=limit)
    try:
        sent_before, exited_before = SENT._value.get(), DROPPED.labels("producer-exited")._value.get()
        first = [item(rows=40) for _ in range(10)]
        events = sum(len(encode(i, source="/test/serving", max_bytes=limit)) for i in first)
        assert events > len(first)
        assert all(log.offer(i) for i in first)

        async def all_sent() -> bool:
            return SENT._value.get() - sent_before == events

        await eventually(all_sent)
        assert log.process is not None
        producer = log.process
        os.kill(producer.pid, signal.SIGSTOP)  # alive, reading nothing, reporting nothing
        later = [item(rows=40) for _ in range(5)]
        assert all(log.offer(i) for i in later)

        async def handed_over() -> bool:
            return not log._pending

        await eventually(handed_over)
        os.kill(producer.pid, signal.SIGKILL)

        async def counted() -> float | None:
            return DROPPED.labels("producer-exited")._value.get() - exited_before or None

        assert await eventually(counted) == len(later)
    finally:
        await log.stop()
        await asyncio.wait_for(running, timeout=30)
