"""The registry's ports on asyncpg. SQL never names the schema: the pool's search_path does."""

from __future__ import annotations

from typing import Any

import asyncpg

from contracts.common import ModelSignature, Stage
from contracts.datasets import DatasetRegistered
from contracts.training import TrainingCompleted
from contracts.validation import ValidationFailed, ValidationPassed
from services.registry.ports import Cause, LastMove, RegisteredRun
from services.registry.schemas import (
    DatasetPublic,
    LineageDatasetPublic,
    LineagePublic,
    ModelPublic,
    StageChangePublic,
    ValidationReportPublic,
    VersionPublic,
    VersionSummaryPublic,
)


class PgVersions:
    """:class:`services.registry.ports.Versions` on one connection (inside the caller's transaction)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def find_run(self, model: str, run_id: str) -> RegisteredRun | None:
        row = await self.conn.fetchrow(
            """SELECT version, artifact->>'key' AS artifact_key, profile->>'key' AS profile_key
               FROM model_versions WHERE model = $1 AND run_id = $2""",
            model,
            run_id,
        )
        return RegisteredRun(row["version"], row["artifact_key"], row["profile_key"]) if row else None

    async def register(self, completed: TrainingCompleted, cause: Cause) -> int:
        c = completed
        await self.conn.execute(
            "INSERT INTO registered_models (name) VALUES ($1) ON CONFLICT DO NOTHING", c.model
        )
        # The row lock taken here orders concurrent registrations of one model: numbers never repeat.
        version = await self.conn.fetchval(
            """UPDATE registered_models SET latest_version = latest_version + 1, updated_at = now()
               WHERE name = $1 RETURNING latest_version""",
            c.model,
        )
        await self.conn.execute(
            """INSERT INTO model_versions (model, version, stage, run_id, job_id, artifact, profile, metrics,
                   train_rows, holdout_rows, duration_seconds, event_id, correlation_id)
               VALUES ($1, $2, 'candidate', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
            c.model,
            version,
            c.run_id,
            c.job_id,
            c.artifact.model_dump(mode="json"),
            c.profile.model_dump(mode="json"),
            c.metrics,
            c.train_rows,
            c.holdout_rows,
            c.duration_seconds,
            cause.event_id,
            cause.correlation_id,
        )
        sig = c.signature.model_dump(mode="json")
        await self.conn.execute(
            """INSERT INTO signatures (model, version, features, target, task, classes)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            c.model,
            version,
            sig["features"],
            sig["target"],
            sig["task"],
            sig["classes"],
        )
        lin = c.lineage
        await self.conn.execute(
            """INSERT INTO lineage (model, version, spec_hash, code_version, parent_version, seed, params,
                   environment, document)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)""",
            c.model,
            version,
            lin.spec_hash,
            lin.code_version,
            lin.parent_version,
            lin.seed,
            lin.params,
            lin.environment,
            lin.model_dump(mode="json"),
        )
        refs = [("training", i, d) for i, d in enumerate(lin.datasets)]
        if lin.holdout is not None:
            refs.append(("holdout", 0, lin.holdout))
        await self.conn.executemany(
            """INSERT INTO lineage_datasets (model, version, role, position, dataset_name, dataset_version,
                   sha256, rows) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            [(c.model, version, role, i, d.name, d.version, d.sha256, d.rows) for role, i, d in refs],
        )
        await self._history(c.model, version, None, Stage.CANDIDATE, f"registered from run {c.run_id}", cause)
        return int(version)

    async def stage_for_update(self, model: str, version: int) -> Stage | None:
        stage = await self.conn.fetchval(
            "SELECT stage FROM model_versions WHERE model = $1 AND version = $2 FOR UPDATE", model, version
        )
        return Stage(stage) if stage is not None else None

    async def versions_in(self, model: str, stage: Stage) -> list[int]:
        rows = await self.conn.fetch(
            "SELECT version FROM model_versions WHERE model = $1 AND stage = $2 ORDER BY version",
            model,
            stage.value,
        )
        return [r["version"] for r in rows]

    async def lock_stages(self, model: str) -> None:
        # The row move() updates: taken here, it orders this transaction's reads before the others' moves.
        await self.conn.execute("SELECT 1 FROM registered_models WHERE name = $1 FOR UPDATE", model)

    async def move(
        self, model: str, version: int, from_stage: Stage, to_stage: Stage, reason: str, cause: Cause
    ) -> int:
        await self.conn.execute(
            """UPDATE model_versions SET stage = $3, stage_changed_at = clock_timestamp()
               WHERE model = $1 AND version = $2""",
            model,
            version,
            to_stage.value,
        )
        # The model's row lock, held to commit, orders concurrent changes of its versions: a change that
        # commits later has the larger number, and its outbox row comes after.
        sequence = await self.conn.fetchval(
            """UPDATE registered_models SET stage_sequence = stage_sequence + 1, updated_at = now()
               WHERE name = $1 RETURNING stage_sequence""",
            model,
        )
        await self._history(model, version, from_stage, to_stage, reason, cause, sequence=sequence)
        return int(sequence)

    async def _history(
        self,
        model: str,
        version: int,
        from_stage: Stage | None,
        to_stage: Stage,
        reason: str,
        cause: Cause,
        *,
        sequence: int | None = None,
    ) -> None:
        await self.conn.execute(
            """INSERT INTO stage_history (model, version, from_stage, to_stage, reason, actor, source,
                   event_id, event_type, correlation_id, sequence)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)""",
            model,
            version,
            from_stage.value if from_stage else None,
            to_stage.value,
            reason,
            cause.actor,
            cause.source,
            cause.event_id,
            cause.event_type,
            cause.correlation_id,
            sequence,
        )

    async def last_move(self, model: str, version: int) -> LastMove | None:
        row = await self.conn.fetchrow(
            """SELECT from_stage, to_stage, event_type FROM stage_history
               WHERE model = $1 AND version = $2 ORDER BY id DESC LIMIT 1""",
            model,
            version,
        )
        if row is None:
            return None
        from_stage = Stage(row["from_stage"]) if row["from_stage"] is not None else None
        return LastMove(from_stage, Stage(row["to_stage"]), row["event_type"])

    async def take_alias(self, model: str, alias: str, version: int, cause: Cause) -> None:
        await self.conn.execute(
            """INSERT INTO aliases (model, alias, version, event_id) VALUES ($1, $2, $3, $4)
               ON CONFLICT (model, alias) DO UPDATE
               SET version = EXCLUDED.version, event_id = EXCLUDED.event_id, set_at = now()""",
            model,
            alias,
            version,
            cause.event_id,
        )

    async def drop_aliases(self, model: str, version: int, aliases: tuple[str, ...]) -> None:
        if aliases:
            await self.conn.execute(
                "DELETE FROM aliases WHERE model = $1 AND version = $2 AND alias = ANY($3::text[])",
                model,
                version,
                list(aliases),
            )

    async def aliases_of(self, model: str, version: int) -> list[str]:
        rows = await self.conn.fetch(
            "SELECT alias FROM aliases WHERE model = $1 AND version = $2 ORDER BY alias", model, version
        )
        return [r["alias"] for r in rows]

    async def report_verdict(self, model: str, version: int, report_id: str) -> str | None:
        passed = await self.conn.fetchval(
            """SELECT passed FROM validation_reports WHERE model = $1 AND version = $2 AND report_id = $3
               ORDER BY received_at LIMIT 1""",
            model,
            version,
            report_id,
        )
        return None if passed is None else "passed" if passed else "failed"

    async def record_validation(self, report: ValidationPassed | ValidationFailed, cause: Cause) -> None:
        await self.conn.execute(
            """INSERT INTO validation_reports (event_id, model, version, report_id, passed, checks,
                   failed_checks, champion_version, holdout, duration_seconds, checks_truncated, checks_total,
                   failed_checks_total)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
               ON CONFLICT (event_id) DO NOTHING""",
            cause.event_id,
            report.model,
            report.model_version,
            report.report_id,
            not report.failed_checks,
            [c.model_dump(mode="json") for c in report.checks],
            list(report.failed_checks),
            report.champion_version,
            report.holdout.model_dump(mode="json") if report.holdout else None,
            report.duration_seconds,
            report.checks_truncated,
            # Events from before the totals were added carry every check.
            len(report.checks) if report.checks_total is None else report.checks_total,
            len(report.failed_checks) if report.failed_checks_total is None else report.failed_checks_total,
        )

    async def model_exists(self, model: str) -> bool:
        return bool(
            await self.conn.fetchval("SELECT EXISTS (SELECT 1 FROM registered_models WHERE name = $1)", model)
        )

    async def latest_signature(self, model: str) -> tuple[int, ModelSignature] | None:
        row = await self.conn.fetchrow(
            """SELECT s.version, s.features, s.target, s.task, s.classes FROM signatures s
               JOIN registered_models m ON m.name = s.model AND m.latest_version = s.version
               WHERE s.model = $1""",
            model,
        )
        if row is None:
            return None
        sig = ModelSignature(
            features=row["features"], target=row["target"], task=row["task"], classes=row["classes"]
        )
        return row["version"], sig

    async def set_tag(self, model: str, version: int, key: str, value: str, actor: str) -> str | None:
        previous: str | None = await self.conn.fetchval(
            "SELECT value FROM tags WHERE model = $1 AND version = $2 AND key = $3", model, version, key
        )
        await self.conn.execute(
            """INSERT INTO tags (model, version, key, value, set_by) VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (model, version, key) DO UPDATE
               SET value = EXCLUDED.value, set_by = EXCLUDED.set_by, set_at = now()""",
            model,
            version,
            key,
            value,
            actor,
        )
        return previous

    async def delete_tag(self, model: str, version: int, key: str) -> str | None:
        removed: str | None = await self.conn.fetchval(
            "DELETE FROM tags WHERE model = $1 AND version = $2 AND key = $3 RETURNING value",
            model,
            version,
            key,
        )
        return removed


_DATASET_COLUMNS = """name, version, sha256, artifact, row_count, columns, source, derived_from, models,
    description, registered_by, event_id, created_at"""


def _dataset(row: asyncpg.Record) -> DatasetPublic:
    return DatasetPublic.model_validate(dict(row))


class PgDatasets:
    """:class:`services.registry.ports.Datasets` on one connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def get(self, name: str, version: int) -> DatasetPublic | None:
        row = await self.conn.fetchrow(
            f"SELECT {_DATASET_COLUMNS} FROM datasets WHERE name = $1 AND version = $2", name, version
        )
        return _dataset(row) if row else None

    async def with_content(self, name: str, sha256: str) -> DatasetPublic | None:
        row = await self.conn.fetchrow(
            f"""SELECT {_DATASET_COLUMNS} FROM datasets WHERE name = $1 AND sha256 = $2
                ORDER BY version DESC LIMIT 1""",
            name,
            sha256,
        )
        return _dataset(row) if row else None

    async def lock_name(self, name: str) -> None:
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtext('registry-dataset:' || $1))", name)

    async def next_version(self, name: str) -> int:
        return int(
            await self.conn.fetchval(
                "SELECT coalesce(max(version), 0) + 1 FROM datasets WHERE name = $1", name
            )
        )

    async def add(self, registered: DatasetRegistered, *, event_id: str, actor: str | None) -> None:
        d = registered
        await self.conn.execute(
            """INSERT INTO datasets (name, version, sha256, artifact, row_count, columns, source,
                   derived_from, models, description, event_id, registered_by)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)""",
            d.name,
            d.dataset_version,
            d.sha256,
            d.artifact.model_dump(mode="json"),
            d.row_count,
            d.columns,
            d.source,
            [r.model_dump(mode="json") for r in d.derived_from],
            list(d.models),
            d.description,
            event_id,
            actor,
        )

    async def named_for(self, model: str) -> bool:
        return bool(
            await self.conn.fetchval("SELECT EXISTS (SELECT 1 FROM datasets WHERE $1 = ANY(models))", model)
        )


_SUMMARY_COLUMNS = """v.model, v.version, v.stage, v.run_id, v.metrics, v.created_at, v.stage_changed_at,
    coalesce((SELECT array_agg(a.alias ORDER BY a.alias) FROM aliases a
              WHERE a.model = v.model AND a.version = v.version), '{}') AS aliases,
    coalesce((SELECT jsonb_object_agg(t.key, t.value) FROM tags t
              WHERE t.model = v.model AND t.version = v.version), '{}'::jsonb) AS tags"""

_VERSION_SQL = f"""
SELECT {_SUMMARY_COLUMNS},
    v.job_id, v.artifact, v.profile, v.train_rows, v.holdout_rows, v.duration_seconds, v.correlation_id,
    s.features, s.target, s.task, s.classes, l.document AS lineage,
    coalesce((SELECT jsonb_agg(jsonb_build_object(
                  'from_stage', h.from_stage, 'to_stage', h.to_stage, 'reason', h.reason, 'actor', h.actor,
                  'source', h.source, 'event_id', h.event_id, 'event_type', h.event_type,
                  'correlation_id', h.correlation_id, 'changed_at', h.changed_at, 'sequence', h.sequence)
                  ORDER BY h.id)
              FROM stage_history h WHERE h.model = v.model AND h.version = v.version), '[]'::jsonb)
        AS history,
    coalesce((SELECT jsonb_agg(jsonb_build_object(
                  'report_id', r.report_id, 'passed', r.passed, 'checks', r.checks,
                  'failed_checks', r.failed_checks, 'champion_version', r.champion_version,
                  'holdout', r.holdout, 'event_id', r.event_id, 'received_at', r.received_at,
                  'checks_truncated', r.checks_truncated, 'checks_total', r.checks_total,
                  'failed_checks_total', r.failed_checks_total)
                  ORDER BY r.received_at, r.event_id)
              FROM validation_reports r WHERE r.model = v.model AND r.version = v.version), '[]'::jsonb)
        AS reports,
    coalesce((SELECT jsonb_agg(jsonb_build_object(
                  'role', ld.role, 'name', ld.dataset_name, 'version', ld.dataset_version,
                  'sha256', ld.sha256, 'rows', ld.rows, 'registered', d.name IS NOT NULL, 'source', d.source)
                  ORDER BY ld.role DESC, ld.position)
              FROM lineage_datasets ld
              LEFT JOIN datasets d ON d.name = ld.dataset_name AND d.version = ld.dataset_version
              WHERE ld.model = v.model AND ld.version = v.version), '[]'::jsonb) AS datasets
FROM model_versions v
JOIN signatures s ON s.model = v.model AND s.version = v.version
JOIN lineage l ON l.model = v.model AND l.version = v.version
WHERE v.model = $1 AND v.version = $2
"""

_MODEL_COLUMNS = """m.name, m.latest_version, m.created_at, m.updated_at,
    coalesce((SELECT jsonb_object_agg(a.alias, a.version) FROM aliases a WHERE a.model = m.name), '{}'::jsonb)
        AS aliases,
    coalesce((SELECT jsonb_object_agg(c.stage, c.n) FROM (
                  SELECT v.stage, count(*) AS n FROM model_versions v WHERE v.model = m.name GROUP BY v.stage
              ) c), '{}'::jsonb) AS stages"""


def _summary(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "model": row["model"],
        "version": row["version"],
        "stage": row["stage"],
        "aliases": row["aliases"],
        "tags": row["tags"],
        "run_id": row["run_id"],
        "metrics": row["metrics"],
        "created_at": row["created_at"],
        "stage_changed_at": row["stage_changed_at"],
    }


class PgQueries:
    """:class:`services.registry.ports.Queries`: the HTTP API's reads, each one round trip."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def models(
        self,
        *,
        prefix: str | None,
        stage: Stage | None,
        tag: tuple[str, str | None] | None,
        after: str | None,
        limit: int,
    ) -> list[ModelPublic]:
        rows = await self.conn.fetch(
            f"""SELECT {_MODEL_COLUMNS} FROM registered_models m
                WHERE ($1::text IS NULL OR starts_with(m.name, $1))
                  AND ($2::text IS NULL OR EXISTS (
                        SELECT 1 FROM model_versions v WHERE v.model = m.name AND v.stage = $2))
                  AND ($3::text IS NULL OR EXISTS (
                        SELECT 1 FROM tags t WHERE t.model = m.name AND t.key = $3
                          AND ($4::text IS NULL OR t.value = $4)))
                  AND ($5::text IS NULL OR m.name > $5)
                ORDER BY m.name LIMIT $6""",
            prefix,
            stage.value if stage else None,
            tag[0] if tag else None,
            tag[1] if tag else None,
            after,
            limit,
        )
        return [ModelPublic.model_validate(dict(r)) for r in rows]

    async def model(self, name: str) -> ModelPublic | None:
        row = await self.conn.fetchrow(
            f"SELECT {_MODEL_COLUMNS} FROM registered_models m WHERE m.name = $1", name
        )
        return ModelPublic.model_validate(dict(row)) if row else None

    async def versions(
        self,
        *,
        model: str | None,
        prefix: str | None,
        stage: Stage | None,
        tag: tuple[str, str | None] | None,
        after: tuple[str, int] | None,
        limit: int,
    ) -> list[VersionSummaryPublic]:
        rows = await self.conn.fetch(
            f"""SELECT {_SUMMARY_COLUMNS} FROM model_versions v
                WHERE ($1::text IS NULL OR v.model = $1)
                  AND ($2::text IS NULL OR starts_with(v.model, $2))
                  AND ($3::text IS NULL OR v.stage = $3)
                  AND ($4::text IS NULL OR EXISTS (
                        SELECT 1 FROM tags t WHERE t.model = v.model AND t.version = v.version AND t.key = $4
                          AND ($5::text IS NULL OR t.value = $5)))
                  AND ($6::text IS NULL OR v.model > $6 OR (v.model = $6 AND v.version < $7))
                ORDER BY v.model, v.version DESC LIMIT $8""",
            model,
            prefix,
            stage.value if stage else None,
            tag[0] if tag else None,
            tag[1] if tag else None,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [VersionSummaryPublic.model_validate(_summary(r)) for r in rows]

    async def version(self, model: str, version: int) -> VersionPublic | None:
        row = await self.conn.fetchrow(_VERSION_SQL, model, version)
        if row is None:
            return None
        return VersionPublic.model_validate(
            {
                **_summary(row),
                "job_id": row["job_id"],
                "artifact": row["artifact"],
                "profile": row["profile"],
                "signature": {
                    "features": row["features"],
                    "target": row["target"],
                    "task": row["task"],
                    "classes": row["classes"],
                },
                "train_rows": row["train_rows"],
                "holdout_rows": row["holdout_rows"],
                "duration_seconds": row["duration_seconds"],
                "lineage": LineagePublic(
                    run_id=row["run_id"],
                    job_id=row["job_id"],
                    correlation_id=row["correlation_id"],
                    datasets=[LineageDatasetPublic.model_validate(d) for d in row["datasets"]],
                    document=row["lineage"],
                ),
                "stage_history": [StageChangePublic.model_validate(h) for h in row["history"]],
                "validation_reports": [ValidationReportPublic.model_validate(r) for r in row["reports"]],
            }
        )

    async def version_by_alias(self, model: str, alias: str) -> int | None:
        value = await self.conn.fetchval(
            "SELECT version FROM aliases WHERE model = $1 AND alias = $2", model, alias
        )
        return int(value) if value is not None else None

    async def datasets(
        self, *, prefix: str | None, model: str | None, after: tuple[str, int] | None, limit: int
    ) -> list[DatasetPublic]:
        rows = await self.conn.fetch(
            f"""SELECT {_DATASET_COLUMNS} FROM datasets
                WHERE ($1::text IS NULL OR starts_with(name, $1))
                  AND ($2::text IS NULL OR $2 = ANY(models))
                  AND ($3::text IS NULL OR name > $3 OR (name = $3 AND version < $4))
                ORDER BY name, version DESC LIMIT $5""",
            prefix,
            model,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [_dataset(r) for r in rows]
