"""Labels waiting for their prediction are bounded: the bus does not authenticate a publisher, and a label
feed for predictions monitoring never sees (made-up model names, or ids) held ~0.5 KB of memory and a Postgres
row per label for the whole label wait, with no count limit. A label naming a model with no version registered
is counted and skipped, as its predictions are; past ``max_pending_labels`` waiting, the labels waiting
longest are given up as unmatched, as if their wait had ended. Either way the label is counted, never
silently dropped."""

from __future__ import annotations

from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from services.monitoring.bootstrap import Background
from services.monitoring.handlers import Monitor
from tests.unit.monitoring.test_pending_labels import (
    Runtime,
    Tables,
    consume_prediction,
    labels,
    monitor,
    send_label,
)

__all__ = ["monitor"]  # the fixture


def not_kept(reason: str) -> float:
    labels = {"reason": reason}
    return REGISTRY.get_sample_value("driftloop_monitoring_labels_not_kept_total", labels) or 0.0


async def test_labels_for_models_never_registered_are_counted_and_not_kept(monitor: Monitor) -> None:
    tables = Tables()
    before = not_kept("unknown-model")
    with capture_logs() as logs:
        for i in range(200):  # a flood of made-up names, a few labels each
            await send_label(monitor, tables, f"p-{i}", f"made-up-{i % 50}", 1)

    assert tables.waiting() == set() and monitor.live.pending_labels == set()
    assert not_kept("unknown-model") - before == 200
    warned = [e for e in logs if e["event"] == "labels for an unknown model are counted and skipped"]
    assert sorted(e["model"] for e in warned) == sorted(f"made-up-{i}" for i in range(50))  # once per model


async def test_waiting_labels_past_the_bound_are_given_up_oldest_first(monitor: Monitor) -> None:
    monitor.max_pending_labels = 5
    tables = Tables()
    before = not_kept("too-many-waiting")
    with capture_logs() as logs:
        for i in range(40):  # distinct ids of a registered model, whose predictions never come
            await send_label(monitor, tables, f"never-{i}-0", "churn", 1)
        await send_label(monitor, tables, "good-1-0", "churn", 0)  # the latest: its prediction comes
        await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    newest = {(f"never-{i}-0", "churn") for i in range(36, 40)} | {("good-1-0", "churn")}
    assert tables.waiting() == newest and monitor.live.pending_labels == newest
    assert tables.unmatched == {"churn": 36}  # as labels whose wait ended
    assert not_kept("too-many-waiting") - before == 36
    warned = [e for e in logs if e["event"].startswith("too many labels waiting for their prediction")]
    assert [(e["given_up"], e["max_pending_labels"]) for e in warned] == [(36, 5)]

    # A label kept joins its prediction as ever.
    await consume_prediction(monitor, tables, "good-1")
    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]
    assert labels(tables) == {"good-1-0": 0}


async def test_waiting_labels_within_the_bound_are_all_kept(monitor: Monitor) -> None:
    monitor.max_pending_labels = 5
    tables = Tables()
    before = not_kept("too-many-waiting")
    for i in range(5):
        await send_label(monitor, tables, f"soon-{i}-0", "churn", 1)
    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert len(tables.waiting()) == 5 and tables.unmatched == {}
    assert not_kept("too-many-waiting") == before
