"""The example consumer (docs/examples/audit_consumer.py) on exports made by the service's own export code:
forged, damaged and partial exports get `FAILED at sequence N: why`, never a traceback or an OK."""

from __future__ import annotations

import http.server
import io
import json
import re
import socket
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest

from contracts.monitoring import DriftDetected
from libs.http import error_body
from services.audit import core
from services.audit.domain import ChainHead, Signer, chain_hash
from tests.unit.audit.fakes import OTHER_SEED, SEED, FakeTrail, changed_payload, delivery, example, record
from tests.unit.audit.test_docs import consumer

PUBLIC_KEY = Signer(SEED).public_key_b64


async def export(rows: int, *, from_seq: int = 1, every: int = 1000) -> list[dict[str, Any]]:
    """The lines of an export of a trail of ``rows`` events, a checkpoint every ``every`` rows."""
    trail = FakeTrail()
    await record(
        trail, Signer(SEED), [delivery(example(DriftDetected), offset=i) for i in range(rows)], every=every
    )
    return [
        json.loads(line)
        async for chunk in core.export_lines(trail, from_seq=from_seq)
        for line in chunk.splitlines()
    ]


def verify(tmp_path: Path, lines: list[Any], *extra: str) -> int:
    """Run the consumer on these lines (objects as JSON, text as it is) with the test key pinned."""
    path = tmp_path / "export.ndjson"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return int(consumer().main(["--export", str(path), "--public-key", PUBLIC_KEY, *extra]))


async def test_a_forged_row_cannot_hide_behind_a_second_header_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, *rows, checkpoint = await export(4, every=4)
    genuine = [bytes.fromhex(r["row_hash"]) for r in rows]
    forged = changed_payload(rows[1]["record"].encode())
    rows[1] = {"seq": 2, "row_hash": chain_hash(genuine[0], 2, forged).hex(), "record": forged.decode()}
    # The genuine row 2's hash, for the rows after the forgery to chain from: every checkpoint still matches.
    rebase = {**header, "from_seq": 3, "prev_hash": genuine[1].hex()}
    assert verify(tmp_path, [header, *rows[:2], rebase, *rows[2:], checkpoint]) == 1
    assert "FAILED at sequence 3: line 4 of the export is a second header line" in capsys.readouterr().err


async def test_the_header_must_be_the_first_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, first, *rest = await export(3)
    assert verify(tmp_path, [first, header, *rest]) == 1
    assert "line 1 of the export is not the export's header line" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("not json", "line 3 of the export is not JSON text"),
        ("[1]", "line 3 of the export is not a JSON object"),
        ("{}", "line 3 of the export is neither a row"),
        ('{"seq": 2}', "line 3 of the export is neither a row"),
        ('{"seq": 2, "row_hash": "00"}', "line 3 of the export is a row without a record"),
        (
            '{"seq": 2, "row_hash": "00", "record_base64": "*"}',
            "line 3 of the export has a record_base64 that is not base64",
        ),
        (
            '{"seq": 2, "row_hash": "00", "record": "\\ud800"}',
            "line 3 of the export has a record that is not valid UTF-8 text",
        ),
        (
            '{"checkpoint": {}}',
            "line 3 of the export is a damaged checkpoint: the checkpoint's sequence is missing",
        ),
        (
            '{"checkpoint": [1]}',
            "line 3 of the export is a damaged checkpoint: a checkpoint must be a JSON object",
        ),
        (
            '{"checkpoint": {"sequence": 1, "key_id": []}}',
            "line 3 of the export is a damaged checkpoint: the checkpoint's head_hash is missing",
        ),
    ],
)
async def test_a_damaged_line_fails_at_its_sequence_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, why: str
) -> None:
    header, first, *rest = await export(3)
    assert verify(tmp_path, [header, first, damage, *rest]) == 1
    err = capsys.readouterr().err
    assert f"FAILED at sequence 2: {why}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "header",
    [
        {"format": "driftloop-audit-export/1"},
        {"format": "driftloop-audit-export/1", "from_seq": 0, "prev_hash": "00" * 32},
        {"format": "driftloop-audit-export/1", "from_seq": 1, "prev_hash": "not hex"},
        {"format": "driftloop-audit-export/1", "from_seq": 1, "prev_hash": "00" * 32},
        {"format": "driftloop-audit-export/1", "from_seq": 3, "to_seq": 1, "prev_hash": "00" * 32},
    ],
)
def test_a_damaged_header_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], header: dict[str, Any]
) -> None:
    assert verify(tmp_path, [header]) == 1
    assert "FAILED at sequence 0: line 1 of the export is a header without" in capsys.readouterr().err


async def test_an_export_cut_short_at_a_line_boundary_fails_where_it_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What a dropped connection leaves when it falls between two lines: the header still says to_seq 6.
    header, *rows = await export(6)
    assert header["to_seq"] == 6
    assert verify(tmp_path, [header, *rows[:4]]) == 1
    err = capsys.readouterr().err
    assert "FAILED at sequence 5: rows 5..6 are missing: the export stops after row 4" in err
    assert verify(tmp_path, [header]) == 1
    assert "FAILED at sequence 1: rows 1..6 are missing" in capsys.readouterr().err


async def test_an_export_of_an_empty_trail_verifies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    [header] = await export(0)
    assert (header["from_seq"], header["to_seq"]) == (1, 0)
    assert verify(tmp_path, [header]) == 0
    assert "OK: 0 rows from sequence 1" in capsys.readouterr().out


async def test_a_header_whose_prev_hash_was_nulled_fails_at_that_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The service exports a row hash nulled in the database as null, prev_hash included (docs/audit.md).
    header, *rows = await export(6, from_seq=4)
    assert verify(tmp_path, [{**header, "prev_hash": None}, *rows]) == 1
    err = capsys.readouterr().err
    assert "FAILED at sequence 3: line 1 of the export is a header whose prev_hash is null" in err


async def test_ok_says_which_row_it_verified_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify(tmp_path, await export(5)) == 0
    assert "OK: 5 rows from sequence 1 and 0 checkpoints verified" in capsys.readouterr().out
    assert verify(tmp_path, await export(5, from_seq=4)) == 0
    out = capsys.readouterr().out
    assert "OK: 2 rows from sequence 4 and 0 checkpoints verified" in out
    assert "rows before 4 are trusted (the header's prev_hash), not verified" in out


async def test_a_public_key_that_is_not_base64_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "export.ndjson"
    path.write_text("".join(json.dumps(x) + "\n" for x in await export(1)))
    with pytest.raises(SystemExit) as exited:
        consumer().main(["--export", str(path), "--public-key", "not base64!"])
    assert exited.value.code == 2
    assert "--public-key: not the base64 of a raw 32-byte Ed25519 public key" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "No such file or directory"),
        ("not json\n", "line 1 is not JSON text"),
        ('{"sequence": 1}\n', "line 1: the checkpoint's head_hash is missing or not text"),
    ],
)
async def test_a_checkpoint_file_that_cannot_be_read_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, why: str
) -> None:
    checkpoints = tmp_path / "checkpoints.ndjson"
    if content is not None:
        checkpoints.write_text(content)
    assert verify(tmp_path, await export(3), "--checkpoints", str(checkpoints)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and why in err and "Traceback" not in err


async def test_a_checkpoint_both_in_the_export_and_from_a_file_counts_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = FakeTrail()
    for offset in (0, 2):  # two polls of two events: a checkpoint after each
        events = [delivery(example(DriftDetected), offset=offset + i) for i in range(2)]
        await record(trail, Signer(SEED), events, every=2)
    lines = [json.loads(line) async for chunk in core.export_lines(trail) for line in chunk.splitlines()]
    inline = [line["checkpoint"] for line in lines if "checkpoint" in line]
    assert len(inline) == 2
    checkpoints = tmp_path / "checkpoints.ndjson"
    # The file holds both again, one of them twice (the same file named twice would do the same).
    checkpoints.write_text("".join(json.dumps(cp) + "\n" for cp in [*inline, inline[0]]))
    capsys.readouterr()

    assert verify(tmp_path, lines, "--checkpoints", str(checkpoints), "--checkpoints", str(checkpoints)) == 0
    assert "OK: 4 rows from sequence 1 and 2 checkpoints verified" in capsys.readouterr().out


async def test_an_export_of_a_trail_whose_tail_was_cut_fails_without_other_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = FakeTrail()
    for offset in range(0, 8, 2):  # four polls of two events: a checkpoint at 2, 4, 6 and 8
        events = [delivery(example(DriftDetected), offset=offset + i) for i in range(2)]
        await record(trail, Signer(SEED), events, every=2)
    trail.delete(5, 6, 7, 8)  # the database's checkpoints stay: rows alone were deleted
    lines = [json.loads(line) async for chunk in core.export_lines(trail) for line in chunk.splitlines()]
    # The header runs to the new end; the checkpoints at 6 and 8 follow the last row.
    assert lines[0]["to_seq"] == 4
    assert [line["checkpoint"]["sequence"] for line in lines[-2:] if "checkpoint" in line] == [6, 8]
    capsys.readouterr()

    assert verify(tmp_path, lines) == 1
    err = capsys.readouterr().err
    # The extent known to be missing runs to the last checkpoint seen, not the first: it said rows 5..6.
    assert "FAILED at sequence 5: rows 5..8 are missing: a signed checkpoint covers them" in err, err


async def test_a_missing_export_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = consumer().main(["--export", str(tmp_path / "typo.ndjson"), "--public-key", PUBLIC_KEY])
    assert status == 1
    assert "error: [Errno 2] No such file or directory" in capsys.readouterr().err


async def test_kafka_without_aiokafka_is_an_error_naming_the_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The consumer needs aiokafka only for --kafka, so a reader's Python may well lack it.
    monkeypatch.setitem(sys.modules, "aiokafka", None)
    assert verify(tmp_path, await export(1), "--kafka", "127.0.0.1:19092") == 1
    assert "error: --kafka reads the audit topic with aiokafka, which this Python lacks" in (
        capsys.readouterr().err
    )


class Refusing(http.server.BaseHTTPRequestHandler):
    """Stands in for the audit service refusing a request: its status and error body (libs.http), or a
    proxy's page that is not JSON."""

    answers: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_GET(self) -> None:
        status, body = self.answers[self.path.split("?")[0]]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads the consumer's output."""


@pytest.fixture
def service() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def refusal(message: str, code: str) -> bytes:
    return json.dumps(error_body(message, code)).encode()


@pytest.mark.parametrize(
    ("route", "status", "body", "says"),
    [
        (
            "/v1/export",
            404,
            refusal("the trail has no row 99 to start the export after", "not-found"),
            "HTTP 404 Not Found: the trail has no row 99 to start the export after",
        ),
        (
            "/v1/export",
            422,
            refusal("to_seq must not be below from_seq", "invalid-input"),
            "HTTP 422 Unprocessable Entity: to_seq must not be below from_seq",
        ),
        ("/v1/export", 502, b"<html>Bad Gateway</html>", "HTTP 502 Bad Gateway: <html>Bad Gateway</html>"),
        (
            "/v1/keys",  # asked when no key is pinned
            401,
            refusal("the bearer token is not valid", "unauthorized"),
            "HTTP 401 Unauthorized: the bearer token is not valid",
        ),
    ],
)
def test_an_http_error_shows_what_the_service_said(
    service: str,
    capsys: pytest.CaptureFixture[str],
    route: str,
    status: int,
    body: bytes,
    says: str,
) -> None:
    Refusing.answers = {route: (status, body)}
    pinned = ["--public-key", PUBLIC_KEY] if route == "/v1/export" else []
    assert consumer().main(["--export", f"{service}/v1/export?from_seq=100", "--token", "t", *pinned]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith(f"error: {service}{route}") and last.endswith(says), last


def test_keys_the_service_cannot_be_asked_for_are_an_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    assert consumer().main(["--export", f"http://127.0.0.1:{port}/v1/export"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err


class HangingUp(http.server.BaseHTTPRequestHandler):
    """Streams an export as the service does (chunked), and hangs up in the middle of a chunk."""

    protocol_version = "HTTP/1.1"
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        whole = self.body
        self.wfile.write(b"%x\r\n" % len(whole) + whole[: len(whole) // 2])  # announces all, sends half
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads the consumer's output."""


async def test_an_export_whose_connection_breaks_mid_chunk_fails_as_cut_short(
    capsys: pytest.CaptureFixture[str],
) -> None:
    HangingUp.body = "".join(json.dumps(x) + "\n" for x in await export(6)).encode()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HangingUp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/export"
        assert consumer().main(["--export", url, "--public-key", PUBLIC_KEY]) == 1
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "the connection broke while the export streamed in" in err, err
    # The rows that came before the break are verified; the rest are missing, as for a cut between lines.
    assert re.fullmatch(
        r"FAILED at sequence (\d): rows \1\.\.6 are missing: .* \(cut short\?\)", err.splitlines()[-1]
    ), err


CONTROLS = "\x1b[2J\x1b]52;c;ZXZpbA==\x07\r\x9b1A\u202e"
"""What a producer (or whoever forged the export) may write to drive the verifier's terminal: clear the
screen, set the clipboard, go back over the line, a C1 control sequence, a right-to-left override."""


async def test_terminal_controls_in_what_it_prints_show_as_escapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --print wrote a record's subject as it is, and a FAILED line the key id of a forged checkpoint: either
    # could print over the verdict before it or clear the auditor's screen.
    trail = FakeTrail()
    drift = example(DriftDetected).model_copy(update={"subject": f"churn{CONTROLS}"})
    await record(trail, Signer(SEED), [delivery(drift, offset=0)], every=1)
    header, row, checkpoint = [
        json.loads(line) async for chunk in core.export_lines(trail) for line in chunk.splitlines()
    ]
    visible = "\\x1b[2J\\x1b]52;c;ZXZpbA==\\x07\\x0d\\x9b1A\\u202e"

    assert verify(tmp_path, [header, row, checkpoint], "--print") == 0
    out = capsys.readouterr().out
    assert f"churn{visible}" in out and not re.search("[\x1b\x07\r\x9b\u202e]", out)

    forged = {"checkpoint": {**checkpoint["checkpoint"], "key_id": f"k{CONTROLS}"}}
    assert verify(tmp_path, [header, row, forged]) == 1
    err = capsys.readouterr().err
    assert f"signed by key k{visible}, which" in err and not re.search("[\x1b\x07\r\x9b\u202e]", err)


@pytest.mark.parametrize(
    ("polls", "every", "says"),
    [
        ([4], 2, "; every row is vouched for by a signed checkpoint"),
        ([4, 1], 2, "; rows up to 4 are vouched for by a signed checkpoint, rows 5..5 only by the chain"),
        ([3], 1000, "; no row is vouched for by a signed checkpoint, only by the chain"),
    ],
)
async def test_ok_says_which_rows_a_signed_checkpoint_vouches_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], polls: list[int], every: int, says: str
) -> None:
    # The chain alone proves nothing anyone could not recompute: an export rewritten and stripped of its
    # checkpoints on its way said "OK" in the same words as the genuine one, the pinned key unused.
    trail, offset = FakeTrail(), 0
    for size in polls:
        events = [delivery(example(DriftDetected), offset=offset + i) for i in range(size)]
        await record(trail, Signer(SEED), events, every=every)
        offset += size
    lines = [json.loads(line) async for chunk in core.export_lines(trail) for line in chunk.splitlines()]
    capsys.readouterr()
    assert verify(tmp_path, lines) == 0
    assert says in capsys.readouterr().out


async def cut_trail(rows: int, keep: int, *, every: int = 2) -> FakeTrail:
    """A trail of ``rows`` events with a checkpoint every ``every`` rows, its rows after ``keep`` deleted
    (the database's checkpoints stay)."""
    trail = FakeTrail()
    for offset in range(0, rows, every):
        events = [delivery(example(DriftDetected), offset=offset + i) for i in range(every)]
        await record(trail, Signer(SEED), events, every=every)
    trail.delete(*range(keep + 1, rows + 1))
    return trail


async def lines_of(trail: FakeTrail) -> list[dict[str, Any]]:
    return [json.loads(line) async for chunk in core.export_lines(trail) for line in chunk.splitlines()]


def write_checkpoints(path: Path, checkpoints: list[Any]) -> str:
    path.write_text(
        "".join(
            json.dumps(cp if isinstance(cp, dict) else cp.model_dump(mode="json")) + "\n"
            for cp in checkpoints
        )
    )
    return str(path)


async def test_a_cut_tail_is_named_up_to_the_highest_checkpoint_of_any_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = await cut_trail(12, 4)
    every = [cp for cp, _ in trail.checkpoint_rows]  # at 2, 4, ..., 12
    trail.drop_checkpoints_after(8)  # the export carries those at 6 and 8; a file keeps them all
    lines = await lines_of(trail)
    capsys.readouterr()
    assert verify(tmp_path, lines, "--checkpoints", write_checkpoints(tmp_path / "cps.ndjson", every)) == 1
    err = capsys.readouterr().err
    assert "FAILED at sequence 5: rows 5..12 are missing: a signed checkpoint covers them" in err, err


async def test_a_checkpoint_that_comes_before_its_row_is_out_of_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, *rest = await export(4, every=4)
    *rows, checkpoint = rest
    assert verify(tmp_path, [header, *rows[:2], checkpoint, *rows[2:]]) == 1
    err = capsys.readouterr().err
    assert "FAILED at sequence 4: the checkpoint at 4 (line 4 of the export) is out of place" in err, err


async def test_a_checkpoint_of_a_key_not_pinned_in_a_file_fails_as_in_the_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # As `driftloop audit verify --checkpoints` says bad-checkpoint: the file is this trail's own copy. The
    # consumer passed it over without a word, and a forged one under the pinned key's id too.
    lines = await export(6, every=1000)
    stranger = Signer(OTHER_SEED).checkpoint(
        ChainHead(3, bytes.fromhex(lines[3]["row_hash"])), signed_at=datetime.now(UTC)
    )
    path = write_checkpoints(tmp_path / "cps.ndjson", [stranger])
    capsys.readouterr()
    assert verify(tmp_path, lines, "--checkpoints", path) == 1
    err = capsys.readouterr().err
    assert (
        f"FAILED at sequence 3: the checkpoint at 3 ({path} line 1) is not signed by a pinned key: it is "
        f"signed by key {stranger.key_id}, which is not pinned here, so it vouches for nothing"
    ) in err, err

    forged = stranger.model_copy(update={"key_id": Signer(SEED).key_id})
    assert verify(tmp_path, lines, "--checkpoints", write_checkpoints(tmp_path / "cps.ndjson", [forged])) == 1
    assert "its signature does not match its contents (forged or altered)" in capsys.readouterr().err

    beyond = Signer(OTHER_SEED).checkpoint(ChainHead(9, bytes(32)), signed_at=datetime.now(UTC))
    assert verify(tmp_path, lines, "--checkpoints", write_checkpoints(tmp_path / "cps.ndjson", [beyond])) == 1
    assert "FAILED at sequence 9: the checkpoint at 9" in capsys.readouterr().err


async def test_a_checkpoint_of_a_key_not_pinned_on_the_audit_topic_is_reported_not_counted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Other trails publish theirs on the topic too: each key not pinned is a warning, never proof.
    audit = consumer()
    lines = await export(6, every=1000)
    strangers = [
        Signer(OTHER_SEED).checkpoint(
            ChainHead(n, bytes.fromhex(lines[n]["row_hash"])), signed_at=datetime.now(UTC)
        )
        for n in (3, 6)
    ] + [Signer(OTHER_SEED).checkpoint(ChainHead(40, bytes(32)), signed_at=datetime.now(UTC))]
    topic = [
        audit.CheckpointCopy(cp.model_dump(mode="json"), f"mlops.audit offset {i}", True)
        for i, cp in enumerate(strangers)
    ]
    verifier = audit.Verifier(audit.Keys([PUBLIC_KEY]), topic, show=False, out=io.StringIO())
    for line in lines:
        verifier.line(json.dumps(line))
    verifier.finish()
    assert (verifier.checkpoints, verifier.vouched) == (0, 0)
    audit.warn_unpinned(verifier)
    assert (
        f"warning: 3 checkpoints on the audit topic (sequences 3..40) are signed by key "
        f"{strangers[0].key_id}, which is not pinned: they vouch for nothing here"
    ) in capsys.readouterr().err

    forged = strangers[0].model_copy(update={"key_id": Signer(SEED).key_id})
    verifier = audit.Verifier(
        audit.Keys([PUBLIC_KEY]),
        [audit.CheckpointCopy(forged.model_dump(mode="json"), "mlops.audit offset 9", True)],
        show=False,
        out=io.StringIO(),
    )
    with pytest.raises(audit.Broken, match="signature does not match its contents"):
        for line in lines:
            verifier.line(json.dumps(line))
