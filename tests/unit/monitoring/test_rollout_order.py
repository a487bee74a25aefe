"""Events of one rollout out of order (another partition, a redelivery, a replica catching up): a step whose
RolloutStepAdvanced comes before the rollout's RolloutStarted is kept for it (its canary's traffic collected
meanwhile), and the start watches the step serving is on, even after the kept step was given up. And the
rollout handlers change memory only once their transaction commits."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.envelope import new_event
from contracts.predictions import Variant
from contracts.registry import EVENT_TYPES
from libs.bus import InMemoryBus, PermanentError
from libs.bus.memory import MemoryTransaction
from services.monitoring import bootstrap, handlers
from services.monitoring.bootstrap import make_monitor, subscriptions
from services.monitoring.domain import canary_ready, canary_timed_out, from_epoch
from services.monitoring.handlers import Monitor, Tally
from services.monitoring.ports import ReplayReport, StoredStep
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.fakes import NoPolicies, publish_nothing
from tests.unit.monitoring.test_canary_watch import ADVANCED, STARTED, RestoreRuntime
from tests.unit.monitoring.test_domain import reference, requests
from tests.unit.monitoring.test_finished_rollouts import PROMOTED, ROLLED_BACK, RolloutSteps, handle

# Step 2 of rollout r-1 (steps 0.1, 0.5, 1.0): serving advanced twice before monitoring saw it start.
ADVANCED_TWICE = ADVANCED.model_copy(update={"step_index": 2, "previous_weight": 0.5, "weight": 1.0})
NOW = time.time()
"""Monitoring's clock in a test: the time the test began (:func:`_now`), as ``handle``'s events are dated
when they are made (new_event). Taken once at import, it fell behind them by however long the suite ran
before the test, and past ``max_clock_skew_seconds`` the events were dated ahead of the clock."""
WAIT = 86_400.0  # the settings' default rollout_start_wait_seconds


REFERENCE = reference()


@pytest.fixture(autouse=True)
def _now() -> None:
    global NOW
    NOW = time.time()


def monitor_at(now: float | None = None) -> Monitor:
    """A monitor at ``now`` that knows churn version 1 (a rollout's series name only a registered model)."""
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    monitor.live.add_reference(REFERENCE)
    at = NOW if now is None else now
    monitor.clock = lambda: at
    return monitor


def never_watched(model: str, reason: str) -> float:
    sample = "driftloop_monitoring_rollout_steps_never_watched_total"
    return REGISTRY.get_sample_value(sample, {"model": model, "reason": reason}) or 0.0


# --- a step before its start ----------------------------------------------------------------------------


async def test_a_step_that_comes_before_its_start_is_watched_once_the_start_comes() -> None:
    # Dead-lettered before ("monitoring never saw it start"), and the late start watched step 0 while serving
    # was on step 1: step 0's verdict was stale to serving, and step 1 never got one.
    monitor, store = monitor_at(), RolloutSteps()
    with capture_logs() as logs:
        await handle(ADVANCED, monitor, store)
    assert store.watching() == [] and "r-1" not in monitor.live.steps
    [kept] = store.early.values()
    assert kept.step_index == 1 and kept.received_at == NOW
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"].startswith("rollout step came before its start: kept")

    monitor.clock = lambda: NOW + 30.0
    await handle(STARTED, monitor, store)
    assert store.watching() == [("r-1", 1)] and store.early == {}
    step = monitor.live.steps["r-1"]
    assert step.step_index == 1
    # The start's sample and bake requirements; the bake and timeout from when monitoring handled the step's
    # own event, as any step's (its traffic since is collected while it is kept).
    assert (step.min_samples, step.bake_seconds) == (STARTED.min_samples, STARTED.bake_seconds)
    assert step.learned_at == NOW
    stored = store.steps[("r-1", 1)]
    assert stored.cause_id == kept.cause_id  # the verdict is caused by the step's own event


async def test_the_start_watches_the_highest_step_that_came_before_it_whatever_their_order() -> None:
    monitor, store = monitor_at(), RolloutSteps()
    await handle(ADVANCED_TWICE, monitor, store)
    await handle(ADVANCED, monitor, store)
    await handle(STARTED, monitor, store)
    assert store.watching() == [("r-1", 2)] and monitor.live.steps["r-1"].step_index == 2
    assert store.early == {}

    # Step 1's event again (another event id): the rollout is past it.
    with capture_logs() as logs:
        await handle(ADVANCED, monitor, store)
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"].startswith("rollout step advanced again")
    assert store.watching() == [("r-1", 2)] and monitor.live.steps["r-1"].step_index == 2


async def test_a_step_sent_again_before_its_start_is_kept_once() -> None:
    monitor, store = monitor_at(), RolloutSteps()
    first = new_event(ADVANCED, source="/test/serving")
    again = new_event(ADVANCED, source="/test/serving")  # another event id: not the inbox's duplicate
    for event in (first, again):
        await handlers.on_rollout_step_advanced(
            event,
            monitor=monitor,
            store=store,  # type: ignore[arg-type]
            publish=publish_nothing,
            tally=Tally(),
        )
    assert [s.cause_id for s in store.early.values()] == [first.id]
    await handle(STARTED, monitor, store)
    assert store.steps[("r-1", 1)].cause_id == first.id


async def test_a_step_kept_for_its_start_survives_a_restart() -> None:
    # Kept in the store, in the event's transaction; nothing of it in memory: a process started afresh on the
    # same store watches it when the start comes.
    store = RolloutSteps()
    await handle(ADVANCED, monitor_at(), store)
    restarted = monitor_at(NOW + 60.0)
    await handle(STARTED, restarted, store)
    assert restarted.live.steps["r-1"].step_index == 1


async def test_a_step_kept_for_its_start_below_the_starts_step_is_dropped_and_the_start_watched() -> None:
    monitor, store = monitor_at(), RolloutSteps()
    await handle(ADVANCED, monitor, store)
    started_on_two = STARTED.model_copy(update={"step_index": 2, "weight": 1.0})
    await handle(started_on_two, monitor, store)
    assert store.watching() == [("r-1", 2)] and store.early == {}


@dataclasses.dataclass
class TickSteps(RolloutSteps, NoPolicies):
    """The rollout tables, and the rest of what a housekeeping tick asks for, as by a store without it."""

    async def expire_pending(self, *_: Any) -> list[tuple[str, str]]:
        return []

    async def save_replay_offsets(self, *_: Any) -> None:
        pass


async def test_a_step_whose_start_never_comes_is_dropped_after_the_wait_counted_and_logged() -> None:
    monitor, store = monitor_at(), TickSteps()
    await handle(ADVANCED, monitor, store)
    before = never_watched("churn", "no-start")

    tally = Tally()
    await handlers.housekeeping(NOW + WAIT - 1, monitor=monitor, store=store, tally=tally)  # type: ignore[arg-type]
    tally.count()
    assert list(store.early) == [("r-1", 1)]

    tally = Tally()
    with capture_logs() as logs:
        await handlers.housekeeping(NOW + WAIT + 1, monitor=monitor, store=store, tally=tally)  # type: ignore[arg-type]
        assert store.early == {}
        assert never_watched("churn", "no-start") == before  # counted once the tick's transaction commits
        assert [e for e in logs if e["log_level"] == "error"] == []
        tally.count()
    assert never_watched("churn", "no-start") == before + 1
    [error] = [e for e in logs if e["log_level"] == "error"]
    assert error["event"].startswith("rollout step dropped: its RolloutStarted never came")
    assert (error["rollout_id"], error["step"], error["model"]) == ("r-1", 1, "churn")


async def test_a_rollout_that_ends_before_its_start_drops_the_steps_kept_for_it() -> None:
    monitor, store = monitor_at(), RolloutSteps()
    await handle(ADVANCED, monitor, store)
    before = never_watched("churn", "rollout-ended")
    with capture_logs() as logs:
        await handle(ROLLED_BACK, monitor, store)
    assert store.early == {}
    assert never_watched("churn", "rollout-ended") == before + 1
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["steps"] == [1] and warning["outcome"] == "rolled back"
    # The start, read after the ending, is dead-lettered as a step event of a rollout that is over.
    with pytest.raises(PermanentError, match="rollout r-1 was rolled back"):
        await handle(STARTED, monitor, store)
    assert store.watching() == [] and "r-1" not in monitor.live.steps


# --- memory follows the commit --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "late", [ADVANCED, PROMOTED, ROLLED_BACK], ids=["advanced", "promoted", "rolled-back"]
)
async def test_a_rollout_event_whose_transaction_rolls_back_leaves_memory_as_it_was(late: Any) -> None:
    monitor, store = monitor_at(), RolloutSteps()
    await handle(STARTED, monitor, store)
    await handle(late, monitor, store, committed=False)
    assert monitor.live.steps["r-1"].step_index == 0


class CommitFails(InMemoryBus):
    """The in-memory bus over a fake store, whose commit fails (not an outage) while ``failing``: the
    store's changes are undone, as Postgres rolls them back."""

    def __init__(self, store: RolloutSteps) -> None:
        super().__init__(EVENT_TYPES)
        self.store = store
        self.failing = False

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[MemoryTransaction]:
        before = copy.deepcopy(self.store.__dict__)
        async with super()._begin() as tx:
            yield tx
            if self.failing:
                self.store.__dict__.update(before)
                raise RuntimeError("commit refused")


async def test_a_rollout_event_dead_lettered_after_its_handler_ran_leaves_memory_watching_what_postgres_has(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The service's own control subscription: its handlers watched the new step (or stopped watching the
    # rollout) before the transaction committed. One that then failed for good was dead-lettered with memory
    # changed: watching step 1, which Postgres did not have, while step 0 waited for a verdict no tick gave.
    monitor, store = monitor_at(), RolloutSteps()
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda _: store)
    bus = CommitFails(store)
    [control] = [s for s in subscriptions(MonitoringSettings(), monitor) if s.consumer.endswith("-control")]
    bus.subscribe(dataclasses.replace(control, max_retries=0, retry_backoff_s=0))

    await bus.publish(new_event(STARTED, source="/serving"))
    await bus.drain()
    assert monitor.live.steps["r-1"].step_index == 0

    bus.failing = True
    for late in (ADVANCED, PROMOTED):
        await bus.publish(new_event(late, source="/serving"))
        await bus.drain()
    assert [d.reason for d in bus.dead_letters] == ["handler-failed", "handler-failed"]
    assert store.watching() == [("r-1", 0)]
    assert monitor.live.steps["r-1"].step_index == 0

    bus.failing = False
    await bus.publish(new_event(ADVANCED, source="/serving"))
    await bus.drain()
    assert monitor.live.steps["r-1"].step_index == 1
    await bus.publish(new_event(PROMOTED, source="/serving"))
    await bus.drain()
    assert "r-1" not in monitor.live.steps
    assert len(bus.dead_letters) == 2


# --- the canary's traffic while its step is kept ---------------------------------------------------------


def with_canary(monitor: Monitor) -> Monitor:
    """The monitor, knowing the rollout's stable version (1) and its canary (2)."""
    monitor.live.add_reference(reference())
    monitor.live.add_reference(dataclasses.replace(reference(), version=2))
    return monitor


def canary_traffic(n_rows: int, *, at: float, rollout_id: str | None = "r-1") -> list[Any]:
    """The canary's logged predictions (version 2, variant canary) that rollout ``rollout_id`` routed (None:
    requests naming the version), dated ``at`` on, in partition 0."""
    routed = {"model_version": 2, "variant": Variant.CANARY, "rollout_id": rollout_id}
    return [
        (payload.model_copy(update=routed), part, off)
        for payload, part, off in requests(n_rows, seed=7, start=from_epoch(at))
    ]


async def test_the_canarys_traffic_while_its_step_is_kept_counts_toward_the_step() -> None:
    # Collected nowhere before: the canary's predictions between the step's event and its late start counted
    # toward no step in memory (a restart's replay counted them), so the step waited for min_samples it had
    # had, or timed out short of them. And its bake time ran from when the start came.
    monitor, store = with_canary(monitor_at()), RolloutSteps()
    await handle(ADVANCED, monitor, store)
    monitor.live.ingest(canary_traffic(150, at=NOW + 1.0), arrival=NOW + 5.0)
    monitor.clock = lambda: NOW + 30.0
    await handle(STARTED, monitor, store)
    step = monitor.live.steps["r-1"]
    assert (step.step_index, step.canary.rows) == (1, 150)
    assert step.first_offsets == {0: 0}  # a restart replays them
    # min_samples (100) in, and the bake time (2 s) passed since monitoring handled the step's event.
    assert canary_ready(step, NOW + 30.0) == "judge"
    assert monitor.live.kept == {}


async def test_a_step_kept_past_the_canary_timeout_without_its_samples_times_out_at_the_start() -> None:
    # As it would have had its events come in order: the timeout runs from when monitoring handled the step's
    # event, and the canary had all that time to reach min_samples.
    monitor, store = with_canary(monitor_at()), RolloutSteps()
    await handle(ADVANCED, monitor, store)
    monitor.live.ingest(canary_traffic(50, at=NOW + 1.0), arrival=NOW + 5.0)
    timeout = monitor.canary.timeout_seconds
    monitor.clock = lambda: NOW + timeout + 1.0
    await handle(STARTED, monitor, store)
    step = monitor.live.steps["r-1"]
    assert step.canary.rows == 50 < step.min_samples
    assert canary_timed_out(step, NOW + timeout + 1.0, monitor.canary)
    assert not canary_timed_out(step, NOW + timeout - 1.0, monitor.canary)


async def test_only_the_highest_step_kept_collects_and_a_rolled_back_transaction_collects_nothing() -> None:
    monitor, store = with_canary(monitor_at()), RolloutSteps()
    await handle(ADVANCED_TWICE, monitor, store, committed=False)
    assert monitor.live.kept == {}
    store.early.clear()  # rolled back with it
    await handle(ADVANCED_TWICE, monitor, store)
    await handle(ADVANCED, monitor, store)  # step 1's event after step 2's: step 2 still collects
    assert monitor.live.kept["r-1"].step_index == 2


async def test_a_rollout_that_ends_before_its_start_stops_collecting_its_kept_steps_traffic() -> None:
    monitor, store = with_canary(monitor_at()), RolloutSteps()
    await handle(ADVANCED, monitor, store)
    assert monitor.live.kept["r-1"].step_index == 1
    await handle(ROLLED_BACK, monitor, store)
    assert monitor.live.kept == {}


@dataclasses.dataclass
class RestartSteps(TickSteps):
    """The rollout tables, saved replay offsets and what else a tick and a restart ask for."""

    offsets: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)

    async def save_replay_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        self.offsets[topic] = dict(offsets)

    async def replay_offsets(self, topic: str) -> dict[int, int]:
        return self.offsets.get(topic, {})

    async def watched_steps(self) -> list[StoredStep]:
        return [self.steps[key] for key in self.watching()]

    async def pending_labels(self) -> set[tuple[str, str]]:
        return set()


class ReplayRuntime(RestoreRuntime):
    registry = None  # what replay_predictions decodes with: the fake replay below feeds decoded requests


@pytest.mark.parametrize("restart", ["before-the-start", "after-the-start"])
async def test_a_restart_counts_a_kept_steps_traffic_as_memory_did(
    monkeypatch: pytest.MonkeyPatch, restart: str
) -> None:
    # A restart rebuilds the steps watched and kept from Postgres, then replays the predictions topic from the
    # offsets the last tick saved. Before, a restart after the start counted the traffic memory had not
    # (150 after, 0 before), and one before the start counted it toward nothing, as memory had not.
    store, traffic = RestartSteps(), canary_traffic(150, at=NOW + 1.0)
    first = with_canary(monitor_at())
    await handle(ADVANCED, first, store)
    first.live.ingest(traffic, arrival=NOW + 5.0)
    if restart == "after-the-start":
        first.clock = lambda: NOW + 30.0
        await handle(STARTED, first, store)
        assert first.live.steps["r-1"].canary.rows == 150
    tally = Tally()
    await handlers.housekeeping(NOW + 40.0, monitor=first, store=store, tally=tally)  # type: ignore[arg-type]
    tally.count()
    assert store.offsets[first.predictions_topic] == {0: 0}

    replayed_from: list[dict[int, int]] = []

    async def replay(
        _: Any, *, start: dict[int, int], feed: Callable[[Sequence[Any]], Any], **__: Any
    ) -> ReplayReport:
        replayed_from.append(start)
        feed([r for r in traffic if r[2] >= start.get(r[1], 0)])
        return ReplayReport()

    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    monkeypatch.setattr(bootstrap, "replay_predictions", replay)
    restarted = with_canary(monitor_at(NOW + 60.0))
    await bootstrap.restore(ReplayRuntime(store), restarted)  # type: ignore[arg-type]
    if restart == "before-the-start":
        await handle(STARTED, restarted, store)
    assert replayed_from == [{0: 0}]
    assert restarted.live.steps["r-1"].canary.rows == 150


# --- a start after its step was given up -----------------------------------------------------------------


def started_after_given_up(model: str) -> float:
    sample = "driftloop_monitoring_rollout_steps_started_after_given_up_total"
    return REGISTRY.get_sample_value(sample, {"model": model}) or 0.0


async def give_up(monitor: Monitor, store: TickSteps, at: float) -> None:
    tally = Tally()
    await handlers.housekeeping(at, monitor=monitor, store=store, tally=tally)  # type: ignore[arg-type]
    tally.count()


async def test_a_start_that_comes_after_its_kept_step_was_given_up_watches_that_step_from_then_on() -> None:
    # Before, the step was forgotten when given up, and a start that came later still watched its own step 0
    # while serving was on step 2: step 0's verdict was stale to serving, and step 2 never got one.
    monitor, store = with_canary(monitor_at()), TickSteps()
    await handle(ADVANCED_TWICE, monitor, store)
    await give_up(monitor, store, NOW + WAIT + 1)
    assert store.early == {} and monitor.live.kept == {}
    assert store.given_up["r-1"].step_index == 2 and store.given_up["r-1"].given_up_at == NOW + WAIT + 1

    before, late = started_after_given_up("churn"), NOW + WAIT + 60.0
    monitor.clock = lambda: late
    monitor.live.ingest(canary_traffic(150, at=NOW + 1.0), arrival=late - 10.0)  # while no step collected
    with capture_logs() as logs:
        await handle(STARTED, monitor, store)
    assert store.watching() == [("r-1", 2)] and store.given_up == {}
    step = monitor.live.steps["r-1"]
    # Its traffic while it was given up was collected nowhere: its time range runs from the start, as a
    # restart's replay would count it.
    assert (step.step_index, step.started_at, step.learned_at, step.canary.rows) == (2, late, late, 0)
    assert (step.min_samples, step.bake_seconds) == (STARTED.min_samples, STARTED.bake_seconds)
    assert store.steps[("r-1", 2)].started_at == late
    assert started_after_given_up("churn") == before + 1
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"].startswith("rollout started after its step was given up")
    assert (warning["step"], warning["start_step"]) == (2, 0)


async def test_a_step_kept_after_a_lower_one_was_given_up_is_the_one_the_start_watches() -> None:
    monitor, store = with_canary(monitor_at()), TickSteps()
    await handle(ADVANCED, monitor, store)
    await give_up(monitor, store, NOW + WAIT + 1)
    monitor.clock = lambda: NOW + WAIT + 2
    await handle(ADVANCED_TWICE, monitor, store)  # serving moved on: kept, and collecting
    monitor.live.ingest(canary_traffic(150, at=NOW + WAIT + 3), arrival=NOW + WAIT + 5)
    await handle(STARTED, monitor, store)
    step = monitor.live.steps["r-1"]
    assert (step.step_index, step.canary.rows, step.learned_at) == (2, 150, NOW + WAIT + 2)
    assert store.given_up == {} and store.early == {}


async def test_a_later_step_given_up_replaces_the_one_remembered_and_the_rollouts_end_forgets_it() -> None:
    monitor, store = with_canary(monitor_at()), TickSteps()
    await handle(ADVANCED, monitor, store)
    await give_up(monitor, store, NOW + WAIT + 1)
    monitor.clock = lambda: NOW + WAIT + 2
    await handle(ADVANCED_TWICE, monitor, store)
    await give_up(monitor, store, NOW + 2 * WAIT + 3)
    assert store.given_up["r-1"].step_index == 2
    await handle(ROLLED_BACK, monitor, store)
    assert store.given_up == {}
    with pytest.raises(PermanentError, match="rollout r-1 was rolled back"):
        await handle(STARTED, monitor, store)
