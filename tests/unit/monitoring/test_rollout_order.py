"""Events of one rollout out of order (another partition, a redelivery, a replica catching up): a step whose
RolloutStepAdvanced comes before the rollout's RolloutStarted is kept for it, and the start watches the
step serving is on. And the rollout handlers change memory only once their transaction commits."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.envelope import new_event
from contracts.registry import EVENT_TYPES
from libs.bus import InMemoryBus, PermanentError
from libs.bus.memory import MemoryTransaction
from services.monitoring import bootstrap, handlers
from services.monitoring.bootstrap import make_monitor, subscriptions
from services.monitoring.handlers import Monitor, Tally
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.fakes import NoPolicies
from tests.unit.monitoring.test_canary_watch import ADVANCED, STARTED
from tests.unit.monitoring.test_finished_rollouts import PROMOTED, ROLLED_BACK, RolloutSteps, handle

# Step 2 of rollout r-1 (steps 0.1, 0.5, 1.0): serving advanced twice before monitoring saw it start.
ADVANCED_TWICE = ADVANCED.model_copy(update={"step_index": 2, "previous_weight": 0.5, "weight": 1.0})
NOW = time.time()
"""Monitoring's clock in a test: the time the test began (:func:`_now`), as ``handle``'s events are dated
when they are made (new_event). Taken once at import, it fell behind them by however long the suite ran
before the test, and past ``max_clock_skew_seconds`` the events were dated ahead of the clock."""
WAIT = 86_400.0  # the settings' default rollout_start_wait_seconds


@pytest.fixture(autouse=True)
def _now() -> None:
    global NOW
    NOW = time.time()


def monitor_at(now: float | None = None) -> Monitor:
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
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
    # The start's sample and bake requirements; the bake and timeout from when the start came.
    assert (step.min_samples, step.bake_seconds) == (STARTED.min_samples, STARTED.bake_seconds)
    assert step.learned_at == NOW + 30.0
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
        await handlers.on_rollout_step_advanced(event, monitor=monitor, store=store, tally=Tally())  # type: ignore[arg-type]
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
