"""Fakes of serving's ports, and a tiny real scikit-learn pipeline with its signature."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from contracts.common import (
    ArtifactFormat,
    ArtifactRef,
    DatasetRef,
    FeatureSpec,
    FeatureType,
    Lineage,
    ModelSignature,
    Task,
    TrafficWindow,
)
from contracts.envelope import CloudEvent, new_event
from contracts.models import AppliedStageChange, ModelVersionRegistered
from contracts.monitoring import CanaryVerdict, Verdict
from contracts.rollouts import RolloutMode, RolloutStarted
from contracts.validation import CheckKind, CheckResult, ValidationPassed
from libs.artifacts import StoreUnavailable
from services.serving.domain import LogItem, ModelRoute, SampleFlush
from services.serving.ports import ModelLoadError, VersionRecord
from services.serving.routing import ServedModel

PLANS = ["basic", "plus", "premium"]


def churn_signature() -> ModelSignature:
    """Two numeric features and one categorical, binary target."""
    return ModelSignature(
        features=[
            FeatureSpec(name="tenure_months", type=FeatureType.NUMERIC),
            FeatureSpec(name="monthly_charges", type=FeatureType.NUMERIC),
            FeatureSpec(name="plan", type=FeatureType.CATEGORICAL, categories=list(PLANS)),
        ],
        target="churned",
        task=Task.CLASSIFICATION,
        classes=[0, 1],
    )


def churn_pipeline(seed: int = 0, rows: int = 300, *, with_std: bool = True) -> Pipeline:
    """A fitted pipeline on synthetic data: imputers, scaler (centring only without ``with_std``), one-hot
    (unseen levels ignored), logistic."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "tenure_months": rng.integers(0, 72, rows).astype(float),
            "monthly_charges": rng.normal(60, 20, rows),
            "plan": rng.choice(PLANS, rows),
        }
    )
    target = ((frame["tenure_months"] < 12) ^ (rng.random(rows) < 0.1)).astype(int)
    numeric = Pipeline(
        [("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler(with_std=with_std))]
    )
    categorical = Pipeline(
        [
            ("impute", SimpleImputer(strategy="most_frequent")),
            ("onehot", OneHotEncoder(handle_unknown="ignore")),
        ]
    )
    pipeline = Pipeline(
        [
            (
                "features",
                ColumnTransformer(
                    [("num", numeric, ["tenure_months", "monthly_charges"]), ("cat", categorical, ["plan"])]
                ),
            ),
            ("model", LogisticRegression(C=1.0 + seed)),
        ]
    )
    return pipeline.fit(frame, target)


def record(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"tenure_months": 5, "monthly_charges": 70.5, "plan": "basic"}
    row.update(overrides)
    return row


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FakeVersions:
    """ModelVersions in a dict."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], VersionRecord] = {}
        self.changes: dict[str, AppliedStageChange] = {}

    async def registered(
        self, model: str, version: int, *, artifact_key: str, signature: ModelSignature, stage: str
    ) -> VersionRecord:
        old = self.rows.get((model, version)) or VersionRecord(model, version)
        rec = replace(old, artifact_key=artifact_key, signature=signature, stage=old.stage or stage)
        self.rows[(model, version)] = rec
        return rec

    async def validated(self, model: str, version: int, *, report_id: str) -> VersionRecord:
        old = self.rows.get((model, version)) or VersionRecord(model, version)
        rec = replace(old, validated=True, validation_report_id=report_id)
        self.rows[(model, version)] = rec
        return rec

    async def get(self, model: str, version: int) -> VersionRecord | None:
        return self.rows.get((model, version))

    async def set_stage(self, model: str, version: int, stage: str) -> None:
        old = self.rows.get((model, version)) or VersionRecord(model, version)
        self.rows[(model, version)] = replace(old, stage=stage)

    async def load_failed(self, model: str, version: int, error: str) -> None:
        old = self.rows.get((model, version)) or VersionRecord(model, version)
        self.rows[(model, version)] = replace(old, load_error=error)

    async def last_change(self, model: str) -> AppliedStageChange | None:
        return self.changes.get(model)

    async def keep_change(self, model: str, change: AppliedStageChange) -> None:
        self.changes[model] = change


class FakeRoutes:
    """Routes in a dict; ``saves`` counts writes (each would notify every replica). ``clock``: the store's,
    which times every decision (Postgres' for PgRoutes)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.rows: dict[str, ModelRoute] = {}
        self.saves = 0
        self.clock = clock or Clock()

    async def lock(self, model: str) -> ModelRoute:
        return self.rows.get(model) or ModelRoute(model)

    async def now(self) -> datetime:
        return self.clock()

    async def save(self, route: ModelRoute, *, now: datetime) -> None:
        self.rows[route.model] = route
        self.saves += 1


class FakeSampleCounts:
    """Canary sample counts per (model, rollout id, step), saved by the rule of the Postgres store
    (``services.serving.adapters.postgres.add_samples``): a flush numbered no later than the last one
    recorded for its replica adds nothing. ``answers_lost``: the next saves whose commit goes through and
    whose answer is lost (a timeout), one each; ``flushes``: every flush ``save`` was called with."""

    def __init__(self) -> None:
        self.samples: Counter[tuple[str, str, int]] = Counter()
        self.last: dict[str, int] = {}
        self.flushes: list[SampleFlush] = []
        self.answers_lost = 0

    async def save(self, flush: SampleFlush) -> None:
        self.flushes.append(flush)
        if flush.sequence > self.last.get(flush.replica, 0):
            self.last[flush.replica] = flush.sequence
            for model, rollout_id, step, rows in flush.items:
                self.samples[(model, rollout_id, step)] += rows
        if self.answers_lost:
            self.answers_lost -= 1
            raise TimeoutError("committed, but the answer did not come")


class FakeRoutingSource:
    """RoutingSource on the fakes' routes and versions, read as PgRoutingSource reads its tables: each
    route with the records of its stable version and of its live canary."""

    def __init__(self, routes: FakeRoutes, versions: FakeVersions) -> None:
        self.routes = routes
        self.versions = versions

    async def snapshot(self) -> list[tuple[ModelRoute, dict[int, VersionRecord]]]:
        out = []
        for model, route in sorted(self.routes.rows.items()):
            live = route.active
            wanted = {route.stable_version, live.canary_version if live else None}
            records = {v: r for (m, v), r in self.versions.rows.items() if m == model and v in wanted}
            out.append((route, records))
        return out

    async def wait_for_change(self, timeout_s: float) -> None:
        return None


class FakeLoader:
    """Loads any registered record with one shared estimator, except artifact keys listed as broken;
    ``held`` is the artifacts a real loader would still hold in memory. ``failing``: errors the next loads
    raise, one each, as a store that is away does (an Outage, a timeout). ``away``: artifact keys whose
    every load fails as a store that cannot be reached for them does (StoreUnavailable)."""

    def __init__(self, estimator: Any = None) -> None:
        self.estimator = estimator if estimator is not None else churn_pipeline()
        self.broken: set[str] = set()
        self.failing: list[Exception] = []
        self.away: set[str] = set()
        self.loaded: list[tuple[str, int]] = []
        self.held: set[str] = set()

    async def load(self, record: VersionRecord) -> ServedModel:
        if record.artifact_key is None or record.signature is None:
            raise ModelLoadError("not registered")
        if self.failing:
            raise self.failing.pop(0)
        if record.artifact_key in self.away:
            raise StoreUnavailable(f"artifact store unreachable reading {record.artifact_key[:8]}")
        if record.artifact_key in self.broken:
            raise ModelLoadError(f"artifact {record.artifact_key[:8]} is untrusted")
        self.loaded.append((record.model, record.version))
        self.held.add(record.artifact_key)
        return ServedModel(
            record.model, record.version, record.artifact_key, record.signature, self.estimator
        )

    def keep_served(self, artifact_keys: Collection[str]) -> None:
        self.held &= set(artifact_keys)


# --- events as the registry, validation and monitoring publish them ------------------------------------
SHA = "ab" * 32


def registered(
    version: int, model: str = "churn", key: str | None = None
) -> CloudEvent[ModelVersionRegistered]:
    artifact = ArtifactRef(
        key=key or f"{version:02x}" * 32, uri="file:///x", format=ArtifactFormat.SKOPS, size_bytes=1
    )
    payload = ModelVersionRegistered(
        model=model,
        model_version=version,
        run_id="run-1",
        job_id="job-1",
        artifact=artifact,
        profile=ArtifactRef(key=SHA, uri="file:///p", format=ArtifactFormat.JSON, size_bytes=1),
        signature=churn_signature(),
        metrics={"accuracy": 0.9},
        lineage=Lineage(
            datasets=[DatasetRef(name="d", version=1, sha256=SHA)], spec_hash=SHA, code_version="t", seed=1
        ),
    )
    return new_event(payload, source="/driftloop/registry")


def passed(version: int, model: str = "churn") -> CloudEvent[ValidationPassed]:
    check = CheckResult(name="accuracy>=0.5", kind=CheckKind.THRESHOLD, passed=True)
    payload = ValidationPassed(
        model=model, model_version=version, report_id=f"vr-{version}", checks=[check], duration_seconds=1.0
    )
    return new_event(payload, source="/driftloop/validation")


def canary_verdict(
    started: RolloutStarted, step: int, verdict: Verdict, samples: int = 50
) -> CloudEvent[Any]:
    clock_window = TrafficWindow(
        id="w-1",
        start="2026-01-01T00:00:00Z",
        end="2026-01-01T00:01:00Z",
        size=samples,
    )
    payload = CanaryVerdict(
        rollout_id=started.rollout_id,
        model=started.model,
        stable_version=started.stable_version,
        canary_version=started.canary_version,
        step_index=step,
        verdict=verdict,
        evidence=[],
        stable_samples=samples * 9,
        canary_samples=samples,
        window=clock_window,
        reason=f"{verdict.value} on step {step}",
    )
    return new_event(payload, source="/driftloop/monitoring")


def rollout_never_started(model: str) -> RolloutStarted:
    """A rollout serving never started, of a model it never served: what a hand-made or misrouted
    verdict about ``model`` refers to."""
    return RolloutStarted(
        rollout_id="r-ghost",
        model=model,
        stable_version=1,
        canary_version=2,
        mode=RolloutMode.CANARY,
        steps=[0.1, 1.0],
        step_index=0,
        weight=0.1,
        min_samples=0,
        bake_seconds=0.0,
    )


class NoLog:
    """A prediction log that takes every item and keeps none."""

    def offer(self, item: LogItem) -> bool:
        return True
