"""A replica's routing follows the persisted routes, including a version it could not load at first."""

from __future__ import annotations

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
