"""Rollout events: serving exposes a validated version to a growing share of traffic, then promotes it
or rolls it back.

One rollout: RolloutStarted -> RolloutStepAdvanced ... -> RolloutPromoted | RolloutRolledBack. Weights are
fractions of traffic (0.1 = 10%) routed to the canary; in shadow mode the canary scores the traffic but its
answers are never returned.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar, Self

from pydantic import Field, model_validator

from contracts.commands import COMPOSED_REASON_TEXT, ComposedReason
from contracts.common import PG_BIGINT_MAX, PG_INTEGER_MAX, Identifier, ModelName, ModelVersion
from contracts.envelope import EventPayload

TOPIC = "mlops.rollouts"


class RolloutMode(StrEnum):
    """How the canary meets traffic."""

    CANARY = "canary"
    SHADOW = "shadow"


class RollbackReason(StrEnum):
    """Why a rollout was rolled back."""

    UNHEALTHY_VERDICT = "unhealthy-verdict"
    INCONCLUSIVE_VERDICT = "inconclusive-verdict"
    ERROR_RATE = "error-rate"
    MANUAL = "manual"
    LOAD_FAILED = "load-failed"
    SUPERSEDED = "superseded"


def _versions_differ(kept: int | None, moved: int | None, moved_name: str, kept_name: str) -> None:
    """One version cannot be on both sides of a rollout (its consumers would reject or archive the version
    that serves)."""
    if kept is not None and kept == moved:
        raise ValueError(f"{moved_name} must differ from {kept_name}")


class RolloutStarted(EventPayload):
    """A rollout began: the canary version takes the first step's share of traffic."""

    event_name: ClassVar[str] = "RolloutStarted"
    topic: ClassVar[str] = TOPIC

    rollout_id: Identifier = Field(min_length=1, description="Rollout id.", examples=["r-91c2"])
    model: ModelName = Field(description="Model name.", examples=["churn"])
    stable_version: ModelVersion | None = Field(
        description="Version serving the rest of the traffic; null for a model's first rollout.", examples=[6]
    )
    canary_version: ModelVersion = Field(description="Version being rolled out.", examples=[7])
    mode: RolloutMode = Field(
        default=RolloutMode.CANARY, description="Canary or shadow.", examples=["canary"]
    )
    steps: list[float] = Field(
        min_length=1,
        description="Canary traffic share of each step, strictly increasing, ending at 1.0.",
        examples=[[0.1, 0.5, 1.0]],
    )
    step_index: int = Field(
        default=0, ge=0, le=PG_INTEGER_MAX, description="Index of the current step in `steps`.", examples=[0]
    )
    weight: float = Field(
        gt=0, le=1, description="Current canary share (`steps[step_index]`).", examples=[0.1]
    )
    min_samples: int = Field(
        ge=0,
        le=PG_INTEGER_MAX,
        description="Canary predictions needed before a step can advance.",
        examples=[500],
    )
    bake_seconds: float = Field(
        ge=0, description="Minimum time on each step before it can advance.", examples=[30]
    )
    validation_report_id: Identifier | None = Field(
        default=None, description="The validation report that let the version in.", examples=["vr-5d1e"]
    )

    @model_validator(mode="after")
    def _steps_consistent(self) -> Self:
        if any(not 0 < w <= 1 for w in self.steps):
            raise ValueError("every step weight must be in (0, 1]")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("step weights must be strictly increasing")
        if self.steps[-1] != 1.0:
            raise ValueError("the last step must be 1.0 (all traffic)")
        if self.step_index >= len(self.steps) or self.steps[self.step_index] != self.weight:
            raise ValueError("weight must equal steps[step_index]")
        _versions_differ(self.stable_version, self.canary_version, "canary_version", "stable_version")
        return self


class RolloutStepAdvanced(EventPayload):
    """The canary passed a step (enough samples, bake time over, healthy verdict) and got a larger share."""

    event_name: ClassVar[str] = "RolloutStepAdvanced"
    topic: ClassVar[str] = TOPIC

    rollout_id: Identifier = Field(min_length=1, description="Rollout id.", examples=["r-91c2"])
    model: ModelName = Field(description="Model name.", examples=["churn"])
    stable_version: ModelVersion | None = Field(description="Stable version.", examples=[6])
    canary_version: ModelVersion = Field(description="Canary version.", examples=[7])
    step_index: int = Field(
        ge=1, le=PG_INTEGER_MAX, description="Index of the step now in force.", examples=[1]
    )
    previous_weight: float = Field(
        gt=0, le=1, description="Canary share of the step just passed.", examples=[0.1]
    )
    weight: float = Field(gt=0, le=1, description="Canary share from now on.", examples=[0.5])
    samples_seen: int = Field(
        ge=0, le=PG_BIGINT_MAX, description="Canary predictions during the step just passed.", examples=[812]
    )
    step_seconds: float = Field(ge=0, description="How long the step just passed lasted.", examples=[34.2])

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _versions_differ(self.stable_version, self.canary_version, "canary_version", "stable_version")
        if self.weight <= self.previous_weight:
            raise ValueError("weight must be larger than previous_weight (a step only ever grows the share)")
        return self


class RolloutPromoted(EventPayload):
    """The canary took all traffic: it is the model's production version now."""

    event_name: ClassVar[str] = "RolloutPromoted"
    topic: ClassVar[str] = TOPIC

    rollout_id: Identifier = Field(min_length=1, description="Rollout id.", examples=["r-91c2"])
    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="The version promoted to production.", examples=[7])
    previous_version: ModelVersion | None = Field(
        description="The production version it replaced (to be archived); null for a first rollout.",
        examples=[6],
    )
    steps_completed: int = Field(
        ge=0, le=PG_INTEGER_MAX, description="Steps passed before promotion.", examples=[3]
    )
    duration_seconds: float = Field(
        ge=0, description="Time from RolloutStarted to promotion.", examples=[104.0]
    )
    manual: bool = Field(default=False, description="True when a PromoteRequested cut the rollout short.")

    @model_validator(mode="after")
    def _versions(self) -> Self:
        _versions_differ(self.previous_version, self.model_version, "model_version", "previous_version")
        return self


class RolloutRolledBack(EventPayload):
    """A version was taken off traffic at once: the canary (share 0; the stable version serves everything),
    or, by a manual rollback of production, the production version (its replacement serves everything)."""

    event_name: ClassVar[str] = "RolloutRolledBack"
    topic: ClassVar[str] = TOPIC

    rollout_id: Identifier = Field(min_length=1, description="Rollout id.", examples=["r-91c2"])
    model: ModelName = Field(description="Model name.", examples=["churn"])
    stable_version: ModelVersion | None = Field(
        description="Version that serves everything from now on: the stable one, or a production rollback's "
        "target.",
        examples=[6],
    )
    canary_version: ModelVersion = Field(
        description="Version rolled back (to be rejected): the canary, or the production version a manual "
        "rollback replaced.",
        examples=[7],
    )
    step_index: int = Field(ge=0, le=PG_INTEGER_MAX, description="Step the rollout was on.", examples=[0])
    weight: float = Field(
        ge=0,
        le=1,
        description="Share the rolled-back version had at the moment of rollback (1 for production).",
        examples=[0.1],
    )
    reason: RollbackReason = Field(description="Machine-readable reason.", examples=["unhealthy-verdict"])
    message: ComposedReason = Field(
        description="What was seen, for people (a manual rollback's: who asked and why): "
        f"{COMPOSED_REASON_TEXT}.",
        examples=["canary error rate 4.1% vs stable 0.2% over 612 vs 5,480 requests"],
    )

    @model_validator(mode="after")
    def _versions(self) -> Self:
        # The version rolled back is rejected: the one that serves everything from now on cannot be it.
        _versions_differ(self.stable_version, self.canary_version, "canary_version", "stable_version")
        return self
