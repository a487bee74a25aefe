"""Run the audit service as a process (`python -m services.audit`) on fresh topics, schema and group."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from tests.integration.kafka_tools import eventually, fetchval, unique
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class AuditProcess:
    """One audit service set-up: its settings as env, and the process while it runs."""

    kafka_bootstrap: str
    database_url: str
    topics: Sequence[str]
    state: Path
    seed: bytes = field(default_factory=lambda: os.urandom(32))
    schema: str = field(default_factory=lambda: unique("t_auditsvc"))
    group: str = field(default_factory=lambda: unique("g_audit"))
    port: int = field(default_factory=free_port)
    checkpoint_every_rows: int = 50
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def checkpoint_file(self) -> Path:
        return self.state / "checkpoints.ndjson"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DRIFTLOOP_ENV": "test",
            "DRIFTLOOP_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "DRIFTLOOP_DATABASE_URL": self.database_url,
            "DRIFTLOOP_AUDIT_SCHEMA_NAME": self.schema,
            "DRIFTLOOP_AUDIT_CONSUMER_GROUP": self.group,
            "DRIFTLOOP_AUDIT_TOPICS": orjson.dumps(list(self.topics)).decode(),
            "DRIFTLOOP_AUDIT_HTTP_PORT": str(self.port),
            # A service running through a topic's re-creation sees it again within this (30 s by default).
            "DRIFTLOOP_KAFKA_METADATA_MAX_AGE_MS": "2000",
            "DRIFTLOOP_AUDIT_SIGNING_KEY": base64.b64encode(self.seed).decode(),
            "DRIFTLOOP_AUDIT_CHECKPOINT_FILE": str(self.checkpoint_file),
            "DRIFTLOOP_AUDIT_CHECKPOINT_EVERY_ROWS": str(self.checkpoint_every_rows),
            "DRIFTLOOP_AUDIT_CHECKPOINT_EVERY_S": "1",
            "DRIFTLOOP_AUTH_TOKENS_FILE": str(self.state / "no-tokens.json"),
            "DRIFTLOOP_LOG_JSON": "false",
            "DRIFTLOOP_LOG_LEVEL": "INFO",
        }

    def start(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        log = open(self.state / "service.log", "ab")  # noqa: SIM115 - the child process keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.audit"], cwd=ROOT, env=self.env(), stdout=log, stderr=log
        )

    async def ready(self) -> None:
        async def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the audit service exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    return (await client.get(f"{self.base_url}/health/ready")).status_code == 200
            except httpx.HTTPError:
                return False

        await eventually(answers, deadline_s=60, interval_s=0.2)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def stop(self) -> int:
        """SIGTERM and wait for a clean exit."""
        if self.proc is None:
            return 0
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        finally:
            self.proc = None

    def log_tail(self) -> str:
        path = self.state / "service.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    async def rows(self) -> int:
        """Rows in the trail (0 before the service created it)."""
        try:
            return int(await fetchval(self.database_url, f"SELECT count(*) FROM {self.schema}.trail") or 0)
        except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
            return 0

    async def get(self, path: str, token: str | None = "dev-viewer", **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=self.base_url, timeout=60) as client:
            return await client.get(path, params=params, headers=headers)

    async def drop_schema(self) -> None:
        await fetchval(self.database_url, f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
