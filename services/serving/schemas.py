"""Serving's request and response bodies, for the OpenAPI document.

The routes read their bodies with orjson and check them against the model's signature themselves, and build
their answers with orjson too (services/serving/api.py explains why), so these models are never used to parse
a request or to check an answer: they say what the routes accept and answer, for people, client generators
and the HTTP fuzz test. The unit tests check that the routes' real answers validate against the document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.common import Label, Task
from contracts.predictions import Variant
from contracts.rollouts import RolloutMode
from services.serving.domain import RolloutStatus

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


class ServerMetadata(BaseModel):
    """The answer of ``GET /v2`` (the Open Inference Protocol's ServerMetadataResponse)."""

    name: str = Field(description="The server's name.", examples=["driftloop-serving"])
    version: str = Field(description="The platform's version.")
    extensions: list[str] = Field(description="Protocol extensions supported: none.")


class ServerLive(BaseModel):
    """The answer of ``/v2/health/live`` (the Open Inference Protocol's ServerLiveResponse)."""

    live: bool


class MetadataTensor(BaseModel):
    """An input or output of a model, as its metadata lists it."""

    name: str = Field(description="The feature's name, or the output: predict, predict_proba.")
    datatype: Datatype = Field(description="Open Inference Protocol datatype.")
    shape: list[int] = Field(description="-1: any number of rows.", examples=[[-1], [-1, 2]])


class ModelMetadataParameters(BaseModel):
    task: Task
    classes: list[Label] | None = Field(
        description="The class labels, in the order of predict_proba's columns (classifiers)."
    )
    rollout_id: str | None = Field(description="The live rollout, if any.")
    canary_weight: float = Field(description="The canary's share of traffic now.")
    engine: str = Field(description="What computes the answers: onnxruntime or scikit-learn.")
    engine_note: str | None = Field(description="Why scikit-learn serves, when no compiled copy does.")


class ModelMetadata(BaseModel):
    """The answer of ``GET /v2/models/{name}`` and ``.../versions/{version}`` (the Open Inference Protocol's
    MetadataModelResponse)."""

    name: str
    versions: list[str] = Field(description="The versions serving (the version asked, for a version's).")
    platform: str = Field(examples=["scikit-learn"])
    inputs: list[MetadataTensor] = Field(description="One per feature of the signature, in its order.")
    outputs: list[MetadataTensor]
    parameters: ModelMetadataParameters


class ModelReady(BaseModel):
    """The answer of ``GET /v2/models/{name}/ready`` when the model can answer. The protocol leaves the body
    unspecified (the status says it); a model that cannot answer is a 404 with the error body and
    ``ready: false``."""

    name: str
    ready: bool


class VersionReady(ModelReady):
    """The answer of ``GET /v2/models/{name}/versions/{version}/ready`` when the version can answer."""

    version: str = Field(description="As the path gives it.")


class RolloutPublic(BaseModel):
    rollout_id: str
    status: RolloutStatus
    canary_version: int
    stable_version: int | None
    mode: RolloutMode
    steps: list[float] = Field(description="The canary's share of traffic at each step.")
    step_index: int
    weight: float = Field(description="The canary's share now: 0 once rolled back, 1 once promoted.")
    min_samples: int
    bake_seconds: float
    samples_seen: int
    started_at: datetime
    step_started_at: datetime
    ended_at: datetime | None
    end_reason: str | None


class ReplicaRouting(BaseModel):
    """What the replica that answered serves now (it follows the routing state within moments)."""

    stable_version: int | None
    canary_version: int | None
    rollout_id: str | None
    weight: float
    mode: RolloutMode


class ModelRoutePublic(BaseModel):
    """A model's routing state: ``GET /v1/models/{name}``."""

    model: str
    stable_version: int | None
    previous_stable_version: int | None
    decided_at: datetime | None
    rollout: RolloutPublic | None = Field(description="The latest rollout, live or finished.")
    this_replica: ReplicaRouting | None = Field(description="None while this replica has no routing for it.")


class ModelRoutes(BaseModel):
    """Every model's routing state: ``GET /v1/models``."""

    models: list[ModelRoutePublic]


class CommandAccepted(BaseModel):
    """A rollout command published (``POST /v1/models/{name}/rollback``, ``.../promote``): its handler acts
    on it, against the routing state when it arrives."""

    accepted: bool
    command: Literal["RollbackRequested", "PromoteRequested"]
    event_id: str = Field(description="The command's event.")
    model_version: int = Field(description="The version rolled back or promoted.")
    actor: str | None = Field(description="Who asked.")
