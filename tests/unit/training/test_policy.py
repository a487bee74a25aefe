"""The retrain policy on known inputs: enabled, one run in flight, daily budget, cooldown, labels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from contracts.common import ID_MAX_CHARS, PG_INTEGER_MAX
from contracts.training import SkipReason, TrainingTrigger
from libs.modelspec import RetrainPolicy
from services.training.domain import PolicyState, Trigger, decide, job_id_for, run_id_for

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DRIFT = Trigger(TrainingTrigger.DRIFT_DETECTED)
POLICY = RetrainPolicy(cooldown_seconds=1800, daily_budget=3, min_labelled_rows=100)


def test_first_trigger_is_accepted() -> None:
    assert decide(POLICY, PolicyState(), DRIFT, NOW).accepted


def test_trigger_within_cooldown_is_skipped_with_the_time_left() -> None:
    state = PolicyState(last_completed_at=NOW - timedelta(minutes=10))
    decision = decide(POLICY, state, DRIFT, NOW)
    assert not decision.accepted
    assert decision.reason is SkipReason.COOLDOWN
    assert decision.retry_after_seconds == 1200
    assert "cooldown is 1800 s" in decision.message


def test_trigger_after_cooldown_is_accepted() -> None:
    state = PolicyState(last_completed_at=NOW - timedelta(minutes=31))
    assert decide(POLICY, state, DRIFT, NOW).accepted


def test_manual_request_may_waive_the_cooldown_but_automatic_triggers_may_not() -> None:
    state = PolicyState(last_completed_at=NOW - timedelta(minutes=1))
    manual = Trigger(TrainingTrigger.MANUAL, ignore_cooldown=True)
    assert decide(POLICY, state, manual, NOW).accepted
    assert not decide(POLICY, state, Trigger(TrainingTrigger.MANUAL), NOW).accepted
    drift_waiving = Trigger(TrainingTrigger.DRIFT_DETECTED, ignore_cooldown=True)
    assert not decide(POLICY, state, drift_waiving, NOW).accepted


def test_second_trigger_while_a_job_is_in_flight_is_skipped_naming_the_job() -> None:
    decision = decide(POLICY, PolicyState(in_flight_job_id="job-1"), DRIFT, NOW)
    assert decision.reason is SkipReason.IN_FLIGHT
    assert decision.in_flight_job_id == "job-1"


def test_in_flight_rule_holds_even_for_a_manual_request_that_ignores_cooldown() -> None:
    manual = Trigger(TrainingTrigger.MANUAL, ignore_cooldown=True)
    assert decide(POLICY, PolicyState(in_flight_job_id="job-1"), manual, NOW).reason is SkipReason.IN_FLIGHT


def test_exhausted_daily_budget_skips_until_the_oldest_job_ages_out() -> None:
    state = PolicyState(jobs_last_24h=3, oldest_job_last_24h_at=NOW - timedelta(hours=20))
    decision = decide(POLICY, state, Trigger(TrainingTrigger.MANUAL, ignore_cooldown=True), NOW)
    assert decision.reason is SkipReason.BUDGET_EXHAUSTED
    assert decision.retry_after_seconds == 4 * 3600


def test_budget_below_limit_accepts() -> None:
    assert decide(POLICY, PolicyState(jobs_last_24h=2), DRIFT, NOW).accepted


def test_disabled_policy_skips_automatic_triggers_but_not_people() -> None:
    disabled = POLICY.model_copy(update={"enabled": False})
    assert decide(disabled, PolicyState(), DRIFT, NOW).reason is SkipReason.POLICY_DISABLED
    assert decide(disabled, PolicyState(), Trigger(TrainingTrigger.MANUAL), NOW).accepted


def test_degraded_performance_with_too_few_labels_is_skipped() -> None:
    few = Trigger(TrainingTrigger.PERFORMANCE_DEGRADED, labelled_rows=40)
    decision = decide(POLICY, PolicyState(), few, NOW)
    assert decision.reason is SkipReason.NOT_ENOUGH_LABELS
    assert "40 labelled rows" in decision.message
    enough = Trigger(TrainingTrigger.PERFORMANCE_DEGRADED, labelled_rows=100)
    assert decide(POLICY, PolicyState(), enough, NOW).accepted


def test_drift_without_labels_still_retrains() -> None:
    unlabelled = Trigger(TrainingTrigger.DRIFT_DETECTED, labelled_rows=0)
    assert decide(POLICY, PolicyState(), unlabelled, NOW).accepted


def test_job_ids_are_stable_per_model_and_trigger_and_run_ids_per_attempt() -> None:
    assert job_id_for("churn", "e1") == job_id_for("churn", "e1")
    assert job_id_for("churn", "e1") != job_id_for("fraud", "e1")
    job = job_id_for("churn", "e1")
    assert run_id_for(job, 1) != run_id_for(job, 2)


def test_run_ids_of_foreign_job_ids_are_distinct_and_fit_the_contract() -> None:
    # A request this service did not make may name any job id the contract takes (up to ID_MAX_CHARS): its
    # run ids must fit in a TrainingStarted too, and never be another job's.
    longest = "job-" + "x" * (ID_MAX_CHARS - 4)
    assert len(run_id_for(longest, PG_INTEGER_MAX)) <= ID_MAX_CHARS
    assert run_id_for("abc", 1) != run_id_for("job-abc", 1)
    own = job_id_for("churn", "evt-1")
    assert run_id_for(own, 2) == f"run-{own.removeprefix('job-')}-2"
