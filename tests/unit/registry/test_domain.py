"""The registry's pure rules: stage machine, cursors, tag filters, uploaded files, model cards."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import struct
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from markdown_it import MarkdownIt
from pydantic import TypeAdapter, ValidationError

from contracts.common import VERSION_MAX, Stage
from contracts.examples import EXAMPLES
from contracts.models import TagKey
from contracts.training import TrainingCompleted
from libs.csv_tables import MISSING_MARKERS
from libs.errors import InvalidInput, PayloadTooLarge
from services.registry.dataset_files import CanonicalDataset, TableLimits, canonicalise
from services.registry.domain import (
    COMMAND_STAGES,
    TRANSITIONS,
    Command,
    IllegalTransition,
    check_name,
    check_transition,
    decode_name_cursor,
    decode_version_cursor,
    encode_cursor,
    parse_tag_filter,
    render_html,
    render_markdown,
)
from services.registry.schemas import (
    LineageDatasetPublic,
    LineagePublic,
    StageChangePublic,
    ValidationReportPublic,
    VersionPublic,
)

LIMITS = TableLimits(columns=10, rows=1000, cells=5000, text_bytes=1_000_000)


def test_every_stage_can_be_left_and_nothing_moves_to_candidate() -> None:
    assert set(TRANSITIONS) == set(Stage)
    assert all(TRANSITIONS[s] for s in Stage)
    assert all(Stage.CANDIDATE not in targets for targets in TRANSITIONS.values())
    assert all(s not in TRANSITIONS[s] for s in Stage)


def test_illegal_transition_lists_the_allowed_ones() -> None:
    with pytest.raises(IllegalTransition) as caught:
        check_transition("churn", 4, Stage.CANARY, Stage.ARCHIVED)
    assert caught.value.status == 409
    assert caught.value.extra == {"stage": "canary", "allowed": ["production", "rejected"]}


def test_commands_never_archive_or_promote_what_they_should_not() -> None:
    assert Stage.PRODUCTION not in COMMAND_STAGES[Command.ARCHIVE]
    assert Stage.CANARY not in COMMAND_STAGES[Command.ARCHIVE]
    assert Stage.REJECTED not in COMMAND_STAGES[Command.PROMOTE]
    assert set(COMMAND_STAGES[Command.ROLLBACK]) == {Stage.CANARY, Stage.PRODUCTION}


def test_cursor_round_trips_and_garbage_is_invalid_input() -> None:
    assert decode_version_cursor(encode_cursor("versions", ["churn", 7]), "versions") == ("churn", 7)
    assert decode_version_cursor(encode_cursor("datasets", ["churn", VERSION_MAX]), "datasets") == (
        "churn",
        VERSION_MAX,
    )
    assert decode_name_cursor(encode_cursor("models", ["churn"])) == "churn"
    for bad in (
        "%%%",
        "bm90IGpzb24",
        encode_cursor("versions", ["churn"]),
        encode_cursor("versions", [1, "x"]),
        encode_cursor("versions", [1]),
    ):
        with pytest.raises(InvalidInput) as caught:
            decode_version_cursor(bad, "versions")
        assert caught.value.extra["field"] == "cursor"
    with pytest.raises(InvalidInput):
        decode_name_cursor(encode_cursor("versions", ["churn", 7]))


@pytest.mark.parametrize(
    ("made_by", "read_by"), [("datasets", "versions"), ("versions", "datasets"), ("models", "versions")]
)
def test_a_cursor_of_another_list_of_the_same_shape_belongs_to_that_list(made_by: str, read_by: str) -> None:
    # A dataset and a version are both a (name, number): the versions list read the datasets list's cursor
    # as its own and answered from there.
    position = ["churn"] if made_by == "models" else ["churn", 3]
    with pytest.raises(InvalidInput, match="cursor does not belong to this list") as caught:
        decode_version_cursor(encode_cursor(made_by, position), read_by)  # type: ignore[arg-type]
    assert caught.value.extra["field"] == "cursor"


def test_a_cursor_naming_no_list_is_not_valid() -> None:
    # What encode_cursor wrote before cursors named their list: ["churn", 7].
    with pytest.raises(InvalidInput, match="cursor is not valid"):
        decode_version_cursor(raw_cursor(["churn", 7]), "versions")
    with pytest.raises(InvalidInput, match="cursor is not valid"):
        decode_name_cursor(raw_cursor(["churn"]))


def raw_cursor(position: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(position)).decode().rstrip("=")


@pytest.mark.parametrize(
    "position",
    [
        ["a\u0000b", 1],  # Postgres text cannot hold NUL
        ["churn", 2**31],  # beyond the integer column
        ["churn", 2**40],
        ["churn", 0],
        ["churn", -5],
        ["", 1],
        ["churn\n", 1],
        ["bad name!", 1],
    ],
)
def test_a_cursor_whose_name_or_version_the_registry_cannot_hold_is_not_valid(position: list[object]) -> None:
    with pytest.raises(InvalidInput, match="cursor is not valid"):
        decode_version_cursor(raw_cursor(["versions", *position]), "versions")
    if position[0] != "churn":
        with pytest.raises(InvalidInput, match="cursor is not valid"):
            decode_name_cursor(raw_cursor(["models", *position[:1]]))


def test_a_cursor_with_characters_outside_base64_is_not_valid() -> None:
    with pytest.raises(InvalidInput, match="cursor is not valid"):
        decode_version_cursor("!!!" + encode_cursor("versions", ["churn", 7]) + "!!!", "versions")


def test_names_are_checked_whole() -> None:
    assert check_name("churn-v2.1", what="dataset name", field="name") == "churn-v2.1"
    for bad in ("churn\n", "churn\r\n", " churn", "", "a" * 129):
        with pytest.raises(InvalidInput, match=r"dataset name .* must match") as caught:
            check_name(bad, what="dataset name", field="name")
        assert caught.value.extra == {"field": "name"}


def test_tag_keys_are_short_and_findable() -> None:
    keys = TypeAdapter(TagKey)
    for good in ("team", "approved-by", "ticket:JIRA-1", "a.b_c", "k" * 128):
        assert keys.validate_python(good) == good
    # too long for the btree index; blank; holding `=`, which ?tag=key=value splits at
    for bad in ("k" * 129, "k" * 3000, " ", "", "a=b", "a b", "-lead", "a\nb"):
        with pytest.raises(ValidationError):
            keys.validate_python(bad)


def test_tag_filter_is_key_or_key_value() -> None:
    assert parse_tag_filter("team") == ("team", None)
    assert parse_tag_filter("team=growth") == ("team", "growth")
    assert parse_tag_filter("team=") == ("team", "")
    with pytest.raises(InvalidInput):
        parse_tag_filter("=x")


# --- uploaded files ---------------------------------------------------------------------------------------

CSV = b"tenure_months,monthly_charges,plan,churned\n1,20.5,basic,0\n24,70.1,premium,1\n"


def parquet_of(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf)
    return buf.getvalue()


def test_the_same_table_as_csv_or_parquet_hashes_the_same() -> None:
    from_csv = canonicalise(CSV, filename="a.csv", limits=LIMITS)
    frame = pd.DataFrame(
        {
            "tenure_months": [1, 24],
            "monthly_charges": [20.5, 70.1],
            "plan": ["basic", "premium"],
            "churned": [0, 1],
        }
    )
    from_parquet = canonicalise(parquet_of(frame), filename="a.parquet", limits=LIMITS)
    assert from_csv.parquet == from_parquet.parquet
    assert from_csv.columns == {
        "tenure_months": "int64",
        "monthly_charges": "float64",
        "plan": "string",
        "churned": "int64",
    }


def test_column_names_lose_their_surrounding_spaces_in_parquet_as_in_csv() -> None:
    # A CSV header ` age ,plan` names age and plan; the same names in a Parquet file were stored with their
    # spaces, so the same table hashed otherwise and a model's feature `age` was missing from it.
    from_csv = canonicalise(b" age ,plan\n31,basic\n", filename="d.csv", limits=LIMITS)
    frame = pd.DataFrame({" age ": [31], "plan": ["basic"]})
    from_parquet = canonicalise(parquet_of(frame), filename="d.parquet", limits=LIMITS)
    assert list(from_parquet.columns) == list(from_csv.columns) == ["age", "plan"]
    assert from_parquet.parquet == from_csv.parquet
    named = pd.DataFrame({"x": [1.5]}, index=pd.Index([7], name=" customer_id"))
    assert list(canonicalise(parquet_of(named), filename="d.parquet", limits=LIMITS).columns) == [
        "customer_id",
        "x",
    ]


@pytest.mark.parametrize(
    ("index", "ids"),
    [
        (["customer_id"], [7, 9, 4]),  # written as a column of the file
        (["customer_id"], [7, 9, 11]),  # in equal steps: held in the metadata alone
        (["region", "customer_id"], [7, 9, 4]),  # two levels
    ],
)
def test_a_named_pandas_index_is_kept_as_a_column_as_in_csv(index: list[str], ids: list[int]) -> None:
    # df.set_index("customer_id").to_parquet() stores the index as a column of the file, named in pandas'
    # metadata; to_csv writes it as the first column. Both are the same table.
    columns = {
        "region": ["US", "EU", "EU"],
        "customer_id": ids,
        "x": [0.5, 1.5, 2.5],
        "churned": [0, 1, 0],
    }
    frame = pd.DataFrame(columns).set_index(index)
    from_csv = canonicalise(frame.to_csv().encode(), filename="d.csv", limits=LIMITS)
    from_parquet = canonicalise(parquet_of(frame), filename="d.parquet", limits=LIMITS)
    kept = [*index, *(c for c in columns if c not in index)]
    assert list(from_parquet.columns) == list(from_csv.columns) == kept
    assert from_parquet.parquet == from_csv.parquet


def test_a_pandas_index_named_as_a_column_is_refused_naming_it() -> None:
    frame = pd.DataFrame({"x": [1, 2, 3]}, index=pd.Index([5, 6, 9], name="x"))
    with pytest.raises(InvalidInput) as caught:
        canonicalise(parquet_of(frame), filename="d.parquet", limits=LIMITS)
    assert "column 'x' appears twice" in caught.value.message


def test_a_column_missing_in_every_row_is_kept_and_hashes_as_in_csv() -> None:
    # pandas writes a column of None only (a coupon no one used this month) as Arrow's null type.
    csv = b"coupon,y\n,1\n,2\n"
    frame = pd.DataFrame({"coupon": pd.Series([None, None], dtype=object), "y": [1, 2]})
    table = pa.table({"coupon": pa.nulls(2), "y": [1, 2]})
    assert pq.read_schema(io.BytesIO(parquet_of(frame))).field("coupon").type == pa.null()
    from_csv = canonicalise(csv, filename="d.csv", limits=LIMITS)
    for data in (parquet_of(frame), parquet_table(table)):
        from_parquet = canonicalise(data, filename="d.parquet", limits=LIMITS)
        assert from_parquet.columns == from_csv.columns == {"coupon": "Int64", "y": "int64"}
        assert from_parquet.parquet == from_csv.parquet


def test_a_missing_integer_keeps_the_column_integer_and_hashes_as_in_csv() -> None:
    # 2**53 + 1 has no float64: a column read as float would store 9007199254740992.
    csv = b"customer_id,plan\n9007199254740993,basic\n,plus\n"
    table = pa.table({"customer_id": pa.array([2**53 + 1, None], pa.int64()), "plan": ["basic", "plus"]})
    from_csv = canonicalise(csv, filename="d.csv", limits=LIMITS)
    from_parquet = canonicalise(parquet_table(table), filename="d.parquet", limits=LIMITS)
    assert from_parquet.columns == from_csv.columns == {"customer_id": "Int64", "plan": "string"}
    stored = pq.read_table(io.BytesIO(from_parquet.parquet)).column("customer_id").to_pylist()
    assert stored == [2**53 + 1, None]
    assert hashlib.sha256(from_parquet.parquet).digest() == hashlib.sha256(from_csv.parquet).digest()


def test_a_missing_boolean_keeps_the_column_boolean_and_hashes_as_in_csv() -> None:
    csv = b"active,y\nTrue,1\n,2\n"
    table = pa.table({"active": pa.array([True, None]), "y": [1, 2]})
    from_csv = canonicalise(csv, filename="d.csv", limits=LIMITS)
    from_parquet = canonicalise(parquet_table(table), filename="d.parquet", limits=LIMITS)
    assert from_parquet.columns == from_csv.columns == {"active": "boolean", "y": "int64"}
    assert from_parquet.parquet == from_csv.parquet


def _stored(dataset: CanonicalDataset) -> dict[str, list[object]]:
    return pq.read_table(io.BytesIO(dataset.parquet)).to_pydict()


def test_na_none_and_null_in_a_text_column_are_kept_as_written() -> None:
    # Namibia, North America, a plan named None: pandas' markers are text in a column of text.
    csv = b"country,region,plan,note,y\nNA,NA,None,x,1\nUS,EU,null,NA,2\n,N/A,basic,1,3\n"
    dataset = canonicalise(csv, filename="d.csv", limits=LIMITS)
    assert dataset.columns == {
        "country": "string",
        "region": "string",
        "plan": "string",
        "note": "string",
        "y": "int64",
    }
    assert _stored(dataset) == {
        "country": ["NA", "US", None],  # an empty field is missing in every column
        "region": ["NA", "EU", "N/A"],
        "plan": ["None", "null", "basic"],
        "note": ["x", "NA", "1"],
        "y": [1, 2, 3],
    }


def test_missing_markers_in_a_numeric_column_are_gaps_stored_as_before() -> None:
    # R writes a missing number as NA: the column stays numbers, stored as the same file with empty fields.
    marked = b"tenure,charges,y\n1,20.5,1\nNA,N/A,2\nnull,NaN,3\n4,-nan,4\n5,#N/A,5\n"
    empty = b"tenure,charges,y\n1,20.5,1\n,,2\n,,3\n4,,4\n5,,5\n"
    table = pa.table(
        {
            "tenure": pa.array([1, None, None, 4, 5], pa.int64()),
            "charges": pa.array([20.5, None, None, None, None]),
            "y": [1, 2, 3, 4, 5],
        }
    )
    from_marked = canonicalise(marked, filename="d.csv", limits=LIMITS)
    assert from_marked.columns == {"tenure": "Int64", "charges": "float64", "y": "int64"}
    assert from_marked.parquet == canonicalise(empty, filename="d.csv", limits=LIMITS).parquet
    assert (
        from_marked.parquet == canonicalise(parquet_table(table), filename="d.parquet", limits=LIMITS).parquet
    )


@pytest.mark.parametrize("marker", sorted(MISSING_MARKERS))
def test_every_missing_marker_is_a_gap_in_a_numeric_column_as_pandas_reads_it(marker: str) -> None:
    marked = canonicalise(f"x,y\n1.5,1\n{marker},2\n".encode(), filename="d.csv", limits=LIMITS)
    assert marked.parquet == canonicalise(b"x,y\n1.5,1\n,2\n", filename="d.csv", limits=LIMITS).parquet
    # The list is pandas' own: its default read takes each marker as missing.
    assert pd.read_csv(io.StringIO(f"x\n1.5\n{marker}\n"))["x"].isna().tolist() == [False, True]


def test_missing_markers_in_a_boolean_column_are_gaps() -> None:
    csv = b"active,y\nTrue,1\nNA,2\nFalse,3\nnull,4\n"
    dataset = canonicalise(csv, filename="d.csv", limits=LIMITS)
    assert dataset.columns == {"active": "boolean", "y": "int64"}
    assert _stored(dataset)["active"] == [True, None, False, None]
    assert (
        dataset.parquet
        == canonicalise(b"active,y\nTrue,1\n,2\nFalse,3\n,4\n", filename="d.csv", limits=LIMITS).parquet
    )


def test_a_column_of_missing_markers_only_is_missing_in_every_row() -> None:
    dataset = canonicalise(b"coupon,y\nNA,1\nnull,2\n,3\nNone,4\n", filename="d.csv", limits=LIMITS)
    assert dataset.columns == {"coupon": "Int64", "y": "int64"}
    assert (
        dataset.parquet
        == canonicalise(b"coupon,y\n,1\n,2\n,3\n,4\n", filename="d.csv", limits=LIMITS).parquet
    )


def test_numbers_beyond_float64_or_int64_beside_na_markers_are_refused() -> None:
    with pytest.raises(InvalidInput, match="1e400"):
        canonicalise(b"x,y\nNA,1\n1e400,2\n", filename="d.csv", limits=LIMITS)
    # pandas keeps a column of integers beyond int64 as written, "NA" too: the "NA" let the column through.
    with pytest.raises(InvalidInput, match="above 9223372036854775807"):
        canonicalise(b"x,y\nNA,1\n9223372036854775808,2\n", filename="d.csv", limits=LIMITS)


def test_csv_that_is_not_utf8_names_the_column_and_line() -> None:
    data = b"name,city\nann,Paris\nbob,Montr\xe9al\n"
    with pytest.raises(InvalidInput) as caught:
        canonicalise(data, filename="x.csv", limits=LIMITS)
    assert caught.value.extra == {"field": "file", "column": "city", "line": 3}
    assert "byte 0xe9 in column 'city' on line 3 is not valid UTF-8" in caught.value.message


def test_a_quoted_field_after_a_space_is_read_as_one_field_by_every_check() -> None:
    # pandas skips the spaces after a comma (skipinitialspace), so ` "b"` is the name b and ` "2,3"` one
    # field; the checks read them with the spaces kept: `b, "b"` was stored as columns b and b.1, and a row
    # `1, "2,3"` refused as three fields.
    with pytest.raises(InvalidInput, match="column 'b' appears twice"):
        canonicalise(b'b, "b"\n1,2\n', filename="x.csv", limits=LIMITS)
    with pytest.raises(InvalidInput, match="differ only in what does not show"):
        canonicalise('\u00e9, "e\u0301"\n1,2\n'.encode(), filename="x.csv", limits=LIMITS)
    ds = canonicalise(b'id, "name"\n1, "Smith, J"\n', filename="x.csv", limits=LIMITS)
    assert ds.columns == {"id": "int64", "name": "string"}
    assert pq.read_table(io.BytesIO(ds.parquet)).to_pydict() == {"id": [1], "name": ["Smith, J"]}
    with pytest.raises(InvalidInput) as caught:
        canonicalise(b'a, b, c\n1, "2,3", caf\xe9\n', filename="x.csv", limits=LIMITS)
    assert caught.value.extra == {"field": "file", "column": "c", "line": 2}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"a,a\n1,2\n", "column 'a' appears twice"),
        (b"a,,c\n1,2,3\n", "column 2 of the header has no name"),
        (b"a,b\n1,2\n3,4,5\n", "line 3 has 3 fields but the header has 2 columns"),
        (b"a,b\n", "no rows"),
        # Starts and ends like Parquet (a CSV may only start so: it is read as a CSV then).
        (b"PAR1 not really PAR1", "Parquet file cannot be read"),
    ],
)
def test_unreadable_csv_is_invalid_input_saying_why(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        canonicalise(data, filename="x.csv", limits=LIMITS)


def parquet_table(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def parquet_table_encoded(table: pa.Table, encoding: str) -> bytes:
    """``table`` as Parquet with every column in ``encoding``, no dictionary."""
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        use_dictionary=False,
        column_encoding=dict.fromkeys(table.column_names, encoding),
    )
    return buf.getvalue()


def test_parquet_value_pandas_cannot_hold_names_its_column() -> None:
    data = parquet_table(pa.table({"x": [1], "d": pa.array([10**8], type=pa.date32())}))  # year 275760
    with pytest.raises(InvalidInput) as caught:
        canonicalise(data, filename="x.parquet", limits=LIMITS)
    assert caught.value.extra == {"field": "file", "column": "d"}
    assert "column 'd' cannot be read" in caught.value.message


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        (b"a\x00b,c\n1,2\n", "x.csv"),
        (parquet_table(pa.table({"a\x00b": [1], "c": [2]})), "x.parquet"),
    ],
)
def test_a_column_name_with_a_nul_is_refused(data: bytes, filename: str) -> None:
    with pytest.raises(InvalidInput, match=r"column 1 of the header, 'a\\x00b', holds a NUL character"):
        canonicalise(data, filename=filename, limits=LIMITS)


LONG_NAME = "reading_" * 1500  # 12,000 characters


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        (f"a,{LONG_NAME}\n1,2\n".encode(), "x.csv"),
        (parquet_table(pa.table({"a": [1], LONG_NAME: [2]})), "x.parquet"),
    ],
)
def test_a_column_name_longer_than_a_feature_name_may_be_is_refused_shown_shortened(
    data: bytes, filename: str
) -> None:
    # Every column can become a model's feature, whose name travels in every event about the model: a
    # 12,000-character name was stored, and surfaced later as drift windows set aside.
    with pytest.raises(InvalidInput) as caught:
        canonicalise(data, filename=filename, limits=LIMITS)
    message = caught.value.message
    assert "column 2 of the header" in message and "(12,000 characters)" in message, message
    assert "256 characters" in message, message
    assert len(message) < 400, message
    assert caught.value.extra == {"field": "file", "column_index": 2}


def test_a_column_name_as_long_as_a_feature_name_may_be_is_kept() -> None:
    name = "w" * 256
    assert list(canonicalise(f"a,{name}\n1,2\n".encode(), filename="x.csv", limits=LIMITS).columns) == [
        "a",
        name,
    ]


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        (b"a,plan\n1,basic\n2,x\x00y\n", "x.csv"),
        (parquet_table(pa.table({"a": [1, 2], "plan": ["basic", "x\x00y"]})), "x.parquet"),
    ],
)
def test_a_text_value_with_a_nul_is_refused_naming_its_column(data: bytes, filename: str) -> None:
    with pytest.raises(InvalidInput, match="column 'plan' holds a NUL character") as caught:
        canonicalise(data, filename=filename, limits=LIMITS)
    assert caught.value.extra["column"] == "plan"


def strings_not_utf8(*values: bytes) -> pa.Array:
    """A string array holding these bytes as they are: Arrow checks nothing when it is built from buffers, and
    some Parquet writers do not either."""
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    buffers = [None, pa.array(offsets, pa.int32()).buffers()[1], pa.py_buffer(b"".join(values))]
    return pa.Array.from_buffers(pa.string(), len(values), buffers)


@pytest.mark.parametrize(
    "plan",
    [strings_not_utf8(b"basic", b"caf\xe9"), strings_not_utf8(b"basic", b"caf\xe9").dictionary_encode()],
    ids=["plain", "dictionary"],
)
def test_a_parquet_text_column_that_is_not_utf8_is_refused_naming_it(plan: pa.Array) -> None:
    data = parquet_table(pa.table({"a": [1, 2], "plan": plan}))
    with pytest.raises(InvalidInput, match="column 'plan' holds text that is not valid UTF-8") as caught:
        canonicalise(data, filename="x.parquet", limits=LIMITS)
    assert caught.value.extra["column"] == "plan"


def test_a_parquet_column_name_that_is_not_utf8_is_refused() -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [1], "plan_": ["x"]}), buf, store_schema=False)
    data = buf.getvalue().replace(b"plan_", b"plan\xe9")
    with pytest.raises(InvalidInput, match="cannot be read: its schema holds text that is not UTF-8"):
        canonicalise(data, filename="x.parquet", limits=LIMITS)


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        (b"a,b\n1,9223372036854775808\n", "x.csv"),
        # pandas reads these as text (a missing value as ''): refused as the Parquet ones are
        (b"a,b\n1,9223372036854775808\n2,\n", "x.csv"),
        (b"a,b\n1,-9223372036854775809\n2,5\n", "x.csv"),
        (b"a,b\n1,18446744073709551616\n", "x.csv"),
        # more digits than int() converts (4,300): refused like any other, not a 500
        (b"a,b\n1," + b"9" * 5_000 + b"\n", "x.csv"),
        (b"a,b\n1,-" + b"9" * 5_000 + b"\n", "x.csv"),
        (b"a,b\n1," + b"0" * 5_000 + b"7\n2,99999999999999999999\n", "x.csv"),
        (parquet_table(pa.table({"a": [1], "b": pa.array([2**63], type=pa.uint64())})), "x.parquet"),
        (parquet_table(pa.table({"a": [1, 2], "b": pa.array([2**63, None], pa.uint64())})), "x.parquet"),
    ],
)
def test_integers_beyond_int64_are_refused_not_wrapped(data: bytes, filename: str) -> None:
    with pytest.raises(InvalidInput, match="column 'b' holds integers above 9223372036854775807"):
        canonicalise(data, filename=filename, limits=LIMITS)


def test_a_parquet_file_with_too_many_rows_is_refused_before_it_is_decoded() -> None:
    # 20 million equal integers compress to ~90 KB and would take ~370 MB once read.
    data = parquet_table(pa.table({"x": pa.nulls(20_000_000, pa.int64()).fill_null(0)}))
    assert len(data) < 200_000
    with pytest.raises(PayloadTooLarge, match="the file has 20000000 rows; the limit is 5000000"):
        canonicalise(
            data,
            filename="x.parquet",
            limits=TableLimits(columns=10, rows=5_000_000, cells=10**8, text_bytes=10**8),
        )


def _zigzag_varint(value: int) -> bytes:
    zigzag, out = value * 2, b""
    while True:
        low, zigzag = zigzag & 0x7F, zigzag >> 7
        if not zigzag:
            return out + bytes([low])
        out += bytes([low | 0x80])


def with_footer_row_count(data: bytes, rows: int, claimed: int) -> bytes:
    """The Parquet file with its footer's total row count (FileMetaData.num_rows) changed from ``rows`` to
    ``claimed``; its row groups still say ``rows``, and their pages hold them."""
    size = struct.unpack("<I", data[-8:-4])[0]
    footer = data[-8 - size : -8]
    real = _zigzag_varint(rows)
    fake = _zigzag_varint(claimed)
    if len(fake) < len(real):
        # The same length, so no offset moves: padded with continuation bytes (a non-canonical varint).
        fake = bytes(b | 0x80 for b in fake) + b"\x80" * (len(real) - len(fake) - 1) + b"\x00"
    assert len(fake) == len(real)
    # Field 3 of FileMetaData, an i64 following field 2: header byte 0x16. It comes before the row groups.
    at = footer.index(b"\x16" + real) + 1
    lied = data[: -8 - size] + footer[:at] + fake + footer[at + len(real) :] + data[-8:]
    assert pq.ParquetFile(io.BytesIO(lied)).metadata.num_rows == claimed
    return lied


def test_a_parquet_footer_that_understates_its_rows_does_not_get_past_the_limits() -> None:
    rows = 100_000
    data = parquet_table(pa.table({"a": pa.array([7] * rows, pa.int64())}))
    hostile = with_footer_row_count(data, rows, claimed=1)
    with pytest.raises(PayloadTooLarge, match="the file has 100000 rows; the limit is 1000"):
        canonicalise(hostile, filename="x.parquet", limits=LIMITS)


def test_a_parquet_footer_whose_row_count_disagrees_with_its_row_groups_is_refused() -> None:
    data = with_footer_row_count(parquet_table(pa.table({"a": [1, 2, 3]})), 3, claimed=2)
    with pytest.raises(InvalidInput, match="footer says the file has 2 rows but its row groups hold 3"):
        canonicalise(data, filename="x.parquet", limits=LIMITS)


def test_parquet_rows_are_counted_against_the_limits_as_they_are_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stands for pages holding more rows than the footer says: the count stops the read at the limit.
    metadata = pq.ParquetFile(io.BytesIO(parquet_table(pa.table({"a": [1]})))).metadata
    monkeypatch.setattr(pq.ParquetFile, "metadata", property(lambda _: metadata))
    data = parquet_table(pa.table({"a": list(range(1001))}))
    with pytest.raises(PayloadTooLarge, match="the file has at least 1001 rows; the limit is 1000"):
        canonicalise(data, filename="x.parquet", limits=LIMITS)


@pytest.mark.parametrize("filename", ["x.csv", "x.parquet"])
def test_rows_and_values_beyond_the_limits_are_payload_too_large(filename: str) -> None:
    frame = pd.DataFrame({"a": range(1001), "b": range(1001)})
    data = frame.to_csv(index=False).encode() if filename == "x.csv" else parquet_of(frame)
    with pytest.raises(PayloadTooLarge, match="1001 rows; the limit is 1000") as caught:
        canonicalise(data, filename=filename, limits=LIMITS)
    assert caught.value.status == 413
    with pytest.raises(PayloadTooLarge, match="1001 rows x 2 columns = 2002 values; the limit is 2000"):
        canonicalise(
            data, filename=filename, limits=TableLimits(columns=10, rows=5000, cells=2000, text_bytes=10**6)
        )
    assert canonicalise(data, filename=filename, limits=TableLimits(10, 1001, 2002, 10**6)).row_count == 1001


def test_a_csv_is_refused_at_the_first_row_beyond_the_limits_not_after_the_rest() -> None:
    # The rows were all read (and checked) before they were counted against the limits: 30 million
    # one-field rows took 23 s to refuse. A broken line after the limit shows where the read stopped.
    data = b"a,b\n" + b"1,2\n" * 1001 + b"1,2,3\n"
    with pytest.raises(PayloadTooLarge, match="the file has at least 1001 rows; the limit is 1000"):
        canonicalise(data, filename="x.csv", limits=LIMITS)
    with pytest.raises(
        PayloadTooLarge, match="at least 1001 rows x 2 columns = 2002 values; the limit is 2000"
    ):
        canonicalise(
            data, filename="x.csv", limits=TableLimits(columns=10, rows=5000, cells=2000, text_bytes=10**6)
        )


@pytest.mark.parametrize(
    ("data", "written", "row"),
    [(b"a,b\n1,1e400\n", "1e400", 0), (b"a,b\n1,\n\n2,inf\n3,-1E999\n", "-1E999", 2)],
)
def test_a_csv_number_beyond_float64_is_refused_not_stored_as_infinity(
    data: bytes, written: str, row: int
) -> None:
    # pandas read 1e400 as inf: the stored table held a value the file did not.
    with pytest.raises(InvalidInput, match=f"column 'b' holds '{written}' \\(row {row}\\), beyond the range"):
        canonicalise(data, filename="x.csv", limits=LIMITS)


def test_infinity_written_out_in_a_csv_stays_infinity() -> None:
    dataset = canonicalise(b"a,b\ninf,-Infinity\n1,+inf\n", filename="x.csv", limits=LIMITS)
    table = pq.read_table(io.BytesIO(dataset.parquet)).to_pylist()
    assert table[0] == {"a": float("inf"), "b": float("-inf")} and table[1]["b"] == float("inf")


@pytest.mark.parametrize(
    ("data", "written", "row"),
    [
        (b"a,b\n1,1e-400\n", "1e-400", 0),
        (b"a,b\n1,0\n2,\n3,-2E-324\n", "-2E-324", 2),
        (b"a,b\n1,0.0\n2,0." + b"0" * 400 + b"7\n", "0." + "0" * 400 + "7", 1),
    ],
)
def test_a_csv_number_nearer_zero_than_float64_holds_is_refused_not_stored_as_zero(
    data: bytes, written: str, row: int
) -> None:
    # pandas read 1e-400 as 0 where 1e400 was already refused: the stored table held a 0 the file did not.
    with pytest.raises(InvalidInput, match="nearer to 0 than a float64 can hold") as caught:
        canonicalise(data, filename="x.csv", limits=LIMITS)
    assert caught.value.message.startswith(f"column 'b' holds {written[:40]!r}")
    assert f"(row {row})" in caught.value.message and caught.value.extra["column"] == "b"


def test_zero_and_subnormal_numbers_in_a_csv_are_kept() -> None:
    data = b"a,b\n0e-999,4e-320\n-0.000,5e-324\n1e-300,0." + b"0" * 310 + b"1e10\n"
    dataset = canonicalise(data, filename="x.csv", limits=LIMITS)
    table = pq.read_table(io.BytesIO(dataset.parquet)).to_pydict()
    assert table == {"a": [0.0, -0.0, 1e-300], "b": [4e-320, 5e-324, 1e-301]}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("\u00e9t\u00e9", "e\u0301te\u0301"),  # NFC and NFD
        ("age", "age\u200b"),  # a zero-width space
        ("age", "\u200dage"),  # a zero-width joiner
        ("monthly charges", "monthly\u00a0charges"),  # a no-break space
        ("monthly charges", "monthly  charges"),
        ("plan", "pl\u00adan"),  # a soft hyphen
        ("plan", "\uff50\uff4c\uff41\uff4e"),  # full-width letters
    ],
)
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_columns_whose_names_differ_only_invisibly_are_refused_naming_both(
    first: str, second: str, fmt: str
) -> None:
    # Both were kept as distinct columns, so as features a model or a request could name either and mean
    # the other.
    if fmt == "csv":
        data = f"{first},{second}\n1,2\n".encode()
    else:
        data = parquet_table(pa.table({first: [1], second: [2]}))
    with pytest.raises(InvalidInput, match="differ only in what does not show") as caught:
        canonicalise(data, filename=f"x.{fmt}", limits=LIMITS)
    assert caught.value.message.startswith(f"columns 1 and 2 of the header, {first!a} and {second!a}")
    assert caught.value.extra["columns"] == [first, second] and caught.value.extra["field"] == "file"


def test_columns_whose_names_differ_in_what_shows_are_kept() -> None:
    dataset = canonicalise(
        "Age,age,\u00e9,e,x2,x\u00b3\n1,2,3,4,5,6\n".encode(), filename="x.csv", limits=LIMITS
    )
    assert list(dataset.columns) == ["Age", "age", "\u00e9", "e", "x2", "x\u00b3"]


def test_too_many_columns_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="3 columns; the limit is 2"):
        canonicalise(b"a,b,c\n1,2,3\n", filename="x.csv", limits=replace(LIMITS, columns=2))


def test_parquet_with_a_nested_column_names_it() -> None:
    table = pa.table({"ok": [1, 2], "tags": [[1, 2], [3]]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with pytest.raises(InvalidInput) as caught:
        canonicalise(buf.getvalue(), filename="x.parquet", limits=LIMITS)
    assert caught.value.extra["column"] == "tags"


@pytest.mark.parametrize(
    "column",
    [
        pa.array([[0] * 100_000], pa.list_(pa.int8())),
        pa.array([{"a": 1, "b": "x"}]),
        pa.array([b"\x00" * 100_000], pa.binary()),
    ],
    ids=["list", "struct", "binary"],
)
def test_a_parquet_column_of_an_unsupported_type_is_refused_before_any_page_is_decoded(
    column: pa.Array, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A list's values are not rows: one row of a 619-byte file held 400 million of them, which the registry
    # decoded (5 GB, 8 s) before it refused the column's type. The schema is in the footer.
    data = parquet_table(pa.table({"ok": [1], "nested": column}))
    assert len(data) < 2_000

    def decoded(*_: object, **__: object) -> None:
        raise AssertionError("a page was decoded")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", decoded)
    with pytest.raises(InvalidInput, match="column 'nested' has Parquet type") as caught:
        canonicalise(data, filename="x.parquet", limits=LIMITS)
    assert caught.value.extra["column"] == "nested"


@pytest.mark.parametrize("zone", ["Mars/Olympus", "utc"])
def test_a_parquet_timestamp_in_no_known_time_zone_is_refused_naming_the_column_and_the_zone(
    zone: str,
) -> None:
    # Arrow's words were "The zoneinfo module or pytz package must be installed.": the server's fault.
    stamps = pa.array([0, 1], type=pa.timestamp("us", tz=zone))
    data = parquet_table(pa.table({"ok": [1, 2], "seen_at": stamps}))
    with pytest.raises(InvalidInput) as caught:
        canonicalise(data, filename="x.parquet", limits=LIMITS)
    assert str(caught.value) == (
        f"column 'seen_at' holds timestamps in the time zone {zone!r}, which is not a time zone (an IANA "
        "name such as 'Europe/Paris' or 'UTC', or an offset such as '+02:00')"
    )
    assert caught.value.extra["column"] == "seen_at"


def test_parquet_timestamps_in_an_offset_or_a_named_zone_are_taken() -> None:
    for zone in ("+02:00", "Europe/Paris", "UTC"):
        stamps = pa.array([0, 1], type=pa.timestamp("us", tz=zone))
        canonicalise(
            parquet_table(pa.table({"ok": [1, 2], "seen_at": stamps})), filename="x.parquet", limits=LIMITS
        )


def _uncompressed(data: bytes, column: int) -> int:
    """What the Parquet footer says a column's pages take once decompressed."""
    meta = pq.read_metadata(io.BytesIO(data))
    return sum(meta.row_group(g).column(column).total_uncompressed_size for g in range(meta.num_row_groups))


def _decoded_batches(monkeypatch: pytest.MonkeyPatch) -> list[pa.RecordBatch]:
    """The batches the reader decodes from here on, recorded as they are handed over."""
    batches: list[pa.RecordBatch] = []
    iter_batches = pq.ParquetFile.iter_batches

    def recorded(self: pq.ParquetFile, *args: object, **kwargs: object) -> Iterator[pa.RecordBatch]:
        for batch in iter_batches(self, *args, **kwargs):
            batches.append(batch)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recorded)
    return batches


def test_parquet_text_longer_than_the_limit_is_refused_before_any_page_is_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rows and values do not bound a value's length: two strings of 300 MB compress to 9.6 KB, and the
    # registry read and stored them (2.7 GB). The footer says what the pages take once decompressed.
    data = parquet_table(pa.table({"id": [1, 2], "text": ["a" * 3_000_000, "b" * 3_000_000]}))
    assert len(data) < 2_000

    def decoded(*_: object, **__: object) -> None:
        raise AssertionError("a page was decoded")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", decoded)
    limits = replace(LIMITS, text_bytes=5_000_000)
    with pytest.raises(PayloadTooLarge, match="the Parquet footer says column 'text' takes 6000") as caught:
        canonicalise(data, filename="x.parquet", limits=limits)
    assert "the limit is 5000000 bytes of text" in caught.value.message
    assert "max_dataset_text_bytes" in caught.value.message
    assert caught.value.extra["column"] == "text"


def test_dictionary_encoded_parquet_text_is_counted_from_its_indices_before_it_is_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 5,000 rows naming one 20 KB dictionary value are a 429-byte file, 100 MB once decoded; the footer counts
    # the value once. Here 5,000 rows of 2,000 bytes: 10 MB of text, the footer saying some 2 KB
    # (its statistics, the longest and shortest value, make the file 8 KB).
    data = parquet_table(pa.table({"text": ["x" * 2_000] * 5_000}))
    assert len(data) < 10_000
    assert _uncompressed(data, 0) < 10_000
    batches = _decoded_batches(monkeypatch)
    with pytest.raises(
        PayloadTooLarge, match="column 'text' holds at least 10000000 bytes of text"
    ) as caught:
        canonicalise(data, filename="x.parquet", limits=replace(LIMITS, rows=5_000, text_bytes=1_000_000))
    assert "the limit is 1000000 bytes of text" in caught.value.message
    assert caught.value.extra["column"] == "text"
    # Only indices were read: no value was decoded.
    assert batches
    assert all(pa.types.is_dictionary(b.schema.field("text").type) for b in batches)


def test_delta_encoded_parquet_text_is_refused_a_small_batch_past_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # DELTA_BYTE_ARRAY values share a prefix with the one before: 5,000 values of 20 KB are a 446-byte file
    # whose footer says 20 KB, and cannot be read as dictionary indices. Here 5,000 values of 2,000
    # bytes.
    data = parquet_table_encoded(pa.table({"text": ["x" * 2_000] * 5_000}), "DELTA_BYTE_ARRAY")
    assert len(data) < 10_000
    assert _uncompressed(data, 0) < 10_000
    batches = _decoded_batches(monkeypatch)
    with pytest.raises(PayloadTooLarge, match=r"column 'text' holds at least \d+ bytes of text once decoded"):
        canonicalise(data, filename="x.parquet", limits=replace(LIMITS, rows=5_000, text_bytes=1_000_000))
    # Each batch held at most the limit's worth of values, and the read stopped at the first one over it.
    decoded = sum(b.num_rows for b in batches)
    assert decoded < 5_000
    assert decoded * 2_000 <= 2 * 1_000_000


@pytest.mark.parametrize("encoding", [None, "DELTA_BYTE_ARRAY", "PLAIN"])
def test_parquet_text_up_to_the_limit_is_read_whatever_its_encoding(encoding: str | None) -> None:
    # Counted exactly: each row's value (a dictionary's once per row naming it, none for a missing value).
    table = pa.table(
        {
            "plan": [f"plan-{i % 7}" for i in range(900)],
            "note": [None if i % 3 else f"n{i:05d}" for i in range(900)],
        }
    )
    text = 900 * 6 + 300 * 6
    data = parquet_table(table) if encoding is None else parquet_table_encoded(table, encoding)
    roomy = canonicalise(data, filename="x.parquet", limits=replace(LIMITS, text_bytes=10**9))
    if encoding != "PLAIN":  # PLAIN pages take more than their text (a length before each value)
        exact = canonicalise(data, filename="x.parquet", limits=replace(LIMITS, text_bytes=text))
        assert exact.parquet == roomy.parquet
    with pytest.raises(PayloadTooLarge, match="bytes of text"):
        canonicalise(data, filename="x.parquet", limits=replace(LIMITS, text_bytes=text - 1))
    assert roomy.parquet == canonicalise(parquet_table(table), filename="x.parquet", limits=LIMITS).parquet


def test_file_named_parquet_without_the_magic_is_refused() -> None:
    with pytest.raises(InvalidInput, match="named like Parquet"):
        canonicalise(CSV, filename="x.parquet", limits=LIMITS)


@pytest.mark.parametrize("filename", ["x.csv", None])
def test_a_csv_whose_first_column_name_starts_with_the_parquet_magic_is_read_as_csv(
    filename: str | None,
) -> None:
    # Sniffed by its first four bytes alone, it was read as a damaged Parquet file and refused (422).
    dataset = canonicalise(b"PAR10_score,region\n0.5,eu\n", filename=filename, limits=LIMITS)
    assert dataset.source_format == "csv"
    assert dataset.columns == {"PAR10_score": "float64", "region": "string"}


def test_a_truncated_parquet_file_is_refused_as_one() -> None:
    data = parquet_table(pa.table({"a": [1, 2]}))
    with pytest.raises(InvalidInput, match="named like Parquet but does not end with"):
        canonicalise(data[:-20], filename="x.parquet", limits=LIMITS)


# --- model cards ----------------------------------------------------------------------------------------


def version_with_hostile_text() -> VersionPublic:
    done = EXAMPLES[TrainingCompleted]
    assert isinstance(done, TrainingCompleted)
    now = datetime(2025, 6, 2, tzinfo=UTC)
    return VersionPublic(
        model="churn",
        version=7,
        stage=Stage.PRODUCTION,
        aliases=["champion"],
        tags={},
        run_id=done.run_id,
        metrics=done.metrics,
        created_at=now,
        stage_changed_at=now,
        job_id=done.job_id,
        artifact=done.artifact,
        profile=done.profile,
        signature=done.signature,
        train_rows=done.train_rows,
        holdout_rows=done.holdout_rows,
        duration_seconds=done.duration_seconds,
        lineage=LineagePublic(
            run_id=done.run_id,
            job_id=done.job_id,
            correlation_id="c-1",
            datasets=[
                LineageDatasetPublic(
                    role="training",
                    name="churn-base",
                    version=3,
                    sha256="b" * 64,
                    rows=5,
                    registered=True,
                    source="upload",
                )
            ],
            document=done.lineage,
        ),
        stage_history=[
            StageChangePublic(
                from_stage=Stage.CANARY,
                to_stage=Stage.PRODUCTION,
                reason="<script>alert(1)</script> | pipes",
                actor="user:alice",
                source="/driftloop/serving",
                event_id="e-9",
                event_type="io.driftloop.RolloutPromoted.v1",
                correlation_id="c-1",
                changed_at=now,
            )
        ],
        validation_reports=[
            ValidationReportPublic(
                report_id="vr-1",
                passed=True,
                checks=[
                    {
                        "name": "roc_auc>=0.75",
                        "kind": "threshold",
                        "value": 0.861,
                        "threshold": 0.75,
                        "comparator": ">=",
                        "passed": True,
                        "detail": "ok",
                    }
                ],
                failed_checks=[],
                champion_version=6,
                holdout=None,
                event_id="e-5",
                received_at=now,
            )
        ],
    )


def test_model_card_has_lineage_validation_and_history() -> None:
    card = render_markdown(version_with_hostile_text())
    assert card.startswith("# Model card: churn version 7")
    for needle in (
        "**production** (aliases: champion)",
        "| training | churn-base | 3 | 5 |",
        "## Validation report vr-1",
        "| roc_auc>=0.75 | threshold | 0.861 | >= 0.75 | yes | ok |",
        "| canary | production | user:alice |",
        "\\| pipes",
        "| code version | c165da6 |",
    ):
        assert needle in card


INJECTION = (
    "![pixel](https://t.example/p.gif) [click](https://t.example) <img src=x> *em* _em_ `x` &amp; ~~s~~ "
    "| cell\n\n# head"
)
"""Markdown that, put in a card as it is, would load a tracking pixel, add a link, raw HTML and a heading,
and break the table it is in."""


def test_markdown_model_card_shows_free_text_as_written_never_as_markup() -> None:
    version = version_with_hostile_text()
    [history] = version.stage_history
    [report] = version.validation_reports
    check = {**report.checks[0], "detail": INJECTION}
    version = version.model_copy(
        update={
            "stage_history": [history.model_copy(update={"reason": INJECTION})],
            "validation_reports": [
                report.model_copy(update={"passed": False, "checks": [check], "failed_checks": [INJECTION]})
            ],
            "lineage": version.lineage.model_copy(update={"job_id": "job `x` ``y``", "run_id": "`edge`"}),
        }
    )
    card = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(render_markdown(version))

    assert card.count("<h1>") == 1  # the card's own title
    for mark in ("<img", "<a ", "<em>", "<s>", "src=x>"):
        assert mark not in card
    flat = INJECTION.replace("\n", " ")
    # Once in the history, once as the failed check's detail, once in the verdict naming it.
    assert card.count(html.escape(flat, quote=False)) == 3, card
    for table in card.split("<table>")[1:]:  # every row keeps its table's columns
        columns = table.split("</thead>")[0].count("<th>")
        assert [row.count("<td>") for row in table.split("<tbody>")[1].split("<tr>")[1:]] == [columns] * (
            table.count("<tr>") - 1
        ), table
    assert "<code>job `x` ``y``</code>" in card and "<code>`edge`</code>" in card
    assert "<strong>production</strong>" in card


def test_html_model_card_escapes_every_value() -> None:
    page = render_html(version_with_hostile_text())
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<strong>production</strong>" in page


def cut_report() -> ValidationReportPublic:
    """A failed report whose event carried one of 5,000 checks and named 2 of its 1,200 failed ones."""
    return ValidationReportPublic(
        report_id="vr-churn-v7",
        passed=False,
        checks=[
            {
                "name": "slice:store=s-0001:roc_auc",
                "kind": "slice",
                "value": 0.5,
                "threshold": 0.6,
                "comparator": ">=",
                "passed": False,
                "detail": "0.5000 misses 0.6 on 80 rows",
            }
        ],
        failed_checks=["slice:store=s-0001:roc_auc", "slice:store=s-0002:roc_auc"],
        champion_version=None,
        holdout=None,
        event_id="e-6",
        received_at=datetime(2025, 6, 2, tzinfo=UTC),
        checks_truncated=True,
        checks_total=5_000,
        failed_checks_total=1_200,
    )


def test_a_cut_validation_report_says_how_much_was_cut_and_where_the_whole_report_is() -> None:
    report = cut_report()
    shown = report.model_dump(mode="json")
    assert shown["checks_truncated"] is True
    assert (shown["checks_total"], shown["failed_checks_total"]) == (5_000, 1_200)
    assert shown["full_report_path"] == "/v1/reports/vr-churn-v7"

    version = version_with_hostile_text().model_copy(update={"validation_reports": [report]})
    card = render_markdown(version)
    assert "The event carried 1 of the 5000 checks and named 2 of the 1200 failed ones" in card
    assert "`GET /v1/reports/vr-churn-v7`" in card
    assert "and 1198 more" in card


def test_a_whole_validation_report_points_at_the_stored_one_too() -> None:
    [report] = version_with_hostile_text().validation_reports
    assert not report.checks_truncated and report.checks_total is None
    assert report.full_report_path == "/v1/reports/vr-1"
    assert "`GET /v1/reports/vr-1`" in render_markdown(version_with_hostile_text())
