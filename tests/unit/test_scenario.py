"""The synthetic churn world's shifts do what deploy/scenario.py says, so that each end-to-end test and
the demo know which of monitoring's signals a shift can raise."""

from __future__ import annotations

import pandas as pd
import pytest
from scipy.stats import ks_2samp
from sklearn.compose import make_column_transformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from deploy.scenario import (
    CONCEPT_SHIFTED,
    INPUTS_SHIFTED,
    REFERENCE,
    SHIFTED,
    TARGET,
    Phase,
    base_features,
    generate,
)

NUMERIC = [name for name, kind in base_features() if kind == "numeric"]
CATEGORICAL = [name for name, kind in base_features() if kind == "categorical"]


@pytest.fixture(scope="module")
def reference_model() -> Pipeline:
    """The demo's estimator (logistic regression on scaled numbers and one-hot categories)."""
    train = generate(20_000, REFERENCE, seed=1)
    model = make_pipeline(
        make_column_transformer(
            (StandardScaler(), NUMERIC), (OneHotEncoder(handle_unknown="ignore"), CATEGORICAL)
        ),
        LogisticRegression(max_iter=1_000),
    )
    return model.fit(train.drop(columns=TARGET), train[TARGET])


def accuracy(model: Pipeline, phase: Phase) -> float:
    data = generate(20_000, phase, seed=7)
    return float(model.score(data.drop(columns=TARGET), data[TARGET]))


def test_a_covariate_shift_moves_the_inputs_but_keeps_the_model_about_as_accurate(
    reference_model: Pipeline,
) -> None:
    before = generate(5_000, REFERENCE, seed=3)
    after = generate(5_000, INPUTS_SHIFTED, seed=3)
    for feature in ("monthly_charges", "support_calls"):
        assert ks_2samp(before[feature], after[feature]).pvalue < 1e-6, feature
    assert "crypto" not in set(before["payment_method"]) and "crypto" in set(after["payment_method"])
    assert accuracy(reference_model, INPUTS_SHIFTED) > accuracy(reference_model, REFERENCE) - 0.05


def test_a_concept_drift_keeps_every_input_and_costs_the_model_accuracy(reference_model: Pipeline) -> None:
    features = [name for name, _ in base_features()]
    pd.testing.assert_frame_equal(
        generate(5_000, CONCEPT_SHIFTED, seed=3)[features], generate(5_000, REFERENCE, seed=3)[features]
    )
    assert accuracy(reference_model, CONCEPT_SHIFTED) < accuracy(reference_model, REFERENCE) - 0.08


def test_both_shifts_together_cost_the_most(reference_model: Pipeline) -> None:
    assert accuracy(reference_model, SHIFTED) < accuracy(reference_model, CONCEPT_SHIFTED)
