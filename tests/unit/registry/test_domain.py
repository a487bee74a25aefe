"""The registry's pure rules: stage machine, cursors, tag filters, uploaded files, model cards."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.common import Stage
from contracts.examples import EXAMPLES
from contracts.training import TrainingCompleted
from libs.errors import InvalidInput
from services.registry.dataset_files import canonicalise
from services.registry.domain import (
    COMMAND_STAGES,
    TRANSITIONS,
    Command,
    IllegalTransition,
    check_transition,
    decode_cursor,
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
    assert decode_cursor(encode_cursor(["churn", 7]), (str, int)) == ("churn", 7)
    for bad in ("%%%", "bm90IGpzb24", encode_cursor(["churn"]), encode_cursor([1, "x"])):
        with pytest.raises(InvalidInput) as caught:
            decode_cursor(bad, (str, int))
        assert caught.value.extra["field"] == "cursor"


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
    from_csv = canonicalise(CSV, filename="a.csv", max_columns=10)
    frame = pd.DataFrame(
        {
            "tenure_months": [1, 24],
            "monthly_charges": [20.5, 70.1],
            "plan": ["basic", "premium"],
            "churned": [0, 1],
        }
    )
    from_parquet = canonicalise(parquet_of(frame), filename="a.parquet", max_columns=10)
    assert from_csv.parquet == from_parquet.parquet
    assert from_csv.columns == {
        "tenure_months": "int64",
        "monthly_charges": "float64",
        "plan": "string",
        "churned": "int64",
    }


def test_csv_that_is_not_utf8_names_the_column_and_line() -> None:
    data = b"name,city\nann,Paris\nbob,Montr\xe9al\n"
    with pytest.raises(InvalidInput) as caught:
        canonicalise(data, filename="x.csv", max_columns=10)
    assert caught.value.extra == {"field": "file", "column": "city", "line": 3}
    assert "byte 0xe9 in column 'city' on line 3 is not valid UTF-8" in caught.value.message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"a,a\n1,2\n", "column 'a' appears twice"),
        (b"a,,c\n1,2,3\n", "column 2 of the header has no name"),
        (b"a,b\n1,2\n3,4,5\n", "line 3 has 3 fields but the header has 2 columns"),
        (b"a,b\n", "no rows"),
        (b"PAR1 not really", "Parquet file cannot be read"),
    ],
)
def test_unreadable_csv_is_invalid_input_saying_why(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        canonicalise(data, filename="x.csv", max_columns=10)


def test_too_many_columns_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="3 columns; the limit is 2"):
        canonicalise(b"a,b,c\n1,2,3\n", filename="x.csv", max_columns=2)


def test_parquet_with_a_nested_column_names_it() -> None:
    table = pa.table({"ok": [1, 2], "tags": [[1, 2], [3]]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with pytest.raises(InvalidInput) as caught:
        canonicalise(buf.getvalue(), filename="x.parquet", max_columns=10)
    assert caught.value.extra["column"] == "tags"


def test_file_named_parquet_without_the_magic_is_refused() -> None:
    with pytest.raises(InvalidInput, match="named like Parquet"):
        canonicalise(CSV, filename="x.parquet", max_columns=10)


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


def test_html_model_card_escapes_every_value() -> None:
    page = render_html(version_with_hostile_text())
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<strong>production</strong>" in page
