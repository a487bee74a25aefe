"""Thousands of features going missing at once (an upstream outage) make one DataQualityIssue, not one each.

A model with 1,000 features and a window where every one is null gave 1,000 DataQualityIssues: 1,000 events
on the topic, 1,000 alert rows, and as many pages, every window the outage lasted past the cooldown. Now,
per window and kind, more features than ``quality_issues_per_kind`` with the same finding make one grouped
issue (no feature, the worst feature's count and share, how many features, the worst few by name); the
window's report keeps every finding. Up to the bound, each feature gets its own issue, as before.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from contracts.monitoring import DataQualityIssue, DataQualityIssueKind
from contracts.predictions import PredictionsLogged
from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background
from services.monitoring.domain import DriftPolicy, ModelReference
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_wide_models import (
    Outbox,
    ReportStore,
    logged_request,
    names,
    numeric_reference,
    wide_monitor,
)

FEATURES = 1_000
WINDOW_ROWS = 200
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def many_features() -> ModelReference:
    return numeric_reference(FEATURES, 500)


def traffic(
    rows: int, *, missing: int, start: datetime = T0, first_offset: int = 0
) -> list[tuple[PredictionsLogged, int, int]]:
    """Requests of 50 rows in which the first ``missing`` features are null (the rest as in training); the
    later of the missing ones are null in fewer rows, so the worst are the first."""
    rng = np.random.default_rng(1)
    columns = names(FEATURES)
    out = []
    for r in range(rows // 50):
        values = rng.normal(0, 1, (50, FEATURES))
        inputs = [
            {c: None if j < missing and (j < 3 or i % 4) else values[i, j] for j, c in enumerate(columns)}
            for i in range(50)
        ]
        tag = f"{start.timestamp():.0f}-{r}"
        out.append((logged_request("wide", tag, inputs, start + timedelta(seconds=r)), 0, first_offset + r))
    return out


class QualityStore(ReportStore):
    """A tick's store that also remembers when each data-quality finding was last published, and the kind of
    every alert recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.quality: dict[tuple[str, int, str, str], float] = {}
        self.alert_kinds: list[str] = []

    async def quality_last(  # type: ignore[override]
        self, model: str, version: int, feature: str, kind: str
    ) -> float | None:
        return self.quality.get((model, version, feature, kind))

    async def save_quality(self, model: str, version: int, feature: str, kind: str, at: float) -> None:
        self.quality[(model, version, feature, kind)] = at

    async def record_alert(
        self, event_id: str, model: str, version: int | None, kind: str, summary: str
    ) -> None:
        await super().record_alert(event_id, model, version, kind, summary)
        self.alert_kinds.append(kind)


def issues(outbox: Outbox) -> list[DataQualityIssue]:
    return [e.data for e in outbox.published if isinstance(e.data, DataQualityIssue)]


async def judge(
    reference: ModelReference,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    batches: list[list[tuple[PredictionsLogged, int, int]]],
    settings: MonitoringSettings | None = None,
) -> tuple[QualityStore, list[list[DataQualityIssue]]]:
    """Judge one window per batch of traffic, in order, with one store; the issues of each window."""
    settings = settings or MonitoringSettings(window_rows=WINDOW_ROWS, min_window_rows=10)
    store = QualityStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monitor = wide_monitor(reference, tmp_path, settings)
    monitor.policies["wide"] = DriftPolicy(small_sample_max=10)
    outbox = Outbox(settings.kafka.max_event_bytes)
    background = Background(outbox, monitor, tick_s=1.0)  # type: ignore[arg-type]
    per_window: list[list[DataQualityIssue]] = []
    for batch in batches:
        before = len(issues(outbox))
        # Consumed as answered: windowed by their own dates, however far ahead of the others.
        monitor.live.ingest(batch, arrival=max(p.predicted_at for p, _, _ in batch).timestamp())
        await background.once()
        per_window.append(issues(outbox)[before:])
    return store, per_window


async def test_every_feature_missing_at_once_gives_one_grouped_issue_per_window(
    many_features: ModelReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, [found] = await judge(
        many_features, tmp_path, monkeypatch, [traffic(WINDOW_ROWS, missing=FEATURES)]
    )

    [issue] = found
    assert issue.kind is DataQualityIssueKind.MISSING_VALUES
    assert issue.feature is None
    assert issue.features_total == FEATURES
    # The worst feature's count and share: f0000 to f0002 are null in every row.
    assert (issue.count, issue.share) == (WINDOW_ROWS, 1.0)
    assert issue.window is not None
    assert issue.message.startswith("1,000 features have missing values (worst: f0000 100.0%, f0001 100.0%, ")
    assert f"GET /v1/models/wide/windows/{issue.window.id}" in issue.message
    assert len(issue.message) < 1_000
    assert store.alert_kinds == ["DataQualityIssue"]
    # Nothing is dropped: the window's report keeps every feature's finding.
    [report] = store.reports.values()
    assert report["window"]["id"] == issue.window.id
    assert len({q["feature"] for q in report["quality"] if q["kind"] == "missing-values"}) == FEATURES


async def test_a_grouped_issue_keeps_its_cooldown_while_the_outage_lasts(
    many_features: ModelReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    later = T0 + timedelta(hours=1)  # past the cooldown (1,800 s)
    store, per_window = await judge(
        many_features,
        tmp_path,
        monkeypatch,
        [
            traffic(WINDOW_ROWS, missing=FEATURES),
            traffic(WINDOW_ROWS, missing=FEATURES, start=T0 + timedelta(minutes=5), first_offset=100),
            traffic(WINDOW_ROWS, missing=FEATURES, start=later, first_offset=200),
        ],
    )

    assert [len(found) for found in per_window] == [1, 0, 1]
    assert all(issue.feature is None for found in per_window for issue in found)
    assert store.alert_kinds == ["DataQualityIssue", "DataQualityIssue"]


async def test_an_issue_of_a_window_dated_years_ahead_does_not_silence_the_issues_after_it(
    many_features: ModelReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows from a serving replica whose clock ran ten years ahead: their window's issue set the cooldown's
    # start ten years ahead, and the outage after it was never reported again for ten years.
    ahead = T0 + timedelta(days=3_650)
    _, per_window = await judge(
        many_features,
        tmp_path,
        monkeypatch,
        [
            traffic(WINDOW_ROWS, missing=FEATURES, start=ahead),
            traffic(WINDOW_ROWS, missing=FEATURES, first_offset=100),
            traffic(WINDOW_ROWS, missing=FEATURES, start=T0 + timedelta(minutes=5), first_offset=200),
        ],
    )

    assert [len(found) for found in per_window] == [1, 1, 0]


async def test_up_to_the_bound_each_feature_gets_its_own_issue(
    many_features: ModelReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = MonitoringSettings(window_rows=WINDOW_ROWS, min_window_rows=10)
    bound = settings.quality_issues_per_kind
    _, [at_bound] = await judge(
        many_features, tmp_path, monkeypatch, [traffic(WINDOW_ROWS, missing=bound)], settings
    )
    _, [past_bound] = await judge(
        many_features, tmp_path, monkeypatch, [traffic(WINDOW_ROWS, missing=bound + 1)], settings
    )

    assert sorted(i.feature or "" for i in at_bound) == names(bound)
    assert all(i.features_total is None for i in at_bound)
    [grouped] = past_bound
    assert (grouped.feature, grouped.features_total) == (None, bound + 1)


def test_the_bound_is_a_setting() -> None:
    settings = MonitoringSettings(quality_issues_per_kind=3)
    assert bootstrap.make_monitor(settings, None, "/test/monitoring").quality_issues_per_kind == 3
    with pytest.raises(ValueError, match="quality_issues_per_kind"):
        MonitoringSettings(quality_issues_per_kind=0)
