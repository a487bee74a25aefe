"""The consumer lag gauge on the real broker: it keeps moving while a handler is stuck (the case it is for),
counting what the consumer has not settled, and comes back to 0 once everything is settled."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import REGISTRY as PROMETHEUS

from contracts.envelope import CloudEvent, EventTypeRegistry, new_event
from libs.bus.core import Subscription, Transaction
from libs.bus.kafka import ConsumerRunner, KafkaDeadLetters, KafkaPublisher
from libs.bus.postgres import bus_migrations, pg_transactions
from libs.db import apply_migrations, create_pool
from libs.settings import KafkaSettings
from tests.integration.kafka_tools import create_topics, eventually, payload_on, unique


async def test_the_lag_of_a_stuck_handler_counts_the_events_produced_meanwhile_and_is_0_once_settled(
    kafka_bootstrap: str, database_url: str, publisher: KafkaPublisher
) -> None:
    topic, schema, group = unique("test.lag"), unique("t_lag"), unique("g")
    await create_topics(kafka_bootstrap, topic)
    tick = payload_on(topic)
    pool = await create_pool(database_url, schema=schema)
    await apply_migrations(pool, schema, bus_migrations())
    entered, release = asyncio.Event(), asyncio.Event()

    async def on_tick(event: CloudEvent[Any], tx: Transaction) -> None:
        entered.set()
        await release.wait()  # a handler stuck, as one waiting for its database is

    runner = ConsumerRunner(
        Subscription(consumer=group, topics=[topic], handlers={tick: on_tick}),
        kafka=KafkaSettings(bootstrap=kafka_bootstrap),
        registry=EventTypeRegistry([tick]),
        begin=pg_transactions(pool, schema),
        dead_letters=KafkaDeadLetters(publisher),
        lag_interval_s=0.2,
    )

    async def lag() -> float | None:
        return PROMETHEUS.get_sample_value(
            "driftloop_bus_consumer_lag", {"consumer": group, "topic": topic, "partition": "0"}
        )

    async def lag_is(expected: int) -> bool:
        return await lag() == expected

    task = asyncio.create_task(runner.run())
    try:
        await publisher.publish(new_event(tick(n=0), source="/test", subject="m"))
        await asyncio.wait_for(entered.wait(), 30)
        for n in range(1, 5):
            await publisher.publish(new_event(tick(n=n), source="/test", subject="m"))

        # The one in hand and the four behind it: none is settled.
        await eventually(lambda: lag_is(5))

        release.set()
        await eventually(lambda: lag_is(0))
    finally:
        release.set()
        runner.stop()
        await task
        await pool.close()
    assert await lag() is None, "the stopped consumer still reports a lag"
