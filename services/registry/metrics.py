"""The registry's outcomes as Prometheus series: versions registered and stage changes, by model.

Counted from the events the registry publishes, once the transaction that publishes them commits
(:func:`counting`): the bus replays a poll whose group commit failed one event per transaction and retries
a failing handler, so a handler may publish the same change more than once before one of its transactions
commits. Model names are bounded by registration: no event names a model the registry holds no version of.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

from contracts.envelope import CloudEvent
from contracts.models import ModelStageChanged, ModelVersionRegistered
from libs.bus import Transaction
from services.registry.ports import Publish

VERSIONS_REGISTERED = Counter(
    "driftloop_registry_versions_registered_total",
    "Model versions registered (a training run become a candidate), by model; counted once committed.",
    ["model"],
)
STAGE_CHANGES = Counter(
    "driftloop_registry_stage_changes_total",
    "Stage changes of model versions, by model and the stage moved to (candidate, canary, production, "
    "archived, rejected); counted once committed.",
    ["model", "stage"],
)


def counting(tx: Transaction) -> Publish:
    """``tx.publish``, counting each ModelVersionRegistered and ModelStageChanged once ``tx`` commits."""

    async def publish(event: CloudEvent[Any]) -> None:
        await tx.publish(event)
        data = event.data
        # The series made at the commit too: a change rolled back leaves none at 0 behind.
        if isinstance(data, ModelVersionRegistered):
            model = data.model
            tx.after_commit(lambda: VERSIONS_REGISTERED.labels(model).inc())
        elif isinstance(data, ModelStageChanged):
            labels = (data.model, data.to_stage.value)
            tx.after_commit(lambda: STAGE_CHANGES.labels(*labels).inc())

    return publish
