"""Audit end to end: the audit service as a process draining a backlog from Kafka into the trail, vs a
bare aiokafka consumer reading the same backlog, in one run.

    deploy/local/driftloop infra up
    .venv/bin/python -m bench.audit.service [--events 100000] [--repeat 2]

The records are those of ``bench.audit.run`` (90% one-row ``PredictionsLogged``, 10% the other event
types, on the topics the service records), published under a fresh topic prefix with every topic of the
platform created, so the consumers subscribe to the busy predictions topic and to the idle others, as in
production. Our side: ``python -m
services.audit`` on its own schema and consumer group, timed from its first row in the trail to its last
(polled every 0.2 s), with its settings as they ship and once more with the broker allowed to hold a fetch
for 500 ms (Kafka's default, ``DRIFTLOOP_KAFKA_FETCH_MAX_WAIT_MS=500``). The baseline: one aiokafka
consumer with the runner's options reading every record and doing nothing with it. Sides alternate; the
best run of each counts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO

import asyncpg
from aiokafka import AIOKafkaConsumer

from bench.audit.run import DATABASE, platform_records
from deploy.local.broker import create_platform_topics, delete_platform_topics
from libs.bus.kafka import MAX_POLL_RECORDS, KafkaPublisher
from libs.settings import KafkaSettings
from services.audit.settings import AuditSettings

KAFKA = os.environ.get("DRIFTLOOP_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
ROOT = Path(__file__).resolve().parents[2]
RECORDED = AuditSettings.model_construct().recorded_topics()  # what the service records as it ships


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def publish(prefix: str, events: int) -> None:
    """The backlog: ``events`` platform records on the prefixed topics."""
    kafka = KafkaSettings(bootstrap=KAFKA, topic_prefix=prefix)
    create_platform_topics(KAFKA, prefix=prefix)
    publisher = KafkaPublisher(kafka)
    await publisher.start()
    try:
        records = [r for r in platform_records(events * 2) if r.topic in RECORDED][:events]
        for i in range(0, events, 5000):
            await publisher.send_many(
                [(r.topic, r.key, r.value or b"", list(r.headers)) for r in records[i : i + 5000]]
            )
    finally:
        await publisher.stop()


async def bare_consumer(prefix: str, events: int) -> float:
    """Records per second of one aiokafka consumer reading the backlog, with the runner's options."""
    kafka = KafkaSettings(bootstrap=KAFKA, topic_prefix=prefix)
    consumer = AIOKafkaConsumer(
        group_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **kafka.consumer_options(),
    )
    consumer.subscribe([kafka.physical(t) for t in RECORDED])
    await consumer.start()
    try:
        read, started = 0, None
        while read < events:
            polled = await consumer.getmany(timeout_ms=200, max_records=MAX_POLL_RECORDS)
            got = sum(len(messages) for messages in polled.values())
            if got and started is None:
                started = time.perf_counter()
            read += got
        assert started is not None
        return events / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def start_service(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """``python -m services.audit`` with this environment, its output in ``log_path``."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child process holds it
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.audit"], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    return proc, log


async def audit_service(prefix: str, events: int, state: Path, extra_env: dict[str, str]) -> float:
    """Rows per second the audit service appends while draining the backlog (first row to last)."""
    schema = f"bench_auditsvc_{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DRIFTLOOP_ENV": "test",
        "DRIFTLOOP_KAFKA_BOOTSTRAP": KAFKA,
        "DRIFTLOOP_KAFKA_TOPIC_PREFIX": prefix,
        "DRIFTLOOP_DATABASE_URL": DATABASE,
        "DRIFTLOOP_AUDIT_SCHEMA_NAME": schema,
        "DRIFTLOOP_AUDIT_CONSUMER_GROUP": f"bench-audit-{uuid.uuid4().hex[:8]}",
        "DRIFTLOOP_AUDIT_HTTP_PORT": str(free_port()),
        "DRIFTLOOP_AUDIT_SIGNING_KEY": base64.b64encode(os.urandom(32)).decode(),
        "DRIFTLOOP_AUDIT_CHECKPOINT_FILE": str(state / f"{schema}.ndjson"),
        "DRIFTLOOP_AUTH_TOKENS_FILE": str(state / "no-tokens.json"),
        "DRIFTLOOP_LOG_JSON": "false",
        "DRIFTLOOP_LOG_LEVEL": "WARNING",
        **extra_env,
    }
    proc, log = start_service(env, state / f"{schema}.log")
    conn = await asyncpg.connect(DATABASE)
    try:
        first: tuple[float, int] | None = None
        rows = 0
        deadline = time.monotonic() + 60 + events / 500
        while rows < events:
            if proc.poll() is not None:
                raise RuntimeError(f"the audit service exited with {proc.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the audit service appended only {rows:,} of {events:,} rows; see {log.name}"
                )
            await asyncio.sleep(0.2)
            try:
                rows = await conn.fetchval(f"SELECT count(*) FROM {schema}.trail")
            except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
                continue
            if rows and first is None:
                first = (time.perf_counter(), rows)
        assert first is not None
        return (rows - first[1]) / (time.perf_counter() - first[0])
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side; the best counts")
    args = parser.parse_args()
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    print(f"publishing {args.events:,} platform records under the topic prefix {prefix!r} ...", flush=True)
    bare, shipped, long_wait = [], [], []
    try:
        await publish(prefix, args.events)
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp)
            for run in range(args.repeat):
                bare.append(await bare_consumer(prefix, args.events))
                shipped.append(await audit_service(prefix, args.events, state, {}))
                long_wait.append(
                    await audit_service(
                        prefix, args.events, state, {"DRIFTLOOP_KAFKA_FETCH_MAX_WAIT_MS": "500"}
                    )
                )
                print(
                    f"  run {run + 1}: bare consumer {bare[-1]:,.0f}/s, audit service {shipped[-1]:,.0f}/s "
                    f"(fetches held 500 ms: {long_wait[-1]:,.0f}/s)",
                    flush=True,
                )
    finally:
        delete_platform_topics(KAFKA, prefix=prefix)
    print()
    print(f"events: {args.events:,}, best of {args.repeat}")
    print(f"bare aiokafka consumer          {max(bare):>10,.0f} records/s")
    ratio = max(shipped) / max(bare)
    print(f"audit service, as shipped       {max(shipped):>10,.0f} rows/s   ({ratio:.1%} of bare)")
    print(f"  fetches held 500 ms           {max(long_wait):>10,.0f} rows/s")


if __name__ == "__main__":
    asyncio.run(main())
