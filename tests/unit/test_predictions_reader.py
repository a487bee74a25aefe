"""The fast reader of PredictionsLogged agrees with full validation: the same payload, or None (never a
payload full validation would refuse, never a different value)."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from contracts.predictions import (
    PredictionColumns,
    PredictionsLogged,
    read_prediction_columns,
    read_predictions_logged,
)


def payload(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "churn",
        "model_version": 3,
        "variant": "canary",
        "rollout_id": "r-1",
        "request_id": "req-1",
        "predicted_at": "2026-11-28T07:00:00.123456Z",
        "latency_ms": 1.5,
        "rows": [
            {
                "prediction_id": "p-1",
                "entity_key": "c-9",
                "inputs": {"tenure": 14, "charges": 70.5, "plan": "basic", "senior": True, "gap": None},
                "output": {"prediction": 1, "probabilities": {"0": 0.25, "1": 0.75}},
            },
            {
                "prediction_id": "p-2",
                "inputs": {"tenure": -1, "plan": "pro ü"},
                "output": {"prediction": "yes"},
            },
            {
                "prediction_id": "p-3",
                "entity_key": None,
                "inputs": {},
                "output": {"prediction": 2.5, "probabilities": None},
            },
        ],
    }
    body.update(overrides)
    return body


def full(value: bytes) -> PredictionsLogged | None:
    try:
        return PredictionsLogged.model_validate_json(value)
    except ValidationError:
        return None


def _types(values: Any) -> list[type]:
    return [type(v) for v in values]


def assert_columns_agree(value: bytes) -> PredictionColumns | None:
    """The columnar reader's answer is None or exactly the columns of what full validation gives (values
    and their types: 1, 1.0 and True are equal but not the same input)."""
    fast = read_prediction_columns(value)
    if fast is None:
        return None
    slow = full(value)
    assert slow is not None, f"the columnar reader accepted what full validation refuses: {value[:200]!r}"
    expected = PredictionColumns.of(slow)
    assert fast == expected
    assert type(fast.variant) is type(expected.variant)
    assert type(fast.model_version) is int and type(fast.latency_ms) is float
    assert fast.predicted_at.tzinfo is not None and fast.predicted_at == expected.predicted_at
    assert list(fast.inputs) == list(expected.inputs)
    for name, column in fast.inputs.items():
        assert _types(column) == _types(expected.inputs[name]), name
    assert _types(fast.predictions) == _types(expected.predictions)
    for a, b in zip(fast.probabilities, expected.probabilities, strict=True):
        assert _types((a or {}).values()) == _types((b or {}).values())
    return fast


def assert_agrees(value: bytes) -> PredictionsLogged | None:
    """The reader's answer is None or exactly what full validation gives; the columnar reader's too, and
    both readers take the fast path on the same values."""
    columns = assert_columns_agree(value)
    fast = read_predictions_logged(value)
    assert (columns is None) == (fast is None), f"the readers disagree on {value[:200]!r}"
    if fast is None:
        return None
    slow = full(value)
    assert slow is not None, f"the reader accepted what full validation refuses: {value[:200]!r}"
    assert fast == slow
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_fields_set == slow.model_fields_set
    for a, b in zip(fast.rows, slow.rows, strict=True):
        assert a.model_fields_set == b.model_fields_set
        assert a.output.model_fields_set == b.output.model_fields_set
        assert [type(v) for v in a.inputs.values()] == [type(v) for v in b.inputs.values()]
    return fast


def test_a_well_formed_payload_is_read_as_full_validation_reads_it() -> None:
    value = orjson.dumps(payload())
    fast = assert_agrees(value)
    assert fast is not None
    assert isinstance(fast, PredictionsLogged)
    assert fast.rows[0].inputs["senior"] is True


def test_a_payload_built_by_the_model_is_read_on_the_fast_path() -> None:
    built = PredictionsLogged.model_validate(payload())
    fast = assert_agrees(built.model_dump_json().encode())
    assert fast == built


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p["rows"][0]["inputs"].update(bad=[1, 2]),
        lambda p: p["rows"][0]["inputs"].update(bad={"x": 1}),
        lambda p: p["rows"][0].update(extra=1),
        lambda p: p["rows"][0].pop("prediction_id"),
        lambda p: p["rows"][0].update(prediction_id=""),
        lambda p: p["rows"][0].update(prediction_id=7),
        lambda p: p["rows"][0].update(entity_key=5),
        lambda p: p["rows"][0].pop("inputs"),
        lambda p: p["rows"][0].update(inputs=[1]),
        lambda p: p["rows"][0].pop("output"),
        lambda p: p["rows"][0]["output"].update(prediction=None),
        lambda p: p["rows"][0]["output"].pop("prediction"),
        lambda p: p["rows"][0]["output"].update(extra=1),
        lambda p: p["rows"][0]["output"].update(probabilities={"1": "half"}),
        lambda p: p["rows"][0]["output"].update(probabilities=[0.5]),
        lambda p: p["rows"][0]["output"].update(prediction=[1]),
        lambda p: p.update(rows=[]),
        lambda p: p.update(rows={"a": 1}),
        lambda p: p.pop("rows"),
        lambda p: p["rows"].append(5),
        lambda p: p.update(model="Not A Name!"),
        lambda p: p.update(model_version=0),
        lambda p: p.update(variant="blue"),
        lambda p: p.update(predicted_at="2026-11-28T07:00:00"),
        lambda p: p.update(predicted_at="0001-01-01T00:00:00+01:00"),  # no UTC form
        lambda p: p.update(latency_ms=-1),
        lambda p: p.update(request_id=""),
        lambda p: p.update(extra="x"),
        # Ids no consumer can store (contracts.common.Identifier).
        lambda p: p["rows"][1].update(prediction_id="p-2\x00"),
        lambda p: p["rows"][0].update(entity_key="\x00"),
        lambda p: p.update(rollout_id="r-1\x00"),
        lambda p: p.update(request_id="req-1\x00"),
    ],
)
def test_a_payload_full_validation_refuses_is_left_to_it(change: Any) -> None:
    body = payload()
    change(body)
    value = orjson.dumps(body)
    assert full(value) is None
    assert read_predictions_logged(value) is None
    assert read_prediction_columns(value) is None


def test_traffic_data_holding_a_nul_is_read_on_the_fast_paths_as_it_was_sent() -> None:
    body = payload()
    body["rows"][1]["inputs"]["plan\x00"] = "pro\x00"
    body["rows"][1]["output"] = {"prediction": "yes\x00", "probabilities": {"yes\x00": 1.0}}
    value = orjson.dumps(body)
    logged = read_predictions_logged(value)
    assert logged is not None and logged == full(value)
    assert logged.rows[1].inputs["plan\x00"] == "pro\x00"
    assert assert_columns_agree(value) is not None


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.update(model_version="3"),
        lambda p: p.update(model_version=3.0),
        lambda p: p.update(latency_ms="1.5"),
        lambda p: p["rows"][0]["output"].update(probabilities={"0": 0, "1": 1}),
        lambda p: p["rows"][0]["output"].update(probabilities={"1": "0.5"}),
    ],
)
def test_a_payload_full_validation_coerces_is_read_exactly_as_it_coerces(change: Any) -> None:
    body = payload()
    change(body)
    value = orjson.dumps(body)
    assert full(value) is not None
    assert_agrees(value)


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[1, 2]",
        b'{"rows": [{"inputs": {"x": NaN}}]}',
        orjson.dumps(payload()).replace(b"70.5", b"1e400"),
        orjson.dumps(payload()).replace(b"14", b"123456789012345678901234567890"),
    ],
)
def test_values_orjson_cannot_read_are_left_to_full_validation(value: bytes) -> None:
    assert_agrees(value)


JSON_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    "",
    "x",
    [],
    [1],
    {},
    {"a": 1},
    2**70,
    "1",
    1.0,
    "x\x00",
]


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _leaves(v, (*path, i))
    return out


def mutated(base: Any, paths: list[tuple[Any, ...]], rng: random.Random, *, pop_share: float) -> Any:
    """A copy of ``base`` with one to three leaves replaced by random JSON values (or dict keys dropped)."""
    body = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        *parent_path, last = rng.choice(paths)
        parent: Any = body
        try:
            for k in parent_path:
                parent = parent[k]
            if isinstance(parent, dict) and rng.random() < pop_share:
                parent.pop(last, None)
            else:
                parent[last] = copy.deepcopy(rng.choice(JSON_VALUES))
        except (KeyError, IndexError, TypeError):
            continue
    return body


def test_random_mutations_never_make_the_reader_disagree_with_full_validation() -> None:
    rng = random.Random(7)
    base = payload()
    paths = [p for p in _leaves(base) if p]
    read = 0
    for _ in range(3000):
        body = mutated(base, paths, rng, pop_share=0.2)
        value = json.dumps(body).encode()  # orjson cannot write integers beyond 64 bits
        if assert_agrees(value) is not None:
            read += 1
    assert read > 100  # the mutations left a fair share of valid payloads on the fast path


def test_numbers_are_read_to_the_same_value_as_full_validation_reads_them() -> None:
    rng = random.Random(11)
    literals = [repr(rng.uniform(-1e6, 1e6)) for _ in range(200)]
    literals += [repr(rng.random() * 10 ** rng.randint(-320, 308)) for _ in range(200)]
    literals += [str(rng.randint(-(2**80), 2**80)) for _ in range(100)]
    literals += ["".join(rng.choice("0123456789") for _ in range(rng.randint(1, 25))).lstrip("0") or "0"]
    literals += ["18446744073709551615", "18446744073709551616", "-9223372036854775809"]
    literals += ["1E5", "1e-7", "-0.0", "-0.00037415191085327944"]
    for start in range(0, len(literals), 25):
        chunk = literals[start : start + 25]
        inputs = ",".join(f'"f{i}": {lit}' for i, lit in enumerate(chunk))
        body = orjson.dumps(payload()).replace(b'"tenure":14', b'"tenure":14,' + inputs.encode())
        assert read_predictions_logged(body) is None or assert_agrees(body) is not None
        assert full(body) is not None


# --- the columnar reader (monitoring's): per-column checks, no row objects ----------------------------------


def _uniform_payload(rows: int = 4) -> dict[str, Any]:
    return payload(
        rows=[
            {
                "prediction_id": f"p-{i}",
                "inputs": {"a": i, "b": i + 0.5, "c": "x" if i % 2 else None, "d": i % 2 == 0},
                "output": {"prediction": i % 2, "probabilities": {"0": 0.5, "1": 0.5}},
            }
            for i in range(rows)
        ]
    )


def test_columns_of_rows_with_the_same_features_are_their_values_in_row_order() -> None:
    fast = assert_columns_agree(orjson.dumps(_uniform_payload()))
    assert fast is not None
    assert fast.inputs == {
        "a": [0, 1, 2, 3],
        "b": [0.5, 1.5, 2.5, 3.5],
        "c": [None, "x", None, "x"],
        "d": [True, False, True, False],
    }
    assert fast.prediction_ids == ["p-0", "p-1", "p-2", "p-3"]
    assert fast.entity_keys == [None] * 4
    assert fast.predictions == [0, 1, 0, 1] and fast.size == 4
    assert all(type(column) is list for column in fast.inputs.values())


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p["rows"][2]["inputs"].pop("b"),  # a row with fewer features
        lambda p: p["rows"][2]["inputs"].update(e=1),  # a row with one more
        lambda p: p["rows"][2]["inputs"].update(e=p["rows"][2]["inputs"].pop("a")),  # as many, one other
        lambda p: p["rows"][0].update(inputs={}),  # the first row has none
        lambda p: [r.update(inputs={"only": 1.5}) for r in p["rows"]],  # a single feature
        lambda p: p["rows"][3]["inputs"].update(a=2**70),  # an integer beyond 64 bits: left to pydantic
    ],
)
def test_rows_with_different_features_read_as_columns_with_none_where_a_row_lacks_one(change: Any) -> None:
    body = _uniform_payload()
    change(body)
    value = json.dumps(body).encode()
    assert full(value) is not None
    assert_agrees(value)


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p["rows"][-1]["inputs"].update(a=[1]),
        lambda p: p["rows"][-1]["inputs"].update(a={"x": 1}),
        lambda p: p["rows"][-1].update(prediction_id=""),
        lambda p: p["rows"][-1].update(prediction_id=None),
        lambda p: p["rows"][-1].update(prediction_id="p\x00"),
        lambda p: p["rows"][-1].update(entity_key="c-\x00"),
        lambda p: p["rows"][-1].pop("output"),
        lambda p: p["rows"][-1].update(entity_key=1.5),
        lambda p: p["rows"][-1].update(other=None),
        lambda p: p["rows"][-1]["output"].pop("prediction"),
        lambda p: p["rows"][-1]["output"].update(prediction=None),
        lambda p: p["rows"][-1]["output"].update(probabilities={"1": None}),
        lambda p: p["rows"][-1]["output"].update(probabilities="0.5"),
        lambda p: p["rows"][-1]["output"].update(other=1),
        lambda p: p["rows"][-1].update(output=[1]),
        lambda p: p["rows"].append(None),
    ],
)
def test_a_bad_value_in_any_row_makes_the_columnar_reader_leave_the_payload_to_full_validation(
    change: Any,
) -> None:
    body = _uniform_payload()
    change(body)
    value = orjson.dumps(body)
    assert full(value) is None
    assert read_prediction_columns(value) is None


def test_random_mutations_of_many_rows_never_make_the_columnar_reader_disagree() -> None:
    rng = random.Random(23)
    base = _uniform_payload(6)
    paths = [p for p in _leaves(base) if p]
    read = 0
    for _ in range(2000):
        body = mutated(base, paths, rng, pop_share=0.3)
        if assert_agrees(json.dumps(body).encode()) is not None:
            read += 1
    assert read > 100
