"""The drift statistics on known distributions, and their agreement with scipy."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2_contingency, ks_2samp, norm, ttest_ind, wasserstein_distance

from services.monitoring import stats


@pytest.mark.parametrize("seed", range(40))
def test_ks_statistic_and_p_value_match_scipy_within_1e_6(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(5, 4_000)), int(rng.integers(5, 2_000))
    if seed % 3 == 0:
        ref, cur = rng.normal(size=m), rng.normal(rng.uniform(-0.2, 0.2), size=n)
    elif seed % 3 == 1:  # heavy ties
        ref, cur = rng.integers(0, 6, m).astype(float), rng.integers(0, 7, n).astype(float)
    else:
        ref, cur = np.round(rng.exponential(size=m), 1), np.round(rng.exponential(1.1, size=n), 1)
    d, p = stats.ks_test(np.sort(ref), cur)
    expected = ks_2samp(ref, cur)
    assert d == pytest.approx(expected.statistic, abs=1e-12)
    assert abs(p - expected.pvalue) <= 1e-6


def test_ks_matches_scipy_on_large_samples_with_the_asymptotic_distribution() -> None:
    rng = np.random.default_rng(7)
    ref, cur = rng.normal(size=12_000), rng.normal(0.02, size=30_000)
    d, p = stats.ks_test(np.sort(ref), cur)
    expected = ks_2samp(ref, cur)
    assert d == pytest.approx(expected.statistic, abs=1e-12)
    assert abs(p - expected.pvalue) <= 1e-6


def test_wasserstein_on_the_grid_is_within_a_thousandth_of_the_exact_distance() -> None:
    rng = np.random.default_rng(3)
    for ref, cur in [
        (rng.normal(size=10_000), rng.normal(0.3, 1.2, 50_000)),
        (rng.lognormal(size=10_000), rng.lognormal(0.1, size=50_000)),
        (rng.normal(size=10_000), rng.normal(9, size=5_000)),  # mostly outside the reference range
    ]:
        grid = stats.WassersteinGrid.from_sample(np.sort(ref))
        exact = wasserstein_distance(ref, cur) / np.std(ref)
        assert stats.wasserstein_normed(grid, cur) == pytest.approx(exact, abs=1e-3)


def test_wasserstein_of_a_constant_reference_and_the_same_constant_is_zero() -> None:
    grid = stats.WassersteinGrid.from_sample(np.full(5_000, 3.0))
    assert stats.wasserstein_normed(grid, np.full(2_000, 3.0)) == 0.0
    # Nor does a window identical to a reference with a point mass at its minimum measure anything.
    ref = np.sort(np.random.default_rng(0).integers(0, 4, 5_000).astype(float))
    grid = stats.WassersteinGrid.from_sample(ref)
    assert stats.wasserstein_normed(grid, ref) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "reference",
    [np.full(1_000, 2.0**53), np.full(1_000, -1e18), np.arange(7) * 5e-324],
    ids=["constant-at-2**53", "constant-at--1e18", "seven-subnormals"],
)
def test_wasserstein_of_a_reference_too_narrow_for_its_bins_is_measured(reference: np.ndarray) -> None:
    # From 2**53 up lo + 1.0 is lo, and across a few subnormals (hi - lo) / 4096 is 0: the grid's bins had
    # no width, every window value inside the range fell in a negative bin, and np.bincount raised.
    grid = stats.WassersteinGrid.from_sample(np.sort(reference))
    assert stats.wasserstein_normed(grid, reference) == 0.0
    below = reference[0] - 4_096.0  # outside the range the distance is exact
    assert stats.wasserstein_normed(grid, np.full(10, below)) == pytest.approx(4_096.0 / 0.001)


@pytest.mark.parametrize("far", [1e306, 1.7e308, -1.7e308])
def test_wasserstein_of_values_near_the_double_limits_is_their_true_distance(far: float) -> None:
    """A regression model's predictions are bounded by nothing but a double: summed one by one, their
    distances to the reference overflowed to infinity (with a warning) where the mean of them fits."""
    rng = np.random.default_rng(4)
    ref, cur = rng.normal(size=10_000), np.concatenate((rng.normal(size=1_000), np.full(1_000, far)))
    grid = stats.WassersteinGrid.from_sample(np.sort(ref))
    exact = wasserstein_distance(ref, cur) / np.std(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stats.wasserstein_normed(grid, cur) == pytest.approx(exact, rel=1e-9)


def test_wasserstein_beyond_a_double_is_infinite_without_a_warning() -> None:
    grid = stats.WassersteinGrid.from_sample(np.sort(np.random.default_rng(5).uniform(0.0, 0.01, 5_000)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stats.wasserstein_normed(grid, np.full(100, 1.7e308)) == math.inf  # divided by a std of 0.003


def test_jensen_shannon_is_scipys_distance_and_needs_no_smoothing() -> None:
    ref, cur = np.array([50.0, 30, 20, 0]), np.array([10.0, 30, 40, 20])
    assert stats.jensen_shannon(ref, cur) == pytest.approx(jensenshannon(ref / 100, cur / 100))
    assert stats.jensen_shannon(ref, ref) == 0.0


def test_psi_smooths_empty_bins_and_is_zero_for_identical_shares() -> None:
    ref, cur = np.array([25.0, 25, 25, 25]), np.array([40.0, 30, 30, 0])
    expected = sum((q - p) * np.log(q / p) for p, q in zip([0.25] * 4, [0.4, 0.3, 0.3, 1e-4], strict=True))
    assert stats.psi(ref, cur) == pytest.approx(expected)
    assert stats.psi(ref, ref) == 0.0


def test_chi_square_is_the_test_of_homogeneity_and_takes_new_categories() -> None:
    ref, cur = np.array([500.0, 300, 200, 0]), np.array([45.0, 35, 15, 5])
    stat, p = stats.chi_square(ref, cur)
    expected = chi2_contingency(np.vstack([ref, cur]), correction=False)
    assert stat == pytest.approx(expected.statistic)
    assert p == pytest.approx(expected.pvalue)


def _exact_conditional_p(ref: np.ndarray, cur: np.ndarray) -> float:
    """P(statistic >= observed) over every table with these margins: the current row is multivariate
    hypergeometric (the pooled rows drawn without replacement), and with both margins fixed the statistic
    grows with sum(x_j**2 / c_j) alone."""
    columns = (ref + cur).astype(int)
    size, total = int(cur.sum()), int(columns.sum())
    observed = float(np.sum(cur * cur / columns))
    p = 0.0
    c = columns.tolist()
    for x in itertools.product(*(range(min(n, size) + 1) for n in c)):
        if sum(x) == size and sum(v * v / n for v, n in zip(x, c, strict=True)) >= observed - 1e-12:
            p += math.prod(math.comb(n, v) for n, v in zip(c, x, strict=True))
    return p / math.comb(total, size)


def test_the_monte_carlo_chi_square_p_value_is_the_exact_conditional_one_to_its_resolution() -> None:
    # Expected counts of 0.2 to 5.5 in the window's row: the asymptotic p-value (0.042) is too small. The
    # exact p-value of the test conditional on the margins, summed over every table that has them, is 0.0758.
    ref, cur = np.array([30.0, 12, 5, 2, 1, 0, 0]), np.array([3.0, 2, 1, 1, 0, 1, 1])
    assert stats.chi_square_sparse(ref, cur)
    exact = _exact_conditional_p(ref, cur)
    assert exact == pytest.approx(0.0758, abs=1e-4)
    assert stats.chi_square(ref, cur)[1] < 0.05 < exact
    p = stats.chi_square_monte_carlo(ref, cur, 19_999)
    assert abs(p - exact) < 4 * math.sqrt(exact * (1 - exact) / 20_000)
    # Seeded: the same counts give the same p-value, whichever row is the window's.
    assert stats.chi_square_monte_carlo(ref, cur, 19_999) == p
    assert stats.chi_square_monte_carlo(cur, ref, 19_999) == p


def test_a_table_far_from_the_null_gets_the_smallest_monte_carlo_p_value() -> None:
    # A level the reference never had in 15 of 100 rows: no table drawn under the null is as extreme.
    rng = np.random.default_rng(0)
    shares = 1 / np.arange(1, 301)
    ref = np.append(rng.multinomial(4_000, shares / shares.sum()), 0).astype(float)
    cur = np.append(rng.multinomial(85, shares / shares.sum()), 15).astype(float)
    assert stats.chi_square_sparse(ref, cur)
    assert stats.chi_square_monte_carlo(ref, cur, 1_399) == 1 / 1_400


def test_a_table_is_sparse_when_more_than_a_fifth_of_its_expected_counts_are_below_5_or_one_below_1() -> None:
    # Rows of 1,000 and 100: a column of 22 expects 20 and 2.
    assert not stats.chi_square_sparse(np.array([500.0, 300, 200]), np.array([50.0, 30, 20]))
    # 2 of 10 expected counts below 5 (a fifth, none below 1): not sparse; 3 of 12: sparse.
    assert not stats.chi_square_sparse(np.array([400.0, 300, 260, 20, 20]), np.array([40.0, 30, 26, 2, 2]))
    assert stats.chi_square_sparse(np.array([400.0, 280, 260, 20, 20, 20]), np.array([40.0, 28, 26, 2, 2, 2]))
    # A level in 5 of 1,100 rows expects 0.45 in the window's row.
    assert stats.chi_square_sparse(np.array([500.0, 300, 200, 0]), np.array([45.0, 35, 15, 5]))


def test_monte_carlo_draws_resolve_a_tenth_of_the_bar_up_to_the_cap() -> None:
    bar = 0.05 / 7  # Bonferroni over the demo's 7 features
    assert stats.monte_carlo_draws(bar) == 1_399
    assert bar / 10 >= 1 / (1_399 + 1)  # the smallest p-value
    assert stats.monte_carlo_draws(0.05) == 199
    assert stats.monte_carlo_draws(0.05 / 1_000) == stats.MONTE_CARLO_DRAWS_MAX == 10_000


def test_benjamini_hochberg_adjusts_like_the_step_up_rule() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.2])
    # sorted 0.01, 0.03, 0.04, 0.2 -> 0.04, 0.06, 0.0533, 0.2 -> running min from the top
    assert stats.benjamini_hochberg(p).tolist() == pytest.approx([0.04, 0.05333333, 0.05333333, 0.2])
    assert stats.bonferroni(p).tolist() == pytest.approx([0.04, 0.16, 0.12, 0.8])


@pytest.mark.parametrize(("p", "features"), [(0.05, 43), (0.01, 29)])
def test_benjamini_hochberg_never_rounds_a_p_value_below_its_own(p: float, features: int) -> None:
    # p * m / m rounded just below p: 43 p-values of exactly α = 0.05 came out at 0.049999999999999996, under
    # α, and all 43 features drifted; the Monte Carlo p-value of a sparse table is skipped for a raw p-value
    # at or over α on the ground that no correction lowers one.
    adjusted = stats.benjamini_hochberg(np.full(features, p))
    assert adjusted.tolist() == [p] * features


def test_two_proportion_test_finds_a_clearly_worse_rate() -> None:
    _, p = stats.two_proportion_worse(170, 200, 110, 200)
    assert p < 1e-6
    _, p_same = stats.two_proportion_worse(170, 200, 168, 200)
    assert p_same > 0.3


def test_the_two_proportion_test_with_a_margin_asks_whether_the_gap_is_beyond_it() -> None:
    # The demo's retrained candidate at its second step (2026-12-02): 0.740 against 0.770. Worse, but not
    # shown worse by more than 0.02: the margin is the null's, not a second look at the measured gap.
    _, p_worse_at_all = stats.two_proportion_worse(1759, 2283, 1763, 2383)
    _, p_beyond_margin = stats.two_proportion_worse(1759, 2283, 1763, 2383, margin=0.02)
    assert p_worse_at_all < 0.01 < 0.15 < p_beyond_margin
    z, p = stats.two_proportion_worse(1759, 2283, 1763, 2383, margin=0.02)
    pa, pb = 1759 / 2283, 1763 / 2383
    se = np.sqrt(pa * (1 - pa) / 2283 + pb * (1 - pb) / 2383)
    assert z == pytest.approx((pa - pb - 0.02) / se)
    assert p == pytest.approx(float(norm.sf(z)))
    _, p_far = stats.two_proportion_worse(170, 200, 110, 200, margin=0.02)  # 0.30 worse
    assert p_far < 1e-6


def test_the_two_proportion_test_without_spread_decides_by_the_gap() -> None:
    assert stats.two_proportion_worse(200, 200, 190, 190, margin=0.02)[1] == 1.0  # both perfect
    assert stats.two_proportion_worse(200, 200, 0, 190, margin=0.02)[1] == 0.0  # all right, all wrong


def test_the_welch_test_with_a_ratio_asks_whether_b_is_worse_by_more_than_it() -> None:
    rng = np.random.default_rng(5)
    a = rng.uniform(0.0, 1.0, 2_000)
    b = a * 1.01 + rng.normal(0, 0.01, 2_000)  # 1% worse
    assert stats.welch_greater(a, b, ratio=1.02)[1] > 0.5
    assert stats.welch_greater(a, b * 1.5, ratio=1.02)[1] < 1e-6
    expected = ttest_ind(b, a * 1.02, equal_var=False, alternative="greater")
    assert stats.welch_greater(a, b, ratio=1.02)[1] == pytest.approx(expected.pvalue)


def test_the_threshold_of_a_binned_distance_counts_from_what_sampling_alone_measures() -> None:
    # 300 equally frequent levels, 16,000 reference rows, windows of 2,000: two samples of one population
    # are a Jensen–Shannon divergence of about (K - 1) / 8 * (1/n + 1/m) apart, a distance of 0.146, so a
    # threshold of 0.1 counts from there; PSI's floor is about (K - 1) * (1/n + 1/m).
    reference = np.full(300, 16_000 / 300)
    floor = 299 / 8 * (1 / 2_000 + 1 / 16_000)
    raised = stats.jensen_shannon_threshold_at(0.1, reference, 2_000)
    assert raised == pytest.approx(math.sqrt(0.1**2 + floor), rel=0.02)
    assert raised == stats.jensen_shannon_threshold_at(0.1, reference, 2_000)  # seeded: one answer
    # (more where a window leaves levels empty: each is PSI's smoothed share of 1e-4)
    assert 0.1 + 8 * floor < stats.psi_threshold_at(0.1, reference, 2_000) < 0.1 + 10 * floor
    # A few levels, a large window: the floor is nothing next to the threshold.
    assert stats.jensen_shannon_threshold_at(0.1, np.array([8_000.0, 5_000, 3_000]), 5_000) < 0.1006
