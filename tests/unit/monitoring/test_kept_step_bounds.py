"""What bounds the memory of rollout steps: how many steps are kept for their rollout's start at once
(``max_kept_rollout_steps``; one more gives up the one kept longest, as its wait's end would), and how many
predictions a step's collector holds per variant (``canary_step_max_rows``; past it a sample of them all, the
others counted only: test_step_sample.py).
Unbounded, a publisher (the bus does not authenticate one) could keep any number of steps naming a busy
model, each collecting a copy of its traffic for up to a day."""

from __future__ import annotations

import time
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.predictions import Variant
from contracts.rollouts import RolloutStepAdvanced
from libs.bus import Delivery, Record
from services.monitoring.bootstrap import make_monitor
from services.monitoring.domain import CanaryStep, from_epoch
from services.monitoring.handlers import Monitor, on_predictions_logged
from services.monitoring.ports import MonitoringStore
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_canary_watch import ADVANCED, STARTED
from tests.unit.monitoring.test_domain import requests
from tests.unit.monitoring.test_finished_rollouts import ROLLED_BACK
from tests.unit.monitoring.test_replay_offsets import Store
from tests.unit.monitoring.test_rollout_order import (
    ADVANCED_TWICE,
    TickSteps,
    canary_traffic,
    give_up,
    handle,
    never_watched,
    started_after_given_up,
    with_canary,
)

WAIT = 86_400.0  # the settings' default rollout_start_wait_seconds
MOST_ROWS = 1_000  # canary_step_max_rows in these tests (its least)


@pytest.fixture
def now() -> float:
    """Monitoring's clock at the test's start (the events ``handle`` makes are dated when they are made)."""
    return time.time()


def monitor_at(at: float, *, most_kept: int = 100) -> Monitor:
    settings = MonitoringSettings(max_kept_rollout_steps=most_kept, canary_step_max_rows=MOST_ROWS)
    monitor = with_canary(make_monitor(settings, artifacts=None, source="/test/monitoring"))
    monitor.clock = lambda: at
    return monitor


def advanced(rollout_id: str, step_index: int = 1) -> RolloutStepAdvanced:
    return ADVANCED.model_copy(update={"rollout_id": rollout_id, "step_index": step_index})


def rows_not_kept(model: str) -> float:
    sample = "driftloop_monitoring_rollout_step_predictions_not_kept_total"
    return REGISTRY.get_sample_value(sample, {"model": model}) or 0.0


# --- how many steps are kept ------------------------------------------------------------------------------


async def test_keeping_more_steps_than_the_bound_gives_up_the_one_kept_longest_counted_and_logged(
    now: float,
) -> None:
    # Before, every step event of a rollout not started yet was kept (and its canary's traffic collected) for
    # a day, however many came: a thousand of them on one model took 500 MB and made ingestion 70x slower.
    monitor, store = monitor_at(now, most_kept=2), TickSteps()
    for i, rollout_id in enumerate(["r-1", "r-2"]):
        monitor.clock = lambda i=i: now + i  # type: ignore[misc]
        await handle(advanced(rollout_id), monitor, store)
    before = never_watched("churn", "too-many-kept")

    monitor.clock = lambda: now + 10.0
    with capture_logs() as logs:
        await handle(advanced("r-3"), monitor, store)
    assert sorted(store.early) == [("r-2", 1), ("r-3", 1)]
    assert sorted(monitor.live.kept) == ["r-2", "r-3"]
    assert never_watched("churn", "too-many-kept") == before + 1
    [error] = [e for e in logs if e["log_level"] == "error"]
    assert error["event"].startswith("rollout step dropped: more steps were kept for their RolloutStarted")
    assert (error["rollout_id"], error["step"], error["reason"]) == ("r-1", 1, "too-many-kept")
    # Given up as its wait's end gives it up: remembered for a start that still comes.
    assert store.given_up["r-1"].given_up_at == now + 10.0


async def test_a_step_given_up_at_the_bound_is_not_counted_until_its_transaction_commits(now: float) -> None:
    monitor, store = monitor_at(now, most_kept=1), TickSteps()
    await handle(advanced("r-1"), monitor, store)
    before = never_watched("churn", "too-many-kept")
    with capture_logs() as logs:
        await handle(advanced("r-2"), monitor, store, committed=False)
    assert never_watched("churn", "too-many-kept") == before
    assert [e for e in logs if e["log_level"] == "error"] == []
    assert sorted(monitor.live.kept) == ["r-1"]  # memory follows only what Postgres holds


async def test_the_step_being_kept_is_never_the_one_given_up(now: float) -> None:
    # Kept at the same moment, the newest would be next in order: it is the one being kept, and stays.
    monitor, store = monitor_at(now, most_kept=1), TickSteps()
    await handle(advanced("r-2"), monitor, store)
    await handle(advanced("r-1"), monitor, store)
    assert list(store.early) == [("r-1", 1)] and list(monitor.live.kept) == ["r-1"]
    assert list(store.given_up) == ["r-2"]


async def test_a_rollouts_lower_step_given_up_at_the_bound_leaves_its_higher_step_collecting(
    now: float,
) -> None:
    monitor, store = monitor_at(now, most_kept=1), TickSteps()
    await handle(ADVANCED, monitor, store)
    monitor.clock = lambda: now + 1.0
    await handle(ADVANCED_TWICE, monitor, store)
    assert list(store.early) == [("r-1", 2)] and monitor.live.kept["r-1"].step_index == 2
    await handle(STARTED, monitor, store)
    assert store.watching() == [("r-1", 2)] and store.given_up == {}


async def give_up_by(how: str, monitor: Monitor, store: TickSteps, at: float) -> None:
    """Give up the rollout's kept step at ``at``: by a housekeeping tick past its wait (``its-wait``), or by
    keeping another rollout's step beyond the bound of one (``the-bound``)."""
    if how == "its-wait":
        await give_up(monitor, store, at)
    else:
        monitor.clock = lambda: at
        await handle(advanced("r-other"), monitor, store)


@pytest.mark.parametrize("given_up_by", ["its-wait", "the-bound"])
async def test_a_step_given_up_at_the_bound_behaves_as_one_given_up_at_its_wait(
    now: float, given_up_by: str
) -> None:
    # A start that comes after all watches the step from then on; the rollout's end forgets it.
    monitor, store = monitor_at(now, most_kept=1), TickSteps()
    await handle(ADVANCED_TWICE, monitor, store)
    given_up_at = now + WAIT + 1
    await give_up_by(given_up_by, monitor, store, given_up_at)
    assert "r-1" not in monitor.live.kept and ("r-1", 2) not in store.early
    assert store.given_up["r-1"].given_up_at == given_up_at

    late = given_up_at + 60.0
    monitor.clock = lambda: late
    monitor.live.ingest(canary_traffic(150, at=now + 1.0), arrival=late - 10.0)  # collected by no step
    before = started_after_given_up("churn")
    await handle(STARTED, monitor, store)
    step = monitor.live.steps["r-1"]
    assert (step.step_index, step.started_at, step.learned_at, step.canary.rows) == (2, late, late, 0)
    assert store.watching() == [("r-1", 2)] and "r-1" not in store.given_up
    assert started_after_given_up("churn") == before + 1


@pytest.mark.parametrize("given_up_by", ["its-wait", "the-bound"])
async def test_a_rollout_that_ends_after_its_step_was_given_up_forgets_it(
    now: float, given_up_by: str
) -> None:
    monitor, store = monitor_at(now, most_kept=1), TickSteps()
    await handle(ADVANCED, monitor, store)
    await give_up_by(given_up_by, monitor, store, now + WAIT + 1)
    assert "r-1" in store.given_up
    await handle(ROLLED_BACK, monitor, store)
    assert "r-1" not in store.given_up and "r-1" not in monitor.live.kept


# --- how many predictions a step holds ---------------------------------------------------------------------


async def consume(monitor: Monitor, reqs: list[Any], first_offset: int) -> None:
    """The predictions consumer's poll of these requests, at offsets from ``first_offset`` in partition 0."""
    deliveries = [
        Delivery(
            Record("mlops.predictions", 0, first_offset + i, None, b"", ()),
            cast(Any, type("E", (), {"data": d})()),
        )
        for i, (d, _, _) in enumerate(reqs)
    ]
    await on_predictions_logged(
        deliveries, monitor=monitor, store=cast(MonitoringStore, Store()), publish=cast(Any, None)
    )


@pytest.mark.parametrize("step", ["watched", "kept"])
async def test_a_steps_collector_stops_growing_at_its_bound_and_counts_what_it_did_not_keep(
    now: float, step: str
) -> None:
    # Before, a step held every prediction of its variants until its verdict (or, kept for its start, for up
    # to a day): about 26 to 56 bytes each, gigabytes for a day of a busy model's traffic.
    monitor, store = monitor_at(now), TickSteps()
    await handle(STARTED if step == "watched" else ADVANCED, monitor, store)
    collector = (monitor.live.steps if step == "watched" else monitor.live.kept)["r-1"]
    before = rows_not_kept("churn")

    with capture_logs() as logs:
        await consume(monitor, canary_traffic(1_500, at=now + 1.0), 0)  # 30 requests of 50 rows
        canary = collector.canary
        assert (canary.rows, canary.rows_kept, canary.rows_not_kept) == (1_500, MOST_ROWS, 500)
        await consume(monitor, canary_traffic(1_500, at=now + 100.0), 30)
    assert (canary.rows, canary.rows_kept, canary.rows_not_kept) == (3_000, MOST_ROWS, 2_000)
    assert (canary.requests, canary.requests_kept) == (60, 60)  # 60 requests: under the bound
    # No more rows held: one array per column of the bound's length, not a chunk per poll.
    assert [[c.size for c in chunks] for chunks in canary.row_sample.columns] == [[MOST_ROWS]] * 3
    assert canary.scores().size == len(canary.predictions()) == canary.predicted_at().size == MOST_ROWS
    assert rows_not_kept("churn") == before + 2_000
    [warning] = [e for e in logs if e["event"].startswith("rollout step's predictions beyond")]
    assert (warning["rollout_id"], warning["step"], warning["kept_for_start"]) == (
        "r-1",
        collector.step_index,
        step == "kept",
    )
    # Every prediction still counts toward min_samples (and the verdict's samples).
    assert collector.first_offsets == {0: 0}


async def test_a_step_under_its_bound_keeps_every_prediction(now: float) -> None:
    monitor, store = monitor_at(now), TickSteps()
    await handle(STARTED, monitor, store)
    before = rows_not_kept("churn")
    await consume(monitor, canary_traffic(MOST_ROWS, at=now + 1.0), 0)
    canary = monitor.live.steps["r-1"].canary
    assert (canary.rows, canary.rows_kept) == (MOST_ROWS, MOST_ROWS)
    assert rows_not_kept("churn") == before


def test_a_collectors_latencies_are_bounded_by_requests_too(now: float) -> None:
    # One row per request: the latencies (one per request) reach the bound with the rows.
    monitor = monitor_at(now)
    step = CanaryStep("r-9", "churn", 1, 2, 1, started_at=now, min_samples=10, bake_seconds=1.0)
    monitor.live.watch(step)
    reqs = [
        (
            payload.model_copy(update={"model_version": 2, "variant": Variant.CANARY, "rollout_id": "r-9"}),
            part,
            off,
        )
        for payload, part, off in requests(1_200, seed=3, start=from_epoch(now + 1.0), per_request=1)
    ]
    monitor.live.ingest(reqs, arrival=now + 5.0)
    assert (step.canary.requests, step.canary.requests_kept) == (1_200, MOST_ROWS)
    assert (step.canary.rows, step.canary.rows_kept) == (1_200, MOST_ROWS)
    assert step.canary.latencies().size == MOST_ROWS
