"""Slices on long holdouts with many levels: each level is measured on its own rows only, and at most
``max_slice_levels`` of them are checked one by one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from contracts.common import FeatureSpec, FeatureType, ModelSignature, Task
from contracts.validation import CheckKind
from libs.metrics import Outputs
from libs.modelspec import SliceRule, ValidationSpec, build_pipeline, spec_from_data
from services.training.worker import signature
from services.validation import scoring
from services.validation.domain import judge, slice_checks
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
    assert [s.level for s in measured.slices] == [*sorted(holdout["plan"].dropna().unique()), None]
    for s in measured.slices:
        rows = (holdout["plan"].isna() if s.level is None else holdout["plan"] == s.level).to_numpy()
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


# Rows per level: ties of 40 rows, a level named as the summary check's words, and small levels.
LEVEL_ROWS = {"a": 5, "b": 40, "c": 40, "d": 12, "e": 60, "f": 40, "g": 3, "other-levels": 8}


def levels_holdout() -> tuple[pd.DataFrame, ModelSignature]:
    """A holdout with LEVEL_ROWS rows of each level of plan, both classes in each, and its signature."""
    plan = [level for level, rows in LEVEL_ROWS.items() for _ in range(rows)]
    holdout = pd.DataFrame({"x0": np.resize([1.0, -1.0], len(plan)), "plan": plan})
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
    return holdout, sig


SLICES = ValidationSpec(slices=SliceRule(feature="plan", min_value=0.6, min_rows=10))


class WrongOn(Perfect):
    """Right on every row but those of one level, where its probabilities are upside down."""

    def __init__(self, level: str) -> None:
        self.level = level

    def predict_proba(self, frame: Any) -> Any:
        proba = super().predict_proba(frame)
        return np.where((frame["plan"] == self.level).to_numpy()[:, None], proba[:, ::-1], proba)


def test_past_max_slice_levels_the_largest_levels_are_checked_and_the_others_summed_up_in_one_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One check per level: 200,000 levels made 200,000 checks and a 40 MB report, a million passed what
    # Postgres stores in a jsonb and the registration was dead-lettered, the candidate never gated.
    holdout, sig = levels_holdout()
    scored: list[int] = []
    scoring_metric = scoring.metric

    def counted(outputs: Outputs, name: str, mask: Any = None) -> float:
        scored.append(outputs.rows)
        return scoring_metric(outputs, name, mask)

    monkeypatch.setattr(scoring, "metric", counted)
    measured = measure(
        SLICES, candidate=Perfect(), signature=sig, holdout=holdout, latency_repeats=1, max_slice_levels=4
    )
    # The most rows first, the ties of 40 rows in text order; reported in text order. Only they are measured.
    assert [(s.level, s.rows) for s in measured.slices] == [("b", 40), ("c", 40), ("e", 60), ("f", 40)]
    assert sorted(scored) == [40, 40, 40, 60]
    checks = slice_checks(SLICES, measured)
    assert len({c.name for c in checks}) == len(checks) == 5
    assert [c.name for c in checks[:4]] == [f"slice:plan={level}:roc_auc" for level in "bcef"]
    summary = checks[4]
    assert summary.name == "slice:plan:other-levels:roc_auc" and summary.kind is CheckKind.SLICE
    assert summary.passed and summary.value is None and summary.threshold is None
    assert summary.detail.startswith(
        "reported, not judged: 4 levels of plan with 28 rows in all are not checked one by one: the holdout "
        "has 8 levels, more than max_slice_levels 4,"
    )
    assert "DRIFTLOOP_VALIDATION_MAX_SLICE_LEVELS" in summary.detail


def test_past_max_slice_levels_a_checked_slice_that_fails_still_fails_the_candidate() -> None:
    holdout, sig = levels_holdout()

    def failed(max_slice_levels: int) -> list[str]:
        measured = measure(
            SLICES,
            candidate=WrongOn("e"),
            signature=sig,
            holdout=holdout,
            latency_repeats=1,
            max_slice_levels=max_slice_levels,
        )
        checks = judge(
            SLICES,
            task=Task.CLASSIFICATION,
            n_classes=2,
            measured=measured,
            candidate=sig,
            champion_signature=None,
            champion_version=None,
        )
        # Latency is timed on this machine: not what this test is about.
        return [c.name for c in checks if not c.passed and c.kind is not CheckKind.LATENCY]

    assert failed(4) == failed(len(LEVEL_ROWS)) == ["slice:plan=e:roc_auc"]


@pytest.mark.parametrize("max_slice_levels", [len(LEVEL_ROWS), len(LEVEL_ROWS) + 1])
def test_at_or_under_max_slice_levels_every_level_is_checked_and_nothing_summed_up(
    max_slice_levels: int,
) -> None:
    holdout, sig = levels_holdout()
    measured = measure(
        SLICES,
        candidate=Perfect(),
        signature=sig,
        holdout=holdout,
        latency_repeats=1,
        max_slice_levels=max_slice_levels,
    )
    assert measured.slices_left_out is None
    assert [(s.level, s.rows) for s in measured.slices] == sorted(LEVEL_ROWS.items())
    checks = slice_checks(SLICES, measured)
    assert [c.name for c in checks] == [f"slice:plan={level}:roc_auc" for level in sorted(LEVEL_ROWS)]


def test_missing_values_and_values_of_one_text_and_two_types_are_levels_of_their_own() -> None:
    # The levels were the values' text with the missing rows spelled "__missing__": a real level of that
    # text took the missing rows in, and the integer 1 and the text "1" (True and "True") were one slice,
    # one check named for two groups of rows the model tells apart.
    counts: list[tuple[object, int]] = [
        ("__missing__", 12),
        (None, 14),
        (1, 10),
        (1.0, 6),
        ("1", 18),
        (True, 20),
        ("True", 22),
        ("plain", 24),
    ]
    store = [value for value, rows in counts for _ in range(rows)]
    holdout = pd.DataFrame({"x0": np.resize([1.0, -1.0], len(store)), "plan": "basic"})
    holdout["store"] = pd.Series(store, dtype=object)
    holdout["churned"] = (holdout["x0"] > 0).astype("int64")
    sig = ModelSignature(
        features=[
            FeatureSpec(name="x0", type=FeatureType.NUMERIC),
            FeatureSpec(name="plan", type=FeatureType.CATEGORICAL, categories=["basic", "premium"]),
        ],
        target="churned",
        task=Task.CLASSIFICATION,
        classes=[0, 1],
    )
    spec = ValidationSpec(slices=SliceRule(feature="store", min_value=0.6, min_rows=1))
    measured = measure(spec, candidate=Perfect(), signature=sig, holdout=holdout, latency_repeats=1)
    # In text order, the rows without a value last; 1.0 is the integer 1 (JSON has one kind of number).
    assert [(s.level, s.kind, s.rows) for s in measured.slices] == [
        ("1", "integer", 16),
        ("1", "text", 18),
        ("True", "boolean", 20),
        ("True", "text", 22),
        ("__missing__", None, 12),
        ("plain", None, 24),
        (None, None, 14),
    ]
    checks = slice_checks(spec, measured)
    assert [c.name for c in checks] == [
        "slice:store:integer=1:roc_auc",
        "slice:store:text=1:roc_auc",
        "slice:store:boolean=True:roc_auc",
        "slice:store:text=True:roc_auc",
        "slice:store=__missing__:roc_auc",
        "slice:store=plain:roc_auc",
        "slice:store:missing:roc_auc",
    ]
    assert all(c.passed and c.value == 1.0 for c in checks)


def test_an_integer_column_with_a_gap_names_its_levels_as_integers() -> None:
    # pandas reads integers with a gap as floats: the levels were named 1.0 and 2.0, where the signature,
    # the profile and serving name them 1 and 2.
    holdout, sig = levels_holdout()
    holdout["store"] = pd.Series(np.resize([1, 2, None], len(holdout)), dtype=float)
    spec = ValidationSpec(slices=SliceRule(feature="store", min_value=0.6, min_rows=1))
    measured = measure(spec, candidate=Perfect(), signature=sig, holdout=holdout, latency_repeats=1)
    assert [c.name for c in slice_checks(spec, measured)] == [
        "slice:store=1:roc_auc",
        "slice:store=2:roc_auc",
        "slice:store:missing:roc_auc",
    ]
