"""The levels a model keeps of a categorical feature, end to end in the pure code: what training fits and
lists in the signature, what serving counts as unseen, and what monitoring's reference profile holds and
counts as unseen must be the same levels."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from contracts.common import ModelSignature
from libs.artifacts import ArtifactStore, load_model
from libs.modelspec import CATEGORIES_KEPT_MAX
from libs.profiles import CategoricalProfile, ReferenceProfile, category_key
from services.monitoring.domain import DriftPolicy, FeatureReference, judge_feature
from services.serving.domain import columns_from_records
from services.training.worker import run_training, split
from tests.unit.training.data import churn_frame, churn_spec, put_frame


def _train(tmp_path: Path, frame: pd.DataFrame, **spec: Any) -> tuple[dict[str, Any], ArtifactStore]:
    store = ArtifactStore(str(tmp_path))
    model_spec = churn_spec(**spec)
    result = run_training(
        {
            "job_id": "job-levels",
            "model": model_spec.name,
            "spec_key": store.put(model_spec.canonical_json()).sha256,
            "datasets": [{"name": "churn-base", "version": 1, "sha256": put_frame(store, frame).key}],
            "artifacts_url": str(tmp_path),
        }
    )
    return result, store


def _features(plan: dict[str, Any], *extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [*({"name": f"x{i}", "type": "numeric"} for i in range(4)), plan, *extra]


def _encoder_levels(model: Any, position: int) -> set[str]:
    encoder = model.named_steps["preprocess"].named_transformers_["categorical"]
    return {
        category_key(level)
        for level in encoder.categories_[position]
        if level is not None and not (isinstance(level, float) and math.isnan(level))
    }


def _unseen_by_serving(signature: ModelSignature, feature: str, value: Any) -> bool:
    record: dict[str, Any] = {f.name: 0.0 for f in signature.features if f.type.value == "numeric"}
    record.update({f.name: None for f in signature.features if f.type.value == "categorical"})
    record[feature] = value
    return bool(columns_from_records(signature, [record]).unseen.get(feature))


def _unseen_by_monitoring(profile: ReferenceProfile, feature: str, value: Any) -> bool:
    reference = FeatureReference.from_profile(profile.feature(feature))
    return judge_feature(reference, [value] * 50, DriftPolicy()).unseen > 0


def test_declared_categories_are_the_levels_the_model_serving_and_monitoring_all_know(
    tmp_path: Path,
) -> None:
    # The training rows hold basic, plus and premium; the spec declares basic, plus and gold. The signature
    # listed the declared ones while the encoder learned the data's: serving counted premium as unseen though
    # the model had learned it, and took gold as known though the model encoded it as unseen, and monitoring
    # (the profile counted every level of the data) took premium as known and gold as unseen.
    plan = {"name": "plan", "type": "categorical", "categories": ["basic", "plus", "gold"]}
    result, store = _train(tmp_path, churn_frame(), features=_features(plan))
    assert result["ok"], result
    signature = ModelSignature.model_validate(result["signature"])
    assert signature.features[-1].categories == ["basic", "plus", "gold"]
    model = load_model(store, result["artifact"]["key"])
    profile = ReferenceProfile.from_bytes(store.get(result["profile"]["key"]))
    known = _encoder_levels(model, 0)
    assert known == {"basic", "plus", "gold"}
    for value in ["basic", "plus", "premium", "gold", "enterprise"]:
        unseen = value not in known
        assert _unseen_by_serving(signature, "plan", value) is unseen, value
        assert _unseen_by_monitoring(profile, "plan", value) is unseen, value
    # premium's rows are in the data but not kept: said so, as for the levels past the bound.
    assert result["categories_seen"] == {"plan": 3}
    # The model learned nothing from them: a premium row scores as an unseen level does.
    rows = pd.DataFrame({"x0": [0.1] * 2, "x1": [0.2] * 2, "x2": [0.0] * 2, "x3": [0.0] * 2})
    rows["plan"] = ["premium", "enterprise"]
    scores = model.predict_proba(rows)
    assert scores[0].tolist() == scores[1].tolist()


def test_learned_and_bounded_levels_are_the_ones_serving_and_monitoring_know(tmp_path: Path) -> None:
    # Without declared categories the same holds: every level learned (plan), and the 1,000 most frequent of
    # an id-like feature (customer) whose other levels are unseen everywhere.
    frame = churn_frame(3000)
    frame["customer"] = [f"c{i:05d}" for i in range(len(frame))]
    frame.loc[:99, "customer"] = "frequent"
    features = _features({"name": "plan", "type": "categorical"}, {"name": "customer", "type": "categorical"})
    result, store = _train(tmp_path, frame, features=features, validation={})
    assert result["ok"], result
    train_rows, _ = split(churn_spec(features=features, validation={}), frame)
    signature = ModelSignature.model_validate(result["signature"])
    model = load_model(store, result["artifact"]["key"])
    profile = ReferenceProfile.from_bytes(store.get(result["profile"]["key"]))
    for position, feature in enumerate(["plan", "customer"]):
        known = _encoder_levels(model, position)
        listed = {category_key(c) for c in signature.features[4 + position].categories or []}
        assert known == listed
        # Levels of the training rows (the reference) that the model does not keep.
        rare = sorted(set(train_rows[feature]) - known)[-3:]
        assert feature == "plan" or rare
        for value in [*sorted(known)[:3], *rare, "never-seen"]:
            unseen = value not in known
            assert _unseen_by_serving(signature, feature, value) is unseen, (feature, value)
            assert _unseen_by_monitoring(profile, feature, value) is unseen, (feature, value)
    customer = profile.feature("customer")
    assert isinstance(customer, CategoricalProfile)
    assert len(customer.frequencies) == CATEGORIES_KEPT_MAX
