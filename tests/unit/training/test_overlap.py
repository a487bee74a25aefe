"""The work a run does beside its fit (second thread): the same outcome as step by step, and a failure
there fails the run with its reason and leaves no thread behind."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from contracts.common import Task
from contracts.training import FailureReason
from libs.artifacts import ArtifactStore, dump_model, load_model
from libs.metrics import Outputs, all_metrics, model_outputs
from libs.modelspec import build_pipeline, load_canonical
from libs.profiles import build_profile, encode_features, profile_categorical
from services.training import worker
from services.training.worker import (
    PROFILE_MIN_WINDOW_ROWS,
    SPLIT_SCORING_ROWS,
    UNWRITTEN,
    WEIGHT_COLUMN,
    Beside,
    HalvesBeside,
    assemble_training_set,
    holdout_mask,
    labelled_traffic,
    prediction_profile,
    run_training,
    scorer,
    split,
)
from tests.unit.training.data import churn_frame, churn_spec, put_frame, traffic_window


def _beside_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("training-beside")]


def _job(
    store: ArtifactStore, url: str, base: pd.DataFrame, window: pd.DataFrame | None, **spec: Any
) -> dict[str, Any]:
    model_spec = churn_spec(estimator="hist_gradient_boosting", params={"max_iter": 20}, **spec)
    return {
        "job_id": "job-overlap",
        "model": model_spec.name,
        "spec_key": store.put(model_spec.canonical_json()).sha256,
        "datasets": [{"name": "churn-base", "version": 1, "sha256": put_frame(store, base).key}],
        "window_key": put_frame(store, window).key if window is not None else None,
        "artifacts_url": url,
        "store_retry_backoff_s": 0,  # a store that fails is still tried again, without the waits
    }


def _profile_without_time(store: ArtifactStore, key: str) -> dict[str, Any]:
    profile: dict[str, Any] = orjson.loads(store.get(key))
    profile.pop("created_at")
    return profile


@pytest.mark.parametrize("scored_in_halves", [False, True])
@pytest.mark.parametrize("window_rows", [0, PROFILE_MIN_WINDOW_ROWS])
def test_a_run_with_work_beside_the_fit_gives_what_a_run_step_by_step_gives(
    tmp_path: Path, window_rows: int, scored_in_halves: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if scored_in_halves:  # this holdout (600 rows) is scored in two halves at once, as long ones are
        monkeypatch.setattr(worker, "SPLIT_SCORING_ROWS", 2)
    store, url = ArtifactStore(str(tmp_path)), str(tmp_path)
    window = None
    if window_rows:
        # A window the profile describes, and traffic that makes a training-set file of its own.
        window = traffic_window(churn_frame(window_rows, seed=2, shift=1.0), "churned", labelled_share=0.5)
    job = _job(store, url, churn_frame(3000, seed=1), window)
    stepwise = run_training(job, overlap=False)
    overlapped = run_training(job, overlap=True)
    assert stepwise["ok"] and overlapped["ok"], (stepwise, overlapped)
    # The model file too: the same fitted model gives the same skops file byte for byte.
    for field in (
        "artifact",
        "metrics",
        "holdout",
        "training_set",
        "signature",
        "params",
        "train_rows",
        "traffic_rows",
    ):
        assert overlapped[field] == stepwise[field], field
    assert (overlapped["training_set"] is None) == (window is None)
    assert _profile_without_time(store, overlapped["profile"]["key"]) == _profile_without_time(
        store, stepwise["profile"]["key"]
    )
    assert overlapped["seconds"]["beside"] > 0
    assert not _beside_threads()


@pytest.mark.parametrize("overlap", [True, False])
def test_a_store_that_cannot_write_keeps_the_runs_files_for_the_runner_and_leaves_no_thread(
    tmp_path: Path, overlap: bool
) -> None:
    store, url = ArtifactStore(str(tmp_path)), str(tmp_path)
    job = _job(store, url, churn_frame(2000, seed=1), None)
    # The spec and the base file can still be read; every write (the holdout's first, beside the fit)
    # fails because the store's staging folder is now a file: the files are handed to the runner, which
    # writes them once the store takes them, rather than the run failing after its fit.
    shutil.rmtree(tmp_path / "tmp")
    (tmp_path / "tmp").write_bytes(b"not a folder")
    outcome = run_training(job, overlap=overlap)
    assert outcome["ok"] is True
    keys = {hashlib.sha256(data).hexdigest() for data in outcome[UNWRITTEN]}
    files = {outcome["artifact"]["key"], outcome["holdout"]["artifact"]["key"], outcome["profile"]["key"]}
    assert files <= keys
    assert not _beside_threads()


def test_a_fit_that_fails_while_work_runs_beside_it_fails_with_the_fit_error_and_leaves_no_thread(
    tmp_path: Path,
) -> None:
    store, url = ArtifactStore(str(tmp_path)), str(tmp_path)
    job = _job(store, url, churn_frame(2000, seed=1), None)
    # Early stopping's validation split leaves the estimator no row to fit on: it fails once the
    # preprocessing is fitted and the holdout's features are being transformed beside it. (Text in a numeric
    # feature, used here before, is now refused before the fit.)
    unfittable = churn_spec(
        estimator="hist_gradient_boosting",
        params={"max_iter": 20, "early_stopping": True, "validation_fraction": 0.9999},
    )
    job["spec_key"] = store.put(unfittable.canonical_json()).sha256
    outcome = run_training(job, overlap=True)
    assert outcome["ok"] is False
    assert outcome["reason"] == FailureReason.FIT_ERROR.value
    assert "could not be fitted" in outcome["message"]
    assert not _beside_threads()


def test_beside_hands_back_the_error_of_its_thread_and_waits_for_started_work_on_leaving() -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def slow() -> str:
        started.set()
        release.wait(timeout=10)
        finished.append("slow")
        return "slow"

    def broken() -> None:
        raise ValueError("the profile could not be built")

    with pytest.raises(RuntimeError, match="the fit failed"), Beside(overlap=True) as beside:
        failed = beside.submit(broken)
        with pytest.raises(ValueError, match="could not be built"):
            failed.result(timeout=10)
        running = beside.submit(slow)
        queued = beside.submit(finished.append, "queued")
        # The slow work ends only once leaving the block has cancelled the queued work.
        queued.add_done_callback(lambda _: release.set())
        assert started.wait(timeout=10)
        raise RuntimeError("the fit failed")
    assert queued.cancelled()
    assert running.done() and running.result(timeout=0) == "slow"
    assert finished == ["slow"]
    assert not _beside_threads()


def test_beside_without_overlap_runs_at_once_and_keeps_the_error_for_result() -> None:
    with Beside(overlap=False) as beside:
        done = beside.submit(lambda: threading.current_thread().name)
        failed = beside.submit(lambda: 1 // 0)
        assert done.result(timeout=0) == threading.current_thread().name
        with pytest.raises(ZeroDivisionError):
            failed.result(timeout=0)


def test_the_split_is_seeded_stratified_and_keeps_the_row_order() -> None:
    spec = churn_spec()
    frame = churn_frame(1001).assign(row=np.arange(1001))
    train_rows, holdout_rows = split(spec, frame)
    assert len(holdout_rows) == 201 and len(train_rows) == 800
    assert train_rows["row"].is_monotonic_increasing and holdout_rows["row"].is_monotonic_increasing
    assert sorted([*train_rows["row"], *holdout_rows["row"]]) == list(range(1001))
    other_seed = split(spec.model_copy(update={"seed": spec.seed + 1}), frame)[1]
    assert set(other_seed["row"]) != set(holdout_rows["row"])


def test_each_class_gives_its_share_of_the_holdout_and_the_largest_remainders_the_rest() -> None:
    labels = np.repeat([0, 1, 2], [3, 500, 497])
    held = holdout_mask(1000, 0.2, seed=5, labels=labels)
    assert held.sum() == 200
    assert np.bincount(labels[held], minlength=3).tolist() == [1, 100, 99]  # 0.6, 100, 99.4 rows
    two = holdout_mask(4, 0.5, seed=1, labels=np.array([0, 0, 1, 1]))
    assert np.bincount(np.array([0, 0, 1, 1])[two]).tolist() == [1, 1]
    assert holdout_mask(7, 0.2, seed=3).sum() == 2
    assert (holdout_mask(7, 0.2, seed=3) == holdout_mask(7, 0.2, seed=3)).all()


@pytest.mark.parametrize("classes", [(0, 1, 2), ("basic", "plus", "premium"), (False, True)])
def test_the_prediction_profile_counts_classes_as_the_categorical_profile_counts_their_text(
    classes: tuple[Any, ...],
) -> None:
    spec = churn_spec()
    predicted = np.random.default_rng(4).integers(0, len(classes) - 1, 500)  # the last class never predicted
    outputs = Outputs(Task.CLASSIFICATION, predicted, predicted, np.zeros((500, len(classes))), classes)
    rows = pd.DataFrame({"x0": np.zeros(500)})
    assert prediction_profile(spec, None, rows, rows, outputs) == profile_categorical(
        "prediction", pd.Series([classes[i] for i in predicted])
    )


def test_features_encoded_ahead_give_the_same_profile_file() -> None:
    frame = churn_frame(800)
    profile = build_profile(
        frame, [("x0", "numeric"), ("plan", "categorical")], predictions=frame["churned"], seed=3
    )
    assert profile.to_bytes(encode_features(profile.features)) == profile.to_bytes()


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_run_fits_and_scores_what_pipeline_fit_fits_and_scores(
    tmp_path: Path, overlap: bool, weighted: bool
) -> None:
    store, url = ArtifactStore(str(tmp_path)), str(tmp_path)
    base = churn_frame(3000, seed=1)
    window = traffic_window(churn_frame(400, seed=2, shift=1.0), "churned") if weighted else None
    policy = {"training_set": {"mode": "weighted", "traffic_weight": 3.0}} if weighted else {}
    job = _job(store, url, base, window, retrain=policy)
    spec = load_canonical(store.get(job["spec_key"]))
    outcome = run_training(job, overlap=overlap)
    assert outcome["ok"], outcome
    rows = base
    if window is not None:
        rows = assemble_training_set(spec, [base], labelled_traffic(window, spec))
    train_rows, holdout_rows = split(spec, rows)
    features = spec.feature_names
    fit_params = {"estimator__sample_weight": train_rows[WEIGHT_COLUMN].to_numpy()} if weighted else {}
    direct = build_pipeline(spec).fit(train_rows[features], train_rows[spec.target], **fit_params)
    expected = model_outputs(direct, spec.task, holdout_rows[features], holdout_rows[spec.target].to_numpy())
    assert outcome["metrics"] == all_metrics(expected)
    assert store.get(outcome["artifact"]["key"]) == dump_model(direct)  # the same fitted pipeline
    stored = load_model(store, outcome["artifact"]["key"])
    np.testing.assert_array_equal(
        stored.predict_proba(holdout_rows[features]), direct.predict_proba(holdout_rows[features])
    )


@pytest.mark.parametrize(
    ("estimator", "task", "params"),
    [
        ("hist_gradient_boosting", "classification", {"max_iter": 20}),
        ("logistic_regression", "classification", {}),
        ("hist_gradient_boosting", "regression", {"max_iter": 20}),
    ],
)
def test_a_holdout_scored_in_two_halves_at_once_gives_what_one_call_gives_value_for_value(
    estimator: str, task: str, params: dict[str, Any]
) -> None:
    frame = churn_frame(3000, seed=5)
    target = "churned"
    overrides: dict[str, Any] = {}
    if task == "regression":
        frame[target] = frame["x0"] * 0.5 + frame["x1"]
        overrides["validation"] = {"thresholds": {"r2": 0.0}}
    spec = churn_spec(estimator=estimator, params=params, task=task, **overrides)
    pipeline = build_pipeline(spec)
    pipeline.fit(frame[spec.feature_names], frame[target])
    preprocess, fitted = pipeline.named_steps["preprocess"], pipeline.named_steps["estimator"]
    features = preprocess.transform(frame[spec.feature_names])
    labels = frame[target].to_numpy()
    with Beside(True) as beside:
        halves = scorer(fitted, np.asarray(features), beside) if len(features) >= SPLIT_SCORING_ROWS else None
        assert halves is None or isinstance(halves, HalvesBeside)
        in_halves = model_outputs(HalvesBeside(fitted, beside), spec.task, features, labels)
    at_once = model_outputs(fitted, spec.task, features, labels)
    assert np.array_equal(in_halves.pred, at_once.pred)
    if at_once.proba is not None:
        assert in_halves.proba is not None and np.array_equal(in_halves.proba, at_once.proba)
    assert all_metrics(in_halves) == all_metrics(at_once)
    assert not _beside_threads()


def test_only_a_long_dense_holdout_with_work_beside_the_fit_is_scored_in_halves() -> None:
    fitted, long = object(), np.zeros((SPLIT_SCORING_ROWS, 3))
    with Beside(True) as beside:
        assert isinstance(scorer(fitted, long, beside), HalvesBeside)
        assert scorer(fitted, long[:-1], beside) is fitted
        assert scorer(fitted, pd.DataFrame(long), beside) is fitted
    with Beside(False) as step_by_step:
        assert scorer(fitted, long, step_by_step) is fitted
