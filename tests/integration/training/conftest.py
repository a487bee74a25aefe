"""A fresh topic, schemas, consumer groups and artifact folder for the training and validation services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from libs.artifacts import ArtifactStore
from tests.integration.kafka_tools import create_topics, unique
from tests.integration.training.harness import Feeder, ServiceProcess, TopicTail, drop_schemas


@dataclass
class Stage:
    """One isolated run: what the services are started with and how the test talks to them."""

    topic: str
    artifacts: Path
    store: ArtifactStore
    feeder: Feeder
    tail: TopicTail
    database_url: str
    schemas: dict[str, str]
    started: list[ServiceProcess]
    make: Callable[..., ServiceProcess]


@pytest.fixture(scope="module")
async def stage(
    kafka_bootstrap: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stage]:
    topic = unique("test.training")
    await create_topics(kafka_bootstrap, topic)
    artifacts = tmp_path_factory.mktemp("artifacts")
    logs = tmp_path_factory.mktemp("logs")
    schemas = {"training": unique("training_test"), "validation": unique("validation_test")}
    started: list[ServiceProcess] = []

    def make(service: str, **extra: str) -> ServiceProcess:
        prefix = f"DRIFTLOOP_{service.upper()}_"
        env = {
            "DRIFTLOOP_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "DRIFTLOOP_DATABASE_URL": database_url,
            "DRIFTLOOP_ARTIFACTS_URL": str(artifacts),
            "DRIFTLOOP_ENV": "test",
            "DRIFTLOOP_TEST_TOPIC": topic,
            "DRIFTLOOP_CONSUMER_RETRY_BACKOFF_S": "0.05",
            f"{prefix}DATABASE_SCHEMA": schemas[service],
            f"{prefix}CONSUMER_GROUP": extra.pop("consumer_group", unique(f"{service}-test")),
            **{f"{prefix}{k.upper()}": v for k, v in extra.items()},
        }
        process = ServiceProcess(service, env=env, log=logs / f"{service}.log")
        started.append(process)
        return process

    feeder = Feeder(kafka_bootstrap, topic)
    tail = TopicTail(kafka_bootstrap, topic)
    await feeder.start()
    await tail.start()
    try:
        yield Stage(
            topic,
            artifacts,
            ArtifactStore(str(artifacts)),
            feeder,
            tail,
            database_url,
            schemas,
            started,
            make,
        )
    finally:
        for process in started:
            process.stop()
        await tail.stop()
        await feeder.stop()
        await drop_schemas(database_url, *schemas.values())
