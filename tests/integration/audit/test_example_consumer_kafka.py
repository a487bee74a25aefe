"""The example consumer's --kafka reading on the real broker: a topic that does not exist is an error
message, not an endless poll; an empty one is read to its end; a checkpoint of a key not pinned there is
reported, never counted."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from contracts.audit import AuditCheckpoint
from contracts.envelope import new_event
from libs.bus.kafka import KafkaPublisher
from services.audit.domain import ChainHead, Signer
from tests.integration.audit.service_process import ROOT
from tests.integration.kafka_tools import create_topics, unique
from tests.unit.audit.fakes import OTHER_SEED, SEED
from tests.unit.audit.test_docs import DOC_PUBLIC_KEY

CONSUMER = ROOT / "docs" / "examples" / "audit_consumer.py"
EMPTY_EXPORT = (
    '{"format":"driftloop-audit-export/1","from_seq":1,"to_seq":0,"prev_hash":"' + "0" * 64 + '",'
    '"exported_at":"2025-01-01T00:00:00.000000Z"}\n'
)


def read_with_topic(
    tmp_path: Path, bootstrap: str, topic: str, public_key: str = DOC_PUBLIC_KEY
) -> subprocess.CompletedProcess[str]:
    export = tmp_path / "export.ndjson"
    export.write_text(EMPTY_EXPORT)
    return subprocess.run(
        [
            sys.executable,
            str(CONSUMER),
            "--export",
            str(export),
            "--public-key",
            public_key,
            "--kafka",
            bootstrap,
            "--topic",
            topic,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_missing_audit_topic_is_an_error_message(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = unique("test.audit.no-such-topic")
    done = read_with_topic(tmp_path, kafka_bootstrap, topic)
    assert done.returncode == 1
    assert f"error: there is no topic '{topic}' on {kafka_bootstrap}" in done.stderr
    assert "Traceback" not in done.stderr


async def test_an_empty_audit_topic_is_read_to_its_end(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = unique("test.audit.empty")
    await create_topics(kafka_bootstrap, topic, partitions=1)
    done = read_with_topic(tmp_path, kafka_bootstrap, topic)
    assert done.returncode == 0, done.stderr
    assert "OK: 0 rows from sequence 1 and 0 checkpoints verified" in done.stdout


async def test_a_checkpoint_of_a_key_not_pinned_on_the_topic_is_a_warning_and_proves_nothing(
    kafka_bootstrap: str, publisher: KafkaPublisher, tmp_path: Path
) -> None:
    # Other trails publish their checkpoints on the audit topic too: one of a key not pinned is no failure of
    # this export, and no proof either; it is said, with its key id, not passed over without a word.
    topic = unique("test.audit.shared")
    await create_topics(kafka_bootstrap, topic, partitions=1)
    stranger = Signer(OTHER_SEED).checkpoint(ChainHead(5, bytes(32)), signed_at=datetime.now(UTC))
    await publisher.send_many([_on(topic, stranger)])
    pinned = Signer(SEED).public_key_b64
    done = read_with_topic(tmp_path, kafka_bootstrap, topic, pinned)
    assert done.returncode == 0, done.stderr
    assert (
        f"warning: 1 checkpoints on the audit topic (sequences 5..5) are signed by key {stranger.key_id}, "
        "which is not pinned: they vouch for nothing here"
    ) in done.stderr

    # One of the pinned key beyond the (empty) export's end: rows are missing, up to it.
    ours = Signer(SEED).checkpoint(ChainHead(3, bytes(32)), signed_at=datetime.now(UTC))
    await publisher.send_many([_on(topic, ours)])
    done = read_with_topic(tmp_path, kafka_bootstrap, topic, pinned)
    assert done.returncode == 1
    assert "FAILED at sequence 1: rows 1..3 are missing: a signed checkpoint covers them" in done.stderr
    assert f"signed by key {stranger.key_id}, which is not pinned" in done.stderr


def _on(topic: str, checkpoint: AuditCheckpoint) -> tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]:
    """The checkpoint as the audit service publishes it (CloudEvents type header, JSON value)."""
    key, value, headers = new_event(checkpoint, source="/driftloop/audit").to_kafka()
    return topic, key, value, list(headers)
