"""One rule for what a categorical value is, in training, serving (both engines) and monitoring: a value is
one of a feature's levels only as that very JSON value, of the type of the levels (text, integers or
booleans: one type per feature, the training column's). The string "1" is not the integer 1 and true is not
1: serving refuses a value of another type (422 naming the feature), and monitoring never counts one as a
level of the reference. Before this, each part had its own equality: serving took true as the integer level
1 and the model encoded it so while monitoring counted it as new, monitoring took "1" as the integer level 1
while serving and the model took it as unseen, and a text-levelled model refused a request whose values of
a feature were all numbers (422, "ufunc 'isnan' not supported") but answered the same row beside a string."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from contracts.common import ModelSignature
from libs.artifacts import ArtifactStore, load_model
from libs.errors import InvalidInput
from libs.profiles import ReferenceProfile
from services.monitoring.domain import DriftPolicy, ModelReference, judge_feature
from services.serving.compiled import NotCompilable, compile_model
from services.serving.domain import columns_from_records
from services.serving.routing import ServedModel
from services.training.worker import run_training
from tests.unit.training.data import churn_frame, churn_spec, put_frame, run_on_bases

NUMERIC = ["x0", "x1", "x2", "x3"]

COLUMNS: dict[str, Any] = {
    "text": lambda plan: plan,
    "digit-text": lambda plan: plan.map({"basic": "0", "plus": "1", "premium": "2"}),
    "integers": lambda plan: plan.map({"basic": 0, "plus": 1, "premium": 2}).astype("int64"),
    # An integer column with a null is float64 in pandas (1.0): its levels are still the integers.
    "integers-with-null": lambda plan: plan.map({"basic": 0, "plus": 1, "premium": 2}).where(
        plan.index % 50 != 0
    ),
    "booleans": lambda plan: plan == "premium",
}


class Trained:
    """A model trained by the training service on one kind of ``plan`` column, as every part sees it."""

    def __init__(self, tmp_path: Path, kind: str) -> None:
        self.kind = kind
        frame = churn_frame(600)
        frame["plan"] = COLUMNS[kind](frame["plan"])
        store = ArtifactStore(str(tmp_path))
        spec = churn_spec(validation={})
        result = run_training(
            {
                "job_id": f"job-{kind}",
                "model": spec.name,
                "spec_key": store.put(spec.canonical_json()).sha256,
                "datasets": [{"name": "churn-base", "version": 1, "sha256": put_frame(store, frame).key}],
                "artifacts_url": str(tmp_path),
            }
        )
        assert result["ok"], result
        self.signature = ModelSignature.model_validate(result["signature"])
        self.model = load_model(store, result["artifact"]["key"])
        profile = ReferenceProfile.from_bytes(store.get(result["profile"]["key"]))
        self.reference = ModelReference.build("churn", 1, self.signature, {}, profile)
        self.levels = list(self.signature.features[-1].categories or [])

    def record(self, value: Any) -> dict[str, Any]:
        return {**dict.fromkeys(NUMERIC, 0.25), "plan": value}

    def unseen_by_serving(self, value: Any) -> bool:
        return bool(columns_from_records(self.signature, [self.record(value)]).unseen.get("plan"))

    def unseen_by_the_model(self, value: Any) -> bool:
        """Whether the model's one-hot encoding of ``value``, as serving hands it over, is all zeros (an
        unseen level)."""
        served = ServedModel("churn", 1, "k", self.signature, self.model)
        frame = served.frame(columns_from_records(self.signature, [self.record(value)]))
        encoded = self.model.named_steps["preprocess"].transform(frame)
        row = np.asarray(encoded.todense() if hasattr(encoded, "todense") else encoded)[0]
        return not row[len(NUMERIC) :].any()

    def unseen_by_monitoring(self, value: Any) -> bool:
        [plan] = [f for f in self.reference.features if f.name == "plan"]
        return judge_feature(plan, [value] * 50, DriftPolicy()).unseen == 50


@pytest.fixture(scope="module", params=list(COLUMNS))
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return Trained(tmp_path_factory.mktemp(request.param), request.param)


LEVEL_TYPES: dict[str, type] = {
    "text": str,
    "digit-text": str,
    "integers": int,
    "integers-with-null": int,
    "booleans": bool,
}
_TYPE_WORD = {str: "text", int: "integers", bool: "booleans"}


def test_the_signature_lists_the_levels_in_the_type_of_the_training_column(trained: Trained) -> None:
    assert trained.levels and {type(level) for level in trained.levels} == {LEVEL_TYPES[trained.kind]}


# A value of another JSON type than the levels, for each kind of column: "1" and true are not the level 1,
# 1 and 0 are not true and false, 1 is not "1".
OTHER_TYPE: dict[str, list[Any]] = {
    "text": [1, True, 0, 1.0],
    "digit-text": [1, 0, True, 1.0],
    "integers": ["1", True, False, "0", 1.5],
    "integers-with-null": ["1", True, False, 0.5],
    "booleans": [1, 0, "True", "true", 1.0],
}


def test_a_value_of_another_type_than_the_levels_is_refused_by_serving_naming_the_feature(
    trained: Trained,
) -> None:
    kind = trained.kind
    for value in OTHER_TYPE[kind]:
        with pytest.raises(InvalidInput) as err:
            columns_from_records(
                trained.signature, [trained.record(trained.levels[0]), trained.record(value)]
            )
        assert err.value.extra == {"feature": "plan", "reason": "wrong-type", "row": 1}, (kind, value)
        assert "'plan'" in err.value.message and _TYPE_WORD[LEVEL_TYPES[kind]] in err.value.message


def test_monitoring_never_counts_a_value_of_another_type_as_a_level(trained: Trained) -> None:
    # A prediction log written before serving refused them can hold such values.
    kind = trained.kind
    for value in OTHER_TYPE[kind]:
        assert trained.unseen_by_monitoring(value), (kind, value)


def test_values_of_the_levels_type_are_known_or_unseen_alike_in_serving_the_model_and_monitoring(
    trained: Trained,
) -> None:
    kind = trained.kind
    # Booleans have no value of their type that is not a level. A number with no fraction is an integer
    # (JSON has one kind of number: a pandas column of integer codes with a gap writes 1.0).
    unseen_values: dict[type, list[Any]] = {str: ["never-seen"], int: [7, -1, 7.0], bool: []}
    integral = [float(level) for level in trained.levels if LEVEL_TYPES[kind] is int]
    for value, unseen in [
        *((level, False) for level in [*trained.levels, *integral]),
        *((v, True) for v in unseen_values[LEVEL_TYPES[kind]]),
    ]:
        assert trained.unseen_by_serving(value) is unseen, (kind, value)
        assert trained.unseen_by_the_model(value) is unseen, (kind, value)
        assert trained.unseen_by_monitoring(value) is unseen, (kind, value)


def test_both_engines_answer_alike_for_every_level_and_an_unseen_one(trained: Trained) -> None:
    if LEVEL_TYPES[trained.kind] is not str:
        # Only the pipeline answers: there is no second engine to disagree.
        with pytest.raises(NotCompilable, match="numeric categories"):
            compile_model(trained.model, trained.signature)
        return
    compiled = compile_model(trained.model, trained.signature)
    fast = ServedModel("churn", 1, "k", trained.signature, trained.model, compiled)
    slow = ServedModel("churn", 1, "k", trained.signature, trained.model)
    records = [trained.record(v) for v in [*trained.levels, "never-seen", None]]
    columns = columns_from_records(trained.signature, records)
    got, expected = fast.predict(columns), slow.predict(columns)
    assert got.labels == expected.labels
    assert got.probabilities is not None and expected.probabilities is not None
    assert np.abs(np.array(got.probabilities) - np.array(expected.probabilities)).max() <= 1e-5


# --- training: what a categorical column's levels can be ----------------------------------------------------


def test_a_categorical_feature_of_numbers_with_a_fraction_fails_the_run_naming_it(tmp_path: Path) -> None:
    # No request can send 1.5 as a category (a category is text, an integer or a boolean), and the signature
    # listed "1.5", which serving took as known while the model, which learned the number, encoded it as
    # unseen.
    frame = churn_frame(600)
    frame["plan"] = frame["plan"].map({"basic": 1.5, "plus": 2.0, "premium": 3.25})
    result = run_on_bases(tmp_path, frame, spec=churn_spec(validation={}))
    assert not result["ok"] and result["reason"] == "invalid-spec", result
    assert "'plan'" in result["message"] and "1.5" in result["message"], result["message"]
    assert "declare the feature numeric" in result["message"].lower()


def test_training_rows_whose_categories_mix_types_fail_the_run_naming_the_feature(tmp_path: Path) -> None:
    # Two base datasets, one holding the plan as integer codes and one as text: the encoder failed the fit
    # ("Encoders require their input argument must be uniformly strings or numbers").
    codes = churn_frame(600, seed=1)
    codes["plan"] = codes["plan"].map({"basic": 0, "plus": 1, "premium": 2})
    result = run_on_bases(tmp_path, churn_frame(600), codes, spec=churn_spec(validation={}))
    assert not result["ok"] and result["reason"] == "invalid-spec", result
    assert "'plan'" in result["message"] and "integers and text" in result["message"], result["message"]
