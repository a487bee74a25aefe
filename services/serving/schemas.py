"""The predict routes' request and response bodies, for the OpenAPI document.

The routes read their bodies with orjson and check them against the model's signature themselves
(services/serving/api.py explains why), so these models are never used to parse a request: they say what
the routes accept and answer, for people, client generators and the HTTP fuzz test. The unit tests check
that the routes' real answers validate against them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.common import Label
from contracts.predictions import Variant

FeatureValue = float | int | str | bool | None


class PredictBody(BaseModel):
    """POST /v1/models/{name}/predict."""

    model_config = ConfigDict(extra="forbid")

    records: list[dict[str, FeatureValue]] = Field(
        description="One object per row: every feature of the model's signature by name. null (or NaN) is a "
        "missing value; +/-Infinity, a number beyond float32's range, an absent or an unknown feature is "
        "refused with 422.",
        examples=[[{"tenure_months": 12, "monthly_charges": 70.5, "contract": "monthly"}]],
    )
    entity_keys: list[str | None] | None = Field(
        default=None,
        description="One key (or null) per record: a key always sees the same variant of a canary rollout.",
    )


class Prediction(BaseModel):
    prediction_id: str = Field(description="Send it back with the ground truth (POST /v1/feedback).")
    prediction: Label = Field(description="The predicted class or value.")
    model_version: int = Field(description="The version that answered.")
    variant: Variant = Field(description="stable, canary or shadow.")
    probabilities: dict[str, float] | None = Field(
        default=None, description="Per class (classifiers that give probabilities)."
    )


class PredictAnswer(BaseModel):
    model: str = Field(description="The model asked.")
    request_id: str = Field(description="One id for the whole request.")
    predictions: list[Prediction] = Field(description="One per record, in order.")


Datatype = Literal[
    "BOOL",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


Parameters = dict[str, str | int | float | bool | None]
"""The protocol's ``$parameters``: values are strings, numbers or booleans (null: absent); an object or a list
is refused with 422 naming the parameter."""


class InferInput(BaseModel):
    """One input tensor: one feature, one value per row."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Feature name.")
    shape: list[int] = Field(description="[rows] or [rows, 1].")
    datatype: Datatype = Field(description="Open Inference Protocol datatype.")
    data: list[Any] = Field(
        description="The values, flat or nested exactly as the shape; each must fit the datatype."
    )
    parameters: Parameters | None = Field(default=None, description="Taken and ignored.")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["predict", "predict_proba"]
    parameters: Parameters | None = Field(
        default=None,
        description="`binary_data` is taken and answered with JSON data; `classification` (that extension) "
        "is refused with 422.",
    )


class InferBody(BaseModel):
    """POST /v2/models/{name}/infer: an Open Inference Protocol v2 inference request (JSON tensors)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, description="Echoed in the answer.")
    parameters: Parameters | None = Field(
        default=None, description="`entity_key`: route the whole request as this entity (sticky canary)."
    )
    inputs: list[InferInput] = Field(description="One tensor per feature of the model's signature.")
    outputs: list[RequestedOutput] | None = Field(
        default=None, description="Absent or empty: every output the model gives."
    )


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    data: list[Any]


class InferAnswer(BaseModel):
    """An Open Inference Protocol v2 inference response."""

    model_name: str
    model_version: str
    id: str
    parameters: dict[str, Any] = Field(
        description="`variant`, `request_id`, `prediction_ids` (one per row) and `classes`."
    )
    outputs: list[InferOutput]


class ServerReady(BaseModel):
    """The answer of ``/v2/health/ready``, 200 or 503 (the Open Inference Protocol's ServerReadyResponse, with
    what was checked)."""

    ready: bool
    checks: dict[str, bool] = Field(description="Each dependency checked, and whether it answered.")
