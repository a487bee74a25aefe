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

from contracts.predictions import PredictionsLogged, read_predictions_logged


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


def assert_agrees(value: bytes) -> PredictionsLogged | None:
    """The reader's answer is None or exactly what full validation gives."""
    fast = read_predictions_logged(value)
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
        lambda p: p.update(latency_ms=-1),
        lambda p: p.update(request_id=""),
        lambda p: p.update(extra="x"),
    ],
)
def test_a_payload_full_validation_refuses_is_left_to_it(change: Any) -> None:
    body = payload()
    change(body)
    value = orjson.dumps(body)
    assert full(value) is None
    assert read_predictions_logged(value) is None


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


JSON_VALUES: list[Any] = [None, True, False, 0, -1, 1.5, "", "x", [], [1], {}, {"a": 1}, 2**70, "1", 1.0]


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _leaves(v, (*path, i))
    return out


def test_random_mutations_never_make_the_reader_disagree_with_full_validation() -> None:
    rng = random.Random(7)
    base = payload()
    paths = [p for p in _leaves(base) if p]
    read = 0
    for _ in range(3000):
        body = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            *parent_path, last = rng.choice(paths)
            parent: Any = body
            try:
                for k in parent_path:
                    parent = parent[k]
                if isinstance(parent, dict) and rng.random() < 0.2:
                    parent.pop(last, None)
                else:
                    parent[last] = copy.deepcopy(rng.choice(JSON_VALUES))
            except (KeyError, IndexError, TypeError):
                continue
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
