"""A performance window's F1 is the F1 training put in the baseline (libs.metrics): the positive class's for
a binary model, undefined when no label and no prediction is positive, and macro F1 over the classes present
for a model of more classes. Monitoring computed 0.0 for a window with no positive label that the model got
entirely right (a rare positive class has many such windows), and the last class's F1 for a multiclass
model, compared with the baseline's macro F1: both read as degraded performance and raised
PerformanceDegraded for a model doing as well as it did in training."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import f1_score

from contracts.common import Task
from libs.artifacts import ArtifactStore
from services.monitoring.adapters.artifacts import StoreArtifacts
from services.monitoring.bootstrap import make_monitor
from services.monitoring.domain import (
    LabelledRow,
    ModelReference,
    metric_standard_errors,
    performance_metrics,
)
from services.monitoring.handlers import Tally, check_performance
from services.monitoring.ports import LabelledRecord, PerformanceState
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_domain import reference
from tests.unit.monitoring.test_labels_outside_classes import AlertStore

THREE = (0, 1, 2)


def test_a_binary_window_with_no_positive_label_or_prediction_has_no_f1() -> None:
    rows = [LabelledRow(0, 0.1, 0, False)] * 50  # every prediction right, none positive

    metrics = performance_metrics(rows, Task.CLASSIFICATION, (0, 1))

    assert metrics == {"accuracy": 1.0}  # F1 undefined, as training leaves it (was 0.0)
    assert "f1" not in metric_standard_errors(rows, Task.CLASSIFICATION, (0, 1))


def test_a_binary_window_with_positives_has_the_positive_class_f1() -> None:
    rng = np.random.default_rng(4)
    truth, pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    rows = [LabelledRow(int(p), None, int(y), False) for p, y in zip(pred, truth, strict=True)]

    metrics = performance_metrics(rows, Task.CLASSIFICATION, (0, 1))

    assert metrics["f1"] == pytest.approx(f1_score(truth, pred))
    assert metric_standard_errors(rows, Task.CLASSIFICATION, (0, 1))["f1"] > 0


def test_a_multiclass_window_has_macro_f1_over_the_classes_present() -> None:
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 2, 300)  # class 2 neither labelled nor predicted: left out, as training does
    pred = np.where(rng.random(300) < 0.8, truth, 1 - truth)
    rows = [LabelledRow(int(p), None, int(y), False) for p, y in zip(pred, truth, strict=True)]

    metrics = performance_metrics(rows, Task.CLASSIFICATION, THREE)

    assert metrics["f1"] == pytest.approx(f1_score(truth, pred, labels=[0, 1], average="macro"))


def three_classes() -> ModelReference:
    ref = reference()
    signature = ref.signature.model_copy(update={"classes": list(THREE)})
    return dataclasses.replace(ref, signature=signature, positive_class="2", baseline={"f1": 0.8})


async def judged(tmp_path: Path, ref: ModelReference, pairs: list[tuple[Any, Any]]) -> list[Any]:
    """The events check_performance publishes for one window of these (prediction, label) pairs, the window
    before it degraded too."""
    settings = MonitoringSettings(performance_window_labels=len(pairs), export_labelled_rows=0)
    monitor = make_monitor(settings, StoreArtifacts(ArtifactStore(str(tmp_path))), source="/t")
    monitor.live.add_reference(ref)
    store, published = AlertStore(), []
    store.state = PerformanceState(degraded_streak=1)
    at = datetime.now(UTC)
    for i, (prediction, label) in enumerate(pairs):
        store.labelled[f"p-{i}"] = LabelledRecord(
            f"p-{i}", ref.model, ref.version, "stable", None, at, prediction, None, label, at, False, {}
        )

    async def publish(event: Any) -> None:
        published.append(event)

    await check_performance(
        ref.model,
        ref.version,
        monitor=monitor,
        store=store,  # type: ignore[arg-type]
        publish=publish,
        tally=Tally(),
    )
    return published


async def test_a_window_a_binary_model_got_right_without_positives_is_not_degraded(tmp_path: Path) -> None:
    ref = dataclasses.replace(reference(), baseline={"accuracy": 0.85, "f1": 0.8})

    assert await judged(tmp_path, ref, [(0, 0)] * 20) == []


async def test_a_multiclass_model_as_good_as_its_baseline_is_not_degraded(tmp_path: Path) -> None:
    # Classes 0 and 1 always right, the rarer class 2 mostly mistaken for 1: macro F1 0.77 against a
    # baseline of 0.8 (within the tolerance of 0.05), while class 2's own F1 is 0.4.
    pairs = ([(0, 0)] * 20 + [(1, 1)] * 16 + [(1, 2)] * 3 + [(2, 2)]) * 10

    assert await judged(tmp_path, three_classes(), pairs) == []


async def test_a_multiclass_model_worse_than_its_baseline_is_degraded(tmp_path: Path) -> None:
    pairs = [(0, 0)] * 10 + [(1, 0)] * 10 + [(1, 1)] * 10 + [(0, 1)] * 10 + [(2, 2)] * 10 + [(0, 2)] * 10

    [event] = await judged(tmp_path, three_classes(), pairs)

    macro = f1_score([y for _, y in pairs], [p for p, _ in pairs], average="macro")
    assert event.data.metric == "f1" and event.data.value == pytest.approx(macro)  # 0.52
