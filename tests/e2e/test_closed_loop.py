"""The closed loop with every service as its own process, on real Kafka and Postgres."""

from __future__ import annotations

from typing import Any

import pytest

from contracts.envelope import CloudEvent, EventPayload
from contracts.models import ModelVersionRegistered
from contracts.monitoring import DriftDetected, PerformanceDegraded
from contracts.rollouts import RolloutPromoted, RolloutRolledBack, RolloutStarted, RolloutStepAdvanced
from contracts.training import TrainingCompleted, TrainingRequested
from contracts.validation import ValidationPassed
from deploy.loop import EventTail, LoopClient, Traffic, poll
from deploy.scenario import CONCEPT_SHIFTED, INPUTS_SHIFTED, REFERENCE, TARGET, Phase, generate
from tests.e2e.steps import serve_version_1

pytestmark = pytest.mark.timeout(600)


def rolled_out_version(event: CloudEvent[Any]) -> int:
    d = event.data
    return int(d.model_version if isinstance(d, RolloutPromoted) else d.canary_version)


def in_cascade(model: str, root: CloudEvent[Any]) -> Any:
    return lambda e: e.subject == model and e.correlationid == root.correlationid


@pytest.mark.parametrize(
    ("shift", "signal"),
    [(INPUTS_SHIFTED, DriftDetected), (CONCEPT_SHIFTED, PerformanceDegraded)],
    ids=["data-drift", "concept-drift"],
)
async def test_a_shift_cascades_from_its_signal_to_a_retrained_model_promoted_step_by_step(
    client: LoopClient, tail: EventTail, shift: Phase, signal: type[EventPayload]
) -> None:
    # Each shift can raise one of monitoring's signals only (see deploy/scenario.py): new inputs with the
    # same rule leave the model as accurate, a new rule on the same inputs leaves the inputs as they were.
    # The cooldown keeps the cascade to one retrain.
    model = await serve_version_1(client, tail, cooldown_s=60)
    traffic = Traffic(client, model, phase=REFERENCE, requests_per_s=30, rows_per_request=10)
    traffic.start()
    try:
        await poll(lambda: _ready(traffic.stats.rows >= 1500), deadline_s=60, what="reference traffic")
        traffic.phase = shift
        promoted = await tail.wait_for(
            (RolloutPromoted, RolloutRolledBack),
            lambda e: e.subject == model and rolled_out_version(e) >= 2,
            deadline_s=300,
        )
    finally:
        await traffic.stop()

    assert isinstance(promoted.data, RolloutPromoted), promoted.data
    # One cascade, from monitoring's signal to the promotion, each step caused by the one before it.
    same = in_cascade(model, promoted)
    [root] = [e for e in tail.events((DriftDetected, PerformanceDegraded)) if e.id == promoted.correlationid]
    assert isinstance(root.data, signal), root.data
    requested = await tail.wait_for(TrainingRequested, same, deadline_s=1)
    completed = await tail.wait_for(TrainingCompleted, same, deadline_s=1)
    registered = await tail.wait_for(ModelVersionRegistered, same, deadline_s=1)
    await tail.wait_for(ValidationPassed, same, deadline_s=1)
    await tail.wait_for(RolloutStarted, same, deadline_s=1)
    await tail.wait_for(RolloutStepAdvanced, same, deadline_s=1)
    assert requested.causationid == root.id
    assert completed.data.lineage.parent_version == 1
    assert promoted.data.model_version == registered.data.model_version >= 2
    route = await client.route(model)
    assert route is not None and route["stable_version"] == promoted.data.model_version
    assert traffic.stats.failed == 0, traffic.stats.failures
    assert set(traffic.stats.by_version) >= {1, promoted.data.model_version}


async def test_a_bad_candidate_is_caught_by_the_canary_and_rolled_back(
    client: LoopClient, tail: EventTail
) -> None:
    model = await serve_version_1(client, tail)
    traffic = Traffic(client, model, phase=REFERENCE, requests_per_s=30, rows_per_request=10)
    traffic.start()
    try:
        corrupted = generate(8_000, REFERENCE, seed=5)
        corrupted[TARGET] = 1 - corrupted[TARGET]  # labels inverted: the candidate learns the opposite
        await client.upload_dataset(f"{model}-base", corrupted, [model])
        started = await tail.wait_for(
            RolloutStarted, lambda e: e.subject == model and e.data.canary_version == 2, deadline_s=180
        )
        ended = await tail.wait_for(
            (RolloutRolledBack, RolloutPromoted), in_cascade(model, started), deadline_s=240
        )
    finally:
        await traffic.stop()

    assert isinstance(ended.data, RolloutRolledBack), ended.data
    assert ended.data.canary_version == 2
    route = await client.route(model)
    assert route is not None and route["stable_version"] == 1
    assert traffic.stats.failed == 0, traffic.stats.failures


async def test_an_operator_rolls_back_a_canary_over_http(client: LoopClient, tail: EventTail) -> None:
    model = await serve_version_1(client, tail)
    # A retrain on new data starts a rollout; with no traffic the canary stays on its first step.
    await client.upload_dataset(f"{model}-base", generate(8_000, REFERENCE, seed=6), [model])
    started = await tail.wait_for(
        RolloutStarted, lambda e: e.subject == model and e.data.canary_version == 2, deadline_s=180
    )

    response = await client.rollback(model, "the on-call engineer does not trust it")
    assert response.status_code == 202, response.text

    # The rollback ends the rollout's own cascade, caused by the operator's command.
    rolled = await tail.wait_for(RolloutRolledBack, lambda e: e.subject == model, deadline_s=60)
    assert rolled.data.rollout_id == started.data.rollout_id
    assert rolled.correlationid == started.correlationid
    assert rolled.causationid == response.json()["event_id"]
    assert rolled.data.reason.value == "manual"
    assert rolled.actor == "user:dev-operator"
    route = await client.route(model)
    assert route is not None and route["stable_version"] == 1


async def _ready(value: bool) -> bool:
    return value
