"""Training's handlers and job runner on fakes: triggers through the policy, jobs to completion or failure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from contracts.commands import REASON_MAX_CHARS, RetrainRequested
from contracts.common import ID_MAX_CHARS, FeatureSpec, FeatureType, Stage, TrafficWindow
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent, new_event
from contracts.models import ModelStageChanged
from contracts.monitoring import (
    CorrectionMethod,
    DriftDetected,
    DriftTest,
    FeatureDrift,
    PerformanceDegraded,
)
from contracts.training import (
    FailureReason,
    ModelSpecRegistered,
    SkipReason,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
    TrainingSkipped,
    TrainingStarted,
    TrainingTrigger,
)
from libs.artifacts import load_model
from libs.modelspec import ModelSpec
from libs.profiles import ReferenceProfile
from services.training import worker
from services.training.domain import JobState
from services.training.handlers import HANDLERS, current_spec, register_spec
from services.training.ports import FitProcessUnavailable
from tests.stage_changes import stage_change
from tests.unit.training.data import churn_frame, churn_spec, churn_spec_data, put_frame, traffic_window
from tests.unit.training.fakes import Harness
from tests.waiting import eventually

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(str(tmp_path / "artifacts"))


async def register(h: Harness, spec: ModelSpec) -> None:
    await register_spec(
        spec,
        actor="user:test",
        specs=h.specs,
        spec_store=h.spec_store,
        publish=h.bus.publish,
        source="/driftloop/training",
    )


async def upload(
    h: Harness, name: str, frame: Any, *, version: int = 1, models: list[str] | None = None
) -> None:
    ref = put_frame(h.store, frame)
    registered = DatasetRegistered(
        name=name,
        dataset_version=version,
        sha256=ref.key,
        artifact=ref,
        row_count=len(frame),
        columns={str(c): str(t) for c, t in frame.dtypes.items()},
        source="upload",
        models=models if models is not None else [],
    )
    await h.bus.publish(new_event(registered, source="/driftloop/registry", actor="user:alice"))
    await h.bus.drain()


def drift(h: Harness, model: str, frame: Any | None = None, *, version: int = 1) -> CloudEvent[DriftDetected]:
    data = put_frame(h.store, traffic_window(frame, "churned")) if frame is not None else None
    window = TrafficWindow(
        id=f"{model}:1:000001",
        start=datetime(2026, 1, 1, tzinfo=UTC),
        end=datetime(2026, 1, 1, 1, tzinfo=UTC),
        size=len(frame) if frame is not None else 0,
        data=data,
    )
    evidence = FeatureDrift(
        feature="x0",
        feature_type="numeric",
        test=DriftTest.KS,
        statistic=0.3,
        p_value=0.0001,
        threshold=0.05,
        drifted=True,
        n_current=500,
        n_reference=1000,
    )
    payload = DriftDetected(
        model=model,
        model_version=version,
        window=window,
        reference_size=1000,
        features=[evidence],
        drifted_features=["x0"],
        drift_share=1.0,
        share_threshold=0.1,
        correction=CorrectionMethod.BONFERRONI,
        alpha=0.05,
    )
    return new_event(payload, source="/driftloop/monitoring")


async def test_new_dataset_for_a_model_trains_version_one_end_to_end(harness: Harness) -> None:
    await register(harness, churn_spec())
    await upload(harness, "churn-base", churn_frame(), models=["churn"])

    assert await harness.run_jobs() == 1

    [requested] = harness.events(TrainingRequested)
    assert requested.data.trigger == "dataset-registered"
    assert requested.actor == "user:alice"
    [started] = harness.events(TrainingStarted)
    assert started.data.attempt == 1
    assert harness.events(TrainingProgress)
    [completed] = harness.events(TrainingCompleted)
    c = completed.data
    assert completed.correlationid == requested.correlationid
    assert completed.causationid == requested.id
    assert c.metrics["roc_auc"] > 0.8
    assert set(c.metrics) == {"accuracy", "f1", "roc_auc", "log_loss"}
    assert c.signature.classes == [0, 1]
    assert c.lineage.spec is not None and c.lineage.spec.key == c.lineage.spec_hash
    assert c.lineage.holdout is not None and c.lineage.holdout.name == "churn-holdout"
    assert [d.name for d in c.lineage.datasets] == ["churn-base"]  # the base file is the training set
    assert c.lineage.params["estimator_class"] == "LogisticRegression"
    assert c.lineage.environment["scikit-learn"]
    assert c.train_rows + c.holdout_rows == 1200
    assert load_model(harness.store, c.artifact.key).predict(churn_frame(5)).shape == (5,)
    profile = ReferenceProfile.from_bytes(harness.store.get(c.profile.key))
    assert profile.prediction is not None and profile.prediction.kind == "categorical"
    sets = harness.events(DatasetRegistered)
    assert {e.data.source.split(":")[0] for e in sets} == {"upload", "holdout"}
    [job] = harness.jobs.rows.values()
    assert job.state is JobState.COMPLETED and job.attempts == 1


async def test_drift_retrains_with_the_windows_labelled_rows(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn", churn_frame(300, seed=5, shift=0.5)))
    await harness.run_jobs()
    [requested] = harness.events(TrainingRequested)
    assert requested.data.trigger == "drift-detected"
    assert requested.data.traffic_window is not None
    [completed] = harness.events(TrainingCompleted)
    assert completed.data.train_rows + completed.data.holdout_rows == 1200 + 300
    training_set = completed.data.lineage.datasets[0]
    assert (training_set.name, training_set.rows) == ("churn-training", 1500)
    registered = next(e for e in harness.events(DatasetRegistered) if e.data.name == "churn-training")
    assert registered.data.derived_from == requested.data.datasets


async def test_second_drift_while_a_job_is_in_flight_is_skipped(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    [skipped] = harness.events(TrainingSkipped)
    assert skipped.data.reason is SkipReason.IN_FLIGHT
    assert skipped.data.in_flight_job_id == harness.events(TrainingRequested)[0].data.job_id


async def test_a_drift_alert_whose_evidence_was_cut_is_explained_by_its_totals(harness: Harness) -> None:
    # A model with thousands of features: the alert carries the most drifted ones and counts them all.
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    alert = drift(harness, "churn").data
    cut = alert.model_copy(
        update={"features_total": 5000, "drifted_features_total": 1200, "evidence_truncated": True}
    )
    await harness.bus.publish(new_event(cut, source="/driftloop/monitoring"))
    await harness.bus.drain()
    [requested] = harness.events(TrainingRequested)
    assert requested.data.reason.startswith("drift in 1200 of 5000 features")


def foreign_request(like: CloudEvent[TrainingRequested], *, model: str, job_id: str) -> CloudEvent[Any]:
    """A TrainingRequested this service did not record (another deployment's, or a hand-made one)."""
    return new_event(like.data.model_copy(update={"model": model, "job_id": job_id}), source="/elsewhere")


async def test_a_request_that_meets_a_job_in_flight_is_skipped_in_the_open(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    [first] = harness.events(TrainingRequested)

    foreign = foreign_request(first, model="churn", job_id="job-from-elsewhere")
    await harness.bus.publish(foreign)
    await harness.bus.drain()

    [skipped] = harness.events(TrainingSkipped)
    assert skipped.data.reason is SkipReason.IN_FLIGHT
    assert skipped.data.in_flight_job_id == first.data.job_id
    assert skipped.data.trigger_event is not None and skipped.data.trigger_event.id == foreign.id
    assert "job-from-elsewhere" not in harness.jobs.rows


async def test_a_request_for_a_model_without_a_spec_is_dead_lettered(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    [first] = harness.events(TrainingRequested)

    await harness.bus.publish(foreign_request(first, model="ghost", job_id="job-ghost"))
    await harness.bus.drain()

    [dead] = harness.bus.dead_letters
    assert "'ghost', which has no spec" in dead.error
    assert "job-ghost" not in harness.jobs.rows


async def test_a_request_naming_a_known_job_with_other_content_is_dead_lettered(harness: Harness) -> None:
    """A job id names one request: another model's (or other data's) under it would otherwise be taken for
    the known job, and what it asked for silently never happen. The known job's own request again changes
    nothing."""
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    [first] = harness.events(TrainingRequested)

    await harness.bus.publish(new_event(first.data, source="/elsewhere"))
    await harness.bus.drain()
    assert harness.bus.dead_letters == []
    await harness.bus.publish(foreign_request(first, model="fraud", job_id=first.data.job_id))
    await harness.bus.drain()

    [dead] = harness.bus.dead_letters
    assert dead.reason == "rejected"
    assert f"job {first.data.job_id} is already the request of model 'churn'" in dead.error
    assert "this TrainingRequested names model 'fraud'" in dead.error
    assert harness.jobs.rows[first.data.job_id].model == "churn"
    assert harness.events(TrainingSkipped) == []


async def test_a_dataset_announced_again_under_a_new_event_id_starts_no_second_job(harness: Harness) -> None:
    # The same version of the same file, re-sent as a new event (a replay, a producer's retry with a new id).
    await register(harness, churn_spec())
    await upload(harness, "churn-base", churn_frame(), models=["churn"])
    await harness.run_jobs()
    await upload(harness, "churn-base", churn_frame(), models=["churn"])
    await harness.run_jobs()
    assert len(harness.events(TrainingRequested)) == 1
    assert harness.bus.dead_letters == []


async def test_a_dataset_version_announced_again_with_another_file_is_dead_lettered(harness: Harness) -> None:
    await register(harness, churn_spec())
    await upload(harness, "churn-base", churn_frame(), models=["churn"])
    await harness.run_jobs()
    first = harness.datasets.rows[("churn-base", 1)].sha256
    await upload(harness, "churn-base", churn_frame(seed=9), models=["churn"])
    await harness.run_jobs()
    assert harness.datasets.rows[("churn-base", 1)].sha256 == first
    assert len(harness.events(TrainingRequested)) == 1
    [dead] = harness.bus.dead_letters
    assert dead.reason == "rejected"
    assert f"churn-base version 1 is already known with sha256 {first}" in dead.error


async def test_a_foreign_request_dated_years_ahead_does_not_hold_the_daily_budget(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec(retrain={"cooldown_seconds": 0, "daily_budget": 1}))
    base = await harness.datasets.latest("churn-base")
    assert base is not None
    request = TrainingRequested(
        job_id="job-from-elsewhere",
        model="churn",
        trigger=TrainingTrigger.MANUAL,
        reason="restored from another deployment",
        datasets=[base.ref()],
    )
    ahead = new_event(request, source="/elsewhere").model_copy(
        update={"time": datetime(2031, 1, 1, tzinfo=UTC)}
    )
    await harness.bus.publish(ahead)
    assert await harness.run_jobs() == 1

    harness.clock.advance(2 * 24 * 3600)  # the budget's 24 hours are long over
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    assert harness.events(TrainingSkipped) == []
    assert len(harness.events(TrainingRequested)) == 2


async def test_a_foreign_request_naming_no_datasets_trains_on_the_latest_versions_its_spec_names(
    harness: Harness,
) -> None:
    """The contract: no datasets mean the spec's. The job pins them (every run trains on the same versions);
    left empty, no TrainingStarted could be made and the runner retried that job's start for ever, every job
    behind it waiting. The same request re-sent under a new event id is the same job."""
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    base = await harness.datasets.latest("churn-base")
    assert base is not None
    request = TrainingRequested(
        job_id="job-from-elsewhere", model="churn", trigger=TrainingTrigger.MANUAL, reason="hand-made"
    )
    await harness.bus.publish(new_event(request, source="/elsewhere"))
    assert await harness.run_jobs() == 1
    await harness.bus.publish(new_event(request, source="/elsewhere"))
    assert await harness.run_jobs() == 0

    [started] = harness.events(TrainingStarted)
    assert started.data.datasets == [base.ref()]
    [completed] = harness.events(TrainingCompleted)
    assert completed.data.job_id == "job-from-elsewhere"
    assert harness.bus.dead_letters == []


async def test_a_foreign_request_naming_no_datasets_before_its_base_dataset_has_a_version_is_skipped(
    harness: Harness,
) -> None:
    await register(harness, churn_spec())
    request = TrainingRequested(
        job_id="job-from-elsewhere", model="churn", trigger=TrainingTrigger.MANUAL, reason="hand-made"
    )
    await harness.bus.publish(new_event(request, source="/elsewhere"))
    assert await harness.run_jobs() == 0

    [skipped] = harness.events(TrainingSkipped)
    assert skipped.data.reason is SkipReason.NO_DATASET
    assert "base dataset 'churn-base' has no version yet" in skipped.data.message
    assert "job-from-elsewhere" not in harness.jobs.rows


async def test_a_foreign_request_with_the_longest_job_id_the_contract_takes_trains_to_completion(
    harness: Harness,
) -> None:
    # Its run id was the job id and four characters more, which no TrainingStarted could carry: the runner
    # retried the job's start for ever.
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    base = await harness.datasets.latest("churn-base")
    assert base is not None
    job_id = "job-" + "x" * (ID_MAX_CHARS - 4)
    request = TrainingRequested(
        job_id=job_id,
        model="churn",
        trigger=TrainingTrigger.MANUAL,
        reason="hand-made",
        datasets=[base.ref()],
    )
    await harness.bus.publish(new_event(request, source="/elsewhere"))
    assert await harness.run_jobs() == 1

    [completed] = harness.events(TrainingCompleted)
    assert completed.data.job_id == job_id
    assert harness.jobs.rows[job_id].state is JobState.COMPLETED


async def test_drift_within_cooldown_is_skipped_and_accepted_after_it(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec(retrain={"cooldown_seconds": 600, "daily_budget": 10}))
    await harness.bus.publish(drift(harness, "churn"))
    await harness.run_jobs()
    harness.clock.advance(60)
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    assert [e.data.reason for e in harness.events(TrainingSkipped)] == [SkipReason.COOLDOWN]
    harness.clock.advance(600)
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    assert len(harness.events(TrainingRequested)) == 2


@pytest.mark.parametrize("replica_skew_s", [3600.0, -3600.0])
async def test_the_cooldown_is_timed_on_the_jobs_clock_whatever_the_replicas_clock_says(
    harness: Harness, replica_skew_s: float
) -> None:
    # Postgres stamps when a run finished. Timed on the clock of the replica taking the next trigger, one an
    # hour ahead of the database's skipped the 30-minute cooldown at once, and one an hour behind held it 90
    # minutes ("last run finished -3540 s ago").
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec(retrain={"cooldown_seconds": 1800, "daily_budget": 10}))
    await harness.bus.publish(drift(harness, "churn"))
    assert await harness.run_jobs() == 1
    harness.clock.advance(60)
    published: list[CloudEvent[Any]] = []

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    def replica_clock() -> datetime:
        return harness.clock() + timedelta(seconds=replica_skew_s)

    await HANDLERS[DriftDetected](
        drift(harness, "churn"), **{**harness.ports(publish), "clock": replica_clock}
    )
    [skipped] = [e.data for e in published if isinstance(e.data, TrainingSkipped)]
    assert skipped.reason is SkipReason.COOLDOWN and skipped.retry_after_seconds == 1740.0
    assert "last run finished 60 s ago" in skipped.message


async def test_trigger_for_a_model_without_spec_is_skipped_as_unknown_model(harness: Harness) -> None:
    await harness.bus.publish(drift(harness, "ghost"))
    await harness.bus.drain()
    [skipped] = harness.events(TrainingSkipped)
    assert skipped.data.reason is SkipReason.UNKNOWN_MODEL
    assert "PUT /v1/models/ghost/spec" in skipped.data.message


async def test_trigger_before_the_base_dataset_exists_is_skipped_as_no_dataset(harness: Harness) -> None:
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    [skipped] = harness.events(TrainingSkipped)
    assert skipped.data.reason is SkipReason.NO_DATASET
    assert "churn-base" in skipped.data.message


async def test_degraded_performance_without_enough_labels_is_skipped(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    window = drift(harness, "churn").data.window
    degraded = PerformanceDegraded(
        model="churn",
        model_version=1,
        metric="roc_auc",
        value=0.6,
        baseline=0.9,
        threshold=0.8,
        higher_is_better=True,
        window=window,
        labelled_rows=3,
    )
    await harness.bus.publish(new_event(degraded, source="/driftloop/monitoring"))
    await harness.bus.drain()
    [skipped] = harness.events(TrainingSkipped)
    assert skipped.data.reason is SkipReason.NOT_ENOUGH_LABELS


async def test_manual_request_carries_the_actor_into_the_job(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    ask = RetrainRequested(model="churn", reason="new export", ignore_cooldown=True)
    await harness.bus.publish(new_event(ask, source="/driftloop/registry", actor="user:bob"))
    await harness.run_jobs()
    [requested] = harness.events(TrainingRequested)
    assert requested.actor == "user:bob" and "user:bob" in requested.data.reason
    assert harness.events(TrainingCompleted)[0].actor == "user:bob"


async def test_a_manual_request_with_the_longest_reason_makes_a_request_within_the_cap(
    harness: Harness,
) -> None:
    # "requested by <actor>: <reason>" ran past the cap its reason was already at: the event carried more
    # than any reason may.
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    ask = RetrainRequested(model="churn", reason="r" * REASON_MAX_CHARS, ignore_cooldown=True)
    await harness.bus.publish(new_event(ask, source="/driftloop/registry", actor="user:" + "b" * 200))
    await harness.bus.drain()
    [requested] = harness.events(TrainingRequested)
    assert len(requested.data.reason) == REASON_MAX_CHARS
    assert requested.data.reason.startswith("requested by user:bbb")
    assert requested.data.reason.endswith(
        f"r… ({REASON_MAX_CHARS + len('requested by user:: ') + 200:,} characters)"
    )


async def test_datasets_training_materialises_never_trigger_a_retrain(harness: Harness) -> None:
    await register(harness, churn_spec())
    await upload(harness, "churn-base", churn_frame(), models=["churn"])
    await harness.run_jobs()
    assert len(harness.events(TrainingRequested)) == 1


async def test_parent_version_is_the_production_version(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    promoted = ModelStageChanged(
        model="churn", model_version=4, from_stage=Stage.CANARY, to_stage=Stage.PRODUCTION, reason="promoted"
    )
    await harness.bus.publish(new_event(promoted, source="/driftloop/registry"))
    await harness.bus.drain()
    await harness.bus.publish(drift(harness, "churn", version=4))
    await harness.run_jobs()
    assert harness.events(TrainingCompleted)[0].data.lineage.parent_version == 4


async def test_drift_of_a_version_that_is_not_in_production_is_skipped(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    promoted = ModelStageChanged(
        model="churn", model_version=4, from_stage=Stage.CANARY, to_stage=Stage.PRODUCTION, reason="promoted"
    )
    await harness.bus.publish(new_event(promoted, source="/driftloop/registry"))
    await harness.bus.drain()
    await harness.bus.publish(drift(harness, "churn", version=5))  # a canary's traffic
    await harness.run_jobs()
    assert harness.events(TrainingCompleted) == []
    [skipped] = harness.events(TrainingSkipped)
    assert skipped.data.reason is SkipReason.NOT_PRODUCTION


async def test_spec_naming_a_missing_column_fails_with_unknown_feature_and_a_hint(harness: Harness) -> None:
    spec = churn_spec(features=[{"name": "x00", "type": "numeric"}, {"name": "plan", "type": "categorical"}])
    await upload(harness, "churn-base", churn_frame())
    await register(harness, spec)
    await harness.bus.publish(drift(harness, "churn"))
    await harness.run_jobs()
    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason is FailureReason.UNKNOWN_FEATURE
    assert "'x00'" in failed.data.message and "did you mean 'x0'" in failed.data.message
    assert harness.jobs.rows[failed.data.job_id].state is JobState.FAILED


async def test_stored_spec_with_an_unknown_estimator_fails_the_job_not_the_service(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    # A spec stored by an older release whose estimator no longer exists: the table's copy and the artifact.
    stored = harness.specs.by_model["churn"]
    raw = stored.spec.canonical_json().replace(b'"logistic_regression"', b'"xgboost_classic"')
    bad = harness.store.put(raw)
    harness.specs.by_model["churn"] = stored.__class__(
        **{
            **stored.__dict__,
            "spec": ModelSpec.from_stored(
                {**stored.spec.model_dump(mode="json"), "estimator": "xgboost_classic"}
            ),
            "artifact": stored.artifact.model_copy(update={"key": bad.sha256}),
        }
    )
    await harness.bus.publish(drift(harness, "churn"))
    await harness.run_jobs()
    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason is FailureReason.UNKNOWN_ESTIMATOR
    assert "xgboost_classic" in failed.data.message and "random_forest" in failed.data.message
    # Shown as it is, and replaced.
    assert (await current_spec("churn", specs=harness.specs)).spec.estimator == "xgboost_classic"
    await register(harness, churn_spec())
    assert harness.specs.by_model["churn"].spec.estimator == "logistic_regression"


async def test_too_small_dataset_fails_with_the_row_count(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame(20))
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    await harness.run_jobs()
    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason is FailureReason.DATASET_TOO_SMALL
    assert "20 rows" in failed.data.message


async def test_empty_dataset_fails_as_too_small(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame().iloc[:0])
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    await harness.run_jobs()
    assert harness.events(TrainingFailed)[0].data.reason is FailureReason.DATASET_TOO_SMALL


async def test_a_model_whose_outcome_is_too_large_to_announce_fails_once_naming_the_features(
    harness: Harness,
) -> None:
    # Every kept level is in the signature: five features of 960 distinct 250-character levels (each within
    # what a model keeps of one feature) pass 1 MB together.
    frame = churn_frame()
    wide = [f"code{k}" for k in range(5)]
    for k, name in enumerate(wide):
        frame[name] = [f"{k}-{i:06d}-" + "c" * 240 for i in range(len(frame))]
    features = [*churn_spec_data()["features"], *({"name": n, "type": "categorical"} for n in wide)]
    await register(harness, churn_spec(features=features, validation={}))
    await upload(harness, "churn-base", frame, models=["churn"])
    assert await harness.run_jobs() == 1
    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason is FailureReason.INVALID_SPEC
    message = failed.data.message
    assert "cannot be announced" in message and "1,000,000 bytes" in message, message
    assert "'code0'" in message and "960 levels" in message, message
    assert harness.events(TrainingCompleted) == []
    [job] = harness.jobs.rows.values()
    assert (job.state, job.attempts) == (JobState.FAILED, 1)


async def test_an_id_like_categorical_feature_keeps_its_most_frequent_levels_and_says_so(
    harness: Harness,
) -> None:
    # 4,800 distinct 250-character levels in the training rows made a 1.2 MB signature: the job failed as
    # "cannot be announced" after the whole fit. A model keeps the 1,000 most frequent; the others are
    # treated as unseen, and TrainingCompleted counts what was seen.
    frame = churn_frame(6000)
    frame["customer"] = [f"{i:06d}-" + "c" * 243 for i in range(len(frame))]
    frame.loc[:99, "customer"] = "frequent-" + "c" * 241  # one level that is certainly kept
    features = [*churn_spec_data()["features"], {"name": "customer", "type": "categorical"}]
    await register(harness, churn_spec(features=features, validation={}))
    await upload(harness, "churn-base", frame, models=["churn"])
    assert await harness.run_jobs() == 1
    assert harness.events(TrainingFailed) == []
    [completed] = harness.events(TrainingCompleted)
    customer = completed.data.signature.features[-1]
    assert customer.categories is not None and len(customer.categories) == 1000
    assert "frequent-" + "c" * 241 in customer.categories
    seen = completed.data.categories_seen
    assert seen["customer"] > 1000 and set(seen) == {"customer"}
    plan = completed.data.signature.features[-2]
    assert plan.categories == ["basic", "plus", "premium"]
    model = load_model(harness.store, completed.data.artifact.key)
    rows = frame.drop(columns=["churned"]).iloc[:5]
    assert model.predict_proba(rows).shape == (5, 2)


async def test_levels_too_long_to_list_are_treated_as_unseen_and_said_so(harness: Harness) -> None:
    # 40 levels of 30,000 characters made a 1.2 MB signature; a level over 256 characters is not kept.
    frame = churn_frame()
    frame["note"] = [f"{i // 2 % 40:02d}" + "n" * 30_000 if i % 2 else "short" for i in range(len(frame))]
    features = [*churn_spec_data()["features"], {"name": "note", "type": "categorical"}]
    await register(harness, churn_spec(features=features, validation={}))
    await upload(harness, "churn-base", frame, models=["churn"])
    assert await harness.run_jobs() == 1
    [completed] = harness.events(TrainingCompleted)
    assert completed.data.signature.features[-1].categories == ["short"]
    assert completed.data.categories_seen == {"note": 41}


async def test_hist_gradient_boosting_trains_on_features_with_many_levels(harness: Harness) -> None:
    # The one-hot encoding of 200 levels is sparse, which HistGradientBoosting does not take: every such
    # spec failed as fit-error, "Sparse data was passed for X, but dense data is required".
    frame = churn_frame()
    frame["region"] = [f"region-{i % 200:03d}" for i in range(len(frame))]
    features = [*churn_spec_data()["features"], {"name": "region", "type": "categorical"}]
    spec = churn_spec(features=features, validation={}, estimator="hist_gradient_boosting", params={})
    await register(harness, spec)
    await upload(harness, "churn-base", frame, models=["churn"])
    assert await harness.run_jobs() == 1
    assert harness.events(TrainingFailed) == []
    [completed] = harness.events(TrainingCompleted)
    model = load_model(harness.store, completed.data.artifact.key)
    assert model.predict_proba(frame.drop(columns=["churned"]).iloc[:5]).shape == (5, 2)


async def test_a_one_hot_encoding_too_large_to_hold_dense_fails_naming_the_features(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HistGradientBoosting takes its inputs dense: rows x levels could exhaust the fit process's memory,
    # which would be killed and retried as a lost worker. 960 rows x 200 levels x 8 bytes is 1.5 MB.
    monkeypatch.setattr(worker, "ONE_HOT_DENSE_MAX_BYTES", 1_000_000)
    frame = churn_frame()
    frame["region"] = [f"region-{i % 200:03d}" for i in range(len(frame))]
    features = [*churn_spec_data()["features"], {"name": "region", "type": "categorical"}]
    spec = churn_spec(features=features, validation={}, estimator="hist_gradient_boosting", params={})
    await register(harness, spec)
    await upload(harness, "churn-base", frame, models=["churn"])
    assert await harness.run_jobs() == 1
    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason is FailureReason.INVALID_SPEC
    message = failed.data.message
    assert "'region' 200 levels" in message and "dense" in message and "random_forest" in message, message
    [job] = harness.jobs.rows.values()
    assert (job.state, job.attempts) == (JobState.FAILED, 1)


async def test_an_id_like_classification_target_fails_before_the_fit_naming_the_limit(
    harness: Harness,
) -> None:
    # A classifier of one class per customer: fitted for minutes (or out of memory, scoring rows x classes
    # probabilities) into a model whose signature lists every class.
    frame = churn_frame(2400)
    frame["churned"] = [f"customer-{i % 1200:05d}" for i in range(len(frame))]
    await register(harness, churn_spec(validation={}))
    await upload(harness, "churn-base", frame, models=["churn"])
    assert await harness.run_jobs() == 1
    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason is FailureReason.INVALID_SPEC
    message = failed.data.message
    assert "'churned'" in message and "1,200 classes" in message and "1,000" in message, message
    assert harness.events(TrainingCompleted) == []


async def test_a_spec_stored_with_a_feature_name_too_long_fails_the_run_naming_the_limit(
    harness: Harness,
) -> None:
    # Registered before feature names were bounded: the run refuses it as it reads the spec, rather than
    # announce a model whose 12,000-character feature name travels in every event about it.
    long_name = "reading_" * 1500
    spec = churn_spec(validation={})
    spec = spec.model_copy(
        update={"features": [*spec.features, FeatureSpec(name=long_name, type=FeatureType.NUMERIC)]}
    )
    frame = churn_frame()
    frame[long_name] = frame["x0"]
    await register(harness, spec)
    await upload(harness, "churn-base", frame, models=["churn"])
    assert await harness.run_jobs() == 1
    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason is FailureReason.INVALID_SPEC
    assert "256 characters" in failed.data.message and long_name not in failed.data.message
    assert harness.events(TrainingCompleted) == []


async def test_lost_fit_process_is_retried_and_completes_once(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    harness.trainer.die_next = RuntimeError("fit process killed")
    await harness.bus.publish(drift(harness, "churn"))
    await harness.run_jobs()
    assert [e.data.attempt for e in harness.events(TrainingStarted)] == [1, 2]
    [completed] = harness.events(TrainingCompleted)
    assert completed.data.run_id.endswith("-2")


async def test_a_job_no_fit_process_could_be_started_for_fails_saying_so(tmp_path: Path) -> None:
    h = Harness(str(tmp_path), max_attempts=1)
    await upload(h, "churn-base", churn_frame())
    await register(h, churn_spec())
    h.trainer.die_next = FitProcessUnavailable(
        "no fit process could be started for the run, with a new pool either: "
        "BrokenPipeError(32, 'Broken pipe')"
    )
    await h.bus.publish(drift(h, "churn"))
    await h.run_jobs()

    [failed] = h.events(TrainingFailed)
    assert failed.data.reason is FailureReason.WORKER_LOST
    assert failed.data.message.startswith("no fit process could be started on attempt 1 of 1: ")
    assert "BrokenPipeError" in failed.data.message and "died" not in failed.data.message


async def test_job_whose_worker_keeps_dying_fails_as_worker_lost(tmp_path: Path) -> None:
    h = Harness(str(tmp_path), max_attempts=2)
    await upload(h, "churn-base", churn_frame())
    await register(h, churn_spec())
    await h.bus.publish(drift(h, "churn"))
    await h.bus.drain()
    job_id = h.events(TrainingRequested)[0].data.job_id
    for _ in range(3):  # three runs presumed dead (stale heartbeats), one more than allowed
        assert await h.runner.queue_on(None).claim_next(stale_after_s=0) is not None
        h.jobs.stale.add(job_id)
    await h.run_jobs()
    [failed] = h.events(TrainingFailed)
    assert failed.data.reason is FailureReason.WORKER_LOST
    assert not h.events(TrainingCompleted)


async def test_run_that_lost_its_job_to_another_run_does_not_complete_it(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    original = harness.trainer.train

    async def taken_over(job_input: dict[str, Any], progress: Any) -> dict[str, Any]:
        result = await original(job_input, progress)
        # While this run fitted, it was presumed dead and another run claimed the job.
        harness.jobs.stale.add(job_input["job_id"])
        await harness.jobs.claim_next(stale_after_s=0)
        return result

    harness.trainer.train = taken_over  # type: ignore[method-assign]
    assert await harness.runner.run_once()
    await harness.bus.drain()
    assert not harness.events(TrainingCompleted)


class EndlessFit:
    """The Trainer port for a fit that runs until the runner aborts it (a fit process that would take its
    core for up to job_timeout_s)."""

    def __init__(self) -> None:
        self.running = False
        self.aborted = 0

    async def train(self, job_input: dict[str, Any], progress: Any) -> dict[str, Any]:
        self.running = True
        await asyncio.Event().wait()  # only the runner's cancelling ends it
        raise AssertionError("unreachable")

    def abort(self) -> None:
        self.aborted += 1


def let_go_count() -> float:
    return REGISTRY.get_sample_value("driftloop_training_runs_let_go_total") or 0.0


async def test_a_run_whose_job_another_run_took_over_stops_its_fit_and_lets_the_job_go(
    harness: Harness,
) -> None:
    # Its heartbeat went stale (a long pause, a partition) and another replica claimed the job: the fit went
    # on until it ended or job_timeout_s (an hour) ran out, holding a core, its outcome dropped anyway.
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    fit = EndlessFit()
    harness.runner.trainer = fit
    harness.runner.heartbeat_interval_s = 0.01
    # A bound, not a measure: a run that does not let go ends as timeout and fails the test rather than hang.
    harness.runner.job_timeout_s = 60.0
    before = let_go_count()
    run = asyncio.create_task(harness.runner.run_once())

    async def fitting() -> bool:
        return fit.running

    await eventually(fitting, interval_s=0.01)
    [requested] = harness.events(TrainingRequested)
    job_id = requested.data.job_id
    harness.jobs.stale.add(job_id)
    taker = await harness.jobs.claim_next(stale_after_s=0)  # another replica, which presumed this run dead
    assert taker is not None

    assert await run
    await harness.bus.drain()
    assert fit.aborted == 1  # the fit process killed, its core free for the next run
    assert let_go_count() == before + 1
    job = harness.jobs.rows[job_id]
    assert (job.state, job.run_id) == (JobState.RUNNING, taker.run_id)  # left to the run that took it
    assert harness.events(TrainingFailed) == [] and harness.events(TrainingCompleted) == []


@pytest.mark.parametrize(
    "outage",
    [
        ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"),
        TimeoutError(),  # the pool gives no connection in time: asyncpg's acquire timing out
    ],
    ids=["refused", "acquire-timeout"],
)
async def test_the_database_away_while_the_fit_reports_progress_costs_neither_the_fit_nor_the_job(
    harness: Harness, outage: Exception
) -> None:
    # Heartbeats wait a database outage out (the job goes stale only if it lasts); progress must too: it is
    # only what followers see. Raised into the fit, it killed the fit process and took an attempt (the job
    # re-run), and a TimeoutError failed the job as over job_timeout_s.
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    begin, original, away = harness.runner.begin, harness.trainer.train, [False]

    @asynccontextmanager
    async def begin_unless_away() -> AsyncIterator[Any]:
        if away[0]:
            raise outage
        async with begin() as tx:
            yield tx

    async def fit_during_an_outage(job_input: dict[str, Any], progress: Any) -> dict[str, Any]:
        away[0] = True
        try:
            await progress("fitting", 0.5)
        finally:
            away[0] = False
        return await original(job_input, progress)

    harness.runner.begin = begin_unless_away
    harness.trainer.train = fit_during_an_outage  # type: ignore[method-assign]
    assert await harness.run_jobs() == 1
    assert harness.events(TrainingFailed) == []
    [started] = harness.events(TrainingStarted)
    [completed] = harness.events(TrainingCompleted)
    assert completed.data.run_id == started.data.run_id
    assert len(harness.trainer.runs) == 1


async def test_two_runs_on_the_same_data_and_spec_give_identical_metrics(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec(estimator="random_forest", params={"n_estimators": 20}))
    for _ in range(2):
        ask = RetrainRequested(model="churn", reason="again", ignore_cooldown=True)
        await harness.bus.publish(new_event(ask, source="/driftloop/registry"))
        await harness.run_jobs()
    first, second = harness.events(TrainingCompleted)
    assert first.data.metrics == second.data.metrics
    assert first.data.artifact.key == second.data.artifact.key  # the model file too, byte for byte
    assert first.data.lineage.datasets == second.data.lineage.datasets
    assert first.data.lineage.holdout == second.data.lineage.holdout
    assert len(harness.events(DatasetRegistered)) == 2  # the base upload, then one holdout for both runs


async def test_registered_spec_is_announced_with_the_actor_once_per_change(harness: Harness) -> None:
    await register(harness, churn_spec())
    await register(harness, churn_spec())  # the same spec again: nothing changed, nothing announced
    await register(harness, churn_spec(params={"C": 0.5}))
    first, second = harness.events(ModelSpecRegistered)
    assert first.actor == "user:test" and first.data.previous_spec_hash is None
    assert second.data.previous_spec_hash == first.data.spec_hash
    assert second.data.spec.key == second.data.spec_hash == harness.specs.by_model["churn"].spec_hash


async def test_a_stored_spec_whose_model_name_is_too_long_fails_the_run_before_the_fit(
    harness: Harness,
) -> None:
    # Registered before model names were bounded: the run was fitted, then its holdout could not be named
    # (<model>-holdout has more than 128 characters), and the runner fitted it again until worker-lost.
    name = "m" * 125
    spec = churn_spec(base_datasets=["churn-base"]).model_copy(update={"name": name})
    await register(harness, spec)
    await upload(harness, "churn-base", churn_frame(), models=[name])
    assert await harness.run_jobs() == 1
    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason is FailureReason.INVALID_SPEC
    assert "119 characters" in failed.data.message and "<model>-holdout" in failed.data.message
    assert harness.events(TrainingCompleted) == []
    [job] = harness.jobs.rows.values()
    assert (job.state, job.attempts) == (JobState.FAILED, 1)


async def test_a_stored_spec_listing_a_base_dataset_twice_fails_the_run_rather_than_leak_its_holdout(
    harness: Harness,
) -> None:
    # Every row twice in the training set put a copy of nearly every held-out row among the fitted ones:
    # roc_auc 0.90 became 0.999 on the same data.
    spec = churn_spec().model_copy(update={"base_datasets": ["churn-base", "churn-base"]})
    await register(harness, spec)
    await upload(harness, "churn-base", churn_frame(), models=["churn"])
    assert await harness.run_jobs() == 1
    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason is FailureReason.INVALID_SPEC
    assert "'churn-base' is listed twice" in failed.data.message
    assert harness.events(TrainingCompleted) == []


class FailingCompletion:
    """Makes the completion's first dataset registration raise ``errors`` in turn (then work)."""

    def __init__(self, harness: Harness, *errors: Exception) -> None:
        self.errors = list(errors)
        version_for = harness.datasets.version_for

        async def failing(name: str, sha256: str) -> tuple[int, bool]:
            if self.errors:
                raise self.errors.pop(0)
            return await version_for(name, sha256)

        harness.datasets.version_for = failing  # type: ignore[method-assign]


async def requested_job(harness: Harness) -> str:
    await upload(harness, "churn-base", churn_frame())
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    await harness.bus.drain()
    return str(harness.events(TrainingRequested)[0].data.job_id)


async def test_a_completion_that_fails_for_a_reason_of_its_own_fails_the_job_once_naming_it(
    harness: Harness,
) -> None:
    job_id = await requested_job(harness)
    FailingCompletion(harness, asyncpg.UniqueViolationError("duplicate key value violates unique constraint"))
    assert await harness.runner.run_once()
    await harness.bus.drain()
    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason is FailureReason.COMPLETION_ERROR
    assert "UniqueViolationError: duplicate key value violates unique constraint" in failed.data.message
    assert "worker" not in failed.data.message
    assert harness.jobs.rows[job_id].state is JobState.FAILED
    # Failed once and for good: a stale-job sweep finds nothing to fit again.
    harness.jobs.stale.add(job_id)
    assert await harness.run_jobs() == 0
    assert len(harness.trainer.runs) == 1
    assert not harness.events(TrainingCompleted)


async def test_a_completion_the_database_interrupts_is_retried_without_fitting_again(
    harness: Harness,
) -> None:
    job_id = await requested_job(harness)
    lost = FailingCompletion(
        harness,
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        ConnectionRefusedError("Postgres is restarting"),
    )
    harness.runner.retry_first_s = 0.0
    assert await harness.runner.run_once()
    await harness.bus.drain()
    assert lost.errors == []
    [completed] = harness.events(TrainingCompleted)
    assert completed.data.run_id.endswith("-1")
    assert harness.jobs.rows[job_id].state is JobState.COMPLETED
    assert len(harness.trainer.runs) == 1
    assert not harness.events(TrainingFailed)


async def publish_all(h: Harness, *events: CloudEvent[Any]) -> None:
    for event in events:
        await h.bus.publish(event)
    await h.bus.drain()


async def test_an_old_stage_change_re_sent_under_a_new_id_does_not_move_the_parent_back(
    harness: Harness,
) -> None:
    v2 = stage_change(2, Stage.CANARY, Stage.PRODUCTION, 2)
    await publish_all(
        harness,
        v2,
        stage_change(3, Stage.CANDIDATE, Stage.CANARY, 3),
        stage_change(2, Stage.PRODUCTION, Stage.ARCHIVED, 4),
        stage_change(3, Stage.CANARY, Stage.PRODUCTION, 5),
    )
    assert await harness.production.get("churn") == 3
    # The registry's v2 promotion again under a new id (a replay, a producer's retry): dedupe by id misses it.
    again = new_event(v2.data, source="/driftloop/registry")
    await publish_all(harness, again)
    assert await harness.production.get("churn") == 3
    [dead] = harness.bus.dead_letters
    assert dead.reason == "rejected"
    assert f"ModelStageChanged.v1 {again.id} is stage change 2 of churn" in dead.error
    assert "but stage change 5 (version 3 -> production" in dead.error and "stale stage change" in dead.error


async def test_the_last_stage_change_re_sent_under_a_new_id_changes_nothing(harness: Harness) -> None:
    last = stage_change(3, Stage.CANARY, Stage.PRODUCTION, 5)
    await publish_all(harness, stage_change(2, Stage.CANARY, Stage.PRODUCTION, 2), last)
    await publish_all(harness, new_event(last.data, source="/driftloop/registry"))
    assert await harness.production.get("churn") == 3
    assert harness.bus.dead_letters == []
    # Another change under the number applied last is not the same change: refused.
    await publish_all(harness, stage_change(2, Stage.ARCHIVED, Stage.PRODUCTION, 5))
    assert await harness.production.get("churn") == 3
    assert len(harness.bus.dead_letters) == 1


async def test_unnumbered_stage_changes_apply_until_a_numbered_one_did(harness: Harness) -> None:
    # Published by a registry before it numbered its changes: applied as they come, as before.
    await publish_all(
        harness,
        stage_change(1, Stage.CANARY, Stage.PRODUCTION, None),
        stage_change(1, Stage.PRODUCTION, Stage.ARCHIVED, None),
        stage_change(2, Stage.CANARY, Stage.PRODUCTION, None),
    )
    assert await harness.production.get("churn") == 2
    await publish_all(harness, stage_change(3, Stage.CANARY, Stage.PRODUCTION, 1))
    assert await harness.production.get("churn") == 3
    # A model's events keep their order on its partition: an unnumbered one after a numbered one is older.
    await publish_all(harness, stage_change(2, Stage.CANARY, Stage.PRODUCTION, None))
    assert await harness.production.get("churn") == 3
    [dead] = harness.bus.dead_letters
    assert "is an unnumbered stage change of churn" in dead.error and "but stage change 1" in dead.error


async def test_each_failed_round_of_the_runner_loop_is_counted_and_the_loop_goes_on(harness: Harness) -> None:
    # An operator alerts on a runner that keeps failing by this count: the log alone said only "retrying".
    def database_away(_conn: Any) -> Any:
        raise ConnectionRefusedError("Postgres is restarting")

    def failures() -> float:
        return REGISTRY.get_sample_value("driftloop_training_runner_failures_total") or 0.0

    async def failed_twice() -> bool:
        return failures() >= before + 2

    before = failures()
    harness.runner.queue_on = database_away
    harness.runner.retry_first_s = 0.01
    running = asyncio.create_task(harness.runner.run())
    try:
        await eventually(failed_twice, deadline_s=10.0, interval_s=0.02)
    finally:
        harness.runner.stop()
        await asyncio.wait_for(running, timeout=10.0)


async def test_a_failure_whose_message_is_longer_than_an_event_takes_fails_the_job_once_with_it_cut(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fit error's message is the exception's text, which may quote what it read (a column list, a
    value): one of megabytes made the TrainingFailed too large to publish, and the job, left running, was
    fitted again until it failed as worker-lost."""
    long = "ValueError: " + "columns [" + ", ".join(f"'c{i}'" for i in range(300_000)) + "] are missing"

    async def fails(job_input: dict[str, Any], progress: Any) -> dict[str, Any]:
        return worker.TrainingFailure(reason=FailureReason.FIT_ERROR, message=long).model_dump(mode="json")

    monkeypatch.setattr(harness.trainer, "train", fails)
    await register(harness, churn_spec(validation={}))
    await upload(harness, "churn-base", churn_frame(), models=["churn"])
    assert await harness.run_jobs() == 1
    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason is FailureReason.FIT_ERROR
    message = failed.data.message
    assert message.startswith(long[:1000]), message[:200]
    assert message.endswith(f"(cut: {len(long):,} characters in all)") and len(message) < 20_000
    [job] = harness.jobs.rows.values()
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
