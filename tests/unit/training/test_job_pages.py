"""A model's training jobs are read a page at a time, newest first, with the cursor of the next page: every
job once, also while jobs are added, and a cursor the list did not give is a 422 before the database."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest

from contracts.commands import RetrainRequested
from contracts.common import ID_MAX_CHARS
from contracts.envelope import new_event
from libs.http import create_app
from services.training import api
from services.training.domain import JobPosition, decode_job_cursor, job_cursor
from services.training.handlers import job_page
from services.training.ports import Job
from services.training.settings import TrainingSettings
from tests.unit.training.data import churn_frame, churn_spec
from tests.unit.training.fakes import Harness
from tests.unit.training.test_handlers import register, upload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

VIEWER = {"Authorization": "Bearer dev-viewer"}
datetime_of = datetime.fromisoformat


async def one_job(h: Harness) -> Job:
    await upload(h, "churn-base", churn_frame())
    await register(h, churn_spec())
    ask = RetrainRequested(model="churn", reason="new export", ignore_cooldown=True)
    await h.bus.publish(new_event(ask, source="/driftloop/registry", actor="user:bob"))
    await h.bus.drain()
    [job] = h.jobs.rows.values()
    return job


async def test_a_models_jobs_come_page_by_page_newest_first_each_once_while_jobs_are_added(
    tmp_path: Path,
) -> None:
    h = Harness(str(tmp_path / "artifacts"))
    first = await one_job(h)
    h.jobs.rows.clear()
    start = first.created_at
    # Pairs created at the same instant: the job id orders them, so no page boundary splits a tie badly.
    for i in range(7):
        job = replace(first, job_id=f"job-{i}", created_at=start + timedelta(seconds=i // 2))
        h.jobs.rows[job.job_id] = job
    h.jobs.rows["other"] = replace(first, job_id="other", model="fraud", created_at=start)
    newest_first = ["job-6", "job-5", "job-4", "job-3", "job-2", "job-1", "job-0"]

    seen: list[str] = []
    pages: list[int] = []
    after: JobPosition | None = None
    while True:
        page, cursor = await job_page("churn", limit=2, after=after, jobs=h.jobs)
        seen += [j.job_id for j in page]
        pages.append(len(page))
        if len(pages) == 2:  # a job created meanwhile (newer than any) is not read into the pages after
            late = replace(first, job_id="job-late", created_at=start + timedelta(hours=1))
            h.jobs.rows[late.job_id] = late
        if cursor is None:
            break
        after = decode_job_cursor(cursor, "churn")
    assert seen == newest_first and pages == [2, 2, 2, 1]

    # A full last page is followed by an empty one without a cursor, as the registry's lists.
    full, cursor = await job_page("churn", limit=8, after=None, jobs=h.jobs)
    assert len(full) == 8 and cursor is not None
    assert await job_page("churn", limit=8, after=decode_job_cursor(cursor, "churn"), jobs=h.jobs) == (
        [],
        None,
    )


def cursor_of(position: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(position)).decode().rstrip("=")


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = TrainingSettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
    app = create_app(settings, title="training", description="", routers=[api.router])
    app.state.runtime = object()  # no pool: a request that got past the cursor's check would fail with a 500
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://training", headers=VIEWER) as c:
        yield c


AT = "2026-03-01T12:00:00+00:00"


@pytest.mark.parametrize(
    ("cursor", "detail"),
    [
        ("", "cursor is not valid"),  # the last page's null sent back as "" would page for ever
        ("not base64!", "cursor is not valid"),
        (cursor_of(["jobs", "churn", AT]), "cursor does not belong to this list"),
        (cursor_of(["models", "churn"]), "cursor is not valid"),  # the registry's models list's
        (job_cursor("fraud", JobPosition(datetime_of(AT), "job-1")), "cursor does not belong to this list"),
        (cursor_of(["jobs", "churn", AT, 5]), "cursor does not belong to this list"),
        (cursor_of(["jobs", "churn", "2026-03-01T12:00:00", "job-1"]), "cursor is not valid"),  # no offset
        (cursor_of(["jobs", "churn", "0001-01-01T00:00:00+05:00", "job-1"]), "cursor is not valid"),
        (cursor_of(["jobs", "churn", "yesterday", "job-1"]), "cursor is not valid"),
        (cursor_of(["jobs", "churn", AT, "job\x00"]), "cursor is not valid"),
        (cursor_of(["jobs", "churn", AT, "j" * (ID_MAX_CHARS + 1)]), "cursor is not valid"),
    ],
)
async def test_a_cursor_the_job_list_did_not_give_is_422_before_the_database(
    client: httpx.AsyncClient, cursor: str, detail: str
) -> None:
    r = await client.get("/v1/models/churn/jobs", params={"cursor": cursor})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(detail) and r.json()["field"] == "cursor"


def test_a_job_cursor_gives_back_its_position() -> None:
    position = JobPosition(datetime_of("2026-03-01T13:00:00.000001+01:00"), "j" * ID_MAX_CHARS)
    back = decode_job_cursor(job_cursor("churn", position), "churn")
    assert back == position and back.created_at.utcoffset() == timedelta(0)
