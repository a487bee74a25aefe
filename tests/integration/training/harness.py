"""Service processes on the real broker and database for the training and validation tests: start, kill
(the whole process group, as a node loss would), read what they published on the test topic."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer

from contracts.common import ArtifactFormat, ArtifactRef
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent, EventPayload, new_event
from contracts.registry import EVENT_TYPES
from libs.artifacts import ArtifactStore
from libs.bus.kafka import KafkaPublisher
from libs.settings import KafkaSettings
from tests.integration.kafka_tools import eventually
from tests.ports import free_port
from tests.unit.training.data import parquet_bytes

ROOT = Path(__file__).resolve().parents[3]
OPERATOR = {"Authorization": "Bearer dev-operator"}
VIEWER = {"Authorization": "Bearer dev-viewer"}


class ServiceProcess:
    """``python -m tests.integration.training.worker <service>`` with its own schema, group and port."""

    def __init__(self, service: str, *, env: dict[str, str], log: Path) -> None:
        self.service = service
        self.port = free_port()
        prefix = f"DRIFTLOOP_{service.upper()}_"
        self.env = {**os.environ, **env, f"{prefix}HTTP_PORT": str(self.port), "DRIFTLOOP_LOG_JSON": "false"}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.training.worker", self.service],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the fit process dies with it on kill()
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, deadline_s: float = 90.0) -> None:
        """Wait until the HTTP API answers ready."""

        async def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.service} exited with {self.proc.returncode}: {self.tail()}")
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    return (await client.get(f"{self.url}/health/ready")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(answers, deadline_s=deadline_s, interval_s=0.3)

    def kill(self) -> None:
        """SIGKILL the service and everything it started."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL of the group if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # A fit process still running after its service is gone would outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class TopicTail:
    """Every event on the test topic, decoded, read from the beginning."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        self.events: list[CloudEvent[Any]] = []

    async def start(self) -> None:
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    async def poll(self) -> None:
        batches = await self.consumer.getmany(timeout_ms=200)
        for records in batches.values():
            for r in records:
                self.events.append(EVENT_TYPES.decode(r.value, r.headers))

    def of(
        self, kind: type[EventPayload], where: Callable[[Any], bool] = lambda _: True
    ) -> list[CloudEvent[Any]]:
        """Distinct events (by id) of ``kind`` matching ``where``: the outbox relay may send an event twice
        after a crash (at least once), consumers drop the repeat by id, and so does this view."""
        seen: set[str] = set()
        out = []
        for e in self.events:
            if isinstance(e.data, kind) and where(e.data) and e.id not in seen:
                seen.add(e.id)
                out.append(e)
        return out

    async def wait_for(
        self,
        kind: type[EventPayload],
        where: Callable[[Any], bool] = lambda _: True,
        *,
        deadline_s: float = 90,
    ) -> CloudEvent[Any]:
        """The first event of ``kind`` matching ``where``, polling until the deadline."""

        async def found() -> CloudEvent[Any] | None:
            await self.poll()
            matches = self.of(kind, where)
            return matches[0] if matches else None

        event = await eventually(found, deadline_s=deadline_s, interval_s=0.05)
        assert event is not None
        return event

    async def settle(self, seconds: float) -> None:
        """Keep reading for a while (to show that something does NOT arrive)."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            await self.poll()


class Feeder:
    """Puts events on the test topic as their producers would."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.publisher = KafkaPublisher(KafkaSettings(bootstrap=bootstrap))
        self.topic = topic

    async def start(self) -> None:
        await self.publisher.start()

    async def stop(self) -> None:
        await self.publisher.stop()

    async def send(self, payload: EventPayload, *, source: str, **attributes: Any) -> CloudEvent[Any]:
        event = new_event(payload, source=source, **attributes)
        key, value, headers = event.to_kafka()
        await self.publisher.send_many([(self.topic, key, value, headers)])
        return event

    async def upload(
        self, store: ArtifactStore, name: str, frame: Any, *, models: list[str] | None = None
    ) -> None:
        """A dataset version as the registry registers an upload."""
        stored = store.put(parquet_bytes(frame))
        ref = ArtifactRef(
            key=stored.sha256, uri=stored.uri, format=ArtifactFormat.PARQUET, size_bytes=stored.size
        )
        registered = DatasetRegistered(
            name=name,
            dataset_version=1,
            sha256=ref.key,
            artifact=ref,
            row_count=len(frame),
            columns={str(c): str(t) for c, t in frame.dtypes.items()},
            source="upload",
            models=models or [],
        )
        await self.send(registered, source="/driftloop/registry", actor="user:test")


async def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def drop_schemas(database_url: str, *schemas: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for schema in schemas:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


async def put_spec(service: ServiceProcess, model: str, body: str, content_type: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.put(
            f"{service.url}/v1/models/{model}/spec",
            content=body,
            headers={**OPERATOR, "Content-Type": content_type},
        )


async def wait_job_state(
    database_url: str, schema: str, job_id: str, state: str, deadline_s: float = 90
) -> Any:
    async def reached() -> Any:
        rows = await fetch(database_url, f"SELECT * FROM {schema}.jobs WHERE job_id = $1", job_id)
        return rows[0] if rows and rows[0]["state"] == state else None

    return await eventually(reached, deadline_s=deadline_s, interval_s=0.1)
