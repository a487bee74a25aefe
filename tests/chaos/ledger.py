"""What the topics hold and what the audit trail holds, to compare one with the other.

Both sides are read by Kafka position (logical topic, partition, offset), with the CloudEvents id each
record carries. They are compared by event — (topic, id), or the position for a record without an id —
because a topic may hold an event twice (an outbox relay re-sends a batch it could not mark sent) while
the trail must hold it once.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from contracts.topics import DEAD_LETTER, TOPICS

Position = tuple[str, int, int]
READ_DEADLINE_S = 180.0


def audited_topics() -> list[str]:
    """The topics audit records with its default settings (predictions and dead letters included)."""
    return [name for name, spec in TOPICS.items() if spec.audited] + [DEAD_LETTER]


@dataclass
class Ledger:
    """Records by position, with the CloudEvents id each carries (None when it has none)."""

    ids: dict[Position, str | None] = field(default_factory=dict)
    rows: Counter[Position] = field(default_factory=Counter)

    def event_counts(self) -> Counter[tuple[str, str]]:
        """How often each (topic, event id) appears; the same id on the dead-letter topic is its own entry."""
        return Counter((p[0], i) for p, i in self.ids.items() if i is not None for _ in range(self.rows[p]))

    def events(self) -> Counter[tuple[str, str] | Position]:
        """How often each event appears: (topic, id), or the position of a record without an id."""
        return Counter(
            (p[0], i) if i is not None else p for p, i in self.ids.items() for _ in range(self.rows[p])
        )


async def read_topics(bootstrap: str, prefix: str) -> tuple[Ledger, dict[tuple[str, int], int]]:
    """Every record of the audited topics from the beginning up to their end offsets now; and those ends."""
    # "earliest" as the reset policy too: after assign() the fetcher resets the new partitions by its
    # policy in the background, and a "latest" answer arriving after a seek_to_beginning() overwrites it
    # (aiokafka applies any reset answer to a partition still awaiting a reset) — the read then starts at
    # the end and sees nothing, as it did once in CI. Explicit seeks to the beginning offsets, below.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions = []
        for topic in audited_topics():
            for p in sorted(await _partitions(consumer, prefix + topic)):
                partitions.append(TopicPartition(prefix + topic, p))
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        for tp, first in (await consumer.beginning_offsets(partitions)).items():
            consumer.seek(tp, first)
        ledger = Ledger()
        pending = {tp for tp in partitions if ends[tp] > 0}
        deadline = time.monotonic() + READ_DEADLINE_S
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000, max_records=5000)
            for tp, records in batch.items():
                for r in records:
                    if r.offset >= ends[tp]:
                        continue
                    position = (r.topic[len(prefix) :], r.partition, r.offset)
                    ledger.ids[position] = _ce_id(r.headers)
                    ledger.rows[position] += 1
            # Every pending partition, not only those that returned records: a fetch can move the position
            # past offsets that hold no record for the consumer (after the broker restart) and return none.
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
            if pending and time.monotonic() > deadline:
                where = {
                    f"{tp.topic}/{tp.partition}": (await consumer.position(tp), ends[tp]) for tp in pending
                }
                raise AssertionError(f"the topics could not be read to their end (position, end): {where}")
        return ledger, {(tp.topic[len(prefix) :], tp.partition): end for tp, end in ends.items()}
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    for _ in range(100):
        found = consumer.partitions_for_topic(topic)
        if found:
            return set(found)
        await consumer._client.force_metadata_update()
    raise AssertionError(f"topic {topic} has no partitions")


def _ce_id(headers: list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...]) -> str | None:
    for name, value in headers:
        if name == "ce_id" and value is not None:
            return value.decode(errors="replace")
    return None


async def read_trail(database_url: str, ends: dict[tuple[str, int], int]) -> Ledger:
    """The trail's rows at positions below the given end offsets (later rows are not compared)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT topic, kafka_partition, kafka_offset, event_id FROM audit.trail")
    finally:
        await conn.close()
    ledger = Ledger()
    for r in rows:
        position = (r["topic"], r["kafka_partition"], r["kafka_offset"])
        if r["kafka_offset"] < ends.get(position[:2], 0):
            ledger.ids[position] = r["event_id"]
            ledger.rows[position] += 1
    return ledger
