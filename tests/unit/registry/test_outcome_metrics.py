"""The registry counts versions registered and stage changes, by model, once the transaction that makes
them commits: a poll that fails and is replayed one event per transaction, or an event delivered again,
counts each once."""

from __future__ import annotations

from prometheus_client import REGISTRY

from contracts.common import Stage
from tests.unit.registry.fakes import training_completed
from tests.unit.registry.test_handlers import Registry, to_production


def registered(model: str) -> float:
    return REGISTRY.get_sample_value("driftloop_registry_versions_registered_total", {"model": model}) or 0.0


def moved(model: str, stage: Stage) -> float:
    labels = {"model": model, "stage": stage.value}
    return REGISTRY.get_sample_value("driftloop_registry_stage_changes_total", labels) or 0.0


async def test_a_version_registered_in_a_poll_that_failed_is_counted_once() -> None:
    registry = Registry()
    before = registered("metered")
    # One poll: a registration, and another whose model file the store lacks, which fails the poll's
    # transaction; the bus replays it one event per transaction, the first registration's committing.
    lost = training_completed(registry.artifacts, model="metered", run_id="run-2")
    del registry.artifacts.blobs[lost.artifact.key]
    [event, _] = await registry.deliver(
        training_completed(registry.artifacts, model="metered", run_id="run-1"), lost
    )
    [dead] = registry.bus.dead_letters
    assert "ArtifactNotFound" in dead.error
    await registry.deliver(event)  # delivered again: nothing to count

    assert list(registry.versions.versions) == [("metered", 1)]
    assert registered("metered") == before + 1


async def test_each_stage_change_is_counted_by_the_stage_moved_to() -> None:
    registry = Registry()
    stages = (Stage.CANARY, Stage.PRODUCTION, Stage.ARCHIVED, Stage.REJECTED)
    before = {stage: moved("staged", stage) for stage in stages}

    await to_production(registry, "staged", "run-1")
    await to_production(registry, "staged", "run-2", previous=1)  # archives version 1

    assert {stage: moved("staged", stage) - before[stage] for stage in stages} == {
        Stage.CANARY: 2,
        Stage.PRODUCTION: 2,
        Stage.ARCHIVED: 1,
        Stage.REJECTED: 0,
    }
    assert len(registry.stage_changes()) == 5
