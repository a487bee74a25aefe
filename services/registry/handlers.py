"""The registry's event handlers: one plain async function per event type, the table at the bottom.

Illegal stage transitions raise :class:`libs.bus.PermanentError`: the event is dead-lettered with the
reason (current stage, the move asked for, the moves allowed), so an operator sees every fact the
registry could not apply. A move to the stage a version already has changes nothing (a republished fact).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from contracts.commands import ArchiveRequested
from contracts.common import Stage
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent, EventPayload
from contracts.rollouts import RolloutPromoted, RolloutRolledBack, RolloutStarted
from contracts.training import TrainingCompleted
from contracts.validation import ValidationFailed, ValidationPassed
from libs.logging import get_logger
from services.registry import core
from services.registry.domain import serves_after_rollback
from services.registry.ports import Artifacts, Datasets, Publish, Versions

log = get_logger(__name__)


async def on_training_completed(
    event: CloudEvent[TrainingCompleted],
    *,
    versions: Versions,
    artifacts: Artifacts,
    publish: Publish,
    source: str,
    **_: Any,
) -> None:
    """A run's model becomes the next version (candidate) once; ModelVersionRegistered announces it."""
    await core.register_version(event, versions=versions, artifacts=artifacts, publish=publish, source=source)


async def on_validation_passed(
    event: CloudEvent[ValidationPassed], *, versions: Versions, publish: Publish, source: str, **_: Any
) -> None:
    """Keep the report; the version stays candidate and becomes the challenger."""
    await core.record_validation(event, versions=versions, publish=publish, source=source)


async def on_validation_failed(
    event: CloudEvent[ValidationFailed], *, versions: Versions, publish: Publish, source: str, **_: Any
) -> None:
    """Keep the report; the version is rejected."""
    await core.record_validation(event, versions=versions, publish=publish, source=source)


async def on_rollout_started(
    event: CloudEvent[RolloutStarted], *, versions: Versions, publish: Publish, source: str, **_: Any
) -> None:
    """The rolled-out version is canary (an archived one only over the production version it names)."""
    r = event.data
    await core.refuse_out_of_date(event, r.model, r.canary_version, r.stable_version, versions=versions)
    await core.change_stage(
        r.model,
        r.canary_version,
        Stage.CANARY,
        reason=f"rollout {r.rollout_id} started at {r.weight:.0%} of traffic ({r.mode.value})",
        event=event,
        versions=versions,
        publish=publish,
        source=source,
    )


async def on_rollout_promoted(
    event: CloudEvent[RolloutPromoted], *, versions: Versions, publish: Publish, source: str, **_: Any
) -> None:
    """Production and champion; the previous production version is archived."""
    r = event.data
    await core.refuse_out_of_date(event, r.model, r.model_version, r.previous_version, versions=versions)
    how = "promoted on request" if r.manual else f"promoted after {r.steps_completed} healthy steps"
    await core.promote(
        r.model,
        r.model_version,
        reason=f"rollout {r.rollout_id} {how}",
        event=event,
        versions=versions,
        publish=publish,
        source=source,
    )


async def on_rollout_rolled_back(
    event: CloudEvent[RolloutRolledBack], *, versions: Versions, publish: Publish, source: str, **_: Any
) -> None:
    """The rolled-back version is rejected; the stable version, which now serves all traffic, is production
    (an archived one again, after a rollback of production to an earlier version; a candidate named as the
    rollback's target for the first time)."""
    r = event.data
    if (
        r.stable_version is not None
        and await versions.stage_for_update(r.model, r.canary_version) is Stage.REJECTED
    ):
        # Rejected already: this rollback was applied before. Its stable version is brought back only while
        # the rolled-back one is still what it replaced.
        await core.refuse_out_of_date(event, r.model, r.stable_version, r.canary_version, versions=versions)
    await core.change_stage(
        r.model,
        r.canary_version,
        Stage.REJECTED,
        reason=f"rollout {r.rollout_id} rolled back ({r.reason.value}): {r.message}",
        event=event,
        versions=versions,
        publish=publish,
        source=source,
    )
    if r.stable_version is None:
        return
    stable = await versions.stage_for_update(r.model, r.stable_version)
    if stable is Stage.PRODUCTION:
        return
    if stable is not None and (
        serves_after_rollback(stable)
        or await core.overtaken_by_verdict(versions, r.model, r.stable_version, stable)
    ):
        how = "restored" if stable is Stage.ARCHIVED else "put on all traffic"
        await core.promote(
            r.model,
            r.stable_version,
            reason=f"{how} by the rollback of version {r.canary_version} (rollout {r.rollout_id})",
            event=event,
            versions=versions,
            publish=publish,
            source=source,
        )
    else:
        log.warning(
            "rollback names a stable version that cannot be production (rejected or unknown); its stage is "
            "left alone",
            model=r.model,
            stable_version=r.stable_version,
            stage=stable,
        )


async def on_dataset_registered(
    event: CloudEvent[DatasetRegistered],
    *,
    datasets: Datasets,
    artifacts: Artifacts,
    source: str,
    **_: Any,
) -> None:
    """Record a dataset version another service registered (training's materialised sets), once the store is
    seen to hold its file at the size it says."""
    await core.record_dataset(event, datasets=datasets, artifacts=artifacts, source=source)


async def on_archive_requested(
    event: CloudEvent[ArchiveRequested], *, versions: Versions, publish: Publish, source: str, **_: Any
) -> None:
    """Archive the version (only a candidate or a rejected one: nothing that serves)."""
    await core.archive(event, versions=versions, publish=publish, source=source)


RegistryHandler = Callable[..., Awaitable[None]]

HANDLERS: dict[type[EventPayload], RegistryHandler] = {
    TrainingCompleted: on_training_completed,
    ValidationPassed: on_validation_passed,
    ValidationFailed: on_validation_failed,
    RolloutStarted: on_rollout_started,
    RolloutPromoted: on_rollout_promoted,
    RolloutRolledBack: on_rollout_rolled_back,
    DatasetRegistered: on_dataset_registered,
    ArchiveRequested: on_archive_requested,
}
"""Event type -> handler. PromoteRequested, RollbackRequested and RetrainRequested share the commands topic
but are serving's and training's to act on: the registry has no handler for them and skips them."""
