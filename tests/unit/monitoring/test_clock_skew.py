"""A prediction dated ahead of monitoring's clock (a serving replica's clock years ahead) is held for its
label as if dated at most ``max_clock_skew_seconds`` ahead of when it arrived: held by its own date, it
stayed in the label cache, and kept the cache's later predictions and the replay offsets behind it, until the
row bound pushed it out. Such rows are counted, and a warning names the model once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, cast

from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.predictions import PredictionsLogged
from libs.bus import Delivery, Record
from services.monitoring import handlers
from services.monitoring.bootstrap import make_monitor
from services.monitoring.domain import epoch
from services.monitoring.handlers import Monitor, Tally, on_predictions_logged
from services.monitoring.ports import MonitoringStore
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_domain import T0, reference, requests
from tests.unit.monitoring.test_replay_offsets import Store

NOW = epoch(T0)
WAIT = 3_600.0  # label_wait_seconds
TOPIC = "mlops.predictions"


def dated(start_s: float, seed: int, first_offset: int) -> list[tuple[PredictionsLogged, int, int]]:
    """Two requests of 50 rows, the first dated ``start_s`` after T0, at offsets from ``first_offset``."""
    reqs = requests(100, seed=seed, start=T0 + timedelta(seconds=start_s))
    return [(payload, 0, first_offset + i) for i, (payload, _, _) in enumerate(reqs)]


def monitor_at(now: float) -> Monitor:
    settings = MonitoringSettings(label_wait_seconds=WAIT, window_rows=50, min_window_rows=10)
    monitor = make_monitor(settings, artifacts=None, source="/t")
    monitor.live.add_reference(reference())
    monitor.clock = lambda: now
    return monitor


async def consume(monitor: Monitor, reqs: list[tuple[PredictionsLogged, int, int]]) -> None:
    deliveries = [
        Delivery(Record(TOPIC, p, o, None, b"", ()), cast(Any, type("Event", (), {"data": d})()))
        for d, p, o in reqs
    ]
    await on_predictions_logged(
        deliveries, monitor=monitor, store=cast(MonitoringStore, Store()), publish=cast(Any, None)
    )


def ahead_total(model: str) -> float:
    sample = "driftloop_monitoring_predictions_ahead_of_clock_total"
    return REGISTRY.get_sample_value(sample, {"model": model}) or 0.0


def warnings_of(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["log_level"] == "warning" and "ahead" in e["event"]]


async def test_a_prediction_dated_years_ahead_leaves_the_label_cache_and_the_replay_offsets_in_time() -> None:
    monitor, before = monitor_at(NOW), ahead_total("churn")
    with capture_logs() as logs:
        await consume(monitor, dated(10 * 365 * 86_400, seed=1, first_offset=0))  # ten years ahead
        await consume(monitor, dated(0, seed=2, first_offset=2))  # on time, after it
        await consume(monitor, dated(20 * 365 * 86_400, seed=3, first_offset=4))  # again: one warning
    live = monitor.live
    assert live.cache.rows == 300
    live.closed.clear()  # the windows judged (each request filled one)

    # An hour past the label wait and the skew allowed (300 s), every prediction left, those from the future
    # with them, and a restart would replay from the next record, not from the first one dated ahead.
    store = Store()
    await handlers.housekeeping(
        NOW + WAIT + 3_600,
        monitor=monitor,
        store=store,  # type: ignore[arg-type]
        tally=Tally(),
    )
    assert live.cache.rows == 0
    assert store.offsets[TOPIC] == {0: 6}
    # Counted, and named in a warning once per model.
    assert ahead_total("churn") == before + 200
    [warning] = warnings_of(logs)
    assert (warning["model"], warning["rows"], warning["max_clock_skew_seconds"]) == ("churn", 100, 300.0)


async def test_predictions_within_the_skew_allowed_are_held_by_their_own_date() -> None:
    monitor, before = monitor_at(NOW), ahead_total("churn")
    await consume(monitor, dated(120, seed=1, first_offset=0))  # two minutes ahead: a clock a little off
    assert ahead_total("churn") == before
    monitor.live.closed.clear()
    monitor.live.cache.evict(NOW + 121 + WAIT - 1)
    assert monitor.live.cache.rows == 100  # held the label wait from its own date
    monitor.live.cache.evict(NOW + 121 + WAIT + 1)
    assert monitor.live.cache.rows == 0


async def test_a_prediction_dated_a_year_ahead_is_windowed_as_if_dated_the_skew_allowed_ahead() -> None:
    # Windows close by event time, window_seconds after their first request. A request dated a year ahead (a
    # serving replica's broken clock, a hand-published event) opened a window that no request on time could
    # close by time: it took every request of its version until window_rows (or an idle spell), and its
    # time range, the DriftDetected's, ran a year ahead. It is windowed as if dated max_clock_skew_seconds
    # ahead of when it came (Postgres' clock), and counted as before; its rows keep their date.
    settings = MonitoringSettings(label_wait_seconds=WAIT, window_rows=5_000, min_window_rows=10)
    monitor = make_monitor(settings, artifacts=None, source="/t")
    monitor.live.add_reference(reference())
    monitor.clock = lambda: NOW
    skew, window_s, year = monitor.live.cache.max_ahead_s, settings.window_seconds, 365 * 86_400.0
    before = ahead_total("churn")

    await consume(monitor, dated(year, seed=1, first_offset=0))  # two requests, a year ahead
    await consume(monitor, dated(0, seed=2, first_offset=2))  # on time
    assert not monitor.live.closed
    # A request on time, past the window's time from the first one's date as allowed (NOW + skew), closes it.
    monitor.clock = lambda: NOW + skew + window_s
    await consume(monitor, dated(skew + window_s, seed=3, first_offset=4))

    [closed] = monitor.live.closed
    assert closed.size == 200
    assert (closed.start, closed.end) == (NOW, NOW + skew)  # not a year ahead
    assert float(closed.predicted_at.max()) == NOW + year + 1  # the rows keep their date as sent
    assert ahead_total("churn") == before + 100
