"""Holdout labels the metrics cannot take as they are: classes the candidate never saw, missing labels, text
in a numeric label column. Each is scored or left out one documented way, and the report says so."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from contracts.common import ArtifactFormat, ArtifactRef, ModelSignature, Task
from contracts.validation import ValidationFailed, ValidationPassed
from libs.artifacts import ArtifactStore, save_model
from libs.metrics import LOG_LOSS_EPS, Outputs, metric, paired_bootstrap_difference, weighted
from libs.modelspec import ModelSpec, build_pipeline, spec_from_data
from services.training.worker import signature
from services.validation.adapters.evaluator import StoreEvaluator
from services.validation.domain import Measured, judge
from services.validation.ports import Evaluation, EvaluationError
from services.validation.scoring import measure
from tests.unit.training.data import (
    churn_frame,
    churn_spec,
    churn_spec_data,
    price_spec_data,
    regression_frame,
)
from tests.unit.validation.test_handlers import Gate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --- classes the candidate never saw ---------------------------------------------------------------------


def _binary_with_unseen(rows: int = 400, unseen: int = 60) -> tuple[Outputs, np.ndarray]:
    """A binary model's outputs on rows of classes 0 and 1, plus ``unseen`` rows of a class 2 it never
    saw (encoded -1); the true labels as 0, 1, 2."""
    rng = np.random.default_rng(5)
    truth = np.concatenate([rng.integers(0, 2, rows), np.full(unseen, 2)])
    # The unseen rows look like positives to the model: leaving them out flatters its ranking.
    score = np.clip(np.where(truth == 1, 0.35, 0.0) + rng.random(truth.size) * 0.65, 0.001, 0.999)
    score[truth == 2] = np.clip(0.6 + rng.random(unseen) * 0.4, 0.001, 0.999)
    proba = np.column_stack([1 - score, score])
    encoded = np.where(truth == 2, -1, truth)
    return Outputs(Task.CLASSIFICATION, encoded, proba.argmax(axis=1), proba, (0, 1)), truth


def test_a_class_the_model_never_saw_counts_in_every_metric_as_a_class_it_gives_probability_0() -> None:
    from sklearn import metrics as skm

    out, truth = _binary_with_unseen()
    assert out.proba is not None
    # The same model with the unseen class as a third column it gives probability 0.
    proba3 = np.column_stack([out.proba, np.zeros(out.rows)])
    assert metric(out, "accuracy") == pytest.approx(skm.accuracy_score(truth, proba3.argmax(axis=1)))
    p_true = np.clip(proba3[np.arange(out.rows), truth], LOG_LOSS_EPS, 1.0)
    assert metric(out, "log_loss") == pytest.approx(float(np.mean(-np.log(p_true))))
    # f1 and roc_auc are about the positive class: a row of class 2 is a row not of class 1.
    assert metric(out, "f1") == pytest.approx(skm.f1_score(truth == 1, out.pred == 1))
    assert metric(out, "roc_auc") == pytest.approx(skm.roc_auc_score(truth == 1, out.proba[:, 1]), abs=1e-12)


def test_macro_f1_counts_a_row_of_an_unseen_class_against_the_class_predicted() -> None:
    from sklearn import metrics as skm

    rng = np.random.default_rng(6)
    truth = rng.integers(0, 4, 500)  # class 3 is unknown to a model of classes 0, 1, 2
    proba = rng.dirichlet(np.ones(3), 500)
    out = Outputs(
        Task.CLASSIFICATION, np.where(truth == 3, -1, truth), proba.argmax(axis=1), proba, (0, 1, 2)
    )
    expected = skm.f1_score(truth, out.pred, labels=[0, 1, 2], average="macro")
    assert metric(out, "f1") == pytest.approx(expected)


def test_the_bootstrap_scores_rows_of_an_unseen_class_as_the_point_estimate_does() -> None:
    out, _ = _binary_with_unseen()
    counts = np.random.default_rng(2).integers(0, 3, size=(5, out.rows)).astype(float)
    drawn = np.repeat(np.arange(out.rows), counts[0].astype(int))
    resampled = Outputs(out.task, out.y[drawn], out.pred[drawn], out.proba[drawn], out.classes)  # type: ignore[index]
    assert weighted(out, "roc_auc", counts)[0] == pytest.approx(metric(resampled, "roc_auc"), abs=1e-12)
    diff, low, high = paired_bootstrap_difference(out, out, "roc_auc", resamples=50, level=0.9, seed=3)
    assert (diff, low, high) == (0, 0, 0)


# --- missing labels and text in a numeric label column ---------------------------------------------------


@pytest.fixture(scope="module")
def churn_model() -> tuple[ModelSpec, Any, ModelSignature]:
    spec = spec_from_data(churn_spec_data(params={}))
    frame = churn_frame(400)
    model = build_pipeline(spec).fit(frame.drop(columns=["churned"]), frame["churned"])
    return spec, model, signature(spec, model, tuple(model.classes_))


def _measure(model: tuple[ModelSpec, Any, ModelSignature], holdout: pd.DataFrame) -> Measured:
    spec, candidate, sig = model
    return measure(spec.validation, candidate=candidate, signature=sig, holdout=holdout, latency_repeats=1)


def _csv(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as validation reads it back from a CSV file."""
    return pd.read_csv(io.BytesIO(frame.to_csv(index=False).encode()))


def _parquet(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as validation reads it back from a Parquet file."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return pd.read_parquet(io.BytesIO(buffer.getvalue()))


def _without_labels(holdout: pd.DataFrame, rows: slice) -> pd.DataFrame:
    """The holdout with no label on ``rows``: a nullable integer column, as the registry stores it."""
    out = holdout.astype({"churned": "Int64"})
    out.loc[rows, "churned"] = pd.NA
    return out


def _with_text_labels(holdout: pd.DataFrame, rows: slice) -> pd.DataFrame:
    out = holdout.astype({"churned": object})
    out.loc[rows, "churned"] = "unknown"
    return out


@pytest.mark.parametrize(
    ("read", "spoil"),
    [
        (_parquet, _without_labels),
        (_csv, _without_labels),
        (_csv, _with_text_labels),
    ],
    ids=["parquet-missing", "csv-missing", "csv-text"],
)
def test_holdout_rows_without_a_usable_label_are_left_out_of_every_metric_and_counted(
    churn_model: tuple[ModelSpec, Any, ModelSignature], read: Any, spoil: Any
) -> None:
    holdout = churn_frame(300, seed=1)
    labelled = _measure(churn_model, holdout.iloc[40:].reset_index(drop=True))
    spoiled = _measure(churn_model, read(spoil(holdout, slice(0, 39))))
    assert spoiled.rows == labelled.rows == 260
    assert spoiled.metrics == pytest.approx(labelled.metrics, abs=1e-12)
    assert spoiled.unlabelled_rows == 40
    spec, _, sig = churn_model
    [labels] = [
        c
        for c in judge(
            spec.validation,
            task=Task.CLASSIFICATION,
            n_classes=2,
            measured=spoiled,
            candidate=sig,
            champion_signature=None,
            champion_version=None,
        )
        if c.name == "sanity:holdout-labels"
    ]
    assert labels.passed and labels.value == 40
    assert "40 of 300 holdout rows" in labels.detail and "left out" in labels.detail


def test_the_report_names_classes_of_the_holdout_the_candidate_never_saw(
    churn_model: tuple[ModelSpec, Any, ModelSignature],
) -> None:
    holdout = churn_frame(300, seed=1)
    holdout.loc[:9, "churned"] = 2
    measured = _measure(churn_model, holdout)
    assert measured.rows == 300 and measured.unlabelled_rows == 0
    assert measured.unknown_labels == {"2": 10}
    spec, _, sig = churn_model
    checks = judge(
        spec.validation,
        task=Task.CLASSIFICATION,
        n_classes=2,
        measured=measured,
        candidate=sig,
        champion_signature=None,
        champion_version=None,
    )
    [labels] = [c for c in checks if c.name == "sanity:holdout-labels"]
    assert labels.passed and "2 (10 rows)" in labels.detail and "probability 0" in labels.detail


def _ridge() -> tuple[ModelSpec, Any, ModelSignature]:
    """A ridge regressor of price on x0..x2, fitted on 400 rows: its spec, model and signature."""
    spec = spec_from_data(price_spec_data())
    frame = regression_frame(400)
    model = build_pipeline(spec).fit(frame.drop(columns=["price"]), frame["price"])
    return spec, model, signature(spec, model, ())


def test_a_regression_holdout_with_missing_and_text_targets_scores_the_rest() -> None:
    spec, model, sig = _ridge()
    holdout = regression_frame(200, seed=1)
    labelled = measure(
        spec.validation, candidate=model, signature=sig, holdout=holdout.iloc[20:], latency_repeats=1
    )
    spoiled = holdout.astype({"price": object})
    spoiled.loc[:9, "price"] = "unknown"
    spoiled.loc[10:19, "price"] = None
    measured = measure(
        spec.validation, candidate=model, signature=sig, holdout=_csv(spoiled), latency_repeats=1
    )
    assert (measured.rows, measured.unlabelled_rows) == (180, 20)
    assert measured.metrics == pytest.approx(labelled.metrics, rel=1e-12)


@pytest.mark.parametrize("as_text", [False, True], ids=["numbers", "text"])
def test_regression_labels_beyond_float32s_range_are_left_out_as_no_target(as_text: bool) -> None:
    # Training refuses such a target; in a holdout it made rmse overflow to infinity, and the rmse threshold
    # failed as "undefined on this holdout" (r2 too), whatever the candidate.
    spec, model, sig = _ridge()
    holdout = regression_frame(200, seed=1)
    labelled = measure(
        spec.validation, candidate=model, signature=sig, holdout=holdout.iloc[3:], latency_repeats=1
    )
    spoiled = holdout.copy()
    spoiled.loc[:2, "price"] = [1e200, -1e200, 4e38]
    if as_text:
        spoiled["price"] = spoiled["price"].map(repr)  # a column of text, read value by value
    measured = measure(spec.validation, candidate=model, signature=sig, holdout=spoiled, latency_repeats=1)
    assert (measured.rows, measured.unlabelled_rows) == (197, 3)
    assert measured.metrics == pytest.approx(labelled.metrics, rel=1e-12)
    assert set(measured.metrics) == {"rmse", "mae", "r2"}


@pytest.mark.parametrize(
    ("rows", "judged"), [([7], False), ([7, 7, 7], False), ([7, 8], True)], ids=["one", "alike", "two"]
)
def test_a_holdout_whose_inputs_do_not_vary_leaves_not_constant_unjudged(
    rows: list[int], judged: bool
) -> None:
    # A one-row holdout failed sanity:not-constant whatever the model: one input gives one output.
    spec, model, sig = _ridge()
    holdout = regression_frame(20, seed=1).iloc[rows].reset_index(drop=True)
    measured = measure(spec.validation, candidate=model, signature=sig, holdout=holdout, latency_repeats=1)
    checks = judge(
        spec.validation,
        task=Task.REGRESSION,
        n_classes=None,
        measured=measured,
        candidate=sig,
        champion_signature=None,
        champion_version=None,
    )
    varied = next(c for c in checks if c.name == "sanity:not-constant")
    assert varied.passed
    assert (varied.threshold is not None) is judged
    assert varied.detail.startswith("reported, not judged") is not judged


def _store_holdout(store: ArtifactStore, frame: pd.DataFrame) -> ArtifactRef:
    stored = store.put(frame.to_csv(index=False).encode())
    return ArtifactRef(key=stored.sha256, uri=stored.uri, format=ArtifactFormat.CSV, size_bytes=stored.size)


async def test_a_label_column_with_no_usable_label_fails_the_holdout_labelled_check(
    tmp_path: Path, churn_model: tuple[ModelSpec, Any, ModelSignature]
) -> None:
    spec, model, sig = churn_model
    store = ArtifactStore(str(tmp_path))
    stored = save_model(store, model)
    holdout = churn_frame(50, seed=1).astype({"churned": object})
    holdout["churned"] = ["yes", "no"] * 25
    evaluation = Evaluation(
        candidate=ArtifactRef(
            key=stored.sha256, uri=stored.uri, format=ArtifactFormat.SKOPS, size_bytes=stored.size
        ),
        signature=sig,
        holdout=_store_holdout(store, holdout),
        spec=spec.validation,
        seed=0,
    )
    with pytest.raises(EvaluationError) as caught:
        await StoreEvaluator(store, latency_repeats=1).measure(evaluation)
    assert caught.value.check == "holdout-labelled"
    assert "'churned'" in caught.value.message and "'yes'" in caught.value.message


async def test_a_model_of_a_boolean_target_with_a_gap_validates_on_its_holdouts_booleans(
    tmp_path: Path,
) -> None:
    # The registry keeps a boolean column with a gap as nullable booleans: the model was trained with the
    # classes 0.0 and 1.0, and its own holdout's True and False were "not a number" to validation.
    frame = churn_frame(1200)
    frame["churned"] = frame["churned"].astype(bool).astype("boolean")
    frame.loc[[3, 8], "churned"] = None
    gate = Gate(tmp_path)
    registered = gate.train(churn_spec(), 1, frame)
    assert registered.signature.classes == [False, True]
    await gate.register(registered)
    assert gate.bus.events(of=ValidationFailed) == []
    [passed] = gate.bus.events(of=ValidationPassed)
    labels = {c.name: c for c in passed.data.checks}["sanity:holdout-labels"]
    assert labels.detail.startswith("all ") and labels.detail.endswith(" holdout rows have a usable label")
