"""Runs the serving service as real processes on the real broker and database, and drives it with events.

Each test run gets its own Postgres schema, consumer group, artifact folder and topic namespace (a prefix:
the platform topics are created under it and deleted at the end), and model names of its own, so a run
never reads or writes another run's events, nor a platform's running on the same broker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from contracts import commands, models, monitoring, validation
from contracts.common import ArtifactFormat, ArtifactRef
from contracts.envelope import CloudEvent
from contracts.registry import EVENT_TYPES
from contracts.topics import TOPICS
from deploy.local.broker import create_platform_topics, delete_platform_topics
from libs.artifacts import ArtifactStore, save_model
from libs.settings import KafkaSettings
from tests.integration.kafka_tools import eventually, unique
from tests.unit.serving.fakes import churn_pipeline

ROOT = Path(__file__).resolve().parents[3]
STATE_TOPICS = (models.TOPIC, validation.TOPIC, monitoring.TOPIC, commands.TOPIC)
PREDICT = {"Authorization": "Bearer dev-predict"}
OPERATOR = {"Authorization": "Bearer dev-operator"}
VIEWER = {"Authorization": "Bearer dev-viewer"}

LOAD_DEADLINE_S = 180.0
"""Deadline of a wait that holds a replica's start or a model's load (a rollout starting, a replica following
a route): one load took over 30 s on this two-core host at a load average of 8-12, and a wait may hold
two (each replica loads the model)."""

EVENT_DEADLINE_S = 60.0
"""Deadline of a wait for serving to act on an event when no model is loaded on the way (a verdict, a
command, feedback)."""


def physical(topic: str, prefix: str) -> str:
    """A platform topic's name in a run's namespace (DRIFTLOOP_KAFKA_TOPIC_PREFIX, as serving reads it)."""
    return KafkaSettings(topic_prefix=prefix).physical(topic)


async def create_run_topics(bootstrap: str, prefix: str) -> None:
    """Create every platform topic under the run's prefix, as ``driftloop infra up`` does unprefixed."""
    await asyncio.to_thread(create_platform_topics, bootstrap, prefix=prefix)


async def delete_run_topics(bootstrap: str, prefix: str) -> None:
    """Delete the run's topics (only names under its prefix)."""
    await asyncio.to_thread(delete_platform_topics, bootstrap, prefix=prefix)


def store_models(folder: Path, seeds: Sequence[int]) -> list[ArtifactRef]:
    """Fit one tiny pipeline per seed and store it as a skops artifact."""
    store = ArtifactStore(str(folder))
    refs = []
    for seed in seeds:
        stored = save_model(store, churn_pipeline(seed=seed))
        refs.append(
            ArtifactRef(
                key=stored.sha256, uri=stored.uri, format=ArtifactFormat.SKOPS, size_bytes=stored.size
            )
        )
    return refs


async def start_group_at_end(
    bootstrap: str, group: str, prefix: str, topics: Sequence[str] = STATE_TOPICS
) -> None:
    """Commit the group's offsets at the topics' current ends, so it reads what is published from now on even
    if it is published before the group joins."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([physical(t, prefix) for t in topics])
    finally:
        await admin.close()
    partitions = [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        await consumer.commit(dict(ends.items()))
    finally:
        await consumer.stop()


class OutsideTheRun:
    """The platform's own (unprefixed) topics, from where they ended when a run started: what a run wrote
    there would reach a platform running on the same broker, and that platform's events the run."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.start: dict[TopicPartition, int] = {}

    async def mark(self) -> None:
        """Note where each platform topic ends now."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            present = set(await admin.list_topics()) & set(TOPICS)
            described = await admin.describe_topics(sorted(present))
        finally:
            await admin.close()
        partitions = [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            self.start = dict(await consumer.end_offsets(partitions)) if partitions else {}
        finally:
            await consumer.stop()

    async def keys_since(self, key_prefix: str) -> list[str]:
        """The keys starting with ``key_prefix`` of the records written there since :meth:`mark`."""
        if not self.start:
            return []
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        found: list[str] = []
        try:
            consumer.assign(list(self.start))
            ends = await consumer.end_offsets(list(self.start))
            for tp, offset in self.start.items():
                consumer.seek(tp, offset)
            pending = {tp for tp in self.start if ends[tp] > self.start[tp]}
            until = time.monotonic() + EVENT_DEADLINE_S
            while pending:
                if time.monotonic() > until:
                    raise AssertionError(f"could not read the platform's topics to their ends: {pending}")
                batch = await consumer.getmany(*pending, timeout_ms=1_000)
                for records in batch.values():
                    found += [
                        r.key.decode(errors="replace")
                        for r in records
                        if r.key is not None and r.key.decode(errors="replace").startswith(key_prefix)
                    ]
                # The position, not the last record: a transaction's marker takes an offset no record has.
                pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
        finally:
            await consumer.stop()
        return found


class TopicWatcher:
    """Collects the events of one run's models on some topics of its namespace, from the moment it starts."""

    def __init__(self, bootstrap: str, topics: Sequence[str], model_prefix: str, topic_prefix: str) -> None:
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.prefix = model_prefix
        self.topic_prefix = topic_prefix
        self.events: list[CloudEvent[Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            *[physical(t, self.topic_prefix) for t in self.topics],
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="latest",
            enable_auto_commit=False,
        )
        await self._consumer.start()
        # Wait for the assignment and pin the position before anything is published.
        await eventually(self._assigned, deadline_s=20)
        self._task = asyncio.create_task(self._collect())

    async def _assigned(self) -> bool:
        assert self._consumer is not None
        assignment = self._consumer.assignment()
        if not assignment:
            await self._consumer.getmany(timeout_ms=100)
            return False
        for tp in assignment:
            await self._consumer.position(tp)
        return True

    async def _collect(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    if r.key is None or not r.key.decode().startswith(self.prefix):
                        continue
                    self.events.append(EVENT_TYPES.decode(r.value, r.headers))

    def of(self, payload: type, model: str | None = None) -> list[CloudEvent[Any]]:
        return [
            e for e in self.events if isinstance(e.data, payload) and (model is None or e.subject == model)
        ]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


def inherited_env() -> dict[str, str]:
    """This process's environment without driftloop's settings: a developer's own
    ``DRIFTLOOP_SERVING_KAFKA__TOPIC_PREFIX`` or schema would win over the run's shared ones."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLOOP_")}


class ServingProcess:
    """``python -m services.serving`` with this run's schema, group, port and artifact folder."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.env = env
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.serving"],
            cwd=ROOT,
            env={**inherited_env(), **self.env, "DRIFTLOOP_SERVING_HTTP_PORT": str(self.port)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, deadline_s: float = LOAD_DEADLINE_S) -> None:
        async def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serving exited with {self.proc.returncode}; see {self.log_path}")
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    return (await client.get(f"{self.url}/v2/health/ready")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(ready, deadline_s=deadline_s, interval_s=0.3)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def serving_env(
    *,
    bootstrap: str,
    database_url: str,
    artifacts: Path,
    schema: str,
    group: str,
    topic_prefix: str,
    **extra: str,
) -> dict[str, str]:
    """Environment of one test run's serving replicas."""
    return {
        "DRIFTLOOP_ENV": "test",
        "DRIFTLOOP_KAFKA_BOOTSTRAP": bootstrap,
        "DRIFTLOOP_KAFKA_TOPIC_PREFIX": topic_prefix,
        "DRIFTLOOP_DATABASE_URL": database_url,
        "DRIFTLOOP_ARTIFACTS_URL": str(artifacts),
        "DRIFTLOOP_SERVING_DATABASE_SCHEMA": schema,
        "DRIFTLOOP_SERVING_CONSUMER_GROUP": group,
        "DRIFTLOOP_SERVING_ROLLOUT_MIN_SAMPLES": "50",
        "DRIFTLOOP_SERVING_ROLLOUT_BAKE_SECONDS": "0.5",
        "DRIFTLOOP_SERVING_ROUTING_POLL_S": "1.0",
        "DRIFTLOOP_LOG_JSON": "false",
        "DRIFTLOOP_LOG_LEVEL": "INFO",
        **extra,
    }


async def drop_schema(database_url: str, schema: str) -> None:
    """Remove a test run's schema (its name is checked: it comes from :func:`new_run_names`)."""
    assert schema.startswith("serving_") and schema.replace("_", "").isalnum()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


class RunNames(NamedTuple):
    """The names one test run keeps to."""

    schema: str
    group: str
    model_prefix: str
    topic_prefix: str


def new_run_names() -> RunNames:
    """Names unique to one test run; each carries the session's mark, so what a run that died leaves is
    deleted at the session's end (tests/conftest.py)."""
    tag = unique("serving")
    return RunNames(tag.lower(), f"test-{tag}", f"it-{tag[-10:]}", f"{tag.lower()}.")
