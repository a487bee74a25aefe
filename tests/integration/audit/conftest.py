"""The audit trail on the real Postgres: a fresh schema per test, the writer role, and a writer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from contracts.envelope import CloudEvent
from contracts.monitoring import DriftDetected
from contracts.topics import DEAD_LETTER
from libs.bus.core import Delivery
from libs.bus.postgres import bus_migrations, pg_transactions
from libs.db import apply_migrations, create_pool
from services.audit import handlers
from services.audit.adapters.postgres import PgChain, PgTrail, enter_writer_role, prepare_writer_role
from services.audit.bootstrap import MIGRATIONS
from services.audit.core import verify_trail
from services.audit.domain import CheckpointTrust, KeyRing, PartitionEnds, Signer
from services.audit.verification import VerifyReport
from tests.integration.kafka_tools import unique
from tests.unit.audit.fakes import SEED, Clock, delivery, example

ROLE = "driftloop_audit_writer"


def _outcome(report: VerifyReport) -> dict[str, Any]:
    return {k: v for k, v in report.as_json().items() if k not in ("elapsed_s", "rows_per_s")}


@dataclass
class TrailDb:
    """A migrated audit schema with its pool, and the operations tests need."""

    schema: str
    pool: asyncpg.Pool
    database_url: str
    signer: Signer

    async def record(
        self, deliveries: Sequence[Delivery], *, every: int = 10, ends: PartitionEnds | None = None
    ) -> int:
        """Append deliveries the way the service's consumer does: one transaction, writer role (and
        ``ends``, what the writer knows from its previous transactions)."""
        async with pg_transactions(self.pool, self.schema)() as tx:
            await enter_writer_role(tx.conn, ROLE)
            return await handlers.on_records(
                deliveries,
                trail=PgTrail(tx.conn),
                signer=self.signer,
                publish=tx.publish,
                source="/driftloop/audit",
                clock=Clock(),
                dead_letter_topic=DEAD_LETTER,
                checkpoint_every_rows=every,
                after_commit=tx.after_commit,
                ends=ends,
            )

    async def fill(self, rows: int, *, batch: int = 5, every: int = 10) -> list[CloudEvent[Any]]:
        """``rows`` events in batches, a checkpoint once ``every`` rows passed."""
        events = [example(DriftDetected) for _ in range(rows)]
        for i in range(0, rows, batch):
            await self.record(
                [delivery(e, offset=i + k) for k, e in enumerate(events[i : i + batch])], every=every
            )
        return events

    def trust(self) -> CheckpointTrust:
        """What the service trusts of the database's checkpoints: its own key's."""
        return CheckpointTrust(KeyRing([self.signer.public_raw]))

    async def verify(self, *, sealed: bool = True, chain: PgChain | None = None, **kw: Any) -> VerifyReport:
        """Verify as the service does, in the writer role (through ``chain``, a PgChain of the pool). Without
        a ``chain``, the same verification reading one checkpoint and three seals at a time must agree."""
        keys, sealer = KeyRing([self.signer.public_raw]), self.signer.sealer if sealed else None
        report = await verify_trail(chain or PgChain(self.pool, ROLE), keys=keys, sealer=sealer, **kw)
        if chain is None:
            paged = await verify_trail(
                PgChain(self.pool, ROLE, seal_rows=3), keys=keys, sealer=sealer, checkpoint_page=1, **kw
            )
            assert _outcome(paged) == _outcome(report)
        return report

    async def superuser(self, sql: str, *args: Any) -> Any:
        """Run SQL as the superuser, triggers disabled first: what an attacker with full access does."""
        conn = await asyncpg.connect(self.database_url, server_settings={"search_path": self.schema})
        try:
            async with conn.transaction():
                await conn.execute("ALTER TABLE trail DISABLE TRIGGER trail_append_only")
                await conn.execute("ALTER TABLE checkpoints DISABLE TRIGGER checkpoints_append_only")
                result = await conn.execute(sql, *args)
                await conn.execute("ALTER TABLE trail ENABLE ALWAYS TRIGGER trail_append_only")
                await conn.execute("ALTER TABLE checkpoints ENABLE ALWAYS TRIGGER checkpoints_append_only")
            return result
        finally:
            await conn.close()


@pytest.fixture
async def trail_db(database_url: str) -> AsyncIterator[TrailDb]:
    schema = unique("t_audit")
    pool = await create_pool(database_url, schema=schema, max_size=4)
    try:
        await apply_migrations(pool, schema, [*bus_migrations(), *MIGRATIONS])
        await prepare_writer_role(pool, schema, ROLE)
        yield TrailDb(schema, pool, database_url, Signer(SEED))
    finally:
        await pool.close()
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()
