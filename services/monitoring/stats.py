"""The drift statistics, vectorised with numpy; pure functions, no state, no I/O.

Definitions (bins, smoothing, normalisation) are written down in docs/monitoring.md; the functions here are
the reference for them. Every function takes the reference side in the prepared form monitoring keeps
(sorted sample, bin edges with counts, category counts) so a window is judged without touching the raw
training data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

# The PSI of an empty bin is infinite; an empty bin's share is replaced by this (on either side) instead.
PSI_EMPTY_BIN_SHARE = 1e-4
# scipy.stats.ks_2samp('auto') computes the exact distribution up to this many values per sample.
KS_EXACT_MAX_N = 10_000
# Wasserstein: normalised by the reference standard deviation, but never by less than this (a constant
# reference would otherwise divide by zero), as Evidently does.
WASSERSTEIN_MIN_NORM = 0.001


# --- Kolmogorov–Smirnov ------------------------------------------------------------------------------


def ks_statistic_presorted(reference_sorted: np.ndarray, current: np.ndarray) -> float:
    """Two-sample KS statistic D = sup |F_cur - F_ref| without sorting the current sample.

    Between two consecutive reference values F_ref is constant and F_cur only grows, so the supremum is
    reached at a reference value or just before the next one: counting current values ``<= r_j`` and
    ``< r_j`` (two binary searches into the presorted reference) gives D exactly, ties included.
    """
    m, n = reference_sorted.size, current.size
    if m == 0 or n == 0:
        raise ValueError("KS needs values on both sides")
    # idx_left[i] <= j  <=>  current[i] <= r_j ; idx_right[i] <= j  <=>  current[i] < r_j
    idx_left = np.searchsorted(reference_sorted, current, side="left")
    idx_right = np.searchsorted(reference_sorted, current, side="right")
    cur_le = np.cumsum(np.bincount(idx_left, minlength=m + 1)[:m]) / n  # F_cur(r_j)
    cur_lt = np.cumsum(np.bincount(idx_right, minlength=m + 1)[:m]) / n  # F_cur(r_j-)
    ref_at = np.searchsorted(reference_sorted, reference_sorted, side="right") / m  # F_ref(r_j)
    ref_lt = np.searchsorted(reference_sorted, reference_sorted, side="left") / m  # F_ref(r_j-)
    # On [previous reference value, r_j) F_ref equals F_ref(r_j-) and F_cur climbs from its value at the
    # previous reference value (covered by the first term) to F_cur(r_j-): the second term.
    d = max(float(np.max(np.abs(cur_le - ref_at))), float(np.max(np.abs(cur_lt - ref_lt))))
    # Past the last reference value F_ref = 1 and F_cur only climbs towards it: nothing larger there.
    return d


def ks_pvalue(d: float, n1: int, n2: int) -> float:
    """Two-sided p-value of a two-sample KS statistic, as ``scipy.stats.ks_2samp(method='auto')`` computes it.

    Exact (Hodges' lattice-path count, scipy's own implementation) when both samples have at most 10,000
    values, else the asymptotic Smirnov distribution ``kstwo.sf(d, round(n1*n2/(n1+n2)))``, as scipy does.
    """
    if max(n1, n2) <= KS_EXACT_MAX_N:
        exact = _exact_ks_pvalue(d, n1, n2)
        if exact is not None:
            return exact
    m, n = sorted((float(n1), float(n2)), reverse=True)
    en = m * n / (m + n)
    return float(np.clip(sps.kstwo.sf(d, np.round(en)), 0.0, 1.0))


def _exact_ks_pvalue(d: float, n1: int, n2: int) -> float | None:
    # scipy exposes the exact two-sample distribution only inside ks_2samp; its lattice-path routine is
    # compiled (pythran) and a pure-Python copy would take seconds per test. Using it keeps the p-values
    # identical to scipy's; if a scipy release moves it, the asymptotic formula takes over and the unit
    # test comparing with ks_2samp says so.
    try:
        from scipy.stats._stats_py import _attempt_exact_2kssamp
    except ImportError:  # pragma: no cover - depends on the scipy release
        return None
    g = math.gcd(n1, n2)
    if (n1 // g) >= np.iinfo(np.int32).max / (n2 // g):
        return None
    with np.errstate(all="ignore"):
        success, _, prob = _attempt_exact_2kssamp(n1, n2, g, d, "two-sided")
    if not success:
        return None
    return float(np.clip(prob, 0.0, 1.0))


def ks_test(reference_sorted: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """(D, p-value) of the two-sample KS test; the reference must be sorted."""
    d = ks_statistic_presorted(reference_sorted, current)
    return d, ks_pvalue(d, reference_sorted.size, current.size)


# --- Wasserstein ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WassersteinGrid:
    """A uniform grid over the reference range with the reference CDF at its edges (precomputed once)."""

    lo: float
    hi: float
    bins: int
    reference_cdf: np.ndarray  # F_ref at the bins + 1 grid edges
    reference_std: float

    @staticmethod
    def measurable(sample_sorted: np.ndarray) -> bool:
        """Whether the sample's range and spread fit in a double: values near the double's limits (a
        sentinel of -1.7e308 and one of 1.7e308) overflow both, and the distance would be NaN."""
        if sample_sorted.size == 0:
            return False
        with np.errstate(over="ignore", invalid="ignore"):
            span = sample_sorted[-1] - sample_sorted[0]
            spread = np.std(sample_sorted)
        return bool(np.isfinite(span) and np.isfinite(spread))

    @classmethod
    def from_sample(cls, sample_sorted: np.ndarray, bins: int = 4096) -> WassersteinGrid:
        lo, hi = float(sample_sorted[0]), float(sample_sorted[-1])
        if not (hi - lo) / bins > 0:
            # A constant sample (or one spread over less than a double can split into bins) gets a range of
            # its own, at least a unit and an ulp a bin: a bin's width of 0 made every window value inside
            # the range a negative bin, and the window raised. lo + 1.0 is lo itself from 2**53 up, and
            # (hi - lo) / bins is 0 across a few subnormals. Widened away from the double's limit.
            span = max(1.0, math.ulp(lo) * bins)
            if math.isfinite(lo + span):
                hi = lo + span
            else:
                lo = hi - span
        edges = np.linspace(lo, hi, bins + 1)
        cdf = np.searchsorted(sample_sorted, edges, side="right") / sample_sorted.size
        return cls(lo, hi, bins, cdf, float(np.std(sample_sorted)))


def wasserstein_normed(grid: WassersteinGrid, current: np.ndarray) -> float:
    """First Wasserstein distance between current values and the reference, divided by the reference std.

    W1 = integral |F_cur - F_ref| dx. Outside the reference range it is exact (F_ref is 0 below it and 1
    above it, so the integral is a sum over the current values that fall there). Inside, both CDFs are
    read at the grid edges and integrated with the trapezoid rule, handling a sign change inside a bin;
    the error is at most 2 * (hi - lo) / bins, about 0.05% of the range with 4096 bins. No sort of the
    current values is needed, which is what keeps a 100k-row window fast. Values near the double's limits
    give their true distance when it fits a double (:func:`_mean_of_sum`), else infinity.
    """
    n = current.size
    if n == 0:
        raise ValueError("Wasserstein needs current values")
    width = (grid.hi - grid.lo) / grid.bins
    below = current < grid.lo
    above = current > grid.hi
    with np.errstate(over="ignore"):  # a distance beyond a double is infinite: so is the mean
        outside = np.concatenate((grid.lo - current[below], current[above] - grid.hi))
    tails = _mean_of_sum(outside, n)
    inside = current[~(below | above)]
    idx = np.minimum(((inside - grid.lo) / width).astype(np.int64), grid.bins - 1)
    counts = np.bincount(idx, minlength=grid.bins)
    # F_cur at the grid edges: values below lo count from the first edge on; values equal to an edge
    # fall in the bin to its right, so the edge itself sees them through the right-continuous cumsum of
    # the bin before: the trapezoid treats mass inside a bin as spread over it, which is the error bound.
    # The first edge counts the values equal to lo too, as the reference CDF (side="right") does there:
    # otherwise a point mass at lo (a constant reference and the same constant live) spreads over the
    # first bin and a window identical to the reference measures 0.5 / bins of the range, not 0.
    cur_cdf = np.empty(grid.bins + 1)
    below_share = np.count_nonzero(below) / n
    cur_cdf[0] = below_share + np.count_nonzero(inside == grid.lo) / n
    cur_cdf[1:] = below_share + np.cumsum(counts) / n
    diff = cur_cdf - grid.reference_cdf
    a, b = diff[:-1], diff[1:]
    same_sign = a * b >= 0
    with np.errstate(invalid="ignore", divide="ignore"):
        crossing = (a * a + b * b) / (2.0 * (np.abs(a) + np.abs(b)))
    area = np.where(same_sign, np.abs(a + b) / 2.0, np.nan_to_num(crossing))
    w = tails + float(np.sum(area)) * width
    return w / max(grid.reference_std, WASSERSTEIN_MIN_NORM)


def _mean_of_sum(distances: np.ndarray, n: int) -> float:
    """``sum(distances) / n`` of non-negative distances without overflowing on the way: scaled below 1 by a
    power of two (exact) before summing, so values near the double's limits (a prediction of 1e306 against a
    reference near 0) give their true mean; infinity only when a distance or the mean itself is beyond a
    double (1.7e308 against a reference at -1e300)."""
    if not distances.size:
        return 0.0
    with np.errstate(over="ignore"):
        peak = float(distances.max())
    if not math.isfinite(peak):
        return math.inf
    exponent = math.frexp(peak)[1] if peak > 0 else 0
    mean = float(np.sum(np.ldexp(distances, -exponent))) / n
    try:
        return math.ldexp(mean, exponent)
    except OverflowError:
        return math.inf


# --- binned distances ----------------------------------------------------------------------------------


def psi(reference_counts: np.ndarray, current_counts: np.ndarray) -> float:
    """Population Stability Index: sum (q - p) * ln(q / p) over bins, p reference and q current shares.

    An empty bin's share is replaced by ``PSI_EMPTY_BIN_SHARE`` (1e-4) on the side where it is empty, without
    renormalising; each term stays >= 0, so PSI >= 0 and 0 only for identical shares.
    """
    return float(_psi_rows(reference_counts[None, :], current_counts[None, :])[0])


def _psi_rows(reference_counts: np.ndarray, current_counts: np.ndarray) -> np.ndarray:
    """:func:`psi` of each row of two count matrices."""
    p = reference_counts / np.maximum(reference_counts.sum(axis=1, keepdims=True), 1)
    q = current_counts / np.maximum(current_counts.sum(axis=1, keepdims=True), 1)
    p = np.where(p > 0, p, PSI_EMPTY_BIN_SHARE)
    q = np.where(q > 0, q, PSI_EMPTY_BIN_SHARE)
    return np.sum((q - p) * np.log(q / p), axis=1)


def jensen_shannon(reference_counts: np.ndarray, current_counts: np.ndarray) -> float:
    """Jensen–Shannon distance (square root of the divergence, natural log, in [0, sqrt(ln 2)]).

    No smoothing: with M = (P + Q) / 2, every bin where P or Q has mass has M > 0, and 0 * ln 0 = 0. This is
    scipy.spatial.distance.jensenshannon on the two share vectors, as Evidently computes it.
    """
    js = float(_js_divergence_rows(reference_counts[None, :], current_counts[None, :])[0])
    return math.sqrt(max(js, 0.0))


def _js_divergence_rows(reference_counts: np.ndarray, current_counts: np.ndarray) -> np.ndarray:
    """The Jensen–Shannon divergence (the distance's square) of each row of two count matrices."""
    p = reference_counts / np.maximum(reference_counts.sum(axis=1, keepdims=True), 1)
    q = current_counts / np.maximum(current_counts.sum(axis=1, keepdims=True), 1)
    m = (p + q) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log(p / m), 0.0)
        kl_q = np.where(q > 0, q * np.log(q / m), 0.0)
    return (np.sum(kl_p, axis=1) + np.sum(kl_q, axis=1)) / 2.0


# --- the sampling floor of binned distances -------------------------------------------------------------

SAMPLING_FLOOR_DRAWS = 200
"""Pairs of samples of the reference's shares drawn to measure a binned distance's sampling floor."""


def jensen_shannon_threshold_at(threshold: float, reference_counts: np.ndarray, n: int) -> float:
    """The Jensen–Shannon distance a sample of ``n`` values must reach to be ``threshold`` away from the
    reference beyond what sampling alone measures: ``sqrt(threshold² + floor)``.

    Two samples of one population are not at distance 0: their divergence (the distance's square) is on
    average about ``(K - 1) / 8 * (1/n + 1/m)`` over K bins (m the reference's count), and a shift adds its
    own divergence to that floor. Of a feature of many levels the floor alone passes a threshold of 0.1
    (300 equally frequent levels, 2,000 values: a distance of 0.15 on unshifted data, in every window).
    The floor is the mean divergence of :data:`SAMPLING_FLOOR_DRAWS` pairs of samples drawn from the
    reference's shares, one of its size and one of ``n`` (seeded: the same counts give the same threshold).
    """
    floor = _sampling_floor(_js_divergence_rows, reference_counts, n)
    return math.sqrt(threshold**2 + floor)


def psi_threshold_at(threshold: float, reference_counts: np.ndarray, n: int) -> float:
    """The PSI a sample of ``n`` values must reach to be ``threshold`` from the reference beyond what sampling
    alone measures: the threshold plus the mean PSI of samples of the reference's own shares (as
    :func:`jensen_shannon_threshold_at`; PSI's floor is about ``(K - 1) * (1/n + 1/m)``, more where samples
    leave bins empty)."""
    return threshold + _sampling_floor(_psi_rows, reference_counts, n)


def _sampling_floor(
    distance_rows: Callable[[np.ndarray, np.ndarray], np.ndarray], reference_counts: np.ndarray, n: int
) -> float:
    counts = reference_counts[reference_counts > 0]
    if counts.size < 2 or n < 1:
        return 0.0
    shares = counts / counts.sum()
    rng = np.random.default_rng(0)
    reference = rng.multinomial(round(float(counts.sum())), shares, size=SAMPLING_FLOOR_DRAWS)
    current = rng.multinomial(n, shares, size=SAMPLING_FLOOR_DRAWS)
    return float(np.mean(distance_rows(reference.astype(float), current.astype(float))))


def chi_square(reference_counts: np.ndarray, current_counts: np.ndarray) -> tuple[float, float]:
    """Chi-square test of homogeneity on the 2 x K table (reference counts, current counts).

    Unlike a goodness-of-fit test against the reference shares, it accounts for the reference being a
    sample too, and a category never seen in the reference (expected count 0 under goodness of fit) is
    just a column. Categories empty on both sides are dropped; with two categories it equals the
    two-proportion z-test (chi2 = z^2). Returns (statistic, asymptotic p-value): on a sparse table
    (:func:`chi_square_sparse`) that p-value is too small, and :func:`chi_square_monte_carlo` gives the one
    to trust.
    """
    table = _homogeneity_table(reference_counts, current_counts)
    k = table.shape[1]
    if k < 2 or table[0].sum() == 0 or table[1].sum() == 0:
        return 0.0, 1.0
    expected = _expected_counts(table)
    stat = float(np.sum((table - expected) ** 2 / expected))
    return stat, float(sps.chi2.sf(stat, k - 1))


def _homogeneity_table(reference_counts: np.ndarray, current_counts: np.ndarray) -> np.ndarray:
    table = np.vstack([reference_counts, current_counts]).astype(float)
    return table[:, table.sum(axis=0) > 0]


def _expected_counts(table: np.ndarray) -> np.ndarray:
    return np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()


def chi_square_sparse(reference_counts: np.ndarray, current_counts: np.ndarray) -> bool:
    """Whether the 2 x K table breaks Cochran's rule for the chi-square approximation: more than 20% of its
    expected counts below 5, or any below 1. Its asymptotic p-value is then too small: of a feature of 300
    Zipf levels, unshifted windows of 100 rows had p < 0.05/7 in 12% of windows (nominal 0.7%)."""
    table = _homogeneity_table(reference_counts, current_counts)
    if table.shape[1] < 2 or table[0].sum() == 0 or table[1].sum() == 0:
        return False
    expected = _expected_counts(table)
    return bool(expected.min() < 1 or np.mean(expected < 5) > 0.2)


MONTE_CARLO_DRAWS_PER_BAR = 10
"""Tables a Monte Carlo p-value draws per unit of ``1 / bar``: its smallest value, ``1 / (draws + 1)``, is a
tenth of the bar it is compared with."""
MONTE_CARLO_DRAWS_MAX = 10_000
"""At most this many tables: from a bar of 0.001 down (Bonferroni over more than 50 features at α = 0.05) the
smallest p-value is no longer a tenth of it, and from a bar of 1/10,001 down (more than 500 features) a
Monte Carlo p-value can never pass it."""
# Tables drawn at once: the units drawn of each are held together, this many values at most.
_MONTE_CARLO_CHUNK_VALUES = 1 << 21
# Units are mapped to their columns through a table of this many at most (64 MB), else by a binary search.
_MONTE_CARLO_UNIT_TABLE_MAX = 1 << 24


def monte_carlo_draws(bar: float) -> int:
    """How many tables a Monte Carlo p-value draws to be compared with ``bar`` (the p-value a test must stay
    below after the correction for many tests): ``ceil(10 / bar) - 1``, so that its smallest value,
    ``1 / (draws + 1)``, is at most a tenth of the bar; at most :data:`MONTE_CARLO_DRAWS_MAX`."""
    return max(1, min(MONTE_CARLO_DRAWS_MAX, math.ceil(MONTE_CARLO_DRAWS_PER_BAR / bar) - 1))


def chi_square_monte_carlo(reference_counts: np.ndarray, current_counts: np.ndarray, draws: int) -> float:
    """Monte Carlo p-value of the chi-square test of homogeneity, as R's ``chisq.test(simulate.p.value =
    TRUE)`` computes it: ``(1 + #{simulated statistic >= observed}) / (draws + 1)`` over ``draws`` tables
    drawn under the null with the observed margins (the window's rows drawn without replacement from the
    pooled rows, the reference's the rest): the test conditional on the margins, exact whatever the expected
    counts but for the draws' resolution. Seeded: the same counts give the same p-value. Counts are whole.

    With both margins fixed the statistic of a 2 x K table is ``N² / (s (N - s)) · (Σ x_j² / c_j - s² / N)``
    of either row x (of s rows), c the column totals and N their sum: only that sum varies, and the smaller
    row is the one drawn (a window of 100 rows: 100 units per table, whatever the reference's size).
    """
    table = np.rint(_homogeneity_table(reference_counts, current_counts)).astype(np.int64)
    columns = table.sum(axis=0)
    row = table[1] if table[1].sum() <= table[0].sum() else table[0]
    size = int(row.sum())
    if columns.size < 2 or size == 0 or size == int(columns.sum()):
        return 1.0
    inverse = 1.0 / columns
    observed = float(np.sum(row * row * inverse))
    # Ties (a table drawn equal to the observed one) count as at least as extreme despite rounding, as R does.
    bar = observed * (1.0 - 64.0 * np.finfo(float).eps)
    rng = np.random.default_rng(0)
    per_chunk = max(1, _MONTE_CARLO_CHUNK_VALUES // size)
    extreme = 0
    for start in range(0, draws, per_chunk):
        count = min(per_chunk, draws - start)
        simulated = _fixed_margin_sums(rng, columns, inverse, size, count)
        extreme += int(np.count_nonzero(simulated >= bar))
    return (1 + extreme) / (draws + 1)


def _fixed_margin_sums(
    rng: np.random.Generator, columns: np.ndarray, inverse: np.ndarray, size: int, count: int
) -> np.ndarray:
    """``Σ x_j² / c_j`` of ``count`` rows x of ``size`` units drawn without replacement from the units of the
    columns (``columns[j]`` of column j): a multivariate hypergeometric draw, at O(size) per row.

    Units are drawn with replacement, and each one drawn again in its row is drawn anew until the row's are
    distinct: that is drawing until ``size`` distinct units are seen, which gives every set of them alike (the
    process is the same under any relabelling of the units). numpy's ``multivariate_hypergeometric`` took
    10 to 50 times as long on tables of 300 and 1,000 levels.
    """
    total = int(columns.sum())
    dtype = np.int32 if total < np.iinfo(np.int32).max else np.int64
    units = np.sort(rng.integers(0, total, size=(count, size), dtype=dtype), axis=1)
    rows, block = np.arange(count), units
    while True:
        repeated = block[:, 1:] == block[:, :-1]
        dirty = repeated.any(axis=1)
        if not dirty.any():
            break
        if not dirty.all():
            rows, block, repeated = rows[dirty], block[dirty], repeated[dirty]
        block[:, 1:][repeated] = rng.integers(0, total, size=int(np.count_nonzero(repeated)), dtype=dtype)
        block.sort(axis=1)
        if block is not units:
            units[rows] = block
    column_of: np.ndarray
    if total <= _MONTE_CARLO_UNIT_TABLE_MAX:
        column_of = np.repeat(np.arange(columns.size, dtype=np.int32), columns)[units]  # 5-10x a search
    else:
        column_of = np.searchsorted(np.cumsum(columns), units, side="right")
    # Units are numbered column by column, so each sorted row lists its columns in order: each run of one
    # column within a row is one x_j > 0, and the row of a value is its position // size.
    flat = column_of.ravel()
    boundary = np.empty(flat.size, dtype=bool)
    boundary[0] = True
    np.not_equal(flat[1:], flat[:-1], out=boundary[1:])
    boundary[::size] = True
    starts = np.flatnonzero(boundary)
    runs = np.diff(starts, append=flat.size)
    first_of_row = np.searchsorted(starts, np.arange(0, flat.size, size))
    return np.add.reduceat(runs * runs * inverse[flat[starts]], first_of_row)


# --- corrections for many tests ------------------------------------------------------------------------


def bonferroni(p_values: np.ndarray) -> np.ndarray:
    """Bonferroni-adjusted p-values: min(1, p * m). Controls the family-wise error rate."""
    m = p_values.size
    return np.minimum(p_values * m, 1.0)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (step-up). Controls the false discovery rate."""
    m = p_values.size
    if m == 0:
        return p_values
    order = np.argsort(p_values)
    # m / rank first, as R's p.adjust: a factor of at least 1 never rounds a p-value down (p * m / m could,
    # and 43 p-values of exactly 0.05 came out just below α = 0.05: drift).
    ranked = p_values[order] * (m / np.arange(1, m + 1))
    adjusted_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted_sorted, 1.0)
    return out


# --- comparisons for canary analysis -------------------------------------------------------------------


def two_proportion_worse(
    successes_a: int, n_a: int, successes_b: int, n_b: int, *, margin: float = 0.0
) -> tuple[float, float]:
    """One-sided z-test that rate b is lower than rate a by more than ``margin``: (z, p-value).

    The null hypothesis is a - b <= margin (b at most ``margin`` worse), so a small p-value is evidence
    that b is worse by more than the margin, not merely worse: a candidate a little worse, within the
    margin, is not failed by chance in one of its samples (the non-inferiority test of clinical trials,
    with the unpooled Wald standard error, since the null does not make the rates equal). With both
    rates at 0 or 1 there is no spread: p is 0 when b is lower by more than the margin, else 1."""
    if n_a == 0 or n_b == 0:
        return 0.0, 1.0
    pa, pb = successes_a / n_a, successes_b / n_b
    se = math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
    if se == 0:
        return 0.0, 0.0 if pa - pb > margin else 1.0
    z = (pa - pb - margin) / se
    return z, float(sps.norm.sf(z))


def welch_greater(a: np.ndarray, b: np.ndarray, *, ratio: float = 1.0) -> tuple[float, float]:
    """One-sided Welch t-test that the mean of b is greater than ``ratio`` times the mean of a: (t,
    p-value). A ratio above 1 is a relative margin: b must be worse than a by more than it (a scaled by the
    ratio, its variance with it)."""
    if a.size < 2 or b.size < 2:
        return 0.0, 1.0
    result = sps.ttest_ind(b, a * ratio, equal_var=False, alternative="greater")
    t, p = float(result.statistic), float(result.pvalue)
    if not math.isfinite(p):
        return 0.0, 1.0
    return t, p
