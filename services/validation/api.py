"""Validation's HTTP API: the stored reports, by id or by model version.

Routes call the same core functions as the handlers (handlers.report, report_for_version)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from contracts.common import DatasetRef, ModelName
from contracts.validation import CheckResult
from libs.auth import ViewerDep
from libs.http import BodyRoute, VersionPath, path_version
from services.validation import handlers
from services.validation.adapters.postgres import PgReports
from services.validation.ports import Report

router = APIRouter(prefix="/v1", tags=["validation"], route_class=BodyRoute)


class ReportPublic(BaseModel):
    """A validation report: every check with its value, threshold and verdict."""

    model_config = ConfigDict(frozen=True)

    report_id: str = Field(description="Report id.")
    model: str = Field(description="Model name.")
    model_version: int = Field(description="The candidate version validated.")
    passed: bool = Field(description="True when every check passed.")
    checks: list[CheckResult] = Field(description="Every check, in order.")
    failed_checks: list[str] = Field(description="Names of the checks that failed.")
    champion_version: int | None = Field(description="The production version compared against, if any.")
    holdout: DatasetRef | None = Field(description="The rows both were scored on.")
    duration_seconds: float = Field(description="Wall time of the validation.")
    event_id: str = Field(description="Id of the ValidationPassed/ValidationFailed event.")
    created_at: datetime | None = Field(description="When the report was made.")

    @classmethod
    def of(cls, report: Report) -> ReportPublic:
        return cls(
            report_id=report.report_id,
            model=report.model,
            model_version=report.version,
            passed=report.passed,
            checks=report.checks,
            failed_checks=report.failed_checks,
            champion_version=report.champion_version,
            holdout=report.holdout,
            duration_seconds=report.duration_seconds,
            event_id=report.event_id,
            created_at=report.created_at,
        )


@router.get("/reports/{report_id}", summary="One validation report.", response_model=ReportPublic)
async def get_report(report_id: str, request: Request, _: ViewerDep) -> ReportPublic:
    async with request.app.state.runtime.pool.acquire() as conn:
        return ReportPublic.of(await handlers.report(report_id, reports=PgReports(conn)))


@router.get(
    "/models/{model}/versions/{version}/report",
    summary="The validation report of a model version.",
    response_model=ReportPublic,
)
async def get_version_report(
    model: ModelName,
    version: VersionPath,
    request: Request,
    _: ViewerDep,
) -> ReportPublic:
    number = path_version(version, f"model {model!r}")
    async with request.app.state.runtime.pool.acquire() as conn:
        return ReportPublic.of(await handlers.report_for_version(model, number, reports=PgReports(conn)))
