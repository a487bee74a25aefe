"""A poll that fails part-way loses nothing: a value that is no number is counted, a poll that cannot be
read changes no window, and a poll read again after its commit failed counts its rows once, its label joins
still due. A label that could never be scored is refused alone, and one stored before is left out of the
metrics, not allowed to fail every label after it."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from contracts.common import Label
from contracts.envelope import CloudEvent, EventTypeRegistry, new_event
from contracts.feedback import GroundTruthReceived
from contracts.monitoring import PerformanceDegraded
from contracts.predictions import PredictionOutput, PredictionRecord, PredictionsLogged, Variant
from libs.artifacts import ArtifactStore
from libs.bus import InMemoryBus
from libs.bus.memory import MemoryTransaction
from services.monitoring import bootstrap, live
from services.monitoring.adapters.artifacts import StoreArtifacts
from services.monitoring.bootstrap import make_monitor, subscriptions
from services.monitoring.ports import LabelledRecord, PendingLabel, PerformanceState
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_domain import T0, reference, regression_reference, requests
from tests.unit.monitoring.test_domain import live as live_state


def logged(request_id: str, x0: float = 0.5, model: str = "churn") -> CloudEvent[PredictionsLogged]:
    rows = [
        {
            "prediction_id": f"{request_id}-{i}",
            "inputs": {"x0": x0, "x1": 0.1, "x2": 0.2, "plan": "basic"},
            "output": {"prediction": 1, "probabilities": {"0": 0.4, "1": 0.6}},
        }
        for i in range(3)
    ]
    payload = {
        "model": model,
        "model_version": 1,
        "variant": "stable",
        "request_id": request_id,
        "predicted_at": "2026-11-28T07:00:00Z",
        "latency_ms": 1.0,
        "rows": rows,
    }
    return new_event(PredictionsLogged.model_validate(payload), source="/serving")


def predictions_bus(settings: MonitoringSettings, monitor: Any) -> InMemoryBus:
    [sub] = [s for s in subscriptions(settings, monitor) if s.consumer.endswith("-predictions")]
    bus = InMemoryBus(EventTypeRegistry([PredictionsLogged]))
    bus.subscribe(sub)
    return bus


async def test_an_integer_beyond_a_double_is_a_type_mismatch_and_the_poll_goes_on() -> None:
    settings = MonitoringSettings()
    monitor = make_monitor(settings, artifacts=None, source="/t")
    monitor.live.add_reference(reference())
    bus = predictions_bus(settings, monitor)
    key, value, headers = logged("huge").to_kafka()
    value = value.replace(b'"x0":0.5', b'"x0":1' + b"0" * 400)

    await bus.publish(logged("good-1"))
    bus.append_raw(PredictionsLogged.topic, key, value, headers)
    await bus.publish(logged("good-2"))
    await bus.drain()

    window = monitor.live.windows[("churn", 1)]
    assert window.rows == 9
    assert bus.dead_letters == []


def test_a_poll_that_cannot_be_read_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    state = live_state(window_rows=10_000)
    state.add_reference(reference())
    poll = requests(100, seed=1)
    real = live.rows_of

    def unreadable(*args: Any) -> Any:
        raise ValueError("a request that cannot be read")

    monkeypatch.setattr(live, "rows_of", unreadable)
    with pytest.raises(ValueError, match="cannot be read"):
        state.ingest(poll, arrival=0.0)
    assert state.next_offsets == {}
    assert state.windows[("churn", 1)].rows == 0

    monkeypatch.setattr(live, "rows_of", real)
    assert state.ingest(poll, arrival=0.0).rows == 100  # read again in full, nothing taken as done


class CommitFails(InMemoryBus):
    """A bus whose next ``failures`` commits fail (Postgres away): nothing of those transactions is kept."""

    failures = 0

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[MemoryTransaction]:
        async with super()._begin() as tx:
            yield tx
            if self.failures:
                self.failures -= 1
                raise ConnectionError("connection was closed in the middle of operation")


async def test_a_poll_read_again_after_its_commit_failed_counts_its_rows_once_and_its_joins_stay_due() -> (
    None
):
    settings = MonitoringSettings()
    monitor = make_monitor(settings, artifacts=None, source="/t")
    monitor.live.add_reference(reference())
    monitor.live.pending_labels = {("good-1-0", "churn")}
    [sub] = [s for s in subscriptions(settings, monitor) if s.consumer.endswith("-predictions")]
    bus = CommitFails(EventTypeRegistry([PredictionsLogged]))
    bus.subscribe(sub)
    bus.failures = 1

    await bus.publish(logged("good-1"))
    with pytest.raises(ConnectionError):
        await bus.drain()  # the transaction fails after the rows are in memory
    await bus.drain()  # the same record again, as the consumer seeks back

    assert monitor.live.windows[("churn", 1)].rows == 3
    assert monitor.live.joins_to_make() == [("good-1-0", "churn")]  # for the background to join, once


async def test_a_waiting_label_for_another_model_is_not_looked_for() -> None:
    settings = MonitoringSettings()
    monitor = make_monitor(settings, artifacts=None, source="/t")
    monitor.live.add_reference(reference())  # model "churn"
    monitor.live.pending_labels = {("good-1-0", "fraud")}  # sent for "fraud"
    bus = predictions_bus(settings, monitor)

    await bus.publish(logged("good-1"))  # churn's prediction good-1-0 comes after fraud's label
    await bus.drain()

    assert monitor.live.joins_to_make() == []
    assert monitor.live.pending_labels == {("good-1-0", "fraud")}


class LabelStore:
    """The feedback handler's side of the store: joined labels, scored once per performance window."""

    def __init__(self) -> None:
        self.labelled: dict[str, LabelledRecord] = {}
        self.scored: set[str] = set()
        self.state = PerformanceState()

    async def add_labelled(self, rows: list[LabelledRecord]) -> list[tuple[str, str]]:
        for r in rows:
            self.labelled.setdefault(r.prediction_id, r)
        return []

    async def add_pending(self, labels: list[PendingLabel]) -> None:
        pass

    async def unscored(self, model: str, version: int, limit: int) -> list[LabelledRecord]:
        return [r for pid, r in self.labelled.items() if pid not in self.scored][:limit]

    async def mark_scored(self, model: str, version: int, ids: list[str], seq: int) -> None:
        self.scored.update(ids)

    async def performance_state(self, *_: Any) -> PerformanceState:
        return self.state

    async def save_performance_state(self, *_: Any) -> None:
        pass

    async def record_alert(self, *_: Any) -> None:
        pass


def regression_monitor(
    settings: MonitoringSettings, n: int, predictions: dict[int, float] | None = None, artifacts: Any = None
) -> Any:
    """A regression model's monitor holding predictions p-0 .. p-<n-1>: i, or ``predictions[i]``."""
    monitor = make_monitor(settings, artifacts=artifacts, source="/t")
    monitor.live.add_reference(regression_reference())
    chosen = predictions or {}
    rows = [
        PredictionRecord(
            prediction_id=f"p-{i}",
            inputs={"x0": 0.1 * i},
            output=PredictionOutput(prediction=chosen.get(i, i)),
        )
        for i in range(n)
    ]
    payload = PredictionsLogged(
        model="price",
        model_version=1,
        variant=Variant.STABLE,
        request_id="r",
        predicted_at=T0,
        latency_ms=1.0,
        rows=rows,
    )
    monitor.live.ingest([(payload, 0, 0)], arrival=0.0)
    return monitor


def feedback_bus(settings: MonitoringSettings, monitor: Any) -> InMemoryBus:
    [sub] = [s for s in subscriptions(settings, monitor) if s.consumer.endswith("-feedback")]
    bus = InMemoryBus(EventTypeRegistry([GroundTruthReceived, PerformanceDegraded]))
    bus.subscribe(sub)
    return bus


def label(prediction_id: str, value: Any) -> CloudEvent[GroundTruthReceived]:
    g = GroundTruthReceived(
        prediction_id=prediction_id, model="price", label=value, observed_at=T0 + timedelta(hours=1)
    )
    return new_event(g, source="/feedback")


async def test_a_text_label_for_a_regression_model_is_dead_lettered_with_its_reason_and_the_rest_scored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = MonitoringSettings(performance_window_labels=10, consumer_retry_backoff_s=0.001)
    monitor, store = regression_monitor(settings, 12), LabelStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    bus = feedback_bus(settings, monitor)

    for i in range(12):  # one label of the wrong type in one poll with good ones
        await bus.publish(label(f"p-{i}", "n/a" if i == 3 else i + 0.5))
    await bus.drain()

    [dead] = bus.dead_letters
    assert dead.reason == "rejected"
    assert "'n/a'" in dead.error and "'p-3'" in dead.error and "regression" in dead.error
    assert sorted(store.labelled) == sorted(f"p-{i}" for i in range(12) if i != 3)
    assert store.state.next_seq == 2  # a performance window was scored


async def test_a_label_that_is_no_number_stored_before_is_left_out_of_the_metrics_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = MonitoringSettings(performance_window_labels=10, consumer_retry_backoff_s=0.001)
    monitor, store = regression_monitor(settings, 12), LabelStore()
    # stored before such labels were refused
    store.labelled["p-0"] = LabelledRecord(
        "p-0", "price", 1, "stable", None, T0, 0, None, "n/a", T0, False, {}
    )
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    bus = feedback_bus(settings, monitor)
    before = (
        REGISTRY.get_sample_value("driftloop_monitoring_unscorable_labels_total", {"model": "price"}) or 0
    )

    for i in range(1, 12):
        await bus.publish(label(f"p-{i}", i + 0.5))
    await bus.drain()

    assert bus.dead_letters == []
    assert store.state.next_seq == 2 and "mae" in store.state.last_metrics
    after = REGISTRY.get_sample_value("driftloop_monitoring_unscorable_labels_total", {"model": "price"})
    assert after == before + 1


def unmeasurable_windows(model: str) -> float:
    labels = {"model": model}
    return (
        REGISTRY.get_sample_value("driftloop_monitoring_performance_windows_unmeasurable_total", labels)
        or 0.0
    )


async def test_a_label_beyond_float32_from_the_topic_is_dead_lettered_naming_it_and_the_rest_scored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another producer may publish to mlops.feedback directly: a label of 1e300 for a regression model is
    refused by the contract at decoding (schema-invalid, naming the label), not joined, where its window's MAE
    would have been the label's alone."""
    settings = MonitoringSettings(performance_window_labels=10, consumer_retry_backoff_s=0.001)
    monitor, store = regression_monitor(settings, 12), LabelStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    bus = feedback_bus(settings, monitor)

    for i in range(12):
        event = label(f"p-{i}", i + 0.5)
        key, value, headers = event.to_kafka()
        if i == 3:  # as a producer in another language writes it: the contract never lets one be built
            value = value.replace(b'"label":3.5', b'"label":1e300')
        bus.append_raw(event.topic, key, value, headers)
    await bus.drain()

    [dead] = bus.dead_letters
    assert dead.reason == "schema-invalid"
    assert "label: a numeric label must be within float32's range" in dead.error
    assert sorted(store.labelled) == sorted(f"p-{i}" for i in range(12) if i != 3)
    assert store.state.next_seq == 2 and store.state.last_metrics["mae"] < 1.0


class _GroundTruthBeforeTheFloat32Bound(GroundTruthReceived):
    """GroundTruthReceived as it was before 2026-12-01, when its label could be any finite number: such
    labels, joined then, are what can still make a window's errors overflow."""

    label: Label


async def test_a_performance_window_whose_errors_overflow_is_not_measurable_and_the_windows_after_it_go_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Window 2's predictions are 1e308 where the truth is -1e308 (a label from before labels beyond float32
    were refused): both finite, but their error is beyond a double, and so are its RMSE and MAE. It is scored
    without a verdict, counted, and neither breaks nor resets the run of degraded windows around it (1 and 3,
    MAE 5 against a baseline of 1)."""
    settings = MonitoringSettings(
        performance_window_labels=10, consumer_retry_backoff_s=0.001, export_labelled_rows=0
    )
    overflowing = {i: 1e308 for i in range(10, 20)}
    artifacts = StoreArtifacts(ArtifactStore(str(tmp_path)))
    monitor, store = regression_monitor(settings, 30, overflowing, artifacts), LabelStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    [sub] = [s for s in subscriptions(settings, monitor) if s.consumer.endswith("-feedback")]
    bus = InMemoryBus(EventTypeRegistry([_GroundTruthBeforeTheFloat32Bound, PerformanceDegraded]))
    bus.subscribe(dataclasses.replace(sub, batch_types=frozenset({_GroundTruthBeforeTheFloat32Bound})))
    before = unmeasurable_windows("price")

    for i in range(30):
        value = -1e308 if i in overflowing else i + 5.0
        truth = _GroundTruthBeforeTheFloat32Bound(
            prediction_id=f"p-{i}", model="price", label=value, observed_at=T0 + timedelta(hours=1)
        )
        await bus.publish(new_event(truth, source="/feedback"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await bus.drain()

    assert bus.dead_letters == []
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert store.scored == {f"p-{i}" for i in range(30)} and store.state.next_seq == 4
    assert unmeasurable_windows("price") == before + 1
    [alert] = bus.events(of=PerformanceDegraded)  # windows 1 and 3: two degraded windows in a row
    assert alert.data.window.id == "price:1:perf000003" and alert.data.metric in {"mae", "rmse"}
    assert all(math.isfinite(v) for v in store.state.last_metrics.values())


class AlertStore(LabelStore):
    """A LabelStore that keeps the summaries of the alerts it records (what ``GET /v1/status`` shows)."""

    def __init__(self) -> None:
        super().__init__()
        self.summaries: list[str] = []

    async def record_alert(
        self, event_id: str, model: str, version: int | None, kind: str, summary: str
    ) -> None:
        self.summaries.append(summary)


async def test_a_prediction_of_1e300_against_a_bounded_label_gives_its_true_mae_and_a_readable_summary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Serving refuses only non-finite outputs: a model that predicted 1e300 is logged, and its labels (within
    float32's range) join it. Such an error fits a double whatever the label, so the window is measured: its
    true MAE in the alert, and the alert's summary shows it in four digits, not its 300."""
    settings = MonitoringSettings(
        performance_window_labels=10, consumer_retry_backoff_s=0.001, export_labelled_rows=0
    )
    artifacts = StoreArtifacts(ArtifactStore(str(tmp_path)))
    monitor = regression_monitor(settings, 20, {i: 1e300 for i in range(10, 20)}, artifacts)
    store = AlertStore()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    bus = feedback_bus(settings, monitor)
    before = unmeasurable_windows("price")

    for i in range(20):
        await bus.publish(label(f"p-{i}", 3.4e38 if i == 15 else i + 5.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await bus.drain()

    assert bus.dead_letters == []
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert unmeasurable_windows("price") == before
    [alert] = bus.events(of=PerformanceDegraded)  # windows 1 (MAE 5) and 2, baseline 1
    assert alert.data.window.id == "price:1:perf000002"
    assert alert.data.value == pytest.approx(1e300)
    [summary] = store.summaries
    assert summary == f"{alert.data.metric} 1e+300 vs baseline 1.0000 over 10 labels"
