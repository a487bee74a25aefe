"""Properties of the drift statistics monitoring decides with, over hostile but legal inputs (hypothesis).

Samples of one value, constant samples, a window identical to the reference, values near the double's limits
(1.7e308) and below its normal range (subnormals), zero counts, categories on one side only, enormous counts:
no statistic raises or is NaN where a decision is read from it, each stays in its documented range
(docs/monitoring.md, Definitions), the symmetric ones are symmetric, none depends on the order of a sample,
and a window identical to its reference never drifts. Derandomised: the same examples on every run.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from contracts.monitoring import JENSEN_SHANNON_MAX, DriftTest
from libs.profiles import profile_categorical, profile_numeric
from services.monitoring import stats
from services.monitoring.domain import (
    HIGHER_IS_BETTER,
    DriftPolicy,
    FeatureReference,
    correct,
    degradations,
    judge_feature,
)

PROPERTY = settings(derandomize=True, deadline=None, database=None, max_examples=150)

EDGE_VALUES = (0.0, -0.0, 3.0, 1e-300, -1e-300, 5e-324, 1e300, -1e300, 1.7e308, -1.7e308, 2.0**53, 1.7e18)
values = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(EDGE_VALUES)
samples = hnp.arrays(float, st.integers(1, 40), elements=values)
# Live values serving let through, and the NaN monitoring reads as missing.
window_values = values | st.sampled_from((math.nan, math.inf, -math.inf))
count_values = st.integers(0, 1_000) | st.sampled_from((0, 1, 10**12))


@st.composite
def count_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Reference and window counts over the same bins: empty bins, bins one side only has, enormous counts."""
    k = draw(st.integers(1, 12))
    ref = draw(hnp.arrays(np.int64, k, elements=count_values)).astype(float)
    cur = draw(hnp.arrays(np.int64, k, elements=count_values)).astype(float)
    return ref, cur


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# --- Kolmogorov–Smirnov -----------------------------------------------------------------------------


@PROPERTY
@given(samples, samples)
def test_ks_is_in_range_symmetric_and_blind_to_the_windows_order(
    reference: np.ndarray, window: np.ndarray
) -> None:
    d, p = stats.ks_test(np.sort(reference), window)
    assert 0.0 <= d <= 1.0 and 0.0 <= p <= 1.0
    assert stats.ks_statistic_presorted(np.sort(window), reference) == d
    shuffled = window.copy()
    np.random.default_rng(len(window)).shuffle(shuffled)
    assert stats.ks_test(np.sort(reference), shuffled) == (d, p)


@PROPERTY
@given(samples)
def test_ks_of_a_window_identical_to_its_reference_is_zero_with_p_one(reference: np.ndarray) -> None:
    assert stats.ks_test(np.sort(reference), reference[::-1]) == (0.0, 1.0)


# Exact up to 10,000 values a side, asymptotic beyond (the exact count takes long at the largest sizes).
sample_sizes = st.integers(1, 300) | st.sampled_from((9_999, 10_001, 10**6, 10**9))


@PROPERTY
@given(st.floats(0, 1), st.floats(0, 1), sample_sizes, sample_sizes)
def test_ks_p_value_falls_as_the_distance_grows_and_ignores_which_side_is_which(
    d1: float, d2: float, n1: int, n2: int
) -> None:
    lower, higher = sorted((d1, d2))
    p_lower, p_higher = stats.ks_pvalue(lower, n1, n2), stats.ks_pvalue(higher, n1, n2)
    assert 0.0 <= p_higher <= p_lower + 1e-12 <= 1.0 + 1e-12
    assert close(p_higher, stats.ks_pvalue(higher, n2, n1))


# --- Wasserstein --------------------------------------------------------------------------------------


@PROPERTY
@given(
    samples, hnp.arrays(float, st.integers(1, 40), elements=values | st.sampled_from((math.inf, -math.inf)))
)
def test_wasserstein_is_a_non_negative_number_blind_to_the_windows_order(
    reference: np.ndarray, window: np.ndarray
) -> None:
    ordered = np.sort(reference)
    if not stats.WassersteinGrid.measurable(ordered):
        return  # untested, and said so (test_domain: a reference spanning more than a double)
    grid = stats.WassersteinGrid.from_sample(ordered)
    w = stats.wasserstein_normed(grid, window)
    assert w >= 0.0 and not math.isnan(w)
    assert math.isclose(stats.wasserstein_normed(grid, window[::-1]), w, rel_tol=1e-9, abs_tol=1e-12)


@PROPERTY
@given(samples)
def test_wasserstein_of_a_window_identical_to_its_reference_is_within_the_grids_error(
    reference: np.ndarray,
) -> None:
    ordered = np.sort(reference)
    if not stats.WassersteinGrid.measurable(ordered):
        return
    grid = stats.WassersteinGrid.from_sample(ordered)
    # The documented bound, 2 (max - min) / bins of the range, normalised as the distance is.
    bound = 2 * (grid.hi - grid.lo) / grid.bins / max(grid.reference_std, stats.WASSERSTEIN_MIN_NORM)
    assert 0.0 <= stats.wasserstein_normed(grid, reference[::-1]) <= bound * (1 + 1e-9)


# --- binned distances and their sampling floor ------------------------------------------------------


@PROPERTY
@given(count_pairs())
def test_psi_is_finite_non_negative_symmetric_and_zero_for_identical_shares(
    counts: tuple[np.ndarray, np.ndarray],
) -> None:
    ref, cur = counts
    value = stats.psi(ref, cur)
    assert math.isfinite(value) and value >= 0.0
    assert close(stats.psi(cur, ref), value)
    assert stats.psi(ref, ref.copy()) == 0.0


@PROPERTY
@given(count_pairs())
def test_jensen_shannon_is_within_its_range_symmetric_and_zero_for_identical_shares(
    counts: tuple[np.ndarray, np.ndarray],
) -> None:
    ref, cur = counts
    value = stats.jensen_shannon(ref, cur)
    # sqrt(ln 2) is reached by samples without a bin in common, give or take a rounding of the last digit.
    assert 0.0 <= value <= JENSEN_SHANNON_MAX + 1e-12
    assert close(stats.jensen_shannon(cur, ref), value)
    assert stats.jensen_shannon(ref, ref.copy()) == 0.0
    assert stats.jensen_shannon(ref, 3 * ref) < 1e-6  # the same shares of a larger sample


@PROPERTY
@given(count_pairs(), st.integers(1, 10**7), st.floats(0.001, JENSEN_SHANNON_MAX))
def test_the_sampling_floor_only_raises_a_threshold_and_gives_the_same_answer_twice(
    counts: tuple[np.ndarray, np.ndarray], n: int, threshold: float
) -> None:
    ref, _ = counts
    for raised in (stats.jensen_shannon_threshold_at, stats.psi_threshold_at):
        value = raised(threshold, ref, n)
        assert math.isfinite(value) and value >= threshold
        assert raised(threshold, ref, n) == value


# --- chi-square ---------------------------------------------------------------------------------------


@PROPERTY
@given(count_pairs())
def test_chi_square_is_in_range_symmetric_and_calm_for_the_same_shares(
    counts: tuple[np.ndarray, np.ndarray],
) -> None:
    ref, cur = counts
    statistic, p = stats.chi_square(ref, cur)
    assert statistic >= 0.0 and 0.0 <= p <= 1.0
    swapped, p_swapped = stats.chi_square(cur, ref)
    assert math.isclose(swapped, statistic, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(p_swapped, p, rel_tol=1e-6, abs_tol=1e-12)
    assert stats.chi_square_sparse(cur, ref) == stats.chi_square_sparse(ref, cur)
    assert stats.chi_square(ref, ref.copy())[1] > 0.999
    assert stats.chi_square(ref, 3 * ref)[1] > 0.999


small_count_pairs = st.integers(1, 8).flatmap(
    lambda k: st.tuples(
        hnp.arrays(np.int64, k, elements=st.integers(0, 40)),
        hnp.arrays(np.int64, k, elements=st.integers(0, 40)),
    )
)


@PROPERTY
@given(small_count_pairs, st.floats(1e-6, 0.5))
def test_a_monte_carlo_p_value_is_a_resolvable_probability_and_one_for_the_same_counts(
    counts: tuple[np.ndarray, np.ndarray], bar: float
) -> None:
    ref, cur = (c.astype(float) for c in counts)
    draws = stats.monte_carlo_draws(bar)
    assert 1 <= draws <= stats.MONTE_CARLO_DRAWS_MAX
    if draws < stats.MONTE_CARLO_DRAWS_MAX:
        assert 1 / (draws + 1) <= bar / 10 * (1 + 1e-12)
    draws = min(draws, 400)  # the resolution is not what is checked here; the time is
    p = stats.chi_square_monte_carlo(ref, cur, draws)
    assert 1 / (draws + 1) <= p <= 1.0
    assert stats.chi_square_monte_carlo(cur, ref, draws) == p
    assert stats.chi_square_monte_carlo(ref, ref.copy(), draws) == 1.0


# --- corrections for many tests -----------------------------------------------------------------------


@PROPERTY
@given(hnp.arrays(float, st.integers(0, 40), elements=st.floats(0, 1) | st.sampled_from((0.0, 1.0, 5e-324))))
def test_corrections_never_lower_a_p_value_nor_leave_0_1_nor_reorder(p_values: np.ndarray) -> None:
    bonferroni, bh = stats.bonferroni(p_values), stats.benjamini_hochberg(p_values)
    for adjusted in (bonferroni, bh):
        assert np.all(adjusted >= p_values) and np.all(adjusted <= 1.0)
    assert np.all(bh <= bonferroni)
    order = np.argsort(p_values, kind="stable")
    assert np.all(np.diff(bh[order]) >= 0)
    reversed_bh = stats.benjamini_hochberg(p_values[::-1])
    assert np.array_equal(reversed_bh[::-1], bh)


# --- a feature's judgement ----------------------------------------------------------------------------

tests_named = st.sampled_from([None, *DriftTest])


def policy(test: DriftTest | None, small_sample_max: int) -> DriftPolicy:
    """The defaults, the feature ``f`` judged by ``test`` when one is named."""
    return DriftPolicy(small_sample_max=small_sample_max, feature_tests={} if test is None else {"f": test})


@PROPERTY
@given(
    samples,
    hnp.arrays(float, st.integers(0, 40), elements=window_values),
    tests_named,
    st.sampled_from((1, 1_000)),
)
def test_a_numeric_feature_is_judged_without_raising_and_its_copy_never_drifts(
    column: np.ndarray, window: np.ndarray, test: DriftTest | None, small_sample_max: int
) -> None:
    reference = FeatureReference.from_profile(profile_numeric("f", pd.Series(column)))
    judged_by = policy(test, small_sample_max)
    with warnings.catch_warnings():
        # scipy warns of samples of nearly equal values; what matters is the number it gives.
        warnings.simplefilter("ignore", RuntimeWarning)
        result = judge_feature(reference, window, judged_by, family=3)
        same = judge_feature(reference, column[::-1].copy(), judged_by, family=3)
    for judged in (result, same):
        if judged.untested is None:
            assert not math.isnan(judged.statistic)
            assert judged.p_value is None or 0.0 <= judged.p_value <= 1.0
    correct([same], judged_by)
    assert not same.drifted, (same.test, same.statistic, same.p_value, same.threshold)


categories = st.sampled_from(["a", "b", "c", 1, 2, 1.0, True, None])


@PROPERTY
@given(
    st.lists(categories, min_size=1, max_size=40),
    st.lists(categories | st.sampled_from(["z", 7, False]), max_size=40),
    tests_named,
    st.sampled_from((1, 1_000)),
)
def test_a_categorical_feature_is_judged_without_raising_and_its_copy_never_drifts(
    column: list[object], window: list[object], test: DriftTest | None, small_sample_max: int
) -> None:
    reference = FeatureReference.from_profile(profile_categorical("f", pd.Series(column, dtype=object)))
    judged_by = policy(test, small_sample_max)
    result = judge_feature(reference, window, judged_by, family=3)
    same = judge_feature(reference, column[::-1], judged_by, family=3)
    for judged in (result, same):
        if judged.untested is None:
            assert not math.isnan(judged.statistic)
            assert judged.p_value is None or 0.0 <= judged.p_value <= 1.0
    correct([same], judged_by)
    assert not same.drifted, (same.test, same.statistic, same.p_value, same.threshold)


# --- performance against the training baseline ---------------------------------------------------------

scores = st.floats(0, 1) | st.sampled_from((0.0, 1.0))
errors = st.floats(0, 1e300) | st.sampled_from((0.0, 5e-324, 1.7e308))


@st.composite
def window_metrics(draw: st.DrawFn) -> dict[str, float]:
    return {name: draw(scores if higher else errors) for name, higher in HIGHER_IS_BETTER.items()}


@PROPERTY
@given(window_metrics(), st.floats(0, 0.5), st.floats(0, 1), st.floats(0, 1e6))
def test_a_window_scoring_its_baseline_or_better_never_degrades(
    baseline: dict[str, float], tolerance: float, improvement: float, standard_error: float
) -> None:
    ses = dict.fromkeys(baseline, standard_error)
    assert degradations(baseline, baseline, tolerance, ses) == []
    better = {
        name: value + (1 - value) * improvement if HIGHER_IS_BETTER[name] else value * (1 - improvement)
        for name, value in baseline.items()
    }
    assert degradations(better, baseline, tolerance, ses) == []
    assert degradations(better, baseline, tolerance) == []
