"""Training and validation as processes on the real broker and database: drift -> TrainingCompleted ->
(the registry, simulated here) -> ValidationPassed, and a deliberately worse model caught by the gate."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import yaml

from contracts.commands import RetrainRequested
from contracts.common import Stage as ModelStage
from contracts.common import TrafficWindow
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent
from contracts.models import ModelStageChanged, ModelVersionRegistered
from contracts.monitoring import CorrectionMethod, DriftDetected, DriftTest, FeatureDrift
from contracts.training import TrainingCompleted, TrainingRequested
from contracts.validation import ValidationFailed, ValidationPassed
from tests.integration.training.conftest import Stage
from tests.integration.training.harness import VIEWER, ServiceProcess, put_spec
from tests.unit.training.data import churn_frame, churn_spec_data, put_frame, traffic_window

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
async def services(stage: Stage) -> AsyncIterator[tuple[ServiceProcess, ServiceProcess]]:
    training = stage.make("training", runner_poll_s="1", progress_interval_s="1")
    validation = stage.make("validation", latency_repeats="3")
    training.start()
    validation.start()
    await training.ready()
    await validation.ready()
    yield training, validation
    training.stop()
    validation.stop()


def drift_detected(stage: Stage, model: str) -> tuple[DriftDetected, int]:
    """Drift on x0 with a window of shifted, partly labelled traffic stored as monitoring stores it; and
    how many of its rows are labelled."""
    window_rows = traffic_window(churn_frame(400, seed=11, shift=0.4), "churned", labelled_share=0.8)
    labelled = int(window_rows["label"].notna().sum())
    evidence = FeatureDrift(
        feature="x0",
        feature_type="numeric",
        test=DriftTest.KS,
        statistic=0.21,
        p_value=0.0002,
        threshold=0.05,
        drifted=True,
        n_current=400,
        n_reference=1600,
    )
    detected = DriftDetected(
        model=model,
        model_version=1,
        window=TrafficWindow(
            id=f"{model}:1:000007",
            start=datetime(2026, 1, 1, tzinfo=UTC),
            end=datetime(2026, 1, 1, 0, 7, tzinfo=UTC),
            size=400,
            data=put_frame(stage.store, window_rows),
        ),
        reference_size=1600,
        features=[evidence],
        drifted_features=["x0"],
        drift_share=1.0,
        share_threshold=0.1,
        correction=CorrectionMethod.BONFERRONI,
        alpha=0.05,
    )
    return detected, labelled


async def register_version(stage: Stage, completed: CloudEvent[Any], version: int) -> CloudEvent[Any]:
    """What the registry does with a TrainingCompleted: announce a numbered version (same cascade)."""
    c: TrainingCompleted = completed.data
    registered = ModelVersionRegistered(
        model=c.model,
        model_version=version,
        run_id=c.run_id,
        job_id=c.job_id,
        artifact=c.artifact,
        profile=c.profile,
        signature=c.signature,
        metrics=c.metrics,
        lineage=c.lineage,
    )
    return await stage.feeder.send(registered, source="/driftloop/registry", cause=completed)


async def train(stage: Stage, model: str, reason: str) -> CloudEvent[Any]:
    """Ask for a retrain; the TrainingCompleted of the job it started."""
    asked = await stage.feeder.send(
        RetrainRequested(model=model, reason=reason, ignore_cooldown=True), source="/driftloop/registry"
    )
    requested = await stage.tail.wait_for(
        TrainingRequested, lambda d: d.trigger_event is not None and d.trigger_event.id == asked.id
    )
    return await stage.tail.wait_for(TrainingCompleted, lambda d: d.job_id == requested.data.job_id)


async def test_drift_is_retrained_and_the_candidate_passes_validation(
    stage: Stage, services: tuple[ServiceProcess, ServiceProcess]
) -> None:
    training, validation = services
    model = "loop"
    await stage.feeder.upload(stage.store, f"{model}-base", churn_frame(1600, seed=2))
    response = await put_spec(training, model, yaml.safe_dump(churn_spec_data(model)), "application/yaml")
    assert response.status_code == 200, response.text

    detected, labelled = drift_detected(stage, model)
    drift = await stage.feeder.send(detected, source="/driftloop/monitoring")
    completed = await stage.tail.wait_for(TrainingCompleted, lambda d: d.model == model)
    assert completed.correlationid == drift.id
    c = completed.data
    assert c.train_rows + c.holdout_rows == 1600 + labelled  # base rows plus the window's labelled rows
    assert c.lineage.spec is not None and c.lineage.holdout is not None
    holdout = c.lineage.holdout
    await stage.tail.wait_for(DatasetRegistered, lambda d: d.sha256 == holdout.sha256)

    await register_version(stage, completed, 1)
    passed = await stage.tail.wait_for(ValidationPassed, lambda d: d.model == model and d.model_version == 1)
    assert passed.correlationid == drift.id  # one cascade from drift to the gate
    checks = {check.name: check for check in passed.data.checks}
    assert checks["roc_auc>=0.75"].passed
    assert "no champion" in checks["challenger-vs-champion:roc_auc"].detail
    assert passed.data.holdout == holdout

    async with httpx.AsyncClient(base_url=validation.url, headers=VIEWER, timeout=10) as client:
        by_version = await client.get(f"/v1/models/{model}/versions/1/report")
        assert by_version.status_code == 200
        report = by_version.json()
        assert report["passed"] and report["report_id"] == passed.data.report_id
        by_id = await client.get(f"/v1/reports/{passed.data.report_id}")
        assert by_id.json()["checks"] == json.loads(json.dumps(report["checks"]))
        assert (await client.get(f"/v1/models/{model}/versions/99/report")).status_code == 404


async def test_deliberately_worse_model_fails_validation_with_the_failing_check_named(
    stage: Stage, services: tuple[ServiceProcess, ServiceProcess]
) -> None:
    training, _ = services
    model = "gate"
    await stage.feeder.upload(stage.store, f"{model}-base", churn_frame(1600, seed=3))
    good = churn_spec_data(model)
    assert (await put_spec(training, model, json.dumps(good), "application/json")).status_code == 200
    first = await train(stage, model, "version 1")
    await register_version(stage, first, 1)
    await stage.tail.wait_for(ValidationPassed, lambda d: d.model == model and d.model_version == 1)
    promoted = ModelStageChanged(
        model=model,
        model_version=1,
        from_stage=ModelStage.CANARY,
        to_stage=ModelStage.PRODUCTION,
        reason="test",
    )
    await stage.feeder.send(promoted, source="/driftloop/registry")

    # Same features and data, but an estimator crippled on purpose: a depth-one tree on a weak feature.
    worse = {**good, "estimator": "decision_tree", "params": {"max_depth": 1}}
    assert (await put_spec(training, model, json.dumps(worse), "application/json")).status_code == 200
    second = await train(stage, model, "version 2, worse")
    await register_version(stage, second, 2)
    failed = await stage.tail.wait_for(ValidationFailed, lambda d: d.model == model and d.model_version == 2)
    assert failed.data.champion_version == 1
    assert "challenger-vs-champion:roc_auc" in failed.data.failed_checks
    check = next(c for c in failed.data.checks if c.name == "challenger-vs-champion:roc_auc")
    assert check.value is not None and check.value < 0 and check.interval is not None
