"""Wires the registry's handlers and routes to the real adapters; nothing connects at import time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from contracts import commands, datasets, rollouts, training, validation
from contracts.envelope import CloudEvent
from libs.artifacts import ArtifactStore
from libs.bus import Handler, Subscription, Transaction
from libs.db import create_pool, migrations_in
from libs.http import create_app
from libs.service import Runtime, ServiceParts
from services.registry import api
from services.registry.adapters.artifacts import StoreArtifacts
from services.registry.adapters.postgres import PgDatasets, PgVersions
from services.registry.handlers import HANDLERS, RegistryHandler
from services.registry.metrics import counting

MIGRATIONS = migrations_in(Path(__file__).parent / "migrations", source="registry")

TOPICS: tuple[str, ...] = (training.TOPIC, validation.TOPIC, rollouts.TOPIC, datasets.TOPIC, commands.TOPIC)
"""What the registry reads; on each topic it handles only the types in HANDLERS and skips the rest."""


def subscription(
    rt: Runtime, artifacts: StoreArtifacts, *, consumer: str, topics: Sequence[str] = TOPICS
) -> Subscription:
    """The registry's consumer: every handler bound to the adapters of the delivery's transaction."""
    source = rt.source()

    def bind(handler: RegistryHandler) -> Handler:
        async def run(event: CloudEvent[Any], tx: Transaction) -> None:
            await handler(
                event,
                versions=PgVersions(tx.conn),
                datasets=PgDatasets(tx.conn),
                artifacts=artifacts,
                publish=counting(tx),
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
    """The registry's API and consumer on the runtime's pool, producer and artifact store."""
    artifacts = StoreArtifacts(ArtifactStore(rt.settings.artifacts_url))
    # Checking a model's types needs skops (and it scikit-learn): import them now, not inside the first
    # consumer transaction.
    import skops.io  # noqa: F401

    app = create_app(
        rt.settings,
        title="driftloop registry",
        description="Model versions, stages and aliases, lineage, datasets, artifacts and model cards. "
        "Manual commands (promote, rollback, archive, retrain) become events on mlops.commands.",
        routers=[api.router],
        hot=[api.hot_router],
        ready=rt.ready,
    )
    # Reads get a pool of their own whose connections are not reset on release: a read leaves no session
    # state (no LISTEN, locks or SET), and the reset is a second round trip on every request.
    reads = await create_pool(
        rt.settings.database_url,
        schema=rt.settings.db_schema,
        min_size=1,
        max_size=int(getattr(rt.settings, "read_pool_max", 4)),
        reset=_keep_session,
    )
    app.state.runtime = rt
    app.state.reads = reads
    app.state.artifacts = artifacts
    consumer = str(getattr(rt.settings, "consumer_group", "registry"))
    return ServiceParts(
        app=app,
        subscriptions=[subscription(rt, artifacts, consumer=consumer, topics=topics)],
        on_stop=[reads.close],
    )


async def _keep_session(_: asyncpg.Connection) -> None:
    """The read pool's reset: nothing to undo."""
