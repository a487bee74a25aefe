"""Prediction log: what a model version answered, for monitoring and the audit trail.

One event type, PredictionsLogged, carries every row of one predict request (1..n rows, all for one model,
version and variant); a single-row request is a batch of one. Per-row events would multiply headers,
ids, inbox rows and audit rows by the batch size on the busiest topic, and one shape means consumers
have one code path. Producers split a request whose event would exceed the size limit
(``contracts.envelope.DEFAULT_MAX_EVENT_BYTES``) into several events.
"""

from __future__ import annotations

import operator
from datetime import datetime
from enum import StrEnum
from itertools import chain
from typing import Any, ClassVar

import orjson
from pydantic import Field, ValidationError, create_model

from contracts.common import (
    ContractModel,
    FeatureValue,
    Identifier,
    Label,
    ModelName,
    ModelVersion,
    UtcDatetime,
)
from contracts.envelope import EventPayload

TOPIC = "mlops.predictions"


class Variant(StrEnum):
    """Which side of a rollout answered."""

    STABLE = "stable"
    CANARY = "canary"
    SHADOW = "shadow"


class PredictionOutput(ContractModel):
    """What the model answered for one row."""

    prediction: Label = Field(description="Predicted class label or regression value.", examples=[1])
    probabilities: dict[str, float] | None = Field(
        default=None,
        description="Class label (as a string) -> probability, for classifiers that give them.",
        examples=[{"0": 0.27, "1": 0.73}],
    )


class PredictionRecord(ContractModel):
    """One scored row: its id, inputs and output."""

    prediction_id: Identifier = Field(
        min_length=1,
        description="Unique id returned to the caller, used to send the ground truth later. A shadow row "
        "carries the id of the served prediction it shadows, so the two can be compared pairwise.",
        examples=["p-01J9Z6M3K2Q8"],
    )
    entity_key: Identifier | None = Field(
        default=None,
        description="Caller's entity id (customer, device, ...), used for sticky routing.",
        examples=["customer-48213"],
    )
    inputs: dict[str, FeatureValue] = Field(
        description="Feature name -> value as the model received it; null for missing (NaN included).",
        examples=[{"tenure_months": 14, "plan": "basic", "monthly_charges": None}],
    )
    output: PredictionOutput = Field(description="What the model answered.")


class PredictionsLogged(EventPayload):
    """A model version answered one predict request (the rows routed to it), with inputs and outputs."""

    event_name: ClassVar[str] = "PredictionsLogged"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="Version that answered.", examples=[7])
    variant: Variant = Field(description="Stable, canary or shadow.", examples=["canary"])
    rollout_id: Identifier | None = Field(
        default=None,
        description="The live rollout, for the canary and shadow rows it routed; none for a request that "
        "named the version.",
        examples=["r-91c2"],
    )
    request_id: Identifier = Field(
        min_length=1, description="Id of the predict request.", examples=["req-7f3a9c"]
    )
    predicted_at: UtcDatetime = Field(description="When the model answered.")
    latency_ms: float = Field(
        ge=0, description="Model time for the whole request, in milliseconds.", examples=[1.8]
    )
    rows: list[PredictionRecord] = Field(min_length=1, description="Every row of the request, in order.")


# --- a fast reader for the busiest topic ----------------------------------------------------------------
#
# Full validation of a PredictionsLogged costs 15-20 µs per row (every input value is tried against the
# FeatureValue union, two models built per row). High-volume consumers (monitoring, audit) read it with
# ``read_predictions_logged`` instead: orjson, the request's own fields validated by pydantic, and the rows
# checked for the exact shape and types the schema allows, built without validating them a second time.
# Anything else — a coercion pydantic would apply, a missing or extra key, a bad type — returns None and goes
# through the full validation, which accepts it or names what is wrong. The rows' ids are Identifiers
# (contracts.common): orjson has already refused any lone surrogate, so one scan for NUL per id is the whole
# of that check; inputs and outputs are traffic data, carried as they are.

_HEAD = create_model(  # type: ignore[call-overload]
    "PredictionsLoggedHead",
    __config__=PredictionsLogged.model_config,
    **{
        name: (info.annotation, info)
        for name, info in PredictionsLogged.model_fields.items()
        if name != "rows"
    },
)
_ROW_KEYS = frozenset(PredictionRecord.model_fields)
_OUTPUT_KEYS = frozenset(PredictionOutput.model_fields)
_FEATURE_TYPES = frozenset({bool, int, float, str, type(None)})
_LABEL_TYPES = frozenset({bool, int, float, str})
_FLOAT = frozenset({float})
# Digits become "0", the point stays, everything else becomes a space: " " and 20 zeros is an integer of 20
# or more digits (a fraction's digits follow a point).
_DIGITS_ONLY = bytes(48 if 48 <= c <= 57 else 46 if c == 46 else 32 for c in range(256))
_LONG_NUMBER = b" " + b"0" * 20


_new = object.__new__
_set = object.__setattr__


def _head_and_rows(value: bytes) -> tuple[Any, list[Any]] | None:
    """The validated head (every field but ``rows``) and the raw rows of a value, or None to leave the
    value to full validation."""
    if _LONG_NUMBER in value.translate(_DIGITS_ONLY):
        # orjson reads integers beyond 64 bits as floats, pydantic as ints: leave those to pydantic.
        return None
    try:
        payload = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if type(payload) is not dict:
        return None
    rows = payload.pop("rows", None)
    if type(rows) is not list or not rows:
        return None
    try:
        return _HEAD.model_validate(payload), rows
    except ValidationError:
        return None


def read_predictions_logged(value: bytes) -> PredictionsLogged | None:
    """What ``PredictionsLogged.model_validate_json(value)`` returns, or None to leave the value to it."""
    parsed = _head_and_rows(value)
    if parsed is None:
        return None
    head, rows = parsed
    records: list[PredictionRecord] = []
    append = records.append
    for row in rows:
        # The checks of PredictionRecord and PredictionOutput, inline: this loop runs once per row.
        if type(row) is not dict or not _ROW_KEYS.issuperset(row):
            return None
        prediction_id = row.get("prediction_id")
        entity_key = row.get("entity_key")
        inputs = row.get("inputs")
        output = row.get("output")
        if (
            type(prediction_id) is not str
            or not prediction_id
            or "\x00" in prediction_id
            or (entity_key is not None and (type(entity_key) is not str or "\x00" in entity_key))
            or type(inputs) is not dict
            or not _FEATURE_TYPES.issuperset(map(type, inputs.values()))
            or type(output) is not dict
            or not _OUTPUT_KEYS.issuperset(output)
            or type(output.get("prediction")) not in _LABEL_TYPES
        ):
            return None
        probabilities = output.get("probabilities")
        if probabilities is not None and (
            type(probabilities) is not dict or not _FLOAT.issuperset(map(type, probabilities.values()))
        ):
            return None
        # Built as model_construct would, minus its per-call bookkeeping.
        out = _new(PredictionOutput)
        _set(out, "__dict__", {"prediction": output["prediction"], "probabilities": probabilities})
        _set(out, "__pydantic_fields_set__", set(output))
        _set(out, "__pydantic_extra__", None)
        _set(out, "__pydantic_private__", None)
        record = _new(PredictionRecord)
        _set(
            record,
            "__dict__",
            {"prediction_id": prediction_id, "entity_key": entity_key, "inputs": inputs, "output": out},
        )
        _set(record, "__pydantic_fields_set__", set(row))
        _set(record, "__pydantic_extra__", None)
        _set(record, "__pydantic_private__", None)
        append(record)
    values = dict(head.__dict__)
    values["rows"] = records
    logged = _new(PredictionsLogged)
    _set(logged, "__dict__", values)
    _set(logged, "__pydantic_fields_set__", {*head.__pydantic_fields_set__, "rows"})
    _set(logged, "__pydantic_extra__", None)
    _set(logged, "__pydantic_private__", None)
    return logged


# --- the same payload as columns, for monitoring --------------------------------------------------------
#
# Monitoring turns every request's rows into per-feature columns anyway. Building a PredictionRecord and a
# PredictionOutput per row only to take them apart again was a third of its decoding time, so its
# predictions subscription reads the payload straight into columns with ``read_prediction_columns``: the
# same checks as ``read_predictions_logged``, made per column (one C-level pass over each column's types)
# instead of per row, and no per-row object. Whatever it cannot prove valid returns None and goes through
# full validation, as with the row reader; ``PredictionColumns.of`` turns a validated payload into the same
# columns.


class PredictionColumns:
    """A PredictionsLogged as columns: the request's own fields, then one list per row field and per feature.

    ``inputs`` has one column per feature that some row carries, in the order of first appearance; a row
    without that feature reads as None there, as a null value does (the row form keeps the difference,
    monitoring does not need it).
    """

    __slots__ = (
        "entity_keys",
        "inputs",
        "latency_ms",
        "model",
        "model_version",
        "predicted_at",
        "prediction_ids",
        "predictions",
        "probabilities",
        "request_id",
        "rollout_id",
        "variant",
    )
    event_name: ClassVar[str] = PredictionsLogged.event_name
    topic: ClassVar[str] = TOPIC

    def __init__(
        self,
        *,
        model: str,
        model_version: int,
        variant: Variant,
        rollout_id: str | None,
        request_id: str,
        predicted_at: datetime,
        latency_ms: float,
        prediction_ids: list[str],
        entity_keys: list[str | None],
        inputs: dict[str, list[FeatureValue]],
        predictions: list[Label],
        probabilities: list[dict[str, float] | None],
    ) -> None:
        self.model = model
        self.model_version = model_version
        self.variant = variant
        self.rollout_id = rollout_id
        self.request_id = request_id
        self.predicted_at = predicted_at
        self.latency_ms = latency_ms
        self.prediction_ids = prediction_ids
        self.entity_keys = entity_keys
        self.inputs = inputs
        self.predictions = predictions
        self.probabilities = probabilities

    @property
    def size(self) -> int:
        """Rows in the request."""
        return len(self.prediction_ids)

    @classmethod
    def of(cls, logged: PredictionsLogged) -> PredictionColumns:
        """The columns of a payload already validated (full validation's answer, or a test's payload)."""
        rows = logged.rows
        names: dict[str, None] = {}
        for r in rows:
            names.update(dict.fromkeys(r.inputs))
        return cls(
            model=logged.model,
            model_version=logged.model_version,
            variant=logged.variant,
            rollout_id=logged.rollout_id,
            request_id=logged.request_id,
            predicted_at=logged.predicted_at,
            latency_ms=logged.latency_ms,
            prediction_ids=[r.prediction_id for r in rows],
            entity_keys=[r.entity_key for r in rows],
            inputs={name: [r.inputs.get(name) for r in rows] for name in names},
            predictions=[r.output.prediction for r in rows],
            probabilities=[r.output.probabilities for r in rows],
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is not PredictionColumns:
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"PredictionColumns(model={self.model!r}, model_version={self.model_version}, size={self.size})"
        )


_DICT = frozenset({dict})
_STR = frozenset({str})
_STR_OR_NONE = frozenset({str, type(None)})
_DICT_OR_NONE = frozenset({dict, type(None)})
_ROW_FIELDS = operator.itemgetter("prediction_id", "inputs", "output")
_PREDICTION = operator.itemgetter("prediction")
_union = set().union


def read_prediction_columns(value: bytes) -> PredictionColumns | None:
    """``PredictionColumns.of(PredictionsLogged.model_validate_json(value))``, or None to leave the value to
    full validation (the checks are those of :func:`read_predictions_logged`, made per column)."""
    parsed = _head_and_rows(value)
    if parsed is None:
        return None
    head, rows = parsed
    if not _DICT.issuperset(map(type, rows)) or not _ROW_KEYS.issuperset(_union(*rows)):
        return None
    try:
        prediction_ids, inputs, outputs = zip(*map(_ROW_FIELDS, rows), strict=True)
    except KeyError:
        return None  # a row without one of its required fields
    entity_keys = [r.get("entity_key") for r in rows]
    if (
        not _STR.issuperset(map(type, prediction_ids))
        or "" in prediction_ids
        or not _STR_OR_NONE.issuperset(map(type, entity_keys))
        # One scan of all the ids for NUL: their Identifier check (orjson has refused lone surrogates).
        or "\x00" in "".join(prediction_ids)
        or "\x00" in "".join(filter(None, entity_keys))
        or not _DICT.issuperset(map(type, inputs))
        or not _DICT.issuperset(map(type, outputs))
        or not _OUTPUT_KEYS.issuperset(_union(*outputs))
    ):
        return None
    try:
        predictions = list(map(_PREDICTION, outputs))
    except KeyError:
        return None
    probabilities = [o.get("probabilities") for o in outputs]
    if (
        not _LABEL_TYPES.issuperset(map(type, predictions))
        or not _DICT_OR_NONE.issuperset(map(type, probabilities))
        or not _FLOAT.issuperset(
            map(type, chain.from_iterable(map(dict.values, filter(None, probabilities))))
        )
    ):
        return None
    columns = _input_columns(inputs)
    if not _FEATURE_TYPES.issuperset(map(type, chain.from_iterable(columns.values()))):
        return None
    h = head.__dict__
    return PredictionColumns(
        model=h["model"],
        model_version=h["model_version"],
        variant=h["variant"],
        rollout_id=h["rollout_id"],
        request_id=h["request_id"],
        predicted_at=h["predicted_at"],
        latency_ms=h["latency_ms"],
        prediction_ids=list(prediction_ids),
        entity_keys=entity_keys,
        inputs=columns,
        predictions=predictions,
        probabilities=probabilities,
    )


def _input_columns(inputs: tuple[dict[str, Any], ...]) -> dict[str, list[Any]]:
    """Per feature, its values across the rows (None where a row lacks it)."""
    names = list(inputs[0])
    n = len(names)
    if n > 1 and all(len(d) == n for d in inputs):
        try:
            # Every row has the same features (the common case): one C call per row, then a transpose.
            return dict(
                zip(
                    names, map(list, zip(*map(operator.itemgetter(*names), inputs), strict=True)), strict=True
                )
            )
        except KeyError:
            pass
    every: dict[str, None] = {}
    for d in inputs:
        every.update(dict.fromkeys(d))
    return {name: [d.get(name) for d in inputs] for name in every}
