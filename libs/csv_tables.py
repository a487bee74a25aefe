"""CSV text -> a pandas frame, with one rule for what is missing, shared by every service that reads a CSV.

pandas reads "NA", "N/A", "None", "null", "NaN", ... as missing in every column: a country column's "NA"
(Namibia), a region "NA" (North America), a plan named "None" were stored as missing without a word, and
serving then met "NA" as a level training never saw. R and many exporters write a missing number as a bare
``NA``, though, so the markers cannot simply be text. The rule: an empty field is missing in every column;
the other markers are missing only in a column whose other fields all read as numbers or booleans (there a
marker cannot be a real value), and text in any other column, kept as written; a column of nothing but
markers and empty fields is missing in every row.
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
from pandas.api import types as ptypes

MISSING_MARKERS: frozenset[str] = frozenset(
    {
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)
"""pandas' default missing-value markers but the empty field (``pandas._libs.parsers.STR_NA_VALUES``,
pandas 3.1): written out here, since pandas does not publish the list."""


def read_csv_table(source: str | bytes, **options: Any) -> pd.DataFrame:
    """``pd.read_csv(source, **options)`` with the missing-value rule of this module: the file is read once
    with only the empty field missing, and the columns that came out as text holding a marker are read
    again, with the markers missing, and kept as that read gives them when it gives numbers or booleans (as
    pandas' default read gives them: the same dtype, the same gaps). A file pandas reads in chunks (some
    hundreds of thousands of rows) can give a numeric column with a marker past the first chunk as objects
    in the first read, with a DtypeWarning: it is read again like any other."""
    frame = pd.read_csv(_buffer(source), keep_default_na=False, na_values=[""], **options)
    marked = [
        i
        for i in range(frame.shape[1])
        if not ptypes.is_numeric_dtype(frame.dtypes.iloc[i]) and frame.iloc[:, i].isin(MISSING_MARKERS).any()
    ]
    if not marked:
        return frame
    again = pd.read_csv(
        _buffer(source),
        usecols=marked,
        keep_default_na=False,
        na_values=["", *sorted(MISSING_MARKERS)],
        **options,
    )
    for i, j in zip(marked, range(again.shape[1]), strict=True):
        column = again.iloc[:, j]
        if _numbers_or_booleans(column):
            frame.isetitem(i, column)
    return frame


def integer_column(source: str | bytes, name: str) -> pd.Series | None:
    """Column ``name`` of a CSV that :func:`read_csv_table` read as numbers, as nullable integers (``Int64``)
    when each of its fields is an integer or missing (empty, or a marker: missing in a column of numbers);
    None when a field is written otherwise (``1.0``, ``1e3``). pandas reads integers with a gap as float64
    (int64 has no missing value), which loses whether the file wrote ``1`` or ``1.0``; this read keeps it,
    as the registry's read of an upload does."""
    column = pd.read_csv(
        _buffer(source),
        usecols=[name],
        keep_default_na=False,
        na_values=["", *sorted(MISSING_MARKERS)],
        dtype_backend="numpy_nullable",
    ).iloc[:, 0]
    return column if ptypes.is_integer_dtype(column.dtype) else None


def _numbers_or_booleans(column: pd.Series) -> bool:
    """Whether pandas read ``column`` as numbers or booleans: a numeric dtype (booleans and a column missing
    in every row too), or, without a nullable dtype backend, objects that are booleans with gaps."""
    if ptypes.is_numeric_dtype(column.dtype):
        return True
    return column.dtype == object and ptypes.infer_dtype(column, skipna=True) == "boolean"


def _buffer(source: str | bytes) -> io.StringIO | io.BytesIO:
    return io.StringIO(source) if isinstance(source, str) else io.BytesIO(source)
