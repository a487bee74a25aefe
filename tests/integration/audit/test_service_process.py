"""The audit service as a process on the real broker and database: exactly once across SIGKILLs, the HTTP
API, signed checkpoints on the topic and in the file, and the outside example consumer on its export."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from contracts.audit import AuditCheckpoint
from contracts.commands import RollbackRequested
from contracts.envelope import CloudEvent
from contracts.models import ModelStageChanged, ModelVersionRegistered
from contracts.monitoring import DriftDetected
from contracts.rollouts import RolloutPromoted, RolloutStarted
from contracts.training import TrainingCompleted, TrainingRequested, TrainingStarted
from contracts.validation import ValidationPassed
from libs.bus.kafka import KafkaPublisher
from services.audit.domain import key_id_of
from services.audit.schemas import AuditEventPage, TracePublic
from tests.integration.audit.service_process import ROOT, AuditProcess
from tests.integration.kafka_tools import create_topics, eventually, fetchval, read_topic, unique
from tests.unit.audit.fakes import example

CONSUMER = ROOT / "docs" / "examples" / "audit_consumer.py"


def on(topic: str, event: CloudEvent[Any]) -> tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]:
    key, value, headers = event.to_kafka()
    return topic, key, value, headers


async def test_killed_at_random_points_while_events_flow_leaves_no_gap_and_no_duplicate(
    kafka_bootstrap: str, database_url: str, publisher: KafkaPublisher, tmp_path: Path
) -> None:
    topics = [unique("test.audit.a"), unique("test.audit.b")]
    await create_topics(kafka_bootstrap, *topics, partitions=3)
    svc = AuditProcess(kafka_bootstrap, database_url, topics, tmp_path, checkpoint_every_rows=100)
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    events: list[CloudEvent[Any]] = []
    kills_done = asyncio.Event()

    async def flow() -> None:
        # Events keep coming until the last kill is done, so every kill lands while they flow.
        while not kills_done.is_set() and len(events) < 20_000:
            burst = [example(DriftDetected) for _ in range(10)]
            events.extend(burst)
            await publisher.send_many([on(topics[i % 2], e) for i, e in enumerate(burst)])
            await asyncio.sleep(0.05)  # pace the producer (about 200 events/s)

    flowing = asyncio.create_task(flow())
    try:
        for _ in range(3):
            svc.start()
            before = await svc.rows()
            target = before + rng.randint(1, 300)
            await eventually(partial(_at_least, svc, target), deadline_s=90, interval_s=0.02)
            svc.kill()
        kills_done.set()
        await flowing
        total = len(events)
        svc.start()
        await eventually(partial(_at_least, svc, total), deadline_s=90)
        await svc.ready()
        report = (await svc.get("/v1/verify")).json()
        assert report["ok"], (seed, report)
        assert svc.stop() == 0, svc.log_tail()
        count, last, ids, positions = await asyncio.gather(
            fetchval(database_url, f"SELECT count(*) FROM {svc.schema}.trail"),
            fetchval(database_url, f"SELECT max(seq) FROM {svc.schema}.trail"),
            fetchval(database_url, f"SELECT count(DISTINCT event_id) FROM {svc.schema}.trail"),
            fetchval(
                database_url,
                f"SELECT count(DISTINCT (topic, kafka_partition, kafka_offset)) FROM {svc.schema}.trail",
            ),
        )
        assert (count, last, ids, positions) == (total, total, total, total), seed
        stored = await fetchval(database_url, f"SELECT array_agg(event_id) FROM {svc.schema}.trail")
        assert set(stored) == {e.id for e in events}
        # The clean stop sealed the tail: a checkpoint covers every row.
        assert await fetchval(database_url, f"SELECT max(seq) FROM {svc.schema}.checkpoints") == total
    finally:
        flowing.cancel()
        if svc.proc is not None:
            svc.kill()
        await svc.drop_schema()


async def _at_least(svc: AuditProcess, n: int) -> bool:
    assert svc.proc is None or svc.proc.poll() is None, svc.log_tail()
    return await svc.rows() >= n


def cascade() -> list[CloudEvent[Any]]:
    chain = [example(DriftDetected)]
    for cls in (
        TrainingRequested,
        TrainingStarted,
        TrainingCompleted,
        ModelVersionRegistered,
        ValidationPassed,
        RolloutStarted,
        RolloutPromoted,
        ModelStageChanged,
    ):
        chain.append(example(cls, cause=chain[-1]))
    return chain


def run_consumer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CONSUMER), *args], capture_output=True, text=True, timeout=120, check=False
    )


async def test_trail_is_served_verified_exported_and_checked_by_an_outside_consumer(
    kafka_bootstrap: str, database_url: str, publisher: KafkaPublisher, tmp_path: Path
) -> None:
    topic = unique("test.audit.http")
    await create_topics(kafka_bootstrap, topic, partitions=1)
    svc = AuditProcess(kafka_bootstrap, database_url, [topic], tmp_path, checkpoint_every_rows=5)
    events = cascade()
    rollback = example(RollbackRequested, actor="user:alice")
    await publisher.send_many([on(topic, e) for e in [*events, rollback]])
    await publisher.send_many([(topic, b"churn", b"\x00 not json", [("ce_id", b"junk-1")])])
    svc.start()
    try:
        await svc.ready()
        await eventually(lambda: _at_least(svc, 11), deadline_s=60)

        page = (await svc.get("/v1/events", model="churn", type="RolloutPromoted")).json()
        assert [e["type"] for e in page["events"]] == ["io.driftloop.RolloutPromoted.v1"]
        assert page["events"][0]["correlationid"] == events[0].id
        by_actor = (await svc.get("/v1/events", actor="user:alice")).json()["events"]
        assert [e["id"] for e in by_actor] == [rollback.id]
        undecodable = (await svc.get("/v1/events", kind="undecodable")).json()["events"]
        assert undecodable[0]["error"]["reason"] == "missing-attribute"

        seen, cursor = [], None
        while True:
            params: dict[str, Any] = {"limit": 4, "order": "oldest"}
            if cursor:
                params["cursor"] = cursor
            body = (await svc.get("/v1/events", **params)).json()
            seen += [e["seq"] for e in body["events"]]
            if not (cursor := body["next_cursor"]):
                break
        assert seen == list(range(1, 12))

        tree = (await svc.get(f"/v1/trace/{events[0].id}")).json()
        # What the service answers is what its OpenAPI document says, null fields included (a root's
        # causationid, an event's error), as on /v1/events.
        TracePublic.model_validate(tree)
        assert tree["roots"][0]["causationid"] is None and tree["roots"][0]["error"] is None
        assert "cause_missing" not in tree["roots"][0]  # set only where it applies
        AuditEventPage.model_validate(page)
        chain, node = [], tree["roots"][0]
        while True:
            chain.append(node["id"])
            if not node["children"]:
                break
            [node] = node["children"]
        assert chain == [e.id for e in events]
        assert (await svc.get("/v1/trace/nope")).status_code == 404
        slashed = await svc.get("/v1/trace/team/cascade-1")  # a correlation id with a slash: looked up
        assert slashed.status_code == 404 and "'team/cascade-1'" in slashed.json()["detail"]

        assert (await svc.get("/v1/events", token=None)).status_code == 401
        assert (await svc.get("/v1/events", token="dev-predict")).status_code == 403
        too_many = await svc.get("/v1/events", limit=100_000)
        assert too_many.status_code == 422 and too_many.json()["code"] == "invalid-input"
        assert (await svc.get("/v1/events", cursor="garbage")).status_code == 422

        # The tail of 11 rows gets its checkpoint from the timer (checkpoint_every_s = 1); the keeper copies
        # it to the export file on its next tick, a moment after the database has it.
        await eventually(lambda: _checkpointed(svc, 11), deadline_s=30)
        await eventually(lambda: _archived(svc, 11), deadline_s=30)
        report = (await svc.get("/v1/verify")).json()
        assert report["ok"] and report["covered_by_checkpoint"] == 11, report
        full = (await svc.get("/v1/verify", full="true")).json()
        assert full["ok"] and full["mode"] == "full", full

        keys = (await svc.get("/v1/keys")).json()
        public = keys[0]["public_key"]
        assert keys[0]["key_id"] == key_id_of(base64.b64decode(public))
        assert (await svc.get("/v1/export")).status_code == 403  # a viewer's token: traffic data is in it
        export = await svc.get("/v1/export", token="dev-auditor")
        assert export.headers["content-type"].startswith("application/x-ndjson")
        saved = tmp_path / "trail.ndjson"
        saved.write_bytes(export.content)
        lines = export.content.splitlines()
        assert sum(b'"checkpoint"' in line for line in lines) >= 1

        ok = run_consumer("--export", str(saved), "--public-key", public, "--print")
        assert ok.returncode == 0, ok.stderr
        assert "OK: 11 rows" in ok.stdout and "io.driftloop.RolloutPromoted.v1" in ok.stdout
        streamed = run_consumer("--export", f"{svc.base_url}/v1/export", "--token", "dev-auditor")
        assert streamed.returncode == 0, streamed.stderr

        tampered = tmp_path / "tampered.ndjson"
        tampered.write_bytes(b"\n".join(_change_row(line, 4) for line in lines) + b"\n")
        bad = run_consumer("--export", str(tampered), "--public-key", public)
        assert bad.returncode == 1 and "FAILED at sequence 4" in bad.stderr, bad.stderr

        cut = tmp_path / "cut.ndjson"
        cut.write_bytes(b"\n".join(line for line in lines if _seq(line) <= 7) + b"\n")
        cut_short = run_consumer("--export", str(cut), "--public-key", public)
        # The header still says to_seq 11: rows lost on the way (a dropped connection) do not read as OK ...
        assert cut_short.returncode == 1 and "FAILED at sequence 8" in cut_short.stderr, cut_short.stderr
        assert "its header says it runs to 11" in cut_short.stderr
        # ... and a header changed to match proves nothing missing: the signed checkpoints elsewhere do.
        relabelled = tmp_path / "relabelled.ndjson"
        relabelled.write_bytes(cut.read_bytes().replace(b'"to_seq":11', b'"to_seq":7', 1))
        assert run_consumer("--export", str(relabelled), "--public-key", public).returncode == 0
        truncated = run_consumer(
            "--export", str(relabelled), "--public-key", public, "--checkpoints", str(svc.checkpoint_file)
        )
        assert truncated.returncode == 1 and "FAILED at sequence 8" in truncated.stderr
        assert "a signed checkpoint covers them" in truncated.stderr

        await eventually(lambda: _on_audit_topic(kafka_bootstrap, keys[0]["key_id"]), deadline_s=30)
        from_topic = run_consumer(
            "--export", str(relabelled), "--public-key", public, "--kafka", kafka_bootstrap
        )
        assert from_topic.returncode == 1 and "FAILED at sequence 8" in from_topic.stderr, from_topic.stderr

        file_lines = svc.checkpoint_file.read_bytes().splitlines()
        assert [AuditCheckpoint.model_validate_json(x).sequence for x in file_lines][-1] == 11
        assert svc.stop() == 0, svc.log_tail()
    finally:
        if svc.proc is not None:
            svc.kill()
        await svc.drop_schema()


async def _checkpointed(svc: AuditProcess, seq: int) -> bool:
    body = (await svc.get("/v1/head")).json()
    return bool(body["last_checkpoint"] and body["last_checkpoint"]["sequence"] >= seq)


async def _archived(svc: AuditProcess, seq: int) -> bool:
    assert svc.proc is not None and svc.proc.poll() is None, svc.log_tail()
    lines = svc.checkpoint_file.read_bytes().splitlines() if svc.checkpoint_file.exists() else []
    return any(AuditCheckpoint.model_validate_json(x).sequence >= seq for x in lines)


async def _on_audit_topic(bootstrap: str, key_id: str) -> bool:
    records = await read_topic(bootstrap, "mlops.audit", expect=1_000_000, deadline_s=3)
    return any(orjson.loads(r.value).get("key_id") == key_id for r in records)


def _seq(line: bytes) -> int:
    """The sequence number a line of an export is about (0 for the header)."""
    obj = orjson.loads(line)
    return int(obj["seq"] if "seq" in obj else obj["checkpoint"]["sequence"] if "checkpoint" in obj else 0)


def _change_row(line: bytes, seq: int) -> bytes:
    obj = orjson.loads(line)
    if obj.get("seq") != seq:
        return line
    obj["record"] = obj["record"].replace('"churn"', '"chum"')
    return orjson.dumps(obj)
