"""Monitoring's JSON answers (a model's drift page, a window's report, the status) are what the OpenAPI
document says, which names their fields (services/monitoring/schemas.py): a report judged from real
traffic, read back as Postgres stores it, validates against it.

The store is a fake holding those rows; as in the retention tests, ``PgMonitoringStore`` takes it as the
connection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from libs.http import create_app
from services.monitoring import api, handlers
from services.monitoring.bootstrap import make_monitor
from services.monitoring.domain import DriftPolicy, ReportPosition, judge_window
from services.monitoring.handlers import Monitor
from services.monitoring.ports import EarlyStep, JudgedReport, ReplayReport, StoredStep
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_domain import T0, closed_window, reference, requests
from tests.unit.test_openapi_errors import conforms

VIEWER = {"Authorization": "Bearer dev-viewer"}


def judged_report() -> dict[str, Any]:
    """A window of drifted traffic with an unseen category, judged, as ``window_reports`` gives it back."""
    ref = reference()
    window = closed_window(ref, requests(500, seed=2, shift=0.8, plan=("basic", "plus", "gold")), 500)
    judgement = judge_window(ref, window, DriftPolicy())
    report = handlers.window_report(
        judgement, ["x0"], judgement.drift_share, alerted=True, consecutive={"x0": 2}
    )
    assert report["quality"] and report["drifted_features"], report
    stored: dict[str, Any] = orjson.loads(orjson.dumps(report, option=orjson.OPT_SERIALIZE_NUMPY))
    return stored


def step(rollout_id: str, given_up_at: float | None = None) -> EarlyStep:
    at = T0.timestamp()
    return EarlyStep(rollout_id, 2, "churn", 1, 2, at, "e-1", "c-1", None, at, given_up_at)


@dataclass
class Store:
    """The rows the JSON routes read."""

    report: dict[str, Any] = field(default_factory=judged_report)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Store]:
        yield self

    async def latest_reports(
        self, model: str, limit: int, *, after: ReportPosition | None = None
    ) -> list[JudgedReport]:
        return [JudgedReport(ReportPosition(T0, 1, 1), self.report)] * limit

    async def window_report(self, model: str, window_id: str) -> dict[str, Any] | None:
        return self.report if window_id == self.report["window"]["id"] else None

    async def label_counts(self) -> dict[str, dict[str, int]]:
        return {"churn": {"labelled": 40, "late": 3, "unmatched": 1, "waiting": 2}}

    async def labels_outside_classes(self) -> dict[tuple[str, int], int]:
        return {("churn", 1): 4}

    async def recent_alerts(self, models: list[str], per_model: int) -> dict[str, list[dict[str, Any]]]:
        alert = {"event_id": "e-9", "model": "churn", "version": 1, "kind": "drift", "summary": "x0 drifted"}
        return {"churn": [{**alert, "created_at": T0.isoformat()}]}

    async def watched_steps(self) -> list[StoredStep]:
        return [StoredStep("r-1", 0, "churn", 1, 2, T0.timestamp(), 100, 60.0, "e-1", "c-1", "user:ann")]

    async def kept_steps(self) -> list[EarlyStep]:
        return [step("r-2")]

    async def given_up_steps(self) -> list[EarlyStep]:
        return [step("r-3", given_up_at=(T0 + timedelta(minutes=10)).timestamp())]


@pytest.fixture
async def monitoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[httpx.AsyncClient, Monitor, Store]]:
    monkeypatch.setattr(api, "PgMonitoringStore", lambda conn: conn)
    settings = MonitoringSettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
    app = create_app(settings, title="monitoring", description="", routers=[api.router])
    monitor = make_monitor(settings, artifacts=None, source="/test/monitoring")
    monitor.live.add_reference(reference())  # churn version 1
    store = Store()
    app.state.runtime = type("Runtime", (), {"pool": store})()
    app.state.monitor = monitor
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://monitoring", headers=VIEWER
    ) as c:
        yield c, monitor, store


async def test_the_drift_page_the_window_report_and_the_status_are_what_the_document_says(
    monitoring: tuple[httpx.AsyncClient, Monitor, Store],
) -> None:
    client, monitor, store = monitoring
    doc = (await client.get("/openapi.json")).json()
    window_id = store.report["window"]["id"]
    answers = [
        ("/v1/models/{model}/drift", await client.get("/v1/models/churn/drift?limit=2")),
        ("/v1/models/{model}/windows/{window_id}", await client.get(f"/v1/models/churn/windows/{window_id}")),
        ("/v1/status", await client.get("/v1/status")),
    ]
    monitor.replay = ReplayReport(records=1_000, seconds=1.5, unread={0: 30}, deleted={1: 2})
    monitor.live.unknown[("churn", 7)] = 12
    answers.append(("/v1/status", await client.get("/v1/status")))

    for path, r in answers:
        assert r.status_code == 200, r.text
        assert conforms(doc, path, "get", r) == [], path
    status = answers[-1][1].json()
    assert status["models"]["churn"]["last_window"]["id"] == window_id
    assert status["replay"]["not_replayed"]["deadline"] == {"0": 30}
    assert [len(status[k]) for k in ("unknown", "rollout_steps_kept", "rollout_steps_given_up")] == [1, 1, 1]
