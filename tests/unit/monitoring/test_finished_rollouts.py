"""Step events of a rollout that is over (promoted or rolled back) watch nothing again."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from structlog.testing import capture_logs

from contracts.envelope import CloudEvent, new_event
from contracts.examples import EXAMPLES
from contracts.rollouts import RolloutPromoted, RolloutRolledBack, RolloutStarted, RolloutStepAdvanced
from libs.bus import PermanentError
from services.monitoring.bootstrap import make_monitor
from services.monitoring.handlers import (
    Publish,
    Tally,
    on_rollout_finished,
    on_rollout_started,
    on_rollout_step_advanced,
)
from services.monitoring.ports import StoredStep
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.fakes import publish_nothing
from tests.unit.monitoring.test_canary_watch import ADVANCED, STARTED

if TYPE_CHECKING:
    from services.monitoring.ports import EarlyStep

# Serving's rollout r-1 of tests/unit/monitoring/test_canary_watch.py, and its endings from the examples.
PROMOTED = EXAMPLES[RolloutPromoted].model_copy(update={"rollout_id": "r-1"})
ROLLED_BACK = EXAMPLES[RolloutRolledBack].model_copy(update={"rollout_id": "r-1"})


@dataclass
class RolloutSteps:
    """The rollout_steps, finished_rollouts and early_steps tables, as the Postgres store keeps them."""

    steps: dict[tuple[str, int], StoredStep] = field(default_factory=dict)
    state: dict[tuple[str, int], str] = field(default_factory=dict)
    finished: dict[str, str] = field(default_factory=dict)
    early: dict[tuple[str, int], EarlyStep] = field(default_factory=dict)
    given_up: dict[str, EarlyStep] = field(default_factory=dict)
    verdicts: dict[tuple[str, int], tuple[str, str, str]] = field(default_factory=dict)
    """(verdict, reason, event id) of each decided step."""
    alerts: list[tuple[str, str, str]] = field(default_factory=list)
    """(event id, kind, summary) of each alert recorded."""

    async def save_step(self, step: StoredStep) -> None:
        key = (step.rollout_id, step.step_index)
        for other, state in self.state.items():
            if other[0] == step.rollout_id and other != key and state == "watching":
                self.state[other] = "superseded"
        if key not in self.steps:
            self.steps[key], self.state[key] = step, "watching"

    async def rollouts_watched(self, *, besides: str) -> int:
        return len({r for (r, _), state in self.state.items() if state == "watching" and r != besides})

    async def watched_beyond(self, most: int) -> list[StoredStep]:
        watching = sorted(
            (self.steps[key].started_at, key) for key, state in self.state.items() if state == "watching"
        )
        return [self.steps[key] for _, key in watching[most:]]

    async def decide(self, rollout_id: str, step_index: int) -> None:
        self.state[(rollout_id, step_index)] = "decided"

    async def decide_step(
        self, rollout_id: str, step_index: int, verdict: str, reason: str, event_id: str
    ) -> bool:
        key = (rollout_id, step_index)
        if self.state.get(key) != "watching":
            return False
        self.state[key] = "decided"
        self.verdicts[key] = (verdict, reason, event_id)
        return True

    async def record_alert(
        self, event_id: str, model: str, version: int | None, kind: str, summary: str
    ) -> None:
        self.alerts.append((event_id, kind, summary))

    async def finish_rollout(self, rollout_id: str, outcome: str = "finished") -> None:
        self.finished.setdefault(rollout_id, outcome)
        for key, state in self.state.items():
            if key[0] == rollout_id and state == "watching":
                self.state[key] = "finished"

    async def rollout_outcome(self, rollout_id: str) -> str | None:
        return self.finished.get(rollout_id)

    async def last_step(self, rollout_id: str) -> StoredStep | None:
        mine = [s for (r, _), s in self.steps.items() if r == rollout_id]
        last = max(mine, key=lambda s: s.step_index, default=None)
        if last is None:
            return None
        key = (last.rollout_id, last.step_index)
        verdict = self.verdicts[key][0] if key in self.verdicts else None
        return dataclasses.replace(last, state=self.state[key], verdict=verdict)

    async def keep_early_step(self, step: EarlyStep) -> bool:
        key = (step.rollout_id, step.step_index)
        if key in self.early:
            return False
        self.early[key] = step
        return True

    async def take_early_steps(self, rollout_id: str) -> list[EarlyStep]:
        mine = sorted(k for k in self.early if k[0] == rollout_id)
        return [self.early.pop(k) for k in mine]

    async def expire_early_steps(self, received_before: float) -> list[EarlyStep]:
        old = sorted(k for k, s in self.early.items() if s.received_at < received_before)
        return [self.early.pop(k) for k in old]

    async def expire_early_steps_beyond(self, most: int, *, keeping: EarlyStep) -> list[EarlyStep]:
        keep = (keeping.rollout_id, keeping.step_index)
        oldest = sorted((s.received_at, k) for k, s in self.early.items() if k != keep)
        return [self.early.pop(k) for _, k in oldest[: max(len(self.early) - most, 0)]]

    async def kept_steps(self) -> list[EarlyStep]:
        return [self.early[k] for k in sorted(self.early)]

    async def remember_given_up(self, steps: list[EarlyStep], given_up_at: float) -> None:
        for step in steps:
            known = self.given_up.get(step.rollout_id)
            if known is None or known.step_index < step.step_index:
                self.given_up[step.rollout_id] = dataclasses.replace(step, given_up_at=given_up_at)

    async def take_given_up(self, rollout_id: str) -> EarlyStep | None:
        return self.given_up.pop(rollout_id, None)

    async def given_up_steps(self) -> list[EarlyStep]:
        return [self.given_up[k] for k in sorted(self.given_up)]

    def watching(self) -> list[tuple[str, int]]:
        return [key for key, state in self.state.items() if state == "watching"]


async def handle(
    payload: Any,
    monitor: Any,
    store: RolloutSteps,
    *,
    committed: bool = True,
    publish: Publish = publish_nothing,
) -> CloudEvent[Any]:
    """Handle a rollout event as the bus does, in a transaction that commits (memory follows then) unless
    ``committed`` is False; returns the event handled."""
    event = new_event(payload, source="/test/serving")
    tally = Tally()
    if isinstance(payload, RolloutStarted):
        await on_rollout_started(event, monitor=monitor, store=store, publish=publish, tally=tally)  # type: ignore[arg-type]
    elif isinstance(payload, RolloutStepAdvanced):
        await on_rollout_step_advanced(event, monitor=monitor, store=store, publish=publish, tally=tally)  # type: ignore[arg-type]
    else:
        await on_rollout_finished(event, monitor=monitor, store=store, tally=tally)  # type: ignore[arg-type]
    if committed:
        tally.count()
    return event


@pytest.mark.parametrize(
    ("ending", "how"), [(PROMOTED, "promoted"), (ROLLED_BACK, "rolled back")], ids=["promoted", "rolled-back"]
)
@pytest.mark.parametrize("late", [STARTED, ADVANCED], ids=["started", "advanced"])
async def test_a_step_event_of_a_rollout_that_ended_after_its_steps_were_decided_is_dead_lettered(
    ending: Any, how: str, late: Any
) -> None:
    # Every step had its verdict when the rollout ended: finishing it changed no row, so nothing recorded that
    # it was over, and a RolloutStepAdvanced to a later step read after the ending was watched, to publish a
    # CanaryVerdict for a rollout that is over (a RolloutStarted sent again was ignored with a warning, as for
    # a running rollout). Both are dead-lettered now, naming the rollout and how it ended.
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    store = RolloutSteps()
    await handle(STARTED, monitor, store)
    await store.decide("r-1", 0)
    monitor.live.unwatch("r-1")
    await handle(ending, monitor, store)

    with pytest.raises(PermanentError) as refused:
        await handle(late, monitor, store)
    assert "rollout r-1" in str(refused.value) and how in str(refused.value)
    assert store.watching() == []
    assert "r-1" not in monitor.live.steps


@pytest.mark.parametrize("late", [STARTED, ADVANCED], ids=["started", "advanced"])
async def test_a_step_event_of_a_rollout_that_ended_before_monitoring_saw_it_start_is_dead_lettered(
    late: Any,
) -> None:
    # Rolled back before monitoring stored any step of it: nothing recorded the ending, and a RolloutStarted
    # read afterwards watched the rollout as if it were running.
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    store = RolloutSteps()
    await handle(ROLLED_BACK, monitor, store)

    with pytest.raises(PermanentError, match="rollout r-1 was rolled back"):
        await handle(late, monitor, store)
    assert store.watching() == []
    assert "r-1" not in monitor.live.steps


async def test_a_running_rollout_still_advances() -> None:
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    store = RolloutSteps()
    await handle(STARTED, monitor, store)
    await store.decide("r-1", 0)
    await handle(ADVANCED, monitor, store)
    assert store.watching() == [("r-1", 1)]
    assert monitor.live.steps["r-1"].step_index == 1


async def test_an_old_step_event_of_a_running_rollout_is_ignored_with_a_warning() -> None:
    # The docs say an old RolloutStepAdvanced is ignored with a warning, as a RolloutStarted sent again is; it
    # was ignored without a word.
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    store = RolloutSteps()
    await handle(STARTED, monitor, store)
    await handle(ADVANCED, monitor, store)
    with capture_logs() as logs:
        await handle(ADVANCED, monitor, store)  # sent again under another event id
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"].startswith("rollout step advanced again")
    assert (warning["rollout_id"], warning["step"], warning["known_step"]) == ("r-1", 1, 1)
    assert store.watching() == [("r-1", 1)] and monitor.live.steps["r-1"].step_index == 1
