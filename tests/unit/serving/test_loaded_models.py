"""A version's model lives in a replica's memory as long as the version serves there: promoted over,
rolled back or replaced, the loader lets it go, so months of retraining do not grow the process one model
(and its compiled copy) per version. A model still in use (a request's table, a queued shadow scoring)
stays alive until that use ends, and a model evicted before it served is loaded again."""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Any

import pytest

from contracts.commands import PromoteRequested
from contracts.common import Stage
from contracts.envelope import new_event
from contracts.models import ModelStageChanged
from contracts.monitoring import Verdict
from contracts.rollouts import RolloutMode, RolloutStarted
from libs.artifacts import ArtifactStore
from services.serving.adapters.artifacts import ArtifactModelLoader
from services.serving.domain import ModelRoute, RolloutPolicy, columns_from_records
from services.serving.ports import ModelLoadError, VersionRecord
from services.serving.routing import RoutingSource, ServedModel
from services.serving.scoring import PredictRequest
from tests.unit.serving import test_handlers
from tests.unit.serving.fakes import FakeRoutingSource, canary_verdict, churn_signature, record
from tests.unit.serving.test_version_series import MODEL, Replica, Retraining
from tests.waiting import eventually

OTHER = "other-model"


@pytest.fixture
def world(tmp_path: Path) -> Retraining:
    return Retraining(ArtifactStore(str(tmp_path)))


def served(replica: Replica, version: int) -> ServedModel:
    routing = replica.state.table.models[MODEL]
    found = routing.by_version(version)
    assert found is not None, f"v{version} is not serving"
    return found[0]


def alive(refs: dict[int, weakref.ref[Any]]) -> set[int]:
    """The versions whose estimator is still in memory (no collection is run: reference counts free them)."""
    return {version for version, ref in refs.items() if ref() is not None}


async def settled(refs: dict[int, weakref.ref[Any]], expected: set[int]) -> set[int]:
    """The versions in memory once they are ``expected``, or at a deadline: the executor thread that last
    warmed a model holds its work item until the thread next runs, moments after the loop went on."""

    async def reached() -> bool:
        return alive(refs) == expected

    with contextlib.suppress(AssertionError):
        await eventually(reached, deadline_s=5, interval_s=0.01)
    return alive(refs)


async def test_versions_promoted_over_rolled_back_or_replaced_leave_the_replicas_memory(
    world: Retraining,
) -> None:
    replica = Replica(world)
    estimators: dict[int, weakref.ref[Any]] = {}

    def track(version: int) -> None:
        estimators[version] = weakref.ref(served(replica, version).estimator)

    await world.release(1)
    await replica.follow()
    track(1)
    await world.release(2)  # canary
    await replica.follow()
    track(2)
    assert alive(estimators) == {1, 2}

    await world.send(new_event(PromoteRequested(model=MODEL, model_version=2, reason="ok"), source="/x"))
    await replica.follow()
    assert await settled(estimators, {2}) == {2}, "v1 was promoted over"

    await world.release(3)
    await replica.follow()
    track(3)
    started = world.rollouts(RolloutStarted)[-1].data
    await world.send(canary_verdict(started, 0, Verdict.UNHEALTHY))
    await replica.follow()
    assert await settled(estimators, {2}) == {2}, "v3 was rolled back"

    await world.register(4)
    change = ModelStageChanged(
        model=MODEL, model_version=4, from_stage=Stage.CANDIDATE, to_stage=Stage.PRODUCTION, reason="manual"
    )
    await world.send(new_event(change, source="/driftloop/registry"))
    await replica.follow()
    track(4)
    assert await settled(estimators, {4}) == {4}, "v2 was replaced by the registry's production change"
    assert replica.predict().versions == [4, 4]


async def test_the_compiled_copy_of_a_version_promoted_over_leaves_memory_with_it(tmp_path: Path) -> None:
    world = Retraining(ArtifactStore(str(tmp_path)))
    world.loader = ArtifactModelLoader(world.store)  # type: ignore[assignment]
    replica = Replica(world)
    await world.release(1)
    await replica.follow()
    v1 = served(replica, 1)
    assert v1.compiled is not None
    estimator, compiled = weakref.ref(v1.estimator), weakref.ref(v1.compiled)
    del v1

    await world.release(2)
    await world.send(new_event(PromoteRequested(model=MODEL, model_version=2, reason="ok"), source="/x"))
    await replica.follow()
    assert await settled({1: estimator, 2: compiled}, set()) == set(), "v1's pipeline and compiled copy"


async def test_a_version_evicted_before_it_serves_is_loaded_again_and_serves(
    world: Retraining, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    read = world.store._read

    def counted(key: str) -> bytes:
        reads.append(key)
        return read(key)

    monkeypatch.setattr(world.store, "_read", counted)
    source = LaggingSource(FakeRoutingSource(world.routes, world.versions))
    replica = Replica(world)
    replica.sync.source = source
    await world.release(1)
    await replica.follow()
    await world.release(1, model=OTHER)
    await source.read_now()  # the replica reads the state for the other model's change...
    v2 = await world.release(2)
    assert reads.count(v2) == 1, "the deciding replica loads v2 before the rollout starts"

    await replica.follow()  # ...and swaps after v2 was loaded: v2 is not in that table, and goes
    assert set(replica.state.table.models) == {MODEL, OTHER}
    assert replica.state.table.models[MODEL].versions == [1]

    await replica.follow()  # the route naming v2 reaches the replica
    assert replica.state.table.models[MODEL].versions == [1, 2]
    assert reads.count(v2) == 2, "evicted before it served, v2 is loaded again, once"
    assert replica.predict(version=2).versions == [2, 2]


async def test_a_model_evicted_while_a_request_holds_it_answers_until_the_request_ends(
    world: Retraining, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        test_handlers, "POLICY", RolloutPolicy(steps=(1.0,), min_samples=10, mode=RolloutMode.SHADOW)
    )
    replica = Replica(world)
    await world.release(1)
    await world.release(2)  # a shadow candidate: every row is also scored by v2, after the answer
    await replica.follow()
    records = [record()]
    answered = replica.predictor.predict(
        PredictRequest(
            model=MODEL, rows=1, parse=lambda sig, idx: columns_from_records(sig, records), entity_keys=["k"]
        )
    )
    assert answered.versions == [1]
    job = replica.predictor.shadow_queue.get_nowait()
    held = replica.state.table  # as a request takes it, before the swap below
    candidate = weakref.ref(served(replica, 2).estimator)

    started = world.rollouts(RolloutStarted)[-1].data
    await world.send(canary_verdict(started, 0, Verdict.UNHEALTHY))
    await replica.follow()
    assert replica.state.table.models[MODEL].versions == [1]

    assert candidate() is not None, "a request's table and a queued shadow scoring still hold v2"
    canary = held.models[MODEL].canary
    assert canary is not None and canary.predict(columns_from_records(canary.signature, records)).labels
    replica.predictor.score_shadow(job)  # scored and logged, not failed
    del held, canary, job
    assert await settled({2: candidate}, set()) == set(), "once they end, nothing holds v2"


async def test_a_failed_load_holds_off_retries_for_its_delay_even_across_swaps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(str(tmp_path))
    reads: list[str] = []

    def garbled(key: str) -> bytes:
        reads.append(key)
        return b"not a model"

    monkeypatch.setattr(store, "_read", garbled)
    broken = VersionRecord(MODEL, 1, "01" * 32, churn_signature())
    loader = ArtifactModelLoader(store, retry_failed_after_s=30.0, compile_models=False)
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="cannot be loaded"):
            await loader.load(broken)
        loader.keep_served(set())
    assert len(reads) == 1, "the second load is refused without reading the store"


async def test_failures_past_their_retry_delay_are_not_kept(tmp_path: Path) -> None:
    loader = ArtifactModelLoader(ArtifactStore(str(tmp_path)), retry_failed_after_s=0.0, compile_models=False)
    for version in range(1, 6):
        with pytest.raises(ModelLoadError):
            await loader.load(VersionRecord(MODEL, version, f"{version:02x}" * 32, churn_signature()))
    assert len(loader._failed) == 1, "only the latest failure, which holds off nothing either"


class LaggingSource:
    """A routing source whose next snapshot can be one read earlier: a replica that read the state, then
    swapped after a handler changed it."""

    def __init__(self, source: RoutingSource) -> None:
        self.source = source
        self._read: list[tuple[ModelRoute, dict[int, VersionRecord]]] | None = None

    async def read_now(self) -> None:
        """Read the state now; the next snapshot returns what was read."""
        self._read = await self.source.snapshot()

    async def snapshot(self) -> list[tuple[ModelRoute, dict[int, VersionRecord]]]:
        if self._read is not None:
            snapshot, self._read = self._read, None
            return snapshot
        return await self.source.snapshot()

    async def wait_for_change(self, timeout_s: float) -> None:
        return None
