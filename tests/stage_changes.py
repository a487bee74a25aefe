"""A ModelStageChanged as the registry publishes it, for the tests of the services that follow it."""

from __future__ import annotations

from contracts.common import Stage
from contracts.envelope import CloudEvent, new_event
from contracts.models import ModelStageChanged


def stage_change(
    version: int, from_stage: Stage, to_stage: Stage, sequence: int | None, *, model: str = "churn"
) -> CloudEvent[ModelStageChanged]:
    """``model``'s ``version`` moved from ``from_stage`` to ``to_stage``, the registry's change ``sequence``
    of the model (None: an event from before the numbering)."""
    change = ModelStageChanged(
        model=model,
        model_version=version,
        from_stage=from_stage,
        to_stage=to_stage,
        reason="test",
        sequence=sequence,
    )
    return new_event(change, source="/driftloop/registry")
