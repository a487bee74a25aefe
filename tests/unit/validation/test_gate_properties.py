"""Properties of the metrics training reports and validation gates on (libs.metrics), and of the gates
themselves, over hostile but legal inputs (hypothesis): one row, one class, labels the model never saw,
probabilities of exactly 0 and 1 (and 5e-324), targets of ±1.7e308, metrics that are NaN or infinite.

Every metric stays in its range and does not depend on the order of the rows; a candidate compared with
itself differs by 0 on every resample; a gate reads a metric that is no number as a failure, never as a pass,
and a candidate no worse than its champion passes (docs/validation.md). Derandomised: the same examples on
every run.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from contracts.common import Task
from libs.metrics import METRICS, Outputs, all_metrics, metric, metrics_for, paired_bootstrap_difference
from libs.modelspec import ValidationSpec
from services.validation.domain import (
    ChampionComparison,
    Measured,
    champion_check,
    latency_check,
    threshold_checks,
)

PROPERTY = settings(derandomize=True, deadline=None, database=None, max_examples=150)

shares = st.floats(0, 1) | st.sampled_from((0.0, 1.0, 5e-324, 1e-300))
targets = st.floats(-1e300, 1e300) | st.sampled_from((0.0, -0.0, 1e-300, 1.7e308, -1.7e308, 1e200))
any_number = st.floats() | st.sampled_from((math.nan, math.inf, -math.inf, 0.0))


@st.composite
def classifier_outputs(draw: st.DrawFn) -> Outputs:
    """A classifier's outputs: 2 to 4 classes, labels it never saw (-1), rows whose scores are all 0."""
    rows, k = draw(st.integers(1, 30)), draw(st.integers(2, 4))
    y = draw(hnp.arrays(np.int64, rows, elements=st.integers(-1, k - 1)))
    raw = draw(hnp.arrays(float, (rows, k), elements=shares))
    total = raw.sum(axis=1, keepdims=True)
    proba = np.where(total > 0, raw / np.where(total > 0, total, 1.0), 1.0 / k)
    return Outputs(Task.CLASSIFICATION, y, proba.argmax(axis=1), proba, tuple(range(k)))


@st.composite
def regressor_outputs(draw: st.DrawFn) -> Outputs:
    rows = draw(st.integers(1, 30))
    y = draw(hnp.arrays(float, rows, elements=targets))
    pred = draw(hnp.arrays(float, rows, elements=targets))
    return Outputs(Task.REGRESSION, y, pred)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# --- the metrics -----------------------------------------------------------------------------------------


@PROPERTY
@given(classifier_outputs())
def test_classification_metrics_stay_in_range_and_ignore_the_order_of_the_rows(outputs: Outputs) -> None:
    backwards = outputs.of_rows(np.arange(outputs.rows)[::-1])
    for name in metrics_for(Task.CLASSIFICATION, len(outputs.classes)):
        value = metric(outputs, name)
        if name == "log_loss":
            assert 0.0 <= value < math.inf
        else:
            assert math.isnan(value) or 0.0 <= value <= 1.0 + 1e-12  # NaN: undefined, left out
        assert same(metric(backwards, name), value)
    assert all(math.isfinite(v) for v in all_metrics(outputs).values())


@PROPERTY
@given(classifier_outputs())
def test_roc_auc_of_the_opposite_scores_is_one_minus_it(outputs: Outputs) -> None:
    if len(outputs.classes) != 2:
        return
    assert outputs.proba is not None
    # The score negated, which reverses its order exactly (1 - p can tie two scores a rounding apart).
    reversed_scores = outputs.proba * np.array([1.0, -1.0])
    opposite = Outputs(Task.CLASSIFICATION, outputs.y, outputs.pred, reversed_scores, outputs.classes)
    auc, flipped = metric(outputs, "roc_auc"), metric(opposite, "roc_auc")
    assert (math.isnan(auc) and math.isnan(flipped)) or math.isclose(auc + flipped, 1.0, abs_tol=1e-9)


@PROPERTY
@given(regressor_outputs())
def test_regression_metrics_stay_in_range_and_a_perfect_model_scores_perfectly(outputs: Outputs) -> None:
    rmse, mae, r2 = (metric(outputs, name) for name in ("rmse", "mae", "r2"))
    assert mae >= 0.0 and rmse >= 0.0  # infinite when an error is beyond a double: undefined for the gates
    if mae > 1e-150:  # an error's square below the double's range counts as 0 in the RMSE
        assert rmse >= mae * (1 - 1e-12)
    assert math.isnan(r2) or r2 <= 1.0
    perfect = Outputs(Task.REGRESSION, outputs.y, outputs.y.copy())
    assert metric(perfect, "rmse") == 0.0 and metric(perfect, "mae") == 0.0
    assert metric(perfect, "r2") in (1.0,) or math.isnan(metric(perfect, "r2"))  # NaN: a constant target
    assert all(math.isfinite(v) for v in all_metrics(outputs).values())


@settings(derandomize=True, deadline=None, database=None, max_examples=60)
@given(classifier_outputs() | regressor_outputs())
def test_a_candidate_compared_with_itself_differs_by_nothing_on_every_resample(outputs: Outputs) -> None:
    for name in metrics_for(outputs.task, len(outputs.classes) or None):
        with warnings.catch_warnings():
            # inf - inf on a resample whose RMSE is beyond a double: NaN, left out of the interval.
            warnings.simplefilter("ignore", RuntimeWarning)
            point, low, high = paired_bootstrap_difference(
                outputs, outputs, name, resamples=50, level=0.95, seed=0
            )
        assert math.isnan(point) or point == 0.0
        assert (math.isnan(low) and math.isnan(high)) or low == high == 0.0


# --- the gates ---------------------------------------------------------------------------------------------


def measured(**changes: object) -> Measured:
    values: dict[str, object] = {
        "rows": 1000,
        "metrics": {},
        "nonfinite_outputs": 0,
        "distinct_outputs": 950,
        "latency_ms_per_row": 0.01,
    }
    values.update(changes)
    return Measured(**values)  # type: ignore[arg-type]


gated_metrics = st.sampled_from(sorted(METRICS))
thresholds = st.floats(-1e6, 1e6)


@PROPERTY
@given(gated_metrics, any_number, thresholds)
def test_a_threshold_passes_only_a_metric_that_is_a_number_on_its_right_side(
    name: str, value: float, threshold: float
) -> None:
    [check] = threshold_checks(ValidationSpec(thresholds={name: threshold}), measured(metrics={name: value}))
    meets = value >= threshold if METRICS[name].higher_is_better else value <= threshold
    assert check.passed is (math.isfinite(value) and meets)


@PROPERTY
@given(gated_metrics, any_number, any_number, any_number, st.floats(0, 1e6))
def test_the_champion_gate_passes_only_an_interval_of_numbers_within_delta(
    name: str, difference: float, low: float, high: float, delta: float
) -> None:
    spec = ValidationSpec.model_validate({"champion": {"max_degradation": delta}})
    comparison = ChampionComparison(name, 0.0, 0.0, difference, low, high, 0.95, 500)
    check = champion_check(spec, name, measured(champion=comparison), champion=1)
    bound = low if METRICS[name].higher_is_better else high
    within = bound >= -delta if METRICS[name].higher_is_better else bound <= delta
    numbers = all(math.isfinite(v) for v in (difference, low, high))
    assert check.passed is (numbers and within)


@PROPERTY
@given(gated_metrics, st.floats(0, 1e6), st.floats(0, 1e6))
def test_a_candidate_no_worse_than_its_champion_passes_the_champion_gate(
    name: str, delta: float, gain: float
) -> None:
    # Identical on every resample, or better by ``gain`` on every one.
    spec = ValidationSpec.model_validate({"champion": {"max_degradation": delta}})
    better = gain if METRICS[name].higher_is_better else -gain
    for difference in (0.0, better):
        comparison = ChampionComparison(name, 0.0, 0.0, difference, difference, difference, 0.95, 500)
        assert champion_check(spec, name, measured(champion=comparison), champion=1).passed


@PROPERTY
@given(st.floats(0, 1e300) | st.sampled_from((0.0, 5e-324)), st.floats(0, 1e6, exclude_min=True))
def test_the_latency_gate_passes_only_a_time_within_the_budget(per_row: float, budget: float) -> None:
    spec = ValidationSpec(latency_budget_ms_per_row=budget)
    assert latency_check(spec, measured(latency_ms_per_row=per_row)).passed is (per_row <= budget)
