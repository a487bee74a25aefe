"""Base datasets other producers wrote with pandas' nullable or pyarrow-backed types (``boolean``,
``string``, ``Int64``, ``Float64``, ``ArrowDtype``) or categories, which pyarrow keeps in a Parquet file's
pandas metadata: a run on one trains, levels, profiles and holds out exactly as on the same data in numpy's
types."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from libs.artifacts import ArtifactStore
from libs.modelspec import ModelSpec
from libs.profiles import CategoricalProfile, ReferenceProfile, category_key
from services.training.worker import numpy_types
from tests.unit.training.data import churn_frame, churn_spec, churn_spec_data, parquet_bytes, run_on_bases

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GAPS = [5, 17, 99, 240]


def spec() -> ModelSpec:
    """The churn spec with a true/false, a text and a count feature besides x0..x3 and plan."""
    extra = [
        {"name": "active", "type": "categorical"},
        {"name": "region", "type": "categorical"},
        {"name": "visits", "type": "numeric"},
    ]
    return churn_spec(features=[*churn_spec_data()["features"], *extra], validation={})


def numpy_typed() -> pd.DataFrame:
    """Churn rows in numpy's types with gaps in x0, plan, active, region and visits: the others' twin."""
    frame = churn_frame(600)
    rng = np.random.default_rng(3)
    frame["active"] = pd.Series(rng.random(len(frame)) < 0.6, dtype=object)
    frame["region"] = rng.choice(["north", "south", "east"], len(frame))
    frame["visits"] = rng.integers(0, 20, len(frame)).astype("float64")
    for name in ("x0", "plan", "active", "region", "visits"):
        frame.loc[GAPS, name] = None
    return frame


def nullable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype({"x0": "Float64", "active": "boolean", "region": "string", "visits": "Int64"})


def pyarrow_string(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype({"plan": "string[pyarrow]", "region": "string[pyarrow]"})


def arrow_backed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(
        {
            "x0": pd.ArrowDtype(pa.float64()),
            "active": pd.ArrowDtype(pa.bool_()),
            "region": pd.ArrowDtype(pa.string()),
            "visits": pd.ArrowDtype(pa.int64()),
        }
    )


def categories(frame: pd.DataFrame) -> pd.DataFrame:
    # A level no row holds, too: the data's values are what count, not the category's declared levels.
    plan = pd.CategoricalDtype(["basic", "plus", "premium", "gold"])
    return frame.astype({"plan": plan, "region": "category"})


WRITERS: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {
    "nullable": nullable,
    "string[pyarrow]": pyarrow_string,
    "ArrowDtype": arrow_backed,
    "category": categories,
}


def read_as_training_reads(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` written to Parquet and read back the way training read base datasets (pandas' reader)."""
    needed = [*spec().feature_names, spec().target]
    return pd.read_parquet(io.BytesIO(parquet_bytes(frame)), columns=needed)


def _outcome(root: Path, frame: pd.DataFrame) -> dict[str, Any]:
    """What a run on ``frame`` gives that a numpy-typed twin must match: signature, metrics, the holdout's
    file and types, the training set's file, the reference profile but its creation time."""
    result = run_on_bases(root, frame, spec=spec())
    assert result["ok"], result
    profile = ReferenceProfile.from_bytes(ArtifactStore(str(root)).get(result["profile"]["key"]))
    return {
        "signature": result["signature"],
        "metrics": result["metrics"],
        "holdout": result["holdout"],
        "training_set": result["training_set"],
        "profile": profile.model_dump(mode="json", exclude={"created_at"}),
    }


@pytest.mark.parametrize("writer", WRITERS)
def test_a_file_of_pandas_types_trains_as_its_numpy_typed_twin(tmp_path: Path, writer: str) -> None:
    frame = WRITERS[writer](numpy_typed())
    # The fixture itself: read back as training reads it, the file gives the producer's types (an ArrowDtype
    # string as pandas' "string"), not the twin's.
    read, twin = read_as_training_reads(frame), read_as_training_reads(numpy_typed())
    written = [name for name in twin.columns if frame[name].dtype != twin[name].dtype]
    assert written and all(read[name].dtype != twin[name].dtype for name in written), read.dtypes
    # One store: the same files have the same keys and addresses.
    assert _outcome(tmp_path, frame) == _outcome(tmp_path, numpy_typed())


def test_a_nullable_boolean_feature_with_gaps_is_levelled_as_booleans_as_its_profile_counts(
    tmp_path: Path,
) -> None:
    # The signature listed [0, 1] while the profile counted True and False: serving refused `true` (422).
    frame = numpy_typed().astype({"active": "boolean"})
    result = run_on_bases(tmp_path, frame, spec=spec())
    assert result["ok"], result
    levels = next(f["categories"] for f in result["signature"]["features"] if f["name"] == "active")
    assert levels == [False, True] and all(type(level) is bool for level in levels)
    profile = ReferenceProfile.from_bytes(ArtifactStore(str(tmp_path)).get(result["profile"]["key"]))
    active = profile.feature("active")
    assert isinstance(active, CategoricalProfile)
    assert set(active.frequencies) == {category_key(level) for level in levels}


@pytest.mark.parametrize("dtype", ["string", "string[pyarrow]"])
def test_a_text_feature_of_pandas_string_type_with_gaps_trains(tmp_path: Path, dtype: str) -> None:
    # It failed as fit-error: "Encoders require their input argument must be uniformly strings or numbers.
    # Got ['NAType', 'str']".
    result = run_on_bases(tmp_path, numpy_typed().astype({"region": dtype}), spec=spec())
    assert result["ok"], result
    levels = next(f["categories"] for f in result["signature"]["features"] if f["name"] == "region")
    assert levels == ["east", "north", "south"]


def test_a_frame_in_numpy_types_is_read_as_it_is() -> None:
    frame = read_as_training_reads(numpy_typed())
    assert numpy_types(frame) is frame
