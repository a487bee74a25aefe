"""Compiled models: served only when verified against the pipeline, the pipeline otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from libs.artifacts import ArtifactStore, save_model
from libs.modelspec import build_pipeline, spec_from_data
from services.serving.adapters import artifacts
from services.serving.adapters.artifacts import ArtifactModelLoader, compile_or_explain
from services.serving.compiled import CompiledModel, NotCompilable, compile_model
from services.serving.domain import columns_from_records
from services.serving.ports import VersionRecord
from services.serving.routing import ServedModel
from services.training.worker import signature
from tests.unit.serving.fakes import churn_pipeline, churn_signature
from tests.unit.training.data import churn_frame, churn_spec_data

PIPELINE = churn_pipeline()
SIGNATURE = churn_signature()


class Doubling(BaseEstimator, TransformerMixin):
    """A step no converter knows."""

    def fit(self, x: Any, y: Any = None) -> Doubling:
        return self

    def transform(self, x: Any) -> Any:
        return np.asarray(x, dtype=float) * 2


def _rows() -> list[dict[str, Any]]:
    return [
        {"tenure_months": 3.0, "monthly_charges": 80.5, "plan": "basic"},
        {"tenure_months": None, "monthly_charges": 20.0, "plan": "premium"},
        {"tenure_months": 40, "monthly_charges": None, "plan": None},
        {"tenure_months": 70.0, "monthly_charges": 99.9, "plan": "never-seen"},
    ]


def test_a_compiled_model_answers_like_its_pipeline_on_missing_and_unseen_values() -> None:
    compiled = compile_model(PIPELINE, SIGNATURE)
    assert compiled.max_abs_diff <= 1e-5 and compiled.verified_rows > 0
    fast = ServedModel("churn", 1, "k", SIGNATURE, PIPELINE, compiled)
    slow = ServedModel("churn", 1, "k", SIGNATURE, PIPELINE)
    assert (fast.engine, slow.engine) == ("onnxruntime", "scikit-learn")
    columns = columns_from_records(SIGNATURE, _rows())
    got, expected = fast.predict(columns), slow.predict(columns)
    assert got.labels == expected.labels
    assert got.classes == expected.classes
    assert np.abs(np.array(got.probabilities) - np.array(expected.probabilities)).max() <= 1e-5


def test_a_copy_that_disagrees_beyond_the_tolerance_is_refused() -> None:
    # float32 inputs put the copy ~1e-7 away from the pipeline: a tolerance below that must refuse it.
    with pytest.raises(NotCompilable, match="differs by"):
        compile_model(PIPELINE, SIGNATURE, tolerance=1e-12)


def test_a_step_without_a_converter_leaves_the_pipeline_serving_and_says_why() -> None:
    x = ServedModel("churn", 1, "k", SIGNATURE, PIPELINE).frame(
        columns_from_records(SIGNATURE, [r for r in _rows() if None not in r.values()])
    )
    x = x.iloc[:, :2]
    custom = Pipeline([("double", Doubling()), ("model", LogisticRegression())]).fit(x, [0, 1])
    numeric = SIGNATURE.model_copy(update={"features": SIGNATURE.features[:2]})
    compiled, note = compile_or_explain(custom, numeric, enabled=True, tolerance=1e-5)
    assert compiled is None
    assert "no ONNX conversion" in note
    off, why = compile_or_explain(PIPELINE, SIGNATURE, enabled=False, tolerance=1e-5)
    assert off is None and "off" in why


@pytest.mark.parametrize("estimator", ["decision_tree", "hist_gradient_boosting", "random_forest"])
def test_a_tree_model_is_not_compiled_its_pipeline_answers_next_to_a_split_too(estimator: str) -> None:
    # In float32 (the compiled copy's precision) a value next to a split value falls on the other side:
    # another class, with a probability up to 1.0 away, which a random verification sample does not find.
    spec = spec_from_data(churn_spec_data(estimator=estimator, params={}))
    data = churn_frame(600)
    pipeline = build_pipeline(spec).fit(data.drop(columns=["churned"]), data["churned"])
    tree_signature = signature(spec, pipeline, tuple(pipeline.classes_))
    compiled, note = compile_or_explain(pipeline, tree_signature, enabled=True, tolerance=1e-5)
    assert compiled is None
    assert "only linear models are compiled" in note


def _uncompiled() -> float:
    value = REGISTRY.get_sample_value(
        "driftloop_serving_uncompiled_requests_total", {"model": "churn", "version": "7"}
    )
    return value or 0.0


def test_a_category_sent_as_a_number_is_answered_by_the_pipeline_and_counted() -> None:
    # Only a feature whose signature lists no levels takes a number (any other refuses another type than its
    # levels'): the string tensors have no faithful form for it.
    plan = SIGNATURE.features[-1].model_copy(update={"categories": None})
    unlisted = SIGNATURE.model_copy(update={"features": [*SIGNATURE.features[:-1], plan]})
    fast = ServedModel("churn", 7, "k", unlisted, PIPELINE, compile_model(PIPELINE, unlisted))
    columns = columns_from_records(unlisted, [{"tenure_months": 3.0, "monthly_charges": None, "plan": 2}])
    before = _uncompiled()
    got = fast.predict(columns)
    expected = ServedModel("churn", 7, "k", unlisted, PIPELINE).predict(columns)
    assert got == expected
    assert _uncompiled() == before + 1


async def test_the_loader_serves_a_verified_compiled_copy_unless_compiling_is_off(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    key = save_model(store, PIPELINE).sha256
    rec = VersionRecord("churn", 1, artifact_key=key, signature=SIGNATURE)
    served = await ArtifactModelLoader(store).load(rec)
    assert served.engine == "onnxruntime" and served.engine_note == ""
    plain = await ArtifactModelLoader(store, compile_models=False).load(rec)
    assert plain.engine == "scikit-learn" and "off" in plain.engine_note
    columns = columns_from_records(SIGNATURE, _rows())
    assert served.predict(columns).labels == plain.predict(columns).labels


class _OverflowingSession:
    """An ONNX session whose float32 arithmetic overflowed: NaN probabilities for every row."""

    def run(self, outputs: list[str], feeds: dict[str, Any]) -> list[Any]:
        rows = len(next(iter(feeds.values())))
        return [np.full((rows, 2), np.nan, dtype=np.float32)]


def test_a_non_finite_answer_of_the_compiled_copy_is_answered_by_the_pipeline_and_counted() -> None:
    compiled = CompiledModel(_OverflowingSession(), SIGNATURE, "probabilities", 0.0, 0)
    fast = ServedModel("churn", 7, "k", SIGNATURE, PIPELINE, compiled)
    columns = columns_from_records(SIGNATURE, _rows())
    before = _uncompiled()
    assert fast.predict(columns) == ServedModel("churn", 7, "k", SIGNATURE, PIPELINE).predict(columns)
    assert _uncompiled() == before + 1


async def test_a_pipeline_whose_scaler_only_centres_loads_and_is_served(tmp_path: Path) -> None:
    """A StandardScaler fitted with_std=False learned no spread (its scale_ is None): the verification
    sample's reading of it raised TypeError, which failed the load of a model its pipeline serves well."""
    centring = churn_pipeline(with_std=False)
    store = ArtifactStore(str(tmp_path))
    rec = VersionRecord("churn", 1, artifact_key=save_model(store, centring).sha256, signature=SIGNATURE)
    served = await ArtifactModelLoader(store).load(rec)
    assert served.engine == "onnxruntime", served.engine_note
    columns = columns_from_records(SIGNATURE, _rows())
    expected = ServedModel("churn", 1, "k", SIGNATURE, centring).predict(columns)
    assert served.predict(columns).labels == expected.labels


def test_whatever_compiling_raises_the_pipeline_serves_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling is an optimisation: an error of its own never makes a model that loads unservable."""

    def failing(*args: Any, **kwargs: Any) -> CompiledModel:
        raise TypeError("'NoneType' object is not iterable")

    monkeypatch.setattr(artifacts, "compile_model", failing)
    compiled, note = compile_or_explain(PIPELINE, SIGNATURE, enabled=True, tolerance=1e-5)
    assert compiled is None
    assert note == "compiling failed: TypeError: 'NoneType' object is not iterable"


def _fallbacks() -> float:
    return REGISTRY.get_sample_value("driftloop_serving_compile_fallbacks_total") or 0.0


async def test_a_version_its_pipeline_serves_is_counted_once_however_often_it_is_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica that starts a rollout loads the version in its handler, and its routing sync asks the
    loader again (the cached model): one version served by its pipeline, one fallback counted and logged."""

    def refused(*args: Any, **kwargs: Any) -> CompiledModel:
        raise NotCompilable("no converter")

    monkeypatch.setattr(artifacts, "compile_model", refused)
    store = ArtifactStore(str(tmp_path))
    rec = VersionRecord("churn", 1, artifact_key=save_model(store, PIPELINE).sha256, signature=SIGNATURE)
    loader = ArtifactModelLoader(store)
    before = _fallbacks()
    first = await loader.load(rec)
    again = await loader.load(rec)
    assert first.engine == again.engine == "scikit-learn" and again.engine_note == "no converter"
    assert _fallbacks() == before + 1
