"""The registry's read models and HTTP bodies (``XCreate`` in, ``XPublic`` out).

They are not Kafka events: the contracts stay the wire format between services, and these are what
people and client programs see. The Postgres adapter builds the ``XPublic`` models; the API returns them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, computed_field

from contracts.common import ArtifactRef, DatasetRef, Lineage, ModelSignature, ModelVersion, Stage
from contracts.models import TAG_VALUE_MAX_CHARS
from libs.http import Reason, Text


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True)


class StageChangePublic(_Public):
    """One entry of a version's stage history."""

    from_stage: Stage | None = Field(description="Stage before; null for the registration itself.")
    to_stage: Stage = Field(description="Stage after.")
    reason: str = Field(description="Why, for people.")
    actor: str | None = Field(description="Who asked, when a person did (`user:alice`).")
    source: str = Field(description="The service whose event caused the change (`/driftloop/serving`).")
    event_id: str = Field(description="Id of the event that caused the change.")
    event_type: str = Field(description="Type of that event.")
    correlation_id: str = Field(description="The cascade the change belongs to.")
    changed_at: datetime = Field(description="When the registry recorded it.")
    sequence: int | None = Field(
        default=None,
        description="The change's number among the model's stage changes (`ModelStageChanged.sequence`); "
        "null for the registration and for changes made before the registry numbered them.",
    )


class ValidationReportPublic(_Public):
    """A validation outcome the registry received (ValidationPassed or ValidationFailed)."""

    report_id: str = Field(description="The validation service's report id.")
    passed: bool = Field(description="Whether every check passed.")
    checks: list[dict[str, Any]] = Field(
        description="The checks as the validation event carried them: every check, unless `checks_truncated`."
    )
    failed_checks: list[str] = Field(
        description="Names of the failed checks the event named: all of them, unless `checks_truncated`."
    )
    champion_version: int | None = Field(description="The production version it was compared with.")
    holdout: DatasetRef | None = Field(description="The rows both were scored on.")
    event_id: str = Field(description="Id of the validation event.")
    received_at: datetime = Field(description="When the registry recorded it.")
    checks_truncated: bool = Field(
        False,
        description="The report was too large for its event, which carried part of it: `checks` and "
        "`failed_checks` hold what it carried, the totals count every check, and validation serves the whole "
        "report at `full_report_path`.",
    )
    checks_total: int | None = Field(
        None,
        description="How many checks ran (more than `checks` holds when `checks_truncated`); null for "
        "reports the registry received before it kept the count.",
    )
    failed_checks_total: int | None = Field(
        None,
        description="How many checks failed (more than `failed_checks` names when `checks_truncated`); null "
        "for reports the registry received before it kept the count.",
    )

    @computed_field(  # type: ignore[prop-decorator]
        description="Path of the whole report, every check in full, on the validation service's HTTP API "
        "(`GET`, viewer role)."
    )
    @property
    def full_report_path(self) -> str:
        return f"/v1/reports/{quote(self.report_id, safe='')}"


class VersionSummaryPublic(_Public):
    """A model version in a list."""

    model: str = Field(description="Model name.")
    version: int = Field(description="Version number, 1, 2, ... per model.")
    stage: Stage = Field(description="Current stage.")
    aliases: list[str] = Field(description="Aliases the version holds (`champion`, `challenger`).")
    tags: dict[str, str] = Field(description="Tags on the version.")
    run_id: str = Field(description="The training run that produced it.")
    metrics: dict[str, float] = Field(description="Holdout metrics from training.")
    created_at: datetime = Field(description="When it was registered.")
    stage_changed_at: datetime = Field(description="When its stage last changed.")


class LineageDatasetPublic(_Public):
    """A dataset version a model version was trained or evaluated on."""

    role: str = Field(description="`training` or `holdout`.")
    name: str = Field(description="Dataset name.")
    version: int = Field(description="Dataset version.")
    sha256: str = Field(description="Content hash of the dataset file.")
    rows: int | None = Field(description="Row count, when known.")
    registered: bool = Field(description="Whether the registry holds this dataset version.")
    source: str | None = Field(description="Where the dataset came from, when registered.")


class LineagePublic(_Public):
    """Where a version came from."""

    run_id: str = Field(description="Training run.")
    job_id: str = Field(description="Training job.")
    correlation_id: str = Field(description="The cascade that produced it (drift -> retrain -> ...).")
    datasets: list[LineageDatasetPublic] = Field(description="Training and holdout dataset versions.")
    document: Lineage = Field(description="The full lineage as training sent it.")


class VersionPublic(VersionSummaryPublic):
    """One model version with everything the registry knows about it."""

    job_id: str = Field(description="The training job that produced it.")
    artifact: ArtifactRef = Field(description="The model file (skops).")
    profile: ArtifactRef = Field(description="The reference profile (JSON).")
    signature: ModelSignature = Field(description="Features, target, task and classes.")
    train_rows: int = Field(description="Rows the model was fitted on.")
    holdout_rows: int = Field(description="Rows the metrics were computed on.")
    duration_seconds: float = Field(description="Training wall time.")
    lineage: LineagePublic = Field(description="Data, spec, code and parameters that made it.")
    stage_history: list[StageChangePublic] = Field(description="Every stage change, oldest first.")
    validation_reports: list[ValidationReportPublic] = Field(description="Validation outcomes, oldest first.")


class ModelPublic(_Public):
    """A registered model."""

    name: str = Field(description="Model name.")
    latest_version: int = Field(description="Highest version number.")
    aliases: dict[str, int] = Field(description="Alias -> version (`champion` is the production version).")
    stages: dict[str, int] = Field(description="Number of versions per stage.")
    created_at: datetime = Field(description="When its first version was registered.")
    updated_at: datetime = Field(description="When a version was last registered.")


class DatasetPublic(_Public):
    """One dataset version."""

    name: str = Field(description="Dataset name.")
    version: int = Field(description="Version within the name.")
    sha256: str = Field(description="Content hash of the stored file; its artifact key.")
    artifact: ArtifactRef = Field(description="The stored file.")
    row_count: int = Field(description="Rows.")
    columns: dict[str, str] = Field(description="Column -> dtype, in file order.")
    source: str = Field(description="`upload`, `training-set:<job>`, `traffic-window:<window>`, ...")
    derived_from: list[DatasetRef] = Field(description="Dataset versions it was built from.")
    models: list[str] = Field(description="Models it is meant for.")
    description: str | None = Field(description="Free text.")
    registered_by: str | None = Field(description="Who uploaded it.")
    event_id: str = Field(description="The DatasetRegistered event.")
    created_at: datetime = Field(description="When the registry recorded it.")


class Page(_Public):
    """One page of a list, with the cursor of the next page."""

    items: list[Any] = Field(description="The page's items.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on a page holding fewer items than `limit` (a "
        "full last page is followed by an empty one)."
    )


class ModelPage(Page):
    items: list[ModelPublic]


class VersionPage(Page):
    items: list[VersionSummaryPublic]


class DatasetPage(Page):
    items: list[DatasetPublic]


class DatasetUploaded(_Public):
    """The outcome of an upload: the dataset version, and whether it is new."""

    created: bool = Field(description="False when the same content was already the name's version.")
    dataset: DatasetPublic = Field(description="The dataset version.")


class CommandCreate(BaseModel):
    """A manual command on a model version."""

    # Strict: each field takes its own JSON type only. Lax, `"to_version": true` was version 1 (a rollback
    # to another version than any the caller wrote), `1.0` and `"2"` were versions, and `"ignore_cooldown":
    # "no"`, `"off"` or `0` were read as false and `"yes"` or `1` as true.
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: Reason = Field(description="Why, for the audit trail (not only white space).")


class RollbackCreate(CommandCreate):
    to_version: ModelVersion | None = Field(
        default=None, description="Version to serve instead, when rolling back production."
    )


class RetrainCreate(CommandCreate):
    ignore_cooldown: bool = Field(default=False, description="Bypass the retrain policy's cooldown.")


class CommandAccepted(_Public):
    """A command became an event; its outcome arrives as ordinary events (stage changes, rollouts)."""

    event_id: str = Field(description="Id of the command event.")
    event_type: str = Field(description="Type of the command event.")
    topic: str = Field(description="Where it was published.")
    actor: str = Field(description="Who asked.")


class TagCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: Text = Field(max_length=TAG_VALUE_MAX_CHARS, description="Tag value.")


class TagPublic(_Public):
    """A tag as set."""

    key: str = Field(description="Tag key.")
    value: str = Field(description="Tag value.")
