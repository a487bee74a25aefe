"""The whole platform as separate processes for end-to-end tests, isolated from everything else.

One platform per test session: its own database, its own topic namespace (a prefix), its own artifact
store, state folder and ports, so it never sees events of other tests and other tests never see its.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from deploy.local.broker import create_platform_topics
from deploy.loop import EventTail, LoopClient
from deploy.platform import Platform

E2E_PORT_BASE = 18101


@dataclass(frozen=True)
class E2E:
    """A running platform and how to reach it."""

    platform: Platform
    bootstrap: str
    prefix: str
    database_url: str


def _database_url(base: str, name: str) -> str:
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}"


async def _create_database(base_url: str, name: str) -> None:
    conn = await asyncpg.connect(base_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def e2e(
    kafka_bootstrap: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[E2E]:
    run = uuid.uuid4().hex[:8]
    prefix = f"e2e{run}."
    database = f"driftloop_e2e_{run}"
    await _create_database(database_url, database)
    create_platform_topics(kafka_bootstrap, prefix=prefix)
    state = tmp_path_factory.mktemp("platform")
    env = {
        **os.environ,
        "DRIFTLOOP_ENV": "test",
        "DRIFTLOOP_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DRIFTLOOP_KAFKA_TOPIC_PREFIX": prefix,
        "DRIFTLOOP_DATABASE_URL": _database_url(database_url, database),
        "DRIFTLOOP_ARTIFACTS_URL": str(state / "artifacts"),
        "DRIFTLOOP_AUTH_TOKENS_FILE": str(state / "tokens.json"),
        "DRIFTLOOP_AUDIT_SIGNING_KEY_FILE": str(state / "audit" / "signing.key"),
        "DRIFTLOOP_AUDIT_CHECKPOINT_FILE": str(state / "audit" / "checkpoints.ndjson"),
        **E2E_SETTINGS,
    }
    platform = Platform(state, port_base=E2E_PORT_BASE)
    platform.start(env)
    try:
        health = platform.wait_ready(timeout_s=180)
        assert all(v == "ready" for v in health.values()), (
            f"services not ready: {health}; logs in {state}/logs"
        )
        yield E2E(platform, kafka_bootstrap, prefix, env["DRIFTLOOP_DATABASE_URL"])
    finally:
        platform.stop()


# Short windows and steps, so a whole cascade takes seconds; the same rules as production otherwise.
E2E_SETTINGS = {
    "DRIFTLOOP_MONITORING_WINDOW_ROWS": "1000",
    "DRIFTLOOP_MONITORING_CONSECUTIVE_WINDOWS": "2",
    "DRIFTLOOP_MONITORING_COOLDOWN_SECONDS": "30",
    "DRIFTLOOP_SERVING_ROLLOUT_MIN_SAMPLES": "100",
    "DRIFTLOOP_SERVING_ROLLOUT_BAKE_SECONDS": "2",
}


@pytest.fixture
async def client(e2e: E2E) -> AsyncIterator[LoopClient]:
    c = LoopClient(e2e.platform)
    yield c
    await c.close()


@pytest.fixture
async def tail(e2e: E2E) -> AsyncIterator[EventTail]:
    t = EventTail(e2e.bootstrap, prefix=e2e.prefix)
    await t.start()
    yield t
    await t.stop()


@pytest.fixture
def logs(e2e: E2E) -> Iterator[Path]:
    yield e2e.platform.state_dir / "logs"
