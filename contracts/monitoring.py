"""Monitoring events: what live traffic says about a model — drift, performance, data quality, and the
canary's health during a rollout.

DriftDetected is debounced: a feature must drift in several consecutive windows before it counts, then
a cooldown follows, so one shift gives one event.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, ClassVar, Self

from pydantic import Field, model_validator

from contracts.commands import COMPOSED_REASON_TEXT, ComposedReason
from contracts.common import (
    PG_BIGINT_MAX,
    PG_INTEGER_MAX,
    ContractModel,
    FeatureType,
    FreeText,
    Identifier,
    ModelName,
    ModelVersion,
    TrafficWindow,
    unstorable_text,
)
from contracts.envelope import EventPayload

TOPIC = "mlops.monitoring"


class DriftTest(StrEnum):
    """Statistical test or distance used to compare a feature's live values with its reference."""

    KS = "ks"
    PSI = "psi"
    WASSERSTEIN = "wasserstein"
    JENSEN_SHANNON = "jensen_shannon"
    CHI2 = "chi2"


P_VALUE_TESTS = frozenset({DriftTest.KS, DriftTest.CHI2})
"""Tests judged by a p-value against a level α in (0, 1); the others by a distance against a threshold."""

JENSEN_SHANNON_MAX = math.sqrt(math.log(2))
"""The largest Jensen–Shannon distance (natural log, as monitoring computes it): disjoint distributions.
A threshold above it could never be reached."""

_THRESHOLD_RANGES: dict[DriftTest | None, tuple[float, bool]] = {
    DriftTest.KS: (1.0, False),
    DriftTest.CHI2: (1.0, False),
    DriftTest.JENSEN_SHANNON: (JENSEN_SHANNON_MAX, True),
    DriftTest.WASSERSTEIN: (math.inf, False),
    DriftTest.PSI: (math.inf, False),
    # No test named: the automatic choice makes the threshold the α of KS or chi-square in small windows
    # and the distance of Wasserstein or Jensen–Shannon in large ones, so it must suit all four.
    None: (JENSEN_SHANNON_MAX, True),
}
"""The upper end of a per-feature threshold's range by test (lower end: above 0), and whether it is
included."""


class CorrectionMethod(StrEnum):
    """Correction of p-values for testing many features at once."""

    BONFERRONI = "bonferroni"
    FDR_BH = "fdr_bh"
    NONE = "none"


class FeatureDrift(ContractModel):
    """Drift evidence for one feature (or for the model's predictions) in one window."""

    feature: Identifier = Field(
        min_length=1,
        description="Feature name, or `prediction` for prediction drift.",
        examples=["tenure_months"],
    )
    feature_type: FeatureType = Field(
        description="Numeric or categorical: decides the eligible tests.", examples=["numeric"]
    )
    test: DriftTest = Field(description="The test chosen for this feature.", examples=["ks"])
    statistic: float = Field(description="The test statistic or distance.", examples=[0.183])
    p_value: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="p-value after correction for many features; null for distances (psi, wasserstein, "
        "jensen_shannon), which are judged by their threshold. A chi2 on a sparse table (Cochran's rule) "
        "whose asymptotic p-value would count as drift has a Monte Carlo p-value instead "
        "(docs/monitoring.md).",
        examples=[0.00012],
    )
    threshold: float = Field(
        description="Drift when p_value < threshold (tests) or statistic >= threshold (distances). For "
        "jensen_shannon and psi that reached the policy's threshold, it is that threshold counted from the "
        "distance sampling alone gives a window of this size (docs/monitoring.md).",
        examples=[0.05],
    )
    drifted: bool = Field(description="Verdict for this window, before debouncing.")
    consecutive_windows: int = Field(
        default=1,
        ge=0,
        le=PG_BIGINT_MAX,
        description="Consecutive windows in which this feature drifted, this one included.",
    )
    n_current: int = Field(
        ge=0, le=PG_BIGINT_MAX, description="Non-missing values in the current window.", examples=[5000]
    )
    n_reference: int = Field(
        ge=0, le=PG_BIGINT_MAX, description="Values in the reference sample or profile.", examples=[40000]
    )
    n_missing: int = Field(
        default=0, ge=0, le=PG_BIGINT_MAX, description="Missing (null or NaN) values in the current window."
    )


class DriftDetected(EventPayload):
    """Live inputs of a model version no longer look like its training data, with per-feature evidence."""

    event_name: ClassVar[str] = "DriftDetected"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="Version whose traffic drifted.", examples=[6])
    window: TrafficWindow = Field(description="The window judged (time range, size, and its data).")
    reference_size: int = Field(
        ge=0, le=PG_BIGINT_MAX, description="Rows behind the reference profile.", examples=[40000]
    )
    features: list[FeatureDrift] = Field(
        min_length=1,
        description="Evidence for every feature tested, drifted or not; only the most drifted ones when "
        "`evidence_truncated`.",
    )
    drifted_features: list[Identifier] = Field(
        min_length=1,
        description="Features that drifted after debouncing (the reason for this event); only those with "
        "evidence in `features` when `evidence_truncated`.",
        examples=[["tenure_months", "monthly_charges"]],
    )
    drift_share: float = Field(
        ge=0, le=1, description="Share of tested features that drifted.", examples=[0.13]
    )
    share_threshold: float = Field(
        ge=0, le=1, description="Dataset-level drift when drift_share >= this.", examples=[0.1]
    )
    correction: CorrectionMethod = Field(
        description="Correction applied to p-values.", examples=["bonferroni"]
    )
    alpha: float = Field(
        gt=0, lt=1, description="Family-wise significance level before correction.", examples=[0.05]
    )
    prediction_drift: FeatureDrift | None = Field(
        default=None, description="Drift of the model's predictions (feature `prediction`), when computed."
    )
    features_total: int | None = Field(
        default=None,
        ge=1,
        le=PG_BIGINT_MAX,
        description="How many features the evidence covers in full: the length of `features` unless "
        "`evidence_truncated`. Null in events from before it was added (then `features` is complete).",
        examples=[5000],
    )
    drifted_features_total: int | None = Field(
        default=None,
        ge=1,
        le=PG_BIGINT_MAX,
        description="How many features drifted after debouncing: the length of `drifted_features` unless "
        "`evidence_truncated`. Null in events from before it was added.",
        examples=[1200],
    )
    evidence_truncated: bool = Field(
        default=False,
        description="The evidence of every feature would pass the event size limit (a model with thousands "
        "of features), so `features` holds the most drifted ones that fit: every feature that drifted after "
        "debouncing first, then those that drifted in this window, each group strongest first; "
        "`drifted_features` names those among them. The totals count them all, and monitoring's report of "
        "the window (`GET /v1/models/{model}/windows/{window id}`) has every feature.",
    )

    @model_validator(mode="after")
    def _drifted_are_tested(self) -> Self:
        tested = {f.feature for f in self.features}
        unknown = [name for name in self.drifted_features if name not in tested]
        if unknown:
            raise ValueError(f"drifted_features {unknown} have no evidence in features")
        if self.features_total is not None and self.features_total < len(self.features):
            raise ValueError(f"features_total {self.features_total} is less than the evidence in features")
        if self.drifted_features_total is not None and self.drifted_features_total < len(
            self.drifted_features
        ):
            raise ValueError(
                f"drifted_features_total {self.drifted_features_total} is less than drifted_features names"
            )
        return self


class PerformanceDegraded(EventPayload):
    """A labelled metric of a model version fell below its holdout metric from training, beyond tolerance."""

    event_name: ClassVar[str] = "PerformanceDegraded"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion = Field(description="Version whose performance degraded.", examples=[6])
    metric: Identifier = Field(
        min_length=1, description="Metric: accuracy, f1, roc_auc, rmse, mae, ...", examples=["roc_auc"]
    )
    value: float = Field(description="Metric over the labelled rows of the window.", examples=[0.71])
    baseline: float = Field(
        description="The version's holdout metric from training (ModelVersionRegistered.metrics).",
        examples=[0.86],
    )
    threshold: float = Field(
        description="Degraded when value is worse than this (below it if higher is better, above otherwise).",
        examples=[0.80],
    )
    higher_is_better: bool = Field(description="Direction of the metric.", examples=[True])
    window: TrafficWindow = Field(description="The window the metric was computed on.")
    labelled_rows: int = Field(
        ge=0, le=PG_BIGINT_MAX, description="Predictions in the window with a joined label.", examples=[1800]
    )
    late_labels: int = Field(
        default=0,
        ge=0,
        le=PG_BIGINT_MAX,
        description="Labels that arrived after their prediction's window closed.",
    )
    labels_outside_classes: int = Field(
        default=0,
        ge=0,
        le=PG_BIGINT_MAX,
        description="A classifier's labelled rows in the window whose label names none of the version's "
        'classes ("yes" for the classes 0 and 1), counted as wrong predictions. When they are most of '
        "the window, the labels' encoding is the likelier cause than the model.",
        examples=[0],
    )


class Verdict(StrEnum):
    """Outcome of comparing canary with stable for one rollout step."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    INCONCLUSIVE = "inconclusive"


class CanaryComparison(ContractModel):
    """One named comparison of canary against stable over the same window."""

    name: Identifier = Field(
        min_length=1,
        description="What was compared: error_rate, latency_p95_ms, prediction_divergence, accuracy, ...",
        examples=["latency_p95_ms"],
    )
    stable_value: float | None = Field(
        description="Value for the stable version (null: not measurable).", examples=[4.2]
    )
    canary_value: float | None = Field(
        description="Value for the canary version (null: not measurable).", examples=[4.9]
    )
    threshold: float | None = Field(
        default=None,
        description="Largest tolerated canary-vs-stable difference (or divergence).",
        examples=[5.0],
    )
    passed: bool | None = Field(description="Within tolerance; null when there was not enough data to judge.")
    detail: FreeText = Field(
        default="", description="Explanation for people.", examples=["+0.7 ms, tolerance 5 ms"]
    )


class CanaryVerdict(EventPayload):
    """Monitoring's verdict on one rollout step, with the comparisons behind it."""

    event_name: ClassVar[str] = "CanaryVerdict"
    topic: ClassVar[str] = TOPIC

    rollout_id: Identifier = Field(min_length=1, description="Rollout judged.", examples=["r-91c2"])
    model: ModelName = Field(description="Model name.", examples=["churn"])
    stable_version: ModelVersion | None = Field(description="Stable version.", examples=[6])
    canary_version: ModelVersion = Field(description="Canary version.", examples=[7])
    step_index: int = Field(ge=0, le=PG_INTEGER_MAX, description="The rollout step judged.", examples=[0])
    verdict: Verdict = Field(description="Healthy, unhealthy or inconclusive.", examples=["healthy"])
    evidence: list[CanaryComparison] = Field(description="Every comparison made.")
    stable_samples: int = Field(
        ge=0, le=PG_BIGINT_MAX, description="Stable predictions in the window.", examples=[4480]
    )
    canary_samples: int = Field(
        ge=0, le=PG_BIGINT_MAX, description="Canary predictions in the window.", examples=[512]
    )
    window: TrafficWindow = Field(description="The window both variants were compared over.")
    reason: ComposedReason = Field(
        default="",
        description=f"Summary for people: {COMPOSED_REASON_TEXT}.",
        examples=["all 4 comparisons within tolerance"],
    )


class DataQualityIssueKind(StrEnum):
    """Kind of data-quality finding."""

    MISSING_VALUES = "missing-values"
    UNSEEN_CATEGORY = "unseen-category"
    OUT_OF_RANGE = "out-of-range"
    TYPE_MISMATCH = "type-mismatch"
    UNKNOWN_MODEL = "unknown-model"


class DataQualityIssue(EventPayload):
    """Live inputs have a quality problem (missing values, unseen categories, ...) worth a person's look."""

    event_name: ClassVar[str] = "DataQualityIssue"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    model_version: ModelVersion | None = Field(
        description="Version concerned; null when the version is unknown to monitoring.", examples=[6]
    )
    kind: DataQualityIssueKind = Field(description="Kind of finding.", examples=["missing-values"])
    feature: Identifier | None = Field(
        default=None,
        description="Feature concerned, if one; null when the issue stands for many features "
        "(`features_total`).",
        examples=["monthly_charges"],
    )
    count: int = Field(
        ge=0,
        le=PG_BIGINT_MAX,
        description="Rows affected in the window (the worst feature's, when the issue stands for many).",
        examples=[412],
    )
    share: float = Field(
        ge=0,
        le=1,
        description="Share of the window's rows affected (the worst feature's, when the issue stands for "
        "many).",
        examples=[0.082],
    )
    window: TrafficWindow | None = Field(
        default=None, description="The window, when the finding is per window."
    )
    message: FreeText = Field(
        description="What was seen, for people.",
        examples=["8.2% of monthly_charges missing (reference: 0.1%)"],
    )
    features_total: int | None = Field(
        default=None,
        ge=1,
        le=PG_BIGINT_MAX,
        description="When many features of the window have this kind of finding (more than monitoring's "
        "`quality_issues_per_kind`, 10 by default: an upstream outage), one issue stands for them all: "
        "`feature` is null, `count` and `share` are the worst feature's, the message names the worst few, "
        "and this counts them. Monitoring's report of the window "
        "(`GET /v1/models/{model}/windows/{window id}`) lists every finding. Null for an issue about one "
        "feature, and in events from before it was added.",
        examples=[5000],
    )

    @model_validator(mode="after")
    def _many_features_name_none(self) -> Self:
        if self.features_total is not None and self.feature is not None:
            raise ValueError("an issue that stands for features_total features names no single feature")
        return self


class DriftPolicy(ContractModel):
    """How monitoring judges one model's traffic. The service's settings give the defaults; an operator may
    set one per model."""

    alpha: float = Field(0.05, gt=0, lt=1, description="Family-wise significance level of p-value tests.")
    correction: CorrectionMethod = Field(
        CorrectionMethod.BONFERRONI, description="Correction for many tests."
    )
    small_sample_max: int = Field(
        1_000,
        ge=1,
        le=1_000_000_000,
        description="p-value tests up to this many values on the smaller side, distances above.",
    )
    wasserstein_threshold: float = Field(0.1, gt=0, description="Normalised Wasserstein drift threshold.")
    jensen_shannon_threshold: float = Field(
        0.1,
        gt=0,
        le=JENSEN_SHANNON_MAX,
        description="Jensen–Shannon distance drift threshold, counted from the distance sampling alone gives "
        "a window of its size (the distance is at most √ln 2 ≈ 0.8326).",
    )
    psi_threshold: float = Field(
        0.1, gt=0, description="PSI drift threshold, counted from the PSI sampling alone gives a window."
    )
    share_threshold: float = Field(
        0.1, ge=0, le=1, description="Share of tested features that must have drifted for a DriftDetected."
    )
    consecutive_windows: int = Field(2, ge=1, le=1_000, description="Windows in a row a feature must drift.")
    cooldown_seconds: float = Field(1_800.0, ge=0, description="Quiet time after a DriftDetected.")
    feature_tests: dict[str, DriftTest] = Field(
        default_factory=dict, description="Per-feature test that replaces the automatic choice."
    )
    feature_thresholds: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Per-feature threshold: α in (0, 1) for `ks` and `chi2`, a distance above 0 for "
        "`wasserstein` and `psi`, in (0, √ln 2 ≈ 0.8326] for `jensen_shannon`; without a test in "
        "`feature_tests`, in (0, 0.8326] (it is then α in small windows and a distance in large ones).",
    )
    missing_share_tolerance: float = Field(
        0.05, ge=0, le=1, description="Missing share above the reference's by more than this is reported."
    )
    performance_tolerance: float = Field(
        0.05, ge=0, description="Allowed drop of a labelled metric below its validation baseline."
    )

    @model_validator(mode="after")
    def _thresholds_fit_their_tests(self) -> Self:
        for name, features in (
            ("feature_tests", self.feature_tests),
            ("feature_thresholds", self.feature_thresholds),
        ):
            for feature in features:
                # The policy is stored as jsonb, which cannot hold NUL, and no text holds a lone surrogate
                # (written out, it became another name); no feature is named "" or holds either.
                if not feature or unstorable_text(feature) is not None:
                    raise ValueError(f"{name}: {feature!r} is not a feature name")
        for feature, threshold in self.feature_thresholds.items():
            test = self.feature_tests.get(feature)
            upper, closed = _THRESHOLD_RANGES[test]
            if threshold > 0 and (threshold <= upper if closed else threshold < upper):
                continue
            span = f"(0, {upper:.4g}{']' if closed else ')'}".replace("inf)", "∞)")
            meaning = (
                f"the {'α' if test in P_VALUE_TESTS else 'distance'} of {test.value}"
                if test is not None
                else "α in small windows and a distance in large ones (no test in feature_tests)"
            )
            raise ValueError(
                f"feature_thresholds.{feature}: {threshold:g} is out of range: it is {meaning}, so it must "
                f"be in {span}"
            )
        return self


class DriftPolicyChanged(EventPayload):
    """An operator set a model's drift policy: what decides from now on whether its traffic drifted. The
    CloudEvents ``actor`` says who."""

    event_name: ClassVar[str] = "DriftPolicyChanged"
    topic: ClassVar[str] = TOPIC

    model: ModelName = Field(description="Model name.", examples=["churn"])
    policy: DriftPolicy = Field(description="The policy in force from now on, every field filled in.")
    previous: DriftPolicy | None = Field(
        default=None, description="The policy set before; null when the model had the service defaults."
    )
