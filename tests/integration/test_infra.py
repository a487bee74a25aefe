"""The real broker and database do what the platform relies on, with the client versions we pin."""

from __future__ import annotations

import time
import uuid

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from contracts.topics import TOPICS
from deploy.local.broker import create_platform_topics, delete_platform_topics, delete_topics
from tests.integration.kafka_tools import eventually, made_by_this_session, unique


async def _new_topic(bootstrap: str, partitions: int) -> str:
    name = unique("test.infra")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(name, partitions, 1)])
        assert [code for _, code, _ in response.topic_errors] == [0]
    finally:
        await admin.close()
    return name


async def _drain(consumer: AIOKafkaConsumer, expect: int, deadline_s: float = 30.0) -> list[bytes]:
    values: list[bytes] = []
    deadline = time.monotonic() + deadline_s
    while len(values) < expect and time.monotonic() < deadline:
        batch = await consumer.getmany(timeout_ms=250)
        values.extend(record.value for records in batch.values() for record in records if record.value)
    return values


async def test_platform_topics_exist_with_their_partition_counts(kafka_bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(TOPICS))
    finally:
        await admin.close()
    partitions = {topic["topic"]: len(topic["partitions"]) for topic in described if topic["error_code"] == 0}
    assert partitions == {spec.name: spec.partitions for spec in TOPICS.values()}


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def test_a_namespace_is_deleted_whole_and_the_platform_topics_stay(kafka_bootstrap: str) -> None:
    prefix = f"test.ns{uuid.uuid4().hex[:8]}."
    neighbour = f"test.ns{uuid.uuid4().hex[:8]}."
    create_platform_topics(kafka_bootstrap, prefix=prefix)
    create_platform_topics(kafka_bootstrap, prefix=neighbour)
    assert {prefix + name for name in TOPICS} <= await _topics(kafka_bootstrap)

    deleted = delete_platform_topics(kafka_bootstrap, prefix=prefix)

    assert deleted == sorted(prefix + name for name in TOPICS)

    async def gone() -> set[str] | None:
        # Deletion is asynchronous: the broker's metadata drops the topics shortly after the answer.
        topics = await _topics(kafka_bootstrap)
        return None if any(t.startswith(prefix) for t in topics) else topics

    left = await eventually(gone)
    assert set(TOPICS) <= left
    assert {neighbour + name for name in TOPICS} <= left
    delete_platform_topics(kafka_bootstrap, prefix=neighbour)
    with pytest.raises(ValueError, match="prefix is required"):
        delete_platform_topics(kafka_bootstrap, prefix="")
    assert set(TOPICS) <= await _topics(kafka_bootstrap)


async def test_a_sweep_deletes_what_it_picks_but_never_platform_or_kafka_topics(
    kafka_bootstrap: str,
) -> None:
    mine, other = await _new_topic(kafka_bootstrap, 1), f"test.other.{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(other, 1, 1)])
    finally:
        await admin.close()
    assert made_by_this_session(mine) and not made_by_this_session(other)
    # Creation is asynchronous too: a topic just made may be missing from another client's list for a moment,
    # and a sweep can delete only what it is listed.
    await eventually(lambda: _listing(kafka_bootstrap, mine, other))

    deleted = delete_topics(kafka_bootstrap, lambda t: t == mine or t in TOPICS or t.startswith("__"))

    assert deleted == [mine]
    left = await eventually(lambda: _without(kafka_bootstrap, mine))
    assert set(TOPICS) <= left and other in left and "__consumer_offsets" in left
    delete_topics(kafka_bootstrap, lambda t: t == other)


async def _listing(bootstrap: str, *topics: str) -> set[str] | None:
    listed = await _topics(bootstrap)
    return listed if set(topics) <= listed else None


async def _without(bootstrap: str, topic: str) -> set[str] | None:
    # Deletion is asynchronous: the broker's metadata drops a topic shortly after the answer.
    topics = await _topics(bootstrap)
    return None if topic in topics else topics


async def test_idempotent_produce_and_group_consume_with_manual_commit(kafka_bootstrap: str) -> None:
    topic = await _new_topic(kafka_bootstrap, partitions=3)
    sent = [f"event-{n}".encode() for n in range(30)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for n, value in enumerate(sent):
            await producer.send_and_wait(topic, value, key=f"model-{n % 5}".encode())
    finally:
        await producer.stop()

    group = f"test-infra-{uuid.uuid4().hex[:8]}"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        received = await _drain(consumer, expect=len(sent))
        await consumer.commit()
        partitions = [TopicPartition(topic, p) for p in range(3)]
        ends = await consumer.end_offsets(partitions)
        committed = {tp: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()
    assert sorted(received) == sorted(sent)
    assert committed == {tp: ends[tp] for tp in partitions}

    # A new member of the same group starts after the committed offsets: nothing is delivered twice.
    again = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await again.start()
    try:
        deadline = time.monotonic() + 30
        while len(again.assignment()) < 3 and time.monotonic() < deadline:
            await again.getmany(timeout_ms=250)
        positions = {tp: await again.position(tp) for tp in partitions}
    finally:
        await again.stop()
    assert positions == committed


async def test_postgres_answers_select_one(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        assert await connection.fetchval("select 1") == 1
    finally:
        await connection.close()
