"""Monitoring's warnings given once per model (or once a minute per model version) remember at most
``WARNED_KEYS_KEPT`` keys, and ``/v1/status`` lists at most ``UNKNOWN_VERSIONS_LISTED`` unknown (model,
version) pairs: the names come from events, which the bus takes from any publisher, and each was remembered
for the life of the process, one entry per made-up name (~330 bytes each for 128-character names, measured
with tracemalloc). The first warning about a name is still given, and a name seen all along is not warned
about again."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from contracts.predictions import PredictionsLogged
from services.monitoring import handlers
from services.monitoring.domain import epoch
from services.monitoring.handlers import Monitor, Tally
from services.monitoring.live import UNKNOWN_VERSIONS_LISTED, WARNED_KEYS_KEPT, Warned
from services.monitoring.ports import LabelledRecord
from tests.unit.monitoring.test_clock_skew import consume, monitor_at
from tests.unit.monitoring.test_domain import T0, reference, requests

NOW = epoch(T0)
HOSTILE = WARNED_KEYS_KEPT + 500


def named(model: str, version: int = 1, *, start: datetime = T0) -> PredictionsLogged:
    """One request of one row of ``model``'s ``version``, dated ``start``."""
    payload = requests(1, seed=1, per_request=1, start=start)[0][0]
    return payload.model_copy(update={"model": model, "model_version": version})


async def feed(monitor: Monitor, payloads: Sequence[PredictionsLogged], *, first_offset: int = 0) -> None:
    """The payloads in polls of 100, at consecutive offsets of partition 0."""
    for i in range(0, len(payloads), 100):
        await consume(monitor, [(p, 0, first_offset + i + j) for j, p in enumerate(payloads[i : i + 100])])


def warnings_of(logs: Sequence[Mapping[str, Any]], words: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["log_level"] == "warning" and words in e["event"]]


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """The names of the models the hostile flood below registers (their series removed afterwards)."""
    names = [f"made-up-{i}" for i in range(HOSTILE)]
    yield names
    for counter in (handlers.PREDICTIONS_AHEAD, handlers.PREDICTIONS_PAST_LABEL_WAIT):
        for name in names:
            try:
                counter.remove(name)
            except KeyError:
                continue


def registering(monitor: Monitor, names: Sequence[str]) -> None:
    ref = reference()
    for name in names:
        monitor.live.add_reference(dataclasses.replace(ref, model=name))


async def test_predictions_of_made_up_models_are_logged_once_each_in_bounded_memory() -> None:
    monitor = monitor_at(NOW)  # churn version 1 registered
    live = monitor.live
    with capture_logs() as logs:
        await feed(monitor, [named("typo-model", 3)])
        await feed(
            monitor,
            [named(f"made-up-{i}", i % 3 + 1) for i in range(HOSTILE)] + [named("typo-model", 3)],
            first_offset=1,
        )
    warned = warnings_of(logs, "unknown model")
    # The first of each model is logged (its versions named), and the model seen first is never logged again.
    assert warned[0]["model"] == "typo-model" and warned[0]["versions"] == [3]
    assert [w["model"] for w in warned[1:]] == [f"made-up-{i}" for i in range(HOSTILE)]
    assert warned[-1]["versions"] == [(HOSTILE - 1) % 3 + 1]
    assert len(live.unknown_models_logged) == WARNED_KEYS_KEPT
    # The first pairs are listed with their rows; the rest are counted together, none lost.
    assert len(live.unknown) == UNKNOWN_VERSIONS_LISTED
    unknown, registered_since = live.skipped_rows()
    assert unknown[0] == {"model": "made-up-0", "version": 1, "rows_skipped": 1} and not registered_since
    assert {"model": "typo-model", "version": 3, "rows_skipped": 2} in unknown
    assert sum(e["rows_skipped"] for e in unknown) + live.unknown_rows_not_listed == HOSTILE + 2
    assert live.unknown_rows_not_listed == HOSTILE + 1 - UNKNOWN_VERSIONS_LISTED


async def test_predictions_ahead_of_the_clock_are_warned_about_once_per_model_in_bounded_memory(
    registered: list[str],
) -> None:
    monitor = monitor_at(NOW)
    registering(monitor, registered)
    years_ahead = T0 + timedelta(days=3_650)
    with capture_logs() as logs:
        await feed(monitor, [named(name, start=years_ahead) for name in registered])
        await feed(monitor, [named(registered[-1], start=years_ahead)], first_offset=HOSTILE)
    warned = warnings_of(logs, "ahead of monitoring's clock")
    # The first of each (a poll's in the order of their names), the last one's second not again.
    assert sorted(w["model"] for w in warned) == sorted(registered)
    assert len(monitor.ahead_of_clock_warned) == WARNED_KEYS_KEPT
    assert registered[-1] in monitor.ahead_of_clock_warned
    assert registered[0] not in monitor.ahead_of_clock_warned


async def test_predictions_past_the_label_wait_are_warned_about_once_per_model_in_bounded_memory(
    registered: list[str],
) -> None:
    monitor = monitor_at(NOW + 10 * 86_400)  # the label wait is an hour
    registering(monitor, registered)
    with capture_logs() as logs:
        await feed(monitor, [named(name) for name in registered])
        await feed(monitor, [named(registered[-1])], first_offset=HOSTILE)
    warned = warnings_of(logs, "further back than the label wait")
    assert sorted(w["model"] for w in warned) == sorted(registered)
    assert len(monitor.past_label_wait_warned) == WARNED_KEYS_KEPT


def labelled(model: str, version: int, label: Any) -> LabelledRecord:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return LabelledRecord(
        prediction_id=f"p-{model}-{version}",
        model=model,
        version=version,
        variant="stable",
        rollout_id=None,
        predicted_at=at,
        prediction=1,
        score=0.7,
        label=label,
        observed_at=at,
        late=False,
        inputs={},
    )


def test_labels_outside_the_classes_are_warned_about_once_a_minute_per_version_in_bounded_memory(
    registered: list[str],
) -> None:
    monitor = monitor_at(NOW)
    registering(monitor, registered)
    with capture_logs() as logs:
        handlers._mark_outside_classes([labelled(name, 1, "yes") for name in registered], monitor, Tally())
        # The last version again within the minute: not warned about again; a minute later, it is.
        handlers._mark_outside_classes([labelled(registered[-1], 1, "yes")], monitor, Tally())
        monitor.clock = lambda: NOW + handlers.OUTSIDE_CLASSES_WARNING_EVERY_S
        handlers._mark_outside_classes([labelled(registered[-1], 1, "yes")], monitor, Tally())
    warned = warnings_of(logs, "no class")
    assert [w["model"] for w in warned] == [*sorted(registered), registered[-1]]
    assert len(monitor.outside_classes_warned) == WARNED_KEYS_KEPT


def test_a_key_seen_lately_is_remembered_before_one_warned_about_long_ago() -> None:
    warned: Warned[str] = Warned(limit=2)
    assert warned.due("churn") and warned.due("fraud")
    assert not warned.due("churn")  # seen again: the least lately seen is now fraud
    assert warned.due("made-up")
    assert "churn" in warned and "fraud" not in warned and len(warned) == 2
