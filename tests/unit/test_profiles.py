"""Reference profiles: what training stores and monitoring compares against."""

import numpy as np
import pandas as pd
import pytest

from libs.profiles import ReferenceProfile, bin_counts, build_profile, edge_counts, sorted_bin_counts


def frame(n: int = 2_000, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(10, 2, n)
    x[:50] = np.nan
    return pd.DataFrame({"x": x, "c": rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])})


def test_numeric_profile_bins_hold_every_present_value_and_count_missing() -> None:
    profile = build_profile(frame(), [("x", "numeric"), ("c", "categorical")])
    x = profile.feature("x")
    assert x.kind == "numeric"
    assert x.missing == 50
    assert sum(x.histogram) == x.count == 1_950
    assert len(x.histogram) == len(x.edges) + 1
    # Quantile bins: each holds about a tenth of the data.
    assert max(x.histogram) - min(x.histogram) <= 0.02 * x.count


def test_sample_is_bounded_sorted_and_reproducible() -> None:
    a = build_profile(frame(20_000), [("x", "numeric")], sample_size=500, seed=3).feature("x")
    b = build_profile(frame(20_000), [("x", "numeric")], sample_size=500, seed=3).feature("x")
    assert a.kind == "numeric" and b.kind == "numeric"
    assert len(a.sample) == 500
    assert a.sample == sorted(a.sample) == b.sample


def test_categorical_frequencies_and_round_trip_through_bytes() -> None:
    profile = build_profile(
        frame(), [("c", "categorical")], predictions=pd.Series([0, 1] * 1000), prediction_kind="categorical"
    )
    c = profile.feature("c")
    assert c.kind == "categorical"
    assert set(c.frequencies) == {"a", "b", "c"}
    assert sum(c.frequencies.values()) == 2_000
    assert ReferenceProfile.from_bytes(profile.to_bytes()) == profile


def test_bin_counts_use_right_closed_bins() -> None:
    edges = np.array([1.0, 2.0])
    assert bin_counts(np.array([0.5, 1.0, 1.5, 2.0, 9.0]), edges).tolist() == [2, 2, 1]


def test_histogram_of_the_sorted_values_equals_the_per_value_binning() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(size=5_000), np.full(500, 0.25), rng.integers(0, 4, 800)])
    edges = np.unique(np.quantile(values, np.linspace(0, 1, 11)[1:-1]))
    assert sorted_bin_counts(np.sort(values), edges).tolist() == bin_counts(values, edges).tolist()
    assert sorted_bin_counts(np.sort(values), np.array([])).tolist() == [values.size]


def test_histogram_by_a_pass_per_edge_equals_the_per_value_binning() -> None:
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.normal(size=5_000), np.full(500, 0.25), rng.integers(0, 4, 800)])
    edges = np.unique(np.quantile(values, np.linspace(0, 1, 11)[1:-1]))
    assert edge_counts(values, edges).tolist() == bin_counts(values, edges).tolist()
    assert edge_counts(values, np.array([])).tolist() == [values.size]


def test_numeric_profile_is_the_one_of_the_sorted_values() -> None:
    # Quantiles select, the histogram counts per edge: the same numbers the sorted column gives.
    values = np.random.default_rng(6).exponential(size=3_000).round(1)
    values[:30] = np.nan
    values[30:33] = np.inf
    x = build_profile(pd.DataFrame({"x": values}), [("x", "numeric")], sample_size=100).feature("x")
    assert x.kind == "numeric"
    ordered = np.sort(values[np.isfinite(values)])
    edges = np.unique(np.quantile(ordered, np.linspace(0, 1, 11)[1:-1]))
    assert x.edges == edges.tolist()
    assert x.histogram == sorted_bin_counts(ordered, edges).tolist()
    assert (x.count, x.missing, x.min, x.max) == (ordered.size, 33, ordered[0], ordered[-1])
    assert x.mean == pytest.approx(float(ordered.mean()), rel=1e-12)
