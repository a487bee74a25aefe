"""Properties of the canary's comparisons, over hostile but legal inputs (hypothesis): the non-inferiority
z-test on accuracy, the Welch test on absolute errors, the latency check and the prediction divergence.

A canary that is its stable version's copy, or better than it (faster, as accurate or more, errors no larger),
is never judged unhealthy, whatever the sizes (one labelled row short of the minimum, millions), the values
(latencies of 0 or 1e308, scores of ±1.7e308 or NaN, errors of 5e-324) and the policy's tolerances; the
tests' p-values are probabilities, and one more success never turns a pass into a failure
(docs/monitoring.md, "Canary analysis"). Derandomised: the same examples on every run.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from contracts.common import Task
from contracts.monitoring import Verdict
from services.monitoring import stats
from services.monitoring.domain import CanaryPolicy, CanaryStep, LabelledComparison, judge_canary

PROPERTY = settings(derandomize=True, deadline=None, database=None, max_examples=150)

latencies = hnp.arrays(
    float, st.integers(0, 30), elements=st.floats(0, 1e300) | st.sampled_from((0.0, 1e-300, 1.0, 1.7e308))
)
scores = hnp.arrays(
    float,
    st.integers(0, 30),
    elements=st.floats(allow_infinity=False) | st.sampled_from((0.0, 1e-300, 1.0, 1.7e308, -1.7e308)),
)
predicted = st.lists(st.sampled_from([0, 1, 2, 1.0, "a", True, None, 3.5]), max_size=30)
errors = hnp.arrays(
    float, st.integers(2, 40), elements=st.floats(0, 1e300) | st.sampled_from((0.0, 5e-324, 1e-300, 1.7e308))
)
tolerances = st.builds(
    CanaryPolicy,
    min_labelled=st.just(10),
    alpha=st.floats(1e-6, 0.5),
    margin=st.floats(0, 0.5),
    latency_ratio=st.floats(1, 10),
    latency_slack_ms=st.floats(0, 1e6),
)


def step_of(
    stable: tuple[np.ndarray, np.ndarray, list[Any]], canary: tuple[np.ndarray, np.ndarray, list[Any]]
) -> CanaryStep:
    """A step whose variants served these (latencies, scores, predicted values), one row per request."""
    step = CanaryStep("r-1", "m", 1, 2, 0, 0.0, 1, 0.0)
    for traffic, (latency, score, values) in ((step.stable, stable), (step.canary, canary)):
        if latency.size:
            traffic.add(np.zeros(latency.size), score, values, latency, most=1_000)
    return step


def judged(step: CanaryStep, task: Task, labelled: LabelledComparison, policy: CanaryPolicy) -> Verdict:
    with warnings.catch_warnings():
        # scipy warns of samples of nearly equal values; what matters is the number it gives.
        warnings.simplefilter("ignore", RuntimeWarning)
        decision = judge_canary(step, task=task, labelled=labelled, policy=policy)
    return decision.verdict


def mean(values: np.ndarray) -> Fraction:
    """The exact mean: a double's of 1.7e308s overflows, of 5e-324s underflows when scaled."""
    return sum(map(Fraction, values.tolist()), Fraction(0)) / values.size


# --- the tests' statistics ------------------------------------------------------------------------------


@st.composite
def proportions(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(stable correct, stable rows, canary correct, canary rows): none to 10¹², all right or all wrong."""
    sizes = st.integers(0, 200) | st.sampled_from((1, 10**6, 10**12))
    n_a, n_b = draw(sizes), draw(sizes)
    correct_a = draw(st.integers(0, n_a) | st.sampled_from((0, n_a)))
    correct_b = draw(st.integers(0, n_b) | st.sampled_from((0, n_b)))
    return correct_a, n_a, correct_b, n_b


@PROPERTY
@given(proportions(), st.floats(0, 0.5), st.floats(1e-6, 0.5))
def test_the_accuracy_test_is_a_probability_and_more_canary_successes_never_fail_it(
    counts: tuple[int, int, int, int], margin: float, alpha: float
) -> None:
    correct_a, n_a, correct_b, n_b = counts
    z, p = stats.two_proportion_worse(correct_a, n_a, correct_b, n_b, margin=margin)
    assert not math.isnan(z) and 0.0 <= p <= 1.0
    if n_a and n_b and correct_b * n_a >= correct_a * n_b:
        assert p >= 0.5  # the canary is at least as accurate: no evidence it is worse at any α < 0.5
    if correct_b < n_b and p >= alpha:
        assert stats.two_proportion_worse(correct_a, n_a, correct_b + 1, n_b, margin=margin)[1] >= alpha


@PROPERTY
@given(errors, errors, st.floats(1, 2), st.floats(0, 1e6))
def test_the_error_test_is_a_probability_and_larger_canary_errors_never_pass_a_failed_one(
    stable: np.ndarray, canary: np.ndarray, ratio: float, shift: float
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t, p = stats.welch_greater(stable, canary, ratio=ratio)
        _, p_worse = stats.welch_greater(stable, canary + shift, ratio=ratio)
    assert not math.isnan(t) and 0.0 <= p <= 1.0 and 0.0 <= p_worse <= 1.0
    if mean(canary) <= mean(stable):
        assert p >= 0.5  # no evidence a canary whose errors are no larger on average is worse
    with np.errstate(over="ignore"):
        measurable = math.isfinite(float(np.sum((canary + shift) ** 2)))
    if measurable:
        assert not (p < 0.01 <= p_worse)


# --- verdicts ----------------------------------------------------------------------------------------------


@PROPERTY
@given(latencies, scores, tolerances)
def test_a_canary_serving_as_its_stable_version_never_is_unhealthy(
    latency: np.ndarray, score: np.ndarray, policy: CanaryPolicy
) -> None:
    score = np.resize(score, latency.size) if score.size else np.full(latency.size, math.nan)
    served = (latency, score, [None] * latency.size)
    step = step_of(served, (latency.copy(), score[::-1].copy(), [None] * latency.size))
    assert judged(step, Task.REGRESSION, LabelledComparison(), policy) is not Verdict.UNHEALTHY


@PROPERTY
@given(latencies, predicted, tolerances, st.floats(0, 1))
def test_a_faster_canary_predicting_the_same_classes_never_is_unhealthy(
    latency: np.ndarray, values: list[Any], policy: CanaryPolicy, speedup: float
) -> None:
    values = (values * (latency.size // max(len(values), 1) + 1))[: latency.size] if values else []
    if len(values) < latency.size:
        latency = latency[: len(values)]
    nan = np.full(latency.size, math.nan)
    step = step_of((latency, nan, values), (latency * speedup, nan.copy(), values[::-1]))
    assert judged(step, Task.CLASSIFICATION, LabelledComparison(), policy) is not Verdict.UNHEALTHY


@PROPERTY
@given(proportions(), tolerances)
def test_a_canary_at_least_as_accurate_as_stable_never_fails_the_accuracy_test(
    counts: tuple[int, int, int, int], policy: CanaryPolicy
) -> None:
    correct_a, n_a, correct_b, n_b = counts
    if not n_a or not n_b or correct_b * n_a < correct_a * n_b:
        correct_b = n_b  # a canary right every time
    labelled = LabelledComparison(
        stable_correct=correct_a, stable_n=n_a, canary_correct=correct_b, canary_n=n_b, classes=[0, 1]
    )
    assert judged(CanaryStep("r-1", "m", 1, 2, 0, 0.0, 1, 0.0), Task.CLASSIFICATION, labelled, policy) in (
        Verdict.HEALTHY,
        Verdict.INCONCLUSIVE,  # fewer labelled rows than min_labelled: nothing compared
    )


@PROPERTY
@given(errors, st.floats(0, 1), tolerances)
def test_a_canary_whose_errors_are_no_larger_never_fails_the_error_test(
    stable: np.ndarray, shrink: float, policy: CanaryPolicy
) -> None:
    for canary in (stable * shrink, stable[::-1].copy()):
        labelled = LabelledComparison(
            stable_n=stable.size, canary_n=canary.size, stable_abs_errors=stable, canary_abs_errors=canary
        )
        step = CanaryStep("r-1", "m", 1, 2, 0, 0.0, 1, 0.0)
        # Errors beyond a double's mean are inconclusive (not measurable), never unhealthy.
        assert judged(step, Task.REGRESSION, labelled, policy) is not Verdict.UNHEALTHY
