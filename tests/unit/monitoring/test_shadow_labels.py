"""In a shadow rollout serving logs the candidate's scoring of a served row under the served prediction's id
and model, with its own version and variant ``shadow`` (docs/serving.md). A label for that id joins both
predictions: the stable version's and the candidate's, each counted in its own version's performance windows
and canary comparison. Held one per model and id, the shadow prediction (logged later) took the stable one's
place, and the stable version got no labels for the rows its candidate shadowed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from contracts.envelope import CloudEvent, new_event
from contracts.feedback import GroundTruthReceived
from contracts.predictions import PredictionsLogged
from services.monitoring import bootstrap
from services.monitoring.bootstrap import Background, make_monitor
from services.monitoring.handlers import Monitor, on_ground_truth_received, on_predictions_logged
from services.monitoring.live import LiveState, PredictionCache, WindowSettings
from services.monitoring.ports import MonitoringStore, ReplayReport
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_domain import reference
from tests.unit.monitoring.test_pending_labels import (
    NOW,
    Runtime,
    Tables,
    corrections,
    delivery,
    joins_given_up,
    nothing,
    receive_label,
    tally_of,
)

STABLE, CANDIDATE = 1, 2


def served(request_id: str, version: int, variant: str, prediction: int) -> CloudEvent[PredictionsLogged]:
    """A request's three rows as one version logged them (the stable's ids: a shadow scoring keeps them)."""
    rows = [
        {
            "prediction_id": f"{request_id}-{i}",
            "inputs": {"x0": 0.5, "x1": 0.1, "x2": 0.2, "plan": "basic"},
            "output": {"prediction": prediction, "probabilities": {"0": 0.4, "1": 0.6}},
        }
        for i in range(3)
    ]
    payload = {
        "model": "churn",
        "model_version": version,
        "variant": variant,
        "rollout_id": None if variant == "stable" else "ro-1",
        "request_id": request_id,
        "predicted_at": "2026-11-28T07:00:00Z",
        "latency_ms": 1.0,
        "rows": rows,
    }
    return new_event(PredictionsLogged.model_validate(payload), source="/serving")


async def consume(monitor: Monitor, tables: Tables, event: CloudEvent[Any], offset: int) -> None:
    tx = tables.begin()
    await on_predictions_logged(
        [delivery(event, offset)], monitor=monitor, store=cast(MonitoringStore, tx), publish=nothing
    )
    tx.commit()


async def consume_both(monitor: Monitor, tables: Tables) -> None:
    """The stable version answers request r-1; its candidate's shadow scoring of it is logged after."""
    await consume(monitor, tables, served("r-1", STABLE, "stable", prediction=1), 0)
    await consume(monitor, tables, served("r-1", CANDIDATE, "shadow", prediction=0), 1)


async def send_label(monitor: Monitor, tables: Tables, prediction_id: str, label: Any) -> None:
    g = GroundTruthReceived(
        prediction_id=prediction_id, model="churn", label=label, observed_at=datetime.now(UTC)
    )
    tx = tables.begin()
    await on_ground_truth_received(
        [delivery(new_event(g, source="/feedback"), 0)],
        monitor=monitor,
        store=cast(MonitoringStore, tx),
        publish=nothing,
        tally=tally_of(tx),
    )
    tx.commit()


def joined(tables: Tables) -> dict[tuple[str, int], tuple[str, Any, Any]]:
    """The stored joins, by prediction id and version: (variant, prediction, label)."""
    return {
        (row.prediction_id, row.version): (row.variant, row.prediction, row.label)
        for row in tables.labelled.values()
    }


@pytest.fixture
def monitor(monkeypatch: pytest.MonkeyPatch) -> Monitor:
    """Monitoring with churn's stable version 1 and its candidate version 2 registered."""
    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    monkeypatch.setattr("time.time", lambda: NOW)
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/t")
    monitor.live.add_reference(reference())
    monitor.live.add_reference(replace(reference(), version=CANDIDATE))
    return monitor


def test_the_cache_holds_every_versions_prediction_of_one_id() -> None:
    state = LiveState(WindowSettings(), PredictionCache(max_age_s=1e9, max_rows=10**6))
    state.add_reference(reference())
    state.add_reference(replace(reference(), version=CANDIDATE))
    for offset, event in enumerate(
        [served("r-1", STABLE, "stable", prediction=1), served("r-1", CANDIDATE, "shadow", prediction=0)]
    ):
        state.ingest([(event.data, 0, offset)], arrival=0.0)

    held = state.cache.predictions("churn", "r-1-0")
    assert [(h.version, h.variant, h.prediction) for h in held] == [(1, "stable", 1), (2, "shadow", 0)]
    assert state.cache.predictions("fraud", "r-1-0") == []
    assert state.cache.evict(now=1e12) == 6 and state.cache.predictions("churn", "r-1-0") == []


async def test_a_label_joins_the_stable_and_the_shadow_prediction_of_its_id(monitor: Monitor) -> None:
    tables = Tables()
    await consume_both(monitor, tables)

    await send_label(monitor, tables, "r-1-0", 1)

    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1), ("r-1-0", CANDIDATE): ("shadow", 0, 1)}


async def test_a_waiting_label_joins_the_stable_and_the_shadow_prediction_of_its_id(monitor: Monitor) -> None:
    tables = Tables()
    await send_label(monitor, tables, "r-1-0", 1)  # before either prediction: it waits
    await consume_both(monitor, tables)

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1), ("r-1-0", CANDIDATE): ("shadow", 0, 1)}
    assert tables.waiting() == set() and monitor.live.pending_labels == set()


async def test_a_label_sent_again_changes_neither_join_and_a_correction_changes_both_counted_once(
    monitor: Monitor,
) -> None:
    tables = Tables()
    await consume_both(monitor, tables)
    before = corrections("churn")
    await send_label(monitor, tables, "r-1-0", 0)
    await send_label(monitor, tables, "r-1-0", 0)  # redelivered, or sent again
    assert corrections("churn") == before
    assert len(tables.labelled) == 2

    await send_label(monitor, tables, "r-1-0", 1)  # a correction: one label, counted once

    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1), ("r-1-0", CANDIDATE): ("shadow", 0, 1)}
    assert corrections("churn") == before + 1


async def test_each_versions_performance_windows_count_the_label(monitor: Monitor) -> None:
    monitor.performance_window_labels = 3
    tables = Tables()
    await consume_both(monitor, tables)

    for i in range(3):
        await send_label(monitor, tables, f"r-1-{i}", 1)

    # One window per version, each of its own three rows (scoring the stable's did not take the candidate's).
    assert sorted(tables.windows) == [
        (1, [("r-1-0", "churn", STABLE), ("r-1-1", "churn", STABLE), ("r-1-2", "churn", STABLE)]),
        (1, [("r-1-0", "churn", CANDIDATE), ("r-1-1", "churn", CANDIDATE), ("r-1-2", "churn", CANDIDATE)]),
    ]


def outside_classes_counted(version: int) -> float:
    sample = "driftloop_monitoring_labels_outside_classes_total"
    return REGISTRY.get_sample_value(sample, {"model": "churn", "version": str(version)}) or 0.0


async def test_a_label_joined_before_the_shadow_prediction_was_consumed_joins_it_at_the_next_tick(
    monitor: Monitor,
) -> None:
    # Monitoring catching up on a backlog: the label is consumed after the stable prediction and before the
    # candidate's shadow scoring of it. It joined the stable one at once; the shadow's got none.
    tables = Tables()
    await consume(monitor, tables, served("r-1", STABLE, "stable", prediction=1), 0)
    await send_label(monitor, tables, "r-1-0", 1)
    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1)}
    await consume(monitor, tables, served("r-1", CANDIDATE, "shadow", prediction=0), 1)

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1), ("r-1-0", CANDIDATE): ("shadow", 0, 1)}
    assert monitor.live.joins_due == set()  # made once: the next tick has nothing to join


async def test_a_shadow_join_given_up_says_the_label_stays_joined_to_the_stable_prediction(
    monitor: Monitor,
) -> None:
    # The label joined the stable prediction; joining it to the candidate's shadow scoring, consumed after,
    # fails for good. The log said the label "expires as unmatched": it waits for nothing, and stays joined.
    tables = Tables()
    await consume(monitor, tables, served("r-1", STABLE, "stable", prediction=1), 0)
    await send_label(monitor, tables, "r-1-0", 1)
    await consume(monitor, tables, served("r-1", CANDIDATE, "shadow", prediction=0), 1)
    tables.joins_fail = True
    before = joins_given_up("churn")

    with capture_logs() as logs:
        await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1)} and tables.waiting() == set()
    assert joins_given_up("churn") == before + 1
    [given_up] = [e for e in logs if e["event"].startswith("label join given up")]
    assert "unmatched" not in given_up["event"]
    assert "keep" in given_up["event"] and given_up["label"] == "joined before"
    assert given_up["prediction_id"] == "r-1-0" and given_up["model"] == "churn"


async def test_a_waiting_label_joined_to_the_stable_prediction_joins_the_shadow_consumed_after(
    monitor: Monitor,
) -> None:
    tables = Tables()
    background = Background(Runtime(tables), monitor, tick_s=1.0)  # type: ignore[arg-type]
    await send_label(monitor, tables, "r-1-0", 1)  # before either prediction: it waits
    await consume(monitor, tables, served("r-1", STABLE, "stable", prediction=1), 0)
    await background.once()
    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1)} and tables.waiting() == set()

    await consume(monitor, tables, served("r-1", CANDIDATE, "shadow", prediction=0), 1)
    await background.once()

    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1), ("r-1-0", CANDIDATE): ("shadow", 0, 1)}
    assert tables.waiting() == set() and tables.unmatched == Counter()


async def test_the_shadow_joins_the_latest_label_of_its_id_once_and_counts_it_once(monitor: Monitor) -> None:
    tables = Tables()
    background = Background(Runtime(tables), monitor, tick_s=1.0)  # type: ignore[arg-type]
    await consume(monitor, tables, served("r-1", STABLE, "stable", prediction=1), 0)
    await send_label(monitor, tables, "r-1-0", 1)
    await send_label(monitor, tables, "r-1-0", "yes")  # a correction, to a label naming no class
    stable, candidate = outside_classes_counted(STABLE), outside_classes_counted(CANDIDATE)
    before = corrections("churn")

    await consume(monitor, tables, served("r-1", CANDIDATE, "shadow", prediction=0), 1)
    await background.once()
    monitor.live.joins_due.add(("r-1-0", "churn"))  # due again (a replay of the shadow's poll)
    await background.once()

    assert joined(tables) == {
        ("r-1-0", STABLE): ("stable", 1, "yes"),
        ("r-1-0", CANDIDATE): ("shadow", 0, "yes"),
    }
    # The candidate's row counted once; the stable one's not again; no correction.
    assert outside_classes_counted(CANDIDATE) == candidate + 1
    assert outside_classes_counted(STABLE) == stable
    assert corrections("churn") == before


async def test_a_shadow_consumed_while_its_labels_transaction_is_open_is_joined_once_it_commits(
    monitor: Monitor,
) -> None:
    tables = Tables()
    await consume(monitor, tables, served("r-1", STABLE, "stable", prediction=1), 0)
    label_tx = tables.begin()
    await receive_label(monitor, label_tx, "r-1-0")  # joined at once, not committed yet
    await consume(monitor, tables, served("r-1", CANDIDATE, "shadow", prediction=0), 1)  # meanwhile
    label_tx.commit()

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1), ("r-1-0", CANDIDATE): ("shadow", 0, 1)}


async def test_after_a_restart_a_label_joined_before_it_joins_the_shadow_prediction(
    monitor: Monitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stop came after the label joined the stable prediction and before the shadow's was joined: memory
    # is rebuilt from Postgres (the labels joined within the label wait) and the predictions topic.
    tables = Tables()
    await consume(monitor, tables, served("r-1", STABLE, "stable", prediction=1), 0)
    await send_label(monitor, tables, "r-1-0", 1)
    restarted = make_monitor(MonitoringSettings(), artifacts=None, source="/t")
    restarted.live.add_reference(reference())
    restarted.live.add_reference(replace(reference(), version=CANDIDATE))

    async def replay(*_: Any, feed: Callable[[Any], Any], **__: Any) -> ReplayReport:
        feed([(served("r-1", STABLE, "stable", prediction=1).data, 0, 0)])
        feed([(served("r-1", CANDIDATE, "shadow", prediction=0).data, 0, 1)])
        return ReplayReport(records=2)

    monkeypatch.setattr(bootstrap, "replay_predictions", replay)
    rt = Runtime(tables)
    await bootstrap.restore(rt, restarted)  # type: ignore[arg-type]
    await Background(rt, restarted, tick_s=1.0).once()  # type: ignore[arg-type]

    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1), ("r-1-0", CANDIDATE): ("shadow", 0, 1)}


async def test_a_joined_label_is_forgotten_after_the_label_wait(monitor: Monitor) -> None:
    # A prediction of its id consumed more than label_wait_seconds after the label came is not joined with
    # it, as a label that comes that long after its prediction is not.
    tables = Tables()
    await consume(monitor, tables, served("r-1", STABLE, "stable", prediction=1), 0)
    await send_label(monitor, tables, "r-1-0", 1)
    assert ("r-1-0", "churn") in monitor.live.labels_joined

    monitor.live.forget_joined(monitor.clock() + monitor.label_wait_seconds + 1)

    assert monitor.live.labels_joined == {}


def test_joined_labels_remembered_are_bounded_the_oldest_forgotten_first() -> None:
    state = LiveState(WindowSettings(), PredictionCache(max_age_s=1e9, max_rows=10**6))
    state.add_reference(replace(reference(), version=CANDIDATE))
    state.remember_joined(
        [
            (("r-1-0", "churn"), 10.0, False),
            (("r-1-1", "churn"), 20.0, False),
            (("r-1-2", "churn"), 30.0, False),
        ],
        bound=2,
    )

    result = state.ingest([(served("r-1", CANDIDATE, "shadow", prediction=0).data, 0, 0)], arrival=0.0)

    assert sorted(result.pending_matches) == [("r-1-1", "churn"), ("r-1-2", "churn")]
    state.forget_joined(now=25.0)
    assert list(state.labels_joined) == [("r-1-2", "churn")]


def test_a_served_batch_looks_only_for_the_labels_that_joined_a_shadows_prediction() -> None:
    # Only a served row and its shadow share an id across versions: a served batch with the id of a label
    # that joined only served rows (a client reusing ids, or a replay after a restart) has no join to make,
    # and asks nothing of Postgres.
    state = LiveState(WindowSettings(), PredictionCache(max_age_s=1e9, max_rows=10**6))
    state.add_reference(reference())
    state.remember_joined([(("r-1-0", "churn"), 10.0, False), (("r-1-1", "churn"), 10.0, True)], bound=10)

    # A later label for r-1-1 (a correction) joined only the stable prediction; its rows hold a shadow's.
    state.remember_joined([(("r-1-1", "churn"), 20.0, False)], bound=10)

    result = state.ingest([(served("r-1", STABLE, "stable", prediction=1).data, 0, 0)], arrival=0.0)

    assert result.pending_matches == [("r-1-1", "churn")]


async def test_another_versions_served_prediction_reusing_a_labelled_id_is_not_joined_with_its_label(
    monitor: Monitor,
) -> None:
    # Only a served row and its shadow share an id across versions. A client reusing the id for another
    # request answered by another version (the candidate promoted meanwhile) asks of another truth.
    tables = Tables()
    await consume(monitor, tables, served("r-1", STABLE, "stable", prediction=1), 0)
    await send_label(monitor, tables, "r-1-0", 1)
    await consume(monitor, tables, served("r-1", CANDIDATE, "stable", prediction=0), 1)

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1)}
    assert monitor.live.joins_due == set()


async def test_a_label_joined_to_the_shadow_first_joins_the_served_prediction_consumed_after(
    monitor: Monitor,
) -> None:
    tables = Tables()
    await consume(monitor, tables, served("r-1", CANDIDATE, "shadow", prediction=0), 0)
    await send_label(monitor, tables, "r-1-0", 1)
    await consume(monitor, tables, served("r-1", STABLE, "stable", prediction=1), 1)

    await Background(Runtime(tables), monitor, tick_s=1.0).once()  # type: ignore[arg-type]

    assert joined(tables) == {("r-1-0", STABLE): ("stable", 1, 1), ("r-1-0", CANDIDATE): ("shadow", 0, 1)}
