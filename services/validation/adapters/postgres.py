"""Validation's ports on asyncpg, on the connection of the transaction they are given."""

from __future__ import annotations

import asyncpg

from contracts.common import ArtifactRef, DatasetRef, Lineage, ModelSignature
from contracts.datasets import DatasetRegistered
from contracts.models import ModelVersionRegistered
from contracts.validation import CheckResult
from libs.stage_order import PgStageChangesApplied
from services.validation.ports import Report, VersionRecord


class PgVersions:
    """Registered versions in the ``versions`` table."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def record(self, registered: ModelVersionRegistered) -> None:
        await self.conn.execute(
            """INSERT INTO versions (model, version, run_id, artifact, signature, metrics, lineage)
               VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING""",
            registered.model,
            registered.model_version,
            registered.run_id,
            registered.artifact.model_dump(mode="json"),
            registered.signature.model_dump(mode="json"),
            registered.metrics,
            registered.lineage.model_dump(mode="json"),
        )

    async def get(self, model: str, version: int) -> VersionRecord | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM versions WHERE model = $1 AND version = $2", model, version
        )
        if row is None:
            return None
        return VersionRecord(
            model=row["model"],
            version=row["version"],
            artifact=ArtifactRef.model_validate(row["artifact"]),
            signature=ModelSignature.model_validate(row["signature"]),
            metrics=dict(row["metrics"]),
            lineage=Lineage.model_validate(row["lineage"]),
        )


class PgChampions(PgStageChangesApplied):
    """The production version of each model."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def get(self, model: str) -> int | None:
        value = await self.conn.fetchval("SELECT version FROM champions WHERE model = $1", model)
        return int(value) if value is not None else None

    async def set(self, model: str, version: int) -> None:
        await self.conn.execute(
            """INSERT INTO champions (model, version) VALUES ($1, $2)
               ON CONFLICT (model) DO UPDATE SET version = EXCLUDED.version, since = now()""",
            model,
            version,
        )

    async def clear(self, model: str, version: int) -> None:
        await self.conn.execute("DELETE FROM champions WHERE model = $1 AND version = $2", model, version)


class PgDatasets:
    """Dataset versions in the ``datasets`` table."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def record(self, registered: DatasetRegistered) -> None:
        await self.conn.execute(
            """INSERT INTO datasets (name, version, sha256, artifact, row_count)
               VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING""",
            registered.name,
            registered.dataset_version,
            registered.sha256,
            registered.artifact.model_dump(mode="json"),
            registered.row_count,
        )

    async def artifact(self, ref: DatasetRef) -> ArtifactRef | None:
        value = await self.conn.fetchval(
            "SELECT artifact FROM datasets WHERE name = $1 AND version = $2 AND sha256 = $3",
            ref.name,
            ref.version,
            ref.sha256,
        )
        return ArtifactRef.model_validate(value) if value is not None else None


class PgReports:
    """Reports in the ``reports`` table."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def save(self, report: Report) -> None:
        await self.conn.execute(
            """INSERT INTO reports (report_id, model, version, passed, checks, failed_checks,
                                    champion_version, holdout, duration_seconds, event_id)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)""",
            report.report_id,
            report.model,
            report.version,
            report.passed,
            [c.model_dump(mode="json") for c in report.checks],
            report.failed_checks,
            report.champion_version,
            report.holdout.model_dump(mode="json") if report.holdout else None,
            report.duration_seconds,
            report.event_id,
        )

    async def get(self, report_id: str) -> Report | None:
        row = await self.conn.fetchrow("SELECT * FROM reports WHERE report_id = $1", report_id)
        return _report(row) if row else None

    async def for_version(self, model: str, version: int) -> Report | None:
        row = await self.conn.fetchrow(
            "SELECT * FROM reports WHERE model = $1 AND version = $2", model, version
        )
        return _report(row) if row else None


def _report(row: asyncpg.Record) -> Report:
    return Report(
        report_id=row["report_id"],
        model=row["model"],
        version=row["version"],
        passed=row["passed"],
        checks=[CheckResult.model_validate(c) for c in row["checks"]],
        failed_checks=list(row["failed_checks"]),
        champion_version=row["champion_version"],
        holdout=DatasetRef.model_validate(row["holdout"]) if row["holdout"] else None,
        duration_seconds=row["duration_seconds"],
        event_id=row["event_id"],
        created_at=row["created_at"],
    )
