"""Migrations on the real Postgres: applied once, recorded, and an edited one is refused."""

import asyncio

import pytest

from libs.db import Migration, MigrationError, apply_migrations, create_pool
from tests.integration.kafka_tools import unique


async def test_migrations_apply_once_even_when_replicas_start_together(database_url: str) -> None:
    schema = unique("t_migrate")
    pools = [await create_pool(database_url, schema=schema) for _ in range(3)]
    first = Migration("svc/0001.sql", "CREATE TABLE things (id int PRIMARY KEY)")
    try:
        results = await asyncio.gather(*(apply_migrations(p, schema, [first]) for p in pools))
        assert sorted(len(r) for r in results) == [0, 0, 1]
        async with pools[0].acquire() as conn:
            # search_path points at the service's schema: SQL never names it.
            await conn.execute("INSERT INTO things VALUES (1)")
            assert await conn.fetchval(f"SELECT count(*) FROM {schema}.things") == 1
    finally:
        for p in pools:
            await p.close()


async def test_an_applied_migration_that_was_edited_is_refused(database_url: str) -> None:
    schema = unique("t_migrate")
    pool = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(pool, schema, [Migration("svc/0001.sql", "CREATE TABLE a (id int)")])
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await apply_migrations(pool, schema, [Migration("svc/0001.sql", "CREATE TABLE a (id bigint)")])
        with pytest.raises(MigrationError, match=r"0002\.sql failed"):
            await apply_migrations(
                pool,
                schema,
                [
                    Migration("svc/0001.sql", "CREATE TABLE a (id int)"),
                    Migration("svc/0002.sql", "CREATE TABLE broken ("),
                ],
            )
    finally:
        await pool.close()
