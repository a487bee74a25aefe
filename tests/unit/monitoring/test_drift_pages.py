"""A model's drift windows are read a page at a time, newest first, with the cursor of the next page (JSON
and HTML): every window once, also while windows are judged, and a cursor the list did not give is a 422
before the database."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest

from contracts.common import PG_INTEGER_MAX, VERSION_MAX
from libs.http import create_app
from services.monitoring import api, report
from services.monitoring.bootstrap import make_monitor
from services.monitoring.domain import ReportPosition, decode_report_cursor, report_cursor
from services.monitoring.handlers import report_page
from services.monitoring.ports import JudgedReport, MonitoringStore
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_domain import reference

NOW = datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)


@dataclass
class Reports:
    """``window_reports`` reduced to what the drift list reads."""

    rows: list[JudgedReport] = field(default_factory=list)

    def judge(self, version: int, seq: int, judged_at: datetime) -> None:
        window = {"window": {"id": f"churn:{version}:{seq:06d}"}}
        self.rows.append(JudgedReport(ReportPosition(judged_at, seq, version), window))

    async def latest_reports(
        self, model: str, limit: int, *, after: ReportPosition | None = None
    ) -> list[JudgedReport]:
        def key(judged: JudgedReport) -> tuple[datetime, int, int]:
            return judged.position.judged_at, judged.position.seq, judged.position.version

        listed = sorted(self.rows, key=key, reverse=True)
        if after is not None:
            listed = [r for r in listed if key(r) < (after.judged_at, after.seq, after.version)]
        return listed[:limit]


async def test_a_models_windows_come_page_by_page_newest_first_each_once_while_windows_are_judged() -> None:
    reports = Reports()
    # Versions 1 and 2 close their window of one number in one transaction: one judged_at, one seq.
    for seq in range(1, 4):
        for version in (1, 2):
            reports.judge(version, seq, NOW + timedelta(minutes=seq))
    reports.judge(2, 4, NOW + timedelta(minutes=4))
    store = cast(MonitoringStore, reports)

    seen: list[str] = []
    sizes: list[int] = []
    after: ReportPosition | None = None
    while True:
        page, cursor = await report_page("churn", limit=2, after=after, store=store)
        seen += [r["window"]["id"] for r in page]
        sizes.append(len(page))
        if len(sizes) == 1:  # judged meanwhile: newer than every window, on no later page
            reports.judge(2, 5, NOW + timedelta(minutes=5))
        if cursor is None:
            break
        after = decode_report_cursor(cursor, "churn")
    assert seen == [
        "churn:2:000004",
        "churn:2:000003",
        "churn:1:000003",
        "churn:2:000002",
        "churn:1:000002",
        "churn:2:000001",
        "churn:1:000001",
    ]
    assert sizes == [2, 2, 2, 1]

    # A full last page is followed by an empty one without a cursor, as the registry's lists.
    full, cursor = await report_page("churn", limit=8, after=None, store=store)
    assert len(full) == 8 and cursor is not None
    assert await report_page("churn", limit=8, after=decode_report_cursor(cursor, "churn"), store=store) == (
        [],
        None,
    )


def test_a_drift_cursor_gives_back_its_position() -> None:
    position = ReportPosition(datetime.fromisoformat("2026-03-01T13:00:00.000001+01:00"), PG_INTEGER_MAX, 7)
    back = decode_report_cursor(report_cursor("churn", position), "churn")
    assert back == position and back.judged_at.utcoffset() == timedelta(0)


def cursor_of(position: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(position)).decode().rstrip("=")


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = MonitoringSettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
    app = create_app(settings, title="monitoring", description="", routers=[api.router])
    monitor = make_monitor(settings, artifacts=None, source="/test/monitoring")
    monitor.live.add_reference(reference())  # churn version 1
    app.state.runtime, app.state.monitor = object(), monitor  # no pool: past the cursor's check, a 500
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://monitoring", headers={"Authorization": "Bearer dev-viewer"}
    ) as c:
        yield c


AT = "2026-03-01T12:00:00+00:00"


@pytest.mark.parametrize("path", ["/v1/models/churn/drift", "/v1/models/churn/drift.html"])
@pytest.mark.parametrize(
    ("cursor", "detail"),
    [
        ("", "cursor is not valid"),  # the last page's null sent back as "" would page for ever
        ("%%%", "cursor is not valid"),
        (cursor_of(["versions", "churn", 3]), "cursor is not valid"),  # the registry's
        (cursor_of(["jobs", "churn", AT, "job-1"]), "cursor is not valid"),  # training's
        (report_cursor("fraud", ReportPosition(NOW, 1, 1)), "cursor does not belong to this list"),
        (cursor_of(["drift", "churn", AT, 1]), "cursor does not belong to this list"),
        (cursor_of(["drift", "churn", AT, "1", 1]), "cursor does not belong to this list"),
        (cursor_of(["drift", "churn", "2026-03-01T12:00:00", 1, 1]), "cursor is not valid"),  # no offset
        (cursor_of(["drift", "churn", "9999-12-31T23:00:00-05:00", 1, 1]), "cursor is not valid"),
        (cursor_of(["drift", "churn", AT, PG_INTEGER_MAX + 1, 1]), "cursor is not valid"),
        (cursor_of(["drift", "churn", AT, 1, VERSION_MAX + 1]), "cursor is not valid"),
        (cursor_of(["drift", "churn", AT, 1, 0]), "cursor is not valid"),
    ],
)
async def test_a_cursor_the_drift_list_did_not_give_is_422_before_the_database(
    client: httpx.AsyncClient, path: str, cursor: str, detail: str
) -> None:
    r = await client.get(path, params={"cursor": cursor})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(detail) and r.json()["field"] == "cursor"


def test_the_page_links_the_older_windows_and_an_empty_later_page_says_it_is_one() -> None:
    window: dict[str, Any] = {
        "model_version": 1,
        "window": {"id": "churn:1:000001", "size": 10, "start": AT, "end": AT},
        "correction": "holm",
        "alpha": 0.05,
        "drift_share": 0.0,
        "debounced_share": 0.0,
        "alerted": False,
        "features": [],
    }
    older = "/v1/models/churn/drift.html?limit=1&cursor=abc"
    page = report.render("churn", [window], older=older)
    assert "<a href='/v1/models/churn/drift.html?limit=1&amp;cursor=abc' rel='next'>Older windows</a>" in page
    assert "Older windows" not in report.render("churn", [window])
    assert "No window judged yet." in report.render("churn", [])
    assert "No window judged before the previous page's." in report.render("churn", [], first=False)


def test_the_page_says_which_p_value_was_drawn_by_monte_carlo() -> None:
    feature = {
        "feature": "city",
        "feature_type": "categorical",
        "test": "chi2",
        "statistic": 810.2,
        "p_value": 0.005,
        "p_value_draws": 1_399,
        "threshold": 0.05,
        "drifted": True,
        "n_current": 100,
        "n_reference": 4_000,
        "n_missing": 0,
    }
    window: dict[str, Any] = {
        "model_version": 1,
        "window": {"id": "churn:1:000001", "size": 100, "start": AT, "end": AT},
        "correction": "bonferroni",
        "alpha": 0.05,
        "drift_share": 1.0,
        "debounced_share": 0.0,
        "alerted": False,
        "features": [feature, {**feature, "feature": "plan", "p_value_draws": None}],
    }
    page = report.render("churn", [window])
    assert "<td>0.005 (Monte Carlo, 1,399 tables)</td>" in page
    assert page.count("Monte Carlo") == 1  # plan's p-value came from the test's own distribution
