"""Window data for training: the window's rows plus recent labelled history, as one Parquet file.

Columns: every feature, ``prediction``, ``label`` (null where no ground truth arrived), ``prediction_id``,
``predicted_at`` (UTC): :data:`libs.modelspec.WINDOW_COLUMNS` (which a spec's features cannot be named since
2026-11-30), which a feature named like one of them gives way to. A column
of numbers stays numeric (integers with a gap too), of booleans boolean; any other column (mixed types, or an
integer beyond 64 bits) is text. Pure: the handlers store the bytes.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import pandas as pd

from libs.modelspec import WINDOW_COLUMNS
from services.monitoring.domain import ClosedWindow, from_epoch
from services.monitoring.ports import LabelledRecord

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _uniform(values: Sequence[Any]) -> list[Any] | pd.arrays.IntegerArray:
    """Parquet columns hold one type: numbers stay numbers, anything mixed becomes text (nulls kept). So does
    a column with an integer beyond 64 bits (JSON allows any size; Parquet's widest integer is int64).
    Integers with a gap stay integers (nullable ``Int64``): pandas made them float64, and a model retrained on
    a window whose integer class codes had a label missing learned the classes 0.0 and 1.0."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, numbers.Number) and not isinstance(v, bool) for v in present):
        integers = [int(v) for v in present if isinstance(v, numbers.Integral)]
        if all(INT64_MIN <= v <= INT64_MAX for v in integers):
            if present and len(integers) == len(present) and len(present) < len(values):
                return pd.array(list(values), dtype="Int64")
            return list(values)
    elif all(isinstance(v, bool) for v in present):
        return list(values)
    return [None if v is None else str(v) for v in values]


def window_frame(
    window: ClosedWindow | None,
    labels: dict[str, Any],
    history: Sequence[LabelledRecord],
    features: Sequence[str],
) -> pd.DataFrame:
    """The window's rows (labels joined where known), then labelled history not already in it.

    A feature named like one of the file's own columns (a version registered from a spec made before specs
    refused such names) is left out: the column keeps its meaning for training, which no spec can ask for
    that feature now. Kept, its values and the column's went into one list, twice the rows long, and building
    the frame failed: a window due a drift alert was set aside unjudged, and labels that completed a degraded
    performance window failed their handler (retried, then dead-lettered), as did the version's later ones."""
    features = [name for name in features if name not in WINDOW_COLUMNS]
    columns: dict[str, list[Any]] = {name: [] for name in features}
    columns.update({name: [] for name in WINDOW_COLUMNS})
    seen: set[str] = set()
    if window is not None:
        for name in features:
            if name in window.numeric:
                col = window.numeric[name]
                columns[name].extend([None if v != v else v for v in col.tolist()])
            else:
                columns[name].extend(window.categorical.get(name, [None] * window.size))
        columns["prediction"].extend(window.prediction)
        columns["label"].extend(labels.get(pid) for pid in window.prediction_ids)
        columns["prediction_id"].extend(window.prediction_ids)
        columns["predicted_at"].extend(from_epoch(t) for t in window.predicted_at.tolist())
        seen.update(window.prediction_ids)
    for row in history:
        if row.prediction_id in seen:
            continue
        seen.add(row.prediction_id)
        for name in features:
            columns[name].append(row.inputs.get(name))
        columns["prediction"].append(row.prediction)
        columns["label"].append(row.label)
        columns["prediction_id"].append(row.prediction_id)
        columns["predicted_at"].append(row.predicted_at)
    frame = pd.DataFrame({k: _uniform(v) if k != "predicted_at" else v for k, v in columns.items()})
    frame["predicted_at"] = pd.to_datetime(frame["predicted_at"], utc=True)
    return frame
