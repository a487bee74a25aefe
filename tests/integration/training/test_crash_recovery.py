"""A training worker killed (SIGKILL of the whole process group) in the middle of a fit: on restart the job
is resumed from scratch and completes exactly once."""

from __future__ import annotations

import json

import pytest

from contracts.commands import RetrainRequested
from contracts.training import TrainingCompleted, TrainingRequested, TrainingStarted
from tests.integration.training.conftest import Stage
from tests.integration.training.harness import fetch, put_spec, wait_job_state
from tests.unit.training.data import churn_frame, churn_spec_data

pytestmark = pytest.mark.timeout(300)

FAST = {"heartbeat_interval_s": "0.5", "stale_after_s": "3", "runner_poll_s": "1", "progress_interval_s": "1"}


async def test_worker_killed_mid_run_completes_the_job_exactly_once_after_restart(stage: Stage) -> None:
    model = "slowchurn"
    await stage.feeder.upload(stage.store, f"{model}-base", churn_frame(4000))
    training = stage.make("training", **FAST)
    training.start()
    await training.ready()
    # Slow enough to be killed in the middle of the fit, whatever the machine's load.
    spec = churn_spec_data(model, estimator="random_forest", params={"n_estimators": 400})
    response = await put_spec(training, model, json.dumps(spec), "application/json")
    assert response.status_code == 200, response.text

    await stage.feeder.send(
        RetrainRequested(model=model, reason="kill test", ignore_cooldown=True),
        source="/driftloop/registry",
        actor="user:test",
    )
    requested = await stage.tail.wait_for(TrainingRequested, lambda d: d.model == model)
    job_id = requested.data.job_id
    await stage.tail.wait_for(TrainingStarted, lambda d: d.job_id == job_id)
    running = await wait_job_state(stage.database_url, stage.schemas["training"], job_id, "running")
    assert running["attempts"] == 1

    training.kill()
    [row] = await fetch(
        stage.database_url, f"SELECT state FROM {stage.schemas['training']}.jobs WHERE job_id = $1", job_id
    )
    assert row["state"] == "running"  # killed in the middle of the fit, not after it

    # The same service restarted: same schema, same consumer group.
    restarted = stage.make(
        "training", consumer_group=training.env["DRIFTLOOP_TRAINING_CONSUMER_GROUP"], **FAST
    )
    restarted.start()
    await restarted.ready()
    done = await wait_job_state(
        stage.database_url, stage.schemas["training"], job_id, "completed", deadline_s=180
    )
    assert done["attempts"] == 2
    await stage.tail.wait_for(TrainingCompleted, lambda d: d.job_id == job_id)
    await stage.tail.settle(3.0)
    completed = stage.tail.of(TrainingCompleted, lambda d: d.job_id == job_id)
    assert len(completed) == 1
    assert completed[0].data.run_id.endswith("-2")
    assert [e.data.attempt for e in stage.tail.of(TrainingStarted, lambda d: d.job_id == job_id)] == [1, 2]
    assert completed[0].correlationid == requested.correlationid
    restarted.stop()
