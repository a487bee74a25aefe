"""Manual commands: requests from people (or client programs) that the platform may refuse.

They are accepted over HTTP, checked for the caller's role, and published here; the caller is in the
envelope's ``actor`` (``user:alice``), so the audit trail records who asked. The envelope's ``time`` is when
the command was issued: serving refuses a promotion or production rollback issued before the model's last
routing decision (docs/serving.md), so a command that arrives late, or again, cannot undo a later one.
The outcome is the ordinary fact event (TrainingRequested or TrainingSkipped, RolloutPromoted,
RolloutRolledBack, ModelStageChanged).
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints

from contracts.common import FreeText, ModelName, ModelVersion
from contracts.envelope import EventPayload

REASON_MAX_CHARS = 2000
"""The longest reason a command may give (the registry and serving refuse a longer one with 422)."""


def says_something(reason: str) -> str:
    """``reason`` when it is not only white space (a reason for the audit trail must say something)."""
    if not reason.strip():
        raise ValueError("a reason must say something: it is only white space")
    return reason


Reason = Annotated[
    FreeText, StringConstraints(min_length=1, max_length=REASON_MAX_CHARS), AfterValidator(says_something)
]
"""Why a command was given: 1 to :data:`REASON_MAX_CHARS` characters, not only white space."""
REASON_DESCRIPTION = f"Why, for the audit trail: 1 to {REASON_MAX_CHARS:,} characters, not only white space."


def within_reason(text: str) -> str:
    """``text`` if it has at most :data:`REASON_MAX_CHARS` characters, else its start and "…" with the whole
    length, within the cap: a reason a service composes (from a command's reason and its actor, from a list of
    names) may run past it, and the event must still be valid."""
    if len(text) <= REASON_MAX_CHARS:
        return text
    cut = f"… ({len(text):,} characters)"
    return text[: REASON_MAX_CHARS - len(cut)] + cut


ComposedReason = Annotated[
    FreeText,
    BeforeValidator(lambda v: within_reason(v) if isinstance(v, str) else v),
    StringConstraints(max_length=REASON_MAX_CHARS),
]
"""Why, for people, in an event a service composes itself (a retrain from a drift alert or from a command
and its actor, a canary verdict): cut to :data:`REASON_MAX_CHARS` characters by :func:`within_reason`, when
made and when read (an event from before the cap, a stored job), so a producer always makes a valid event."""
COMPOSED_REASON_TEXT = (
    f"at most {REASON_MAX_CHARS:,} characters (a longer one is cut, ending with its length)"
)

TOPIC = "mlops.commands"


class RetrainRequested(EventPayload):
    """Someone asks for a model to be retrained now; the retrain policy still decides."""

    event_name: ClassVar[str] = "RetrainRequested"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model to retrain.", examples=["churn"])
    reason: Reason = Field(description=REASON_DESCRIPTION, examples=["new labelled export"])
    ignore_cooldown: bool = Field(
        default=False,
        description="Bypass the cooldown (never the one-run-in-flight rule or the budget).",
    )


class PromoteRequested(EventPayload):
    """Someone asks for a version to take all traffic now, cutting any rollout of it short."""

    event_name: ClassVar[str] = "PromoteRequested"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="Version to promote.", examples=[7])
    reason: Reason = Field(description=REASON_DESCRIPTION, examples=["canary looks fine"])


class RollbackRequested(EventPayload):
    """Someone asks for a version to be taken off traffic at once."""

    event_name: ClassVar[str] = "RollbackRequested"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(
        description="Version to take off traffic: the live canary, or the production version.", examples=[7]
    )
    to_version: ModelVersion | None = Field(
        default=None,
        description="Version to serve instead when rolling back production; null: the previous production "
        "version. A canary's traffic goes back to the stable version: with the live canary, only that one "
        "may be named (another is refused).",
        examples=[6],
    )
    reason: Reason = Field(description=REASON_DESCRIPTION, examples=["complaints from sales"])


class ArchiveRequested(EventPayload):
    """Someone asks for a version that no longer serves to be archived."""

    event_name: ClassVar[str] = "ArchiveRequested"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="Version to archive.", examples=[4])
    reason: Reason = Field(description=REASON_DESCRIPTION, examples=["superseded"])
