"""Prediction log: what a model version answered, for monitoring and the audit trail.

One event type, PredictionsLogged, carries every row of one predict request (1..n rows, all for one model,
version and variant); a single-row request is a batch of one. Per-row events would multiply headers,
ids, inbox rows and audit rows by the batch size on the busiest topic, and one shape means consumers
have one code path. Producers split a request whose event would exceed the size limit
(``contracts.envelope.DEFAULT_MAX_EVENT_BYTES``) into several events.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from pydantic import AwareDatetime, Field

from contracts.common import ContractModel, FeatureValue, Label, ModelName, ModelVersion
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

    prediction_id: str = Field(
        min_length=1,
        description="Unique id returned to the caller, used to send the ground truth later. A shadow row "
        "carries the id of the served prediction it shadows, so the two can be compared pairwise.",
        examples=["p-01J9Z6M3K2Q8"],
    )
    entity_key: str | None = Field(
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
    """A model version answered one predict request; every row of it, with inputs and outputs."""

    event_name: ClassVar[str] = "PredictionsLogged"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="Version that answered.", examples=[7])
    variant: Variant = Field(description="Stable, canary or shadow.", examples=["canary"])
    rollout_id: str | None = Field(
        default=None, description="The live rollout, for canary and shadow rows.", examples=["r-91c2"]
    )
    request_id: str = Field(min_length=1, description="Id of the predict request.", examples=["req-7f3a9c"])
    predicted_at: AwareDatetime = Field(description="When the model answered.")
    latency_ms: float = Field(
        ge=0, description="Model time for the whole request, in milliseconds.", examples=[1.8]
    )
    rows: list[PredictionRecord] = Field(min_length=1, description="Every row of the request, in order.")
