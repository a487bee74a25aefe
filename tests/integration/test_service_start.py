"""A service's start on the real Postgres and Kafka: a broker not up yet is waited for, as Postgres is."""

from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError

from libs.bus.kafka import KafkaPublisher
from libs.service import Runtime
from services.registry.bootstrap import MIGRATIONS
from tests.integration.kafka_tools import unique
from tests.integration.registry.harness import TestRegistrySettings


def _settings(database_url: str, bootstrap: str, artifacts: Path) -> TestRegistrySettings:
    return TestRegistrySettings(
        database_url=database_url,
        kafka={"bootstrap": bootstrap},
        artifacts_url=str(artifacts),
        schema_name=unique("start_test"),
        env="test",
    )


async def test_a_broker_still_coming_up_is_waited_for(
    kafka_bootstrap: str, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_start = KafkaPublisher.start
    refused: list[int] = []

    async def not_up_yet(self: KafkaPublisher) -> None:
        if len(refused) < 2:  # the broker refuses the first two tries, as one still starting does
            refused.append(1)
            raise KafkaConnectionError(f"Unable to bootstrap from {kafka_bootstrap}")
        await real_start(self)

    monkeypatch.setattr(KafkaPublisher, "start", not_up_yet)

    runtime = await Runtime.start(_settings(database_url, kafka_bootstrap, tmp_path), MIGRATIONS)
    try:
        assert len(refused) == 2
        assert runtime.publisher.producer is not None  # started on the third try
    finally:
        await runtime.close()


async def test_a_broker_that_never_answers_is_named_when_the_wait_ends(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[Any] = []
    real_close = asyncpg.Pool.close

    async def close(pool: Any) -> None:
        closed.append(pool)
        await real_close(pool)

    monkeypatch.setattr(asyncpg.Pool, "close", close)
    settings = _settings(database_url, "127.0.0.1:1", tmp_path)  # nothing listens on port 1

    with pytest.raises(RuntimeError, match=r"cannot reach Kafka at 127\.0\.0\.1:1 after 1s: .*Is it running"):
        await Runtime.start(settings, MIGRATIONS, connect_deadline_s=1.0)
    assert len(closed) == 1  # the pool it opened is not left behind
