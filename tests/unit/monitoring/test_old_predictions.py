"""A prediction dated further back than ``label_wait_seconds`` when monitoring consumes it (a backlog caught
up, a serving replica's clock behind) is in its drift window as any, and joins the labels already waiting for
it (in Postgres), but is not held for labels that come later: they are as late as a label for a prediction
older than the label wait, and expire as unmatched. Such rows are counted and a warning names the model once.
Before, the rule held by chance: the prediction left the label cache at the next tick, and with it the join
of a label whose transaction was still open as the prediction came."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background, make_monitor
from services.monitoring.handlers import Monitor
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_domain import reference
from tests.unit.monitoring.test_pending_labels import (
    Runtime,
    Tables,
    consume_prediction,
    labels,
    receive_label,
    send_label,
)

PREDICTED_AT = datetime(2026, 11, 28, 7, tzinfo=UTC)  # the date of every prediction logged()
LATE = (PREDICTED_AT + timedelta(days=2)).timestamp()  # monitoring's clock: two days later, past the wait


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> Monitor:
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    monkeypatch.setattr("time.time", lambda: LATE)
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/t")
    monitor.live.add_reference(reference())
    return monitor


def past_wait(model: str) -> float:
    sample = "driftloop_monitoring_predictions_past_label_wait_total"
    return REGISTRY.get_sample_value(sample, {"model": model}) or 0.0


def warnings_of(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["log_level"] == "warning" and "label wait" in e["event"]]


async def test_a_label_waiting_for_an_old_prediction_joins_it_though_its_transaction_was_open(
    monitor: Monitor,
) -> None:
    tables = Tables()
    background = Background(Runtime(tables), monitor, tick_s=1.0)  # type: ignore[arg-type]
    await send_label(monitor, tables, "good-1-0", "churn", 1)  # waiting, committed
    label_tx = tables.begin()
    await receive_label(monitor, label_tx, "good-1-1")  # waiting, its transaction still open
    await consume_prediction(monitor, tables, "good-1")  # two days old

    await background.once()  # the join of good-1-1 misses its label, not committed yet
    assert labels(tables) == {"good-1-0": 1}
    label_tx.commit()
    await background.once()

    assert labels(tables) == {"good-1-0": 1, "good-1-1": 1}
    assert tables.waiting() == set() and monitor.live.joins_due == set()
    await background.once()
    assert monitor.live.cache.rows == 0  # once its joins are made, it leaves


async def test_a_label_that_comes_after_an_old_prediction_waits_and_the_rows_are_counted_once(
    monitor: Monitor,
) -> None:
    tables, before = Tables(), past_wait("churn")
    background = Background(Runtime(tables), monitor, tick_s=1.0)  # type: ignore[arg-type]
    with capture_logs() as logs:
        await consume_prediction(monitor, tables, "good-1", offset=0)
        await consume_prediction(monitor, tables, "good-2", offset=1)
    await background.once()

    await send_label(monitor, tables, "good-1-0", "churn", 1)

    assert tables.labelled == {} and tables.waiting() == {("good-1-0", "churn")}
    assert monitor.live.windows[("churn", 1)].rows == 6  # in the drift window as any
    assert past_wait("churn") == before + 6
    [warning] = warnings_of(logs)
    assert warning["model"] == "churn" and warning["label_wait_seconds"] == monitor.label_wait_seconds
