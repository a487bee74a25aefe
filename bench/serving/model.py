"""The benchmark's model and payloads, importable by every interpreter in the benchmark (driftloop's
venv and MLflow's own): only numpy, pandas and scikit-learn, deterministic for a given scikit-learn."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

NUMERIC = ["tenure_months", "monthly_charges", "total_charges", "support_calls", "age", "logins_30d"]
CATEGORICAL = {"plan": ["basic", "plus", "premium"], "region": ["north", "south", "east", "west"]}
KINDS = ("light", "churn")
"""light: six numeric features, imputer + scaler + logistic regression (well under a millisecond per call on
a quiet core). churn: the shape the training service builds, with a ColumnTransformer and one-hot encoded
categoricals (several milliseconds per call: the model, not the server, dominates)."""


def features(kind: str) -> tuple[list[str], dict[str, list[str]]]:
    """(numeric features, categorical features with their levels) of a model kind."""
    return (list(NUMERIC), dict(CATEGORICAL) if kind == "churn" else {})


def frame(rows: int, seed: int) -> pd.DataFrame:
    """Synthetic churn-like rows."""
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {
        "tenure_months": rng.integers(0, 72, rows).astype(float),
        "monthly_charges": rng.normal(60, 20, rows).round(2),
        "total_charges": rng.normal(1500, 700, rows).round(2),
        "support_calls": rng.poisson(1.5, rows).astype(float),
        "age": rng.integers(18, 90, rows).astype(float),
        "logins_30d": rng.poisson(12, rows).astype(float),
    }
    for name, levels in CATEGORICAL.items():
        data[name] = rng.choice(levels, rows)
    return pd.DataFrame(data)


def build_model(kind: str = "light") -> Pipeline:
    """The one model every server in the benchmark serves."""
    numeric_names, categorical_names = features(kind)
    train = frame(5000, seed=1)[numeric_names + list(categorical_names)]
    target = ((train["tenure_months"] < 12) | (train["support_calls"] > 3)).astype(int)
    numeric = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
    if kind == "light":
        model = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
        model.steps.append(("model", LogisticRegression(max_iter=500)))
        return model.fit(train, target)
    categorical = Pipeline(
        [
            ("impute", SimpleImputer(strategy="most_frequent")),
            ("onehot", OneHotEncoder(handle_unknown="ignore")),
        ]
    )
    columns = ColumnTransformer([("num", numeric, NUMERIC), ("cat", categorical, list(CATEGORICAL))])
    return Pipeline([("features", columns), ("model", LogisticRegression(max_iter=500))]).fit(train, target)


def records(rows: int, kind: str = "light") -> list[dict[str, Any]]:
    """Request rows as JSON-ready objects."""
    numeric_names, categorical_names = features(kind)
    return frame(rows, seed=7)[numeric_names + list(categorical_names)].to_dict(orient="records")
