"""Records the real broker refuses as too large (a topic's ``max.message.bytes`` below the producer's limit):
the dead-letter writer and the outbox relay go on, and so does everything sent after them.

aiokafka's idempotent producer numbers each partition's batches; a batch the broker refuses keeps its
numbers, so every later batch to that partition is refused as out of order for as long as the producer
lives. The refusal must not cost more than the one record."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import Field

from contracts.envelope import EventPayload, new_event
from contracts.topics import DEAD_LETTER
from libs.bus.core import Record
from libs.bus.kafka import BATCHED_FROM, KafkaDeadLetters, KafkaPublisher
from libs.bus.postgres import OutboxRelay, bus_migrations, pg_transactions
from libs.db import apply_migrations, create_pool
from libs.settings import KafkaSettings
from tests.integration.kafka_tools import create_topics, read_topic, unique

TOPIC_LIMIT = 100_000
"""The small topics' ``max.message.bytes``: far below the producer's (1,000,000 plus 64 KiB)."""


class Padded(EventPayload):
    """A numbered test event with padding, to make it as large as a test needs."""

    event_name: ClassVar[str] = "Padded"
    subject_field: ClassVar[str | None] = None
    n: int = Field(description="Sequence number.")
    pad: str = Field("", description="Filler.")


async def create_small_topic(bootstrap: str, name: str) -> None:
    """A topic whose records may be at most :data:`TOPIC_LIMIT` bytes."""
    await create_topics(bootstrap, name, configs={"max.message.bytes": str(TOPIC_LIMIT)})


async def test_a_dead_letter_the_broker_refuses_goes_without_its_value_and_later_ones_go_whole(
    kafka_bootstrap: str, publisher: KafkaPublisher
) -> None:
    dead_letter_topic = unique("test.small_dlq")
    await create_small_topic(kafka_bootstrap, dead_letter_topic)
    writer = KafkaDeadLetters(publisher, topic=dead_letter_topic)
    before = Record("test.origin", 0, 6, b"churn", b"not json", (("ce_id", b"e-6"),))
    big = Record("test.origin", 0, 7, b"churn", b"x" * (2 * TOPIC_LIMIT), (("ce_id", b"e-7"),))
    after = Record("test.origin", 0, 8, b"churn", b"not json", (("ce_id", b"e-8"),))

    for record in (before, big, after):
        await writer.dead_letter(record, consumer="c", reason="not-json", error="value is not JSON")

    first, refused, last = await read_topic(kafka_bootstrap, dead_letter_topic, expect=3)
    assert (dict(first.headers)["dlq_origin_offset"], first.value) == (b"6", b"not json")
    h = dict(refused.headers)
    assert (h["dlq_origin_offset"], h["dlq_truncated"], refused.value) == (b"7", b"value", b"")
    assert h["dlq_original_value_bytes"] == str(2 * TOPIC_LIMIT).encode()
    assert (dict(last.headers)["dlq_origin_offset"], last.value) == (b"8", b"not json")


@pytest.mark.parametrize("rows", [3, 3 * BATCHED_FROM], ids=["sent-one-by-one", "sent-in-batches"])
async def test_an_outbox_row_the_broker_refuses_is_set_aside_and_the_rows_behind_it_go_out(
    kafka_bootstrap: str, database_url: str, rows: int
) -> None:
    prefix = unique("bushunt") + "."
    kafka = KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=prefix)
    topic = "test.refused"
    await create_small_topic(kafka_bootstrap, kafka.physical(topic))
    await create_topics(kafka_bootstrap, kafka.physical(DEAD_LETTER))
    on_topic = type("PaddedOnTopic", (Padded,), {"__doc__": Padded.__doc__, "topic": topic})
    schema = unique("t_refused")
    pool = await create_pool(database_url, schema=schema)
    publisher = KafkaPublisher(kafka)
    await publisher.start()
    try:
        await apply_migrations(pool, schema, bus_migrations())
        # The refused row second: the relay sends the rows as one send (in batches of its own from
        # BATCHED_FROM rows on), then, refused, one by one.
        events = [
            new_event(on_topic(n=n, pad="x" * 2 * TOPIC_LIMIT if n == 2 else ""), source="/test")
            for n in range(1, rows + 1)
        ]
        async with pg_transactions(pool, schema)() as tx:
            for event in events:
                await tx.publish(event)
        relay = OutboxRelay(pool, schema, publisher, max_record_bytes=publisher.max_record_bytes)

        assert await relay.flush_once() == rows
        assert await relay.backlog() == 0
    finally:
        await publisher.stop()
        await pool.close()

    sent = await read_topic(kafka_bootstrap, kafka.physical(topic), expect=10 * rows, deadline_s=5)
    ids = [dict(r.headers)["ce_id"].decode() for r in sent]
    # Rows may go out twice (with the refused batch, then alone): consumers absorb the repeat.
    kept = [e.id for i, e in enumerate(events) if i != 1]
    assert sorted(set(ids)) == sorted(kept) and ids[-1] == events[-1].id
    [dead] = await read_topic(kafka_bootstrap, kafka.physical(DEAD_LETTER), expect=1)
    h = dict(dead.headers)
    assert (h["ce_id"], h["dlq_reason"], h["dlq_consumer"]) == (
        events[1].id.encode(),
        b"output-oversized",
        f"{schema}-outbox".encode(),
    )
