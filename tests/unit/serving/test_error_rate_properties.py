"""Properties of serving's error-rate breach (a one-sided exact binomial test, docs/serving.md), over hostile
but legal inputs (hypothesis): no requests failed, every one failed, thresholds of 1e-300 and 1, α from
1e-12 to nearly 1, a billion billion requests.

A canary with no failures, or failing no more than the threshold's share, never breaches; one more failure
never ends a breach and one more request that succeeded never starts one; a canary failing every request
breaches as soon as that many failures are unlikely at the threshold's rate. Derandomised: the same
examples on every run.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.serving.domain import error_rate_breached

PROPERTY = settings(derandomize=True, deadline=None, database=None, max_examples=300)

request_counts = st.integers(1, 2_000) | st.sampled_from((1, 20, 10**9, 10**18))
thresholds = st.floats(0, 1, exclude_min=True) | st.sampled_from((1e-300, 0.01, 0.05, 1.0))
alphas = st.floats(1e-12, 1, exclude_max=True) | st.sampled_from((0.01, 0.05))


@st.composite
def steps(draw: st.DrawFn) -> tuple[int, int]:
    """(requests, errors) of a canary's step: none failed, every one failed, or any share between."""
    requests = draw(request_counts)
    errors = draw(st.integers(0, requests) | st.sampled_from((0, 1, requests)))
    return requests, min(errors, requests)


@PROPERTY
@given(steps(), thresholds, st.integers(1, 100), alphas)
def test_a_canary_failing_no_more_than_the_thresholds_share_never_breaches(
    step: tuple[int, int], threshold: float, min_requests: int, alpha: float
) -> None:
    requests, errors = step
    breached = error_rate_breached(
        requests, errors, threshold=threshold, min_requests=min_requests, alpha=alpha
    )
    if errors == 0 or errors <= threshold * requests or requests < min_requests:
        assert not breached


@PROPERTY
@given(steps(), thresholds, st.integers(1, 100), alphas)
def test_one_more_failure_never_ends_a_breach_nor_does_one_more_success_start_one(
    step: tuple[int, int], threshold: float, min_requests: int, alpha: float
) -> None:
    requests, errors = step

    def breached(requests: int, errors: int) -> bool:
        return error_rate_breached(
            requests, errors, threshold=threshold, min_requests=min_requests, alpha=alpha
        )

    now = breached(requests, errors)
    if errors < requests:
        assert breached(requests, errors + 1) or not now
    if requests >= min_requests:
        assert now or not breached(requests + 1, errors)


@PROPERTY
@given(st.integers(1, 2_000), st.floats(0, 1, exclude_min=True, exclude_max=True), alphas)
def test_a_canary_failing_every_request_breaches_once_that_is_unlikely_at_the_threshold(
    requests: int, threshold: float, alpha: float
) -> None:
    # P(Binomial(n, θ) >= n) = θⁿ; halved, so that a rounding of the last digit decides nothing here.
    if threshold**requests < alpha / 2:
        assert error_rate_breached(
            requests, requests, threshold=threshold, min_requests=requests, alpha=alpha
        )
