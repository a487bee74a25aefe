"""Uploaded dataset files (CSV or Parquet) -> one canonical Parquet file, or a 422 that names the problem.

Pure functions on bytes, no I/O: the API calls them in a worker thread. The canonical form (Parquet,
zstd, no pandas metadata, strings as Arrow strings) is what the store keeps and what the content hash
covers, so the same table uploaded as CSV or as Parquet by different tools hashes the same.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pandas.api import types as ptypes

from libs.errors import InvalidInput

PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class CanonicalDataset:
    """A validated table in canonical Parquet, with what DatasetRegistered says about it."""

    parquet: bytes
    columns: dict[str, str]
    row_count: int
    source_format: str


def canonicalise(data: bytes, *, filename: str | None, max_columns: int) -> CanonicalDataset:
    """Parse and validate an uploaded file; raise :class:`InvalidInput` naming the column or the encoding
    problem."""
    if not data:
        raise InvalidInput("the uploaded file is empty", field="file")
    name = (filename or "").lower()
    if data.startswith(PARQUET_MAGIC):
        frame, fmt = _read_parquet(data), "parquet"
    elif name.endswith((".parquet", ".pq")):
        raise InvalidInput(
            f"{filename} is named like Parquet but does not start with the Parquet magic bytes", field="file"
        )
    else:
        frame, fmt = _read_csv(data), "csv"
    if len(frame.columns) > max_columns:
        raise InvalidInput(
            f"the file has {len(frame.columns)} columns; the limit is {max_columns}", field="file"
        )
    if len(frame) == 0:
        raise InvalidInput("the file has a header but no rows", field="file")
    frame = _normalise(frame)
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    out = io.BytesIO()
    pq.write_table(table, out, compression="zstd")
    return CanonicalDataset(
        out.getvalue(), {c: _dtype_name(frame[c]) for c in frame.columns}, len(frame), fmt
    )


# --- CSV ------------------------------------------------------------------------------------------------


def _read_csv(data: bytes) -> pd.DataFrame:
    text = _decode(data)
    rows = csv.reader(io.StringIO(text))
    try:
        header = next(rows, [])
        _check_header([h.strip() for h in header])
        # pandas would silently drop extra fields or shift columns; every row must match the header.
        for row in rows:
            if row and len(row) != len(header):
                raise InvalidInput(
                    f"line {rows.line_num} has {len(row)} fields but the header has {len(header)} columns",
                    field="file",
                    line=rows.line_num,
                )
    except csv.Error as exc:
        raise InvalidInput(
            f"the CSV cannot be parsed near line {rows.line_num}: {exc}", field="file"
        ) from exc
    try:
        frame = pd.read_csv(
            io.StringIO(text), skipinitialspace=True, index_col=False, dtype_backend="numpy_nullable"
        )
    except pd.errors.ParserError as exc:
        raise InvalidInput(
            f"the CSV cannot be parsed: {_parser_message(exc, len(header))}", field="file"
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise InvalidInput("the file has no header row", field="file") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line_no = data.count(b"\n", 0, exc.start) + 1
        prefix = data[line_start : exc.start].decode("utf-8", errors="replace")
        index = len(next(csv.reader([prefix]), [""])) - 1
        header_line = data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
        header = [h.strip() for h in next(csv.reader([header_line]), [])]
        where = f"column {header[index]!r}" if index < len(header) and line_no > 1 else "the header"
        bad = data[exc.start : exc.start + 1].hex()
        raise InvalidInput(
            f"the file is not UTF-8: byte 0x{bad} in {where} on line {line_no} is not valid UTF-8 "
            "(re-export the file as UTF-8)",
            field="file",
            column=header[index] if where != "the header" else None,
            line=line_no,
        ) from exc


def _check_header(names: list[str]) -> None:
    if not any(names):
        raise InvalidInput("the file has no header row naming its columns", field="file")
    seen: dict[str, int] = {}
    for i, n in enumerate(names, start=1):
        if not n:
            raise InvalidInput(f"column {i} of the header has no name", field="file", column_index=i)
        if n in seen:
            raise InvalidInput(
                f"column {n!r} appears twice in the header (columns {seen[n]} and {i})",
                field="file",
                column=n,
            )
        seen[n] = i


def _parser_message(exc: Exception, columns: int) -> str:
    text = str(exc)
    # pandas: "Error tokenizing data. C error: Expected 3 fields in line 5, saw 4"
    if "Expected" in text and "fields in line" in text:
        tail = text.split("Expected", 1)[1].strip()
        return f"the header has {columns} columns, but: expected {tail}"
    return text


# --- Parquet --------------------------------------------------------------------------------------------


def _read_parquet(data: bytes) -> pd.DataFrame:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInput(f"the Parquet file cannot be read: {exc}", field="file") from exc
    names = table.column_names
    _check_header([str(n).strip() for n in names])
    for field_ in table.schema:
        t = field_.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if not (
            pa.types.is_integer(t)
            or pa.types.is_floating(t)
            or pa.types.is_boolean(t)
            or pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_timestamp(t)
            or pa.types.is_date(t)
        ):
            raise InvalidInput(
                f"column {field_.name!r} has Parquet type {field_.type}; only numbers, booleans, strings, "
                "dates and timestamps are supported",
                field="file",
                column=field_.name,
            )
    return table.to_pandas(types_mapper=None)


# --- canonical form -------------------------------------------------------------------------------------


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """One representation per kind of column, whichever reader produced it."""
    out = {}
    for name in frame.columns:
        col = frame[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            col = col.astype(object)
        if ptypes.is_bool_dtype(col.dtype):
            col = col.astype("boolean") if col.isna().any() else col.astype(bool)
        elif ptypes.is_integer_dtype(col.dtype):
            col = col.astype("Int64") if col.isna().any() else col.astype("int64")
        elif ptypes.is_float_dtype(col.dtype):
            col = col.astype("float64")
        elif ptypes.is_datetime64_any_dtype(col.dtype):
            pass
        else:
            col = _as_strings(name, col)
        out[str(name)] = col
    return pd.DataFrame(out)


def _as_strings(name: str, col: pd.Series) -> pd.Series:
    values = col.astype(object)
    for row, v in values.items():
        if isinstance(v, str) or hasattr(v, "isoformat") or v is None or v is pd.NA:
            continue
        if isinstance(v, float) and pd.isna(v):
            continue
        raise InvalidInput(
            f"column {name!r} mixes text with {type(v).__name__} values (row {row})",
            field="file",
            column=name,
        )
    return values.astype("string")


def _dtype_name(col: pd.Series) -> str:
    if ptypes.is_string_dtype(col.dtype) and not ptypes.is_bool_dtype(col.dtype):
        return "string"
    return str(col.dtype)
