"""A model's job list on Postgres, through its route: page after page by the Link header's cursor, newest
first, every job once though jobs share a creation time and others are added while the client pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import httpx
import pytest

from contracts.examples import EXAMPLES, SPEC_ARTIFACT
from contracts.training import TrainingRequested
from libs.http import create_app
from services.training import api
from services.training.adapters.postgres import PgJobs
from services.training.bootstrap import MIGRATIONS
from services.training.domain import JobState
from services.training.ports import Job, RequestEnvelope
from services.training.settings import TrainingSettings
from tests.integration.kafka_tools import migrated_schema

pytestmark = pytest.mark.integration

START = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a schema of its own with training's migrations applied, dropped afterwards."""
    async with migrated_schema(database_url, "t_train", MIGRATIONS) as (migrated, _schema):
        yield migrated


async def add(pool: asyncpg.Pool, job: Job) -> None:
    """Stored as requested, then failed: a model has one job in flight at most (jobs_one_in_flight)."""
    async with pool.acquire() as conn:
        await PgJobs(conn, "t_train").create(job)
        await conn.execute(
            "UPDATE jobs SET state = 'failed', finished_at = now() WHERE job_id = $1", job.job_id
        )


def job(job_id: str, created_at: datetime, model: str = "churn") -> Job:
    example = EXAMPLES[TrainingRequested]
    assert isinstance(example, TrainingRequested)
    return Job(
        job_id=job_id,
        model=model,
        state=JobState.REQUESTED,
        trigger=example.trigger.value,
        request=example.model_copy(update={"job_id": job_id, "model": model}),
        request_event=RequestEnvelope(
            id=f"event-{job_id}",
            source="/driftloop/training",
            type="io.driftloop.training.requested.v1",
            correlationid=f"event-{job_id}",
            causationid=None,
            actor=None,
            subject=model,
        ),
        spec_hash=SPEC_ARTIFACT.key,
        spec_artifact=SPEC_ARTIFACT,
        attempts=0,
        run_id=None,
        created_at=created_at,
    )


async def test_a_models_jobs_are_paged_by_the_link_header_each_once_while_jobs_are_added(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # Pairs created at the same microsecond: the job id orders them, descending as the time.
    for i in range(7):
        await add(pool, job(f"job-{i}", START + timedelta(seconds=i // 2)))
    await add(pool, job("job-fraud", START, model="fraud"))

    settings = TrainingSettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
    app = create_app(settings, title="training", description="", routers=[api.router])
    app.state.runtime = SimpleNamespace(pool=pool, settings=SimpleNamespace(db_schema="t_train"))
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": "Bearer dev-viewer"}
    async with httpx.AsyncClient(transport=transport, base_url="http://training", headers=headers) as client:
        seen: list[str] = []
        sizes: list[int] = []
        url: str | None = "/v1/models/churn/jobs?limit=2"
        while url is not None:
            r = await client.get(url)
            assert r.status_code == 200, r.text
            head = await client.head(url)
            assert head.headers.get("link") == r.headers.get("link")
            seen += [j["job_id"] for j in r.json()]
            sizes.append(len(r.json()))
            if len(sizes) == 2:
                # Newer than every job: on no later page, and no job read twice or left out for it.
                await add(pool, job("job-late", START + timedelta(hours=1)))
            url = r.links.get("next", {}).get("url")
        assert seen == ["job-6", "job-5", "job-4", "job-3", "job-2", "job-1", "job-0"]
        assert sizes == [2, 2, 2, 1]

        # A full last page is followed by an empty one without a Link header.
        full = await client.get("/v1/models/churn/jobs?limit=8")
        assert len(full.json()) == 8 and full.links["next"]["url"].startswith(
            "/v1/models/churn/jobs?limit=8&"
        )
        empty = await client.get(full.links["next"]["url"])
        assert empty.status_code == 200 and empty.json() == [] and "link" not in empty.headers
        # Without limit and cursor, as before: the newest 50, a bare array.
        every = await client.get("/v1/models/churn/jobs")
        assert [j["job_id"] for j in every.json()][:2] == [
            "job-late",
            "job-6",
        ] and "link" not in every.headers
