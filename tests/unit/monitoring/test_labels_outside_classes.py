"""A classifier's label that names none of the version's classes ("yes"/"no" for the classes 0 and 1: an
encoding mistake, or a class the model never learned) is joined and counted as a wrong prediction, as
before; it is no longer silent: the joined row is marked (/v1/status counts them per model version), the
labels are counted per model version, and a warning names the model, a label and the classes, at most once a
minute per version. A canary verdict judged on mostly such labels says so in its reason, and so does a
PerformanceDegraded (its count of them, the alert's summary and the log line)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.monitoring import Verdict
from libs.artifacts import ArtifactStore
from services.monitoring import bootstrap
from services.monitoring.adapters.artifacts import StoreArtifacts
from services.monitoring.bootstrap import Background, make_monitor
from services.monitoring.handlers import Monitor, Tally, check_canary, check_performance
from services.monitoring.ports import LabelledRecord, PerformanceState
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_canary_watch import Store, monitor_watching, watched
from tests.unit.monitoring.test_domain import reference
from tests.unit.monitoring.test_ingest_failures import LabelStore
from tests.unit.monitoring.test_pending_labels import NOW, Runtime, Tables, consume_prediction, send_label


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> Monitor:
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    monkeypatch.setattr("time.time", lambda: NOW)
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/t")
    monitor.live.add_reference(reference())  # churn version 1, classes 0 and 1
    monitor.clock = Clock()
    return monitor


def outside_total() -> float:
    return (
        REGISTRY.get_sample_value(
            "driftloop_monitoring_labels_outside_classes_total", {"model": "churn", "version": "1"}
        )
        or 0.0
    )


def warnings_of(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["log_level"] == "warning" and "no class" in e["event"]]


async def test_labels_outside_the_classes_are_joined_marked_counted_and_warned_about_once_a_minute(
    monitor: Monitor,
) -> None:
    tables, before = Tables(), outside_total()
    await consume_prediction(monitor, tables, "good-1")  # predictions good-1-0, -1, -2 of class 1
    await send_label(monitor, tables, "good-2-0", "churn", "maybe")  # waits for its prediction

    with capture_logs() as logs:
        await send_label(monitor, tables, "good-1-0", "churn", "yes")
        await send_label(monitor, tables, "good-1-1", "churn", "no")
        await send_label(monitor, tables, "good-1-2", "churn", 1.0)  # the class 1
        monitor.clock.now += 61  # type: ignore[attr-defined]
        await consume_prediction(monitor, tables, "good-2", offset=1)
        await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    marked = {row.prediction_id: row.outside_classes for row in tables.labelled.values()}
    assert marked == {"good-1-0": True, "good-1-1": True, "good-1-2": False, "good-2-0": True}
    assert {row.prediction_id: row.label for row in tables.labelled.values() if row.outside_classes} == {
        "good-1-0": "yes",
        "good-1-1": "no",
        "good-2-0": "maybe",
    }
    assert outside_total() == before + 3
    first, second = warnings_of(logs)  # "no" came within the minute of "yes": no warning of its own
    assert (first["model"], first["version"], first["label"], first["classes"]) == (
        "churn",
        1,
        "'yes'",
        "0, 1",
    )
    assert second["label"] == "'maybe'"


async def test_a_correction_to_a_class_is_no_longer_outside_the_classes(monitor: Monitor) -> None:
    tables = Tables()
    await consume_prediction(monitor, tables, "good-1")
    await send_label(monitor, tables, "good-1-0", "churn", "yes")
    await send_label(monitor, tables, "good-1-0", "churn", 1)  # the label corrected
    assert tables.labelled[("good-1-0", "churn", 1)].outside_classes is False


async def test_a_canary_judged_on_labels_mostly_outside_the_classes_says_so_in_its_verdict() -> None:
    class Labelled(Store):
        async def labelled_outcomes(
            self, model: str, version: int, since: datetime, *, rollout_id: str | None
        ) -> list[Any]:
            # Stable's labels name the classes; the canary's came as "yes"/"no" (a feed encoded otherwise).
            if version == 2:
                return [(i % 2, "yes" if i % 2 else "no", None) for i in range(150)]
            return [(i % 2, i % 2, None) for i in range(150)]

    step = watched(started_at=0.0)
    monitor, store, published = monitor_watching(step), Labelled([step]), []
    monitor.live.add_reference(reference())
    monitor.live.add_reference(dataclasses.replace(reference(), version=2))
    monitor.live.steps["r-1"].canary.rows = 500

    async def publish(event: Any) -> None:
        published.append(event)

    await check_canary(
        monitor.live.steps["r-1"],
        60.0,
        monitor=monitor,
        store=store,  # type: ignore[arg-type]
        publish=publish,
        tally=Tally(),
    )

    [event] = published
    assert event.data.verdict is Verdict.UNHEALTHY
    assert "most labels name no class of the model (canary 150 of 150 labelled rows" in event.data.reason
    assert "check the labels' encoding" in event.data.reason


async def test_a_performance_alert_on_labels_mostly_outside_the_classes_says_so(tmp_path: Path) -> None:
    # A feed of "yes"/"no" for the classes 0 and 1 reads as accuracy near 0: PerformanceDegraded said only
    # that accuracy fell, which sends people retraining a model whose labels are encoded otherwise.
    settings = MonitoringSettings(performance_window_labels=10, export_labelled_rows=0)
    monitor = make_monitor(settings, StoreArtifacts(ArtifactStore(str(tmp_path))), source="/t")
    monitor.live.add_reference(reference())  # churn version 1, classes 0 and 1, accuracy 0.85
    store, published = AlertStore(), []
    store.state = PerformanceState(degraded_streak=1)  # the window before was degraded too
    at = datetime.now(UTC)
    for i in range(10):
        label = 1 if i < 2 else "yes"
        store.labelled[f"p-{i}"] = LabelledRecord(
            f"p-{i}", "churn", 1, "stable", None, at, 1, 0.7, label, at, False, {}
        )

    async def publish(event: Any) -> None:
        published.append(event)

    with capture_logs() as logs:
        await check_performance("churn", 1, monitor=monitor, store=store, publish=publish, tally=Tally())  # type: ignore[arg-type]

    [event] = published
    assert event.data.metric == "accuracy" and event.data.labels_outside_classes == 8
    note = (
        "most labels name no class of the model (8 of 10 labelled rows; classes 0, 1) and count as wrong "
        "predictions: check the labels' encoding"
    )
    [summary] = store.alerts
    assert summary.endswith(f"over 10 labels; {note}")
    [line] = [e for e in logs if e["event"] == "performance degraded"]
    assert line["labels_outside_classes"] == 8 and line["note"] == note


async def test_a_performance_alert_on_labels_of_the_classes_says_nothing_of_them(tmp_path: Path) -> None:
    settings = MonitoringSettings(performance_window_labels=10, export_labelled_rows=0)
    monitor = make_monitor(settings, StoreArtifacts(ArtifactStore(str(tmp_path))), source="/t")
    monitor.live.add_reference(reference())
    store, published = AlertStore(), []
    store.state = PerformanceState(degraded_streak=1)
    at = datetime.now(UTC)
    for i in range(10):  # wrong predictions, but of the classes (4 of them outside: not most)
        label = 0 if i < 6 else "yes"
        store.labelled[f"p-{i}"] = LabelledRecord(
            f"p-{i}", "churn", 1, "stable", None, at, 1, 0.7, label, at, False, {}
        )

    async def publish(event: Any) -> None:
        published.append(event)

    await check_performance("churn", 1, monitor=monitor, store=store, publish=publish, tally=Tally())  # type: ignore[arg-type]

    [event] = published
    assert event.data.labels_outside_classes == 4
    [summary] = store.alerts
    assert summary.endswith("over 10 labels")


class AlertStore(LabelStore):
    """The feedback handler's side of the store, keeping the alerts' summaries."""

    def __init__(self) -> None:
        super().__init__()
        self.alerts: list[str] = []

    async def record_alert(self, *args: Any) -> None:
        self.alerts.append(args[-1])
