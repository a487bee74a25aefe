"""A replica's routing follows the persisted routes, including a version it could not load at first."""

from __future__ import annotations

import gc
import weakref

from structlog.testing import capture_logs

from contracts.commands import PromoteRequested
from contracts.envelope import new_event
from services.serving.routing import RoutingState, RoutingSync
from tests.unit.serving.fakes import FakeLoader, FakeRoutingSource, passed, registered
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
