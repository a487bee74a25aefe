"""A replica's routing follows the persisted routes, including a version it could not load at first, and
a model whose version the store could not give it for a while."""

from __future__ import annotations

import gc
import weakref

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.commands import PromoteRequested
from contracts.envelope import new_event
from libs.errors import NotFound, Unavailable
from services.serving.routing import RoutingState, RoutingSync
from services.serving.scoring import CanaryStats, Predictor
from tests.unit.serving.fakes import FakeLoader, FakeRoutingSource, NoLog, passed, registered
from tests.unit.serving.test_handlers import World


async def test_a_version_this_replica_failed_to_load_is_loaded_at_a_later_sync_without_another_change() -> (
    None
):
    """The deciding replica loaded v2; this one failed to (a warm-up that failed, say) when v2 was
    promoted, and serves nothing of the model meanwhile. Its next sync tries again: it must not wait for
    some other routing change to come, which may be days away."""
    world = World()
    loader = FakeLoader()  # this replica's own: the world's loader is the deciding replica's
    state = RoutingState()
    sync = RoutingSync(state, FakeRoutingSource(world.routes, world.versions), loader)
    await world.send(registered(1), passed(1))
    await sync.sync_once()
    loader.broken.add("02" * 32)
    with capture_logs() as logs:
        await world.send(registered(2), passed(2))
        await sync.sync_once()
        assert state.table.models["churn"].versions == [1], "a canary that did not load here takes no traffic"

        await world.send(
            new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x")
        )
        await sync.sync_once()
        assert "churn" not in state.table.models, "v2 could not load here, and v1 serves no more"
        assert await sync.sync_once() is False, "a retry that loads nothing leaves the table as it is"
    failures = [e["log_level"] for e in logs if e["event"] == "model version cannot be served"]
    assert failures == ["error", "debug", "debug"], "an error once, not at every retry"

    loader.broken.clear()
    await sync.sync_once()
    assert state.table.models["churn"].versions == [2]


def artifact(model: str, version: int) -> str:
    """A version's own artifact key (the models' versions share none)."""
    return f"{model[0].encode().hex()}{version:02x}" * 16


def routing_sync_failures() -> float:
    return REGISTRY.get_sample_value("driftloop_serving_loop_failures_total", {"loop": "routing-sync"}) or 0.0


async def test_a_store_error_loading_one_model_holds_back_that_model_only_and_is_retried() -> None:
    """The store cannot give this replica churn's new canary (timing out) while fraud starts a rollout too:
    fraud's change goes through at once; churn keeps exactly what it served (not a rollout without its
    canary), the round is logged and counted as failed, and the next sync, with no new event, loads it."""
    world = World()
    loader = FakeLoader()
    state = RoutingState()
    sync = RoutingSync(state, FakeRoutingSource(world.routes, world.versions), loader)
    for model in ("churn", "fraud"):
        await world.send(registered(1, model, key=artifact(model, 1)), passed(1, model))
    await sync.sync_once()
    before = state.table.models["churn"]
    failures = routing_sync_failures()

    loader.away.add(artifact("churn", 2))
    with capture_logs() as logs:
        for model in ("churn", "fraud"):
            await world.send(registered(2, model, key=artifact(model, 2)), passed(2, model))
        assert await sync.sync_once() is True, "fraud's rollout did not wait for churn's store error"
        assert state.table.models["fraud"].versions == [1, 2]
        assert state.table.models["fraud"].rollout_id is not None
        assert state.table.models["churn"] is before, "churn serves what it served, whole"
        assert await sync.sync_once() is False, "tried again, still away: the table stays"
    warnings = [e for e in logs if e["event"].startswith("routing sync failed")]
    assert [w["log_level"] for w in warnings] == ["warning", "warning"], "once per attempt"
    assert "churn" in warnings[0]["models"] and "fraud" not in warnings[0]["models"]
    assert routing_sync_failures() - failures == 2
    assert not [e for e in logs if e["event"] == "model version cannot be served"], "not the version's fault"

    loader.away.clear()
    assert await sync.sync_once() is True, "retried without another routing change"
    assert state.table.models["churn"].versions == [1, 2]
    assert routing_sync_failures() - failures == 2


async def test_a_model_whose_canary_the_store_cannot_give_a_starting_replica_is_not_half_routed() -> None:
    """A replica starting while churn's canary cannot be read from the store: it had nothing of churn to
    keep, so it serves none of it (not the stable version under a rollout whose canary it lacks) until the
    store answers, and serves every other model meanwhile."""
    world = World()
    for model in ("churn", "fraud"):
        await world.send(registered(1, model, key=artifact(model, 1)), passed(1, model))
    await world.send(registered(2, key=artifact("churn", 2)), passed(2))
    assert world.routes.rows["churn"].active is not None, "churn's v2 is live as a canary"
    loader = FakeLoader()
    loader.away.add(artifact("churn", 2))
    state = RoutingState()
    sync = RoutingSync(state, FakeRoutingSource(world.routes, world.versions), loader)

    assert await sync.sync_once() is True
    assert state.synced.is_set() and set(state.table.models) == {"fraud"}
    # A request for churn is told to try again (503), not that no such model is served (404).
    predictor = Predictor(state, NoLog(), CanaryStats(threshold=0.5, min_requests=1000), max_rows=10)
    with pytest.raises(Unavailable, match="'churn' cannot be served yet"):
        predictor.routing("churn")
    with pytest.raises(NotFound, match="'churn' is not served here"):
        predictor.routing("churn", scope=frozenset({"fraud"}))  # a token for fraud learns nothing of churn

    loader.away.clear()
    await sync.sync_once()
    assert not state.table.held
    churn = state.table.models["churn"]
    assert churn.versions == [1, 2] and churn.rollout_id == world.routes.rows["churn"].active.rollout_id


class _Cycle:
    """Garbage only the cycle collector frees: it refers to itself, as a request's failed call does (its
    exception's traceback holds the frame that holds the exception, and with it the request's rows)."""

    def __init__(self) -> None:
        self.me = self


async def test_garbage_waiting_for_the_collector_at_a_routing_swap_is_still_collected() -> None:
    """A swap freezes what is alive (gc.freeze) so full collections skip the loaded models. What was already
    garbage then, waiting for the collector, must not be frozen with them: frozen, a collection never looks
    at it again, and every routing change of months of rollouts would keep some for the process's life."""
    world = World()
    sync = RoutingSync(RoutingState(), FakeRoutingSource(world.routes, world.versions), FakeLoader())
    await world.send(registered(1), passed(1))
    gc.disable()  # the test's garbage waits for a collection, as between two of the collector's own runs
    try:
        garbage = _Cycle()
        left = weakref.ref(garbage)
        del garbage
        assert await sync.sync_once() is True, "the routing swapped"
        gc.collect()
        assert left() is None, "frozen at the swap, the garbage is never collected"
    finally:
        gc.enable()
