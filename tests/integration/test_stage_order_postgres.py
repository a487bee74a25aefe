"""Training's production version and validation's champion on Postgres, one test body for both: a model's
stage changes apply in the registry's order (``ModelStageChanged.sequence``), whatever their event ids."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from contracts.common import Stage
from contracts.envelope import CloudEvent, new_event
from contracts.models import ModelStageChanged
from libs.bus import PermanentError
from libs.db import Migration, apply_migrations, create_pool
from services.training import bootstrap as training_bootstrap
from services.training import handlers as training_handlers
from services.training.adapters.postgres import PgProduction
from services.validation import bootstrap as validation_bootstrap
from services.validation import handlers as validation_handlers
from services.validation.adapters.postgres import PgChampions
from tests.integration.kafka_tools import unique
from tests.stage_changes import stage_change as change


@dataclass(frozen=True)
class Consumer:
    """A service's ModelStageChanged handler, its migrations, and the port that keeps what it learnt."""

    name: str
    migrations: Sequence[Migration]
    handler: Callable[..., Awaitable[None]]
    port: str
    adapter: Callable[[asyncpg.Connection], Any]


CONSUMERS = [
    Consumer(
        "training",
        training_bootstrap.MIGRATIONS,
        training_handlers.on_model_stage_changed,
        "production",
        PgProduction,
    ),
    Consumer(
        "validation",
        validation_bootstrap.MIGRATIONS,
        validation_handlers.on_model_stage_changed,
        "champions",
        PgChampions,
    ),
]


@pytest.fixture(params=CONSUMERS, ids=[c.name for c in CONSUMERS])
async def consumer(
    request: pytest.FixtureRequest, database_url: str
) -> AsyncIterator[tuple[Consumer, asyncpg.Pool]]:
    """The consumer on a schema of its own with its migrations applied, dropped afterwards."""
    c: Consumer = request.param
    schema = unique(f"t_{c.name}")
    pool = await create_pool(database_url, schema=schema)
    try:
        await apply_migrations(pool, schema, c.migrations)
        yield c, pool
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await pool.close()


async def test_a_stage_change_older_than_the_last_applied_is_refused_and_changes_nothing(
    consumer: tuple[Consumer, asyncpg.Pool],
) -> None:
    c, pool = consumer

    async def apply(event: CloudEvent[ModelStageChanged]) -> None:
        """The handler in one committed transaction, as the consumer runs it."""
        async with pool.acquire() as conn, conn.transaction():
            await c.handler(event, **{c.port: c.adapter(conn)})

    async def production() -> int | None:
        async with pool.acquire() as conn:
            version: int | None = await c.adapter(conn).get("churn")
            return version

    await apply(change(1, Stage.CANARY, Stage.PRODUCTION, None))  # before the registry numbered them
    v2 = change(2, Stage.CANARY, Stage.PRODUCTION, 7)
    for event in (
        v2,
        change(2, Stage.PRODUCTION, Stage.ARCHIVED, 9),
        change(3, Stage.CANARY, Stage.PRODUCTION, 10),
    ):
        await apply(event)
    assert await production() == 3
    again = new_event(v2.data, source="/driftloop/registry")
    with pytest.raises(PermanentError, match=f"{again.id} is stage change 7 of churn .* but stage change 10"):
        await apply(again)
    with pytest.raises(PermanentError, match="an unnumbered stage change of churn"):
        await apply(change(1, Stage.ARCHIVED, Stage.PRODUCTION, None))
    # The last one again under another id changes nothing, and is not refused.
    await apply(new_event(change(3, Stage.CANARY, Stage.PRODUCTION, 10).data, source="/driftloop/registry"))
    assert await production() == 3
    await apply(change(4, Stage.CANARY, Stage.PRODUCTION, 12))
    assert await production() == 4
