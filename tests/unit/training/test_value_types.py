"""Values of another type than the spec says: text in a numeric feature, of a base dataset or of a traffic
window as monitoring writes it, fails the run naming the feature and such a value; a boolean target with a
gap (the registry's nullable booleans, a CSV's objects) trains as booleans, and its holdout validates; an
integer target with a gap (a CSV's blank cells, the registry's Parquet nulls) trains on integer classes; a
text target reads a window's labels of numbers as their text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from contracts.common import ArtifactFormat
from contracts.training import FailureReason
from libs.artifacts import ArtifactStore
from libs.modelspec import spec_from_data
from services.monitoring.export import window_frame
from services.monitoring.ports import LabelledRecord
from services.registry.dataset_files import TableLimits, canonicalise
from services.training.worker import run_training
from tests.unit.training.data import churn_frame, churn_spec, put_frame, regression_frame, run_on_bases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def monitoring_window(frame: pd.DataFrame, odd: dict[int, Any]) -> pd.DataFrame:
    """``frame``'s rows as labelled traffic, written by monitoring's own export, with x2 of row ``i`` logged
    as ``odd[i]`` (a producer other than serving can log anything)."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    history = []
    for i, row in enumerate(frame.to_dict("records")):
        inputs = {name: row[name] for name in ("x0", "x1", "x2", "x3", "plan")}
        if i in odd:
            inputs["x2"] = odd[i]
        at = start + timedelta(seconds=i)
        history.append(
            LabelledRecord(
                prediction_id=f"p-{i}",
                model="churn",
                version=1,
                variant="stable",
                rollout_id=None,
                predicted_at=at,
                prediction=0,
                score=None,
                label=None if pd.isna(row["churned"]) else int(row["churned"]),
                observed_at=at,
                late=False,
                inputs=inputs,
            )
        )
    return window_frame(None, {}, history, ["x0", "x1", "x2", "x3", "plan"])


def run_on_file(
    root: Path, data: bytes, fmt: ArtifactFormat, window: pd.DataFrame | None = None
) -> dict[str, Any]:
    """:func:`run_training` of the churn spec on one base dataset stored as ``data`` in ``fmt``, and the
    traffic ``window`` when given."""
    store = ArtifactStore(str(root))
    spec = churn_spec()
    return run_training(
        {
            "job_id": "job-file",
            "model": spec.name,
            "spec_key": store.put(spec.canonical_json()).sha256,
            "datasets": [
                {"name": "churn-base", "version": 1, "sha256": store.put(data).sha256, "format": fmt.value}
            ],
            "window_key": None if window is None else put_frame(store, window).key,
            "artifacts_url": str(root),
        }
    )


def run_with_window(root: Path, window: pd.DataFrame) -> dict[str, Any]:
    store = ArtifactStore(str(root))
    spec = churn_spec()
    base = put_frame(store, churn_frame(600))
    return run_training(
        {
            "job_id": "job-window",
            "model": spec.name,
            "spec_key": store.put(spec.canonical_json()).sha256,
            "datasets": [{"name": "churn-base", "version": 1, "sha256": base.key}],
            "window_key": put_frame(store, window).key,
            "artifacts_url": str(root),
        }
    )


def test_text_in_a_windows_numeric_feature_fails_the_run_naming_the_feature_and_the_value(
    tmp_path: Path,
) -> None:
    # Monitoring writes a feature of mixed values as text; joined to the base's numbers, the training set's
    # file could not be written: fit-error with pyarrow's "ArrowInvalid: ('Could not convert ...')".
    window = monitoring_window(churn_frame(300, seed=1), {7: "abc", 9: "abc", 11: "n/a"})
    assert not pd.api.types.is_numeric_dtype(window["x2"])
    result = run_with_window(tmp_path, window)
    assert result["ok"] is False
    assert result["reason"] == FailureReason.FIT_ERROR.value
    message = result["message"]
    assert "Arrow" not in message
    assert message.startswith(
        "numeric feature 'x2' holds 3 value(s) that are no number in the traffic window "
    )
    assert "such as 'abc', 'n/a'" in message


def test_a_window_without_a_feature_the_spec_added_fails_the_run_saying_why_and_what_to_do(
    tmp_path: Path,
) -> None:
    # Monitoring writes the watched version's features; a spec that adds one failed every retrain on traffic
    # with "spec names column 'x3' which is not a column of the traffic window; fix the spec or the dataset".
    window = monitoring_window(churn_frame(300, seed=1), {}).drop(columns=["x3", "plan"])
    result = run_with_window(tmp_path, window)
    assert result["ok"] is False
    assert result["reason"] == FailureReason.UNKNOWN_FEATURE.value
    assert result["message"] == (
        "the traffic window has no column 'x3' (nor 1 more of the spec's features): it holds the features of "
        "the version that served it, and the spec names more; a retrain on traffic needs a version serving "
        "them, so retrain on the base data (RetrainRequested) first"
    )


def test_a_windows_numeric_feature_written_as_text_trains_on_its_numbers(tmp_path: Path) -> None:
    # One integer past int64 makes monitoring write the column as text: every other value reads as a number.
    window = monitoring_window(churn_frame(300, seed=1), {4: 2**70})
    assert not pd.api.types.is_numeric_dtype(window["x2"])
    result = run_with_window(tmp_path, window)
    assert result["ok"] is True, result
    assert result["traffic_rows"] == 300


def test_text_in_a_base_datasets_numeric_feature_fails_the_run_naming_the_feature_the_dataset_and_the_value(
    tmp_path: Path,
) -> None:
    # As a CSV reads it: one word makes the column text. The fit failed with scikit-learn's "Cannot use
    # median strategy with non-numeric data", naming no column.
    frame = churn_frame(600)
    frame["x1"] = frame["x1"].map(str)
    frame.loc[3, "x1"] = "oops"
    result = run_on_bases(tmp_path, frame)
    assert result["ok"] is False
    assert result["reason"] == FailureReason.FIT_ERROR.value
    assert result["message"].startswith(
        "numeric feature 'x1' holds 1 value(s) that are no number in churn-base-0 v1 (of 600 rows), such as "
        "'oops'"
    )


def with_a_gap(dtype: str) -> pd.DataFrame:
    """A churn frame whose target is booleans or integers with one missing label, in ``dtype``."""
    frame = churn_frame(600)
    labels = frame["churned"].astype(bool) if dtype in ("boolean", "object") else frame["churned"]
    frame["churned"] = labels.astype(dtype)
    frame.loc[3, "churned"] = None
    return frame


@pytest.mark.parametrize(
    ("dtype", "classes"),
    [
        # The registry's nullable booleans: trained as the floats 0.0 and 1.0, which validation then found
        # no boolean label of the holdout to meet (holdout-labelled failed every candidate).
        ("boolean", [False, True]),
        # A CSV's booleans with a gap (objects): "Unknown label type: unknown".
        ("object", [False, True]),
        # The registry's nullable integers: trained as floats.
        ("Int64", [0, 1]),
    ],
)
def test_a_target_with_a_gap_trains_on_its_own_classes(
    tmp_path: Path, dtype: str, classes: list[Any]
) -> None:
    result = run_on_bases(tmp_path, with_a_gap(dtype))
    assert result["ok"] is True, result
    assert result["signature"]["classes"] == classes
    assert all(type(c) is type(classes[0]) for c in result["signature"]["classes"])
    assert result["train_rows"] + result["holdout"]["rows"] == 599


@pytest.mark.parametrize("dtype", ["boolean", "Int64"])
def test_a_nullable_target_takes_the_windows_labels(tmp_path: Path, dtype: str) -> None:
    # An integer target with a gap and labelled traffic failed every run: "ValueError: Invalid integer data
    # type 'O'." (numpy's iinfo of the nullable type).
    store = ArtifactStore(str(tmp_path))
    spec = churn_spec()
    window = monitoring_window(churn_frame(300, seed=1), {})
    result = run_training(
        {
            "job_id": "job-window",
            "model": spec.name,
            "spec_key": store.put(spec.canonical_json()).sha256,
            "datasets": [
                {"name": "churn-base", "version": 1, "sha256": put_frame(store, with_a_gap(dtype)).key}
            ],
            "window_key": put_frame(store, window).key,
            "artifacts_url": str(tmp_path),
        }
    )
    assert result["ok"] is True, result
    assert result["traffic_rows"] == 300
    assert result["signature"]["classes"] == ([False, True] if dtype == "boolean" else [0, 1])


CODES = {0: 3, 1: 7}
"""The churn frame's classes as integer codes that are not 0 and 1."""


def coded(rows: pd.DataFrame, classes: dict[Any, Any] = CODES) -> pd.DataFrame:
    """``rows`` with their target mapped by ``classes``; rows 3 and 10 (when there) without one."""
    codes = rows["churned"].map(classes)
    # Nullable integers: a CSV of them writes 3 and a blank cell, not 3.0.
    frame = rows.assign(churned=codes.astype("Int64") if pd.api.types.is_integer_dtype(codes) else codes)
    frame.loc[frame.index.isin([3, 10]), "churned"] = None
    return frame


def stored(frame: pd.DataFrame, stored_as: str) -> tuple[bytes, ArtifactFormat]:
    """``frame`` as a CSV another service registered, or as the registry stores an upload of that CSV
    (Parquet without pandas' types: integers with nulls)."""
    csv = frame.to_csv(index=False).encode()
    if stored_as == "csv":
        return csv, ArtifactFormat.CSV
    limits = TableLimits(columns=10, rows=10_000, cells=100_000, text_bytes=10**6)
    return canonicalise(csv, filename="churn.csv", limits=limits).parquet, ArtifactFormat.PARQUET


@pytest.mark.parametrize("stored_as", ["csv", "registry-parquet"])
def test_integer_classes_with_a_gap_train_the_model_the_rows_without_one_train(
    tmp_path: Path, stored_as: str
) -> None:
    # pandas reads integers with a gap as float64: the model had the classes 3.0 and 7.0, which serving
    # answered (FP64 in the Open Inference Protocol) and the signature and model card listed.
    with_gap = coded(churn_frame(600))
    without = with_gap.dropna(subset=["churned"]).astype({"churned": "int64"})
    gapped = run_on_file(tmp_path / "gap", *stored(with_gap, stored_as))
    whole = run_on_file(tmp_path / "whole", *stored(without, stored_as))
    assert gapped["ok"] is True, gapped
    assert gapped["signature"]["classes"] == [3, 7]
    assert all(type(c) is int for c in gapped["signature"]["classes"])
    assert gapped["holdout"]["columns"]["churned"] == "int64"
    # The same model: the same signature, metrics, holdout file and model file.
    assert gapped["signature"] == whole["signature"]
    assert gapped["metrics"] == whole["metrics"]
    assert gapped["holdout"]["artifact"]["key"] == whole["holdout"]["artifact"]["key"]
    assert gapped["artifact"]["key"] == whole["artifact"]["key"]


@pytest.mark.parametrize("stored_as", ["csv", "registry-parquet"])
def test_integer_classes_with_a_gap_take_the_windows_labels_as_integers(
    tmp_path: Path, stored_as: str
) -> None:
    # Monitoring writes labels with a gap as floats (3.0): they are the classes 3 and 7 of the base data.
    window = monitoring_window(coded(churn_frame(300, seed=1)).dropna(subset=["churned"]), {})
    result = run_on_file(tmp_path, *stored(coded(churn_frame(600)), stored_as), window=window)
    assert result["ok"] is True, result
    assert result["traffic_rows"] == 298
    assert result["signature"]["classes"] == [3, 7]
    assert all(type(c) is int for c in result["signature"]["classes"])


def test_integer_classes_learned_from_the_window_alone_are_integers(tmp_path: Path) -> None:
    # No base row labelled: the classes are the window's, whose labels with a gap monitoring wrote as floats.
    unlabelled = coded(churn_frame(600)).assign(churned=pd.array([None] * 600, dtype="Int64"))
    window = monitoring_window(coded(churn_frame(400, seed=1)), {})
    result = run_on_file(tmp_path, *stored(unlabelled, "registry-parquet"), window=window)
    assert result["ok"] is True, result
    assert result["traffic_rows"] == 398
    assert result["signature"]["classes"] == [3, 7]
    assert all(type(c) is int for c in result["signature"]["classes"])


@pytest.mark.parametrize("stored_as", ["csv", "registry-parquet"])
def test_classes_the_file_holds_as_floats_stay_floats(tmp_path: Path, stored_as: str) -> None:
    # Written 1.0 and 2.0 (a CSV's text, a Parquet double): the file says floats, gaps or not.
    result = run_on_file(tmp_path / "whole", *stored(coded(churn_frame(600), {0: 1.0, 1: 2.0}), stored_as))
    assert result["ok"] is True, result
    assert result["signature"]["classes"] == [1.0, 2.0]
    assert all(type(c) is float for c in result["signature"]["classes"])
    # Classes with a fraction are not made integers (0.5 is not 0): scikit-learn fits no such target.
    halves = run_on_file(tmp_path / "halves", *stored(coded(churn_frame(600), {0: 0.5, 1: 1.5}), stored_as))
    assert halves["ok"] is False
    assert halves["reason"] == FailureReason.FIT_ERROR.value


def test_a_text_target_reads_a_windows_numeric_labels_as_their_text(tmp_path: Path) -> None:
    # Classes held as text ("0", "1"), labels sent as numbers: monitoring judges 1 the class "1" and writes a
    # label column of numbers. Joined as they were, the target held text and numbers and every retrain on the
    # window failed: "'<' not supported between instances of 'float' and 'str'".
    store = ArtifactStore(str(tmp_path))
    spec = churn_spec()
    base = churn_frame(600).assign(churned=lambda f: f["churned"].astype(str))
    window = monitoring_window(churn_frame(300, seed=1), {})
    assert pd.api.types.is_numeric_dtype(window["label"])
    result = run_training(
        {
            "job_id": "job-window",
            "model": spec.name,
            "spec_key": store.put(spec.canonical_json()).sha256,
            "datasets": [{"name": "churn-base", "version": 1, "sha256": put_frame(store, base).key}],
            "window_key": put_frame(store, window).key,
            "artifacts_url": str(tmp_path),
        }
    )
    assert result["ok"] is True, result
    assert result["traffic_rows"] == 300
    assert result["signature"]["classes"] == ["0", "1"]


REGRESSION = spec_from_data(
    {
        "name": "churn",
        "features": [{"name": f"x{i}", "type": "numeric"} for i in range(3)],
        "target": "price",
        "task": "regression",
        "estimator": "linear_regression",
        "base_datasets": ["churn-base"],
        "seed": 1,
    }
)


def test_text_in_a_regression_target_fails_the_run_naming_the_target_and_the_value(tmp_path: Path) -> None:
    # It failed with "ValueError: could not convert string to float: 'abc'", naming no column.
    frame = regression_frame()
    frame["price"] = frame["price"].map(str)
    frame.loc[4, "price"] = "abc"
    result = run_on_bases(tmp_path, frame, spec=REGRESSION)
    assert result["ok"] is False
    assert result["reason"] == FailureReason.FIT_ERROR.value
    assert result["message"].startswith(
        "regression target 'price' holds 1 value(s) that are no number in churn-base-0 v1 (of 800 rows), "
        "such as 'abc'"
    )
    frame.loc[4, "price"] = "1.5"  # text that reads as a number is that number
    assert run_on_bases(tmp_path, frame, spec=REGRESSION)["ok"] is True


@pytest.mark.parametrize("rows", [[4], list(range(0, 800, 3))])
def test_an_infinite_regression_target_fails_the_run_naming_the_target(
    tmp_path: Path, rows: list[int]
) -> None:
    # Held out, an infinite target made every metric undefined and the run completed with no metrics at
    # all; fitted on, scikit-learn refused it ("Input y contains infinity"), naming no column.
    frame = regression_frame()
    frame.loc[rows, "price"] = np.inf
    result = run_on_bases(tmp_path, frame, spec=REGRESSION)
    assert result["ok"] is False, result
    assert result["reason"] == FailureReason.FIT_ERROR.value
    assert result["message"].startswith(f"regression target 'price' holds an infinity in {len(rows)} row(s)")
