"""Model registry events: a version exists, and a version moved between stages.

The registry is the only producer: it owns version numbers and the stage of every version.
"""

from __future__ import annotations

from typing import ClassVar, Self

from pydantic import Field, model_validator

from contracts.common import (
    ArtifactRef,
    EventRef,
    FreeText,
    Identifier,
    JobId,
    Lineage,
    ModelName,
    ModelSignature,
    ModelVersion,
    RunId,
    Stage,
)
from contracts.envelope import EventPayload

TOPIC = "mlops.models"


class ModelVersionRegistered(EventPayload):
    """The registry recorded a new model version (stage candidate) with its artifacts and lineage."""

    event_name: ClassVar[str] = "ModelVersionRegistered"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(
        description="The new version number (1, 2, ... per model).", examples=[7]
    )
    stage: Stage = Field(
        default=Stage.CANDIDATE, description="Stage at registration.", examples=["candidate"]
    )
    run_id: RunId = Field(
        min_length=1,
        description="The training run that produced it (at most 512 characters).",
        examples=["run-8a41b7"],
    )
    job_id: JobId = Field(
        min_length=1,
        description="The training job that produced it (at most 512 characters).",
        examples=["job-2f6c1d0e"],
    )
    artifact: ArtifactRef = Field(description="The model (skops), verified by sha256 on every load.")
    profile: ArtifactRef = Field(description="The reference profile for drift detection (JSON).")
    signature: ModelSignature = Field(description="Features, target, task and classes.")
    metrics: dict[Identifier, float] = Field(
        description="Holdout metrics from training.", examples=[{"roc_auc": 0.861, "accuracy": 0.842}]
    )
    lineage: Lineage = Field(description="Data, spec, code and parameters that made it.")


class ModelVersionTagged(EventPayload):
    """A person set, changed or removed a tag on a model version (an approval, a ticket, an owner). The
    CloudEvents ``actor`` says who."""

    event_name: ClassVar[str] = "ModelVersionTagged"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="The tagged version.", examples=[7])
    key: Identifier = Field(min_length=1, description="Tag name.", examples=["approved-by"])
    value: Identifier | None = Field(
        description="The value now; null when the tag was removed.", examples=["risk-team"]
    )
    previous: Identifier | None = Field(
        default=None, description="The value before; null when the tag was not set.", examples=[None]
    )


class ModelStageChanged(EventPayload):
    """A model version moved from one stage to another (and its aliases changed with it)."""

    event_name: ClassVar[str] = "ModelStageChanged"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="The version whose stage changed.", examples=[7])
    from_stage: Stage = Field(description="Stage before the change.", examples=["canary"])
    to_stage: Stage = Field(description="Stage after the change.", examples=["production"])
    reason: FreeText = Field(
        description="Why, for people.", examples=["rollout r-91c2 promoted after 3 healthy steps"]
    )
    caused_by: EventRef | None = Field(
        default=None,
        description="The event that caused it (RolloutPromoted, ValidationFailed, ArchiveRequested, ...).",
    )
    aliases: list[Identifier] = Field(
        default_factory=list,
        description="Aliases the version holds after the change (`champion` follows production).",
        examples=[["champion"]],
    )

    @model_validator(mode="after")
    def _moves(self) -> Self:
        if self.from_stage == self.to_stage:
            raise ValueError(f"from_stage and to_stage are both {self.from_stage.value!r}: not a change")
        return self
