"""Serving's event handlers: one plain async function per event type, the HANDLERS table at the bottom.

Each runs in the consumer's transaction (inbox + outbox), in whichever replica of the ``serving`` group
owns the partition: the state transition and its events happen once. Every replica then follows the
committed state through its routing sync (see services/serving/routing.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

from contracts.commands import PromoteRequested, RollbackRequested
from contracts.common import Stage
from contracts.envelope import CloudEvent, EventPayload, new_event
from contracts.models import ModelStageChanged, ModelVersionRegistered
from contracts.monitoring import CanaryVerdict, Verdict
from contracts.rollouts import RollbackReason, RolloutPromoted, RolloutRolledBack
from contracts.validation import ValidationPassed
from libs.bus import PermanentError
from libs.logging import get_logger
from services.serving import domain
from services.serving.domain import ModelRoute, RolloutPolicy, Transition
from services.serving.ports import ModelLoader, ModelLoadError, ModelVersions, Routes, VersionRecord

log = get_logger(__name__)

IGNORED = Counter(
    "driftloop_serving_ignored_events_total",
    "Events that changed nothing (stale or out-of-order verdicts, premature verdicts, duplicates of a "
    "decision already taken), by event type and reason.",
    ["event", "reason"],
)
TRANSITIONS = Counter(
    "driftloop_serving_rollout_transitions_total", "Rollout events emitted, by type.", ["event"]
)

Publish = Callable[[CloudEvent[Any]], Awaitable[None]]
Clock = Callable[[], datetime]
NewId = Callable[[], str]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_rollout_id() -> str:
    return f"r-{uuid.uuid4().hex[:12]}"


def _ignored(event_name: str, model: str, t: Transition) -> None:
    assert t.ignored is not None
    IGNORED.labels(event_name, t.ignored.code).inc()
    log.info(
        "event changed nothing",
        event_type_name=event_name,
        model=model,
        reason=t.ignored.code,
        detail=t.ignored.detail,
    )


async def apply(
    before: ModelRoute,
    t: Transition,
    *,
    routes: Routes,
    versions: ModelVersions,
    publish: Publish,
    source: str,
    now: datetime,
    cause: CloudEvent[Any] | None = None,
    actor: str | None = None,
) -> list[CloudEvent[Any]]:
    """Store the new route and publish its events in the caller's transaction; ``before`` is the route
    the transition was decided on. An event about a rollout joins the rollout's cascade."""
    await routes.save(t.route, now=now)
    cascade_of = domain.cascades(before, t)
    emitted = []
    for payload in t.events:
        if isinstance(payload, RolloutRolledBack):
            await versions.set_stage(t.route.model, payload.canary_version, Stage.REJECTED.value)
        correlation_id = cascade_of.get(getattr(payload, "rollout_id", ""))
        event = new_event(payload, source=source, cause=cause, actor=actor, correlation_id=correlation_id)
        await publish(event)
        TRANSITIONS.labels(type(payload).__name__).inc()
        emitted.append(event)
    if t.events:
        log.info("rollout changed", model=t.route.model, events=[type(p).__name__ for p in t.events])
    return emitted


_SERVING_DECISIONS = frozenset(p.event_type() for p in (RolloutPromoted, RolloutRolledBack))
"""Serving's events the registry follows by moving a version to production (its ``caused_by``)."""


def _refuse_rejected(event_name: str, record: VersionRecord, what: str) -> None:
    """A version once rolled back never serves again (a command that says otherwise was sent before the
    rollback, or names the wrong version): :class:`PermanentError`, so the command is dead-lettered."""
    if record.stage == Stage.REJECTED.value:
        IGNORED.labels(event_name, "retired-version").inc()
        raise PermanentError(
            f"{record.model} v{record.version} was rolled back (rejected) and {what}; register a new version"
        )


async def _start_if_ready(
    cause: CloudEvent[Any],
    record: VersionRecord,
    *,
    versions: ModelVersions,
    routes: Routes,
    loader: ModelLoader,
    publish: Publish,
    source: str,
    policy: RolloutPolicy,
    clock: Clock,
    new_id: NewId,
) -> None:
    """Start the rollout of a version that is both registered and validated."""
    name = type(cause.data).__name__
    if not (record.registered and record.validated):
        log.info(
            "version not ready for a rollout yet",
            model=record.model,
            version=record.version,
            registered=record.registered,
            validated=record.validated,
        )
        return
    if record.stage in (Stage.REJECTED.value, Stage.ARCHIVED.value):
        IGNORED.labels(name, "retired-version").inc()
        log.info(
            "version is retired, no rollout", model=record.model, version=record.version, stage=record.stage
        )
        return
    route = await routes.lock(record.model)
    now = clock()
    rollout_id = new_id()
    t = domain.start_rollout(
        route,
        record.version,
        policy,
        rollout_id=rollout_id,
        now=now,
        report_id=record.validation_report_id,
        correlation_id=cause.correlationid,
    )
    if t.ignored is not None:
        _ignored(name, record.model, t)
        return
    try:
        # This replica proves the artifact loads and answers before any traffic moves to it.
        await loader.load(record)
    except ModelLoadError as exc:
        await versions.load_failed(record.model, record.version, str(exc))
        await versions.set_stage(record.model, record.version, Stage.REJECTED.value)
        failed = RolloutRolledBack(
            rollout_id=rollout_id,
            model=record.model,
            stable_version=route.stable_version,
            canary_version=record.version,
            step_index=0,
            weight=0.0,
            reason=RollbackReason.LOAD_FAILED,
            message=str(exc),
        )
        await publish(new_event(failed, source=source, cause=cause))
        TRANSITIONS.labels("RolloutRolledBack").inc()
        log.error(
            "version cannot be loaded, no rollout", model=record.model, version=record.version, error=str(exc)
        )
        return
    await apply(
        route, t, routes=routes, versions=versions, publish=publish, source=source, now=now, cause=cause
    )


async def on_model_version_registered(
    event: CloudEvent[ModelVersionRegistered],
    *,
    versions: ModelVersions,
    routes: Routes,
    loader: ModelLoader,
    publish: Publish,
    source: str,
    policy: RolloutPolicy,
    clock: Clock = utcnow,
    new_id: NewId = new_rollout_id,
) -> None:
    """Record where the version's artifact is and its signature; start its rollout if it already passed.
    A version's artifact never changes: a registration naming another one for a version serving knows is
    dead-lettered (taken, the next routing sync would serve other bytes under the same version)."""
    d = event.data
    known = await versions.get(d.model, d.model_version)
    if known is not None and known.artifact_key is not None and known.artifact_key != d.artifact.key:
        IGNORED.labels("ModelVersionRegistered", "other-artifact").inc()
        raise PermanentError(
            f"{d.model} v{d.model_version} is registered with artifact {known.artifact_key[:12]}…; this "
            f"registration names another ({d.artifact.key[:12]}…): a version's artifact never changes, "
            "register a new version"
        )
    record = await versions.registered(
        d.model, d.model_version, artifact_key=d.artifact.key, signature=d.signature, stage=d.stage.value
    )
    await _start_if_ready(
        event,
        record,
        versions=versions,
        routes=routes,
        loader=loader,
        publish=publish,
        source=source,
        policy=policy,
        clock=clock,
        new_id=new_id,
    )


async def on_validation_passed(
    event: CloudEvent[ValidationPassed],
    *,
    versions: ModelVersions,
    routes: Routes,
    loader: ModelLoader,
    publish: Publish,
    source: str,
    policy: RolloutPolicy,
    clock: Clock = utcnow,
    new_id: NewId = new_rollout_id,
) -> None:
    """A validated version starts its rollout (or waits for its registration, which may come later)."""
    d = event.data
    record = await versions.validated(d.model, d.model_version, report_id=d.report_id)
    await _start_if_ready(
        event,
        record,
        versions=versions,
        routes=routes,
        loader=loader,
        publish=publish,
        source=source,
        policy=policy,
        clock=clock,
        new_id=new_id,
    )


async def on_canary_verdict(
    event: CloudEvent[CanaryVerdict],
    *,
    versions: ModelVersions,
    routes: Routes,
    loader: ModelLoader,
    publish: Publish,
    source: str,
    policy: RolloutPolicy,
    clock: Clock = utcnow,
    new_id: NewId = new_rollout_id,
) -> None:
    """Advance, promote or roll back on monitoring's verdict; stale verdicts are ignored and counted."""
    d = event.data
    route = await routes.lock(d.model)
    now = clock()
    healthy = {Verdict.HEALTHY: True, Verdict.UNHEALTHY: False}.get(d.verdict)
    t = domain.judge_verdict(
        route,
        rollout_id=d.rollout_id,
        step_index=d.step_index,
        canary_version=d.canary_version,
        healthy=healthy,
        canary_samples=d.canary_samples,
        reason=d.reason,
        now=now,
    )
    if t.ignored is not None:
        _ignored("CanaryVerdict", d.model, t)
        return
    await apply(
        route, t, routes=routes, versions=versions, publish=publish, source=source, now=now, cause=event
    )


async def on_rollback_requested(
    event: CloudEvent[RollbackRequested],
    *,
    versions: ModelVersions,
    routes: Routes,
    loader: ModelLoader,
    publish: Publish,
    source: str,
    policy: RolloutPolicy,
    clock: Clock = utcnow,
    new_id: NewId = new_rollout_id,
) -> None:
    """Take the named version off traffic: the live canary at once, or production back to an earlier one."""
    d = event.data
    route = await routes.lock(d.model)
    if not route.known:
        # A command naming what serving lacks is refused in the open, as one naming an unknown version is.
        IGNORED.labels("RollbackRequested", "unknown-model").inc()
        raise PermanentError(
            f"model {d.model!r} has no version serving: serving never served it, so it has nothing to roll "
            f"back (version {d.model_version})"
        )
    now = clock()
    live = route.active
    message = f"manual rollback by {event.actor or 'unknown'}: {d.reason}"
    if live is not None and live.canary_version == d.model_version:
        t = domain.rollback(route, reason=RollbackReason.MANUAL, message=message, now=now)
    else:
        if d.to_version is not None:
            await _check_target(
                "RollbackRequested",
                d.model,
                d.to_version,
                role="rollback target",
                versions=versions,
                loader=loader,
            )
        t = domain.roll_back_production(
            route,
            version=d.model_version,
            to_version=d.to_version,
            message=message,
            now=now,
            rollout_id=new_id(),
            correlation_id=event.correlationid,
        )
        if t.ignored is None and d.to_version is None and t.route.stable_version is not None:
            # The previous stable version goes back on all traffic: it must load as a named one must.
            await _check_target(
                "RollbackRequested",
                d.model,
                t.route.stable_version,
                role="rollback target",
                versions=versions,
                loader=loader,
            )
    if t.ignored is not None:
        _ignored("RollbackRequested", d.model, t)
        return
    await apply(
        route, t, routes=routes, versions=versions, publish=publish, source=source, now=now, cause=event
    )


async def _check_target(
    command: str, model: str, version: int, *, role: str, versions: ModelVersions, loader: ModelLoader
) -> None:
    """The version a command puts on all traffic (``role``: what it would be, as the errors say) is
    registered, not rolled back, and loads; otherwise :class:`PermanentError` (the command is dead-lettered)
    and the model's traffic stays as it is: a version that cannot load would leave it with none that
    answers."""
    target = await versions.get(model, version)
    if target is None or not target.registered:
        IGNORED.labels(command, "unknown-version").inc()
        raise PermanentError(f"{role} {model} v{version} is not a registered version")
    _refuse_rejected(command, target, f"cannot be the {role}")
    try:
        await loader.load(target)
    except ModelLoadError as exc:
        IGNORED.labels(command, "load-failed").inc()
        raise PermanentError(f"{role} {model} v{version} cannot be loaded: {exc}") from exc


async def on_promote_requested(
    event: CloudEvent[PromoteRequested],
    *,
    versions: ModelVersions,
    routes: Routes,
    loader: ModelLoader,
    publish: Publish,
    source: str,
    policy: RolloutPolicy,
    clock: Clock = utcnow,
    new_id: NewId = new_rollout_id,
) -> None:
    """Give the named version all traffic now: the live canary as it stands, or any registered version."""
    d = event.data
    route = await routes.lock(d.model)
    now = clock()
    live = route.active
    if live is None or live.canary_version != d.model_version:
        await _check_target(
            "PromoteRequested",
            d.model,
            d.model_version,
            role="promotion target",
            versions=versions,
            loader=loader,
        )
    t = domain.promote(
        route,
        d.model_version,
        now=now,
        manual=True,
        rollout_id=new_id(),
        correlation_id=event.correlationid,
    )
    if t.ignored is not None:
        _ignored("PromoteRequested", d.model, t)
        return
    await apply(
        route, t, routes=routes, versions=versions, publish=publish, source=source, now=now, cause=event
    )


async def on_model_stage_changed(
    event: CloudEvent[ModelStageChanged],
    *,
    versions: ModelVersions,
    routes: Routes,
    loader: ModelLoader,
    publish: Publish,
    source: str,
    policy: RolloutPolicy,
    clock: Clock = utcnow,
    new_id: NewId = new_rollout_id,
) -> None:
    """Mirror the registry's stage; a version moved to production there (a manual change) becomes stable.
    A move to production that follows serving's own promotion or rollback changes nothing: serving took
    that decision itself, and when the version is no longer stable it has decided again since (an echo
    arriving late would put a superseded version back on all traffic).
    A version serving rolled back stays off traffic: the registry only archives a rejected version, so a
    change of it to another stage was sent before the registry learnt of the rollback, and is ignored.
    So is a change of a version serving never learnt of: the registry announces a version before changing
    its stage, so the change is no news of it, and mirrored it would stick to the version if registered."""
    d = event.data
    known = await versions.get(d.model, d.model_version)
    if known is None:
        _stage_change_ignored(d, "unknown-version", "stage change of a version serving never learnt of")
        return
    if d.to_stage not in (Stage.REJECTED, Stage.ARCHIVED) and known.stage == Stage.REJECTED.value:
        _stage_change_ignored(d, "retired-version", "stage change of a version serving rolled back is stale")
        return
    await versions.set_stage(d.model, d.model_version, d.to_stage.value)
    if d.to_stage is not Stage.PRODUCTION:
        return
    route = await routes.lock(d.model)
    if route.stable_version == d.model_version:
        return  # our own promotion coming back from the registry
    record = await versions.get(d.model, d.model_version)
    if record is None or not record.registered:
        IGNORED.labels("ModelStageChanged", "unknown-version").inc()
        log.warning("production version is unknown to serving", model=d.model, version=d.model_version)
        return
    now = clock()
    following_serving = d.caused_by is not None and d.caused_by.type in _SERVING_DECISIONS
    t = domain.production_changed(route, d.model_version, now=now, following_serving=following_serving)
    if t.ignored is not None:
        _ignored("ModelStageChanged", d.model, t)
        return
    try:
        await loader.load(record)
    except ModelLoadError as exc:
        IGNORED.labels("ModelStageChanged", "load-failed").inc()
        log.error(
            "production version cannot be loaded, keeping the current one", model=d.model, error=str(exc)
        )
        return
    await apply(
        route, t, routes=routes, versions=versions, publish=publish, source=source, now=now, cause=event
    )


def _stage_change_ignored(d: ModelStageChanged, reason: str, message: str) -> None:
    IGNORED.labels("ModelStageChanged", reason).inc()
    log.warning(f"{message}, ignored", model=d.model, version=d.model_version, to_stage=d.to_stage.value)


async def roll_back_for_error_rate(
    model: str,
    rollout_id: str,
    message: str,
    *,
    versions: ModelVersions,
    routes: Routes,
    publish: Publish,
    source: str,
    clock: Clock = utcnow,
) -> bool:
    """Serving saw the canary fail too often: roll that rollout back (no-op if it is no longer live)."""
    route = await routes.lock(model)
    now = clock()
    t = domain.rollback(
        route, reason=RollbackReason.ERROR_RATE, message=message, now=now, rollout_id=rollout_id
    )
    if t.ignored is not None:
        _ignored("ErrorRateBreach", model, t)
        return False
    await apply(route, t, routes=routes, versions=versions, publish=publish, source=source, now=now)
    return True


Handler = Callable[..., Awaitable[None]]

HANDLERS: dict[type[EventPayload], Handler] = {
    ModelVersionRegistered: on_model_version_registered,
    ModelStageChanged: on_model_stage_changed,
    ValidationPassed: on_validation_passed,
    CanaryVerdict: on_canary_verdict,
    RollbackRequested: on_rollback_requested,
    PromoteRequested: on_promote_requested,
}
