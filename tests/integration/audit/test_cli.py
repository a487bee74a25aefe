"""`driftloop audit verify | tail | trace` against a trail in the real Postgres."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from contracts.envelope import NotJson
from contracts.monitoring import DriftDetected
from contracts.topics import DEAD_LETTER
from contracts.training import TrainingRequested
from deploy.cli import main
from libs.bus.core import Delivery, Record
from services.audit import core
from services.audit.adapters.postgres import reading
from services.audit.domain import ChainHead, Signer
from tests.integration.audit.conftest import ROLE, TrailDb
from tests.integration.audit.test_tampering import CHANGE_PAYLOAD
from tests.unit.audit.fakes import OTHER_SEED, SEED, dead_letters_of, delivery, example, small_and_large
from tests.unit.audit.test_docs import consumer


@pytest.fixture
def audit_env(trail_db: TrailDb, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> TrailDb:
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", trail_db.database_url)
    monkeypatch.setenv("DRIFTLOOP_AUDIT_SCHEMA_NAME", trail_db.schema)
    monkeypatch.setenv("DRIFTLOOP_AUDIT_SIGNING_KEY", base64.b64encode(SEED).decode())
    monkeypatch.setenv("DRIFTLOOP_AUDIT_CHECKPOINT_FILE", str(tmp_path / "checkpoints.ndjson"))
    return trail_db


async def cli(*argv: str) -> int:
    """The command in a thread: it runs its own event loop, as it does in a terminal."""
    return await asyncio.to_thread(main, list(argv))


async def test_verify_says_ok_then_names_the_first_bad_row(
    audit_env: TrailDb, capsys: pytest.CaptureFixture[str]
) -> None:
    await audit_env.fill(23)
    assert await cli("audit", "verify") == 0
    assert "OK" in capsys.readouterr().out
    assert await cli("audit", "verify", "--full", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["mode"] == "full" and report["rows_checked"] == 23

    await audit_env.superuser(CHANGE_PAYLOAD, 17)
    assert await cli("audit", "verify") == 1
    assert "FAILED at sequence 17: hash-mismatch" in capsys.readouterr().out


async def test_tail_and_trace_show_the_cascade(
    audit_env: TrailDb, capsys: pytest.CaptureFixture[str]
) -> None:
    drift = example(DriftDetected)
    retrain = example(TrainingRequested, cause=drift)
    await audit_env.record([delivery(drift, offset=0), delivery(retrain, offset=1)])

    assert await cli("audit", "tail", "-n", "5", "--model", "churn") == 0
    out = capsys.readouterr().out
    assert "DriftDetected.v1" in out and "TrainingRequested.v1" in out

    assert await cli("audit", "trace", drift.id) == 0
    out = capsys.readouterr().out
    assert out.index("DriftDetected") < out.index("TrainingRequested")
    assert await cli("audit", "trace", drift.id, "--json") == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["roots"][0]["children"][0]["id"] == retrain.id

    assert await cli("audit", "trace", "no-such-cascade") == 1
    assert "no event with correlation id" in capsys.readouterr().err


async def test_trace_cut_by_its_byte_budget_says_so_at_the_end(
    audit_env: TrailDb, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLOOP_AUDIT_TRACE_MAX_BYTES", str(1024 * 1024))
    drift = example(DriftDetected)
    await audit_env.record([delivery(drift), *dead_letters_of(drift, count=4, size=600_000)])

    assert await cli("audit", "trace", drift.id) == 0
    out = " ".join(capsys.readouterr().out.split())  # however the terminal's width wrapped it
    assert (
        "cut: the records of the events up to seq 3 reached 1048576 bytes (DRIFTLOOP_AUDIT_TRACE_MAX_BYTES)"
        in out
    )
    assert await cli("audit", "trace", drift.id, "--json") == 0
    tree = json.loads(capsys.readouterr().out)
    # The drift and two letters: the records before the second hold less than the budget, not before a third.
    assert tree["truncated_by"] == "trace_max_bytes" and len(tree["roots"][0]["dead_letters"]) == 2


async def test_tail_and_trace_print_markup_in_producer_fields_as_text(
    audit_env: TrailDb, capsys: pytest.CaptureFixture[str]
) -> None:
    # Producers write subjects, actors and dead-letter errors: rich markup in them is text, not style.
    drift = example(DriftDetected).model_copy(update={"subject": "[/]", "actor": "[bold]user:eve"})
    key, value, headers = drift.to_kafka()
    error = b"1 validation error for DriftDetected [type=missing, input_value={}]"
    dead = Record(
        DEAD_LETTER, 0, 0, key, value, (*headers, ("dlq_reason", b"handler-failed"), ("dlq_error", error))
    )
    await audit_env.record([delivery(drift, offset=0), Delivery(dead, drift)])

    assert await cli("audit", "tail", "-n", "5") == 0
    out = capsys.readouterr().out
    assert "[/]" in out and "[bold]user:eve" in out

    assert await cli("audit", "trace", drift.id) == 0
    out = capsys.readouterr().out
    assert "[/]" in out and "by [bold]user:eve" in out and "[type=missing, input_value={}]" in out


CONTROLS = "\x1b[2J\x1b]52;c;ZXZpbA==\x07\r\x9b1A\u202e"
"""What a producer may put in a header to drive the reader's terminal: clear the screen, set the clipboard
(OSC 52), go back over the line, a C1 control sequence, a right-to-left override."""


async def test_tail_and_trace_show_terminal_controls_in_producer_fields_as_escapes(
    audit_env: TrailDb, capsys: pytest.CaptureFixture[str]
) -> None:
    # rich's Text takes \r and BEL out, but passes ESC on: a subject could clear an auditor's screen or
    # print over the lines before it.
    drift = example(DriftDetected).model_copy(
        update={"subject": f"churn{CONTROLS}", "actor": f"user:eve{CONTROLS}"}
    )
    key, value, headers = drift.to_kafka()
    dead = Record(
        DEAD_LETTER,
        0,
        0,
        key,
        value,
        (*headers, ("dlq_reason", b"handler-failed"), ("dlq_error", f"boom{CONTROLS}".encode())),
    )
    await audit_env.record([delivery(drift, offset=0), Delivery(dead, drift)])

    for command in (("tail", "-n", "5"), ("trace", drift.id)):
        assert await cli("audit", *command) == 0
        out = capsys.readouterr().out
        assert not any(c in out for c in "\x1b\x07\r\x9b\u202e"), command
        assert "churn\\x1b[2J\\x1b]52;c;ZXZpbA==\\x07\\x0d\\x9b1A\\u202e" in out, command
        assert "user:eve\\x1b[2J" in out, command
    assert "boom\\x1b[2J" in out


async def test_trace_of_a_very_deep_cascade_prints_its_dead_letters(
    audit_env: TrailDb, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = [example(DriftDetected)]
    for _ in range(120):
        chain.append(example(TrainingRequested, cause=chain[-1]))
    key, value, headers = chain[60].to_kafka()
    dead = Record(DEAD_LETTER, 0, 0, key, value, (*headers, ("dlq_reason", b"handler-failed")))
    await audit_env.record([*(delivery(e, offset=i) for i, e in enumerate(chain)), Delivery(dead, chain[60])])

    assert await cli("audit", "trace", chain[0].id) == 0
    out = capsys.readouterr().out
    assert "dead letter" in out and "handler-failed" in out


async def test_tail_of_large_records_shows_the_newest_the_byte_budget_holds_and_says_so(
    audit_env: TrailDb, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLOOP_AUDIT_QUERY_MAX_BYTES", str(1024 * 1024))
    await audit_env.record(small_and_large([0, 600_000, 600_000, 600_000]))
    assert await cli("audit", "tail", "-n", "5") == 0
    out = capsys.readouterr().out
    # Newest first: row 4, then row 3 (600,000 bytes before it), not row 2 (1,200,000 before it).
    assert [line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()] == ["3", "4"]
    assert "the 2 newest shown: their records reached 1048576 bytes (DRIFTLOOP_AUDIT_QUERY_MAX_BYTES)" in out


@pytest.mark.parametrize("name", ["typo.ndjson", "."], ids=["missing", "directory"])
async def test_a_checkpoint_file_that_is_not_there_is_an_error_not_ok(
    audit_env: TrailDb, capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    await audit_env.fill(3)
    path = tmp_path / name
    assert await cli("audit", "verify", "--checkpoints", str(path)) == 1
    captured = capsys.readouterr()
    why = "does not exist" if name != "." else "is a directory"
    assert f"driftloop: error: --checkpoints {path} {why}" in captured.err
    assert "OK" not in captured.out and "Traceback" not in captured.err


@pytest.mark.parametrize("command", [["tail", "-n", "1"], ["trace", "some-cascade"], ["verify"]])
async def test_a_writer_role_that_does_not_exist_is_named(
    audit_env: TrailDb,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    await audit_env.fill(3)
    monkeypatch.setenv("DRIFTLOOP_AUDIT_WRITER_ROLE", "no_such_writer_role")

    assert await cli("audit", *command) == 1

    err = capsys.readouterr().err
    role = "the database role 'no_such_writer_role' (DRIFTLOOP_AUDIT_WRITER_ROLE)"
    assert f"driftloop: error: {role} does not exist" in err
    assert "Traceback" not in err


def run_into_a_closed_pipe(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """The command as a shell runs `driftloop ... | head -0`: its reader is gone before it writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "deploy", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "command",
    [["trace", "--json"], ["trace"], ["tail", "-n", "20"], ["verify", "--json"], ["verify"]],
    ids=["trace-json", "trace", "tail", "verify-json", "verify"],
)
async def test_a_reader_that_stops_reading_ends_the_command_quietly(
    audit_env: TrailDb, command: list[str]
) -> None:
    # `driftloop audit trace <id> --json | head` said "driftloop: error: [Errno 32] Broken pipe" and exit 1,
    # the status of a failed verification; the tables ended with exit 1 and nothing said.
    events = await audit_env.fill(20)
    argv = [command[0], events[0].id, *command[1:]] if command[0] == "trace" else command

    done = await asyncio.to_thread(run_into_a_closed_pipe, "audit", *argv)

    assert done.stderr.decode() == ""
    assert done.returncode == 141  # 128 + SIGPIPE, as a shell reports a command its reader left


def undecodable(offset: int, value: bytes, event_id: str, cause: str | None = None) -> Delivery:
    """A record of one cascade ("the-cascade") that is JSON but not an event of the platform."""
    headers = [("ce_id", event_id.encode()), ("ce_correlationid", b"the-cascade")]
    if cause is not None:
        headers.append(("ce_causationid", cause.encode()))
    return Delivery(
        Record("mlops.models", 0, offset, b"churn", value, tuple(headers)), None, NotJson("not an event")
    )


async def test_trace_json_prints_integers_beyond_64_bits_and_deep_cascades(
    audit_env: TrailDb, capsys: pytest.CaptureFixture[str]
) -> None:
    # orjson writes neither an integer beyond 64 bits (which the trail shows exactly) nor JSON nested more
    # than 254 levels (a cascade 100 events deep is 200 before its data): both were a traceback.
    deep = b'{"a":' * 59 + b"[1]" + b"}" * 59
    chain = [undecodable(0, b'{"n": 123456789012345678901234}', "e0")]
    chain += [undecodable(i, deep if i == 99 else b"{}", f"e{i}", cause=f"e{i - 1}") for i in range(1, 100)]
    await audit_env.record(chain)
    capsys.readouterr()  # the writer's log

    assert await cli("audit", "trace", "the-cascade", "--json") == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    node = json.loads(captured.out)["roots"][0]
    assert node["data"] == {"n": 123456789012345678901234}
    for _ in range(99):
        node = node["children"][0]
    assert node["data"] == json.loads(deep)


async def test_verify_and_the_example_consumer_refuse_a_checkpoint_of_a_key_not_trusted_alike(
    audit_env: TrailDb, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # docs/audit.md: a checkpoint signed by a key not trusted vouches for nothing and fails verification,
    # whichever of the two reads it from a file; the consumer passed it over without a word.
    await audit_env.fill(23)
    row_14 = await audit_env.pool.fetchval("SELECT row_hash FROM trail WHERE seq = 14")
    stranger = Signer(OTHER_SEED)
    checkpoint = stranger.checkpoint(ChainHead(14, row_14), signed_at=datetime.now(UTC))
    kept = tmp_path / "kept.ndjson"
    kept.write_text(checkpoint.model_dump_json() + "\n")
    capsys.readouterr()

    assert await cli("audit", "verify", "--checkpoints", str(kept), "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["first_bad_seq"], report["problem"]) == (14, "bad-checkpoint"), report
    assert (
        f"signed by key {stranger.key_id}, which is not trusted here, so it vouches for nothing"
        in (report["detail"])
    )

    async with reading(audit_env.pool, ROLE, snapshot=True) as trail:
        export = b"".join([chunk async for chunk in core.export_lines(trail)])
    saved = tmp_path / "export.ndjson"
    saved.write_bytes(export)
    public = Signer(SEED).public_key_b64
    assert consumer().main(["--export", str(saved), "--public-key", public, "--checkpoints", str(kept)]) == 1
    assert (
        f"FAILED at sequence 14: the checkpoint at 14 ({kept} line 1) is not signed by a pinned key: it is "
        f"signed by key {stranger.key_id}, which is not pinned here, so it vouches for nothing"
    ) in capsys.readouterr().err

    # Trusted, by both, it is a checkpoint like any other; a range after it does not read it.
    assert (
        await cli("audit", "verify", "--checkpoints", str(kept), "--public-key", stranger.public_key_b64) == 0
    )
    assert "OK" in capsys.readouterr().out
    assert await cli("audit", "verify", "--from", "15", "--checkpoints", str(kept)) == 0
    args = ["--export", str(saved), "--checkpoints", str(kept), "--public-key", public]
    assert consumer().main([*args, "--public-key", stranger.public_key_b64]) == 0
    assert "OK: 23 rows from sequence 1 and 3 checkpoints verified" in capsys.readouterr().out
