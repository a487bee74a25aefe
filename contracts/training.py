"""Training events: the retrain policy's decision, then the life of one training job.

One job: TrainingRequested -> TrainingStarted -> (TrainingProgress ...) -> TrainingCompleted | TrainingFailed.
A worker that dies mid-run and resumes publishes TrainingStarted again with a higher ``attempt``; a service
stopped mid-run hands its job back, and the next start repeats its ``attempt`` and ``run_id``; a job
completes or fails exactly once. A trigger the policy refuses gives TrainingSkipped and no job.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import Field

from contracts.commands import COMPOSED_REASON_TEXT, ComposedReason
from contracts.common import (
    PG_BIGINT_MAX,
    PG_INTEGER_MAX,
    ArtifactRef,
    DatasetName,
    DatasetRef,
    EventRef,
    FreeText,
    Identifier,
    JobId,
    Lineage,
    ModelName,
    ModelSignature,
    ModelVersion,
    RunId,
    Sha256Hex,
    Task,
    TrafficWindow,
)
from contracts.envelope import EventPayload

TOPIC = "mlops.training"


class TrainingTrigger(StrEnum):
    """What asked for a retrain."""

    DRIFT_DETECTED = "drift-detected"
    PERFORMANCE_DEGRADED = "performance-degraded"
    MANUAL = "manual"
    DATASET_REGISTERED = "dataset-registered"
    INITIAL = "initial"


class SkipReason(StrEnum):
    """Why the retrain policy refused a trigger."""

    COOLDOWN = "cooldown"
    IN_FLIGHT = "in-flight"
    BUDGET_EXHAUSTED = "budget-exhausted"
    NOT_ENOUGH_LABELS = "not-enough-labels"
    NO_DATASET = "no-dataset"
    POLICY_DISABLED = "policy-disabled"
    UNKNOWN_MODEL = "unknown-model"
    # The trigger judged a version that is not in production (a canary is judged by its rollout instead).
    NOT_PRODUCTION = "not-production"


class FailureReason(StrEnum):
    """Why a training job failed."""

    INVALID_SPEC = "invalid-spec"
    UNKNOWN_ESTIMATOR = "unknown-estimator"
    UNKNOWN_FEATURE = "unknown-feature"
    DATASET_UNAVAILABLE = "dataset-unavailable"
    DATASET_TOO_SMALL = "dataset-too-small"
    FIT_ERROR = "fit-error"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker-lost"
    ARTIFACT_STORE_ERROR = "artifact-store-error"
    # The model was fitted and stored, but recording the job's outcome failed (a bug, or a conflict in
    # training's own tables): failed once, naming the error, rather than fitted again as a lost worker.
    COMPLETION_ERROR = "completion-error"


class ModelSpecRegistered(EventPayload):
    """An operator registered (or replaced) a model's spec with the training service: features, estimator,
    retrain policy and validation gates. The actor in the envelope says who."""

    event_name: ClassVar[str] = "ModelSpecRegistered"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model the spec is for.", examples=["churn"])
    spec_hash: Sha256Hex = Field(description="sha256 of the canonical spec JSON (equal to `spec.key`).")
    spec: ArtifactRef = Field(description="The canonical spec (JSON) in the artifact store.")
    task: Task = Field(description="Classification or regression.", examples=["classification"])
    estimator: Identifier = Field(
        min_length=1,
        description="Estimator name from the training service's registry.",
        examples=["random_forest"],
    )
    base_datasets: list[DatasetName] = Field(
        default_factory=list, description="Datasets whose latest versions are the base training data."
    )
    previous_spec_hash: Sha256Hex | None = Field(
        default=None, description="The spec it replaces; null for the model's first spec."
    )


class TrainingRequested(EventPayload):
    """The retrain policy accepted a trigger and created a training job."""

    event_name: ClassVar[str] = "TrainingRequested"
    topic: ClassVar[str] = TOPIC

    job_id: JobId = Field(
        min_length=1, description="Training job id (at most 512 characters).", examples=["job-2f6c1d0e"]
    )
    model: ModelName = Field(description="Model to train.", examples=["churn"])
    trigger: TrainingTrigger = Field(description="What asked for the retrain.", examples=["drift-detected"])
    reason: ComposedReason = Field(
        description=f"Why, for people: {COMPOSED_REASON_TEXT}.",
        examples=["drift in 4 of 30 features (share 0.13 >= 0.10)"],
    )
    trigger_event: EventRef | None = Field(
        default=None, description="The event that triggered it (null for a request with no event behind it)."
    )
    datasets: list[DatasetRef] = Field(
        default_factory=list,
        description="Base dataset versions to train on; empty means the ones the model's spec names.",
    )
    traffic_window: TrafficWindow | None = Field(
        default=None, description="Recent labelled traffic to add to the training set, when there is some."
    )
    parent_version: ModelVersion | None = Field(
        default=None, description="The model's production version when the job was created.", examples=[6]
    )


class TrainingSkipped(EventPayload):
    """The retrain policy refused a trigger; no job was created."""

    event_name: ClassVar[str] = "TrainingSkipped"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model that was not retrained.", examples=["churn"])
    trigger: TrainingTrigger = Field(description="What asked for the retrain.", examples=["drift-detected"])
    trigger_event: EventRef | None = Field(default=None, description="The event that was refused, if any.")
    reason: SkipReason = Field(description="Machine-readable reason.", examples=["cooldown"])
    message: FreeText = Field(
        description="What happened and what would change the decision, for people.",
        examples=["last run finished 12 min ago; cooldown is 30 min (next possible at 14:05Z)"],
    )
    in_flight_job_id: JobId | None = Field(
        default=None, description="The job already running, when the reason is `in-flight`."
    )
    retry_after_seconds: float | None = Field(
        default=None,
        ge=0,
        description="Seconds until the policy would accept again, when known.",
        examples=[1080],
    )


class TrainingStarted(EventPayload):
    """A worker started (or resumed) a training job."""

    event_name: ClassVar[str] = "TrainingStarted"
    topic: ClassVar[str] = TOPIC

    job_id: JobId = Field(
        min_length=1, description="Training job id (at most 512 characters).", examples=["job-2f6c1d0e"]
    )
    run_id: RunId = Field(
        min_length=1,
        description="Id of this run (one per attempt; at most 512 characters).",
        examples=["run-8a41b7"],
    )
    model: ModelName = Field(description="Model being trained.", examples=["churn"])
    attempt: int = Field(
        ge=1,
        le=PG_INTEGER_MAX,
        description="1 for the first run; higher when a job is resumed.",
        examples=[1],
    )
    spec_hash: Sha256Hex = Field(description="sha256 of the canonical model spec in use.")
    datasets: list[DatasetRef] = Field(
        min_length=1, description="The resolved training set: every dataset version, pinned by sha256."
    )


class TrainingProgress(EventPayload):
    """Progress of a long training run, published at most every few seconds."""

    event_name: ClassVar[str] = "TrainingProgress"
    topic: ClassVar[str] = TOPIC

    job_id: JobId = Field(
        min_length=1, description="Training job id (at most 512 characters).", examples=["job-2f6c1d0e"]
    )
    run_id: RunId = Field(
        min_length=1, description="Run id (at most 512 characters).", examples=["run-8a41b7"]
    )
    model: ModelName = Field(description="Model being trained.", examples=["churn"])
    phase: Identifier = Field(
        min_length=1,
        description="Current phase: loading-data, fitting, evaluating, profiling, storing.",
        examples=["fitting"],
    )
    fraction: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Share of the run done, when it can be estimated.",
        examples=[0.4],
    )
    elapsed_seconds: float = Field(ge=0, description="Seconds since the run started.", examples=[12.5])


class TrainingCompleted(EventPayload):
    """A training run produced a model: artifact, reference profile, holdout metrics and full lineage."""

    event_name: ClassVar[str] = "TrainingCompleted"
    topic: ClassVar[str] = TOPIC

    job_id: JobId = Field(
        min_length=1, description="Training job id (at most 512 characters).", examples=["job-2f6c1d0e"]
    )
    run_id: RunId = Field(
        min_length=1,
        description="Run id (at most 512 characters); the registry creates exactly one version per run id.",
        examples=["run-8a41b7"],
    )
    model: ModelName = Field(description="Model trained.", examples=["churn"])
    artifact: ArtifactRef = Field(description="The fitted scikit-learn pipeline, saved with skops.")
    profile: ArtifactRef = Field(
        description="The reference profile monitoring compares live traffic with (JSON: per-feature quantile "
        "bins and histograms, category frequencies of the levels the model keeps with the other levels' "
        "values in one bin, a bounded sample for KS)."
    )
    metrics: dict[Identifier, float] = Field(
        description="Holdout metrics by name.", examples=[{"roc_auc": 0.861, "accuracy": 0.842, "f1": 0.611}]
    )
    signature: ModelSignature = Field(description="Features, target, task and classes of the model.")
    lineage: Lineage = Field(description="Data, spec, code and parameters that made the model.")
    train_rows: int = Field(
        ge=1, le=PG_BIGINT_MAX, description="Rows the model was fitted on.", examples=[40000]
    )
    holdout_rows: int = Field(
        ge=0, le=PG_BIGINT_MAX, description="Rows the metrics were computed on.", examples=[10000]
    )
    duration_seconds: float = Field(ge=0, description="Wall time of the run.", examples=[8.7])
    categories_seen: dict[Identifier, Annotated[int, Field(ge=0, le=PG_BIGINT_MAX)]] = Field(
        default_factory=dict,
        description="Categorical features whose training rows held levels the model does not keep: feature "
        "name -> distinct levels seen. A model keeps the categories its spec declares for a feature, else at "
        "most the 1,000 most frequent levels, of at most 256 characters each (docs/training.md, 'Categories "
        "kept'): the signature lists those, and the values of the others are treated as unseen. Empty when "
        "every level was kept.",
        examples=[{"customer_id": 48213}],
    )


class TrainingFailed(EventPayload):
    """A training job failed; it will not complete."""

    event_name: ClassVar[str] = "TrainingFailed"
    topic: ClassVar[str] = TOPIC

    job_id: JobId = Field(
        min_length=1, description="Training job id (at most 512 characters).", examples=["job-2f6c1d0e"]
    )
    run_id: RunId | None = Field(default=None, description="Run id, when a run had started.")
    model: ModelName = Field(description="Model that was being trained.", examples=["churn"])
    reason: FailureReason = Field(description="Machine-readable reason.", examples=["unknown-feature"])
    message: FreeText = Field(
        description="What was wrong and what to do, for people.",
        examples=[
            "spec names feature 'tenure' which is not a column of churn-base v3 (did you mean "
            "'tenure_months'?)"
        ],
    )
    attempt: int = Field(
        default=1, ge=1, le=PG_INTEGER_MAX, description="The attempt that failed.", examples=[1]
    )
    duration_seconds: float | None = Field(default=None, ge=0, description="Wall time until the failure.")
