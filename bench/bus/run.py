"""Bus benchmark: publish -> consume throughput through driftloop's bus vs raw aiokafka, and end-to-end
latency at a fixed rate, on the same broker in one run.

    deploy/local/driftloop infra up
    .venv/bin/python -m bench.bus.run [--events 20000] [--rate 1000] [--seconds 10] [--default-gc]

The raw side does the least a correct consumer can: idempotent produce of the same bytes, a consumer
group, a manual commit per poll. Our side adds what makes effects exactly-once: CloudEvents encoding
from pydantic payloads, decoding and validation, the Postgres inbox (one transaction per poll) and the
handler, then the manual commit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import Field

from contracts.envelope import CloudEvent, EventPayload, EventTypeRegistry, new_event
from deploy.local.broker import delete_topics
from deploy.local.postgres import drop_schemas
from libs.bus.core import Subscription, Transaction
from libs.bus.kafka import ConsumerRunner, KafkaDeadLetters, KafkaPublisher
from libs.bus.postgres import bus_migrations, pg_transactions
from libs.db import apply_migrations, create_pool
from libs.service import tune_collector
from libs.settings import KafkaSettings

BOOTSTRAP = os.environ.get("DRIFTLOOP_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
DATABASE = os.environ.get("DRIFTLOOP_DATABASE_URL", "postgresql://driftloop@127.0.0.1:54329/driftloop")
PARTITIONS = 3
RUN = uuid.uuid4().hex[:8]
"""In every topic and schema this run makes, which it deletes and drops at the end."""


class BenchTick(EventPayload):
    """A benchmark event about one model, with a realistic small payload."""

    event_name = "BenchTick"
    topic = ""
    model: str = Field(description="Model name.")
    n: int = Field(description="Sequence number.")
    sent_ns: int = Field(description="time.time_ns() at publish.")
    metrics: dict[str, float] = Field(description="Some numbers, like a real event carries.")


def payload_class(topic: str) -> type[BenchTick]:
    cls = type("BenchTick", (BenchTick,), {"__doc__": BenchTick.__doc__})
    cls.topic = topic
    return cls


def make_event(cls: type[BenchTick], n: int) -> CloudEvent[Any]:
    payload = cls(model=f"model-{n % 30}", n=n, sent_ns=time.time_ns(), metrics={"auc": 0.91, "f1": 0.84})
    return new_event(payload, source="/bench")


async def create_topic(name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        await admin.close()


async def wait_assigned(consumer: AIOKafkaConsumer) -> None:
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=100)


# --- raw aiokafka ---------------------------------------------------------------------------------


def raw_consumer(topic: str) -> AIOKafkaConsumer:
    """A consumer in a fresh group, committing by hand."""
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=BOOTSTRAP,
        group_id=f"bench-raw-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )


def raw_producer() -> AIOKafkaProducer:
    """An idempotent producer, as the bus's (acks=all, linger 2 ms)."""
    return AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, enable_idempotence=True, acks="all", linger_ms=2)


async def raw_throughput(events: int) -> float:
    topic = f"bench.raw.{RUN}.{uuid.uuid4().hex[:6]}"
    await create_topic(topic)
    cls = payload_class(topic)
    records = [make_event(cls, n).to_kafka() for n in range(events)]  # encoded up front: raw sends bytes
    consumer = raw_consumer(topic)
    producer = raw_producer()
    await consumer.start()
    await producer.start()
    await wait_assigned(consumer)
    received = 0
    start = time.perf_counter()

    async def produce() -> None:
        futures = [await producer.send(topic, key=k, value=v, headers=h) for k, v, h in records]
        await asyncio.gather(*futures)

    async def consume() -> None:
        nonlocal received
        while received < events:
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            for tp, msgs in batch.items():
                received += len(msgs)
                await consumer.commit({tp: msgs[-1].offset + 1})

    await asyncio.gather(produce(), consume())
    elapsed = time.perf_counter() - start
    await producer.stop()
    await consumer.stop()
    return events / elapsed


async def raw_sides(events: int) -> tuple[float, float]:
    """Publishing alone (every record acknowledged), then consuming the backlog alone (a fresh group, from
    the first record it gets to the last it committed)."""
    topic = f"bench.raw.{RUN}.{uuid.uuid4().hex[:6]}"
    await create_topic(topic)
    records = [make_event(payload_class(topic), n).to_kafka() for n in range(events)]
    producer = raw_producer()
    await producer.start()
    start = time.perf_counter()
    await asyncio.gather(*[await producer.send(topic, key=k, value=v, headers=h) for k, v, h in records])
    published = events / (time.perf_counter() - start)
    await producer.stop()
    consumer = raw_consumer(topic)
    await consumer.start()
    received, first = 0, 0.0
    while received < events:
        batch = await consumer.getmany(timeout_ms=200, max_records=500)
        for tp, msgs in batch.items():
            first = first or time.perf_counter()
            received += len(msgs)
            await consumer.commit({tp: msgs[-1].offset + 1})
    consumed = events / (time.perf_counter() - first)
    await consumer.stop()
    return published, consumed


# --- driftloop bus ---------------------------------------------------------------------------------


async def bus_setup(topic: str) -> tuple[Any, KafkaPublisher, type[BenchTick], str]:
    await create_topic(topic)
    schema = f"bench_{RUN}_{uuid.uuid4().hex[:6]}"
    pool = await create_pool(DATABASE, schema=schema, max_size=4)
    await apply_migrations(pool, schema, bus_migrations())
    publisher = KafkaPublisher(KafkaSettings(bootstrap=BOOTSTRAP))
    await publisher.start()
    return pool, publisher, payload_class(topic), schema


async def bus_throughput(events: int) -> float:
    topic = f"bench.bus.{RUN}.{uuid.uuid4().hex[:6]}"
    pool, publisher, cls, schema = await bus_setup(topic)
    received = 0
    done = asyncio.Event()

    async def on_tick(event: CloudEvent[Any], tx: Transaction) -> None:
        nonlocal received
        received += 1
        if received >= events:
            done.set()

    runner = make_runner(topic, schema, pool, publisher, cls, on_tick)
    task = asyncio.create_task(runner.run())
    await runner.ready.wait()
    start = time.perf_counter()
    for lo in range(0, events, 1000):
        batch = [make_event(cls, n) for n in range(lo, min(lo + 1000, events))]
        await publisher.send_many([(e.topic, *e.to_kafka()) for e in batch])
    await done.wait()
    elapsed = time.perf_counter() - start
    runner.stop()
    await task
    await publisher.stop()
    await pool.close()
    return events / elapsed


async def bus_sides(events: int) -> tuple[float, float]:
    """:func:`raw_sides` through the bus: publishing as :func:`bus_throughput` does, then the runner on the
    backlog (from the first event handled to the last)."""
    topic = f"bench.bus.{RUN}.{uuid.uuid4().hex[:6]}"
    pool, publisher, cls, schema = await bus_setup(topic)
    start = time.perf_counter()
    for lo in range(0, events, 1000):
        batch = [make_event(cls, n) for n in range(lo, min(lo + 1000, events))]
        await publisher.send_many([(e.topic, *e.to_kafka()) for e in batch])
    published = events / (time.perf_counter() - start)
    received, first = 0, 0.0
    done = asyncio.Event()

    async def on_tick(event: CloudEvent[Any], tx: Transaction) -> None:
        nonlocal received, first
        first = first or time.perf_counter()
        received += 1
        if received >= events:
            done.set()

    runner = make_runner(topic, schema, pool, publisher, cls, on_tick)
    task = asyncio.create_task(runner.run())
    await done.wait()
    consumed = events / (time.perf_counter() - first)
    runner.stop()
    await task
    await publisher.stop()
    await pool.close()
    return published, consumed


def make_runner(
    topic: str, schema: str, pool: Any, publisher: KafkaPublisher, cls: type[BenchTick], handler: Any
):
    return ConsumerRunner(
        Subscription(consumer=f"bench-{uuid.uuid4().hex[:6]}", topics=[topic], handlers={cls: handler}),
        kafka=KafkaSettings(bootstrap=BOOTSTRAP),
        registry=EventTypeRegistry([cls]),
        begin=pg_transactions(pool, schema),
        dead_letters=KafkaDeadLetters(publisher),
    )


async def bus_latency(rate: int, seconds: float) -> list[float]:
    topic = f"bench.lat.{RUN}.{uuid.uuid4().hex[:6]}"
    pool, publisher, cls, schema = await bus_setup(topic)
    latencies_ms: list[float] = []
    total = int(rate * seconds)
    all_in = asyncio.Event()

    async def on_tick(event: CloudEvent[Any], tx: Transaction) -> None:
        # Measured inside the handler's transaction; the commit adds about a millisecond on top.
        latencies_ms.append((time.time_ns() - event.data.sent_ns) / 1e6)
        if len(latencies_ms) >= total:
            all_in.set()

    runner = make_runner(topic, schema, pool, publisher, cls, on_tick)
    task = asyncio.create_task(runner.run())
    await runner.ready.wait()
    interval = 1.0 / rate
    start = time.perf_counter()
    sends = []
    for n in range(total):
        # Open loop: the schedule, not the previous send's acknowledgement, decides when to send.
        delay = start + n * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sends.append(asyncio.create_task(publisher.publish(make_event(cls, n))))
    await asyncio.gather(*sends)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_in.wait(), timeout=30)
    runner.stop()
    await task
    await publisher.stop()
    await pool.close()
    return latencies_ms


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1]


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--default-gc",
        action="store_true",
        help="keep CPython's garbage-collector settings instead of a service process's (both sides)",
    )
    args = parser.parse_args()
    if not args.default_gc:
        # Both sides run in this process, collected as every service's process is (libs.service).
        tune_collector()

    print(f"driftloop bus benchmark — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, broker {BOOTSTRAP}")
    collector = "CPython defaults" if args.default_gc else "as in a service (tune_collector)"
    print(f"garbage collector: {collector}")
    try:
        await measure(args)
    finally:
        await clean_up()


async def clean_up() -> None:
    """Delete the run's topics and drop its schemas."""
    delete_topics(BOOTSTRAP, lambda topic: topic.startswith("bench.") and f".{RUN}." in topic)
    drop_schemas(DATABASE, lambda schema: schema.startswith(f"bench_{RUN}_"))


async def measure(args: argparse.Namespace) -> None:
    await raw_throughput(2_000)  # warm the broker and the group coordinator
    raw = [await raw_throughput(args.events) for _ in range(2)]
    ours = [await bus_throughput(args.events) for _ in range(2)]
    raw_best, ours_best = max(raw), max(ours)
    print(f"throughput, {args.events} events, best of 2:")
    print(f"  raw aiokafka (produce + group consume + manual commit): {raw_best:>9,.0f} events/s")
    print(f"  driftloop bus (CloudEvents + inbox + handler + commit): {ours_best:>9,.0f} events/s")
    print(f"  ratio driftloop / raw: {ours_best / raw_best:.2f}   (target >= 0.6)")
    # Each side alone shows which one the ratio is made of (not a target).
    raw_alone = [await raw_sides(args.events) for _ in range(2)]
    ours_alone = [await bus_sides(args.events) for _ in range(2)]
    print(f"each side alone, {args.events} events, best of 2 (publish all, then consume the backlog):")
    for i, side in enumerate(("publish", "consume")):
        raw_side, our_side = max(r[i] for r in raw_alone), max(o[i] for o in ours_alone)
        ratio = our_side / raw_side
        print(f"  {side:<8} raw {raw_side:>9,.0f}/s   driftloop {our_side:>9,.0f}/s   ratio {ratio:.2f}")
    lat = await bus_latency(args.rate, args.seconds)
    print(f"latency at {args.rate} events/s for {args.seconds:.0f} s ({len(lat)} events received):")
    p50, p99 = pct(lat, 50), pct(lat, 99)
    print(f"  p50 {p50:.2f} ms   p99 {p99:.2f} ms   max {max(lat):.2f} ms   (target p99 <= 20 ms)")


if __name__ == "__main__":
    asyncio.run(main())
