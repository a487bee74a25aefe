"""Slices on long holdouts with many levels: each level is measured on its own rows only."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from contracts.common import FeatureSpec, FeatureType, ModelSignature, Task
from libs.metrics import Outputs
from libs.modelspec import SliceRule, ValidationSpec, build_pipeline, spec_from_data
from services.training.worker import signature
from services.validation import scoring
from services.validation.domain import slice_checks
from services.validation.scoring import measure
from tests.unit.training.data import churn_frame, churn_spec_data

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_each_slice_is_measured_on_its_own_rows_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each level's metric was computed over every holdout row, the others weighted 0 (roc_auc ranking all of
    # them again): rows x levels of work, two minutes for 100,000 rows of 5,000 stores and hours for the
    # 5-million-row holdouts the bootstrap is sized for, the consumer's partition held all along.
    from sklearn.metrics import roc_auc_score

    spec = spec_from_data(churn_spec_data(params={}))
    frame = churn_frame(400)
    model = build_pipeline(spec).fit(frame.drop(columns=["churned"]), frame["churned"])
    holdout = churn_frame(3_000, seed=1)
    holdout["plan"] = [f"store-{i % 300:03d}" for i in range(len(holdout))]  # levels it never saw: ignored
    scored: list[int] = []
    scoring_metric = scoring.metric

    def counted(outputs: Outputs, name: str, mask: Any = None) -> float:
        scored.append(outputs.rows)  # the rows a slice's metric goes through, whatever its mask
        return scoring_metric(outputs, name, mask)

    monkeypatch.setattr(scoring, "metric", counted)
    measured = measure(
        spec.validation,
        candidate=model,
        signature=signature(spec, model, tuple(model.classes_)),
        holdout=holdout,
        latency_repeats=1,
    )
    assert len(measured.slices) == 300 and len(scored) == 300
    assert sum(scored) == len(holdout)  # not 300 x 3,000
    assert [s.level for s in measured.slices] == sorted(holdout["plan"].unique())
    proba = model.predict_proba(holdout.drop(columns=["churned"]))[:, 1]
    for s in measured.slices:
        rows = (holdout["plan"] == s.level).to_numpy()
        y = holdout["churned"].to_numpy()[rows]
        assert s.rows == rows.sum()
        if len(set(y)) == 2:
            assert s.value == pytest.approx(roc_auc_score(y, proba[rows]), abs=1e-12)
        else:
            assert np.isnan(s.value)


def test_slices_of_a_regressor_and_of_missing_levels_are_measured_on_their_rows() -> None:
    from sklearn.metrics import mean_squared_error

    data = churn_spec_data(task="regression", estimator="linear_regression", params={})
    data["validation"] = {"thresholds": {"rmse": 1.0}, "slices": {"feature": "plan", "min_rows": 1}}
    spec = spec_from_data(data)
    frame = churn_frame(400)
    model = build_pipeline(spec).fit(frame.drop(columns=["churned"]), frame["churned"].astype(float))
    holdout = churn_frame(600, seed=2)
    holdout.loc[::5, "plan"] = None
    measured = measure(
        spec.validation,
        candidate=model,
        signature=signature(spec, model, ()),
        holdout=holdout,
        latency_repeats=1,
    )
    pred = model.predict(holdout.drop(columns=["churned"]))
    levels = holdout["plan"].fillna(scoring.MISSING_LEVEL)
    assert [s.level for s in measured.slices] == sorted(levels.unique())
    for s in measured.slices:
        rows = (levels == s.level).to_numpy()
        expected = mean_squared_error(holdout["churned"].to_numpy()[rows], pred[rows]) ** 0.5
        assert s.value == pytest.approx(expected, rel=1e-12)
        assert s.rows == rows.sum()


class Perfect:
    """A classifier that is right on every row of ``perfect_holdout``."""

    classes_ = np.array([0, 1])

    def predict_proba(self, frame: Any) -> Any:
        p = np.where((frame["x0"] > 0) & (frame["plan"] != "premium"), 0.9, 0.1)
        return np.column_stack([1 - p, p])


def test_a_slice_without_a_positive_row_where_none_is_predicted_is_reported_not_failed_on_f1() -> None:
    # F1 of the positive class is undefined on rows that have none and where the model predicts none (macro
    # F1 leaves such a class out): it came out 0.0, and a slice the model got entirely right failed its
    # min_value, rejecting the candidate.
    rng = np.random.default_rng(4)
    holdout = pd.DataFrame({"x0": rng.normal(0, 1, 400), "plan": rng.choice(["basic", "premium"], 400)})
    holdout["churned"] = ((holdout["x0"] > 0) & (holdout["plan"] != "premium")).astype("int64")
    sig = ModelSignature(
        features=[
            FeatureSpec(name="x0", type=FeatureType.NUMERIC),
            FeatureSpec(name="plan", type=FeatureType.CATEGORICAL, categories=["basic", "premium"]),
        ],
        target="churned",
        task=Task.CLASSIFICATION,
        classes=[0, 1],
    )
    spec = ValidationSpec(slices=SliceRule(feature="plan", metric="f1", min_value=0.6, min_rows=10))
    measured = measure(spec, candidate=Perfect(), signature=sig, holdout=holdout, latency_repeats=1)
    checks = {c.name: c for c in slice_checks(spec, measured)}
    assert checks["slice:plan=basic:f1"].value == 1.0 and checks["slice:plan=basic:f1"].passed
    premium = checks["slice:plan=premium:f1"]
    assert premium.passed and premium.value is None
    assert premium.detail.startswith("reported, not judged: f1 is undefined on these")
