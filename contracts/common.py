"""Value types shared by several event families: names, hashes, artifacts, datasets, signatures, lineage.

These are not events on their own; payloads embed them. They follow the same rules as payloads (frozen,
no unknown fields, every field described) so a nested object is as strict as the event around it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Self, TypeAlias

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

# A model or dataset name travels as the Kafka key and appears in URLs and file names, so it is kept to a
# safe alphabet rather than trusting every producer to escape it.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
ModelName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
DatasetName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]

# Artifacts live in a content-addressed store: the key of an artifact is the sha256 of its bytes.
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]

VERSION_MAX = 2**31 - 1
"""Every service stores versions as Postgres integers: a larger number cannot name a version anywhere."""

ModelVersion = Annotated[int, Field(ge=1, le=VERSION_MAX)]
"""Model versions are numbered 1, 2, 3, ... per model by the registry."""

DatasetVersion = Annotated[int, Field(ge=1, le=VERSION_MAX)]
"""Dataset versions are numbered 1, 2, 3, ... per dataset name by whoever registers the name."""


def _has_utc_form(value: datetime) -> datetime:
    try:
        value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError(
            "the time has no UTC form (it falls before year 1 or after year 9999 in UTC)"
        ) from exc
    return value


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_has_utc_form)]
"""A time with its UTC offset that has a UTC form: every consumer stores times in UTC (Postgres'
``timestamptz`` among them), so ``0001-01-01T00:00:00+01:00`` is refused where it is made."""

EventId = Annotated[str, StringConstraints(min_length=1, max_length=128)]

JsonScalar: TypeAlias = bool | int | float | str | None
"""A hyper-parameter value: params are flat so they can be compared and diffed across versions."""

Label: TypeAlias = bool | int | float | str
"""A target value: a class label (string, integer or boolean) or a regression target (number)."""

FeatureValue: TypeAlias = bool | int | float | str | None
"""One input value; ``null`` means missing (NaN and infinity are sent as ``null`` too: JSON has neither)."""

Category: TypeAlias = bool | int | str
"""One level of a categorical feature."""


class ContractModel(BaseModel):
    """Base of the value types embedded in payloads: frozen, no unknown fields, finite numbers only."""

    # allow_inf_nan=False: JSON has no NaN, and orjson would silently write it as null, which the
    # consumer then rejects; refusing it at construction puts the error where the bug is.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Stage(StrEnum):
    """Where a model version is in its life: candidate -> canary -> production -> archived, or rejected."""

    CANDIDATE = "candidate"
    CANARY = "canary"
    PRODUCTION = "production"
    ARCHIVED = "archived"
    REJECTED = "rejected"


class FeatureType(StrEnum):
    """How a feature is treated by the model and by drift tests."""

    NUMERIC = "numeric"
    CATEGORICAL = "categorical"


class Task(StrEnum):
    """The learning task of a model."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"


class ArtifactFormat(StrEnum):
    """Serialisation of an artifact in the store."""

    SKOPS = "skops"
    PARQUET = "parquet"
    CSV = "csv"
    JSON = "json"


class EventRef(ContractModel):
    """A pointer to another event, by id and CloudEvents type."""

    id: EventId = Field(
        description="The event's CloudEvents `id`.", examples=["5b0e7c1e-6a8d-4f0b-9d55-0c0f0c3e1a77"]
    )
    type: str = Field(
        description="The event's CloudEvents `type`.", examples=["io.driftloop.DriftDetected.v1"]
    )


class ArtifactRef(ContractModel):
    """A file in the content-addressed artifact store: model, dataset, reference profile or window data."""

    key: Sha256Hex = Field(
        description="sha256 of the artifact's bytes, lowercase hex; also its key in the store, and what "
        "every reader verifies after loading.",
        examples=["9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4"],
    )
    uri: str = Field(
        description="Where the store keeps it (file:// or any fsspec URL); informative, the key decides.",
        examples=[
            "file:///srv/driftloop/artifacts/93/9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4"
        ],
    )
    format: ArtifactFormat = Field(description="How the bytes are serialised.", examples=["skops"])
    size_bytes: int = Field(ge=0, description="Size of the artifact in bytes.", examples=[482113])


class DatasetRef(ContractModel):
    """One immutable dataset version, pinned by content hash (used for lineage and training inputs)."""

    name: DatasetName = Field(description="Dataset name.", examples=["churn-base"])
    version: DatasetVersion = Field(description="Dataset version number within the name.", examples=[3])
    sha256: Sha256Hex = Field(
        description="sha256 of the dataset file's bytes; also its key in the artifact store.",
        examples=["b277fd623676a525c29b9eb155afc8c9010681814ceafb2d7627f47b9a232576"],
    )
    rows: int | None = Field(default=None, ge=0, description="Row count, when known.", examples=[50000])


class FeatureSpec(ContractModel):
    """One input feature of a model's signature."""

    name: str = Field(min_length=1, description="Feature (column) name.", examples=["tenure_months"])
    type: FeatureType = Field(description="Numeric or categorical.", examples=["numeric"])
    categories: list[Category] | None = Field(
        default=None,
        description="Known levels of a categorical feature, in training order; other values are treated as "
        "unseen. Null for numeric features.",
        examples=[["basic", "plus", "premium"]],
    )


class ModelSignature(ContractModel):
    """What a model takes and gives: features with types, the target, the task and the classes."""

    features: list[FeatureSpec] = Field(min_length=1, description="Input features, in the model's order.")
    target: str = Field(min_length=1, description="Name of the target column.", examples=["churned"])
    task: Task = Field(description="Classification or regression.", examples=["classification"])
    classes: list[Label] | None = Field(
        default=None,
        description="Class labels in the order of the model's probability outputs; classification only.",
        examples=[[0, 1]],
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if self.target in names:
            raise ValueError(f"the target {self.target!r} must not also be a feature")
        if self.task is Task.CLASSIFICATION and not self.classes:
            raise ValueError("a classification signature must list its classes")
        if self.task is Task.REGRESSION and self.classes is not None:
            raise ValueError("a regression signature has no classes")
        return self


class Lineage(ContractModel):
    """Where a model version came from: the data, spec, code and parameters that rebuild it."""

    datasets: list[DatasetRef] = Field(
        min_length=1, description="Every dataset version the model was trained on, pinned by sha256."
    )
    holdout: DatasetRef | None = Field(
        default=None,
        description="The held-out rows the metrics were computed on, stored as a dataset so validation can "
        "score champion and challenger on the same rows.",
    )
    spec_hash: Sha256Hex = Field(
        description="sha256 of the canonical model spec (features, target, estimator, params, preprocessing)",
        examples=["d4f02eaafd1a9e9de7d10972ca8e47fa7a985825c3c9c1e249c72683cb3e4f19"],
    )
    params: dict[str, JsonScalar] = Field(
        default_factory=dict,
        description="Estimator and preprocessing parameters, flattened (`estimator__max_depth`).",
        examples=[{"estimator": "HistGradientBoostingClassifier", "estimator__max_depth": 6}],
    )
    code_version: str = Field(
        min_length=1,
        description="Version of the training code: a git commit or a package version.",
        examples=["c165da6"],
    )
    parent_version: ModelVersion | None = Field(
        default=None,
        description="The version that was in production when this one was trained (null for the first).",
        examples=[6],
    )
    seed: int = Field(description="Random seed of the run; same data, spec and seed give the same model.")
    environment: dict[str, str] = Field(
        default_factory=dict,
        description="Versions of the libraries the model was trained with (scikit-learn, numpy, ...).",
        examples=[{"python": "3.11.9", "scikit-learn": "1.9.1"}],
    )
    spec: ArtifactRef | None = Field(
        default=None,
        description="The canonical model spec (JSON) in the artifact store, so validation can read its "
        "validation section; null for versions trained before specs were stored.",
    )


class TrafficWindow(ContractModel):
    """A window of live traffic for one model version, as judged by monitoring."""

    id: str = Field(min_length=1, description="Window id, unique per model.", examples=["churn:7:000142"])
    start: UtcDatetime = Field(description="Time of the first prediction in the window.")
    end: UtcDatetime = Field(description="Time of the last prediction in the window.")
    size: int = Field(ge=0, description="Number of predictions (rows) in the window.", examples=[5000])
    data: ArtifactRef | None = Field(
        default=None,
        description="The window's rows (inputs, prediction, joined label when there is one) as Parquet in "
        "the artifact store, so training can learn from recent traffic; null when not kept.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.end < self.start:
            raise ValueError("window end is before its start")
        return self
