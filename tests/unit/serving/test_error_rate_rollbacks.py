"""A replica's error-rate rollbacks: one attempt per rollout at a time, and an attempt that fails (Postgres
away) is counted, so an operator can alert on a failing canary that is not being rolled back, and tried
again at the next failure over the threshold."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from services.serving.bootstrap import ErrorRateRollbacks


def rollback_failures() -> float:
    return REGISTRY.get_sample_value("driftloop_serving_error_rate_rollback_failures_total") or 0.0


async def settled(rollbacks: ErrorRateRollbacks) -> None:
    while rollbacks._attempts:
        await asyncio.gather(*rollbacks._attempts)


async def test_a_rollback_that_fails_is_counted_and_the_next_breach_tries_again() -> None:
    calls: list[tuple[str, str, str]] = []

    async def roll_back(model: str, rollout_id: str, message: str) -> None:
        calls.append((model, rollout_id, message))
        if len(calls) == 1:
            raise ConnectionRefusedError("postgres is restarting")

    rollbacks = ErrorRateRollbacks(roll_back, retry_s=0)
    before = rollback_failures()

    rollbacks("churn", "r-1", "3 of 20 canary requests failed")
    await settled(rollbacks)
    assert rollback_failures() - before == 1
    rollbacks("churn", "r-1", "4 of 21 canary requests failed")
    await settled(rollbacks)

    assert calls == [
        ("churn", "r-1", "3 of 20 canary requests failed"),
        ("churn", "r-1", "4 of 21 canary requests failed"),
    ]
    assert rollback_failures() - before == 1  # the second attempt rolled it back


async def test_one_attempt_per_rollout_in_flight_or_done() -> None:
    release, both_started = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def roll_back(model: str, rollout_id: str, message: str) -> None:
        calls.append(rollout_id)
        if len(calls) == 2:
            both_started.set()
        await release.wait()

    rollbacks = ErrorRateRollbacks(roll_back, retry_s=0)
    before = rollback_failures()
    for _ in range(5):  # every failing canary request over the threshold reports the breach
        rollbacks("churn", "r-1", "breach")
    rollbacks("fraud", "r-2", "breach")
    await asyncio.wait_for(both_started.wait(), timeout=10)
    assert calls == ["r-1", "r-2"]  # in flight: no second attempt for r-1

    release.set()
    await settled(rollbacks)
    rollbacks("churn", "r-1", "breach")  # rolled back already: nothing left to do
    await settled(rollbacks)
    assert calls == ["r-1", "r-2"]
    assert rollback_failures() == before
