"""Small tools for integration tests on the real broker and database: fresh topics, fresh schemas,
reading a topic back, and waiting by polling with a deadline (``eventually``, from tests/waiting.py)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import Field

from contracts.envelope import EventPayload
from libs.db import Migration, apply_migrations, create_pool
from tests.waiting import eventually as eventually  # where the integration tests import it from

SESSION = uuid.uuid4().hex[:6]
"""This test session's mark in every name :func:`unique` makes. At its end the session deletes the topics and
drops the schemas that carry it (tests/conftest.py): tests on a developer's own broker and database would
otherwise leave a gigabyte of topics behind every few runs."""


def unique(prefix: str) -> str:
    """A fresh name for a topic, schema, consumer group or model: ``prefix``, the session's mark, 6 random
    hex digits."""
    return f"{prefix}_{SESSION}{uuid.uuid4().hex[:6]}"


def made_by_this_session(name: str) -> bool:
    """True for a name :func:`unique` made in this session."""
    return f"_{SESSION}" in name


async def create_topics(
    bootstrap: str, *names: str, partitions: int = 1, configs: dict[str, str] | None = None
) -> None:
    """Create topics, with topic ``configs`` (e.g. ``max.message.bytes``) if given."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(n, num_partitions=partitions, replication_factor=1, topic_configs=configs or {})
                for n in names
            ]
        )
    finally:
        await admin.close()


async def read_topic(bootstrap: str, topic: str, *, expect: int, deadline_s: float = 30.0) -> list[Any]:
    """Read a topic from the beginning until ``expect`` records arrived or the deadline passed."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        until = time.monotonic() + deadline_s
        while len(records) < expect and time.monotonic() < until:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                records.extend(msgs)
    finally:
        await consumer.stop()
    return records


async def fetchval(database_url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def migrated_schema(
    database_url: str, prefix: str, migrations: Sequence[Migration]
) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    """A pool on a fresh schema (``unique(prefix)``) with a service's ``migrations`` applied, and the schema's
    name; the schema is dropped and the pool closed afterwards."""
    schema = unique(prefix)
    migrated = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(migrated, schema, migrations)
        yield migrated, schema
    finally:
        async with migrated.acquire() as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await migrated.close()


async def waits_on_a_lock(watcher: asyncpg.Connection, pid: int) -> None:
    """Return once the backend ``pid`` waits on a lock (another transaction holds it), as read from
    ``pg_stat_activity`` on ``watcher``: a test that races two transactions lets the first commit then."""

    async def waiting() -> bool:
        kind = await watcher.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid)
        return kind == "Lock"

    await eventually(waiting, deadline_s=10.0)


class Tick(EventPayload):
    """A numbered test event."""

    event_name = "Tick"
    n: int = Field(description="Sequence number.")


def payload_on(topic: str) -> type[Tick]:
    """A test payload class bound to a fresh topic, so runs never see each other's records."""

    class OnTopic(Tick):
        """A numbered test event."""

    OnTopic.topic = topic
    return OnTopic


async def count_rows(database_url: str, table: str, where: str = "true") -> int:
    """Rows in ``table`` matching ``where``; 0 while the table does not exist yet (a process starting)."""
    conn = await asyncpg.connect(database_url)
    try:
        if await conn.fetchval("SELECT to_regclass($1)", table) is None:
            return 0
        return int(await conn.fetchval(f"SELECT count(*) FROM {table} WHERE {where}"))
    finally:
        await conn.close()
