"""Monitoring's handlers: one plain async function per event type, plus the time-driven work (judging
closed windows, bake times, timeouts). Shared state comes in through :class:`Monitor`; the database and
the artifact store through the ports."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from typing import Any

from prometheus_client import Counter

from contracts.common import Task, TrafficWindow
from contracts.envelope import CloudEvent, new_event
from contracts.feedback import GroundTruthReceived
from contracts.models import ModelVersionRegistered
from contracts.monitoring import (
    CanaryComparison,
    CanaryVerdict,
    DataQualityIssue,
    DataQualityIssueKind,
    DriftDetected,
    DriftPolicyChanged,
    PerformanceDegraded,
    Verdict,
)
from contracts.predictions import PredictionColumns, PredictionsLogged
from contracts.rollouts import RolloutPromoted, RolloutRolledBack, RolloutStarted, RolloutStepAdvanced
from libs.artifacts import frame_to_parquet
from libs.bus import Delivery, EventTooLarge, PermanentError, bytes_over_limit
from libs.bus.retention import keep_period
from libs.errors import InvalidInput
from libs.logging import get_logger
from services.monitoring import export
from services.monitoring.domain import (
    EARLIEST,
    STATUS_ALERTS_PER_MODEL,
    CanaryDecision,
    CanaryPolicy,
    CanaryStep,
    ClosedWindow,
    DebounceState,
    DriftPolicy,
    LabelledComparison,
    LabelledRow,
    ModelReference,
    ReportPosition,
    WindowJudgement,
    absolute_errors,
    canary_ready,
    canary_timed_out,
    cut_evidence,
    debounce,
    degradations,
    epoch,
    from_epoch,
    in_cooldown,
    judge_canary,
    judge_window,
    labelled_keep,
    labels_outside_classes_note,
    least_evidence,
    metric_standard_errors,
    outside_classes,
    performance_metrics,
    quality_issues,
    regression_pairs,
    regression_value,
    report_cursor,
    same_label,
    shown_classes,
    shown_metric,
    shown_name,
    shown_value,
    unscorable,
)
from services.monitoring.live import SHADOW, LabelJoined, LiveState, Warned
from services.monitoring.ports import (
    Artifacts,
    EarlyStep,
    LabelledRecord,
    MonitoringStore,
    PendingLabel,
    ProfileUnavailable,
    ReplayReport,
    StoredModel,
    StoredPolicy,
    StoredStep,
    WindowState,
)

log = get_logger(__name__)

UNSCORABLE = Counter(
    "driftloop_monitoring_unscorable_labels_total",
    "Labelled rows a regression model's metrics left out (performance windows and canary comparisons) "
    "because the prediction or the label is no number, e.g. labels stored before such labels were refused.",
    ["model"],
)

PERFORMANCE_UNMEASURABLE = Counter(
    "driftloop_monitoring_performance_windows_unmeasurable_total",
    "Performance windows whose metrics are beyond a double (a regression model's prediction and label so far "
    "apart that their error is, e.g. 1e308 against -1e308): scored without a verdict, logged as a warning, "
    "the degraded-window streak left as it was, so the windows after them are judged.",
    ["model"],
)

LABELS_CORRECTED = Counter(
    "driftloop_monitoring_labels_corrected_total",
    "Labels that replaced the different label a prediction was joined with before (a correction): the stored "
    "label is the latest; performance windows scored and verdicts given with the earlier one stand.",
    ["model"],
)

LABELS_OUTSIDE_CLASSES = Counter(
    "driftloop_monitoring_labels_outside_classes_total",
    "Labels joined to a classifier's prediction that name none of the version's classes (e.g. \"yes\" for "
    "the classes 0 and 1: an encoding mistake, or a class the model never learned): counted as wrong "
    "predictions in accuracy and F1, and logged as a warning (at most once a minute per model version).",
    ["model", "version"],
)

PREDICTIONS_AHEAD = Counter(
    "driftloop_monitoring_predictions_ahead_of_clock_total",
    "Predictions dated further ahead of when monitoring consumed them than max_clock_skew_seconds (a serving "
    "replica's clock ahead): windowed, counted toward rollout steps and kept for their labels as if dated "
    "that far ahead, so that their window closes by time, and they leave the label cache, and let the replay "
    "offsets move on, in time; their dates are kept as sent (window file, joined labels).",
    ["model"],
)

PREDICTIONS_PAST_LABEL_WAIT = Counter(
    "driftloop_monitoring_predictions_past_label_wait_total",
    "Predictions dated further back than label_wait_seconds when monitoring consumed them (a backlog caught "
    "up, a serving replica's clock behind): in their drift windows as any, joined to the labels already "
    "waiting for them, but not held for labels that come later (those expire as unmatched, as any label for "
    "a prediction older than the label wait); logged as a warning once per model.",
    ["model"],
)

STEP_PREDICTIONS_NOT_KEPT = Counter(
    "driftloop_monitoring_rollout_step_predictions_not_kept_total",
    "Predictions of a rollout step (watched, or kept for its rollout's start) sampled out: past "
    "canary_step_max_rows on their variant, the step holds the scores, predicted values and latencies of a "
    "uniform random sample of its rows and requests, and the verdict's comparisons are over that; the others "
    "count toward min_samples and the verdict's samples only. Logged as a warning once per step.",
    ["model"],
)

ROLLOUT_STEPS_AHEAD = Counter(
    "driftloop_monitoring_rollout_steps_ahead_of_clock_total",
    "Rollout steps (RolloutStarted, RolloutStepAdvanced) dated further ahead of when monitoring handled "
    "them than max_clock_skew_seconds (a serving replica's clock ahead): watched as if they started that "
    "far ahead, so that their time range takes the canary's traffic and their timeout passes; logged as a "
    "warning. A model with no version registered is counted as model _unregistered.",
    ["model"],
)

LABELS_NOT_KEPT = Counter(
    "driftloop_monitoring_labels_not_kept_total",
    "Labels no prediction was found for and that were not kept waiting for one, by reason: unknown-model "
    "(no version of the model the label names is registered here, so no prediction of it is held: counted "
    "and skipped as its predictions are, logged once per model), too-many-waiting (more than "
    "max_pending_labels labels were waiting: the ones waiting longest are given up as if their wait had "
    "ended, counted as unmatched for their model, logged at most once a minute).",
    ["reason"],
)
UNKNOWN_MODEL = "unknown-model"
TOO_MANY_WAITING = "too-many-waiting"

TOO_MANY_WAITING_WARNING_EVERY_S = 60.0
"""At most one warning this often about waiting labels given up past ``max_pending_labels``."""

WINDOWS_JUDGED = Counter(
    "driftloop_monitoring_windows_judged_total",
    "Drift windows judged, by outcome: alerted (a DriftDetected raised), held-back (features drifted but the "
    "debounce held the alert back: not yet consecutive_windows in a row, under share_threshold, or within "
    "the cooldown), no-drift. Counted once the judgement commits; windows set aside unjudged are counted in "
    "driftloop_monitoring_windows_set_aside_total and "
    "driftloop_monitoring_windows_too_few_rows_set_aside_total.",
    ["model", "outcome"],
)
ALERTED = "alerted"
HELD_BACK = "held-back"
NO_DRIFT = "no-drift"

ALERTS_RAISED = Counter(
    "driftloop_monitoring_alerts_raised_total",
    "Alerts published, by kind (DriftDetected, DataQualityIssue, PerformanceDegraded), counted once the "
    "transaction that publishes them commits.",
    ["model", "kind"],
)

CANARY_VERDICTS = Counter(
    "driftloop_monitoring_canary_verdicts_total",
    "Canary verdicts given (one per rollout step), by verdict: healthy, unhealthy, inconclusive (a timeout, "
    "a step set aside or not watched included). Counted once the verdict commits. A model with no version "
    "registered is counted as model _unregistered.",
    ["model", "verdict"],
)

STEPS_NOT_WATCHED = Counter(
    "driftloop_monitoring_rollout_steps_decided_unwatched_total",
    "Rollout steps given their one verdict, inconclusive, at once and never watched, because "
    "max_watched_rollout_steps rollouts had a step watched already: the step of a RolloutStarted or "
    "RolloutStepAdvanced that would have watched one more, or, at a restart, a step watched beyond the first "
    "max_watched_rollout_steps started (rows from before the bound, or a bound lowered). Serving rolls the "
    "canary back; logged as an error at most once a minute (a restart's, once). A model with no version "
    "registered is counted as model _unregistered.",
    ["model"],
)

STEPS_NOT_WATCHED_LOG = (
    "rollout step not watched: max_watched_rollout_steps rollouts have a step watched, it is given an "
    "inconclusive verdict at once"
)
STEPS_NOT_WATCHED_WARNING_EVERY_S = 60.0
"""At most one error this often about rollout steps decided unwatched past ``max_watched_steps``: a flood of
rollouts (the bus does not authenticate a publisher) would otherwise log a line per event."""


def not_watched_reason(most: int) -> str:
    """The reason of the inconclusive verdict of a step not watched because ``most`` rollouts have one."""
    rollouts = f"{most:,} rollouts have" if most != 1 else "1 rollout has"
    return (
        f"not watched: {rollouts} a step watched, the most monitoring watches at once "
        "(max_watched_rollout_steps)"
    )


def not_watched_at_start_reason(most: int) -> str:
    """The reason of the inconclusive verdict a restart gives a step watched beyond the first ``most``."""
    return (
        f"not watched: at a restart more rollouts had a step watched than the {most:,} monitoring watches at "
        "once (max_watched_rollout_steps), and this one started later"
    )


UNREGISTERED_MODEL = "_unregistered"
"""The ``model`` label of a rollout's series whose model has no version registered here: a rollout event may
name any model (the bus does not authenticate a publisher), and a series per name grew ``/metrics`` and memory
(~1.2 KB each) for the life of the process. No model is named so (a name begins with a letter or a digit)."""


def series_model(model: str, monitor: Monitor) -> str:
    """The ``model`` label of a rollout event's series: the model, if a version of it is registered."""
    return model if model in monitor.live.models else UNREGISTERED_MODEL


OUTSIDE_CLASSES_WARNING_EVERY_S = 60.0
"""At most one warning per model version this often about labels outside its classes (a whole feed of them
would otherwise log a line per poll)."""

Publish = Callable[[CloudEvent[Any]], Awaitable[None]]
PREDICTIONS_TOPIC = PredictionsLogged.topic


class Tally:
    """The counts and memory changes one transaction's work makes, made once it commits (``count``, which
    the caller passes to ``Transaction.after_commit``): the bus replays a poll whose group commit failed one
    event per transaction, and a tick retries a step whose transaction failed, so the same work may run more
    than once for one committed effect; counted as it ran, a label in a failed poll was counted once per
    run."""

    def __init__(self) -> None:
        self._counts: list[tuple[Counter, tuple[str, ...], float]] = []
        self._then: list[Callable[[], None]] = []

    def add(self, counter: Counter, *labels: str, amount: float = 1.0) -> None:
        """Count ``amount`` in ``counter`` once committed."""
        self._counts.append((counter, labels, amount))

    def then(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once committed (memory that must follow only what Postgres holds)."""
        self._then.append(callback)

    def count(self) -> None:
        """The transaction committed: make the counts and the changes (once: a second call does nothing)."""
        counts, self._counts = self._counts, []
        callbacks, self._then = self._then, []
        for counter, labels, amount in counts:
            counter.labels(*labels).inc(amount)
        for callback in callbacks:
            callback()


@dataclass
class Monitor:
    """What every handler shares: the in-memory state, the defaults, the artifact store, the clock."""

    live: LiveState
    defaults: DriftPolicy
    canary: CanaryPolicy
    artifacts: Artifacts
    source: str
    performance_window_labels: int = 200
    export_labelled_rows: int = 50_000
    label_wait_seconds: float = 86_400.0
    labelled_keep_days: float = 30.0
    """How long joined labels are kept at least (``MonitoringSettings.labelled_keep_days``; 0: for ever)."""
    window_reports_keep_days: float = 90.0
    """How long window reports are kept (``MonitoringSettings.window_reports_keep_days``; 0: for ever)."""
    rollout_start_wait_seconds: float = 86_400.0
    """How long a step that came before its rollout's start is kept for it."""
    max_kept_steps: int = 100
    """How many such steps are kept at once: one more gives up the one kept longest."""
    max_pending_labels: int = 500_000
    """How many labels wait for their prediction at most: past it, the ones waiting longest are given up."""
    max_watched_steps: int = 100
    """How many rollouts have a step watched at once: the step of an event that would watch one more is given
    an inconclusive verdict at once instead."""
    max_event_bytes: int = 1_000_000
    """What consumers accept (``KafkaSettings.max_event_bytes``): a DriftDetected larger is cut to fit."""
    quality_issues_per_kind: int = 10
    """More features than this with the same kind of finding in a window make one grouped DataQualityIssue."""
    predictions_topic: str = PREDICTIONS_TOPIC
    """The topic the live consumer reads predictions from (``MonitoringSettings.predictions_topic``): its
    replay offsets are saved under this name, where a restart looks them up."""
    clock: Callable[[], float] = field(default=lambda: __import__("time").time())
    """This host's clock (epoch seconds). Monitoring decides by Postgres' clock (:meth:`now`), this one plus
    the offset the background learns each tick."""
    clock_offset: float = 0.0
    """How far Postgres' clock is ahead of ``clock`` (seconds; negative: behind), as last read."""
    policies: dict[str, DriftPolicy] = field(default_factory=dict)
    policy_versions: dict[str, int] = field(default_factory=dict)
    """The stored version of each policy in ``policies`` taken from the store (see :meth:`hold_policy`)."""
    policies_fingerprint: str | None = None
    replay: ReplayReport | None = None
    """What the restart's replay of the predictions topic read and missed; None when none ran."""
    ahead_of_clock_warned: Warned[str] = field(default_factory=Warned)
    """Models whose predictions dated ahead of the clock were logged (once per model remembered)."""
    past_label_wait_warned: Warned[str] = field(default_factory=Warned)
    """Models whose predictions dated further back than the label wait were logged (once per model
    remembered)."""
    outside_classes_warned: Warned[tuple[str, int]] = field(
        default_factory=lambda: Warned(every_s=OUTSIDE_CLASSES_WARNING_EVERY_S)
    )
    """When labels outside a model version's classes were last logged (:meth:`now` time)."""
    unknown_label_models_warned: Warned[str] = field(default_factory=Warned)
    """Models with no version registered whose labels were logged (once per model remembered)."""
    too_many_waiting_warned: Warned[str] = field(
        default_factory=lambda: Warned(every_s=TOO_MANY_WAITING_WARNING_EVERY_S)
    )
    """When waiting labels given up past ``max_pending_labels`` were last logged (:meth:`now` time)."""
    steps_not_watched_warned: Warned[str] = field(
        default_factory=lambda: Warned(every_s=STEPS_NOT_WATCHED_WARNING_EVERY_S)
    )
    """When rollout steps decided unwatched past ``max_watched_steps`` were last logged (:meth:`now` time)."""
    on_windows_closed: Callable[[], None] = field(default=lambda: None)
    on_joins_due: Callable[[], None] = field(default=lambda: None)

    def now(self) -> float:
        """Postgres' clock (epoch seconds), as this host's plus the offset last read, without a query: what
        monitoring decides by (a step's bake time, timeout and label grace, expiries, retention). Serving
        times a step's bake time, and Postgres stamps the labels, on Postgres' clock: on this host's, a
        process restarted on a host ahead (the step learned of by the one before), or a clock stepped forward,
        gave a step its one verdict before its bake time passed there (ignored as premature), and a clock more
        than ``canary_label_grace_seconds`` ahead judged steps without waiting for the labels coming."""
        return self.clock() + self.clock_offset

    def learn_clock(self, database_now: datetime) -> float:
        """Take Postgres' clock as read now (``MonitoringStore.now``, once a tick); returns it as epoch
        seconds, the tick's ``now``."""
        at = epoch(database_now)
        self.clock_offset = at - self.clock()
        return at

    def policy(self, model: str) -> DriftPolicy:
        """The model's policy, or the defaults."""
        return self.policies.get(model, self.defaults)

    def hold_policy(self, model: str, stored: StoredPolicy) -> bool:
        """Put in force a policy set through this replica, once committed, unless a later setting of the model
        is held already; whether it was put. Two settings at once commit in turn (the model's policy lock),
        but their requests may go on in either order: the first's policy replaced the second's until the next
        tick's reload. A later setting a tick took from the store is kept the same way."""
        if stored.version <= self.policy_versions.get(model, 0):
            return False
        self.policies[model] = stored.policy
        self.policy_versions[model] = stored.version
        return True


# --- models ------------------------------------------------------------------------------------------------


async def on_model_version_registered(
    event: CloudEvent[ModelVersionRegistered], *, monitor: Monitor, store: MonitoringStore
) -> None:
    """Remember the version and prepare its reference profile for window judgements. A version registered
    before as another model (another profile or signature) is dead-lettered: it is judged as first
    registered, as serving and validation keep it."""
    p = event.data
    stored = StoredModel(p.model, p.model_version, p.signature, dict(p.metrics), p.profile)
    if not await store.save_model(stored):
        held = await store.model(p.model, p.model_version)
        if held is not None and (other := _registered_otherwise(held, stored)):
            raise PermanentError(
                f"{p.model} version {p.model_version} is registered with another {other}; this "
                f"{event.type} {event.id} (run {p.run_id}) contradicts it: a version is one model, and "
                "monitoring judges it as first registered"
            )
        if (p.model, p.model_version) in monitor.live.references:
            # Registered before (another event id): Postgres keeps the version as first registered, and so
            # does memory. Loading this event's profile would judge with another reference than a restart
            # would, and a profile gone from the artifact store would dead-letter an event that changes
            # nothing.
            return
    try:
        await load_reference(stored, monitor=monitor, store=store)
    except ProfileUnavailable as exc:
        raise PermanentError(str(exc)) from exc


def _registered_otherwise(held: StoredModel, stored: StoredModel) -> str | None:
    """What a registration of a known version says otherwise than the one monitoring keeps, or None."""
    if held.profile.key != stored.profile.key:
        return f"profile ({held.profile.key[:12]}…, this one {stored.profile.key[:12]}…)"
    # As JSON: pydantic's equality takes True for 1 (a class label, a category), which are different values.
    if held.signature.model_dump_json() != stored.signature.model_dump_json():
        return "signature"
    return None


async def load_reference(stored: StoredModel, *, monitor: Monitor, store: MonitoringStore) -> ModelReference:
    """Load a version's profile and open its window where the last judged one ended."""
    profile = await monitor.artifacts.profile(stored.profile)
    # In a thread: folding an old id-like profile's 200,000 levels (domain._as_kept_now) takes ~0.3 s, which
    # the event loop would otherwise stall for (its consumers, joins and HTTP) at every such version's load.
    ref = await asyncio.to_thread(
        ModelReference.build, stored.model, stored.version, stored.signature, stored.baseline, profile
    )
    state = await store.window_state(stored.model, stored.version)
    monitor.live.add_reference(ref, seq=state.next_seq, starts=state.starts)
    return ref


# --- predictions and labels --------------------------------------------------------------------------------


async def on_predictions_logged(
    deliveries: Sequence[Delivery], *, monitor: Monitor, store: MonitoringStore, publish: Publish
) -> None:
    """Add a poll's predictions to the windows (vectorised per model version); hand the joins of their
    waiting labels to the background.

    Nothing else happens in the poll's transaction: once its rows are in the windows, nothing can fail it for
    good (only an outage, and then its records are read again and recognised by offset). A label join that
    failed here would dead-letter the prediction event with its rows already counted, and replaying it would
    count them twice; in a transaction of its own, a join that fails for good is the label's alone."""
    requests = [
        (d.event.data, d.record.partition, d.record.offset)
        for d in deliveries
        if d.event is not None and isinstance(d.event.data, PredictionColumns | PredictionsLogged)
    ]
    live = monitor.live
    result = live.ingest(requests, arrival=monitor.now())
    for model in live.unknown_models_to_log(result.newly_unknown):
        versions = sorted({v for m, v in chain(live.unknown, result.unknown) if m == model})
        log.warning(
            "predictions for an unknown model or version are counted and skipped",
            model=model,
            versions=versions,
            hint="monitoring has no ModelVersionRegistered for it (yet)",
        )
    # Counted as ingested, not at commit: the rows are in memory now, and a poll read again after its
    # transaction failed is recognised by offset and not ingested (nor counted) again.
    for model, rows in sorted(result.ahead.items()):
        PREDICTIONS_AHEAD.labels(model).inc(rows)
        if monitor.ahead_of_clock_warned.due(model):
            log.warning(
                "predictions dated ahead of monitoring's clock: windowed and held for their labels as if "
                "dated max_clock_skew_seconds ahead",
                model=model,
                rows=rows,
                max_clock_skew_seconds=live.cache.max_ahead_s,
                hint="check the clocks of the serving replicas (NTP); "
                "driftloop_monitoring_predictions_ahead_of_clock_total counts such rows",
            )
    for model, rows in sorted(result.past.items()):
        PREDICTIONS_PAST_LABEL_WAIT.labels(model).inc(rows)
        if monitor.past_label_wait_warned.due(model):
            log.warning(
                "predictions dated further back than the label wait: joined to the labels waiting for them, "
                "not held for later ones",
                model=model,
                rows=rows,
                label_wait_seconds=live.cache.max_age_s,
                hint="monitoring is catching up on a backlog, or a serving replica's clock is behind; "
                "driftloop_monitoring_predictions_past_label_wait_total counts such rows",
            )
    for model, rows in sorted(result.step_rows_not_kept.items()):
        STEP_PREDICTIONS_NOT_KEPT.labels(model).inc(rows)
    for step in result.steps_full:
        log.warning(
            "rollout step's predictions beyond canary_step_max_rows are sampled: its verdict compares "
            "latency and predictions over a uniform random sample of the step's, the others are counted only",
            rollout_id=step.rollout_id,
            model=step.model,
            step=step.step_index,
            kept_for_start=live.kept.get(step.rollout_id) is step,
            canary_step_max_rows=live.step_max_rows,
            hint="driftloop_monitoring_rollout_step_predictions_not_kept_total counts such rows",
        )
    if result.pending_matches:
        live.joins_due.update(result.pending_matches)
        monitor.on_joins_due()
    if result.closed:
        monitor.on_windows_closed()


async def join_pending(
    due: list[tuple[str, str]], *, monitor: Monitor, store: MonitoringStore, publish: Publish, tally: Tally
) -> list[tuple[str, str]]:
    """Join the waiting labels of these held predictions, as (prediction id, model); returns the labels
    joined, for the caller to take out of ``live.pending_labels`` once its transaction commits."""
    live = monitor.live
    # A label joins only a prediction of the model it names, as on_ground_truth_received requires: one for
    # another model keeps waiting and expires as unmatched. Not found while waiting in memory: the label's
    # transaction has not committed yet (its handler runs beside this one); the caller keeps it due. The label
    # joins every held prediction of its id and model: the stable version's and its shadow candidate's.
    hits = {(pid, model): held for pid, model in due if (held := live.cache.predictions(model, pid))}
    pending = await store.take_pending([pid for pid, _ in hits], [model for _, model in hits])
    rows = [
        _labelled(hit, label.label, label.observed_at, late=False, at=label.received_at)
        for label in pending
        for hit in hits[(label.prediction_id, label.model)]
    ]
    joined = {
        (label.prediction_id, label.model): LabelJoined(
            {hit.version for hit in hits[(label.prediction_id, label.model)]},
            any(hit.variant == SHADOW for hit in hits[(label.prediction_id, label.model)]),
            _forget_at(label.received_at, monitor),
        )
        for label in pending
    }
    # A label joined before to some versions' predictions of the pair (at once, or from waiting) joins the
    # versions consumed since (a shadow candidate's scoring, logged after the served row): from Postgres,
    # where it is the pair's latest label, once per version (one it joined already is left as it is). Only
    # a served row and its shadow share an id across versions: another version's prediction with the id is
    # a client reusing it for another request, which that label is not the truth of.
    again = [pair for pair in hits if pair not in joined and pair in live.labels_joined]
    for label in await store.joined_labels([pid for pid, _ in again], [model for _, model in again]):
        pair = (label.prediction_id, label.model)
        shadowed = SHADOW in label.variants
        new = [
            hit
            for hit in hits[pair]
            if hit.version not in label.versions and (shadowed or hit.variant == SHADOW)
        ]
        rows += [
            _labelled(hit, label.label, label.observed_at, late=False, at=label.received_at) for hit in new
        ]
        joined[pair] = LabelJoined(
            label.versions | {hit.version for hit in new},
            shadowed or bool(new),
            _forget_at(label.received_at, monitor),
        )
    await _store_labelled(rows, monitor=monitor, store=store, publish=publish, tally=tally)
    _remember_joined(joined, monitor, tally)
    # Settled: the waiting labels taken, and the joins from Postgres (but of a pair whose label is still
    # waiting to be taken: its transaction had not committed).
    settled = [pair for pair in again if pair not in live.pending_labels] + [
        (label.prediction_id, label.model) for label in pending
    ]
    return sorted(set(settled))


def _forget_at(received_at: datetime | None, monitor: Monitor) -> float:
    """When memory forgets a joined label received then (None: now): ``label_wait_seconds`` later, as a
    label waiting for its prediction is given up."""
    received = monitor.now() if received_at is None else epoch(received_at)
    return received + monitor.label_wait_seconds


def _remember_joined(joined: dict[tuple[str, str], LabelJoined], monitor: Monitor, tally: Tally) -> None:
    """Once committed, remember the labels joined, for predictions of their id and model still to come."""
    if not joined:
        return

    def remember() -> None:
        if monitor.live.labels_joined_now(joined):
            monitor.on_joins_due()

    tally.then(remember)


async def _store_labelled(
    rows: list[LabelledRecord], *, monitor: Monitor, store: MonitoringStore, publish: Publish, tally: Tally
) -> None:
    """Store joined labels (a later, different label for a prediction joined before replaces its label),
    then score the versions' full performance windows."""
    _mark_outside_classes(rows, monitor, tally)
    for _, model in await store.add_labelled(rows):
        tally.add(LABELS_CORRECTED, model)
    for model, version in sorted({(r.model, r.version) for r in rows}):
        await check_performance(model, version, monitor=monitor, store=store, publish=publish, tally=tally)


def _mark_outside_classes(rows: list[LabelledRecord], monitor: Monitor, tally: Tally) -> None:
    """Mark the labels that name none of their version's classes; count them and warn (rate-limited).

    They are joined all the same, and are wrong predictions: a label may name a class the model never
    learned. But a whole feed of them is more likely an encoding mistake, which would read as accuracy 0."""
    found: dict[tuple[str, int], list[LabelledRecord]] = {}
    for row in rows:
        ref = monitor.live.references.get((row.model, row.version))
        if ref is not None and ref.task is Task.CLASSIFICATION:
            row.outside_classes = outside_classes(row.label, ref.signature.classes)
            if row.outside_classes:
                found.setdefault((row.model, row.version), []).append(row)
    now = monitor.now()
    for (model, version), outside in sorted(found.items()):
        tally.add(LABELS_OUTSIDE_CLASSES, model, str(version), amount=len(outside))
        if not monitor.outside_classes_warned.due((model, version), now):
            continue
        ref = monitor.live.references[(model, version)]
        log.warning(
            "labels that name no class of the model: counted as wrong predictions",
            model=model,
            version=version,
            label=shown_value(outside[0].label),
            prediction_id=outside[0].prediction_id,
            classes=shown_classes(ref.signature.classes or []),
            labels=len(outside),
            hint="check how the labels are encoded (a label must name one of the classes, as the class or "
            "as its text); driftloop_monitoring_labels_outside_classes_total counts them",
        )


def _labelled(
    hit: Any, label: Any, observed_at: Any, *, late: bool, at: datetime | None = None
) -> LabelledRecord:
    return LabelledRecord(
        prediction_id=hit.prediction_id,
        model=hit.model,
        version=hit.version,
        variant=hit.variant,
        rollout_id=hit.rollout_id,
        predicted_at=from_epoch(hit.predicted_at),
        prediction=hit.prediction,
        score=hit.score,
        label=label,
        observed_at=observed_at,
        late=late,
        inputs=hit.inputs,
        received_at=at,
    )


async def on_ground_truth_received(
    deliveries: Sequence[Delivery],
    *,
    monitor: Monitor,
    store: MonitoringStore,
    publish: Publish,
    tally: Tally,
) -> None:
    """Join labels to their predictions by id; a label whose prediction is not known yet waits (bounded).
    The latest label for a prediction wins: it replaces the one waiting for the same prediction and model, or
    the one its prediction was joined with (a correction)."""
    live = monitor.live
    joined: dict[tuple[str, str, int], LabelledRecord] = {}
    waiting: list[PendingLabel] = []
    marked: list[tuple[str, str]] = []
    try:
        for d in deliveries:
            if d.event is None or not isinstance(d.event.data, GroundTruthReceived):
                continue
            g = d.event.data
            # Only predictions of the model the label names: another model's with the same id is not its. Of
            # that model, every version's: in a shadow rollout the candidate's scoring of a served row has the
            # served prediction's id, and the label is the truth for both (each version's windows count it).
            held = live.cache.predictions(g.model, g.prediction_id)
            if not held and g.model not in live.models:
                # No prediction of a model with no version registered is held (its rows are skipped), and the
                # bus does not authenticate a publisher: kept waiting, labels for made-up names held memory
                # and a row each for the whole label wait.
                _skip_unknown_model_label(g, monitor, tally)
                continue
            versions: list[int | None] = [hit.version for hit in held] or [g.model_version]
            for version in versions:
                _check_label(g, version, live)
            if not held:
                waiting.append(PendingLabel(g.prediction_id, g.model, g.label, g.observed_at))
                # In memory now, with no await since the look-up: a prediction consumed from here on looks
                # for it (and, until this transaction commits, misses it and leaves it to the next tick).
                if live.label_waits(g.prediction_id, g.model):
                    marked.append((g.prediction_id, g.model))
                continue
            for hit in held:
                window = live.windows.get((hit.model, hit.version))
                # Late: the prediction's drift window was already judged when its label came.
                late = window is not None and hit.window_seq < window.seq
                # One row per prediction (a statement cannot change a row twice): the poll's last label.
                joined[(g.prediction_id, g.model, hit.version)] = _labelled(
                    hit, g.label, g.observed_at, late=late
                )
        if waiting:
            await store.add_pending(waiting)
        await _store_labelled(
            list(joined.values()), monitor=monitor, store=store, publish=publish, tally=tally
        )
        joins: dict[tuple[str, str], LabelJoined] = {}
        for (prediction_id, model, version), row in joined.items():
            pair = (prediction_id, model)
            join = joins.setdefault(pair, LabelJoined(set(), False, _forget_at(None, monitor)))
            join.versions.add(version)
            join.shadowed = join.shadowed or row.variant == SHADOW
        _remember_joined(joins, monitor, tally)
    except BaseException:
        # The transaction fails with the handler: these labels are not in Postgres, and memory follows what
        # is committed. The bus retries the poll (one event at a time after a failure that is not an
        # outage), which marks again the labels whose own transaction commits; one that fails for good is
        # dead-lettered, and no prediction waits for it. Pairs already waiting before stay: an earlier
        # label for them is still in Postgres, as no join takes it while this one is being stored (an
        # expiry may: then memory keeps the pair, and the retry stores this label again).
        live.labels_stored(_pairs(waiting), marked=marked)
        raise
    live.labels_stored(_pairs(waiting))


def _skip_unknown_model_label(g: GroundTruthReceived, monitor: Monitor, tally: Tally) -> None:
    """Count (once committed) a label naming a model with no version registered, and log it once per model."""
    tally.add(LABELS_NOT_KEPT, UNKNOWN_MODEL)
    if monitor.unknown_label_models_warned.due(g.model):
        log.warning(
            "labels for an unknown model are counted and skipped",
            model=g.model,
            prediction_id=g.prediction_id,
            hint="monitoring has no ModelVersionRegistered for it (yet), so holds none of its predictions; "
            'driftloop_monitoring_labels_not_kept_total{reason="unknown-model"} counts such labels',
        )


def _pairs(labels: list[PendingLabel]) -> list[tuple[str, str]]:
    return [(label.prediction_id, label.model) for label in labels]


def _check_label(g: GroundTruthReceived, version: int | None, live: LiveState) -> None:
    """Refuse a label that is no number for a regression model (the version's, else every known version of
    the model): stored, it could never be scored."""
    if regression_value(g.label) is not None:
        return
    tasks = {
        ref.task for (model, v), ref in live.references.items() if model == g.model and version in (None, v)
    }
    if tasks == {Task.REGRESSION}:
        which = f"version {version}" if version is not None else "every known version"
        raise PermanentError(
            f"label {shown_value(g.label)} for prediction {g.prediction_id!r} is not a number, but {g.model} "
            f"{which} is a regression model: send the true value as a finite number"
        )


async def check_performance(
    model: str, version: int, *, monitor: Monitor, store: MonitoringStore, publish: Publish, tally: Tally
) -> None:
    """Score every full performance window of labelled rows against the validation baseline."""
    ref = monitor.live.references.get((model, version))
    if ref is None:
        return
    policy = monitor.policy(model)
    size = monitor.performance_window_labels
    while True:
        rows = await store.unscored(model, version, size)
        if len(rows) < size:
            return
        state = await store.performance_state(model, version)
        # Read again under the version's lock: the other transaction joining labels (the feedback consumer's
        # beside the background's) may have scored some of these rows while this one waited for it.
        rows = await store.unscored(model, version, size)
        if len(rows) < size:
            return
        seq = state.next_seq
        labelled = [LabelledRow(r.prediction, r.score, r.label, r.late) for r in rows]
        if skipped := unscorable(labelled, ref.task):
            tally.add(UNSCORABLE, model, amount=skipped)
            log.warning(
                "labelled rows that are no numbers left out of a performance window",
                model=model,
                version=version,
                rows=skipped,
            )
        metrics = performance_metrics(labelled, ref.task, ref.signature.classes)
        state.next_seq += 1
        await store.mark_scored(model, version, [r.prediction_id for r in rows], seq)
        if unmeasurable := sorted(name for name, value in metrics.items() if not math.isfinite(value)):
            # Nothing a PerformanceDegraded could carry, and judging it would fail every label join after
            # it (they all score this window first): scored, unjudged, the streak left as it was.
            state.last_metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
            tally.add(PERFORMANCE_UNMEASURABLE, model)
            log.warning(
                "performance window not measurable: scored without a verdict",
                model=model,
                version=version,
                window=seq,
                metrics=unmeasurable,
                hint="a prediction and its label so far apart that their error is beyond a double",
            )
            await store.save_performance_state(model, version, state)
            continue
        state.last_metrics = metrics
        errors = metric_standard_errors(labelled, ref.task, ref.signature.classes, seed=seq)
        found = degradations(metrics, ref.baseline, policy.performance_tolerance, errors)
        start = min(epoch(r.predicted_at) for r in rows)
        end = max(epoch(r.predicted_at) for r in rows)
        last = state.last_alerts.get("any")
        state.degraded_streak = state.degraded_streak + 1 if found else 0
        persistent = state.degraded_streak >= policy.consecutive_windows
        if found and persistent and not in_cooldown(end, last, policy.cooldown_seconds):
            worst = max(found, key=lambda d: abs(d.value - d.baseline) / max(abs(d.baseline), 1e-9))
            classes = ref.signature.classes or ()
            # Judged as the canary's accuracy is, from the labels (rows joined before migration 0007 are not
            # marked): mostly outside the classes, the labels' encoding is the likelier cause.
            outside = sum(outside_classes(r.label, classes) for r in rows) if classes else 0
            note = labels_outside_classes_note([("", outside, len(rows))], classes)
            state.last_alerts["any"] = end
            data = await _export(None, rows, ref, monitor=monitor, store=store)
            payload = PerformanceDegraded(
                model=model,
                model_version=version,
                metric=worst.metric,
                value=worst.value,
                baseline=worst.baseline,
                threshold=worst.threshold,
                higher_is_better=worst.higher_is_better,
                window=TrafficWindow(
                    id=f"{model}:{version}:perf{seq:06d}",
                    start=from_epoch(start),
                    end=from_epoch(end),
                    size=len(rows),
                    data=data,
                ),
                labelled_rows=len(rows),
                late_labels=sum(r.late for r in rows),
                labels_outside_classes=outside,
            )
            event = new_event(payload, source=monitor.source)
            await publish(event)
            summary = (
                f"{worst.metric} {shown_metric(worst.value)} vs baseline {shown_metric(worst.baseline)} "
                f"over {len(rows)} labels"
            )
            if note:
                summary = f"{summary}; {note}"
            await store.record_alert(event.id, model, version, "PerformanceDegraded", summary)
            tally.add(ALERTS_RAISED, model, "PerformanceDegraded")
            log.info(
                "performance degraded",
                model=model,
                version=version,
                metric=worst.metric,
                labels_outside_classes=outside,
                **({"note": note} if note else {}),
            )
        await store.save_performance_state(model, version, state)


async def _export(
    window: ClosedWindow | None,
    extra: Sequence[LabelledRecord],
    ref: ModelReference,
    *,
    monitor: Monitor,
    store: MonitoringStore,
) -> Any:
    labels = (
        await store.labelled_for(window.model, window.version, window.prediction_ids)
        if window is not None
        else {}
    )
    history = list(extra)
    if monitor.export_labelled_rows:
        history += await store.recent_labelled(ref.model, monitor.export_labelled_rows)
    frame = export.window_frame(window, labels, history, [f.name for f in ref.signature.features])
    return await monitor.artifacts.put_parquet(frame_to_parquet(frame))


# --- judging closed windows --------------------------------------------------------------------------------


async def judge_closed_window(
    window: ClosedWindow, *, monitor: Monitor, store: MonitoringStore, publish: Publish, tally: Tally
) -> WindowJudgement | None:
    """Judge one closed window, debounce, and publish DriftDetected / DataQualityIssue when due.

    Runs in its own transaction; a window judged before (seen again after a replay) changes nothing, and
    counts nothing.
    """
    key = (window.model, window.version)
    ref = monitor.live.references.get(key)
    if ref is None:
        return None
    state = await store.window_state(window.model, window.version, lock=True)
    if window.seq < state.next_seq:
        return None
    policy = monitor.policy(window.model)
    judgement = judge_window(ref, window, policy)
    decision = debounce(DebounceState(state.consecutive, state.last_alert_at), judgement, policy)
    traffic = TrafficWindow(
        id=window.window_id, start=from_epoch(window.start), end=from_epoch(window.end), size=window.size
    )
    # DriftDetected carries evidence of the features tested; an untested one is a DataQualityIssue.
    evidence = [
        r.evidence(decision.state.consecutive.get(r.name, 0))
        for r in judgement.features
        if r.untested is None
    ]
    prediction = (
        judgement.prediction.evidence(1 if judgement.prediction.drifted else 0)
        if judgement.prediction
        else None
    )
    if decision.alert:
        data = await _export(window, [], ref, monitor=monitor, store=store)
        payload = DriftDetected(
            model=window.model,
            model_version=window.version,
            window=traffic.model_copy(update={"data": data}),
            reference_size=ref.rows,
            features=evidence,
            drifted_features=decision.debounced,
            drift_share=decision.share,
            share_threshold=policy.share_threshold,
            correction=policy.correction,
            alpha=policy.alpha,
            prediction_drift=prediction,
            features_total=len(evidence),
            drifted_features_total=len(decision.debounced),
        )
        event = new_event(payload, source=monitor.source)
        # Evidence of thousands of features (or of one with a very long name) passes what consumers accept:
        # the most drifted that fit go, the window's report keeps them all. Down to one feature and still too
        # large, the least evidence the alert can carry is the last try; when not even that fits, the
        # judgement fails and the window is set aside, saying why.
        whole = payload
        while excess := bytes_over_limit(event, max_bytes=monitor.max_event_bytes):
            if len(payload.features) > 1:
                payload = cut_evidence(payload, excess)
            elif (least := least_evidence(whole)).features != payload.features:
                payload = least
            else:
                raise _evidence_too_large(event, payload, monitor.max_event_bytes)
            event = new_event(payload, source=monitor.source)
        await publish(event)
        await store.record_alert(
            event.id,
            window.model,
            window.version,
            "DriftDetected",
            f"{len(decision.debounced)} of {len(evidence)} features drifted: {_names(decision.debounced)}",
        )
        tally.add(ALERTS_RAISED, window.model, "DriftDetected")
        log.info(
            "drift detected",
            model=window.model,
            version=window.version,
            drifted=len(decision.debounced),
            features=[shown_name(name) for name in decision.debounced[:NAMES_SHOWN]],
            evidence_truncated=payload.evidence_truncated,
        )
    # Per kind, many features with the same finding (an outage) make one issue, not one each.
    for issue in quality_issues(
        judgement.quality,
        per_kind=monitor.quality_issues_per_kind,
        window_report=f"GET /v1/models/{window.model}/windows/{window.window_id}",
    ):
        cooldown_key = issue.cooldown_key
        last = await store.quality_last(window.model, window.version, cooldown_key, issue.kind)
        if in_cooldown(window.end, last, policy.cooldown_seconds):
            continue
        payload_issue = DataQualityIssue(
            model=window.model,
            model_version=window.version,
            kind=DataQualityIssueKind(issue.kind),
            feature=issue.feature,
            count=issue.count,
            share=min(issue.share, 1.0),
            window=traffic,
            message=issue.message,
            features_total=issue.features_total,
        )
        issue_event = new_event(payload_issue, source=monitor.source)
        await publish(issue_event)
        await store.save_quality(window.model, window.version, cooldown_key, issue.kind, window.end)
        await store.record_alert(
            issue_event.id, window.model, window.version, "DataQualityIssue", issue.message
        )
        tally.add(ALERTS_RAISED, window.model, "DataQualityIssue")
    report = window_report(
        judgement, decision.debounced, decision.share, decision.alert, decision.state.consecutive
    )
    summary = {
        "window_id": window.window_id,
        "start": from_epoch(window.start),
        "end": from_epoch(window.end),
        "size": window.size,
        "drift_share": judgement.drift_share,
        "alerted": decision.alert,
    }
    await store.record_window(window.model, window.version, window.seq, summary, report)
    await store.save_window_state(
        window.model,
        window.version,
        WindowState(
            next_seq=window.seq + 1,
            starts=_starts_after(window, monitor.live, before=state.starts),
            consecutive=decision.state.consecutive,
            last_alert_at=decision.state.last_alert_at,
        ),
    )
    tally.add(WINDOWS_JUDGED, window.model, _window_outcome(judgement, decision.alert))
    return judgement


def _window_outcome(judgement: WindowJudgement, alerted: bool) -> str:
    """The ``outcome`` label of a judged window (:data:`WINDOWS_JUDGED`)."""
    if alerted:
        return ALERTED
    return HELD_BACK if any(f.drifted for f in judgement.features if f.tested) else NO_DRIFT


def _evidence_too_large(
    event: CloudEvent[DriftDetected], alert: DriftDetected, max_bytes: int
) -> EventTooLarge:
    """Why a DriftDetected cannot be announced even with one feature's evidence."""
    [evidence] = alert.features
    name, size = evidence.feature, max_bytes + bytes_over_limit(event, max_bytes=max_bytes)
    return EventTooLarge(
        f"DriftDetected for {alert.model} version {alert.model_version} (window {alert.window.id}) would be "
        f"{size:,} bytes even with the evidence of one feature that drifted, over the {max_bytes:,} "
        f"consumers accept (max_event_bytes): the name of feature {shown_name(name)!r} takes "
        f"{len(name.encode()):,} bytes, and the event carries it twice (features, drifted_features); no "
        "other feature that drifted after debouncing is smaller. Give the model shorter feature names, or "
        "raise max_event_bytes"
    )


NAMES_SHOWN = 10
"""Feature names an alert's summary and log line show (a long one shortened); the window's report names them
all."""


def _names(names: Sequence[str]) -> str:
    more = len(names) - NAMES_SHOWN
    shown = ", ".join(shown_name(name) for name in names[:NAMES_SHOWN])
    return shown + (f" and {more} more" if more > 0 else "")


async def set_window_aside(window: ClosedWindow, *, monitor: Monitor, store: MonitoringStore) -> None:
    """Count a window whose judgement failed for good as done, unjudged: the version's next window number
    and first offsets move past it as a judgement's would (debounce state unchanged), so a restart neither
    rebuilds it from the replay and sets it aside again nor folds its rows into the window after it."""
    state = await store.window_state(window.model, window.version, lock=True)
    if window.seq < state.next_seq:
        return
    state.next_seq = window.seq + 1
    state.starts = _starts_after(window, monitor.live, before=state.starts)
    await store.save_window_state(window.model, window.version, state)


def _starts_after(window: ClosedWindow, live: LiveState, *, before: Mapping[int, int]) -> dict[int, int]:
    """Where the version's traffic after ``window`` starts, per partition: replayed rows before it belong to
    windows already done.

    Right after the window on the partitions it read; on the others, where the first later window that read
    them starts: the windows closed behind it and still queued for judgement, then the open one. Taken from
    the open window alone, a restart before the queued ones were judged read their rows as done and dropped
    them: they were never judged, and the open window's rows took their number. On a partition none of them
    read, where it started ``before`` (the version's traffic moved to other partitions, as when the topic
    gains some): without it, a replay counted that partition's judged rows again."""
    key = (window.model, window.version)
    starts = dict(window.next_offsets)
    later = [w.first_offsets for w in live.closed if (w.model, w.version) == key and w.seq > window.seq]
    if (open_window := live.windows.get(key)) is not None:
        later.append(open_window.first_offsets)
    for first_offsets in later:
        for partition, offset in first_offsets.items():
            starts.setdefault(partition, offset)
    for partition, offset in before.items():
        starts.setdefault(partition, offset)
    return starts


def window_report(
    judgement: WindowJudgement,
    debounced: list[str],
    share: float,
    alerted: bool,
    consecutive: dict[str, int],
) -> dict[str, Any]:
    """The JSON report of one judged window (what the HTTP drift report shows)."""
    w = judgement.window

    def feature(r: Any, count: int) -> dict[str, Any]:
        item = r.evidence(count).model_dump(mode="json")
        item["p_value_raw"] = r.p_value
        item["p_value_draws"] = r.p_draws
        item["untested"] = r.untested
        item["histogram"] = r.histogram.as_dict() if r.histogram else None
        return item

    return {
        "model": w.model,
        "model_version": w.version,
        "window": {
            "id": w.window_id,
            "start": from_epoch(w.start).isoformat(),
            "end": from_epoch(w.end).isoformat(),
            "size": w.size,
        },
        "correction": judgement.correction.value,
        "alpha": judgement.alpha,
        "drift_share": judgement.drift_share,
        "debounced_share": share,
        "drifted_features": [r.name for r in judgement.features if r.drifted],
        "debounced_features": debounced,
        "alerted": alerted,
        "features": [feature(r, consecutive.get(r.name, 0)) for r in judgement.features],
        "prediction": feature(judgement.prediction, 0) if judgement.prediction else None,
        "quality": [q.__dict__ for q in judgement.quality],
    }


# --- rollouts ---------------------------------------------------------------------------------------------

PROMOTED, ROLLED_BACK = "promoted", "rolled back"  # how a rollout ended, as finished_rollouts records it


async def on_rollout_started(
    event: CloudEvent[RolloutStarted],
    *,
    monitor: Monitor,
    store: MonitoringStore,
    publish: Publish,
    tally: Tally,
) -> None:
    """Watch the rollout's current step: the highest step kept because its event came before this one, else
    the start's; past ``max_watched_steps``, give it an inconclusive verdict at once instead. Memory follows
    once the transaction commits."""
    p = event.data
    await _refuse_finished(p.rollout_id, p.step_index, store)
    if await store.last_step(p.rollout_id) is not None:
        # Started before (rollout ids are serving's, one per rollout): a second RolloutStarted, under another
        # event id, would supersede the step in force and watch its first step again, decided long ago, and
        # the step in force would never get its verdict.
        log.warning(
            "rollout started again: ignored, the rollout is known already",
            rollout_id=p.rollout_id,
            model=p.model,
            event_id=event.id,
        )
        return
    early = await store.take_early_steps(p.rollout_id)
    given_up = await store.take_given_up(p.rollout_id)
    later = [e for e in early if e.step_index > p.step_index]
    kept = later[-1] if later else None
    collected = False
    if given_up is not None and given_up.step_index > max(p.step_index, kept.step_index if kept else -1):
        # Its kept step was given up (rollout_start_wait_seconds passed) and nothing higher came since:
        # serving is on that step or past it, and the start's own step would get a verdict serving ignores as
        # stale. Its traffic before now was not collected, so its time range runs from now.
        step = _started_after_given_up(given_up, p, now=monitor.now())
        tally.add(STEPS_STARTED_AFTER_GIVEN_UP, series_model(p.model, monitor))
        log.warning(
            "rollout started after its step was given up: watching that step from now on",
            rollout_id=p.rollout_id,
            model=p.model,
            step=step.step_index,
            start_step=p.step_index,
            given_up_seconds_ago=round(monitor.now() - (given_up.given_up_at or monitor.now()), 1),
            event_id=event.id,
            hint="the start came after rollout_start_wait_seconds; the step's traffic before the start is "
            "not counted toward it; driftloop_monitoring_rollout_steps_started_after_given_up_total counts "
            "such starts",
        )
    elif kept is not None:
        # Serving is on that step already: watching the start's step would give a verdict serving ignores as
        # stale, and the step it is on would never get one.
        step, collected = _started_late(kept, p), True
        log.warning(
            "rollout started after its step's event: watching the step serving is on",
            rollout_id=p.rollout_id,
            model=p.model,
            step=step.step_index,
            start_step=p.step_index,
            steps_kept=[e.step_index for e in early],
            event_id=event.id,
        )
    else:
        if early or given_up is not None:
            log.warning(
                "rollout step kept for its start is on the start's step or before it: ignored",
                rollout_id=p.rollout_id,
                model=p.model,
                steps_kept=[e.step_index for e in early],
                step_given_up=given_up.step_index if given_up is not None else None,
                start_step=p.step_index,
                event_id=event.id,
            )
        step = _step_in_force(event, p.min_samples, p.bake_seconds, monitor=monitor, tally=tally)
    await store.save_step(step)
    await _watch_within_bound(
        step, monitor=monitor, store=store, publish=publish, tally=tally, collected=collected
    )


def _step_in_force(
    event: CloudEvent[RolloutStarted] | CloudEvent[RolloutStepAdvanced],
    min_samples: int,
    bake_seconds: float,
    *,
    monitor: Monitor,
    tally: Tally,
) -> StoredStep:
    """The step a rollout event puts in force, learned of now."""
    p = event.data
    return StoredStep(
        rollout_id=p.rollout_id,
        step_index=p.step_index,
        model=p.model,
        stable_version=p.stable_version,
        canary_version=p.canary_version,
        started_at=_step_start(event, p.step_index, monitor=monitor, tally=tally),
        min_samples=min_samples,
        bake_seconds=bake_seconds,
        cause_id=event.id,
        correlation_id=event.correlationid,
        actor=event.actor,
        learned_at=monitor.now(),
    )


def _started_late(early: EarlyStep, started: RolloutStarted) -> StoredStep:
    """The step kept for its start, watched with the start's sample and bake requirements. Its traffic was
    collected while it was kept (from its own start, as any step's), and its bake time and timeout run from
    when monitoring handled its event, as any step's do."""
    return StoredStep(
        rollout_id=early.rollout_id,
        step_index=early.step_index,
        model=early.model,
        stable_version=early.stable_version,
        canary_version=early.canary_version,
        started_at=early.started_at,
        min_samples=started.min_samples,
        bake_seconds=started.bake_seconds,
        cause_id=early.cause_id,
        correlation_id=early.correlation_id,
        actor=early.actor,
        learned_at=early.received_at,
    )


def _started_after_given_up(given_up: EarlyStep, started: RolloutStarted, *, now: float) -> StoredStep:
    """A step given up for want of its start, watched once the start came after all: its traffic was not
    collected once it was given up (memory and a restart's replay would count it differently), so its time
    range, bake time and timeout all run from ``now``."""
    step = _started_late(given_up, started)
    step.started_at = max(given_up.started_at, now)
    step.learned_at = now
    return step


async def on_rollout_step_advanced(
    event: CloudEvent[RolloutStepAdvanced],
    *,
    monitor: Monitor,
    store: MonitoringStore,
    publish: Publish,
    tally: Tally,
) -> None:
    """Watch the new step, with the rollout's sample and bake requirements (past ``max_watched_steps``, give
    it an inconclusive verdict at once instead); keep it for the rollout's start when that has not come yet.
    Memory follows once the transaction commits."""
    p = event.data
    await _refuse_finished(p.rollout_id, p.step_index, store)
    previous = await store.last_step(p.rollout_id)
    if previous is None:
        await _keep_for_start(event, monitor=monitor, store=store, tally=tally)
        return
    if previous.step_index >= p.step_index:
        # An old event (sent again under another event id, or read late): the rollout is on that step or past
        # it. Watching it would supersede the step in force, which would never get its verdict.
        log.warning(
            "rollout step advanced again: ignored, the rollout is on that step or past it already",
            rollout_id=p.rollout_id,
            model=p.model,
            step=p.step_index,
            known_step=previous.step_index,
            event_id=event.id,
        )
        return
    step = _step_in_force(event, previous.min_samples, previous.bake_seconds, monitor=monitor, tally=tally)
    await store.save_step(step)
    if previous.verdict == Verdict.HEALTHY:
        # Serving advances a rollout on its step's healthy verdict, and from that verdict to this event the
        # rollout has no step watched: counted against the bound, a rollout under way would be rolled back
        # midway whenever new ones filled it meanwhile. Each such step took a canary's traffic judged healthy
        # here, which a publisher cannot name into being as it can a start.
        _watch_once_committed(step, monitor, tally)
        return
    await _watch_within_bound(step, monitor=monitor, store=store, publish=publish, tally=tally)


async def _watch_within_bound(
    step: StoredStep,
    *,
    monitor: Monitor,
    store: MonitoringStore,
    publish: Publish,
    tally: Tally,
    collected: bool = False,
) -> None:
    """Watch the step just saved once committed (:func:`_watch_once_committed`) or, when
    ``max_watched_steps`` other rollouts have a step watched, decide it at once: its one verdict,
    inconclusive, saying why, published in this transaction, caused by the step's event; never watched in
    memory. Each watched step collects its canary's and stable's traffic until its verdict and every poll of
    predictions looks through them all, and a publisher (the bus does not authenticate one) could start any
    number of rollouts. Refused (dead-lettered) instead, a legitimate rollout's step waited for ever: serving
    waits for monitoring's verdict on every step, and rolls a canary back on an inconclusive one by itself.

    Counted in Postgres, this transaction's steps included (memory follows only at commit): one poll of a
    thousand starts would all have passed a count of memory. The rollout's own watched step is not counted
    (this step replaces it), and a rollout's step after a healthy verdict is watched without this check
    (:func:`on_rollout_step_advanced`)."""
    most = monitor.max_watched_steps
    if await store.rollouts_watched(besides=step.rollout_id) < most:
        _watch_once_committed(step, monitor, tally, collected=collected)
        return
    decision = CanaryDecision(Verdict.INCONCLUSIVE, [], not_watched_reason(most))
    await _give_verdict(
        canary_step(step),
        step,
        decision,
        monitor.now(),
        monitor=monitor,
        store=store,
        publish=publish,
        tally=tally,
        logged=False,
    )
    tally.add(STEPS_NOT_WATCHED, series_model(step.model, monitor))

    def report() -> None:
        # Its rollout's step before it (superseded) and a step kept for its start are done with, as watching
        # it would have made them. Logged at most once a minute: a flood of made-up rollouts would log a line
        # each.
        monitor.live.unwatch(step.rollout_id)
        monitor.live.take_kept(step.rollout_id)
        if monitor.steps_not_watched_warned.due(STEPS_NOT_WATCHED_LOG, monitor.now()):
            log.error(
                STEPS_NOT_WATCHED_LOG,
                rollout_id=step.rollout_id,
                model=step.model,
                step=step.step_index,
                event_id=step.cause_id,
                max_watched_rollout_steps=most,
                hint="serving rolls the canary back on the verdict; a publisher starting made-up rollouts, "
                "or more rollouts at once than the bound (raise it); "
                "driftloop_monitoring_rollout_steps_decided_unwatched_total counts them",
            )

    tally.then(report)


async def decide_watched_beyond_bound(
    now: float, *, monitor: Monitor, store: MonitoringStore, publish: Publish, tally: Tally
) -> None:
    """At a restart, before the watched steps are loaded: give each step watched beyond the first
    ``max_watched_steps`` started (rows from before the bound, or a bound lowered) its one verdict,
    inconclusive, saying why, published in the restore's transaction, as a step event past the bound gets
    one. Loaded whole, they held memory without bound again at every start; left watching in Postgres
    unjudged, their rollouts waited for ever. Counted and logged (once) when that transaction commits."""
    most = monitor.max_watched_steps
    beyond = await store.watched_beyond(most)
    if not beyond:
        return
    decision = CanaryDecision(Verdict.INCONCLUSIVE, [], not_watched_at_start_reason(most))
    for stored in beyond:
        await _give_verdict(
            canary_step(stored),
            stored,
            decision,
            now,
            monitor=monitor,
            store=store,
            publish=publish,
            tally=tally,
            logged=False,
        )
        tally.add(STEPS_NOT_WATCHED, series_model(stored.model, monitor))
    rollouts = sorted(s.rollout_id for s in beyond)[:10]

    def report() -> None:
        log.error(
            "rollout steps not watched at start: more rollouts had a step watched than "
            "max_watched_rollout_steps, the first started are watched and the others given an inconclusive "
            "verdict",
            steps=len(beyond),
            rollouts=rollouts,
            max_watched_rollout_steps=most,
            hint="serving rolls their canaries back on the verdicts; "
            "driftloop_monitoring_rollout_steps_decided_unwatched_total counts them",
        )

    tally.then(report)


async def _keep_for_start(
    event: CloudEvent[RolloutStepAdvanced], *, monitor: Monitor, store: MonitoringStore, tally: Tally
) -> None:
    """Keep a step whose event came before its rollout's RolloutStarted (another partition, a redelivery, a
    replica catching up), in the transaction that claims the event: the start carries the sample and bake
    requirements, and watches the highest step kept. Dead-lettered instead, the step was lost, and the late
    start watched its first step while serving was on a later one."""
    p = event.data
    early = EarlyStep(
        rollout_id=p.rollout_id,
        step_index=p.step_index,
        model=p.model,
        stable_version=p.stable_version,
        canary_version=p.canary_version,
        started_at=_step_start(event, p.step_index, monitor=monitor, tally=tally),
        cause_id=event.id,
        correlation_id=event.correlationid,
        actor=event.actor,
        received_at=monitor.now(),
    )
    kept = await store.keep_early_step(early)
    if kept:
        collector = kept_step(early)
        tally.then(lambda: monitor.live.keep(collector))
        # Each kept step collects its canary's traffic, and a publisher (the bus does not authenticate one)
        # could keep any number: past the bound the one kept longest is given up now, as the wait would.
        over = await store.expire_early_steps_beyond(monitor.max_kept_steps, keeping=early)
        if over:
            await store.remember_given_up(over, early.received_at)
            _report_never_started(over, monitor, tally, reason=TOO_MANY_KEPT)
    log.warning(
        "rollout step came before its start: kept until the RolloutStarted comes"
        if kept
        else "rollout step came before its start again: ignored, that step is kept already",
        rollout_id=p.rollout_id,
        model=p.model,
        step=p.step_index,
        event_id=event.id,
        rollout_start_wait_seconds=monitor.rollout_start_wait_seconds,
    )


def _watch_once_committed(
    step: StoredStep, monitor: Monitor, tally: Tally, *, collected: bool = False
) -> None:
    """Watch the step (superseding the rollout's step in memory) once the transaction that stored it commits:
    a transaction rolled back leaves memory watching what Postgres still has. A rollout's step kept for its
    start stops being collected; ``collected``: the step watched is that one, and takes the traffic collected
    for it."""
    watcher = canary_step(step)

    def watch() -> None:
        kept = monitor.live.take_kept(step.rollout_id)
        if collected and kept is not None and kept.step_index == watcher.step_index:
            watcher.canary, watcher.stable = kept.canary, kept.stable
            watcher.first_offsets = kept.first_offsets
        monitor.live.watch(watcher)

    tally.then(watch)


def kept_step(early: EarlyStep) -> CanaryStep:
    """The in-memory collector of a step kept for its rollout's start: its traffic counts from its own start,
    as a watched step's does, and goes to the step the start watches. Never judged: the start brings the
    sample and bake requirements (zero until then)."""
    return CanaryStep(
        rollout_id=early.rollout_id,
        model=early.model,
        stable_version=early.stable_version,
        canary_version=early.canary_version,
        step_index=early.step_index,
        started_at=early.started_at,
        min_samples=0,
        bake_seconds=0.0,
        learned_at=early.received_at,
    )


def _step_start(
    event: CloudEvent[RolloutStarted] | CloudEvent[RolloutStepAdvanced],
    step_index: int,
    *,
    monitor: Monitor,
    tally: Tally,
) -> float:
    """When a step started: its event's time (serving's clock), but never further ahead of when monitoring
    handled it than ``max_clock_skew_seconds``, as a prediction is held for its label. Dated years ahead, its
    time range (from its start on) took none of the canary's traffic and its timeout never came: the rollout
    waited for ever for its one verdict."""
    started, now = epoch(event.time), monitor.now()
    latest = now + monitor.live.cache.max_ahead_s
    if started <= latest:
        return started
    tally.add(ROLLOUT_STEPS_AHEAD, series_model(event.data.model, monitor))
    log.warning(
        "rollout step dated ahead of monitoring's clock: watched as if it started "
        "max_clock_skew_seconds ahead",
        rollout_id=event.data.rollout_id,
        model=event.data.model,
        step=step_index,
        event_time=event.time.isoformat(),
        monitoring_time=from_epoch(now).isoformat(),
        max_clock_skew_seconds=monitor.live.cache.max_ahead_s,
        hint="check the clocks of the serving replicas (NTP); "
        "driftloop_monitoring_rollout_steps_ahead_of_clock_total counts such steps",
    )
    return latest


STEPS_NEVER_WATCHED = Counter(
    "driftloop_monitoring_rollout_steps_never_watched_total",
    "Rollout steps whose RolloutStepAdvanced came before the rollout's RolloutStarted and were dropped "
    "unwatched: the start did not come within rollout_start_wait_seconds (reason no-start: logged as an "
    "error, the rollout gets no verdict for the step), more than max_kept_rollout_steps were kept and it was "
    "the one kept longest (reason too-many-kept: given up as if its wait had passed), or the rollout ended "
    "first (reason rollout-ended). A model with no version registered is counted as model _unregistered.",
    ["model", "reason"],
)

STEPS_STARTED_AFTER_GIVEN_UP = Counter(
    "driftloop_monitoring_rollout_steps_started_after_given_up_total",
    "RolloutStarted events that came after the rollout's step kept for them was given up (past "
    "rollout_start_wait_seconds, counted in driftloop_monitoring_rollout_steps_never_watched_total): the "
    "start watches that step (serving is on it or past it), its traffic counted from when the start came; "
    "logged as a warning. A model with no version registered is counted as model _unregistered.",
    ["model"],
)


async def on_rollout_finished(
    event: CloudEvent[RolloutPromoted | RolloutRolledBack],
    *,
    monitor: Monitor,
    store: MonitoringStore,
    tally: Tally,
) -> None:
    """Stop watching a promoted or rolled back rollout, and record that it is over; memory follows once the
    transaction commits."""
    rollout_id = event.data.rollout_id
    outcome = PROMOTED if isinstance(event.data, RolloutPromoted) else ROLLED_BACK
    await store.finish_rollout(rollout_id, outcome)
    # The kept steps first, as the start takes them: a housekeeping tick giving them up meanwhile (on its own
    # connection) holds their rows, so this waits for its commit and then sees the given-up step it wrote.
    dropped = await store.take_early_steps(rollout_id)
    await store.take_given_up(rollout_id)
    for early in dropped:
        tally.add(STEPS_NEVER_WATCHED, series_model(early.model, monitor), "rollout-ended")
    if dropped:
        log.warning(
            "rollout ended before its start came: the steps kept for it are dropped unwatched",
            rollout_id=rollout_id,
            model=event.data.model,
            outcome=outcome,
            steps=[e.step_index for e in dropped],
        )

    def forget() -> None:
        monitor.live.unwatch(rollout_id)
        monitor.live.take_kept(rollout_id)

    tally.then(forget)


NO_START, TOO_MANY_KEPT = "no-start", "too-many-kept"
"""Why a kept step was given up: its wait passed, or more than ``max_kept_steps`` were kept."""
_GIVEN_UP_BECAUSE = {
    NO_START: "its RolloutStarted never came",
    TOO_MANY_KEPT: "more steps were kept for their RolloutStarted than max_kept_rollout_steps, and it was "
    "the one kept longest",
}


def _report_never_started(
    expired: list[EarlyStep], monitor: Monitor, tally: Tally, *, reason: str = NO_START
) -> None:
    """Count and log, once committed, the steps given up because their rollout's start never came (or, for
    ``too-many-kept``, had not come while more were kept than the bound)."""
    for early in expired:
        tally.add(STEPS_NEVER_WATCHED, series_model(early.model, monitor), reason)

    def report() -> None:
        for early in expired:
            log.error(
                f"rollout step dropped: {_GIVEN_UP_BECAUSE[reason]}, the step is not watched and gets no "
                "verdict unless the start still comes (it is watched from then on)",
                rollout_id=early.rollout_id,
                model=early.model,
                step=early.step_index,
                canary_version=early.canary_version,
                event_id=early.cause_id,
                reason=reason,
                kept_seconds=round(monitor.now() - early.received_at, 1),
                rollout_start_wait_seconds=monitor.rollout_start_wait_seconds,
                max_kept_rollout_steps=monitor.max_kept_steps,
                hint="serving's rollout waits for a verdict: roll it back or promote it by hand; "
                "driftloop_monitoring_rollout_steps_never_watched_total counts such steps, GET /v1/status "
                "lists them (rollout_steps_given_up)",
            )

        for early in expired:
            monitor.live.take_kept(early.rollout_id, early.step_index)

    if expired:
        tally.then(report)


async def _refuse_finished(rollout_id: str, step_index: int, store: MonitoringStore) -> None:
    """Dead-letter a step event of a rollout that is over: watched again, its step would get a CanaryVerdict
    for a rollout serving ended (a step event sent again under another id, or read after the ending)."""
    outcome = await store.rollout_outcome(rollout_id)
    if outcome is not None:
        raise PermanentError(
            f"rollout {rollout_id} was {outcome} already: its step {step_index} is not watched "
            "(a step event sent again, or read after the rollout ended)"
        )


def canary_step(step: StoredStep) -> CanaryStep:
    """The in-memory watcher of a stored step."""
    return CanaryStep(
        rollout_id=step.rollout_id,
        model=step.model,
        stable_version=step.stable_version,
        canary_version=step.canary_version,
        step_index=step.step_index,
        started_at=step.started_at,
        min_samples=step.min_samples,
        bake_seconds=step.bake_seconds,
        learned_at=step.learned_at,
    )


async def check_canary(
    step: CanaryStep, now: float, *, monitor: Monitor, store: MonitoringStore, publish: Publish, tally: Tally
) -> bool:
    """Give a watched step its one verdict once due (samples and bake time), or inconclusive at timeout.

    Runs in a transaction of its own, so a step whose decision fails does not hold up the others. Returns
    whether the step is decided in it (here, or by another replica before): the caller stops watching it once
    that transaction commits. Until then it stays watched, so a transaction that fails (Postgres away) leaves
    it to be decided again on the next tick, not forgotten unjudged.
    """
    meta = await _watched(step, store)
    if meta is None:
        return False
    decision = await _decide(step, now, monitor=monitor, store=store, tally=tally)
    if decision is None:
        return False
    await _give_verdict(step, meta, decision, now, monitor=monitor, store=store, publish=publish, tally=tally)
    return True


async def set_step_aside(
    step: CanaryStep,
    now: float,
    error: Exception,
    *,
    monitor: Monitor,
    store: MonitoringStore,
    publish: Publish,
    tally: Tally,
) -> bool:
    """Give a step whose decision failed for good (not an outage) its one verdict: inconclusive, saying it
    could not be judged. Serving rolls an inconclusive canary back; without a verdict the rollout would wait
    for ever, since monitoring gives one verdict per step. Returns whether the step is decided (as
    :func:`check_canary` does)."""
    meta = await _watched(step, store)
    if meta is None:
        return False
    # The error's type only: its message may carry the values that broke the decision (and Postgres text
    # cannot hold every character); the log has it whole.
    decision = CanaryDecision(
        Verdict.INCONCLUSIVE,
        [],
        f"could not be judged: the step's analysis failed with {type(error).__name__} "
        "(monitoring logged the error)",
    )
    await _give_verdict(step, meta, decision, now, monitor=monitor, store=store, publish=publish, tally=tally)
    return True


async def _watched(step: CanaryStep, store: MonitoringStore) -> StoredStep | None:
    """The stored step, while Postgres has it watched (not decided, finished or superseded)."""
    key = (step.rollout_id, step.step_index)
    return next((s for s in await store.watched_steps() if (s.rollout_id, s.step_index) == key), None)


async def _give_verdict(
    step: CanaryStep,
    meta: StoredStep,
    decision: CanaryDecision,
    now: float,
    *,
    monitor: Monitor,
    store: MonitoringStore,
    publish: Publish,
    tally: Tally,
    logged: bool = True,
) -> None:
    """Record the step as decided and publish its verdict, caused by the step's event, counted once
    committed; nothing when another replica decided it first. ``logged``: False for a verdict whose caller
    logs steps like it at most once a minute (a flood of made-up rollouts would log a line each)."""
    verdict = _verdict(step, decision, now)
    event = new_event(verdict, source=monitor.source).model_copy(
        update={"correlationid": meta.correlation_id, "causationid": meta.cause_id, "actor": meta.actor}
    )
    if not await store.decide_step(
        step.rollout_id, step.step_index, decision.verdict.value, decision.reason, event.id
    ):
        return
    await publish(event)
    await store.record_alert(
        event.id,
        step.model,
        step.canary_version,
        "CanaryVerdict",
        f"{decision.verdict.value}: {decision.reason}",
    )
    tally.add(CANARY_VERDICTS, series_model(step.model, monitor), decision.verdict.value)
    if not logged:
        return
    log.info(
        "canary verdict",
        rollout_id=step.rollout_id,
        step=step.step_index,
        verdict=decision.verdict.value,
        reason=decision.reason,
    )


async def _decide(
    step: CanaryStep, now: float, *, monitor: Monitor, store: MonitoringStore, tally: Tally
) -> CanaryDecision | None:
    policy = monitor.canary
    timed_out = now - step.bake_from >= policy.timeout_seconds
    if canary_ready(step, now) != "judge":
        if canary_timed_out(step, now, policy):
            return CanaryDecision(
                Verdict.INCONCLUSIVE,
                [
                    CanaryComparison(
                        name="canary_samples",
                        stable_value=float(step.stable.rows),
                        canary_value=float(step.canary.rows),
                        threshold=float(step.min_samples),
                        passed=None,
                        detail=f"the canary got {step.canary.rows} of {step.min_samples} predictions in "
                        f"{policy.timeout_seconds:.0f} s",
                    )
                ],
                f"timed out: canary had {step.canary.rows} of {step.min_samples} predictions",
            )
        return None
    ref = monitor.live.references.get((step.model, step.canary_version))
    if ref is None:
        # The canary's ModelVersionRegistered (its profile) may still be on its way; past the timeout the
        # step is inconclusive, as a canary without traffic is, instead of waiting for ever.
        if timed_out:
            return CanaryDecision(
                Verdict.INCONCLUSIVE,
                [],
                f"timed out: no reference profile for version {step.canary_version} of {step.model}",
            )
        return None
    labelled = await _labelled_comparison(step, ref, store, monitor.live.references)
    short = labelled.canary_n < policy.min_labelled or labelled.stable_n < policy.min_labelled
    if short and now < step.bake_from + step.bake_seconds + policy.label_grace_seconds:
        # Labels are coming when the step's predictions have some already, or when the model's labels
        # arrived lately: labels that come later than the bake time (ground truth is rarely instant) have
        # none of the step's yet when it is due, and the step waits for them too.
        flowing = labelled.stable_n > 0 or labelled.canary_n > 0
        if flowing or await store.labels_received_since(
            step.model, from_epoch(now - policy.label_grace_seconds)
        ):
            return None  # give them the grace period before judging without them
    edges = ref.prediction.edges if ref.prediction is not None else None
    if labelled.unscorable:  # counted once, with the verdict, not on every tick that waits for labels
        tally.add(UNSCORABLE, step.model, amount=labelled.unscorable)
        log.warning(
            "labelled rows that are no numbers left out of a canary comparison",
            rollout_id=step.rollout_id,
            model=step.model,
            rows=labelled.unscorable,
        )
    return judge_canary(step, task=ref.task, labelled=labelled, policy=policy, score_edges=edges)


async def _labelled_comparison(
    step: CanaryStep,
    ref: ModelReference,
    store: MonitoringStore,
    references: dict[tuple[str, int], ModelReference],
) -> LabelledComparison:
    since = from_epoch(step.started_at)
    canary = await store.labelled_outcomes(step.model, step.canary_version, since, rollout_id=step.rollout_id)
    stable = (
        await store.labelled_outcomes(step.model, step.stable_version, since, rollout_id=None)
        if step.stable_version is not None
        else []
    )
    out = LabelledComparison(stable_n=len(stable), canary_n=len(canary))
    if ref.task is Task.REGRESSION:
        stable_pred, stable_truth = regression_pairs([(p, y) for p, y, _ in stable])
        canary_pred, canary_truth = regression_pairs([(p, y) for p, y, _ in canary])
        # Infinite where a prediction and its label are too far apart for a double: judge_canary says so.
        out.stable_abs_errors = absolute_errors(stable_pred, stable_truth)
        out.canary_abs_errors = absolute_errors(canary_pred, canary_truth)
        out.stable_n, out.canary_n = stable_pred.size, canary_pred.size
        out.unscorable = len(stable) + len(canary) - out.stable_n - out.canary_n
    else:
        out.stable_correct = sum(same_label(p, y) for p, y, _ in stable)
        out.canary_correct = sum(same_label(p, y) for p, y, _ in canary)
        stable_ref = (
            references.get((step.model, step.stable_version)) if step.stable_version is not None else None
        )
        stable_classes = stable_ref.signature.classes if stable_ref is not None else None
        out.stable_outside = sum(outside_classes(y, stable_classes) for _, y, _ in stable)
        out.canary_outside = sum(outside_classes(y, ref.signature.classes) for _, y, _ in canary)
        out.classes = ref.signature.classes or ()
    return out


def _verdict(step: CanaryStep, decision: CanaryDecision, now: float) -> CanaryVerdict:
    start = step.started_at
    return CanaryVerdict(
        rollout_id=step.rollout_id,
        model=step.model,
        stable_version=step.stable_version,
        canary_version=step.canary_version,
        step_index=step.step_index,
        verdict=decision.verdict,
        evidence=decision.evidence,
        stable_samples=step.stable.rows,
        canary_samples=step.canary.rows,
        window=TrafficWindow(
            id=f"{step.rollout_id}:step{step.step_index}",
            start=from_epoch(start),
            end=from_epoch(max(now, start)),
            size=step.stable.rows + step.canary.rows,
        ),
        reason=decision.reason,
    )


# --- time-driven housekeeping ----------------------------------------------------------------------------


async def housekeeping(
    now: float, *, monitor: Monitor, store: MonitoringStore, tally: Tally
) -> list[tuple[str, str]]:
    """Close idle windows (those with too few rows to judge after the label wait, to be set aside), forget
    expired predictions and labels, give up on rollout steps whose start never came, record where a restart
    must replay from, and take changed policies. Canary verdicts are given apart, one transaction per step
    (:func:`check_canary`). Returns the expired labels: a transaction that fails leaves them waiting in
    memory, as they are in Postgres."""
    live = monitor.live
    if live.close_idle(now, set_aside_after=monitor.label_wait_seconds):
        monitor.on_windows_closed()
    live.cache.evict(now, joins_due=live.joins_due)
    live.forget_joined(now)
    expired = await store.expire_pending(from_epoch(now - monitor.label_wait_seconds))
    expired += await _give_up_too_many_waiting(len(expired), now, monitor=monitor, store=store, tally=tally)
    never_started = await store.expire_early_steps(now - monitor.rollout_start_wait_seconds)
    if never_started:
        await store.remember_given_up(never_started, now)
    _report_never_started(never_started, monitor, tally)
    await store.save_replay_offsets(monitor.predictions_topic, live.hold_offsets())
    await refresh_policies(monitor=monitor, store=store)
    return expired


async def _give_up_too_many_waiting(
    expired: int, now: float, *, monitor: Monitor, store: MonitoringStore, tally: Tally
) -> list[tuple[str, str]]:
    """Give up on the labels waiting longest past ``max_pending_labels`` (``expired`` of those in memory were
    given up already), as on those whose wait ended; count them (once committed) and log (rate-limited)."""
    excess = len(monitor.live.pending_labels) - expired - monitor.max_pending_labels
    if excess <= 0:
        return []
    given_up = await store.give_up_oldest_pending(excess)
    if given_up:
        tally.add(LABELS_NOT_KEPT, TOO_MANY_WAITING, amount=len(given_up))
        if monitor.too_many_waiting_warned.due(TOO_MANY_WAITING, now):
            log.warning(
                "too many labels waiting for their prediction: the ones waiting longest are given up as "
                "unmatched",
                given_up=len(given_up),
                max_pending_labels=monitor.max_pending_labels,
                models=sorted({model for _, model in given_up})[:10],
                hint="labels for predictions monitoring never sees (a publisher's mistake, or a flood); "
                'driftloop_monitoring_labels_not_kept_total{reason="too-many-waiting"} counts them',
            )
    return given_up


# --- retention of joined labels ------------------------------------------------------------------------


async def plan_labelled_retention(*, monitor: Monitor, store: MonitoringStore) -> list[tuple[str, datetime]]:
    """Per model, when the labels whose rows may go were received before (see :func:`prune_labelled`); none
    when they are kept for ever. Rows of a model that has no more than ``export_labelled_rows`` are kept."""
    live = monitor.live
    keep = labelled_keep(monitor.labelled_keep_days, monitor.label_wait_seconds, live.cache.max_ahead_s)
    if keep is None:
        return []
    cutoff = from_epoch(monitor.now()) - keep
    plan: list[tuple[str, datetime]] = []
    for model in await store.registered_models():
        before = cutoff
        if monitor.export_labelled_rows:
            exported = await store.export_horizon(model, monitor.export_labelled_rows)
            if exported is None:
                continue
            before = min(before, exported)
        plan.append((model, before))
    return plan


async def prune_labelled(
    model: str,
    received_before: datetime,
    *,
    received_from: datetime = EARLIEST,
    monitor: Monitor,
    store: MonitoringStore,
    limit: int,
) -> tuple[int, datetime | None]:
    """Delete one batch (up to ``limit`` rows, received from ``received_from`` on) of the model's joined
    labels that no query needs any more; returns the rows deleted and where the round's next batch of the
    model starts (None: the model's part of the round is done).

    A label's rows (one per version it joined) go together, only when every one of them is:
    - counted into a performance window (``perf_seq`` set): ``unscored`` reads only the others, and nothing
      reads a scored row's window again;
    - received before ``received_before``, which is at least :func:`labelled_keep` ago (no join, correction or
      shadow's scoring can reach it any more, and the restart's ``labels_joined_since`` reads only those
      received within the label wait; a drift window's export reads the labels of its own predictions, which
      are held) and before the oldest of the model's ``export_labelled_rows`` most recent rows (window
      exports read those for retraining);
    - predicted before the start of every rollout step of its model that is watched (the canary's labelled
      comparison reads a version's rows predicted since its step's start) or kept for its start (watched
      from that start once it comes).
    And none of them is held here for a label to come: its prediction in memory (a clock far ahead, restarts
    replaying it), its label remembered as joined, or a label waiting for its id. /v1/status counts a deleted
    label as before (``labels_pruned``), once per id as ``label_counts`` does; an id a client reuses after its
    label was deleted is then counted again, as the new label it is."""
    found = await store.prunable_labels(model, received_from, received_before, limit)
    live = monitor.live
    free = [
        pid
        for pid in dict.fromkeys(pid for pid, _ in found)
        if not live.cache.holds(model, pid)
        and (pid, model) not in live.labels_joined
        and (pid, model) not in live.pending_labels
    ]
    deleted = await store.prune_labels(model, free, received_before)
    # The next batch starts at the last row found (rows received at the same time may be left), past the rows
    # left behind (held, or not yet scored: the next round looks at them again); a batch that deletes nothing
    # and cannot move on would find the same rows again, and ends the model's part of the round.
    if found and (deleted or (len(found) >= limit and found[-1][1] > received_from)):
        return deleted, found[-1][1]
    return deleted, None


# --- reading window reports ---------------------------------------------------------------------------------


async def report_page(
    model: str, *, limit: int, after: ReportPosition | None, store: MonitoringStore
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of the model's window reports, newest first, and the cursor of the next one: None after a page
    holding fewer than ``limit`` reports (a full last page is followed by an empty one), as the registry's
    lists."""
    page = await store.latest_reports(model, limit, after=after)
    next_cursor = report_cursor(model, page[-1].position) if len(page) == limit else None
    return [judged.report for judged in page], next_cursor


# --- retention of window reports ---------------------------------------------------------------------------


def _reports_cutoff(monitor: Monitor) -> datetime | None:
    """When the window reports (and alerts) that may go were made before; None when kept for ever."""
    keep = keep_period(monitor.window_reports_keep_days)
    return None if keep is None else from_epoch(monitor.now()) - keep


async def plan_report_retention(*, monitor: Monitor, store: MonitoringStore) -> list[tuple[str, datetime]]:
    """Per model, when the window reports that may go were judged before (see
    :func:`prune_window_reports`); none when they are kept for ever (0 days, or
    :data:`~libs.bus.retention.KEEP_FOR_EVER_DAYS` or more)."""
    cutoff = _reports_cutoff(monitor)
    if cutoff is None:
        return []
    return [(model, cutoff) for model in await store.registered_models()]


async def prune_window_reports(
    model: str,
    judged_before: datetime,
    *,
    judged_from: datetime = EARLIEST,
    store: MonitoringStore,
    limit: int,
) -> tuple[int, datetime | None]:
    """Delete one batch (up to ``limit``, judged from ``judged_from`` on) of the model's window reports
    judged before ``judged_before``; returns how many went and where the round's next batch of the model
    starts (None: the model's part of the round is done).

    Only ``GET /v1/models/{model}/windows/{id}`` (the report a DriftDetected or a grouped DataQualityIssue
    links to), ``/drift`` and ``/drift.html`` (a model's latest) and ``/v1/status`` (its newest) read a
    report: so the newest of every model version stays, however old, and an older one goes once past the
    keep period. Nothing else needs one: a window judged before is recognised by ``window_state`` (a replay
    judges it no second time), debouncing reads ``window_state`` too, and a canary step's verdict reads the
    traffic and labels of its step, never a report."""
    deleted, last = await store.prune_window_reports(model, judged_from, judged_before, limit)
    # A full batch may have left rows judged at the same time as its last one: the next starts there.
    return deleted, last if deleted >= limit else None


async def plan_alert_retention(*, monitor: Monitor, store: MonitoringStore) -> list[tuple[str, datetime]]:
    """Per model, when the alerts that may go were recorded before (see :func:`prune_alerts`): past the
    window reports' keep period, and before the model's ``STATUS_ALERTS_PER_MODEL`` newest (a model with
    fewer keeps them all); none when reports are kept for ever."""
    cutoff = _reports_cutoff(monitor)
    if cutoff is None:
        return []
    plan: list[tuple[str, datetime]] = []
    for model in await store.alerted_models():
        # Alerts recorded later are newer still: the newest ones stay even if recorded during the round.
        listed = await store.alerts_horizon(model, STATUS_ALERTS_PER_MODEL)
        if listed is not None:
            plan.append((model, min(cutoff, listed)))
    return plan


async def prune_alerts(
    model: str,
    created_before: datetime,
    *,
    created_from: datetime = EARLIEST,
    store: MonitoringStore,
    limit: int,
) -> tuple[int, datetime | None]:
    """Delete one batch (up to ``limit``, recorded from ``created_from`` on) of the model's alerts recorded
    before ``created_before``; returns how many went and where the round's next batch of the model starts
    (None: the model's part of the round is done).

    Only ``GET /v1/status`` reads ``alerts``: each model's ``STATUS_ALERTS_PER_MODEL`` newest, so those stay
    however old (a model whose alerts are all older than the keep period lists the same ones as before). The
    alerts themselves were published as events, which the audit keeps."""
    deleted, last = await store.prune_alerts(model, created_from, created_before, limit)
    return deleted, last if deleted >= limit else None


# --- policies ----------------------------------------------------------------------------------------------


POLICY_HEADROOM_BYTES = 16_384
"""What a DriftPolicyChanged holds besides its two policies: the model's name, the keys, the headers."""


def policy_max_bytes(max_event_bytes: int) -> int:
    """The largest policy (as JSON) whose DriftPolicyChanged fits with any other such policy it replaces."""
    return max(0, (max_event_bytes - POLICY_HEADROOM_BYTES) // 2)


async def set_policy(
    model: str,
    fields: dict[str, Any],
    *,
    actor: str,
    monitor: Monitor,
    store: MonitoringStore,
    publish: Publish,
) -> StoredPolicy:
    """An operator sets a model's drift policy (omitted fields take the service defaults): stored with who
    set it and published as DriftPolicyChanged for the audit trail, in the caller's transaction. Returns it
    with its stored version, which the caller puts in force here once committed (:meth:`Monitor.hold_policy`);
    every other replica takes it at its next tick."""
    policy = DriftPolicy.model_validate({**monitor.defaults.model_dump(), **fields})
    # DriftPolicyChanged carries the policy and the one it replaces: a policy over half of what consumers
    # accept could be set once and then never changed (every later change too large to announce).
    size, most = len(policy.model_dump_json().encode()), policy_max_bytes(monitor.max_event_bytes)
    if size > most:
        raise InvalidInput(
            f"the policy takes {size:,} bytes as JSON; a policy may take at most {most:,} bytes: "
            f"DriftPolicyChanged carries it and the policy it replaces, and consumers accept "
            f"{monitor.max_event_bytes:,} bytes (max_event_bytes). Name fewer features in feature_tests "
            "and feature_thresholds (the others take the automatic test and the policy's thresholds)",
            field="feature_tests",
        )
    _refuse_unknown_features(model, policy, monitor)
    # Locked: two changes at once would otherwise both read the same policy, and one DriftPolicyChanged would
    # name as replaced a policy the other had already replaced.
    previous = await store.policy(model, lock=True)
    version = await store.save_policy(model, policy, actor)
    changed = DriftPolicyChanged(model=model, policy=policy, previous=previous)
    await publish(new_event(changed, source=monitor.source, actor=actor))
    return StoredPolicy(policy, version)


FEATURES_LISTED = 10
"""Features of the model a message about a policy naming others lists."""
UNKNOWN_FEATURES_SHOWN = 3
"""Names a message about a policy naming features the model lacks quotes."""


def _refuse_unknown_features(model: str, policy: DriftPolicy, monitor: Monitor) -> None:
    """Refuse a policy naming a feature no registered version of the model has: a misspelt name would be
    stored and announced, and never applied. A model with no version known yet takes any name."""
    known: dict[str, None] = {}
    for (name, _), ref in sorted(monitor.live.references.items()):
        if name == model:
            known.update(dict.fromkeys(f.name for f in ref.signature.features))
    if not known:
        return
    for field_name, named in (
        ("feature_tests", policy.feature_tests),
        ("feature_thresholds", policy.feature_thresholds),
    ):
        unknown = [repr(shown_name(f)) for f in named if f not in known]
        if not unknown:
            continue
        quoted = unknown[:UNKNOWN_FEATURES_SHOWN]
        rest = len(unknown) - len(quoted)
        names = ", ".join(quoted[:-1]) + " and " + quoted[-1] if len(quoted) > 1 else quoted[0]
        if rest:
            names = f"{', '.join(quoted)} and {rest:,} more"
        listed = ", ".join(shown_name(f) for f in list(known)[:FEATURES_LISTED])
        if len(known) > FEATURES_LISTED:
            listed += f", ... ({len(known):,} features)"
        raise InvalidInput(
            f"{field_name} names {names}, which no version of model {model!r} has (its features: {listed}); "
            "name features of the model, or set the policy again once a version with them is registered",
            field=field_name,
        )


async def refresh_policies(*, monitor: Monitor, store: MonitoringStore) -> None:
    """Take the stored policies when any changed since the last look (set through another replica)."""
    fingerprint = await store.policies_fingerprint()
    if fingerprint != monitor.policies_fingerprint:
        stored = await store.policies()
        monitor.policies = {model: s.policy for model, s in stored.items()}
        monitor.policy_versions = {model: s.version for model, s in stored.items()}
        monitor.policies_fingerprint = fingerprint


def finite_or_none(x: float | None) -> float | None:
    """JSON-safe number."""
    return None if x is None or not math.isfinite(x) else x


HANDLERS: dict[type, Callable[..., Awaitable[Any]]] = {
    ModelVersionRegistered: on_model_version_registered,
    PredictionsLogged: on_predictions_logged,
    GroundTruthReceived: on_ground_truth_received,
    RolloutStarted: on_rollout_started,
    RolloutStepAdvanced: on_rollout_step_advanced,
    RolloutPromoted: on_rollout_finished,
    RolloutRolledBack: on_rollout_finished,
}
