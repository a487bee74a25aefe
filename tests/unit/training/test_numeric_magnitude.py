"""A numeric feature or a regression target holds numbers a model can be served: an infinity, or a value
beyond float32's range (serving refuses such an input with 422), fails the run naming the column. Before, a
feature near 1e200 failed only when the spec scaled it (its variance overflowed, the message saying only that)
and trained otherwise, and a target near 1e200 trained, its rmse overflowed to infinity, and the run completed
with rmse and r2 left out of its metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from contracts.training import FailureReason
from libs.modelspec import FLOAT32_MAX, spec_from_data
from services.training.worker import assemble_training_set
from tests.unit.training.data import churn_frame, churn_spec, churn_spec_data, regression_frame, run_on_bases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

REGRESSION = spec_from_data(
    churn_spec_data(
        task="regression",
        estimator="linear_regression",
        params={},
        target="price",
        features=[{"name": f"x{i}", "type": "numeric"} for i in range(3)],
        validation={"thresholds": {"rmse": 5.0}},
    )
)


@pytest.mark.parametrize("scale", [True, False])
def test_a_feature_beyond_float32s_range_fails_naming_the_feature(tmp_path: Path, scale: bool) -> None:
    frame = churn_frame()
    frame["x2"] = frame["x2"].astype(float)
    frame.loc[3, "x2"] = 1e200
    frame.loc[5, "x2"] = -3e200
    result = run_on_bases(tmp_path, frame, spec=churn_spec(preprocessing={"scale_numeric": scale}))
    assert not result["ok"]
    assert result["reason"] == FailureReason.FIT_ERROR.value
    message = result["message"]
    assert "NaN" not in message
    assert message.startswith(
        "numeric feature 'x2' holds a value beyond float32's range (magnitude at most 3.4028235e+38, where "
        "models compute) in 2 row(s), such as -3e+200: serving refuses such an input"
    )


def test_an_infinite_value_fails_naming_the_feature(tmp_path: Path) -> None:
    frame = churn_frame()
    frame["x1"] = frame["x1"].astype(float)
    frame.loc[[2, 9], "x1"] = [np.inf, -np.inf]
    result = run_on_bases(tmp_path, frame)
    assert not result["ok"]
    assert result["reason"] == FailureReason.FIT_ERROR.value
    assert result["message"].startswith("numeric feature 'x1' holds an infinity in 2 row(s)")


def test_values_up_to_float32s_range_still_train_and_scale(tmp_path: Path) -> None:
    frame = churn_frame()
    frame["x3"] = frame["x3"] * 1e37
    frame.loc[0, "x3"] = FLOAT32_MAX  # the bound itself is served, so it is trained on
    result = run_on_bases(tmp_path, frame)
    assert result["ok"], result


def test_a_regression_target_beyond_float32s_range_fails_naming_the_target(tmp_path: Path) -> None:
    frame = regression_frame()
    frame.loc[list(range(0, 800, 7)), "price"] = 1e200
    result = run_on_bases(tmp_path, frame, spec=REGRESSION)
    assert result["ok"] is False, result
    assert result["reason"] == FailureReason.FIT_ERROR.value
    assert result["message"].startswith(
        "regression target 'price' holds a value beyond float32's range (magnitude at most 3.4028235e+38, "
        "where models compute) in 115 row(s), such as 1e+200: a model fitted on it would predict values no "
        "float32 engine holds, and its rmse overflows"
    )


def test_a_large_regression_target_within_float32s_range_has_every_metric(tmp_path: Path) -> None:
    frame = regression_frame()
    frame["price"] = frame["price"] * 1e36
    result = run_on_bases(tmp_path, frame, spec=REGRESSION)
    assert result["ok"], result
    assert {"rmse", "mae", "r2"} <= set(result["metrics"])


def test_a_traffic_label_beyond_float32s_range_is_dropped_not_the_retrain() -> None:
    # Serving's feedback takes any number: one client's label of 1e300 must not fail every retrain.
    base = regression_frame(200)
    traffic = regression_frame(3, seed=3).assign(price=[20.0, 1e300, -21.5])
    combined = assemble_training_set(REGRESSION, [base], traffic)
    assert combined["price"].iloc[200:].tolist() == [20.0, -21.5]
    assert len(combined) == 202
