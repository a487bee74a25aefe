"""One realistic example of every payload: the story of one model, ``churn``, going from version 6 to 7.

The generator writes them into the JSON Schemas and the AsyncAPI document; the tests round-trip each one
through the envelope. They are built with the classes themselves, so an example that stops being valid
fails at import, not in a reader's hands.
"""

from __future__ import annotations

from datetime import UTC, datetime

from contracts.audit import AuditCheckpoint
from contracts.commands import ArchiveRequested, PromoteRequested, RetrainRequested, RollbackRequested
from contracts.common import (
    ArtifactFormat,
    ArtifactRef,
    DatasetRef,
    EventRef,
    FeatureSpec,
    FeatureType,
    Lineage,
    ModelSignature,
    Stage,
    Task,
    TrafficWindow,
)
from contracts.datasets import DatasetRegistered
from contracts.envelope import EventPayload
from contracts.feedback import GroundTruthReceived
from contracts.models import ModelStageChanged, ModelVersionRegistered, ModelVersionTagged
from contracts.monitoring import (
    CanaryComparison,
    CanaryVerdict,
    CorrectionMethod,
    DataQualityIssue,
    DataQualityIssueKind,
    DriftDetected,
    DriftPolicy,
    DriftPolicyChanged,
    DriftTest,
    FeatureDrift,
    PerformanceDegraded,
    Verdict,
)
from contracts.predictions import PredictionOutput, PredictionRecord, PredictionsLogged, Variant
from contracts.rollouts import (
    RollbackReason,
    RolloutMode,
    RolloutPromoted,
    RolloutRolledBack,
    RolloutStarted,
    RolloutStepAdvanced,
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
from contracts.validation import (
    CheckKind,
    CheckResult,
    Comparator,
    ConfidenceInterval,
    ValidationFailed,
    ValidationPassed,
)

MODEL = "churn"

_MODEL_KEY = "9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4"
_PROFILE_KEY = "1900eab6c028483d7126599ee6f50de0d27907b5c65fa90524580b4b0f9852b0"
_WINDOW_KEY = "44ff7b02c80d38b26dd6aa31d9470aed81b32e10331a3c994fb1a9945fd847ba"
_SPEC_HASH = "d4f02eaafd1a9e9de7d10972ca8e47fa7a985825c3c9c1e249c72683cb3e4f19"
_STORE = "file:///srv/driftloop/artifacts"
SPEC_ARTIFACT = ArtifactRef(
    key=_SPEC_HASH, uri=f"{_STORE}/d4/{_SPEC_HASH}", format=ArtifactFormat.JSON, size_bytes=1_412
)

BASE_DATASET = DatasetRef(
    name="churn-base",
    version=3,
    sha256="b277fd623676a525c29b9eb155afc8c9010681814ceafb2d7627f47b9a232576",
    rows=50000,
)
TRAINING_SET = DatasetRef(
    name="churn-training",
    version=12,
    sha256="075f4ab854e2a33c8ac11c0758796af4ae994ec4e37e36b6f11b503492c68289",
    rows=54800,
)
HOLDOUT = DatasetRef(
    name="churn-holdout",
    version=12,
    sha256="d179b28cc8927b726d766bc0a22ed40ffc879d40f62a100e7d97dabb24253669",
    rows=10960,
)

WINDOW = TrafficWindow(
    id="churn:6:000142",
    start=datetime(2025, 6, 2, 8, 41, 7, tzinfo=UTC),
    end=datetime(2025, 6, 2, 8, 59, 58, tzinfo=UTC),
    size=5000,
    data=ArtifactRef(
        key=_WINDOW_KEY, uri=f"{_STORE}/44/{_WINDOW_KEY}", format=ArtifactFormat.PARQUET, size_bytes=211_904
    ),
)

SIGNATURE = ModelSignature(
    features=[
        FeatureSpec(name="tenure_months", type=FeatureType.NUMERIC),
        FeatureSpec(name="monthly_charges", type=FeatureType.NUMERIC),
        FeatureSpec(name="plan", type=FeatureType.CATEGORICAL, categories=["basic", "plus", "premium"]),
    ],
    target="churned",
    task=Task.CLASSIFICATION,
    classes=[0, 1],
)

LINEAGE = Lineage(
    datasets=[BASE_DATASET, TRAINING_SET],
    holdout=HOLDOUT,
    spec_hash=_SPEC_HASH,
    params={
        "estimator": "HistGradientBoostingClassifier",
        "estimator__max_depth": 6,
        "estimator__learning_rate": 0.1,
        "estimator__early_stopping": False,
    },
    code_version="c165da6",
    parent_version=6,
    seed=20250602,
    environment={"python": "3.11.9", "scikit-learn": "1.9.1", "numpy": "2.4.6"},
    spec=SPEC_ARTIFACT,
)

MODEL_ARTIFACT = ArtifactRef(
    key=_MODEL_KEY, uri=f"{_STORE}/93/{_MODEL_KEY}", format=ArtifactFormat.SKOPS, size_bytes=482_113
)
PROFILE_ARTIFACT = ArtifactRef(
    key=_PROFILE_KEY, uri=f"{_STORE}/19/{_PROFILE_KEY}", format=ArtifactFormat.JSON, size_bytes=96_410
)

_DRIFT_EVENT = EventRef(id="5b0e7c1e-6a8d-4f0b-9d55-0c0f0c3e1a77", type="io.driftloop.DriftDetected.v1")

_TENURE_DRIFT = FeatureDrift(
    feature="tenure_months",
    feature_type=FeatureType.NUMERIC,
    test=DriftTest.KS,
    statistic=0.183,
    p_value=0.00012,
    threshold=0.05,
    drifted=True,
    consecutive_windows=3,
    n_current=5000,
    n_reference=40000,
)
_CHARGES_DRIFT = FeatureDrift(
    feature="monthly_charges",
    feature_type=FeatureType.NUMERIC,
    test=DriftTest.WASSERSTEIN,
    statistic=0.142,
    threshold=0.1,
    drifted=True,
    consecutive_windows=3,
    n_current=4988,
    n_reference=40000,
    n_missing=12,
)
_PLAN_DRIFT = FeatureDrift(
    feature="plan",
    feature_type=FeatureType.CATEGORICAL,
    test=DriftTest.CHI2,
    statistic=2.1,
    p_value=1.0,
    threshold=0.05,
    drifted=False,
    consecutive_windows=0,
    n_current=5000,
    n_reference=40000,
)

_CHECKS_PASSED = [
    CheckResult(
        name="roc_auc>=0.75",
        kind=CheckKind.THRESHOLD,
        metric="roc_auc",
        value=0.861,
        threshold=0.75,
        comparator=Comparator.GE,
        passed=True,
        detail="0.861 >= 0.75 on 10,960 holdout rows",
    ),
    CheckResult(
        name="challenger-vs-champion:roc_auc",
        kind=CheckKind.CHAMPION_CHALLENGER,
        metric="roc_auc",
        value=0.012,
        threshold=-0.01,
        comparator=Comparator.GE,
        passed=True,
        interval=ConfidenceInterval(low=-0.004, high=0.021, level=0.95),
        detail="challenger - champion = +0.012, 95% CI [-0.004, 0.021], lower bound >= -0.01",
    ),
    CheckResult(
        name="signature-compatible",
        kind=CheckKind.SIGNATURE,
        passed=True,
        detail="same features and types as version 6",
    ),
    CheckResult(
        name="latency_ms_per_row<=2",
        kind=CheckKind.LATENCY,
        metric="latency_ms_per_row",
        value=0.08,
        threshold=2.0,
        comparator=Comparator.LE,
        passed=True,
    ),
]

EXAMPLES: dict[type[EventPayload], EventPayload] = {
    example.__class__: example
    for example in (
        DatasetRegistered(
            name="churn-base",
            dataset_version=3,
            sha256=BASE_DATASET.sha256,
            artifact=ArtifactRef(
                key=BASE_DATASET.sha256,
                uri=f"{_STORE}/b2/{BASE_DATASET.sha256}",
                format=ArtifactFormat.PARQUET,
                size_bytes=1_873_220,
            ),
            row_count=50000,
            columns={
                "tenure_months": "int64",
                "monthly_charges": "float64",
                "plan": "string",
                "churned": "int64",
            },
            source="upload",
            models=["churn"],
            description="Customer export, Q1 2025",
        ),
        ModelSpecRegistered(
            model=MODEL,
            spec_hash=_SPEC_HASH,
            spec=SPEC_ARTIFACT,
            task=Task.CLASSIFICATION,
            estimator="hist_gradient_boosting",
            base_datasets=["churn-base"],
            previous_spec_hash="b9a1c3f0e2d4c6b8a0f1e3d5c7b9a1c3f0e2d4c6b8a0f1e3d5c7b9a1c3f0e2d4",
        ),
        TrainingRequested(
            job_id="job-2f6c1d0e",
            model=MODEL,
            trigger=TrainingTrigger.DRIFT_DETECTED,
            reason="drift in 2 of 3 features (share 0.67 >= 0.30)",
            trigger_event=_DRIFT_EVENT,
            datasets=[BASE_DATASET],
            traffic_window=WINDOW,
            parent_version=6,
        ),
        TrainingSkipped(
            model=MODEL,
            trigger=TrainingTrigger.DRIFT_DETECTED,
            trigger_event=_DRIFT_EVENT,
            reason=SkipReason.COOLDOWN,
            message="last run finished 12 min ago; cooldown is 30 min (next possible at 09:18Z)",
            retry_after_seconds=1080,
        ),
        TrainingStarted(
            job_id="job-2f6c1d0e",
            run_id="run-8a41b7",
            model=MODEL,
            attempt=1,
            spec_hash=_SPEC_HASH,
            datasets=[BASE_DATASET, TRAINING_SET],
        ),
        TrainingProgress(
            job_id="job-2f6c1d0e",
            run_id="run-8a41b7",
            model=MODEL,
            phase="fitting",
            fraction=0.4,
            elapsed_seconds=3.5,
        ),
        TrainingCompleted(
            job_id="job-2f6c1d0e",
            run_id="run-8a41b7",
            model=MODEL,
            artifact=MODEL_ARTIFACT,
            profile=PROFILE_ARTIFACT,
            metrics={"roc_auc": 0.861, "accuracy": 0.842, "f1": 0.611},
            signature=SIGNATURE,
            lineage=LINEAGE,
            train_rows=43840,
            holdout_rows=10960,
            duration_seconds=8.7,
        ),
        TrainingFailed(
            job_id="job-5e0a77c1",
            run_id="run-c03f12",
            model=MODEL,
            reason=FailureReason.UNKNOWN_FEATURE,
            message="spec names feature 'tenure' which is not a column of churn-base v3 "
            "(did you mean 'tenure_months'?)",
            attempt=1,
            duration_seconds=0.4,
        ),
        ModelVersionRegistered(
            model=MODEL,
            model_version=7,
            run_id="run-8a41b7",
            job_id="job-2f6c1d0e",
            artifact=MODEL_ARTIFACT,
            profile=PROFILE_ARTIFACT,
            signature=SIGNATURE,
            metrics={"roc_auc": 0.861, "accuracy": 0.842},
            lineage=LINEAGE,
        ),
        ModelStageChanged(
            model=MODEL,
            model_version=7,
            from_stage=Stage.CANARY,
            to_stage=Stage.PRODUCTION,
            reason="rollout r-91c2 promoted after 3 healthy steps",
            caused_by=EventRef(
                id="0d8e2b6a-33f1-4c56-8f0e-7b9a1c2d3e4f", type="io.driftloop.RolloutPromoted.v1"
            ),
            aliases=["champion"],
            sequence=42,
        ),
        ModelVersionTagged(model=MODEL, model_version=7, key="approved-by", value="risk-team", previous=None),
        ValidationPassed(
            model=MODEL,
            model_version=7,
            report_id="vr-5d1e",
            checks=_CHECKS_PASSED,
            champion_version=6,
            holdout=HOLDOUT,
            duration_seconds=1.9,
            checks_total=len(_CHECKS_PASSED),
            failed_checks_total=0,
        ),
        ValidationFailed(
            model=MODEL,
            model_version=8,
            report_id="vr-6a02",
            checks=[
                CheckResult(
                    name="roc_auc>=0.75",
                    kind=CheckKind.THRESHOLD,
                    metric="roc_auc",
                    value=0.702,
                    threshold=0.75,
                    comparator=Comparator.GE,
                    passed=False,
                    detail="0.702 < 0.75 on 10,960 holdout rows",
                ),
                CheckResult(name="sanity:not-constant", kind=CheckKind.SANITY, passed=True),
            ],
            failed_checks=["roc_auc>=0.75"],
            champion_version=7,
            holdout=HOLDOUT,
            duration_seconds=1.4,
            checks_total=2,
            failed_checks_total=1,
        ),
        RolloutStarted(
            rollout_id="r-91c2",
            model=MODEL,
            stable_version=6,
            canary_version=7,
            mode=RolloutMode.CANARY,
            steps=[0.1, 0.5, 1.0],
            step_index=0,
            weight=0.1,
            min_samples=500,
            bake_seconds=30,
            validation_report_id="vr-5d1e",
        ),
        RolloutStepAdvanced(
            rollout_id="r-91c2",
            model=MODEL,
            stable_version=6,
            canary_version=7,
            step_index=1,
            previous_weight=0.1,
            weight=0.5,
            samples_seen=812,
            step_seconds=34.2,
        ),
        RolloutPromoted(
            rollout_id="r-91c2",
            model=MODEL,
            model_version=7,
            previous_version=6,
            steps_completed=3,
            duration_seconds=104.0,
        ),
        RolloutRolledBack(
            rollout_id="r-a7d4",
            model=MODEL,
            stable_version=7,
            canary_version=8,
            step_index=0,
            weight=0.1,
            reason=RollbackReason.UNHEALTHY_VERDICT,
            message="canary error rate 4.1% vs stable 0.2% over 612 vs 5,480 requests",
        ),
        DriftDetected(
            model=MODEL,
            model_version=6,
            window=WINDOW,
            reference_size=40000,
            features=[_TENURE_DRIFT, _CHARGES_DRIFT, _PLAN_DRIFT],
            drifted_features=["tenure_months", "monthly_charges"],
            drift_share=0.67,
            share_threshold=0.3,
            correction=CorrectionMethod.BONFERRONI,
            alpha=0.05,
            features_total=3,
            drifted_features_total=2,
            prediction_drift=FeatureDrift(
                feature="prediction",
                feature_type=FeatureType.CATEGORICAL,
                test=DriftTest.JENSEN_SHANNON,
                statistic=0.061,
                threshold=0.1,
                drifted=False,
                n_current=5000,
                n_reference=40000,
            ),
        ),
        PerformanceDegraded(
            model=MODEL,
            model_version=6,
            metric="roc_auc",
            value=0.71,
            baseline=0.86,
            threshold=0.8,
            higher_is_better=True,
            window=WINDOW,
            labelled_rows=1800,
            late_labels=37,
        ),
        CanaryVerdict(
            rollout_id="r-91c2",
            model=MODEL,
            stable_version=6,
            canary_version=7,
            step_index=0,
            verdict=Verdict.HEALTHY,
            evidence=[
                CanaryComparison(
                    name="error_rate", stable_value=0.002, canary_value=0.002, threshold=0.01, passed=True
                ),
                CanaryComparison(
                    name="latency_p95_ms",
                    stable_value=4.2,
                    canary_value=4.9,
                    threshold=5.0,
                    passed=True,
                    detail="+0.7 ms, tolerance 5 ms",
                ),
                CanaryComparison(
                    name="prediction_divergence",
                    stable_value=None,
                    canary_value=0.03,
                    threshold=0.1,
                    passed=True,
                    detail="Jensen-Shannon distance 0.03",
                ),
                CanaryComparison(
                    name="accuracy",
                    stable_value=None,
                    canary_value=None,
                    passed=None,
                    detail="41 labelled canary rows, 200 needed",
                ),
            ],
            stable_samples=4480,
            canary_samples=512,
            window=TrafficWindow(
                id="churn:r-91c2:0",
                start=datetime(2025, 6, 2, 9, 20, 0, tzinfo=UTC),
                end=datetime(2025, 6, 2, 9, 20, 34, tzinfo=UTC),
                size=4992,
            ),
            reason="3 comparisons within tolerance, 1 without enough labels",
        ),
        DataQualityIssue(
            model=MODEL,
            model_version=6,
            kind=DataQualityIssueKind.MISSING_VALUES,
            feature="monthly_charges",
            count=412,
            share=0.082,
            window=WINDOW,
            message="8.2% of monthly_charges missing (reference: 0.1%)",
        ),
        DriftPolicyChanged(
            model=MODEL,
            policy=DriftPolicy(psi_threshold=0.2, feature_tests={"tenure_months": DriftTest.PSI}),
            previous=None,
        ),
        PredictionsLogged(
            model=MODEL,
            model_version=7,
            variant=Variant.CANARY,
            rollout_id="r-91c2",
            request_id="req-7f3a9c",
            predicted_at=datetime(2025, 6, 2, 9, 20, 3, 512000, tzinfo=UTC),
            latency_ms=1.8,
            rows=[
                PredictionRecord(
                    prediction_id="p-01J9Z6M3K2Q8",
                    entity_key="customer-48213",
                    inputs={"tenure_months": 14, "monthly_charges": 39.9, "plan": "basic"},
                    output=PredictionOutput(prediction=1, probabilities={"0": 0.27, "1": 0.73}),
                ),
                PredictionRecord(
                    prediction_id="p-01J9Z6M3K2Q9",
                    entity_key="customer-50117",
                    inputs={"tenure_months": 61, "monthly_charges": None, "plan": "premium"},
                    output=PredictionOutput(prediction=0, probabilities={"0": 0.91, "1": 0.09}),
                ),
            ],
        ),
        GroundTruthReceived(
            prediction_id="p-01J9Z6M3K2Q8",
            model=MODEL,
            model_version=7,
            label=1,
            observed_at=datetime(2025, 6, 2, 9, 24, 0, tzinfo=UTC),
            entity_key="customer-48213",
        ),
        RetrainRequested(model=MODEL, reason="new labelled export from the CRM"),
        PromoteRequested(model=MODEL, model_version=7, reason="canary clean for an hour; promoting"),
        RollbackRequested(
            model=MODEL, model_version=7, to_version=6, reason="complaints from the sales team"
        ),
        ArchiveRequested(model=MODEL, model_version=4, reason="superseded; kept for the record"),
        AuditCheckpoint(
            sequence=184467,
            head_hash="b441775b084d687bec4f2f6be95598a4cf2f017c7043262d359de00b0505d00d",
            row_count=184467,
            signed_at=datetime(2025, 6, 2, 10, 15, 0, tzinfo=UTC),
            key_id="73518d035cf770e1",
            signature="XJ0ELWGcO+inJT8P5ck6B86hH5td+zb7/achqgnRPMsj5Ykl4WeK61uPXMxn2bdNA9o49VYJn+N/shcy+/GOCw==",
        ),
    )
}
"""One example per payload class."""

AUDIT_EXAMPLE_PUBLIC_KEY = "kBhlzN2W8wv3wbGGbO/XIowBE7btAej1oWyo0GfuYq8="
"""Base64 raw Ed25519 public key that verifies the AuditCheckpoint example (its private key is throwaway)."""
