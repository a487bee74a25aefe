"""Training's event handlers: every trigger goes through the retrain policy, which publishes
TrainingRequested (and creates the job) or TrainingSkipped with the reason. Training consumes its own
TrainingRequested and hands the job to the job runner (runner.py), which runs it off the event loop.

Handlers are plain functions; bootstrap binds the ports of the delivery's transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from contracts.commands import RetrainRequested
from contracts.common import DatasetRef, EventRef, Stage, TrafficWindow
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent, EventPayload, new_event
from contracts.models import (
    ModelStageChanged,
)
from contracts.monitoring import DriftDetected, PerformanceDegraded
from contracts.training import (
    ModelSpecRegistered,
    SkipReason,
    TrainingRequested,
    TrainingSkipped,
    TrainingTrigger,
)
from libs.bus import PermanentError
from libs.errors import NotFound
from libs.logging import get_logger
from libs.modelspec import ModelSpec
from libs.stage_order import take_in_order
from services.training.domain import JobPosition, JobState, Trigger, decide, job_cursor, job_id_for
from services.training.ports import (
    Datasets,
    Job,
    Jobs,
    ProductionVersions,
    Publish,
    RequestEnvelope,
    Specs,
    SpecStore,
    StoredSpec,
)

log = get_logger(__name__)

# Sources of the dataset versions training itself materialises: never a reason to retrain.
OWN_SOURCES = ("training-set:", "holdout:")


# --- the core, shared with the HTTP API ---------------------------------------------------------------


async def register_spec(
    spec: ModelSpec,
    *,
    actor: str | None,
    specs: Specs,
    spec_store: SpecStore,
    publish: Publish,
    source: str,
) -> StoredSpec:
    """Store the canonical spec in the artifact store, make it the model's current spec and announce it
    (ModelSpecRegistered, with the actor); registering the same spec again changes nothing."""
    previous = await specs.get(spec.name)
    artifact = await spec_store.put_spec(spec)
    stored = await specs.put(spec, artifact, actor=actor)
    if previous is not None and previous.spec_hash == stored.spec_hash:
        return stored
    registered = ModelSpecRegistered(
        model=spec.name,
        spec_hash=stored.spec_hash,
        spec=artifact,
        task=spec.task,
        estimator=spec.estimator,
        base_datasets=list(spec.base_datasets),
        previous_spec_hash=previous.spec_hash if previous is not None else None,
    )
    await publish(new_event(registered, source=source, actor=actor))
    log.info("spec registered", model=spec.name, spec_hash=stored.spec_hash, actor=actor)
    return stored


async def current_spec(model: str, *, specs: Specs) -> StoredSpec:
    """The model's spec, or 404."""
    stored = await specs.get(model)
    if stored is None:
        raise NotFound(f"model {model!r} has no spec; register one with PUT /v1/models/{model}/spec")
    return stored


async def job(job_id: str, *, jobs: Jobs) -> Job:
    """One job, or 404."""
    found = await jobs.get(job_id)
    if found is None:
        raise NotFound(f"no training job {job_id!r}")
    return found


async def job_page(
    model: str, *, limit: int, after: JobPosition | None, jobs: Jobs
) -> tuple[list[Job], str | None]:
    """A page of the model's jobs, newest first, and the cursor of the next one: None after a page holding
    fewer than ``limit`` jobs (a full last page is followed by an empty one), as the registry's lists."""
    page = await jobs.for_model(model, limit=limit, after=after)
    if len(page) < limit:
        return page, None
    last = page[-1]
    return page, job_cursor(model, JobPosition(last.created_at, last.job_id))


async def request_retrain(
    cause: CloudEvent[Any],
    *,
    model: str,
    trigger: Trigger,
    reason: str,
    window: TrafficWindow | None,
    about_version: int | None = None,
    specs: Specs,
    datasets: Datasets,
    jobs: Jobs,
    production: ProductionVersions,
    publish: Publish,
    source: str,
    **_: Any,
) -> Job | None:
    """Apply the retrain policy to a trigger: create a job and publish TrainingRequested, or publish
    TrainingSkipped with the reason. Returns the job when one was created."""
    trigger_event = EventRef(id=cause.id, type=cause.type)

    async def skip(why: SkipReason, message: str, **extra: Any) -> None:
        skipped = TrainingSkipped(
            model=model,
            trigger=trigger.kind,
            trigger_event=trigger_event,
            reason=why,
            message=message,
            **extra,
        )
        log.info("retrain skipped", model=model, trigger=trigger.kind.value, reason=why.value, detail=message)
        await publish(new_event(skipped, source=source, cause=cause))

    stored = await specs.get(model)
    if stored is None:
        await skip(
            SkipReason.UNKNOWN_MODEL,
            f"model {model!r} has no spec; register one with PUT /v1/models/{model}/spec on training",
        )
        return None
    production_version = await production.get(model)
    if about_version is not None and production_version is not None and about_version != production_version:
        await skip(
            SkipReason.NOT_PRODUCTION,
            f"the trigger is about version {about_version}, but {production_version} is in production; "
            "a canary is judged by its rollout, not retrained",
        )
        return None
    now = await jobs.now()
    decision = decide(stored.spec.retrain, await jobs.policy_state(model, now), trigger, now)
    if not decision.accepted:
        assert decision.reason is not None
        await skip(
            decision.reason,
            decision.message,
            in_flight_job_id=decision.in_flight_job_id,
            retry_after_seconds=decision.retry_after_seconds,
        )
        return None
    base, missing = await base_versions(stored.spec, datasets=datasets)
    if missing is not None:
        await skip(SkipReason.NO_DATASET, missing)
        return None
    request = TrainingRequested(
        job_id=job_id_for(model, cause.id),
        model=model,
        trigger=trigger.kind,
        reason=reason,
        trigger_event=trigger_event,
        datasets=base,
        traffic_window=window if window is not None and window.data is not None else None,
        parent_version=production_version,
    )
    event = new_event(request, source=source, cause=cause)
    created = new_job(event, stored, created_at=now)
    await jobs.create(created)
    await publish(event)
    log.info("retrain requested", model=model, job_id=request.job_id, trigger=trigger.kind.value)
    return created


async def base_versions(spec: ModelSpec, *, datasets: Datasets) -> tuple[list[DatasetRef], str | None]:
    """The latest version of each of the spec's base datasets, pinned by hash, and None; or no versions and
    why there is nothing to train on."""
    pinned: list[DatasetRef] = []
    for name in spec.base_datasets:
        found = await datasets.latest(name)
        if found is None:
            return [], f"base dataset {name!r} has no version yet; upload it first"
        pinned.append(found.ref())
    if not pinned:
        return [], "the spec names no base datasets (base_datasets is empty)"
    return pinned, None


def new_job(event: CloudEvent[TrainingRequested], stored: StoredSpec, *, created_at: datetime) -> Job:
    """The job a TrainingRequested asks for, on the model's stored spec, not started yet."""
    return Job(
        job_id=event.data.job_id,
        model=event.data.model,
        state=JobState.REQUESTED,
        trigger=event.data.trigger.value,
        request=event.data,
        request_event=envelope_of(event),
        spec_hash=stored.spec_hash,
        spec_artifact=stored.artifact,
        attempts=0,
        run_id=None,
        created_at=created_at,
    )


def envelope_of(event: CloudEvent[Any]) -> RequestEnvelope:
    """The attributes of an event that later events of its cascade need."""
    return RequestEnvelope(
        id=event.id,
        source=event.source,
        type=event.type,
        correlationid=event.correlationid,
        causationid=event.causationid,
        actor=event.actor,
        subject=event.subject,
    )


# --- the handlers ---------------------------------------------------------------------------------------


async def on_drift_detected(event: CloudEvent[DriftDetected], **ports: Any) -> None:
    """Drift: retrain on base data plus whatever the window has labelled (labels may still be on the way)."""
    d = event.data
    # The totals count every feature; the lists may hold the most drifted only (evidence_truncated).
    drifted = d.drifted_features_total or len(d.drifted_features)
    reason = (
        f"drift in {drifted} of {d.features_total or len(d.features)} features "
        f"(share {d.drift_share:.2f} >= {d.share_threshold:.2f}) on version {d.model_version}"
    )
    await request_retrain(
        event,
        model=d.model,
        trigger=Trigger(TrainingTrigger.DRIFT_DETECTED),
        reason=reason,
        window=d.window,
        about_version=d.model_version,
        **ports,
    )


async def on_performance_degraded(event: CloudEvent[PerformanceDegraded], **ports: Any) -> None:
    """Degraded performance: retrain only with enough labels of the new concept."""
    d = event.data
    direction = "below" if d.higher_is_better else "above"
    reason = (
        f"{d.metric} {d.value:.4g} is {direction} the threshold {d.threshold:.4g} on version "
        f"{d.model_version} ({d.labelled_rows} labelled rows)"
    )
    await request_retrain(
        event,
        model=d.model,
        trigger=Trigger(TrainingTrigger.PERFORMANCE_DEGRADED, labelled_rows=d.labelled_rows),
        reason=reason,
        window=d.window,
        about_version=d.model_version,
        **ports,
    )


async def on_retrain_requested(event: CloudEvent[RetrainRequested], **ports: Any) -> None:
    """A person asked; the policy still decides (cooldown may be waived, never in-flight or budget)."""
    d = event.data
    await request_retrain(
        event,
        model=d.model,
        trigger=Trigger(TrainingTrigger.MANUAL, ignore_cooldown=d.ignore_cooldown),
        reason=f"requested by {event.actor or 'an unnamed caller'}: {d.reason}",
        window=None,
        **ports,
    )


async def on_dataset_registered(
    event: CloudEvent[DatasetRegistered], *, datasets: Datasets, specs: Specs, **ports: Any
) -> None:
    """Remember the version; retrain the models it is meant for when their policy says so.

    A version already known is announced again (a replay, a producer's retry under a new event id): with the
    same file it changes nothing and starts no second run; with another file it is dead-lettered."""
    d = event.data
    if not await datasets.record(d):
        held = await datasets.get(d.name, d.dataset_version)
        if held is not None and held.sha256 != d.sha256:
            raise PermanentError(
                f"dataset {d.name} version {d.dataset_version} is already known with sha256 {held.sha256} "
                f"(source {held.source}); this event says {d.sha256}: a version names one file"
            )
        log.info(
            "dataset version announced again; already known, no retrain",
            dataset=d.name,
            version=d.dataset_version,
            event_id=event.id,
        )
        return
    if d.source.startswith(OWN_SOURCES):
        return
    models = sorted(set(d.models) | set(await specs.models_for_dataset(d.name)))
    for model in models:
        stored = await specs.get(model)
        if stored is not None and not stored.spec.retrain.train_on_new_dataset:
            continue
        if stored is None and model not in d.models:
            continue
        await request_retrain(
            event,
            model=model,
            trigger=Trigger(TrainingTrigger.DATASET_REGISTERED),
            reason=f"new dataset {d.name} v{d.dataset_version} ({d.row_count} rows)",
            window=None,
            datasets=datasets,
            specs=specs,
            **ports,
        )


async def on_training_requested(
    event: CloudEvent[TrainingRequested],
    *,
    jobs: Jobs,
    specs: Specs,
    datasets: Datasets,
    publish: Publish,
    source: str,
    **_: Any,
) -> None:
    """Hand the job to the job runner (recording it first if this store has not seen it).

    A request this service did not record itself is refused in the open: with no spec for its model it is
    dead-lettered; with another job of its model in flight it gets TrainingSkipped (one run per model). One
    naming a known job with another request than that job's is dead-lettered: taken for the known job, what
    it asks for would silently never happen. One naming no datasets (the contract: the ones the model's spec
    names) has the latest version of each pinned in its job, as the policy pins them, or gets
    TrainingSkipped (no-dataset) when one has none."""
    d = event.data

    async def skip(why: SkipReason, message: str, **extra: Any) -> None:
        skipped = TrainingSkipped(
            model=d.model,
            trigger=d.trigger,
            trigger_event=EventRef(id=event.id, type=event.type),
            reason=why,
            message=message,
            **extra,
        )
        log.info("training request skipped", model=d.model, job_id=d.job_id, reason=why.value, detail=message)
        await publish(new_event(skipped, source=source, cause=event))

    existing = await jobs.get(d.job_id)
    if existing is not None:
        if differing := [
            name
            for name in type(d).model_fields
            if getattr(existing.request, name) != getattr(d, name)
            # No datasets mean the spec's, which the job pinned when this request (re-sent) created it.
            and not (name == "datasets" and not d.datasets)
        ]:
            raise PermanentError(
                f"job {d.job_id} is already the request of model {existing.request.model!r}; this "
                f"TrainingRequested names model {d.model!r} and differs from it in {', '.join(differing)}: "
                "a job id names one request"
            )
        await jobs.dispatch(existing)
        return
    stored = await specs.get(d.model)
    if stored is None:
        raise PermanentError(f"training requested for model {d.model!r}, which has no spec (job {d.job_id})")
    if not d.datasets:
        # Pinned now, for every run of the job: left empty, no run could start (TrainingStarted names at least
        # one dataset), and the runner retried the oldest job's start for ever, every job behind it waiting.
        base, missing = await base_versions(stored.spec, datasets=datasets)
        if missing is not None:
            await skip(SkipReason.NO_DATASET, f"{missing}: {d.job_id} not run")
            return
        event = event.model_copy(update={"data": d.model_copy(update={"datasets": base})})
    # Created now, not at the event's time: a clock years ahead (or before 1970) in another producer's
    # envelope would otherwise count the job in the daily budget for years, or never.
    now = await jobs.now()
    if await jobs.dispatch(new_job(event, stored, created_at=now)) or await jobs.get(d.job_id) is not None:
        return
    in_flight = (await jobs.policy_state(d.model, now)).in_flight_job_id
    await skip(
        SkipReason.IN_FLIGHT,
        f"job {in_flight} of model {d.model!r} is in flight (one run per model): {d.job_id} not run",
        in_flight_job_id=in_flight,
    )


async def on_model_stage_changed(
    event: CloudEvent[ModelStageChanged], *, production: ProductionVersions, **_: Any
) -> None:
    """Track the production version: the parent of the next model. A change older than the last one applied
    (by the registry's ``sequence``) is dead-lettered: applied, it would move the parent back."""
    d = event.data
    if not await take_in_order(event, production):
        log.info("stage change received again; already applied", model=d.model, sequence=d.sequence)
        return
    if d.to_stage is Stage.PRODUCTION:
        await production.set(d.model, d.model_version)
    elif d.from_stage is Stage.PRODUCTION:
        await production.clear(d.model, d.model_version)


TrainingHandler = Callable[..., Awaitable[None]]

HANDLERS: dict[type[EventPayload], TrainingHandler] = {
    DatasetRegistered: on_dataset_registered,
    DriftDetected: on_drift_detected,
    PerformanceDegraded: on_performance_degraded,
    RetrainRequested: on_retrain_requested,
    TrainingRequested: on_training_requested,
    ModelStageChanged: on_model_stage_changed,
}
"""Event type -> handler. Every handler receives the same ports (specs, datasets, jobs, production,
publish, source) and takes what it needs."""
