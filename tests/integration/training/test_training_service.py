"""The training service as a process on the real broker and database: specs over HTTP, reproducible runs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from contracts.commands import RetrainRequested
from contracts.training import (
    FailureReason,
    ModelSpecRegistered,
    TrainingCompleted,
    TrainingFailed,
    TrainingRequested,
)
from tests.integration.training.conftest import Stage
from tests.integration.training.harness import VIEWER, ServiceProcess, fetch, put_spec
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


async def test_a_stored_spec_this_release_no_longer_accepts_is_shown_replaced_and_fails_its_runs(
    stage: Stage, training: ServiceProcess
) -> None:
    # A spec stored by an older release (or before a scikit-learn upgrade) whose estimator this one does not
    # have: the table's copy was re-validated on every read, so each trigger for the model was dead-lettered
    # (handler-failed), GET answered 500, and so did the PUT that would replace it.
    model = "stale"
    await stage.feeder.upload(stage.store, f"{model}-base", churn_frame(600, seed=5))
    spec = json.dumps(churn_spec_data(model))
    response = await put_spec(training, model, spec, "application/json")
    assert response.status_code == 200
    canonical = stage.store.get(response.json()["artifact"]["key"])
    older = stage.store.put(canonical.replace(b'"logistic_regression"', b'"xgboost_classic"'))
    await fetch(
        stage.database_url,
        f"""UPDATE {stage.schemas["training"]}.model_specs
            SET spec = jsonb_set(spec, '{{estimator}}', '"xgboost_classic"'),
                artifact = jsonb_set(artifact, '{{key}}', to_jsonb($2::text))
            WHERE model = $1""",
        model,
        older.sha256,
    )

    await stage.feeder.send(RetrainRequested(model=model, reason="stale spec"), source="/driftloop/registry")
    failed = await stage.tail.wait_for(TrainingFailed, lambda d: d.model == model)
    assert failed.data.reason is FailureReason.UNKNOWN_ESTIMATOR
    assert "xgboost_classic" in failed.data.message
    async with httpx.AsyncClient(timeout=30) as client:
        shown = await client.get(f"{training.url}/v1/models/{model}/spec", headers=VIEWER)
    assert shown.status_code == 200 and shown.json()["spec"]["estimator"] == "xgboost_classic"
    assert (await put_spec(training, model, spec, "application/json")).status_code == 200


def _caused_by(stage: Stage, trigger_id: str) -> Callable[[TrainingCompleted], bool]:
    """Matches the TrainingCompleted of the job that ``trigger_id`` started."""

    def matches(completed: TrainingCompleted) -> bool:
        requests = stage.tail.of(TrainingRequested, lambda d: d.job_id == completed.job_id)
        return bool(requests) and requests[0].data.trigger_event.id == trigger_id

    return matches
