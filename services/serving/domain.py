"""Serving's pure logic: the rollout state machine, sticky routing, and the input rules of a signature.

Nothing here does I/O. The rollout functions take the persisted :class:`ModelRoute` of one model and
return a :class:`Transition`: the new route and the events to publish with it (in one transaction), or
why nothing happened.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, cast

import orjson

from contracts.common import (
    FEATURE_NAME_MAX_CHARS,
    NAME_MAX_CHARS,
    FeatureSpec,
    FeatureType,
    ModelSignature,
    parse_version,
    unstorable_text,
)
from contracts.envelope import EventPayload
from contracts.predictions import Variant
from contracts.rollouts import (
    RollbackReason,
    RolloutMode,
    RolloutPromoted,
    RolloutRolledBack,
    RolloutStarted,
    RolloutStepAdvanced,
)
from libs.errors import InvalidInput, PayloadTooLarge, json_text, shown
from libs.modelspec import FLOAT32_MAX

# --- the rollout state machine -----------------------------------------------------------------------


class RolloutStatus(StrEnum):
    """Where a rollout is: live, or finished one way or the other."""

    ACTIVE = "active"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled-back"


@dataclass(frozen=True)
class RolloutPolicy:
    """How a new version meets traffic: its steps, and what each step needs before it may advance."""

    steps: tuple[float, ...] = (0.1, 0.5, 1.0)
    min_samples: int = 200
    bake_seconds: float = 5.0
    mode: RolloutMode = RolloutMode.CANARY


@dataclass(frozen=True)
class Rollout:
    """One rollout of a canary version against the stable one, as persisted."""

    rollout_id: str
    canary_version: int
    stable_version: int | None
    mode: RolloutMode
    steps: tuple[float, ...]
    step_index: int
    min_samples: int
    bake_seconds: float
    started_at: datetime
    step_started_at: datetime
    samples_seen: int = 0
    status: RolloutStatus = RolloutStatus.ACTIVE
    ended_at: datetime | None = None
    end_reason: str | None = None
    correlation_id: str | None = None
    """The cascade that started the rollout (the correlation id of the event that started it). Every
    event about the rollout belongs to it, whatever caused that event: a rollback for a newer candidate,
    for the error rate or by hand stays in the trace of the drift that started the rollout. None for
    rollouts persisted before serving recorded it; their events join their cause's cascade."""

    @property
    def weight(self) -> float:
        """Canary share now: the step's weight while live, 0 once rolled back, 1 once promoted."""
        if self.status is RolloutStatus.ACTIVE:
            return self.steps[self.step_index]
        return 1.0 if self.status is RolloutStatus.PROMOTED else 0.0

    @property
    def is_last_step(self) -> bool:
        return self.step_index == len(self.steps) - 1


@dataclass(frozen=True)
class ModelRoute:
    """The persisted routing state of one model: its stable version and its latest rollout."""

    model: str
    stable_version: int | None = None
    previous_stable_version: int | None = None
    rollout: Rollout | None = None
    decided_at: datetime | None = None
    """When the model's traffic was last decided: a rollout started or ended, or the stable version changed
    (a step advance is not a decision: it follows the one that started the rollout). A command that puts a
    version on all traffic and was issued before this is refused (:func:`stale_command`). None for a route
    serving never saved."""

    @property
    def known(self) -> bool:
        """Whether serving ever served a version of the model: a route it saved has a stable version or a
        rollout; the empty route of a model it never served has neither."""
        return self.stable_version is not None or self.rollout is not None

    @property
    def active(self) -> Rollout | None:
        """The live rollout, if one is."""
        if self.rollout is not None and self.rollout.status is RolloutStatus.ACTIVE:
            return self.rollout
        return None


@dataclass(frozen=True)
class SampleFlush:
    """One flush of the canary rows a replica served, (model, rollout id, step, rows) each, under its token
    (``replica``, ``sequence``): the save records the token in the transaction that adds the rows, so a flush
    saved again after its commit went through (the answer lost) adds nothing. ``replica`` is chosen anew at
    each start of the process; ``sequence`` counts its flushes from 1, and a flush is saved again, the same,
    until it is known saved, before any newer one is taken."""

    replica: str
    sequence: int
    items: tuple[tuple[str, str, int, int], ...]


@dataclass(frozen=True)
class Ignored:
    """Why an event changed nothing; ``code`` labels the metric, ``detail`` is for the log."""

    code: str
    detail: str


@dataclass(frozen=True)
class Transition:
    """The outcome of one decision: the new route and the events that announce it, or why not."""

    route: ModelRoute
    events: tuple[EventPayload, ...] = ()
    ignored: Ignored | None = None


def cascades(before: ModelRoute, t: Transition) -> dict[str, str]:
    """Rollout id -> the cascade it belongs to, for the rollouts a transition's events can be about: the
    one live before it (superseded, rolled back, advanced, promoted) and the one it leaves."""
    return {
        r.rollout_id: r.correlation_id
        for r in (before.rollout, t.route.rollout)
        if r is not None and r.correlation_id is not None
    }


def _ignore(route: ModelRoute, code: str, detail: str) -> Transition:
    return Transition(route, (), Ignored(code, detail))


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())


def start_rollout(
    route: ModelRoute,
    version: int,
    policy: RolloutPolicy,
    *,
    rollout_id: str,
    now: datetime,
    report_id: str | None = None,
    correlation_id: str | None = None,
) -> Transition:
    """A validated version starts its rollout at the first step, in the cascade ``correlation_id``.

    A model's first version has nothing to share traffic with: it gets a one-step rollout ([1.0]) that is
    promoted at once, so every consumer sees the usual RolloutStarted -> RolloutPromoted sequence. A
    newer version supersedes a live canary (rolled back with reason ``superseded``); an older one than
    the live canary or the stable version is ignored.
    """
    live = route.active
    if version == route.stable_version:
        return _ignore(route, "already-stable", f"version {version} is already the stable version")
    if live is not None and version == live.canary_version:
        return _ignore(route, "already-rolling-out", f"version {version} is already the live canary")
    if live is not None and version < live.canary_version:
        return _ignore(
            route,
            "older-than-canary",
            f"version {version} is older than the live canary {live.canary_version}",
        )
    if route.stable_version is not None and version < route.stable_version:
        return _ignore(
            route, "older-than-stable", f"version {version} is older than the stable {route.stable_version}"
        )
    events: list[EventPayload] = []
    if live is not None:
        superseded = rollback(
            route,
            reason=RollbackReason.SUPERSEDED,
            message=f"version {version} passed validation and replaces canary {live.canary_version}",
            now=now,
        )
        route, events = superseded.route, list(superseded.events)
    first = route.stable_version is None
    steps = (1.0,) if first else policy.steps
    rollout = Rollout(
        rollout_id=rollout_id,
        canary_version=version,
        stable_version=route.stable_version,
        mode=RolloutMode.CANARY if first else policy.mode,
        steps=steps,
        step_index=0,
        min_samples=0 if first else policy.min_samples,
        bake_seconds=0.0 if first else policy.bake_seconds,
        started_at=now,
        step_started_at=now,
        correlation_id=correlation_id,
    )
    events.append(
        RolloutStarted(
            rollout_id=rollout_id,
            model=route.model,
            stable_version=route.stable_version,
            canary_version=version,
            mode=rollout.mode,
            steps=list(steps),
            step_index=0,
            weight=steps[0],
            min_samples=rollout.min_samples,
            bake_seconds=rollout.bake_seconds,
            validation_report_id=report_id,
        )
    )
    route = replace(route, rollout=rollout, decided_at=now)
    if first:
        promoted = promote(
            route, version, now=now, manual=False, rollout_id=rollout_id, correlation_id=correlation_id
        )
        return Transition(promoted.route, (*events, *promoted.events))
    return Transition(route, tuple(events))


def judge_verdict(
    route: ModelRoute,
    *,
    rollout_id: str,
    step_index: int,
    canary_version: int,
    healthy: bool | None,
    canary_samples: int,
    reason: str,
    now: datetime,
) -> Transition:
    """Monitoring's verdict on a step: healthy advances once the step has its samples and bake time, or
    promotes on the last step judged (in canary mode the one before 100 %, in shadow mode the last); unhealthy
    rolls back at once. So does inconclusive (``None``): monitoring gives one verdict per step, so nothing
    would ever decide a step it could not judge, and a canary is exposed further only on evidence.

    Verdicts for another rollout, another canary or another step are stale and ignored, and so are verdicts
    for a model serving never served (no rollout of it can have been judged).
    """
    if not route.known:
        return _ignore(
            route, "unknown-model", f"verdict for model {route.model!r}, which serving never served"
        )
    live = route.active
    if live is None or live.rollout_id != rollout_id or live.canary_version != canary_version:
        return _ignore(route, "stale-rollout", f"verdict for rollout {rollout_id}, which is not live")
    if step_index != live.step_index:
        return _ignore(
            route, "stale-step", f"verdict for step {step_index}, the rollout is on step {live.step_index}"
        )
    if healthy is None:
        return rollback(
            route,
            reason=RollbackReason.INCONCLUSIVE_VERDICT,
            message=reason or f"inconclusive verdict on step {step_index}",
            now=now,
        )
    if not healthy:
        return rollback(
            route,
            reason=RollbackReason.UNHEALTHY_VERDICT,
            message=reason or f"unhealthy verdict on step {step_index}",
            now=now,
        )
    samples = max(live.samples_seen, canary_samples)
    if samples < live.min_samples:
        return _ignore(
            route,
            "premature",
            f"step {step_index} has {samples} canary samples, it needs {live.min_samples}",
        )
    baked = _seconds(live.step_started_at, now)
    if baked < live.bake_seconds:
        return _ignore(
            route,
            "premature",
            f"step {step_index} baked {baked:.1f}s, it needs {live.bake_seconds:.1f}s",
        )
    if live.is_last_step or (live.mode is RolloutMode.CANARY and live.steps[live.step_index + 1] >= 1.0):
        # A canary at 100 % leaves no stable traffic to judge it against: reaching that step is promotion. A
        # shadow candidate answers no client at any step, the stable version answers them all, so its step
        # at 100 % is judged like the others and only its healthy verdict promotes.
        return promote(route, live.canary_version, now=now, manual=False)
    nxt = replace(live, step_index=live.step_index + 1, step_started_at=now, samples_seen=0)
    event = RolloutStepAdvanced(
        rollout_id=live.rollout_id,
        model=route.model,
        stable_version=live.stable_version,
        canary_version=live.canary_version,
        step_index=nxt.step_index,
        previous_weight=live.weight,
        weight=nxt.weight,
        samples_seen=samples,
        step_seconds=baked,
    )
    return Transition(replace(route, rollout=nxt), (event,))


def promote(
    route: ModelRoute,
    version: int,
    *,
    now: datetime,
    manual: bool,
    rollout_id: str | None = None,
    correlation_id: str | None = None,
) -> Transition:
    """The version takes all traffic. The live canary is promoted as it stands; any other known version
    (checked by the caller) is promoted directly, superseding a live canary first."""
    if version == route.stable_version:
        return _ignore(route, "already-stable", f"version {version} is already the stable version")
    live = route.active
    events: list[EventPayload] = []
    if live is not None and live.canary_version == version:
        done = replace(
            live, status=RolloutStatus.PROMOTED, ended_at=now, end_reason="manual" if manual else "promoted"
        )
        events.append(
            RolloutPromoted(
                rollout_id=live.rollout_id,
                model=route.model,
                model_version=version,
                previous_version=route.stable_version,
                steps_completed=live.step_index + (0 if manual else 1),
                duration_seconds=_seconds(live.started_at, now),
                manual=manual,
            )
        )
    else:
        if rollout_id is None:
            raise ValueError("promoting a version without a live rollout needs a rollout id")
        if live is not None:
            superseded = rollback(
                route,
                reason=RollbackReason.SUPERSEDED,
                message=f"version {version} was promoted over canary {live.canary_version}",
                now=now,
            )
            route, events = superseded.route, list(superseded.events)
        done = Rollout(
            rollout_id=rollout_id,
            canary_version=version,
            stable_version=route.stable_version,
            mode=RolloutMode.CANARY,
            steps=(1.0,),
            step_index=0,
            min_samples=0,
            bake_seconds=0.0,
            started_at=now,
            step_started_at=now,
            status=RolloutStatus.PROMOTED,
            ended_at=now,
            end_reason="manual" if manual else "promoted",
            correlation_id=correlation_id,
        )
        events.append(
            RolloutPromoted(
                rollout_id=rollout_id,
                model=route.model,
                model_version=version,
                previous_version=route.stable_version,
                steps_completed=0,
                duration_seconds=0.0,
                manual=manual,
            )
        )
    new_route = ModelRoute(
        model=route.model,
        stable_version=version,
        previous_stable_version=route.stable_version,
        rollout=done,
        decided_at=now,
    )
    return Transition(new_route, tuple(events))


def rollback(
    route: ModelRoute,
    *,
    reason: RollbackReason,
    message: str,
    now: datetime,
    rollout_id: str | None = None,
) -> Transition:
    """Take the live canary off traffic at once (share 0). With ``rollout_id``, only that rollout."""
    live = route.active
    if live is None:
        return _ignore(route, "no-live-rollout", "no rollout is live")
    if rollout_id is not None and live.rollout_id != rollout_id:
        return _ignore(route, "stale-rollout", f"rollout {rollout_id} is not the live one")
    event = RolloutRolledBack(
        rollout_id=live.rollout_id,
        model=route.model,
        stable_version=live.stable_version,
        canary_version=live.canary_version,
        step_index=live.step_index,
        weight=live.weight,
        reason=reason,
        message=message,
    )
    done = replace(live, status=RolloutStatus.ROLLED_BACK, ended_at=now, end_reason=reason.value)
    return Transition(replace(route, rollout=done, decided_at=now), (event,))


def roll_back_production(
    route: ModelRoute,
    *,
    version: int,
    to_version: int | None,
    message: str,
    now: datetime,
    rollout_id: str,
    correlation_id: str | None = None,
) -> Transition:
    """Take the production version off traffic in favour of ``to_version`` (default: the previous stable).

    Refused while a canary is live (roll the canary back first), or when there is nothing to go back to.
    A version that serves no traffic is ignored first, canary live or not: what the rollback asks for holds
    already (a late rollback of a superseded canary must not be told to take the newer one off traffic).
    """
    live = route.active
    if version != route.stable_version and (live is None or version != live.canary_version):
        return _ignore(route, "not-serving", f"version {version} is not serving")
    if live is not None:
        return _ignore(
            route, "rollout-live", f"rollout {live.rollout_id} is live: roll back its canary first"
        )
    target = to_version if to_version is not None else route.previous_stable_version
    if target is None:
        return _ignore(route, "nothing-to-roll-back-to", f"no earlier version to replace {version} with")
    if target == version:
        return _ignore(route, "already-stable", f"version {version} is already the stable version")
    rollout = Rollout(
        rollout_id=rollout_id,
        canary_version=version,
        stable_version=target,
        mode=RolloutMode.CANARY,
        steps=(1.0,),
        step_index=0,
        min_samples=0,
        bake_seconds=0.0,
        started_at=now,
        step_started_at=now,
        status=RolloutStatus.ROLLED_BACK,
        ended_at=now,
        end_reason=RollbackReason.MANUAL.value,
        correlation_id=correlation_id,
    )
    event = RolloutRolledBack(
        rollout_id=rollout_id,
        model=route.model,
        stable_version=target,
        canary_version=version,
        step_index=0,
        weight=1.0,
        reason=RollbackReason.MANUAL,
        message=message,
    )
    return Transition(ModelRoute(route.model, target, None, rollout, decided_at=now), (event,))


def stale_command(route: ModelRoute, command: str, *, issued_at: datetime) -> str | None:
    """Why a command that puts a version on all traffic (a promotion, a production rollback) is not taken,
    or None when it may be: issued before the model's last routing decision (:attr:`ModelRoute.decided_at`),
    it was decided on a state that no longer holds, and taken late (the bus was slow, the publisher sent it
    again) it would undo that decision, e.g. put production back behind a version promoted since. A
    command issued at or after the decision is taken, whatever version it names."""
    if route.decided_at is None or issued_at >= route.decided_at:
        return None
    live = route.active
    now = f"stable version {route.stable_version}" + (
        f", canary {live.canary_version} live" if live is not None else ""
    )
    return (
        f"{command} was issued at {issued_at.isoformat()}, before {route.model}'s last routing change at "
        f"{route.decided_at.isoformat()} (now: {now}): it was decided on a state that no longer holds; check "
        f"the model's routing (GET /v1/models/{route.model}) and send it again if it is still wanted"
    )


def production_changed(
    route: ModelRoute, version: int, *, now: datetime, following_serving: bool = False
) -> Transition:
    """The registry moved ``version`` to production (a manual change there): serve it as stable.

    The registry's ModelStageChanged is the fact, so the change has no event of serving's. A live canary of
    that version ends promoted; an older one is superseded (RolloutRolledBack), since a canary is never
    older than the stable version (:func:`start_rollout`): promoted on its verdicts, it would put production
    back behind the registry's choice. A newer one goes on against the new stable version.
    A change the registry made to follow serving's own promotion or rollback (``following_serving``) is
    no news unless it names the stable version: serving has decided again since (promoted a newer version,
    rolled production back), and the registry's echo of that decision is on its way behind this one.
    """
    if version == route.stable_version:
        return _ignore(route, "already-stable", f"version {version} is already the stable version")
    if following_serving:
        return _ignore(
            route,
            "stale-echo",
            f"the registry followed serving's earlier decision to serve version {version}; serving has "
            f"moved on to version {route.stable_version} since",
        )
    live = route.active
    rollout = route.rollout
    if live is not None and live.canary_version == version:
        rollout = replace(live, status=RolloutStatus.PROMOTED, ended_at=now, end_reason="registry")
    elif live is not None:
        rollout = replace(live, stable_version=version)
    changed = ModelRoute(route.model, version, route.stable_version, rollout, decided_at=now)
    if live is not None and live.canary_version < version:
        # On the new stable version first: the registry moves the rollback's stable version to production.
        return rollback(
            changed,
            reason=RollbackReason.SUPERSEDED,
            message=f"version {version} was moved to production in the registry, over the older canary "
            f"{live.canary_version}",
            now=now,
        )
    return Transition(changed)


def error_rate_breached(
    requests: int, errors: int, *, threshold: float, min_requests: int, alpha: float
) -> bool:
    """Whether a canary's failures on a step show, at ``alpha``, that it fails more than ``threshold`` of its
    requests (with at least ``min_requests``): a one-sided exact binomial test whose null is a rate of
    ``threshold``, p = P(Binomial(requests, threshold) >= errors).

    The threshold is the null's, not a bound on the measured share: the share of a few requests is noisy,
    and it is looked at after every failure. Until 2026-12-02 a breach was a measured share over the
    threshold, so 2 failures in the first 20 to 39 requests rolled back a canary failing 1% of them in one
    step in twenty (5.0-5.5%; one failing 2% in one in five), now in none of 4,000 steps of 100 or 1,000
    requests (docs/serving.md); a canary failing every request is still caught at ``min_requests``."""
    if requests < min_requests or errors <= threshold * requests:
        return False
    # Imported here, not with the module: the prediction log's producer process imports this module for
    # LogItem, and scipy.stats took seconds of its every start (a restart drops what is offered meanwhile).
    from scipy import stats as sps

    return float(sps.binom.sf(errors - 1, requests, threshold)) < alpha


# --- routing -----------------------------------------------------------------------------------------

_TWO_64 = float(2**64)


def sticky_draw(rollout_id: str, entity_key: str) -> float:
    """A number in [0, 1) fixed by the rollout and the entity: the same entity lands on the same side at
    a given weight, and stays on the canary as the weight grows. Mixing in the rollout id gives each
    rollout a fresh sample of entities."""
    digest = hashlib.blake2b(f"{rollout_id}\x1f{entity_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64


def canary_takes(draw: float, weight: float) -> bool:
    """The canary takes a draw below its weight."""
    return draw < weight


@dataclass(frozen=True)
class RouteView:
    """What routing needs to know about a model's rollout (no models, no I/O)."""

    rollout_id: str | None
    weight: float
    mode: RolloutMode
    has_stable: bool
    has_canary: bool


def answering_variants(view: RouteView) -> tuple[Variant, ...]:
    """The variants that can answer a client's rows: the stable alone without a live canary, in shadow mode
    (the canary scores the rows it would have taken: see :func:`shadowed_rows`) and at weight 0; the canary
    alone without a stable version, or at weight 1 (a draw is below 1); otherwise both, row by row
    (:func:`assign_variants`)."""
    if not view.has_canary or view.rollout_id is None:
        return (Variant.STABLE,)
    if not view.has_stable:
        return (Variant.CANARY,)
    if view.mode is RolloutMode.SHADOW or view.weight <= 0:
        return (Variant.STABLE,)
    return (Variant.CANARY,) if view.weight >= 1 else (Variant.STABLE, Variant.CANARY)


def assign_variants(view: RouteView, entity_keys: Sequence[str | None], request_draw: float) -> list[Variant]:
    """The variant answering each row (of :func:`answering_variants`). Rows with an entity key are routed by
    its sticky draw; rows without one share the request's random draw."""
    answering = answering_variants(view)
    if len(answering) == 1:
        return [answering[0]] * len(entity_keys)
    rid = view.rollout_id
    assert rid is not None  # a live canary's
    return [
        Variant.CANARY
        if canary_takes(sticky_draw(rid, key) if key is not None else request_draw, view.weight)
        else Variant.STABLE
        for key in entity_keys
    ]


def shadowed_rows(view: RouteView, entity_keys: Sequence[str | None], request_draw: float) -> list[int]:
    """Rows the shadow candidate scores (same draw rule as a canary); empty outside shadow mode, and when no
    stable version is loaded here (the candidate then answers every row itself: see :func:`assign_variants`,
    and scoring it again in the shadow would log each of those rows twice)."""
    if (
        view.mode is not RolloutMode.SHADOW
        or not view.has_canary
        or not view.has_stable
        or view.rollout_id is None
    ):
        return []
    rid = view.rollout_id
    return [
        i
        for i, key in enumerate(entity_keys)
        if canary_takes(sticky_draw(rid, key) if key is not None else request_draw, view.weight)
    ]


# --- prediction ids ------------------------------------------------------------------------------------


def prediction_id(model: str, version: int, request_token: str, row: int) -> str:
    """``<model>:<version>:<request token>-<row>``: model names never contain ':', so feedback can tell the
    model and version from the id alone."""
    return f"{prediction_id_prefix(model, version, request_token)}{row}"


def prediction_id_prefix(model: str, version: int, request_token: str) -> str:
    """What every :func:`prediction_id` of one request and version starts with: the row follows it."""
    return f"{model}:{version}:{request_token}-"


def parse_prediction_id(pid: str) -> tuple[str, int] | None:
    """The (model, version) a prediction id names, or None when it is not one of ours: ours write the version
    as :func:`parse_version` reads it."""
    parts = pid.split(":")
    if len(parts) != 3 or not parts[0] or not parts[2]:
        return None
    version = parse_version(parts[1])
    return (parts[0], version) if version is not None else None


# --- inputs against the signature ---------------------------------------------------------------------
#
# The rule for missing and non-finite values:
#   * null (and NaN, which only non-standard JSON can carry) is a missing value: the model's imputer
#     handles it, and the prediction log records null;
#   * +/-Infinity is refused with 422 naming the feature: no imputer or scaler gives it a meaning;
#   * so is a finite number beyond float32's range (FLOAT32_MAX), integers included: see there;
#   * an absent feature or an unknown one is refused (422), so a typo never silently becomes "missing";
#   * a category the model has not seen is allowed (the pipeline's encoder ignores it), counted in the
#     metric driftloop_serving_unseen_categories_total and left for monitoring to judge; unless it is no
#     text (a NUL character, a lone surrogate) or an integer beyond 64 bits, which nothing downstream stores.
#
# The rule for what a categorical value is: a JSON string, integer or boolean, matched by its JSON identity.
# A feature's levels (the signature's categories) have one type, the training column's: text, integers or
# booleans. A value is one of them only as that very value, of that type: the string "1" is not the integer
# 1, and true is not 1 (Python's equality, and so scikit-learn's encoder of integer and boolean levels, takes
# true for 1; monitoring's counts, by text, would take "1" for 1). A number with no fraction, 1.0, is the
# integer 1: JSON has one kind of number. A value of another type is refused (422, wrong-type, naming the
# type to send): it can never be a level, and taken as an unseen one it would silently degrade every answer
# to a client that sends "7" for 7. So the model, this check's unseen count and monitoring (which sees the
# logged values) agree on every value, and the prediction log holds one type per feature, which the window
# files that retrain the model keep. A feature whose signature lists no levels takes any of the three types
# (docs/serving.md, "Categories").

MISSING = float("nan")

# Numeric inputs beyond FLOAT32_MAX (libs.modelspec: training and validation refuse the same values) are
# refused. The compiled engine computes in float32, where such a value is infinity (its answer would be NaN or
# whatever infinity makes of it), and the pipeline's answer would be an accident of float64 arithmetic far
# outside any training data; refusing them keeps both engines' answers the same and meaningful.

_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1

_NUMERIC_TENSOR = frozenset(
    {"FP64", "FP32", "FP16", "INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8", "BOOL"}
)
# A category is text, an integer or a boolean: every datatype but the floating-point ones, and BYTES.
_CATEGORY_TENSOR = (_NUMERIC_TENSOR - {"FP64", "FP32", "FP16"}) | {"BYTES"}
_DATATYPES = _NUMERIC_TENSOR | {"BYTES"}
_DATATYPES_LISTED = "BOOL, INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64, FP16, FP32, FP64, BYTES"


@dataclass(frozen=True)
class FeatureColumns:
    """Checked inputs, one column per feature in the signature's order; missing values are NaN."""

    rows: int
    columns: dict[str, list[Any]]
    unseen: dict[str, int] = field(default_factory=dict)


def shown_model(name: str) -> str:
    """A model name as an error message quotes it: whole when it is no longer than a model's name may be,
    cut otherwise (:func:`libs.errors.shown`). A name in a path or a body is the client's text, of any
    length: a name of 10,000 characters made a 404 of 30,000."""
    return shown(name, NAME_MAX_CHARS)


def shown_feature(name: str) -> str:
    """A feature or input tensor name as an error message quotes it (:func:`shown_model`'s rule, at the
    length a feature's name may have)."""
    return shown(name, FEATURE_NAME_MAX_CHARS)


def _bad(feature: str, reason: str, message: str, row: int | None = None) -> InvalidInput:
    where = f" (row {row})" if row is not None else ""
    return InvalidInput(
        f"feature {shown_feature(feature)}{where}: {message}", feature=feature, reason=reason, row=row
    )


def _bad_tensor(name: str, reason: str, message: str, row: int | None = None) -> InvalidInput:
    where = f" (row {row})" if row is not None else ""
    return InvalidInput(
        f"input tensor {shown_feature(name)}{where}: {message}", feature=name, reason=reason, row=row
    )


def refuse_unknown_members(
    body: Mapping[str, Any], allowed: frozenset[str], where: str = "the request body", **extra: Any
) -> None:
    """422 naming the first member of a JSON object that ``allowed`` does not hold (reason ``unknown``): a
    misspelt member is refused, never ignored."""
    if len(body) > len(allowed) or not body.keys() <= allowed:
        unknown = sorted(body.keys() - allowed)
        raise InvalidInput(
            f"unknown member {shown(unknown[0])} in {where} (it may hold {', '.join(sorted(allowed))})",
            reason="unknown",
            **extra,
        )


_PARAMETER_TYPES = frozenset({str, int, float, bool, type(None)})
_NO_PARAMETERS: Mapping[str, Any] = MappingProxyType({})


def plain_parameters(parameters: Any) -> bool:
    """Whether ``parameters`` is an object of strings, numbers, booleans and nulls: :func:`check_parameters`'s
    test, with no message built (callers on a per-tensor path ask this first)."""
    return type(parameters) is dict and _PARAMETER_TYPES.issuperset(map(type, parameters.values()))


def check_parameters(parameters: Any, where: str, **extra: Any) -> Mapping[str, Any]:
    """An Open Inference Protocol ``parameters`` member (of the request, a tensor or a requested output): an
    object whose values are strings, numbers or booleans, as the protocol has them (its gRPC form holds
    nothing else); null, the member's or a value's, is absent, as elsewhere in a request. 422 naming the
    parameter otherwise (``where`` says whose they are)."""
    if parameters is None:
        return _NO_PARAMETERS
    if plain_parameters(parameters):
        return cast(dict[str, Any], parameters)
    if type(parameters) is not dict:
        raise InvalidInput(
            f"{where} must be an object, not {json_kind(parameters)}", reason="wrong-type", **extra
        )
    key, value = next((k, v) for k, v in parameters.items() if type(v) not in _PARAMETER_TYPES)
    named = f"{where}.{key}" if key.isidentifier() and len(key) <= 40 else f"{where}[{shown(key)}]"
    raise InvalidInput(
        f"{named} must be a string, a number or a boolean, not {json_kind(value)}",
        reason="wrong-type",
        **extra,
    )


def json_kind(value: Any) -> str:
    """What a JSON value is, for messages: a string with its start, anything else by kind only (a list or an
    object could be megabytes, or nested too deeply to print)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return f"a string ({value!r})" if len(value) <= 40 else f"a string ({value[:40]!r}...)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _beyond_float32(feature: str, row: int) -> InvalidInput:
    return _bad(
        feature,
        "out-of-range",
        f"the value is beyond float32's range (magnitude at most {FLOAT32_MAX:.8g}), where models compute; "
        "send a smaller number",
        row,
    )


_NUMBER_TYPES = frozenset({float, int, bool})


def _within(numbers: list[Any], limit: float) -> bool:
    """Whether every number is in [-limit, limit] (two passes in C; see _check_numeric about NaN)."""
    return not numbers or (-limit <= min(numbers) and max(numbers) <= limit)


def _check_numeric(name: str, values: list[Any]) -> list[Any]:
    # The common case, all numbers and within float32's range (so none infinite), checked at C speed; anything
    # else takes the loop. min() and max() keep a NaN that comes first, which fails the comparison and takes
    # the loop, and pass over one anywhere else: they never let a value through unchecked.
    if _NUMBER_TYPES.issuperset(map(type, values)) and _within(values, FLOAT32_MAX):
        return values
    out = values
    for i, v in enumerate(values):
        t = type(v)
        if t is float:
            if v != v:
                continue
            if math.isinf(v):
                raise _bad(
                    name, "infinite", "infinity is not a value a model can use; send a finite number", i
                )
            if abs(v) > FLOAT32_MAX:
                raise _beyond_float32(name, i)
        elif t is int:
            if abs(v) > FLOAT32_MAX:  # an exact comparison: no integer is too large for it
                raise _beyond_float32(name, i)
        elif t is bool:
            continue
        elif v is None:
            if out is values:
                out = list(values)
            out[i] = MISSING
        else:
            raise _bad(name, "wrong-type", f"expected a number, got {json_kind(v)}", i)
    return out


_LEVELS_ARE = {str: "text", int: "integers", bool: "booleans"}
_SEND = {str: "a string (BYTES)", int: "an integer (INT64)", bool: "true or false (BOOL)"}


@dataclass(frozen=True)
class CategoryLevels:
    """A categorical feature's levels as the input check uses them: the set, and the JSON types they have
    (one for every signature training writes)."""

    known: frozenset[Any]
    types: frozenset[type]
    kind: type | None
    """The levels' one type; None when they have several (a signature registered from elsewhere)."""
    typed: frozenset[tuple[type, Any]]
    """(type, level) pairs, for levels of several types: there ``True in {1}`` would hold."""

    @classmethod
    def of(cls, categories: Sequence[Any]) -> CategoryLevels:
        types = frozenset(map(type, categories))
        if len(types) == 1:
            return cls(frozenset(categories), types, next(iter(types)), frozenset())
        return cls(frozenset(), types, None, frozenset(zip(map(type, categories), categories, strict=True)))

    def refuse(self, name: str, value: Any, row: int) -> InvalidInput:
        kinds = [t for t in _LEVELS_ARE if t in self.types]
        return _bad(
            name,
            "wrong-type",
            f"the model's levels of this feature are {' and '.join(_LEVELS_ARE[t] for t in kinds)}, and a "
            f'category is one only as a value of that type ("1" is not 1, true is not 1): send '
            f"{' or '.join(_SEND[t] for t in kinds)}, not {json_kind(value)}",
            row,
        )


# Keyed by the spec's identity; the weak reference's callback drops the entry when the spec goes, with the
# model version that held it, so the levels of a version no longer served are not kept (a cap of 1,024 lists
# held each one, with its set, until a thousand more had come: a retrained model's levels, every hour).
_levels_of: dict[int, tuple[weakref.ref[FeatureSpec], CategoryLevels]] = {}


def category_levels(spec: FeatureSpec) -> CategoryLevels:
    """The :class:`CategoryLevels` of a categorical feature's categories, made once per spec: a served
    signature is the same object for every request, and a thousand levels take 20 µs to make into a set."""
    key = id(spec)
    held = _levels_of.get(key)
    if held is not None and held[0]() is spec:
        return held[1]
    levels = CategoryLevels.of(spec.categories or [])

    def forget(ref: weakref.ref[FeatureSpec]) -> None:
        entry = _levels_of.get(key)
        if entry is not None and entry[0] is ref:
            del _levels_of[key]

    _levels_of[key] = (weakref.ref(spec, forget), levels)
    return levels


def _check_categorical(name: str, values: list[Any], levels: CategoryLevels | None) -> tuple[list[Any], int]:
    known, kind = (levels.known, levels.kind) if levels is not None else (frozenset(), None)
    # The common case, every value a known level of the levels' one type, checked at C speed: the levels are
    # storable by construction (they came through JSON and Postgres), so nothing else needs a look. Only a
    # string equals a string; 1, 1.0 and true equal each other, so numbers and booleans need their types too.
    try:
        fits = kind is not None and known.issuperset(values)
    except TypeError:  # an unhashable value (a list, an object): the loop refuses it, naming feature and row
        fits = False
    if fits and (kind is str or set(map(type, values)) == {kind}):
        return values, 0
    out = values
    unseen = 0
    for i, v in enumerate(values):
        t = type(v)
        if t is kind:
            if v in known:
                continue
            unseen += 1
        elif t is str or t is int or t is bool:
            if levels is not None:
                if kind is not None or t not in levels.types:
                    raise levels.refuse(name, v, i)
                if (t, v) in levels.typed:
                    continue
                unseen += 1
        elif v is None or (t is float and v != v):
            if out is values:
                out = list(values)
            out[i] = MISSING
            continue
        elif t is float and v.is_integer() and (levels is None or int in levels.types):
            # JSON has one kind of number: 1.0 is the integer 1 (as JSON Schema's "integer" has it, and an OIP
            # INT64 tensor), which is what a pandas column of integer codes with a gap writes. The model gets
            # the integer.
            v, t = int(v), int
            if out is values:
                out = list(values)
            out[i] = v
            if levels is not None:
                if (v in known) if kind is int else ((int, v) in levels.typed):
                    continue
                unseen += 1
        elif levels is not None and t is float:
            raise levels.refuse(name, v, i)
        else:
            raise _bad(
                name, "wrong-type", f"expected a category (string, integer or boolean), got {json_kind(v)}", i
            )
        # A value that is no level: one of the signature is fit by construction, another may hold what
        # nothing downstream stores.
        if t is str:
            problem = unstorable_text(v)
            if problem is not None:
                raise _bad(name, "invalid-text", problem, i)
        elif t is int and not _INT64_MIN <= v <= _UINT64_MAX:
            raise _bad(name, "out-of-range", "an integer category must fit in 64 bits", i)
    return out, unseen


def _check_columns(signature: ModelSignature, raw: Mapping[str, list[Any]], rows: int) -> FeatureColumns:
    columns: dict[str, list[Any]] = {}
    unseen: dict[str, int] = {}
    for spec in signature.features:
        values = raw[spec.name]
        if spec.type is FeatureType.NUMERIC:
            columns[spec.name] = _check_numeric(spec.name, values)
        else:
            levels = category_levels(spec) if spec.categories else None
            columns[spec.name], n = _check_categorical(spec.name, values, levels)
            if n:
                unseen[spec.name] = n
    return FeatureColumns(rows, columns, unseen)


def check_row_count(rows: int, max_rows: int) -> None:
    """Refuse empty requests (422) and requests over the row limit (413)."""
    if rows == 0:
        raise InvalidInput("the request has no rows", reason="empty")
    if rows > max_rows:
        raise PayloadTooLarge(
            f"the request has {rows} rows, the limit is {max_rows}: split it into several requests",
            rows=rows,
            limit=max_rows,
        )


def columns_from_records(signature: ModelSignature, records: Sequence[Any]) -> FeatureColumns:
    """Records (one object per row) -> checked columns; 422 naming the first bad feature and why."""
    names = [f.name for f in signature.features]
    expected = set(names)
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidInput(
                f"records[{i}] must be an object of feature values", reason="wrong-type", row=i
            )
        if record.keys() != expected:
            missing = [n for n in names if n not in record]
            if missing:
                raise _bad(missing[0], "missing", "missing; send null for an unknown value", i)
            unknown = sorted(k for k in record if k not in expected)
            raise _bad(
                unknown[0], "unknown", f"not a feature of this model (features: {', '.join(names)})", i
            )
    raw = {n: [r[n] for r in records] for n in names}
    return _check_columns(signature, raw, len(records))


_NONE = type(None)


def check_entity_keys(keys: list[Any]) -> list[str | None]:
    """The v1 ``entity_keys`` (one per record): strings or null, holding text (they go to the prediction log
    and on to monitoring's tables); 422 naming the first that is not."""
    if {str, _NONE}.issuperset(map(type, keys)):
        # Every key's characters at once, in C: the common case costs one join.
        text = "".join(filter(None, keys))
        if unstorable_text(text) is None:
            return keys
    for i, key in enumerate(keys):
        if key is None:
            continue
        if type(key) is not str:
            raise InvalidInput(
                f"entity_keys[{i}] must be a string or null, not {json_kind(key)}", reason="wrong-type"
            )
        problem = unstorable_text(key)
        if problem is not None:
            raise InvalidInput(f"entity_keys[{i}] {problem}", reason="invalid-text")
    return keys


@dataclass(frozen=True)
class Tensor:
    """One Open Inference Protocol input tensor (JSON form)."""

    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


def _tensor_values(name: str, data: Any, shape: list[int]) -> list[Any]:
    """A tensor's values in row-major order. The protocol's JSON ``data`` is flat, or nested exactly as the
    shape: any other nesting (deeper than the shape, ragged, a scalar) is refused naming the tensor, without
    recursion however deep it goes."""
    if type(data) is not list:
        raise _bad_tensor(name, "wrong-shape", f"data must be a list of values, not {json_kind(data)}")
    if not data or type(data[0]) is not list:
        return data  # flat; a list further on is refused with the values (_check_datatype)
    if len(shape) < 2:
        raise _nested(name, shape)
    level: list[Any] = data
    for size in shape[1:]:
        inner: list[Any] = []
        for part in level:
            if type(part) is not list or len(part) != size:
                raise _nested(name, shape)
            inner.extend(part)
        level = inner
    return level


def _nested(name: str, shape: list[int]) -> InvalidInput:
    return _bad_tensor(
        name,
        "wrong-shape",
        f"data is nested unevenly or more deeply than its shape {shape}: send it flat or nested as the shape",
    )


_INT_RANGES = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (_INT64_MIN, 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, _UINT64_MAX),
}
_FLOAT_LIMITS = {"FP16": 65504.0, "FP32": FLOAT32_MAX, "FP64": sys.float_info.max}


def _check_datatype(name: str, datatype: str, values: list[Any]) -> None:
    """Refuse a value that does not fit the tensor's declared datatype, naming the tensor and the row:
    BYTES holds strings, BOOL JSON booleans, the integer types integers (integral numbers) in their range,
    FP16/FP32/FP64 numbers in their finite range; no numeric type holds a boolean or a string. A missing
    value (null, NaN) fits any datatype, and an infinity is left to the feature's check (reason
    ``infinite``)."""
    kinds = set(map(type, values))
    present = values
    if _NONE in kinds:
        kinds.discard(_NONE)
        present = [v for v in values if v is not None]
    # The common cases at C speed; anything else, or any doubt (a NaN first in min or max), takes the loop.
    if datatype == "BYTES":
        fits = kinds <= {str}
    elif datatype == "BOOL":
        fits = kinds <= {bool}
    elif datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        fits = kinds <= {int} and (not present or (low <= min(present) and max(present) <= high))
    else:
        fits = kinds <= {int, float} and _within(present, _FLOAT_LIMITS[datatype])
    if fits:
        return
    for i, v in enumerate(values):
        unfit = _unfit(datatype, v)
        if unfit is not None:
            raise _bad_tensor(name, unfit[0], unfit[1], i)


def _unfit(datatype: str, v: Any) -> tuple[str, str] | None:
    """(reason, message) when one value does not fit ``datatype``; see :func:`_check_datatype`."""
    t = type(v)
    if v is None or (t is float and (v != v or math.isinf(v))):
        return None
    if t is list:
        return (
            "wrong-shape",
            "data is nested more deeply than its shape: send it flat, or nested as the shape",
        )
    if datatype == "BYTES":
        return None if t is str else ("wrong-type", f"BYTES holds strings, not {json_kind(v)}")
    if datatype == "BOOL":
        return None if t is bool else ("wrong-type", f"BOOL holds true or false, not {json_kind(v)}")
    if t is not int and t is not float:
        return "wrong-type", f"{datatype} holds numbers, not {json_kind(v)}"
    if datatype in _INT_RANGES:
        if t is float and not v.is_integer():
            return "wrong-type", f"{datatype} holds integers, not {v!r}"
        low, high = _INT_RANGES[datatype]
        if not low <= v <= high:
            return "out-of-range", f"the value is outside {datatype}'s range [{low}, {high}]"
        return None
    limit = _FLOAT_LIMITS[datatype]
    if abs(v) > limit:
        return "out-of-range", f"the value is beyond {datatype}'s range (magnitude at most {limit:.8g})"
    return None


_TENSOR_MEMBERS = frozenset({"name", "shape", "datatype", "parameters", "data"})
"""What an Open Inference Protocol input tensor holds (its JSON form)."""


def tensors_from_json(inputs: Any) -> list[Tensor]:
    """The request's ``inputs`` -> tensors, refusing malformed ones with 422 (a member the protocol does not
    name, the shape, the nesting of the data, the parameters), and a tensor given twice."""
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("inputs must be a non-empty list of tensors", reason="wrong-type")
    tensors = []
    names: set[str] = set()
    for i, t in enumerate(inputs):
        if not isinstance(t, dict):
            raise InvalidInput(f"inputs[{i}] must be an object", reason="wrong-type")
        name, shape, datatype = t.get("name"), t.get("shape"), t.get("datatype")
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"inputs[{i}].name must be a feature name", reason="wrong-type")
        if name in names:
            raise InvalidInput(
                f"input tensor {shown_feature(name)} is given twice", feature=name, reason="duplicate"
            )
        names.add(name)
        if not t.keys() <= _TENSOR_MEMBERS:  # messages are built only for a refusal: this runs per tensor
            refuse_unknown_members(t, _TENSOR_MEMBERS, f"input tensor {shown_feature(name)}", feature=name)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _bad_tensor(name, "wrong-shape", "shape must be a list of non-negative integers")
        if not isinstance(datatype, str):
            raise _bad_tensor(name, "wrong-type", "datatype must be a string such as FP64, INT64 or BYTES")
        if datatype not in _DATATYPES:
            raise _unknown_datatype(name, datatype)
        if "data" not in t:
            raise _bad_tensor(
                name, "wrong-type", "has no JSON data (the binary tensor extension is not supported)"
            )
        parameters = t.get("parameters")
        if parameters is not None and not plain_parameters(parameters):
            check_parameters(parameters, f"input tensor {shown_feature(name)}: parameters", feature=name)
        tensors.append(Tensor(name, shape, datatype, _tensor_values(name, t["data"], shape)))
    return tensors


def _unknown_datatype(name: str, datatype: str) -> InvalidInput:
    """422 for a datatype the protocol does not name: its strings are case-sensitive, so ``fp64`` is not
    ``FP64`` (a tensor is read as the datatype it names, never as one it resembles)."""
    if datatype.upper() in _DATATYPES:
        message = f"datatype {shown(datatype)} is not {datatype.upper()}: datatypes are case-sensitive"
    else:
        message = (
            f"datatype {shown(datatype)} is not an Open Inference Protocol datatype the server takes "
            f"({_DATATYPES_LISTED})"
        )
    return _bad_tensor(name, "wrong-type", message)


def tensor_rows(tensors: Sequence[Tensor]) -> int:
    """The row count all tensors agree on (shape [n] or [n, 1]); 422 otherwise."""
    rows: int | None = None
    for t in tensors:
        if len(t.shape) == 0 or len(t.shape) > 2 or (len(t.shape) == 2 and t.shape[1] != 1):
            raise _bad_tensor(
                t.name,
                "wrong-shape",
                f"shape {t.shape}: one value per row, [n] or [n, 1]; send one input tensor per feature, "
                "named as the feature (GET /v2/models/{name} lists them)",
            )
        if len(t.data) != t.shape[0]:
            raise _bad_tensor(t.name, "wrong-shape", f"shape {t.shape} but {len(t.data)} values")
        if rows is None:
            rows = t.shape[0]
        elif t.shape[0] != rows:
            raise _bad_tensor(t.name, "wrong-shape", f"has {t.shape[0]} rows, other inputs have {rows}")
    return rows or 0


def columns_from_tensors(
    signature: ModelSignature, tensors: Sequence[Tensor], rows: Sequence[int] | None = None
) -> FeatureColumns:
    """Tensors (one per feature) -> checked columns, optionally only some rows; each value is checked
    against its tensor's datatype as well as against the feature."""
    by_name = {t.name: t for t in tensors}
    names = [f.name for f in signature.features]
    for t in tensors:
        if t.name not in {*names}:
            raise _bad(t.name, "unknown", f"not a feature of this model (features: {', '.join(names)})")
    raw: dict[str, list[Any]] = {}
    for spec in signature.features:
        tensor = by_name.get(spec.name)
        if tensor is None:
            raise _bad(spec.name, "missing", "no input tensor for this feature")
        allowed = _NUMERIC_TENSOR if spec.type is FeatureType.NUMERIC else _CATEGORY_TENSOR
        if tensor.datatype not in allowed:
            raise _bad(
                spec.name,
                "wrong-type",
                f"datatype {tensor.datatype} does not fit a {spec.type.value} feature "
                f"(use one of {', '.join(sorted(allowed))})",
            )
        _check_datatype(spec.name, tensor.datatype, tensor.data)
        raw[spec.name] = tensor.data if rows is None else [tensor.data[i] for i in rows]
    n = len(next(iter(raw.values()))) if raw else 0
    return _check_columns(signature, raw, n)


def rows_of(
    columns: FeatureColumns, raw_rows: Sequence[Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Per-row input objects for the prediction log (NaN is written as null)."""
    if raw_rows is not None:
        return [dict(r) for r in raw_rows]
    names = list(columns.columns)
    cols = [columns.columns[n] for n in names]
    return [dict(zip(names, values, strict=True)) for values in zip(*cols, strict=True)]


def read_json(body: bytes) -> Any:
    """A request body as JSON; 422 when it is not JSON. The prediction log's producer reads logged request
    bodies with the same function, so it sees the very records the request was answered for."""
    return parse_json(body)[0]


def parse_json(body: bytes) -> tuple[Any, bool]:
    """:func:`read_json`, and whether the body is strict JSON (orjson read it; False when it took Python's
    json, which also reads NaN and Infinity literals)."""
    try:
        return orjson.loads(body), True
    except orjson.JSONDecodeError:
        pass
    # Python's json reads the NaN/Infinity literals some clients write; the NaN/inf rule then applies. It
    # reads text, not bytes: on bytes it reads UTF-16 and UTF-32 and skips a byte order mark too.
    text = json_text(body, reason="not-json")
    try:
        return json.loads(text), False
    except ValueError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc}", reason="not-json") from exc
    except RecursionError as exc:
        # orjson stops at 1024 levels; Python's json recurses until the interpreter's limit.
        raise InvalidInput("the JSON body is nested too deeply", reason="too-deep") from exc


@dataclass(frozen=True)
class Scores:
    """A model's answers for a batch of rows."""

    labels: list[Any]
    probabilities: list[list[float]] | None
    classes: list[Any] | None
    array: Any = field(default=None, compare=False, repr=False)
    """The model's probabilities as it gave them, a 2-D numpy array (``probabilities`` is its ``tolist()``);
    None when the answers came otherwise. The prediction log hands its bytes over instead of formatting
    every float on the request's event loop."""
    label_index: Any = field(default=None, compare=False, repr=False)
    """With ``array``: each row's label as its index in ``classes`` (a 1-D numpy array of integers)."""


@dataclass
class LogItem:
    """One PredictionsLogged to publish: one request's rows answered by one variant."""

    model: str
    version: int
    variant: Variant
    rollout_id: str | None
    request_id: str
    predicted_at: datetime
    latency_ms: float
    prediction_ids: list[str]
    entity_keys: list[str | None]
    columns: FeatureColumns
    raw_rows: list[dict[str, Any]] | None
    scores: Scores
    body: bytes | None = None
    """The request's JSON body whose ``records`` are ``raw_rows`` (then ``body_rows`` picks this item's rows):
    handed to the log producer as it came, so the request path never re-serialises the inputs."""
    body_rows: list[int] | None = None
    """Which of the request's rows this item holds, in order (all of them when None)."""
    body_records: int | None = None
    """Set when ``body`` is strict JSON whose only member is ``records``: how many records it holds. The
    producer may then cut each record's text out of the body instead of reading it (see
    :func:`~services.serving.adapters.prediction_log.record_texts`)."""
    record_texts: list[bytes] | None = None
    """Each row's inputs as JSON between the braces, when the producer cut them out of ``body``."""
    id_prefix: str | None = None
    """Set when ``prediction_ids`` are this prefix followed by each row of ``body_rows`` (see
    :func:`prediction_id_prefix`): the hand-off to the log producer then carries the prefix only."""
