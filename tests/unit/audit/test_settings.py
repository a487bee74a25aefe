"""Audit settings: which topics are recorded, and the signing key's rules."""

from __future__ import annotations

import base64
import fcntl
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from contracts.audit import AuditCheckpoint
from contracts.topics import DEAD_LETTER
from libs.settings import settings_problems
from services.audit.adapters import files
from services.audit.adapters.files import CheckpointFile, signing_seed
from services.audit.domain import ChainHead, Signer
from services.audit.settings import AuditSettings

KEY = base64.b64encode(bytes(range(32))).decode()


def test_every_audited_topic_and_the_dead_letters_are_recorded_by_default() -> None:
    topics = AuditSettings().recorded_topics()
    assert "mlops.predictions" in topics
    assert DEAD_LETTER in topics
    assert "mlops.audit" not in topics


def test_predictions_and_dead_letters_can_be_left_out() -> None:
    topics = AuditSettings(record_predictions=False, record_dead_letters=False).recorded_topics()
    assert "mlops.predictions" not in topics and DEAD_LETTER not in topics
    assert "mlops.models" in topics


def test_prod_refuses_a_missing_or_placeholder_signing_key() -> None:
    with pytest.raises(ValidationError, match="DRIFTLOOP_AUDIT_SIGNING_KEY"):
        AuditSettings(env="prod")
    with pytest.raises(ValidationError):
        AuditSettings(env="prod", signing_key="changeme")
    assert AuditSettings(env="prod", signing_key=KEY).signing_key is not None


def test_a_key_that_is_not_32_bytes_of_base64_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValidationError, match="must be 32 bytes"):
        AuditSettings(signing_key=base64.b64encode(b"short").decode())
    with pytest.raises(ValidationError, match="TRUSTED_PUBLIC_KEYS"):
        AuditSettings(trusted_public_keys=["not base64!"])


@pytest.mark.parametrize(
    ("variable", "value", "bound"),
    [
        ("DRIFTLOOP_AUDIT_TRACE_MAX_EVENTS", "100001", "less than or equal to 100000"),
        ("DRIFTLOOP_AUDIT_TRACE_MAX_BYTES", str(256 * 1024 * 1024 + 1), "less than or equal to 268435456"),
        ("DRIFTLOOP_AUDIT_TRACE_MAX_BYTES", "1000", "greater than or equal to 1048576"),
        ("DRIFTLOOP_AUDIT_QUERY_MAX_BYTES", str(64 * 1024 * 1024 + 1), "less than or equal to 67108864"),
        ("DRIFTLOOP_AUDIT_QUERY_MAX_BYTES", "1000", "greater than or equal to 1048576"),
        ("DRIFTLOOP_AUDIT_QUERY_MAX_LIMIT", "100001", "less than or equal to 100000"),
        ("DRIFTLOOP_AUDIT_QUERY_MAX_LIMIT", "0", "greater than or equal to 1"),
    ],
)
def test_a_trace_or_page_bound_out_of_range_is_refused_at_start_naming_the_variable(
    variable: str, value: str, bound: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trace or a page holds every event it returns at once: an unbounded setting is the service's memory.
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as caught:
        AuditSettings()
    [line] = settings_problems(caught.value)
    assert line.startswith(f"{variable}='{value}' is not valid:") and bound in line


def test_dev_key_is_generated_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "signing.key"
    settings = AuditSettings(signing_key_file=path)
    first = signing_seed(settings)
    assert path.stat().st_mode & 0o777 == 0o600
    assert signing_seed(settings) == first
    assert signing_seed(AuditSettings(signing_key=KEY, signing_key_file=path)) == bytes(range(32))


def test_checkpoint_file_appends_only_newer_checkpoints(tmp_path: Path) -> None:
    signer = Signer(bytes(range(32)))
    archive = CheckpointFile(tmp_path / "checkpoints.ndjson")
    cps = [
        signer.checkpoint(ChainHead(n, bytes(32)), signed_at=datetime(2025, 1, 1, 0, 0, n, tzinfo=UTC))
        for n in (10, 20, 30)
    ]
    assert archive.append(cps[:2]) == 2
    assert archive.append(cps) == 1
    assert archive.read() == cps


def test_a_checkpoint_file_changed_under_the_service_is_caught_up_without_a_restart(tmp_path: Path) -> None:
    # The service's file, restored from a backup or with a line moved out of it (docs/audit.md: a checkpoint
    # forged far ahead that an older release copied) while the service runs: it was kept at its old end,
    # taking only checkpoints past it, until a restart.
    signer = Signer(bytes(range(32)))
    path = tmp_path / "checkpoints.ndjson"
    cps = [
        signer.checkpoint(ChainHead(n, bytes(32)), signed_at=datetime(2025, 1, 1, 0, 0, n % 60, tzinfo=UTC))
        for n in (10, 20, 30, 40, 10**12)
    ]
    archive = CheckpointFile(path, in_order=True)
    assert archive.append([cps[0], cps[4]]) == 2
    path.write_bytes(path.read_bytes().splitlines(keepends=True)[0])  # the line far ahead moved out
    assert archive.append(cps[:3]) == 2
    assert [c.sequence for c in archive.read()] == [10, 20, 30]
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:2]))  # yesterday's copy back
    assert archive.last_sequence() == 20
    assert archive.append(cps[:4]) == 2
    assert [c.sequence for c in archive.read()] == [10, 20, 30, 40]
    path.unlink()
    assert archive.last_sequence() == 0


def test_a_torn_last_line_costs_no_checkpoint_appended_after_it(tmp_path: Path) -> None:
    # A crash (or a full disk) in the middle of an append leaves a line without its newline: the next
    # checkpoint must start a line of its own, not be glued to the torn one and lost with it.
    signer = Signer(bytes(range(32)))
    path = tmp_path / "checkpoints.ndjson"
    first, second = (
        signer.checkpoint(ChainHead(n, bytes(32)), signed_at=datetime(2025, 1, 1, 0, 0, n, tzinfo=UTC))
        for n in (10, 20)
    )
    CheckpointFile(path).append([first])
    with path.open("ab") as f:
        f.write(second.model_dump_json().encode()[:40])  # the torn write of the second

    archive = CheckpointFile(path)
    assert archive.append([first, second]) == 1

    assert archive.read() == [first, second]
    assert CheckpointFile(path).last_sequence() == 20
    assert CheckpointFile(path, in_order=True).last_sequence() == 20
    with path.open("ab") as f:
        f.write(b"\n" + second.model_dump_json().encode()[:40])  # a torn line at the end, after a blank one
    assert CheckpointFile(path, in_order=True).last_sequence() == 20


class AppendedToAtOnce(CheckpointFile):
    """The service's file, appended to by another replica (``other``, the same file) the moment this one has
    read where the file ends, when the file's lock lets another writer in then."""

    def __init__(self, path: Path, other: CheckpointFile, pending: list[AuditCheckpoint]) -> None:
        super().__init__(path, in_order=True)
        self.other, self.pending = other, pending

    def last_sequence(self) -> int:
        last = super().last_sequence()
        if self.pending and self.path.exists():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return last  # the other replica waits for this one's append
            finally:
                os.close(fd)
            self.other.append(self.pending)
            self.pending = []
        return last


def test_two_replicas_copying_the_same_checkpoints_at_once_write_each_once(tmp_path: Path) -> None:
    # Replicas with the same settings on one host append to one checkpoint file. Both read its end, then both
    # appended what the database had past it: every checkpoint twice, the lines out of sequence order.
    signer = Signer(bytes(range(32)))
    path = tmp_path / "checkpoints.ndjson"
    cps = [
        signer.checkpoint(ChainHead(n, bytes(32)), signed_at=datetime(2025, 1, 1, 0, 0, n, tzinfo=UTC))
        for n in (10, 20, 30)
    ]
    CheckpointFile(path).append(cps[:1])
    other = CheckpointFile(path, in_order=True)
    archive = AppendedToAtOnce(path, other, cps)

    archive.append(cps)

    assert [c.sequence for c in CheckpointFile(path).read()] == [10, 20, 30]
    assert archive.last_sequence() == other.last_sequence() == 30


def test_the_writer_role_is_a_plain_identifier_to_its_last_character() -> None:
    assert AuditSettings(writer_role="audit_writer").writer_role == "audit_writer"
    for bad in ("audit_writer\n", "Audit", "audit-writer", "a" * 64):
        with pytest.raises(ValidationError, match="writer_role must be a lower-case SQL identifier"):
            AuditSettings(writer_role=bad)


@pytest.mark.parametrize("in_order", [False, True], ids=["read-through", "in-order"])
def test_the_checkpoint_file_gives_a_range_its_checkpoints_alone(tmp_path: Path, in_order: bool) -> None:
    # A verification or export of a few rows made every line of years of checkpoints a checkpoint.
    signer = Signer(bytes(range(32)))
    path = tmp_path / "checkpoints.ndjson"
    cps = [
        signer.checkpoint(ChainHead(n, bytes(32)), signed_at=datetime(2025, 1, 1, 0, 0, n % 60, tzinfo=UTC))
        for n in range(10, 101, 10)
    ]
    archive = CheckpointFile(path, in_order=in_order)
    archive.append(cps)
    with path.open("ab") as f:
        f.write(cps[-1].model_dump_json().encode().replace(b'"sequence":100', b'"sequence":110')[:60] + b"\n")

    assert archive.read(after=30, upto=60) == cps[3:6]
    assert archive.read(after=80) == cps[8:]  # the torn line is skipped, with a warning, in every range
    assert archive.read() == cps


class LinesLookedAt:
    """Counts the checkpoint file's lines whose sequence was read or that were made checkpoints."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        sequence_of = files._sequence_of
        made = files.AuditCheckpoint.model_validate_json

        def counted_sequence_of(line: bytes) -> int | None:
            self.count += 1
            return sequence_of(line)

        def counted_made(line: bytes) -> AuditCheckpoint:
            self.count += 1
            return made(line)

        monkeypatch.setattr(files, "_sequence_of", counted_sequence_of)
        monkeypatch.setattr(files.AuditCheckpoint, "model_validate_json", counted_made)


def long_trail_file(path: Path, checkpoints: int) -> list[AuditCheckpoint]:
    """A checkpoint file of ``checkpoints`` lines, one every ten rows, as the service appends them."""
    signer = Signer(bytes(range(32)))
    cps = [
        signer.checkpoint(ChainHead(n, bytes(32)), signed_at=datetime(2025, 1, 1, tzinfo=UTC))
        for n in range(10, 10 * checkpoints + 1, 10)
    ]
    CheckpointFile(path, in_order=True).append(cps)
    return cps


def test_a_range_of_a_years_long_checkpoint_file_reads_the_range_not_the_years(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each ranged verification or export read the service's checkpoint file from its first line.
    path = tmp_path / "checkpoints.ndjson"
    cps = long_trail_file(path, 10_000)
    archive = CheckpointFile(path, in_order=True)
    looked_at = LinesLookedAt(monkeypatch)

    assert archive.read(after=50_000, upto=50_030) == cps[5_000:5_003]
    assert archive.read(after=99_970) == cps[-3:]
    assert archive.read(after=10, upto=30) == cps[1:3]

    # A 64 KiB block (about 200 lines) for each range and a few lines of the search, of 30,000 read through.
    assert looked_at.count < 3 * 300, looked_at.count


def test_the_newest_checkpoint_of_a_years_long_file_is_read_from_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service read every line of the file, each made a checkpoint, once at start.
    path = tmp_path / "checkpoints.ndjson"
    long_trail_file(path, 10_000)
    looked_at = LinesLookedAt(monkeypatch)

    assert CheckpointFile(path, in_order=True).last_sequence() == 100_000
    assert looked_at.count == 1


def test_the_search_of_an_in_order_file_finds_what_reading_it_through_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lines that are not checkpoints (torn by a crash, blank, a repeat from a second writer) where the
    # search lands must not hide a checkpoint of the range; small blocks so that a short file is searched.
    monkeypatch.setattr(files, "SEARCH_BLOCK_BYTES", 64)
    signer = Signer(bytes(range(32)))
    path = tmp_path / "checkpoints.ndjson"
    lines = []
    for n in range(1, 61):
        cp = signer.checkpoint(ChainHead(n * 10, bytes(32)), signed_at=datetime(2025, 1, 1, tzinfo=UTC))
        line = cp.model_dump_json().encode()
        lines.append(line)
        if n % 7 == 0:
            lines.append(line[:50])  # torn
        if n % 11 == 0:
            lines.append(b"")
        if n % 13 == 0:
            lines.append(line)  # the same checkpoint again
    path.write_bytes(b"\n".join(lines) + b"\n")
    searched, read_through = CheckpointFile(path, in_order=True), CheckpointFile(path)

    for after in range(0, 620, 5):
        for upto in (None, after + 5, after + 45):
            expected = read_through.read(after=after, upto=upto)
            assert searched.read(after=after, upto=upto) == expected, (after, upto)
    assert searched.last_sequence() == read_through.last_sequence() == 600


@pytest.mark.parametrize(
    ("in_order", "shuffled"),
    [(True, False), (False, False), (False, True)],
    ids=["in-order", "read-through", "out-of-order"],
)
def test_the_checkpoint_file_gives_its_checkpoints_a_page_at_a_time(
    tmp_path: Path, in_order: bool, shuffled: bool
) -> None:
    # A whole trail's verification reads the file a page at a time: every checkpoint once, in sequence
    # order, two of one sequence (a second writer's) in one page, whatever the order of the lines.
    signer = Signer(bytes(range(32)))
    cps = [
        signer.checkpoint(ChainHead(n, bytes(32)), signed_at=datetime(2025, 1, 1, 0, 0, n % 60, tzinfo=UTC))
        for n in range(10, 201, 10)
    ]
    again = signer.checkpoint(ChainHead(30, bytes(32)), signed_at=datetime(2025, 1, 2, tzinfo=UTC))
    lines = [*cps[:3], again, *cps[3:]]
    if shuffled:
        lines = lines[::2] + lines[1::2]
    path = tmp_path / "checkpoints.ndjson"
    path.write_bytes(b"".join(cp.model_dump_json().encode() + b"\n" for cp in lines))
    archive = CheckpointFile(path, in_order=in_order)
    assert archive.last_sequence() == 200

    pages, after = [], 0
    while page := archive.read(after=after, upto=180, page=3):
        pages.append(sorted(page, key=lambda c: (c.sequence, c.signed_at)))
        after = page[-1].sequence if not shuffled else max(c.sequence for c in page)
    assert [c for p in pages for c in p] == [*cps[:3], again, *cps[3:18]]
    assert [len(p) for p in pages] == [4, 3, 3, 3, 3, 3]  # the page of 30 holds both of its checkpoints
