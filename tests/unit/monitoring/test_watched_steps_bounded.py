"""How many rollouts have a step watched at once is bounded (``max_watched_rollout_steps``): each watched step
collects its canary's and stable's traffic until its verdict, and every poll of predictions looks through them
all. The bus does not authenticate a publisher, and before, every RolloutStarted with a new rollout id added a
watched step, without limit, in memory and, for a restart to load again, in Postgres. Past the bound the step
is saved and given its one verdict at once, inconclusive, saying why (counted, logged once a minute), and
serving rolls its canary back; a restart watches the first started up to the bound and gives the others the
same verdict. Dead-lettered instead, a legitimate rollout's step waited for a verdict for ever, its canary
serving, since serving waits for monitoring's verdict on every step."""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.envelope import CloudEvent, new_event
from contracts.monitoring import CanaryVerdict, Verdict
from contracts.rollouts import RolloutStarted
from services.monitoring import bootstrap
from services.monitoring.bootstrap import make_monitor
from services.monitoring.handlers import Monitor, Tally, on_rollout_started, on_rollout_step_advanced
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_canary_watch import ADVANCED, STARTED, RestoreRuntime
from tests.unit.monitoring.test_finished_rollouts import handle
from tests.unit.monitoring.test_rollout_order import RestartSteps

NOT_WATCHED_LOG = "rollout step not watched: max_watched_rollout_steps rollouts have a step watched"
REASON = "not watched: 2 rollouts have a step watched, the most monitoring watches at once"
ONE_WATCHED = "not watched: 1 rollout has a step watched, the most monitoring watches at once"


def monitor_watching_at_most(most: int) -> Monitor:
    monitor = make_monitor(
        MonitoringSettings(max_watched_rollout_steps=most), artifacts=None, source="/test/monitoring"
    )
    now = time.time()
    monitor.clock = lambda: now
    return monitor


def started(rollout_id: str) -> Any:
    return STARTED.model_copy(update={"rollout_id": rollout_id})


def decided_unwatched() -> float:
    # churn has no version registered here: its series is _unregistered's.
    sample = "driftloop_monitoring_rollout_steps_decided_unwatched_total"
    return REGISTRY.get_sample_value(sample, {"model": "_unregistered"}) or 0.0


class Published(list[CloudEvent[Any]]):
    """What a handler's transaction published (its outbox)."""

    async def __call__(self, event: CloudEvent[Any]) -> None:
        self.append(event)


async def handle_for(
    payload: Any, monitor: Monitor, store: RestartSteps, published: Published, *, committed: bool = True
) -> CloudEvent[Any]:
    """Handle a step event sent by an operator's cascade (its correlation id and actor), as the bus does."""
    event = new_event(payload, source="/test/serving", actor="ops@example.com", correlation_id="cascade-7")
    tally = Tally()
    handler = on_rollout_started if isinstance(payload, RolloutStarted) else on_rollout_step_advanced
    await handler(event, monitor=monitor, store=store, publish=published, tally=tally)  # type: ignore[arg-type]
    if committed:
        tally.count()
    return event


def assert_inconclusive_verdict_of(
    step_event: CloudEvent[Any], verdict: CloudEvent[Any], store: RestartSteps, step_index: int, reason: str
) -> None:
    """The step's one verdict, inconclusive with ``reason``, caused by its event, stored and alerted."""
    rollout_id = step_event.data.rollout_id
    assert isinstance(verdict.data, CanaryVerdict)
    assert (verdict.data.rollout_id, verdict.data.step_index) == (rollout_id, step_index)
    assert verdict.data.verdict is Verdict.INCONCLUSIVE and verdict.data.reason.startswith(reason)
    assert "(max_watched_rollout_steps)" in verdict.data.reason
    assert (verdict.causationid, verdict.correlationid, verdict.actor) == (
        step_event.id,
        step_event.correlationid,
        step_event.actor,
    )
    assert store.state[(rollout_id, step_index)] == "decided"
    assert store.verdicts[(rollout_id, step_index)] == ("inconclusive", verdict.data.reason, verdict.id)
    assert (verdict.id, "CanaryVerdict", f"inconclusive: {verdict.data.reason}") in store.alerts


async def test_a_start_past_the_bound_is_decided_inconclusive_at_once_and_logged_once_a_minute() -> None:
    monitor, store, published = monitor_watching_at_most(2), RestartSteps(), Published()
    for rollout_id in ("r-1", "r-2"):
        await handle(started(rollout_id), monitor, store)
    before = decided_unwatched()

    with capture_logs() as logs:
        third = await handle_for(started("r-3"), monitor, store, published)
        fourth = await handle_for(started("r-4"), monitor, store, published)

    [third_verdict, fourth_verdict] = published
    assert_inconclusive_verdict_of(third, third_verdict, store, 0, REASON)
    assert_inconclusive_verdict_of(fourth, fourth_verdict, store, 0, REASON)
    assert sorted(monitor.live.steps) == ["r-1", "r-2"]  # never watched in memory
    assert sorted(store.watching()) == [("r-1", 0), ("r-2", 0)]
    assert decided_unwatched() == before + 2
    errors = [e for e in logs if e["event"].startswith(NOT_WATCHED_LOG)]
    assert [(e["rollout_id"], e["max_watched_rollout_steps"]) for e in errors] == [("r-3", 2)]
    # Not the "canary verdict" line of every verdict either: a flood would log a line each.
    assert [e for e in logs if e["event"] == "canary verdict"] == []


async def test_steps_of_one_poll_count_against_the_bound_before_they_commit() -> None:
    # Memory follows only once the poll's transaction commits: a bound on memory alone let every start of
    # one poll (up to a thousand) through.
    monitor, store, published = monitor_watching_at_most(1), RestartSteps(), Published()
    await handle_for(started("r-1"), monitor, store, published, committed=False)
    assert monitor.live.steps == {} and published == []
    second = await handle_for(started("r-2"), monitor, store, published, committed=False)
    [verdict] = published
    assert_inconclusive_verdict_of(second, verdict, store, 0, ONE_WATCHED)


async def test_a_watched_rollouts_next_step_is_watched_at_the_bound() -> None:
    monitor, store = monitor_watching_at_most(1), RestartSteps()
    await handle(STARTED, monitor, store)
    await handle(ADVANCED, monitor, store)  # replaces the rollout's step: no more rollouts watched
    assert monitor.live.steps["r-1"].step_index == 1 and store.watching() == [("r-1", 1)]


async def test_a_rollouts_next_step_after_a_healthy_verdict_is_watched_past_the_bound() -> None:
    # Serving advances a rollout on its step's healthy verdict, and the rollout has no step watched from then
    # to the advance's event: counted as a new rollout's, it was rolled back midway when others filled the
    # bound meanwhile.
    monitor, store, published = monitor_watching_at_most(1), RestartSteps(), Published()
    await handle(STARTED, monitor, store)
    await store.decide_step("r-1", 0, "healthy", "canary within tolerances", "verdict-1")
    monitor.live.unwatch("r-1", 0)
    await handle(started("r-2"), monitor, store)

    await handle_for(ADVANCED, monitor, store, published)

    assert published == []
    assert sorted(monitor.live.steps) == ["r-1", "r-2"]
    assert sorted(store.watching()) == [("r-1", 1), ("r-2", 0)]


async def test_a_rollouts_next_step_past_the_bound_without_a_healthy_verdict_is_decided_at_once() -> None:
    # Its step decided otherwise (serving would have rolled it back, so the advance is not serving's): at
    # the bound, its next step counts as a new rollout's would.
    monitor, store, published = monitor_watching_at_most(1), RestartSteps(), Published()
    await handle(STARTED, monitor, store)
    await store.decide("r-1", 0)
    monitor.live.unwatch("r-1", 0)
    await handle(started("r-2"), monitor, store)

    advanced = await handle_for(ADVANCED, monitor, store, published)

    [verdict] = published
    assert_inconclusive_verdict_of(advanced, verdict, store, 1, ONE_WATCHED)
    assert list(monitor.live.steps) == ["r-2"]


async def test_a_start_past_the_bound_decides_the_step_serving_is_on_when_its_event_came_first() -> None:
    # Step 1's event came before the start and was kept for it: serving is on step 1, and a verdict for the
    # start's step 0 would be stale to it. The kept step's collector is let go.
    monitor, store, published = monitor_watching_at_most(1), RestartSteps(), Published()
    await handle(started("r-2"), monitor, store)
    kept = await handle(ADVANCED, monitor, store)
    assert "r-1" in monitor.live.kept

    await handle_for(STARTED, monitor, store, published)

    [verdict] = published
    assert_inconclusive_verdict_of(kept, verdict, store, 1, ONE_WATCHED)
    assert "r-1" not in monitor.live.kept and list(monitor.live.steps) == ["r-2"]


async def test_a_rollout_is_watched_once_another_ones_step_is_decided() -> None:
    monitor, store, published = monitor_watching_at_most(1), RestartSteps(), Published()
    await handle(started("r-1"), monitor, store)
    await handle_for(started("r-2"), monitor, store, published)
    await store.decide("r-1", 0)
    monitor.live.unwatch("r-1", 0)
    await handle(started("r-3"), monitor, store)  # the one decided unwatched does not count
    assert list(monitor.live.steps) == ["r-3"] and store.watching() == [("r-3", 0)]


async def test_a_restart_watches_the_first_started_up_to_the_bound_and_decides_the_others_inconclusive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rows from before the bound, or a bound lowered: loaded whole, they held memory without bound again at
    # every start, and a crash for want of memory came back with every restart. Set aside unjudged, their
    # rollouts waited for a verdict for ever.
    store = RestartSteps()
    first = monitor_watching_at_most(100)
    events = {}
    for i, rollout_id in enumerate(["r-1", "r-2", "r-3"]):
        first.clock = lambda i=i: time.time() + i  # type: ignore[misc]
        events[rollout_id] = await handle_for(started(rollout_id), first, store, Published())
    before = decided_unwatched()

    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    restarted, runtime = monitor_watching_at_most(2), RestoreRuntime(store)  # type: ignore[arg-type]
    with capture_logs() as logs:
        await bootstrap.restore(runtime, restarted)  # type: ignore[arg-type]

    assert sorted(restarted.live.steps) == ["r-1", "r-2"]
    assert sorted(store.watching()) == [("r-1", 0), ("r-2", 0)]
    [verdict] = runtime.published
    assert_inconclusive_verdict_of(
        events["r-3"],
        verdict,
        store,
        0,
        "not watched: at a restart more rollouts had a step watched than the 2",
    )
    assert decided_unwatched() == before + 1
    [error] = [e for e in logs if e["event"].startswith("rollout steps not watched at start")]
    assert (error["steps"], error["rollouts"], error["max_watched_rollout_steps"]) == (1, ["r-3"], 2)
    # The one decided no longer counts against the bound: once another is decided, a new one is watched.
    await store.decide("r-1", 0)
    restarted.live.unwatch("r-1", 0)
    await handle(started("r-4"), restarted, store)
    assert sorted(restarted.live.steps) == ["r-2", "r-4"]
