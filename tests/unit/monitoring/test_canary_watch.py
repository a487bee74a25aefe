"""The background tick: a rollout step's verdict and the in-memory watch, and the queue of closed windows.

A step stops being watched only once the transaction that records and publishes its verdict has committed. A
tick whose transaction fails (Postgres restarted under it) leaves the step watched, so the next tick decides
it again instead of leaving the rollout waiting for a verdict that was never published. A closed window
stays queued through an outage, but one whose judgement fails for good is set aside so that it does not hold
up the windows and the verdicts behind it. So is a step whose decision fails for good: it gets an
inconclusive verdict saying it could not be judged, and the other steps and the housekeeping go on."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.envelope import CloudEvent, new_event
from contracts.monitoring import CanaryVerdict, Verdict
from contracts.rollouts import RolloutStarted, RolloutStepAdvanced
from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background, make_monitor
from services.monitoring.domain import CanaryStep, canary_due, from_epoch
from services.monitoring.handlers import (
    Monitor,
    Tally,
    canary_step,
    check_canary,
    on_rollout_started,
    on_rollout_step_advanced,
)
from services.monitoring.ports import StoredStep, WindowState
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.fakes import NoPolicies, publish_nothing
from tests.unit.monitoring.test_domain import reference, regression_reference, requests
from tests.waiting import eventually

TIMEOUT_S = 600.0  # the settings' default canary_timeout_seconds


def watched(started_at: float, step_index: int = 0) -> StoredStep:
    return StoredStep(
        rollout_id="r-1",
        step_index=step_index,
        model="churn",
        stable_version=1,
        canary_version=2,
        started_at=started_at,
        min_samples=100,
        bake_seconds=2.0,
        cause_id="started-1",
        correlation_id="cascade-1",
        actor=None,
    )


@dataclass
class Store(NoPolicies):
    """The MonitoringStore calls a housekeeping tick makes, on one stored step."""

    steps: list[StoredStep]
    decided: dict[tuple[str, int], str] = field(default_factory=dict)
    labels_since: float | None = None
    """When the model's labels last arrived (epoch seconds); None: never."""

    async def watched_steps(self) -> list[StoredStep]:
        return [s for s in self.steps if (s.rollout_id, s.step_index) not in self.decided]

    async def decide_step(
        self, rollout_id: str, step_index: int, verdict: str, reason: str, event_id: str
    ) -> bool:
        if (rollout_id, step_index) in self.decided:
            return False
        self.decided[(rollout_id, step_index)] = verdict
        return True

    async def record_alert(self, *args: Any) -> None:
        pass

    async def labels_received_since(self, model: str, since: datetime) -> bool:
        return self.labels_since is not None and self.labels_since >= since.timestamp()

    async def expire_pending(self, received_before: datetime) -> list[tuple[str, str]]:
        return []

    async def save_replay_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        pass


class Runtime:
    """``begin()`` as the service's runtime has it; ``commit_fails``: the commit of a transaction that wrote
    (published, or left work for its commit) raises (Postgres away). The tick's read of Postgres' clock, which
    writes nothing, goes through: the tick reaches the transaction each test fails."""

    def __init__(self) -> None:
        self.commit_fails = False
        self.published: list[CloudEvent[Any]] = []

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        pending: list[CloudEvent[Any]] = []

        async def publish(event: CloudEvent[Any]) -> None:
            pending.append(event)

        committed: list[Callable[[], None]] = []
        yield type(
            "Tx", (), {"conn": None, "publish": staticmethod(publish), "after_commit": committed.append}
        )()
        if self.commit_fails and (pending or committed):
            raise ConnectionError("connection was closed in the middle of operation")
        self.published += pending
        for callback in committed:
            callback()


def monitor_watching(step: StoredStep) -> Monitor:
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    monitor.live.watch(canary_step(step))
    return monitor


async def test_check_canary_leaves_the_decided_step_to_the_caller() -> None:
    step = watched(started_at=0.0)
    monitor, store, published = monitor_watching(step), Store([step]), []

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    # No canary traffic at all, past the timeout: the step is decided inconclusive.
    live = monitor.live.steps["r-1"]
    decided = await check_canary(
        live,
        TIMEOUT_S + 1,
        monitor=monitor,
        store=store,  # type: ignore[arg-type]
        publish=publish,
        tally=Tally(),
    )

    [event] = published
    assert isinstance(event.data, CanaryVerdict) and event.data.verdict is Verdict.INCONCLUSIVE
    assert event.correlationid == "cascade-1" and event.causationid == "started-1"
    assert decided
    assert "r-1" in monitor.live.steps  # still watched: the caller's transaction has not committed yet


@pytest.fixture
def fake_tick(monkeypatch: pytest.MonkeyPatch) -> Store:
    store = Store([watched(started_at=0.0)])
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monkeypatch.setattr("time.time", lambda: TIMEOUT_S + 1)
    return store


async def test_a_tick_whose_transaction_fails_keeps_the_step_and_the_next_tick_publishes_its_verdict(
    fake_tick: Store,
) -> None:
    monitor, rt = monitor_watching(fake_tick.steps[0]), Runtime()
    background = Background(rt, monitor, tick_s=1.0)  # type: ignore[arg-type]

    rt.commit_fails = True
    with pytest.raises(ConnectionError):
        await background.once()
    assert "r-1" in monitor.live.steps and rt.published == []
    fake_tick.decided.clear()  # the failed transaction's decision was rolled back with it

    rt.commit_fails = False
    await background.once()
    [event] = rt.published
    assert isinstance(event.data, CanaryVerdict) and event.data.step_index == 0
    assert "r-1" not in monitor.live.steps


def background_failures(task: str, cause: str) -> float:
    labels = {"task": task, "cause": cause}
    return REGISTRY.get_sample_value("driftloop_monitoring_background_failures_total", labels) or 0.0


async def test_failing_ticks_are_counted_by_their_task_and_cause_and_the_loop_goes_on(
    fake_tick: Store,
) -> None:
    """An operator alerts on a stuck loop by this count: the log alone said only "retrying"."""
    monitor, rt = monitor_watching(fake_tick.steps[0]), Runtime()
    background = Background(rt, monitor, tick_s=0.01)  # type: ignore[arg-type]
    before = background_failures("decide_canaries", "outage")

    async def failed_twice() -> bool:
        return background_failures("decide_canaries", "outage") >= before + 2

    async def published() -> bool:
        return bool(rt.published)

    rt.commit_fails = True
    with capture_logs() as logs:
        running = asyncio.create_task(background.run())
        await eventually(failed_twice, deadline_s=10.0, interval_s=0.01)
        fake_tick.decided.clear()  # the failed transactions' decisions were rolled back with them
        rt.commit_fails = False
        await eventually(published, deadline_s=10.0, interval_s=0.01)
        await background.stop()
        await running

    assert background_failures("decide_canaries", "outage") >= before + 2
    assert background_failures("judge_closed", "outage") == background_failures("housekeeping", "outage") == 0
    retried = [e for e in logs if e["event"] == "monitoring housekeeping failed, retrying"]
    assert retried and {e["task"] for e in retried} == {"decide_canaries"}
    [event] = rt.published
    assert isinstance(event.data, CanaryVerdict)


def test_unwatching_a_decided_step_keeps_the_rollouts_next_step() -> None:
    monitor = monitor_watching(watched(started_at=0.0, step_index=0))
    monitor.live.watch(canary_step(watched(started_at=5.0, step_index=1)))  # advanced meanwhile

    monitor.live.unwatch("r-1", 0)
    assert monitor.live.steps["r-1"].step_index == 1
    monitor.live.unwatch("r-1", 1)
    assert "r-1" not in monitor.live.steps


async def test_a_canary_version_without_a_profile_is_inconclusive_at_the_timeout_not_waited_on_for_ever() -> (
    None
):
    step = watched(started_at=0.0)
    monitor, store, published = monitor_watching(step), Store([step]), []
    monitor.live.steps["r-1"].canary.rows = 500  # enough traffic; but no ModelVersionRegistered for version 2

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    live = monitor.live.steps["r-1"]
    assert not await check_canary(live, 60.0, monitor=monitor, store=store, publish=publish, tally=Tally())  # type: ignore[arg-type]
    assert published == []
    await check_canary(live, TIMEOUT_S + 1, monitor=monitor, store=store, publish=publish, tally=Tally())  # type: ignore[arg-type]
    [event] = published
    assert event.data.verdict is Verdict.INCONCLUSIVE
    assert event.data.reason == "timed out: no reference profile for version 2 of churn"


class WindowStore(Store):
    """A tick's store that also judges windows; ``failing``: record_window raises it for those seqs."""

    def __init__(self, steps: list[StoredStep], failing: dict[int, Exception]) -> None:
        super().__init__(steps)
        self.failing = failing
        self.recorded: list[int] = []

    async def window_state(self, *_: Any, **__: Any) -> WindowState:
        return WindowState()

    async def quality_last(self, *_: Any) -> None:
        return None

    async def save_quality(self, *_: Any) -> None:
        pass

    async def record_window(self, model: str, version: int, seq: int, *_: Any) -> None:
        if seq in self.failing:
            raise self.failing[seq]
        self.recorded.append(seq)

    async def save_window_state(self, *_: Any) -> None:
        pass


def set_aside_count(model: str, error: str) -> float:
    labels = {"model": model, "error": error}
    return REGISTRY.get_sample_value("driftloop_monitoring_windows_set_aside_total", labels) or 0.0


def monitor_with_two_closed_windows(step: StoredStep) -> Monitor:
    monitor = make_monitor(
        MonitoringSettings(window_rows=200, min_window_rows=10), artifacts=None, source="/test/monitoring"
    )
    monitor.live.add_reference(reference())
    monitor.live.ingest(requests(400, seed=1), arrival=0.0)
    assert [w.seq for w in monitor.live.closed] == [1, 2]
    monitor.live.watch(canary_step(step))
    return monitor


async def test_a_window_whose_judgement_fails_for_good_is_set_aside_and_the_rest_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = ValueError("a value the judgement cannot take")
    store = WindowStore([watched(started_at=0.0)], failing={1: broken})
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monkeypatch.setattr("time.time", lambda: TIMEOUT_S + 1)
    monitor, rt = monitor_with_two_closed_windows(store.steps[0]), Runtime()
    before = set_aside_count("churn", "ValueError")

    await Background(rt, monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert store.recorded == [2]  # the window behind the failed one is judged
    assert not monitor.live.closed
    assert set_aside_count("churn", "ValueError") == before + 1
    [event] = rt.published  # and the housekeeping after it ran: the step got its verdict
    assert isinstance(event.data, CanaryVerdict)


async def test_a_window_whose_judgement_meets_an_outage_stays_queued_for_the_next_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outage = ConnectionError("connection was closed in the middle of operation")
    store = WindowStore([watched(started_at=0.0)], failing={1: outage})
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monitor, rt = monitor_with_two_closed_windows(store.steps[0]), Runtime()
    background = Background(rt, monitor, tick_s=1.0)  # type: ignore[arg-type]

    with pytest.raises(ConnectionError):
        await background.once()
    assert [w.seq for w in monitor.live.closed] == [1, 2]

    store.failing.clear()  # the database is back
    await background.once()
    assert store.recorded == [1, 2]
    assert not monitor.live.closed


class LastingWindowStore(WindowStore):
    """A WindowStore that keeps the window state and the replay offsets, as Postgres does across a restart."""

    def __init__(self, failing: dict[int, Exception]) -> None:
        super().__init__([], failing)
        self.states: dict[tuple[str, int], WindowState] = {}
        self.replay_from: dict[int, int] = {}

    async def window_state(self, model: str, version: int, *, lock: bool = False) -> WindowState:
        return copy.deepcopy(self.states.get((model, version), WindowState()))

    async def save_window_state(self, model: str, version: int, state: WindowState) -> None:
        self.states[(model, version)] = copy.deepcopy(state)

    async def save_replay_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        self.replay_from = dict(offsets)


async def restarted(store: LastingWindowStore, traffic: list[Any]) -> Monitor:
    """A new process restored as ``bootstrap.restore`` does: the window state, then the replayed traffic."""
    monitor = make_monitor(
        MonitoringSettings(window_rows=200, min_window_rows=10), artifacts=None, source="/test/monitoring"
    )
    state = await store.window_state("churn", 1)
    monitor.live.add_reference(reference(), seq=state.next_seq, starts=state.starts)
    replayed = [r for r in traffic if r[2] >= store.replay_from.get(r[1], 0)]
    monitor.live.ingest(replayed, arrival=0.0, replaying=True)
    return monitor


async def test_a_window_set_aside_is_done_for_good_and_not_rebuilt_and_set_aside_again_after_a_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = LastingWindowStore(failing={1: ValueError("a value the judgement cannot take")})
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monkeypatch.setattr("time.time", lambda: 1.0)  # no idle close: window 2 stays open
    traffic = requests(300, seed=1)  # window 1: 200 rows, closed; window 2: 100 rows, open
    before = set_aside_count("churn", "ValueError")
    first = make_monitor(
        MonitoringSettings(window_rows=200, min_window_rows=10), artifacts=None, source="/test/monitoring"
    )
    first.live.add_reference(reference())
    first.live.ingest(traffic, arrival=0.0)

    await Background(Runtime(), first, tick_s=1.0).once()  # type: ignore[arg-type]
    assert set_aside_count("churn", "ValueError") == before + 1
    assert store.states[("churn", 1)].next_seq == 2  # counted as done, as a judged window is

    second = await restarted(store, traffic)
    await Background(Runtime(), second, tick_s=1.0).once()  # type: ignore[arg-type]

    assert set_aside_count("churn", "ValueError") == before + 1  # not rebuilt, not set aside again
    assert store.recorded == []
    window = second.live.windows[("churn", 1)]
    assert (window.seq, window.rows) == (2, 100)  # the open window is rebuilt as it was


async def test_windows_still_queued_behind_a_judged_one_are_rebuilt_by_a_restart_under_their_own_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outage = ConnectionError("connection was closed in the middle of operation")
    store = LastingWindowStore(failing={2: outage})
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monkeypatch.setattr("time.time", lambda: 1.0)  # no idle close: window 4 stays open
    traffic = requests(700, seed=1)  # windows 1 to 3: 200 rows each, closed in one poll; window 4: 100 rows
    first = make_monitor(
        MonitoringSettings(window_rows=200, min_window_rows=10), artifacts=None, source="/test/monitoring"
    )
    first.live.add_reference(reference())
    first.live.ingest(traffic, arrival=0.0)
    with pytest.raises(ConnectionError):  # Postgres goes away after window 1 is judged; then a restart
        await Background(Runtime(), first, tick_s=1.0).once()  # type: ignore[arg-type]
    assert store.recorded == [1]

    second = await restarted(store, traffic)

    # Not dropped as rows of judged windows, with the open window's rows taking number 2.
    assert [(w.seq, w.size) for w in second.live.closed] == [(2, 200), (3, 200)]
    window = second.live.windows[("churn", 1)]
    assert (window.seq, window.rows) == (4, 100)


async def test_a_partition_the_version_left_keeps_its_start_so_a_restart_does_not_count_its_rows_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = LastingWindowStore(failing={})
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monkeypatch.setattr("time.time", lambda: 1.0)  # no idle close: window 3 stays open
    # 10 requests of 50 rows: the first 4 on partition 1 (window 1), then the version's traffic moved to
    # partition 0 (the topic gained partitions): window 2, then window 3 open with 100 rows.
    traffic = [(r, 1, i) for i, (r, _, _) in enumerate(requests(500, seed=1)[:4])]
    traffic += [(r, 0, i) for i, (r, _, _) in enumerate(requests(500, seed=1)[4:])]
    first = make_monitor(
        MonitoringSettings(window_rows=200, min_window_rows=10), artifacts=None, source="/test/monitoring"
    )
    first.live.add_reference(reference())
    first.live.ingest(traffic, arrival=0.0)
    await Background(Runtime(), first, tick_s=1.0).once()  # type: ignore[arg-type]
    assert store.recorded == [1, 2]
    assert store.states[("churn", 1)].starts == {0: 4, 1: 4}

    second = await restarted(store, traffic)

    # Partition 1's rows were judged in window 1: not in the open window again, not closing a window of them.
    assert not second.live.closed
    window = second.live.windows[("churn", 1)]
    assert (window.seq, window.rows, window.first_offsets) == (3, 100, {0: 4})


def test_a_replayed_poll_of_two_partitions_leaves_the_judged_rows_of_each_out_of_the_open_window() -> None:
    traffic = requests(1_000, seed=1)  # 20 requests of 50 rows
    # The version's traffic on two partitions, as a replay's poll gives it: partition 0's records, then 1's.
    # On each, its first 5 requests were in windows judged before the restart.
    polled = [(p, 0, i) for i, (p, _, _) in enumerate(traffic[:10])]
    polled += [(p, 1, i) for i, (p, _, _) in enumerate(traffic[10:])]
    monitor = make_monitor(
        MonitoringSettings(window_rows=100_000, min_window_rows=10), artifacts=None, source="/test/monitoring"
    )
    monitor.live.add_reference(reference(), seq=2, starts={0: 5, 1: 5})

    monitor.live.ingest(polled, arrival=0.0, replaying=True)

    window = monitor.live.windows[("churn", 1)]
    assert (window.seq, window.rows, window.first_offsets) == (2, 500, {0: 5, 1: 5})
    assert monitor.live.cache.holds("churn", polled[10][0].rows[0].prediction_id)  # still held for labels


def test_a_replay_that_closes_a_rebuilt_window_leaves_out_the_judged_rows_of_a_partition_read_later() -> None:
    traffic = requests(250, seed=1)  # 5 requests of 50 rows
    # Before the stop: window 1 (partition 0's first two requests) judged, window 2 (partition 1's two)
    # closed and queued for judgement, window 3 open with partition 0's third request. The replay reads from
    # where the label cache held, and its first polls bring partition 1 only: window 2 closes again before
    # partition 0's judged rows come.
    on_0 = [(p, 0, i) for i, (p, _, _) in enumerate(traffic[:2] + traffic[4:])]
    on_1 = [(p, 1, i) for i, (p, _, _) in enumerate(traffic[2:4])]
    monitor = make_monitor(
        MonitoringSettings(window_rows=100, min_window_rows=10), artifacts=None, source="/test/monitoring"
    )
    monitor.live.add_reference(reference(), seq=2, starts={0: 2, 1: 0})

    monitor.live.ingest(on_1, arrival=0.0, replaying=True)
    monitor.live.ingest(on_0, arrival=0.0, replaying=True)

    # Window 1's rows are not counted again (before: in a window 3 of their own, the open one numbered 4).
    assert [(w.seq, w.size, w.first_offsets) for w in monitor.live.closed] == [(2, 100, {1: 0})]
    window = monitor.live.windows[("churn", 1)]
    assert (window.seq, window.rows, window.first_offsets) == (3, 50, {0: 2})
    assert monitor.live.cache.holds("churn", on_0[0][0].rows[0].prediction_id)  # still held for labels


async def test_a_regression_canary_is_judged_on_its_numeric_labels_when_one_label_is_text() -> None:
    class Labelled(Store):
        async def labelled_outcomes(
            self, model: str, version: int, since: datetime, *, rollout_id: str | None
        ) -> list[Any]:
            # a label stored before such labels were refused, then mean absolute errors of 0.52 (canary)
            # and 0.42 (stable)
            error = 0.5 if version == 2 else 0.4
            return [(1.0, "n/a", None)] + [
                (1.0, 1.0 + (error + 0.01 * (i % 5)) * (-1) ** i, None) for i in range(150)
            ]

    step = watched(started_at=0.0)
    monitor, store, published = monitor_watching(step), Labelled([step]), []
    monitor.live.add_reference(regression_reference("churn", 2))
    monitor.live.steps["r-1"].canary.rows = 500
    before = (
        REGISTRY.get_sample_value("driftloop_monitoring_unscorable_labels_total", {"model": "churn"}) or 0
    )

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    tally = Tally()
    await check_canary(
        monitor.live.steps["r-1"],
        60.0,
        monitor=monitor,
        store=store,  # type: ignore[arg-type]
        publish=publish,
        tally=tally,
    )
    tally.count()  # its transaction committed
    [event] = published
    mae = next(c for c in event.data.evidence if c.name == "mae")
    assert (mae.stable_value, mae.canary_value) == (pytest.approx(0.42), pytest.approx(0.52))
    after = REGISTRY.get_sample_value("driftloop_monitoring_unscorable_labels_total", {"model": "churn"})
    assert after == before + 2  # one on each side


async def test_a_canary_whose_labels_come_as_numbers_with_no_fraction_is_judged_on_its_classes() -> None:
    class Labelled(Store):
        async def labelled_outcomes(
            self, model: str, version: int, since: datetime, *, rollout_id: str | None
        ) -> list[Any]:
            # Every prediction right on both sides; the canary's labels come from a client that sends the
            # class 1 as 1.0 (a pandas column of integer codes with a gap).
            rows: list[tuple[Any, Any, None]] = [(i % 2, i % 2, None) for i in range(150)]
            return [(p, float(y), None) for p, y, _ in rows] if version == 2 else rows

    step = watched(started_at=0.0)
    monitor, store, published = monitor_watching(step), Labelled([step]), []
    monitor.live.add_reference(dataclasses.replace(reference(), version=2))
    monitor.live.steps["r-1"].canary.rows = 500

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    await check_canary(
        monitor.live.steps["r-1"],
        60.0,
        monitor=monitor,
        store=store,  # type: ignore[arg-type]
        publish=publish,
        tally=Tally(),
    )
    [event] = published
    accuracy = next(c for c in event.data.evidence if c.name == "accuracy")
    assert (accuracy.stable_value, accuracy.canary_value, accuracy.passed) == (1.0, 1.0, True)
    assert event.data.verdict is not Verdict.UNHEALTHY


def watched_rollout(rollout_id: str, model: str, started_at: float = 0.0) -> StoredStep:
    step = watched(started_at)
    step.rollout_id, step.model, step.cause_id = rollout_id, model, f"started-{rollout_id}"
    return step


class TickStore(Store):
    """A tick's store with labelled outcomes, label expiry and replay offsets to look at. ``away``: the
    calls that meet an outage (the connection drops), by method name and rollout or model; ``broken``: the
    calls that fail for good, with their error."""

    def __init__(self, steps: list[StoredStep], outcomes: dict[tuple[str, int], list[Any]]) -> None:
        super().__init__(steps)
        self.outcomes = outcomes
        self.expired = [("p-expired", "churn")]
        self.offsets_saved = 0
        self.away: set[tuple[str, str]] = set()
        self.broken: dict[tuple[str, str], Exception] = {}

    def _outage(self, call: str, key: str) -> None:
        if (call, key) in self.away:
            raise ConnectionError("connection was closed in the middle of operation")
        if (call, key) in self.broken:
            raise self.broken[(call, key)]

    async def labelled_outcomes(
        self, model: str, version: int, since: datetime, *, rollout_id: str | None
    ) -> list[Any]:
        self._outage("labelled_outcomes", model)
        return self.outcomes.get((model, version), [])

    async def decide_step(
        self, rollout_id: str, step_index: int, verdict: str, reason: str, event_id: str
    ) -> bool:
        self._outage("decide_step", rollout_id)
        return await super().decide_step(rollout_id, step_index, verdict, reason, event_id)

    async def expire_pending(self, received_before: datetime) -> list[tuple[str, str]]:
        expired, self.expired = self.expired, []
        return expired

    async def save_replay_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        self.offsets_saved += 1


def steps_set_aside(model: str, error: str | None = None) -> float:
    """Steps of the model set aside, for this error type or (None) any."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == "driftloop_monitoring_canary_steps_set_aside_total"
        and sample.labels["model"] == model
        and error in (None, sample.labels["error"])
    )


def regression_rollouts(monkeypatch: pytest.MonkeyPatch, outcomes: list[Any]) -> tuple[Monitor, TickStore]:
    """Rollout r-price (a regression model) with 500 canary predictions and these labelled canary outcomes;
    rollout r-churn, behind it, is due its verdict."""
    price, other = watched_rollout("r-price", "price"), watched_rollout("r-churn", "churn")
    store = TickStore([price, other], outcomes={("price", 2): outcomes})
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: store)
    monkeypatch.setattr("time.time", lambda: TIMEOUT_S + 1)
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    monitor.live.add_reference(regression_reference("price", 2))
    for step in (price, other):
        monitor.live.watch(canary_step(step))
    monitor.live.steps["r-price"].canary.rows = 500
    monitor.live.pending_labels.add(("p-expired", "churn"))  # waiting, as restore loads it
    return monitor, store


def failing_canary(monkeypatch: pytest.MonkeyPatch) -> tuple[Monitor, TickStore]:
    """Rollout r-price, whose decision fails for good: reading its labelled outcomes raises an error that is
    no outage (a row the code cannot take), on every tick."""
    monitor, store = regression_rollouts(monkeypatch, [(1.0, 1.5, None)])
    store.broken = {("labelled_outcomes", "price"): ValueError("a stored row the decision cannot take")}
    return monitor, store


async def test_a_regression_canary_whose_errors_overflow_is_inconclusive_as_not_measurable_not_set_aside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The canary predicted 1e308 where the truth was -1e308: both finite, so the prediction and the label
    were accepted, but the absolute error is beyond a double. The decision says so itself."""
    monitor, store = regression_rollouts(monkeypatch, [(1e308, -1e308, None)])
    rt = Runtime()
    before = steps_set_aside("price")

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        await Background(rt, monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    verdicts = {e.data.rollout_id: e.data for e in rt.published if isinstance(e.data, CanaryVerdict)}
    assert verdicts["r-price"].verdict is Verdict.INCONCLUSIVE
    assert verdicts["r-price"].reason == "not measurable: mae"
    mae = next(c for c in verdicts["r-price"].evidence if c.name == "mae")
    assert (mae.canary_value, mae.passed) == (None, None) and mae.detail.startswith("not measurable")
    assert steps_set_aside("price") == before  # for any error
    assert store.decided == {("r-price", 0): "inconclusive", ("r-churn", 0): "inconclusive"}
    assert monitor.live.steps == {}


async def test_a_canary_step_whose_decision_fails_for_good_is_set_aside_and_the_tick_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monitor, store = failing_canary(monkeypatch)
    rt = Runtime()
    before = steps_set_aside("price", "ValueError")

    await Background(rt, monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    verdicts = {e.data.rollout_id: e.data for e in rt.published if isinstance(e.data, CanaryVerdict)}
    assert verdicts["r-churn"].verdict is Verdict.INCONCLUSIVE  # the rollout behind it got its verdict
    assert verdicts["r-churn"].reason.startswith("timed out")
    # The broken step is not left waiting for ever: it gets a verdict that says it could not be judged,
    # which serving rolls back, and it is stored as decided.
    assert verdicts["r-price"].verdict is Verdict.INCONCLUSIVE
    assert verdicts["r-price"].reason.startswith("could not be judged")
    assert store.decided == {("r-price", 0): "inconclusive", ("r-churn", 0): "inconclusive"}
    assert steps_set_aside("price", "ValueError") == before + 1
    assert monitor.live.steps == {}
    assert store.offsets_saved == 1  # and the housekeeping after it ran
    assert monitor.live.pending_labels == set()


async def test_a_canary_step_whose_decision_meets_an_outage_stays_watched_and_is_not_set_aside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monitor, store = regression_rollouts(monkeypatch, [(1.0, 1.5, None)])
    store.away = {("labelled_outcomes", "price")}
    rt = Runtime()
    background = Background(rt, monitor, tick_s=1.0)  # type: ignore[arg-type]
    before = steps_set_aside("price", "ConnectionError")

    with pytest.raises(ConnectionError):
        await background.once()
    assert "r-price" in monitor.live.steps and ("r-price", 0) not in store.decided
    assert steps_set_aside("price", "ConnectionError") == before

    store.away.clear()  # the database is back
    await background.once()
    verdicts = {e.data.rollout_id: e.data for e in rt.published if isinstance(e.data, CanaryVerdict)}
    assert set(verdicts) == {"r-price", "r-churn"}
    assert not verdicts["r-price"].reason.startswith("could not be judged")
    assert monitor.live.steps == {}


async def test_a_canary_step_set_aside_during_an_outage_is_counted_once_when_its_verdict_is_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monitor, store = failing_canary(monkeypatch)
    store.away = {("decide_step", "r-price")}  # the outage comes while its inconclusive verdict is stored
    rt = Runtime()
    background = Background(rt, monitor, tick_s=1.0)  # type: ignore[arg-type]
    before = steps_set_aside("price", "ValueError")

    with pytest.raises(ConnectionError):
        await background.once()
    assert "r-price" in monitor.live.steps
    assert steps_set_aside("price", "ValueError") == before

    store.away.clear()  # the database is back
    await background.once()
    assert store.decided[("r-price", 0)] == "inconclusive"
    assert steps_set_aside("price", "ValueError") == before + 1
    assert monitor.live.steps == {}


class Unlabelled(Store):
    """A step's store with no labelled rows of the step's predictions yet."""

    async def labelled_outcomes(
        self, model: str, version: int, since: datetime, *, rollout_id: str | None
    ) -> list[Any]:
        return []


@pytest.mark.parametrize("labels_lately", [True, False])
async def test_a_step_waits_for_labels_that_come_later_than_its_bake_time(labels_lately: bool) -> None:
    # The model's labels come 15 s after its predictions and the step bakes 2 s: when it is due, none of its
    # predictions has a label yet. It waited only for labels some of its predictions already had, so it was
    # judged without any (the demo's corrupted candidate was promoted: "needs 100 labelled rows per variant
    # (stable 0, canary 0)"). A model whose labels do not come is judged at the bake time, as before.
    step = watched(started_at=0.0)
    monitor, published = monitor_watching(step), []
    store = Unlabelled([step], labels_since=1.0 if labels_lately else None)
    monitor.live.add_reference(dataclasses.replace(reference(), version=2))
    monitor.live.steps["r-1"].canary.rows = 500
    grace = MonitoringSettings().canary_label_grace_seconds

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    live = monitor.live.steps["r-1"]
    await check_canary(live, 3.0, monitor=monitor, store=store, publish=publish, tally=Tally())  # type: ignore[arg-type]
    assert len(published) == (0 if labels_lately else 1)

    await check_canary(
        live,
        step.bake_seconds + grace + 1,
        monitor=monitor,
        store=store,  # type: ignore[arg-type]
        publish=publish,
        tally=Tally(),
    )
    [event] = published  # past the grace period, judged without them
    accuracy = next(c for c in event.data.evidence if c.name == "accuracy")
    assert accuracy.passed is None and "needs 100 labelled rows" in accuracy.detail


async def test_a_step_with_its_samples_and_a_bake_longer_than_the_timeout_is_judged_once_baked() -> None:
    # Serving's bake time (rollout_bake_seconds) longer than monitoring's canary_timeout_seconds: the step had
    # its samples but not its bake at the timeout, and was given "inconclusive: timed out: canary had 500 of
    # 100 predictions" (rolled back) every time. The timeout is for a canary short of samples.
    step = dataclasses.replace(watched(started_at=0.0), bake_seconds=TIMEOUT_S + 300)
    monitor, published, store = monitor_watching(step), [], Unlabelled([step])
    monitor.live.add_reference(dataclasses.replace(reference(), version=2))
    live = monitor.live.steps["r-1"]
    live.canary.rows = 500

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    past_timeout = TIMEOUT_S + 1
    assert not canary_due(live, past_timeout, monitor.canary)
    decided = await check_canary(
        live,
        past_timeout,
        monitor=monitor,
        store=store,  # type: ignore[arg-type]
        publish=publish,
        tally=Tally(),
    )
    assert not decided
    assert published == []

    baked = step.bake_seconds
    assert canary_due(live, baked, monitor.canary)
    assert await check_canary(live, baked, monitor=monitor, store=store, publish=publish, tally=Tally())  # type: ignore[arg-type]
    [event] = published
    assert not event.data.reason.startswith("timed out")

    short = dataclasses.replace(watched(started_at=0.0), bake_seconds=TIMEOUT_S + 300)
    monitor = monitor_watching(short)  # 10 of its 100 samples: it times out, its bake time or not
    monitor.live.steps["r-1"].canary.rows = 10
    assert canary_due(monitor.live.steps["r-1"], past_timeout, monitor.canary)


async def test_a_step_dated_in_the_past_times_out_from_when_monitoring_learned_of_it() -> None:
    # Serving's clock an hour behind monitoring's (or the step's event read an hour late): timed from the
    # step's start, the canary was out of time at the first tick, before it could answer, and rolled back.
    step = dataclasses.replace(watched(started_at=0.0), learned_at=3_600.0)
    monitor, published, store = monitor_watching(step), [], Unlabelled([step])
    live = monitor.live.steps["r-1"]
    live.canary.rows = 10  # of its 100

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    assert not canary_due(live, 3_601.0, monitor.canary)
    assert canary_due(live, 3_600.0 + TIMEOUT_S, monitor.canary)
    await check_canary(
        live,
        3_600.0 + TIMEOUT_S,
        monitor=monitor,
        store=store,  # type: ignore[arg-type]
        publish=publish,
        tally=Tally(),
    )
    [event] = published
    assert event.data.verdict is Verdict.INCONCLUSIVE and event.data.reason.startswith("timed out")
    assert event.data.window.start == from_epoch(0.0)  # the step's time range stays on serving's clock


# --- the bake time on monitoring's clock --------------------------------------------------------------------

STARTED = RolloutStarted(
    rollout_id="r-1",
    model="churn",
    stable_version=1,
    canary_version=2,
    steps=[0.1, 0.5, 1.0],
    weight=0.1,
    min_samples=100,
    bake_seconds=2.0,
)
ADVANCED = RolloutStepAdvanced(
    rollout_id="r-1",
    model="churn",
    stable_version=1,
    canary_version=2,
    step_index=1,
    previous_weight=0.1,
    weight=0.5,
    samples_seen=100,
    step_seconds=2.0,
)
SERVING_START = 1_000_000.0  # when serving started the step, on serving's clock
LATENCY_S = 0.5  # how long the step's event took to reach monitoring


@dataclass
class Steps(Unlabelled):
    """A store that keeps the steps the rollout handlers save."""

    async def save_step(self, step: StoredStep) -> None:
        self.steps.append(step)

    async def last_step(self, rollout_id: str) -> StoredStep | None:
        mine = [s for s in self.steps if s.rollout_id == rollout_id]
        return max(mine, key=lambda s: s.step_index, default=None)

    async def rollout_outcome(self, rollout_id: str) -> str | None:
        return None  # no rollout here ends


async def step_announced_at(
    at: float, *, advanced: bool, monitor: Monitor, store: Steps
) -> tuple[CanaryStep, float]:
    """Serving starts rollout r-1 (bake 2 s), on its step 1 when ``advanced``, at ``at`` on its clock;
    monitoring handles the event LATENCY_S later. Returns the watched step and when monitoring handled it."""
    event, tally = new_event(STARTED, source="/test/serving"), Tally()
    if advanced:
        await on_rollout_started(event, monitor=monitor, store=store, publish=publish_nothing, tally=tally)  # type: ignore[arg-type]
        later = new_event(ADVANCED, source="/test/serving").model_copy(update={"time": from_epoch(at)})
        await on_rollout_step_advanced(
            later,
            monitor=monitor,
            store=store,  # type: ignore[arg-type]
            publish=publish_nothing,
            tally=tally,
        )
    else:
        event = event.model_copy(update={"time": from_epoch(at)})
        await on_rollout_started(event, monitor=monitor, store=store, publish=publish_nothing, tally=tally)  # type: ignore[arg-type]
    tally.count()  # committed: memory follows
    watched_step = monitor.live.steps["r-1"]
    assert watched_step.step_index == (1 if advanced else 0)
    watched_step.canary.rows = 500
    return watched_step, monitor.clock()


@pytest.mark.parametrize("advanced", [False, True], ids=["started", "advanced"])
@pytest.mark.parametrize("ahead_s", [20.0, -20.0], ids=["monitoring-ahead", "monitoring-behind"])
async def test_a_step_is_judged_no_earlier_than_its_bake_time_has_passed_on_servings_clock(
    ahead_s: float, advanced: bool
) -> None:
    # Monitoring's clock 20 s ahead of serving's: measured from the event's time (serving's clock), the bake
    # was over on monitoring's clock 20 s before it was on serving's. Serving ignored the healthy verdict as
    # premature and, monitoring giving one verdict per step, the rollout never advanced. It is measured from
    # when monitoring learned of the step, or from the step's start when that is later (monitoring behind).
    monitor, published = monitor_watching(watched(started_at=0.0)), []
    monitor.live.unwatch("r-1")
    monitor.live.add_reference(dataclasses.replace(reference(), version=2))
    now = SERVING_START + LATENCY_S + ahead_s
    monitor.clock = lambda: now
    store = Steps([])
    step, learned = await step_announced_at(SERVING_START, advanced=advanced, monitor=monitor, store=store)
    baked = max(learned, SERVING_START) + step.bake_seconds  # on monitoring's clock

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    assert not canary_due(step, baked - 0.1, monitor.canary)
    await check_canary(step, baked - 0.1, monitor=monitor, store=store, publish=publish, tally=Tally())  # type: ignore[arg-type]
    assert published == []

    assert canary_due(step, baked, monitor.canary)
    await check_canary(step, baked, monitor=monitor, store=store, publish=publish, tally=Tally())  # type: ignore[arg-type]
    [verdict] = published
    # On serving's clock the verdict comes once the bake time passed there: serving takes it.
    assert baked - ahead_s >= SERVING_START + step.bake_seconds
    # The step's time range stays on serving's clock, where the predictions' times are.
    assert verdict.data.window.start == from_epoch(SERVING_START)
    assert step.started_at == SERVING_START


async def test_the_wait_for_labels_runs_from_when_monitoring_learned_of_the_step() -> None:
    # Labels are coming for the model: the step waits the grace period after its bake time for them, on
    # monitoring's clock from when monitoring learned of the step, not from the step's start on serving's.
    monitor, published = monitor_watching(watched(started_at=0.0)), []
    monitor.live.unwatch("r-1")
    monitor.live.add_reference(dataclasses.replace(reference(), version=2))
    now = SERVING_START + LATENCY_S + 20.0
    monitor.clock = lambda: now
    grace = monitor.canary.label_grace_seconds
    store = Steps([], labels_since=now + 3_600)  # labels keep arriving
    step, learned = await step_announced_at(SERVING_START, advanced=False, monitor=monitor, store=store)

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    waited = learned + step.bake_seconds + grace
    await check_canary(step, waited - 0.1, monitor=monitor, store=store, publish=publish, tally=Tally())  # type: ignore[arg-type]
    assert published == []
    await check_canary(step, waited, monitor=monitor, store=store, publish=publish, tally=Tally())  # type: ignore[arg-type]
    assert len(published) == 1


class RestoreStore(Store):
    """The MonitoringStore calls of a restart, on stored steps only."""

    async def pending_labels(self) -> set[tuple[str, str]]:
        return set()

    async def replay_offsets(self, topic: str) -> dict[int, int]:
        return {}


class RestoreRuntime:
    """``begin()`` as the service's runtime has it, on ``store``: what it publishes is kept in ``published``
    and what waits for the commit is called at its end."""

    def __init__(self, store: RestoreStore) -> None:
        self.settings = MonitoringSettings()
        self.store = store
        self.published: list[CloudEvent[Any]] = []

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        committed: list[Callable[[], None]] = []

        async def publish(event: CloudEvent[Any]) -> None:
            self.published.append(event)

        yield SimpleNamespace(conn=self.store, publish=publish, after_commit=committed.append)
        for callback in committed:
            callback()


async def test_a_restart_bakes_a_step_from_when_monitoring_learned_of_it_or_from_its_start_for_an_older_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    learned = dataclasses.replace(
        watched_rollout("r-learned", "churn", SERVING_START), learned_at=SERVING_START + 20.5
    )
    older = watched_rollout("r-older", "churn", SERVING_START)  # stored before learned_at was kept
    assert older.learned_at is None
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    restarted = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    await bootstrap.restore(RestoreRuntime(RestoreStore([learned, older])), restarted)  # type: ignore[arg-type]

    steps, policy = restarted.live.steps, restarted.canary
    for step in steps.values():
        step.canary.rows = 500
    assert steps["r-learned"].learned_at == SERVING_START + 20.5
    assert not canary_due(steps["r-learned"], SERVING_START + 20.5 + 2.0 - 0.1, policy)
    assert canary_due(steps["r-learned"], SERVING_START + 20.5 + 2.0, policy)
    assert steps["r-older"].learned_at is None
    assert not canary_due(steps["r-older"], SERVING_START + 2.0 - 0.1, policy)
    assert canary_due(steps["r-older"], SERVING_START + 2.0, policy)  # from its start, as before


def steps_ahead_counted(model: str) -> float:
    sample = "driftloop_monitoring_rollout_steps_ahead_of_clock_total"
    return REGISTRY.get_sample_value(sample, {"model": model}) or 0.0


@pytest.mark.parametrize("advanced", [False, True], ids=["started", "advanced"])
async def test_a_step_dated_years_ahead_is_watched_from_the_skew_allowed_and_times_out(
    advanced: bool,
) -> None:
    # A serving replica's clock years ahead: the step's time range (from its start on) took none of the
    # canary's traffic and its timeout never came, so the rollout waited for ever for its verdict. As a
    # prediction is held for its label, it starts at most max_clock_skew_seconds ahead of when monitoring
    # handled it; counted, and logged naming both times.
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    monitor.live.add_reference(dataclasses.replace(reference(), version=2))
    monitor.clock = lambda: SERVING_START
    skew = monitor.live.cache.max_ahead_s
    store, published, tally = Steps([]), [], Tally()
    ahead = from_epoch(SERVING_START + 10 * 365 * 86_400)
    before = steps_ahead_counted("churn")

    with capture_logs() as logs:
        first = new_event(STARTED, source="/test/serving")
        first = first.model_copy(update={"time": from_epoch(SERVING_START) if advanced else ahead})
        await on_rollout_started(first, monitor=monitor, store=store, publish=publish_nothing, tally=tally)  # type: ignore[arg-type]
        if advanced:
            later = new_event(ADVANCED, source="/test/serving").model_copy(update={"time": ahead})
            await on_rollout_step_advanced(
                later,
                monitor=monitor,
                store=store,  # type: ignore[arg-type]
                publish=publish_nothing,
                tally=tally,
            )
    assert steps_ahead_counted("churn") == before  # counted once the transaction commits
    tally.count()

    step = monitor.live.steps["r-1"]
    assert step.step_index == (1 if advanced else 0)
    assert step.started_at == SERVING_START + skew
    assert steps_ahead_counted("churn") == before + 1
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event_time"] == ahead.isoformat()
    assert warning["monitoring_time"] == from_epoch(SERVING_START).isoformat()

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    # No canary traffic: inconclusive at the timeout, counted from the start monitoring allowed.
    timeout = SERVING_START + skew + TIMEOUT_S
    assert not await check_canary(
        step,
        timeout - 1,
        monitor=monitor,
        store=store,  # type: ignore[arg-type]
        publish=publish,
        tally=tally,
    )
    assert await check_canary(step, timeout, monitor=monitor, store=store, publish=publish, tally=tally)  # type: ignore[arg-type]
    [verdict] = published
    assert verdict.data.verdict is Verdict.INCONCLUSIVE and verdict.data.reason.startswith("timed out")
    assert verdict.data.window.start == from_epoch(SERVING_START + skew)


async def test_a_step_dated_within_the_skew_allowed_keeps_its_start() -> None:
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    monitor.clock = lambda: SERVING_START
    store, tally, before = Steps([]), Tally(), steps_ahead_counted("churn")
    at = from_epoch(SERVING_START + monitor.live.cache.max_ahead_s)  # as far ahead as allowed
    event = new_event(STARTED, source="/test/serving").model_copy(update={"time": at})

    await on_rollout_started(event, monitor=monitor, store=store, publish=publish_nothing, tally=tally)  # type: ignore[arg-type]
    tally.count()

    assert monitor.live.steps["r-1"].started_at == at.timestamp()
    assert steps_ahead_counted("churn") == before
