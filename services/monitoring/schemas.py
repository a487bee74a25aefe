"""The answers of monitoring's JSON routes, for the OpenAPI document.

The routes build their answers as dicts (a window's report is stored as JSON and handed out as it was
stored), and these models are never used to check one: they name the fields a client relies on
(docs/monitoring.md), so a generated client reads a drift report or the status as what they are, not as
``Any``. A window's report may hold more than is named here (``additionalProperties``): a field added later
is not refused, and a report stored before a field was added lacks it, which is why only the fields every
report has are required. The unit tests check that the routes' real answers validate against the document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.common import FeatureType, Task
from contracts.monitoring import DriftTest


class _Report(BaseModel):
    """A part of a stored report: what is named here, and whatever a later report adds."""

    model_config = ConfigDict(extra="allow")


class WindowSpan(_Report):
    id: str = Field(description="The window's id (`<model>:<version>:<number>`), for its own report.")
    start: datetime
    end: datetime
    size: int = Field(description="Predictions in the window.")


class Histogram(_Report):
    """Reference and current shares over the same bins, for the HTML report."""

    labels: list[str]
    reference: list[float]
    current: list[float]


class FeatureReport(_Report):
    """One feature's evidence in a window (or the predictions'), as DriftDetected carries it, and more."""

    feature: str = Field(description="Feature name, or `prediction` for prediction drift.")
    feature_type: FeatureType
    test: DriftTest
    statistic: float = Field(description="The test statistic or distance.")
    p_value: float | None = Field(default=None, description="After the correction for many features.")
    threshold: float
    drifted: bool = Field(description="Verdict for this window, before debouncing.")
    consecutive_windows: int | None = Field(default=None, description="Windows in a row it drifted.")
    n_current: int | None = None
    n_reference: int | None = None
    n_missing: int | None = None
    p_value_raw: float | None = Field(default=None, description="Before the correction.")
    p_value_draws: int | None = Field(
        default=None,
        description="Tables drawn for a Monte Carlo p-value (chi-square on a sparse table whose asymptotic "
        "p-value would count as drift); null: the test's own distribution gave it.",
    )
    untested: str | None = Field(default=None, description="Why the window could not be tested, if so.")
    histogram: Histogram | None = None


class QualityFinding(_Report):
    kind: Literal["missing-values", "unseen-category", "out-of-range", "type-mismatch"]
    feature: str
    count: int
    share: float
    message: str


class WindowReport(_Report):
    """One judged window's report: ``GET /v1/models/{model}/windows/{window_id}``, and each of ``/drift``."""

    model: str
    model_version: int
    window: WindowSpan
    correction: str | None = Field(default=None, description="The multiple-testing correction used.")
    alpha: float | None = None
    drift_share: float = Field(description="Drifted tested features / tested features.")
    debounced_share: float | None = Field(default=None, description="The same, after debouncing.")
    drifted_features: list[str]
    debounced_features: list[str] | None = None
    alerted: bool = Field(description="Whether the window raised a DriftDetected.")
    features: list[FeatureReport]
    prediction: FeatureReport | None = Field(default=None, description="Prediction drift, when profiled.")
    quality: list[QualityFinding] | None = None


class DriftPage(BaseModel):
    """``GET /v1/models/{model}/drift``: a page of the model's window reports, newest first."""

    model: str
    windows: list[WindowReport]
    next_cursor: str | None = Field(description="The next page's cursor; null after the last page.")


class LabelCounts(BaseModel):
    """Ground-truth labels of a model, each counted once per prediction id (absent: none yet)."""

    labelled: int | None = Field(default=None, description="Labels joined to their prediction.")
    late: int | None = Field(default=None, description="Of those, labels whose drift window had closed.")
    unmatched: int | None = Field(default=None, description="Labels expired without their prediction.")
    waiting: int | None = Field(default=None, description="Labels waiting for their prediction.")


class OpenWindow(BaseModel):
    seq: int = Field(description="The window's number.")
    rows: int = Field(description="Predictions in it so far.")


class VersionStatus(BaseModel):
    task: Task
    features: int = Field(description="Features in the reference profile.")
    open_window: OpenWindow | None
    baseline: dict[str, float | None] = Field(description="Training's metrics, the performance baseline.")
    labels_outside_classes: int = Field(description="Joined labels that name none of the version's classes.")


class LastWindow(BaseModel):
    id: str
    end: datetime
    drift_share: float
    drifted_features: list[str]
    alerted: bool


class AlertPublic(BaseModel):
    event_id: str
    model: str
    version: int | None
    kind: str
    summary: str
    created_at: datetime


class RolloutWatched(BaseModel):
    rollout_id: str
    step_index: int
    canary_version: int


class ModelStatus(BaseModel):
    versions: dict[str, VersionStatus] = Field(description="Per version monitored.")
    labels: LabelCounts
    last_window: LastWindow | None = Field(description="The newest judged window's outcome.")
    recent_alerts: list[AlertPublic] = Field(description="The newest alerts, newest first.")
    rollouts: list[RolloutWatched] = Field(description="Rollout steps watched.")


class SkippedRows(BaseModel):
    model: str
    version: int
    rows_skipped: int


class _EarlyStep(BaseModel):
    """A rollout step whose event came before its rollout's start."""

    rollout_id: str
    model: str
    step_index: int
    stable_version: int | None
    canary_version: int
    kept_at: datetime


class StepKept(_EarlyStep):
    """A rollout step whose event came before its rollout's start, kept for it."""

    started_at: datetime
    expires_at: datetime = Field(description="When it is given up if the start has not come.")
    canary_samples: int
    stable_samples: int


class StepGivenUp(_EarlyStep):
    """A rollout's highest step given up for want of its start."""

    given_up_at: datetime | None


class NotReplayed(BaseModel):
    deadline: dict[str, int] = Field(description="Per partition, records left unread at the deadline.")
    deleted: dict[str, int] = Field(description="Per partition, records the broker had deleted.")


class ReplayPublic(BaseModel):
    records: int
    seconds: float
    complete: bool
    not_replayed: NotReplayed


class MonitoringStatus(BaseModel):
    """``GET /v1/status``: every model monitoring knows, and what it holds back."""

    models: dict[str, ModelStatus] = Field(description="Per model name.")
    unknown: list[SkippedRows] = Field(description="Rows skipped: their version is not registered.")
    unknown_rows_not_listed: int
    skipped_before_registration: list[SkippedRows] = Field(
        description="Rows skipped before their version was registered."
    )
    windows_waiting_for_judgement: int
    cached_predictions: int
    labels_waiting_for_prediction: int
    rollout_steps_kept: list[StepKept]
    rollout_steps_given_up: list[StepGivenUp]
    replay: ReplayPublic | None = Field(description="The startup replay, when one ran.")
