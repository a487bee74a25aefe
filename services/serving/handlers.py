"""Serving's event handlers: one plain async function per event type, the HANDLERS table at the bottom.

Each runs in the consumer's transaction (inbox + outbox), in whichever replica of the ``serving`` group
owns the partition: the state transition and its events happen once. Every replica then follows the
committed state through its routing sync (see services/serving/routing.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from prometheus_client import Counter

from contracts.commands import PromoteRequested, RollbackRequested
from contracts.common import ModelSignature, Stage
from contracts.envelope import CloudEvent, EventPayload, new_event
from contracts.models import (
    ModelStageChanged,
    ModelVersionRegistered,
)
from contracts.monitoring import CanaryVerdict, Verdict
from contracts.rollouts import RollbackReason, RolloutPromoted, RolloutRolledBack
from contracts.validation import ValidationPassed
from libs.bus import PermanentError, Transaction
from libs.logging import get_logger
from libs.stage_order import take_in_order
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
NewId = Callable[[], str]


def new_rollout_id() -> str:
    return f"r-{uuid.uuid4().hex[:12]}"


class Tally:
    """The counts one event's handling makes, made once its outcome is settled (:func:`handle`): when its
    transaction commits, or once it is dead-lettered. The bus replays a poll whose group commit failed one
    event per transaction, and retries a failing handler, so a handler may run several times for one event;
    counted as it ran, an event in a failed poll was counted once per run."""

    def __init__(self) -> None:
        self._counts: list[tuple[Counter, tuple[str, ...]]] = []

    def ignored(self, event_name: str, reason: str) -> None:
        """An event that changed nothing, or was refused, for ``reason``."""
        self._counts.append((IGNORED, (event_name, reason)))

    def transition(self, event_name: str) -> None:
        """A rollout event emitted."""
        self._counts.append((TRANSITIONS, (event_name,)))

    def count(self) -> None:
        """Make the counts (once: a second call counts nothing)."""
        counts, self._counts = self._counts, []
        for counter, labels in counts:
            counter.labels(*labels).inc()


async def handle(
    handler: Callable[..., Awaitable[Any]], event: CloudEvent[Any], tx: Transaction, **deps: Any
) -> None:
    """Run one of :data:`HANDLERS` in the delivery's transaction (``deps``: its ports, without ``publish``
    and ``tally``), its counts made once the outcome is settled: at commit, or at the dead letter of a
    refused event."""
    tally = Tally()
    try:
        await handler(event, publish=tx.publish, tally=tally, **deps)
    except PermanentError as exc:
        exc.on_dead_lettered = tally.count
        raise
    tx.after_commit(tally.count)


def _ignored(event_name: str, model: str, t: Transition, tally: Tally) -> None:
    assert t.ignored is not None
    tally.ignored(event_name, t.ignored.code)
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
    tally: Tally,
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
        tally.transition(type(payload).__name__)
        emitted.append(event)
    if t.events:
        log.info("rollout changed", model=t.route.model, events=[type(p).__name__ for p in t.events])
    return emitted


_SERVING_DECISIONS = frozenset(p.event_type() for p in (RolloutPromoted, RolloutRolledBack))
"""Serving's events the registry follows by moving a version to production (its ``caused_by``)."""


async def _serves_all_traffic(routes: Routes, d: ModelStageChanged) -> bool:
    """Whether a move to production names the version serving has as stable (locks the model's route)."""
    return d.to_stage is Stage.PRODUCTION and (await routes.lock(d.model)).stable_version == d.model_version


def _refuse_rejected(event_name: str, record: VersionRecord, what: str, tally: Tally) -> None:
    """A version once rolled back never serves again (a command that says otherwise was sent before the
    rollback, or names the wrong version): :class:`PermanentError`, so the command is dead-lettered."""
    if record.stage == Stage.REJECTED.value:
        tally.ignored(event_name, "retired-version")
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
    new_id: NewId,
    tally: Tally,
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
        tally.ignored(name, "retired-version")
        log.info(
            "version is retired, no rollout", model=record.model, version=record.version, stage=record.stage
        )
        return
    route = await routes.lock(record.model)
    now = await routes.now()
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
        _ignored(name, record.model, t, tally)
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
        tally.transition("RolloutRolledBack")
        log.error(
            "version cannot be loaded, no rollout", model=record.model, version=record.version, error=str(exc)
        )
        return
    await apply(
        route,
        t,
        routes=routes,
        versions=versions,
        publish=publish,
        source=source,
        now=now,
        tally=tally,
        cause=cause,
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
    tally: Tally,
    new_id: NewId = new_rollout_id,
) -> None:
    """Record where the version's artifact is and its signature; start its rollout if it already passed.
    A version's artifact and signature never change: a registration naming another of either for a version
    serving knows is dead-lettered (taken, the next routing sync would serve other bytes under the same
    version, or check its requests against other features)."""
    d = event.data
    known = await versions.get(d.model, d.model_version)
    if known is not None and known.artifact_key is not None and known.artifact_key != d.artifact.key:
        tally.ignored("ModelVersionRegistered", "other-artifact")
        raise PermanentError(
            f"{d.model} v{d.model_version} is registered with artifact {known.artifact_key[:12]}…; this "
            f"registration names another ({d.artifact.key[:12]}…): a version's artifact never changes, "
            "register a new version"
        )
    if (
        known is not None
        and known.signature is not None
        and not _same_signature(known.signature, d.signature)
    ):
        tally.ignored("ModelVersionRegistered", "other-signature")
        raise PermanentError(
            f"{d.model} v{d.model_version} is registered with another signature "
            f"({_signature_summary(known.signature)}) than this registration's "
            f"({_signature_summary(d.signature)}): a version's signature never changes, register a new "
            "version"
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
        new_id=new_id,
        tally=tally,
    )


def _same_signature(a: ModelSignature, b: ModelSignature) -> bool:
    # As JSON: pydantic's equality takes True for 1 (a class label, a category), which are different values.
    return a.model_dump_json() == b.model_dump_json()


def _signature_summary(signature: ModelSignature) -> str:
    features = ", ".join(f"{f.name}: {f.type.value}" for f in signature.features)
    return f"features {features}; target {signature.target}; {signature.task.value}"


async def on_validation_passed(
    event: CloudEvent[ValidationPassed],
    *,
    versions: ModelVersions,
    routes: Routes,
    loader: ModelLoader,
    publish: Publish,
    source: str,
    policy: RolloutPolicy,
    tally: Tally,
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
        new_id=new_id,
        tally=tally,
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
    tally: Tally,
    new_id: NewId = new_rollout_id,
) -> None:
    """Advance, promote or roll back on monitoring's verdict; stale verdicts are ignored and counted."""
    d = event.data
    route = await routes.lock(d.model)
    now = await routes.now()
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
        _ignored("CanaryVerdict", d.model, t, tally)
        return
    await apply(
        route,
        t,
        routes=routes,
        versions=versions,
        publish=publish,
        source=source,
        now=now,
        tally=tally,
        cause=event,
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
    tally: Tally,
    new_id: NewId = new_rollout_id,
) -> None:
    """Take the named version off traffic: the live canary at once, or production back to an earlier one."""
    d = event.data
    route = await routes.lock(d.model)
    if not route.known:
        # A command naming what serving lacks is refused in the open, as one naming an unknown version is.
        tally.ignored("RollbackRequested", "unknown-model")
        raise PermanentError(
            f"model {d.model!r} has no version serving: serving never served it, so it has nothing to roll "
            f"back (version {d.model_version})"
        )
    now = await routes.now()
    live = route.active
    message = f"manual rollback by {event.actor or 'unknown'}: {d.reason}"
    if live is not None and live.canary_version == d.model_version:
        # Taking a canary off traffic only lowers exposure to a version on trial: taken whenever it comes.
        if d.to_version is not None and d.to_version != live.stable_version:
            tally.ignored("RollbackRequested", "to-version-not-stable")
            raise PermanentError(
                f"to_version {d.to_version} cannot be honoured: {d.model} v{d.model_version} is the live "
                f"canary, and rolling it back gives its traffic to the stable version {live.stable_version}; "
                f"leave to_version out, then roll production back to v{d.to_version} if it is still wanted"
            )
        t = domain.rollback(route, reason=RollbackReason.MANUAL, message=message, now=now)
    else:
        t = domain.roll_back_production(
            route,
            version=d.model_version,
            to_version=d.to_version,
            message=message,
            now=now,
            rollout_id=new_id(),
            correlation_id=event.correlationid,
        )
        if t.ignored is not None and t.ignored.code in _PRODUCTION_ROLLBACK_REFUSALS:
            # Production stays on the version the operator asked to take off: refused in the open. (One
            # naming a version that no longer serves is ignored: what it asked for holds already.)
            tally.ignored("RollbackRequested", t.ignored.code)
            raise PermanentError(
                f"the rollback of {d.model} v{d.model_version} cannot be taken: {t.ignored.detail}"
                + _PRODUCTION_ROLLBACK_REFUSALS[t.ignored.code]
            )
        if t.ignored is None and t.route.stable_version is not None:
            _refuse_stale("RollbackRequested", route, event, tally)
            # The version going back on all traffic, named or the previous stable one, must load.
            await _check_target(
                "RollbackRequested",
                d.model,
                t.route.stable_version,
                role="rollback target",
                versions=versions,
                loader=loader,
                tally=tally,
            )
    if t.ignored is not None:
        _ignored("RollbackRequested", d.model, t, tally)
        return
    await apply(
        route,
        t,
        routes=routes,
        versions=versions,
        publish=publish,
        source=source,
        now=now,
        tally=tally,
        cause=event,
    )


_PRODUCTION_ROLLBACK_REFUSALS = {
    "rollout-live": "",
    "nothing-to-roll-back-to": ": name one with to_version",
    "already-stable": ": to_version must name another version",
}
"""Why :func:`domain.roll_back_production` refuses a rollback of the production version, and what to do."""


def _refuse_stale(command: str, route: ModelRoute, event: CloudEvent[Any], tally: Tally) -> None:
    """A command putting a version on all traffic that was issued before the model's last routing decision
    is dead-lettered (:func:`domain.stale_command`); one with no ``time`` counts as issued when it came."""
    why = domain.stale_command(route, command, issued_at=event.time)
    if why is not None:
        tally.ignored(command, "stale-command")
        raise PermanentError(why)


async def _check_target(
    command: str,
    model: str,
    version: int,
    *,
    role: str,
    versions: ModelVersions,
    loader: ModelLoader,
    tally: Tally,
) -> None:
    """The version a command puts on all traffic (``role``: what it would be, as the errors say) is
    registered, not rolled back, and loads; otherwise :class:`PermanentError` (the command is dead-lettered)
    and the model's traffic stays as it is: a version that cannot load would leave it with none that
    answers."""
    target = await versions.get(model, version)
    if target is None or not target.registered:
        tally.ignored(command, "unknown-version")
        raise PermanentError(f"{role} {model} v{version} is not a registered version")
    _refuse_rejected(command, target, f"cannot be the {role}", tally)
    try:
        await loader.load(target)
    except ModelLoadError as exc:
        tally.ignored(command, "load-failed")
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
    tally: Tally,
    new_id: NewId = new_rollout_id,
) -> None:
    """Give the named version all traffic now: the live canary as it stands, or any registered version."""
    d = event.data
    route = await routes.lock(d.model)
    now = await routes.now()
    live = route.active
    if d.model_version != route.stable_version:
        _refuse_stale("PromoteRequested", route, event, tally)
    if live is None or live.canary_version != d.model_version:
        await _check_target(
            "PromoteRequested",
            d.model,
            d.model_version,
            role="promotion target",
            versions=versions,
            loader=loader,
            tally=tally,
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
        _ignored("PromoteRequested", d.model, t, tally)
        return
    await apply(
        route,
        t,
        routes=routes,
        versions=versions,
        publish=publish,
        source=source,
        now=now,
        tally=tally,
        cause=event,
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
    tally: Tally,
    new_id: NewId = new_rollout_id,
) -> None:
    """Mirror the registry's stage; a version moved to production there (a manual change) becomes stable.
    A move to production that follows serving's own promotion or rollback changes nothing: serving took
    that decision itself, and when the version is no longer stable it has decided again since (an echo
    arriving late would put a superseded version back on all traffic).
    A version serving rolled back stays off traffic: the registry only archives a rejected version, so a
    change of it to another stage was sent before the registry learnt of the rollback, and is ignored.
    So is a change of a version serving never learnt of: the registry announces a version before changing
    its stage, so the change is no news of it, and mirrored it would stick to the version if registered.
    The one exception is a move to production of the version serving has on all traffic: the registry had
    rejected it by a failed validation that overtook serving's promotion (or rollback to it) and now follows
    serving (docs/registry.md, "A verdict that overtakes serving's decision"), so the mirror follows too.
    A change older than the last one of the model applied here (by the registry's ``sequence``) is
    dead-lettered: mirrored, it would set a version's stage back."""
    d = event.data
    try:
        new = await take_in_order(event, versions)
    except PermanentError:
        tally.ignored("ModelStageChanged", "stale-stage-change")
        raise
    if not new:
        _stage_change_ignored(
            d, "repeated-stage-change", "stage change applied already, received again", tally
        )
        return
    known = await versions.get(d.model, d.model_version)
    if known is None:
        _stage_change_ignored(
            d, "unknown-version", "stage change of a version serving never learnt of", tally
        )
        return
    if (
        d.to_stage not in (Stage.REJECTED, Stage.ARCHIVED)
        and known.stage == Stage.REJECTED.value
        and not await _serves_all_traffic(routes, d)
    ):
        _stage_change_ignored(
            d, "retired-version", "stage change of a version serving rolled back is stale", tally
        )
        return
    await versions.set_stage(d.model, d.model_version, d.to_stage.value)
    if d.to_stage is not Stage.PRODUCTION:
        return
    route = await routes.lock(d.model)
    if route.stable_version == d.model_version:
        return  # our own promotion coming back from the registry
    record = await versions.get(d.model, d.model_version)
    if record is None or not record.registered:
        tally.ignored("ModelStageChanged", "unknown-version")
        log.warning("production version is unknown to serving", model=d.model, version=d.model_version)
        return
    now = await routes.now()
    following_serving = d.caused_by is not None and d.caused_by.type in _SERVING_DECISIONS
    t = domain.production_changed(route, d.model_version, now=now, following_serving=following_serving)
    if t.ignored is not None:
        _ignored("ModelStageChanged", d.model, t, tally)
        return
    try:
        await loader.load(record)
    except ModelLoadError as exc:
        tally.ignored("ModelStageChanged", "load-failed")
        log.error(
            "production version cannot be loaded, keeping the current one", model=d.model, error=str(exc)
        )
        return
    await apply(
        route,
        t,
        routes=routes,
        versions=versions,
        publish=publish,
        source=source,
        now=now,
        tally=tally,
        cause=event,
    )


def _stage_change_ignored(d: ModelStageChanged, reason: str, message: str, tally: Tally) -> None:
    tally.ignored("ModelStageChanged", reason)
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
    tally: Tally,
) -> bool:
    """Serving saw the canary fail too often: roll that rollout back (no-op if it is no longer live)."""
    route = await routes.lock(model)
    now = await routes.now()
    t = domain.rollback(
        route, reason=RollbackReason.ERROR_RATE, message=message, now=now, rollout_id=rollout_id
    )
    if t.ignored is not None:
        _ignored("ErrorRateBreach", model, t, tally)
        return False
    await apply(
        route, t, routes=routes, versions=versions, publish=publish, source=source, now=now, tally=tally
    )
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
