"""Holdout labels the metrics cannot take as they are: classes the candidate never saw, missing labels, text
in a numeric label column. Each is scored or left out one documented way, and the report says so."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.common import Task
from libs.metrics import LOG_LOSS_EPS, Outputs, metric, paired_bootstrap_difference, weighted

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
