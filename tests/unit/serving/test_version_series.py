"""A version's Prometheus series live as long as the version serves on the replica: promoted over,
rolled back or replaced, it leaves /metrics, so months of retraining do not grow it without bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from contracts.commands import PromoteRequested, RollbackRequested
from contracts.common import Stage
from contracts.envelope import new_event
from contracts.models import ModelStageChanged
from contracts.monitoring import Verdict
from contracts.predictions import Variant
from contracts.rollouts import RolloutMode, RolloutStarted
from libs.artifacts import ArtifactStore, save_model
from services.serving import metrics
from services.serving.adapters.artifacts import ArtifactModelLoader
from services.serving.domain import columns_from_records
from services.serving.metrics import request_series
from services.serving.routing import ModelRouting, RoutingState, RoutingSync, RoutingTable, ServedModel
from services.serving.scoring import CanaryStats, Predictor, PredictRequest
from tests.unit.serving.fakes import (
    FakeRoutingSource,
    NoLog,
    canary_verdict,
    churn_pipeline,
    churn_signature,
    record,
)
from tests.unit.serving.test_handlers import World, passed, registered

MODEL = "retrained"
PIPELINE = churn_pipeline()


class Replica:
    """One serving replica: the world's handlers decide, the replica follows the persisted routes."""

    def __init__(self, world: World) -> None:
        self.state = RoutingState()
        self.sync = RoutingSync(self.state, FakeRoutingSource(world.routes, world.versions), world.loader)
        self.predictor = Predictor(
            self.state, NoLog(), CanaryStats(threshold=0.5, min_requests=1000), max_rows=10
        )

    async def follow(self) -> None:
        await self.sync.sync_once()

    def predict(self, version: int | None = None) -> Any:
        records = [record(), record(plan="plus")]
        return self.predictor.predict(
            PredictRequest(
                model=MODEL,
                rows=len(records),
                parse=lambda sig, idx: columns_from_records(sig, records),
                entity_keys=[None] * len(records),
                version=version,
            )
        )


def exported() -> dict[tuple[str, str], float]:
    """(series name, version) -> value of every serving series of MODEL in the registry's output."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for sample in family.samples:
            if sample.labels.get("model") == MODEL and "version" in sample.labels:
                out[(sample.name, sample.labels["version"])] = sample.value
    return out


def versions_exported() -> set[int]:
    return {int(version) for _, version in exported()}


class Retraining(World):
    """Serving's handlers with the real loader on a temporary store, and a new version per retraining."""

    def __init__(self, store: ArtifactStore) -> None:
        super().__init__()
        self.store = store
        self.loader = ArtifactModelLoader(store, compile_models=False)  # type: ignore[assignment]

    async def register(self, version: int, model: str = MODEL) -> str:
        """Register a new version (its own artifact); returns its artifact key."""
        key = save_model(self.store, churn_pipeline(version)).sha256
        await self.send(registered(version, model=model, key=key))
        return key

    async def release(self, version: int, model: str = MODEL) -> str:
        """Register and validate a new version (its own artifact); returns its artifact key."""
        key = await self.register(version, model)
        await self.send(passed(version, model=model))
        return key


@pytest.fixture
def world(tmp_path: Path) -> Retraining:
    return Retraining(ArtifactStore(str(tmp_path)))


async def test_versions_promoted_over_rolled_back_or_replaced_leave_the_metrics(world: Retraining) -> None:
    replica = Replica(world)
    await world.release(1)  # the first version is promoted at once
    await replica.follow()
    replica.predict()
    assert versions_exported() == {1}

    await world.release(2)  # canary
    await replica.follow()
    replica.predict(version=1)
    replica.predict(version=2)
    assert versions_exported() == {1, 2}

    await world.send(new_event(PromoteRequested(model=MODEL, model_version=2, reason="ok"), source="/x"))
    await replica.follow()
    replica.predict()
    assert versions_exported() == {2}, "v1 was promoted over"

    await world.release(3)
    await replica.follow()
    replica.predict(version=3)
    started = world.rollouts(RolloutStarted)[-1].data
    await world.send(canary_verdict(started, 0, Verdict.UNHEALTHY))
    await replica.follow()
    assert versions_exported() == {2}, "v3 was rolled back"

    await world.register(4)
    change = ModelStageChanged(
        model=MODEL, model_version=4, from_stage=Stage.CANDIDATE, to_stage=Stage.PRODUCTION, reason="manual"
    )
    await world.send(new_event(change, source="/driftloop/registry"))
    await replica.follow()
    replica.predict()
    assert versions_exported() == {4}, "v2 was replaced by the registry's production change"
    assert exported()[("driftloop_serving_requests_total", "4")] == 1


async def test_a_version_served_again_counts_from_zero_in_an_exported_series(world: Retraining) -> None:
    replica = Replica(world)
    await world.release(1)
    await replica.follow()
    for _ in range(3):
        replica.predict()
    await world.release(2)
    await world.send(new_event(PromoteRequested(model=MODEL, model_version=2, reason="ok"), source="/x"))
    await replica.follow()
    assert versions_exported() == {2}

    rollback = RollbackRequested(model=MODEL, model_version=2, to_version=1, reason="worse")
    await world.send(new_event(rollback, source="/x"))
    await replica.follow()
    replica.predict()
    # Counted in a live series, not in a handle to the one removed with v1 (which would count unseen).
    assert exported()[("driftloop_serving_requests_total", "1")] == 1
    assert exported()[("driftloop_serving_rows_total", "1")] == 2
    assert versions_exported() == {1}


def routing(
    stable: int | None, canary: int | None = None, mode: RolloutMode = RolloutMode.CANARY
) -> ModelRouting:
    def served(version: int | None) -> ServedModel | None:
        if version is None:
            return None
        return ServedModel(MODEL, version, f"{version:02x}" * 32, churn_signature(), PIPELINE)

    return ModelRouting(
        model=MODEL,
        stable=served(stable),
        canary=served(canary),
        rollout_id="r-1" if canary else None,
        weight=1.0 if canary else 0.0,
        mode=mode,
        step_index=0,
    )


def test_every_series_labelled_with_a_version_goes_with_it() -> None:
    state = RoutingState()
    state.swap(RoutingTable({MODEL: routing(5, 6)}))
    for version in (5, 6):
        for variant in Variant:
            requests, rows, latency = request_series(MODEL, version, variant)
            requests.inc()
            rows.inc(3)
            latency.observe(0.001)
            metrics.MODEL_ERRORS.labels(MODEL, str(version), variant.value).inc()
        metrics.UNCOMPILED.labels(MODEL, str(version)).inc()
        metrics.ENGINE.labels(MODEL, str(version), "scikit-learn").set(1)
    names = {name for name, _ in exported()}
    assert {"driftloop_serving_model_errors_total", "driftloop_serving_model_engine_info"} <= names

    state.swap(RoutingTable({MODEL: routing(6)}))
    assert versions_exported() == {6}
    assert {name for name, version in exported() if version == "6"} == names

    state.swap(RoutingTable({}))  # the model is no longer served at all
    assert versions_exported() == set()


def test_a_swap_that_keeps_a_version_keeps_its_counts() -> None:
    state = RoutingState()
    state.swap(RoutingTable({MODEL: routing(7)}))
    request_series(MODEL, 7, Variant.STABLE)[0].inc()
    state.swap(RoutingTable({MODEL: routing(7, 8)}))
    request_series(MODEL, 7, Variant.STABLE)[0].inc()
    assert exported()[("driftloop_serving_requests_total", "7")] == 2


async def test_a_shadow_scoring_left_over_from_a_finished_rollout_brings_no_series_back() -> None:
    state = RoutingState()
    predictor = Predictor(state, NoLog(), CanaryStats(threshold=0.5, min_requests=1000), max_rows=10)
    state.swap(RoutingTable({MODEL: routing(1, 2, RolloutMode.SHADOW)}))
    records = [record()]
    predictor.predict(
        PredictRequest(
            model=MODEL, rows=1, parse=lambda sig, idx: columns_from_records(sig, records), entity_keys=["k"]
        )
    )
    job = predictor.shadow_queue.get_nowait()
    state.swap(RoutingTable({MODEL: routing(1)}))  # the candidate was rolled back while the job waited
    predictor.score_shadow(job)
    assert versions_exported() == {1}


def per_model_exported() -> dict[tuple[str, str], float]:
    """(series name, model) -> value of every serving series labelled by model and not by version."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for sample in family.samples:
            model = sample.labels.get("model")
            if model in (MODEL, OTHER) and "version" not in sample.labels and "le" not in sample.labels:
                out[(sample.name, model)] = sample.value
    return out


OTHER = "still-served"


def test_a_model_no_longer_routed_leaves_its_per_model_series() -> None:
    """Archived or deleted, a model leaves the table: its whole-request timings and unseen categories go
    with it, as its versions' series do; a model still served keeps its counts."""
    other = ServedModel(OTHER, 1, "01" * 32, churn_signature(), PIPELINE)
    still = ModelRouting(OTHER, other, None, None, 0.0, RolloutMode.CANARY, 0)
    state = RoutingState()
    predictor = Predictor(state, NoLog(), CanaryStats(threshold=0.5, min_requests=1000), max_rows=10)
    state.swap(RoutingTable({MODEL: routing(1), OTHER: still}))
    records = [record(plan="gold")]  # a category the model never saw: counted per model and feature
    for model in (MODEL, OTHER):
        predictor.predict(
            PredictRequest(
                model=model,
                rows=1,
                parse=lambda sig, idx: columns_from_records(sig, records),
                entity_keys=[None],
            )
        )
        metrics.REQUEST_SECONDS.labels(model, "v1").observe(0.002)
    for model in (MODEL, OTHER):
        assert per_model_exported()[("driftloop_serving_unseen_categories_total", model)] == 1
        assert per_model_exported()[("driftloop_serving_request_seconds_count", model)] == 1

    state.swap(RoutingTable({OTHER: still}))

    assert {model for _, model in per_model_exported()} == {OTHER}
    assert per_model_exported()[("driftloop_serving_unseen_categories_total", OTHER)] == 1
    assert per_model_exported()[("driftloop_serving_request_seconds_count", OTHER)] == 1


def rollout_gauges() -> dict[tuple[str, str], float]:
    """(series name, mode) -> value of MODEL's live-rollout gauges."""
    out: dict[tuple[str, str], float] = {}
    for name in ("driftloop_serving_canary_weight", "driftloop_serving_rollout_step"):
        for mode in RolloutMode:
            value = REGISTRY.get_sample_value(name, {"model": MODEL, "mode": mode.value})
            if value is not None:
                out[(name, mode.value)] = value
    return out


async def test_a_live_rollouts_weight_and_step_are_shown_until_it_ends(world: Retraining) -> None:
    replica = Replica(world)
    await world.release(1)  # the first version is promoted at once: no rollout
    await replica.follow()
    assert rollout_gauges() == {}

    await world.release(2)  # a canary at its first step
    await replica.follow()
    route = world.routes.rows[MODEL]
    assert route.rollout is not None
    assert rollout_gauges() == {
        ("driftloop_serving_canary_weight", "canary"): route.rollout.steps[0],
        ("driftloop_serving_rollout_step", "canary"): 0,
    }

    await world.send(new_event(PromoteRequested(model=MODEL, model_version=2, reason="ok"), source="/x"))
    await replica.follow()
    assert rollout_gauges() == {}, "the rollout was promoted"

    await world.release(3)
    await replica.follow()
    assert ("driftloop_serving_canary_weight", "canary") in rollout_gauges()
    started = world.rollouts(RolloutStarted)[-1].data
    await world.send(canary_verdict(started, 0, Verdict.UNHEALTHY))
    await replica.follow()
    assert rollout_gauges() == {}, "the rollout was rolled back"
