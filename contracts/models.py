"""Model registry events: a version exists, and a version moved between stages.

The registry is the only producer: it owns version numbers and the stage of every version, and numbers
each model's stage changes (``ModelStageChanged.sequence``) so consumers can tell an old change from a new
one whatever its event id.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Annotated, ClassVar, Self

from pydantic import Field, StringConstraints, model_validator

from contracts.commands import COMPOSED_REASON_TEXT, ComposedReason
from contracts.common import (
    PG_BIGINT_MAX,
    ArtifactRef,
    EventRef,
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


TAG_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
TagKey = Annotated[str, StringConstraints(pattern=TAG_KEY_PATTERN)]
"""A tag key: at most 128 characters (keys are indexed), a letter or digit first, then letters, digits and
``. _ : -``; no ``=`` (the registry's ``?tag=key=value`` splits at the first one), no space."""
TAG_VALUE_MAX_CHARS = 500
TagValue = Annotated[Identifier, StringConstraints(max_length=TAG_VALUE_MAX_CHARS)]
"""A tag's value: at most :data:`TAG_VALUE_MAX_CHARS` characters, no NUL (the registry's route refuses
more)."""


class ModelVersionTagged(EventPayload):
    """A person set, changed or removed a tag on a model version (an approval, a ticket, an owner). The
    CloudEvents ``actor`` says who."""

    event_name: ClassVar[str] = "ModelVersionTagged"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="The tagged version.", examples=[7])
    key: TagKey = Field(
        description="Tag name: 1 to 128 letters, digits and `. _ : -`, a letter or digit first.",
        examples=["approved-by"],
    )
    value: TagValue | None = Field(
        description=f"The value now (at most {TAG_VALUE_MAX_CHARS} characters); null when the tag was "
        "removed.",
        examples=["risk-team"],
    )
    previous: TagValue | None = Field(
        default=None,
        description=f"The value before (at most {TAG_VALUE_MAX_CHARS} characters); null when the tag was "
        "not set.",
        examples=[None],
    )


class ModelStageChanged(EventPayload):
    """A model version moved from one stage to another (and its aliases changed with it)."""

    event_name: ClassVar[str] = "ModelStageChanged"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="The version whose stage changed.", examples=[7])
    from_stage: Stage = Field(description="Stage before the change.", examples=["canary"])
    to_stage: Stage = Field(description="Stage after the change.", examples=["production"])
    reason: ComposedReason = Field(
        description=f"Why, for people: {COMPOSED_REASON_TEXT}. The registry composes it, at times around "
        "another event's or a command's text (`archived on request: <the command's reason>`, a rollback's "
        "message), and cuts it so.",
        examples=["rollout r-91c2 promoted after 3 healthy steps"],
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
    sequence: int | None = Field(
        default=None,
        ge=1,
        le=PG_BIGINT_MAX,
        description="The model's stage-change number: 1, 2, ... over all versions of the model, given by "
        "the registry in the transaction that makes the change, so a later change of the model has a "
        "larger one (a promotion's archive of the previous production version comes just before it). "
        "Consumers (training, validation, serving) apply a model's changes in this order: one below the "
        "last they applied, or under its number but another change, is stale (re-sent under a new event "
        "id, or delayed) and dead-lettered as `rejected`, naming both numbers; the last change again under "
        "another id changes nothing. Null on events published before "
        "the registry numbered them (its migration 0003): applied as they come while a consumer holds no "
        "numbered change of the model, stale after one (a model's events keep their order on its "
        "partition, so an unnumbered one is older than every numbered one).",
        examples=[42],
    )

    @model_validator(mode="after")
    def _moves(self) -> Self:
        if self.from_stage == self.to_stage:
            raise ValueError(f"from_stage and to_stage are both {self.from_stage.value!r}: not a change")
        return self


@dataclass(frozen=True)
class AppliedStageChange:
    """The last numbered ``ModelStageChanged`` of a model that a consumer applied: what it compares the next
    one with (:func:`stage_change_order`)."""

    sequence: int
    model_version: int
    to_stage: Stage
    event_id: str

    @classmethod
    def of(cls, change: ModelStageChanged, event_id: str) -> AppliedStageChange | None:
        """What a consumer keeps of a change it applies; None for an unnumbered one (it keeps nothing)."""
        if change.sequence is None:
            return None
        return cls(change.sequence, change.model_version, change.to_stage, event_id)


class StageChangeOrder(Enum):
    """Where a ``ModelStageChanged`` stands against the last change of its model a consumer applied."""

    NEW = "new"
    """Apply it (and keep it as the last one when it is numbered)."""
    REPEAT = "repeat"
    """The change applied last, again under another event id: it changes nothing."""
    STALE = "stale"
    """Older than the change applied last: applied, it would undo a later one. Dead-letter it."""


def stage_change_order(change: ModelStageChanged, applied: AppliedStageChange | None) -> StageChangeOrder:
    """Whether a consumer holding ``applied`` (None: no numbered change of the model yet) applies
    ``change``."""
    if applied is None:
        return StageChangeOrder.NEW
    if change.sequence is None:
        return StageChangeOrder.STALE
    if change.sequence > applied.sequence:
        return StageChangeOrder.NEW
    if change.sequence == applied.sequence and (change.model_version, change.to_stage) == (
        applied.model_version,
        applied.to_stage,
    ):
        return StageChangeOrder.REPEAT
    return StageChangeOrder.STALE


def stale_stage_change(
    event_type: str, event_id: str, change: ModelStageChanged, applied: AppliedStageChange
) -> str:
    """The dead letter's error for a :attr:`StageChangeOrder.STALE` change: both numbers, both changes."""
    number = (
        f"stage change {change.sequence}" if change.sequence is not None else "an unnumbered stage change"
    )
    return (
        f"{event_type} {event_id} is {number} of {change.model} (version {change.model_version} "
        f"{change.from_stage.value} -> {change.to_stage.value}), but stage change {applied.sequence} "
        f"(version {applied.model_version} -> {applied.to_stage.value}, event {applied.event_id}) was "
        "applied already: a stale stage change (re-sent under a new event id, or delayed), which applied "
        "would undo the later one; nothing was changed"
    )
