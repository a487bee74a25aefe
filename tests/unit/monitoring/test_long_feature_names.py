"""A feature whose name alone takes much of the event size limit: drift and data quality are still reported
when they can be.

A feature's evidence in DriftDetected is a fixed set of numbers plus its name, twice (in ``features`` and in
``drifted_features``); nothing else in it grows with the input (the histograms are only in the window's
report). Feature names have no length limit of their own: a name that fits once in the model's
ModelVersionRegistered may not fit twice in a DriftDetected. Cutting the evidence kept the most drifted
debounced feature, and stopped there: when that one's name was too long, the event was refused and the
window set aside, though another drifted feature's evidence would have fitted. And a DataQualityIssue quoted
the name in its message as well as in ``feature``, up to three times in all, so a window with such a feature
missing was set aside too.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from contracts.common import FeatureSpec, FeatureType, ModelSignature, Task
from contracts.monitoring import DataQualityIssue, DriftDetected
from contracts.predictions import PredictionsLogged
from libs.bus import EventTooLarge, bytes_over_limit
from libs.profiles import build_profile
from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background
from services.monitoring.domain import DriftPolicy, ModelReference
from services.monitoring.handlers import Monitor, Tally, judge_closed_window
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_canary_watch import set_aside_count
from tests.unit.monitoring.test_wide_models import Outbox, ReportStore, logged_request, wide_monitor

LIMIT = 20_000
"""What consumers accept in these tests (``max_event_bytes``): the name below fits once, not twice."""
LONG = "q" * 12_000
WINDOW_ROWS = 200
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def long_named() -> ModelReference:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(0, 1, 1_000), LONG: rng.normal(0, 1, 1_000)})
    profile = build_profile(
        frame, [("x", "numeric"), (LONG, "numeric")], predictions=pd.Series(rng.uniform(0, 1, 1_000))
    )
    signature = ModelSignature(
        features=[
            FeatureSpec(name="x", type=FeatureType.NUMERIC),
            FeatureSpec(name=LONG, type=FeatureType.NUMERIC),
        ],
        target="churned",
        task=Task.CLASSIFICATION,
        classes=[0, 1],
    )
    return ModelReference.build("long", 1, signature, {"accuracy": 0.85}, profile)


def traffic(*, x_shift: float, long_shift: float | None) -> list[tuple[PredictionsLogged, int, int]]:
    """Requests of 50 rows with both features shifted by so many standard deviations (None: missing)."""
    rng = np.random.default_rng(1)
    out = []
    for r in range(WINDOW_ROWS // 50):
        inputs = [
            {
                "x": float(rng.normal(x_shift, 1)),
                LONG: None if long_shift is None else float(rng.normal(long_shift, 1)),
            }
            for _ in range(50)
        ]
        out.append((logged_request("long", str(r), inputs, T0 + timedelta(seconds=r)), 0, r))
    return out


def monitor_for(reference: ModelReference, tmp_path: Path) -> Monitor:
    monitor = wide_monitor(
        reference, tmp_path, MonitoringSettings(window_rows=WINDOW_ROWS, min_window_rows=10)
    )
    # Distances (the window is small), and x drifts only when shifted, not by chance.
    monitor.policies["long"] = DriftPolicy(
        small_sample_max=10, consecutive_windows=1, feature_thresholds={"x": 0.8}
    )
    monitor.max_event_bytes = LIMIT
    return monitor


async def test_drift_is_reported_with_the_evidence_that_fits_when_the_strongest_name_is_too_long(
    long_named: ModelReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ReportStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monitor = monitor_for(long_named, tmp_path)
    monitor.live.ingest(traffic(x_shift=3.0, long_shift=6.0), arrival=0.0)
    outbox = Outbox(LIMIT)
    before = set_aside_count("long", "EventTooLarge")

    await Background(outbox, monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert set_aside_count("long", "EventTooLarge") == before  # judged, not set aside
    [event] = [e for e in outbox.published if isinstance(e.data, DriftDetected)]
    drift: DriftDetected = event.data
    assert bytes_over_limit(event, max_bytes=LIMIT) == 0
    assert drift.evidence_truncated
    assert [f.feature for f in drift.features] == ["x"]
    assert drift.drifted_features == ["x"]
    assert (drift.features_total, drift.drifted_features_total) == (2, 2)
    # The window's report keeps the feature left out.
    [report] = store.reports.values()
    assert [f["feature"] for f in report["features"]] == ["x", LONG]


async def test_a_window_whose_only_drifted_feature_cannot_be_announced_is_set_aside_saying_why(
    long_named: ModelReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ReportStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monitor = monitor_for(long_named, tmp_path)
    monitor.live.ingest(traffic(x_shift=0.0, long_shift=6.0), arrival=0.0)
    [window] = monitor.live.closed

    async with Outbox(LIMIT).begin() as tx:
        with pytest.raises(EventTooLarge, match=r"the name of feature 'qqqq\S*' takes 12,000 bytes"):
            await judge_closed_window(window, monitor=monitor, store=store, publish=tx.publish, tally=Tally())  # type: ignore[arg-type]

    # In the service: the window is set aside (counted, logged), and the windows after it go on.
    outbox = Outbox(LIMIT)
    before = set_aside_count("long", "EventTooLarge")
    await Background(outbox, monitor, tick_s=1.0).once()  # type: ignore[arg-type]
    assert set_aside_count("long", "EventTooLarge") == before + 1
    assert not monitor.live.closed
    assert not [e for e in outbox.published if isinstance(e.data, DriftDetected)]


async def test_a_missing_feature_with_a_long_name_gets_its_issue(
    long_named: ModelReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ReportStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monitor = monitor_for(long_named, tmp_path)
    monitor.live.ingest(traffic(x_shift=0.0, long_shift=None), arrival=0.0)
    outbox = Outbox(LIMIT)
    before = set_aside_count("long", "EventTooLarge")

    await Background(outbox, monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert set_aside_count("long", "EventTooLarge") == before
    [issue] = [e.data for e in outbox.published if isinstance(e.data, DataQualityIssue)]
    assert issue.feature == LONG  # whole: it is what the issue is about
    assert issue.message.startswith("100.0% of qqqq")
    assert len(issue.message) < 500  # the name shortened where people read it
