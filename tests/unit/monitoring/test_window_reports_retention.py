"""The retention of window reports and alerts: which a round deletes (past the keep period, never the newest
report of a model version nor the alerts /v1/status lists), how it runs in the background's ticks, and how a
window id names its report. Which rows SQL finds is shown against Postgres (tests/integration/monitoring)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background, make_monitor
from services.monitoring.domain import from_epoch, window_number
from services.monitoring.handlers import (
    Monitor,
    plan_alert_retention,
    plan_report_retention,
    prune_window_reports,
)
from services.monitoring.ports import MonitoringStore
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.fakes import TableRuntime

NOW = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
DAY = 86_400.0


class Reports:
    """``window_reports`` reduced to what the retention asks of it: per model, (version, seq) -> when the
    window was judged; a report goes only when a later one of its version (higher seq, judged no earlier)
    exists, as the SQL's rule."""

    def __init__(
        self, rows: dict[str, dict[tuple[int, int], float]], alerts: dict[str, dict[str, float]] | None = None
    ) -> None:
        self.rows = rows
        self.alerts = alerts or {}  # model -> event id -> recorded (epoch seconds)
        self.fails = False
        self.pruned: list[tuple[str, list[tuple[int, int]]]] = []
        self.through: dict[tuple[str, int], int] = {}

    async def registered_models(self) -> list[str]:
        return sorted(self.rows)

    async def prune_window_reports(
        self, model: str, judged_from: datetime, judged_before: datetime, limit: int
    ) -> tuple[int, datetime | None]:
        if self.fails:
            raise ConnectionError("connection was closed in the middle of operation")
        rows = self.rows.get(model, {})

        def later_exists(version: int, seq: int, at: float) -> bool:
            return any(v == version and s > seq and t >= at for (v, s), t in rows.items())

        found = sorted(
            (at, key)
            for key, at in rows.items()
            if judged_from <= from_epoch(at) < judged_before and later_exists(*key, at)
        )[:limit]
        for _, key in found:
            del rows[key]
            self.through[(model, key[0])] = max(self.through.get((model, key[0]), 0), key[1])
        if found:
            self.pruned.append((model, [key for _, key in found]))
        return len(found), from_epoch(found[-1][0]) if found else None

    async def reports_pruned_through(self, model: str, version: int) -> int | None:
        return self.through.get((model, version))

    async def alerted_models(self) -> list[str]:
        return sorted(self.alerts)

    async def alerts_horizon(self, model: str, keep: int) -> datetime | None:
        newest = sorted(self.alerts[model].values(), reverse=True)
        return from_epoch(newest[keep - 1]) if len(newest) >= keep else None

    async def prune_alerts(
        self, model: str, created_from: datetime, created_before: datetime, limit: int
    ) -> tuple[int, datetime | None]:
        alerts = self.alerts[model]
        found = sorted(
            (at, event_id)
            for event_id, at in alerts.items()
            if created_from <= from_epoch(at) < created_before
        )[:limit]
        for _, event_id in found:
            del alerts[event_id]
        return len(found), from_epoch(found[-1][0]) if found else None


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> Monitor:
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/t")
    monitor.clock = lambda: NOW
    return monitor


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def background(table: Reports, monitor: Monitor, *, batch: int = 10_000) -> Background:
    # The labelled retention of the same tick finds nothing: the fake has no labels.
    monitor.labelled_keep_days = 0
    return Background(
        TableRuntime(table),  # type: ignore[arg-type]
        monitor,
        tick_s=1.0,
        retention_interval_s=600.0,
        retention_batch_rows=batch,
    )


async def test_reports_are_kept_the_keep_period_and_for_ever_at_zero(monitor: Monitor) -> None:
    table = Reports({"churn": {}, "fraud": {}})
    assert monitor.window_reports_keep_days == 90  # the setting's default
    plan = await plan_report_retention(monitor=monitor, store=cast(MonitoringStore, table))
    assert plan == [(model, from_epoch(NOW - 90 * DAY)) for model in ("churn", "fraud")]

    monitor.window_reports_keep_days = 0
    assert await plan_report_retention(monitor=monitor, store=cast(MonitoringStore, table)) == []


@pytest.mark.parametrize("days", [36_500, 1e6, 1e10])
async def test_a_keep_of_a_hundred_years_or_more_keeps_reports_and_alerts_for_ever(
    monitor: Monitor, days: float
) -> None:
    # An operator's "keep everything": counted back from today, 1e6 days is before year 1 (OverflowError at
    # every round), and 1e10 is past timedelta's bound.
    table = Reports({"churn": {}}, {"churn": {"c-0": NOW - 400 * DAY}})
    monitor.window_reports_keep_days = days
    assert await plan_report_retention(monitor=monitor, store=cast(MonitoringStore, table)) == []
    assert await plan_alert_retention(monitor=monitor, store=cast(MonitoringStore, table)) == []


async def test_a_round_deletes_old_reports_but_the_newest_of_every_version(monitor: Monitor) -> None:
    # Nothing deleted window_reports: a row per judged window, for as long as the platform ran.
    old = NOW - 200 * DAY
    table = Reports(
        {
            "churn": {
                (1, 1): old,
                (1, 2): old + 1,
                (1, 3): old + 2,  # version 1's newest: /v1/status and /drift read it however old
                (2, 1): old + 3,
                (2, 2): NOW - DAY,  # within the keep period
                (2, 3): NOW - 1,
            },
            "fraud": {(1, 1): old},  # its only report
        }
    )
    worker = background(table, monitor)
    before = counted("driftloop_monitoring_window_reports_pruned_total")

    for tick in range(3):
        await worker.prune_window_reports(NOW + tick)

    assert table.pruned == [("churn", [(1, 1), (1, 2), (2, 1)])]
    assert table.rows == {
        "churn": {(1, 3): old + 2, (2, 2): NOW - DAY, (2, 3): NOW - 1},
        "fraud": {(1, 1): old},
    }
    assert counted("driftloop_monitoring_window_reports_pruned_total") - before == 3
    assert await table.reports_pruned_through("churn", 1) == 2
    assert await table.reports_pruned_through("churn", 2) == 1
    assert await table.reports_pruned_through("fraud", 1) is None


async def test_a_round_deletes_a_batch_per_tick_and_starts_again_after_the_interval(monitor: Monitor) -> None:
    old = NOW - 200 * DAY
    table = Reports({"churn": {(1, seq): old + seq for seq in range(1, 7)}})  # 1 to 5 may go
    worker = background(table, monitor, batch=2)

    for tick in range(4):
        await worker.prune_window_reports(NOW + tick)
    # Two a tick, each batch from where the one before stopped; a batch short of the limit ends the model.
    assert table.pruned == [("churn", [(1, 1), (1, 2)]), ("churn", [(1, 3), (1, 4)]), ("churn", [(1, 5)])]
    assert list(table.rows["churn"]) == [(1, 6)]
    assert worker.reports_retention.due == NOW + 2 + 600.0

    table.rows["churn"].update({(1, 7): old + 7, (1, 8): old + 8})
    await worker.prune_window_reports(NOW + 10)  # the next round is not due yet
    assert (1, 7) in table.rows["churn"]
    await worker.prune_window_reports(NOW + 605)
    assert list(table.rows["churn"]) == [(1, 8)]


async def test_the_batch_function_says_where_the_next_batch_starts_only_after_a_full_one(
    monitor: Monitor,
) -> None:
    old = NOW - 200 * DAY
    table = Reports({"churn": {(1, 1): old, (1, 2): old, (1, 3): old + 1}})
    store, before = cast(MonitoringStore, table), from_epoch(NOW - 90 * DAY)
    # Judged at the same time, two reports may straddle two batches: the next starts at the same time.
    assert await prune_window_reports("churn", before, store=store, limit=1) == (1, from_epoch(old))
    assert await prune_window_reports("churn", before, judged_from=from_epoch(old), store=store, limit=1) == (
        1,
        from_epoch(old),
    )
    assert await prune_window_reports("churn", before, judged_from=from_epoch(old), store=store, limit=1) == (
        0,
        None,
    )
    assert list(table.rows["churn"]) == [(1, 3)]


async def test_a_failed_batch_is_a_warning_counted_and_the_round_tried_again_after_the_interval(
    monitor: Monitor,
) -> None:
    old = NOW - 200 * DAY
    table = Reports({"churn": {(1, 1): old, (1, 2): old + 1}})
    worker = background(table, monitor)
    failures = counted("driftloop_monitoring_window_reports_pruning_failures_total")

    table.fails = True
    with capture_logs() as logs:
        await worker.prune_window_reports(NOW)  # never raised: the tick's other work goes on
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "window reports retention failed, trying again later"
    ]
    assert counted("driftloop_monitoring_window_reports_pruning_failures_total") - failures == 1
    assert len(table.rows["churn"]) == 2

    table.fails = False
    await worker.prune_window_reports(NOW + 1)  # not before the next round
    assert len(table.rows["churn"]) == 2
    await worker.prune_window_reports(NOW + 600)
    assert list(table.rows["churn"]) == [(1, 2)]


async def test_a_tick_runs_both_retentions(monitor: Monitor, monkeypatch: pytest.MonkeyPatch) -> None:
    worker = background(Reports({}), monitor)
    ran: list[str] = []

    async def nothing(*_: Any) -> None:
        return None

    for task in ("judge_closed", "join_due", "read_clock", "decide_canaries", "housekeeping"):
        monkeypatch.setattr(worker, task, nothing)

    async def batch(retention: Any, now: float) -> None:
        ran.append(retention.name)

    monkeypatch.setattr(worker, "retention_batch", batch)
    await worker.once()
    assert ran == ["labelled", "window reports", "alerts"]


async def test_old_alerts_go_but_the_newest_the_status_lists_of_each_model(monitor: Monitor) -> None:
    # Nothing deleted alerts either: a row per alert published (a cooldown of 0 makes one per window).
    old = NOW - 200 * DAY
    churn = {f"c-{i:02d}": old + i for i in range(12)}  # all past the keep period: the 10 newest stay
    fraud = {f"f-{i}": old + i for i in range(3)} | {f"f-new-{i}": NOW - i for i in range(10)}
    table = Reports({}, {"churn": churn, "fraud": fraud, "loan": {"l-0": old}})
    worker = background(table, monitor)
    before = counted("driftloop_monitoring_alerts_pruned_total")

    for tick in range(3):
        await worker.prune_alerts(NOW + tick)

    assert sorted(table.alerts["churn"]) == [f"c-{i:02d}" for i in range(2, 12)]
    assert sorted(table.alerts["fraud"]) == sorted(f"f-new-{i}" for i in range(10))
    assert table.alerts["loan"] == {"l-0": old}
    assert counted("driftloop_monitoring_alerts_pruned_total") - before == 5

    monitor.window_reports_keep_days = 0  # kept for ever, as the reports
    assert await plan_alert_retention(monitor=monitor, store=cast(MonitoringStore, table)) == []


def test_a_window_id_names_its_version_and_number() -> None:
    assert window_number("churn", "churn:2:000041") == (2, 41)
    assert window_number("churn", "churn:2:1234567") == (2, 1_234_567)
    for other in ("fraud:2:000041", "churn:2", "churn:x:1", "churn:2:1:1", "churn:²:1", "churn:2:9999999999"):
        assert window_number("churn", other) is None
