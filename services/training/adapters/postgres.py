"""Training's ports on asyncpg. Each adapter works on the connection of the transaction it is given, so a
handler's changes and the events it emits commit together."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import asyncpg

from contracts.common import ArtifactRef
from contracts.datasets import DatasetRegistered
from contracts.training import FailureReason, TrainingRequested
from libs.db import database_time, notify_channel
from libs.modelspec import ModelSpec
from libs.stage_order import PgStageChangesApplied
from services.training.domain import BUDGET_WINDOW, JobPosition, JobState, PolicyState, run_id_for
from services.training.ports import DatasetRecord, Job, RequestEnvelope, StoredSpec


def jobs_channel(schema: str) -> str:
    """The NOTIFY channel that wakes the job runner of a schema."""
    return notify_channel("driftloop_training_jobs_", schema)


class PgSpecs:
    """Specs in the ``model_specs`` table."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def get(self, model: str) -> StoredSpec | None:
        row = await self.conn.fetchrow("SELECT * FROM model_specs WHERE model = $1", model)
        return _spec(row) if row else None

    async def put(self, spec: ModelSpec, artifact: ArtifactRef, *, actor: str | None) -> StoredSpec:
        row = await self.conn.fetchrow(
            """INSERT INTO model_specs (model, spec, spec_hash, artifact, base_datasets, registered_by)
               VALUES ($1, $2, $3, $4, $5, $6)
               ON CONFLICT (model) DO UPDATE SET spec = EXCLUDED.spec, spec_hash = EXCLUDED.spec_hash,
                   artifact = EXCLUDED.artifact, base_datasets = EXCLUDED.base_datasets,
                   registered_by = EXCLUDED.registered_by, registered_at = now()
               RETURNING *""",
            spec.name,
            spec.model_dump(mode="json"),
            spec.spec_hash(),
            artifact.model_dump(mode="json"),
            list(spec.base_datasets),
            actor,
        )
        return _spec(row)

    async def models_for_dataset(self, name: str) -> list[str]:
        rows = await self.conn.fetch(
            "SELECT model FROM model_specs WHERE base_datasets @> ARRAY[$1]::text[] ORDER BY model", name
        )
        return [r["model"] for r in rows]


def _spec(row: asyncpg.Record) -> StoredSpec:
    return StoredSpec(
        model=row["model"],
        # Stored by an older release, it may name an estimator (or a parameter) this one lacks: still read.
        spec=ModelSpec.from_stored(row["spec"]),
        spec_hash=row["spec_hash"],
        artifact=ArtifactRef.model_validate(row["artifact"]),
        registered_by=row["registered_by"],
        registered_at=row["registered_at"],
    )


class PgDatasets:
    """Dataset versions in the ``datasets`` table."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def record(self, event: DatasetRegistered) -> bool:
        status = await self.conn.execute(
            """INSERT INTO datasets (name, version, sha256, artifact, row_count, columns, source, models)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING""",
            event.name,
            event.dataset_version,
            event.sha256,
            event.artifact.model_dump(mode="json"),
            event.row_count,
            event.columns,
            event.source,
            list(event.models),
        )
        return bool(status.endswith(" 1"))

    async def latest(self, name: str) -> DatasetRecord | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM datasets WHERE name = $1 ORDER BY version DESC LIMIT 1", name
        )
        return _dataset(row) if row else None

    async def get(self, name: str, version: int) -> DatasetRecord | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM datasets WHERE name = $1 AND version = $2", name, version
        )
        return _dataset(row) if row else None

    async def version_for(self, name: str, sha256: str) -> tuple[int, bool]:
        # Numbering a name training owns: serialise concurrent completions on the name.
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"training-dataset-{name}")
        existing = await self.conn.fetchval(
            "SELECT version FROM datasets WHERE name = $1 AND sha256 = $2 ORDER BY version LIMIT 1",
            name,
            sha256,
        )
        if existing is not None:
            return int(existing), False
        top = await self.conn.fetchval("SELECT max(version) FROM datasets WHERE name = $1", name)
        return int(top or 0) + 1, True


def _dataset(row: asyncpg.Record) -> DatasetRecord:
    return DatasetRecord(
        name=row["name"],
        version=row["version"],
        sha256=row["sha256"],
        artifact=ArtifactRef.model_validate(row["artifact"]),
        row_count=row["row_count"],
        columns=dict(row["columns"]),
        source=row["source"],
        models=list(row["models"]),
    )


class PgProduction(PgStageChangesApplied):
    """The production version of each model."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def get(self, model: str) -> int | None:
        value = await self.conn.fetchval("SELECT version FROM production_versions WHERE model = $1", model)
        return int(value) if value is not None else None

    async def set(self, model: str, version: int) -> None:
        await self.conn.execute(
            """INSERT INTO production_versions (model, version) VALUES ($1, $2)
               ON CONFLICT (model) DO UPDATE SET version = EXCLUDED.version, changed_at = now()""",
            model,
            version,
        )

    async def clear(self, model: str, version: int) -> None:
        await self.conn.execute(
            "DELETE FROM production_versions WHERE model = $1 AND version = $2", model, version
        )


class PgJobs:
    """Training jobs in the ``jobs`` table: the handlers' view (Jobs) and the runner's (JobQueue)."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema

    # -- Jobs ---------------------------------------------------------------------------------------

    async def now(self) -> datetime:
        return await database_time(self.conn)

    async def policy_state(self, model: str, now: datetime) -> PolicyState:
        row = await self.conn.fetchrow(
            """SELECT
                 (SELECT job_id FROM jobs WHERE model = $1 AND state IN ('requested', 'running') LIMIT 1)
                     AS in_flight,
                 (SELECT max(finished_at) FROM jobs WHERE model = $1 AND state = 'completed')
                     AS last_completed,
                 (SELECT count(*) FROM jobs WHERE model = $1 AND created_at > $2) AS recent,
                 (SELECT min(created_at) FROM jobs WHERE model = $1 AND created_at > $2) AS oldest_recent""",
            model,
            now - BUDGET_WINDOW,
        )
        return PolicyState(
            in_flight_job_id=row["in_flight"],
            last_completed_at=row["last_completed"],
            jobs_last_24h=int(row["recent"]),
            oldest_job_last_24h_at=row["oldest_recent"],
        )

    async def create(self, job: Job) -> None:
        await self.conn.execute(
            """INSERT INTO jobs (job_id, model, state, trigger, request, request_event, spec_hash,
                                 spec_artifact, created_at)
               VALUES ($1, $2, 'requested', $3, $4, $5, $6, $7, $8)""",
            job.job_id,
            job.model,
            job.trigger,
            job.request.model_dump(mode="json"),
            _envelope_json(job.request_event),
            job.spec_hash,
            job.spec_artifact.model_dump(mode="json"),
            job.created_at,
        )

    async def dispatch(self, job: Job) -> bool:
        # No conflict target: a job not created here that meets another job of its model in flight is not
        # recorded (one run per model), instead of failing the delivery.
        await self.conn.execute(
            """INSERT INTO jobs (job_id, model, state, trigger, request, request_event, spec_hash,
                                 spec_artifact, created_at)
               VALUES ($1, $2, 'requested', $3, $4, $5, $6, $7, $8)
               ON CONFLICT DO NOTHING""",
            job.job_id,
            job.model,
            job.trigger,
            job.request.model_dump(mode="json"),
            _envelope_json(job.request_event),
            job.spec_hash,
            job.spec_artifact.model_dump(mode="json"),
            job.created_at,
        )
        status = await self.conn.execute(
            "UPDATE jobs SET dispatched_at = now() WHERE job_id = $1 AND dispatched_at IS NULL", job.job_id
        )
        # Delivered at commit: the runner wakes exactly when the job becomes visible.
        await self.conn.execute("SELECT pg_notify($1, $2)", jobs_channel(self.schema), job.job_id)
        return bool(status.endswith(" 1"))

    async def get(self, job_id: str) -> Job | None:
        row = await self.conn.fetchrow("SELECT * FROM jobs WHERE job_id = $1", job_id)
        return _job(row) if row else None

    async def for_model(self, model: str, *, limit: int, after: JobPosition | None = None) -> list[Job]:
        # Both orders descending, as the index jobs_by_model_paged is (migration 0003): the row comparison
        # then reads the page from the cursor's position on, without sorting the model's jobs.
        if after is None:
            rows = await self.conn.fetch(
                "SELECT * FROM jobs WHERE model = $1 ORDER BY created_at DESC, job_id DESC LIMIT $2",
                model,
                limit,
            )
        else:
            rows = await self.conn.fetch(
                """SELECT * FROM jobs WHERE model = $1 AND (created_at, job_id) < ($3, $4)
                   ORDER BY created_at DESC, job_id DESC LIMIT $2""",
                model,
                limit,
                after.created_at,
                after.job_id,
            )
        return [_job(r) for r in rows]

    # -- JobQueue -----------------------------------------------------------------------------------

    async def claim_next(self, *, stale_after_s: float) -> Job | None:
        row = await self.conn.fetchrow(
            """SELECT job_id, attempts FROM jobs
               WHERE (state = 'requested' AND dispatched_at IS NOT NULL)
                  OR (state = 'running' AND heartbeat_at < now() - $1::interval)
               ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED""",
            timedelta(seconds=stale_after_s),
        )
        if row is None:
            return None
        attempt = row["attempts"] + 1
        claimed = await self.conn.fetchrow(
            """UPDATE jobs SET state = 'running', attempts = $2, run_id = $3, heartbeat_at = now(),
                               started_at = coalesce(started_at, now())
               WHERE job_id = $1 RETURNING *""",
            row["job_id"],
            attempt,
            run_id_for(row["job_id"], attempt),
        )
        return _job(claimed)

    async def heartbeat(self, job_id: str, run_id: str) -> bool:
        status = await self.conn.execute(
            "UPDATE jobs SET heartbeat_at = now() WHERE job_id = $1 AND run_id = $2 AND state = 'running'",
            job_id,
            run_id,
        )
        return bool(status.endswith(" 1"))

    async def complete(self, job_id: str, run_id: str, result: dict[str, Any]) -> bool:
        status = await self.conn.execute(
            """UPDATE jobs SET state = 'completed', finished_at = now(), result = $3
               WHERE job_id = $1 AND run_id = $2 AND state = 'running'""",
            job_id,
            run_id,
            result,
        )
        return bool(status.endswith(" 1"))

    async def fail(self, job_id: str, run_id: str | None, reason: FailureReason, message: str) -> bool:
        status = await self.conn.execute(
            """UPDATE jobs SET state = 'failed', finished_at = now(), failure_reason = $3,
                               failure_message = $4
               WHERE job_id = $1 AND state IN ('requested', 'running')
                 AND ($2::text IS NULL OR run_id = $2)""",
            job_id,
            run_id,
            reason.value,
            message,
        )
        return bool(status.endswith(" 1"))

    async def requeue(self, job_id: str, run_id: str) -> bool:
        status = await self.conn.execute(
            """UPDATE jobs SET state = 'requested', heartbeat_at = NULL
               WHERE job_id = $1 AND run_id = $2 AND state = 'running'""",
            job_id,
            run_id,
        )
        return bool(status.endswith(" 1"))

    async def release(self, job_id: str, run_id: str) -> bool:
        status = await self.conn.execute(
            """UPDATE jobs SET state = 'requested', heartbeat_at = NULL, attempts = attempts - 1
               WHERE job_id = $1 AND run_id = $2 AND state = 'running'""",
            job_id,
            run_id,
        )
        return bool(status.endswith(" 1"))


def _envelope_json(envelope: RequestEnvelope) -> dict[str, Any]:
    return {
        "id": envelope.id,
        "source": envelope.source,
        "type": envelope.type,
        "correlationid": envelope.correlationid,
        "causationid": envelope.causationid,
        "actor": envelope.actor,
        "subject": envelope.subject,
    }


def _job(row: asyncpg.Record) -> Job:
    return Job(
        job_id=row["job_id"],
        model=row["model"],
        state=JobState(row["state"]),
        trigger=row["trigger"],
        request=TrainingRequested.model_validate(row["request"]),
        request_event=RequestEnvelope(**row["request_event"]),
        spec_hash=row["spec_hash"],
        spec_artifact=ArtifactRef.model_validate(row["spec_artifact"]),
        attempts=row["attempts"],
        run_id=row["run_id"],
        created_at=row["created_at"],
        dispatched_at=row["dispatched_at"],
        heartbeat_at=row["heartbeat_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        failure_reason=row["failure_reason"],
        failure_message=row["failure_message"],
        result=row["result"],
    )
