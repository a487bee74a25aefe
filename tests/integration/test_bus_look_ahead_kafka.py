"""The Kafka runner's look-ahead on the real broker: with a batch_prepare, the next fetched poll is
prepared while a poll is settled, and a poll that fails is read again together with the one ahead of it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from contracts.envelope import EventTypeRegistry, new_event
from libs.bus.core import Delivery, Subscription, Transaction
from libs.bus.kafka import ConsumerRunner, KafkaDeadLetters, KafkaPublisher
from libs.bus.postgres import bus_migrations, pg_transactions
from libs.db import apply_migrations, create_pool
from libs.settings import KafkaSettings
from tests.integration.kafka_tools import create_topics, eventually, payload_on, unique


async def test_a_failed_poll_and_the_one_prepared_ahead_are_read_again_each_record_settled_once(
    kafka_bootstrap: str, database_url: str
) -> None:
    topic, schema = unique("test.ahead"), unique("t_ahead")
    await create_topics(kafka_bootstrap, topic, partitions=2)
    tick = payload_on(topic)
    publisher = KafkaPublisher(KafkaSettings(bootstrap=kafka_bootstrap))
    await publisher.start()
    try:
        for n in range(240):
            # Uneven partitions, so a poll and the one ahead of it often hold different partitions.
            value, key, headers = _kafka(new_event(tick(n=n), source="/test", subject="m"))
            await publisher.producer.send(topic, value, key, partition=int(n % 8 == 0), headers=headers)
        await publisher.producer.flush()
    finally:
        await publisher.stop()

    pool = await create_pool(database_url, schema=schema)
    await apply_migrations(pool, schema, bus_migrations())
    settled: list[tuple[int, int]] = []
    prepared: list[tuple[int, int]] = []
    calls = {"n": 0}
    # The partitions of the poll prepared ahead in this dispatch (its preparation runs before the
    # handler starts), and how often a poll failed while the one ahead held a partition it did not: the
    # runner must seek that partition back too, or its records are never read.
    ahead_partitions: set[int] = set()
    failed_with_other_partition_ahead: list[set[int]] = []

    async def handle(deliveries: Sequence[Delivery], tx: Transaction) -> None:
        calls["n"] += 1
        other_ahead = ahead_partitions - {d.record.partition for d in deliveries}
        ahead_partitions.clear()
        if other_ahead and len(failed_with_other_partition_ahead) < 3:
            failed_with_other_partition_ahead.append(other_ahead)
            raise ConnectionResetError("the database went away")  # transient: the runner re-reads
        if calls["n"] % 4 == 3 and calls["n"] < 40:
            raise ConnectionResetError("the database went away")
        await tx.conn.execute("SELECT 1")
        settled.extend((d.record.partition, d.record.offset) for d in deliveries)

    async def prepare(deliveries: Sequence[Delivery]) -> None:
        prepared.extend((d.record.partition, d.record.offset) for d in deliveries)
        ahead_partitions.update(d.record.partition for d in deliveries)

    kafka = KafkaSettings(bootstrap=kafka_bootstrap)
    runner = ConsumerRunner(
        Subscription(
            consumer=unique("g"), topics=[topic], batch_handler=handle, batch_prepare=prepare, raw=True
        ),
        kafka=kafka,
        registry=EventTypeRegistry([tick]),
        begin=pg_transactions(pool, schema),
        dead_letters=KafkaDeadLetters(KafkaPublisher(kafka)),
        max_records=20,
    )
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: _true(len(set(settled)) == 240), deadline_s=60)
    finally:
        runner.stop()
        await task
        await pool.close()
    assert len(settled) == 240, "a record settled twice"
    for partition in (0, 1):
        offsets = [o for p, o in settled if p == partition]
        assert offsets == sorted(offsets) and offsets == list(range(len(offsets)))
    assert prepared, "no poll was prepared ahead"
    assert failed_with_other_partition_ahead, "no poll failed while the one ahead held another partition"


def _kafka(event: Any) -> tuple[bytes, bytes | None, list[tuple[str, bytes]]]:
    key, value, headers = event.to_kafka()
    return value, key, headers


async def _true(value: bool) -> bool:
    return value
