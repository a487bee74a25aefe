"""A model with thousands of features: its windows are judged and its drift is reported within the event
size limit.

DriftDetected carries per-feature evidence, about 200 bytes a feature: a model with 5,000 features makes
one larger than consumers accept (``max_event_bytes``, 1,000,000). Refused by the outbox, the judgement
failed and the window was set aside, so drift was never reported for that model. The event now carries the
evidence of the most drifted features that fit, says how many were tested and drifted and that it was cut,
and the window's report keeps every feature.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from contracts.common import FeatureSpec, FeatureType, ModelSignature, Task, TrafficWindow
from contracts.envelope import CloudEvent
from contracts.monitoring import CorrectionMethod, DriftDetected, DriftTest, FeatureDrift
from contracts.predictions import PredictionOutput, PredictionRecord, PredictionsLogged, Variant
from libs.artifacts import ArtifactStore
from libs.bus import bytes_over_limit
from libs.bus.core import encode_outgoing
from libs.profiles import build_profile
from services.monitoring import bootstrap
from services.monitoring.adapters.artifacts import StoreArtifacts
from services.monitoring.bootstrap import Background, make_monitor
from services.monitoring.domain import DriftPolicy, ModelReference, cut_evidence
from services.monitoring.handlers import Monitor
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_canary_watch import WindowStore, set_aside_count
from tests.unit.monitoring.test_domain import reference, requests

FEATURES = 5_000
WINDOW_ROWS = 200
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def names(n: int) -> list[str]:
    return [f"f{i:04d}" for i in range(n)]


def numeric_reference(features: int, rows: int) -> ModelReference:
    """Model "wide" version 1: ``features`` standard normal features (``names``), profiled on ``rows``."""
    rng = np.random.default_rng(0)
    columns = names(features)
    frame = pd.DataFrame(rng.normal(0, 1, (rows, features)), columns=columns)
    profile = build_profile(
        frame, [(c, "numeric") for c in columns], predictions=pd.Series(rng.uniform(0, 1, rows))
    )
    signature = ModelSignature(
        features=[FeatureSpec(name=c, type=FeatureType.NUMERIC) for c in columns],
        target="churned",
        task=Task.CLASSIFICATION,
        classes=[0, 1],
    )
    return ModelReference.build("wide", 1, signature, {"accuracy": 0.85}, profile)


@pytest.fixture(scope="module")
def wide_reference() -> ModelReference:
    return numeric_reference(FEATURES, 1_000)


def traffic(rows: int, *, shifted: int) -> list[tuple[PredictionsLogged, int, int]]:
    """Requests of 50 rows; the first ``shifted`` features moved by three standard deviations."""
    rng = np.random.default_rng(1)
    columns = names(FEATURES)
    shift = np.where(np.arange(FEATURES) < shifted, 3.0, 0.0)
    out = []
    for r in range(rows // 50):
        values = rng.normal(0, 1, (50, FEATURES)) + shift
        inputs = [dict(zip(columns, values[i].tolist(), strict=True)) for i in range(50)]
        out.append((logged_request("wide", str(r), inputs, T0 + timedelta(seconds=r)), 0, r))
    return out


def logged_request(model: str, tag: str, inputs: Sequence[dict[str, Any]], at: datetime) -> PredictionsLogged:
    """A request of version 1's stable variant with a row per ``inputs``, each predicted 1: request id
    ``r{tag}``, prediction ids ``p-{tag}-{row}``."""
    records = [
        PredictionRecord(
            prediction_id=f"p-{tag}-{i}",
            inputs=row,
            output=PredictionOutput(prediction=1, probabilities={"0": 0.3, "1": 0.7}),
        )
        for i, row in enumerate(inputs)
    ]
    return PredictionsLogged(
        model=model,
        model_version=1,
        variant=Variant.STABLE,
        request_id=f"r{tag}",
        predicted_at=at,
        latency_ms=1.0,
        rows=records,
    )


class Outbox:
    """The runtime's transactions as on Postgres: the outbox refuses an event consumers would refuse as
    oversized (EventTooLarge), and the block's events are published (and what waits for its commit is
    called) only if it succeeds."""

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        self.published: list[CloudEvent[Any]] = []

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        pending: list[CloudEvent[Any]] = []

        async def publish(event: CloudEvent[Any]) -> None:
            encode_outgoing(event, max_bytes=self.max_event_bytes)
            pending.append(event)

        committed: list[Callable[[], None]] = []
        yield type(
            "Tx", (), {"conn": None, "publish": staticmethod(publish), "after_commit": committed.append}
        )()
        self.published += pending
        for callback in committed:
            callback()


class ReportStore(WindowStore):
    """A tick's store that keeps each window's report and the alerts' summaries."""

    def __init__(self) -> None:
        super().__init__([], failing={})
        self.reports: dict[int, dict[str, Any]] = {}
        self.alerts: list[str] = []

    async def record_window(self, model: str, version: int, seq: int, summary: Any, report: Any) -> None:
        await super().record_window(model, version, seq)
        self.reports[seq] = report

    async def record_alert(
        self, event_id: str, model: str, version: int | None, kind: str, summary: str
    ) -> None:
        self.alerts.append(summary)

    async def labelled_for(self, model: str, version: int, prediction_ids: list[str]) -> dict[str, Any]:
        return {}

    async def recent_labelled(self, model: str, limit: int) -> list[Any]:
        return []


def wide_monitor(reference: ModelReference, tmp_path: Path, settings: MonitoringSettings) -> Monitor:
    monitor = make_monitor(settings, StoreArtifacts(ArtifactStore(str(tmp_path))), "/test/monitoring")
    # Distances (the window is small) and one drifted window is enough: the first window alerts.
    monitor.policies["wide"] = DriftPolicy(small_sample_max=10, consecutive_windows=1)
    monitor.live.add_reference(reference)
    return monitor


async def test_drift_of_a_model_with_thousands_of_features_is_reported_within_the_event_limit(
    wide_reference: ModelReference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = MonitoringSettings(window_rows=WINDOW_ROWS, min_window_rows=10)
    store = ReportStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monitor = wide_monitor(wide_reference, tmp_path, settings)
    monitor.live.ingest(traffic(WINDOW_ROWS, shifted=1_000), arrival=0.0)
    outbox = Outbox(settings.kafka.max_event_bytes)
    before = set_aside_count("wide", "EventTooLarge")

    await Background(outbox, monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert set_aside_count("wide", "EventTooLarge") == before  # judged, not set aside
    [event] = [e for e in outbox.published if isinstance(e.data, DriftDetected)]
    drift: DriftDetected = event.data
    assert drift.evidence_truncated
    assert drift.features_total == FEATURES
    assert drift.drifted_features_total is not None and drift.drifted_features_total >= 1_000
    assert drift.drift_share == pytest.approx(drift.drifted_features_total / FEATURES)
    # The most drifted first: every feature moved by three standard deviations is in the evidence.
    shown = {f.feature for f in drift.features}
    assert set(names(1_000)) <= shown
    assert set(drift.drifted_features) <= shown and len(drift.features) < FEATURES
    assert [f.feature for f in drift.features] == sorted(shown)  # in the model's order
    # The window's report keeps every feature, reachable by the window id the event names.
    [report] = store.reports.values()
    assert report["window"]["id"] == drift.window.id
    assert len(report["features"]) == FEATURES
    assert len(report["debounced_features"]) == drift.drifted_features_total
    # As much evidence as fits: within a few items of the limit.
    assert bytes_over_limit(event, max_bytes=settings.kafka.max_event_bytes - 2_000) > 0
    [summary] = store.alerts
    assert summary.startswith(f"{drift.drifted_features_total} of {FEATURES} features drifted: f0000, ")
    assert summary.endswith(f" and {drift.drifted_features_total - 10} more")


async def test_drift_of_a_model_whose_evidence_fits_carries_every_feature(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = MonitoringSettings(window_rows=WINDOW_ROWS, min_window_rows=10)
    store = ReportStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monitor = wide_monitor(reference(), tmp_path, settings)
    monitor.policies["churn"] = DriftPolicy(consecutive_windows=1)
    monitor.live.ingest(requests(WINDOW_ROWS, seed=1, shift=3.0), arrival=0.0)
    outbox = Outbox(settings.kafka.max_event_bytes)

    await Background(outbox, monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    [event] = [e for e in outbox.published if isinstance(e.data, DriftDetected)]
    drift: DriftDetected = event.data
    assert not drift.evidence_truncated
    assert [f.feature for f in drift.features] == ["x0", "x1", "x2", "plan"]
    assert (drift.features_total, drift.drifted_features_total) == (4, len(drift.drifted_features))
    assert "x0" in drift.drifted_features


def evidence(
    name: str, *, drifted: bool, statistic: float = 0.0, p_value: float | None = None
) -> FeatureDrift:
    return FeatureDrift(
        feature=name,
        feature_type=FeatureType.NUMERIC,
        test=DriftTest.WASSERSTEIN if p_value is None else DriftTest.KS,
        statistic=statistic,
        p_value=p_value,
        threshold=0.1 if p_value is None else 0.05,
        drifted=drifted,
        n_current=5000,
        n_reference=10000,
    )


def test_cut_evidence_keeps_the_features_that_drifted_after_debouncing_then_the_strongest() -> None:
    alert = DriftDetected(
        model="wide",
        model_version=1,
        window=TrafficWindow(id="wide:1:000001", start=T0, end=T0, size=5000),
        reference_size=10000,
        features=[
            evidence("calm", drifted=False, statistic=0.05),
            evidence("this-window-only", drifted=True, statistic=0.5),
            evidence("just-past", drifted=True, statistic=0.11),
            evidence("far-past", drifted=True, statistic=0.3, p_value=0.001),
        ],
        drifted_features=["just-past", "far-past"],
        drift_share=0.5,
        share_threshold=0.1,
        correction=CorrectionMethod.BONFERRONI,
        alpha=0.05,
        features_total=4,
        drifted_features_total=2,
    )

    one_less = cut_evidence(alert, excess=1)
    assert [f.feature for f in one_less.features] == ["this-window-only", "just-past", "far-past"]
    debounced_only = cut_evidence(one_less, excess=1)
    assert [f.feature for f in debounced_only.features] == ["just-past", "far-past"]
    [strongest] = cut_evidence(alert, excess=10**6).features
    assert strongest.feature == "far-past"  # p-value 1/50 of α, against a distance 1.1 times its threshold
    last = cut_evidence(alert, excess=10**6)
    assert last.drifted_features == ["far-past"] and last.evidence_truncated
    assert (last.features_total, last.drifted_features_total, last.drift_share) == (4, 2, 0.5)
