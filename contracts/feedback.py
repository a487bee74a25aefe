"""Feedback events: the ground truth for an earlier prediction, arriving whenever it is known."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from contracts.common import GroundTruthLabel, Identifier, ModelName, ModelVersion, UtcDatetime
from contracts.envelope import MAX_ATTRIBUTE_CHARS, EventPayload

TOPIC = "mlops.feedback"


class GroundTruthReceived(EventPayload):
    """The true outcome of a prediction became known; monitoring joins it to the prediction by id."""

    event_name: ClassVar[str] = "GroundTruthReceived"
    topic: ClassVar[str] = TOPIC

    prediction_id: Identifier = Field(
        min_length=1,
        max_length=MAX_ATTRIBUTE_CHARS,
        description="Id of the prediction this label is for (at most 512 characters: monitoring keeps "
        "waiting labels in an index by it).",
        examples=["p-01J9Z6M3K2Q8"],
    )
    model: ModelName = Field(description="Model that made the prediction.", examples=["churn"])
    model_version: ModelVersion | None = Field(
        default=None, description="Version that made it, when the sender knows; monitoring knows anyway."
    )
    label: GroundTruthLabel = Field(
        description="The true class label or value. A number must be finite and within float32's range "
        "(magnitude at most 3.4028235e38, where models compute): an event with one beyond it is "
        "dead-lettered as schema-invalid.",
        examples=[1, "churned", 42.5],
    )
    observed_at: UtcDatetime = Field(description="When the outcome was observed (not when it was sent).")
    entity_key: Identifier | None = Field(
        default=None, description="Caller's entity id, if given.", examples=["customer-48213"]
    )
