"""A replica's canary counts: kept for the live steps, let go once a step has ended and is flushed."""

from __future__ import annotations

from contracts.rollouts import RolloutMode
from services.serving.routing import ModelRouting, RoutingTable
from services.serving.scoring import CanaryStats


def test_counts_of_ended_steps_are_let_go_once_flushed_and_the_live_steps_kept() -> None:
    """Kept, the counts grow with every step the replica ever served, and each flush walks them all."""
    stats = CanaryStats(threshold=0.05, min_requests=3)
    for i in range(1000):
        stats.served("churn", f"r-{i}", 0, rows=3)
    stats.failed("churn", "r-999", 0)
    live = {("churn", "r-999", 0)}
    stats.unflushed()
    stats.served("churn", "r-unflushed", 0, rows=2)  # served while that flush was saved
    stats.forget_ended(live)
    assert set(stats.counts) == {("churn", "r-999", 0), ("churn", "r-unflushed", 0)}
    # The live step's requests and failures still count towards its error rate.
    breaches: list[tuple[str, str, str]] = []
    stats.on_breach = lambda *breach: breaches.append(breach)
    stats.failed("churn", "r-999", 0)
    assert [b[1] for b in breaches] == ["r-999"]
    # Once flushed, the ended step's rows go too.
    assert stats.unflushed() == [("churn", "r-unflushed", 0, 2)]
    stats.forget_ended(live)
    assert set(stats.counts) == {("churn", "r-999", 0)}


def test_the_live_steps_are_those_of_the_rollouts_the_table_routes() -> None:
    def routing(model: str, rollout_id: str | None, step: int) -> ModelRouting:
        return ModelRouting(model, None, None, rollout_id, 0.5, RolloutMode.CANARY, step)

    table = RoutingTable({"churn": routing("churn", "r-1", 2), "fraud": routing("fraud", None, 0)})
    assert table.live_steps == {("churn", "r-1", 2)}


def test_a_breach_is_reported_again_at_the_next_failure_so_a_failed_rollback_is_retried() -> None:
    """The receiver (bootstrap) makes one rollback attempt at a time and forgets an attempt that failed (the
    database away): reported once per step, a breach whose rollback failed was never tried again, and the
    failing canary kept its share of traffic for the rest of the step."""
    stats = CanaryStats(threshold=0.05, min_requests=3)
    breaches: list[tuple[str, str, str]] = []
    stats.on_breach = lambda *breach: breaches.append(breach)
    stats.served("churn", "r-1", 0, rows=1)
    stats.failed("churn", "r-1", 0)
    assert breaches == []  # 1 of 2 requests, fewer than min_requests
    stats.failed("churn", "r-1", 0)  # 2 of 3: p = 0.0073 that a canary failing 5% of requests fails as many
    stats.failed("churn", "r-1", 0)
    assert [b[:2] for b in breaches] == [("churn", "r-1")] * 2
    assert "failed 3 of 4" in breaches[-1][2]
    # A step under the threshold reports nothing.
    stats.served("churn", "r-1", 1, rows=1)
    stats.served("churn", "r-1", 1, rows=1)
    stats.failed("churn", "r-1", 1)
    assert len(breaches) == 2


def test_a_canary_failing_within_the_threshold_is_not_rolled_back_by_a_few_early_failures() -> None:
    """A canary failing 1% of its requests, two of them among its first 20: a measured share of 10% at the
    20th request, over the threshold of 5%, which until 2026-12-02 rolled it back (about one step in twenty
    for such a canary). Its failures show no rate above 5% (p = 0.26, then less and less), so it keeps its
    traffic; a canary failing every request is still rolled back at the 20th."""
    stats = CanaryStats(threshold=0.05, min_requests=20)  # alpha 0.01, the setting's default
    breaches: list[tuple[str, str, str]] = []
    stats.on_breach = lambda *breach: breaches.append(breach)
    for request in range(1, 1_001):
        if request in (3, 20) or request % 100 == 50:
            stats.failed("churn", "r-1", 0)
        else:
            stats.served("churn", "r-1", 0, rows=1)
    assert breaches == []
    for _ in range(20):
        stats.failed("churn", "r-2", 0)
    assert [b[1] for b in breaches] == ["r-2"]
    assert "failed 20 of 20" in breaches[0][2]
