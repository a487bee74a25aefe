"""An open window with fewer than ``min_window_rows`` rows whose version gets no more traffic (a canary rolled
back after a few predictions, a version replaced mid-window) is set aside unjudged once it saw no traffic for
``label_wait_seconds``: stored as done, so that it no longer holds the replay offsets at its first row. Kept
open, it held them there for ever, and every restart read the predictions topic's whole retention. A slow
version, still getting traffic, keeps its window open until it has the rows to be judged."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background, make_monitor
from services.monitoring.handlers import Monitor
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_canary_watch import LastingWindowStore, Runtime, restarted
from tests.unit.monitoring.test_domain import T0, reference, requests

WAIT = 86_400.0  # the settings' default label_wait_seconds
IDLE = ("churn", 1)


class Clock:
    """What ``time.time`` answers in the background's tick."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, now: float) -> None:
        self.now = now
        monkeypatch.setattr("time.time", lambda: self.now)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> LastingWindowStore:
    lasting = LastingWindowStore(failing={})
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: lasting)
    return lasting


def set_aside_count(model: str) -> float:
    series = "driftloop_monitoring_windows_too_few_rows_set_aside_total"
    return REGISTRY.get_sample_value(series, {"model": model}) or 0.0


def monitor_with_few_rows() -> tuple[Monitor, list[Any]]:
    """Version 1 got 50 rows (one request, partition 0, offset 0) at 0.0, then nothing: fewer than the
    default min_window_rows (100)."""
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    monitor.live.add_reference(reference())
    traffic = requests(50, seed=1)
    monitor.live.ingest(traffic, arrival=0.0)
    return monitor, traffic


async def test_a_window_with_too_few_rows_of_a_version_without_traffic_stops_holding_the_replay_offsets(
    store: LastingWindowStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch, WAIT - 1.0)
    monitor, _ = monitor_with_few_rows()
    background = Background(Runtime(), monitor, tick_s=1.0)  # type: ignore[arg-type]

    await background.once()
    window = monitor.live.windows[IDLE]
    assert (window.seq, window.rows) == (1, 50)  # not before the label wait

    clock.now = 30 * 86_400.0  # thirty days on
    await background.once()
    assert monitor.live.cache.rows == 0
    assert monitor.live.hold_offsets() == {0: 1}  # was {0: 0}, for ever
    await background.once()  # the next tick stores where a restart replays from
    assert store.replay_from == {0: 1}
    window = monitor.live.windows[IDLE]
    assert (window.seq, window.rows) == (2, 0)
    assert not monitor.live.closed
    assert store.recorded == []  # too few rows: not judged


async def test_a_window_set_aside_for_too_few_rows_is_stored_as_done_logged_and_counted(
    store: LastingWindowStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    Clock(monkeypatch, WAIT)
    monitor, traffic = monitor_with_few_rows()
    before = set_aside_count("churn")

    with capture_logs() as logs:
        await Background(Runtime(), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    state = store.states[IDLE]
    assert (state.next_seq, state.starts, state.consecutive) == (2, {0: 1}, {})  # done, as a judged one is
    assert store.recorded == []
    assert set_aside_count("churn") == before + 1
    [line] = [e for e in logs if e["event"].startswith("window set aside")]
    assert line["log_level"] == "warning"
    assert (line["model"], line["version"], line["window_id"], line["rows"]) == (
        "churn",
        1,
        "churn:1:000001",
        50,
    )
    assert "min_window_rows (100)" in line["reason"] and "label_wait_seconds" in line["reason"]

    second = await restarted(store, traffic)  # neither rebuilt nor folded into the next window
    window = second.live.windows[IDLE]
    assert (window.seq, window.rows) == (2, 0)
    assert not second.live.closed


async def test_a_slow_version_still_getting_traffic_keeps_its_window_beside_one_set_aside(
    store: LastingWindowStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor, _ = monitor_with_few_rows()
    # Version 2 on partition 1: 50 rows at 0.0, 30 more shortly before the label wait ran out.
    monitor.live.add_reference(dataclasses.replace(reference(), version=2))
    for offset, (rows, at) in enumerate([(50, 0.0), (30, WAIT - 10.0)]):
        [(payload, _, _)] = requests(rows, seed=2, per_request=rows, start=T0 + timedelta(seconds=at))
        monitor.live.ingest([(payload.model_copy(update={"model_version": 2}), 1, offset)], arrival=at)
    Clock(monkeypatch, WAIT + 1_000.0)

    await Background(Runtime(), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert monitor.live.windows[IDLE].seq == 2  # version 1's window set aside
    slow = monitor.live.windows[("churn", 2)]
    assert (slow.seq, slow.rows) == (1, 80)  # kept open for the rows to judge it
    assert ("churn", 2) not in store.states
    assert monitor.live.hold_offsets() == {0: 1, 1: 0}  # the slow window holds the replay to its first row
