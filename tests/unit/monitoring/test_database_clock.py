"""Monitoring decides a rollout step by Postgres' clock, read once a tick, not by its host's.

Serving times a step's bake time on Postgres' clock and ignores a verdict given before it passed there (as
premature); monitoring gives one verdict per step, so the rollout then stayed on that step. Postgres stamps
the labels too. On the host's clock, a process restarted on a host ahead (the step learned of by the one
before), or a clock stepped forward under a baking step, judged it early; a clock ahead by more than the
label grace judged a step without waiting for the labels coming."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime

import pytest

from contracts.envelope import new_event
from contracts.monitoring import CanaryVerdict
from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background, make_monitor
from services.monitoring.domain import from_epoch
from services.monitoring.handlers import Monitor, Tally, on_rollout_started
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.fakes import publish_nothing
from tests.unit.monitoring.test_canary_watch import STARTED, RestoreRuntime, Runtime, Steps, watched
from tests.unit.monitoring.test_domain import reference

START = 1_000_000.0
"""When serving started the step, on Postgres' clock (its replica's agrees)."""
AHEAD_S = 3_600.0
"""How far the monitoring host's clock is ahead of Postgres'."""
BAKE_S = 60.0


@dataclass
class ClockedSteps(Steps):
    """The steps, the restart's reads, and Postgres' clock at ``database_at`` (epoch seconds)."""

    database_at: float = START

    async def now(self) -> datetime:
        return from_epoch(self.database_at)

    async def pending_labels(self) -> set[tuple[str, str]]:
        return set()

    async def replay_offsets(self, topic: str) -> dict[int, int]:
        return {}


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> ClockedSteps:
    """Postgres, with its clock, under every transaction."""
    clocked = ClockedSteps([])
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: clocked)
    return clocked


def host_clock(monkeypatch: pytest.MonkeyPatch, store: ClockedSteps, ahead_s: float) -> None:
    """This host's clock (``time.time``, which the monitor reads) ``ahead_s`` ahead of Postgres'."""
    monkeypatch.setattr("time.time", lambda: store.database_at + ahead_s)


def canary_monitor() -> Monitor:
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    monitor.live.add_reference(dataclasses.replace(reference(), version=2))  # the canary's profile
    return monitor


async def tick_at(database_at: float, background: Background, store: ClockedSteps) -> None:
    store.database_at = database_at
    await background.once()


@pytest.mark.parametrize("how", ["restarted-on-a-host-ahead", "clock-stepped-forward"])
async def test_a_step_gets_no_verdict_before_its_bake_time_passed_on_postgres_clock(
    how: str, store: ClockedSteps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor, rt = canary_monitor(), Runtime()
    if how == "restarted-on-a-host-ahead":
        # The process before this one (on a host whose clock agreed with Postgres') learned of the step half
        # a second after serving started it; this one runs on a host an hour ahead.
        learned = dataclasses.replace(watched(START), bake_seconds=BAKE_S, learned_at=START + 0.5)
        store.steps.append(learned)
        store.database_at = START + 1.0
        host_clock(monkeypatch, store, AHEAD_S)
        await bootstrap.restore(RestoreRuntime(store), monitor)  # type: ignore[arg-type]
    else:
        # Learned of on a clock that agreed with Postgres'; then NTP stepped it an hour forward.
        host_clock(monkeypatch, store, 0.0)
        store.database_at = START + 0.5
        event = new_event(STARTED.model_copy(update={"bake_seconds": BAKE_S}), source="/test/serving")
        event = event.model_copy(update={"time": from_epoch(START)})
        tally = Tally()
        await on_rollout_started(event, monitor=monitor, store=store, publish=publish_nothing, tally=tally)  # type: ignore[arg-type]
        tally.count()  # committed: watched
        host_clock(monkeypatch, store, AHEAD_S)
    monitor.live.steps["r-1"].canary.rows = 500  # its samples are in
    background = Background(rt, monitor, tick_s=1.0)  # type: ignore[arg-type]

    # Ten seconds into the bake on Postgres' clock (an hour and ten seconds on the host's): not baked.
    await tick_at(START + 10.0, background, store)
    assert rt.published == []
    await tick_at(START + 0.5 + BAKE_S - 0.1, background, store)
    assert rt.published == []

    # Baked on Postgres' clock, where serving checks it: the one verdict, which serving takes.
    await tick_at(START + 0.5 + BAKE_S, background, store)
    [verdict] = rt.published
    assert isinstance(verdict.data, CanaryVerdict) and verdict.data.step_index == 0
    assert "r-1" not in monitor.live.steps


async def test_labels_arriving_lately_on_postgres_clock_hold_the_verdict_for_their_grace_on_a_host_ahead(
    store: ClockedSteps, monkeypatch: pytest.MonkeyPatch
) -> None:
    host_clock(monkeypatch, store, AHEAD_S)
    monitor, rt = canary_monitor(), Runtime()
    background = Background(rt, monitor, tick_s=1.0)  # type: ignore[arg-type]
    await tick_at(START, background, store)  # the process ticks before the step comes
    store.database_at = START + 0.5
    event = new_event(STARTED.model_copy(update={"bake_seconds": BAKE_S}), source="/test/serving")
    event = event.model_copy(update={"time": from_epoch(START)})
    tally = Tally()
    await on_rollout_started(event, monitor=monitor, store=store, publish=publish_nothing, tally=tally)  # type: ignore[arg-type]
    tally.count()
    monitor.live.steps["r-1"].canary.rows = 500
    # The model's labels come (stamped by Postgres) later than the bake time: none of the step's yet.
    store.labels_since = START + BAKE_S - 5.0
    grace = monitor.canary.label_grace_seconds

    await tick_at(START + 0.5 + BAKE_S, background, store)
    assert rt.published == []  # baked, but labels are coming: it waits for them
    await tick_at(START + 0.5 + BAKE_S + grace, background, store)
    [verdict] = rt.published  # the grace over, judged with what came
    assert isinstance(verdict.data, CanaryVerdict)
