"""The serving service as real processes on real Kafka and Postgres, driven by the events it consumes.

Models are tiny scikit-learn pipelines saved with libs.artifacts into this run's artifact folder; the
ModelVersionRegistered, ValidationPassed and CanaryVerdict events are published here, as the registry,
validation and monitoring would.
"""

from __future__ import annotations

import asyncio
import math
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts import feedback as feedback_events
from contracts import predictions as prediction_events
from contracts import rollouts as rollout_events
from contracts.commands import PromoteRequested, RollbackRequested
from contracts.common import ArtifactRef
from contracts.envelope import CloudEvent, new_event
from contracts.feedback import GroundTruthReceived
from contracts.monitoring import Verdict
from contracts.predictions import PredictionsLogged
from contracts.rollouts import (
    RollbackReason,
    RolloutPromoted,
    RolloutRolledBack,
    RolloutStarted,
    RolloutStepAdvanced,
)
from libs.bus.kafka import KafkaPublisher
from libs.settings import KafkaSettings
from tests.integration.kafka_tools import eventually
from tests.integration.serving.harness import (
    EVENT_DEADLINE_S,
    LOAD_DEADLINE_S,
    OPERATOR,
    PREDICT,
    VIEWER,
    OutsideTheRun,
    ServingProcess,
    TopicWatcher,
    create_run_topics,
    delete_run_topics,
    drop_schema,
    new_run_names,
    serving_env,
    start_group_at_end,
    store_models,
)
from tests.ports import free_port
from tests.unit.serving.fakes import (
    canary_verdict,
    churn_pipeline,
    passed,
    record,
    registered,
    rollout_never_started,
)


@dataclass
class Run:
    """One test run: its serving replica, its artifacts, a publisher and watchers."""

    env: dict[str, str]
    replica: ServingProcess
    artifacts: list[ArtifactRef]
    publisher: KafkaPublisher
    watcher: TopicWatcher
    prefix: str
    tmp: Path

    def model(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    async def publish(self, *events: CloudEvent[Any]) -> None:
        for e in events:
            await self.publisher.publish(e)

    async def register_and_pass(self, model: str, version: int) -> None:
        art = self.artifacts[version - 1]
        await self.publish(registered(version, model=model, key=art.key), passed(version, model=model))

    async def wait_for(
        self, payload: type, model: str, count: int = 1, deadline_s: float = EVENT_DEADLINE_S
    ) -> list[CloudEvent[Any]]:
        async def seen() -> list[CloudEvent[Any]]:
            found = self.watcher.of(payload, model)
            return found if len(found) >= count else []

        return await eventually(seen, deadline_s=deadline_s)

    async def wait_routing(
        self, url: str, model: str, *, stable: int | None, canary: int | None, weight: float | None = None
    ) -> dict[str, Any]:
        """Wait until the replica at ``url`` routes ``model`` so; a replica follows a route only once it has
        loaded its versions."""

        async def routed() -> dict[str, Any] | None:
            try:
                async with httpx.AsyncClient(timeout=10) as client:
                    r = await client.get(f"{url}/v1/models/{model}", headers=VIEWER)
            except httpx.TimeoutException:
                return None  # a replica busy loading a model on a loaded host: asked again until the deadline
            if r.status_code != 200:
                return None
            body: dict[str, Any] = r.json()
            mine = body["this_replica"]
            if mine is None or mine["stable_version"] != stable or mine["canary_version"] != canary:
                return None
            if weight is not None and mine["weight"] != weight:
                return None
            return body

        return await eventually(routed, deadline_s=LOAD_DEADLINE_S)


@pytest.fixture(scope="module")
async def run(
    kafka_bootstrap: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Run]:
    tmp = tmp_path_factory.mktemp("serving")
    names = new_run_names()
    artifacts = store_models(tmp / "artifacts", seeds=[0, 1, 2])
    watcher = TopicWatcher(
        kafka_bootstrap,
        [rollout_events.TOPIC, prediction_events.TOPIC, feedback_events.TOPIC],
        names.model_prefix,
        names.topic_prefix,
    )
    publisher = KafkaPublisher(KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=names.topic_prefix))
    outside = OutsideTheRun(kafka_bootstrap)
    await outside.mark()
    replica: ServingProcess | None = None
    try:
        await create_run_topics(kafka_bootstrap, names.topic_prefix)
        await start_group_at_end(kafka_bootstrap, names.group, names.topic_prefix)
        env = serving_env(
            bootstrap=kafka_bootstrap,
            database_url=database_url,
            artifacts=tmp / "artifacts",
            schema=names.schema,
            group=names.group,
            topic_prefix=names.topic_prefix,
        )
        await watcher.start()
        await publisher.start()
        replica = ServingProcess(env, free_port(), tmp / "replica-a.log")
        replica.start()
        await replica.wait_ready()
        yield Run(env, replica, artifacts, publisher, watcher, names.model_prefix, tmp)
    finally:
        code = replica.stop() if replica is not None else 0
        await publisher.stop()
        await watcher.stop()
        await drop_schema(database_url, names.schema)
        await delete_run_topics(kafka_bootstrap, names.topic_prefix)
    assert code == 0, f"serving did not stop cleanly; see {tmp / 'replica-a.log'}"
    # Nothing of the run reached the platform's own topics (serving's events are keyed by model).
    assert await outside.keys_since(names.model_prefix) == []


async def serve_first_version(run: Run, model: str) -> None:
    await run.register_and_pass(model, 1)
    promoted = await run.wait_for(RolloutPromoted, model, deadline_s=LOAD_DEADLINE_S)
    assert promoted[0].data.model_version == 1
    await run.wait_routing(run.replica.url, model, stable=1, canary=None)


async def healthy_verdicts_until(
    run: Run, started: RolloutStarted, step: int, outcome: type, count: int
) -> None:
    """Send a healthy verdict for ``step`` every half second, as monitoring would, until serving acts on one
    (a verdict before the step's bake time is over is ignored by design)."""

    async def acted() -> bool:
        if len(run.watcher.of(outcome, started.model)) >= count:
            return True
        await run.publish(canary_verdict(started, step, Verdict.HEALTHY, samples=200))
        return False

    await eventually(acted, deadline_s=EVENT_DEADLINE_S, interval_s=0.5)


async def predict(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    records: list[dict[str, Any]],
    keys: list[str] | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {"records": records}
    if keys is not None:
        body["entity_keys"] = keys
    return await client.post(f"{url}/v1/models/{model}/predict", json=body, headers=PREDICT)


async def load(url: str, model: str, requests: int, concurrency: int = 16) -> list[httpx.Response]:
    """``requests`` one-row predictions without entity keys, ``concurrency`` at a time."""
    responses: list[httpx.Response] = []
    queue = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in queue:
            responses.append(await predict(client, url, model, [record(tenure_months=i % 70)]))

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return responses


async def test_canary_takes_its_share_then_healthy_verdicts_promote_it(run: Run) -> None:
    model = run.model("share")
    await serve_first_version(run, model)
    await run.register_and_pass(model, 2)
    await run.wait_for(RolloutStarted, model, count=2, deadline_s=LOAD_DEADLINE_S)
    started = run.watcher.of(RolloutStarted, model)[-1]
    assert (
        started.data.canary_version == 2 and started.data.weight == 0.1 and started.data.stable_version == 1
    )
    await run.wait_routing(run.replica.url, model, stable=1, canary=2, weight=0.1)

    n = 2000
    responses = await load(run.replica.url, model, n)
    assert {r.status_code for r in responses} == {200}
    rows = [r.json()["predictions"][0] for r in responses]
    canary = sum(1 for p in rows if p["variant"] == "canary")
    assert all((p["variant"], p["model_version"]) in {("canary", 2), ("stable", 1)} for p in rows)
    share, weight = canary / n, 0.1
    assert abs(share - weight) <= 4 * math.sqrt(weight * (1 - weight) / n), f"canary share {share:.3f}"

    await healthy_verdicts_until(run, started.data, 0, RolloutStepAdvanced, 1)
    assert run.watcher.of(RolloutStepAdvanced, model)[-1].data.weight == 0.5
    # The healthy verdict on the 50% step is the last one: reaching 100% is the promotion.
    await healthy_verdicts_until(run, started.data, 1, RolloutPromoted, 2)
    promoted = run.watcher.of(RolloutPromoted, model)[-1]
    assert promoted.data.model_version == 2 and promoted.data.previous_version == 1
    await run.wait_routing(run.replica.url, model, stable=2, canary=None)
    after = await load(run.replica.url, model, 50, concurrency=4)
    assert {
        (r.json()["predictions"][0]["variant"], r.json()["predictions"][0]["model_version"]) for r in after
    } == {("stable", 2)}

    # Every request was logged: one PredictionsLogged per request (and variant), with the row's id.
    logged = await run.wait_for(PredictionsLogged, model, count=n + 50, deadline_s=EVENT_DEADLINE_S)
    variants = {e.data.variant.value for e in logged}
    assert variants == {"stable", "canary"}
    assert {e.data.rows[0].prediction_id for e in logged} >= {p["prediction_id"] for p in rows}
    canary_log = next(e for e in logged if e.data.variant.value == "canary")
    assert canary_log.data.rollout_id == started.data.rollout_id


async def test_unhealthy_verdict_and_operator_command_roll_back_at_once(run: Run) -> None:
    model = run.model("rollback")
    await serve_first_version(run, model)
    await run.register_and_pass(model, 2)
    await run.wait_for(RolloutStarted, model, count=2, deadline_s=LOAD_DEADLINE_S)
    started = run.watcher.of(RolloutStarted, model)[-1]
    await run.wait_routing(run.replica.url, model, stable=1, canary=2)

    await run.publish(canary_verdict(started.data, 0, Verdict.UNHEALTHY, samples=10))
    [rolled_back] = await run.wait_for(RolloutRolledBack, model)
    assert (
        rolled_back.data.reason is RollbackReason.UNHEALTHY_VERDICT and rolled_back.data.canary_version == 2
    )
    await run.wait_routing(run.replica.url, model, stable=1, canary=None)
    after = await load(run.replica.url, model, 40, concurrency=4)
    assert {r.json()["predictions"][0]["model_version"] for r in after} == {1}

    await run.register_and_pass(model, 3)
    await run.wait_for(RolloutStarted, model, count=3, deadline_s=LOAD_DEADLINE_S)
    await run.wait_routing(run.replica.url, model, stable=1, canary=3)
    async with httpx.AsyncClient(timeout=10) as client:
        refused = await client.post(
            f"{run.replica.url}/v1/models/{model}/rollback", json={"reason": "x"}, headers=PREDICT
        )
        assert refused.status_code == 403
        accepted = await client.post(
            f"{run.replica.url}/v1/models/{model}/rollback",
            json={"reason": "sales complained"},
            headers=OPERATOR,
        )
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["model_version"] == 3
    rolled = await run.wait_for(RolloutRolledBack, model, count=2)
    manual = rolled[-1]
    assert manual.data.reason is RollbackReason.MANUAL and manual.data.canary_version == 3
    assert manual.actor == "user:dev-operator" and manual.causationid == accepted.json()["event_id"]
    # The rollback stays in the cascade that started v3's rollout (persisted with the route), not the
    # command's: the trace of v3's retrain ends with it.
    v3_started = run.watcher.of(RolloutStarted, model)[-1]
    assert manual.correlationid == v3_started.correlationid != rolled_back.correlationid
    await run.wait_routing(run.replica.url, model, stable=1, canary=None)


async def test_two_replicas_transition_once_and_a_restart_restores_the_same_routing(run: Run) -> None:
    model = run.model("replicas")
    second = ServingProcess(run.env, free_port(), run.tmp / "replica-b.log")
    second.start()
    try:
        await second.wait_ready()
        await serve_first_version(run, model)
        await run.register_and_pass(model, 2)
        await run.wait_for(RolloutStarted, model, count=2, deadline_s=LOAD_DEADLINE_S)
        started = run.watcher.of(RolloutStarted, model)[-1]
        await healthy_verdicts_until(run, started.data, 0, RolloutStepAdvanced, 1)
        for replica in (run.replica, second):
            await run.wait_routing(replica.url, model, stable=1, canary=2, weight=0.5)
        # One replica handled each event; the other followed the committed state.
        assert len(run.watcher.of(RolloutStarted, model)) == 2
        assert len(run.watcher.of(RolloutStepAdvanced, model)) == 1

        keys = [f"customer-{i}" for i in range(200)]
        records = [record(tenure_months=i % 50) for i in range(200)]
        async with httpx.AsyncClient(timeout=30) as client:
            a = (await predict(client, run.replica.url, model, records, keys)).json()["predictions"]
            b = (await predict(client, second.url, model, records, keys)).json()["predictions"]
        variants = [p["variant"] for p in a]
        assert variants == [p["variant"] for p in b]
        assert 0 < variants.count("canary") < 200

        assert second.stop(signal.SIGKILL) != 0
        second.start()
        await second.wait_ready()
        state = await run.wait_routing(second.url, model, stable=1, canary=2, weight=0.5)
        assert (
            state["rollout"]["rollout_id"] == started.data.rollout_id and state["rollout"]["step_index"] == 1
        )
        async with httpx.AsyncClient(timeout=30) as client:
            again = (await predict(client, second.url, model, records, keys)).json()["predictions"]
        assert [p["variant"] for p in again] == variants
    finally:
        second.stop()


async def test_hot_swap_under_concurrent_load_fails_no_request(run: Run) -> None:
    model = run.model("swap")
    await serve_first_version(run, model)
    statuses: list[int] = []
    versions: set[int] = set()
    stop = asyncio.Event()

    async def hammer(client: httpx.AsyncClient, i: int) -> None:
        while not stop.is_set():
            r = await predict(client, run.replica.url, model, [record(tenure_months=i)] * 5)
            statuses.append(r.status_code)
            if r.status_code == 200:
                versions.update(p["model_version"] for p in r.json()["predictions"])

    async with httpx.AsyncClient(timeout=30) as client:
        workers = [asyncio.create_task(hammer(client, i)) for i in range(8)]
        try:
            # The load is on before the swaps start and stays on after them: counted, not timed.
            await eventually(lambda: _at_least(statuses, 20), deadline_s=EVENT_DEADLINE_S)
            await run.register_and_pass(model, 2)  # load + warm v2, swap to a canary table
            await run.wait_routing(run.replica.url, model, stable=1, canary=2)
            await run.publish(
                new_event(PromoteRequested(model=model, model_version=2, reason="swap"), source="/test")
            )
            await run.wait_routing(run.replica.url, model, stable=2, canary=None)
            await eventually(lambda: _served(versions, 2), deadline_s=EVENT_DEADLINE_S)
            swapped = len(statuses)
            await eventually(lambda: _at_least(statuses, swapped + 20), deadline_s=EVENT_DEADLINE_S)
        finally:
            stop.set()
            await asyncio.gather(*workers)
    assert len(statuses) >= 40
    assert set(statuses) == {200}


async def _at_least(statuses: list[int], n: int) -> bool:
    return len(statuses) >= n


async def _served(versions: set[int], version: int) -> bool:
    return version in versions


async def test_open_inference_protocol_client_gets_correct_answers(run: Run) -> None:
    import numpy as np

    # tritonclient[http] is a dev dependency (pyproject, requirements.lock): without it this test fails, as
    # a skip would pass CI without the protocol's own client ever having been tried.
    import tritonclient.http as triton

    model = run.model("oip")
    await serve_first_version(run, model)
    expected_model = churn_pipeline(seed=0)
    tenure = np.array([1.0, 30.0, 60.0], dtype=np.float64)
    charges = np.array([80.0, 55.5, 20.0], dtype=np.float64)
    plan = np.array([b"basic", b"premium", b"plus"], dtype=np.object_)

    def call() -> tuple[Any, Any, Any, bool, bool]:
        client = triton.InferenceServerClient(url=run.replica.url.removeprefix("http://"))
        try:
            inputs = []
            for name, data, dtype in (
                ("tenure_months", tenure, "FP64"),
                ("monthly_charges", charges, "FP64"),
                ("plan", plan, "BYTES"),
            ):
                tensor = triton.InferInput(name, list(data.shape), dtype)
                tensor.set_data_from_numpy(data, binary_data=False)
                inputs.append(tensor)
            outputs = [
                triton.InferRequestedOutput("predict", binary_data=False),
                triton.InferRequestedOutput("predict_proba", binary_data=False),
            ]
            result = client.infer(model, inputs, outputs=outputs, headers=PREDICT)
            metadata = client.get_model_metadata(model, headers=PREDICT)
            return (
                result.as_numpy("predict"),
                result.as_numpy("predict_proba"),
                metadata,
                client.is_server_ready(),
                client.is_model_ready(model),
            )
        finally:
            client.close()

    labels, proba, metadata, server_ready, model_ready = await asyncio.to_thread(call)
    import pandas as pd

    frame = pd.DataFrame(
        {"tenure_months": tenure, "monthly_charges": charges, "plan": ["basic", "premium", "plus"]}
    )
    assert labels.tolist() == expected_model.predict(frame).tolist()
    assert np.allclose(proba, expected_model.predict_proba(frame))
    assert proba.shape == (3, 2)
    assert server_ready and model_ready
    assert [i["name"] for i in metadata["inputs"]] == ["tenure_months", "monthly_charges", "plan"]
    assert metadata["versions"] == ["1"]


async def test_feedback_is_published_as_ground_truth(run: Run) -> None:
    model = run.model("feedback")
    await serve_first_version(run, model)
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await predict(client, run.replica.url, model, [record(), record(plan="plus")])
        ids = [p["prediction_id"] for p in answer.json()["predictions"]]
        sent = await client.post(
            f"{run.replica.url}/v1/feedback",
            json=[{"prediction_id": ids[0], "label": 1}, {"prediction_id": ids[1], "label": 0}],
            headers=PREDICT,
        )
    assert sent.status_code == 202, sent.text
    truths = await run.wait_for(GroundTruthReceived, model, count=2)
    assert {(t.data.prediction_id, t.data.label, t.data.model_version) for t in truths} == {
        (ids[0], 1, 1),
        (ids[1], 0, 1),
    }
    assert {t.actor for t in truths} == {"user:dev-predict"}


async def ignored_events(url: str, event: str, reason: str) -> float:
    """Serving's count of ``event``s it ignored for ``reason`` (its /metrics)."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{url}/metrics")).text
    series = f'driftloop_serving_ignored_events_total{{event="{event}",reason="{reason}"}} '
    return sum(float(line[len(series) :]) for line in text.splitlines() if line.startswith(series))


async def test_a_verdict_and_a_command_for_a_model_serving_never_served_leave_it_unknown(run: Run) -> None:
    ghost = run.model("ghost")
    rollout = rollout_never_started(ghost)
    url = run.replica.url
    verdicts = await ignored_events(url, "CanaryVerdict", "unknown-model")
    commands = await ignored_events(url, "RollbackRequested", "unknown-model")
    await run.publish(
        canary_verdict(rollout, 0, Verdict.HEALTHY, samples=500),
        new_event(RollbackRequested(model=ghost, model_version=1, reason="hand-made"), source="/x"),
    )

    async def listed() -> bool:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(f"{url}/v1/models", headers=VIEWER)
        return ghost in {m["model"] for m in r.json()["models"]}

    async def handled() -> bool:
        # Before serving knew better, each left the model a route, listed: wait for either outcome.
        return await listed() or (
            await ignored_events(url, "CanaryVerdict", "unknown-model") > verdicts
            and await ignored_events(url, "RollbackRequested", "unknown-model") > commands
        )

    await eventually(handled, deadline_s=EVENT_DEADLINE_S)
    assert not await listed()
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(f"{url}/v1/models/{ghost}", headers=VIEWER)).status_code == 404
        sent = await client.post(
            f"{url}/v1/feedback", json={"prediction_id": f"{ghost}:1:t-0", "label": 1}, headers=PREDICT
        )
    assert sent.status_code == 404 and repr(ghost) in sent.json()["error"], sent.text
