"""Reference profiles: what training stores and monitoring compares against."""

from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from sklearn.preprocessing import OneHotEncoder

from libs.modelspec import CATEGORIES_KEPT_MAX, ModelSpec, kept_categories, levels_kept
from libs.profiles import (
    CategoricalProfile,
    ReferenceProfile,
    bin_counts,
    build_profile,
    category_key,
    edge_counts,
    refolded,
    sorted_bin_counts,
)
from tests.unit.training.data import churn_spec


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


def test_a_categorical_profile_keeps_the_models_levels_and_folds_every_other_into_one_bin() -> None:
    # An id-like column of 200,000 distinct values made a profile of 200,000 frequencies that monitoring
    # loaded and compared every window against; the model keeps 1,000 levels, and so does the profile.
    ids = pd.Series([f"id-{i:06d}" for i in range(200_000)] + [None] * 10 + ["id-000001"] * 5)
    kept = {f"id-{i:06d}" for i in range(1_000)} | {"declared-absent"}
    everything = build_profile(pd.DataFrame({"customer": ids}), [("customer", "categorical")])
    unfolded = everything.feature("customer")
    assert unfolded.kind == "categorical" and len(unfolded.frequencies) == 200_000  # no levels given
    profile = build_profile(
        pd.DataFrame({"customer": ids}), [("customer", "categorical")], kept={"customer": kept}
    )
    customer = profile.feature("customer")
    assert customer.kind == "categorical"
    assert set(customer.frequencies) == kept
    assert customer.frequencies["id-000001"] == 6 and customer.frequencies["declared-absent"] == 0
    assert customer.other == 199_000 and customer.missing == 10 and customer.count == 200_005
    assert len(profile.to_bytes()) < 40_000
    assert ReferenceProfile.from_bytes(profile.to_bytes()) == profile


def test_a_profile_written_before_levels_were_folded_loads_with_every_category_listed() -> None:
    written = orjson.loads(build_profile(frame(), [("c", "categorical")]).to_bytes())
    del written["features"][0]["other"]
    c = ReferenceProfile.from_bytes(orjson.dumps(written)).feature("c")
    assert c.kind == "categorical" and c.other is None
    assert set(c.frequencies) == {"a", "b", "c"}


def _old_and_new(
    rows: pd.DataFrame, spec: ModelSpec
) -> tuple[CategoricalProfile, CategoricalProfile, list[Any]]:
    """The customer profile of ``rows`` as training wrote it before categories were folded (every level),
    and as it writes it now (the levels the model keeps), with the levels an old model learned (all of them,
    in the encoder's order: its signature's categories)."""
    categories, _ = kept_categories(spec, rows)
    kept = {
        name: {category_key(level) for level in levels}
        for name, levels in levels_kept(spec, rows, categories).items()
    }
    old = build_profile(rows, spec.feature_types()).feature("customer")
    new = build_profile(rows, spec.feature_types(), kept=kept).feature("customer")
    assert isinstance(old, CategoricalProfile) and isinstance(new, CategoricalProfile)
    learned = OneHotEncoder().fit(rows[["customer"]]).categories_[0].tolist()
    return old, new, learned


def test_an_old_profile_of_more_levels_than_a_model_keeps_is_folded_as_training_folds_one_now() -> None:
    # Integer ids, most of them once: the levels kept among equally frequent ones are the first in the
    # encoder's order (0, 1, 2, ...), not in their text's ("0", "1", "10", "100", ...).
    customers = list(range(3_000)) + list(range(2_500, 2_600)) * 2
    rows = pd.DataFrame({"customer": customers})
    spec = churn_spec(features=[{"name": "customer", "type": "categorical"}], validation={})
    old, new, learned = _old_and_new(rows, spec)
    assert old.other is None and len(old.frequencies) == 3_000
    assert new.other is not None and len(new.frequencies) == CATEGORIES_KEPT_MAX

    assert refolded(old, learned) == new
    assert "899" in new.frequencies and "900" not in new.frequencies and new.frequencies["2500"] == 3


def test_an_old_profile_of_a_model_with_few_levels_keeps_the_models_levels() -> None:
    # Declared categories (or levels learned from fewer rows than the profiled ones): the model's levels,
    # those the profile lacks at 0, as training profiles them now.
    rows = pd.DataFrame({"customer": ["basic"] * 500 + ["plus"] * 300 + [f"id-{i}" for i in range(1_500)]})
    old = build_profile(rows, [("customer", "categorical")]).feature("customer")
    new = build_profile(
        rows, [("customer", "categorical")], kept={"customer": {"basic", "plus", "gold"}}
    ).feature("customer")
    assert isinstance(old, CategoricalProfile)

    folded = refolded(old, ["basic", "plus", "gold"])
    assert folded == new
    assert folded.frequencies == {"basic": 500, "gold": 0, "plus": 300} and folded.other == 1_500


def test_an_old_profile_without_the_models_levels_keeps_its_most_frequent_in_their_texts_order() -> None:
    rows = pd.DataFrame({"customer": ["basic"] * 5 + [f"id-{i:04d}" for i in range(1_500)]})
    old = build_profile(rows, [("customer", "categorical")]).feature("customer")
    assert isinstance(old, CategoricalProfile)

    folded = refolded(old, None)
    assert folded.frequencies == {"basic": 5, **{f"id-{i:04d}": 1 for i in range(CATEGORIES_KEPT_MAX - 1)}}
    assert folded.other == 1_500 - (CATEGORIES_KEPT_MAX - 1)
    assert (folded.count, folded.missing) == (old.count, old.missing)


def test_a_profile_with_the_bin_or_of_at_most_as_many_levels_as_a_model_keeps_is_not_refolded() -> None:
    many = pd.DataFrame({"customer": [f"id-{i:04d}" for i in range(1_500)]})
    folded = build_profile(many, [("customer", "categorical")], kept={"customer": {"id-0001"}}).feature(
        "customer"
    )
    few = pd.DataFrame({"customer": [f"id-{i:04d}" for i in range(CATEGORIES_KEPT_MAX)]})
    unfolded = build_profile(few, [("customer", "categorical")]).feature("customer")
    assert isinstance(folded, CategoricalProfile) and isinstance(unfolded, CategoricalProfile)

    assert refolded(folded, ["id-0001", "id-0002"]) is folded
    assert refolded(unfolded, ["id-0001", "id-0002"]) is unfolded
    assert unfolded.other is None and len(unfolded.frequencies) == CATEGORIES_KEPT_MAX


def test_category_keys_spell_integral_numbers_as_integers_and_keep_booleans_apart() -> None:
    assert [category_key(v) for v in (1, 1.0, np.float64(1.0), np.int64(1), "1")] == ["1"] * 5
    assert [category_key(v) for v in (0.0, -0.0, np.float64(-0.0))] == ["0"] * 3
    assert [category_key(v) for v in (True, np.True_, False)] == ["True", "True", "False"]
    assert [category_key(v) for v in (1.5, "a", float("inf"))] == ["1.5", "a", "inf"]


def test_an_integer_coded_category_with_a_null_is_profiled_under_its_integers() -> None:
    # A null makes pandas hold the codes as float64; serving logs them as JSON integers.
    codes = pd.DataFrame({"store": [1.0, 2.0, np.nan, 2.0, -0.0]})
    profile = build_profile(codes, [("store", "categorical")])
    store = profile.feature("store")
    assert store.kind == "categorical"
    assert store.frequencies == {"0": 1, "1": 1, "2": 2}


def test_boolean_and_integer_categories_are_profiled_apart() -> None:
    flags = pd.DataFrame({"card": pd.Series([True, 1, False, 0, True], dtype=object)})
    profile = build_profile(flags, [("card", "categorical")])
    card = profile.feature("card")
    assert card.kind == "categorical"
    assert card.frequencies == {"0": 1, "1": 1, "False": 1, "True": 2}


def test_a_column_of_the_largest_doubles_of_both_signs_gives_finite_edges_that_load_back() -> None:
    # Interpolating a quantile between -1e308 and 1e308 overflows: the edges are the values themselves.
    profile = build_profile(pd.DataFrame({"x": [1e308, -1e308] * 50}), [("x", "numeric")])
    x = profile.feature("x")
    assert x.kind == "numeric"
    assert x.edges == [-1e308, 1e308] and x.histogram == [50, 50, 0]
    assert ReferenceProfile.from_bytes(profile.to_bytes()) == profile


def test_mean_and_std_of_values_near_the_double_limit_are_finite_and_load_back() -> None:
    profile = build_profile(pd.DataFrame({"x": [1e308] * 5 + [1.7e308] * 5}), [("x", "numeric")])
    x = profile.feature("x")
    assert x.kind == "numeric" and x.mean is not None and x.std is not None
    assert x.mean == pytest.approx(1.35e308) and x.std == pytest.approx(0.35e308)
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
