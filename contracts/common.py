"""Value types shared by several event families: names, hashes, artifacts, datasets, signatures, lineage.

These are not events on their own; payloads embed them. They follow the same rules as payloads (frozen,
no unknown fields, every field described) so a nested object is as strict as the event around it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Self, TypeAlias

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StringConstraints,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

# --- text every service can store ---------------------------------------------------------------------
#
# Services store what events carry in Postgres text and jsonb columns, which cannot hold a NUL character,
# and write it as UTF-8, which has no form for a lone surrogate (an unpaired \ud800-\udfff). The JSON
# readers consumers use (orjson, pydantic's) already refuse lone surrogates; NUL is valid JSON ("\u0000").
# Each kind of string has one rule:
#   * ids, names and keys, and the categories, classes and parameters a model is stored with (Identifier,
#     Storable): refused, so the event is dead-lettered as schema-invalid naming the field, and a producer
#     that builds one gets a ValidationError where it builds it (an HTTP edge refuses them first, with 422);
#   * free text for people (FreeText: reasons, messages, details, descriptions): NUL and lone surrogates
#     become NUL_STAND_IN; nothing looks a text up, and a message quoting what it saw stays publishable;
#   * traffic data (a prediction's inputs and output, a ground-truth label): carried exactly, as the caller
#     sent it; whoever stores it writes NUL as NUL_STAND_IN (monitoring).
# Integers in the Storable containers (categories, classes, parameters) are int64s, or refused the same way:
# orjson cannot write a larger one to jsonb, and numpy cannot hold it. Integer fields are bounded by the
# column or the library they end up in (PG_INTEGER_MAX, PG_BIGINT_MAX, SEED_MAX).

NUL_STAND_IN = "\ufffd"
"""What a NUL character (or a lone surrogate) becomes in text that is stored but never looked up: U+FFFD, the
replacement character, which keeps the text apart from the same text without it."""

NO_NUL_PATTERN = "^[^\\u0000]*$"
"""The JSON Schema pattern of an :data:`Identifier` (ECMA-262 syntax): no NUL character."""


def unstorable_text(value: str) -> str | None:
    """What keeps a string from being stored and sent as text, or None: a NUL character (Postgres text and
    jsonb refuse it) or a lone surrogate (it has no UTF-8 form; orjson and pydantic's JSON reader refuse one,
    but Python's json, which serving reads bodies with NaN literals with, lets ``"\\ud800"`` through)."""
    if "\x00" in value:
        return "holds a NUL character (\\u0000), which cannot be stored"
    if not value.isascii():  # a flag on the string: O(1)
        try:
            value.encode()
        except UnicodeEncodeError:
            return "holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not valid text"
    return None


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""The integers a category, a class or a parameter may be: what numpy's int64 holds (the datasets a model is
trained on are int64: a larger integer is refused at upload), and what the jsonb encoder (orjson) writes."""


def _unstorable_in(value: Any, where: tuple[str | int, ...] = ()) -> tuple[tuple[str | int, ...], str] | None:
    """(where, why) of the first string in ``value`` (a string, or lists and dicts of them, keys included)
    that cannot be stored, or of the first integer beyond 64 bits, or None. ``where`` is the path to it: list
    indexes and dict keys."""
    if isinstance(value, str):
        why = unstorable_text(value)
        return (where, why) if why is not None else None
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:  # type(): not bool
        return (where, f"is beyond the 64-bit integers that can be stored ({INT64_MIN} to {INT64_MAX})")
    if isinstance(value, dict):
        for key, item in value.items():
            found = _unstorable_in(key, (*where, key)) or _unstorable_in(item, (*where, key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _unstorable_in(item, (*where, i))
            if found is not None:
                return found
    return None


def _refuse_unstorable(value: Any) -> Any:
    found = _unstorable_in(value)
    if found is not None:
        where, why = found
        shown = "".join(f"[{step!r}]" for step in where)
        context: dict[str, Any] = {"where": f"{shown} " if shown else "", "why": why}
        if where:
            # What libs.modelspec names a spec's field from: the error's location, then this path.
            context |= {"field": ".".join(map(str, where)), "message": why}
        raise PydanticCustomError("unstorable", "{where}{why}", context)
    return value


class Storable:
    """``Annotated`` marker: every string in the value (a string, or lists and dicts of them, keys included)
    can be stored as Postgres text (see :func:`unstorable_text`), and every integer in it is an int64, or the
    value is refused. For an id, a name or a key, and for containers whose strings are, such as a
    signature's classes."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(_refuse_unstorable, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        if json_schema.get("type") == "string":
            json_schema["pattern"] = NO_NUL_PATTERN
        _bound_integers(json_schema)
        return json_schema


def _bound_integers(json_schema: Any) -> None:
    """Give every integer in a Storable value's JSON Schema the int64 bounds the validator applies."""
    if isinstance(json_schema, dict):
        if json_schema.get("type") == "integer":
            json_schema.setdefault("minimum", INT64_MIN)
            json_schema.setdefault("maximum", INT64_MAX)
        for item in json_schema.values():
            _bound_integers(item)
    elif isinstance(json_schema, list):
        for item in json_schema:
            _bound_integers(item)


Identifier = Annotated[str, Storable()]
"""An id, a name or a key: services store it in text columns and look things up by it, so a NUL character
or a lone surrogate in it makes the event invalid."""


def _stand_in(value: str) -> str:
    if unstorable_text(value) is None:
        return value
    return "".join(NUL_STAND_IN if c == "\x00" or "\ud800" <= c <= "\udfff" else c for c in value)


FreeText = Annotated[str, AfterValidator(_stand_in)]
"""Text for people (a reason, a message, a detail): a NUL character or a lone surrogate in it becomes
:data:`NUL_STAND_IN`, so it can be stored and shown, and the event stays valid."""

# A model or dataset name travels as the Kafka key and appears in URLs and file names, so it is kept to a
# safe alphabet rather than trusting every producer to escape it.
NAME_MAX_CHARS = 128
"""The longest model or dataset name (NAME_PATTERN)."""
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX_CHARS - 1}}}$"
ModelName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
DatasetName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]

FEATURE_NAME_MAX_CHARS = 256
"""The longest name a feature or a target may be given where it enters: a column of an uploaded dataset (any
column can become a feature) and a feature or the target of a model spec; longer ones are refused there. A
feature's name is a key that travels in every event about its model (a signature, drift evidence,
data-quality findings) and is stored in indexed text columns: 256 characters are at most 1 KiB of UTF-8,
within what one Postgres index entry holds, and half a CloudEvents attribute (MAX_ATTRIBUTE_CHARS).

The contract does not carry the bound (no ``maxLength`` on :attr:`FeatureSpec.name`): consumers still take
the longer names of events, stored signatures and specs made before it, rather than refuse them."""

# Artifacts live in a content-addressed store: the key of an artifact is the sha256 of its bytes.
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]

PG_INTEGER_MAX = 2**31 - 1
"""The largest Postgres ``integer``. A number some consumer stores in such a column (a version, a step index,
an attempt, a count of checks) is bounded by it in the contract, so a larger one is refused when the event is
decoded (dead-lettered as ``schema-invalid``, or 422 at an HTTP edge), not by the insert of a handler."""

PG_BIGINT_MAX = 2**63 - 1
"""The largest Postgres ``bigint`` and numpy ``int64``: the bound of every count of rows, values, samples or
bytes, and of the audit trail's sequence numbers."""

SEED_MAX = 2**32 - 1
"""numpy and scikit-learn take seeds from 0 to 2**32 - 1; a model spec's ``seed`` has the same bounds."""

VERSION_MAX = PG_INTEGER_MAX
"""Every service stores versions as Postgres integers: a larger number cannot name a version anywhere."""

VERSION_TEXT = (
    f"a version is a whole number from 1 to {VERSION_MAX}, in decimal digits with no sign, no leading zero, "
    "no space and no fraction"
)
"""How a version is written as text (a URL path, a prediction id): one way only."""


def parse_version(text: str) -> int | None:
    """The version ``text`` writes as :data:`VERSION_TEXT` says, or None. ``int`` would also read '01', '+1',
    ' 1', '1_0' and '١' (and pydantic '1.0') as versions: one version with many names, or another number
    than the one meant."""
    if not (0 < len(text) <= len(str(VERSION_MAX)) and text.isascii() and text.isdigit()) or text[0] == "0":
        return None
    version = int(text)
    return version if version <= VERSION_MAX else None


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

EventId = Annotated[str, StringConstraints(min_length=1, max_length=128), Storable()]

ID_MAX_CHARS = 512
"""The longest training job or run id an event may carry. Services keep them in indexed columns (training's
jobs, the registry's one version per run): 512 characters are at most 2,048 bytes of UTF-8, which beside the
longest model name fits a Postgres index entry (2,704 bytes); a longer id failed there, retried as if the
database were at fault."""

JobId = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX_CHARS), Storable()]
"""A training job's id: at most :data:`ID_MAX_CHARS` characters, no NUL or lone surrogate."""

RunId = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX_CHARS), Storable()]
"""A training run's id (one per attempt of a job): at most :data:`ID_MAX_CHARS` characters."""

JsonScalar: TypeAlias = bool | int | float | str | None
"""A hyper-parameter value: params are flat so they can be compared and diffed across versions."""

Label: TypeAlias = bool | int | float | str
"""A target value: a class label (string, integer or boolean) or a regression target (number)."""

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32 (``numpy.finfo(numpy.float32).max``): the bound of every number a model takes
or is fitted to, one definition for the platform (:data:`libs.modelspec.FLOAT32_MAX` is this one). Serving
refuses a numeric input beyond it (422): its compiled engine computes in float32, where such a value is
infinity, and the pipeline's answer would be an accident of float64 arithmetic far outside any training data.
So training refuses a numeric feature or a regression target beyond it, as it refuses an infinity (a model
fitted on such values could never be served them, nor predict what it learned), validation a holdout whose
numeric feature holds one, and a ground-truth label beyond it is no event (:data:`GroundTruthLabel`)."""


def label_within_float32(value: Any) -> Any:
    """A label, if it is no number (text, a boolean) or a number within float32's range (:data:`FLOAT32_MAX`);
    a ``label_range`` error otherwise, which names the bound."""
    if (type(value) is int or type(value) is float) and not abs(value) <= FLOAT32_MAX:
        raise PydanticCustomError(
            "label_range",
            "a numeric label must be within float32's range (magnitude at most {limit}), where models "
            "compute; send a smaller number",
            {"limit": f"{FLOAT32_MAX:.8g}"},
        )
    return value


GroundTruthLabel = Annotated[Label, AfterValidator(label_within_float32)]
"""A ground-truth label (traffic data, carried as the caller sent it): a :data:`Label` whose number, if it is
one, is within float32's range. Anything beyond it is refused where it is built (serving's feedback answers
422) or, sent to the topic by another producer, dead-lettered as schema-invalid: every consumer is spared a
label no model predicts (one such label made a regression model's window MAE the label's alone)."""

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
    type: Identifier = Field(
        description="The event's CloudEvents `type`.", examples=["io.driftloop.DriftDetected.v1"]
    )


class ArtifactRef(ContractModel):
    """A file in the content-addressed artifact store: model, dataset, reference profile or window data."""

    key: Sha256Hex = Field(
        description="sha256 of the artifact's bytes, lowercase hex; also its key in the store, and what "
        "every reader verifies after loading.",
        examples=["9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4"],
    )
    uri: Identifier = Field(
        description="Where the store keeps it (file:// or any fsspec URL); informative, the key decides.",
        examples=[
            "file:///srv/driftloop/artifacts/93/9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4"
        ],
    )
    format: ArtifactFormat = Field(description="How the bytes are serialised.", examples=["skops"])
    size_bytes: int = Field(
        ge=0, le=PG_BIGINT_MAX, description="Size of the artifact in bytes.", examples=[482113]
    )


class DatasetRef(ContractModel):
    """One immutable dataset version, pinned by content hash (used for lineage and training inputs)."""

    name: DatasetName = Field(description="Dataset name.", examples=["churn-base"])
    version: DatasetVersion = Field(description="Dataset version number within the name.", examples=[3])
    sha256: Sha256Hex = Field(
        description="sha256 of the dataset file's bytes; also its key in the artifact store.",
        examples=["b277fd623676a525c29b9eb155afc8c9010681814ceafb2d7627f47b9a232576"],
    )
    rows: int | None = Field(
        default=None, ge=0, le=PG_BIGINT_MAX, description="Row count, when known.", examples=[50000]
    )


class FeatureSpec(ContractModel):
    """One input feature of a model's signature."""

    name: Identifier = Field(
        min_length=1,
        description="Feature (column) name. Producers give at most 256 characters (a longer one is refused "
        "where it enters: a dataset upload's columns, a model spec); consumers take longer ones from older "
        "events.",
        examples=["tenure_months"],
    )
    type: FeatureType = Field(description="Numeric or categorical.", examples=["numeric"])
    categories: Annotated[list[Category], Storable()] | None = Field(
        default=None,
        description="Known levels of a categorical feature, in training order; other values are treated as "
        "unseen. Null for numeric features.",
        examples=[["basic", "plus", "premium"]],
    )


class ModelSignature(ContractModel):
    """What a model takes and gives: features with types, the target, the task and the classes."""

    features: list[FeatureSpec] = Field(min_length=1, description="Input features, in the model's order.")
    target: Identifier = Field(
        min_length=1,
        description="Name of the target column; at most 256 characters, as a feature's name.",
        examples=["churned"],
    )
    task: Task = Field(description="Classification or regression.", examples=["classification"])
    classes: Annotated[list[Label], Storable()] | None = Field(
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
    params: Annotated[dict[str, JsonScalar], Storable()] = Field(
        default_factory=dict,
        description="Estimator and preprocessing parameters, flattened (`estimator__max_depth`).",
        examples=[{"estimator": "HistGradientBoostingClassifier", "estimator__max_depth": 6}],
    )
    code_version: Identifier = Field(
        min_length=1,
        description="Version of the training code: a git commit or a package version.",
        examples=["c165da6"],
    )
    parent_version: ModelVersion | None = Field(
        default=None,
        description="The version that was in production when this one was trained (null for the first).",
        examples=[6],
    )
    seed: int = Field(
        ge=0,
        le=SEED_MAX,
        description="Random seed of the run; same data, spec and seed give the same model.",
    )
    environment: dict[Identifier, Identifier] = Field(
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

    id: Identifier = Field(
        min_length=1, description="Window id, unique per model.", examples=["churn:7:000142"]
    )
    start: UtcDatetime = Field(description="Time of the first prediction in the window.")
    end: UtcDatetime = Field(description="Time of the last prediction in the window.")
    size: int = Field(
        ge=0, le=PG_INTEGER_MAX, description="Number of predictions (rows) in the window.", examples=[5000]
    )
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
