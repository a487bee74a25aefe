"""The joined labels' retention: which rows may go (the part decided in Python: how long at least, what memory
still holds, what the window exports read) and how a round runs in the background's ticks. Which rows SQL
finds is shown against Postgres (tests/integration/monitoring)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background, make_monitor
from services.monitoring.domain import LABELLED_MARGIN, from_epoch, labelled_keep
from services.monitoring.handlers import Monitor, plan_labelled_retention, prune_labelled
from services.monitoring.ports import MonitoringStore
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.fakes import TableRuntime
from tests.unit.monitoring.test_domain import reference
from tests.unit.monitoring.test_ingest_failures import logged

NOW = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
DAY = 86_400.0


class Labelled:
    """``labelled`` reduced to what the retention asks of it: per model, ids with when their label was
    received, all of them counted into a performance window and of no rollout step (SQL's part)."""

    def __init__(
        self, rows: dict[str, dict[str, float]], *, exported: dict[str, datetime] | None = None
    ) -> None:
        self.rows = rows  # model -> prediction id -> received (epoch seconds)
        self.exported = exported or {}  # model -> export_horizon; a model not named has fewer rows
        self.fails = False
        self.pruned: list[tuple[str, list[str]]] = []

    async def registered_models(self) -> list[str]:
        return sorted(self.rows)

    async def export_horizon(self, model: str, rows: int) -> datetime | None:
        return self.exported.get(model)

    async def prunable_labels(
        self, model: str, received_from: datetime, received_before: datetime, limit: int
    ) -> list[tuple[str, datetime]]:
        if self.fails:
            raise ConnectionError("connection was closed in the middle of operation")
        rows = sorted((from_epoch(at), pid) for pid, at in self.rows.get(model, {}).items())
        return [(pid, at) for at, pid in rows if received_from <= at < received_before][:limit]

    async def prune_labels(self, model: str, prediction_ids: list[str], received_before: datetime) -> int:
        if prediction_ids:
            self.pruned.append((model, list(prediction_ids)))
        for pid in prediction_ids:
            del self.rows[model][pid]
        return len(prediction_ids)


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> Monitor:
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/t")
    monitor.live.add_reference(reference())
    monitor.clock = lambda: NOW
    return monitor


def counted(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_a_row_is_kept_the_keep_period_but_never_less_than_a_label_may_still_reach_it() -> None:
    assert labelled_keep(30, DAY, 300) == timedelta(days=30)
    # A label waits up to the label wait for its prediction, which is then held up to the wait again (dated at
    # most the skew ahead): a correction or a shadow's scoring may reach the row until then.
    assert labelled_keep(1, DAY, 300) == timedelta(days=2, seconds=300) + LABELLED_MARGIN
    assert labelled_keep(0, DAY, 300) is None
    # A hundred years or more: for ever too (1e10 days was past timedelta's bound, an OverflowError).
    assert labelled_keep(36_500, DAY, 300) is None and labelled_keep(1e10, DAY, 300) is None


async def test_rows_go_only_past_the_keep_period_and_before_what_the_window_exports_read(
    monitor: Monitor,
) -> None:
    exported = from_epoch(NOW - 40 * DAY)
    table = Labelled({"churn": {}, "fraud": {}, "loan": {}}, exported={"churn": exported, "fraud": exported})
    monitor.export_labelled_rows = 50_000
    monitor.labelled_keep_days = 30
    plan = await plan_labelled_retention(monitor=monitor, store=cast(MonitoringStore, table))
    # churn: its export reads back 40 days, past the keep period; loan has no more rows than an export reads.
    assert plan == [("churn", exported), ("fraud", exported)]

    monitor.labelled_keep_days = 0
    assert await plan_labelled_retention(monitor=monitor, store=cast(MonitoringStore, table)) == []

    monitor.labelled_keep_days, monitor.export_labelled_rows = 30, 0  # no export: the keep period alone
    plan = await plan_labelled_retention(monitor=monitor, store=cast(MonitoringStore, table))
    assert plan == [(model, from_epoch(NOW - 30 * DAY)) for model in ("churn", "fraud", "loan")]


async def test_a_label_memory_still_holds_for_a_join_is_not_deleted(monitor: Monitor) -> None:
    # Its prediction held (a clock far ahead keeps one held past the wait), its label remembered as joined
    # (a shadow's scoring may still come), or a label waiting for its id: deleted, the row would be stored
    # again as a new label, and counted twice.
    live = monitor.live
    live.ingest([(logged("held").data, 0, 0)], arrival=NOW)
    live.labels_joined[("joined", "churn")] = NOW + DAY
    live.pending_labels.add(("waiting", "churn"))
    old = NOW - 60 * DAY
    table = Labelled({"churn": {"held-0": old, "joined": old, "waiting": old, "gone": old}})

    before = from_epoch(NOW - 30 * DAY)
    deleted, next_from = await prune_labelled(
        "churn", before, monitor=monitor, store=cast(MonitoringStore, table), limit=100
    )

    assert (deleted, next_from) == (1, from_epoch(old))
    assert table.pruned == [("churn", ["gone"])]
    assert sorted(table.rows["churn"]) == ["held-0", "joined", "waiting"]
    # The next batch finds only those: the model's part of the round is over.
    assert await prune_labelled(
        "churn",
        before,
        received_from=from_epoch(old),
        monitor=monitor,
        store=cast(MonitoringStore, table),
        limit=100,
    ) == (0, None)


async def test_a_round_deletes_a_batch_per_tick_and_starts_again_after_the_interval(monitor: Monitor) -> None:
    old = NOW - 60 * DAY
    table = Labelled({"churn": {f"p-{i}": old + i for i in range(5)}, "fraud": {"f-0": old}})
    monitor.export_labelled_rows = 0
    background = Background(
        TableRuntime(table),  # type: ignore[arg-type]
        monitor,
        tick_s=1.0,
        retention_interval_s=600.0,
        retention_batch_rows=2,
    )
    before = counted("driftloop_monitoring_labelled_rows_pruned_total")

    for tick in range(6):
        await background.prune_labelled(NOW + tick)
    # Two rows a tick; a batch that deletes nothing (a tick of its own) ends a model's part of the round.
    assert table.pruned == [
        ("churn", ["p-0", "p-1"]),
        ("churn", ["p-2", "p-3"]),  # from where the batch before stopped
        ("churn", ["p-4"]),
        ("fraud", ["f-0"]),
    ]
    assert table.rows == {"churn": {}, "fraud": {}}
    assert counted("driftloop_monitoring_labelled_rows_pruned_total") - before == 6
    assert background.labelled_retention.due == NOW + 5 + 600.0

    table.rows["churn"]["p-late"] = old
    await background.prune_labelled(NOW + 10)  # the next round is not due yet
    assert "p-late" in table.rows["churn"]
    await background.prune_labelled(NOW + 605)
    assert "p-late" not in table.rows["churn"]


async def test_a_failed_batch_is_a_warning_counted_and_the_round_tried_again_after_the_interval(
    monitor: Monitor,
) -> None:
    old = NOW - 60 * DAY
    table = Labelled({"churn": {"p-0": old}})
    monitor.export_labelled_rows = 0
    background = Background(TableRuntime(table), monitor, tick_s=1.0, retention_interval_s=600.0)  # type: ignore[arg-type]
    failures = counted("driftloop_monitoring_labelled_pruning_failures_total")

    table.fails = True
    with capture_logs() as logs:
        await background.prune_labelled(NOW)  # never raised: the tick's other work goes on
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "labelled retention failed, trying again later"
    ]
    assert counted("driftloop_monitoring_labelled_pruning_failures_total") - failures == 1
    assert table.rows["churn"] == {"p-0": old}

    table.fails = False
    await background.prune_labelled(NOW + 1)  # not before the next round
    assert table.rows["churn"] == {"p-0": old}
    await background.prune_labelled(NOW + 600)
    assert table.rows["churn"] == {}


async def test_a_batch_of_rows_all_held_moves_the_round_on_past_them(monitor: Monitor) -> None:
    monitor.live.labels_joined[("joined-0", "churn")] = NOW + DAY
    monitor.live.labels_joined[("joined-1", "churn")] = NOW + DAY
    old = NOW - 60 * DAY
    table = Labelled({"churn": {"joined-0": old, "joined-1": old + 1, "gone": old + 2}})
    store, before = cast(MonitoringStore, table), from_epoch(NOW - 30 * DAY)

    assert await prune_labelled("churn", before, monitor=monitor, store=store, limit=2) == (
        0,
        from_epoch(old + 1),
    )
    deleted, _ = await prune_labelled(
        "churn", before, received_from=from_epoch(old + 1), monitor=monitor, store=store, limit=2
    )
    assert deleted == 1 and sorted(table.rows["churn"]) == ["joined-0", "joined-1"]
