"""Dataset events: an immutable, content-hashed dataset version became available."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from contracts.common import (
    PG_BIGINT_MAX,
    ArtifactRef,
    DatasetName,
    DatasetRef,
    DatasetVersion,
    FreeText,
    Identifier,
    ModelName,
    Sha256Hex,
)
from contracts.envelope import EventPayload

TOPIC = "mlops.datasets"

TRAINING_SET_SUFFIX = "-training"
"""Each training run registers its training set (base data and labelled traffic, before the holdout split)
as the dataset ``<model>-training``."""
HOLDOUT_SUFFIX = "-holdout"
"""... and its holdout rows as ``<model>-holdout``. Training numbers the versions of these names in its own
tables, so they are reserved for it: the registry refuses uploads under them (two writers numbering one
name would give one version number to two files)."""


DATASET_MODELS_MAX = 100
"""The most models one dataset version may name: training decides on a retrain for each when the dataset is
announced (one TrainingSkipped or TrainingRequested apiece, in one transaction), and the registry looks each
up when a file is uploaded."""


def is_training_output(name: str) -> bool:
    """Whether ``name`` has the form of a name training registers its output under (reserved for it)."""
    return name.endswith((TRAINING_SET_SUFFIX, HOLDOUT_SUFFIX))


class DatasetRegistered(EventPayload):
    """A dataset version was stored, verified and registered; its bytes never change."""

    event_name: ClassVar[str] = "DatasetRegistered"
    topic: ClassVar[str] = TOPIC
    # Dataset events are keyed by dataset name: a dataset may serve several models.
    subject_field: ClassVar[str | None] = "name"

    name: DatasetName = Field(description="Dataset name.", examples=["churn-base"])
    dataset_version: DatasetVersion = Field(
        description="Version number within the name; the producer that registers a name owns its numbering.",
        examples=[3],
    )
    sha256: Sha256Hex = Field(
        description="sha256 of the stored file's bytes (equal to `artifact.key`).",
        examples=["b277fd623676a525c29b9eb155afc8c9010681814ceafb2d7627f47b9a232576"],
    )
    artifact: ArtifactRef = Field(description="The dataset file in the artifact store (Parquet or CSV).")
    row_count: int = Field(ge=0, le=PG_BIGINT_MAX, description="Number of rows.", examples=[50000])
    columns: dict[Identifier, Identifier] = Field(
        min_length=1,
        description="Column name -> dtype, in file order (pandas dtype names: int64, float64, string, ...).",
        examples=[{"tenure_months": "int64", "plan": "string", "churned": "int64"}],
    )
    source: Identifier = Field(
        min_length=1,
        description="Where the data came from: `upload`, `traffic-window:<window id>`, "
        "`training-set:<job id>`, or a URL.",
        examples=["upload", "traffic-window:churn:7:000142"],
    )
    derived_from: list[DatasetRef] = Field(
        default_factory=list,
        description="Dataset versions this one was built from (training set = base data + traffic window).",
    )
    models: list[ModelName] = Field(
        default_factory=list,
        max_length=DATASET_MODELS_MAX,
        description="Models this dataset is meant for, when the producer knows; training policies may "
        f"retrain them on new data. At most {DATASET_MODELS_MAX}.",
        examples=[["churn"]],
    )
    description: FreeText | None = Field(
        default=None, description="Free text for people.", examples=["Q3 export"]
    )

    def ref(self) -> DatasetRef:
        """This version as a :class:`DatasetRef`, for lineage."""
        return DatasetRef(
            name=self.name, version=self.dataset_version, sha256=self.sha256, rows=self.row_count
        )
