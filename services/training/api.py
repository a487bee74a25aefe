"""Training's HTTP API: register and read model specs, follow training jobs.

Routes call the same core functions as the handlers (handlers.register_spec, current_spec, job)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from contracts.common import ArtifactRef, ModelName
from libs.auth import OperatorDep, ViewerDep
from libs.errors import InvalidInput
from libs.http import BodyRoute, Cursor, InDigits
from libs.modelspec import SpecError, parse_spec
from services.training import handlers
from services.training.adapters.postgres import PgJobs, PgSpecs
from services.training.domain import decode_job_cursor
from services.training.ports import Job, StoredSpec

router = APIRouter(prefix="/v1", tags=["training"], route_class=BodyRoute)


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True)


class SpecPublic(_Public):
    """A model's registered spec."""

    model: str = Field(description="Model name.")
    spec_hash: str = Field(description="sha256 of the canonical spec JSON (its key in the artifact store).")
    artifact: ArtifactRef = Field(description="The canonical spec in the artifact store.")
    spec: dict[str, Any] = Field(description="The spec with every default spelled out.")
    registered_by: str | None = Field(description="Who registered it.")
    registered_at: datetime = Field(description="When.")

    @classmethod
    def of(cls, stored: StoredSpec) -> SpecPublic:
        return cls(
            model=stored.model,
            spec_hash=stored.spec_hash,
            artifact=stored.artifact,
            spec=stored.spec.model_dump(mode="json"),
            registered_by=stored.registered_by,
            registered_at=stored.registered_at,
        )


class JobPublic(_Public):
    """A training job."""

    job_id: str = Field(description="Job id.")
    model: str = Field(description="Model trained.")
    state: str = Field(description="requested, running, completed or failed.")
    trigger: str = Field(description="What asked for it.")
    reason: str = Field(description="Why, for people.")
    attempts: int = Field(description="Runs started so far.")
    run_id: str | None = Field(description="The current (or last) run.")
    spec_hash: str = Field(description="The spec the job trains with.")
    created_at: datetime = Field(description="When the policy accepted the trigger.")
    started_at: datetime | None = Field(description="When the first run started.")
    heartbeat_at: datetime | None = Field(description="Last sign of life of the running run.")
    finished_at: datetime | None = Field(description="When it completed or failed.")
    failure_reason: str | None = Field(description="Why it failed.")
    failure_message: str | None = Field(description="What was wrong and what to do.")
    metrics: dict[str, float] | None = Field(description="Holdout metrics, once completed.")

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        return cls(
            job_id=job.job_id,
            model=job.model,
            state=job.state.value,
            trigger=job.trigger,
            reason=job.request.reason,
            attempts=job.attempts,
            run_id=job.run_id,
            spec_hash=job.spec_hash,
            created_at=job.created_at,
            started_at=job.started_at,
            heartbeat_at=job.heartbeat_at,
            finished_at=job.finished_at,
            failure_reason=job.failure_reason,
            failure_message=job.failure_message,
            metrics=(job.result or {}).get("metrics"),
        )


SPEC_EXAMPLE = """name: churn
features:
  - {name: tenure_months, type: numeric}
  - {name: plan, type: categorical}
target: churned
task: classification
estimator: hist_gradient_boosting
params: {max_depth: 6}
base_datasets: [churn-base]
validation:
  thresholds: {roc_auc: 0.75}
"""


@router.put(
    "/models/{model}/spec",
    summary="Register (or replace) a model's spec, as YAML or JSON.",
    response_model=SpecPublic,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/yaml": {"schema": {"type": "string"}, "example": SPEC_EXAMPLE},
                "application/json": {"schema": {"type": "object"}},
            },
        }
    },
)
async def put_spec(model: ModelName, request: Request, principal: OperatorDep) -> SpecPublic:
    body = await request.body()
    if not body.strip():
        raise InvalidInput("the request body is empty: send the spec as YAML or JSON", field="(body)")
    try:
        # Validation instantiates estimators: off the event loop, which also runs the consumers.
        spec = await asyncio.to_thread(
            parse_spec, body, content_type=request.headers.get("content-type"), name=model
        )
    except SpecError as exc:
        raise InvalidInput(exc.message, field=exc.field or "(body)", reason=exc.reason) from exc
    rt = request.app.state.runtime
    async with rt.begin() as tx:
        stored = await handlers.register_spec(
            spec,
            actor=principal.actor,
            specs=PgSpecs(tx.conn),
            spec_store=request.app.state.spec_store,
            publish=tx.publish,
            source=rt.source(),
        )
    return SpecPublic.of(stored)


@router.get("/models/{model}/spec", summary="A model's current spec.", response_model=SpecPublic)
async def get_spec(model: ModelName, request: Request, _: ViewerDep) -> SpecPublic:
    async with request.app.state.runtime.pool.acquire() as conn:
        return SpecPublic.of(await handlers.current_spec(model, specs=PgSpecs(conn)))


@router.get("/jobs/{job_id}", summary="One training job.", response_model=JobPublic)
async def get_job(job_id: str, request: Request, _: ViewerDep) -> JobPublic:
    rt = request.app.state.runtime
    async with rt.pool.acquire() as conn:
        return JobPublic.of(await handlers.job(job_id, jobs=PgJobs(conn, rt.settings.db_schema)))


NEXT_PAGE_HEADERS = {
    "Link": {
        "description": 'The next page, as `<URL>; rel="next"` (RFC 8288): its `cursor` is the next_cursor. '
        "Absent on a page holding fewer jobs than `limit`, the last (a full last page is followed by an "
        "empty one without it).",
        "schema": {"type": "string"},
    }
}


@router.get(
    "/models/{model}/jobs",
    summary="A model's training jobs, newest first, a page at a time.",
    response_model=list[JobPublic],
    responses={200: {"headers": NEXT_PAGE_HEADERS}},
)
async def list_jobs(
    model: ModelName,
    request: Request,
    response: Response,
    _: ViewerDep,
    limit: Annotated[int, InDigits, Query(ge=1, le=200, description="At most this many jobs.")] = 50,
    cursor: Cursor = None,
) -> list[JobPublic]:
    # The list stays a bare array for the clients reading it so; the next page's cursor comes in a header.
    after = decode_job_cursor(cursor, model) if cursor is not None else None
    rt = request.app.state.runtime
    async with rt.pool.acquire() as conn:
        jobs, next_cursor = await handlers.job_page(
            model, limit=limit, after=after, jobs=PgJobs(conn, rt.settings.db_schema)
        )
    if next_cursor is not None:
        query = urlencode({"limit": limit, "cursor": next_cursor})
        response.headers["Link"] = f'<{request.url.path}?{query}>; rel="next"'
    return [JobPublic.of(j) for j in jobs]
