"""Wires the audit service: the writer role, the signing key, the raw batch consumer, the checkpoint keeper
and the API. Nothing connects at import time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import asyncpg
from prometheus_client import Counter

from contracts.predictions import PredictionsLogged, read_predictions_logged
from contracts.topics import DEAD_LETTER
from libs.bus import Delivery, Subscription, Transaction
from libs.db import migrations_in
from libs.http import create_app
from libs.logging import get_logger
from libs.service import Runtime, ServiceParts
from services.audit import api, handlers
from services.audit.adapters.files import CheckpointFile, signing_seed
from services.audit.adapters.postgres import PgTrail, enter_writer_role, prepare_writer_role, reading
from services.audit.core import CHECKPOINT_PAGE, checkpoint_pages
from services.audit.domain import (
    CheckpointTrust,
    KeyRing,
    PartitionEnds,
    PreparedRows,
    RefusedHead,
    SealedHead,
    Signer,
    StoredCheckpoint,
)
from services.audit.settings import AuditSettings, decode_key

log = get_logger(__name__)

CHECKPOINT_KEEPER_FAILURES = Counter(
    "driftloop_audit_checkpoint_keeper_failures_total",
    "Ticks of the checkpoint keeper whose step failed, by step (sign: the timed checkpoint; archive: the "
    "copy to the export file): logged as a warning and tried again on the next tick. A count that keeps "
    "rising is a trail that gets no checkpoint, or an export file that falls behind.",
    ["step"],
)

MIGRATIONS = migrations_in(Path(__file__).parent / "migrations", source="audit")


def utc_now() -> datetime:
    """The clock of recorded_at and signed_at."""
    return datetime.now(UTC)


def key_ring(settings: AuditSettings, signer: Signer) -> KeyRing:
    """The current key and the retired ones the settings still trust."""
    retired = [
        decode_key(k, f"DRIFTLOOP_AUDIT_TRUSTED_PUBLIC_KEYS[{i}]")
        for i, k in enumerate(settings.trusted_public_keys)
    ]
    return KeyRing([signer.public_raw, *retired])


async def sync_archive(
    pool: asyncpg.Pool,
    role: str,
    archive: CheckpointFile,
    trust: CheckpointTrust,
    *,
    page: int = CHECKPOINT_PAGE,
) -> int:
    """Copy the trusted checkpoints the file does not have yet from the database; returns how many. A row
    that is not a checkpoint (written in the database) is an untrusted one, named once, never an error: this
    runs as the service starts, and on every tick of the keeper.

    The checkpoints are read ``page`` at a time, each page appended before the next is read, as a
    verification reads them: after an outage of the file, or with a new one, the file lacks every checkpoint
    ever signed, and reading them all at once held them all (and their row hashes) in the starting service.
    Each page is read in a transaction of its own: a checkpoint signed meanwhile is above those read, and
    comes in a later page or on the next tick."""

    async def above(after: int, n: int) -> list[StoredCheckpoint]:
        async with reading(pool, role) as trail:
            return await trail.checkpoints_above(after, page=n)

    added = 0
    # Pages follow the database's sequences, not the file's end: a page of untrusted ones leaves it as it was.
    async with aclosing(checkpoint_pages([above], after=archive.last_sequence(), page=page)) as pages:
        async for stored in pages:
            added += archive.append(handlers.trusted_to_archive(stored, trust))
            trust.passed(archive.last_sequence())
    return added


async def show_stored_head(pool: asyncpg.Pool, role: str) -> None:
    """Show the trail's head on its gauge as the service starts, before it answers ready (GET /v1/head's
    read, outside the chain lock: the consumer and the keeper, which move the gauge, have not started)."""
    async with reading(pool, role) as trail:
        await handlers.show_head(trail)


class CheckpointKeeper:
    """Signs a checkpoint every ``every_s`` while rows arrive, and keeps the export file up to date."""

    def __init__(
        self,
        rt: Runtime,
        settings: AuditSettings,
        signer: Signer,
        archive: CheckpointFile,
        trust: CheckpointTrust,
    ) -> None:
        self.rt = rt
        self.settings = settings
        self.signer = signer
        self.archive = archive
        self.trust = trust
        # The head its last checkpoint was refused at: an idle trail's timer meets it again every tick.
        self.refused = RefusedHead()
        self._stop = asyncio.Event()

    async def seal_now(self) -> None:
        """Sign the head if it moved since the last checkpoint, then copy new checkpoints to the file."""
        await self._seal()
        await self._archive()

    async def _seal(self) -> None:
        async with self.rt.begin() as tx:
            await enter_writer_role(tx.conn, self.settings.writer_role)
            await handlers.seal_head(
                trail=PgTrail(tx.conn),
                signer=self.signer,
                publish=tx.publish,
                source=self.rt.source(),
                clock=utc_now,
                after_commit=tx.after_commit,
                trust=self.trust,
                refused=self.refused,
            )

    async def _archive(self) -> None:
        await sync_archive(self.rt.pool, self.settings.writer_role, self.archive, self.trust)

    async def run(self) -> None:
        """Until stopped: copy checkpoints to the file every second, sign one every ``every_s``. The two are
        tried apart, so checkpoints the consumer signed reach the file even while signing fails."""
        loop = asyncio.get_running_loop()
        next_seal = loop.time() + self.settings.checkpoint_every_s
        while not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=min(1.0, self.settings.checkpoint_every_s))
            if loop.time() >= next_seal:
                next_seal = loop.time() + self.settings.checkpoint_every_s
                await self._retry_later("sign", self._seal)
            await self._retry_later("archive", self._archive)

    @staticmethod
    async def _retry_later(what: str, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database may be away: try again on the next tick
            CHECKPOINT_KEEPER_FAILURES.labels(what).inc()
            log.warning("checkpoint keeper failed, retrying", step=what, error=repr(exc))

    async def stop(self) -> None:
        """A clean stop seals the tail, so no row is left without a checkpoint."""
        self._stop.set()
        try:
            await self.seal_now()
        except Exception as exc:
            log.warning("final checkpoint failed", error=repr(exc))


def trail_subscription(
    settings: AuditSettings, signer: Signer, source: str, trust: CheckpointTrust | None = None
) -> Subscription:
    """The trail's consumer: every record of the recorded topics, one transaction per poll in the writer
    role; with ``look_ahead``, the next poll's rows are prepared while a poll's transaction is in flight.
    ``trust``: which checkpoints it builds on (default: those of the keys the settings trust)."""
    role = settings.writer_role
    prepared = PreparedRows()
    ends = PartitionEnds()
    sealed = SealedHead()
    trust = trust or CheckpointTrust(key_ring(settings, signer))

    async def record_batch(deliveries: Sequence[Delivery], tx: Transaction) -> None:
        await enter_writer_role(tx.conn, role)
        await handlers.BATCH_HANDLER(
            deliveries,
            trail=PgTrail(tx.conn),
            signer=signer,
            publish=tx.publish,
            source=source,
            clock=utc_now,
            dead_letter_topic=DEAD_LETTER,
            checkpoint_every_rows=settings.checkpoint_every_rows,
            after_commit=tx.after_commit,
            prepared=prepared,
            ends=ends,
            sealed=sealed,
            trust=trust,
        )

    async def prepare_batch(deliveries: Sequence[Delivery]) -> None:
        await handlers.prepare_records(
            deliveries, prepared=prepared, clock=utc_now, dead_letter_topic=DEAD_LETTER
        )

    return Subscription(
        consumer=settings.consumer_group,
        topics=settings.recorded_topics(),
        batch_handler=record_batch,
        batch_prepare=prepare_batch if settings.look_ahead else None,
        raw=True,
        # The trail needs only the decoder's verdict on each record, and most records are predictions: the
        # fast reader gives the same verdict (and the same error for a malformed one) for less.
        readers={PredictionsLogged: read_predictions_logged},
        **settings.consumer_limits(),
    )


async def build(rt: Runtime) -> ServiceParts:
    """The audit service's consumer, checkpoint keeper and API on the runtime's pool and producer."""
    settings = cast(AuditSettings, rt.settings)
    role = settings.writer_role
    await prepare_writer_role(rt.pool, settings.db_schema, role)
    signer = Signer(signing_seed(settings))
    archive = CheckpointFile(settings.checkpoint_file, in_order=True)
    keys = key_ring(settings, signer)
    # One judge of the database's checkpoints for the consumer, the timed checkpoint and the file: each
    # untrusted one is logged once, and each trusted one checked once.
    trust = CheckpointTrust(keys)
    await sync_archive(rt.pool, role, archive, trust)
    await show_stored_head(rt.pool, role)
    topics = settings.recorded_topics()
    subscription = trail_subscription(settings, signer, rt.source(), trust)
    keeper = CheckpointKeeper(rt, settings, signer, archive, trust)
    app = create_app(
        settings,
        title="driftloop audit",
        description="A tamper-evident trail of every event of the platform: query it, trace a cascade, "
        "verify the hash chain and its signed checkpoints, export it as NDJSON.",
        routers=[api.router],
        ready=rt.ready,
    )
    app.state.runtime = rt
    app.state.audit = api.AuditContext(
        settings=settings,
        pool=rt.pool,
        signer=signer,
        keys=keys,
        archive=archive,
        exports=api.export_slots(settings.export_concurrency),
        verifications=api.verify_slots(settings.verify_concurrency),
    )
    log.info("audit trail ready", topics=topics, key_id=signer.key_id, schema=settings.db_schema)
    return ServiceParts(app=app, subscriptions=[subscription], tasks=[keeper.run], on_stop=[keeper.stop])
