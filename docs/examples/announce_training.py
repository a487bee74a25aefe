"""A stand-in for the training service, for the registry walkthrough (docs/registry.md).

It does what training does at the end of a run, in miniature: fetches a registered dataset from the
registry, fits a small scikit-learn pipeline, stores the model (skops) and its reference profile in the
artifact store, and publishes TrainingCompleted on mlops.training. The registry then registers the version
exactly as it would for the real training service.

    .venv/bin/python docs/examples/announce_training.py --model churn-demo --dataset churn-demo --version 1

Environment: DRIFTLOOP_KAFKA_BOOTSTRAP, DRIFTLOOP_ARTIFACTS_URL (default: .driftloop/artifacts), and
REGISTRY_URL (default http://127.0.0.1:8101).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import platform
import time
import uuid

import httpx
import numpy as np
import pandas as pd
import sklearn
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
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
)
from contracts.envelope import new_event
from contracts.training import TrainingCompleted
from libs.artifacts import ArtifactStore, save_model
from libs.bus.kafka import KafkaPublisher
from libs.profiles import build_profile
from libs.settings import KafkaSettings, ServiceSettings

SEED = 20250602


def fetch_dataset(registry: str, name: str, version: int) -> tuple[DatasetRef, pd.DataFrame]:
    """The dataset version's metadata and rows, through the registry's API (read-only token)."""
    auth = {"Authorization": "Bearer dev-viewer"}
    with httpx.Client(base_url=registry, headers=auth, timeout=30) as http:
        meta = http.get(f"/v1/datasets/{name}/versions/{version}")
        meta.raise_for_status()
        body = http.get(f"/v1/datasets/{name}/versions/{version}/file")
        body.raise_for_status()
    ds = meta.json()
    ref = DatasetRef(name=name, version=version, sha256=ds["sha256"], rows=ds["row_count"])
    return ref, pd.read_parquet(io.BytesIO(body.content))


def train(frame: pd.DataFrame, target: str) -> tuple[Pipeline, ModelSignature, dict[str, float], int, int]:
    """Fit a logistic regression on every other column; metrics on a 25% holdout."""
    features = [c for c in frame.columns if c != target]
    categorical = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    numeric = [c for c in features if c not in categorical]
    x_train, x_test, y_train, y_test = train_test_split(
        frame[features], frame[target], test_size=0.25, random_state=SEED, stratify=frame[target]
    )
    pipeline = Pipeline(
        [
            (
                "prep",
                ColumnTransformer(
                    [
                        ("num", StandardScaler(), numeric),
                        ("cat", OneHotEncoder(handle_unknown="ignore"), categorical),
                    ]
                ),
            ),
            ("estimator", LogisticRegression(max_iter=500)),
        ]
    ).fit(x_train, y_train)
    scores = pipeline.predict_proba(x_test)[:, 1]
    metrics = {
        "roc_auc": round(float(roc_auc_score(y_test, scores)), 4),
        "accuracy": round(float(accuracy_score(y_test, pipeline.predict(x_test))), 4),
    }
    signature = ModelSignature(
        features=[
            FeatureSpec(
                name=c,
                type=FeatureType.CATEGORICAL if c in categorical else FeatureType.NUMERIC,
                categories=sorted(frame[c].dropna().unique().tolist()) if c in categorical else None,
            )
            for c in features
        ],
        target=target,
        task=Task.CLASSIFICATION,
        classes=[int(c) for c in np.sort(frame[target].unique())],
    )
    return pipeline, signature, metrics, len(x_train), len(x_test)


def wait_registered(registry: str, model: str, run_id: str, deadline_s: float = 60.0) -> int:
    """Poll the registry until the run is a version (the registry consumes the event asynchronously)."""
    until = time.monotonic() + deadline_s
    with httpx.Client(base_url=registry, headers={"Authorization": "Bearer dev-viewer"}, timeout=10) as http:
        while time.monotonic() < until:
            page = http.get(f"/v1/models/{model}/versions", params={"limit": 100})
            if page.status_code == 200:
                for v in page.json()["items"]:
                    if v["run_id"] == run_id:
                        return int(v["version"])
            time.sleep(0.5)
    raise SystemExit(f"the registry did not register {run_id} within {deadline_s:.0f}s: is it running?")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--dataset", required=True, help="registered dataset name")
    parser.add_argument("--version", type=int, required=True, help="dataset version")
    parser.add_argument("--target", default="churned", help="target column")
    args = parser.parse_args()

    started = time.monotonic()
    registry = os.environ.get("REGISTRY_URL", "http://127.0.0.1:8101")
    dataset, frame = fetch_dataset(registry, args.dataset, args.version)
    pipeline, signature, metrics, train_rows, holdout_rows = train(frame, args.target)

    store = ArtifactStore(ServiceSettings().artifacts_url)
    model = save_model(store, pipeline)
    kinds = [
        (f.name, "categorical" if f.type is FeatureType.CATEGORICAL else "numeric")
        for f in signature.features
    ]
    profile = store.put(build_profile(frame, kinds, seed=SEED).to_bytes())  # type: ignore[arg-type]

    spec = {"features": kinds, "target": args.target, "estimator": "LogisticRegression", "max_iter": 500}
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    completed = TrainingCompleted(
        job_id=f"job-{uuid.uuid4().hex[:8]}",
        run_id=run_id,
        model=args.model,
        artifact=ArtifactRef(
            key=model.sha256, uri=model.uri, format=ArtifactFormat.SKOPS, size_bytes=model.size
        ),
        profile=ArtifactRef(
            key=profile.sha256, uri=profile.uri, format=ArtifactFormat.JSON, size_bytes=profile.size
        ),
        metrics=metrics,
        signature=signature,
        lineage=Lineage(
            datasets=[dataset],
            spec_hash=hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest(),
            params={"estimator": "LogisticRegression", "estimator__max_iter": 500},
            code_version="docs-example",
            seed=SEED,
            environment={"python": platform.python_version(), "scikit-learn": sklearn.__version__},
        ),
        train_rows=train_rows,
        holdout_rows=holdout_rows,
        duration_seconds=round(time.monotonic() - started, 3),
    )
    publisher = KafkaPublisher(KafkaSettings())
    await publisher.start()
    try:
        await publisher.publish(new_event(completed, source="/driftloop/docs-example"))
    finally:
        await publisher.stop()
    print(f"published TrainingCompleted for {args.model}: {run_id}, metrics {metrics}")
    version = wait_registered(registry, args.model, run_id)
    print(f"the registry registered it as {args.model} version {version}")


if __name__ == "__main__":
    asyncio.run(main())
