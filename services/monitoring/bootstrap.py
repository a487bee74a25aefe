"""Wire monitoring's handlers to Kafka, Postgres and the artifact store; rebuild memory before consuming."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from prometheus_client import Counter

from contracts.envelope import CloudEvent, EventPayload
from contracts.feedback import GroundTruthReceived
from contracts.models import ModelVersionRegistered
from contracts.predictions import PredictionColumns, PredictionsLogged
from contracts.rollouts import RolloutPromoted, RolloutRolledBack, RolloutStarted, RolloutStepAdvanced
from libs.artifacts import ArtifactStore
from libs.bus import Delivery, Subscription, Transaction
from libs.bus.core import is_transient
from libs.bus.postgres import RETENTION_BATCH_ROWS
from libs.db import migrations_in
from libs.http import create_app
from libs.logging import get_logger
from libs.service import Runtime, ServiceParts
from services.monitoring import api, handlers
from services.monitoring.adapters.artifacts import StoreArtifacts
from services.monitoring.adapters.postgres import PgMonitoringStore
from services.monitoring.adapters.replay import READERS, Request, replay_predictions
from services.monitoring.domain import (
    EARLIEST,
    CanaryPolicy,
    CanaryStep,
    ClosedWindow,
    DriftPolicy,
    canary_due,
    epoch,
    from_epoch,
)
from services.monitoring.handlers import Monitor
from services.monitoring.live import LiveState, PredictionCache, WindowSettings
from services.monitoring.ports import MonitoringStore, ProfileUnavailable
from services.monitoring.settings import MonitoringSettings

log = get_logger(__name__)

T = TypeVar("T")

MIGRATIONS = migrations_in(Path(__file__).parent / "migrations", source="monitoring")

WINDOWS_SET_ASIDE = Counter(
    "driftloop_monitoring_windows_set_aside_total",
    "Closed windows whose judgement failed with an error retrying cannot cure (not an outage of the "
    "database or the broker): logged as errors and left unjudged, so the windows and housekeeping behind "
    "them go on.",
    ["model", "error"],
)

WINDOWS_TOO_FEW_ROWS = Counter(
    "driftloop_monitoring_windows_too_few_rows_set_aside_total",
    "Open windows with fewer than min_window_rows rows whose version got no traffic for label_wait_seconds "
    "(a canary rolled back after a few predictions, a version replaced mid-window): closed, logged as a "
    "warning and stored as done unjudged, so that they no longer hold a restart's replay back to their first "
    "row.",
    ["model"],
)

LABEL_JOINS_GIVEN_UP = Counter(
    "driftloop_monitoring_label_joins_given_up_total",
    "Label joins that failed with an error retrying cannot cure (not an outage): logged as errors, so the "
    "other joins go on. A waiting label is left waiting, to expire as unmatched; one joined before (to the "
    "served row) keeps that join, and the predictions consumed since (a shadow scoring) go without it.",
    ["model"],
)

BACKGROUND_FAILURES = Counter(
    "driftloop_monitoring_background_failures_total",
    "Ticks of monitoring's background loop that failed, by the task that failed (judge_closed, join_due, "
    "read_clock, decide_canaries, housekeeping) and its cause (outage: the database or the broker away; "
    "error: anything else): logged, and the tick retried with back-off (up to 10 s), its work kept queued. "
    "A count that keeps rising is a stuck loop: no verdicts, label joins or expiries are made meanwhile.",
    ["task", "cause"],
)

LABELLED_ROWS_PRUNED = Counter(
    "driftloop_monitoring_labelled_rows_pruned_total",
    "Rows of joined labels (labelled, inputs included) the retention deleted: received more than "
    "labelled_keep_days ago and needed by no query any more; /v1/status still counts their labels.",
)

LABELLED_PRUNING_FAILURES = Counter(
    "driftloop_monitoring_labelled_pruning_failures_total",
    "Batches of the joined labels' retention that failed (Postgres away, or anything else): logged as a "
    "warning and the round tried again after bus_retention_interval_s; the rows stay until then.",
)

WINDOW_REPORTS_PRUNED = Counter(
    "driftloop_monitoring_window_reports_pruned_total",
    "Window reports (window_reports) the retention deleted: judged more than window_reports_keep_days ago "
    "and not the newest of their model version; GET /v1/models/{model}/windows/{id} answers 404 for them.",
)

WINDOW_REPORTS_PRUNING_FAILURES = Counter(
    "driftloop_monitoring_window_reports_pruning_failures_total",
    "Batches of the window reports' retention that failed (Postgres away, or anything else): logged as a "
    "warning and the round tried again after bus_retention_interval_s; the reports stay until then.",
)

ALERTS_PRUNED = Counter(
    "driftloop_monitoring_alerts_pruned_total",
    "Alerts (rows of alerts, what /v1/status lists) the retention deleted: recorded more than "
    "window_reports_keep_days ago and not among their model's newest that /v1/status lists.",
)

ALERTS_PRUNING_FAILURES = Counter(
    "driftloop_monitoring_alerts_pruning_failures_total",
    "Batches of the alerts' retention that failed (Postgres away, or anything else): logged as a warning and "
    "the round tried again after bus_retention_interval_s; the alerts stay until then.",
)

CANARY_STEPS_SET_ASIDE = Counter(
    "driftloop_monitoring_canary_steps_set_aside_total",
    "Rollout steps whose canary decision failed with an error retrying cannot cure (not an outage of the "
    "database or the broker): logged as errors and given an inconclusive verdict saying so (serving rolls "
    "the canary back), so the other steps and the housekeeping go on.",
    ["model", "error"],
)


def make_monitor(settings: MonitoringSettings, artifacts: Any, source: str) -> Monitor:
    """The shared state and policies, from the settings."""
    defaults = DriftPolicy(
        alpha=settings.alpha,
        correction=settings.correction,
        small_sample_max=settings.small_sample_max,
        wasserstein_threshold=settings.wasserstein_threshold,
        jensen_shannon_threshold=settings.jensen_shannon_threshold,
        psi_threshold=settings.psi_threshold,
        share_threshold=settings.share_threshold,
        consecutive_windows=settings.consecutive_windows,
        cooldown_seconds=settings.cooldown_seconds,
        missing_share_tolerance=settings.missing_share_tolerance,
        performance_tolerance=settings.performance_tolerance,
    )
    canary = CanaryPolicy(
        min_labelled=settings.canary_min_labelled,
        alpha=settings.canary_alpha,
        margin=settings.canary_margin,
        latency_ratio=settings.canary_latency_ratio,
        latency_slack_ms=settings.canary_latency_slack_ms,
        divergence_threshold=settings.canary_divergence_threshold,
        timeout_seconds=settings.canary_timeout_seconds,
        label_grace_seconds=settings.canary_label_grace_seconds,
    )
    live = LiveState(
        WindowSettings(settings.window_rows, settings.window_seconds, settings.min_window_rows),
        PredictionCache(
            max_age_s=settings.label_wait_seconds,
            max_rows=settings.max_cached_predictions,
            max_ahead_s=settings.max_clock_skew_seconds,
        ),
        step_max_rows=settings.canary_step_max_rows,
    )
    return Monitor(
        live=live,
        defaults=defaults,
        canary=canary,
        artifacts=artifacts,
        source=source,
        performance_window_labels=settings.performance_window_labels,
        export_labelled_rows=settings.export_labelled_rows,
        label_wait_seconds=settings.label_wait_seconds,
        labelled_keep_days=settings.labelled_keep_days,
        window_reports_keep_days=settings.window_reports_keep_days,
        rollout_start_wait_seconds=settings.rollout_start_wait_seconds,
        max_kept_steps=settings.max_kept_rollout_steps,
        max_pending_labels=settings.max_pending_labels,
        max_watched_steps=settings.max_watched_rollout_steps,
        max_event_bytes=settings.kafka.max_event_bytes,
        quality_issues_per_kind=settings.quality_issues_per_kind,
        predictions_topic=settings.predictions_topic,
    )


async def restore(rt: Runtime, monitor: Monitor) -> None:
    """Load models, policies, watched rollout steps (and those kept for their start) and waiting labels from
    Postgres; decide the watched steps beyond ``max_watched_rollout_steps``."""
    async with rt.begin() as tx:
        store = PgMonitoringStore(tx.conn)
        # Before anything is timed: the steps, labels and predictions restored are timed on Postgres' clock,
        # whichever host ran the process before this one.
        monitor.learn_clock(await store.now())
        tally = handlers.Tally()
        tx.after_commit(tally.count)
        models = await store.models()
        for stored in models:
            try:
                await handlers.load_reference(stored, monitor=monitor, store=store)
            except ProfileUnavailable as exc:
                log.error(
                    "model version not monitored: profile unavailable", model=stored.model, error=str(exc)
                )
        await handlers.refresh_policies(monitor=monitor, store=store)
        # The first started up to the bound, as the step events were admitted: more (a bound lowered, or rows
        # from before there was one) would hold memory without bound again, at every start. The others get
        # their inconclusive verdict here, in this transaction, whose outbox the relay sends once the
        # consumers start (serving rolls their canaries back): the Background's first tick would also do, but
        # it runs only after the replay, and meanwhile they would count against the bound.
        await handlers.decide_watched_beyond_bound(
            monitor.now(), monitor=monitor, store=store, publish=tx.publish, tally=tally
        )
        for step in await store.watched_steps():
            monitor.live.watch(handlers.canary_step(step))
        # Before the replay, which collects their traffic from their own start, as memory did before the stop.
        for early in await store.kept_steps():
            monitor.live.keep(handlers.kept_step(early))
        monitor.live.pending_labels = await store.pending_labels()
        # Labels joined within the label wait: predictions of their id and model consumed from now on (or
        # replayed, and not joined before the stop) are joined with them too.
        since = monitor.now() - monitor.label_wait_seconds
        monitor.live.remember_joined(
            (
                ((pid, model), epoch(received) + monitor.label_wait_seconds, shadowed)
                for pid, model, received, shadowed in await store.labels_joined_since(from_epoch(since))
            ),
            bound=monitor.live.cache.max_rows,
        )
        replay_from = await store.replay_offsets(monitor.predictions_topic)
    settings = cast(MonitoringSettings, rt.settings)
    if settings.replay_on_start and replay_from:
        now = monitor.now()

        def feed(requests: Sequence[Request]) -> None:
            result = monitor.live.ingest(requests, arrival=now, replaying=True)
            # The joins due before the stop were in memory only (their polls committed): the labels still
            # waiting for a replayed prediction are joined at the first tick.
            monitor.live.joins_due.update(result.pending_matches)

        monitor.replay = await replay_predictions(
            settings.kafka,
            topic=settings.predictions_topic,
            group=f"{settings.consumer_group}-predictions",
            start=replay_from,
            registry=rt.registry,
            feed=feed,
            deadline_s=settings.replay_deadline_seconds,
        )


class PlanRetention(Protocol):
    """Per model, the cutoff of a round of a table's retention (handlers.plan_labelled_retention, ...)."""

    async def __call__(self, *, monitor: Monitor, store: MonitoringStore) -> list[tuple[str, datetime]]: ...


@dataclass
class RetentionRound:
    """A table's retention as the background runs it: a round every ``retention_interval_s``, model by model,
    a batch per tick."""

    name: str
    """What the log lines call the table."""
    plan: PlanRetention
    prune: Callable[[str, datetime, datetime, MonitoringStore], Awaitable[tuple[int, datetime | None]]]
    """One batch of a model: (model, cutoff, where it starts, store) -> (deleted, next batch's start)."""
    pruned: Counter
    failures: Counter
    due: float = 0.0
    """When the next round starts (``Monitor.now``); the first runs at the first tick."""
    left: list[tuple[str, datetime, datetime]] = field(default_factory=list)
    """The models the round in progress has left: cutoff, next batch's start."""
    deleted: int = 0


class Background:
    """Judges closed windows and decides canary steps (one transaction each), and runs the housekeeping
    every tick; and, every ``retention_interval_s`` (None: never), a round of the retention of joined labels,
    one of window reports and one of alerts, a batch of each per tick."""

    def __init__(
        self,
        rt: Runtime,
        monitor: Monitor,
        tick_s: float,
        *,
        retention_interval_s: float | None = None,
        retention_batch_rows: int = RETENTION_BATCH_ROWS,
    ) -> None:
        self.rt = rt
        self.monitor = monitor
        self.tick_s = tick_s
        self.retention_interval_s = retention_interval_s
        self.retention_batch_rows = retention_batch_rows
        self.labelled_retention = RetentionRound(
            "labelled",
            handlers.plan_labelled_retention,
            self._prune_labelled,
            LABELLED_ROWS_PRUNED,
            LABELLED_PRUNING_FAILURES,
        )
        self.reports_retention = RetentionRound(
            "window reports",
            handlers.plan_report_retention,
            self._prune_reports,
            WINDOW_REPORTS_PRUNED,
            WINDOW_REPORTS_PRUNING_FAILURES,
        )
        self.alerts_retention = RetentionRound(
            "alerts",
            handlers.plan_alert_retention,
            self._prune_alerts,
            ALERTS_PRUNED,
            ALERTS_PRUNING_FAILURES,
        )
        self.wake = asyncio.Event()
        self.stopping = False
        self.failed_task: str | None = None
        """The task the last failed tick failed in, for its log line."""
        monitor.on_windows_closed = self.wake.set
        monitor.on_joins_due = self.wake.set

    async def judge_closed(self) -> None:
        """Judge the closed windows in order, one transaction each.

        An outage (``is_transient``) leaves the window at the head of the queue for the next tick. Any other
        error would fail the same way on every tick and hold up every window, verdict and replay offset
        behind it, so that window is set aside: stored as done (unjudged), logged as an error, and counted.
        A window closed with too few rows to judge (``ClosedWindow.too_few_rows``) is set aside as well.
        """
        live = self.monitor.live
        while live.closed:
            window = live.closed[0]
            if window.too_few_rows:
                await self.set_aside(window)
                live.closed.popleft()
                continue
            try:
                async with self.rt.begin() as tx:
                    tally = handlers.Tally()
                    await handlers.judge_closed_window(
                        window,
                        monitor=self.monitor,
                        store=PgMonitoringStore(tx.conn),
                        publish=tx.publish,
                        tally=tally,
                    )
                    tx.after_commit(tally.count)
            except Exception as exc:
                if is_transient(exc):
                    raise
                await self.set_aside(window, exc)
            live.closed.popleft()

    async def set_aside(self, window: ClosedWindow, exc: Exception | None = None) -> None:
        """Store the window as done in a transaction of its own (the judgement's, if any, was rolled back),
        then log and count it: ``exc`` is what its judgement failed with, None for a window with too few rows
        to judge. An outage raises before the count: the window stays queued and is counted once, when the
        next tick sets it aside again."""

        async def store_as_done(tx: Transaction) -> bool:
            await handlers.set_window_aside(window, monitor=self.monitor, store=PgMonitoringStore(tx.conn))
            return True

        where = {"model": window.model, "version": window.version, "window_id": window.window_id}
        stored = await self.settle(
            store_as_done, "window set aside but not stored as done: a restart may rebuild it", where
        )
        if exc is None:
            WINDOWS_TOO_FEW_ROWS.labels(window.model).inc()
            log.warning(
                "window set aside: too few rows to judge, and its version got no traffic since",
                **where,
                rows=window.size,
                reason=f"fewer than min_window_rows ({self.monitor.live.window_settings.min_rows:,}) rows "
                f"and no traffic for label_wait_seconds ({self.monitor.label_wait_seconds:,.0f} s)",
                hint="a version no longer served (a canary rolled back, a version replaced); kept open, its "
                "window would hold a restart's replay back to its first row",
                stored_as_done=stored,
            )
            return
        WINDOWS_SET_ASIDE.labels(window.model, type(exc).__name__).inc()
        log.error(
            "window set aside: its judgement failed and retrying cannot help",
            **where,
            rows=window.size,
            stored_as_done=stored,
            error=repr(exc),
        )

    async def settle(
        self, work: Callable[[Transaction], Awaitable[bool]], failed: str, where: dict[str, Any]
    ) -> bool:
        """What ``work`` returns, run in a transaction of its own, for something set aside; an outage raises
        (it is set aside again on the next tick), any other error is logged as ``failed`` and gives False."""
        try:
            async with self.rt.begin() as tx:
                return await work(tx)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.error(failed, **where, error=repr(exc))
            return False

    async def join_due(self) -> None:
        """Join the waiting labels of held predictions (see ``LiveState.joins_due``), all in one transaction.

        An outage raises: they stay due for the next tick. After any other error they are made again one per
        transaction, and one that fails again is given up (logged and counted): a waiting label waits on in
        Postgres and expires as unmatched, one joined before keeps its joins, and the joins and the
        housekeeping behind it go on."""
        due = self.monitor.live.joins_to_make()
        if not due:
            return
        try:
            await self.join(due)
            return
        except Exception as exc:
            if is_transient(exc):
                raise
            log.warning("label joins failed, isolating the failing one", labels=len(due), error=repr(exc))
        for pair in due:
            try:
                await self.join([pair])
            except Exception as exc:
                if is_transient(exc):
                    raise
                self.give_up_join(pair, exc)

    async def join(self, due: list[tuple[str, str]]) -> None:
        """Make these joins, (prediction id, model), in a transaction of their own; they leave memory once it
        commits."""
        live = self.monitor.live
        live.settle_begins()
        async with self.rt.begin() as tx:
            tally = handlers.Tally()
            joined = await handlers.join_pending(
                due, monitor=self.monitor, store=PgMonitoringStore(tx.conn), publish=tx.publish, tally=tally
            )
            tx.after_commit(tally.count)
        # Only now that they are committed. A join not made (the label's transaction had not committed yet)
        # stays due while the label waits in memory.
        settled = live.labels_settled(joined)
        live.joins_due.difference_update(settled)

    def give_up_join(self, pair: tuple[str, str], exc: Exception) -> None:
        """Stop trying a join that failed for good; log and count it."""
        live = self.monitor.live
        live.joins_due.discard(pair)
        prediction_id, model = pair
        LABEL_JOINS_GIVEN_UP.labels(model).inc()
        if pair in live.pending_labels:
            log.error(
                "label join given up: joining it failed and retrying cannot help; the waiting label expires "
                "as unmatched",
                label="waiting",
                prediction_id=prediction_id,
                model=model,
                error=repr(exc),
            )
            return
        # A label joined before, to the predictions of its id then held (the served row): the join that failed
        # is to those consumed since (a shadow candidate's scoring), which go without it.
        log.error(
            "label join given up: joining it to the predictions consumed since it joined (a shadow "
            "candidate's scoring) failed and retrying cannot help; those go without it, the predictions it "
            "joined before keep it",
            label="joined before",
            prediction_id=prediction_id,
            model=model,
            error=repr(exc),
        )

    async def decide_canaries(self, now: float) -> None:
        """Give each watched step its verdict once due, one transaction each.

        An outage (``is_transient``) raises: the step stays watched and the tick is retried. Any other error
        would fail the same way on every tick, and the rollout would wait for ever for its verdict, so that
        step is set aside: given an inconclusive verdict saying it could not be judged, logged as an error,
        and counted.
        """
        live = self.monitor.live
        for step in list(live.steps.values()):
            if not canary_due(step, now, self.monitor.canary):
                continue  # no transaction for a step still waiting for its samples and bake time
            try:
                async with self.rt.begin() as tx:
                    tally = handlers.Tally()
                    decided = await handlers.check_canary(
                        step,
                        now,
                        monitor=self.monitor,
                        store=PgMonitoringStore(tx.conn),
                        publish=tx.publish,
                        tally=tally,
                    )
                    tx.after_commit(tally.count)
            except Exception as exc:
                if is_transient(exc):
                    raise
                await self.set_step_aside(step, now, exc)
                decided = True
            # Only now that the verdict is committed: a failed transaction leaves the step watched, as it
            # still is in Postgres.
            if decided:
                live.unwatch(step.rollout_id, step.step_index)

    async def set_step_aside(self, step: CanaryStep, now: float, exc: Exception) -> None:
        """Give the step its inconclusive verdict in a transaction of its own (the decision's was rolled
        back), then log and count it. An outage raises before the count: the step stays watched and is
        counted once, when the next tick sets it aside again."""

        async def give_verdict(tx: Transaction) -> bool:
            tally = handlers.Tally()
            given = await handlers.set_step_aside(
                step,
                now,
                exc,
                monitor=self.monitor,
                store=PgMonitoringStore(tx.conn),
                publish=tx.publish,
                tally=tally,
            )
            tx.after_commit(tally.count)
            return given

        where = {"rollout_id": step.rollout_id, "step": step.step_index, "model": step.model}
        given = await self.settle(
            give_verdict,
            "canary step set aside but no verdict given: its rollout waits until rolled back by hand "
            "(or a restart decides the step again)",
            where,
        )
        CANARY_STEPS_SET_ASIDE.labels(step.model, type(exc).__name__).inc()
        log.error(
            "canary step set aside: its decision failed and retrying cannot help",
            **where,
            stable_version=step.stable_version,
            canary_version=step.canary_version,
            verdict_given=given,
            error=repr(exc),
        )

    async def housekeeping(self, now: float) -> None:
        """Expire what is due (waiting labels, old state) in one transaction."""
        self.monitor.live.settle_begins()
        async with self.rt.begin() as tx:
            tally = handlers.Tally()
            expired = await handlers.housekeeping(
                now, monitor=self.monitor, store=PgMonitoringStore(tx.conn), tally=tally
            )
            tx.after_commit(tally.count)
        # Only now that the expiries are committed: a failed transaction leaves the labels waiting, as they
        # still are in Postgres.
        self.monitor.live.labels_settled(expired)

    async def prune_labelled(self, now: float) -> None:
        """One batch of the joined labels' retention, when a round is due or in progress."""
        await self.retention_batch(self.labelled_retention, now)

    async def prune_window_reports(self, now: float) -> None:
        """One batch of the window reports' retention, when a round is due or in progress."""
        await self.retention_batch(self.reports_retention, now)

    async def prune_alerts(self, now: float) -> None:
        """One batch of the alerts' retention, when a round is due or in progress."""
        await self.retention_batch(self.alerts_retention, now)

    async def _prune_labelled(
        self, model: str, before: datetime, start: datetime, store: MonitoringStore
    ) -> tuple[int, datetime | None]:
        return await handlers.prune_labelled(
            model,
            before,
            received_from=start,
            monitor=self.monitor,
            store=store,
            limit=self.retention_batch_rows,
        )

    async def _prune_reports(
        self, model: str, before: datetime, start: datetime, store: MonitoringStore
    ) -> tuple[int, datetime | None]:
        return await handlers.prune_window_reports(
            model, before, judged_from=start, store=store, limit=self.retention_batch_rows
        )

    async def _prune_alerts(
        self, model: str, before: datetime, start: datetime, store: MonitoringStore
    ) -> tuple[int, datetime | None]:
        return await handlers.prune_alerts(
            model, before, created_from=start, store=store, limit=self.retention_batch_rows
        )

    async def retention_batch(self, retention: RetentionRound, now: float) -> None:
        """One batch of a table's retention, in a transaction of its own, when a round is due or in progress:
        a batch per tick, so that a first round over a table that grew for months never holds the tick's
        other work (or a lock) long. A failure is logged as a warning and counted, never raised: the round is
        dropped and the next starts ``retention_interval_s`` later, the rows staying meanwhile."""
        if self.retention_interval_s is None or (not retention.left and now < retention.due):
            return
        try:
            if not retention.left:
                async with self.rt.begin() as tx:
                    plan = await retention.plan(monitor=self.monitor, store=PgMonitoringStore(tx.conn))
                retention.left = [(model, before, EARLIEST) for model, before in plan]
                retention.deleted = 0
            if retention.left:
                model, before, start = retention.left[0]
                async with self.rt.begin() as tx:
                    deleted, next_from = await retention.prune(
                        model, before, start, PgMonitoringStore(tx.conn)
                    )
                retention.pruned.inc(deleted)
                retention.deleted += deleted
                if next_from is None:
                    retention.left.pop(0)
                else:
                    retention.left[0] = (model, before, next_from)
        except Exception as exc:
            retention.failures.inc()
            log.warning(
                f"{retention.name} retention failed, trying again later",
                error=repr(exc),
                in_s=self.retention_interval_s,
            )
            retention.left = []
            retention.due = now + self.retention_interval_s
            return
        if not retention.left:
            if retention.deleted:
                log.info(f"{retention.name} retention deleted rows", rows=retention.deleted)
            retention.due = now + self.retention_interval_s

    async def once(self) -> None:
        """One tick: each task in turn; the first that fails ends the tick (counted by its name)."""
        await self.task("judge_closed", self.judge_closed)
        await self.task("join_due", self.join_due)
        now = await self.task("read_clock", self.read_clock)
        await self.task("decide_canaries", lambda: self.decide_canaries(now))
        await self.task("housekeeping", lambda: self.housekeeping(now))
        await self.task("judge_closed", self.judge_closed)
        await self.prune_labelled(now)
        await self.prune_window_reports(now)
        await self.prune_alerts(now)

    async def read_clock(self) -> float:
        """Postgres' clock, read once a tick, what the tick decides by; the handlers between ticks take it as
        this host's clock plus the offset learned here (``Monitor.now``)."""
        async with self.rt.begin() as tx:
            return self.monitor.learn_clock(await PgMonitoringStore(tx.conn).now())

    async def task(self, name: str, work: Callable[[], Awaitable[T]]) -> T:
        """Run one task of a tick, giving what it returns; a failure is counted by the task and its cause,
        then raised for :meth:`run` to retry the tick."""
        try:
            return await work()
        except Exception as exc:
            BACKGROUND_FAILURES.labels(name, "outage" if is_transient(exc) else "error").inc()
            self.failed_task = name
            raise

    async def run(self) -> None:
        delay = self.tick_s
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=delay)
            self.wake.clear()
            if self.stopping:
                return
            try:
                await self.once()
                delay = self.tick_s
            except Exception as exc:  # the database may be away: keep the work queued and retry
                where = {"task": self.failed_task, "error": repr(exc)}
                if is_transient(exc):
                    log.warning("monitoring housekeeping failed, retrying", **where)
                else:
                    log.error("monitoring housekeeping failed, not for an outage; retrying", **where)
                delay = min(max(delay * 2, self.tick_s), 10.0)

    async def stop(self) -> None:
        self.stopping = True
        self.wake.set()


def _bind_batch(
    handler: Callable[..., Awaitable[None]], monitor: Monitor, *, tallied: bool = False
) -> Callable[[Sequence[Delivery], Transaction], Awaitable[None]]:
    async def run(deliveries: Sequence[Delivery], tx: Transaction) -> None:
        deps: dict[str, Any] = {
            "monitor": monitor,
            "store": PgMonitoringStore(tx.conn),
            "publish": tx.publish,
        }
        if tallied:
            deps["tally"] = _tally_for(tx)
        await handler(deliveries, **deps)

    return run


def _bind(
    handler: Callable[..., Awaitable[None]],
    monitor: Monitor,
    *,
    tallied: bool = False,
    publishing: bool = False,
) -> Callable[[CloudEvent[Any], Transaction], Awaitable[None]]:
    async def run(event: CloudEvent[Any], tx: Transaction) -> None:
        deps: dict[str, Any] = {"monitor": monitor, "store": PgMonitoringStore(tx.conn)}
        if publishing:
            deps["publish"] = tx.publish
        if tallied:
            deps["tally"] = _tally_for(tx)
        await handler(event, **deps)

    return run


def _tally_for(tx: Transaction) -> handlers.Tally:
    """A tally whose counts are made once ``tx`` commits, never for a run the bus rolls back and replays (a
    refused event changed nothing: its counts are dropped with its transaction)."""
    tally = handlers.Tally()
    tx.after_commit(tally.count)
    return tally


def subscriptions(settings: MonitoringSettings, monitor: Monitor) -> list[Subscription]:
    """Predictions and labels in batches (high volume); models and rollouts one event at a time."""
    common = settings.consumer_limits()
    group = settings.consumer_group
    return [
        Subscription(
            consumer=f"{group}-control",
            topics=[settings.models_topic, settings.rollouts_topic],
            handlers={
                ModelVersionRegistered: _bind(handlers.on_model_version_registered, monitor),
                RolloutStarted: _bind(handlers.on_rollout_started, monitor, tallied=True, publishing=True),
                RolloutStepAdvanced: _bind(
                    handlers.on_rollout_step_advanced, monitor, tallied=True, publishing=True
                ),
                RolloutPromoted: _bind(handlers.on_rollout_finished, monitor, tallied=True),
                RolloutRolledBack: _bind(handlers.on_rollout_finished, monitor, tallied=True),
            },
            **common,
        ),
        Subscription(
            consumer=f"{group}-predictions",
            topics=[settings.predictions_topic],
            batch_handler=_bind_batch(handlers.on_predictions_logged, monitor),
            # The reader hands the payload over as columns (PredictionColumns), never as row objects;
            # a record it cannot prove valid is validated fully and comes as a PredictionsLogged.
            batch_types=frozenset({PredictionsLogged, cast(type[EventPayload], PredictionColumns)}),
            readers=READERS,
            **common,
        ),
        Subscription(
            consumer=f"{group}-feedback",
            topics=[settings.feedback_topic],
            batch_handler=_bind_batch(handlers.on_ground_truth_received, monitor, tallied=True),
            batch_types=frozenset({GroundTruthReceived}),
            **common,
        ),
    ]


async def build(rt: Runtime) -> ServiceParts:
    """Restore state, rebuild memory from the predictions topic, then hand over consumers and the API."""
    settings = cast(MonitoringSettings, rt.settings)
    artifacts = StoreArtifacts(ArtifactStore(settings.artifacts_url))
    monitor = make_monitor(settings, artifacts, rt.source())
    await restore(rt, monitor)
    background = Background(
        rt, monitor, settings.tick_seconds, retention_interval_s=settings.bus_retention_interval_s
    )
    app = create_app(
        settings,
        title="driftloop monitoring",
        description="Drift, labelled performance and canary verdicts from live traffic.",
        routers=[api.router],
        ready=rt.ready,
    )
    app.state.runtime = rt
    app.state.monitor = monitor
    return ServiceParts(
        app=app,
        subscriptions=subscriptions(settings, monitor),
        tasks=[background.run],
        on_stop=[background.stop],
    )
