"""The model spec (parsing, errors that name the field, canonical hash) and the training-set policies."""

from __future__ import annotations

import io
import json
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from contracts.common import ArtifactFormat
from contracts.training import FailureReason
from libs import modelspec, profiles
from libs.artifacts import ArtifactStore
from libs.modelspec import (
    CATEGORIES_KEPT_MAX,
    RESERVED_FEATURE_NAMES,
    WINDOW_COLUMNS,
    ModelSpec,
    SpecError,
    build_pipeline,
    kept_categories,
    load_canonical,
    parse_spec,
    spec_from_data,
)
from libs.profiles import NumericProfile, ReferenceProfile
from services.monitoring.export import window_frame
from services.training.worker import (
    PROFILE_MIN_WINDOW_ROWS,
    WEIGHT_COLUMN,
    TrainingError,
    assemble_training_set,
    holdout_mask,
    read_frame,
    run_training,
    split,
)
from tests.unit.test_openapi_errors import ADMIN, answer, conforms
from tests.unit.training.data import (
    churn_frame,
    churn_spec,
    churn_spec_data,
    put_frame,
    regression_frame,
    run_on_bases,
    traffic_window,
)


def test_yaml_and_json_of_the_same_spec_give_the_same_canonical_hash() -> None:
    data = churn_spec_data()
    from_yaml = parse_spec(yaml.safe_dump(data), content_type="application/yaml")
    from_json = parse_spec(json.dumps(data), content_type="application/json")
    reordered = parse_spec(json.dumps(dict(reversed(list(data.items())))), content_type="application/json")
    assert from_yaml.spec_hash() == from_json.spec_hash() == reordered.spec_hash()
    assert (
        json.loads(from_yaml.canonical_json())["retrain"]["training_set"]["mode"] == "all"
    )  # defaults spelled out


@pytest.mark.parametrize(
    ("change", "field", "reason", "words"),
    [
        ({"estimator": "xgboost"}, "estimator", "unknown-estimator", ["xgboost", "random_forest"]),
        ({"estimator": "ridge"}, "estimator", "unknown-estimator", ["no classification variant"]),
        (
            {"params": {"C": 1, "penality": "l2"}},
            "params.penality",
            "invalid-spec",
            ["did you mean 'penalty'"],
        ),
        ({"params": {"random_state": 3}}, "params.random_state", "invalid-spec", ["seed"]),
        ({"target": "x0"}, "target", "invalid-spec", ["also a feature"]),
        (
            {"validation": {"thresholds": {"rmse": 1}}},
            "validation.thresholds.rmse",
            "invalid-spec",
            ["roc_auc"],
        ),
        (
            {"validation": {"slices": {"feature": "plam"}}},
            "validation.slices.feature",
            "unknown-feature",
            ["plan"],
        ),
        ({"holdout_fraction": 0.9}, "holdout_fraction", "invalid-spec", ["0.5"]),
        ({"colour": "blue"}, "colour", "invalid-spec", ["Extra inputs"]),
    ],
)
def test_bad_spec_is_refused_naming_the_field(
    change: dict[str, object], field: str, reason: str, words: list[str]
) -> None:
    with pytest.raises(SpecError) as caught:
        spec_from_data({**churn_spec_data(), **change})
    assert caught.value.field == field
    assert caught.value.reason == reason
    for word in words:
        assert word in caught.value.message


BIG = 10**20  # beyond the 64-bit integers of orjson (the canonical JSON) and asyncpg


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"retrain": {"daily_budget": BIG}}, "retrain.daily_budget", ["less than or equal to 10000"]),
        (
            {"retrain": {"training_set": {"mode": "sliding-window", "window_rows": BIG}}},
            "retrain.training_set.window_rows",
            ["less than or equal to 1000000000"],
        ),
        ({"params": {"C": 1.0, "max_iter": BIG}}, "params.max_iter", ["beyond the 64-bit integers"]),
        (
            {"features": [{"name": "plan", "type": "categorical", "categories": [1, BIG]}]},
            "features.0.categories.1",
            ["beyond the 64-bit integers"],
        ),
        ({"description": "a\x00b"}, "description", ["NUL"]),
        ({"target": "chur\x00ned"}, "target", ["NUL"]),
        ({"features": [{"name": "x\x00", "type": "numeric"}]}, "features.0.name", ["NUL"]),
        ({"params": {"solver": "lbfgs\x00"}}, "params.solver", ["NUL"]),
        ({"params": {"C": float("inf")}}, "params.C", ["not a finite number"]),
        ({"params": {"C": [1.0]}}, "params.C", ["a number, a string, true, false or null"]),
        # scikit-learn's own parameter constraints, in its words
        ({"params": {"C": "abc"}}, "params.C", ["'C' parameter of LogisticRegression", "Got 'abc'"]),
        ({"params": {"C": -3}}, "params.C", ["'C' parameter of LogisticRegression", "Got -3"]),
        (
            {"validation": {"thresholds": {"roc_auc": 5}}},
            "validation.thresholds.roc_auc",
            ["roc_auc lies in [0, 1]"],
        ),
        (
            {"validation": {"thresholds": {"log_loss": -1}}},
            "validation.thresholds.log_loss",
            ["log_loss lies in [0, ∞)"],
        ),
        # A slice's minimum too: on the slice metric, else the champion's, else the task's primary one.
        (
            {"validation": {"slices": {"feature": "plan", "min_value": 75}}},
            "validation.slices.min_value",
            ["roc_auc lies in [0, 1]", "a minimum of 75 is always or never met"],
        ),
        (
            {"validation": {"slices": {"feature": "plan", "metric": "log_loss", "min_value": -1}}},
            "validation.slices.min_value",
            ["log_loss lies in [0, ∞)"],
        ),
        # A window file's own columns, and the fit weights: the feature would be mistaken for them.
        (
            {"features": [{"name": "x0", "type": "numeric"}, {"name": "label", "type": "categorical"}]},
            "features.1.name",
            ["'label' is a reserved column name", "_sample_weight"],
        ),
        (
            {"features": [{"name": "_sample_weight", "type": "numeric"}]},
            "features.0.name",
            ["'_sample_weight' is a reserved column name"],
        ),
        ({"target": "_sample_weight"}, "target", ["reserved"]),
        # A feature's name (and the target's) travels in every event about the model: a 12,000-character
        # one was accepted, and surfaced later as drift windows set aside.
        (
            {"features": [{"name": "reading_" * 1500, "type": "numeric"}], "validation": {}},
            "features.0.name",
            ["'reading_reading_", "(12,000 characters)", "256 characters"],
        ),
        ({"target": "y" * 257}, "target", ["(257 characters)", "256 characters"]),
        # scikit-learn takes any size of ensemble: a forest of 10**9 trees makes every tree object before it
        # fits any, and filled the fit process's memory (the job then lost and retried, max_attempts times).
        (
            {"estimator": "random_forest", "params": {"n_estimators": 10**9}},
            "params.n_estimators",
            ["1,000,000,000", "at most 10,000"],
        ),
        (
            {"estimator": "hist_gradient_boosting", "params": {"max_iter": 10_001}},
            "params.max_iter",
            ["10,001", "at most 10,000"],
        ),
        (
            {"estimator": "random_forest", "params": {"n_jobs": 100_000}},
            "params.n_jobs",
            ["100,000", "at most 256"],
        ),
        # Early stopping keeps its scorer in the model, which skops could not write (RecursionError) and the
        # trusted types would not load: every run with more than 10,000 rows (early stopping "auto") failed.
        (
            {"estimator": "hist_gradient_boosting", "params": {"scoring": "accuracy"}},
            "params.scoring",
            ["'accuracy'", "only 'loss'", "cannot be stored"],
        ),
        (
            {"estimator": "hist_gradient_boosting", "params": {"scoring": None}},
            "params.scoring",
            ["None", "only 'loss'"],
        ),
        # Weights past what the fit's sums hold: hist_gradient_boosting fitted a constant model at 1e40
        # (roc_auc 0.5) and the run completed; random_forest failed at 1e307 (probabilities not summing to 1).
        (
            {"retrain": {"training_set": {"mode": "weighted", "traffic_weight": 1e40}}},
            "retrain.training_set.traffic_weight",
            ["less than or equal to 1000000"],
        ),
        # A cooldown past the calendar made every later trigger fail to say when it ends.
        (
            {"retrain": {"cooldown_seconds": 1e12}},
            "retrain.cooldown_seconds",
            ["less than or equal to 315360000"],
        ),
    ],
)
def test_a_spec_the_store_or_the_estimator_could_not_take_is_refused_naming_the_field(
    change: dict[str, object], field: str, words: list[str]
) -> None:
    with pytest.raises(SpecError) as caught:
        spec_from_data({**churn_spec_data(), **change})
    assert (caught.value.field, caught.value.reason) == (field, "invalid-spec")
    for word in words:
        assert word in caught.value.message


def test_parameters_within_what_a_fit_can_hold_and_store_are_accepted() -> None:
    forest = spec_from_data(
        churn_spec_data(estimator="random_forest", params={"n_estimators": 10_000, "n_jobs": -1})
    )
    assert forest.params == {"n_estimators": 10_000, "n_jobs": -1}
    boosted = spec_from_data(churn_spec_data(estimator="hist_gradient_boosting", params={"max_iter": 10_000}))
    assert boosted.params == {"max_iter": 10_000}
    assert spec_from_data(
        churn_spec_data(
            estimator="hist_gradient_boosting", params={"scoring": "loss", "early_stopping": True}
        )
    ).params == {"scoring": "loss", "early_stopping": True}
    # An iteration limit of an optimiser that stops once it converges holds nothing per iteration.
    assert spec_from_data(churn_spec_data(params={"max_iter": 10**9})).params == {"max_iter": 10**9}


def test_a_spec_stored_before_the_name_bound_is_still_read_but_not_taken_again() -> None:
    """The bound applies where a spec enters (registered, or read for a run), so a stored spec with a longer
    name can still be read to be shown or replaced."""
    data = churn_spec_data(features=[{"name": "x" * 300, "type": "numeric"}], validation={})
    assert ModelSpec.model_validate(data).features[0].name == "x" * 300
    with pytest.raises(SpecError, match="256 characters"):
        spec_from_data(data)
    assert spec_from_data({**data, "features": [{"name": "x" * 256, "type": "numeric"}]})


@pytest.mark.parametrize(
    ("change", "reason", "words"),
    [
        ({"estimator": "xgboost_classic"}, "unknown-estimator", ["unknown estimator 'xgboost_classic'"]),
        ({"params": {"multi_class": "ovr"}}, "invalid-spec", ["has no parameter 'multi_class'"]),
    ],
)
def test_a_stored_spec_this_release_no_longer_accepts_is_read_from_the_store_but_refused_for_a_run(
    change: dict[str, object], reason: str, words: list[str]
) -> None:
    # Stored by an older release, or before a scikit-learn upgrade: the store's copy must stay readable (to
    # be shown, replaced, and to apply its retrain policy); the run refuses it, naming why.
    stored = {**churn_spec().model_dump(mode="json"), **change}
    assert ModelSpec.from_stored(stored).model_dump(mode="json") == stored
    with pytest.raises(SpecError) as caught:
        load_canonical(json.dumps(stored).encode())
    assert caught.value.reason == reason
    for word in words:
        assert word in caught.value.message


def test_a_spec_of_many_features_is_checked_and_a_repeated_one_named() -> None:
    # Each feature's name was counted over the whole list: 8 s for 20,000 features, some 30 s for 40,000,
    # in the API's thread and again on the event loop each time the stored spec was read back (a trigger).
    # Now one pass (about 1 s here); tests assert no wall-clock time, so a slower check shows as a slow suite.
    features = [{"name": f"reading_{i}", "type": "numeric"} for i in range(40_000)]
    body = json.dumps(churn_spec_data(features=features, validation={})).encode()
    spec = parse_spec(body, content_type="application/json", name="churn")
    assert len(ModelSpec.from_stored(spec.model_dump(mode="json")).features) == 40_000
    twice = json.dumps(churn_spec_data(features=[*features, features[17]], validation={})).encode()
    with pytest.raises(SpecError, match=r"features \['reading_17'\] are listed twice"):
        parse_spec(twice, content_type="application/json", name="churn")


def test_a_model_name_too_long_to_name_its_training_and_holdout_datasets_is_refused() -> None:
    # Each run registers <model>-training and <model>-holdout, whose names have at most 128 characters like
    # the model's: a longer model name was accepted, then every run was fitted and could not be completed.
    with pytest.raises(SpecError) as caught:
        spec_from_data(churn_spec_data(name="m" * 120, base_datasets=["churn-base"]))
    assert caught.value.field == "name"
    assert "(120 characters)" in caught.value.message and "119" in caught.value.message
    assert "<model>-training" in caught.value.message
    assert spec_from_data(churn_spec_data(name="m" * 119, base_datasets=["churn-base"])).name == "m" * 119
    with pytest.raises(SpecError, match="119"):
        # The name from the route's path (PUT /v1/models/{model}/spec), which takes up to 128 characters.
        body = {k: v for k, v in churn_spec_data(base_datasets=["churn-base"]).items() if k != "name"}
        parse_spec(json.dumps(body), content_type="application/json", name="m" * 128)


def test_a_base_dataset_listed_twice_is_refused() -> None:
    # Every row twice: nearly every held-out row has its copy among the training rows, so the holdout
    # metrics (and validation's gate on the same holdout) flatter the model.
    with pytest.raises(SpecError) as caught:
        spec_from_data(churn_spec_data(base_datasets=["churn-base", "churn-extra", "churn-base"]))
    assert caught.value.field == "base_datasets.2"
    assert "'churn-base' is listed twice" in caught.value.message


@pytest.mark.parametrize(
    ("categories", "field", "words"),
    [
        ([f"level-{i}" for i in range(1001)], "features.0.categories", ["1,001 categories", "at most 1,000"]),
        (["basic", "p" * 257], "features.0.categories.1", ["(257 characters)", "256 characters"]),
    ],
)
def test_declared_categories_are_bounded_as_the_levels_a_model_keeps(
    categories: list[str], field: str, words: list[str]
) -> None:
    data = churn_spec_data(features=[{"name": "plan", "type": "categorical", "categories": categories}])
    with pytest.raises(SpecError) as caught:
        spec_from_data(data)
    assert caught.value.field == field
    for word in words:
        assert word in caught.value.message


def test_a_model_keeps_every_level_within_the_bounds_as_the_encoder_learns_them() -> None:
    spec = churn_spec()
    assert kept_categories(spec, churn_frame()) == (None, {})


def test_a_model_keeps_the_most_frequent_levels_in_the_encoders_order_and_missing_as_a_level() -> None:
    spec = churn_spec()
    levels = [f"l{i:04d}" for i in range(CATEGORIES_KEPT_MAX + 5)]
    frame = pd.DataFrame(
        {
            # l1004 three times: kept though last in order; of the levels seen once, the first 999 are kept.
            "plan": [*levels, "l1004", "l1004", None, "x" * 300, "x" * 300],
            **{f"x{i}": 0.0 for i in range(4)},
        }
    )
    categories, seen = kept_categories(spec, frame)
    assert seen == {"plan": CATEGORIES_KEPT_MAX + 6}
    assert categories is not None
    [kept] = categories
    assert list(kept[:-1]) == [*levels[: CATEGORIES_KEPT_MAX - 1], "l1004"]
    assert pd.isna(kept[-1])  # a missing value stays a level of its own (not counted, not listed)
    pipeline = build_pipeline(spec, categories).fit(frame[spec.feature_names], [0, 1] * (len(frame) // 2))
    encoder = pipeline.named_steps["preprocess"].named_transformers_["categorical"]
    assert len(encoder.categories_[0]) == len(kept)


def _declaring(plan: dict[str, object]) -> ModelSpec:
    return churn_spec(features=[*({"name": f"x{i}", "type": "numeric"} for i in range(4)), plan])


def test_declared_categories_are_the_levels_the_encoder_keeps_in_the_columns_own_type() -> None:
    # Integer codes with a null are float64 in pandas: the declared integers are given to the encoder as
    # such numbers (sorted, as it needs them), a level absent from the rows included, missing last.
    spec = _declaring({"name": "plan", "type": "categorical", "categories": [3, 1, 2, 9, 1]})
    frame = pd.DataFrame({f"x{i}": 0.0 for i in range(4)} | {"plan": [1.0, 2.0, 3.0, 4.0, np.nan] * 20})
    categories, seen = kept_categories(spec, frame)
    assert categories is not None
    [plan] = categories
    assert plan.dtype == np.float64 and plan[:-1].tolist() == [1.0, 2.0, 3.0, 9.0] and np.isnan(plan[-1])
    assert seen == {"plan": 4}  # 4 is in the rows, not declared: encoded as unseen
    pipeline = build_pipeline(spec, categories).fit(frame[spec.feature_names], [0, 1] * 50)
    encoder = pipeline.named_steps["preprocess"].named_transformers_["categorical"]
    assert encoder.transform(pd.DataFrame({"plan": [4.0]})).sum() == 0
    # Every level of the rows declared: nothing reported.
    spec = _declaring({"name": "plan", "type": "categorical", "categories": ["premium", "basic", "plus"]})
    categories, seen = kept_categories(spec, churn_frame())
    assert categories is not None and list(categories[0]) == ["premium", "basic", "plus"] and seen == {}


@pytest.mark.parametrize(
    ("values", "declared", "words"),
    [
        ([1, 2, 3], ["1", "2"], "'1' is declared as text, but the training values of 'plan' are integers"),
        (["a", "b"], ["a", 2], "'2' is declared as an integer, but the training values of 'plan' are text"),
        (
            [True, False],
            [True, 1],
            "'1' is declared as an integer, but the training values of 'plan' are booleans",
        ),
    ],
)
def test_a_declared_category_of_another_type_than_the_training_values_fails_the_run_as_invalid_spec(
    tmp_path: Path, values: list[object], declared: list[object], words: str
) -> None:
    # It could never match a value: serving would count the model's own levels as unseen and take the
    # declared ones as known.
    store, url = ArtifactStore(str(tmp_path)), str(tmp_path)
    spec = _declaring({"name": "plan", "type": "categorical", "categories": declared})
    frame = churn_frame(300)
    frame["plan"] = [values[i % len(values)] for i in range(len(frame))]
    result = run_training(
        {
            "job_id": "job-declared",
            "model": spec.name,
            "spec_key": store.put(spec.canonical_json()).sha256,
            "datasets": [{"name": "churn-base", "version": 1, "sha256": put_frame(store, frame).key}],
            "artifacts_url": url,
        }
    )
    assert not result["ok"]
    assert result["reason"] == FailureReason.INVALID_SPEC.value
    assert result["message"].startswith("features.4.categories."), result["message"]
    assert words in result["message"], result["message"]


def test_the_reference_profile_keeps_the_levels_the_model_keeps_and_folds_the_rest(tmp_path: Path) -> None:
    # 16,000 training rows of an id-like feature gave a profile of 16,000 frequencies (a 200,000-row one,
    # 200,000) for monitoring to load and compare every window against; the model keeps 1,000 levels.
    store, url = ArtifactStore(str(tmp_path)), str(tmp_path)
    frame = churn_frame(20_000)
    frame["customer"] = [f"customer-{i:06d}" for i in range(len(frame))]
    spec = churn_spec(
        features=[*churn_spec_data()["features"], {"name": "customer", "type": "categorical"}], validation={}
    )
    result = run_training(
        {
            "job_id": "job-ids",
            "model": spec.name,
            "spec_key": store.put(spec.canonical_json()).sha256,
            "datasets": [{"name": "churn-base", "version": 1, "sha256": put_frame(store, frame).key}],
            "artifacts_url": url,
        }
    )
    assert result["ok"], result
    customer = ReferenceProfile.from_bytes(store.get(result["profile"]["key"])).feature("customer")
    assert isinstance(customer, profiles.CategoricalProfile)
    kept = result["signature"]["features"][-1]["categories"]
    assert sorted(customer.frequencies) == sorted(kept) and len(kept) == CATEGORIES_KEPT_MAX
    assert customer.count == 16_000 and customer.other == 16_000 - CATEGORIES_KEPT_MAX
    assert len(json.dumps(customer.model_dump())) < 40_000


def test_a_window_files_own_columns_are_the_reserved_ones() -> None:
    """Training reads monitoring's window files by these names: a feature named like one is refused."""
    assert set(window_frame(None, {}, [], ["x0"]).columns) - {"x0"} == set(WINDOW_COLUMNS)
    assert set(WINDOW_COLUMNS) < RESERVED_FEATURE_NAMES


def test_accepted_specs_always_have_a_canonical_json() -> None:
    spec = spec_from_data(
        churn_spec_data(
            params={"C": 0.5, "max_iter": 2**63 - 1},
            features=[{"name": "plan", "type": "categorical", "categories": [-(2**63), "basic"]}],
            validation={"thresholds": {"roc_auc": 1, "log_loss": 0}},
        )
    )
    assert json.loads(spec.canonical_json())["params"]["max_iter"] == 2**63 - 1


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ("a: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
        ("description: 2025-02-30", "day is out of range for month"),  # PyYAML raises ValueError
        ("seed: !!int abc", "invalid literal for int()"),
        ("description: !!timestamp nope", "not valid YAML"),  # PyYAML raises AttributeError
    ],
)
def test_yaml_that_python_cannot_build_is_a_spec_error(body: str, words: str) -> None:
    with pytest.raises(SpecError, match="the spec is not valid YAML") as caught:
        parse_spec(body, content_type="application/yaml", name="churn")
    assert words in caught.value.message


def test_spec_sent_for_another_model_is_refused() -> None:
    with pytest.raises(SpecError, match="names model 'churn' but was sent for 'fraud'"):
        parse_spec(json.dumps(churn_spec_data()), content_type="application/json", name="fraud")


def test_a_name_that_yaml_aliases_make_huge_is_refused_by_its_type_not_quoted_whole() -> None:
    # Each level lists the one below ten times: 10**6 items from a body of a few hundred bytes (10**9 from
    # three levels more, which the name's repr in the message took minutes and gigabytes to write).
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)
    ]
    body = "anchors:\n" + "".join(f"  {line}\n" for line in levels) + "name: *a5\n"
    with pytest.raises(SpecError) as caught:
        parse_spec(body, content_type="application/yaml", name="churn")
    assert caught.value.field == "name"
    assert caught.value.message == "the spec's name is a list, not text: give 'churn' or leave it out"


def test_a_long_name_of_another_model_is_quoted_short() -> None:
    data = churn_spec_data("x" * 100_000)
    with pytest.raises(SpecError) as caught:
        parse_spec(json.dumps(data), content_type="application/json", name="churn")
    assert caught.value.message == (
        f"the spec names model {'x' * 40!r}… (100,000 characters) but was sent for 'churn'"
    )


def test_a_spec_that_is_not_utf8_text_is_refused_as_a_spec_error() -> None:
    with pytest.raises(SpecError, match="not UTF-8"):
        parse_spec(b"k\x0f\xf4]\x05", content_type="application/yaml", name="churn")


def test_sliding_window_needs_its_size() -> None:
    with pytest.raises(SpecError, match="window_rows"):
        spec_from_data(churn_spec_data(retrain={"training_set": {"mode": "sliding-window"}}))


def test_pipeline_ignores_unseen_categories_and_missing_values() -> None:
    spec = churn_spec()
    model = build_pipeline(spec).fit(churn_frame()[spec.feature_names], churn_frame()["churned"])
    odd = churn_frame(3)[spec.feature_names].copy()
    odd.loc[0, "plan"] = "never-seen"
    odd.loc[1, "x0"] = np.nan
    odd.loc[2, "plan"] = None
    assert model.predict_proba(odd).shape == (3, 2)


def _traffic(rows: int, labelled_share: float = 1.0) -> pd.DataFrame:
    window = traffic_window(churn_frame(rows, seed=9), "churned", labelled_share=labelled_share)
    labelled = window[window["label"].notna()]
    out = labelled[[f"x{i}" for i in range(4)] + ["plan"]].copy()
    out["churned"] = labelled["label"].to_numpy()
    return out.reset_index(drop=True)


def test_all_mode_keeps_base_then_labelled_traffic_with_the_base_label_type() -> None:
    spec = churn_spec()
    base = churn_frame(200)
    traffic = _traffic(100, labelled_share=0.5)
    combined = assemble_training_set(spec, [base], traffic)
    assert len(combined) == 200 + len(traffic)
    assert combined["churned"].dtype == base["churned"].dtype  # 1.0 from JSON becomes 1 again
    assert combined.iloc[200:]["x0"].tolist() == traffic["x0"].tolist()


def test_text_labels_of_a_boolean_target_keep_their_truth_and_the_unconvertible_are_dropped() -> None:
    # The window file holds a mixed label column as text: "True", "False", "1" (docs/monitoring.md).
    spec = churn_spec()
    base = churn_frame(200).assign(churned=lambda f: f["churned"].astype(bool))
    traffic = churn_frame(8, seed=5).drop(columns=["churned"])
    traffic["churned"] = ["False", "True", "1", "0", "false", 0.0, "maybe", "2"]
    combined = assemble_training_set(spec, [base], traffic)
    assert combined["churned"].dtype == bool
    assert combined["churned"].iloc[200:].tolist() == [False, True, True, False, False, False]
    assert combined["x0"].iloc[200:].tolist() == traffic["x0"].iloc[:6].tolist()


def test_labels_of_a_text_target_that_are_no_text_are_read_as_the_text_monitoring_judges_them_by() -> None:
    # A window's label column is of numbers or booleans when every label in it is one (docs/monitoring.md).
    spec = churn_spec()
    base = churn_frame(200).assign(churned=lambda f: f["churned"].map({0: "0", 1: "1"}))
    traffic = churn_frame(5, seed=5).assign(churned=[1, 0.0, True, "1", "maybe"])
    combined = assemble_training_set(spec, [base], traffic)
    assert combined["churned"].iloc[200:].tolist() == ["1", "0", "True", "1", "maybe"]
    assert {type(v) for v in combined["churned"].tolist()} == {str}


def _price_spec() -> ModelSpec:
    return spec_from_data(
        {
            "name": "price",
            "features": [{"name": f"x{i}", "type": "numeric"} for i in range(3)],
            "target": "price",
            "task": "regression",
            "estimator": "linear_regression",
            "seed": 7,
            "base_datasets": ["price-base"],
        }
    )


def test_fractional_regression_labels_widen_an_integer_target_to_float() -> None:
    base = regression_frame(200).assign(price=lambda f: f["price"].round().astype("int64"))  # whole euros
    traffic = regression_frame(3, seed=3).assign(price=[19.75, 20.0, 20.5])
    combined = assemble_training_set(_price_spec(), [base], traffic)
    assert combined["price"].dtype == np.float64
    assert combined["price"].iloc[200:].tolist() == [19.75, 20.0, 20.5]
    assert combined["price"].iloc[:200].tolist() == base["price"].astype(float).tolist()


def test_a_label_that_is_no_exact_class_of_an_integer_target_is_dropped_not_truncated() -> None:
    spec = churn_spec()
    traffic = churn_frame(4, seed=5).assign(churned=[1.0, 0.7, "0", True])
    combined = assemble_training_set(spec, [churn_frame(200)], traffic)
    assert combined["churned"].dtype == np.int64
    assert combined["churned"].iloc[200:].tolist() == [1, 0]
    assert combined["x0"].iloc[200:].tolist() == traffic["x0"].iloc[[0, 2]].tolist()


def test_a_label_past_the_integer_targets_range_is_no_class_and_is_dropped() -> None:
    # A label of 1e300 (serving's feedback takes any number) is a whole number, but no int64: it made the
    # training set's cast overflow, and every retrain on that window failed (fit-error: OverflowError).
    spec = churn_spec()
    traffic = churn_frame(4, seed=5).assign(churned=[1.0, 1e300, 2.0**63, 0])
    combined = assemble_training_set(spec, [churn_frame(200)], traffic)
    assert combined["churned"].dtype == np.int64
    assert combined["churned"].iloc[200:].tolist() == [1, 0]


def test_a_regression_label_past_the_integer_targets_range_widens_it_to_float() -> None:
    # 1e30 is no int64 but within float32's range (a label beyond that is dropped: test_numeric_magnitude).
    base = regression_frame(200).assign(price=lambda f: f["price"].round().astype("int64"))
    traffic = regression_frame(2, seed=3).assign(price=[20.0, 1e30])
    combined = assemble_training_set(_price_spec(), [base], traffic)
    assert combined["price"].dtype == np.float64
    assert combined["price"].iloc[200:].tolist() == [20.0, 1e30]


def test_sliding_window_keeps_the_newest_rows_and_always_the_traffic() -> None:
    spec = churn_spec(retrain={"training_set": {"mode": "sliding-window", "window_rows": 150}})
    combined = assemble_training_set(spec, [churn_frame(200)], _traffic(100))
    assert len(combined) == 150
    assert combined.iloc[50:]["x0"].tolist() == _traffic(100)["x0"].tolist()


def test_weighted_mode_weighs_traffic_rows() -> None:
    spec = churn_spec(retrain={"training_set": {"mode": "weighted", "traffic_weight": 3.0}})
    combined = assemble_training_set(spec, [churn_frame(200)], _traffic(100))
    assert combined[WEIGHT_COLUMN].tolist() == [1.0] * 200 + [3.0] * 100


def test_too_few_rows_or_a_single_class_fail_with_dataset_too_small() -> None:
    spec = churn_spec()
    with pytest.raises(TrainingError) as small:
        assemble_training_set(spec, [churn_frame(30)], _traffic(0))
    assert small.value.reason is FailureReason.DATASET_TOO_SMALL
    one_class = churn_frame(200).assign(churned=1)
    with pytest.raises(TrainingError, match="only one class"):
        assemble_training_set(spec, [one_class], _traffic(0))


@pytest.mark.parametrize("estimator", ["logistic_regression", "random_forest"])
def test_a_class_of_one_row_the_holdout_takes_fails_as_too_small_not_a_model_of_one_class(
    tmp_path: Path, estimator: str
) -> None:
    spec = churn_spec(estimator=estimator, params={})
    frame = churn_frame(200).assign(churned=0)
    # The one row of class 1 where the seeded split holds a row out: the rows fitted are all of class 0.
    frame.loc[int(np.flatnonzero(holdout_mask(200, spec.holdout_fraction, spec.seed))[0]), "churned"] = 1
    outcome = run_on_bases(tmp_path, frame, spec=spec)
    assert outcome["ok"] is False
    assert outcome["reason"] == FailureReason.DATASET_TOO_SMALL.value
    assert outcome["message"].startswith(
        "the rows fitted (the training set but its holdout) hold only one class of 'churned', '0': the "
        "holdout split took every row of '1'; a classifier needs at least two classes"
    )


def test_split_is_seeded_and_stratified() -> None:
    spec = churn_spec()
    frame = churn_frame(1000)
    first_train, first_holdout = split(spec, frame)
    again_train, again_holdout = split(spec, frame)
    pd.testing.assert_frame_equal(first_holdout, again_holdout)
    pd.testing.assert_frame_equal(first_train, again_train)
    assert len(first_holdout) == 200
    assert abs(first_holdout["churned"].mean() - frame["churned"].mean()) < 0.01


def _run(
    store: ArtifactStore,
    url: str,
    base: pd.DataFrame,
    window: pd.DataFrame | None,
    between: tuple[datetime, datetime] | None = None,
) -> ReferenceProfile:
    spec = churn_spec()
    result = run_training(
        {
            "job_id": "job-profile",
            "model": spec.name,
            "spec_key": store.put(spec.canonical_json()).sha256,
            "datasets": [{"name": "churn-base", "version": 1, "sha256": put_frame(store, base).key}],
            "window_key": put_frame(store, window).key if window is not None else None,
            "window_start": between[0].isoformat() if between else None,
            "window_end": between[1].isoformat() if between else None,
            "artifacts_url": url,
        }
    )
    assert result["ok"], result
    return ReferenceProfile.from_bytes(store.get(result["profile"]["key"]))


def test_a_retrain_after_a_shift_profiles_the_window_so_the_new_version_does_not_drift_at_once(
    tmp_path: Path,
) -> None:
    store, url = ArtifactStore(str(tmp_path)), str(tmp_path)
    base = churn_frame(4000, seed=1)
    world_now = churn_frame(PROFILE_MIN_WINDOW_ROWS, seed=2, shift=2.0)
    shifted = traffic_window(world_now, "churned", labelled_share=0.3)
    profile = _run(store, url, base, shifted)
    assert profile.rows == len(shifted)
    x0 = profile.feature("x0")
    assert isinstance(x0, NumericProfile) and x0.mean is not None and x0.mean > 1.5
    assert profile.prediction is not None and profile.prediction.count == len(shifted)


def test_the_older_labelled_rows_the_window_carries_for_training_are_not_profiled(tmp_path: Path) -> None:
    # Monitoring's window file is the window's rows, then the model's older labelled rows (mostly the
    # world before the shift): profiling them too would leave the new version drifting at once.
    store, url = ArtifactStore(str(tmp_path)), str(tmp_path)
    base = churn_frame(4000, seed=1)
    world_before = traffic_window(churn_frame(3000, seed=3), "churned")
    world_now = traffic_window(churn_frame(PROFILE_MIN_WINDOW_ROWS, seed=2, shift=2.0), "churned", seed=1)
    world_now["prediction_id"] = [f"now-{i}" for i in range(len(world_now))]
    world_now["predicted_at"] += timedelta(days=1)
    exported = pd.concat([world_now, world_before], ignore_index=True)
    times = world_now["predicted_at"]
    between = (times.min().to_pydatetime(), times.max().to_pydatetime())

    profile = _run(store, url, base, exported, between)
    assert profile.rows == len(world_now)
    x0 = profile.feature("x0")
    assert isinstance(x0, NumericProfile) and x0.mean is not None and x0.mean > 1.5

    # The window's own rows too few: the training rows, as for a small window.
    late = (between[0] + timedelta(seconds=10), between[1])
    assert _run(store, url, base, exported, late).rows > len(exported)


def test_window_rows_whose_prediction_time_is_no_time_are_outside_the_window_not_a_failed_run(
    tmp_path: Path,
) -> None:
    # A predicted_at of text that is no time (or of mixed types) failed the run with fit-error and pandas'
    # DateParseError (or a TypeError sorting it), naming neither the window nor the column.
    store, url = ArtifactStore(str(tmp_path)), str(tmp_path)
    window = traffic_window(churn_frame(PROFILE_MIN_WINDOW_ROWS + 10, seed=2, shift=2.0), "churned")
    times = window["predicted_at"]
    between = (times.min().to_pydatetime(), times.max().to_pydatetime())
    mixed = window.assign(predicted_at=times.map(lambda t: t.isoformat()))  # times as text, as a CSV has them
    mixed.loc[:9, "predicted_at"] = "yesterday"
    assert _run(store, url, churn_frame(2000, seed=1), mixed, between).rows == PROFILE_MIN_WINDOW_ROWS
    texts = window.assign(predicted_at="not a time")
    # No row within the window's time range: the training rows are profiled, as for a small window.
    assert _run(store, url, churn_frame(2000, seed=1), texts, between).rows > len(window)


def test_without_a_window_or_with_a_small_one_the_training_rows_are_profiled(tmp_path: Path) -> None:
    store, url = ArtifactStore(str(tmp_path)), str(tmp_path)
    base = churn_frame(4000, seed=1)
    small = traffic_window(churn_frame(PROFILE_MIN_WINDOW_ROWS - 1, seed=2, shift=2.0), "churned")
    for window in (None, small):
        profile = _run(store, url, base, window)
        x0 = profile.feature("x0")
        assert isinstance(x0, NumericProfile) and x0.mean is not None and abs(x0.mean) < 0.5
        assert profile.rows > len(small)


def test_a_profile_that_is_not_finite_fails_the_job_naming_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Profiles of finite data are finite (test_profiles); should a statistic still overflow, the job fails
    # rather than store a profile whose JSON says null where monitoring needs a number.
    monkeypatch.setattr(profiles, "_mean_std", lambda values: (float("inf"), 1.0))
    url = f"file://{tmp_path}"
    store = ArtifactStore(url)
    spec = churn_spec()
    result = run_training(
        {
            "job_id": "job-inf",
            "model": spec.name,
            "spec_key": store.put(spec.canonical_json()).sha256,
            "datasets": [
                {"name": "churn-base", "version": 1, "sha256": put_frame(store, churn_frame(300)).key}
            ],
            "artifacts_url": url,
        }
    )
    assert not result["ok"]
    assert result["reason"] == FailureReason.FIT_ERROR.value
    assert "not finite (mean = inf" in result["message"], result["message"]


def test_a_csv_base_file_keeps_na_as_text_in_a_text_column_as_the_registry_does() -> None:
    # A dataset another service registered as CSV: "NA" (Namibia) is a level, a number's NA a gap.
    frame = read_frame(b"country,tenure,churned\nNA,1,0\nUS,NA,1\n,3,0\n", ArtifactFormat.CSV)
    assert frame["country"].tolist()[:2] == ["NA", "US"]
    assert frame["country"].isna().tolist() == [False, False, True]
    assert frame["tenure"].dtype == "float64"
    assert frame["tenure"].isna().tolist() == [False, True, False]


def test_a_csv_target_of_integers_with_a_gap_is_read_as_integers_and_one_written_as_floats_is_not() -> None:
    # pandas reads both as float64; a field written 3 or 3.0 tells which the file holds.
    frame = read_frame(b"tenure,churned\n1,3\n,\n3,NA\n4,7\n", ArtifactFormat.CSV, target="churned")
    assert frame["churned"].dtype == "Int64"
    assert frame["churned"].tolist()[::3] == [3, 7]
    assert frame["churned"].isna().tolist() == [False, True, True, False]
    assert frame["tenure"].dtype == "float64"  # a feature is read as before
    floats = read_frame(b"tenure,churned\n1,3.0\n2,\n4,7\n", ArtifactFormat.CSV, target="churned")
    assert floats["churned"].dtype == "float64"


def test_a_base_file_with_more_columns_trains_like_one_with_only_the_specs(tmp_path: Path) -> None:
    store, url = ArtifactStore(str(tmp_path)), str(tmp_path)
    spec = churn_spec()
    lean = churn_frame(1000)
    wide = lean.assign(customer_id=[f"c{i}" for i in range(len(lean))], signup_score=np.arange(len(lean)))
    parquet = io.BytesIO()
    wide.to_parquet(parquet, index=False)
    assert read_frame(parquet.getvalue(), ArtifactFormat.PARQUET, ["x0", "churned"]).columns.tolist() == [
        "x0",
        "churned",
    ]
    # A column the file lacks: every column is read, so the error can name the nearest one.
    assert "customer_id" in read_frame(parquet.getvalue(), ArtifactFormat.PARQUET, ["x0", "customer"]).columns
    results = []
    for frame in (lean, wide):
        result = run_training(
            {
                "job_id": "job-columns",
                "model": spec.name,
                "spec_key": store.put(spec.canonical_json()).sha256,
                "datasets": [{"name": "churn-base", "version": 1, "sha256": put_frame(store, frame).key}],
                "artifacts_url": url,
            }
        )
        assert result["ok"], result
        results.append(result)
    assert results[0]["metrics"] == results[1]["metrics"]
    assert results[0]["holdout"]["artifact"]["key"] == results[1]["holdout"]["artifact"]["key"]


def test_a_sliding_window_smaller_than_the_rows_a_training_set_needs_is_refused() -> None:
    # Every run kept the window's rows and then failed as dataset-too-small.
    def with_window(rows: int) -> dict[str, object]:
        retrain = {
            "cooldown_seconds": 0,
            "training_set": {"mode": "sliding-window", "window_rows": rows, "min_rows": 100},
        }
        return churn_spec_data(base_datasets=["churn-base"], retrain=retrain)

    with pytest.raises(SpecError) as caught:
        spec_from_data(with_window(99))
    assert caught.value.field == "retrain.training_set.window_rows"
    assert "99 rows is smaller than the 100 rows" in caught.value.message
    assert spec_from_data(with_window(100)).retrain.training_set.window_rows == 100


@pytest.mark.parametrize(
    ("column", "as_text"),
    [
        # Numbers in one base dataset and text in the other: the run failed as "ArrowInvalid: Could not
        # convert '0.19' with type str: tried to convert to double" writing the training set, or, for the
        # target, "Unknown label type: unknown" from the fit: neither said which datasets disagree.
        ("x0", lambda values: values.map(lambda v: f"{v:.2f}")),
        ("churned", lambda values: values.map({0: "no", 1: "yes"})),
    ],
)
def test_base_datasets_that_disagree_on_a_columns_type_fail_the_run_naming_both(
    tmp_path: Path, column: str, as_text: Any
) -> None:
    texts = churn_frame(600, seed=2)
    texts[column] = as_text(texts[column])
    result = run_on_bases(tmp_path, churn_frame(600, seed=1), texts)
    assert result["ok"] is False
    assert result["reason"] == FailureReason.FIT_ERROR.value
    assert result["message"] == (
        f"column {column!r} holds numbers in churn-base-0 v1 and text in churn-base-1 v1: the base datasets "
        "of a model "
        "must give each column one type; upload one of them again, or change the spec's base_datasets"
    )


def test_base_datasets_whose_column_holds_no_value_in_one_train_on_the_others(tmp_path: Path) -> None:
    # A dataset whose target (or a numeric feature) is a text column holding no value at all: joined to
    # the others' numbers, the column became one of objects, and every run failed ("Unknown label type:
    # unknown" for the target, "float() argument must be a string or a real number, not 'NAType'" for the
    # feature).
    unlabelled = churn_frame(600, seed=2)
    unlabelled["churned"] = pd.Series([None] * len(unlabelled), dtype="string")
    unmeasured = churn_frame(600, seed=3)
    unmeasured["x3"] = pd.Series([None] * len(unmeasured), dtype="string")
    booleans = churn_frame(600, seed=4)
    booleans["churned"] = booleans["churned"].astype(bool)
    result = run_on_bases(tmp_path, churn_frame(600, seed=1), unlabelled, unmeasured, booleans)
    assert result["ok"] is True, result
    assert result["train_rows"] + result["holdout"]["rows"] == 1800


SPEC_HEAD = "features:\n  - {name: tenure_months, type: numeric}\ntarget: churned\ntask: classification\n"


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (
            SPEC_HEAD + "estimator: random_forest\nestimator: logistic_regression\n",
            "application/yaml",
            "the spec is not valid YAML: the key 'estimator' is given twice in one mapping (line 6)",
        ),
        (
            '{"features": [{"name": "a", "type": "numeric", "name": "b"}], "target": "churned", '
            '"task": "classification", "estimator": "logistic_regression"}',
            "application/json",
            "the spec is not valid JSON: the key 'name' is given twice in one mapping",
        ),
    ],
)
def test_a_spec_naming_a_key_twice_is_refused_not_its_last_value(
    body: str, content_type: str, message: str
) -> None:
    # PyYAML and orjson keep the last of two equal keys: the spec above trained a logistic regression where
    # its author, reading from the top, saw a random forest.
    with pytest.raises(SpecError) as caught:
        parse_spec(body.encode(), content_type=content_type, name="churn")
    assert caught.value.message.startswith(message), caught.value.message


def test_a_yaml_merge_key_may_be_overridden() -> None:
    body = (
        "features:\n  - &f {name: tenure_months, type: numeric}\n  - {<<: *f, name: monthly_charges}\n"
        "target: churned\ntask: classification\nestimator: logistic_regression\n"
    )
    spec = parse_spec(body.encode(), content_type="application/yaml", name="churn")
    assert [f.name for f in spec.features] == ["tenure_months", "monthly_charges"]


@pytest.mark.parametrize(
    ("estimator", "task", "params", "field", "words"),
    [
        # lbfgs, the default solver, takes no l1 penalty: every run failed as fit-error.
        ("logistic_regression", "classification", {"penalty": "l1"}, "params.penalty", ["penalty='l1'"]),
        (
            "logistic_regression",
            "classification",
            {"C": 0.5, "l1_ratio": 0.5},
            "params.l1_ratio",
            ["l1_ratio=0.5", "Solver lbfgs supports only 'l2' or None penalties"],
        ),
        (
            "random_forest",
            "classification",
            {"oob_score": True, "bootstrap": False, "n_estimators": 10_000},
            "params.oob_score",
            ["oob_score=True and bootstrap=False together", "only available if bootstrap=True"],
        ),
        (
            "ridge",
            "regression",
            {"positive": True, "solver": "svd"},
            "params.positive",
            ["positive=True and solver='svd' together", "does not support positive fitting"],
        ),
        ("ridge", "regression", {"solver": "lbfgs"}, "params.solver", ["only when positive=True"]),
        ("hist_gradient_boosting", "regression", {"loss": "quantile"}, "params.loss", ["quantile must be"]),
    ],
)
def test_parameters_that_can_never_be_fitted_together_are_refused_when_registered(
    estimator: str, task: str, params: dict[str, object], field: str, words: list[str]
) -> None:
    data = churn_spec_data(estimator=estimator, task=task, params=params, validation={})
    with pytest.raises(SpecError) as caught:
        parse_spec(json.dumps(data), content_type="application/json")
    assert (caught.value.field, caught.value.reason) == (field, "invalid-spec")
    assert caught.value.message.startswith(f"{field}: ")
    for word in words:
        assert word in caught.value.message


@pytest.mark.parametrize(
    ("estimator", "task", "params"),
    [
        ("logistic_regression", "classification", {"penalty": "l1", "solver": "liblinear"}),
        ("logistic_regression", "classification", {"l1_ratio": 0.5, "solver": "saga"}),
        # Whether these fit depends on the rows, which a registration does not have: left to the run.
        ("hist_gradient_boosting", "classification", {"early_stopping": True, "validation_fraction": 0.001}),
        ("random_forest", "classification", {"max_samples": 500, "max_features": 50}),
        ("random_forest", "regression", {"criterion": "poisson"}),
        ("hist_gradient_boosting", "regression", {"loss": "gamma"}),
        ("ridge", "regression", {"positive": True}),
    ],
)
def test_parameters_scikit_learn_can_fit_together_are_registered(
    estimator: str, task: str, params: dict[str, object]
) -> None:
    data = churn_spec_data(estimator=estimator, task=task, params=params, validation={})
    assert parse_spec(json.dumps(data), content_type="application/json").params == params


def test_the_fit_that_checks_a_spec_is_bounded_whatever_sizes_it_asks_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probe fit caps trees and iterations and fixes its rows, columns and threads: a spec asking for the
    most trees, threads, iterations and features is checked by a fit of the probe's size (without the caps,
    the forest below took 56 s to register)."""
    fits: list[tuple[str, dict[str, Any], tuple[int, int]]] = []
    real_build = modelspec.build_pipeline

    def spied(spec: ModelSpec) -> Any:
        pipeline = real_build(spec)
        estimator = pipeline.named_steps["estimator"]
        real_fit = estimator.fit

        def fit(x: Any, y: Any, **kw: Any) -> Any:
            fits.append((spec.estimator, estimator.get_params(), x.shape))
            return real_fit(x, y, **kw)

        estimator.fit = fit
        return pipeline

    monkeypatch.setattr(modelspec, "build_pipeline", spied)
    many = [{"name": f"x{i}", "type": "numeric"} for i in range(5_000)]
    specs = [
        churn_spec_data(
            estimator="random_forest",
            params={"n_estimators": 10_000, "n_jobs": 256, "oob_score": True},
            features=many,
            validation={},
        ),
        churn_spec_data(
            estimator="hist_gradient_boosting", params={"max_iter": 10_000, "max_bins": 255}, validation={}
        ),
        churn_spec_data(params={"tol": 0.0, "max_iter": 10**9}, validation={}),
    ]
    for data in specs:
        parse_spec(json.dumps(data), content_type="application/json")
    assert [estimator for estimator, _, _ in fits] == [
        "random_forest",
        "hist_gradient_boosting",
        "logistic_regression",
    ]
    for estimator, params, (rows, columns) in fits:
        assert rows == 2 * modelspec.PROBE_ROWS_PER_CLASS and columns <= 8, (estimator, rows, columns)
        param, most = {
            "random_forest": ("n_estimators", 10),
            "hist_gradient_boosting": ("max_iter", 10),
            "logistic_regression": ("max_iter", 100),
        }[estimator]
        assert params[param] <= most, (estimator, param, params[param])
        assert params.get("n_jobs") in (None, 1), estimator


async def test_registering_parameters_that_can_never_be_fitted_is_a_422_naming_them() -> None:
    """Refused before the spec is stored or a retrain is announced: no database here."""
    data = churn_spec_data(params={"penalty": "l1"}, validation={})
    doc, r = await answer(
        "training",
        "PUT",
        "/v1/models/churn/spec",
        content=json.dumps(data),
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    body = r.json()
    assert (body["field"], body["reason"]) == ("params.penalty", "invalid-spec")
    assert "Solver lbfgs supports only 'l2' or None penalties, got l1 penalty." in body["error"]
    assert conforms(doc, "/v1/models/{model}/spec", "put", r) == []


def test_a_probe_fit_failing_otherwise_than_scikit_learn_refuses_leaves_the_spec_to_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only what a run reports as fit-error (ValueError, TypeError) refuses a spec; any other failure of the
    probe fit cannot judge it, and registration must not become a 500 for it."""

    real_build = modelspec.build_pipeline

    def broken(spec: ModelSpec) -> Any:
        pipeline = real_build(spec)

        def fit(x: Any, y: Any, **kw: Any) -> Any:
            raise MemoryError("the probe's fit could not allocate")

        pipeline.named_steps["estimator"].fit = fit
        return pipeline

    monkeypatch.setattr(modelspec, "build_pipeline", broken)
    data = churn_spec_data(params={"penalty": "l1"}, validation={})
    assert parse_spec(json.dumps(data), content_type="application/json").params == {"penalty": "l1"}


@pytest.mark.parametrize(
    ("estimator", "task", "params"),
    [
        ("logistic_regression", "classification", {"max_iter": 1}),
        ("ridge", "regression", {"solver": "sag", "max_iter": 1}),
    ],
)
def test_what_scikit_learn_warns_of_on_the_probe_fits_rows_stays_out_of_the_log(
    estimator: str, task: str, params: dict[str, object]
) -> None:
    """The probe fit's 32 synthetic rows do not converge in one iteration: scikit-learn's ConvergenceWarning
    about them reached the service's log at every registration, though it says nothing of the user's data."""
    data = churn_spec_data(estimator=estimator, task=task, params=params, validation={})
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        assert parse_spec(json.dumps(data), content_type="application/json").params == params
        warnings.warn("a warning of the service's own", UserWarning, stacklevel=1)

    assert [str(w.message) for w in shown] == ["a warning of the service's own"]
    assert warnings.filters == before
