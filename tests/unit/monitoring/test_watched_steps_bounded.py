"""How many rollouts have a step watched at once is bounded (``max_watched_rollout_steps``): each watched step
collects its canary's and stable's traffic until its verdict, and every poll of predictions looks through them
all. The bus does not authenticate a publisher, and before, every RolloutStarted with a new rollout id added a
watched step, without limit, in memory and, for a restart to load again, in Postgres. Past the bound the step
event is dead-lettered (counted, logged once a minute); a restart watches the first started up to the bound
and sets the others aside, unjudged."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from libs.bus import PermanentError
from services.monitoring import bootstrap
from services.monitoring.bootstrap import make_monitor
from services.monitoring.handlers import Monitor
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_canary_watch import ADVANCED, STARTED, RestoreRuntime
from tests.unit.monitoring.test_finished_rollouts import handle
from tests.unit.monitoring.test_rollout_order import RestartSteps

REFUSED_LOG = "rollout step not watched: max_watched_rollout_steps rollouts are watched already"


def monitor_watching_at_most(most: int) -> Monitor:
    monitor = make_monitor(
        MonitoringSettings(max_watched_rollout_steps=most), artifacts=None, source="/test/monitoring"
    )
    now = time.time()
    monitor.clock = lambda: now
    return monitor


def started(rollout_id: str) -> Any:
    return STARTED.model_copy(update={"rollout_id": rollout_id})


def refused() -> float:
    return REGISTRY.get_sample_value("driftloop_monitoring_rollout_steps_refused_total") or 0.0


async def refuse(payload: Any, monitor: Monitor, store: RestartSteps) -> PermanentError:
    """Handle a step event that is refused; the bus dead-letters it (and calls ``on_dead_lettered``)."""
    with pytest.raises(PermanentError) as caught:
        await handle(payload, monitor, store)
    assert caught.value.on_dead_lettered is not None
    caught.value.on_dead_lettered()
    return caught.value


async def test_a_rollout_past_the_bound_is_dead_lettered_counted_and_logged_once_a_minute() -> None:
    monitor, store = monitor_watching_at_most(2), RestartSteps()
    for rollout_id in ("r-1", "r-2"):
        await handle(started(rollout_id), monitor, store)
    before = refused()

    with capture_logs() as logs:
        first = await refuse(started("r-3"), monitor, store)
        await refuse(started("r-4"), monitor, store)

    assert "rollout r-3 step 0 (churn) is not watched: 2 other rollouts have a step watched" in str(first)
    assert "max_watched_rollout_steps" in str(first)
    assert sorted(monitor.live.steps) == ["r-1", "r-2"]
    assert sorted(store.watching()) == [("r-1", 0), ("r-2", 0)]
    assert refused() == before + 2
    errors = [e for e in logs if e["event"].startswith(REFUSED_LOG)]
    assert [(e["rollout_id"], e["max_watched_rollout_steps"]) for e in errors] == [("r-3", 2)]


async def test_steps_of_one_poll_count_against_the_bound_before_they_commit() -> None:
    # Memory follows only once the poll's transaction commits: a bound on memory alone let every start of
    # one poll (up to a thousand) through.
    monitor, store = monitor_watching_at_most(1), RestartSteps()
    await handle(started("r-1"), monitor, store, committed=False)
    assert monitor.live.steps == {}
    with pytest.raises(PermanentError):
        await handle(started("r-2"), monitor, store, committed=False)


async def test_a_watched_rollouts_next_step_is_watched_at_the_bound() -> None:
    monitor, store = monitor_watching_at_most(1), RestartSteps()
    await handle(STARTED, monitor, store)
    await handle(ADVANCED, monitor, store)  # replaces the rollout's step: no more rollouts watched
    assert monitor.live.steps["r-1"].step_index == 1 and store.watching() == [("r-1", 1)]


async def test_a_rollout_is_watched_once_another_ones_step_is_decided() -> None:
    monitor, store = monitor_watching_at_most(1), RestartSteps()
    await handle(started("r-1"), monitor, store)
    await refuse(started("r-2"), monitor, store)
    await store.decide("r-1", 0)
    monitor.live.unwatch("r-1", 0)
    await handle(started("r-2"), monitor, store)  # the dead letter replayed
    assert list(monitor.live.steps) == ["r-2"]


async def test_a_restart_watches_the_first_started_up_to_the_bound_and_sets_the_others_aside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rows from before the bound, or a bound lowered: loaded whole, they held memory without bound again at
    # every start, and a crash for want of memory came back with every restart.
    store = RestartSteps()
    first = monitor_watching_at_most(100)
    for i, rollout_id in enumerate(["r-1", "r-2", "r-3"]):
        first.clock = lambda i=i: time.time() + i  # type: ignore[misc]
        await handle(started(rollout_id), first, store)
    before = refused()

    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    restarted = monitor_watching_at_most(2)
    with capture_logs() as logs:
        await bootstrap.restore(RestoreRuntime(store), restarted)  # type: ignore[arg-type]

    assert sorted(restarted.live.steps) == ["r-1", "r-2"]
    assert store.state[("r-3", 0)] == "set-aside" and sorted(store.watching()) == [("r-1", 0), ("r-2", 0)]
    assert refused() == before + 1
    [error] = [e for e in logs if e["event"].startswith("rollout steps set aside unjudged")]
    assert (error["steps_set_aside"], error["rollouts"], error["max_watched_rollout_steps"]) == (
        1,
        ["r-3"],
        2,
    )
    # The one set aside no longer counts against the bound: once another is decided, a new one is watched.
    await store.decide("r-1", 0)
    restarted.live.unwatch("r-1", 0)
    await handle(started("r-4"), restarted, store)
    assert sorted(restarted.live.steps) == ["r-2", "r-4"]
