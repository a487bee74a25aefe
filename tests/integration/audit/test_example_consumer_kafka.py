"""The example consumer's --kafka reading on the real broker: a topic that does not exist is an error
message, not an endless poll; an empty one is read to its end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.audit.service_process import ROOT
from tests.integration.kafka_tools import create_topics, unique
from tests.unit.audit.test_docs import DOC_PUBLIC_KEY

CONSUMER = ROOT / "docs" / "examples" / "audit_consumer.py"
EMPTY_EXPORT = (
    '{"format":"driftloop-audit-export/1","from_seq":1,"to_seq":0,"prev_hash":"' + "0" * 64 + '",'
    '"exported_at":"2025-01-01T00:00:00.000000Z"}\n'
)


def read_with_topic(tmp_path: Path, bootstrap: str, topic: str) -> subprocess.CompletedProcess[str]:
    export = tmp_path / "export.ndjson"
    export.write_text(EMPTY_EXPORT)
    return subprocess.run(
        [
            sys.executable,
            str(CONSUMER),
            "--export",
            str(export),
            "--public-key",
            DOC_PUBLIC_KEY,
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
