"""A numeric feature whose values a fit cannot scale is refused naming the feature: values near 1e200 made
the scaler's variance overflow to infinity, its output NaN, and the run failed with scikit-learn's "Input X
contains NaN", although the data holds no missing value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from contracts.training import FailureReason
from tests.unit.training.data import churn_frame, run_on_bases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def test_values_too_large_to_scale_fail_naming_the_feature(tmp_path: Path) -> None:
    frame = churn_frame()
    frame["x2"] = frame["x2"].astype(float)
    frame.loc[3, "x2"] = 1e200
    frame.loc[5, "x2"] = -3e200
    result = run_on_bases(tmp_path, frame)
    assert not result["ok"]
    assert result["reason"] == FailureReason.FIT_ERROR.value
    message = result["message"]
    assert "NaN" not in message
    assert message.startswith("numeric feature 'x2' holds values too large to scale")
    assert "-3e+200" in message


def test_an_infinite_value_fails_naming_the_feature(tmp_path: Path) -> None:
    frame = churn_frame()
    frame["x1"] = frame["x1"].astype(float)
    frame.loc[[2, 9], "x1"] = [np.inf, -np.inf]
    result = run_on_bases(tmp_path, frame)
    assert not result["ok"]
    assert result["reason"] == FailureReason.FIT_ERROR.value
    assert result["message"].startswith("numeric feature 'x1' holds an infinity in 2 row(s)")


def test_large_values_a_double_can_scale_still_train(tmp_path: Path) -> None:
    frame = churn_frame()
    frame["x3"] = frame["x3"] * 1e100
    result = run_on_bases(tmp_path, frame)
    assert result["ok"], result
