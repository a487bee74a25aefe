"""Random sequences of events against one model's rollout state machine, and properties of the sticky router
and the error-rate test: the rules docs/serving.md promises, checked after every step.

test_domain.py shows each transition on an example; here hypothesis drives the pure functions of
services/serving/domain.py with duplicates, out-of-order and stale verdicts, verdicts for other rollouts or
steps, commands issued before the last decision, production changes mid-rollout and error-rate breaches,
and checks what must hold whatever the order. The handlers' checks in front of the domain (a rollback of
the live canary or of production, a stale command) are replayed as handlers.py makes them, so a sequence
is one the service could see. Derandomized: the same examples on every run, and no example database kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from scipy.stats import binom

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
from services.serving import domain
from services.serving.domain import (
    ModelRoute,
    Rollout,
    RolloutPolicy,
    RolloutStatus,
    RouteView,
    Transition,
)

MODEL = "churn"
VERSIONS = st.integers(min_value=1, max_value=10)
SHARES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9)


@st.composite
def policies(draw: st.DrawFn) -> RolloutPolicy:
    """Policies the settings accept: increasing shares ending at 1.0, below 1.0 first in canary mode."""
    mode = draw(st.sampled_from(RolloutMode))
    below = draw(
        st.lists(st.sampled_from(SHARES), unique=True, min_size=mode is RolloutMode.CANARY, max_size=3)
    )
    return RolloutPolicy(
        steps=(*sorted(below), 1.0),
        min_samples=draw(st.sampled_from((0, 1, 100))),
        bake_seconds=draw(st.sampled_from((0.0, 5.0, 30.0))),
        mode=mode,
    )


def promoting_step(live: Rollout) -> bool:
    """Whether a healthy verdict on the live step promotes (docs/serving.md, the state machine): on the last
    step, and in canary mode on the one before 100 %."""
    return live.is_last_step or (live.mode is RolloutMode.CANARY and live.steps[live.step_index + 1] >= 1.0)


class RolloutMachine(RuleBasedStateMachine):
    """One model's route under random events; every transition is checked against the route before it."""

    def __init__(self) -> None:
        super().__init__()
        self.route = ModelRoute(MODEL)
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self.ids = 0
        self.newest = 0
        """The newest version any event named."""
        self.ever_stable = False
        self.histories: dict[str, list[EventPayload]] = {}
        """Every event published about each rollout id, in order."""
        self.finished: dict[str, Rollout] = {}
        """Each rollout that ended (promoted or rolled back) as it ended."""
        self.last: Callable[[], Transition | None] | None = None
        """The last delivery that changed the route, to make again: the same event or command."""

    # --- helpers -----------------------------------------------------------------------------------------

    def fresh_id(self) -> str:
        self.ids += 1
        return f"r-{self.ids}"

    def a_version(self, data: st.DataObject) -> int:
        """A version for a command: one that serves (the canary, the stable version) or served last (the
        previous stable one), one newer than any named so far, or any."""
        live, route = self.route.active, self.route
        serving = [
            v
            for v in (live and live.canary_version, route.stable_version, route.previous_stable_version)
            if v
        ]
        newer = st.just(self.newest + 1)
        version = data.draw((st.sampled_from(serving) | newer if serving else newer) | VERSIONS)
        self.newest = max(self.newest, version)
        return version

    def take(
        self, t: Transition | None, again: Callable[[], Transition | None], *, registry: bool = False
    ) -> None:
        """Check one transition (None: the handler refused the event) against the route it was decided on,
        then make it the route. ``again`` delivers the same event or command once more; ``registry``: the
        registry's production change, which has no event of serving's."""
        if t is None:
            return
        before, after = self.route, t.route
        if t.ignored is not None:
            assert after == before and t.events == (), f"ignored ({t.ignored.code}) yet changed: {t}"
            return
        assert after != before, "a transition that is not ignored changes the route"
        assert after.model == MODEL and all(getattr(e, "model", MODEL) == MODEL for e in t.events)
        self.check_events(before, t, registry=registry)
        self.check_decided_at(before, after)
        for event in t.events:
            self.record(event)
        if after.rollout is not None and after.rollout.status is not RolloutStatus.ACTIVE:
            self.finished.setdefault(after.rollout.rollout_id, after.rollout)
        self.route = after
        self.ever_stable = self.ever_stable or after.stable_version is not None
        self.last = again

    def record(self, event: EventPayload) -> None:
        """Each rollout's events follow RolloutStarted -> RolloutStepAdvanced ... -> RolloutPromoted |
        RolloutRolledBack (contracts/rollouts.py); a direct promotion or a production rollback is its
        terminal event alone. Nothing follows the terminal one."""
        rid: str = getattr(event, "rollout_id")  # noqa: B009  (every rollout event has one)
        history = self.histories.setdefault(rid, [])
        terminal = (RolloutPromoted, RolloutRolledBack)
        assert not any(isinstance(e, terminal) for e in history), f"{event!r} after {rid} ended: {history}"
        if isinstance(event, RolloutStarted):
            assert history == [], f"{rid} started twice"
        elif isinstance(event, RolloutStepAdvanced):
            assert history and isinstance(history[0], RolloutStarted), f"{rid} advanced without a start"
            steps = history[0].steps
            assert event.step_index == len(history), "steps advance one at a time"
            assert (event.previous_weight, event.weight) == tuple(
                steps[event.step_index - 1 : event.step_index + 1]
            )
        history.append(event)

    def check_events(self, before: ModelRoute, t: Transition, *, registry: bool) -> None:
        """The events say what changed between ``before`` and the new route, and nothing else."""
        after = t.route
        live, now_live = before.active, after.active
        promoted = [e for e in t.events if isinstance(e, RolloutPromoted)]
        assert len(promoted) <= 1
        rollbacks = [e for e in t.events if isinstance(e, RolloutRolledBack)]
        live_id = live.rollout_id if live is not None else None
        for e in rollbacks:
            if e.rollout_id == live_id:
                # The live canary taken off traffic, as it stood.
                assert live is not None and (now_live is None or now_live.rollout_id != live.rollout_id)
                assert (e.canary_version, e.step_index, e.weight) == (
                    live.canary_version,
                    live.step_index,
                    live.weight,
                )
            else:
                # Production rolled back: never under a live canary.
                assert live is None and after.rollout is not None and after.rollout.rollout_id == e.rollout_id
                assert (e.canary_version, e.stable_version, e.weight) == (
                    before.stable_version,
                    after.stable_version,
                    1.0,
                )
        if promoted:
            [p] = promoted
            assert (p.model_version, p.previous_version) == (after.stable_version, before.stable_version)
            assert after.previous_stable_version == before.stable_version
            assert after.rollout is not None and after.rollout.rollout_id == p.rollout_id
            assert after.rollout.status is RolloutStatus.PROMOTED and now_live is None
        if before.stable_version != after.stable_version and not registry:
            assert promoted or len(rollbacks) > len([e for e in rollbacks if e.rollout_id == live_id]), (
                "the stable version changes only by a serving event"
            )
        if live is not None and (now_live is None or now_live.rollout_id != live.rollout_id):
            ended = [e for e in t.events if getattr(e, "rollout_id", None) == live.rollout_id]
            if registry and after.stable_version == live.canary_version:
                # The registry moved the canary to production: its ModelStageChanged is the event.
                assert ended == [] and after.rollout == replace(
                    live, status=RolloutStatus.PROMOTED, ended_at=self.now, end_reason="registry"
                )
            else:
                assert len(ended) == 1 and isinstance(ended[0], (RolloutPromoted, RolloutRolledBack))
        for ev in t.events:
            if isinstance(ev, RolloutStarted):
                assert ev.stable_version == before.stable_version and ev.step_index == 0
                assert after.rollout is not None and after.rollout.rollout_id == ev.rollout_id
                started = after.rollout
                assert (ev.canary_version, ev.mode, tuple(ev.steps), ev.weight) == (
                    started.canary_version,
                    started.mode,
                    started.steps,
                    started.steps[0],
                )
                assert (ev.min_samples, ev.bake_seconds) == (started.min_samples, started.bake_seconds)
            if isinstance(ev, RolloutStepAdvanced):
                assert live is not None and now_live is not None and now_live.rollout_id == live.rollout_id
                assert ev.rollout_id == live.rollout_id and ev.step_index == live.step_index + 1
                assert (ev.previous_weight, ev.weight) == (live.weight, now_live.weight)
                assert now_live.step_index == ev.step_index and now_live.samples_seen == 0

    def check_decided_at(self, before: ModelRoute, after: ModelRoute) -> None:
        """A decision (a rollout started or ended, the stable version changed) records its time; a step
        advance does not (stale_command refuses what was issued before a decision, not before a step)."""

        def rollout_state(r: Rollout | None) -> tuple[str, RolloutStatus] | None:
            return None if r is None else (r.rollout_id, r.status)

        decision = before.stable_version != after.stable_version or rollout_state(
            before.rollout
        ) != rollout_state(after.rollout)
        assert after.decided_at == (self.now if decision else before.decided_at)

    def refused_as_stale(self, command: str, issued_at: datetime) -> bool:
        """:func:`domain.stale_command`, checked against the rule it states."""
        why = domain.stale_command(self.route, command, issued_at=issued_at)
        decided = self.route.decided_at
        assert (why is not None) == (decided is not None and issued_at < decided)
        return why is not None

    # --- time and traffic ----------------------------------------------------------------------------

    @rule(seconds=st.sampled_from((0.0, 1.0, 4.9, 5.0, 30.0, 120.0)), rows=st.sampled_from((0, 1, 50, 150)))
    def traffic_flows(self, seconds: float, rows: int) -> None:
        self.now += timedelta(seconds=seconds)
        # What the replicas' sample flushes add to the live step's count (the adapter, not the domain).
        live = self.route.active
        if live is not None:
            self.route = replace(self.route, rollout=replace(live, samples_seen=live.samples_seen + rows))

    # --- validation -------------------------------------------------------------------------------------

    @initialize(served=st.booleans(), policy=policies())
    def the_model_is_served_or_not(self, served: bool, policy: RolloutPolicy) -> None:
        if served:
            self.validation_passed(1, policy)

    @precondition(lambda self: self.route.active is None)
    @rule(policy=policies())
    def a_retrained_version_passes_validation(self, policy: RolloutPolicy) -> None:
        # Drift, retraining, validation: the next version, most days.
        self.validation_passed(self.newest + 1, policy)

    @rule(data=st.data(), policy=policies())
    def a_version_passes_validation(self, data: st.DataObject, policy: RolloutPolicy) -> None:
        # A newer version than any so far (a retrained model), or any: the live canary or the stable version
        # again, the one just before either, another.
        live, stable = self.route.active, self.route.stable_version
        near = [v + d for v in (live and live.canary_version, stable) if v for d in (-1, 0) if v + d > 0]
        versions = st.just(self.newest + 1) | VERSIONS
        self.validation_passed(data.draw(versions | st.sampled_from(near) if near else versions), policy)

    def validation_passed(self, version: int, policy: RolloutPolicy) -> Transition:
        self.newest = max(self.newest, version)
        before, live, rid = self.route, self.route.active, self.fresh_id()
        t = domain.start_rollout(before, version, policy, rollout_id=rid, now=self.now, correlation_id="c")
        stable = before.stable_version
        if version == stable:
            expected: str | None = "already-stable"
        elif live is not None and version == live.canary_version:
            expected = "already-rolling-out"
        elif live is not None and version < live.canary_version:
            expected = "older-than-canary"
        elif stable is not None and version < stable:
            expected = "older-than-stable"
        else:
            expected = None
        assert (t.ignored.code if t.ignored else None) == expected
        if expected is None:
            kinds = [type(e) for e in t.events]
            superseded = [RolloutRolledBack] if live is not None else []
            if stable is None:
                # A model's first version: started on one step at 100 % and promoted at once.
                assert kinds == [*superseded, RolloutStarted, RolloutPromoted]
                assert t.route.stable_version == version and t.route.active is None
            else:
                assert kinds == [*superseded, RolloutStarted]
                now_live = t.route.active
                assert now_live is not None and now_live.rollout_id == rid and now_live.step_index == 0
                assert (now_live.mode, now_live.steps) == (policy.mode, policy.steps)
            if live is not None:
                assert t.events[0].reason is RollbackReason.SUPERSEDED  # type: ignore[attr-defined]
        self.take(t, partial(self.validation_passed, version, policy))
        return t

    # --- verdicts ---------------------------------------------------------------------------------------

    @precondition(lambda self: self.route.active is not None)
    @rule(counted_by_serving=st.booleans())
    def the_live_step_passes(self, counted_by_serving: bool) -> None:
        # The common path: the step gets its samples and its bake time, and monitoring finds it healthy. The
        # samples are the verdict's or the rows the replicas counted, whichever is larger.
        live = self.route.active
        assert live is not None
        if counted_by_serving:
            self.traffic_flows(0.0, live.min_samples)
        self.judge_the_live_step(True, 0 if counted_by_serving else live.min_samples, baked=True)

    @precondition(lambda self: self.route.active is not None)
    @rule(healthy=st.sampled_from((False, None)), baked=st.booleans())
    def the_live_step_fails(self, healthy: bool | None, baked: bool) -> None:
        # Unhealthy, or inconclusive (None): either rolls back, whatever the samples and bake time.
        self.judge_the_live_step(healthy, 0, baked)

    @precondition(lambda self: self.route.active is not None)
    @rule(samples=st.sampled_from((0, 99, 100, 500)), baked=st.booleans())
    def a_healthy_verdict_perhaps_premature(self, samples: int, baked: bool) -> None:
        self.judge_the_live_step(True, samples, baked)

    def judge_the_live_step(self, healthy: bool | None, samples: int, baked: bool) -> None:
        live = self.route.active
        assert live is not None
        if baked:
            # Monitoring times the bake: its verdict comes no earlier than the bake time after the step.
            self.now = max(self.now, live.step_started_at + timedelta(seconds=live.bake_seconds))
        self.canary_verdict(live.rollout_id, live.step_index, live.canary_version, healthy, samples)

    @rule(
        data=st.data(),
        about=st.sampled_from(("live", "earlier", "never")),
        other_canary=st.booleans(),
        healthy=st.sampled_from((True, False, None)),
    )
    def a_verdict_out_of_order(
        self, data: st.DataObject, about: str, other_canary: bool, healthy: bool | None
    ) -> None:
        # For another step or canary of the live rollout, for a step of an earlier rollout (its canary, as
        # monitoring would send it late), or for a rollout never started.
        live = self.route.active
        if about == "live" and live is not None:
            rid, canary = live.rollout_id, live.canary_version + other_canary
            # Any step of it for another canary, else another step than the live one (or one past the last).
            others = [s for s in range(len(live.steps) + 1) if other_canary or s != live.step_index]
            step = data.draw(st.sampled_from(others))
        elif about == "earlier" and self.histories:
            rid = data.draw(st.sampled_from(sorted(self.histories)))
            first = self.histories[rid][0]
            steps = len(first.steps) if isinstance(first, RolloutStarted) else 1
            canary = getattr(first, "canary_version", None) or getattr(first, "model_version")  # noqa: B009
            step = data.draw(st.integers(0, steps - 1))
        else:
            rid, step, canary = "r-never", 0, data.draw(VERSIONS)
        self.canary_verdict(rid, step, canary, healthy, 500)

    def canary_verdict(
        self, rid: str, step: int, canary: int, healthy: bool | None, samples: int
    ) -> Transition:
        before, live = self.route, self.route.active
        t = domain.judge_verdict(
            before,
            rollout_id=rid,
            step_index=step,
            canary_version=canary,
            healthy=healthy,
            canary_samples=samples,
            reason="",
            now=self.now,
        )
        if not before.known:
            expected: str | None = "unknown-model"
        elif live is None or (rid, canary) != (live.rollout_id, live.canary_version):
            expected = "stale-rollout"
        elif step != live.step_index:
            expected = "stale-step"
        elif healthy and (
            max(samples, live.samples_seen) < live.min_samples
            or (self.now - live.step_started_at).total_seconds() < live.bake_seconds
        ):
            expected = "premature"
        else:
            expected = None
        assert (t.ignored.code if t.ignored else None) == expected, (expected, t)
        if expected is None:
            assert live is not None
            [event] = t.events
            if not healthy:
                reason = (
                    RollbackReason.UNHEALTHY_VERDICT
                    if healthy is False
                    else RollbackReason.INCONCLUSIVE_VERDICT
                )
                assert isinstance(event, RolloutRolledBack) and event.reason is reason
            elif promoting_step(live):
                assert isinstance(event, RolloutPromoted) and not event.manual
                assert event.steps_completed == live.step_index + 1
            else:
                assert isinstance(event, RolloutStepAdvanced)
        self.take(t, partial(self.canary_verdict, rid, step, canary, healthy, samples))
        return t

    # --- error-rate breaches, commands, the registry ----------------------------------------------------

    @rule(data=st.data(), of_live=st.booleans())
    def error_rate_breach(self, data: st.DataObject, of_live: bool) -> None:
        # Of the live rollout, or, late, of one that ended (a replica's attempt that lost the race).
        live = self.route.active
        if of_live and live is not None:
            self.error_rate_breached(live.rollout_id)
        elif self.finished:
            self.error_rate_breached(data.draw(st.sampled_from(sorted(self.finished))))

    def error_rate_breached(self, rid: str) -> Transition:
        live = self.route.active
        t = domain.rollback(
            self.route, reason=RollbackReason.ERROR_RATE, message="5 of 20", now=self.now, rollout_id=rid
        )
        # Guarded by the rollout id: a breach of any other rollout changes nothing.
        if live is not None and live.rollout_id == rid:
            assert t.ignored is None and t.events[0].reason is RollbackReason.ERROR_RATE  # type: ignore[attr-defined]
        else:
            assert t.ignored is not None and t.ignored.code == (
                "no-live-rollout" if live is None else "stale-rollout"
            )
        self.take(t, partial(self.error_rate_breached, rid))
        return t

    @rule(
        data=st.data(),
        command=st.sampled_from(
            ("promote", "promote-canary", "promote-other", "rollback", "rollback-production")
        ),
        to_version=st.none() | VERSIONS,
        issued=st.sampled_from((0.0, -1.0, -60.0)),
    )
    def an_operator_sends_a_command(
        self, data: st.DataObject, command: str, to_version: int | None, issued: float
    ) -> None:
        # A promotion or a rollback of any version (the live canary, the stable one, another), issued now or
        # before the last decision; or, issued now, the live canary promoted, another version promoted over
        # it, production rolled back (to the previous stable version or the one named).
        live, stable = self.route.active, self.route.stable_version
        if command == "promote":
            self.promote_requested(self.a_version(data), self.now + timedelta(seconds=issued))
        elif command == "promote-canary" and live is not None:
            self.promote_requested(live.canary_version, self.now)
        elif command == "promote-other":
            serving = (stable, live.canary_version if live is not None else None)
            other = data.draw(st.integers(1, self.newest + 1).filter(lambda v: v not in serving))
            self.newest = max(self.newest, other)
            self.promote_requested(other, self.now)
        elif command == "rollback":
            self.rollback_requested(self.a_version(data), to_version, self.now + timedelta(seconds=issued))
        elif command == "rollback-production" and stable is not None:
            self.rollback_requested(stable, to_version, self.now)

    def rollback_requested(
        self, version: int, to_version: int | None, issued_at: datetime
    ) -> Transition | None:
        """handlers.on_rollback_requested, its checks in its order; None where it dead-letters the command."""
        before, live = self.route, self.route.active
        if not before.known:
            return None  # unknown-model
        if live is not None and live.canary_version == version:
            # Taking a canary off traffic is taken whenever it comes.
            if to_version is not None and to_version != live.stable_version:
                return None  # to-version-not-stable
            t = domain.rollback(before, reason=RollbackReason.MANUAL, message="by alice", now=self.now)
            assert t.ignored is None and t.route.stable_version == before.stable_version
        else:
            t = domain.roll_back_production(
                before,
                version=version,
                to_version=to_version,
                message="by alice",
                now=self.now,
                rollout_id=self.fresh_id(),
            )
            target = to_version if to_version is not None else before.previous_stable_version
            if version != before.stable_version:
                assert t.ignored is not None and t.ignored.code == "not-serving"
            elif live is not None or target is None or target == version:
                assert t.ignored is not None  # rollout-live, nothing-to-roll-back-to, already-stable
                return None
            elif self.refused_as_stale("RollbackRequested", issued_at):
                return None
            else:
                # Production goes back: to the version named, or the previous stable one.
                assert t.ignored is None and t.route.stable_version == target
                assert t.route.previous_stable_version is None and t.route.active is None
        self.take(t, partial(self.rollback_requested, version, to_version, issued_at))
        return t

    def promote_requested(self, version: int, issued_at: datetime) -> Transition | None:
        """handlers.on_promote_requested: a promotion of another version than the stable one issued before
        the last decision is dead-lettered (None)."""
        before, live, rid = self.route, self.route.active, self.fresh_id()
        if version != before.stable_version and self.refused_as_stale("PromoteRequested", issued_at):
            return None
        t = domain.promote(before, version, now=self.now, manual=True, rollout_id=rid, correlation_id="c")
        if version == before.stable_version:
            assert t.ignored is not None and t.ignored.code == "already-stable"
        else:
            assert t.ignored is None and t.route.stable_version == version and t.route.active is None
            promoted = t.events[-1]
            assert isinstance(promoted, RolloutPromoted) and promoted.manual
            if live is not None and live.canary_version == version:
                # The live canary, as it stands: the steps it passed.
                assert len(t.events) == 1 and promoted.rollout_id == live.rollout_id
                assert promoted.steps_completed == live.step_index
            else:
                assert promoted.rollout_id == rid and len(t.events) == 1 + (live is not None)
        self.take(t, partial(self.promote_requested, version, issued_at))
        return t

    @rule(
        data=st.data(),
        which=st.sampled_from(("any", "the-live-canary", "newer-than-any")),
        following_serving=st.booleans(),
    )
    def the_registry_moves_a_version_to_production(
        self, data: st.DataObject, which: str, following_serving: bool
    ) -> None:
        # By hand there (or, following_serving, echoing an earlier decision of serving's): any version, the
        # live canary itself, or one newer than the live canary.
        live = self.route.active
        if which == "the-live-canary" and live is not None:
            version = live.canary_version
        elif which == "newer-than-any":
            version = self.newest = self.newest + 1
        else:
            version = self.a_version(data)
        self.production_changed(version, following_serving)

    def production_changed(self, version: int, following_serving: bool) -> Transition:
        before, live = self.route, self.route.active
        t = domain.production_changed(before, version, now=self.now, following_serving=following_serving)
        if version == before.stable_version:
            assert t.ignored is not None and t.ignored.code == "already-stable"
        elif following_serving:
            assert t.ignored is not None and t.ignored.code == "stale-echo"
        else:
            assert t.ignored is None and t.route.stable_version == version
            assert t.route.previous_stable_version == before.stable_version
            now_live = t.route.active
            if live is None or live.canary_version == version:
                assert t.events == () and now_live is None
            elif live.canary_version < version:
                # A canary is never older than the stable version: superseded.
                [e] = t.events
                assert isinstance(e, RolloutRolledBack) and e.reason is RollbackReason.SUPERSEDED
                assert e.stable_version == version and now_live is None
            else:
                # A newer canary goes on, against the new stable version.
                assert t.events == () and now_live == replace(live, stable_version=version)
        self.take(t, partial(self.production_changed, version, following_serving), registry=True)
        return t

    # --- duplicates -------------------------------------------------------------------------------------

    @precondition(lambda self: self.last is not None)
    @rule()
    def the_last_event_is_delivered_again(self) -> None:
        # The bus redelivers, publishers send again: a duplicate of anything that changed the route, however
        # late (time passing, samples flushed in between), changes nothing more, for the reason its rule says.
        assert self.last is not None
        before = self.route
        t = self.last()
        assert t is None or t.ignored is not None, f"a duplicate changed the route again: {t}"
        assert self.route == before

    # --- what holds after every step ---------------------------------------------------------------------

    @invariant()
    def the_weight_is_the_steps(self) -> None:
        r = self.route.rollout
        if r is None:
            return
        assert 0.0 <= r.weight <= 1.0
        assert r.steps[-1] == 1.0 and all(a < b for a, b in zip(r.steps, r.steps[1:], strict=False))
        assert 0 <= r.step_index < len(r.steps)
        if r.status is RolloutStatus.ACTIVE:
            assert r.weight == r.steps[r.step_index] > 0
            if r.mode is RolloutMode.CANARY:
                # Reaching 100 % is a canary's promotion: it never stays live on all traffic.
                assert r.weight < 1.0
        else:
            assert r.weight == (1.0 if r.status is RolloutStatus.PROMOTED else 0.0)

    @invariant()
    def a_canary_runs_only_beside_a_stable_version_older_than_it(self) -> None:
        live = self.route.active
        if live is not None:
            assert self.route.stable_version is not None
            assert live.stable_version == self.route.stable_version < live.canary_version

    @invariant()
    def production_never_goes_back_to_nothing(self) -> None:
        assert not self.ever_stable or self.route.stable_version is not None
        assert (
            self.route.previous_stable_version != self.route.stable_version
            or self.route.stable_version is None
        )

    @invariant()
    def a_finished_rollout_never_changes(self) -> None:
        r = self.route.rollout
        if r is not None and r.rollout_id in self.finished:
            assert r == self.finished[r.rollout_id]

    @invariant()
    def the_live_rollout_is_the_last_started(self) -> None:
        live = self.route.active
        if live is not None:
            history = self.histories[live.rollout_id]
            assert isinstance(history[0], RolloutStarted)
            assert len(history) == live.step_index + 1 and live.rollout_id not in self.finished


RolloutMachine.TestCase.settings = settings(
    derandomize=True, database=None, deadline=None, max_examples=150, stateful_step_count=40
)
TestRolloutStateMachine = RolloutMachine.TestCase

PROPERTIES = settings(derandomize=True, database=None, deadline=None, max_examples=100)


# --- the sticky router -----------------------------------------------------------------------------------

ROLLOUT_IDS = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=16)
WEIGHTS = st.floats(min_value=0.0, max_value=1.0)


def view(rollout_id: str, weight: float, mode: RolloutMode = RolloutMode.CANARY) -> RouteView:
    return RouteView(rollout_id=rollout_id, weight=weight, mode=mode, has_stable=True, has_canary=True)


def a_weight(data: st.DataObject, rollout_id: str | None, keys: list[str | None]) -> float:
    """Any weight, or one at an entity's own draw or just above it: where a rule that is off by a little
    (``<=`` for ``<``, a weight scaled) shows."""
    draws = [domain.sticky_draw(rollout_id, k) for k in keys if k is not None] if rollout_id else []
    if not draws:
        return data.draw(WEIGHTS)
    at = data.draw(st.sampled_from(draws))
    return data.draw(WEIGHTS | st.sampled_from((at, math.nextafter(at, 1.0))))


@PROPERTIES
@given(
    data=st.data(),
    rollout_id=ROLLOUT_IDS,
    keys=st.lists(st.text(max_size=12), min_size=1, max_size=40),
    draws=st.tuples(WEIGHTS, WEIGHTS),
)
def test_an_entity_keeps_its_variant_and_a_larger_weight_only_adds_canary_entities(
    data: st.DataObject, rollout_id: str, keys: list[str | None], draws: tuple[float, float]
) -> None:
    low, high = sorted((a_weight(data, rollout_id, keys), a_weight(data, rollout_id, keys)))
    for weight in (low, high):
        # Keyed rows never depend on the request's draw.
        assert domain.assign_variants(view(rollout_id, weight), keys, draws[0]) == domain.assign_variants(
            view(rollout_id, weight), keys, draws[1]
        )
    at_low = domain.assign_variants(view(rollout_id, low), keys, draws[0])
    at_high = domain.assign_variants(view(rollout_id, high), keys, draws[0])
    for key, a, b in zip(keys, at_low, at_high, strict=True):
        assert not (a is Variant.CANARY and b is Variant.STABLE), (
            f"{key!r} left the canary as {low} grew to {high}"
        )
    for weight, variants in ((low, at_low), (high, at_high)):
        # docs/serving.md: a keyed row goes to the canary when blake2b(rollout id, key) / 2**64 < weight.
        for key, variant in zip(keys, variants, strict=True):
            assert key is not None
            draw = domain.sticky_draw(rollout_id, key)
            assert 0.0 <= draw < 1.0
            assert (variant is Variant.CANARY) == (draw < weight), (key, draw, weight)


@PROPERTIES
@given(
    data=st.data(),
    rollout_id=st.none() | ROLLOUT_IDS,
    mode=st.sampled_from(RolloutMode),
    has_stable=st.booleans(),
    has_canary=st.booleans(),
    keys=st.lists(st.none() | st.text(max_size=8), max_size=30),
    draw=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_rows_go_only_to_a_variant_that_can_answer_and_a_shadow_scores_what_a_canary_would_take(
    data: st.DataObject,
    rollout_id: str | None,
    mode: RolloutMode,
    has_stable: bool,
    has_canary: bool,
    keys: list[str | None],
    draw: float,
) -> None:
    weight = a_weight(data, rollout_id, keys)
    v = RouteView(
        rollout_id=rollout_id, weight=weight, mode=mode, has_stable=has_stable, has_canary=has_canary
    )
    answering = domain.answering_variants(v)
    assigned = domain.assign_variants(v, keys, draw)
    assert len(assigned) == len(keys) and set(assigned) <= set(answering)
    unkeyed = {variant for key, variant in zip(keys, assigned, strict=True) if key is None}
    assert len(unkeyed) <= 1, "rows without a key share the request's draw"
    if not has_canary or rollout_id is None:
        assert answering == (Variant.STABLE,)
    elif not has_stable:
        assert answering == (Variant.CANARY,)
    elif mode is RolloutMode.SHADOW:
        # The stable version answers every row; the candidate scores the rows it would take as a canary.
        assert answering == (Variant.STABLE,)
        as_canary = domain.assign_variants(replace(v, mode=RolloutMode.CANARY), keys, draw)
        assert domain.shadowed_rows(v, keys, draw) == [
            i for i, variant in enumerate(as_canary) if variant is Variant.CANARY
        ]
    if mode is RolloutMode.CANARY or not has_stable or not has_canary or rollout_id is None:
        assert domain.shadowed_rows(v, keys, draw) == []


@settings(derandomize=True, database=None, deadline=None, max_examples=20)
@given(rollout_id=ROLLOUT_IDS, weight=st.sampled_from((0.01, 0.05, 0.1, 0.25, 0.5, 0.9)))
def test_the_canary_takes_its_weight_of_entities(rollout_id: str, weight: float) -> None:
    n = 20_000
    keys: list[str | None] = [f"customer-{i}" for i in range(n)]
    share = domain.assign_variants(view(rollout_id, weight), keys, 0.0).count(Variant.CANARY) / n
    # Each entity is an independent draw: the share is Binomial(n, weight) / n. Five standard deviations: a
    # false alarm once in 1.7 million rollout ids, and the examples are the same on every run.
    assert abs(share - weight) <= 5 * math.sqrt(weight * (1 - weight) / n)


# --- the error-rate test ---------------------------------------------------------------------------------


@PROPERTIES
@given(
    requests=st.integers(min_value=0, max_value=2_000),
    data=st.data(),
    threshold=st.sampled_from((0.01, 0.05, 0.1, 0.3)),
    min_requests=st.sampled_from((1, 20, 100)),
    alpha=st.sampled_from((0.001, 0.01, 0.05)),
)
def test_an_error_rate_breach_is_the_documented_test_and_more_failures_only_add_evidence(
    requests: int, data: st.DataObject, threshold: float, min_requests: int, alpha: float
) -> None:
    # Failures near the threshold's count, where the decision turns, as often as anywhere.
    expected = threshold * requests
    spread = math.ceil(4 * math.sqrt(expected * (1 - threshold))) + 3
    near = st.integers(
        min_value=max(0, math.floor(expected)), max_value=min(requests, math.ceil(expected) + spread)
    )
    errors = data.draw(st.integers(min_value=0, max_value=requests) | near)

    def breached(n: int, e: int) -> bool:
        return domain.error_rate_breached(n, e, threshold=threshold, min_requests=min_requests, alpha=alpha)

    # docs/serving.md: at least min_requests, more failures than the threshold's share, and
    # p = P(Binomial(requests, threshold) >= failures) below alpha.
    p = float(binom.sf(errors - 1, requests, threshold))
    assert breached(requests, errors) == (requests >= min_requests and errors > expected and p < alpha)
    if breached(requests, errors):
        if errors < requests:
            assert breached(requests, errors + 1), "one more failure is more evidence"
        if requests - 1 >= max(min_requests, errors):
            assert breached(requests - 1, errors), "the same failures in fewer requests are more evidence"


def test_a_canary_failing_every_request_is_caught_at_the_minimum_requests_with_the_defaults() -> None:
    assert domain.error_rate_breached(20, 20, threshold=0.05, min_requests=20, alpha=0.01)
    assert not domain.error_rate_breached(19, 19, threshold=0.05, min_requests=20, alpha=0.01)
