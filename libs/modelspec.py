"""The model spec: what a model is (features, target, task, estimator, preprocessing), how it is retrained
and how a candidate is gated. Written by people in YAML or JSON, registered with the training service,
stored canonically (sorted-key JSON, content-hashed) in the artifact store, and read back by validation
through ``Lineage.spec``.

Training turns a spec into a scikit-learn :class:`~sklearn.pipeline.Pipeline` with :func:`build_pipeline`;
the estimator comes from a closed registry (:data:`ESTIMATORS`), so a spec can never name arbitrary code.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import math
import threading
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, Literal, Self

import numpy as np
import orjson
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from contracts.common import (
    FEATURE_NAME_MAX_CHARS,
    DatasetName,
    FeatureSpec,
    FeatureType,
    JsonScalar,
    ModelName,
    Task,
)
from contracts.common import (
    FLOAT32_MAX as FLOAT32_MAX,  # the platform's bound of a model's numbers, defined with the label's
)
from contracts.datasets import TRAINING_SET_SUFFIX
from libs.errors import RepeatedKey, keys_once, shown
from libs.metrics import METRICS, metrics_for, primary_metric

# name -> (classifier, regressor) as import paths; None where the estimator has no such variant.
ESTIMATORS: dict[str, tuple[str | None, str | None]] = {
    "logistic_regression": ("sklearn.linear_model.LogisticRegression", None),
    "random_forest": ("sklearn.ensemble.RandomForestClassifier", "sklearn.ensemble.RandomForestRegressor"),
    "hist_gradient_boosting": (
        "sklearn.ensemble.HistGradientBoostingClassifier",
        "sklearn.ensemble.HistGradientBoostingRegressor",
    ),
    "decision_tree": ("sklearn.tree.DecisionTreeClassifier", "sklearn.tree.DecisionTreeRegressor"),
    "ridge": (None, "sklearn.linear_model.Ridge"),
    "linear_regression": (None, "sklearn.linear_model.LinearRegression"),
}


ROWS_MAX = 10**9
"""Bound of every row count in a spec: far beyond any training set, well inside the 64-bit integers the
spec's JSON can hold."""

TRAFFIC_WEIGHT_MAX = 1e6
"""The most a labelled traffic row may weigh in a weighted training set (base rows weigh 1). The fit sums
weights with gradients: past some 1e20 hist_gradient_boosting fitted a constant model (roc_auc 0.5) and the
run still completed."""

ENSEMBLE_MAX = 10_000
"""The most trees (random_forest's ``n_estimators``) or boosting iterations (hist_gradient_boosting's
``max_iter``) a spec may ask for. scikit-learn takes any number, and what it fits is kept: a forest makes
every tree object before it fits any, so 10**9 trees filled the fit process's memory within minutes, and
the job was lost and run again ``max_attempts`` times."""

THREADS_MAX = 256
"""The most threads (``n_jobs``) a spec may give a fit; -1 is every core."""

_THREADS = (THREADS_MAX, "threads", "-1 takes every core")
PARAM_MAXIMA: dict[tuple[str, str], tuple[int, str, str]] = {
    ("random_forest", "n_estimators"): (ENSEMBLE_MAX, "trees", "a forest makes them all before it fits any"),
    ("hist_gradient_boosting", "max_iter"): (ENSEMBLE_MAX, "boosting iterations", "each adds trees"),
    ("random_forest", "n_jobs"): _THREADS,
    ("logistic_regression", "n_jobs"): _THREADS,
    ("linear_regression", "n_jobs"): _THREADS,
}
"""(estimator, parameter) -> (largest value, what it counts, why): parameters whose value scikit-learn does
not bound and whose size the fit process pays for in memory or threads."""

PARAM_ONLY: dict[tuple[str, str], tuple[Any, str]] = {
    ("hist_gradient_boosting", "scoring"): (
        "loss",
        "early stopping keeps any other scorer in the model, which cannot be stored as a skops file of "
        "trusted types (and early stopping is on by default past 10,000 rows)",
    ),
}
"""(estimator, parameter) -> (the one value taken, why): parameters whose other values give a model that
cannot be stored or loaded."""

PROBE_ROWS_PER_CLASS = 16
"""Rows of each of the two classes (or, for regression, half the rows) of the synthetic training set that
:func:`check_fits` fits a spec's estimator on."""

PROBE_SIZES_MAX: dict[tuple[str, str], int] = {
    ("random_forest", "n_estimators"): 10,
    ("hist_gradient_boosting", "max_iter"): 10,
    ("logistic_regression", "max_iter"): 100,
    ("ridge", "max_iter"): 100,
}
"""(estimator, parameter) -> the most trees or iterations the probe fit of :func:`check_fits` runs, whatever
the spec (or the default) asks for: the size of a fit decides how long it takes, never whether it can be made.
The solvers stop at 100 iterations (their default, where they converge on the probe's rows) even with ``tol:
0``; ensembles at 10 trees or boosting iterations (a second under load)."""

PROBE_NEUTRAL: dict[str, Any] = {"n_jobs": 1, "verbose": 0}
"""Parameters the probe fit sets when the spec gives them (each value of the spec's is still checked alone):
one thread, nothing printed (their defaults)."""

PROBE_LEFT_OUT = frozenset({"validation_fraction"})
"""Parameters the probe fit leaves at their default (checked alone): whether they can be fitted depends on the
number of rows (hist_gradient_boosting's early stopping holds out a fraction, and needs a row of each class
in it), which the probe's few rows would judge wrongly."""

INT64 = (-(2**63), 2**63 - 1)
"""The integers the canonical JSON (orjson) and Postgres jsonb hold exactly."""

METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "f1": (0.0, 1.0),
    "roc_auc": (0.0, 1.0),
    "log_loss": (0.0, math.inf),
    "rmse": (0.0, math.inf),
    "mae": (0.0, math.inf),
    "r2": (-math.inf, 1.0),
}
"""Where each metric of :data:`libs.metrics.METRICS` lies: a threshold outside is always or never met."""


class SpecError(ValueError):
    """A spec that cannot be used: ``reason`` is unknown-estimator, unknown-feature or invalid-spec, and
    ``field`` the dotted path of the offending field."""

    def __init__(self, message: str, *, reason: str = "invalid-spec", field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.field = field


class _SpecModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class TrainingSetMode(StrEnum):
    """How base data and labelled traffic are combined into a training set."""

    SLIDING_WINDOW = "sliding-window"
    ALL = "all"
    WEIGHTED = "weighted"


class TrainingSetPolicy(_SpecModel):
    """Which rows a retrain learns from."""

    mode: TrainingSetMode = Field(
        TrainingSetMode.ALL,
        description="all: base data plus every labelled traffic row; sliding-window: only the newest "
        "`window_rows` rows of base data followed by traffic; weighted: all rows, traffic rows weighted "
        "`traffic_weight`.",
    )
    window_rows: int | None = Field(
        None,
        ge=1,
        le=ROWS_MAX,
        description="Rows kept by the sliding window (required for mode sliding-window).",
    )
    traffic_weight: float = Field(
        1.0,
        gt=0,
        le=TRAFFIC_WEIGHT_MAX,
        description="Sample weight of labelled traffic rows in mode weighted (base rows weigh 1), above 0 "
        "and at most 1,000,000.",
    )
    min_rows: int = Field(
        50, ge=10, le=ROWS_MAX, description="A training set with fewer rows fails with dataset-too-small."
    )

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.mode is TrainingSetMode.SLIDING_WINDOW and self.window_rows is None:
            raise PydanticCustomError(
                "missing_window", "mode sliding-window needs window_rows (how many rows to keep)"
            )
        return self


FIT_WEIGHT_COLUMN = "_sample_weight"
"""The column the training worker passes to the estimator as ``sample_weight`` (traffic rows weighted)."""

WINDOW_COLUMNS = ("prediction", "label", "prediction_id", "predicted_at")
"""What monitoring's traffic-window files carry beside the features, for each row."""

RESERVED_FEATURE_NAMES = frozenset({FIT_WEIGHT_COLUMN, *WINDOW_COLUMNS})
"""Names a feature cannot have: a window file's own columns, and the fit weights (a target cannot be named
``_sample_weight`` either)."""

CATEGORIES_KEPT_MAX = 1_000
"""The most levels a model keeps of one categorical feature: the most frequent of its training rows. The
signature lists every level kept, and it travels in every event about the model (an id column has as many
levels as rows); the values of the other levels are encoded as an unseen value is. A spec declares at most
as many ``categories`` for a feature."""

CATEGORY_KEPT_MAX_CHARS = 256
"""The longest level (as text) a model keeps of a categorical feature, or a spec declares: a longer one is
free text rather than a level, and is encoded as an unseen value is."""

MODEL_NAME_MAX_CHARS = 128 - len(TRAINING_SET_SUFFIX)
"""The longest model name a spec may have (119 characters): each training run registers its training set
and its holdout as the datasets ``<model>-training`` and ``<model>-holdout``, and a dataset's name has at
most 128 characters, as a model's has (``NAME_PATTERN``)."""

CLASSES_MAX = 1_000
"""The most classes a classifier is trained for. A target with more distinct values is an id or a number
rather than a class (scoring the holdout takes rows x classes probabilities, and the signature lists every
class): the run fails before the fit, naming the target."""

COOLDOWN_MAX_SECONDS = 10 * 365 * 24 * 3600
"""Ten years: beyond it a cooldown means "never", which ``enabled: false`` says plainly."""


class RetrainPolicy(_SpecModel):
    """When a trigger becomes a training job. At most one job per model is in flight, always."""

    enabled: bool = Field(True, description="False: every automatic trigger is skipped (policy-disabled).")
    cooldown_seconds: float = Field(
        1800,
        ge=0,
        le=COOLDOWN_MAX_SECONDS,
        description="Seconds after a completed run during which automatic triggers are skipped "
        "(at most ten years).",
    )
    daily_budget: int = Field(
        24, ge=0, le=10_000, description="At most this many jobs per model in any 24 hours."
    )
    min_labelled_rows: int = Field(
        100,
        ge=0,
        le=ROWS_MAX,
        description="A PerformanceDegraded trigger whose window has fewer labelled rows is skipped "
        "(not-enough-labels); drift triggers train on base data plus whatever is labelled.",
    )
    train_on_new_dataset: bool = Field(
        True, description="Retrain when a new version of a base dataset (or one listing the model) arrives."
    )
    training_set: TrainingSetPolicy = Field(
        default_factory=lambda: TrainingSetPolicy(), description="How the training set is built."
    )


class Preprocessing(_SpecModel):
    """Preprocessing before the estimator: numeric imputation and scaling; categorical features are
    one-hot encoded with unknown levels ignored (missing is a level of its own)."""

    numeric_impute: Literal["median", "mean"] = Field("median", description="Fill for missing numbers.")
    scale_numeric: bool = Field(True, description="Standardise numeric features.")


class ChampionRule(_SpecModel):
    """Champion/challenger: the candidate may not be worse than production by more than ``max_degradation``
    on ``metric``, judged on the candidate's holdout with a paired bootstrap confidence interval."""

    metric: str | None = Field(
        None, description="Metric compared; default roc_auc (binary), accuracy (multiclass), rmse."
    )
    max_degradation: float = Field(0.01, ge=0, description="δ: the tolerated loss on the metric.")
    confidence_level: float = Field(0.95, gt=0.5, lt=1, description="Level of the bootstrap interval.")
    resamples: int = Field(500, ge=50, le=10_000, description="Bootstrap resamples.")


class SliceRule(_SpecModel):
    """Per-slice gate: every level of a categorical feature must meet a minimum on a metric (validation checks
    at most its ``max_slice_levels`` levels with the most rows one by one, docs/validation.md)."""

    feature: str = Field(min_length=1, description="A categorical feature of the spec.")
    metric: str | None = Field(None, description="Metric per slice; default the champion metric.")
    min_value: float | None = Field(
        None,
        description="Minimum (or maximum, for lower-is-better metrics) per slice; default the absolute "
        "threshold on the same metric; with neither, slices are only reported.",
    )
    min_rows: int = Field(30, ge=1, le=ROWS_MAX, description="Smaller slices are reported, not judged.")


class ValidationSpec(_SpecModel):
    """The promotion gates validation applies to every candidate of the model."""

    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Absolute thresholds on holdout metrics: a minimum for higher-is-better metrics "
        "(roc_auc, accuracy, f1, r2), a maximum for the others (log_loss, rmse, mae).",
        examples=[{"roc_auc": 0.75}],
    )
    champion: ChampionRule = Field(
        default_factory=lambda: ChampionRule(), description="Champion/challenger rule."
    )
    slices: SliceRule | None = Field(None, description="Per-slice gate, when wanted.")
    latency_budget_ms_per_row: float = Field(
        5.0, gt=0, description="Largest median prediction time per row (batched) on the holdout."
    )
    schema_compatibility: Literal["same-features", "exact"] = Field(
        "same-features",
        description="same-features: same feature names and types as the champion, new categories allowed; "
        "exact: identical signature.",
    )


class ModelSpec(_SpecModel):
    """Everything needed to train, retrain and gate one model."""

    name: ModelName = Field(description="Model name.", examples=["churn"])
    description: str | None = Field(None, description="Free text for people.")
    features: list[FeatureSpec] = Field(min_length=1, description="Input features, in the model's order.")
    target: str = Field(min_length=1, description="Target column.", examples=["churned"])
    task: Task = Field(description="classification or regression.")
    estimator: str = Field(
        description=f"Estimator name, one of: {', '.join(ESTIMATORS)}.", examples=["hist_gradient_boosting"]
    )
    params: dict[str, JsonScalar] = Field(
        default_factory=dict,
        description="Estimator parameters (the seed sets random_state).",
        examples=[{"max_depth": 6}],
    )
    preprocessing: Preprocessing = Field(
        default_factory=lambda: Preprocessing(), description="Preprocessing before the estimator."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the split and the estimator.")
    holdout_fraction: float = Field(
        0.2, ge=0.05, le=0.5, description="Share of the training set held out for metrics and validation."
    )
    base_datasets: list[DatasetName] = Field(
        default_factory=list, description="Datasets whose latest versions are the base training data."
    )
    retrain: RetrainPolicy = Field(default_factory=lambda: RetrainPolicy(), description="Retrain policy.")
    validation: ValidationSpec = Field(
        default_factory=lambda: ValidationSpec(), description="Promotion gates."
    )

    @field_validator("params", mode="before")
    @classmethod
    def _scalar_params(cls, params: Any) -> Any:
        # Said here in words: pydantic would name the first member of the JsonScalar union that failed
        # ("params.max_depth.bool: Input should be a valid boolean" for an infinity).
        if isinstance(params, dict):
            for key, value in params.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise _fail("invalid_param", str(key), f"{value} is not a finite number (JSON has none)")
                if value is not None and not isinstance(value, (bool, int, float, str)):
                    raise _fail(
                        "invalid_param",
                        str(key),
                        f"a parameter is a number, a string, true, false or null, not {type(value).__name__}",
                    )
        return params

    @classmethod
    def from_stored(cls, data: Any) -> ModelSpec:
        """A spec as a store kept it (``spec.model_dump(mode="json")`` of an accepted spec), read even when
        this release no longer has its estimator or scikit-learn no longer takes its parameters: it can
        still be shown and replaced, and its policy still decides on triggers, while a run, which reads the
        spec with :func:`load_canonical`, fails naming what is wrong (``unknown-estimator``,
        ``invalid-spec``)."""
        return cls.model_validate(data, context={_STORED: True})

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, name: str, info: ValidationInfo) -> str:
        if name not in ESTIMATORS and not _stored(info):
            raise PydanticCustomError(
                "unknown_estimator", f"unknown estimator {name!r}; allowed: {', '.join(ESTIMATORS)}"
            )
        return name

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Self:
        unstorable = _unstorable(self.model_dump(mode="json"), "")
        if unstorable is not None:
            raise _fail("invalid_value", *unstorable)
        names = [f.name for f in self.features]
        # Counted once: a list.count per name took 8 s of a 20,000-feature spec (event loop, read back).
        duplicates = sorted(n for n, times in Counter(names).items() if times > 1)
        if duplicates:
            raise _fail("invalid_feature", "features", f"features {duplicates} are listed twice")
        if self.target in names:
            raise _fail("invalid_feature", "target", f"the target {self.target!r} is also a feature")
        for i, name in enumerate(names):
            if name in RESERVED_FEATURE_NAMES:
                raise _fail(
                    "invalid_feature",
                    f"features.{i}.name",
                    f"{name!r} is a reserved column name; a feature cannot be named "
                    + ", ".join(sorted(RESERVED_FEATURE_NAMES)),
                )
        if self.target == FIT_WEIGHT_COLUMN:
            raise _fail("invalid_feature", "target", f"{FIT_WEIGHT_COLUMN!r} is a reserved column name")
        for i, f in enumerate(self.features):
            if f.categories is not None and f.type is not FeatureType.CATEGORICAL:
                raise _fail(
                    "invalid_feature",
                    f"features.{i}.categories",
                    f"numeric feature {f.name!r} has categories",
                )
        if not _stored(info):
            self._check_estimator()
        allowed_metrics = set(metrics_for(self.task))
        for where, name in self._metric_names():
            if name not in allowed_metrics:
                raise _fail(
                    "unknown_metric",
                    where,
                    f"unknown metric {name!r} for {self.task.value}; "
                    f"allowed: {', '.join(sorted(allowed_metrics))}",
                )
        for name, threshold in self.validation.thresholds.items():
            problem = _threshold_problem(name, threshold)
            if problem is not None:
                raise _fail("invalid_threshold", f"validation.thresholds.{name}", problem)
        rule = self.validation.slices
        if rule is not None:
            by_name = {f.name: f for f in self.features}
            if rule.feature not in by_name:
                raise _fail(
                    "unknown_feature",
                    "validation.slices.feature",
                    f"{rule.feature!r} is not a feature of the spec"
                    f"{_did_you_mean(rule.feature, list(by_name))}",
                )
            if by_name[rule.feature].type is not FeatureType.CATEGORICAL:
                raise _fail(
                    "invalid_feature",
                    "validation.slices.feature",
                    f"slices need a categorical feature; {rule.feature!r} is numeric",
                )
            if rule.min_value is not None:
                # As a threshold is: a minimum of 75 on roc_auc failed every slice, and so rejected every
                # candidate of the model, where the spec could have been refused when it was written.
                metric = rule.metric or self.validation.champion.metric or primary_metric(self.task)
                problem = _threshold_problem(metric, rule.min_value)
                if problem is not None:
                    raise _fail("invalid_threshold", "validation.slices.min_value", problem)
        return self

    def _check_estimator(self) -> None:
        """The estimator exists for the task and takes the params, in this release and scikit-learn."""
        classifier, regressor = ESTIMATORS[self.estimator]
        path = classifier if self.task is Task.CLASSIFICATION else regressor
        if path is None:
            fitting = [n for n, paths in ESTIMATORS.items() if paths[self.task is Task.REGRESSION]]
            raise _fail(
                "unknown_estimator",
                "estimator",
                f"estimator {self.estimator!r} has no {self.task.value} variant; allowed for "
                f"{self.task.value}: {', '.join(fitting)}",
            )
        known = set(_import(path)().get_params())
        for param in self.params:
            if param == "random_state":
                raise _fail(
                    "invalid_param",
                    "params.random_state",
                    "set `seed` instead: it drives every random choice",
                )
            if param not in known:
                raise _fail(
                    "invalid_param",
                    f"params.{param}",
                    f"{path.rsplit('.', 1)[1]} has no parameter {param!r}"
                    f"{_did_you_mean(param, sorted(known))}",
                )
            problem = _param_problem(_import(path), param, self.params[param])
            if problem is None:
                problem = _beyond_maximum(self.estimator, param, self.params[param])
            if problem is None:
                problem = _not_the_only_value(self.estimator, param, self.params[param])
            if problem is not None:
                raise _fail("invalid_param", f"params.{param}", problem)

    def _metric_names(self) -> list[tuple[str, str]]:
        names = [(f"validation.thresholds.{m}", m) for m in self.validation.thresholds]
        if self.validation.champion.metric:
            names.append(("validation.champion.metric", self.validation.champion.metric))
        if self.validation.slices and self.validation.slices.metric:
            names.append(("validation.slices.metric", self.validation.slices.metric))
        return names

    # -- derived ------------------------------------------------------------------------------------

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def feature_types(self) -> list[tuple[str, Literal["numeric", "categorical"]]]:
        """(name, kind) pairs, as :func:`libs.profiles.build_profile` takes them."""
        return [
            (f.name, "numeric" if f.type is FeatureType.NUMERIC else "categorical") for f in self.features
        ]

    def estimator_path(self) -> str:
        classifier, regressor = ESTIMATORS[self.estimator]
        path = classifier if self.task is Task.CLASSIFICATION else regressor
        assert path is not None
        return path

    def canonical_json(self) -> bytes:
        """Sorted-key JSON with every default spelled out: equal specs give equal bytes."""
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON (the store key of the stored spec)."""
        return hashlib.sha256(self.canonical_json()).hexdigest()


_STORED = "stored"
"""Validation context of :meth:`ModelSpec.from_stored`."""


def _stored(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get(_STORED))


def _unstorable(value: Any, path: str) -> tuple[str, str] | None:
    """(field, why) of the first value of a dumped spec that its canonical JSON or Postgres jsonb cannot hold:
    a NUL character in a string or a key, an integer beyond 64 bits."""
    if isinstance(value, str):
        if "\x00" in value:
            return (
                path,
                "holds a NUL character, which a stored spec cannot (Postgres text and jsonb refuse it)",
            )
    elif isinstance(value, int) and not isinstance(value, bool):
        if not INT64[0] <= value <= INT64[1]:
            return path, f"{value} is beyond the 64-bit integers a stored spec can hold"
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in key:
                return where, "the key holds a NUL character, which a stored spec cannot"
            found = _unstorable(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _unstorable(item, f"{path}.{i}")
            if found is not None:
                return found
    return None


def _param_problem(cls: Any, name: str, value: Any) -> str | None:
    """scikit-learn's own word on one estimator parameter's value (its type and range), or None when it
    takes it. Checked here rather than at the first fit, where every run of the model would fail."""
    # _validate_params is what fit() calls first (scikit-learn >= 1.2); there is no public way to run the
    # parameter constraints without fitting. Without it (an older or newer release), fit() still checks.
    estimator = cls(**{name: value})
    validate = getattr(estimator, "_validate_params", None)
    if validate is None:
        return None
    try:
        validate()
    except (ValueError, TypeError) as exc:  # sklearn's InvalidParameterError is both
        return str(exc)
    return None


def _beyond_maximum(estimator: str, name: str, value: Any) -> str | None:
    """Why ``value`` of an estimator's parameter in :data:`PARAM_MAXIMA` is too large, or None."""
    bound = PARAM_MAXIMA.get((estimator, name))
    if bound is None or not isinstance(value, int) or isinstance(value, bool) or value <= bound[0]:
        return None
    most, unit, why = bound
    return f"{value:,} {unit} are more than a fit may take: at most {most:,} ({why})"


def _not_the_only_value(estimator: str, name: str, value: Any) -> str | None:
    """Why ``value`` of an estimator's parameter in :data:`PARAM_ONLY` is refused, or None."""
    only = PARAM_ONLY.get((estimator, name))
    if only is None or value == only[0]:
        return None
    return f"{value!r} is not taken here, only {only[0]!r}: {only[1]}; leave {name} out or give {only[0]!r}"


_PROBE_WARNINGS = threading.Lock()
"""Held while :func:`check_fits` silences warnings: ``catch_warnings`` swaps the process's filters, so two
checks on two threads at once could each restore the other's and leave every warning silenced for good."""


def check_fits(spec: ModelSpec) -> None:
    """Refuse (:class:`SpecError`, naming the parameters and scikit-learn's message) a spec whose estimator
    parameters scikit-learn takes one by one but checks together only when fitting, such as logistic
    regression's ``penalty: l1`` with its default solver lbfgs: every run would fail as fit-error.

    The estimator is fitted as a run fits it (preprocessing, then the estimator, with sample weights in mode
    weighted) on a synthetic training set shaped like the spec: ``2 * PROBE_ROWS_PER_CLASS`` rows, at most
    one numeric and one categorical feature, two classes or a positive target. Its work is bounded whatever
    the spec says (tens of milliseconds a fit): the rows and columns are fixed, ``PROBE_SIZES_MAX`` caps
    trees and iterations, ``PROBE_NEUTRAL`` fixes the threads, ``PROBE_LEFT_OUT`` leaves out what only the
    number of rows decides. When the fit fails, each parameter is left out in turn (one fit more each; a
    spec's parameters are the estimator's, some twenty at most) to name those in conflict. Only what fails
    on any data is refused: what depends on the data (a multiclass target, a negative target for a poisson
    loss) still fails the run."""
    if not spec.params:
        return
    with _PROBE_WARNINGS, warnings.catch_warnings():
        # What scikit-learn warns of on the probe's synthetic rows (a ConvergenceWarning of 32 rows) says
        # nothing of the user's data and reached the service's log; a run's fit warns of its own rows.
        warnings.simplefilter("ignore")
        problem = _probe_fit(spec, dict(spec.params))
        if problem is None or _probe_fit(spec, {}) is not None:
            return  # fitted, or the probe cannot judge: its rows cannot be fitted even with the defaults
        names = [
            name
            for name in spec.params
            if _probe_fit(spec, {k: v for k, v in spec.params.items() if k != name}) is None
        ] or list(spec.params)
    given = " and ".join(f"{name}={spec.params[name]!r}" for name in names)
    together = " together" if len(names) > 1 else ""
    cls = spec.estimator_path().rsplit(".", 1)[1]
    raise SpecError(
        f"params.{names[0]}: {cls} cannot be fitted with {given}{together}, scikit-learn says: "
        f"{problem.rstrip('.')}. "
        f"Change {' or '.join(names)}, or leave {'them' if len(names) > 1 else 'it'} out",
        field=f"params.{names[0]}",
    )


def _probe_fit(spec: ModelSpec, params: dict[str, JsonScalar]) -> str | None:
    """scikit-learn's message when the spec's pipeline, with ``params``, cannot be fitted on the probe's
    synthetic rows (:func:`check_fits`), or None."""
    numeric = next((f for f in spec.features if f.type is FeatureType.NUMERIC), None)
    categorical = next((f for f in spec.features if f.type is FeatureType.CATEGORICAL), None)
    features = [f for f in (numeric, categorical) if f is not None]
    probe = spec.model_copy(
        update={"features": features, "params": {k: v for k, v in params.items() if k not in PROBE_LEFT_OUT}}
    )
    pipeline = build_pipeline(probe)
    preprocess, estimator = pipeline.named_steps["preprocess"], pipeline.named_steps["estimator"]
    current = estimator.get_params()
    bounded = {k: v for k, v in PROBE_NEUTRAL.items() if k in params}
    for (name, param), most in PROBE_SIZES_MAX.items():
        if name == spec.estimator and isinstance(current.get(param), int) and current[param] > most:
            bounded[param] = most
    estimator.set_params(**bounded)
    rows = 2 * PROBE_ROWS_PER_CLASS
    rng = np.random.default_rng(spec.seed)
    if spec.task is Task.CLASSIFICATION:
        target = np.tile([0, 1], PROBE_ROWS_PER_CLASS)
    else:  # strictly positive: what poisson and gamma losses need
        target = rng.uniform(1.0, 2.0, rows)
    import pandas as pd

    columns: dict[str, Any] = {}
    if numeric is not None:
        columns[numeric.name] = target + rng.normal(0.0, 0.5, rows)
    if categorical is not None:
        columns[categorical.name] = np.tile(["a", "b", "c", "d"], rows // 4)
    fit_params = {}
    if spec.retrain.training_set.mode is TrainingSetMode.WEIGHTED:
        fit_params["sample_weight"] = np.where(
            np.arange(rows) % 2, spec.retrain.training_set.traffic_weight, 1.0
        )
    try:
        fitted = preprocess.fit_transform(pd.DataFrame(columns), target)
        estimator.fit(fitted, target, **fit_params)
    except (ValueError, TypeError) as exc:  # what a run reports as fit-error
        return " ".join(str(exc).split())
    except Exception:  # anything else the probe cannot judge (not the spec's fault, known): the run will
        return None
    return None


def _threshold_problem(metric: str, threshold: float) -> str | None:
    """Why a threshold on ``metric`` can never decide anything, or None."""
    lo, hi = METRIC_RANGES[metric]
    if lo <= threshold <= hi:
        return None
    span = ("(-∞" if math.isinf(lo) else f"[{lo:g}") + ", " + ("∞)" if math.isinf(hi) else f"{hi:g}]")
    kind = "minimum" if metric_direction(metric) else "maximum"
    return f"{metric} lies in {span}; a {kind} of {threshold:g} is always or never met"


def _fail(kind: str, field: str, message: str) -> PydanticCustomError:
    """A model-level error that still names its field (pydantic gives model validators no location)."""
    return PydanticCustomError(kind, "{field}: {message}", {"field": field, "message": message})


def import_estimators() -> None:
    """Import every estimator of the registry now (seconds on a busy machine), so that validating a spec
    later never stalls an event loop on a first import."""
    for paths in ESTIMATORS.values():
        for path in paths:
            if path is not None:
                _import(path)
    build_pipeline(
        ModelSpec(
            name="warm-up",
            features=[FeatureSpec(name="x", type=FeatureType.NUMERIC)],
            target="y",
            task=Task.REGRESSION,
            estimator="ridge",
        )
    )


def _did_you_mean(name: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _import(path: str) -> Any:
    module, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(module), cls)


_REASONS = {"unknown_estimator": "unknown-estimator", "unknown_feature": "unknown-feature"}


def spec_from_data(data: Any, *, name: str | None = None) -> ModelSpec:
    """Validate parsed YAML/JSON as a spec; ``name`` fills in (or must equal) the spec's name."""
    if not isinstance(data, dict):
        raise SpecError(f"a model spec is a mapping, got {type(data).__name__}", field="(root)")
    if name is not None:
        given = data.get("name", name)
        if given != name:
            # Quoted short, and a value that is no text only by its type: YAML's aliases make a body of a few
            # hundred bytes a list of a billion items, whose repr took minutes and gigabytes.
            if isinstance(given, str):
                raise SpecError(
                    f"the spec names model {shown(given)} but was sent for {name!r}", field="name"
                )
            raise SpecError(
                f"the spec's name is a {type(given).__name__}, not text: give {name!r} or leave it out",
                field="name",
            )
        data = {**data, "name": name}
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        reason = _REASONS.get(first["type"], "invalid-spec")
        ctx = first.get("ctx") or {}
        if "field" in ctx and "message" in ctx:
            where = ".".join([*(str(p) for p in first["loc"]), str(ctx["field"])])
            raise SpecError(f"{where}: {ctx['message']}", reason=reason, field=where) from exc
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise SpecError(f"{where}: {first['msg']}", reason=reason, field=where) from exc
    check_entry_bounds(spec)
    return spec


def check_entry_bounds(spec: ModelSpec) -> None:
    """Refuse (:class:`SpecError`, naming the field) what a spec may no longer bring in, though one stored
    before the bound may hold it: a feature or target name longer than ``FEATURE_NAME_MAX_CHARS``, more than
    ``CATEGORIES_KEPT_MAX`` declared categories of a feature, or one longer than ``CATEGORY_KEPT_MAX_CHARS``.

    Checked where a spec enters (registered, or read back for a run, by :func:`spec_from_data`), not by the
    model itself: the stores read their specs with ``ModelSpec.model_validate``, and a stored spec must stay
    readable so that it can be shown and replaced.

    Also refused there: a model name longer than ``MODEL_NAME_MAX_CHARS``, whose runs could be fitted but
    not completed (their datasets could not be named), and a base dataset listed twice, which puts every row
    in the training set twice and so a copy of nearly every held-out row among the fitted ones: the holdout
    metrics, and validation's gates on the same holdout, would flatter the model; and a sliding window of
    fewer rows than ``min_rows``, whose every run would fail as too small."""
    if len(spec.name) > MODEL_NAME_MAX_CHARS:
        raise SpecError(
            f"name: {shown(spec.name)} is longer than the {MODEL_NAME_MAX_CHARS} characters a model name "
            "may have: each run registers its training set and holdout as the datasets <model>-training "
            "and <model>-holdout, whose names have at most 128 characters; register the spec under a "
            "shorter name",
            field="name",
        )
    listed: set[str] = set()
    for i, dataset in enumerate(spec.base_datasets):
        if dataset in listed:
            raise SpecError(
                f"base_datasets.{i}: {dataset!r} is listed twice; its rows would be in the training set "
                "twice, and a copy of nearly every held-out row among the rows fitted (the holdout metrics "
                "would flatter the model): list each dataset once",
                field=f"base_datasets.{i}",
            )
        listed.add(dataset)
    policy = spec.retrain.training_set
    if policy.mode is TrainingSetMode.SLIDING_WINDOW and (policy.window_rows or 0) < policy.min_rows:
        raise SpecError(
            f"retrain.training_set.window_rows: a sliding window of {policy.window_rows:,} rows is smaller "
            f"than the {policy.min_rows:,} rows a training set needs (min_rows): every run would fail as "
            "dataset-too-small; keep at least min_rows rows",
            field="retrain.training_set.window_rows",
        )
    named = [(f"features.{i}.name", f.name) for i, f in enumerate(spec.features)]
    for field, name in [*named, ("target", spec.target)]:
        if len(name) > FEATURE_NAME_MAX_CHARS:
            raise SpecError(
                f"{field}: {shown(name)} is longer than the {FEATURE_NAME_MAX_CHARS} characters a feature or "
                "target name may have (it travels in every event about the model): rename the column",
                field=field,
            )
    for i, f in enumerate(spec.features):
        declared = f.categories or []
        if len(declared) > CATEGORIES_KEPT_MAX:
            raise SpecError(
                f"features.{i}.categories: {len(declared):,} categories are declared; a model keeps at most "
                f"{CATEGORIES_KEPT_MAX:,} levels of a feature (the signature lists them all)",
                field=f"features.{i}.categories",
            )
        for j, level in enumerate(declared):
            if _too_long_to_keep(level):
                assert isinstance(level, str)
                raise SpecError(
                    f"features.{i}.categories.{j}: {shown(level)} is longer than the "
                    f"{CATEGORY_KEPT_MAX_CHARS} characters a level may have",
                    field=f"features.{i}.categories.{j}",
                )


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that names a key twice (it keeps the last, so a spec giving
    ``estimator`` twice trained the second without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # what a merge key (<<) brings in may be overridden, as YAML says
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Mapping | list):
                continue  # unhashable: the base constructor says so
            if key in seen:
                raise RepeatedKey(str(key), key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_spec(body: bytes | str, *, content_type: str | None = None, name: str | None = None) -> ModelSpec:
    """A spec from JSON or YAML text (YAML is a superset of JSON, so unknown content types parse too)."""
    try:
        text = body.decode() if isinstance(body, bytes) else body
    except UnicodeDecodeError as exc:
        raise SpecError(f"the spec is not UTF-8 text: byte {exc.start} cannot be decoded") from exc
    kind = (content_type or "").split(";")[0].strip().lower()
    kind_name = "JSON" if kind == "application/json" else "YAML"
    try:
        if kind == "application/json":
            data = orjson.loads(text)
            # orjson keeps the last of two equal keys without a word; Python's reader, read again, says which
            # (a spec is registered rarely, and small).
            json.loads(text, object_pairs_hook=keys_once)
        else:
            data = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader
    except RepeatedKey as exc:
        at = f" (line {exc.line})" if exc.line is not None else ""
        raise SpecError(
            f"the spec is not valid {kind_name}: the key {shown(exc.key)} is given twice in one mapping{at}: "
            "give each key once"
        ) from exc
    except RecursionError as exc:
        # orjson stops at 1024 levels with a JSONDecodeError; PyYAML recurses until Python's limit.
        raise SpecError(f"the spec is not valid {kind_name}: it is nested too deeply") from exc
    except (orjson.JSONDecodeError, yaml.YAMLError, ValueError, TypeError, AttributeError) as exc:
        # PyYAML's constructors raise what their Python conversions raise: ValueError for a date such as
        # 2025-02-30 or `!!int abc`, AttributeError for a malformed `!!timestamp`.
        raise SpecError(f"the spec is not valid {kind_name}: {' '.join(str(exc).split())}") from exc
    spec = spec_from_data(data, name=name)
    check_fits(spec)
    return spec


def load_canonical(data: bytes) -> ModelSpec:
    """A spec from its stored canonical JSON (re-validated: the code may have changed since)."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SpecError(f"the stored spec is not JSON: {exc}") from exc
    return spec_from_data(parsed)


# --- the pipeline -----------------------------------------------------------------------------------


def build_pipeline(spec: ModelSpec, categories: list[Any] | None = None) -> Any:
    """The spec's scikit-learn Pipeline (unfitted): preprocess (ColumnTransformer) then the estimator.
    ``categories``: the levels the one-hot encoder keeps of each categorical feature
    (:func:`kept_categories`); None, it keeps every level it sees."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numeric = [f.name for f in spec.features if f.type is FeatureType.NUMERIC]
    categorical = [f.name for f in spec.features if f.type is FeatureType.CATEGORICAL]
    parts: list[tuple[str, Any, list[str]]] = []
    if numeric:
        steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy=spec.preprocessing.numeric_impute))]
        if spec.preprocessing.scale_numeric:
            steps.append(("scale", StandardScaler()))
        parts.append(("numeric", Pipeline(steps), numeric))
    if categorical:
        encoder = (
            OneHotEncoder(handle_unknown="ignore")
            if categories is None
            else OneHotEncoder(categories=categories, handle_unknown="ignore")
        )
        parts.append(("categorical", encoder, categorical))
    cls = _import(spec.estimator_path())
    params = dict(spec.params)
    if "random_state" in cls().get_params():
        params["random_state"] = spec.seed
    # The one-hot columns of many levels are mostly zeros, and the ColumnTransformer hands them over sparse
    # (below 30% non-zeros): an estimator that takes no sparse input gets them dense instead.
    dense = {} if takes_sparse_input(spec.estimator, spec.task) else {"sparse_threshold": 0.0}
    return Pipeline(
        [("preprocess", ColumnTransformer(parts, remainder="drop", **dense)), ("estimator", cls(**params))]
    )


def takes_sparse_input(estimator: str, task: Task) -> bool:
    """Whether the estimator of the registry fits on sparse input (scikit-learn's own tag): all but
    hist_gradient_boosting."""
    classifier, regressor = ESTIMATORS[estimator]
    path = classifier if task is Task.CLASSIFICATION else regressor
    return path is not None and bool(_import(path)().__sklearn_tags__().input_tags.sparse)


def kept_categories(spec: ModelSpec, rows: Any) -> tuple[list[Any] | None, dict[str, int]]:
    """The levels a model trained on ``rows`` keeps of each categorical feature, for :func:`build_pipeline`,
    and the features whose rows held levels it does not keep: name -> distinct levels seen (a missing value
    not counted).

    A feature whose spec declares ``categories`` keeps exactly those, in the type of its training values
    (numbers sorted, as the encoder needs them): the signature lists them, so the model must know the same
    levels, those absent from ``rows`` included, and encode any other as unseen. A declared level of another
    type than the feature's values (``"1"`` for a column of integers) could never match a value: the spec is
    refused (:class:`SpecError`, naming the field).

    Any other feature keeps at most :data:`CATEGORIES_KEPT_MAX` levels, the most frequent in ``rows``
    (equally frequent ones in the encoder's order), each at most :data:`CATEGORY_KEPT_MAX_CHARS` characters.
    A missing value stays a level of its own. The categories are None when no feature declares categories
    and every feature keeps every level: the encoder then learns them itself, as it always did, and the model
    is the same as before the bound.
    """
    features = [f for f in spec.features if f.type is FeatureType.CATEGORICAL]
    names = [f.name for f in features]
    counts = {name: rows[name].value_counts(dropna=True) for name in names}
    for feature in features:
        _check_level_type(spec, feature, counts[feature.name].index)
    if not any(f.categories for f in features) and not any(
        len(c) > CATEGORIES_KEPT_MAX or any(_too_long_to_keep(v) for v in c.index) for c in counts.values()
    ):
        return None, {}
    from sklearn.preprocessing import OneHotEncoder

    # The encoder's own levels, in its order and with its missing values: kept ones are taken from them.
    learned = OneHotEncoder(handle_unknown="ignore").fit(rows[names]).categories_
    kept: list[Any] = []
    seen: dict[str, int] = {}
    for feature, levels in zip(features, learned, strict=True):
        name = feature.name
        present = [i for i, level in enumerate(levels) if not _missing(level)]
        if feature.categories:
            declared = _declared_levels(spec, feature, levels)
            keys = {_level_key(level) for level in declared if not _missing(level)}
            if any(_level_key(levels[i]) not in keys for i in present):
                seen[name] = len(present)
            kept.append(declared)
            continue
        chosen = most_frequent_levels(levels, counts[name].to_dict())
        if len(chosen) == len(present):
            kept.append(levels)
            continue
        seen[name] = len(present)
        kept.append(levels[[i for i in range(len(levels)) if i in chosen or _missing(levels[i])]])
    return kept, seen


def most_frequent_levels(levels: Sequence[Any], frequency: Mapping[Any, int]) -> set[int]:
    """The positions in ``levels`` of those a model keeps of a feature: at most :data:`CATEGORIES_KEPT_MAX`,
    the most frequent (``frequency``, by level; 0 for one it lacks), equally frequent ones in the order of
    ``levels`` (the encoder's), none missing or longer than :data:`CATEGORY_KEPT_MAX_CHARS`."""
    candidates = [i for i, level in enumerate(levels) if not _missing(level) and not _too_long_to_keep(level)]
    # A stable sort: equally frequent levels stay in the order of ``levels``.
    return set(sorted(candidates, key=lambda i: -frequency.get(levels[i], 0))[:CATEGORIES_KEPT_MAX])


def levels_kept(spec: ModelSpec, rows: Any, categories: list[Any] | None) -> dict[str, list[Any]]:
    """The levels (no missing value) of each categorical feature that a model fitted on ``rows`` with
    ``categories`` (:func:`kept_categories`) knows: those categories, or (None) every level of ``rows``, which
    the encoder then learns."""
    names = [f.name for f in spec.features if f.type is FeatureType.CATEGORICAL]
    if categories is None:
        return {name: rows[name].dropna().unique().tolist() for name in names}
    return {
        name: [level for level in levels if not _missing(level)]
        for name, levels in zip(names, categories, strict=True)
    }


_NUMERIC_KINDS = frozenset("iuf")


def _declared_levels(spec: ModelSpec, feature: FeatureSpec, levels: Any) -> Any:
    """A feature's declared categories as its encoder takes them: in the type of the values it learned
    (``levels``), without repeats, sorted when they are numbers, then the missing value when ``levels`` has
    one; :class:`SpecError` for a declared level of another type."""
    assert feature.categories
    index = spec.features.index(feature)
    kind = levels.dtype.kind
    present = [_plain(level) for level in levels if not _missing(level)]
    if kind == "b":
        wanted: type = bool
    elif kind in _NUMERIC_KINDS:
        wanted = int
    elif present:
        wanted = type(present[0])
    else:  # no value to go by: the declared levels' own type, one for all
        wanted = type(feature.categories[0])
    for j, level in enumerate(feature.categories):
        if type(level) is not wanted:
            raise SpecError(
                f"features.{index}.categories.{j}: {shown(str(level))} is declared as "
                f"{_TYPE_NAME[type(level)]}, but the training values of {shown(feature.name)} are "
                f"{_TYPE_NAMES.get(wanted, wanted.__name__)}: no value could ever be that level. Declare the "
                "categories as the data holds them (numbers as numbers, text as text)",
                field=f"features.{index}.categories.{j}",
            )
    unique = list(dict.fromkeys(feature.categories))
    if kind in _NUMERIC_KINDS or kind == "b":
        unique.sort()
    missing = [level for level in levels if _missing(level)]
    try:
        return np.array([*unique, *missing], dtype=levels.dtype)
    except OverflowError as exc:  # an integer beyond what the column's type holds (a negative one, unsigned)
        raise SpecError(
            f"features.{index}.categories: a declared level is beyond what the training values of "
            f"{shown(feature.name)} ({levels.dtype}) can hold: {exc}",
            field=f"features.{index}.categories",
        ) from exc


def _check_level_type(spec: ModelSpec, feature: FeatureSpec, levels: Any) -> None:
    """Refuse (:class:`SpecError`) a categorical feature whose training values (``levels``: the distinct ones)
    are not all of one of the types a category has, text, integers or booleans: what a request can send, and
    what the signature lists. A number with a fraction, a date or bytes could never be matched by one (the
    signature would list its text, which the model, having learned the value, encodes as unseen), and values
    of several types make the encoder fail the fit."""
    kind = levels.dtype.kind
    if kind in "biu" or len(levels) == 0:
        return
    if kind == "f":
        fractional = [v for v in levels.tolist() if not float(v).is_integer()]
        if not fractional:
            return
        found = f"numbers with a fraction (such as {fractional[0]!r})"
        fix = "Declare the feature numeric, or store its values as text"
    else:
        types = {type(_plain(level)) for level in levels}
        if len(types) == 1 and types <= {str, int, bool}:
            return
        if types <= {str, int, bool}:
            found = (
                f"of several types ({' and '.join(_TYPE_NAMES[t] for t in (int, bool, str) if t in types)})"
            )
            fix = "Store its values as one type in every dataset the model trains on"
        else:
            other = next(level for level in levels if type(_plain(level)) not in (str, int, bool))
            found = f"{type(other).__name__} values (such as {shown(str(other))})"
            fix = "Store its values as text, integers or booleans, or declare the feature numeric"
    index = spec.features.index(feature)
    raise SpecError(
        f"features.{index}: {shown(feature.name)} is categorical, but its training values are {found}: a "
        f"category is text, an integer or a boolean, one type per feature, as requests send it. {fix}",
        field=f"features.{index}.type",
    )


_TYPE_NAME = {str: "text", int: "an integer", bool: "a boolean"}
_TYPE_NAMES = {str: "text", int: "integers", bool: "booleans", float: "numbers"}


def _plain(level: Any) -> Any:
    """A level as a Python value (numpy scalars unwrapped, integral floats as integers)."""
    if isinstance(level, np.generic):
        level = level.item()
    if isinstance(level, float) and level.is_integer():
        return int(level)
    return level


def _level_key(level: Any) -> tuple[type, Any]:
    # By type too: True and 1 are equal (and hash alike) in Python, but are different levels.
    plain = _plain(level)
    return type(plain), plain


def _too_long_to_keep(level: Any) -> bool:
    return isinstance(level, str) and len(level) > CATEGORY_KEPT_MAX_CHARS


def _missing(level: Any) -> bool:
    return level is None or (isinstance(level, float) and math.isnan(level))


def flat_params(spec: ModelSpec, pipeline: Any) -> dict[str, JsonScalar]:
    """Estimator and preprocessing parameters, flattened, for lineage (every estimator default included,
    so a change of library defaults shows up in a diff)."""
    estimator = pipeline.named_steps["estimator"]
    out: dict[str, JsonScalar] = {"estimator": spec.estimator, "estimator_class": type(estimator).__name__}
    for key, value in sorted(estimator.get_params(deep=False).items()):
        if isinstance(value, float) and not math.isfinite(value):
            continue  # lineage is JSON, which has no infinity
        if value is None or isinstance(value, (bool, int, float, str)):
            out[f"estimator__{key}"] = value
    out["preprocessing__numeric_impute"] = spec.preprocessing.numeric_impute
    out["preprocessing__scale_numeric"] = spec.preprocessing.scale_numeric
    out["preprocessing__categorical"] = "one-hot, unknown ignored"
    out["holdout_fraction"] = spec.holdout_fraction
    return out


def metric_direction(name: str) -> bool:
    """True when higher values of the metric are better."""
    return METRICS[name].higher_is_better
