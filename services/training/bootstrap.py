"""Wires training's handlers, job runner and routes to the real adapters; nothing connects at import time."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from contextlib import suppress
from importlib import metadata
from pathlib import Path
from typing import Any

from contracts import commands, datasets, models, monitoring, training
from contracts.envelope import CloudEvent
from libs.artifacts import ArtifactStore
from libs.bus import Handler, Subscription, Transaction
from libs.db import Listening, migrations_in
from libs.http import create_app
from libs.logging import get_logger
from libs.modelspec import import_estimators
from libs.service import Runtime, ServiceParts
from libs.settings import PROJECT_ROOT
from services.training import api
from services.training.adapters.pool import ProcessPoolTrainer
from services.training.adapters.postgres import PgDatasets, PgJobs, PgProduction, PgSpecs, jobs_channel
from services.training.adapters.store import StoreSpecs
from services.training.handlers import HANDLERS, TrainingHandler
from services.training.runner import JobRunner
from services.training.settings import TrainingSettings

log = get_logger(__name__)

MIGRATIONS = migrations_in(Path(__file__).parent / "migrations", source="training")

TOPICS: tuple[str, ...] = (datasets.TOPIC, monitoring.TOPIC, commands.TOPIC, training.TOPIC, models.TOPIC)
"""What training reads; on each topic it handles only the types in HANDLERS and skips the rest."""


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    try:
        version = metadata.version("driftloop")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    if (PROJECT_ROOT / ".git").exists():
        with suppress(OSError, subprocess.SubprocessError):
            sha = subprocess.run(
                ["git", "rev-parse", "--short=12", "HEAD"],
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            if sha:
                return f"{version}+g{sha}"
    return version


def subscription(
    rt: Runtime, spec_store: StoreSpecs, *, consumer: str, topics: Sequence[str]
) -> Subscription:
    """Training's consumer: every handler bound to the adapters of the delivery's transaction."""
    source = rt.source()
    schema = rt.settings.db_schema

    def bind(handler: TrainingHandler) -> Handler:
        async def run(event: CloudEvent[Any], tx: Transaction) -> None:
            await handler(
                event,
                specs=PgSpecs(tx.conn),
                datasets=PgDatasets(tx.conn),
                jobs=PgJobs(tx.conn, schema),
                production=PgProduction(tx.conn),
                spec_store=spec_store,
                publish=tx.publish,
                source=source,
            )

        return run

    return Subscription(
        consumer=consumer,
        topics=list(topics),
        handlers={payload: bind(handler) for payload, handler in HANDLERS.items()},
        **rt.settings.consumer_limits(),
    )


async def build(rt: Runtime, *, topics: Sequence[str] = TOPICS) -> ServiceParts:
    """Training's API, consumer and job runner on the runtime's pool, producer and artifact store."""
    settings = rt.settings
    assert isinstance(settings, TrainingSettings)
    spec_store = StoreSpecs(ArtifactStore(settings.artifacts_url))
    trainer = ProcessPoolTrainer(
        settings.start_method,
        overlap=settings.overlap_fit,
        start_timeout_s=settings.fit_start_timeout_s,
        address_space_bytes=(
            settings.fit_memory_limit_mb * 2**20 if settings.fit_memory_limit_mb is not None else None
        ),
    )
    # The fit process imports scikit-learn while this one does the same: both take seconds on a busy machine.
    warming = asyncio.create_task(trainer.warm_up(), name="fit-process-warm-up")
    # Before the consumer joins its group: a first scikit-learn import must not happen on the event loop
    # later (validating a spec instantiates estimators), where it would stall the group heartbeat.
    await asyncio.to_thread(import_estimators)
    schema = settings.db_schema
    listening = Listening(rt.pool, jobs_channel(schema), lambda *_: runner.wake())
    runner = JobRunner(
        begin=rt.begin,
        queue_on=lambda conn: PgJobs(conn, schema),
        datasets_on=PgDatasets,
        trainer=trainer,
        artifacts_url=settings.artifacts_url,
        source=rt.source(),
        code_version=settings.code_version or code_version(),
        heartbeat_interval_s=settings.heartbeat_interval_s,
        stale_after_s=settings.stale_after_s,
        max_attempts=settings.max_attempts,
        job_timeout_s=settings.job_timeout_s,
        progress_interval_s=settings.progress_interval_s,
        poll_s=settings.runner_poll_s,
        max_event_bytes=settings.kafka.max_event_bytes,
        # Waking on NOTIFY from dispatching transactions: a job starts as soon as its request commits.
        listen=listening.ensure,
    )

    async def run_jobs() -> None:
        try:
            await warming
            await runner.run()
        finally:
            await listening.close()

    run_jobs.__name__ = "job-runner"

    async def stop_jobs() -> None:
        runner.stop()
        await asyncio.to_thread(trainer.close)

    app = create_app(
        settings,
        title="driftloop training",
        description="Model specs, the retrain policy and training jobs. Retrains start from DriftDetected, "
        "PerformanceDegraded, RetrainRequested and new datasets; results leave as TrainingCompleted.",
        routers=[api.router],
        ready=rt.ready,
    )
    app.state.runtime = rt
    app.state.spec_store = spec_store
    return ServiceParts(
        app=app,
        subscriptions=[subscription(rt, spec_store, consumer=settings.consumer_group, topics=topics)],
        tasks=[run_jobs],
        on_stop=[stop_jobs],
    )
