"""The registry on the real broker and database, in this process: its own runtime (a fresh schema), its
consumer on a fresh input topic, and its HTTP app behind an in-process client.

The outbox relay is not started: what the registry emits stays in its outbox table, where the tests read
it, instead of landing on the shared platform topics that other services (and other test runs) consume.
The relay itself is covered by the bus's own integration tests."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field

from contracts.common import ArtifactFormat, ArtifactRef
from contracts.envelope import CloudEvent, EventPayload, new_event
from contracts.examples import EXAMPLES
from contracts.training import TrainingCompleted
from libs.artifacts import ArtifactStore, save_model
from libs.bus.kafka import KafkaPublisher
from libs.service import Runtime
from services.registry.bootstrap import MIGRATIONS, build
from services.registry.settings import RegistrySettings
from tests.integration.kafka_tools import create_topics, eventually, unique

AUTH = {role: {"Authorization": f"Bearer dev-{role}"} for role in ("viewer", "operator", "admin", "predict")}


class TestRegistrySettings(RegistrySettings):
    """The registry's settings with a schema of its own, so runs never share tables."""

    __test__ = False
    schema_name: str = Field("registry", description="Postgres schema for this test run.")

    @property
    def db_schema(self) -> str:
        return self.schema_name


class RunningRegistry:
    """A started registry plus what tests need to feed and inspect it."""

    def __init__(
        self, rt: Runtime, app: Any, topic: str, store: ArtifactStore, feeder: KafkaPublisher
    ) -> None:
        self.rt = rt
        self.topic = topic
        self.store = store
        self.feeder = feeder
        self._artifact_ids = itertools.count()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://registry")

    async def send(self, *events: CloudEvent[Any]) -> None:
        """Put events on the registry's input topic (as their producers would, keyed by model)."""
        items = []
        for e in events:
            key, value, headers = e.to_kafka()
            items.append((self.topic, key, value, headers))
        await self.feeder.send_many(items)

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self.rt.pool.acquire() as conn:
            return list(await conn.fetch(sql, *args))

    async def outbox(self, event_type: type[EventPayload], model: str) -> list[dict[str, Any]]:
        """Payloads of the events of one type about one model the registry emitted, in order."""
        rows = await self.fetch("SELECT key, value, headers FROM outbox ORDER BY seq")
        out = []
        for r in rows:
            headers = dict(r["headers"])
            if headers.get("ce_type") == event_type.event_type() and r["key"] == model.encode():
                out.append({"payload": json.loads(r["value"]), "headers": headers})
        return out

    async def versions_of(self, model: str) -> list[int]:
        rows = await self.fetch("SELECT version FROM model_versions WHERE model = $1 ORDER BY version", model)
        return [r["version"] for r in rows]

    async def wait_handled(self, event: CloudEvent[Any], deadline_s: float = 30.0) -> None:
        """Wait until the registry's consumer recorded the event in its inbox (handled or skipped)."""

        async def seen() -> bool:
            rows = await self.fetch("SELECT 1 FROM inbox WHERE event_id = $1", event.id)
            return bool(rows)

        await eventually(seen, deadline_s=deadline_s)

    # -- artifacts ---------------------------------------------------------------------------------------

    def stored_path(self, key: str) -> Path:
        return Path(self.store.root) / "sha256" / key[:2] / key

    def model_artifact(self) -> ArtifactRef:
        """A model file of its own: the same model gives the same bytes, hence the same key, and a test
        that damages its file must not damage another test's."""
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(random_state=next(self._artifact_ids))  # a parameter only, per file
        stored = save_model(self.store, model.fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1]))
        return ArtifactRef(
            key=stored.sha256, uri=stored.uri, format=ArtifactFormat.SKOPS, size_bytes=stored.size
        )

    def raw_artifact(self, data: bytes, fmt: ArtifactFormat) -> ArtifactRef:
        stored = self.store.put(data)
        return ArtifactRef(key=stored.sha256, uri=stored.uri, format=fmt, size_bytes=stored.size)

    def training_completed(
        self, model: str, run_id: str, artifact: ArtifactRef | None = None
    ) -> CloudEvent[Any]:
        base = EXAMPLES[TrainingCompleted]
        assert isinstance(base, TrainingCompleted)
        payload = base.model_copy(
            update={
                "model": model,
                "run_id": run_id,
                "artifact": artifact or self.model_artifact(),
                "profile": self.raw_artifact(f'{{"run": "{run_id}"}}'.encode(), ArtifactFormat.JSON),
            }
        )
        return new_event(payload, source="/driftloop/training")


@asynccontextmanager
async def running_registry(
    kafka_bootstrap: str, database_url: str, artifacts: Path, **overrides: Any
) -> AsyncIterator[RunningRegistry]:
    """Start the registry's consumer and API as the service runs them, on a fresh schema, topic and group."""
    topic = unique("test.registry.in")
    await create_topics(kafka_bootstrap, topic)
    settings = TestRegistrySettings(
        database_url=database_url,
        kafka={"bootstrap": kafka_bootstrap},
        artifacts_url=str(artifacts),
        schema_name=unique("registry_test"),
        consumer_group=unique("registry-test"),
        env="test",
        consumer_retry_backoff_s=0.05,
        **overrides,
    )
    rt = await Runtime.start(settings, MIGRATIONS)
    parts = await build(rt, topics=[topic])
    runners = [rt.consumer(s) for s in parts.subscriptions]
    tasks = [asyncio.create_task(r.run()) for r in runners]
    feeder = KafkaPublisher(settings.kafka)
    await feeder.start()
    registry = RunningRegistry(rt, parts.app, topic, ArtifactStore(str(artifacts)), feeder)
    try:
        await eventually(lambda: _ready(runners), deadline_s=60)
        yield registry
    finally:
        for r in runners:
            r.stop()
        await asyncio.wait(tasks, timeout=15)
        for t in tasks:
            t.cancel()
        await registry.http.aclose()
        for hook in parts.on_stop:
            await hook()
        await feeder.stop()
        async with rt.pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {settings.db_schema} CASCADE")
        await rt.close()


async def _ready(runners: list[Any]) -> bool:
    return all(r.ready.is_set() for r in runners)
