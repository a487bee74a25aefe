"""The real loader on the real artifact store: a store that cannot be reached is the infrastructure's
fault (the event is retried, the version is not rejected); a corrupted artifact is the version's."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts.rollouts import RollbackReason, RolloutRolledBack, RolloutStarted
from libs.artifacts import ArtifactStore, save_model
from services.serving.adapters.artifacts import ArtifactModelLoader
from tests.unit.serving.fakes import churn_pipeline
from tests.unit.serving.test_handlers import World, passed, registered


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path))


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


async def serving_v1(store: ArtifactStore) -> World:
    world = World()
    world.loader = ArtifactModelLoader(store, compile_models=False)  # type: ignore[assignment]
    await world.send(registered(1, key=save_model(store, churn_pipeline(0)).sha256), passed(1))
    return world


async def test_a_store_that_cannot_be_reached_delays_the_rollout_and_rejects_nothing(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = await serving_v1(store)
    v2 = save_model(store, churn_pipeline(1)).sha256
    read = store._read
    failures = [ConnectionError("artifact store unreachable"), TimeoutError("read timed out")]

    def flaky(key: str) -> bytes:
        if key == v2 and failures:
            raise failures.pop(0)
        return read(key)

    monkeypatch.setattr(store, "_read", flaky)
    await world.send(registered(2, key=v2), passed(2))  # the bus retries while the store is away

    assert failures == []
    [started] = world.rollouts(RolloutStarted)[-1:]
    assert started.data.canary_version == 2
    assert world.rollouts(RolloutRolledBack) == [] and world.bus.dead_letters == []
    assert not world.versions.rows[("churn", 2)].load_error


async def test_a_corrupted_artifact_is_the_versions_fault(store: ArtifactStore) -> None:
    world = await serving_v1(store)
    v2 = save_model(store, churn_pipeline(1)).sha256
    corrupt(Path(store._path(v2)))

    await world.send(registered(2, key=v2), passed(2))

    [failed] = world.rollouts(RolloutRolledBack)
    assert failed.data.reason is RollbackReason.LOAD_FAILED and "corrupted" in failed.data.message
    assert world.route.stable_version == 1 and world.route.active is None
