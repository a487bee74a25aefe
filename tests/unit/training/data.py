"""Generated data and specs for the training and validation tests (numpy only, never downloads)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contracts.common import ArtifactFormat, ArtifactRef
from libs.artifacts import ArtifactStore
from libs.modelspec import ModelSpec, spec_from_data
from services.training.worker import run_training

PLANS = ["basic", "plus", "premium"]


def churn_frame(rows: int = 1200, *, seed: int = 0, numeric: int = 4, shift: float = 0.0) -> pd.DataFrame:
    """A binary target driven by a few numeric features and a plan; ``shift`` moves the inputs (drift)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({f"x{i}": rng.normal(shift, 1.0, rows) for i in range(numeric)})
    frame["plan"] = rng.choice(PLANS, size=rows, p=[0.5, 0.3, 0.2])
    logit = 1.5 * frame["x0"] - 1.0 * frame["x1"] + 0.5 * (frame["plan"] == "premium")
    frame["churned"] = (logit + rng.logistic(0, 0.6, rows) > 0).astype("int64")
    return frame


def regression_frame(rows: int = 800, *, seed: int = 0) -> pd.DataFrame:
    """A noisy linear target."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({f"x{i}": rng.normal(0, 1, rows) for i in range(3)})
    frame["price"] = 3 * frame["x0"] - 2 * frame["x1"] + rng.normal(0, 0.5, rows)
    return frame


def churn_spec_data(name: str = "churn", *, numeric: int = 4, **overrides: Any) -> dict[str, Any]:
    """A spec (as parsed YAML) for :func:`churn_frame`."""
    data: dict[str, Any] = {
        "name": name,
        "features": [{"name": f"x{i}", "type": "numeric"} for i in range(numeric)]
        + [{"name": "plan", "type": "categorical"}],
        "target": "churned",
        "task": "classification",
        "estimator": "logistic_regression",
        "params": {"C": 1.0},
        "seed": 7,
        "base_datasets": [f"{name}-base"],
        "retrain": {"cooldown_seconds": 0, "daily_budget": 50, "min_labelled_rows": 10},
        "validation": {
            "thresholds": {"roc_auc": 0.75},
            "champion": {"max_degradation": 0.02, "resamples": 200},
            "slices": {"feature": "plan", "min_value": 0.6, "min_rows": 20},
            "latency_budget_ms_per_row": 50.0,
        },
    }
    data.update(overrides)
    return data


def price_spec_data(name: str = "price", **overrides: Any) -> dict[str, Any]:
    """A spec (as parsed YAML) of a ridge regressor of price on x0..x2, for :func:`regression_frame`."""
    data = churn_spec_data(
        name,
        target="price",
        task="regression",
        estimator="ridge",
        params={},
        features=[{"name": f"x{i}", "type": "numeric"} for i in range(3)],
        validation={"thresholds": {"rmse": 1.0}},
    )
    data.update(overrides)
    return data


def churn_spec(name: str = "churn", **overrides: Any) -> ModelSpec:
    """:func:`churn_spec_data` validated."""
    return spec_from_data(churn_spec_data(name, **overrides))


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def put_frame(store: ArtifactStore, frame: pd.DataFrame) -> ArtifactRef:
    """Store a frame as Parquet; its artifact."""
    stored = store.put(parquet_bytes(frame))
    return ArtifactRef(
        key=stored.sha256, uri=stored.uri, format=ArtifactFormat.PARQUET, size_bytes=stored.size
    )


def traffic_window(
    frame: pd.DataFrame, target: str, *, labelled_share: float = 1.0, seed: int = 0
) -> pd.DataFrame:
    """A window as monitoring stores it: features, prediction, label (null where none arrived), ids, times."""
    rng = np.random.default_rng(seed)
    window = frame.drop(columns=[target]).copy()
    labels = frame[target].astype("float64").to_numpy().copy()
    labels[rng.random(len(frame)) >= labelled_share] = np.nan
    window["prediction"] = 0
    window["label"] = labels
    window["prediction_id"] = [f"p-{i}" for i in range(len(frame))]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    window["predicted_at"] = [start + timedelta(seconds=i) for i in range(len(frame))]
    return window


def run_on_bases(root: Path, *frames: pd.DataFrame, spec: ModelSpec | None = None) -> dict[str, Any]:
    """:func:`run_training` of ``spec`` (the churn spec) on base datasets churn-base-0 v1, churn-base-1 v1,
    ... holding ``frames``, with a store in ``root``."""
    store = ArtifactStore(str(root))
    spec = spec or churn_spec()
    return run_training(
        {
            "job_id": "job-bases",
            "model": spec.name,
            "spec_key": store.put(spec.canonical_json()).sha256,
            "datasets": [
                {"name": f"churn-base-{i}", "version": 1, "sha256": put_frame(store, frame).key}
                for i, frame in enumerate(frames)
            ],
            "artifacts_url": str(root),
        }
    )
