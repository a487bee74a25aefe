"""A poll whose handling outlasts aiokafka's ``max_poll_interval_ms``, on the real broker: the runner stays in
its group (no revocation, so no rebalance), and the events are handled once and committed.

aiokafka takes a member that has not called ``getmany`` for ``max_poll_interval_ms`` for stuck and has it
leave its group (``GroupCoordinator._heartbeat_routine``); a handler waiting out an outage, or retrying an
uncertain error, does exactly that. The interval is cut to 2 s here, the handling made to last several."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import TopicPartition

from contracts.envelope import CloudEvent, EventTypeRegistry, new_event
from libs.bus.core import Subscription, Transaction
from libs.bus.kafka import ConsumerRunner, KafkaDeadLetters, KafkaPublisher
from libs.bus.postgres import bus_migrations, pg_transactions
from libs.db import apply_migrations, create_pool
from libs.settings import KafkaSettings
from tests.integration.kafka_tools import create_topics, eventually, payload_on, read_topic, unique

INTERVAL_MS = 2000


class WatchedRunner(ConsumerRunner):
    """The runner, noting the partitions its rebalance listener saw revoked (it calls ``forget``)."""

    revoked: list[TopicPartition]

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        partitions = list(partitions)
        self.revoked.extend(partitions)
        super().forget(partitions)


async def test_a_handler_busy_for_several_poll_intervals_keeps_its_partition_and_is_committed_once(
    kafka_bootstrap: str, database_url: str, publisher: KafkaPublisher
) -> None:
    topic, schema, group = unique("test.busy"), unique("t_busy"), unique("g")
    await create_topics(kafka_bootstrap, topic)
    tick = payload_on(topic)
    pool = await create_pool(database_url, schema=schema)
    await apply_migrations(pool, schema, bus_migrations())
    calls: list[int] = []

    async def on_tick(event: CloudEvent[Any], tx: Transaction) -> None:
        calls.append(event.data.n)
        if event.data.n == 0:
            await asyncio.sleep(4 * INTERVAL_MS / 1000)  # a handling that outlasts the interval 4 times
        await tx.conn.execute("SELECT 1")

    runner = _runner(group, topic, tick, pool, schema, publisher, {tick: on_tick})
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(runner.ready.wait(), 30)
        for n in range(2):
            await publisher.publish(new_event(tick(n=n), source="/test", subject="m"))
        await eventually(lambda: _committed(runner, topic, 2), deadline_s=60)
        assert runner.revoked == [], "the runner left its group while it handled a poll"
    finally:
        runner.stop()
        await task
        await pool.close()
    assert calls == [0, 1]


async def test_an_uncertain_error_retried_for_longer_than_the_interval_is_dead_lettered_once(
    kafka_bootstrap: str, database_url: str, publisher: KafkaPublisher
) -> None:
    # Each attempt lasts a quarter of the interval (a statement timeout, scaled down); the attempts and the
    # delays between them, about 4.5 s, outlast it. A member that left its group handed the partition to the
    # other member, which read the event again and counted its attempts from zero, and so on, for ever.
    topic, dead_topic = unique("test.uncertain"), unique("test.uncertain_dlq")
    schema, group = unique("t_uncertain"), unique("g")
    await create_topics(kafka_bootstrap, topic, partitions=2)
    await create_topics(kafka_bootstrap, dead_topic)
    tick = payload_on(topic)
    pool = await create_pool(database_url, schema=schema)
    await apply_migrations(pool, schema, bus_migrations())
    calls: list[int] = []

    async def on_tick(event: CloudEvent[Any], tx: Transaction) -> None:
        calls.append(event.data.n)
        if event.data.n == 0:
            await asyncio.sleep(INTERVAL_MS / 4000)
            raise TimeoutError("canceling statement due to statement timeout")

    members = [
        _runner(
            group,
            topic,
            tick,
            pool,
            schema,
            publisher,
            {tick: on_tick},
            dead_topic=dead_topic,
            max_uncertain_retries=5,
            retry_backoff_s=0.05,
        )
        for _ in range(2)
    ]
    tasks = [asyncio.create_task(m.run()) for m in members]
    try:
        # One partition each: the other member is there to take the partition of one that leaves.
        await eventually(lambda: _true(all(len(_assigned(m)) == 1 for m in members)), deadline_s=30)
        for m in members:
            m.revoked.clear()
        for n in range(2):  # one key: both on one partition
            await publisher.publish(new_event(tick(n=n), source="/test", subject="m"))
        await eventually(lambda: _committed_in_all(members[0], topic, 2), deadline_s=60)
        assert [m.revoked for m in members] == [[], []], "a member left the group while it retried"
    finally:
        for m in members:
            m.stop()
        await asyncio.gather(*tasks)
        await pool.close()
    assert calls == [0] * 6 + [1]
    [dead] = await read_topic(kafka_bootstrap, dead_topic, expect=1, deadline_s=5)
    assert dict(dead.headers)["dlq_reason"] == b"handler-failed"


def _runner(
    group: str,
    topic: str,
    tick: type[Any],
    pool: Any,
    schema: str,
    publisher: KafkaPublisher,
    handlers: dict[type[Any], Any],
    *,
    dead_topic: str | None = None,
    **limits: Any,
) -> WatchedRunner:
    runner = WatchedRunner(
        Subscription(consumer=group, topics=[topic], handlers=handlers, **limits),
        kafka=KafkaSettings(bootstrap=publisher.kafka.bootstrap),
        registry=EventTypeRegistry([tick]),
        begin=pg_transactions(pool, schema),
        dead_letters=KafkaDeadLetters(publisher, **({"topic": dead_topic} if dead_topic else {})),
        max_poll_interval_ms=INTERVAL_MS,
    )
    runner.revoked = []
    return runner


async def _committed(runner: ConsumerRunner, topic: str, offset: int) -> bool:
    assert runner.consumer is not None
    return await runner.consumer.committed(TopicPartition(topic, 0)) == offset


async def _committed_in_all(runner: ConsumerRunner, topic: str, offsets: int) -> bool:
    """Whether the group's committed offsets on ``topic``'s two partitions add up to ``offsets``."""
    assert runner.consumer is not None
    committed = [await runner.consumer.committed(TopicPartition(topic, p)) for p in (0, 1)]
    return sum(c or 0 for c in committed) == offsets


def _assigned(runner: ConsumerRunner) -> set[TopicPartition]:
    return runner.consumer.assignment() if runner.consumer is not None else set()


async def _true(value: bool) -> bool:
    return value
