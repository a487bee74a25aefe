"""Serving's Postgres adapters under its handlers: what the routing state holds after each kind of event.

The handlers run here on PgRoutes and PgModelVersions, in a transaction of their own, as the consumer runs
them (without Kafka: the events they publish are collected)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from contracts.commands import PromoteRequested
from contracts.common import ModelSignature, Stage
from contracts.envelope import CloudEvent, new_event
from contracts.models import ModelStageChanged
from contracts.monitoring import Verdict
from libs.bus import PermanentError
from libs.bus.postgres import pg_transactions
from libs.db import apply_migrations, create_pool
from libs.errors import Outage
from services.serving import handlers
from services.serving.adapters import postgres as serving_postgres
from services.serving.adapters.postgres import (
    PgModelVersions,
    PgRoutes,
    PgRoutingSource,
    add_samples,
    read_route,
    read_routes,
)
from services.serving.bootstrap import MIGRATIONS
from services.serving.domain import ModelRoute, RolloutPolicy, SampleFlush
from tests.integration.kafka_tools import eventually, migrated_schema, unique, waits_on_a_lock
from tests.stage_changes import stage_change
from tests.unit.serving.fakes import (
    FakeLoader,
    canary_verdict,
    churn_signature,
    passed,
    registered,
    rollout_never_started,
)

POLICY = RolloutPolicy(steps=(0.1, 0.5, 1.0), min_samples=0, bake_seconds=0.0)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    """A pool on a schema of its own with serving's migrations applied, dropped afterwards."""
    async with migrated_schema(database_url, "t_serving", MIGRATIONS) as migrated:
        yield migrated


async def handle(
    pool: tuple[asyncpg.Pool, str], event: CloudEvent[Any], loader: FakeLoader | None = None
) -> list[CloudEvent[Any]]:
    """Run serving's handler of ``event`` in one committed transaction; the events it published."""
    pg, schema = pool
    published: list[CloudEvent[Any]] = []

    async def publish(e: CloudEvent[Any]) -> None:
        published.append(e)

    tally = handlers.Tally()
    async with pg.acquire() as conn, conn.transaction():
        await handlers.HANDLERS[type(event.data)](
            event,
            versions=PgModelVersions(conn),
            routes=PgRoutes(conn, schema),
            loader=loader or FakeLoader(),
            publish=publish,
            source="/driftloop/serving",
            policy=POLICY,
            tally=tally,
        )
    tally.count()
    return published


async def route_models(pg: asyncpg.Pool) -> list[str]:
    async with pg.acquire() as conn:
        return [r["model"] for r in await conn.fetch("SELECT model FROM model_routes ORDER BY model")]


async def test_events_naming_a_model_serving_does_not_know_leave_no_route(
    pool: tuple[asyncpg.Pool, str],
) -> None:
    ghost = rollout_never_started("ghost")
    await handle(pool, canary_verdict(ghost, 0, Verdict.HEALTHY))
    await handle(pool, canary_verdict(ghost, 0, Verdict.UNHEALTHY))
    change = ModelStageChanged(
        model="ghost", model_version=3, from_stage=Stage.CANDIDATE, to_stage=Stage.PRODUCTION, reason="x"
    )
    await handle(pool, new_event(change, source="/driftloop/registry"))
    # A first version that cannot load never serves: its model has no route either.
    broken = FakeLoader()
    broken.broken.add("01" * 32)
    await handle(pool, registered(1, model="unloadable"), broken)
    failed = await handle(pool, passed(1, model="unloadable"), broken)
    assert [type(e.data).__name__ for e in failed] == ["RolloutRolledBack"]
    assert await route_models(pool[0]) == []
    async with pool[0].acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM model_versions WHERE model = 'ghost'") == 0
    assert await read_routes(pool[0]) == [] and await read_route(pool[0], "ghost") is None


async def test_the_first_version_of_a_model_creates_its_route(pool: tuple[asyncpg.Pool, str]) -> None:
    await handle(pool, registered(1))
    await handle(pool, passed(1))
    [route] = await read_routes(pool[0])
    assert route.model == "churn" and route.stable_version == 1
    assert await read_route(pool[0], "churn") == route


async def test_deciders_for_a_new_model_take_turns(pool: tuple[asyncpg.Pool, str]) -> None:
    """Two transactions deciding for a model that has no route yet: the second waits for the first and
    decides on what it saved, as it would on an existing model's row."""
    pg, schema = pool
    first = await pg.acquire()
    second = await pg.acquire()
    try:
        tx = first.transaction()
        await tx.start()
        empty = await PgRoutes(first, schema).lock("new")
        assert empty == ModelRoute("new")

        async def lock_second() -> ModelRoute:
            async with second.transaction():
                return await PgRoutes(second, schema).lock("new")

        waiting = asyncio.create_task(lock_second())
        pid = second.get_server_pid()

        async with pg.acquire() as watcher:
            await waits_on_a_lock(watcher, pid)
        await PgRoutes(first, schema).save(ModelRoute("new", stable_version=1), now=datetime.now(UTC))
        await tx.commit()
        assert (await asyncio.wait_for(waiting, 10)).stable_version == 1
    finally:
        await pg.release(first)
        await pg.release(second)


async def test_the_migration_removes_routes_with_no_version_and_keeps_the_rest(database_url: str) -> None:
    schema = unique("t_serving")
    pg = await create_pool(database_url, schema=schema)
    try:
        cleanup = [m.id for m in MIGRATIONS].index("serving/0003_routes_with_a_version.sql")
        await apply_migrations(pg, schema, MIGRATIONS[:cleanup])
        async with pg.acquire() as conn:
            # What serving wrote before: an empty row for every model an event named.
            await conn.execute("INSERT INTO model_routes (model) VALUES ('ghost')")
            await conn.execute("INSERT INTO model_routes (model, stable_version) VALUES ('churn', 1)")
            await conn.execute(
                """INSERT INTO model_routes (model, rollout_id, canary_version, status)
                   VALUES ('odd', 'r-1', 1, 'rolled-back')"""
            )
        await apply_migrations(pg, schema, MIGRATIONS)
        assert await route_models(pg) == ["churn", "odd"]
    finally:
        async with pg.acquire() as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await pg.close()


async def test_a_canary_sample_flush_saved_again_adds_nothing_on_postgres(
    pool: tuple[asyncpg.Pool, str],
) -> None:
    """A flush whose commit went through but whose answer was lost is saved again under the same token: its
    step counts its rows once. The replica's next flush adds, and so does a new start of the process,
    numbering from 1 again under a name of its own; a token not written for a day is deleted."""
    pg, _ = pool
    for version in (1, 2):
        await handle(pool, registered(version))
        await handle(pool, passed(version))
    route = await read_route(pg, "churn")
    assert route is not None and route.active is not None
    rollout_id = route.active.rollout_id

    async def samples_seen() -> int:
        r = await read_route(pg, "churn")
        assert r is not None and r.active is not None
        return r.active.samples_seen

    first = SampleFlush("serving-0/1a2b", 1, (("churn", rollout_id, 0, 3),))
    await add_samples(pg, first)
    await add_samples(pg, first)
    assert await samples_seen() == 3
    await add_samples(pg, SampleFlush("serving-0/1a2b", 2, (("churn", rollout_id, 0, 2),)))
    await add_samples(pg, first)
    assert await samples_seen() == 5
    await add_samples(pg, SampleFlush("serving-0/3c4d", 1, (("churn", rollout_id, 0, 4),)))
    assert await samples_seen() == 9

    async with pg.acquire() as conn:
        await conn.execute(
            "UPDATE canary_sample_flushes SET saved_at = now() - interval '2 days' WHERE replica = $1",
            "serving-0/1a2b",
        )
    await add_samples(pg, SampleFlush("serving-0/3c4d", 2, (("churn", rollout_id, 0, 1),)))
    assert await samples_seen() == 10
    async with pg.acquire() as conn:
        kept = await conn.fetch("SELECT replica, sequence FROM canary_sample_flushes")
    assert [tuple(r) for r in kept] == [("serving-0/3c4d", 2)]


async def test_the_read_api_skips_a_route_with_no_version(pool: tuple[asyncpg.Pool, str]) -> None:
    """A replica of an earlier release may still write an empty row after the migration removed them."""
    pg, _ = pool
    async with pg.acquire() as conn:
        await conn.execute("INSERT INTO model_routes (model) VALUES ('ghost')")
    assert await read_routes(pg) == [] and await read_route(pg, "ghost") is None


async def test_a_promote_issued_before_the_last_routing_decision_is_refused_on_postgres(
    pool: tuple[asyncpg.Pool, str],
) -> None:
    """The time of the model's last routing decision is stored with its route, so every replica refuses a
    command issued before it; one issued after it is taken, whatever version it names."""
    for version in (1, 2, 3):
        await handle(pool, registered(version))
    await handle(pool, passed(1))
    late = new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x")
    await handle(pool, new_event(PromoteRequested(model="churn", model_version=3, reason="ok"), source="/x"))
    route = await read_route(pool[0], "churn")
    assert route is not None and route.stable_version == 3 and route.decided_at is not None
    assert late.time < route.decided_at
    with pytest.raises(PermanentError, match="before churn's last routing change"):
        await handle(pool, late)
    await handle(pool, new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x"))
    route = await read_route(pool[0], "churn")
    assert route is not None and route.stable_version == 2


async def test_an_events_counts_are_made_when_its_transaction_commits_and_never_if_it_rolls_back(
    pool: tuple[asyncpg.Pool, str],
) -> None:
    pg, schema = pool
    await handle(pool, registered(1))
    await handle(pool, passed(1))
    begin = pg_transactions(pg, schema)
    promote_stable = new_event(PromoteRequested(model="churn", model_version=1, reason="ok"), source="/x")
    counter = handlers.IGNORED.labels("PromoteRequested", "already-stable")
    before = counter._value.get()
    deps: dict[str, Any] = {"loader": FakeLoader(), "source": "/s", "policy": POLICY}

    async def run(tx: Any) -> None:
        conn = tx.conn
        deps.update(versions=PgModelVersions(conn), routes=PgRoutes(conn, schema))
        await handlers.handle(handlers.on_promote_requested, promote_stable, tx, **deps)

    with pytest.raises(RuntimeError):
        async with begin() as tx:
            await run(tx)
            raise RuntimeError("another event of the poll failed")
    assert counter._value.get() == before
    async with begin() as tx:
        await run(tx)
        assert counter._value.get() == before
    assert counter._value.get() == before + 1


async def test_a_stage_change_older_than_the_last_applied_is_refused_on_postgres(
    pool: tuple[asyncpg.Pool, str],
) -> None:
    await handle(pool, registered(1))
    await handle(pool, registered(2))

    canary = stage_change(2, Stage.CANDIDATE, Stage.CANARY, 3)
    await handle(pool, canary)
    await handle(pool, stage_change(2, Stage.CANARY, Stage.REJECTED, 4))
    again = new_event(canary.data, source="/driftloop/registry")
    with pytest.raises(PermanentError, match=f"{again.id} is stage change 3 of churn .* but stage change 4"):
        await handle(pool, again)
    # The last change again under another id changes nothing and is not refused.
    await handle(
        pool, new_event(stage_change(2, Stage.CANARY, Stage.REJECTED, 4).data, source="/driftloop/registry")
    )
    async with pool[0].acquire() as conn:
        record = await PgModelVersions(conn).get("churn", 2)
        assert record is not None and record.stage == Stage.REJECTED.value
        assert await conn.fetchval("SELECT sequence FROM stage_changes_applied WHERE model = 'churn'") == 4


async def test_a_routing_snapshot_parses_only_the_signatures_the_last_one_did_not_hold(
    pool: tuple[asyncpg.Pool, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every replica reads a snapshot at each change and every ROUTING_POLL_S, on its event loop: parsing
    every served version's signature each time took over 400 ms for 1,000 models of 30 features."""
    pg, schema = pool
    parsed: list[Any] = []

    class Counted(ModelSignature):
        @classmethod
        def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
            parsed.append(obj)
            return super().model_validate(obj, *args, **kwargs)

    monkeypatch.setattr(serving_postgres, "ModelSignature", Counted)
    for event in (registered(1), passed(1), registered(2), passed(2)):
        await handle(pool, event)
    source = PgRoutingSource(pg, schema)
    try:
        before = len(parsed)
        first = await source.snapshot()
        assert len(parsed) == before + 2, "stable and canary, once each"
        assert await source.snapshot() == first and len(parsed) == before + 2
        [(_, records)] = first
        churn = churn_signature().model_dump()
        assert {v: r.signature and r.signature.model_dump() for v, r in records.items()} == {
            1: churn,
            2: churn,
        }

        for event in (registered(3), passed(3)):
            await handle(pool, event)
        before = len(parsed)
        [(route, records)] = await source.snapshot()
        assert route.active is not None and sorted(records) == [1, 3]
        assert len(parsed) == before + 1, "only the new canary's"
    finally:
        await source.close()


async def test_the_routing_is_read_again_after_the_server_closed_the_listening_connection(
    pool: tuple[asyncpg.Pool, str], database_url: str
) -> None:
    """A Postgres restart closes the routing source's LISTEN connection, and asyncpg takes it back into its
    pool: every snapshot after it failed on the closed handle ("released back to the pool"), and the replica
    never read its routing again. The next snapshot now listens on a new one, however many restarts."""
    _, schema = pool
    small = await create_pool(database_url, schema=schema, min_size=1, max_size=2)  # the listener, a read
    source = PgRoutingSource(small, schema)
    killer = await asyncpg.connect(database_url)

    async def listening_after_a_snapshot() -> int | None:
        await source.snapshot()
        pid: int | None = await killer.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE query = 'LISTEN \"' || $1 || '\"'", source.channel
        )
        return pid

    try:
        for _ in range(3):  # more restarts than the pool has connections
            # Until the client has seen its connection closed, a snapshot still takes it for listening.
            pid = await eventually(listening_after_a_snapshot, deadline_s=10.0)
            await killer.execute("SELECT pg_terminate_backend($1)", pid)
        await eventually(listening_after_a_snapshot, deadline_s=10.0)
    finally:
        await killer.close()
        await source.close()
        await small.close()


async def test_a_production_change_whose_load_fails_on_an_outage_is_taken_when_retried_on_postgres(
    pool: tuple[asyncpg.Pool, str],
) -> None:
    """The outage rolls the whole transaction back, the change's number with it: the retry is the change,
    not a repeat of one applied already."""
    await handle(pool, registered(1))
    await handle(pool, passed(1))
    await handle(pool, registered(2))
    loader = FakeLoader()
    loader.failing = [Outage("the artifact store is restarting")]
    change = stage_change(2, Stage.CANDIDATE, Stage.PRODUCTION, 5)

    with pytest.raises(Outage):
        await handle(pool, change, loader)
    async with pool[0].acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM stage_changes_applied WHERE model = 'churn'") == 0
        record = await PgModelVersions(conn).get("churn", 2)
        assert record is not None and record.stage != Stage.PRODUCTION.value

    await handle(pool, change, loader)
    route = await read_route(pool[0], "churn")
    assert route is not None and route.stable_version == 2
