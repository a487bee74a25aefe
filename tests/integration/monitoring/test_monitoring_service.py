"""The monitoring service as a process on the real broker and Postgres, driven by hand-made events: a
registered model with a profile in a temporary artifact store, predictions, labels and a rollout. And its
Postgres store on its own, for values only a real database refuses."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fastapi import Response
from pydantic import ValidationError

from contracts.common import (
    ArtifactFormat,
    ArtifactRef,
    DatasetRef,
    FeatureSpec,
    FeatureType,
    Lineage,
    ModelSignature,
    Task,
)
from contracts.envelope import MAX_ATTRIBUTE_CHARS, CloudEvent, EventPayload, new_event
from contracts.examples import EXAMPLES
from contracts.feedback import GroundTruthReceived
from contracts.models import ModelVersionRegistered
from contracts.monitoring import TOPIC as MONITORING_TOPIC
from contracts.monitoring import DriftPolicyChanged, Verdict
from contracts.predictions import PredictionOutput, PredictionRecord, PredictionsLogged, Variant
from contracts.registry import EVENT_TYPES
from contracts.rollouts import RolloutMode, RolloutPromoted, RolloutStarted, RolloutStepAdvanced
from libs.artifacts import ArtifactStore
from libs.auth import Principal, Role
from libs.bus import PermanentError
from libs.bus.kafka import KafkaPublisher
from libs.db import apply_migrations, create_pool
from libs.errors import NotFound
from libs.http import create_app
from libs.profiles import build_profile
from libs.settings import KafkaSettings
from services.monitoring import api
from services.monitoring.adapters.postgres import PgMonitoringStore
from services.monitoring.bootstrap import MIGRATIONS, make_monitor
from services.monitoring.domain import EARLIEST, from_epoch
from services.monitoring.handlers import (
    Tally,
    decide_watched_beyond_bound,
    housekeeping,
    judge_closed_window,
    on_rollout_finished,
    on_rollout_started,
    on_rollout_step_advanced,
    plan_alert_retention,
    plan_labelled_retention,
    plan_report_retention,
    prune_alerts,
    prune_labelled,
    prune_window_reports,
    set_policy,
)
from services.monitoring.ports import EarlyStep, LabelledRecord, PendingLabel, StoredPolicy, StoredStep
from services.monitoring.settings import MonitoringSettings
from tests.integration.kafka_tools import (
    create_topics,
    eventually,
    migrated_schema,
    read_topic,
    unique,
    waits_on_a_lock,
)
from tests.ports import free_port
from tests.unit.monitoring.fakes import publish_nothing
from tests.unit.monitoring.test_domain import reference
from tests.unit.monitoring.test_domain import requests as request_batches

ROOT = Path(__file__).resolve().parents[3]
FEATURES = ["tenure", "charges", "plan"]
SHA = "0" * 64


@dataclass
class Harness:
    """One monitoring process with its own topics, schema, groups, port and artifact store."""

    kafka: str
    database_url: str
    schema: str
    topics: dict[str, str]
    store: ArtifactStore
    port: int
    publisher: KafkaPublisher

    async def send(self, event: CloudEvent[Any], kind: str) -> None:
        key, value, headers = event.to_kafka()
        await self.publisher.send_many([(self.topics[kind], key, value, headers)])

    async def send_many(self, events: list[CloudEvent[Any]], kind: str) -> None:
        items = []
        for e in events:
            key, value, headers = e.to_kafka()
            items.append((self.topics[kind], key, value, headers))
        await self.publisher.send_many(items)

    async def sql(self, query: str, *args: Any) -> Any:
        import asyncpg

        conn = await asyncpg.connect(self.database_url)
        try:
            await conn.execute(f"SET search_path TO {self.schema}")
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def published(self, model: str, event_type: type[EventPayload]) -> list[CloudEvent[Any]]:
        """Events of a type this process put in its outbox (what the relay publishes)."""
        rows = await self.sql("SELECT value, headers FROM outbox WHERE key = $1 ORDER BY seq", model.encode())
        out = []
        for r in rows:
            headers = json.loads(r["headers"])  # a plain connection: jsonb comes back as text
            event = EVENT_TYPES.decode(r["value"], [(k, v.encode()) for k, v in headers])
            if isinstance(event.data, event_type):
                out.append(event)
        return out


def start_service(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`python -m services.monitoring` with the test's environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "services.monitoring"], cwd=ROOT, env={**os.environ, **env}
    )


def service_env(kafka_bootstrap: str, database_url: str, artifacts: Path) -> dict[str, str]:
    """The environment of a monitoring process with its own topics, schema, groups and port."""
    topics = {k: unique(f"test.mon.{k}") for k in ("models", "predictions", "feedback", "rollouts")}
    return {
        "DRIFTLOOP_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "DRIFTLOOP_DATABASE_URL": database_url,
        "DRIFTLOOP_ENV": "test",
        "DRIFTLOOP_LOG_JSON": "false",
        "DRIFTLOOP_ARTIFACTS_URL": str(artifacts),
        "DRIFTLOOP_MONITORING_HTTP_PORT": str(free_port()),
        "DRIFTLOOP_MONITORING_SCHEMA_NAME": unique("t_mon"),
        "DRIFTLOOP_MONITORING_CONSUMER_GROUP": unique("g_mon"),
        "DRIFTLOOP_MONITORING_MODELS_TOPIC": topics["models"],
        "DRIFTLOOP_MONITORING_PREDICTIONS_TOPIC": topics["predictions"],
        "DRIFTLOOP_MONITORING_FEEDBACK_TOPIC": topics["feedback"],
        "DRIFTLOOP_MONITORING_ROLLOUTS_TOPIC": topics["rollouts"],
        "DRIFTLOOP_MONITORING_WINDOW_ROWS": "400",
        "DRIFTLOOP_MONITORING_WINDOW_SECONDS": "3600",
        "DRIFTLOOP_MONITORING_CONSECUTIVE_WINDOWS": "2",
        "DRIFTLOOP_MONITORING_PERFORMANCE_WINDOW_LABELS": "200",
        "DRIFTLOOP_MONITORING_CANARY_MIN_LABELLED": "100",
        "DRIFTLOOP_MONITORING_CANARY_LABEL_GRACE_SECONDS": "30",
        "DRIFTLOOP_MONITORING_TICK_SECONDS": "0.2",
    }


def topics_of(env: dict[str, str]) -> dict[str, str]:
    return {
        k: env[f"DRIFTLOOP_MONITORING_{k.upper()}_TOPIC"]
        for k in ("models", "predictions", "feedback", "rollouts")
    }


@asynccontextmanager
async def running(env: dict[str, str]) -> AsyncIterator[Harness]:
    """A monitoring process on ``env`` (its topics made before), ready; stopped at the end."""
    publisher = KafkaPublisher(KafkaSettings(bootstrap=env["DRIFTLOOP_KAFKA_BOOTSTRAP"]))
    await publisher.start()
    proc = start_service(env)
    h = Harness(
        kafka=env["DRIFTLOOP_KAFKA_BOOTSTRAP"],
        database_url=env["DRIFTLOOP_DATABASE_URL"],
        schema=env["DRIFTLOOP_MONITORING_SCHEMA_NAME"],
        topics=topics_of(env),
        store=ArtifactStore(env["DRIFTLOOP_ARTIFACTS_URL"]),
        port=int(env["DRIFTLOOP_MONITORING_HTTP_PORT"]),
        publisher=publisher,
    )
    try:
        await eventually(lambda: _ready(h.port), deadline_s=60)
        yield h
    finally:
        proc.terminate()
        proc.wait(30)
        await publisher.stop()


@pytest.fixture(scope="module")
def process_env(
    kafka_bootstrap: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    yield service_env(kafka_bootstrap, database_url, tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
async def harness(process_env: dict[str, str]) -> AsyncIterator[Harness]:
    await create_topics(process_env["DRIFTLOOP_KAFKA_BOOTSTRAP"], *topics_of(process_env).values())
    async with running(process_env) as h:
        yield h


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a schema of its own with monitoring's migrations applied, dropped afterwards."""
    async with migrated_schema(database_url, "t_mon", MIGRATIONS) as (migrated, _schema):
        yield migrated


@asynccontextmanager
async def migrated_before(
    database_url: str, migration_id: str
) -> AsyncIterator[tuple[asyncpg.Pool, Callable[[], Awaitable[list[str]]]]]:
    """A pool on a schema of its own with monitoring's migrations before ``migration_id`` applied, rows to
    be written as a database of that time holds them, and the call that applies the rest (it returns their
    ids); the schema is dropped afterwards."""
    schema = unique("t_mon_before")
    pool = await create_pool(database_url, schema=schema)
    ids = [m.id for m in MIGRATIONS]
    try:
        await apply_migrations(pool, schema, MIGRATIONS[: ids.index(migration_id)])
        yield pool, lambda: apply_migrations(pool, schema, MIGRATIONS)
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await pool.close()


async def _ready(port: int) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{port}/health/ready", timeout=2)
            return r.status_code == 200
    except httpx.HTTPError:
        return False


def reference_frame(n: int = 4_000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "tenure": rng.normal(24, 6, n),
            "charges": rng.normal(70, 15, n),
            "plan": rng.choice(["basic", "plus", "premium"], n, p=[0.5, 0.3, 0.2]),
        }
    )


async def register(h: Harness, model: str, version: int, *, accuracy: float = 0.85) -> None:
    frame = reference_frame()
    scores = pd.Series(np.random.default_rng(1).uniform(0, 1, len(frame)))
    profile = build_profile(
        frame, [("tenure", "numeric"), ("charges", "numeric"), ("plan", "categorical")], predictions=scores
    )
    stored = h.store.put(profile.to_bytes())
    payload = ModelVersionRegistered(
        model=model,
        model_version=version,
        run_id="run-1",
        job_id="job-1",
        artifact=ArtifactRef(key=SHA, uri="file:///none", format=ArtifactFormat.SKOPS, size_bytes=1),
        profile=ArtifactRef(
            key=stored.sha256, uri=stored.uri, format=ArtifactFormat.JSON, size_bytes=stored.size
        ),
        signature=ModelSignature(
            features=[
                FeatureSpec(name="tenure", type=FeatureType.NUMERIC),
                FeatureSpec(name="charges", type=FeatureType.NUMERIC),
                FeatureSpec(
                    name="plan", type=FeatureType.CATEGORICAL, categories=["basic", "plus", "premium"]
                ),
            ],
            target="churned",
            task=Task.CLASSIFICATION,
            classes=[0, 1],
        ),
        metrics={"accuracy": accuracy},
        lineage=Lineage(
            datasets=[DatasetRef(name="base", version=1, sha256=SHA)],
            spec_hash=SHA,
            code_version="test",
            seed=0,
        ),
    )
    await h.send(new_event(payload, source="/test/registry"), "models")


def predictions(
    model: str,
    version: int,
    n: int,
    *,
    seed: int,
    shift: float = 0.0,
    variant: Variant = Variant.STABLE,
    rollout_id: str | None = None,
    start: datetime,
    per_request: int = 20,
    latency_ms: float = 2.0,
) -> list[CloudEvent[PredictionsLogged]]:
    rng = np.random.default_rng(seed)
    events = []
    for r in range(n // per_request):
        rows = [
            PredictionRecord(
                prediction_id=f"{model}-{version}-{seed}-{r}-{i}",
                inputs={
                    "tenure": float(rng.normal(24 + shift * 6, 6)),
                    "charges": float(rng.normal(70, 15)),
                    "plan": str(rng.choice(["basic", "plus", "premium"], p=[0.5, 0.3, 0.2])),
                },
                output=PredictionOutput(prediction=int(p > 0.5), probabilities={"0": 1 - p, "1": p}),
            )
            for i, p in enumerate(rng.uniform(0, 1, per_request).tolist())
        ]
        payload = PredictionsLogged(
            model=model,
            model_version=version,
            variant=variant,
            rollout_id=rollout_id,
            request_id=f"req-{seed}-{r}",
            predicted_at=start + timedelta(milliseconds=10 * r),
            latency_ms=latency_ms,
            rows=rows,
        )
        events.append(new_event(payload, source="/test/serving"))
    return events


def labels_for(
    events: list[CloudEvent[PredictionsLogged]], *, accuracy: float, seed: int
) -> list[CloudEvent[Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for e in events:
        for row in e.data.rows:
            predicted = row.output.prediction
            right = rng.uniform() < accuracy
            label = predicted if right else 1 - int(predicted)
            out.append(
                new_event(
                    GroundTruthReceived(
                        prediction_id=row.prediction_id,
                        model=e.data.model,
                        model_version=e.data.model_version,
                        label=label,
                        observed_at=datetime.now(UTC),
                    ),
                    source="/test/serving",
                )
            )
    return out


async def known(h: Harness, model: str, version: int) -> bool:
    rows = await h.sql("SELECT 1 FROM model_versions WHERE model = $1 AND version = $2", model, version)
    return bool(rows)


async def test_shifted_traffic_gives_exactly_one_drift_detected(harness: Harness) -> None:
    h, model = harness, unique("drift")
    await register(h, model, 1)
    await eventually(lambda: known(h, model, 1))
    t0 = datetime.now(UTC)
    await h.send_many(predictions(model, 1, 800, seed=1, start=t0), "predictions")  # two calm windows
    shifted = predictions(model, 1, 2_000, seed=2, shift=1.5, start=t0 + timedelta(minutes=1))  # five shifted
    await h.send_many(shifted, "predictions")

    async def judged() -> bool:
        rows = await h.sql("SELECT count(*) AS n FROM window_reports WHERE model = $1", model)
        return rows[0]["n"] >= 7

    await eventually(judged, deadline_s=60)
    drifts = await h.published(model, _drift_type())
    assert len(drifts) == 1
    event = drifts[0].data
    assert event.drifted_features == ["tenure"]
    assert (event.features_total, event.drifted_features_total, event.evidence_truncated) == (3, 1, False)
    tenure = next(f for f in event.features if f.feature == "tenure")
    assert tenure.test.value == "ks" and tenure.drifted and tenure.consecutive_windows == 2
    assert tenure.p_value is not None and tenure.p_value < event.alpha
    assert event.window.data is not None and event.window.size >= 400
    table = pq.read_table(h.store.uri(event.window.data.key).removeprefix("file://"))
    assert {"tenure", "charges", "plan", "prediction", "label", "prediction_id", "predicted_at"} <= set(
        table.column_names
    )
    on_topic = [
        r
        for r in await read_topic(h.kafka, MONITORING_TOPIC, expect=100_000, deadline_s=5)
        if r.key == model.encode() and dict(r.headers).get("ce_type") == b"io.driftloop.DriftDetected.v1"
    ]
    assert len(on_topic) == 1

    async with httpx.AsyncClient(headers={"Authorization": "Bearer dev-viewer"}) as client:
        report = (await client.get(f"http://127.0.0.1:{h.port}/v1/models/{model}/drift")).json()
        page = await client.get(f"http://127.0.0.1:{h.port}/v1/models/{model}/drift.html")
        status = (await client.get(f"http://127.0.0.1:{h.port}/v1/status")).json()
        window = await client.get(f"http://127.0.0.1:{h.port}/v1/models/{model}/windows/{event.window.id}")
        unknown = await client.get(f"http://127.0.0.1:{h.port}/v1/models/{model}/windows/{model}:1:999999")
    assert report["windows"][0]["features"][0]["histogram"]["labels"]
    assert window.status_code == 200 and window.json()["window"]["id"] == event.window.id
    assert window.json()["debounced_features"] == ["tenure"] and unknown.status_code == 404
    assert page.status_code == 200 and "<svg" in page.text and "<script" not in page.text
    assert status["models"][model]["last_window"] is not None


def _drift_type() -> Any:
    from contracts.monitoring import DriftDetected

    return DriftDetected


async def test_canary_worse_than_stable_gets_an_unhealthy_verdict(harness: Harness) -> None:
    from contracts.monitoring import CanaryVerdict

    h, model = harness, unique("canary")
    await register(h, model, 1)
    await register(h, model, 2)
    await eventually(lambda: known(h, model, 2))
    await labels_flowing(h, model)
    rollout = unique("r")
    started = new_event(
        RolloutStarted(
            rollout_id=rollout,
            model=model,
            stable_version=1,
            canary_version=2,
            steps=[0.2, 1.0],
            step_index=0,
            weight=0.2,
            min_samples=200,
            bake_seconds=1,
        ),
        source="/test/serving",
    )
    await h.send(started, "rollouts")
    await eventually(lambda: _step_known(h, rollout))
    t0 = datetime.now(UTC)
    stable = predictions(model, 1, 600, seed=3, start=t0)
    canary = predictions(model, 2, 300, seed=4, start=t0, variant=Variant.CANARY, rollout_id=rollout)
    await h.send_many(stable + canary, "predictions")
    await h.send_many(
        labels_for(stable, accuracy=0.9, seed=5) + labels_for(canary, accuracy=0.55, seed=6), "feedback"
    )

    async def verdicts() -> list[CloudEvent[Any]]:
        return await h.published(model, CanaryVerdict)

    [verdict] = await eventually(verdicts, deadline_s=60)
    assert verdict.data.verdict.value == "unhealthy"
    assert verdict.causationid == started.id and verdict.correlationid == started.correlationid
    accuracy = next(e for e in verdict.data.evidence if e.name == "accuracy")
    assert accuracy.passed is False


async def _step_known(h: Harness, rollout: str) -> bool:
    return bool(await h.sql("SELECT 1 FROM rollout_steps WHERE rollout_id = $1", rollout))


async def test_labels_arriving_late_are_joined_and_counted(harness: Harness) -> None:
    from contracts.monitoring import PerformanceDegraded

    h, model = harness, unique("late")
    await register(h, model, 1, accuracy=0.9)
    await eventually(lambda: known(h, model, 1))
    t0 = datetime.now(UTC)
    first = predictions(model, 1, 400, seed=7, start=t0)  # exactly one window
    await h.send_many(
        first + predictions(model, 1, 100, seed=8, start=t0 + timedelta(seconds=30)), "predictions"
    )

    async def window_judged() -> bool:
        return bool(await h.sql("SELECT 1 FROM window_reports WHERE model = $1", model))

    await eventually(window_judged, deadline_s=60)
    # The labels come after their predictions' window was judged: late, and poor — in two performance
    # windows of 200 in a row, since one degraded window alone could be noise.
    await h.send_many(labels_for(first, accuracy=0.5, seed=9)[:400], "feedback")

    async def all_joined_late() -> bool:
        rows = await h.sql(
            "SELECT count(*) FILTER (WHERE late) AS late FROM labelled WHERE model = $1", model
        )
        return int(rows[0]["late"]) == 400

    await eventually(all_joined_late, deadline_s=60)
    [degraded] = await eventually(lambda: h.published(model, PerformanceDegraded), deadline_s=30)
    assert degraded.data.metric == "accuracy"
    assert degraded.data.labelled_rows == 200 and degraded.data.late_labels == 200
    assert degraded.data.window.data is not None


async def test_a_policy_change_is_published_for_the_audit_and_reaches_every_replica(harness: Harness) -> None:
    model = unique("policy")
    url = f"http://127.0.0.1:{harness.port}/v1/models/{model}/policy"
    operator = {"Authorization": "Bearer dev-operator"}
    async with httpx.AsyncClient(timeout=10) as client:
        first = await client.put(url, json={"psi_threshold": 0.3}, headers=operator)
        assert first.status_code == 200, first.text
        second = await client.put(
            url, json={"psi_threshold": 0.4, "consecutive_windows": 3}, headers=operator
        )
        assert second.status_code == 200, second.text
        refused = await client.put(
            url, json={"psi_threshold": 0.5}, headers={"Authorization": "Bearer dev-viewer"}
        )
        assert refused.status_code == 403

    # Each change leaves as DriftPolicyChanged with who made it and what it replaced.
    changes = await harness.published(model, DriftPolicyChanged)
    assert [(c.data.policy.psi_threshold, c.actor) for c in changes] == [
        (0.3, "user:dev-operator"),
        (0.4, "user:dev-operator"),
    ]
    assert changes[0].data.previous is None
    assert changes[1].data.previous is not None and changes[1].data.previous.psi_threshold == 0.3
    assert changes[1].data.policy.consecutive_windows == 3

    # A change made through another replica (here: straight in the table) is in force at the next tick.
    stored = (await harness.sql("SELECT policy FROM policies WHERE model = $1", model))[0]["policy"]
    policy = {**json.loads(stored), "psi_threshold": 0.7}
    await harness.sql(
        "UPDATE policies SET policy = $2::jsonb, updated_at = now() WHERE model = $1",
        model,
        json.dumps(policy),
    )

    async def in_force() -> bool:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(url, headers={"Authorization": "Bearer dev-viewer"})
        return r.status_code == 200 and r.json()["psi_threshold"] == 0.7

    await eventually(in_force, deadline_s=20)


async def test_nul_in_a_category_or_a_label_is_stored_as_the_replacement_character(
    pool: asyncpg.Pool,
) -> None:
    monitor = make_monitor(
        MonitoringSettings(window_rows=500, min_window_rows=10), artifacts=None, source="/t"
    )
    monitor.live.add_reference(reference())
    reqs = request_batches(500, seed=1)
    for row in reqs[0][0].rows:  # valid JSON ("basic\u0000"), which jsonb cannot hold
        row.inputs["plan"] = "basic\x00"
    monitor.live.ingest(reqs, arrival=0.0)
    [window] = monitor.live.closed
    at = datetime.now(UTC)
    joined = LabelledRecord(
        "p-nul",
        "churn",
        1,
        "stable",
        None,
        at,
        "yes\x00",
        0.7,
        "no\x00",
        at,
        False,
        {"plan": "basic\x00"},
    )
    published: list[CloudEvent[Any]] = []

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await judge_closed_window(window, monitor=monitor, store=store, publish=publish, tally=Tally())
        assert await store.add_labelled([joined]) == []  # new: nothing corrected
        await store.add_pending([PendingLabel("p-waiting", "churn", "no\x00", at)])

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        [judged] = await store.latest_reports("churn", 1)
        plan = next(f for f in judged.report["features"] if f["feature"] == "plan")
        assert "basic\ufffd" in plan["histogram"]["labels"]
        [stored] = await store.recent_labelled("churn", 1)
        assert (stored.prediction, stored.label, stored.inputs) == (
            "yes\ufffd",
            "no\ufffd",
            {"plan": "basic\ufffd"},
        )
        assert await store.take_pending(["p-waiting"], ["fraud"]) == []  # not for another model's prediction
        [waiting] = await store.take_pending(["p-waiting"], ["churn"])
        assert waiting.label == "no\ufffd"


async def test_integers_beyond_64_bits_in_a_label_or_an_input_are_stored_as_numbers(
    pool: asyncpg.Pool,
) -> None:
    # JSON allows any integer, and serving takes a label of 10**20 (a finite number); a prediction log written
    # otherwise can hold such a category. The jsonb encoder writes integers of 64 bits only: the label was
    # dead-lettered (handler-failed: "Integer exceeds 64-bit range"), waiting or joined, and so was every
    # label of a prediction holding such a value.
    at = datetime.now(UTC)
    joined = LabelledRecord(
        "p-wide", "churn", 1, "stable", None, at, 10**20, None, -(10**20), at, False, {"plan": 2**64}
    )
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await store.add_labelled([joined]) == []
        await store.add_pending(
            [PendingLabel("p-waiting", "churn", 10**20, at), PendingLabel("p-huge", "churn", 10**400, at)]
        )

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        [stored] = await store.recent_labelled("churn", 1)
        assert (stored.prediction, stored.label, stored.inputs) == (1e20, -1e20, {"plan": float(2**64)})
        # The same label sent again is no correction: it is stored as it was the first time.
        assert await store.add_labelled([joined]) == []
        waiting = await store.take_pending(["p-waiting", "p-huge"], ["churn", "churn"])
        # Beyond a double, its decimal text, which a classifier's label reads alike (no regression label is
        # one: monitoring refuses it before it is stored).
        assert sorted((w.prediction_id, w.label) for w in waiting) == [
            ("p-huge", str(10**400)),
            ("p-waiting", 1e20),
        ]


async def test_the_longest_prediction_id_a_label_may_name_is_stored_waiting_and_joined(
    pool: asyncpg.Pool,
) -> None:
    # GroundTruthReceived takes prediction ids of at most 512 characters: 2,048 bytes of UTF-8 at most, which
    # with the longest model name fits a btree entry (2,704 bytes). One of 4,000 bytes failed in Postgres
    # (ProgramLimitExceeded) and was dead-lettered as handler-failed, naming an index.
    pid, model = "\U0001f600" * MAX_ATTRIBUTE_CHARS, "m" * 128
    GroundTruthReceived(prediction_id=pid, model=model, label=1, observed_at=datetime.now(UTC))
    with pytest.raises(ValidationError, match="at most 512 characters"):
        GroundTruthReceived(prediction_id=pid + "x", model=model, label=1, observed_at=datetime.now(UTC))
    at = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        await store.add_pending([PendingLabel(pid, model, 1, at)])
        assert await store.pending_labels() == {(pid, model)}
        assert [p.prediction_id for p in await store.take_pending([pid], [model])] == [pid]
        joined = LabelledRecord(pid, model, 1, "stable", None, at, 1, 0.9, 1, at, False, {})
        assert await store.add_labelled([joined]) == []
        assert pid in await store.labelled_for(model, 1, [pid])


async def test_a_later_label_replaces_the_one_waiting_or_expired_and_one_for_another_model_waits_beside_it(
    pool: asyncpg.Pool,
) -> None:
    at = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        await PgMonitoringStore(conn).add_pending([PendingLabel("p-expired", "churn", 0, at)])
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await store.expire_pending(at + timedelta(hours=1)) == [("p-expired", "churn")]
        await store.add_pending([PendingLabel("p-waiting", "churn", 0, at)])

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        # Sent again (twice in one poll: the last counts), corrected, and one naming another model.
        await store.add_pending(
            [
                PendingLabel("p-expired", "churn", 1, at),
                PendingLabel("p-expired", "churn", 2, at),
                PendingLabel("p-waiting", "fraud", 5, at),
                PendingLabel("p-waiting", "churn", 1, at),
            ]
        )

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await store.pending_labels() == {
            ("p-expired", "churn"),
            ("p-waiting", "churn"),
            ("p-waiting", "fraud"),
        }
        assert await store.expire_pending(at - timedelta(minutes=1)) == []  # each waits its own time
        taken = await store.take_pending(["p-expired", "p-waiting"], ["churn", "churn"])
        assert sorted((t.prediction_id, t.label) for t in taken) == [("p-expired", 2), ("p-waiting", 1)]
        assert all(t.received_at is not None and t.received_at >= at for t in taken)
        assert await store.pending_labels() == {("p-waiting", "fraud")}


async def test_a_later_different_label_corrects_a_joined_one_and_an_earlier_one_does_not(
    pool: asyncpg.Pool,
) -> None:
    at = datetime.now(UTC)

    def joined(label: Any, received_at: datetime | None = None) -> LabelledRecord:
        return LabelledRecord(
            "p-1", "churn", 1, "stable", None, at, 1, 0.7, label, at, False, {}, received_at
        )

    async with pool.acquire() as conn, conn.transaction():
        assert await PgMonitoringStore(conn).add_labelled([joined(0)]) == []
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await store.add_labelled([joined(0)]) == []  # the same label again: nothing changes
        assert await store.add_labelled([joined(1)]) == [("p-1", "churn")]  # a correction
    async with pool.acquire() as conn, conn.transaction():
        # A waiting label received before the correction, joined after it, does not undo it.
        store = PgMonitoringStore(conn)
        assert await store.add_labelled([joined(0, at - timedelta(minutes=1))]) == []
        [stored] = await store.recent_labelled("churn", 1)
        assert stored.label == 1 and stored.late is False


async def test_two_models_predictions_with_the_same_id_keep_their_own_labels(pool: asyncpg.Pool) -> None:
    # Prediction ids are the clients' to choose. Keyed by the id alone, the second model's label took the
    # first one's row (its label replaced, its model and version kept) and was never stored itself.
    at = datetime.now(UTC)

    def joined(model: str, label: Any) -> LabelledRecord:
        return LabelledRecord("p-same", model, 1, "stable", None, at, 1, 0.7, label, at, False, {})

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await store.add_labelled([joined("churn", 1), joined("fraud", 0)]) == []
        assert await store.add_labelled([joined("fraud", 2)]) == [("p-same", "fraud")]  # fraud's correction
        await store.mark_scored("churn", 1, ["p-same"], 1)

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await store.labelled_for("churn", 1, ["p-same"]) == {"p-same": 1}
        assert await store.labelled_for("fraud", 1, ["p-same"]) == {"p-same": 2}
        assert [r.label for r in await store.recent_labelled("churn", 10)] == [1]
        assert await store.unscored("churn", 1, 10) == []
        assert [(r.model, r.label) for r in await store.unscored("fraud", 1, 10)] == [("fraud", 2)]


async def test_a_shadow_prediction_and_the_stable_one_it_shadows_are_each_joined_and_scored_by_version(
    pool: asyncpg.Pool,
) -> None:
    # In a shadow rollout serving logs the candidate's scoring of a served row under the served prediction's
    # id and model. Keyed by (prediction id, model), the second join took the first one's row (its label
    # replaced, version and variant kept), and one version got no label.
    at = datetime.now(UTC)

    def joined(version: int, variant: str, prediction: int, label: Any) -> LabelledRecord:
        rollout = None if variant == "stable" else "ro-1"
        return LabelledRecord(
            "p-shadowed", "churn", version, variant, rollout, at, prediction, 0.7, label, at, False, {}
        )

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await store.add_labelled([joined(1, "stable", 1, 0), joined(2, "shadow", 0, 0)]) == []
        # Redelivered: nothing changes. Corrected: both rows, one correction.
        assert await store.add_labelled([joined(1, "stable", 1, 0), joined(2, "shadow", 0, 0)]) == []
        corrected = [joined(1, "stable", 1, 1), joined(2, "shadow", 0, 1)]
        assert await store.add_labelled(corrected) == [("p-shadowed", "churn")]
        await store.mark_scored("churn", 1, ["p-shadowed"], 1)  # the stable version's performance window

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        since = at - timedelta(minutes=1)
        # The canary comparison: the stable side, and the shadow's rows its rollout routed.
        assert await store.labelled_outcomes("churn", 1, since, rollout_id=None) == [(1, 1, 0.7)]
        assert await store.labelled_outcomes("churn", 2, since, rollout_id="ro-1") == [(0, 1, 0.7)]
        assert await store.unscored("churn", 1, 10) == []
        assert [(r.version, r.variant) for r in await store.unscored("churn", 2, 10)] == [(2, "shadow")]
        assert await store.labelled_for("churn", 2, ["p-shadowed"]) == {"p-shadowed": 1}
        # The training history and the status count the label once, with the served prediction.
        assert [(r.version, r.variant) for r in await store.recent_labelled("churn", 10)] == [(1, "stable")]
        assert (await store.label_counts())["churn"] == {"labelled": 1, "late": 0}


async def test_a_steps_labelled_canary_rows_are_those_its_rollout_routed(pool: asyncpg.Pool) -> None:
    # A request naming the canary's version is logged with variant canary and no rollout id (docs/serving.md).
    # Selected by version alone, one client's labelled calls to the version decided the step's accuracy
    # comparison: here 3 of the canary's 5 labelled rows.
    at = datetime.now(UTC)

    def joined(pid: str, version: int, variant: str, rollout: str | None, label: int) -> LabelledRecord:
        return LabelledRecord(pid, "churn", version, variant, rollout, at, 1, 0.7, label, at, False, {})

    rows = [
        joined("routed", 2, "canary", "ro-1", 1),
        joined("shadowed", 2, "shadow", "ro-1", 1),
        joined("named-1", 2, "canary", None, 0),
        joined("named-2", 2, "canary", None, 0),
        joined("earlier", 2, "canary", "ro-0", 0),  # routed by an earlier rollout of the version
        joined("stable", 1, "stable", None, 1),
        joined("stable-named", 1, "stable", None, 0),  # a request naming the stable version is stable traffic
    ]
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        await store.add_labelled(rows)
        since = at - timedelta(minutes=1)
        assert await store.labelled_outcomes("churn", 2, since, rollout_id="ro-1") == [(1, 1, 0.7)] * 2
        assert sorted(await store.labelled_outcomes("churn", 1, since, rollout_id=None)) == [
            (1, 0, 0.7),
            (1, 1, 0.7),
        ]
        assert await store.labelled_outcomes("churn", 2, since, rollout_id=None) == []


async def test_the_retention_deletes_old_counted_labels_and_keeps_every_one_a_query_still_needs(
    pool: asyncpg.Pool,
) -> None:
    # Nothing deleted from labelled: one row per label, inputs included, for as long as the platform ran.
    monitor = make_monitor(MonitoringSettings(export_labelled_rows=2), artifacts=None, source="/test/m")
    now = time.time()
    monitor.clock = lambda: now

    def ago(days: float) -> datetime:
        return from_epoch(now - days * 86_400)

    def joined(
        pid: str, model: str, version: int, predicted: float, received: float, **kw: Any
    ) -> LabelledRecord:
        variant, rollout = kw.pop("variant", "stable"), kw.pop("rollout", None)
        at = ago(predicted)
        return LabelledRecord(
            pid,
            model,
            version,
            variant,
            rollout,
            at,
            1,
            0.7,
            1,
            at,
            kw.pop("late", False),
            {"tenure": 1.0},
            ago(received),
            kw.pop("outside", False),
        )

    rows = [
        joined("p-old", "churn", 1, 40, 40, late=True, outside=True),  # scored, old: goes
        joined("p-shadowed", "churn", 1, 41, 41),  # both versions' rows scored, old: both go
        joined("p-shadowed", "churn", 2, 41, 41, variant="shadow", rollout="r-0"),
        joined("p-unscored", "churn", 1, 42, 42),  # in no performance window yet
        joined("p-half", "churn", 1, 43, 43),  # the shadow's row is in none yet: both stay
        joined("p-half", "churn", 2, 43, 43, variant="shadow", rollout="r-0"),
        joined("p-recent", "churn", 1, 10, 10),  # within labelled_keep_days
        joined("p-canary", "churn", 2, 37, 36, variant="canary", rollout="r-1"),  # since a watched step began
        joined("f-kept", "fraud", 1, 37, 36),  # since the start of a step kept for its rollout's start
        joined("f-old", "fraud", 1, 40, 40),
        joined("f-recent", "fraud", 1, 5, 5),
        joined("l-1", "loan", 1, 42, 42),  # loan's oldest; the two newest are exported for retraining
        joined("l-2", "loan", 1, 41, 41),
        joined("l-3", "loan", 1, 40, 40),
    ]
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        for model in ("churn", "fraud", "loan"):
            await conn.execute(
                "INSERT INTO model_versions (model, version, signature, baseline, profile) "
                "VALUES ($1, 1, $2, $2, $2), ($1, 2, $2, $2, $2)",
                model,
                {},
            )
        await store.add_labelled(rows)
        await store.mark_scored("churn", 1, ["p-old", "p-shadowed", "p-half", "p-recent"], 1)
        await store.mark_scored("churn", 2, ["p-shadowed", "p-canary"], 1)
        await store.mark_scored("fraud", 1, ["f-kept", "f-old", "f-recent"], 1)
        await store.mark_scored("loan", 1, ["l-1", "l-2", "l-3"], 1)
        await store.save_step(
            StoredStep("r-1", 0, "churn", 1, 2, now - 38 * 86_400, 10, 5.0, "e-1", "c-1", None)
        )
        await store.keep_early_step(
            EarlyStep("r-2", 1, "fraud", 1, 2, now - 38 * 86_400, "e-2", "c-2", None, now - 60)
        )
        counts, outside = await store.label_counts(), await store.labels_outside_classes()
    assert counts["churn"] == {"labelled": 6, "late": 1} and outside == {("churn", 1): 1}

    deleted = 0
    async with pool.acquire() as conn:
        plan = await plan_labelled_retention(monitor=monitor, store=PgMonitoringStore(conn))
    for model, received_before in plan:
        received_from: datetime | None = EARLIEST
        while received_from is not None:  # a batch a transaction; of one row here: an id's two rows go whole
            async with pool.acquire() as conn, conn.transaction():
                n, received_from = await prune_labelled(
                    model,
                    received_before,
                    received_from=received_from,
                    monitor=monitor,
                    store=PgMonitoringStore(conn),
                    limit=1,
                )
            deleted += n

    async with pool.acquire() as conn:
        left = await conn.fetch("SELECT prediction_id, version FROM labelled ORDER BY prediction_id, version")
        store = PgMonitoringStore(conn)
        assert deleted == 5
        assert [(r["prediction_id"], r["version"]) for r in left] == [
            ("f-kept", 1),
            ("f-recent", 1),
            ("l-2", 1),
            ("l-3", 1),
            ("p-canary", 2),
            ("p-half", 1),
            ("p-half", 2),
            ("p-recent", 1),
            ("p-unscored", 1),
        ]
        # The status counts every label joined, the deleted ones too, once per id.
        assert await store.label_counts() == counts
        assert await store.labels_outside_classes() == outside


async def judged_report(conn: asyncpg.Connection, model: str, version: int, seq: int, at: datetime) -> None:
    """A window report row as judging writes one, judged (and its window dated) at ``at``."""
    await conn.execute(
        """INSERT INTO window_reports (model, version, seq, window_id, start_at, end_at, size,
               drift_share, alerted, report, judged_at)
           VALUES ($1, $2, $3, $4, $5, $5, 100, 0.1, false, $6, $5)""",
        model,
        version,
        seq,
        f"{model}:{version}:{seq:06d}",
        at,
        {"window": {"id": f"{model}:{version}:{seq:06d}"}},
    )


def answered(response: Response) -> Any:
    """The JSON a route's response holds (monitoring's JSON routes answer a ``Response``)."""
    return json.loads(bytes(response.body))


async def test_the_retention_deletes_old_window_reports_in_batches_and_keeps_each_versions_newest(
    pool: asyncpg.Pool,
) -> None:
    # Nothing deleted from window_reports: a row per judged window, for as long as the platform ran.
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/m")
    now = time.time()
    monitor.clock = lambda: now
    reports = [  # (model, version, seq, judged days ago)
        ("churn", 1, 1, 200),
        ("churn", 1, 2, 150),
        ("churn", 1, 3, 120),  # version 1's newest: kept however old
        ("churn", 2, 1, 100),
        ("churn", 2, 2, 100),  # judged at the same time as the one before, but later: that one goes
        ("churn", 2, 3, 95),
        ("churn", 2, 4, 10),  # within the keep period (90 days)
        ("churn", 2, 5, 0),
        ("fraud", 1, 1, 300),  # the model's only report
    ]
    async with pool.acquire() as conn:
        for model in ("churn", "fraud"):
            await conn.execute(
                "INSERT INTO model_versions (model, version, signature, baseline, profile) "
                "VALUES ($1, 1, $2, $2, $2), ($1, 2, $2, $2, $2)",
                model,
                {},
            )
        judged = from_epoch(now - 100 * 86_400)
        for model, version, seq, days in reports:
            at = judged if days == 100 else from_epoch(now - days * 86_400)
            await judged_report(conn, model, version, seq, at)
        plan = await plan_report_retention(monitor=monitor, store=PgMonitoringStore(conn))

    batches: list[int] = []
    for model, judged_before in plan:
        judged_from: datetime | None = EARLIEST
        while judged_from is not None:  # a batch a transaction, of two reports here
            async with pool.acquire() as conn, conn.transaction():
                n, judged_from = await prune_window_reports(
                    model, judged_before, judged_from=judged_from, store=PgMonitoringStore(conn), limit=2
                )
            batches.append(n)

    async with pool.acquire() as conn:
        left = await conn.fetch("SELECT model, version, seq FROM window_reports ORDER BY model, version, seq")
        store = PgMonitoringStore(conn)
        assert batches == [2, 2, 1, 0]  # churn's five, two by two; fraud's none
        assert [tuple(r) for r in left] == [
            ("churn", 1, 3),
            ("churn", 2, 4),
            ("churn", 2, 5),
            ("fraud", 1, 1),
        ]
        assert [r.report["window"]["id"] for r in await store.latest_reports("churn", 10)] == [
            "churn:2:000005",
            "churn:2:000004",
            "churn:1:000003",
        ]
        assert [r.report for r in await store.latest_reports("fraud", 1)] == [
            {"window": {"id": "fraud:1:000001"}}
        ]
        assert await store.reports_pruned_through("churn", 1) == 2
        assert await store.reports_pruned_through("churn", 2) == 3
        assert await store.reports_pruned_through("fraud", 1) is None

    # The report a DriftDetected links to says it was deleted; a window never judged is answered as before.
    rt: Any = SimpleNamespace(pool=pool)
    viewer = Principal("viewer", Role.viewer)
    assert answered(await api.window_report("churn", "churn:1:000003", viewer, rt)) == {
        "window": {"id": "churn:1:000003"}
    }
    with pytest.raises(NotFound, match="no longer holds the report of window 'churn:1:000002'"):
        await api.window_report("churn", "churn:1:000002", viewer, rt)
    with pytest.raises(NotFound, match="judged no window 'churn:1:000009'"):
        await api.window_report("churn", "churn:1:000009", viewer, rt)
    with pytest.raises(NotFound, match="judged no window 'fraud:1:000000'"):
        await api.window_report("fraud", "fraud:1:000000", viewer, rt)


async def test_a_models_drift_windows_are_paged_newest_first_each_once_while_windows_are_judged(
    pool: asyncpg.Pool,
) -> None:
    judged = datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)

    async def judge(conn: asyncpg.Connection, model: str, version: int, seq: int, minutes: int) -> None:
        await judged_report(conn, model, version, seq, judged + timedelta(minutes=minutes))

    async with pool.acquire() as conn:
        for model in ("churn", "fraud"):
            await conn.execute(
                "INSERT INTO model_versions (model, version, signature, baseline, profile) "
                "VALUES ($1, 1, $2, $2, $2), ($1, 2, $2, $2, $2)",
                model,
                {},
            )
        # Versions 1 and 2 close their window of one number in one transaction: one judged_at, one seq.
        for seq in range(1, 4):
            for version in (1, 2):
                await judge(conn, "churn", version, seq, seq)
        await judge(conn, "churn", 2, 4, 4)
        await judge(conn, "fraud", 1, 1, 9)

    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/m")
    monitor.live.add_reference(reference())  # churn version 1: a model monitoring knows
    rt: Any = SimpleNamespace(pool=pool)
    viewer = Principal("viewer", Role.viewer)
    seen: list[str] = []
    sizes: list[int] = []
    cursor: str | None = None
    while True:
        page = answered(await api.drift_report("churn", viewer, rt, monitor, limit=2, cursor=cursor))
        seen += [r["window"]["id"] for r in page["windows"]]
        sizes.append(len(page["windows"]))
        if len(sizes) == 1:  # judged meanwhile: newer than every window, on no later page
            async with pool.acquire() as conn:
                await judge(conn, "churn", 2, 5, 5)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [
        "churn:2:000004",
        "churn:2:000003",
        "churn:1:000003",
        "churn:2:000002",
        "churn:1:000002",
        "churn:2:000001",
        "churn:1:000001",
    ]
    assert sizes == [2, 2, 2, 1]

    # A full last page is followed by an empty one whose next_cursor is null; the status reads the newest.
    full = answered(await api.drift_report("churn", viewer, rt, monitor, limit=8, cursor=None))
    assert len(full["windows"]) == 8 and full["next_cursor"] is not None
    empty = answered(
        await api.drift_report("churn", viewer, rt, monitor, limit=8, cursor=full["next_cursor"])
    )
    assert empty == {"model": "churn", "windows": [], "next_cursor": None}
    async with pool.acquire() as conn:
        [newest] = await PgMonitoringStore(conn).latest_reports("churn", 1)
    assert newest.report == {"window": {"id": "churn:2:000005"}}


async def test_the_retention_deletes_old_alerts_in_batches_and_keeps_those_the_status_lists(
    pool: asyncpg.Pool,
) -> None:
    # Nothing deleted from alerts: a row per alert published, for as long as the platform ran.
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/m")
    now = time.time()
    monitor.clock = lambda: now
    alerts = [(f"c-{i:02d}", "churn", 200 - i) for i in range(13)]  # all old: churn's 10 newest stay
    alerts += [(f"f-{i}", "fraud", 100 + i) for i in range(2)] + [
        (f"f-new-{i}", "fraud", i) for i in range(10)
    ]
    alerts += [("l-0", "loan", 300)]  # fewer than the status lists
    async with pool.acquire() as conn:
        for event_id, model, days in alerts:
            await conn.execute(
                "INSERT INTO alerts (event_id, model, version, kind, summary, created_at) "
                "VALUES ($1, $2, 1, 'DriftDetected', 's', $3)",
                event_id,
                model,
                from_epoch(now - days * 86_400),
            )
        store = PgMonitoringStore(conn)
        listed = [a["event_id"] for a in (await store.recent_alerts(["churn"], 10))["churn"]]
        plan = await plan_alert_retention(monitor=monitor, store=store)
    assert [model for model, _ in plan] == ["churn", "fraud"]  # loan keeps the one alert it has

    batches: list[int] = []
    for model, created_before in plan:
        created_from: datetime | None = EARLIEST
        while created_from is not None:  # a batch a transaction, of two alerts here
            async with pool.acquire() as conn, conn.transaction():
                n, created_from = await prune_alerts(
                    model, created_before, created_from=created_from, store=PgMonitoringStore(conn), limit=2
                )
            batches.append(n)

    async with pool.acquire() as conn:
        left = await conn.fetch("SELECT event_id FROM alerts ORDER BY event_id")
        store = PgMonitoringStore(conn)
        assert batches == [2, 1, 2, 0]
        assert [r["event_id"] for r in left] == sorted(
            [f"c-{i:02d}" for i in range(3, 13)] + [f"f-new-{i}" for i in range(10)] + ["l-0"]
        )
        assert [a["event_id"] for a in (await store.recent_alerts(["churn"], 10))["churn"]] == listed


async def test_the_status_lists_each_models_newest_alerts_however_many_another_model_has(
    pool: asyncpg.Pool,
) -> None:
    # The newest 200 alerts of all models, filtered per model: a model whose few alerts were older than
    # another model's 200 newest listed none.
    now = time.time()
    alerts = [(f"f-{i:03d}", "fraud", i) for i in range(250)] + [
        ("c-old", "churn", 1_000),
        ("c-older", "churn", 2_000),
    ]
    async with pool.acquire() as conn:
        for event_id, model, seconds in alerts:
            await conn.execute(
                "INSERT INTO alerts (event_id, model, version, kind, summary, created_at) "
                "VALUES ($1, $2, 1, 'DriftDetected', 's', $3)",
                event_id,
                model,
                from_epoch(now - seconds),
            )
        listed = await PgMonitoringStore(conn).recent_alerts(["churn", "fraud", "loan"], 10)
    assert [a["event_id"] for a in listed["churn"]] == ["c-old", "c-older"]
    assert [a["event_id"] for a in listed["fraud"]] == [f"f-{i:03d}" for i in range(10)]
    assert "loan" not in listed


async def test_the_migration_keys_the_labels_joined_before_by_version_as_they_are(database_url: str) -> None:
    keyed_id = "monitoring/0009_labelled_by_version.sql"
    async with migrated_before(database_url, keyed_id) as (pool, migrate_rest):
        async with pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO labelled (prediction_id, model, version, variant, predicted_at, prediction,
                       label, observed_at, late, inputs)
                   VALUES ('p-1', 'churn', 2, 'shadow', now(), '0', '1', now(), false, '{}'),
                          ('p-1', 'fraud', 1, 'stable', now(), '1', '1', now(), false, '{}')"""
            )
        assert keyed_id in await migrate_rest()
        at = datetime.now(UTC)
        async with pool.acquire() as conn, conn.transaction():
            store = PgMonitoringStore(conn)
            stable = LabelledRecord("p-1", "churn", 1, "stable", None, at, 1, 0.7, 1, at, False, {})
            assert await store.add_labelled([stable]) == []
            rows = await conn.fetch("SELECT model, version, label FROM labelled ORDER BY model, version")
            assert [(r["model"], r["version"], r["label"]) for r in rows] == [
                ("churn", 1, 1),
                ("churn", 2, 1),
                ("fraud", 1, 1),
            ]


async def test_a_shadow_candidate_worse_than_stable_gets_an_unhealthy_verdict_from_their_labels(
    harness: Harness,
) -> None:
    # The candidate's rows carry the ids of the stable rows they shadow, and one label per id joins both:
    # joined to one of them only, the stable version had no labelled rows and the accuracy comparison never
    # counted.
    from contracts.monitoring import CanaryVerdict

    h, model = harness, unique("shadow")
    await register(h, model, 1)
    await register(h, model, 2)
    await eventually(lambda: known(h, model, 2))
    await labels_flowing(h, model)
    rollout = unique("r")
    started = new_event(
        RolloutStarted(
            rollout_id=rollout,
            model=model,
            stable_version=1,
            canary_version=2,
            mode=RolloutMode.SHADOW,
            steps=[1.0],
            step_index=0,
            weight=1.0,
            min_samples=200,
            bake_seconds=1,
        ),
        source="/test/serving",
    )
    await h.send(started, "rollouts")
    await eventually(lambda: _step_known(h, rollout))
    stable = predictions(model, 1, 300, seed=13, start=datetime.now(UTC))
    rng = np.random.default_rng(14)
    shadow = []
    for e in stable:  # the same rows and ids, scored later by version 2, which gets 40% of them wrong
        rows = [
            r.model_copy(
                update={
                    "output": PredictionOutput(
                        prediction=1 - int(r.output.prediction)
                        if rng.uniform() < 0.4
                        else r.output.prediction
                    )
                }
            )
            for r in e.data.rows
        ]
        payload = e.data.model_copy(
            update={"model_version": 2, "variant": Variant.SHADOW, "rollout_id": rollout, "rows": rows}
        )
        shadow.append(new_event(payload, source="/test/serving"))
    await h.send_many(stable + shadow, "predictions")
    await eventually(lambda: _consumed(h, model, {"1": 320, "2": 300}), deadline_s=60)
    await h.send_many(labels_for(stable, accuracy=0.95, seed=15), "feedback")  # one label per id

    async def verdicts() -> list[CloudEvent[Any]]:
        return await h.published(model, CanaryVerdict)

    [verdict] = await eventually(verdicts, deadline_s=60)
    assert verdict.data.verdict.value == "unhealthy"
    accuracy = next(e for e in verdict.data.evidence if e.name == "accuracy")
    assert accuracy.passed is False

    async def joined() -> list[tuple[int, str, int]]:
        rows = await h.sql(
            "SELECT version, variant, count(*) AS n FROM labelled WHERE model = $1 GROUP BY 1, 2 ORDER BY 1",
            model,
        )
        return [(r["version"], r["variant"], r["n"]) for r in rows]

    # The verdict comes once each side has 100 labelled rows; the labels after them are still being joined.
    expected = [(1, "stable", 320), (2, "shadow", 300)]
    assert await eventually(lambda: _equals(joined(), expected), deadline_s=60)


async def labels_flowing(h: Harness, model: str) -> None:
    """Labels of ``model`` joined just now (within the canary's label grace period), from before any step:
    the verdict then waits for a step's labels rather than judging without them as soon as its predictions
    are in, which it does for a model whose labels are not flowing (docs/monitoring.md, Canary analysis).
    Without this a test sending a step's predictions and labels at once raced the labels' join."""
    before = predictions(model, 1, 20, seed=12, start=datetime.now(UTC) - timedelta(minutes=10))
    await h.send_many(before, "predictions")
    await h.send_many(labels_for(before, accuracy=1.0, seed=12), "feedback")
    await eventually(lambda: _labelled(h, model, 20), deadline_s=60)


async def _labelled(h: Harness, model: str, n: int) -> bool:
    rows = await h.sql("SELECT count(*) AS n FROM labelled WHERE model = $1", model)
    return bool(rows[0]["n"] >= n)


async def test_the_latest_label_joined_to_an_id_is_found_with_the_versions_it_joined(
    pool: asyncpg.Pool,
) -> None:
    # What the background joins a shadow prediction consumed after its label with, and what a restart loads.
    at = datetime.now(UTC)
    pid = unique("p-joined")

    def joined(version: int, label: Any, received: datetime) -> LabelledRecord:
        return LabelledRecord(
            pid, "churn", version, "stable", None, at, 1, 0.7, label, at, False, {}, received_at=received
        )

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await store.joined_labels([pid], ["churn"]) == []
        await store.add_labelled([joined(1, 0, at), joined(3, 0, at)])
        await store.add_labelled([joined(1, 1, at + timedelta(seconds=1))])  # a correction of one row
        [latest] = await store.joined_labels([pid, pid], ["churn", "fraud"])
        assert (latest.prediction_id, latest.model, latest.label) == (pid, "churn", 1)
        assert latest.received_at == at + timedelta(seconds=1) and latest.versions == {1, 3}
        assert latest.variants == {"stable"}
        mine = [r for r in await store.labels_joined_since(at - timedelta(seconds=1)) if r[0] == pid]
        assert mine == [(pid, "churn", at + timedelta(seconds=1), False)]
        assert [r for r in await store.labels_joined_since(at + timedelta(seconds=2)) if r[0] == pid] == []


async def _consumed(h: Harness, model: str, rows: dict[str, int]) -> bool:
    """Each version's predictions were consumed: its open window holds that many rows (none closed: fewer
    than a window's 400)."""
    async with httpx.AsyncClient(headers={"Authorization": "Bearer dev-viewer"}) as client:
        status = (await client.get(f"http://127.0.0.1:{h.port}/v1/status")).json()
    versions = status["models"].get(model, {}).get("versions", {})
    held = {v: (w["open_window"] or {}).get("rows", 0) for v, w in versions.items()}
    return all(held.get(v, 0) >= n for v, n in rows.items())


async def test_labels_received_lately_are_found_by_model_and_time(pool: asyncpg.Pool) -> None:
    # What a canary step asks before judging without labels: whether the model's labels are coming.
    at = datetime.now(UTC)
    joined = LabelledRecord(
        "p-1", "churn", 1, "stable", None, at, "yes", 0.7, "no", at, False, {}, received_at=at
    )
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert not await store.labels_received_since("churn", at - timedelta(seconds=60))
        await store.add_labelled([joined])
        assert await store.labels_received_since("churn", at - timedelta(seconds=60))
        assert await store.labels_received_since("churn", at)
        assert not await store.labels_received_since("churn", at + timedelta(seconds=1))
        assert not await store.labels_received_since("fraud", at - timedelta(seconds=60))


async def test_a_steps_learned_at_is_stored_and_read_back_and_a_row_from_before_it_reads_none(
    database_url: str,
) -> None:
    # When monitoring learned of a step: a restart bakes the step from it. A row stored before the column
    # (migration 0005) has none and bakes from its start, as it did.
    learned_id = "monitoring/0005_rollout_step_learned_at.sql"
    async with migrated_before(database_url, learned_id) as (pool, migrate_rest):
        async with pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO rollout_steps (rollout_id, step_index, model, stable_version, canary_version,
                       started_at, min_samples, bake_seconds, cause_id, correlation_id, actor)
                   VALUES ('r-older', 0, 'churn', 1, 2, 100.0, 10, 5.0, 'e-1', 'c-1', NULL)"""
            )
        assert learned_id in await migrate_rest()
        step = StoredStep("r-new", 1, "churn", 1, 2, 200.0, 10, 5.0, "e-2", "c-2", None, learned_at=221.5)
        async with pool.acquire() as conn, conn.transaction():
            store = PgMonitoringStore(conn)
            await store.save_step(step)
            watched = {s.rollout_id: s.learned_at for s in await store.watched_steps()}
            assert watched == {"r-older": None, "r-new": 221.5}
            last = await store.last_step("r-new")
            assert last is not None and last.learned_at == 221.5


async def test_expired_labels_leave_the_table_and_stay_counted_as_unmatched(pool: asyncpg.Pool) -> None:
    # Kept as rows only to be counted, expired labels made pending_labels grow for as long as the platform
    # ran: they are counted per model as they expire, and deleted.
    at = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        await PgMonitoringStore(conn).add_pending(
            [
                PendingLabel("p-1", "churn", 0, at),
                PendingLabel("p-2", "churn", 1, at),
                PendingLabel("p-1", "fraud", 1, at),
            ]
        )
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        expired = await store.expire_pending(at + timedelta(hours=1))
        assert sorted(expired) == [("p-1", "churn"), ("p-1", "fraud"), ("p-2", "churn")]
        assert await conn.fetchval("SELECT count(*) FROM pending_labels") == 0
        assert await store.expire_pending(at + timedelta(hours=1)) == []  # counted once
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await store.label_counts() == {
            "churn": {"unmatched": 2, "waiting": 0},
            "fraud": {"unmatched": 1, "waiting": 0},
        }
        # Sent again after it expired: it waits its own time, and joins a prediction that comes.
        await store.add_pending([PendingLabel("p-1", "churn", 1, at)])
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await store.pending_labels() == {("p-1", "churn")}
        assert (await store.label_counts())["churn"] == {"unmatched": 2, "waiting": 1}
        [taken] = await store.take_pending(["p-1"], ["churn"])
        assert taken.label == 1


async def test_the_labels_waiting_longest_are_given_up_and_counted_as_unmatched(pool: asyncpg.Pool) -> None:
    # Past max_pending_labels, the oldest waiting labels are given up as those whose wait ended are.
    at = datetime.now(UTC)
    for pid, model in [("p-1", "churn"), ("p-2", "fraud"), ("p-1", "fraud"), ("p-3", "churn")]:
        async with pool.acquire() as conn, conn.transaction():  # received_at: each transaction's start
            await PgMonitoringStore(conn).add_pending([PendingLabel(pid, model, 1, at)])
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert await store.give_up_oldest_pending(0) == []
        given_up = await store.give_up_oldest_pending(3)
        assert sorted(given_up) == [("p-1", "churn"), ("p-1", "fraud"), ("p-2", "fraud")]
        assert await store.pending_labels() == {("p-3", "churn")}
    async with pool.acquire() as conn, conn.transaction():
        assert await PgMonitoringStore(conn).label_counts() == {
            "churn": {"unmatched": 1, "waiting": 1},
            "fraud": {"unmatched": 2, "waiting": 0},
        }


async def test_the_migration_counts_the_expired_labels_kept_before_and_deletes_them(
    database_url: str,
) -> None:
    counted_id = "monitoring/0006_unmatched_labels_counted.sql"
    async with migrated_before(database_url, counted_id) as (pool, migrate_rest):
        async with pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO pending_labels (prediction_id, model, label, observed_at, expired)
                   VALUES ('p-1', 'churn', '0', now(), true), ('p-2', 'churn', '1', now(), true),
                          ('p-3', 'churn', '1', now(), false), ('p-1', 'fraud', '1', now(), true)"""
            )
        assert counted_id in await migrate_rest()
        async with pool.acquire() as conn, conn.transaction():
            store = PgMonitoringStore(conn)
            assert await store.label_counts() == {
                "churn": {"unmatched": 2, "waiting": 1},
                "fraud": {"unmatched": 1, "waiting": 0},
            }
            assert await store.pending_labels() == {("p-3", "churn")}
            assert await conn.fetchval("SELECT count(*) FROM pending_labels") == 1


async def test_labels_outside_a_versions_classes_are_counted_in_the_status(harness: Harness) -> None:
    h, model = harness, unique("encoded")
    await register(h, model, 1)  # classes 0 and 1
    await eventually(lambda: known(h, model, 1))
    sent = predictions(model, 1, 40, seed=11, start=datetime.now(UTC))
    await h.send_many(sent, "predictions")
    labels = labels_for(sent, accuracy=1.0, seed=12)[:30]
    encoded = {0: "no", 1: "yes"}  # the first 25 from a feed that sends "yes"/"no" for 1/0
    labels[:25] = [
        e.model_copy(update={"data": e.data.model_copy(update={"label": encoded[e.data.label]})})
        for e in labels[:25]
    ]
    await h.send_many(labels, "feedback")

    async def joined() -> bool:
        rows = await h.sql("SELECT count(*) AS n FROM labelled WHERE model = $1", model)
        return int(rows[0]["n"]) == 30

    await eventually(joined, deadline_s=60)
    async with httpx.AsyncClient(headers={"Authorization": "Bearer dev-viewer"}) as client:
        status = (await client.get(f"http://127.0.0.1:{h.port}/v1/status")).json()
    assert status["models"][model]["versions"]["1"]["labels_outside_classes"] == 25
    assert status["models"][model]["labels"]["labelled"] == 30


async def test_a_label_outside_the_classes_is_stored_marked_and_a_correction_unmarks_it(
    pool: asyncpg.Pool,
) -> None:
    at = datetime.now(UTC)

    def joined(pid: str, label: Any, outside: bool) -> LabelledRecord:
        return LabelledRecord(
            pid, "churn", 1, "stable", None, at, 1, 0.7, label, at, False, {}, outside_classes=outside
        )

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        await store.add_labelled([joined("p-1", "yes", True), joined("p-2", 1, False)])
        assert await store.labels_outside_classes() == {("churn", 1): 1}
        assert {r.prediction_id: r.outside_classes for r in await store.recent_labelled("churn", 5)} == {
            "p-1": True,
            "p-2": False,
        }
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        # Corrected to a class:
        assert await store.add_labelled([joined("p-1", 1, False)]) == [("p-1", "churn")]
        assert await store.labels_outside_classes() == {}


async def test_a_restart_rebuilds_the_open_window_and_reports_its_replay_in_the_status(
    kafka_bootstrap: str, database_url: str, tmp_path: Path
) -> None:
    env = service_env(kafka_bootstrap, database_url, tmp_path)
    await create_topics(kafka_bootstrap, *topics_of(env).values())
    model = unique("restart")
    viewer = {"Authorization": "Bearer dev-viewer"}

    async def status(h: Harness) -> dict[str, Any]:
        async with httpx.AsyncClient(headers=viewer) as client:
            return (await client.get(f"http://127.0.0.1:{h.port}/v1/status")).json()

    async def open_rows(h: Harness) -> int:
        version = (await status(h))["models"].get(model, {}).get("versions", {}).get("1")
        return int(version["open_window"]["rows"]) if version else 0

    async with running(env) as h:
        assert (await status(h))["replay"] is None  # nothing to replay on a first start
        await register(h, model, 1)
        await eventually(lambda: known(h, model, 1))
        await h.send_many(predictions(model, 1, 100, seed=13, start=datetime.now(UTC)), "predictions")
        await eventually(lambda: _equals(open_rows(h), 100), deadline_s=60)
        await eventually(lambda: h.sql("SELECT 1 FROM replay_offsets"), deadline_s=30)
    async with running(env) as h:
        assert await open_rows(h) == 100  # rebuilt by the replay, before the consumers started
        replay = (await status(h))["replay"]
    assert replay["complete"] is True and replay["records"] == 5  # five requests of 20 rows
    assert replay["not_replayed"] == {"deadline": {}, "deleted": {}}


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def test_a_rollout_started_again_leaves_the_step_in_force_watched(pool: asyncpg.Pool) -> None:
    # A second RolloutStarted for a rollout on its step 1 (another event id: not the inbox's duplicate)
    # marked step 1 superseded and watched step 0 again, whose verdict was given: step 1 never got one, and
    # serving's rollout waited for it.
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    # The examples' rollout (step 0, then step 1), under an id of this test's.
    started = EXAMPLES[RolloutStarted].model_copy(update={"rollout_id": "r-again"})
    advanced = EXAMPLES[RolloutStepAdvanced].model_copy(update={"rollout_id": "r-again"})
    assert isinstance(started, RolloutStarted) and isinstance(advanced, RolloutStepAdvanced)
    assert (started.step_index, advanced.step_index) == (0, 1)
    tally = Tally()
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        await on_rollout_started(
            new_event(started, source="/serving"),
            monitor=monitor,
            store=store,
            publish=publish_nothing,
            tally=tally,
        )
        await store.decide_step("r-again", 0, "healthy", "all 2 comparisons made are within tolerance", "e-0")
        await on_rollout_step_advanced(
            new_event(advanced, source="/serving"),
            monitor=monitor,
            store=store,
            publish=publish_nothing,
            tally=tally,
        )
    tally.count()  # committed: memory follows
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        await on_rollout_started(
            new_event(started, source="/serving"),
            monitor=monitor,
            store=store,
            publish=publish_nothing,
            tally=tally,
        )
    tally.count()

    async with pool.acquire() as conn:
        watched = await PgMonitoringStore(conn).watched_steps()
    assert [(s.rollout_id, s.step_index) for s in watched if s.rollout_id == "r-again"] == [("r-again", 1)]
    assert monitor.live.steps["r-again"].step_index == 1


async def test_a_rollout_promoted_after_its_steps_were_decided_refuses_a_later_step(
    pool: asyncpg.Pool,
) -> None:
    # Every step had its verdict when the rollout was promoted: marking its watched steps finished changed no
    # row, so a RolloutStepAdvanced read afterwards watched a step of a rollout that was over.
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    started = EXAMPLES[RolloutStarted].model_copy(update={"rollout_id": "r-over"})
    advanced = EXAMPLES[RolloutStepAdvanced].model_copy(update={"rollout_id": "r-over"})
    promoted = EXAMPLES[RolloutPromoted].model_copy(update={"rollout_id": "r-over"})
    assert isinstance(started, RolloutStarted) and isinstance(advanced, RolloutStepAdvanced)
    assert isinstance(promoted, RolloutPromoted)
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        await on_rollout_started(
            new_event(started, source="/serving"),
            monitor=monitor,
            store=store,
            publish=publish_nothing,
            tally=Tally(),
        )
        await store.decide_step("r-over", 0, "healthy", "all 2 comparisons made are within tolerance", "e-0")
        await on_rollout_finished(
            new_event(promoted, source="/serving"), monitor=monitor, store=store, tally=Tally()
        )
        assert await store.rollout_outcome("r-over") == "promoted"
        assert await store.rollout_outcome("r-never") is None
    with pytest.raises(PermanentError, match="rollout r-over was promoted already"):
        async with pool.acquire() as conn, conn.transaction():
            await on_rollout_step_advanced(
                new_event(advanced, source="/serving"),
                monitor=monitor,
                store=PgMonitoringStore(conn),
                publish=publish_nothing,
                tally=Tally(),
            )
    async with pool.acquire() as conn:
        watched = await PgMonitoringStore(conn).watched_steps()
    assert [s for s in watched if s.rollout_id == "r-over"] == []


async def test_watched_rollouts_are_counted_in_the_events_transaction_and_decided_inconclusive_past_the_bound(
    pool: asyncpg.Pool,
) -> None:
    # Each watched step holds its traffic in memory: a start past max_watched_rollout_steps is decided at
    # once, inconclusive, counted against the steps this very transaction watched (memory follows only at
    # commit), and a restart decides so the rows past the bound (from before it, or a bound lowered) instead
    # of loading them all. Serving rolls their canaries back.
    monitor = make_monitor(
        MonitoringSettings(max_watched_rollout_steps=2), artifacts=None, source="/test/monitoring"
    )
    published: list[CloudEvent[Any]] = []

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    def started(rollout_id: str) -> CloudEvent[Any]:
        return new_event(EXAMPLES[RolloutStarted].model_copy(update={"rollout_id": rollout_id}), source="/s")

    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        for rollout_id in ("r-1", "r-2"):
            await on_rollout_started(
                started(rollout_id), monitor=monitor, store=store, publish=publish, tally=Tally()
            )
        assert published == []
        third = started("r-3")
        await on_rollout_started(third, monitor=monitor, store=store, publish=publish, tally=Tally())
        [verdict] = published
        assert verdict.data.verdict is Verdict.INCONCLUSIVE and verdict.causationid == third.id
        assert verdict.data.reason.startswith("not watched: 2 rollouts have a step watched")
        row = await conn.fetchrow(
            "SELECT state, verdict, reason, event_id FROM rollout_steps WHERE rollout_id = 'r-3'"
        )
        assert dict(row) == {
            "state": "decided",
            "verdict": "inconclusive",
            "reason": verdict.data.reason,
            "event_id": verdict.id,
        }
        assert (
            await conn.fetchval("SELECT kind FROM alerts WHERE event_id = $1", verdict.id) == "CanaryVerdict"
        )
        assert await store.rollouts_watched(besides="r-1") == 1
        watched = await store.watched_steps()
        # A row watched past the bound (written before there was one), started last.
        last = watched[-1]
        await store.save_step(dataclasses.replace(last, rollout_id="r-4", started_at=last.started_at + 1))
    assert monitor.live.steps == {}  # no Tally counted: nothing of it reached memory

    published.clear()
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        assert [s.rollout_id for s in await store.watched_beyond(2)] == ["r-4"]
        await decide_watched_beyond_bound(
            time.time(), monitor=monitor, store=store, publish=publish, tally=Tally()
        )
        [verdict] = published
        assert (verdict.data.rollout_id, verdict.data.verdict) == ("r-4", Verdict.INCONCLUSIVE)
        assert await store.watched_beyond(2) == []
        assert sorted(s.rollout_id for s in await store.watched_steps()) == ["r-1", "r-2"]
        assert await store.rollouts_watched(besides="r-0") == 2
        [row] = await conn.fetch("SELECT state, reason FROM rollout_steps WHERE rollout_id = 'r-4'")
        assert (row["state"], row["reason"]) == ("decided", verdict.data.reason)
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_indexes WHERE indexname = 'rollout_steps_watching' "
                "AND schemaname = current_schema()"
            )
            == 1
        )


async def test_a_step_that_came_before_its_start_is_kept_in_postgres_and_watched_when_the_start_comes(
    pool: asyncpg.Pool,
) -> None:
    # Step 2's event, then step 1's, before the rollout's start (another partition, a replica catching up):
    # kept in Postgres in their events' transactions, so a monitoring process started afresh watches step 2
    # when the start comes. Before, both were dead-lettered and the start watched step 0.
    started = EXAMPLES[RolloutStarted].model_copy(update={"rollout_id": "r-early"})
    advanced = EXAMPLES[RolloutStepAdvanced].model_copy(update={"rollout_id": "r-early"})
    assert isinstance(started, RolloutStarted) and isinstance(advanced, RolloutStepAdvanced)
    assert len(started.steps) >= 3
    twice = advanced.model_copy(
        update={"step_index": 2, "previous_weight": started.steps[1], "weight": started.steps[2]}
    )
    first = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    for payload in (twice, advanced, advanced):  # step 1 sent twice (another event id)
        async with pool.acquire() as conn, conn.transaction():
            await on_rollout_step_advanced(
                new_event(payload, source="/serving"),
                monitor=first,
                store=PgMonitoringStore(conn),
                publish=publish_nothing,
                tally=Tally(),
            )
    async with pool.acquire() as conn:
        kept = await conn.fetch("SELECT step_index FROM early_steps WHERE rollout_id = 'r-early' ORDER BY 1")
        assert [r["step_index"] for r in kept] == [1, 2]
        assert [s for s in await PgMonitoringStore(conn).watched_steps() if s.rollout_id == "r-early"] == []

    restarted = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    tally = Tally()
    async with pool.acquire() as conn, conn.transaction():
        await on_rollout_started(
            new_event(started, source="/serving"),
            monitor=restarted,
            store=PgMonitoringStore(conn),
            publish=publish_nothing,
            tally=tally,
        )
    tally.count()
    async with pool.acquire() as conn:
        store = PgMonitoringStore(conn)
        watched = [s for s in await store.watched_steps() if s.rollout_id == "r-early"]
        assert [(s.step_index, s.min_samples, s.bake_seconds) for s in watched] == [
            (2, started.min_samples, started.bake_seconds)
        ]
        assert await conn.fetchval("SELECT count(*) FROM early_steps WHERE rollout_id = 'r-early'") == 0
    assert restarted.live.steps["r-early"].step_index == 2


async def test_a_step_whose_start_never_comes_leaves_postgres_after_the_wait(pool: asyncpg.Pool) -> None:
    advanced = EXAMPLES[RolloutStepAdvanced].model_copy(update={"rollout_id": "r-orphan"})
    ended = EXAMPLES[RolloutStepAdvanced].model_copy(update={"rollout_id": "r-ended"})
    promoted = EXAMPLES[RolloutPromoted].model_copy(update={"rollout_id": "r-ended"})
    assert isinstance(advanced, RolloutStepAdvanced) and isinstance(ended, RolloutStepAdvanced)
    assert isinstance(promoted, RolloutPromoted)
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    now = datetime.now(UTC).timestamp()
    monitor.clock = lambda: now
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        for payload in (advanced, ended):
            await on_rollout_step_advanced(
                new_event(payload, source="/serving"),
                monitor=monitor,
                store=store,
                publish=publish_nothing,
                tally=Tally(),
            )
        # The rollout ended before its start came: its kept step goes with the ending.
        await on_rollout_finished(
            new_event(promoted, source="/serving"), monitor=monitor, store=store, tally=Tally()
        )
    async with pool.acquire() as conn:
        assert [r["rollout_id"] for r in await conn.fetch("SELECT rollout_id FROM early_steps")] == [
            "r-orphan"
        ]

    wait = monitor.rollout_start_wait_seconds
    for at, left in ((now + wait - 1, ["r-orphan"]), (now + wait + 1, [])):
        async with pool.acquire() as conn, conn.transaction():
            store = PgMonitoringStore(conn)
            await housekeeping(at, monitor=monitor, store=store, tally=Tally())
            assert [r["rollout_id"] for r in await conn.fetch("SELECT rollout_id FROM early_steps")] == left


async def start_rollout(pool: asyncpg.Pool, monitor: Any, started: RolloutStarted) -> list[StoredStep]:
    """Handle the rollout's start in a transaction that commits; returns the rollout's steps watched then."""
    tally = Tally()
    async with pool.acquire() as conn, conn.transaction():
        await on_rollout_started(
            new_event(started, source="/serving"),
            monitor=monitor,
            store=PgMonitoringStore(conn),
            publish=publish_nothing,
            tally=tally,
        )
    tally.count()
    async with pool.acquire() as conn:
        return [
            s for s in await PgMonitoringStore(conn).watched_steps() if s.rollout_id == started.rollout_id
        ]


async def test_keeping_more_steps_than_the_bound_gives_up_the_ones_kept_longest_in_postgres(
    pool: asyncpg.Pool,
) -> None:
    # max_kept_rollout_steps 2. Before, every step event of a rollout not started yet stayed in early_steps
    # (and collected its canary's traffic in memory) for rollout_start_wait_seconds, however many came.
    started = EXAMPLES[RolloutStarted].model_copy(update={"rollout_id": "r-b"})
    advanced = EXAMPLES[RolloutStepAdvanced]
    assert isinstance(started, RolloutStarted) and isinstance(advanced, RolloutStepAdvanced)
    twice = advanced.model_copy(
        update={"step_index": 2, "previous_weight": started.steps[1], "weight": started.steps[2]}
    )
    monitor = make_monitor(MonitoringSettings(max_kept_rollout_steps=2), artifacts=None, source="/test/m")
    now = datetime.now(UTC).timestamp()

    async def step_event(payload: RolloutStepAdvanced, rollout_id: str, at: float) -> None:
        monitor.clock = lambda: at
        tally = Tally()
        async with pool.acquire() as conn, conn.transaction():
            await on_rollout_step_advanced(
                new_event(payload.model_copy(update={"rollout_id": rollout_id}), source="/serving"),
                monitor=monitor,
                store=PgMonitoringStore(conn),
                publish=publish_nothing,
                tally=tally,
            )
        tally.count()

    async def tables() -> tuple[list[tuple[str, int]], list[tuple[str, int, float]]]:
        async with pool.acquire() as conn:
            kept = await conn.fetch("SELECT rollout_id, step_index FROM early_steps ORDER BY 1, 2")
            given_up = await conn.fetch(
                "SELECT rollout_id, step_index, given_up_at FROM given_up_steps ORDER BY 1"
            )
        return [tuple(r) for r in kept], [tuple(r) for r in given_up]

    await step_event(advanced, "r-a", now)
    await step_event(advanced, "r-b", now + 1)
    await step_event(twice, "r-a", now + 2)  # (r-a, 1) is the one kept longest
    assert await tables() == ([("r-a", 2), ("r-b", 1)], [("r-a", 1, now + 2)])
    await step_event(twice, "r-a", now + 3)  # the same step again (another event id): nothing changes
    assert await tables() == ([("r-a", 2), ("r-b", 1)], [("r-a", 1, now + 2)])
    # Kept at the same moment as (r-a, 2): the one being kept stays, the older (r-b, 1) goes.
    await step_event(advanced, "r-c", now + 2)
    assert await tables() == ([("r-a", 2), ("r-c", 1)], [("r-a", 1, now + 2), ("r-b", 1, now + 2)])
    assert sorted((r, s.step_index) for r, s in monitor.live.kept.items()) == [("r-a", 2), ("r-c", 1)]

    # r-b's start, later: it watches the step given up from then on, as after its wait's end.
    late = now + 60
    monitor.clock = lambda: late
    watched = await start_rollout(pool, monitor, started)
    assert [(s.step_index, s.started_at) for s in watched] == [(1, late)]
    assert await tables() == ([("r-a", 2), ("r-c", 1)], [("r-a", 1, now + 2)])


async def test_a_start_after_its_kept_step_was_given_up_watches_that_step_and_the_status_shows_both(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # Step 2 of r-late given up (its start did not come within the wait), step 1 of r-kept kept: the status
    # lists both, with when they were kept and when the kept one is given up; before, neither was on it. The
    # start of r-late, later still, watches step 2 from then on; before, it watched its own step 0.
    started = EXAMPLES[RolloutStarted].model_copy(update={"rollout_id": "r-late"})
    advanced = EXAMPLES[RolloutStepAdvanced].model_copy(update={"rollout_id": "r-late"})
    assert isinstance(started, RolloutStarted) and isinstance(advanced, RolloutStepAdvanced)
    twice = advanced.model_copy(
        update={"step_index": 2, "previous_weight": started.steps[1], "weight": started.steps[2]}
    )
    kept = advanced.model_copy(update={"rollout_id": "r-kept"})
    settings = MonitoringSettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
    monitor = make_monitor(settings, artifacts=None, source="/test/monitoring")
    now = datetime.now(UTC).timestamp()
    wait = monitor.rollout_start_wait_seconds
    monitor.clock = lambda: now
    for payload in (advanced, twice):
        async with pool.acquire() as conn, conn.transaction():
            await on_rollout_step_advanced(
                new_event(payload, source="/serving"),
                monitor=monitor,
                store=PgMonitoringStore(conn),
                publish=publish_nothing,
                tally=Tally(),
            )
    async with pool.acquire() as conn, conn.transaction():
        await housekeeping(now + wait + 1, monitor=monitor, store=PgMonitoringStore(conn), tally=Tally())
    monitor.clock = lambda: now + wait + 2
    async with pool.acquire() as conn, conn.transaction():
        store = PgMonitoringStore(conn)
        await on_rollout_step_advanced(
            new_event(kept, source="/serving"),
            monitor=monitor,
            store=store,
            publish=publish_nothing,
            tally=Tally(),
        )
        # A lower step given up later does not replace the higher one remembered.
        [lower] = [s for s in await store.kept_steps() if s.rollout_id == "r-kept"]
        await store.remember_given_up([dataclasses.replace(lower, rollout_id="r-late")], now)

    app = create_app(settings, title="monitoring", description="", routers=[api.router])
    app.state.runtime, app.state.monitor = SimpleNamespace(pool=pool), monitor
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://monitoring", headers={"Authorization": "Bearer dev-viewer"}
    ) as client:
        r = await client.get("/v1/status")
    assert r.status_code == 200, r.text
    status = r.json()
    assert status["rollout_steps_kept"] == [
        {
            "rollout_id": "r-kept",
            "model": kept.model,
            "step_index": 1,
            "stable_version": kept.stable_version,
            "canary_version": kept.canary_version,
            "started_at": status["rollout_steps_kept"][0]["started_at"],
            "kept_at": from_epoch(now + wait + 2).isoformat(),
            "expires_at": from_epoch(now + 2 * wait + 2).isoformat(),
            "canary_samples": 0,
            "stable_samples": 0,
        }
    ]
    assert status["rollout_steps_given_up"] == [
        {
            "rollout_id": "r-late",
            "model": twice.model,
            "step_index": 2,
            "stable_version": twice.stable_version,
            "canary_version": twice.canary_version,
            "kept_at": from_epoch(now).isoformat(),
            "given_up_at": from_epoch(now + wait + 1).isoformat(),
        }
    ]

    late = now + wait + 60
    monitor.clock = lambda: late
    watched = await start_rollout(pool, monitor, started)
    assert [(s.step_index, s.started_at, s.learned_at) for s in watched] == [(2, late, late)]
    async with pool.acquire() as conn:
        assert await PgMonitoringStore(conn).given_up_steps() == []
    assert monitor.live.steps["r-late"].step_index == 2


async def test_a_rollout_ending_while_housekeeping_gives_up_its_kept_step_leaves_no_given_up_step(
    pool: asyncpg.Pool,
) -> None:
    # The housekeeping tick and the rollouts consumer run on connections of their own. The tick has taken
    # r-race's kept step (its start did not come in time) and written the given-up step, not yet committed,
    # when the rollout's end comes: the ending waits for the kept step's row, finds it gone, and must still
    # drop the given-up step the tick then commits. Before, it looked for the given-up step first (not yet
    # there), so the row of a rollout that had ended stayed in given_up_steps, and GET /v1/status, for good.
    advanced = EXAMPLES[RolloutStepAdvanced].model_copy(update={"rollout_id": "r-race"})
    promoted = EXAMPLES[RolloutPromoted].model_copy(update={"rollout_id": "r-race"})
    assert isinstance(advanced, RolloutStepAdvanced) and isinstance(promoted, RolloutPromoted)
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    now = datetime.now(UTC).timestamp()
    monitor.clock = lambda: now
    async with pool.acquire() as conn, conn.transaction():
        await on_rollout_step_advanced(
            new_event(advanced, source="/serving"),
            monitor=monitor,
            store=PgMonitoringStore(conn),
            publish=publish_nothing,
            tally=Tally(),
        )

    async def ending(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await on_rollout_finished(
                new_event(promoted, source="/serving"),
                monitor=monitor,
                store=PgMonitoringStore(conn),
                tally=Tally(),
            )

    async with pool.acquire() as tick, pool.acquire() as consumer, pool.acquire() as watcher:
        async with tick.transaction():
            wait = monitor.rollout_start_wait_seconds
            await housekeeping(now + wait + 1, monitor=monitor, store=PgMonitoringStore(tick), tally=Tally())
            ended = asyncio.create_task(ending(consumer))
            pid = consumer.get_server_pid()

            await waits_on_a_lock(watcher, pid)
        await ended
        assert await PgMonitoringStore(watcher).rollout_outcome("r-race") == "promoted"
        assert await PgMonitoringStore(watcher).given_up_steps() == []


@pytest.mark.parametrize("before", [None, 0.2], ids=["first-policy", "policy-set"])
async def test_two_policy_changes_at_once_each_name_the_policy_they_replace(
    pool: asyncpg.Pool, before: float | None
) -> None:
    # Two operators PUT a model's policy at once, each request on a connection of its own. The second read
    # the policy before the first committed, so both DriftPolicyChanged named the same policy as replaced,
    # and the audit trail never showed the one the second really replaced (the first's).
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    changes: list[CloudEvent[Any]] = []

    async def publish(event: CloudEvent[Any]) -> None:
        changes.append(event)

    async def setting(conn: asyncpg.Connection, psi_threshold: float) -> StoredPolicy:
        async with conn.transaction():
            fields = {"psi_threshold": psi_threshold}
            store = PgMonitoringStore(conn)
            return await set_policy(
                "churn", fields, actor="user:op", monitor=monitor, store=store, publish=publish
            )

    async with pool.acquire() as first, pool.acquire() as second, pool.acquire() as watcher:
        if before is not None:
            await setting(first, before)
        async with first.transaction():
            set_first = await setting(first, 0.3)
            later = asyncio.create_task(setting(second, 0.4))
            pid = second.get_server_pid()

            await waits_on_a_lock(watcher, pid)
        set_second = await later
        stored = await PgMonitoringStore(watcher).policy("churn")
        reloaded = await PgMonitoringStore(watcher).policies()

    replaced = [c.data.previous.psi_threshold if c.data.previous else None for c in changes]
    assert [c.data.policy.psi_threshold for c in changes] == [0.2, 0.3, 0.4][1 if before is None else 0 :]
    assert replaced == ([] if before is None else [None]) + [before, 0.3]
    assert stored is not None and stored.psi_threshold == 0.4
    # Numbered in the order they committed: put in force in the other order, as the two requests may go on
    # after their commits, the later setting stays (the first's replaced it until the next tick's reload).
    assert set_second.version == set_first.version + 1 == (2 if before is None else 3)
    assert reloaded["churn"] == set_second
    assert monitor.hold_policy("churn", set_second) and not monitor.hold_policy("churn", set_first)
    assert monitor.policy("churn").psi_threshold == 0.4


async def test_the_status_lists_alerts_written_in_one_transaction_newest_written_first(
    pool: asyncpg.Pool,
) -> None:
    # One window's alerts are written in one transaction and share created_at: ordered by it alone, they came
    # back in either order and the per-model limit cut between them as it happened to.
    written = [f"a-{i}" for i in (3, 1, 4, 0, 2)]  # in no order of their ids
    async with pool.acquire() as conn:
        async with conn.transaction():
            store = PgMonitoringStore(conn)
            for event_id in written:
                await store.record_alert(event_id, "churn", 1, "DataQualityIssue", "s")
        listed = await PgMonitoringStore(conn).recent_alerts(["churn"], 3)
    assert [a["event_id"] for a in listed["churn"]] == written[::-1][:3]
