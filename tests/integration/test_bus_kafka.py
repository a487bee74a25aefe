"""The bus on the real broker and the real database: round trip, crash safety, poison, outbox relay."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkCloudEvent

from contracts.envelope import CloudEvent, EventTypeRegistry, new_event
from contracts.topics import DEAD_LETTER
from libs.bus.core import Subscription, Transaction
from libs.bus.kafka import BATCHED_FROM, ConsumerRunner, KafkaDeadLetters, KafkaPublisher
from libs.bus.metrics import DUPLICATES, PUBLISHED
from libs.bus.postgres import bus_migrations, pg_transactions
from libs.db import apply_migrations, create_pool
from libs.settings import KafkaSettings
from tests.integration.kafka_tools import (
    count_rows,
    create_topics,
    eventually,
    fetchval,
    payload_on,
    read_topic,
    unique,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.workers.bus_worker", *args],
        cwd=ROOT,
        env={**os.environ, **env},
    )


async def wait_exit(proc: subprocess.Popen[bytes], deadline_s: float = 60) -> int:
    return await eventually(lambda: _poll(proc), deadline_s=deadline_s)


async def _poll(proc: subprocess.Popen[bytes]) -> Any:
    code = proc.poll()
    return None if code is None else (code if code != 0 else "exit-0")


async def test_published_event_round_trips_and_any_cloudevents_sdk_reads_it(
    kafka_bootstrap: str, publisher: KafkaPublisher
) -> None:
    topic = unique("test.roundtrip")
    await create_topics(kafka_bootstrap, topic)
    tick = payload_on(topic)
    event = new_event(tick(n=42), source="/test/roundtrip", subject="churn", actor="user:alice")
    await publisher.publish(event)

    [record] = await read_topic(kafka_bootstrap, topic, expect=1)
    ours = EventTypeRegistry([tick]).decode(record.value, record.headers)
    assert ours == event
    assert record.key == b"churn"

    sdk = ce_kafka.from_binary(
        ce_kafka.KafkaMessage(headers=dict(record.headers), key=record.key, value=record.value), JSONFormat()
    )
    assert sdk.get_id() == event.id
    assert sdk.get_type() == "io.driftloop.Tick.v1"
    assert sdk.get_source() == "/test/roundtrip"
    assert sdk.get_subject() == "churn"
    assert sdk.get_extension("correlationid") == event.id
    assert sdk.get_extension("actor") == "user:alice"
    assert sdk.get_specversion() == "1.0"
    assert sdk.get_data() == {"n": 42}


async def test_an_event_a_cloudevents_sdk_publishes_in_structured_mode_is_handled_once(
    kafka_bootstrap: str, database_url: str, publisher: KafkaPublisher
) -> None:
    topic, schema = unique("test.structured"), unique("t_structured")
    await create_topics(kafka_bootstrap, topic)
    tick = payload_on(topic)
    sdk_event = SdkCloudEvent(
        attributes={"id": "ext-7", "source": "/external/team", "type": tick.event_type(), "subject": "m"},
        data={"n": 7},
    )
    message = ce_kafka.to_structured(sdk_event, JSONFormat())
    sent = (topic, b"m", message.value, list(message.headers.items()))
    await publisher.send_many([sent, sent])  # and a redelivery of it

    pool = await create_pool(database_url, schema=schema)
    await apply_migrations(pool, schema, bus_migrations())
    handled: list[tuple[str, str, int]] = []

    async def on_tick(event: CloudEvent[Any], tx: Transaction) -> None:
        handled.append((event.id, event.source, event.data.n))

    group = unique("g")
    runner = ConsumerRunner(
        Subscription(consumer=group, topics=[topic], handlers={tick: on_tick}),
        kafka=KafkaSettings(bootstrap=kafka_bootstrap),
        registry=EventTypeRegistry([tick]),
        begin=pg_transactions(pool, schema),
        dead_letters=KafkaDeadLetters(publisher),
    )
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: _as_async(DUPLICATES.labels(group, topic)._value.get() == 1))
    finally:
        runner.stop()
        await task
        await pool.close()
    assert handled == [("ext-7", "/external/team", 7)]


async def test_crash_between_db_commit_and_offset_commit_still_gives_one_effect(
    kafka_bootstrap: str, database_url: str, publisher: KafkaPublisher
) -> None:
    topic, schema, group = unique("test.crash"), unique("t_crash"), unique("g")
    await create_topics(kafka_bootstrap, topic)
    tick = payload_on(topic)
    for n in range(5):
        await publisher.publish(new_event(tick(n=n), source="/test", subject="m"))
    env = {"DRIFTLOOP_KAFKA_BOOTSTRAP": kafka_bootstrap, "DRIFTLOOP_DATABASE_URL": database_url}

    first = worker(env, "consume", topic, schema, "--group", group, "--die-after-commit", "1")
    assert await wait_exit(first) == -9  # killed itself right after its first DB commit
    done_before_crash = await fetchval(database_url, f"SELECT count(*) FROM {schema}.effects")
    assert done_before_crash >= 1
    # The offsets of what it handled were never committed: Kafka will deliver those events again.
    assert await committed_offset(kafka_bootstrap, group, topic) is None

    second = worker(env, "consume", topic, schema, "--group", group)
    try:
        await eventually(lambda: _equals(count_rows(database_url, f"{schema}.effects"), 5))
        await eventually(lambda: _as_async(committed_offset(kafka_bootstrap, group, topic)), deadline_s=30)
    finally:
        second.terminate()
        second.wait(30)
    assert await committed_offset(kafka_bootstrap, group, topic) == 5
    assert await fetchval(database_url, f"SELECT count(*) FROM {schema}.effects") == 5
    assert await fetchval(database_url, f"SELECT count(DISTINCT n) FROM {schema}.effects") == 5


@pytest.mark.parametrize(
    ("value", "header_changes", "reason"),
    [
        (b"\x00\x01 not json", {}, "not-json"),
        (b'{"n": 1}', {"ce_type": b"io.driftloop.Unheard.v1"}, "unknown-type"),
        (b'{"n": 1}', {"ce_type": b"io.driftloop.Tick.v7"}, "unknown-schema-version"),
        (b'{"n": "seven"}', {}, "schema-invalid"),
        (b'{"n": 1, "pad": "' + b"x" * 300_000 + b'"}', {}, "oversized"),
    ],
    ids=["not-json", "unknown-type", "unknown-version", "schema-invalid", "oversized"],
)
async def test_poison_message_goes_to_dead_letter_with_reason_and_consumer_goes_on(
    kafka_bootstrap: str,
    database_url: str,
    publisher: KafkaPublisher,
    value: bytes,
    header_changes: dict[str, bytes],
    reason: str,
) -> None:
    topic, schema = unique("test.poison"), unique("t_poison")
    await create_topics(kafka_bootstrap, topic)
    tick = payload_on(topic)
    good = new_event(tick(n=1), source="/test", subject="m")
    _, _, headers = good.to_kafka()
    poisoned_headers = [(k, header_changes.get(k, v)) for k, v in headers]
    poisoned_headers = [(k, v) for k, v in poisoned_headers if k != "ce_id"] + [("ce_id", b"poison-1")]
    await publisher.send_many([(topic, b"m", value, poisoned_headers)])
    after = new_event(tick(n=2), source="/test", subject="m")
    await publisher.publish(after)

    pool = await create_pool(database_url, schema=schema)
    await apply_migrations(pool, schema, bus_migrations())
    handled: list[int] = []

    async def on_tick(event: CloudEvent[Any], tx: Transaction) -> None:
        handled.append(event.data.n)

    kafka = KafkaSettings(bootstrap=kafka_bootstrap, max_event_bytes=200_000)
    runner = ConsumerRunner(
        Subscription(consumer=unique("g"), topics=[topic], handlers={tick: on_tick}, max_event_bytes=200_000),
        kafka=kafka,
        registry=EventTypeRegistry([tick]),
        begin=pg_transactions(pool, schema),
        dead_letters=KafkaDeadLetters(publisher),
    )
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: _as_async(handled == [2]))
    finally:
        runner.stop()
        await task
        await pool.close()

    dead = [
        r
        for r in await read_topic(kafka_bootstrap, DEAD_LETTER, expect=10_000, deadline_s=5)
        if dict(r.headers).get("dlq_origin_topic") == topic.encode()
    ]
    assert len(dead) == 1
    h = dict(dead[0].headers)
    assert h["dlq_reason"] == reason.encode()
    assert h["dlq_error"]
    assert h["dlq_origin_partition"] == b"0"
    assert h["dlq_origin_offset"] == b"0"
    assert dead[0].value == value


async def _as_async(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


async def committed_offset(bootstrap: str, group: str, topic: str) -> int | None:
    """The group's committed offset on partition 0, read without joining the group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(topic, 0))
    finally:
        await consumer.stop()


async def _equals(count: Any, expected: int) -> bool:
    return bool(await count == expected)


async def test_outbox_relay_killed_mid_batch_loses_nothing_and_duplicates_are_absorbed(
    kafka_bootstrap: str, database_url: str
) -> None:
    topic, schema, consumer_schema = unique("test.outbox"), unique("t_outbox"), unique("t_outcons")
    await create_topics(kafka_bootstrap, topic)
    tick = payload_on(topic)
    pool = await create_pool(database_url, schema=schema)
    await apply_migrations(pool, schema, bus_migrations())
    begin = pg_transactions(pool, schema)
    total = 40
    async with begin() as tx:
        for n in range(total):
            await tx.publish(new_event(tick(n=n), source="/test", subject=f"m{n % 3}"))
    await pool.close()
    env = {"DRIFTLOOP_KAFKA_BOOTSTRAP": kafka_bootstrap, "DRIFTLOOP_DATABASE_URL": database_url}

    dying = worker(env, "relay", schema, "--die-after-send", "--batch-size", "20")
    assert await wait_exit(dying) == -9
    unsent = await fetchval(database_url, f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL")
    assert unsent == total  # the rows it sent were never marked: they will be sent again

    relay = worker(env, "relay", schema)
    consumer = worker(env, "consume", topic, consumer_schema, "--group", unique("g"))
    try:
        await eventually(
            lambda: fetchval(database_url, f"SELECT count(*) = 0 FROM {schema}.outbox WHERE sent_at IS NULL")
        )
        await eventually(lambda: _equals(count_rows(database_url, f"{consumer_schema}.effects"), total))
    finally:
        for p in (relay, consumer):
            p.terminate()
            p.wait(30)
    records = await read_topic(kafka_bootstrap, topic, expect=total + 10, deadline_s=5)
    assert len(records) == total + 10  # ten records of the dying batch were published twice
    assert await fetchval(database_url, f"SELECT count(DISTINCT n) FROM {consumer_schema}.effects") == total
    assert await fetchval(database_url, f"SELECT count(*) FROM {consumer_schema}.effects") == total


async def test_a_large_send_lands_in_the_partitions_send_would_choose_in_order_and_counted(
    kafka_bootstrap: str, publisher: KafkaPublisher
) -> None:
    topic = unique("test.batched")
    await create_topics(kafka_bootstrap, topic, partitions=3)
    on_topic = payload_on(topic)
    # Large enough for batches of their own (and several per partition); some records have no key.
    keys = [f"model-{n % 7}".encode() if n % 5 else None for n in range(400)]
    events = [new_event(on_topic(n=n), source="/test") for n in range(400)]
    items = [(topic, key, e.to_kafka()[1], e.to_kafka()[2]) for key, e in zip(keys, events, strict=True)]
    assert len(items) >= BATCHED_FROM
    before = PUBLISHED.labels(topic)._value.get()

    await publisher.send_many(items)

    records = await read_topic(kafka_bootstrap, topic, expect=400)
    assert sorted(json.loads(r.value)["n"] for r in records) == list(range(400))
    for r in records:
        if r.key is not None:  # aiokafka's send() chooses this partition for the key
            assert r.partition == DefaultPartitioner()(r.key, [0, 1, 2], [0, 1, 2])
    for partition in (0, 1, 2):
        ns = [json.loads(r.value)["n"] for r in records if r.partition == partition]
        assert ns == sorted(ns) and ns, f"partition {partition} out of order or empty"
    assert PUBLISHED.labels(topic)._value.get() - before == 400
