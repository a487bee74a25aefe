"""Serving's handlers on the in-memory bus with fake ports: events in, state and rollout events out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from contracts import commands, models, monitoring, validation
from contracts.commands import PromoteRequested, RollbackRequested
from contracts.common import EventRef, Stage
from contracts.envelope import CloudEvent, EventPayload, new_event
from contracts.models import ModelStageChanged
from contracts.monitoring import Verdict
from contracts.registry import EVENT_TYPES
from contracts.rollouts import (
    TOPIC as ROLLOUTS,
)
from contracts.rollouts import (
    RollbackReason,
    RolloutPromoted,
    RolloutRolledBack,
    RolloutStarted,
    RolloutStepAdvanced,
)
from libs.bus import InMemoryBus, Subscription, Transaction
from libs.errors import Outage
from services.serving import handlers
from services.serving.domain import RolloutPolicy
from services.serving.routing import RoutingState, RoutingSync
from tests.unit.serving.fakes import (
    Clock,
    FakeLoader,
    FakeRoutes,
    FakeRoutingSource,
    FakeVersions,
    canary_verdict,
    passed,
    registered,
    rollout_never_started,
)

POLICY = RolloutPolicy(steps=(0.1, 0.5, 1.0), min_samples=10, bake_seconds=5.0)


class World:
    """The bus, the fakes and the serving subscription wired like bootstrap does."""

    def __init__(self, **limits: Any) -> None:
        """``limits``: the subscription's retry settings, when not the defaults."""
        self.bus = InMemoryBus(EVENT_TYPES)
        self.versions = FakeVersions()
        self.clock = Clock()
        self.routes = FakeRoutes(self.clock)
        self.loader = FakeLoader()
        self.ids = iter(f"r-{i}" for i in range(1, 100))

        def bind(handler: Any) -> Any:
            async def run(event: CloudEvent[Any], tx: Transaction) -> None:
                await handlers.handle(
                    handler,
                    event,
                    tx,
                    versions=self.versions,
                    routes=self.routes,
                    loader=self.loader,
                    source="/driftloop/serving",
                    policy=POLICY,
                    new_id=lambda: next(self.ids),
                )

            return run

        self.bus.subscribe(
            Subscription(
                consumer="serving",
                topics=[models.TOPIC, validation.TOPIC, monitoring.TOPIC, commands.TOPIC],
                handlers={p: bind(h) for p, h in handlers.HANDLERS.items()},
                **limits,
            )
        )

    async def send(self, *events: CloudEvent[Any]) -> None:
        for e in events:
            await self.bus.publish(e)
        await self.bus.drain()

    def rollouts(self, of: type[EventPayload] | None = None) -> list[CloudEvent[Any]]:
        return self.bus.events(ROLLOUTS, of)

    @property
    def route(self):
        return self.routes.rows["churn"]


@pytest.fixture
async def world() -> World:
    w = World()
    await w.send(registered(1), passed(1))
    return w


async def test_first_validated_version_is_promoted_at_once(world: World) -> None:
    assert [type(e.data) for e in world.rollouts()] == [RolloutStarted, RolloutPromoted]
    assert world.route.stable_version == 1


async def test_validation_before_registration_starts_the_rollout_when_registered(world: World) -> None:
    await world.send(passed(2))
    assert world.rollouts(RolloutStarted)[-1].data.canary_version == 1  # nothing yet for v2
    await world.send(registered(2))
    started = world.rollouts(RolloutStarted)[-1]
    assert started.data.canary_version == 2 and started.data.weight == 0.1
    assert world.route.active is not None and world.route.active.canary_version == 2


async def test_rollout_events_follow_their_cause(world: World) -> None:
    cause = passed(2)
    await world.send(registered(2), cause)
    started = world.rollouts(RolloutStarted)[-1]
    assert started.causationid == cause.id and started.correlationid == cause.correlationid
    assert started.source == "/driftloop/serving" and started.subject == "churn"


async def test_duplicate_event_changes_nothing(world: World) -> None:
    event = passed(2)
    await world.send(registered(2), event)
    saves = world.routes.saves
    await world.send(event)
    assert world.routes.saves == saves
    assert len(world.rollouts(RolloutStarted)) == 2


async def test_healthy_verdicts_walk_the_steps_then_promote(world: World) -> None:
    await world.send(registered(2), passed(2))
    started = world.rollouts(RolloutStarted)[-1].data
    for step in range(2):
        world.clock.advance(6)
        await world.send(canary_verdict(started, step, Verdict.HEALTHY))
    # 10% -> 50%, then promotion: the 100% step has no stable traffic left to judge against.
    assert [e.data.weight for e in world.rollouts(RolloutStepAdvanced)] == [0.5]
    promoted = world.rollouts(RolloutPromoted)[-1].data
    assert promoted.model_version == 2 and promoted.previous_version == 1
    assert world.route.stable_version == 2 and world.route.active is None


async def test_a_step_is_timed_on_the_routes_clock_whichever_replica_decides(world: World) -> None:
    # The routes' clock (Postgres') an hour behind this host's. Timed on the clock of the replica that
    # handled each event, a step started by one replica and judged by another whose clock is behind (or
    # after a clock stepped back) had not baked yet: its one healthy verdict was ignored as premature, and
    # the rollout stayed on that step.
    world.clock.now = datetime.now(UTC) - timedelta(hours=1)
    await world.send(registered(2), passed(2))
    started = world.rollouts(RolloutStarted)[-1].data
    live = world.route.active
    assert live is not None and live.step_started_at == world.route.decided_at == world.clock.now
    world.clock.advance(6)  # the bake time (5 s) passed on the routes' clock
    await world.send(canary_verdict(started, 0, Verdict.HEALTHY))
    [advanced] = world.rollouts(RolloutStepAdvanced)
    assert advanced.data.step_seconds == 6.0
    live = world.route.active
    assert live is not None and live.step_index == 1 and live.step_started_at == world.clock.now


async def test_unhealthy_verdict_rolls_back_and_rejects_the_version(world: World) -> None:
    await world.send(registered(2), passed(2))
    started = world.rollouts(RolloutStarted)[-1].data
    await world.send(canary_verdict(started, 0, Verdict.UNHEALTHY))
    [rolled_back] = world.rollouts(RolloutRolledBack)
    assert rolled_back.data.reason is RollbackReason.UNHEALTHY_VERDICT
    assert world.route.active is None and world.route.stable_version == 1
    assert world.versions.rows[("churn", 2)].stage == Stage.REJECTED.value
    # The same version re-announced does not start again.
    await world.send(registered(2))
    assert len(world.rollouts(RolloutStarted)) == 2


async def test_stale_verdict_is_ignored_and_counted(world: World) -> None:
    await world.send(registered(2), passed(2))
    started = world.rollouts(RolloutStarted)[-1].data
    before = handlers.IGNORED.labels("CanaryVerdict", "stale-step")._value.get()
    world.clock.advance(6)
    await world.send(canary_verdict(started, 2, Verdict.UNHEALTHY))
    assert handlers.IGNORED.labels("CanaryVerdict", "stale-step")._value.get() == before + 1
    assert world.rollouts(RolloutRolledBack) == [] and world.route.active is not None
    assert world.bus.dead_letters == []


async def test_a_version_that_cannot_load_never_takes_traffic(world: World) -> None:
    world.loader.broken.add("03" * 32)
    await world.send(registered(3), passed(3))
    [failed] = world.rollouts(RolloutRolledBack)
    assert failed.data.reason is RollbackReason.LOAD_FAILED and failed.data.weight == 0.0
    assert world.route.active is None and world.route.stable_version == 1
    assert world.versions.rows[("churn", 3)].load_error


async def test_an_outage_while_a_validated_version_loads_is_retried_and_rejects_nothing(
    world: World,
) -> None:
    """The store or the database away for a moment is no fault of the version: the bus retries the event
    (an outage without limit, a timeout a bounded number of times), and the rollout starts once it loads."""
    world.loader.failing = [Outage("the artifact store is restarting"), TimeoutError("read timed out")]
    await world.send(registered(2), passed(2))
    assert world.loader.failing == []
    assert world.rollouts(RolloutRolledBack) == [] and world.bus.dead_letters == []
    assert world.rollouts(RolloutStarted)[-1].data.canary_version == 2
    record = world.versions.rows[("churn", 2)]
    assert record.stage != Stage.REJECTED.value and record.load_error is None


async def test_a_timeout_on_every_retry_dead_letters_the_event_and_rejects_nothing() -> None:
    """A timeout may be the handler's own (a wait that never ends): the bus dead-letters it after its bound,
    naming the error; the version is not rejected, so the event redriven later starts its rollout."""
    world = World(max_uncertain_retries=2, retry_backoff_s=0.0)
    await world.send(registered(1), passed(1))
    world.loader.failing = [TimeoutError("read timed out")] * 3
    passing = passed(2)
    await world.send(registered(2), passing)
    [dead] = world.bus.dead_letters
    assert dead.reason == "handler-failed" and "TimeoutError: read timed out" in dead.error
    assert world.rollouts(RolloutRolledBack) == [] and world.route.active is None
    assert world.versions.rows[("churn", 2)].stage != Stage.REJECTED.value

    world.loader.failing = []
    await world.send(new_event(passing.data, source="/driftloop/validation"))
    assert world.rollouts(RolloutStarted)[-1].data.canary_version == 2


async def test_the_registrys_production_change_of_a_version_that_cannot_load_keeps_production_serving(
    world: World,
) -> None:
    """Mirrored as the registry's stage, the change routes nothing: every replica follows the routes, which
    keep the version that answers; the version's stage is the registry's, which no routing reads."""
    world.loader.broken.add("02" * 32)
    await world.send(registered(2))
    before = handlers.IGNORED.labels("ModelStageChanged", "load-failed")._value.get()
    change = ModelStageChanged(
        model="churn", model_version=2, from_stage=Stage.CANDIDATE, to_stage=Stage.PRODUCTION, reason="manual"
    )
    await world.send(new_event(change, source="/driftloop/registry"))
    assert handlers.IGNORED.labels("ModelStageChanged", "load-failed")._value.get() == before + 1
    assert world.route.stable_version == 1 and world.route.active is None
    assert world.versions.rows[("churn", 2)].stage == Stage.PRODUCTION.value
    state = RoutingState()
    await RoutingSync(state, FakeRoutingSource(world.routes, world.versions), FakeLoader()).sync_once()
    assert state.table.models["churn"].versions == [1]

    # The artifact restored, the registry's next move to production of it is taken.
    world.loader.broken.clear()
    await world.send(new_event(change, source="/driftloop/registry"))
    assert world.route.stable_version == 2


async def test_manual_rollback_carries_the_actor(world: World) -> None:
    await world.send(registered(2), passed(2))
    command = new_event(
        RollbackRequested(model="churn", model_version=2, reason="complaints"),
        source="/driftloop/serving",
        actor="user:alice",
    )
    await world.send(command)
    [rolled_back] = world.rollouts(RolloutRolledBack)
    assert rolled_back.actor == "user:alice" and rolled_back.causationid == command.id
    assert rolled_back.data.reason is RollbackReason.MANUAL and "user:alice" in rolled_back.data.message


async def test_a_manual_rollback_with_the_longest_reason_is_told_within_the_cap(world: World) -> None:
    # "manual rollback by <actor>: <reason>" ran past the cap its reason was already at.
    await world.send(registered(2), passed(2))
    reason = "r" * commands.REASON_MAX_CHARS
    command = RollbackRequested(model="churn", model_version=2, reason=reason)
    await world.send(new_event(command, source="/x", actor="user:" + "a" * 200))
    [rolled_back] = world.rollouts(RolloutRolledBack)
    assert len(rolled_back.data.message) == commands.REASON_MAX_CHARS
    assert rolled_back.data.message.startswith("manual rollback by user:aaa")
    assert rolled_back.data.message.endswith(" characters)")


async def test_manual_promote_of_the_canary(world: World) -> None:
    await world.send(registered(2), passed(2))
    await world.send(
        new_event(
            PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x", actor="user:bob"
        )
    )
    promoted = world.rollouts(RolloutPromoted)[-1]
    assert promoted.data.manual and promoted.data.model_version == 2 and promoted.actor == "user:bob"
    assert world.route.stable_version == 2


async def test_production_rollback_to_an_earlier_version(world: World) -> None:
    await world.send(registered(2), passed(2))
    await world.send(new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x"))
    await world.send(new_event(RollbackRequested(model="churn", model_version=2, reason="bad"), source="/x"))
    rolled_back = world.rollouts(RolloutRolledBack)[-1].data
    assert (rolled_back.stable_version, rolled_back.canary_version, rolled_back.weight) == (1, 2, 1.0)
    assert world.route.stable_version == 1


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (
            PromoteRequested(model="churn", model_version=9, reason="ok"),
            "churn v9 is not a registered version",
        ),
        (
            RollbackRequested(model="churn", model_version=1, to_version=7, reason="bad"),
            "rollback target churn v7 is not a registered version",
        ),
    ],
    ids=["promote", "rollback"],
)
async def test_a_command_naming_an_unknown_version_is_dead_lettered_with_why(
    world: World, command: PromoteRequested | RollbackRequested, error: str
) -> None:
    before = len(world.rollouts())
    await world.send(new_event(command, source="/x", actor="user:bob"))
    [dead] = world.bus.dead_letters
    assert dead.reason == "rejected" and error in dead.error
    assert len(world.rollouts()) == before and world.route.stable_version == 1


async def test_registry_production_change_switches_the_stable(world: World) -> None:
    await world.send(registered(2))
    change = ModelStageChanged(
        model="churn", model_version=2, from_stage=Stage.CANDIDATE, to_stage=Stage.PRODUCTION, reason="manual"
    )
    await world.send(new_event(change, source="/driftloop/registry"))
    assert world.route.stable_version == 2
    assert len(world.rollouts()) == 2  # no rollout events: the registry's event is the fact


async def test_error_rate_breach_rolls_back_only_the_live_rollout(world: World) -> None:
    await world.send(registered(2), passed(2))
    published: list[CloudEvent[Any]] = []

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    kw: dict[str, Any] = {
        "versions": world.versions,
        "routes": world.routes,
        "publish": publish,
        "source": "/s",
        "tally": handlers.Tally(),
    }
    assert not await handlers.roll_back_for_error_rate("churn", "r-0", "old", **kw)
    assert await handlers.roll_back_for_error_rate("churn", "r-2", "3 of 20 failed", **kw)
    [event] = published
    assert event.data.reason is RollbackReason.ERROR_RATE and world.route.active is None


async def test_every_event_of_a_rollout_stays_in_the_cascade_that_started_it(world: World) -> None:
    # v2's rollout is started by one cascade; a verdict from another cascade advances it, and v3's
    # validation (a third cascade) supersedes it: all of v2's events stay in v2's trace.
    v2 = passed(2)
    await world.send(registered(2), v2)
    started = world.rollouts(RolloutStarted)[-1]
    world.clock.advance(6)
    await world.send(canary_verdict(started.data, 0, Verdict.HEALTHY))
    v3 = passed(3)
    await world.send(registered(3), v3)
    advanced = world.rollouts(RolloutStepAdvanced)[-1]
    superseded, v3_started = world.rollouts()[-2:]
    assert superseded.data.reason is RollbackReason.SUPERSEDED and superseded.data.canary_version == 2
    assert {started.correlationid, advanced.correlationid, superseded.correlationid} == {v2.correlationid}
    # The rollback names what caused it, even though that is in another cascade.
    assert superseded.causationid == v3.id
    assert v3_started.correlationid == v3.correlationid != v2.correlationid


async def test_manual_and_error_rate_rollbacks_stay_in_the_rollout_cascade(world: World) -> None:
    v2 = passed(2)
    await world.send(registered(2), v2)
    command = new_event(
        RollbackRequested(model="churn", model_version=2, reason="complaints"), source="/x", actor="user:a"
    )
    await world.send(command)
    [manual] = world.rollouts(RolloutRolledBack)
    assert (manual.correlationid, manual.causationid, manual.actor) == (
        v2.correlationid,
        command.id,
        "user:a",
    )

    v3 = passed(3)
    await world.send(registered(3), v3)
    published: list[CloudEvent[Any]] = []

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    rollout_id = world.rollouts(RolloutStarted)[-1].data.rollout_id
    assert await handlers.roll_back_for_error_rate(
        "churn",
        rollout_id,
        "3 of 20 failed",
        versions=world.versions,
        routes=world.routes,
        publish=publish,
        source="/s",
        tally=handlers.Tally(),
    )
    [breach] = published
    assert (breach.correlationid, breach.causationid) == (v3.correlationid, None)


async def test_a_production_rollback_by_hand_is_its_own_rollout_in_the_command_cascade(world: World) -> None:
    await world.send(registered(2), passed(2))
    await world.send(new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x"))
    command = new_event(RollbackRequested(model="churn", model_version=2, reason="bad"), source="/x")
    await world.send(command)
    rolled_back = world.rollouts(RolloutRolledBack)[-1]
    assert (rolled_back.correlationid, rolled_back.causationid) == (command.correlationid, command.id)
    assert world.route.rollout is not None and world.route.rollout.correlation_id == command.correlationid


async def rolled_back_canary(world: World) -> None:
    """Version 2 started as a canary and was rolled back on an unhealthy verdict: it is rejected."""
    await world.send(registered(2), passed(2))
    started = world.rollouts(RolloutStarted)[-1].data
    await world.send(canary_verdict(started, 0, Verdict.UNHEALTHY))
    assert world.versions.rows[("churn", 2)].stage == Stage.REJECTED.value
    assert world.route.stable_version == 1


async def test_a_promote_command_sent_before_its_canary_was_rolled_back_is_dead_lettered(
    world: World,
) -> None:
    await rolled_back_canary(world)
    await world.send(new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x"))
    assert world.route.stable_version == 1
    [dead] = world.bus.dead_letters
    assert dead.reason == "rejected" and "churn v2 was rolled back (rejected)" in dead.error


async def test_a_production_rollback_to_a_rejected_version_is_dead_lettered(world: World) -> None:
    await rolled_back_canary(world)
    await world.send(registered(3), passed(3))
    await world.send(new_event(PromoteRequested(model="churn", model_version=3, reason="ok"), source="/x"))
    assert world.route.stable_version == 3
    await world.send(
        new_event(RollbackRequested(model="churn", model_version=3, to_version=2, reason="bad"), source="/x")
    )
    assert world.route.stable_version == 3
    [dead] = world.bus.dead_letters
    assert "cannot be the rollback target" in dead.error


async def test_a_stale_stage_change_does_not_put_a_rolled_back_version_back(world: World) -> None:
    await world.send(registered(2), passed(2))
    await world.send(new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x"))
    # The registry's echo of that promotion, sent before it learnt of the rollback that follows.
    echo = new_event(
        ModelStageChanged(
            model="churn",
            model_version=2,
            from_stage=Stage.CANARY,
            to_stage=Stage.PRODUCTION,
            reason="promoted",
        ),
        source="/driftloop/registry",
    )
    await world.send(new_event(RollbackRequested(model="churn", model_version=2, reason="bad"), source="/x"))
    assert world.route.stable_version == 1
    await world.send(echo)
    assert world.route.stable_version == 1
    assert world.versions.rows[("churn", 2)].stage == Stage.REJECTED.value
    assert world.bus.dead_letters == []
    # The registry archiving the rejected version is mirrored as before.
    await world.send(
        new_event(
            ModelStageChanged(
                model="churn", model_version=2, from_stage=Stage.REJECTED, to_stage=Stage.ARCHIVED, reason="x"
            ),
            source="/driftloop/registry",
        )
    )
    assert world.versions.rows[("churn", 2)].stage == Stage.ARCHIVED.value


def registry_echo(
    decision: CloudEvent[Any], version: int, from_stage: Stage, to_stage: Stage
) -> CloudEvent[ModelStageChanged]:
    """The registry's stage change following one of serving's rollout events, as the registry makes it."""
    change = ModelStageChanged(
        model="churn",
        model_version=version,
        from_stage=from_stage,
        to_stage=to_stage,
        reason=f"rollout {decision.data.rollout_id}",
        caused_by=EventRef(id=decision.id, type=decision.type),
    )
    return new_event(change, source="/driftloop/registry", cause=decision)


async def test_a_late_echo_of_a_superseded_promotion_does_not_put_that_version_back(world: World) -> None:
    await world.send(registered(2), passed(2), registered(3))
    await world.send(new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x"))
    await world.send(new_event(PromoteRequested(model="churn", model_version=3, reason="ok"), source="/x"))
    assert world.route.stable_version == 3
    to_2, to_3 = world.rollouts(RolloutPromoted)[-2:]
    loads = len(world.loader.loaded)
    # The registry follows both promotions only now (it was down, or slow): its echoes come in order.
    await world.send(registry_echo(to_2, 1, Stage.PRODUCTION, Stage.ARCHIVED))
    await world.send(registry_echo(to_2, 2, Stage.CANDIDATE, Stage.PRODUCTION))
    assert world.route.stable_version == 3 and world.route.previous_stable_version == 2
    assert len(world.loader.loaded) == loads  # not even loaded again
    await world.send(registry_echo(to_3, 2, Stage.PRODUCTION, Stage.ARCHIVED))
    await world.send(registry_echo(to_3, 3, Stage.CANDIDATE, Stage.PRODUCTION))
    assert world.route.stable_version == 3 and world.route.previous_stable_version == 2
    assert world.versions.rows[("churn", 3)].stage == Stage.PRODUCTION.value
    assert world.bus.dead_letters == []


async def test_a_late_echo_of_a_rollback_restoring_production_does_not_undo_a_later_promotion(
    world: World,
) -> None:
    await world.send(registered(2), passed(2), registered(3))
    await world.send(new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x"))
    await world.send(new_event(RollbackRequested(model="churn", model_version=2, reason="bad"), source="/x"))
    rollback = world.rollouts(RolloutRolledBack)[-1]
    await world.send(new_event(PromoteRequested(model="churn", model_version=3, reason="ok"), source="/x"))
    assert world.route.stable_version == 3
    # The registry restores version 1 to production on the rollback's event, after serving moved on.
    await world.send(registry_echo(rollback, 1, Stage.ARCHIVED, Stage.PRODUCTION))
    assert world.route.stable_version == 3


@pytest.mark.parametrize("to_version", [None, 1], ids=["previous-stable", "named"])
async def test_a_production_rollback_to_a_version_that_cannot_load_is_dead_lettered(
    world: World, to_version: int | None
) -> None:
    await world.send(registered(2), passed(2))
    await world.send(new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x"))
    world.loader.broken.add("01" * 32)  # version 1's artifact no longer loads (store, trust policy)
    command = RollbackRequested(model="churn", model_version=2, to_version=to_version, reason="bad")
    await world.send(new_event(command, source="/x"))
    assert world.route.stable_version == 2  # the version that answers keeps answering
    [dead] = world.bus.dead_letters
    assert dead.reason == "rejected" and "rollback target churn v1 cannot be loaded" in dead.error


# --- events naming a model serving does not know ---------------------------------------------------------


@pytest.mark.parametrize("verdict", list(Verdict))
async def test_a_verdict_for_a_model_serving_does_not_know_is_ignored_and_counted(
    world: World, verdict: Verdict
) -> None:
    before = handlers.IGNORED.labels("CanaryVerdict", "unknown-model")._value.get()
    world.clock.advance(60)
    await world.send(canary_verdict(rollout_never_started("ghost"), 0, verdict, samples=500))
    assert handlers.IGNORED.labels("CanaryVerdict", "unknown-model")._value.get() == before + 1
    assert "ghost" not in world.routes.rows and len(world.rollouts()) == 2
    assert world.bus.dead_letters == []


@pytest.mark.parametrize("to_version", [None, 1], ids=["previous-stable", "named"])
async def test_a_rollback_command_for_a_model_serving_does_not_know_is_dead_lettered_naming_it(
    world: World, to_version: int | None
) -> None:
    await world.send(registered(1, model="ghost"))  # registered, never validated: it never served
    before = handlers.IGNORED.labels("RollbackRequested", "unknown-model")._value.get()
    command = RollbackRequested(model="ghost", model_version=1, to_version=to_version, reason="bad")
    await world.send(new_event(command, source="/x", actor="user:bob"))
    [dead] = world.bus.dead_letters
    assert dead.reason == "rejected" and "model 'ghost' has no version serving" in dead.error
    assert handlers.IGNORED.labels("RollbackRequested", "unknown-model")._value.get() == before + 1
    assert "ghost" not in world.routes.rows and len(world.rollouts()) == 2


async def test_a_promote_command_for_a_registered_version_of_a_new_model_serves_it(world: World) -> None:
    """A model becomes known by a version taking traffic, whichever way: here by hand, never validated."""
    await world.send(registered(1, model="fresh"))
    await world.send(new_event(PromoteRequested(model="fresh", model_version=1, reason="ok"), source="/x"))
    assert world.routes.rows["fresh"].stable_version == 1 and world.bus.dead_letters == []


# --- duplicated and out-of-order events -------------------------------------------------------------------


async def test_a_registration_naming_another_artifact_for_a_known_version_is_dead_lettered(
    world: World,
) -> None:
    """A version's artifact never changes: taken, the next routing sync would serve other bytes as v1."""
    before = handlers.IGNORED.labels("ModelVersionRegistered", "other-artifact")._value.get()
    await world.send(registered(1, key="aa" * 32))
    assert world.versions.rows[("churn", 1)].artifact_key == "01" * 32
    [dead] = world.bus.dead_letters
    assert dead.reason == "rejected" and "churn v1 is registered with artifact 010101" in dead.error
    assert handlers.IGNORED.labels("ModelVersionRegistered", "other-artifact")._value.get() == before + 1
    # The registry announcing the same version again (a replay, a new event id) is no news.
    await world.send(registered(1))
    assert len(world.bus.dead_letters) == 1 and len(world.rollouts()) == 2


async def test_a_production_change_newer_than_the_live_canary_supersedes_it(world: World) -> None:
    """Left live, the older canary's healthy verdicts would promote it over the version the registry chose."""
    await world.send(registered(2), passed(2), registered(3))
    started = world.rollouts(RolloutStarted)[-1]
    change = ModelStageChanged(
        model="churn", model_version=3, from_stage=Stage.CANDIDATE, to_stage=Stage.PRODUCTION, reason="manual"
    )
    await world.send(new_event(change, source="/driftloop/registry"))
    assert world.route.stable_version == 3 and world.route.active is None
    [superseded] = world.rollouts(RolloutRolledBack)
    assert superseded.data.reason is RollbackReason.SUPERSEDED and superseded.data.canary_version == 2
    # The registry moves the rollback's stable version to production: the one it chose, not the one before.
    assert superseded.data.stable_version == 3
    assert superseded.correlationid == started.correlationid
    assert world.versions.rows[("churn", 2)].stage == Stage.REJECTED.value
    for step in (0, 1):
        world.clock.advance(10)
        await world.send(canary_verdict(started.data, step, Verdict.HEALTHY, samples=100))
    assert world.route.stable_version == 3 and len(world.rollouts(RolloutPromoted)) == 1


async def test_a_production_change_older_than_the_live_canary_keeps_it_against_the_new_stable(
    world: World,
) -> None:
    await world.send(registered(2), registered(3), passed(3))
    change = ModelStageChanged(
        model="churn", model_version=2, from_stage=Stage.CANDIDATE, to_stage=Stage.PRODUCTION, reason="manual"
    )
    await world.send(new_event(change, source="/driftloop/registry"))
    live = world.route.active
    assert world.route.stable_version == 2 and live is not None
    assert (live.canary_version, live.stable_version) == (3, 2) and world.rollouts(RolloutRolledBack) == []


async def test_a_stage_change_of_a_version_serving_never_learnt_of_is_ignored_not_stored(
    world: World,
) -> None:
    """The registry announces a version before it changes its stage, on the same partition: a change of one
    serving never learnt of is no news of it, and its stage must not stick to the version registered later."""
    before = handlers.IGNORED.labels("ModelStageChanged", "unknown-version")._value.get()
    change = ModelStageChanged(
        model="churn", model_version=2, from_stage=Stage.CANDIDATE, to_stage=Stage.ARCHIVED, reason="x"
    )
    await world.send(new_event(change, source="/x"))
    assert ("churn", 2) not in world.versions.rows and world.bus.dead_letters == []
    assert handlers.IGNORED.labels("ModelStageChanged", "unknown-version")._value.get() == before + 1
    await world.send(registered(2), passed(2))
    assert world.route.active is not None and world.route.active.canary_version == 2


# --- commands that arrive late, and what they may not do --------------------------------------------------


def issued_at(command: EventPayload, when: Any, actor: str = "user:bob") -> CloudEvent[Any]:
    """A command as its publisher stamped it at ``when`` (the CloudEvents ``time``)."""
    return new_event(command, source="/x", actor=actor).model_copy(update={"time": when})


def promote(version: int) -> PromoteRequested:
    return PromoteRequested(model="churn", model_version=version, reason="ok")


async def test_a_promote_issued_before_the_last_routing_change_is_dead_lettered_naming_both_times(
    world: World,
) -> None:
    """The operator asked for v2 while v1 served; v3 was promoted before the command arrived: the command
    was decided on a state that no longer holds, and taken it would put production back behind v3."""
    await world.send(registered(2), registered(3))
    late = issued_at(promote(2), world.clock.now)
    world.clock.advance(10)
    await world.send(issued_at(promote(3), world.clock.now))
    decided = world.clock.now
    assert world.route.stable_version == 3
    before = handlers.IGNORED.labels("PromoteRequested", "stale-command")._value.get()
    await world.send(late)
    assert world.route.stable_version == 3 and len(world.rollouts(RolloutPromoted)) == 2
    [dead] = world.bus.dead_letters
    assert dead.reason == "rejected"
    assert late.time.isoformat() in dead.error and decided.isoformat() in dead.error
    assert handlers.IGNORED.labels("PromoteRequested", "stale-command")._value.get() == before + 1


async def test_a_promote_of_an_older_version_issued_after_the_last_change_serves_it(world: World) -> None:
    await world.send(registered(2), registered(3))
    await world.send(issued_at(promote(3), world.clock.now))
    world.clock.advance(10)
    await world.send(issued_at(promote(2), world.clock.now))
    assert world.route.stable_version == 2 and world.bus.dead_letters == []


async def test_a_production_rollback_issued_before_the_last_routing_change_is_dead_lettered(
    world: World,
) -> None:
    await world.send(registered(2), registered(3))
    await world.send(issued_at(promote(2), world.clock.now))
    world.clock.advance(1)
    late = issued_at(RollbackRequested(model="churn", model_version=2, reason="bad"), world.clock.now)
    world.clock.advance(10)
    # Production went 2 -> 3 -> 2 meanwhile: the command names the stable version, but not the state it saw.
    await world.send(issued_at(promote(3), world.clock.now))
    world.clock.advance(1)
    await world.send(issued_at(promote(2), world.clock.now))
    await world.send(late)
    assert world.route.stable_version == 2 and world.route.previous_stable_version == 3
    [dead] = world.bus.dead_letters
    assert dead.reason == "rejected" and "before churn's last routing change" in dead.error


async def test_a_late_rollback_of_the_live_canary_still_takes_it_off_traffic(world: World) -> None:
    """Taking a canary off traffic only ever lowers exposure to a version still on trial: honoured whenever
    it comes, even after the registry changed the stable version under the canary."""
    await world.send(registered(2), registered(3), passed(3))
    late = issued_at(RollbackRequested(model="churn", model_version=3, reason="bad"), world.clock.now)
    world.clock.advance(10)
    change = ModelStageChanged(
        model="churn", model_version=2, from_stage=Stage.CANDIDATE, to_stage=Stage.PRODUCTION, reason="manual"
    )
    await world.send(new_event(change, source="/driftloop/registry"))
    assert world.route.active is not None and world.route.stable_version == 2
    await world.send(late)
    assert world.route.active is None and world.bus.dead_letters == []
    assert world.rollouts(RolloutRolledBack)[-1].data.reason is RollbackReason.MANUAL


async def test_a_canary_rollback_naming_another_version_to_serve_is_dead_lettered(world: World) -> None:
    """Rolling back the canary gives its traffic back to the stable version: a to_version naming another
    version cannot be honoured, and is not silently dropped either."""
    await world.send(registered(2), registered(3), passed(3))
    command = RollbackRequested(model="churn", model_version=3, to_version=2, reason="bad")
    await world.send(new_event(command, source="/x"))
    assert world.route.active is not None and world.route.active.canary_version == 3
    [dead] = world.bus.dead_letters
    assert dead.reason == "rejected"
    assert "to_version 2" in dead.error and "stable version 1" in dead.error


async def test_a_canary_rollback_naming_the_stable_version_to_serve_rolls_it_back(world: World) -> None:
    await world.send(registered(2), passed(2))
    command = RollbackRequested(model="churn", model_version=2, to_version=1, reason="bad")
    await world.send(new_event(command, source="/x"))
    assert world.route.active is None and world.route.stable_version == 1
    assert world.bus.dead_letters == []


async def test_a_registration_with_another_signature_for_a_known_version_is_dead_lettered(
    world: World,
) -> None:
    """A version's signature is what its requests are checked against: it never changes, as its artifact."""
    event = registered(1)
    other = event.data.signature.model_copy(update={"target": "left"})
    changed = new_event(event.data.model_copy(update={"signature": other}), source="/driftloop/registry")
    before = handlers.IGNORED.labels("ModelVersionRegistered", "other-signature")._value.get()
    await world.send(changed)
    assert world.versions.rows[("churn", 1)].signature == event.data.signature
    [dead] = world.bus.dead_letters
    assert dead.reason == "rejected" and "churn v1 is registered with another signature" in dead.error
    assert handlers.IGNORED.labels("ModelVersionRegistered", "other-signature")._value.get() == before + 1


async def test_an_event_in_a_poll_replayed_one_by_one_is_counted_once(world: World) -> None:
    """A poll whose group commit fails is replayed one event per transaction: the counts of what the
    handlers saw are made once, for the attempt that settled each event."""
    ignored = handlers.IGNORED.labels("PromoteRequested", "already-stable")
    refused = handlers.IGNORED.labels("PromoteRequested", "unknown-version")
    before = (ignored._value.get(), refused._value.get())
    # One poll: a promote of the stable version (changes nothing) and one of an unknown version (refused).
    await world.bus.publish(new_event(promote(1), source="/x"))
    await world.bus.publish(new_event(promote(9), source="/x"))
    await world.bus.drain()
    assert len(world.bus.dead_letters) == 1
    assert (ignored._value.get(), refused._value.get()) == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize(
    ("setup", "command", "error"),
    [
        ("canary", RollbackRequested(model="churn", model_version=1, reason="bad"), "roll back its canary"),
        ("first", RollbackRequested(model="churn", model_version=1, reason="bad"), "no earlier version"),
        (
            "promoted",
            RollbackRequested(model="churn", model_version=2, to_version=2, reason="bad"),
            "version 2 is already the stable version",
        ),
    ],
    ids=["while-a-canary-is-live", "nothing-to-go-back-to", "to-itself"],
)
async def test_a_production_rollback_that_cannot_be_taken_is_dead_lettered_not_dropped(
    world: World, setup: str, command: RollbackRequested, error: str
) -> None:
    """Production stays on the version the operator asked to take off: they must learn it, as they do of
    a command naming an unknown version. (A rollback of a version already off traffic changes nothing.)"""
    if setup == "canary":
        await world.send(registered(2), passed(2))
    elif setup == "promoted":
        await world.send(registered(2))
        await world.send(issued_at(promote(2), world.clock.now))
    before = world.route
    await world.send(new_event(command, source="/x"))
    assert world.route == before
    [dead] = world.bus.dead_letters
    assert dead.reason == "rejected" and error in dead.error


async def test_a_rollback_of_a_version_no_longer_serving_changes_nothing(world: World) -> None:
    await world.send(registered(2))
    await world.send(issued_at(promote(2), world.clock.now))
    world.clock.advance(1)
    await world.send(
        issued_at(RollbackRequested(model="churn", model_version=2, reason="x"), world.clock.now)
    )
    before = world.route
    await world.send(
        new_event(RollbackRequested(model="churn", model_version=2, reason="again"), source="/x")
    )
    assert world.route == before and world.bus.dead_letters == []


def numbered(change: CloudEvent[ModelStageChanged], sequence: int) -> CloudEvent[ModelStageChanged]:
    """The registry's change as it publishes it now: with the model's stage-change number."""
    data = change.data.model_copy(update={"sequence": sequence})
    return new_event(data, source="/driftloop/registry", cause=change)


async def test_an_old_stage_change_re_sent_under_a_new_id_does_not_set_a_stage_back(world: World) -> None:
    first = world.rollouts(RolloutPromoted)[-1]
    to_production = numbered(registry_echo(first, 1, Stage.CANARY, Stage.PRODUCTION), 2)
    await world.send(numbered(registry_echo(first, 1, Stage.CANDIDATE, Stage.CANARY), 1), to_production)
    await world.send(
        registered(2), new_event(PromoteRequested(model="churn", model_version=2, reason="ok"), source="/x")
    )
    second = world.rollouts(RolloutPromoted)[-1]
    await world.send(
        numbered(registry_echo(second, 1, Stage.PRODUCTION, Stage.ARCHIVED), 3),
        numbered(registry_echo(second, 2, Stage.CANDIDATE, Stage.PRODUCTION), 4),
    )
    assert world.versions.rows[("churn", 1)].stage == Stage.ARCHIVED.value
    before = handlers.IGNORED.labels("ModelStageChanged", "stale-stage-change")._value.get()
    # v1's move to production again, under a new id (a replay, a producer's retry): dedupe by id misses it.
    again = new_event(to_production.data, source="/driftloop/registry")
    await world.send(again)
    assert world.versions.rows[("churn", 1)].stage == Stage.ARCHIVED.value
    assert world.route.stable_version == 2
    [dead] = world.bus.dead_letters
    assert dead.reason == "rejected"
    assert f"{again.id} is stage change 2 of churn" in dead.error and "but stage change 4" in dead.error
    assert handlers.IGNORED.labels("ModelStageChanged", "stale-stage-change")._value.get() == before + 1


async def test_a_late_rollback_of_a_superseded_canary_changes_nothing_while_a_newer_one_is_live(
    world: World,
) -> None:
    """Canary 2 was superseded by 3: a rollback of 2 asks for what holds already. Dead-lettered with "roll
    back its canary first", it would tell the operator to take the healthy canary 3 off traffic."""
    await world.send(registered(2), passed(2), registered(3), passed(3))
    assert world.route.active is not None and world.route.active.canary_version == 3
    before = world.route
    await world.send(new_event(RollbackRequested(model="churn", model_version=2, reason="late"), source="/x"))
    assert world.route == before and world.bus.dead_letters == []
