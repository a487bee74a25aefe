"""`driftloop deadletter replay` on the real broker and database: a handler that failed dead-letters its
events; once it is fixed, the replay puts them back on their topic and the consumer handles each once, a
truncated one from its original; replaying the same dead letters again is a duplicate for the inbox."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from pydantic import Field

from contracts.envelope import CloudEvent, EventPayload, EventTypeRegistry, new_event
from contracts.topics import DEAD_LETTER
from libs.bus.core import Subscription, Transaction
from libs.bus.dead_letters import (
    DeadLetterEntry,
    DeadLetterSelection,
    OriginRecords,
    read_dead_letters,
    replay,
)
from libs.bus.kafka import ConsumerRunner, KafkaDeadLetters, KafkaPublisher
from libs.bus.metrics import DUPLICATES
from libs.bus.postgres import bus_migrations, pg_transactions
from libs.db import apply_migrations, create_pool
from libs.settings import KafkaSettings
from tests.integration.kafka_tools import create_topics, eventually, unique

TOPIC = "test.replayed"


class Parcel(EventPayload):
    """A numbered test event, padded to the size a test needs."""

    event_name: ClassVar[str] = "Parcel"
    topic: ClassVar[str] = TOPIC
    n: int = Field(description="Sequence number.")
    pad: str = Field("", description="Filler.")


async def dead_letters(kafka: KafkaSettings, expect: int) -> list[DeadLetterEntry] | None:
    found = [entry async for entry in read_dead_letters(kafka, DeadLetterSelection())]
    return found if len(found) >= expect else None


async def test_a_replayed_dead_letter_is_handled_once_by_the_fixed_handler_and_a_second_replay_is_a_duplicate(
    kafka_bootstrap: str, database_url: str
) -> None:
    kafka = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=unique("dlreplay") + ".")
    await create_topics(kafka_bootstrap, kafka.physical(TOPIC), partitions=3)
    await create_topics(kafka_bootstrap, kafka.physical(DEAD_LETTER), partitions=3)
    schema, group = unique("t_replay"), unique("g")
    pool = await create_pool(database_url, schema=schema)
    await apply_migrations(pool, schema, bus_migrations())
    publisher = KafkaPublisher(kafka)
    # The dead-letter writer's limit is far below the consumer's: the large event's dead letter is truncated,
    # and its replay must come from the original on its topic.
    writer = KafkaPublisher(
        KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=kafka.topic_prefix, max_event_bytes=1000)
    )
    await publisher.start()
    await writer.start()

    handled: list[int] = []
    broken = True

    async def on_parcel(event: CloudEvent[Any], tx: Transaction) -> None:
        if broken:
            raise RuntimeError("a bug, since fixed")
        handled.append(event.data.n)

    runner = ConsumerRunner(
        Subscription(
            consumer=group,
            topics=[TOPIC],
            handlers={Parcel: on_parcel},
            max_retries=0,
            retry_backoff_s=0,
            max_event_bytes=200_000,
        ),
        kafka=kafka,
        registry=EventTypeRegistry([Parcel]),
        begin=pg_transactions(pool, schema),
        dead_letters=KafkaDeadLetters(writer),
    )
    task = asyncio.create_task(runner.run())
    try:
        small = new_event(Parcel(n=1), source="/test", subject="churn")
        large = new_event(Parcel(n=2, pad="x" * 100_000), source="/test", subject="churn")
        await publisher.publish(small)
        await publisher.publish(large)
        filed = await eventually(lambda: dead_letters(kafka, 2))
        assert [(e.event_id, e.reason, e.truncated) for e in filed] == [
            (small.id, "handler-failed", ()),
            (large.id, "handler-failed", ("value",)),
        ]

        broken = False
        async with OriginRecords(kafka) as origin_of:
            first = await replay(
                read_dead_letters(kafka, DeadLetterSelection()),
                named=False,
                origin_of=origin_of,
                sender=publisher,
            )
            assert (first.replayed, first.failure) == (2, None)
            await eventually(lambda: _async(sorted(handled) == [1, 2]))

            again = await replay(
                read_dead_letters(kafka, DeadLetterSelection()),
                named=False,
                origin_of=origin_of,
                sender=publisher,
            )
            assert (again.replayed, again.failure) == (2, None)
            await eventually(lambda: _async(DUPLICATES.labels(group, TOPIC)._value.get() == 2))
    finally:
        runner.stop()
        await task
        await publisher.stop()
        await writer.stop()
        await pool.close()

    assert sorted(handled) == [1, 2]
    assert len(await dead_letters(kafka, 0) or []) == 2  # nothing was dead-lettered again


async def _async(value: Any) -> Any:
    return value
