"""A consumer or relay process for the crash tests. It is killed (SIGKILL, by itself) at the exact point
the test names, so the test can show what survives a crash there.

    python -m tests.integration.workers.bus_worker consume <topic> <schema> [--die-after-commit N]
    python -m tests.integration.workers.bus_worker relay <schema> [--die-after-send]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from contracts.envelope import CloudEvent, EventTypeRegistry
from libs.bus.core import InboxTransaction, Subscription, Transaction
from libs.bus.kafka import ConsumerRunner, KafkaDeadLetters, KafkaPublisher
from libs.bus.postgres import OutboxRelay, bus_migrations, pg_transactions
from libs.db import Migration, apply_migrations, create_pool
from libs.settings import KafkaSettings
from tests.integration.kafka_tools import payload_on

EFFECTS = Migration(
    "test/0001_effects.sql", "CREATE TABLE IF NOT EXISTS effects (n int NOT NULL, event_id text)"
)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def consume(args: argparse.Namespace) -> None:
    kafka = KafkaSettings(bootstrap=os.environ["DRIFTLOOP_KAFKA_BOOTSTRAP"])
    pool = await create_pool(os.environ["DRIFTLOOP_DATABASE_URL"], schema=args.schema)
    await apply_migrations(pool, args.schema, [*bus_migrations(), EFFECTS])
    tick = payload_on(args.topic)
    committed = 0
    base_begin = pg_transactions(pool, args.schema)

    @asynccontextmanager
    async def begin() -> AsyncIterator[InboxTransaction]:
        nonlocal committed
        async with base_begin() as tx:
            yield tx
        committed += 1
        if args.die_after_commit and committed >= args.die_after_commit:
            # The handler's transaction is committed; the Kafka offset is not.
            die()

    async def on_tick(event: CloudEvent[Any], tx: Transaction) -> None:
        await tx.conn.execute("INSERT INTO effects (n, event_id) VALUES ($1, $2)", event.data.n, event.id)

    publisher = KafkaPublisher(kafka)
    await publisher.start()
    runner = ConsumerRunner(
        Subscription(consumer=args.group, topics=[args.topic], handlers={tick: on_tick}),
        kafka=kafka,
        registry=EventTypeRegistry([tick]),
        begin=begin,
        dead_letters=KafkaDeadLetters(publisher),
    )
    await runner.run()


class DyingSender:
    """Sends the batch to the broker, then dies before the relay can mark the rows sent."""

    def __init__(self, inner: KafkaPublisher) -> None:
        self.inner = inner

    async def send_many(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]]
    ) -> None:
        half = len(items) // 2
        await self.inner.send_many(items[: max(half, 1)])
        die()


async def relay(args: argparse.Namespace) -> None:
    kafka = KafkaSettings(bootstrap=os.environ["DRIFTLOOP_KAFKA_BOOTSTRAP"])
    pool = await create_pool(os.environ["DRIFTLOOP_DATABASE_URL"], schema=args.schema)
    publisher = KafkaPublisher(kafka)
    await publisher.start()
    sender = DyingSender(publisher) if args.die_after_send else publisher
    r = OutboxRelay(pool, args.schema, sender, batch_size=args.batch_size, idle_s=0.2)
    await r.run()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consume")
    c.add_argument("topic")
    c.add_argument("schema")
    c.add_argument("--group", required=True)
    c.add_argument("--die-after-commit", type=int, default=0)
    r = sub.add_parser("relay")
    r.add_argument("schema")
    r.add_argument("--die-after-send", action="store_true")
    r.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(consume(args) if args.cmd == "consume" else relay(args))


if __name__ == "__main__":
    main()
