"""The training service as a process on the real broker and database: specs over HTTP, reproducible runs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import pytest

from contracts.commands import RetrainRequested
from contracts.training import ModelSpecRegistered, TrainingCompleted, TrainingRequested
from tests.integration.training.conftest import Stage
from tests.integration.training.harness import ServiceProcess, put_spec
from tests.unit.training.data import churn_frame, churn_spec_data

pytestmark = pytest.mark.timeout(300)

FAST = {"heartbeat_interval_s": "0.5", "stale_after_s": "3", "runner_poll_s": "1", "progress_interval_s": "1"}


@pytest.fixture(scope="module")
async def training(stage: Stage) -> AsyncIterator[ServiceProcess]:
    """One training process for the tests that do not kill it."""
    process = stage.make("training", **FAST)
    process.start()
    await process.ready()
    yield process
    process.stop()


async def test_spec_with_an_unknown_estimator_is_refused_with_422_naming_it(training: ServiceProcess) -> None:
    bad = json.dumps(churn_spec_data("refused", estimator="xgboost"))
    response = await put_spec(training, "refused", bad, "application/json")
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == "estimator" and body["reason"] == "unknown-estimator"
    assert "xgboost" in body["detail"] and "random_forest" in body["detail"]
    unknown_slice = churn_spec_data("refused")
    unknown_slice["validation"]["slices"]["feature"] = "plam"
    response = await put_spec(training, "refused", json.dumps(unknown_slice), "application/json")
    assert response.status_code == 422 and response.json()["field"] == "validation.slices.feature"


async def test_two_runs_from_the_same_data_and_spec_give_identical_metrics(
    stage: Stage, training: ServiceProcess
) -> None:
    model = "twice"
    await stage.feeder.upload(stage.store, f"{model}-base", churn_frame(1500, seed=4))
    spec = churn_spec_data(model, estimator="hist_gradient_boosting", params={"max_iter": 50})
    assert (await put_spec(training, model, json.dumps(spec), "application/json")).status_code == 200

    runs = []
    for attempt in range(2):
        asked = await stage.feeder.send(
            RetrainRequested(model=model, reason=f"run {attempt}", ignore_cooldown=True),
            source="/driftloop/registry",
        )
        runs.append(await stage.tail.wait_for(TrainingCompleted, _caused_by(stage, asked.id)))
    [announced] = stage.tail.of(ModelSpecRegistered, lambda d: d.model == model)
    assert announced.actor == "user:dev-operator"
    first, second = (r.data for r in runs)
    assert first.job_id != second.job_id
    assert first.metrics == second.metrics
    assert first.lineage.datasets == second.lineage.datasets
    assert first.lineage.holdout == second.lineage.holdout
    assert first.lineage.spec_hash == second.lineage.spec_hash


def _caused_by(stage: Stage, trigger_id: str) -> Callable[[TrainingCompleted], bool]:
    """Matches the TrainingCompleted of the job that ``trigger_id`` started."""

    def matches(completed: TrainingCompleted) -> bool:
        requests = stage.tail.of(TrainingRequested, lambda d: d.job_id == completed.job_id)
        return bool(requests) and requests[0].data.trigger_event.id == trigger_id

    return matches
