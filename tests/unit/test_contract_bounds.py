"""Every integer an event carries is bounded by where it ends up, so a larger one is refused at decoding
(dead-lettered as schema-invalid, naming the field) rather than failing a handler later."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest

from contracts.audit import AuditCheckpoint
from contracts.common import PG_BIGINT_MAX, PG_INTEGER_MAX, SEED_MAX
from contracts.datasets import DatasetRegistered
from contracts.envelope import EventPayload, SchemaInvalid, new_event
from contracts.examples import EXAMPLES
from contracts.feedback import GroundTruthReceived
from contracts.monitoring import CanaryVerdict, DataQualityIssue, DriftDetected, PerformanceDegraded
from contracts.registry import ALL_PAYLOADS, EVENT_TYPES
from contracts.rollouts import RolloutPromoted, RolloutRolledBack, RolloutStarted, RolloutStepAdvanced
from contracts.training import TrainingCompleted, TrainingFailed, TrainingStarted
from contracts.validation import ValidationFailed, ValidationPassed
from libs.modelspec import FLOAT32_MAX

INT64_MIN = -(2**63)

TRAFFIC_DATA = {
    ("PredictionsLogged", "PredictionRecord", "inputs"),
    ("PredictionsLogged", "PredictionOutput", "prediction"),
    ("GroundTruthReceived", "GroundTruthReceived", "label"),
}
"""Integers sent by callers and carried exactly (contracts.common: traffic data); monitoring stores those
beyond 64 bits as floats."""


def _unbounded_integers(schema: Any, where: tuple[str, ...]) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    if isinstance(schema, dict):
        if schema.get("type") == "integer" and ("maximum" not in schema or "minimum" not in schema):
            found.append(where)
        for key, item in schema.items():
            found += _unbounded_integers(item, (*where, key))
    elif isinstance(schema, list):
        for item in schema:
            found += _unbounded_integers(item, where)
    return found


@pytest.mark.parametrize("cls", ALL_PAYLOADS, ids=[c.__name__ for c in ALL_PAYLOADS])
def test_every_integer_of_an_event_has_both_bounds_in_its_schema(cls: type[EventPayload]) -> None:
    schema = cls.model_json_schema()
    unbounded = []
    for model, part in [(cls.__name__, schema), *schema.get("$defs", {}).items()]:
        for where in _unbounded_integers(part.get("properties", {}), ()):
            field = where[0]
            if (cls.__name__, model, field) not in TRAFFIC_DATA:
                unbounded.append(f"{model}.{field}")
    assert unbounded == []


def _set(data: Any, path: tuple[str | int, ...], value: Any) -> None:
    for step in path[:-1]:
        data = data[step]
    data[path[-1]] = value


def _decoded(cls: type[EventPayload], path: tuple[str | int, ...], value: Any) -> EventPayload:
    event = new_event(EXAMPLES[cls], source="/driftloop/test")
    _, raw, headers = event.to_kafka()
    data = orjson.loads(raw)
    _set(data, path, value)
    # Python's json writes any integer (orjson stops at 64 bits), as a producer in another language may.
    return EVENT_TYPES.decode(json.dumps(data).encode(), headers).data


BOUNDS: list[tuple[type[EventPayload], tuple[str | int, ...], int]] = [
    # (payload, path in its JSON, highest)
    (AuditCheckpoint, ("sequence",), PG_BIGINT_MAX),  # the trail's seq: bigint
    (AuditCheckpoint, ("row_count",), PG_BIGINT_MAX),
    (DatasetRegistered, ("row_count",), PG_BIGINT_MAX),  # datasets.row_count: bigint
    (DatasetRegistered, ("artifact", "size_bytes"), PG_BIGINT_MAX),
    (TrainingCompleted, ("lineage", "seed"), SEED_MAX),  # numpy and scikit-learn seeds
    (TrainingCompleted, ("lineage", "datasets", 0, "rows"), PG_BIGINT_MAX),  # lineage_datasets.rows
    (TrainingCompleted, ("train_rows",), PG_BIGINT_MAX),  # model_versions.train_rows: bigint
    (TrainingCompleted, ("holdout_rows",), PG_BIGINT_MAX),
    (TrainingCompleted, ("categories_seen", "plan"), PG_BIGINT_MAX),
    (TrainingStarted, ("attempt",), PG_INTEGER_MAX),  # jobs.attempts: integer
    (TrainingFailed, ("attempt",), PG_INTEGER_MAX),
    (DriftDetected, ("window", "size"), PG_INTEGER_MAX),  # monitoring's windows.size: integer
    (DriftDetected, ("reference_size",), PG_BIGINT_MAX),
    (DriftDetected, ("features", 0, "n_current"), PG_BIGINT_MAX),
    (DriftDetected, ("features", 0, "n_reference"), PG_BIGINT_MAX),
    (DriftDetected, ("features", 0, "n_missing"), PG_BIGINT_MAX),
    (DriftDetected, ("features", 0, "consecutive_windows"), PG_BIGINT_MAX),
    (DriftDetected, ("features_total",), PG_BIGINT_MAX),
    (DriftDetected, ("drifted_features_total",), PG_BIGINT_MAX),
    (DataQualityIssue, ("count",), PG_BIGINT_MAX),
    (PerformanceDegraded, ("labelled_rows",), PG_BIGINT_MAX),
    (PerformanceDegraded, ("late_labels",), PG_BIGINT_MAX),
    (CanaryVerdict, ("step_index",), PG_INTEGER_MAX),  # rollouts.step_index: integer
    (CanaryVerdict, ("stable_samples",), PG_BIGINT_MAX),
    (CanaryVerdict, ("canary_samples",), PG_BIGINT_MAX),  # rollouts.samples_seen: bigint
    (RolloutStarted, ("min_samples",), PG_INTEGER_MAX),  # rollouts.min_samples: integer
    (RolloutStepAdvanced, ("step_index",), PG_INTEGER_MAX),
    (RolloutStepAdvanced, ("samples_seen",), PG_BIGINT_MAX),
    (RolloutPromoted, ("steps_completed",), PG_INTEGER_MAX),
    (RolloutRolledBack, ("step_index",), PG_INTEGER_MAX),
    (ValidationPassed, ("checks_total",), PG_INTEGER_MAX),  # validation_reports: integer
    (ValidationFailed, ("failed_checks_total",), PG_INTEGER_MAX),
]


@pytest.mark.parametrize(
    ("cls", "path", "highest"),
    BOUNDS,
    ids=[f"{c.__name__}.{'.'.join(map(str, p))}" for c, p, _ in BOUNDS],
)
def test_an_integer_past_its_bound_is_refused_at_decoding_naming_the_field(
    cls: type[EventPayload], path: tuple[str | int, ...], highest: int
) -> None:
    where = ".".join(map(str, path))
    assert _decoded(cls, path, highest) is not None
    for value in (highest + 1, 2**64, 10**30):
        with pytest.raises(SchemaInvalid, match=f"invalid at {re.escape(where)}:") as caught:
            _decoded(cls, path, value)
        assert caught.value.reason == "schema-invalid"


def test_a_seed_is_one_numpy_and_scikit_learn_take() -> None:
    for value in (0, SEED_MAX):
        assert _decoded(TrainingCompleted, ("lineage", "seed"), value) is not None
    for value in (-1, SEED_MAX + 1):
        with pytest.raises(SchemaInvalid, match=r"invalid at lineage\.seed:"):
            _decoded(TrainingCompleted, ("lineage", "seed"), value)


@pytest.mark.parametrize(
    "path",
    [("signature", "classes", 1), ("lineage", "params", "estimator__max_depth")],
    ids=["classes", "params"],
)
def test_an_integer_a_model_is_stored_with_is_an_int64(path: tuple[str | int, ...]) -> None:
    # The registry writes signatures and parameters to jsonb with orjson, which has no form for more.
    for value in (INT64_MIN, 2**63 - 1):
        assert _decoded(TrainingCompleted, path, value) is not None
    for value in (INT64_MIN - 1, 2**63, 2**70):
        with pytest.raises(SchemaInvalid, match="beyond the 64-bit integers") as caught:
            _decoded(TrainingCompleted, path, value)
        assert caught.value.reason == "schema-invalid"


def test_a_category_is_an_int64() -> None:
    cls = TrainingCompleted
    event = new_event(EXAMPLES[cls], source="/driftloop/test")
    _, raw, headers = event.to_kafka()
    data = orjson.loads(raw)
    data["signature"]["features"][2]["categories"] = [1, 2**63]
    with pytest.raises(SchemaInvalid, match=r"features\.2\.categories: \[1\] is beyond the 64-bit"):
        EVENT_TYPES.decode(json.dumps(data).encode(), headers)
    data["signature"]["features"][2]["categories"] = [1, 2**63 - 1]
    assert EVENT_TYPES.decode(orjson.dumps(data), headers).data.signature.features[2].categories == [
        1,
        2**63 - 1,
    ]


def test_a_numeric_label_beyond_float32_is_refused_at_decoding_naming_the_field() -> None:
    # Another producer may publish labels straight to mlops.feedback: one beyond float32's range is dead-
    # lettered once, for every consumer, rather than making a regression model's window MAE its own.
    for value in (FLOAT32_MAX, -FLOAT32_MAX, 10**38, 1, 42.5, True, "1e39"):
        assert _decoded_label(value) == value
    for value in (1e39, -3.5e38, 1e300, 10**39, 10**400):
        with pytest.raises(SchemaInvalid, match=r"invalid at label: a numeric label must be within float32"):
            _decoded_label(value)


def _decoded_label(value: Any) -> Any:
    decoded = _decoded(GroundTruthReceived, ("label",), value)
    assert isinstance(decoded, GroundTruthReceived)
    return decoded.label
