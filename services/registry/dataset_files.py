"""Uploaded dataset files (CSV or Parquet) -> one canonical Parquet file, or a 422 that names the problem.

Pure functions on bytes, no I/O: the API calls them in a worker thread. The canonical form (Parquet,
zstd, no pandas metadata, strings as Arrow strings) is what the store keeps and what the content hash
covers, so the same table uploaded as CSV or as Parquet by different tools hashes the same.
"""

from __future__ import annotations

import csv
import io
import math
import re
import unicodedata
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pandas.api import types as ptypes

from contracts.common import FEATURE_NAME_MAX_CHARS
from libs.csv_tables import MISSING_MARKERS, read_csv_table
from libs.errors import InvalidInput, PayloadTooLarge, shown

PARQUET_MAGIC = b"PAR1"
PARQUET_MIN_BYTES = 12
"""The magic, the footer's length and the magic again: no Parquet file is shorter."""
INT64_MAX = 2**63 - 1
# Rows decoded at a time: the rows read so far are counted against the limits after each batch.
PARQUET_BATCH_ROWS = 65_536
# Parquet's text encoding whose values share a prefix with the one before: each can be as long as all the
# page's text, so a few hundred bytes of it decode to 5,000 values of 20 KB each.
DELTA_BYTE_ARRAY = "DELTA_BYTE_ARRAY"

# Arrow integers and booleans become pandas' nullable types, which keep a missing value as NA: the default
# (numpy) turns an integer column with a gap into float64 (losing precision above 2**53) and a boolean one
# into objects. The CSV reader gives the same types (dtype_backend="numpy_nullable").
_NULLABLE_DTYPES: dict[pa.DataType, pd.api.extensions.ExtensionDtype] = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
    # A column missing in every row: pandas writes one of None only as Arrow's null type. The CSV reader
    # makes the same column Int64, all missing.
    pa.null(): pd.Int64Dtype(),
}


@dataclass(frozen=True)
class TableLimits:
    """How large a table an upload may hold. A Parquet file compresses a table almost without bound (20
    million equal integers fit in 91 KB), so its size says nothing of the memory it takes once read: rows,
    cells (rows x columns) and text are checked from its metadata before any of it is decoded, and counted
    again while it is decoded."""

    columns: int
    rows: int
    cells: int
    text_bytes: int
    """Bytes of text (UTF-8, decoded) a Parquet file's text columns may hold together: rows and cells do not
    bound the length of a value, and one string of 300 MB compresses to a few KB. (A CSV's text is at most
    the file, which the upload limit bounds.)"""

    def check(self, rows: int, columns: int, *, at_least: bool = False) -> None:
        """422 for more columns than the limit, 413 for more rows or values (``at_least``: ``rows`` were
        counted so far, the file may hold more)."""
        has = "has at least" if at_least else "has"
        if columns > self.columns:
            raise InvalidInput(f"the file has {columns} columns; the limit is {self.columns}", field="file")
        if rows > self.rows:
            raise PayloadTooLarge(
                f"the file {has} {rows} rows; the limit is {self.rows} (split it, or raise max_dataset_rows)",
                field="file",
            )
        if rows * columns > self.cells:
            raise PayloadTooLarge(
                f"the file {has} {rows} rows x {columns} columns = {rows * columns} values; the limit is "
                f"{self.cells} (split it, or raise max_dataset_cells)",
                field="file",
            )

    def check_text(self, column: str, held: int, total: int) -> None:
        """413 when the text columns hold more than ``text_bytes``: ``total`` bytes were decoded so far,
        ``held`` of them in ``column``, the one that went over."""
        if total > self.text_bytes:
            raise PayloadTooLarge(
                f"column {column!r} holds at least {held} bytes of text once decoded"
                + (f" (the file's text columns at least {total})" if total != held else "")
                + f"; the limit is {self.text_bytes} bytes of text (split the file, or raise "
                "max_dataset_text_bytes)",
                field="file",
                column=column,
            )


@dataclass(frozen=True)
class CanonicalDataset:
    """A validated table in canonical Parquet, with what DatasetRegistered says about it."""

    parquet: bytes
    columns: dict[str, str]
    row_count: int
    source_format: str


def canonicalise(data: bytes, *, filename: str | None, limits: TableLimits) -> CanonicalDataset:
    """Parse and validate an uploaded file; raise :class:`InvalidInput` naming the column or the encoding
    problem, :class:`PayloadTooLarge` when the table is over ``limits``."""
    if not data:
        raise InvalidInput("the uploaded file is empty", field="file")
    name = (filename or "").lower()
    # A Parquet file starts and ends with its magic. The start alone is text a CSV can begin with too: a
    # first column named PAR10_score was read as a damaged Parquet file and refused.
    starts, ends = data.startswith(PARQUET_MAGIC), data.endswith(PARQUET_MAGIC)
    if starts and ends and len(data) >= PARQUET_MIN_BYTES:
        frame, fmt = _read_parquet(data, limits), "parquet"
    elif name.endswith((".parquet", ".pq")):
        raise InvalidInput(
            f"{filename} is named like Parquet but does not "
            + (
                "end with the Parquet magic bytes: is the upload cut short?"
                if starts
                else "start with the Parquet magic bytes"
            ),
            field="file",
        )
    else:
        frame, fmt = _read_csv(data, limits), "csv"
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


SKIP_INITIAL_SPACE = True
"""How every read of a CSV upload splits its fields, pandas' and the checks' alike: the spaces after a comma
are not the field's, so `1, "2,3"` is two fields. The checks kept them while pandas skipped them: ` "b"` was
the name `"b"` to the checks and b to pandas (a header `b, "b"` passed the repeat check and was stored as b
and b.1), and a row `1, "2,3"` was refused as three fields."""


def _read_csv(data: bytes, limits: TableLimits) -> pd.DataFrame:
    text = _decode(data)
    rows = csv.reader(io.StringIO(text), skipinitialspace=SKIP_INITIAL_SPACE)
    try:
        header = next(rows, [])
        _check_header([h.strip() for h in header])
        limits.check(0, len(header))
        # The most rows the limits let a table of this width have: one more is refused at once, not after
        # the rest of the file (30 million one-field rows, 60 MB, took 23 s to refuse).
        most = min(limits.rows, limits.cells // len(header))
        count = 0
        # pandas would silently drop extra fields or shift columns; every row must match the header.
        for row in rows:
            if not row:
                continue
            if len(row) != len(header):
                raise InvalidInput(
                    f"line {rows.line_num} has {len(row)} fields but the header has {len(header)} columns",
                    field="file",
                    line=rows.line_num,
                )
            count += 1
            if count > most:
                limits.check(count, len(header), at_least=True)
        limits.check(count, len(header))
        if count == 0:
            # Blank lines only: pandas would read them all to find no row.
            raise InvalidInput("the file has a header but no rows", field="file")
    except csv.Error as exc:
        raise InvalidInput(
            f"the CSV cannot be parsed near line {rows.line_num}: {exc}", field="file"
        ) from exc
    try:
        # "NA", "None", "null" are missing only in a column of numbers or booleans (libs.csv_tables).
        frame = read_csv_table(
            text, skipinitialspace=SKIP_INITIAL_SPACE, index_col=False, dtype_backend="numpy_nullable"
        )
    except pd.errors.ParserError as exc:
        raise InvalidInput(
            f"the CSV cannot be parsed: {_parser_message(exc, len(header))}", field="file"
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise InvalidInput("the file has no header row", field="file") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    for name in frame.columns:
        _refuse_wide_integers(name, frame[name])
    _refuse_floats_out_of_range(text, frame)
    return frame


_INFINITY_TEXT = frozenset({"inf", "infinity"})
# Text a float64 can only read as 0 although it is not zero: an exponent of three digits or more, or 300
# zeros after the point. Every non-zero literal of a magnitude below float64's least (about 4.9e-324) has
# one of them; a file with neither is not read again.
_TINY_TEXT = re.compile(r"[eE][+-]?0*[1-9][0-9]{2}|\.0{300}")
_NONZERO_DIGIT = re.compile(r"[1-9]")


def _refuse_floats_out_of_range(text: str, frame: pd.DataFrame) -> None:
    """A number beyond float64's range is refused: pandas reads ``1e400`` as infinity and ``1e-400`` as 0,
    values the file does not hold (0 is the one value a tiny measurement, a probability, a rate is not).
    ``inf`` and ``-Infinity`` written out stay infinities, and a subnormal such as ``4e-320`` is kept: it is
    not 0. The text of a column is read again only when the column holds an infinity, or a zero in a file
    with text that may be a tiny number."""
    tiny = _TINY_TEXT.search(text) is not None
    suspects = [
        i
        for i, name in enumerate(frame.columns)
        if ptypes.is_float_dtype(frame[name].dtype)
        and (frame[name].abs().eq(float("inf")).any() or (tiny and frame[name].eq(0).any()))
    ]
    if not suspects:
        return
    raw = pd.read_csv(
        io.StringIO(text),
        usecols=suspects,
        dtype=str,
        keep_default_na=False,
        skipinitialspace=SKIP_INITIAL_SPACE,
        index_col=False,
    )
    for index, texts in zip(suspects, (raw.iloc[:, i] for i in range(len(suspects))), strict=True):
        name = frame.columns[index]
        for row, (value, written) in enumerate(zip(frame[name].tolist(), texts.tolist(), strict=True)):
            if not isinstance(value, float):  # a missing value is NA
                continue
            literal = written.strip()
            if math.isinf(value) and literal.lstrip("+-").lower() not in _INFINITY_TEXT:
                raise InvalidInput(
                    f"column {name!r} holds {shown(literal)} (row {row}), beyond the range of a "
                    "float64 (about ±1.8e308): it would be stored as infinity; write inf if that is what it "
                    "means",
                    field="file",
                    column=name,
                )
            if value == 0 and _NONZERO_DIGIT.search(literal.partition("e")[0].partition("E")[0]):
                raise InvalidInput(
                    f"column {name!r} holds {shown(literal)} (row {row}), nearer to 0 than a float64 can "
                    "hold (about ±4.9e-324): it would be stored as 0; write 0 if that is what it means, or "
                    "change the column's unit",
                    field="file",
                    column=name,
                )


_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


def _refuse_wide_integers(name: str, col: pd.Series) -> None:
    """A CSV column of integers, one of them beyond int64, is refused as Parquet's is. pandas reads it as
    text instead (and a missing value in it as '', and "NA" as written: a marker beside integers is missing
    there, as in a column of numbers), which would store numbers as categories."""
    if not ptypes.is_string_dtype(col.dtype) and col.dtype != object:
        return
    present = [v for v in col.tolist() if isinstance(v, str) and v.strip() and v not in MISSING_MARKERS]
    if not present or not all(_INTEGER_TEXT.fullmatch(v.strip()) for v in present):
        return
    if any(_beyond_int64(v.strip()) for v in present):
        raise InvalidInput(
            f"column {name!r} holds integers above {INT64_MAX} or below {-INT64_MAX - 1} (int64): "
            "to keep them as text, upload Parquet with a string column, or give the values a prefix that "
            "is not a digit",
            field="file",
            column=name,
        )


def _beyond_int64(text: str) -> bool:
    """Whether integer text is outside int64, judged by its digits first: ``int()`` refuses text of more than
    4,300 digits (CPython's guard against quadratic conversion), and a CSV field can hold 131,072."""
    sign = "-" if text.startswith("-") else ""
    digits = text.lstrip("+-").lstrip("0") or "0"
    if len(digits) > len(str(INT64_MAX)):
        return True
    return not -INT64_MAX - 1 <= int(sign + digits) <= INT64_MAX


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line_no = data.count(b"\n", 0, exc.start) + 1
        prefix = data[line_start : exc.start].decode("utf-8", errors="replace")
        index = len(next(csv.reader([prefix], skipinitialspace=SKIP_INITIAL_SPACE), [""])) - 1
        header_line = data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
        header = [h.strip() for h in next(csv.reader([header_line], skipinitialspace=SKIP_INITIAL_SPACE), [])]
        where = f"column {shown(header[index])}" if index < len(header) and line_no > 1 else "the header"
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
    looks_like: dict[str, int] = {}
    for i, n in enumerate(names, start=1):
        if not n:
            raise InvalidInput(f"column {i} of the header has no name", field="file", column_index=i)
        if len(n) > FEATURE_NAME_MAX_CHARS:
            # Any column can become a model's feature, whose name travels in every event about the model.
            raise InvalidInput(
                f"column {i} of the header, {shown(n)}, is longer than the {FEATURE_NAME_MAX_CHARS} "
                "characters a column name may have (it can become a model's feature, whose name travels in "
                "every event about the model): shorten it",
                field="file",
                column_index=i,
            )
        if "\x00" in n:
            # Column names travel in DatasetRegistered, which Postgres stores as jsonb: no NUL there.
            raise InvalidInput(
                f"column {i} of the header, {n!r}, holds a NUL character", field="file", column_index=i
            )
        if n in seen:
            raise InvalidInput(
                f"column {n!r} appears twice in the header (columns {seen[n]} and {i})",
                field="file",
                column=n,
            )
        seen[n] = i
        looks = _as_shown(n)
        if (first := looks_like.get(looks)) is not None:
            raise InvalidInput(
                f"columns {first} and {i} of the header, {_escaped(names[first - 1])} and {_escaped(n)}, "
                "differ only in what does not show (Unicode normalisation such as é written as e and an "
                "accent, zero-width or other format characters, kinds or runs of white space): a model's "
                "feature named by one could be taken for the other; rename one",
                field="file",
                column=n,
                columns=[names[first - 1], n],
            )
        looks_like[looks] = i


_WHITE_SPACE = re.compile(r"\s+")


def _escaped(name: str) -> str:
    """``name`` quoted with every character beyond ASCII escaped, so the message shows how two names that
    look the same differ; cut as :func:`shown` cuts."""
    return ascii(name) if len(name) <= 40 else f"{name[:40]!a}… ({len(name):,} characters)"


def _as_shown(name: str) -> str:
    """``name`` as it shows: compatibility-normalised (NFKC: é as one character or as e and an accent, a
    no-break space, a full-width letter), without the characters that render as nothing (Unicode Cf, such as
    the zero-width space and joiners, the soft hyphen, direction marks and the BOM, and control characters)
    and with each run of white space as one space."""
    normal = unicodedata.normalize("NFKC", name)
    visible = "".join(c for c in normal if c.isspace() or unicodedata.category(c) not in ("Cf", "Cc"))
    return _WHITE_SPACE.sub(" ", visible).strip()


def _parser_message(exc: Exception, columns: int) -> str:
    text = str(exc)
    # pandas: "Error tokenizing data. C error: Expected 3 fields in line 5, saw 4"
    if "Expected" in text and "fields in line" in text:
        tail = text.split("Expected", 1)[1].strip()
        return f"the header has {columns} columns, but: expected {tail}"
    return text


# --- Parquet --------------------------------------------------------------------------------------------


def _read_parquet(data: bytes, limits: TableLimits) -> pd.DataFrame:
    try:
        table = _decode_parquet(data, limits)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInput(f"the Parquet file cannot be read: {exc}", field="file") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            "the Parquet file cannot be read: its schema holds text that is not UTF-8 (a column name?): "
            f"{exc}",
            field="file",
        ) from exc
    names = table.column_names
    for index, field_ in enumerate(table.schema):
        if _is_text(field_.type):
            # Arrow reads a Parquet string as it is stored, UTF-8 or not, and fails only when the text is
            # turned into Python strings (an ArrowException far from here, so a 500).
            try:
                table.column(index).validate(full=True)
            except pa.ArrowInvalid as exc:
                raise InvalidInput(
                    f"column {field_.name!r} holds text that is not valid UTF-8 (re-write the file with its "
                    "strings in UTF-8)",
                    field="file",
                    column=field_.name,
                ) from exc
    try:
        frame = table.to_pandas(types_mapper=_NULLABLE_DTYPES.get)
    except (pa.ArrowException, ValueError, OverflowError) as exc:
        # A value pandas has no room for (a date32 of 10^8 days is beyond year 9999): name its column.
        for name, column in zip(names, table.columns, strict=True):
            try:
                column.to_pandas(types_mapper=_NULLABLE_DTYPES.get)
            except (pa.ArrowException, ValueError, OverflowError) as column_exc:
                raise InvalidInput(
                    f"column {name!r} cannot be read: {column_exc}", field="file", column=name
                ) from exc
        raise InvalidInput(f"the Parquet file cannot be read: {exc}", field="file") from exc
    return _index_as_columns(frame, limits)


def _index_as_columns(frame: pd.DataFrame, limits: TableLimits) -> pd.DataFrame:
    """``frame`` with the levels of its index that have a name as its first columns, where ``to_csv`` writes
    them. pandas writes ``df.set_index("customer_id")`` as a file whose customer_id column its metadata names
    the index (or, for ids in equal steps, holds in its metadata alone), and the canonical form keeps no
    index: the ids were dropped without a word, where the same table as CSV kept them. An index without a
    name (row numbers) is not data, and is still dropped."""
    named = [n for n in frame.index.names if n is not None]
    if not named:
        return frame
    # A name held in the metadata alone has not been through the footer's checks.
    _check_header([str(n).strip() for n in [*named, *frame.columns]])
    limits.check(len(frame), len(named) + len(frame.columns))
    return frame.reset_index(level=named)


def _check_column_types(schema: pa.Schema) -> None:
    """422 naming the first column of a type the canonical form has no place for (a list, a struct, a map,
    bytes, ...): only flat columns of numbers, booleans, text, dates and timestamps, one value per row (or
    none: a column missing in every row)."""
    for field_ in schema:
        t = field_.type.value_type if pa.types.is_dictionary(field_.type) else field_.type
        if not (
            pa.types.is_integer(t)
            or pa.types.is_null(t)
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
        if pa.types.is_timestamp(t) and t.tz is not None:
            try:
                pa.array([], type=t).to_pandas()
            except pa.ArrowException as exc:
                # Arrow's words blamed the server: "The zoneinfo module or pytz package must be installed."
                raise InvalidInput(
                    f"column {field_.name!r} holds timestamps in the time zone {t.tz!r}, which is not a time "
                    "zone (an IANA name such as 'Europe/Paris' or 'UTC', or an offset such as '+02:00')",
                    field="file",
                    column=field_.name,
                ) from exc


def _is_text(t: pa.DataType) -> bool:
    """Whether a column of Arrow type ``t`` holds text (a dictionary of text too)."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def _text_bytes(values: pa.Array) -> int:
    """Bytes of text ``values`` hold once decoded, each value counted where it is: a dictionary's value once
    per index that names it, without decoding them."""
    if isinstance(values, pa.DictionaryArray):
        lengths = pc.take(pc.binary_length(values.dictionary), values.indices)
    else:
        lengths = pc.binary_length(values)
    return int(pc.sum(lengths, min_count=0).as_py())


def _check_declared_text(meta: pq.FileMetaData, schema: pa.Schema, limits: TableLimits) -> None:
    """413 before any page is read when the footer says the text columns' pages take more than the text limit
    once decompressed (a 300 MB string compresses to a few KB); the column named is the largest."""
    held = {
        field_.name: sum(
            meta.row_group(g).column(i).total_uncompressed_size for g in range(meta.num_row_groups)
        )
        for i, field_ in enumerate(schema)
        if _is_text(field_.type)
    }
    total = sum(held.values())
    if total > limits.text_bytes:
        largest = max(held, key=held.__getitem__)
        raise PayloadTooLarge(
            f"the Parquet footer says column {largest!r} takes {held[largest]} bytes once decompressed"
            + (f" (the file's text columns {total})" if total != held[largest] else "")
            + f"; the limit is {limits.text_bytes} bytes of text (split the file, or raise "
            "max_dataset_text_bytes)",
            field="file",
            column=largest,
        )


def _check_encoded_text(data: bytes, file: pq.ParquetFile, schema: pa.Schema, limits: TableLimits) -> None:
    """413 before the table is decoded when its text columns whose values the footer does not count (a
    dictionary's, once however many rows name it; DELTA_BYTE_ARRAY's, each sharing a prefix with the one
    before) hold more than the text limit. A 429-byte file held 5,000 rows naming one 20 KB dictionary value,
    and a 446-byte one 5,000 delta-encoded values of 20 KB: 100 MB each once decoded, the footers saying
    20 KB."""
    meta = file.metadata
    dictionary: dict[int, list[str]] = {}
    delta: dict[int, dict[str, int]] = {}
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for i, field_ in enumerate(schema):
            chunk = group.column(i)
            if not _is_text(field_.type) or not group.num_rows:
                continue
            # Arrow cannot read a DELTA_BYTE_ARRAY page as dictionary indices (not implemented).
            if DELTA_BYTE_ARRAY in chunk.encodings:
                delta.setdefault(g, {})[field_.name] = chunk.total_uncompressed_size
            elif chunk.has_dictionary_page:
                dictionary.setdefault(g, []).append(field_.name)
    held: dict[str, int] = {}
    total = 0

    def count(batch: pa.RecordBatch) -> None:
        nonlocal total
        for name, values in zip(batch.schema.names, batch.columns, strict=True):
            counted = _text_bytes(values)
            held[name] = held.get(name, 0) + counted
            total += counted
            limits.check_text(name, held[name], total)

    if dictionary:
        # The indices and the dictionary, each row's value counted, none decoded. One batch per row group:
        # in smaller ones Arrow hands each the dictionary of all the row group's values so far, and a column
        # of distinct values took 20 times longer.
        indices = pq.ParquetFile(
            io.BytesIO(data),
            metadata=meta,
            read_dictionary=sorted({n for ns in dictionary.values() for n in ns}),
        )
        for g, names in dictionary.items():
            for batch in indices.iter_batches(
                batch_size=meta.row_group(g).num_rows, row_groups=[g], columns=names
            ):
                count(batch)
    for g, chunks in delta.items():
        # Each value can be as long as its page's text, which the footer bounds by its chunk's size (their
        # sum checked against the limit already): batches of the limit over that sum in rows hold at most
        # the limit. They are counted and dropped; the table is decoded afterwards in full-size batches.
        rows = max(1, min(meta.row_group(g).num_rows, limits.text_bytes // max(sum(chunks.values()), 1)))
        for batch in file.iter_batches(batch_size=rows, row_groups=[g], columns=list(chunks)):
            count(batch)


def _decode_parquet(data: bytes, limits: TableLimits) -> pa.Table:
    """The file's table, refused before any page is decompressed when its footer declares too large a
    shape, a row count its row groups do not add up to, a column name the header rules refuse, a column
    type the canonical form has none of or more text than the limit; text the footer does not count
    (dictionary- or delta-encoded) is counted before the table is decoded, and rows and text are counted
    again as they are decoded."""
    file = pq.ParquetFile(io.BytesIO(data))
    meta = file.metadata
    schema = file.schema_arrow
    columns = len(schema)
    declared = meta.num_rows
    # The reader decodes as many rows as each row group declares, whatever the file's total says.
    in_groups = sum(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    limits.check(max(declared, in_groups), columns)
    if in_groups != declared:
        raise InvalidInput(
            f"the Parquet footer says the file has {declared} rows but its row groups hold {in_groups}: "
            "the file is damaged (write it again)",
            field="file",
        )
    # Names and types are the footer's too. A nested column's values are not rows, so the limits do not
    # bound them: a 619-byte file with one row of 400 million list items took 5 GB (and 8 s) to decode
    # before its type was refused.
    _check_header([str(n).strip() for n in schema.names])
    _check_column_types(schema)
    # Nor do they bound the length of a value: a 9.6 KB file held two strings of 300 MB (2.7 GB to read),
    # and files of about 430 bytes, dictionary- or delta-encoded, 5,000 strings of 20 KB.
    _check_declared_text(meta, schema, limits)
    _check_encoded_text(data, file, schema, limits)
    text = [(i, field_.name) for i, field_ in enumerate(schema) if _is_text(field_.type)]
    held = dict.fromkeys((name for _, name in text), 0)
    total = 0
    batches = []
    read = 0
    for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        read += batch.num_rows
        limits.check(read, columns, at_least=True)
        for i, name in text:
            counted = _text_bytes(batch.column(i))
            held[name] += counted
            total += counted
            limits.check_text(name, held[name], total)
        batches.append(batch)
    if read != declared:
        raise InvalidInput(
            f"the Parquet footer says the file has {declared} rows but its pages hold {read}: "
            "the file is damaged (write it again)",
            field="file",
        )
    return pa.Table.from_batches(batches, schema=file.schema_arrow)


# --- canonical form -------------------------------------------------------------------------------------


def _normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """One representation per kind of column, whichever reader produced it, and one per column name: without
    the spaces around it, as a CSV's header is read (the header checks compared the names so already, so no
    two names become one)."""
    out = {}
    for name in frame.columns:
        col = frame[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            col = col.astype(object)
        if ptypes.is_bool_dtype(col.dtype):
            col = col.astype("boolean") if col.isna().any() else col.astype(bool)
        elif ptypes.is_integer_dtype(col.dtype):
            # Compared value by value: max() of a column with only missing values is NA, not a number.
            if ptypes.is_unsigned_integer_dtype(col.dtype) and (col > INT64_MAX).any():
                # int64 is the one integer type of the canonical form; a cast would wrap to negative.
                raise InvalidInput(
                    f"column {name!r} holds integers above {INT64_MAX} (int64): store them as text",
                    field="file",
                    column=str(name),
                )
            col = col.astype("Int64") if col.isna().any() else col.astype("int64")
        elif ptypes.is_float_dtype(col.dtype):
            col = col.astype("float64")
        elif ptypes.is_datetime64_any_dtype(col.dtype):
            pass
        else:
            col = _as_strings(name, col)
        out[str(name).strip()] = col
    return pd.DataFrame(out)


def _as_strings(name: str, col: pd.Series) -> pd.Series:
    values = col.astype(object)
    for row, v in values.items():
        if isinstance(v, str):
            if "\x00" in v:
                # Text values become categories and classes in a model's signature, which Postgres stores
                # as jsonb (no NUL there): refused here rather than when a model is trained on them.
                raise InvalidInput(
                    f"column {name!r} holds a NUL character (row {row})", field="file", column=name
                )
            continue
        if hasattr(v, "isoformat") or v is None or v is pd.NA:
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
