"""Serving's ports on asyncpg: model versions, routes, and the routing source every replica follows."""

from __future__ import annotations

import asyncio
from contextlib import suppress
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from contracts.common import ModelSignature
from contracts.rollouts import RolloutMode
from libs.db import Listening, database_time, notify_channel
from libs.logging import get_logger
from libs.stage_order import PgStageChangesApplied
from services.serving.domain import ModelRoute, Rollout, RolloutStatus, SampleFlush
from services.serving.ports import VersionRecord

log = get_logger(__name__)


def routes_channel(schema: str) -> str:
    """The NOTIFY channel on which a committed route change wakes every replica of this schema."""
    return notify_channel("driftloop_routes_", schema)


def _record(row: Any, signature: ModelSignature | None = None) -> VersionRecord:
    """The row as a record; ``signature``: the row's, parsed already."""
    sig = row["signature"]
    if signature is None and sig is not None:
        signature = ModelSignature.model_validate(sig)
    return VersionRecord(
        model=row["model"],
        version=row["version"],
        artifact_key=row["artifact_key"],
        signature=signature,
        validated=row["validated_at"] is not None,
        validation_report_id=row["validation_report_id"],
        stage=row["stage"],
        load_error=row["load_error"],
    )


class PgModelVersions(PgStageChangesApplied):
    """:class:`services.serving.ports.ModelVersions` on one connection (the handler's transaction)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def registered(
        self, model: str, version: int, *, artifact_key: str, signature: ModelSignature, stage: str
    ) -> VersionRecord:
        row = await self.conn.fetchrow(
            """INSERT INTO model_versions (model, version, artifact_key, signature, stage)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (model, version) DO UPDATE
                 SET artifact_key = EXCLUDED.artifact_key, signature = EXCLUDED.signature,
                     stage = coalesce(model_versions.stage, EXCLUDED.stage), updated_at = now()
               RETURNING *""",
            model,
            version,
            artifact_key,
            signature.model_dump(mode="json"),
            stage,
        )
        return _record(row)

    async def validated(self, model: str, version: int, *, report_id: str) -> VersionRecord:
        row = await self.conn.fetchrow(
            """INSERT INTO model_versions (model, version, validated_at, validation_report_id)
               VALUES ($1, $2, now(), $3)
               ON CONFLICT (model, version) DO UPDATE
                 SET validated_at = coalesce(model_versions.validated_at, now()),
                     validation_report_id = EXCLUDED.validation_report_id, updated_at = now()
               RETURNING *""",
            model,
            version,
            report_id,
        )
        return _record(row)

    async def get(self, model: str, version: int) -> VersionRecord | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM model_versions WHERE model = $1 AND version = $2", model, version
        )
        return _record(row) if row is not None else None

    async def set_stage(self, model: str, version: int, stage: str) -> None:
        await self.conn.execute(
            """INSERT INTO model_versions (model, version, stage) VALUES ($1, $2, $3)
               ON CONFLICT (model, version) DO UPDATE SET stage = EXCLUDED.stage, updated_at = now()""",
            model,
            version,
            stage,
        )

    async def load_failed(self, model: str, version: int, error: str) -> None:
        await self.conn.execute(
            "UPDATE model_versions SET load_error = $3, updated_at = now() WHERE model = $1 AND version = $2",
            model,
            version,
            error[:2000],
        )


def _route(row: Any) -> ModelRoute:
    rollout = None
    if row["rollout_id"] is not None:
        rollout = Rollout(
            rollout_id=row["rollout_id"],
            canary_version=row["canary_version"],
            stable_version=row["rollout_stable_version"],
            mode=RolloutMode(row["mode"]),
            steps=tuple(row["steps"]),
            step_index=row["step_index"],
            min_samples=row["min_samples"],
            bake_seconds=row["bake_seconds"],
            started_at=row["started_at"],
            step_started_at=row["step_started_at"],
            samples_seen=row["samples_seen"],
            status=RolloutStatus(row["status"]),
            ended_at=row["ended_at"],
            end_reason=row["end_reason"],
            correlation_id=row["rollout_correlation_id"],
        )
    return ModelRoute(
        model=row["model"],
        stable_version=row["stable_version"],
        previous_stable_version=row["previous_stable_version"],
        rollout=rollout,
        decided_at=row["decided_at"],
    )


_LOCK_ROUTE = "SELECT * FROM model_routes WHERE model = $1 FOR UPDATE"
_LOCK_NEW_ROUTE = (
    "SELECT pg_advisory_xact_lock(hashtext('driftloop-serving-route-' || current_schema() || '-' || $1))"
)

_HAS_A_VERSION = "(stable_version IS NOT NULL OR rollout_id IS NOT NULL)"
"""A route serving saved (ModelRoute.known). Migration 0003 removed the empty rows serving once wrote for
every model an event named; a replica of an earlier release, still running, may write more."""


class PgRoutes:
    """:class:`services.serving.ports.Routes` on one connection (the handler's or request's transaction)."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn = conn
        self.channel = routes_channel(schema)

    async def lock(self, model: str) -> ModelRoute:
        row = await self.conn.fetchrow(_LOCK_ROUTE, model)
        if row is None:
            # A model with no route yet: its deciders take turns on a lock named after it, and the first to
            # save creates the row the next one finds. An event that changes nothing leaves nothing behind
            # (an empty row would make the model known: listed, and taking feedback).
            await self.conn.execute(_LOCK_NEW_ROUTE, model)
            row = await self.conn.fetchrow(_LOCK_ROUTE, model)
        return _route(row) if row is not None else ModelRoute(model)

    async def now(self) -> datetime:
        return await database_time(self.conn)  # read after the lock, which may have waited

    async def save(self, route: ModelRoute, *, now: datetime) -> None:
        r = route.rollout
        await self.conn.execute(
            """INSERT INTO model_routes (
                 model, stable_version, previous_stable_version, rollout_id, canary_version,
                 rollout_stable_version, mode, steps, step_index, min_samples, bake_seconds, started_at,
                 step_started_at, samples_seen, status, ended_at, end_reason, rollout_correlation_id,
                 decided_at, revision, updated_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,
                       $20, 1, $19)
               ON CONFLICT (model) DO UPDATE SET
                 stable_version = $2, previous_stable_version = $3, rollout_id = $4, canary_version = $5,
                 rollout_stable_version = $6, mode = $7, steps = $8, step_index = $9, min_samples = $10,
                 bake_seconds = $11, started_at = $12, step_started_at = $13, samples_seen = $14,
                 status = $15, ended_at = $16, end_reason = $17, rollout_correlation_id = $18,
                 decided_at = $20, revision = model_routes.revision + 1, updated_at = $19""",
            route.model,
            route.stable_version,
            route.previous_stable_version,
            r.rollout_id if r else None,
            r.canary_version if r else None,
            r.stable_version if r else None,
            r.mode.value if r else None,
            list(r.steps) if r else None,
            r.step_index if r else None,
            r.min_samples if r else None,
            r.bake_seconds if r else None,
            r.started_at if r else None,
            r.step_started_at if r else None,
            r.samples_seen if r else 0,
            r.status.value if r else None,
            r.ended_at if r else None,
            r.end_reason if r else None,
            r.correlation_id if r else None,
            now,
            route.decided_at,
        )
        # Delivered at commit: every replica rebuilds its routing exactly when the change is visible.
        await self.conn.execute("SELECT pg_notify($1, $2)", self.channel, route.model)


async def read_route(pool: asyncpg.Pool, model: str) -> ModelRoute | None:
    """One model's route, unlocked (for the read API); None for a model serving does not know."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(f"SELECT * FROM model_routes WHERE model = $1 AND {_HAS_A_VERSION}", model)
    return _route(row) if row is not None else None


async def read_routes(pool: asyncpg.Pool) -> list[ModelRoute]:
    """Every known model's route (for the read API)."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(f"SELECT * FROM model_routes WHERE {_HAS_A_VERSION} ORDER BY model")
    return [_route(r) for r in rows]


SAMPLE_FLUSHES_KEPT = timedelta(days=1)
"""How long the token of a replica's last canary sample flush is kept after it was written: a replica retries
a failed flush every ``SAMPLES_FLUSH_S``, and each start of a process writes under a name of its own, so the
rows of replicas long stopped would otherwise pile up. A flush saved again after this long (its replica away
from Postgres for a day) would be added again."""


async def add_samples(pool: asyncpg.Pool, flush: SampleFlush) -> None:
    """Add canary rows served by a replica to the live step's count (ignored once the step moved on), in one
    transaction that records the flush's token as the replica's last: a flush whose token is recorded (its
    commit went through, the answer lost) adds nothing. The steps are updated in the order of their keys, so
    two replicas' flushes never wait on each other's rows the wrong way round."""
    async with pool.acquire() as conn, conn.transaction():
        newer = await conn.fetchval(
            """INSERT INTO canary_sample_flushes (replica, sequence) VALUES ($1, $2)
               ON CONFLICT (replica) DO UPDATE SET sequence = EXCLUDED.sequence, saved_at = now()
                 WHERE canary_sample_flushes.sequence < EXCLUDED.sequence
               RETURNING sequence""",
            flush.replica,
            flush.sequence,
        )
        if newer is None:
            return
        await conn.executemany(
            """UPDATE model_routes SET samples_seen = samples_seen + $4
               WHERE model = $1 AND rollout_id = $2 AND step_index = $3 AND status = 'active'""",
            sorted(flush.items),
        )
        await conn.execute(
            "DELETE FROM canary_sample_flushes WHERE saved_at < now() - $1::interval", SAMPLE_FLUSHES_KEPT
        )


class PgRoutingSource:
    """Reads every route with the records of the versions it serves; LISTENs for committed changes."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self.pool = pool
        self.channel = routes_channel(schema)
        self._changed = asyncio.Event()
        self._listening = Listening(pool, self.channel, self._on_notify)
        self._signatures: dict[tuple[str, int, str], ModelSignature] = {}
        """The signatures of the last snapshot, by (model, version, artifact key). Parsing them is most of
        a snapshot's work, on the event loop (1,000 models of 30 features: over 400 ms, every poll), and a
        version's signature never changes (a registration naming another is dead-lettered)."""

    async def snapshot(self) -> list[tuple[ModelRoute, dict[int, VersionRecord]]]:
        # Listening anew after the server closed the connection (a Postgres restart), where asyncpg took it
        # back into the pool and every snapshot failed on it from then on: the routing was never read again.
        await self._listening.ensure()
        # Clear before reading: a change committed during the read wakes the next wait at once.
        self._changed.clear()
        async with self.pool.acquire() as conn:
            routes = [_route(r) for r in await conn.fetch("SELECT * FROM model_routes ORDER BY model")]
            rows = await conn.fetch(
                """SELECT v.* FROM model_versions v JOIN model_routes r ON r.model = v.model
                   WHERE v.version = r.stable_version
                      OR (v.version = r.canary_version AND r.status = 'active')"""
            )
        records: dict[str, dict[int, VersionRecord]] = {}
        signatures: dict[tuple[str, int, str], ModelSignature] = {}
        for row in rows:
            rec = _record(row, self._signatures.get((row["model"], row["version"], row["artifact_key"])))
            records.setdefault(rec.model, {})[rec.version] = rec
            if rec.signature is not None and rec.artifact_key is not None:
                signatures[(rec.model, rec.version, rec.artifact_key)] = rec.signature
        self._signatures = signatures
        return [(route, records.get(route.model, {})) for route in routes]

    async def wait_for_change(self, timeout_s: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=timeout_s)

    def _on_notify(self, *_: object) -> None:
        self._changed.set()

    async def close(self) -> None:
        await self._listening.close()
