"""Wires serving: the state consumer (group ``serving``), the routing sync every replica runs, the
prediction log, the shadow scorer, the canary sample counter, and the HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from contracts import commands, models, monitoring, validation
from contracts.envelope import CloudEvent
from libs.artifacts import ArtifactStore
from libs.bus.core import Subscription, Transaction
from libs.db import migrations_in
from libs.http import create_app
from libs.logging import get_logger
from libs.service import Runtime, ServiceParts
from services.serving import api, handlers
from services.serving.adapters.artifacts import ArtifactModelLoader
from services.serving.adapters.log_producer import ProcessPredictionLog
from services.serving.adapters.postgres import (
    PgModelVersions,
    PgRoutes,
    PgRoutingSource,
    add_samples,
    read_route,
    read_routes,
)
from services.serving.adapters.prediction_log import KafkaPredictionLog
from services.serving.domain import RolloutPolicy, SampleFlush
from services.serving.metrics import ERROR_RATE_ROLLBACK_FAILURES, LOOP_FAILURES
from services.serving.routing import RoutingState, RoutingSync
from services.serving.scoring import CanaryStats, LogItem, Predictor
from services.serving.settings import ServingSettings

log = get_logger(__name__)

MIGRATIONS = migrations_in(Path(__file__).parent / "migrations", source="serving")

ERROR_RATE_RETRY_S = 1.0
"""How long an error-rate rollback that failed holds its rollout before a canary failure tries again."""


async def flush_canary_samples(
    stats: CanaryStats,
    state: RoutingState,
    save: Callable[[SampleFlush], Awaitable[None]],
    *,
    replica: str,
    every_s: float,
    stopping: asyncio.Event,
) -> None:
    """Every ``every_s``, and once more when stopping: ``save`` the canary rows served since the last flush
    (model, rollout id, step, rows) to their steps' counts, as a :class:`SampleFlush` numbered after the
    last one under ``replica`` (unique to this start of the process). A flush that fails is counted
    (flushes that keep failing hold the canaries' steps short of their samples, and a warning in the log
    alone could not be alerted on) and saved again, the same, at the next round, before the rows served
    since are taken: its commit may have gone through with only the answer lost, and ``save`` adds nothing
    for a flush whose token it has recorded, where rows given back would be added twice."""
    sequence = 0
    pending: SampleFlush | None = None

    async def attempt(flush: SampleFlush) -> SampleFlush | None:
        """None once ``flush`` is saved; ``flush`` again when the save failed."""
        try:
            await save(flush)
        except Exception as exc:
            LOOP_FAILURES.labels("sample-flush").inc()
            log.warning("canary sample count not saved, will retry", sequence=flush.sequence, error=repr(exc))
            return flush
        return None

    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=every_s)
        if pending is not None:
            pending = await attempt(pending)
        if pending is None and (items := stats.unflushed()):
            sequence += 1
            pending = await attempt(SampleFlush(replica, sequence, tuple(items)))
        stats.forget_ended(state.table.live_steps)


class ErrorRateRollbacks:
    """:class:`CanaryStats`' ``on_breach``, called at every canary failure over the threshold: rolls the
    rollout back (``roll_back``: one transaction), with at most one attempt per rollout on this replica in
    flight or done (a rollout rolled back, or no longer live, has nothing left to roll back). An attempt
    that fails (Postgres away) is logged, counted (``driftloop_serving_error_rate_rollback_failures_total``)
    and holds its rollout for ``retry_s`` before the next failure over the threshold tries again: a database
    refusing connections at once would otherwise be asked, and logged, once per failing request. The ids
    kept are one per rollout that breached, a few bytes each."""

    def __init__(
        self, roll_back: Callable[[str, str, str], Awaitable[None]], *, retry_s: float = ERROR_RATE_RETRY_S
    ) -> None:
        self._roll_back = roll_back
        self._retry_s = retry_s
        self._taken: set[str] = set()
        self._attempts: set[asyncio.Task[None]] = set()  # kept referenced until done

    def __call__(self, model: str, rollout_id: str, message: str) -> None:
        if rollout_id in self._taken:
            return
        self._taken.add(rollout_id)
        attempt = asyncio.create_task(self._attempt(model, rollout_id, message))
        self._attempts.add(attempt)
        attempt.add_done_callback(self._attempts.discard)

    async def _attempt(self, model: str, rollout_id: str, message: str) -> None:
        try:
            await self._roll_back(model, rollout_id, message)
        except Exception as exc:
            ERROR_RATE_ROLLBACK_FAILURES.inc()
            log.error("error-rate rollback failed", model=model, rollout_id=rollout_id, error=repr(exc))
            await asyncio.sleep(self._retry_s)
            self._taken.discard(rollout_id)


class _NoLog:
    """The prediction log when switched off (benchmarks measure its cost this way)."""

    def offer(self, item: LogItem) -> bool:
        return True


async def build(rt: Runtime) -> ServiceParts:
    """Wire handlers, routing and routes to the real adapters; called once the runtime is connected."""
    settings = rt.settings
    assert isinstance(settings, ServingSettings)
    schema = settings.db_schema
    instance = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
    # The canary sample flushes' token: a restarted process (the same INSTANCE_ID, or pid 1 in the same
    # container) numbers its flushes from 1 again, which the last number kept for the name would refuse.
    replica = f"{instance}/{secrets.token_hex(4)}"
    store = ArtifactStore(settings.artifacts_url)
    loader = ArtifactModelLoader(
        store, compile_models=settings.compile_models, compile_tolerance=settings.compile_tolerance
    )
    policy = RolloutPolicy(
        steps=tuple(settings.rollout_steps),
        min_samples=settings.rollout_min_samples,
        bake_seconds=settings.rollout_bake_seconds,
        mode=settings.rollout_mode,
    )
    source = rt.source()
    state = RoutingState()
    routing_source = PgRoutingSource(rt.pool, schema)
    sync = RoutingSync(state, routing_source, loader, poll_s=settings.routing_poll_s)
    prediction_log: ProcessPredictionLog | KafkaPredictionLog
    if settings.prediction_log_process:
        prediction_log = ProcessPredictionLog(
            settings.kafka,
            source=source,
            buffer=settings.prediction_log_buffer,
            batch=settings.prediction_log_batch,
            linger_ms=settings.prediction_log_linger_ms,
            handoff_bytes=settings.prediction_log_handoff_bytes,
            flush_s=settings.prediction_log_handoff_flush_ms / 1000,
            poll_s=settings.prediction_log_handoff_poll_ms / 1000,
            stall_s=settings.prediction_log_stall_s,
            log_level=settings.log_level,
            log_json=settings.log_json,
        )
    else:
        prediction_log = KafkaPredictionLog(
            settings.kafka,
            source=source,
            buffer=settings.prediction_log_buffer,
            batch=settings.prediction_log_batch,
            linger_ms=settings.prediction_log_linger_ms,
        )

    async def roll_back_for_errors(model: str, rollout_id: str, message: str) -> None:
        async with rt.begin() as tx:
            tally = handlers.Tally()
            await handlers.roll_back_for_error_rate(
                model,
                rollout_id,
                message,
                versions=PgModelVersions(tx.conn),
                routes=PgRoutes(tx.conn, schema),
                publish=tx.publish,
                source=source,
                tally=tally,
            )
            tx.after_commit(tally.count)

    stats = CanaryStats(
        threshold=settings.error_rate_threshold,
        min_requests=settings.error_rate_min_requests,
        alpha=settings.error_rate_alpha,
        on_breach=ErrorRateRollbacks(roll_back_for_errors),
    )
    predictor = Predictor(
        state,
        prediction_log if settings.prediction_log_enabled else _NoLog(),
        stats,
        max_rows=settings.max_rows_per_request,
        shadow_buffer=settings.shadow_buffer,
        shadow_buffer_bytes=settings.shadow_buffer_bytes,
    )

    def bind(
        handler: Callable[..., Awaitable[None]],
    ) -> Callable[[CloudEvent[Any], Transaction], Awaitable[None]]:
        async def run(event: CloudEvent[Any], tx: Transaction) -> None:
            await handlers.handle(
                handler,
                event,
                tx,
                versions=PgModelVersions(tx.conn),
                routes=PgRoutes(tx.conn, schema),
                loader=loader,
                source=source,
                policy=policy,
            )

        return run

    subscription = Subscription(
        consumer=settings.consumer_group,
        topics=[models.TOPIC, validation.TOPIC, monitoring.TOPIC, commands.TOPIC],
        handlers={payload: bind(h) for payload, h in handlers.HANDLERS.items()},
        **settings.consumer_limits(),
    )

    stopping = asyncio.Event()

    async def ready() -> dict[str, bool]:
        checks = await rt.ready()
        checks["routing"] = state.synced.is_set()
        return checks

    async def follow_routing() -> None:
        await sync.run()

    async def send_prediction_log() -> None:
        if settings.prediction_log_enabled:
            await prediction_log.run()
        else:
            await stopping.wait()

    async def score_shadows() -> None:
        await predictor.run_shadow(stopping.is_set)

    async def flush_samples() -> None:
        await flush_canary_samples(
            stats,
            state,
            lambda flush: add_samples(rt.pool, flush),
            replica=replica,
            every_s=settings.samples_flush_s,
            stopping=stopping,
        )

    async def stop() -> None:
        stopping.set()
        sync.stop()
        await prediction_log.stop()
        await routing_source.close()

    app = create_app(
        settings,
        title="driftloop serving",
        description="Predictions (Open Inference Protocol v2 and a simple JSON API), progressive canary "
        "rollouts, prediction and feedback logging.",
        hot=[api.hot_router],
        routers=[api.router],
        ready=ready,
    )

    app.state.runtime = rt
    ctx = api.ServingContext(
        predictor=predictor,
        state=state,
        begin=rt.begin,
        source=source,
        read_route=lambda model: read_route(rt.pool, model),
        read_routes=lambda: read_routes(rt.pool),
        ready=ready,
        max_feedback_items=settings.max_rows_per_request,
    )
    api.mount(app, ctx)
    log.info(
        "serving built",
        instance=instance,
        replica=replica,
        schema=schema,
        consumer_group=settings.consumer_group,
    )
    return ServiceParts(
        app=app,
        subscriptions=[subscription],
        tasks=[follow_routing, send_prediction_log, score_shadows, flush_samples],
        on_stop=[stop],
    )
