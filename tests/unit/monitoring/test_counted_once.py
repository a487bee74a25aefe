"""Monitoring's counters count once per committed effect. The bus replays a poll whose transaction failed one
event per transaction (its handler runs again for every label in it), and a tick decides again a step whose
transaction failed: counted as the handler ran, a label in a failed poll was counted once per run, and a
verdict's unscorable rows once per failed tick. They are counted when the transaction commits."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from contracts.envelope import new_event
from contracts.feedback import GroundTruthReceived
from contracts.monitoring import DriftDetected
from libs.artifacts import ArtifactStore
from services.monitoring import bootstrap
from services.monitoring.adapters.artifacts import StoreArtifacts
from services.monitoring.bootstrap import Background, make_monitor, subscriptions
from services.monitoring.domain import DriftPolicy
from services.monitoring.ports import StoredStep
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_canary_watch import Runtime, Store, monitor_watching, watched
from tests.unit.monitoring.test_domain import T0, reference, regression_reference, requests
from tests.unit.monitoring.test_pending_labels import (
    Tables,
    TablesBus,
    consume_prediction,
    corrections,
    send_label,
)
from tests.unit.monitoring.test_wide_models import ReportStore


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def outside_classes(version: int = 1) -> float:
    return sample("driftloop_monitoring_labels_outside_classes_total", model="churn", version=str(version))


async def test_labels_in_a_poll_replayed_after_a_failure_are_counted_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/t")
    monitor.live.add_reference(reference())
    tables = Tables()
    await consume_prediction(monitor, tables, "good-1", offset=0)
    await consume_prediction(monitor, tables, "good-2", offset=1)
    await consume_prediction(monitor, tables, "bad-1", offset=2)
    await send_label(monitor, tables, "good-1-0", "churn", 0)
    tables.refused = {"bad-1-0"}  # storing this label's join fails for good: the poll fails
    settings = MonitoringSettings(consumer_retry_backoff_s=0.001)
    [feedback] = [s for s in subscriptions(settings, monitor) if s.consumer.endswith("-feedback")]
    bus = TablesBus(tables)
    bus.subscribe(feedback)
    corrected, outside = corrections("churn"), outside_classes()

    # One poll: a correction, a label naming no class of the model, and the label that fails it. The poll's
    # transaction fails as the handler stores its joins (the labels outside the classes were counted); the
    # bus replays it one label at a time.
    for prediction_id, label in (("good-1-0", 1), ("good-2-0", "yes"), ("bad-1-0", 1)):
        g = GroundTruthReceived(
            prediction_id=prediction_id, model="churn", label=label, observed_at=datetime.now(UTC)
        )
        await bus.publish(new_event(g, source="/feedback"))
    await bus.drain()

    [dead] = bus.dead_letters
    assert dead.reason == "handler-failed"
    assert tables.labelled[("good-1-0", "churn", 1)].label == 1
    assert tables.labelled[("good-2-0", "churn", 1)].label == "yes"
    assert corrections("churn") == corrected + 1
    assert outside_classes() == outside + 1


async def test_a_verdicts_unscorable_rows_are_counted_once_though_its_first_tick_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Labelled(Store):
        async def labelled_outcomes(
            self, model: str, version: int, since: datetime, *, rollout_id: str | None
        ) -> list[Any]:
            # One label of each side is no number (stored before such labels were refused).
            return [(1.0, "n/a", None)] + [(1.0, 1.0 + 0.01 * i, None) for i in range(150)]

    step: StoredStep = dataclasses.replace(watched(started_at=0.0), min_samples=10)
    store = Labelled([step])
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monkeypatch.setattr("time.time", lambda: 60.0)  # past the bake time, not the timeout
    monitor = monitor_watching(step)
    monitor.live.add_reference(regression_reference("churn", 2))
    monitor.live.steps["r-1"].canary.rows = 500
    rt = Runtime()
    background = Background(rt, monitor, tick_s=1.0)  # type: ignore[arg-type]
    before = sample("driftloop_monitoring_unscorable_labels_total", model="churn")
    verdicts = {v: verdict_count(v) for v in ("healthy", "unhealthy", "inconclusive")}

    rt.commit_fails = True  # the verdict's transaction fails (Postgres away): decided again next tick
    with pytest.raises(ConnectionError):
        await background.once()
    store.decided.clear()  # rolled back with it
    rt.commit_fails = False
    await background.once()

    [verdict] = rt.published
    assert verdict.data.step_index == 0
    assert sample("driftloop_monitoring_unscorable_labels_total", model="churn") == before + 2  # one a side
    # The verdict is counted once, by its own verdict, though the step was decided twice.
    assert {v: verdict_count(v) - n for v, n in verdicts.items()} == {
        v: float(v == verdict.data.verdict.value) for v in verdicts
    }


def verdict_count(verdict: str) -> float:
    return sample("driftloop_monitoring_canary_verdicts_total", model="churn", verdict=verdict)


def drift_alerts() -> float:
    return sample("driftloop_monitoring_alerts_raised_total", model="churn", kind="DriftDetected")


def judged(outcome: str) -> float:
    return sample("driftloop_monitoring_windows_judged_total", model="churn", outcome=outcome)


async def test_windows_judged_and_their_alerts_are_counted_once_though_the_first_tick_failed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store = ReportStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monitor = make_monitor(
        MonitoringSettings(window_rows=200, min_window_rows=10),
        StoreArtifacts(ArtifactStore(str(tmp_path))),
        "/test/monitoring",
    )
    monitor.policies["churn"] = DriftPolicy(consecutive_windows=1)
    monitor.live.add_reference(reference())
    # Two windows: x0 moved by three standard deviations in the first (it alerts), as trained in the second.
    shifted = requests(200, seed=1, shift=3.0)
    after = [(e, p, o + len(shifted)) for e, p, o in requests(200, seed=2, start=T0 + timedelta(minutes=5))]
    monitor.live.ingest(shifted + after, arrival=0.0)
    outcomes = {o: judged(o) for o in ("alerted", "held-back", "no-drift")}
    alerts = drift_alerts()
    rt = Runtime()
    background = Background(rt, monitor, tick_s=1.0)  # type: ignore[arg-type]

    rt.commit_fails = True  # the first window's transaction fails (Postgres away): judged again next tick
    with pytest.raises(ConnectionError):
        await background.once()
    rt.commit_fails = False
    await background.once()

    assert not monitor.live.closed
    assert len([e for e in rt.published if isinstance(e.data, DriftDetected)]) == 1
    assert {o: judged(o) - n for o, n in outcomes.items()} == {"alerted": 1, "held-back": 0, "no-drift": 1}
    assert drift_alerts() == alerts + 1
