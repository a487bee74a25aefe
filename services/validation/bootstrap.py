"""Wires validation's handlers and routes to the real adapters; nothing connects at import time."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contracts import datasets, models
from contracts.envelope import CloudEvent
from libs.artifacts import STORE_ATTEMPTS, ArtifactStore
from libs.bus import Handler, Subscription, Transaction
from libs.db import migrations_in
from libs.http import create_app
from libs.service import Runtime, ServiceParts
from services.validation import api
from services.validation.adapters.evaluator import StoreEvaluator, preload
from services.validation.adapters.postgres import PgChampions, PgDatasets, PgReports, PgVersions
from services.validation.handlers import HANDLERS, ValidationHandler
from services.validation.settings import ValidationSettings

MIGRATIONS = migrations_in(Path(__file__).parent / "migrations", source="validation")

TOPICS: tuple[str, ...] = (models.TOPIC, datasets.TOPIC)
"""What validation reads; on each topic it handles only the types in HANDLERS and skips the rest."""


def subscription(
    rt: Runtime, evaluator: StoreEvaluator, *, consumer: str, topics: Sequence[str]
) -> Subscription:
    """Validation's consumer: every handler bound to the adapters of the delivery's transaction."""
    source = rt.source()

    def bind(handler: ValidationHandler) -> Handler:
        async def run(event: CloudEvent[Any], tx: Transaction) -> None:
            await handler(
                event,
                versions=PgVersions(tx.conn),
                champions=PgChampions(tx.conn),
                datasets=PgDatasets(tx.conn),
                reports=PgReports(tx.conn),
                evaluator=evaluator,
                publish=tx.publish,
                after_commit=tx.after_commit,
                source=source,
                max_event_bytes=rt.settings.kafka.max_event_bytes,
            )

        return run

    return Subscription(
        consumer=consumer,
        topics=list(topics),
        handlers={payload: bind(handler) for payload, handler in HANDLERS.items()},
        **rt.settings.consumer_limits(),
    )


async def build(rt: Runtime, *, topics: Sequence[str] = TOPICS) -> ServiceParts:
    """Validation's API and consumer on the runtime's pool, producer and artifact store."""
    settings = rt.settings
    assert isinstance(settings, ValidationSettings)
    # Before the consumer joins its group: first imports of scikit-learn and skops take seconds.
    await asyncio.to_thread(preload)
    evaluator = StoreEvaluator(
        # The store failing for a moment is tried again in place; the rule is the evaluator's docstring.
        ArtifactStore(settings.artifacts_url, attempts=STORE_ATTEMPTS),
        latency_repeats=settings.latency_repeats,
        latency_batch_rows=settings.latency_batch_rows,
        max_slice_levels=settings.max_slice_levels,
    )
    app = create_app(
        settings,
        title="driftloop validation",
        description="The promotion gate: every registered candidate is checked (thresholds, "
        "champion/challenger, slices, signature, latency, sanity); reports are served here.",
        routers=[api.router],
        ready=rt.ready,
    )
    app.state.runtime = rt
    return ServiceParts(
        app=app, subscriptions=[subscription(rt, evaluator, consumer=settings.consumer_group, topics=topics)]
    )
