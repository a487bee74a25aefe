"""A whole platform isolated from everything else on the same broker and Postgres server.

Its own database, its own topic namespace (a prefix), its own artifact store, state folder and ports: it
never sees another platform's events and no one else sees its. The end-to-end and fault-injection tests
and the loop benchmark each run one, so they can share infrastructure with a developer's `driftloop up`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from deploy.local.broker import create_platform_topics, delete_platform_topics
from deploy.local.settings import StateLayout
from deploy.platform import Platform

# Short windows and steps, so a whole cascade takes seconds; the same rules as production otherwise.
FAST_LOOP_SETTINGS = {
    "DRIFTLOOP_MONITORING_WINDOW_ROWS": "1000",
    "DRIFTLOOP_MONITORING_CONSECUTIVE_WINDOWS": "2",
    "DRIFTLOOP_MONITORING_COOLDOWN_SECONDS": "30",
    "DRIFTLOOP_SERVING_ROLLOUT_MIN_SAMPLES": "100",
    "DRIFTLOOP_SERVING_ROLLOUT_BAKE_SECONDS": "2",
}


def database_url_for(base: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``base``."""
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}"


@dataclass
class Sandbox:
    """One isolated platform: where it lives, how to reach it, the environment its services run with."""

    bootstrap: str
    server_url: str
    state_dir: Path
    port_base: int
    settings: Mapping[str, str] = field(default_factory=lambda: dict(FAST_LOOP_SETTINGS))
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def prefix(self) -> str:
        return f"sbx{self.run}."

    @property
    def database(self) -> str:
        return f"driftloop_sbx_{self.run}"

    @property
    def database_url(self) -> str:
        return database_url_for(self.server_url, self.database)

    @property
    def platform(self) -> Platform:
        return Platform(self.state_dir, port_base=self.port_base)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DRIFTLOOP_ENV": "test",
            "DRIFTLOOP_KAFKA_BOOTSTRAP": self.bootstrap,
            "DRIFTLOOP_KAFKA_TOPIC_PREFIX": self.prefix,
            "DRIFTLOOP_DATABASE_URL": self.database_url,
            **StateLayout(self.state_dir).service_files_env(),
            **self.settings,
        }

    async def start(self, *, ready_timeout_s: float = 180.0) -> None:
        """Create the database and topics, start the supervised services, wait until all are ready."""
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()
        create_platform_topics(self.bootstrap, prefix=self.prefix)
        try:
            self.platform.start(self.env)
            health = self.platform.wait_ready(timeout_s=ready_timeout_s)
            if not all(v == "ready" for v in health.values()):
                raise RuntimeError(f"services not ready: {health}; logs in {self.state_dir}/logs")
        except BaseException:
            # Not started is not stopped by the caller: a failure or Ctrl-C here stops it itself.
            self.platform.stop()
            raise

    def stop(self) -> None:
        """Stop the services (the database and topics stay, for a post-mortem, until ``remove``)."""
        self.platform.stop()

    @contextlib.asynccontextmanager
    async def running(self, *, keep: Callable[[], bool]) -> AsyncIterator[Sandbox]:
        """Started for the block and stopped after it; then removed, unless ``keep()`` (a failure)."""
        await self.start()
        try:
            yield self
        finally:
            self.stop()
        if not keep():
            await self.remove()

    async def remove(self) -> None:
        """Drop the sandbox's database and delete its topics (after ``stop``; what a passing run leaves)."""
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        finally:
            await conn.close()
        delete_platform_topics(self.bootstrap, prefix=self.prefix)
