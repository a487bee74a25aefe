"""Audit settings: which topics are recorded, and the signing key's rules."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from contracts.topics import DEAD_LETTER
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


def test_the_writer_role_is_a_plain_identifier_to_its_last_character() -> None:
    assert AuditSettings(writer_role="audit_writer").writer_role == "audit_writer"
    for bad in ("audit_writer\n", "Audit", "audit-writer", "a" * 64):
        with pytest.raises(ValidationError, match="writer_role must be a lower-case SQL identifier"):
            AuditSettings(writer_role=bad)


def test_the_checkpoint_file_gives_a_range_its_checkpoints_alone(tmp_path: Path) -> None:
    # A verification or export of a few rows made every line of years of checkpoints a checkpoint.
    signer = Signer(bytes(range(32)))
    path = tmp_path / "checkpoints.ndjson"
    cps = [
        signer.checkpoint(ChainHead(n, bytes(32)), signed_at=datetime(2025, 1, 1, 0, 0, n % 60, tzinfo=UTC))
        for n in range(10, 101, 10)
    ]
    archive = CheckpointFile(path)
    archive.append(cps)
    with path.open("ab") as f:
        f.write(cps[-1].model_dump_json().encode().replace(b'"sequence":100', b'"sequence":110')[:60] + b"\n")

    assert archive.read(after=30, upto=60) == cps[3:6]
    assert archive.read(after=80) == cps[8:]  # the torn line is skipped, with a warning, in every range
    assert archive.read() == cps
