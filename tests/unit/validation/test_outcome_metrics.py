"""Validation counts each judged candidate by outcome once its report commits: never for a delivery whose
transaction rolls back, and not again for its registration delivered twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from contracts.envelope import CloudEvent, new_event
from contracts.validation import ValidationFailed, ValidationPassed
from services.validation.adapters.evaluator import StoreEvaluator
from services.validation.handlers import on_model_version_registered
from tests.unit.training.data import churn_frame, churn_spec
from tests.unit.validation.test_handlers import FakeChampions, FakeDatasets, FakeReports, FakeVersions, Gate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def validations(outcome: str) -> float:
    labels = {"model": "churn", "outcome": outcome}
    return REGISTRY.get_sample_value("driftloop_validation_validations_total", labels) or 0.0


async def test_each_candidate_is_counted_once_by_its_outcome(tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    passed, failed = validations("passed"), validations("failed")
    good = gate.train(churn_spec(), 1, churn_frame())
    noise = churn_frame(1500, seed=1)
    noise["churned"] = np.random.default_rng(3).integers(0, 2, len(noise))  # labels that are noise

    await gate.register(good)
    await gate.register(good)  # delivered again: judged before, nothing to count
    await gate.register(gate.train(churn_spec(), 2, noise))

    assert len(gate.bus.events(of=ValidationPassed)) == 1
    assert len(gate.bus.events(of=ValidationFailed)) == 1
    assert (validations("passed") - passed, validations("failed") - failed) == (1, 1)


async def test_a_judgement_whose_transaction_does_not_commit_counts_nothing(tmp_path: Path) -> None:
    gate = Gate(tmp_path)
    registered = gate.train(churn_spec(), 1, churn_frame())
    committed: list[Any] = []
    published: list[CloudEvent[Any]] = []

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    before = validations("passed")
    await on_model_version_registered(
        new_event(registered, source="/driftloop/registry"),
        versions=FakeVersions(),
        champions=FakeChampions(),
        datasets=FakeDatasets(),
        reports=FakeReports(),
        evaluator=StoreEvaluator(gate.store, latency_repeats=3),
        publish=publish,
        after_commit=committed.append,
        source="/driftloop/validation",
    )

    [event] = published
    assert isinstance(event.data, ValidationPassed)
    assert validations("passed") == before  # judged, not yet committed
    for callback in committed:
        callback()
    assert validations("passed") == before + 1
