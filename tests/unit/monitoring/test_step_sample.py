"""A rollout step's kept rows and requests (at most ``canary_step_max_rows`` per variant) are a uniform random
sample of all the step's, not its first ones: on a busy model the first 50,000 rows came in the first seconds
of a step lasting minutes, and a canary that degraded later in the step was judged on those and passed."""

from __future__ import annotations

import dataclasses

import numpy as np

from contracts.common import Task
from contracts.predictions import PredictionOutput, PredictionRecord, PredictionsLogged, Variant
from services.monitoring.domain import (
    CanaryPolicy,
    CanaryStep,
    LabelledComparison,
    ReservoirSample,
    Verdict,
    from_epoch,
    judge_canary,
)
from services.monitoring.live import LiveState, PredictionCache, WindowSettings
from tests.unit.monitoring.test_domain import reference

MOST = 1_000  # canary_step_max_rows in these tests (its least)
STARTED_AT = 1_767_225_600.0
INPUTS = {"x0": 0.0, "x1": 0.0, "x2": 0.0, "plan": "basic"}

Request = tuple[PredictionsLogged, int, int]


def logged(version: int, variant: Variant, offset: int, scores: list[float], latency: float) -> Request:
    """One request of the step that rollout r-1 routed, logged at partition 0 ``offset``, one second after the
    last: a row per score (class 1's probability), whose predicted value names the row."""
    rows = [
        PredictionRecord(
            prediction_id=f"{variant.value}-{offset}-{i}",
            inputs=INPUTS,
            output=PredictionOutput(prediction=f"{variant.value}-{offset}-{i}", probabilities={"1": s}),
        )
        for i, s in enumerate(scores)
    ]
    payload = PredictionsLogged(
        model="churn",
        model_version=version,
        variant=variant,
        rollout_id=None if variant is Variant.STABLE else "r-1",
        request_id=f"{variant.value}-{offset}",
        predicted_at=from_epoch(STARTED_AT + 1.0 + offset),
        latency_ms=latency,
        rows=rows,
    )
    return payload, 0, offset


def watched_step(*, seed: int = 7) -> tuple[LiveState, CanaryStep]:
    """Monitoring's memory of versions 1 (stable) and 2 (canary), watching their rollout's step, its samples
    drawn from seeded generators."""
    live = LiveState(
        WindowSettings(rows=5_000, seconds=1e9, min_rows=10),
        PredictionCache(max_age_s=1e9, max_rows=10**6),
        step_max_rows=MOST,
    )
    live.add_reference(reference())
    live.add_reference(dataclasses.replace(reference(), version=2))
    step = CanaryStep("r-1", "churn", 1, 2, 1, started_at=STARTED_AT, min_samples=100, bake_seconds=0.0)
    step.canary.seed(seed)
    step.stable.seed(seed + 1)
    live.watch(step)
    return live, step


def late_share(kept: np.ndarray, late: np.ndarray) -> float:
    return float(np.isin(kept, late).mean())


def test_a_step_fed_ten_times_its_bound_keeps_the_bound_with_rows_and_requests_from_all_of_it() -> None:
    # Every request a row; the first tenth of the step's scores (and latencies) below 0.5, the rest above.
    live, step = watched_step()
    n = 10 * MOST
    scores = np.where(np.arange(n) < MOST, 0.25, 0.75) + np.arange(n) * 1e-6  # each row its own score
    latencies = np.where(np.arange(n) < MOST, 2.0, 40.0)
    expected: dict[str, tuple[float, float]] = {}  # per row, its score and time
    for poll in range(0, n, 400):
        reqs = []
        for offset in range(poll, min(poll + 400, n)):
            request = logged(2, Variant.CANARY, offset, [float(scores[offset])], float(latencies[offset]))
            expected[request[0].rows[0].prediction_id] = (float(scores[offset]), STARTED_AT + 1.0 + offset)
            reqs.append(request)
        live.ingest(reqs, arrival=STARTED_AT + 1.0 + poll)

    canary = step.canary
    assert (canary.rows, canary.rows_kept, canary.rows_not_kept) == (n, MOST, n - MOST)
    assert (canary.requests, canary.requests_kept) == (n, MOST)
    kept_scores, kept_latencies = canary.scores(), canary.latencies()
    assert kept_scores.size == kept_latencies.size == MOST
    assert np.unique(kept_scores).size == MOST  # each kept once
    # Nine in ten of the step's rows and requests came after the first MOST: about as many of the kept ones
    # are (0.9 give or take 0.01; the band is 8 standard deviations or more wide on either side).
    assert 0.80 <= float((kept_scores > 0.5).mean()) <= 0.98
    assert 0.80 <= float((kept_latencies == 40.0).mean()) <= 0.98
    # A kept row's score, predicted value and time are of one row.
    kept = list(zip(canary.predictions(), kept_scores.tolist(), canary.predicted_at().tolist(), strict=True))
    assert all(expected[prediction] == (score, at) for prediction, score, at in kept)


def test_a_canary_that_degrades_only_after_the_bound_is_unhealthy() -> None:
    # Each poll a second of a busy step: 250 requests of 2 rows per variant. The canary is as stable is for
    # the first 4 polls (its first 1,000 requests and 2,000 rows, past the bound of both), then slow and
    # sure of class 1. Kept as the first ones, its rows and requests were all from before: healthy.
    live, step = watched_step()
    rng = np.random.default_rng(3)
    offset = 0
    for poll in range(20):
        reqs: list[Request] = []
        degraded = poll >= 4
        for _ in range(250):
            for version, variant in ((1, Variant.STABLE), (2, Variant.CANARY)):
                bad = degraded and variant is Variant.CANARY
                scores = rng.uniform(0.9, 1.0, 2) if bad else rng.uniform(0.0, 1.0, 2)
                reqs.append(logged(version, variant, offset, scores.tolist(), 40.0 if bad else 2.0))
                offset += 1
        live.ingest(reqs, arrival=STARTED_AT + 1.0 + offset)

    assert (step.canary.rows, step.canary.rows_kept, step.canary.requests_kept) == (10_000, MOST, MOST)
    decision = judge_canary(
        step, task=Task.CLASSIFICATION, labelled=LabelledComparison(), policy=CanaryPolicy()
    )
    assert decision.verdict is Verdict.UNHEALTHY
    assert decision.reason == "canary failed: latency_p95_ms, prediction_divergence"


def test_a_sample_keeps_each_item_with_the_same_chance_however_the_stream_is_chunked() -> None:
    # 200 samples of 10 of a stream of 100, offered in chunks of 1 to 37: each item is kept 20 times in 200
    # on average, the first as the last.
    counts = np.zeros(100)
    rng = np.random.default_rng(11)
    for _ in range(2_000):
        sample = ReservoirSample()
        first = 0
        while first < 100:
            size = int(rng.integers(1, 38))
            sample.offer((np.arange(first, min(first + size, 100)),), 10, rng)
            first += size
        kept = sample.column(0, np.empty(0))
        assert kept.size == np.unique(kept).size == 10
        counts[kept] += 1
    # Each item's count is binomial (2,000, 0.1): 200 give or take 13.4; the band is over 5 of those wide.
    assert counts.min() > 130 and counts.max() < 270
    assert abs(counts[:10].mean() - counts[-10:].mean()) < 25


def test_the_arrays_a_sample_was_given_stay_as_they_were() -> None:
    given = np.arange(MOST, dtype=np.float64)
    sample = ReservoirSample()
    rng = np.random.default_rng(0)
    sample.offer((given,), MOST, rng)
    sample.offer((np.full(5 * MOST, -1.0),), MOST, rng)
    assert given.tolist() == list(range(MOST))
    assert (sample.column(0, np.empty(0)) == -1.0).any()


def test_a_step_read_again_in_other_polls_keeps_the_same_sample() -> None:
    # A restart reads the step's traffic again, polled otherwise: the sample, and so the verdict, is the same.
    # Two different steps draw different samples.
    def kept(step: CanaryStep, polls: list[int]) -> list[float]:
        first = 0
        for size in polls:
            rows = np.arange(first, first + size, dtype=np.float64)
            step.canary.add(rows, rows, rows.astype(object), rows, most=MOST)
            first += size
        return step.canary.scores().tolist()

    def step(rollout: str) -> CanaryStep:
        return CanaryStep(rollout, "churn", 1, 2, 1, started_at=STARTED_AT, min_samples=100, bake_seconds=0.0)

    once = kept(step("r-1"), [10 * MOST])
    assert kept(step("r-1"), [MOST // 2, 3 * MOST, 1, 6 * MOST + MOST // 2 - 1]) == once
    assert kept(step("r-2"), [10 * MOST]) != once
