"""The real loader on the real artifact store: a store that cannot be reached is the infrastructure's
fault (the event is retried, the version is not rejected); a corrupted artifact is the version's."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from contracts.commands import PromoteRequested
from contracts.common import Stage
from contracts.envelope import new_event
from contracts.models import ModelStageChanged
from contracts.rollouts import RollbackReason, RolloutRolledBack, RolloutStarted
from libs.artifacts import ArtifactStore, save_model
from libs.errors import Outage
from services.serving.adapters.artifacts import ArtifactModelLoader
from services.serving.routing import RoutingState, RoutingSync, ServedModel
from tests.unit.serving.fakes import FakeRoutingSource, churn_pipeline
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


async def serving_v1_with_v2_stored(store: ArtifactStore) -> tuple[World, str]:
    """Serving v1, with v2's artifact in the store (its key), not yet registered."""
    return await serving_v1(store), save_model(store, churn_pipeline(1)).sha256


async def test_a_store_that_cannot_be_reached_delays_the_rollout_and_rejects_nothing(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, v2 = await serving_v1_with_v2_stored(store)
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
    world, v2 = await serving_v1_with_v2_stored(store)
    corrupt(Path(store._path(v2)))

    await world.send(registered(2, key=v2), passed(2))

    [failed] = world.rollouts(RolloutRolledBack)
    assert failed.data.reason is RollbackReason.LOAD_FAILED and "corrupted" in failed.data.message
    assert world.route.stable_version == 1 and world.route.active is None


class StoreAway:
    """The store's file system failing with ``error`` on its next ``calls`` looks at ``key``'s file (a
    timeout, a mount gone), as fsspec sees it: ``exists`` is fsspec's own, which turns any error of ``info``
    into False."""

    def __init__(
        self, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch, key: str, error: OSError, calls: int = 1
    ) -> None:
        self.key, self.error, self.left = key, error, calls
        for name in ("info", "open"):
            monkeypatch.setattr(store.fs, name, self._failing(getattr(store.fs, name)))

    def _failing(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def failing(path: str, *args: Any, **kwargs: Any) -> Any:
            if self.key in str(path) and self.left > 0:
                self.left -= 1
                raise self.error
            return call(path, *args, **kwargs)

        return failing


STORE_FAILURES = [
    pytest.param(TimeoutError("read timed out"), id="timeout"),
    pytest.param(OSError(errno.EIO, "Input/output error"), id="eio"),
    pytest.param(Outage("the artifact store is restarting"), id="outage"),
]


@pytest.mark.parametrize("error", STORE_FAILURES)
async def test_a_store_failing_once_while_a_rollout_starts_rejects_nothing(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    world, v2 = await serving_v1_with_v2_stored(store)
    away = StoreAway(store, monkeypatch, v2, error)

    await world.send(registered(2, key=v2), passed(2))  # the bus retries the event

    assert away.left == 0, "the store was asked"
    assert world.rollouts(RolloutRolledBack) == [] and world.bus.dead_letters == []
    [started] = world.rollouts(RolloutStarted)[-1:]
    assert started.data.canary_version == 2
    assert world.versions.rows[("churn", 2)].stage != Stage.REJECTED.value
    assert not world.versions.rows[("churn", 2)].load_error


@pytest.mark.parametrize("error", STORE_FAILURES)
async def test_a_store_failing_once_during_a_promotion_by_hand_promotes(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    world, v2 = await serving_v1_with_v2_stored(store)
    await world.send(registered(2, key=v2))
    StoreAway(store, monkeypatch, v2, error)

    await world.send(new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x"))

    assert world.bus.dead_letters == []
    assert world.route.stable_version == 2


@pytest.mark.parametrize("error", STORE_FAILURES)
async def test_a_store_failing_once_during_the_registrys_production_change_serves_that_version(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    """Taken as the version's fault, the change was consumed (and its number kept): the registry's choice
    would never serve, and the change sent again is a repeat that changes nothing."""
    world, v2 = await serving_v1_with_v2_stored(store)
    await world.send(registered(2, key=v2))
    StoreAway(store, monkeypatch, v2, error)
    change = ModelStageChanged(
        model="churn", model_version=2, from_stage=Stage.CANDIDATE, to_stage=Stage.PRODUCTION, reason="manual"
    )

    await world.send(new_event(change, source="/driftloop/registry"))

    assert world.bus.dead_letters == []
    assert world.route.stable_version == 2


async def test_a_replica_following_routes_while_the_store_fails_keeps_its_table_and_serves_once_it_answers(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taken as a load failure, the loader would refuse the version for 30 s after the store came back."""
    world, v2 = await serving_v1_with_v2_stored(store)
    state = RoutingState()
    replica_loader = ArtifactModelLoader(store, compile_models=False)
    sync = RoutingSync(state, FakeRoutingSource(world.routes, world.versions), replica_loader)
    await sync.sync_once()
    serving = state.table.models["churn"]
    await world.send(registered(2, key=v2), passed(2))
    StoreAway(store, monkeypatch, v2, TimeoutError("read timed out"))

    assert await sync.sync_once() is False, "the model held back, tried again at the next sync"
    assert state.table.models["churn"] is serving, "the table the replica had, not one half-built"

    await sync.sync_once()
    assert state.table.models["churn"].versions == [1, 2]


async def test_a_warm_up_failing_on_an_outage_rejects_nothing(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, v2 = await serving_v1_with_v2_stored(store)
    warm = ServedModel.warm
    failures = [Outage("the compiled copy's runtime lost its device")]

    def flaky(self: ServedModel) -> None:
        if self.version == 2 and failures:
            raise failures.pop()
        warm(self)

    monkeypatch.setattr(ServedModel, "warm", flaky)
    await world.send(registered(2, key=v2), passed(2))

    assert failures == [] and world.rollouts(RolloutRolledBack) == []
    assert world.rollouts(RolloutStarted)[-1].data.canary_version == 2


async def test_a_warm_up_failing_on_the_models_own_code_rolls_back_naming_it(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, v2 = await serving_v1_with_v2_stored(store)
    warm = ServedModel.warm

    def broken(self: ServedModel) -> None:
        if self.version == 2:
            raise KeyError("tenure_months")
        warm(self)

    monkeypatch.setattr(ServedModel, "warm", broken)
    await world.send(registered(2, key=v2), passed(2))

    [failed] = world.rollouts(RolloutRolledBack)
    assert failed.data.reason is RollbackReason.LOAD_FAILED
    assert "warm-up prediction failed" in failed.data.message and "tenure_months" in failed.data.message
    assert world.versions.rows[("churn", 2)].stage == Stage.REJECTED.value
