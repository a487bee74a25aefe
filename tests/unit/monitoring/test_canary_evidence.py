"""A rollout step's canary side is the traffic the rollout routed: its candidate's rows (canary or shadow)
that carry its id. A request naming the canary's version (POST /v2/models/{name}/versions/{v}/infer) is the
client's choice, and serving logs it with variant canary and no rollout id (docs/serving.md). Counted by
version and variant, as before, one client calling the version filled a step's samples and skewed its latency
and divergence (and, with labels, its accuracy: tests/integration/monitoring, the labelled query)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from contracts.common import Task
from contracts.predictions import Variant
from services.monitoring import bootstrap, handlers
from services.monitoring.domain import (
    CanaryPolicy,
    LabelledComparison,
    Verdict,
    canary_ready,
    from_epoch,
    judge_canary,
)
from services.monitoring.handlers import Tally
from services.monitoring.ports import ReplayReport
from tests.unit.monitoring.test_canary_watch import STARTED
from tests.unit.monitoring.test_domain import requests
from tests.unit.monitoring.test_finished_rollouts import handle
from tests.unit.monitoring.test_rollout_order import (
    ReplayRuntime,
    RestartSteps,
    canary_traffic,
    monitor_at,
    with_canary,
)
from tests.unit.monitoring.test_step_sample import STARTED_AT, Request, logged, watched_step


def naming_the_version(request: Request) -> Request:
    """The request as serving logs it when the client named the version: no rollout id."""
    payload, partition, offset = request
    return payload.model_copy(update={"rollout_id": None}), partition, offset


def test_requests_naming_the_canarys_version_are_not_the_steps_canary_evidence() -> None:
    # Each second the rollout routes a stable and a canary request alike (2 rows each, 2 ms), and a client
    # calls the canary's version 10 times: slow, and sure of class 1.
    live, step = watched_step()
    step.min_samples = 500
    rng = np.random.default_rng(5)
    reqs: list[Request] = []
    for second in range(100):
        offset = 12 * second
        reqs.append(logged(1, Variant.STABLE, offset, rng.uniform(0, 1, 2).tolist(), 2.0))
        reqs.append(logged(2, Variant.CANARY, offset + 1, rng.uniform(0, 1, 2).tolist(), 2.0))
        for call in range(10):
            sure = rng.uniform(0.9, 1.0, 2).tolist()
            reqs.append(naming_the_version(logged(2, Variant.CANARY, offset + 2 + call, sure, 40.0)))
    live.ingest(reqs, arrival=STARTED_AT + 1_200.0)

    # Before, the client's 2,000 rows and 1,000 requests were the canary's too: 2,200 rows, min_samples met,
    # and the verdict unhealthy on latency and divergence the rollout's traffic never had.
    assert (step.canary.rows, step.canary.requests) == (200, 100)
    assert (step.stable.rows, step.stable.requests) == (200, 100)
    assert set(step.canary.latencies().tolist()) == {2.0}
    assert step.first_offsets == {0: 0}
    assert canary_ready(step, STARTED_AT + 1e6) == "wait"  # 200 of the 500 samples the step needs
    decision = judge_canary(
        step, task=Task.CLASSIFICATION, labelled=LabelledComparison(), policy=CanaryPolicy()
    )
    assert decision.verdict is Verdict.HEALTHY, decision.reason


def test_the_rollouts_shadow_rows_count_and_rows_another_rollout_routed_do_not() -> None:
    live, step = watched_step()
    shadow = logged(2, Variant.SHADOW, 0, [0.5, 0.5], 2.0)
    earlier = logged(2, Variant.CANARY, 1, [0.5, 0.5, 0.5], 2.0)  # an earlier rollout of the version, r-0
    live.ingest([shadow, (earlier[0].model_copy(update={"rollout_id": "r-0"}), 0, 1)], arrival=STARTED_AT + 5)
    assert (step.canary.rows, step.canary.requests) == (2, 1)


def client_calls(n_rows: int, *, at: float, first_offset: int) -> list[Any]:
    """A client's calls naming the canary's version 2 (variant canary, no rollout id), dated ``at`` on, in
    partition 0 from ``first_offset``."""
    named = {"model_version": 2, "variant": Variant.CANARY, "rollout_id": None}
    return [
        (payload.model_copy(update=named), part, first_offset + off)
        for payload, part, off in requests(n_rows, seed=8, start=from_epoch(at))
    ]


async def test_a_restart_replays_only_the_routed_rows_into_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # A restart rebuilds the step's traffic by replaying the predictions topic through the same ingest: it
    # leaves the client's calls out as memory did.
    now = time.time()
    store = RestartSteps()
    routed = canary_traffic(150, at=now + 1.0)  # 3 requests of rollout r-1, offsets 0 to 2
    traffic = routed + client_calls(600, at=now + 1.0, first_offset=len(routed))
    first = with_canary(monitor_at(now))
    await handle(STARTED, first, store)
    first.live.ingest(traffic, arrival=now + 5.0)
    assert first.live.steps["r-1"].canary.rows == 150
    tally = Tally()
    await handlers.housekeeping(now + 40.0, monitor=first, store=store, tally=tally)  # type: ignore[arg-type]
    tally.count()

    async def replay(
        _: Any, *, start: dict[int, int], feed: Callable[[Sequence[Any]], Any], **__: Any
    ) -> ReplayReport:
        feed([r for r in traffic if r[2] >= start.get(r[1], 0)])
        return ReplayReport()

    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    monkeypatch.setattr(bootstrap, "replay_predictions", replay)
    restarted = with_canary(monitor_at(now + 60.0))
    await bootstrap.restore(ReplayRuntime(store), restarted)  # type: ignore[arg-type]
    assert store.offsets[first.predictions_topic] == {0: 0}
    assert (restarted.live.steps["r-1"].canary.rows, restarted.live.steps["r-1"].canary.requests) == (150, 3)


def test_a_restart_replays_from_a_steps_first_canary_row_though_a_later_stable_row_came_first() -> None:
    # A poll gives each partition's records in order, but is ingested version by version, in the order each
    # version first comes in it: the stable version's requests (partition 0 at offset 5, partition 1 at 4),
    # then the canary's (partition 1 at 3). Offset 4, the first the step counted on partition 1, was taken
    # as where its rows start there: the replay started after the canary's row, and a restart never counted
    # it toward the step.
    live, step = watched_step()
    stable_0, stable_1, canary_1 = (
        logged(1, Variant.STABLE, 5, [0.5], 2.0),
        logged(1, Variant.STABLE, 4, [0.5], 2.0),
        logged(2, Variant.CANARY, 3, [0.5], 2.0),
    )
    live.ingest(
        [stable_0, (canary_1[0], 1, canary_1[2]), (stable_1[0], 1, stable_1[2])], arrival=STARTED_AT + 10.0
    )
    assert (step.canary.rows, step.stable.rows) == (1, 2)
    # Its windows judged and its predictions no longer held for labels: only the step holds the replay back.
    live.close_idle(STARTED_AT + 10.0, set_aside_after=0.0)
    live.closed.clear()
    live.cache.max_rows = 0
    live.cache.evict(STARTED_AT + 10.0)

    assert live.hold_offsets() == {0: 5, 1: 3}
