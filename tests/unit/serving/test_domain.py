"""Every transition of the rollout state machine, the sticky router, and the input rules."""

from __future__ import annotations

import gc
import math
import random
from dataclasses import replace
from typing import Any

import pytest

from contracts.common import ModelSignature
from contracts.predictions import Variant
from contracts.rollouts import (
    RollbackReason,
    RolloutMode,
    RolloutPromoted,
    RolloutRolledBack,
    RolloutStarted,
    RolloutStepAdvanced,
)
from libs.errors import InvalidInput, PayloadTooLarge
from services.serving import domain
from services.serving.domain import ModelRoute, RolloutPolicy, RolloutStatus, RouteView
from tests.unit.serving.fakes import Clock, churn_signature, record

POLICY = RolloutPolicy(steps=(0.1, 0.5, 1.0), min_samples=100, bake_seconds=10.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def stable_route(version: int = 1) -> ModelRoute:
    return ModelRoute("churn", stable_version=version)


def live_route(clock: Clock, *, canary: int = 2, stable: int = 1) -> ModelRoute:
    t = domain.start_rollout(stable_route(stable), canary, POLICY, rollout_id="r-1", now=clock())
    return t.route


def verdict(route: ModelRoute, clock: Clock, *, healthy: bool | None = True, samples: int = 500, **kw: Any):
    live = route.active
    assert live is not None
    args: dict[str, object] = {
        "rollout_id": live.rollout_id,
        "step_index": live.step_index,
        "canary_version": live.canary_version,
        "healthy": healthy,
        "canary_samples": samples,
        "reason": "test",
        "now": clock(),
    }
    args.update(kw)
    return domain.judge_verdict(route, **args)  # type: ignore[arg-type]


# --- starting ---------------------------------------------------------------------------------------------


def test_first_version_is_started_on_one_step_and_promoted_at_once(clock: Clock) -> None:
    t = domain.start_rollout(ModelRoute("churn"), 1, POLICY, rollout_id="r-1", now=clock())
    started, promoted = t.events
    assert isinstance(started, RolloutStarted) and started.steps == [1.0] and started.stable_version is None
    assert (
        isinstance(promoted, RolloutPromoted)
        and promoted.model_version == 1
        and promoted.previous_version is None
    )
    assert t.route.stable_version == 1
    assert t.route.active is None and t.route.rollout is not None
    assert t.route.rollout.status is RolloutStatus.PROMOTED


def test_validated_version_starts_at_the_first_step(clock: Clock) -> None:
    t = domain.start_rollout(stable_route(), 2, POLICY, rollout_id="r-1", now=clock(), report_id="vr-1")
    [started] = t.events
    assert isinstance(started, RolloutStarted)
    assert (started.weight, started.step_index, started.steps) == (0.1, 0, [0.1, 0.5, 1.0])
    assert started.min_samples == 100 and started.bake_seconds == 10.0
    assert started.validation_report_id == "vr-1"
    live = t.route.active
    assert live is not None and live.weight == 0.1 and live.canary_version == 2 and live.stable_version == 1
    assert t.route.stable_version == 1


def test_shadow_policy_starts_a_shadow_rollout(clock: Clock) -> None:
    policy = replace(POLICY, mode=RolloutMode.SHADOW)
    t = domain.start_rollout(stable_route(), 2, policy, rollout_id="r-1", now=clock())
    assert t.route.active is not None and t.route.active.mode is RolloutMode.SHADOW
    assert t.events[0].mode is RolloutMode.SHADOW  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("version", "code"),
    [(1, "already-stable"), (2, "already-rolling-out")],
)
def test_validation_of_a_serving_version_changes_nothing(clock: Clock, version: int, code: str) -> None:
    route = live_route(clock)
    t = domain.start_rollout(route, version, POLICY, rollout_id="r-2", now=clock())
    assert t.ignored is not None and t.ignored.code == code
    assert t.route == route and t.events == ()


def test_older_versions_than_the_canary_or_stable_are_ignored(clock: Clock) -> None:
    route = live_route(clock, canary=5, stable=3)
    t = domain.start_rollout(route, 4, POLICY, rollout_id="x", now=clock())
    assert t.ignored is not None and t.ignored.code == "older-than-canary"
    t = domain.start_rollout(stable_route(3), 2, POLICY, rollout_id="x", now=clock())
    assert t.ignored is not None and t.ignored.code == "older-than-stable"


def test_newer_version_supersedes_the_live_canary(clock: Clock) -> None:
    route = live_route(clock)
    t = domain.start_rollout(route, 3, POLICY, rollout_id="r-2", now=clock())
    rolled_back, started = t.events
    assert isinstance(rolled_back, RolloutRolledBack) and rolled_back.reason is RollbackReason.SUPERSEDED
    assert rolled_back.canary_version == 2 and rolled_back.rollout_id == "r-1"
    assert isinstance(started, RolloutStarted) and started.canary_version == 3 and started.stable_version == 1
    assert t.route.active is not None and t.route.active.rollout_id == "r-2"


# --- verdicts ----------------------------------------------------------------------------------------------


def test_healthy_verdict_before_min_samples_waits(clock: Clock) -> None:
    route = live_route(clock)
    clock.advance(60)
    t = verdict(route, clock, samples=99)
    assert t.ignored is not None and t.ignored.code == "premature" and "samples" in t.ignored.detail
    assert t.route == route


def test_samples_counted_by_serving_count_too(clock: Clock) -> None:
    route = live_route(clock)
    live = route.active
    assert live is not None
    route = replace(route, rollout=replace(live, samples_seen=150))
    clock.advance(60)
    t = verdict(route, clock, samples=0)
    assert t.ignored is None and isinstance(t.events[0], RolloutStepAdvanced)
    assert t.events[0].samples_seen == 150


def test_healthy_verdict_before_bake_time_waits(clock: Clock) -> None:
    route = live_route(clock)
    clock.advance(9.9)
    t = verdict(route, clock)
    assert t.ignored is not None and t.ignored.code == "premature" and "baked" in t.ignored.detail


def test_healthy_verdict_after_samples_and_bake_advances_the_step(clock: Clock) -> None:
    route = live_route(clock)
    clock.advance(12)
    t = verdict(route, clock, samples=321)
    [advanced] = t.events
    assert isinstance(advanced, RolloutStepAdvanced)
    assert (advanced.step_index, advanced.previous_weight, advanced.weight) == (1, 0.1, 0.5)
    assert advanced.samples_seen == 321 and advanced.step_seconds == pytest.approx(12)
    live = t.route.active
    assert (
        live is not None
        and live.step_index == 1
        and live.samples_seen == 0
        and live.step_started_at == clock()
    )


def test_healthy_verdict_before_the_full_traffic_step_promotes(clock: Clock) -> None:
    # Steps 10% -> 50% -> 100%: at 100% no stable traffic is left to judge against, so the healthy
    # verdict at 50% is the last one, and reaching 100% is the promotion.
    route = live_route(clock)
    clock.advance(11)
    route = verdict(route, clock).route
    assert route.active is not None and route.active.weight == 0.5
    clock.advance(11)
    t = verdict(route, clock)
    [promoted] = t.events
    assert isinstance(promoted, RolloutPromoted)
    assert promoted.model_version == 2 and promoted.previous_version == 1 and promoted.steps_completed == 2
    assert promoted.duration_seconds == pytest.approx(22) and not promoted.manual
    assert t.route.stable_version == 2 and t.route.previous_stable_version == 1 and t.route.active is None


def test_a_shadow_rollout_is_judged_on_its_full_shadow_step_before_it_promotes(clock: Clock) -> None:
    # In shadow mode the stable version answers every request at every step, so a step at 100% (the
    # candidate shadowing every row) has stable traffic to judge against: it is a step like the others.
    policy = replace(POLICY, mode=RolloutMode.SHADOW)
    route = domain.start_rollout(stable_route(), 2, policy, rollout_id="r-1", now=clock()).route
    for weight in (0.5, 1.0):
        clock.advance(11)
        t = verdict(route, clock)
        [advanced] = t.events
        assert isinstance(advanced, RolloutStepAdvanced) and advanced.weight == weight
        route = t.route
    clock.advance(11)
    t = verdict(route, clock)
    [promoted] = t.events
    assert isinstance(promoted, RolloutPromoted) and promoted.steps_completed == 3
    assert t.route.stable_version == 2


def test_unhealthy_verdict_rolls_back_at_once(clock: Clock) -> None:
    route = live_route(clock)
    t = verdict(route, clock, healthy=False, samples=0, reason="error rate 4% vs 0.2%")
    [rolled_back] = t.events
    assert isinstance(rolled_back, RolloutRolledBack)
    assert rolled_back.reason is RollbackReason.UNHEALTHY_VERDICT and rolled_back.weight == 0.1
    assert rolled_back.message == "error rate 4% vs 0.2%"
    assert t.route.active is None and t.route.stable_version == 1
    assert t.route.rollout is not None and t.route.rollout.weight == 0.0


def test_inconclusive_verdict_rolls_back_since_no_other_verdict_comes_for_the_step(clock: Clock) -> None:
    route = live_route(clock)
    clock.advance(60)
    t = verdict(route, clock, healthy=None, samples=0, reason="timed out: canary had 12 of 100 predictions")
    [rolled_back] = t.events
    assert isinstance(rolled_back, RolloutRolledBack)
    assert rolled_back.reason is RollbackReason.INCONCLUSIVE_VERDICT
    assert rolled_back.message == "timed out: canary had 12 of 100 predictions"
    assert t.route.active is None and t.route.stable_version == 1


@pytest.mark.parametrize(
    ("override", "code"),
    [
        ({"rollout_id": "r-old"}, "stale-rollout"),
        ({"canary_version": 9}, "stale-rollout"),
        ({"step_index": 1}, "stale-step"),
    ],
)
def test_stale_verdicts_are_ignored(clock: Clock, override: dict[str, Any], code: str) -> None:
    route = live_route(clock)
    clock.advance(60)
    t = verdict(route, clock, **override)
    assert t.ignored is not None and t.ignored.code == code and t.route == route and t.events == ()


def test_verdict_after_the_rollout_ended_is_stale(clock: Clock) -> None:
    route = live_route(clock)
    ended = verdict(route, clock, healthy=False).route
    t = domain.judge_verdict(
        ended,
        rollout_id="r-1",
        step_index=0,
        canary_version=2,
        healthy=True,
        canary_samples=900,
        reason="",
        now=clock(),
    )
    assert t.ignored is not None and t.ignored.code == "stale-rollout"


# --- rollbacks and promotions -------------------------------------------------------------------------------


def test_manual_rollback_takes_the_canary_off_traffic(clock: Clock) -> None:
    route = live_route(clock)
    t = domain.rollback(route, reason=RollbackReason.MANUAL, message="by alice", now=clock())
    [rolled_back] = t.events
    assert isinstance(rolled_back, RolloutRolledBack) and rolled_back.reason is RollbackReason.MANUAL
    assert t.route.active is None and t.route.rollout is not None
    assert t.route.rollout.status is RolloutStatus.ROLLED_BACK and t.route.rollout.end_reason == "manual"


def test_rollback_without_a_live_rollout_changes_nothing(clock: Clock) -> None:
    t = domain.rollback(stable_route(), reason=RollbackReason.MANUAL, message="", now=clock())
    assert t.ignored is not None and t.ignored.code == "no-live-rollout"


def test_error_rate_rollback_of_another_rollout_is_stale(clock: Clock) -> None:
    route = live_route(clock)
    t = domain.rollback(route, reason=RollbackReason.ERROR_RATE, message="", now=clock(), rollout_id="r-0")
    assert t.ignored is not None and t.ignored.code == "stale-rollout"
    t = domain.rollback(
        route, reason=RollbackReason.ERROR_RATE, message="5/20", now=clock(), rollout_id="r-1"
    )
    assert t.events[0].reason is RollbackReason.ERROR_RATE  # type: ignore[attr-defined]


def test_manual_promote_of_the_live_canary_cuts_the_rollout_short(clock: Clock) -> None:
    route = live_route(clock)
    clock.advance(11)
    route = verdict(route, clock).route
    t = domain.promote(route, 2, now=clock(), manual=True, rollout_id="unused")
    [promoted] = t.events
    assert isinstance(promoted, RolloutPromoted) and promoted.manual and promoted.rollout_id == "r-1"
    assert promoted.steps_completed == 1
    assert t.route.stable_version == 2 and t.route.previous_stable_version == 1


def test_manual_promote_of_another_version_supersedes_the_canary(clock: Clock) -> None:
    route = live_route(clock, canary=3, stable=1)
    t = domain.promote(route, 4, now=clock(), manual=True, rollout_id="r-9")
    rolled_back, promoted = t.events
    assert isinstance(rolled_back, RolloutRolledBack) and rolled_back.reason is RollbackReason.SUPERSEDED
    assert (
        isinstance(promoted, RolloutPromoted) and promoted.rollout_id == "r-9" and promoted.model_version == 4
    )
    assert t.route.stable_version == 4 and t.route.active is None


def test_promoting_the_stable_version_changes_nothing(clock: Clock) -> None:
    t = domain.promote(stable_route(), 1, now=clock(), manual=True, rollout_id="r-9")
    assert t.ignored is not None and t.ignored.code == "already-stable"


def test_production_rollback_goes_back_to_the_previous_stable(clock: Clock) -> None:
    route = ModelRoute("churn", stable_version=2, previous_stable_version=1)
    t = domain.roll_back_production(
        route, version=2, to_version=None, message="m", now=clock(), rollout_id="rb-1"
    )
    [rolled_back] = t.events
    assert isinstance(rolled_back, RolloutRolledBack)
    assert (rolled_back.stable_version, rolled_back.canary_version, rolled_back.weight) == (1, 2, 1.0)
    assert t.route.stable_version == 1 and t.route.previous_stable_version is None


@pytest.mark.parametrize(
    ("route", "version", "to", "code"),
    [
        (ModelRoute("churn", stable_version=2), 2, None, "nothing-to-roll-back-to"),
        (ModelRoute("churn", stable_version=2, previous_stable_version=1), 7, None, "not-serving"),
        (ModelRoute("churn", stable_version=2), 2, 2, "already-stable"),
    ],
)
def test_production_rollback_refusals(
    clock: Clock, route: ModelRoute, version: int, to: int | None, code: str
) -> None:
    t = domain.roll_back_production(
        route, version=version, to_version=to, message="", now=clock(), rollout_id="x"
    )
    assert t.ignored is not None and t.ignored.code == code


def test_production_rollback_is_refused_while_a_canary_is_live(clock: Clock) -> None:
    t = domain.roll_back_production(
        live_route(clock), version=1, to_version=None, message="", now=clock(), rollout_id="x"
    )
    assert t.ignored is not None and t.ignored.code == "rollout-live"


def test_registry_production_change_makes_the_version_stable(clock: Clock) -> None:
    route = live_route(clock, canary=3, stable=1)
    to_canary = domain.production_changed(route, 3, now=clock())
    assert to_canary.events == () and to_canary.route.stable_version == 3 and to_canary.route.active is None
    to_other = domain.production_changed(route, 2, now=clock())
    assert to_other.route.stable_version == 2 and to_other.route.active is not None
    assert domain.production_changed(stable_route(), 1, now=clock()).ignored is not None


def test_a_registry_change_following_an_earlier_decision_of_serving_changes_nothing(clock: Clock) -> None:
    route = ModelRoute("churn", stable_version=3, previous_stable_version=2)
    t = domain.production_changed(route, 2, now=clock(), following_serving=True)
    assert t.ignored is not None and t.ignored.code == "stale-echo"
    assert t.route == route and t.events == ()


@pytest.mark.parametrize(
    ("requests", "errors", "breached"),
    # p = P(Binomial(requests, 0.05) >= errors): 0.26 for 2 of 20, 0.016 for 4, 0.0026 for 5; 0.38 for 6 of
    # 100, 0.011 for 11, 0.0043 for 12. Until 2026-12-02 2 of 20 and 6 of 100 were breaches.
    [
        (19, 19, False),
        (20, 1, False),
        (20, 2, False),
        (20, 4, False),
        (20, 5, True),
        (100, 6, False),
        (100, 11, False),
        (100, 12, True),
    ],
)
def test_error_rate_breach_needs_enough_requests_and_evidence(
    requests: int, errors: int, breached: bool
) -> None:
    assert (
        domain.error_rate_breached(requests, errors, threshold=0.05, min_requests=20, alpha=0.01) is breached
    )


def test_every_decision_records_its_time_and_a_step_advance_does_not(clock: Clock) -> None:
    started = live_route(clock)
    assert started.decided_at == clock()
    clock.advance(12)
    advanced = verdict(started, clock).route
    assert advanced.active is not None and advanced.active.step_index == 1
    assert advanced.decided_at == started.decided_at
    clock.advance(1)
    decisions = [
        domain.promote(advanced, 2, now=clock(), manual=True),
        domain.rollback(advanced, reason=RollbackReason.MANUAL, message="x", now=clock()),
        domain.production_changed(advanced, 3, now=clock()),
        domain.production_changed(stable_route(2), 1, now=clock()),
        domain.roll_back_production(
            replace(stable_route(2), previous_stable_version=1),
            version=2,
            to_version=None,
            message="x",
            now=clock(),
            rollout_id="r-2",
        ),
    ]
    assert [t.route.decided_at for t in decisions] == [clock()] * len(decisions)


def test_a_command_issued_before_the_last_decision_is_stale(clock: Clock) -> None:
    route = replace(stable_route(3), decided_at=clock())
    assert domain.stale_command(route, "PromoteRequested", issued_at=clock()) is None
    clock.advance(-1)
    why = domain.stale_command(route, "PromoteRequested", issued_at=clock())
    assert why is not None and "before churn's last routing change" in why and "stable version 3" in why
    # A route saved before serving recorded decisions refuses nothing.
    assert domain.stale_command(stable_route(3), "PromoteRequested", issued_at=clock()) is None


# --- routing -----------------------------------------------------------------------------------------------


def canary_view(weight: float, mode: RolloutMode = RolloutMode.CANARY) -> RouteView:
    return RouteView(rollout_id="r-1", weight=weight, mode=mode, has_stable=True, has_canary=True)


def test_the_same_entity_always_sees_the_same_variant() -> None:
    keys = [f"customer-{i}" for i in range(500)]
    first = domain.assign_variants(canary_view(0.3), keys, request_draw=0.99)
    for draw in (0.0, 0.5):
        assert domain.assign_variants(canary_view(0.3), keys, request_draw=draw) == first


def test_entities_on_the_canary_stay_there_as_the_weight_grows() -> None:
    keys = [f"customer-{i}" for i in range(2000)]
    at_10 = domain.assign_variants(canary_view(0.1), keys, 0.0)
    at_50 = domain.assign_variants(canary_view(0.5), keys, 0.0)
    assert all(b is Variant.CANARY for a, b in zip(at_10, at_50, strict=True) if a is Variant.CANARY)
    assert all(v is Variant.CANARY for v in domain.assign_variants(canary_view(1.0), keys, 0.0))


@pytest.mark.parametrize("weight", [0.1, 0.5])
def test_canary_share_of_entities_matches_the_weight(weight: float) -> None:
    n = 20_000
    keys = [f"e{i}" for i in range(n)]
    share = domain.assign_variants(canary_view(weight), keys, 0.0).count(Variant.CANARY) / n
    assert abs(share - weight) <= 4 * math.sqrt(weight * (1 - weight) / n)


def test_rows_without_a_key_follow_the_request_draw() -> None:
    assert domain.assign_variants(canary_view(0.1), [None, None], 0.05) == [Variant.CANARY] * 2
    assert domain.assign_variants(canary_view(0.1), [None, None], 0.15) == [Variant.STABLE] * 2


def test_sticky_draw_differs_between_rollouts() -> None:
    keys = [f"e{i}" for i in range(200)]
    assert [domain.sticky_draw("r-1", k) for k in keys] != [domain.sticky_draw("r-2", k) for k in keys]
    assert all(0 <= domain.sticky_draw("r-1", k) < 1 for k in keys)


def test_without_a_canary_the_stable_answers_everything() -> None:
    view = RouteView(rollout_id=None, weight=0.0, mode=RolloutMode.CANARY, has_stable=True, has_canary=False)
    assert domain.assign_variants(view, ["a", None], random.random()) == [Variant.STABLE] * 2


def test_shadow_mode_answers_with_the_stable_and_shadows_the_canary_share() -> None:
    keys = [f"e{i}" for i in range(1000)]
    view = canary_view(0.5, RolloutMode.SHADOW)
    assert set(domain.assign_variants(view, keys, 0.0)) == {Variant.STABLE}
    shadowed = domain.shadowed_rows(view, keys, 0.0)
    as_canary = domain.assign_variants(canary_view(0.5), keys, 0.0)
    assert shadowed == [i for i, v in enumerate(as_canary) if v is Variant.CANARY]
    assert domain.shadowed_rows(canary_view(0.5), keys, 0.0) == []


def test_a_shadow_rollout_without_a_loaded_stable_is_answered_by_the_candidate_once() -> None:
    # The stable failed to load on this replica: the candidate answers, and is not scored again as shadow
    # (each row would be logged twice, once as canary and once as shadow).
    view = RouteView(rollout_id="r-1", weight=1.0, mode=RolloutMode.SHADOW, has_stable=False, has_canary=True)
    keys = ["a", None]
    assert domain.assign_variants(view, keys, 0.0) == [Variant.CANARY] * 2
    assert domain.shadowed_rows(view, keys, 0.0) == []


def test_prediction_ids_name_their_model_and_version() -> None:
    pid = domain.prediction_id("churn.eu-2", 7, "abc", 3)
    assert domain.parse_prediction_id(pid) == ("churn.eu-2", 7)
    assert domain.parse_prediction_id("p-01J9Z6M3K2Q8") is None


# --- inputs ------------------------------------------------------------------------------------------------


def test_records_become_columns_with_null_and_nan_as_missing() -> None:
    cols = domain.columns_from_records(
        churn_signature(),
        [record(), record(tenure_months=None, plan=None), record(monthly_charges=float("nan"))],
    )
    assert cols.rows == 3
    assert cols.columns["tenure_months"][0] == 5 and math.isnan(cols.columns["tenure_months"][1])
    assert math.isnan(cols.columns["plan"][1]) and math.isnan(cols.columns["monthly_charges"][2])


@pytest.mark.parametrize(
    ("row", "feature", "reason"),
    [
        ({"monthly_charges": 1.0, "plan": "basic"}, "tenure_months", "missing"),
        ({**record(), "colour": "red"}, "colour", "unknown"),
        (record(tenure_months="12"), "tenure_months", "wrong-type"),
        (record(plan=1.5), "plan", "wrong-type"),
        # Unhashable: the check of known levels raised TypeError, a 422 model-refused naming no feature.
        (record(plan=["basic"]), "plan", "wrong-type"),
        (record(plan={"level": "basic"}), "plan", "wrong-type"),
        (record(monthly_charges=float("inf")), "monthly_charges", "infinite"),
        (record(monthly_charges=float("-inf")), "monthly_charges", "infinite"),
    ],
)
def test_bad_records_are_refused_naming_the_feature_and_why(
    row: dict[str, object], feature: str, reason: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        domain.columns_from_records(churn_signature(), [record(), row])
    assert err.value.extra["feature"] == feature and err.value.extra["reason"] == reason
    assert repr(feature) in err.value.message and err.value.extra["row"] == 1


def test_a_signature_no_longer_served_leaves_no_levels_behind() -> None:
    # The levels were held by a module cache of 1,024 lists: a retrained model's levels stayed in memory,
    # version after version, until a thousand more had come.
    gc.collect()  # levels of signatures earlier tests dropped go first, not during the count
    held = len(domain._levels_of)
    signature = churn_signature()
    domain.columns_from_records(signature, [record()])
    assert len(domain._levels_of) == held + 1  # made once, for every request to this version
    del signature
    gc.collect()
    assert len(domain._levels_of) == held


def test_a_new_version_is_checked_against_its_own_levels() -> None:
    v1 = churn_signature()
    plan = next(f for f in v1.features if f.name == "plan")
    v2 = ModelSignature.model_validate(
        {
            **v1.model_dump(),
            "features": [
                {**f.model_dump(), "categories": [*(plan.categories or []), "gold"]}
                if f is plan
                else f.model_dump()
                for f in v1.features
            ],
        }
    )
    assert domain.columns_from_records(v1, [record(plan="gold")]).unseen == {"plan": 1}
    assert domain.columns_from_records(v2, [record(plan="gold")]).unseen == {}
    assert domain.columns_from_records(v1, [record(plan="gold")]).unseen == {"plan": 1}


def test_unseen_categories_are_allowed_and_counted() -> None:
    cols = domain.columns_from_records(
        churn_signature(), [record(plan="gold"), record(plan="gold"), record()]
    )
    assert cols.unseen == {"plan": 2} and cols.columns["plan"][0] == "gold"


def test_row_limits() -> None:
    with pytest.raises(PayloadTooLarge):
        domain.check_row_count(11, 10)
    with pytest.raises(InvalidInput):
        domain.check_row_count(0, 10)
    domain.check_row_count(10, 10)


def tensors(**overrides: dict[str, object]) -> list[dict[str, object]]:
    base: dict[str, dict[str, object]] = {
        "tenure_months": {"name": "tenure_months", "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]},
        "monthly_charges": {
            "name": "monthly_charges",
            "shape": [2, 1],
            "datatype": "FP64",
            "data": [[3.0], [4.0]],
        },
        "plan": {"name": "plan", "shape": [2], "datatype": "BYTES", "data": ["basic", "plus"]},
    }
    base.update(overrides)
    return list(base.values())


def test_tensors_become_columns() -> None:
    ts = domain.tensors_from_json(tensors())
    assert domain.tensor_rows(ts) == 2
    cols = domain.columns_from_tensors(churn_signature(), ts, [1])
    assert cols.columns == {"tenure_months": [2.0], "monthly_charges": [4.0], "plan": ["plus"]}


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"plan": {"name": "plan", "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]}}, "wrong-type"),
        (
            {
                "tenure_months": {
                    "name": "tenure_months",
                    "shape": [3],
                    "datatype": "FP64",
                    "data": [1.0, 2.0],
                }
            },
            "wrong-shape",
        ),
        ({"extra": {"name": "extra", "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]}}, "unknown"),
        ({"plan": {"name": "plan", "shape": [2], "datatype": "BYTES"}}, "wrong-type"),
    ],
)
def test_bad_tensors_are_refused(override: dict[str, dict[str, object]], reason: str) -> None:
    with pytest.raises(InvalidInput) as err:
        ts = domain.tensors_from_json(tensors(**override))
        domain.tensor_rows(ts)
        domain.columns_from_tensors(churn_signature(), ts)
    assert err.value.extra["reason"] == reason


def test_one_tensor_of_every_feature_is_refused_saying_one_tensor_per_feature() -> None:
    # What KServe's sklearn examples send: one [n, features] tensor. Its error said only "one value per row",
    # and the client learnt of the one-tensor-per-feature rule at its second try.
    matrix = {
        "name": "input-0",
        "shape": [2, 3],
        "datatype": "FP64",
        "data": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]],
    }
    with pytest.raises(InvalidInput) as err:
        domain.tensor_rows(domain.tensors_from_json([matrix]))
    assert err.value.extra["reason"] == "wrong-shape"
    assert "one input tensor per feature" in str(err.value)


@pytest.mark.parametrize(
    "pid",
    [
        "churn:0:abc-0",
        "churn:2147483648:abc-0",
        "churn:99999999999999999999:abc-0",
        "churn:\u00b2:abc-0",  # '²' is a digit to str.isdigit, and int() refuses it
        "churn:\u0661:abc-0",  # Arabic-Indic one: int() reads it as 1
        "churn:-1:abc-0",
    ],
)
def test_a_prediction_id_whose_version_is_no_model_version_is_not_ours(pid: str) -> None:
    assert domain.parse_prediction_id(pid) is None


def test_the_highest_model_version_is_read_from_a_prediction_id() -> None:
    assert domain.parse_prediction_id("churn:2147483647:abc-0") == ("churn", 2147483647)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (10**400, "out-of-range"),  # read by Python's json as an int: float() would overflow
        (-(10**39), "out-of-range"),
        (1e39, "out-of-range"),  # finite in float64, infinity in float32 (the compiled engine)
        (-3.5e38, "out-of-range"),
        (float("inf"), "infinite"),
    ],
)
def test_numbers_beyond_float32s_range_are_refused_naming_the_feature_and_row(
    value: Any, reason: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        domain.columns_from_records(churn_signature(), [record(), record(monthly_charges=value)])
    assert err.value.extra == {"feature": "monthly_charges", "reason": reason, "row": 1}


def test_a_nan_first_hides_no_number_beyond_float32s_range() -> None:
    # The fast check compares min() and max(), which keep a NaN that comes first.
    with pytest.raises(InvalidInput) as err:
        domain.columns_from_records(
            churn_signature(), [record(tenure_months=float("nan")), record(tenure_months=1e39)]
        )
    assert err.value.extra["row"] == 1 and err.value.extra["reason"] == "out-of-range"


def test_numbers_up_to_float32s_limit_are_accepted() -> None:
    top = domain.FLOAT32_MAX
    cols = domain.columns_from_records(
        churn_signature(), [record(tenure_months=top, monthly_charges=-top), record(tenure_months=10**38)]
    )
    assert cols.columns["tenure_months"] == [top, 10**38]


def levelled(categories: list[Any] | None) -> ModelSignature:
    """The churn signature with these levels of ``plan`` (None: no levels listed)."""
    signature = churn_signature()
    plan = signature.features[-1].model_copy(update={"categories": categories})
    return signature.model_copy(update={"features": [*signature.features[:-1], plan]})


@pytest.mark.parametrize(
    ("plan", "reason"),
    [
        ("basic\x00", "invalid-text"),
        ("\x00driftloop:missing", "invalid-text"),  # the compiled engine's missing sentinel
        ("\ud800", "invalid-text"),  # a lone surrogate: only Python's json reader lets one in
        (2**64, "out-of-range"),
        (-(2**63) - 1, "out-of-range"),
    ],
)
def test_a_category_that_nothing_downstream_can_store_is_refused(plan: Any, reason: str) -> None:
    signature, level = (churn_signature(), "basic") if isinstance(plan, str) else (levelled([1, 2, 3]), 1)
    with pytest.raises(InvalidInput) as err:
        domain.columns_from_records(signature, [record(plan=level), record(plan=plan)])
    assert err.value.extra == {"feature": "plan", "reason": reason, "row": 1}


def test_unseen_categories_that_are_text_or_64_bit_integers_are_still_allowed() -> None:
    cols = domain.columns_from_records(churn_signature(), [record(plan="gold \u00e9\U0001f600")])
    assert cols.unseen == {"plan": 1}
    cols = domain.columns_from_records(levelled([1, 2, 3]), [record(plan=2**64 - 1), record(plan=-(2**63))])
    assert cols.unseen == {"plan": 2}
    assert domain.columns_from_records(levelled([True]), [record(plan=False)]).unseen == {"plan": 1}


@pytest.mark.parametrize(
    ("categories", "known", "unseen", "refused"),
    [
        (["basic", "plus", "1"], ["basic", "1"], ["gold", "2"], [1, True, 0, 1.0]),
        ([0, 1, 2], [0, 1, 2, 1.0], [7, -1, 7.0], ["1", True, False, 0.5]),
        ([False, True], [True, False], [], [1, 0, "True", 1.0]),
        # A signature registered from elsewhere may list levels of several types: each matches its own.
        (["a", 1], ["a", 1], ["1", 2], [True, False]),
    ],
)
def test_a_category_is_a_level_only_as_that_very_json_value(
    categories: list[Any], known: list[Any], unseen: list[Any], refused: list[Any]
) -> None:
    # Python's equality takes true for 1 (and 1 for true): serving counted them as known, the model's encoder
    # encoded them so, and monitoring counted them as new; "1" for 1 it was the other way round.
    signature = levelled(categories)
    for value in known:
        assert domain.columns_from_records(signature, [record(plan=value)] * 3).unseen == {}, value
    for value in unseen:
        assert domain.columns_from_records(signature, [record(plan=value)] * 3).unseen == {"plan": 3}, value
    for value in refused:
        # Alone and beside known values: the check at C speed for a column of known levels must not take true
        # for the level 1 either.
        for rows, row in (([value], 0), ([known[0], value], 1), ([value, value], 0)):
            with pytest.raises(InvalidInput) as err:
                domain.columns_from_records(signature, [record(plan=v) for v in rows])
            assert err.value.extra == {"feature": "plan", "reason": "wrong-type", "row": row}


def test_a_number_with_no_fraction_is_the_integer_of_integer_levels() -> None:
    # JSON has one kind of number: 1.0 is the integer 1 (JSON Schema's "integer", an OIP INT64 tensor), and
    # what a pandas column of integer codes with a gap writes. It was refused as "a number".
    signature = levelled([0, 1, 2])
    cols = domain.columns_from_records(signature, [record(plan=v) for v in [1.0, 7.0, -0.0, 2]])
    assert cols.unseen == {"plan": 1}
    assert cols.columns["plan"] == [1, 7, 0, 2] and {type(v) for v in cols.columns["plan"]} == {int}
    ts = [
        domain.Tensor("tenure_months", [2], "FP64", [1.0, 2.0]),
        domain.Tensor("monthly_charges", [2], "FP64", [1.0, 2.0]),
        domain.Tensor("plan", [2], "INT64", [1.0, 2]),
    ]
    assert domain.columns_from_tensors(signature, ts).columns["plan"] == [1, 2]
    refused: list[tuple[list[Any], float]] = [([0, 1, 2], 1.5), (["basic"], 1.0), ([True, False], 1.0)]
    for categories, value in refused:
        with pytest.raises(InvalidInput) as err:
            domain.columns_from_records(levelled(categories), [record(plan=value)])
        assert err.value.extra["reason"] == "wrong-type" and "not a number" in err.value.message


def test_a_feature_that_lists_no_levels_takes_any_category_and_counts_none_unseen() -> None:
    cols = domain.columns_from_records(levelled(None), [record(plan=v) for v in ["a", 1, True, None]])
    assert cols.unseen == {} and cols.columns["plan"][:3] == ["a", 1, True]


def test_a_wrong_type_refusal_says_what_to_send() -> None:
    with pytest.raises(InvalidInput) as err:
        domain.columns_from_records(levelled([0, 1, 2]), [record(plan="1")])
    assert err.value.message == (
        "feature 'plan' (row 0): the model's levels of this feature are integers, and a category is one only "
        "as a value of that type (\"1\" is not 1, true is not 1): send an integer (INT64), not a string ('1')"
    )


@pytest.mark.parametrize(
    "keys",
    [[{"a": 1}], [7], [True], ["a\x00b"], ["\udc00"]],
    ids=["object", "number", "boolean", "nul", "lone-surrogate"],
)
def test_entity_keys_are_strings_holding_text_or_null(keys: list[Any]) -> None:
    with pytest.raises(InvalidInput) as err:
        domain.check_entity_keys([None, "customer-1", *keys])
    assert err.value.message.startswith("entity_keys[2] ")
    assert domain.check_entity_keys([None, "customer-1", "é"]) == [None, "customer-1", "é"]


def _deeply_nested(levels: int) -> list[Any]:
    value: list[Any] = [5]
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("data", "shape"),
    [
        ([[5], [6]], [2]),  # nested, shape of rank 1
        ([[5], 6], [2, 1]),  # ragged
        ([[5], 6], [2]),
        ([[], [5]], [1]),
        ([[5, 6], []], [2, 1]),
        ([[[5]]], [1, 1]),  # deeper than the shape
        ([5, [6]], [2]),  # flat, then a list
        (5, [1]),  # a scalar
        ({"a": 5}, [1]),
        (_deeply_nested(5000), [1]),  # would have taken the interpreter's recursion limit
    ],
    ids=[
        "nested-rank-1",
        "ragged-rank-2",
        "ragged-rank-1",
        "empty-inner",
        "uneven-inner",
        "deeper",
        "list-in-flat",
        "scalar",
        "object",
        "5000-deep",
    ],
)
def test_tensor_data_nested_otherwise_than_its_shape_is_refused_naming_it(
    data: Any, shape: list[int]
) -> None:
    rows = shape[0]
    inputs = tensors(
        tenure_months={"name": "tenure_months", "shape": shape, "datatype": "FP64", "data": data}
    )
    inputs[1:] = [
        {"name": "monthly_charges", "shape": [rows], "datatype": "FP64", "data": [1.0] * rows},
        {"name": "plan", "shape": [rows], "datatype": "BYTES", "data": ["basic"] * rows},
    ]
    with pytest.raises(InvalidInput) as err:
        ts = domain.tensors_from_json(inputs)
        domain.tensor_rows(ts)
        domain.columns_from_tensors(churn_signature(), ts)
    assert err.value.extra["feature"] == "tenure_months" and err.value.extra["reason"] == "wrong-shape"
    assert "'tenure_months'" in err.value.message


@pytest.mark.parametrize("data", [[[1.0], [2.0]], [1.0, 2.0]], ids=["nested-as-the-shape", "flat"])
def test_tensor_data_may_be_flat_or_nested_as_its_shape(data: list[Any]) -> None:
    ts = domain.tensors_from_json(
        tensors(tenure_months={"name": "tenure_months", "shape": [2, 1], "datatype": "FP64", "data": data})
    )
    assert domain.columns_from_tensors(churn_signature(), ts).columns["tenure_months"] == [1.0, 2.0]


@pytest.mark.parametrize(
    ("feature", "datatype", "value", "reason"),
    [
        ("tenure_months", "INT64", 5.7, "wrong-type"),
        ("tenure_months", "INT8", 300, "out-of-range"),
        ("tenure_months", "UINT8", -3, "out-of-range"),
        ("tenure_months", "INT64", 2**63, "out-of-range"),
        ("tenure_months", "FP16", 1e6, "out-of-range"),
        ("tenure_months", "FP32", 1e300, "out-of-range"),
        ("tenure_months", "BOOL", 5, "wrong-type"),
        ("tenure_months", "FP64", True, "wrong-type"),
        ("tenure_months", "FP64", "5", "wrong-type"),
        ("plan", "INT64", "basic", "wrong-type"),
        ("plan", "BYTES", 7, "wrong-type"),
        ("plan", "BOOL", "basic", "wrong-type"),
    ],
)
def test_a_value_that_does_not_fit_its_tensors_datatype_is_refused_naming_it_and_the_row(
    feature: str, datatype: str, value: Any, reason: str
) -> None:
    good = {"INT64": 1, "INT8": 1, "UINT8": 1, "FP16": 1.5, "FP32": 1.5, "BOOL": True, "FP64": 1.5}
    tensor: dict[str, object] = {
        "name": feature,
        "shape": [2],
        "datatype": datatype,
        "data": [good.get(datatype, "plus"), value],
    }
    ts = domain.tensors_from_json(tensors(**{feature: tensor}))
    with pytest.raises(InvalidInput) as err:
        domain.columns_from_tensors(churn_signature(), ts)
    assert err.value.extra == {"feature": feature, "reason": reason, "row": 1}
    assert f"input tensor {feature!r} (row 1)" in err.value.message


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("INT64", [5.0, None]),  # an integral number is an integer
        ("UINT8", [255, float("nan")]),  # NaN is missing in any datatype
        ("FP16", [65504.0, -1]),
        ("BOOL", [True, None]),
    ],
)
def test_values_that_fit_their_datatype_are_accepted(datatype: str, data: list[Any]) -> None:
    tensor: dict[str, object] = {"name": "tenure_months", "shape": [2], "datatype": datatype, "data": data}
    ts = domain.tensors_from_json(tensors(tenure_months=tensor))
    assert domain.columns_from_tensors(churn_signature(), ts).rows == 2


def test_a_tensor_given_twice_is_refused() -> None:
    twice = [*tensors(), {"name": "plan", "shape": [2], "datatype": "BYTES", "data": ["gold", "gold"]}]
    with pytest.raises(InvalidInput, match="input tensor 'plan' is given twice") as err:
        domain.tensors_from_json(twice)
    assert err.value.extra == {"feature": "plan", "reason": "duplicate"}


def test_a_body_nested_too_deeply_for_the_json_reader_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="nested too deeply") as err:
        domain.parse_json(b"[" * 5000 + b"]" * 5000)
    assert err.value.extra["reason"] == "too-deep"


@pytest.mark.parametrize(
    "datatype", ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"]
)
def test_every_integer_datatype_carries_a_categorical_feature_with_integer_levels(datatype: str) -> None:
    # A client sends a numpy column of small integer codes as it is typed, uint8 as often as int64.
    signature = churn_signature()
    plan = signature.features[-1].model_copy(update={"categories": [0, 1, 2]})
    signature = signature.model_copy(update={"features": [*signature.features[:-1], plan]})
    tensor: dict[str, object] = {"name": "plan", "shape": [2], "datatype": datatype, "data": [2, 7]}
    columns = domain.columns_from_tensors(signature, domain.tensors_from_json(tensors(plan=tensor)))
    assert columns.columns["plan"] == [2, 7] and columns.unseen == {"plan": 1}


def test_a_production_rollback_of_a_version_not_serving_is_ignored_even_while_a_canary_is_live(
    clock: Clock,
) -> None:
    t = domain.roll_back_production(
        live_route(clock), version=7, to_version=None, message="", now=clock(), rollout_id="x"
    )
    assert t.ignored is not None and t.ignored.code == "not-serving"
