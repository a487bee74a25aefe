"""A rollout event may name any model (the bus does not authenticate a publisher): its series
(steps never watched, steps dated ahead of the clock, starts after a step was given up) are labelled by the
model only when a version of it is registered, and as ``_unregistered`` otherwise. Labelled by the event's
model, each made-up name added a series to /metrics for the life of the process (~1.2 KB of memory and
~440 bytes of every scrape each, measured with tracemalloc)."""

from __future__ import annotations

import time

from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from services.monitoring.handlers import UNREGISTERED_MODEL
from tests.unit.monitoring.test_kept_step_bounds import advanced, monitor_at
from tests.unit.monitoring.test_rollout_order import TickSteps, handle, never_watched

HOSTILE = 300


def series_of(name: str) -> set[str]:
    """The ``model`` label values of a counter's series."""
    return {
        s.labels["model"]
        for family in REGISTRY.collect()
        for s in family.samples
        if s.name == name and "model" in s.labels
    }


async def test_step_events_of_made_up_models_add_no_series_per_model() -> None:
    now = time.time()
    monitor, store = monitor_at(now, most_kept=1), TickSteps()  # knows churn
    before = never_watched(UNREGISTERED_MODEL, "too-many-kept"), never_watched("churn", "too-many-kept")
    await handle(advanced("r-churn"), monitor, store)  # kept, then given up by the first made-up one
    with capture_logs() as logs:
        for i in range(HOSTILE):
            step = advanced(f"r-{i}").model_copy(update={"model": f"made-up-{i}"})
            await handle(step, monitor, store)
    models = series_of("driftloop_monitoring_rollout_steps_never_watched_total")
    assert not {m for m in models if m.startswith("made-up-")}
    assert never_watched("churn", "too-many-kept") == before[1] + 1  # a registered model is named
    assert never_watched(UNREGISTERED_MODEL, "too-many-kept") == before[0] + HOSTILE - 1
    # The log still names each model given up.
    given_up = [e["model"] for e in logs if e["log_level"] == "error"]
    assert given_up == ["churn", *(f"made-up-{i}" for i in range(HOSTILE - 1))]
    assert len(monitor.live.kept) == 1


async def test_step_events_of_made_up_models_dated_ahead_add_no_series_per_model() -> None:
    # Monitoring's clock a year behind the events' (dated as they are made).
    monitor, store = monitor_at(time.time() - 365 * 86_400), TickSteps()
    for i in range(HOSTILE):
        step = advanced(f"r-{i}").model_copy(update={"model": f"made-up-ahead-{i}"})
        await handle(step, monitor, store)
    models = series_of("driftloop_monitoring_rollout_steps_ahead_of_clock_total")
    assert not {m for m in models if m.startswith("made-up-ahead-")}
    assert UNREGISTERED_MODEL in models
