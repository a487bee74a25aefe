"""bench/drift consume: predictions per second through the monitoring service's real consumer on the real
broker (a `python -m services.monitoring` process on its own topics, schema and consumer groups).

    .venv/bin/python bench/drift/consume.py [--rows 200000] [--features 30] [--rows-per-event 100]

Publishes a registered model and the predictions first, then starts the service and times from the
first ingested prediction to the last (read from GET /status: predictions held for label joins).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import orjson
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from contracts.common import (  # noqa: E402
    ArtifactFormat,
    ArtifactRef,
    DatasetRef,
    FeatureSpec,
    FeatureType,
    Lineage,
    ModelSignature,
    Task,
)
from contracts.envelope import CONTENT_TYPE, SPEC_VERSION, new_event  # noqa: E402
from contracts.models import ModelVersionRegistered  # noqa: E402
from contracts.predictions import PredictionsLogged  # noqa: E402
from deploy.local.broker import delete_topics  # noqa: E402
from deploy.local.postgres import drop_schemas  # noqa: E402
from libs.artifacts import ArtifactStore  # noqa: E402
from libs.bus.kafka import KafkaPublisher  # noqa: E402
from libs.profiles import build_profile  # noqa: E402
from libs.settings import KafkaSettings  # noqa: E402

SHA = "0" * 64


def start_service(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The monitoring service as its own process."""
    return subprocess.Popen([sys.executable, "-m", "services.monitoring"], cwd=ROOT, env=env)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=30)
    parser.add_argument("--rows-per-event", type=int, default=100)
    args = parser.parse_args()
    bootstrap = os.environ.get("DRIFTLOOP_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    database = os.environ.get("DRIFTLOOP_DATABASE_URL", "postgresql://driftloop@127.0.0.1:54329/driftloop")
    tag = uuid.uuid4().hex[:8]
    artifacts = tempfile.mkdtemp(prefix="driftloop-bench-")
    try:
        await measure(args, bootstrap, database, tag, artifacts)
    finally:
        # What the run made: its topics, the service's schema and the profile it stored.
        delete_topics(bootstrap, lambda topic: topic.startswith("bench.mon.") and topic.endswith(f".{tag}"))
        drop_schemas(database, lambda schema: schema == f"bench_mon_{tag}")
        shutil.rmtree(artifacts, ignore_errors=True)


async def measure(args: argparse.Namespace, bootstrap: str, database: str, tag: str, artifacts: str) -> None:
    """Publish a model and the predictions, then time the service's consumption of them."""
    topics = {k: f"bench.mon.{k}.{tag}" for k in ("models", "predictions", "feedback", "rollouts")}
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in topics.values()])
    await admin.close()

    n_num = args.features * 2 // 3
    names = [f"n{i}" for i in range(n_num)] + [f"c{i}" for i in range(args.features - n_num)]
    rng = np.random.default_rng(0)
    ref = pd.DataFrame(
        {c: rng.normal(size=5_000) if c[0] == "n" else rng.choice(list("abcd"), 5_000) for c in names}
    )
    store = ArtifactStore(artifacts)
    stored = store.put(
        build_profile(ref, [(c, "numeric" if c[0] == "n" else "categorical") for c in names]).to_bytes()
    )
    registered = ModelVersionRegistered(
        model="bench",
        model_version=1,
        run_id="r",
        job_id="j",
        artifact=ArtifactRef(key=SHA, uri="file:///none", format=ArtifactFormat.SKOPS, size_bytes=1),
        profile=ArtifactRef(
            key=stored.sha256, uri=stored.uri, format=ArtifactFormat.JSON, size_bytes=stored.size
        ),
        signature=ModelSignature(
            features=[
                FeatureSpec(name=c, type=FeatureType.NUMERIC if c[0] == "n" else FeatureType.CATEGORICAL)
                for c in names
            ],
            target="y",
            task=Task.CLASSIFICATION,
            classes=[0, 1],
        ),
        metrics={"accuracy": 0.8},
        lineage=Lineage(
            datasets=[DatasetRef(name="b", version=1, sha256=SHA)], spec_hash=SHA, code_version="b", seed=0
        ),
    )
    publisher = KafkaPublisher(KafkaSettings(bootstrap=bootstrap), linger_ms=20)
    await publisher.start()
    key, value, headers = new_event(registered, source="/bench").to_kafka()
    await publisher.send_many([(topics["models"], key, value, headers)])
    port = 18105
    env = {
        **os.environ,
        "DRIFTLOOP_KAFKA_BOOTSTRAP": bootstrap,
        "DRIFTLOOP_DATABASE_URL": database,
        "DRIFTLOOP_ARTIFACTS_URL": artifacts,
        "DRIFTLOOP_LOG_LEVEL": "WARNING",
        "DRIFTLOOP_MONITORING_HTTP_PORT": str(port),
        "DRIFTLOOP_MONITORING_SCHEMA_NAME": f"bench_mon_{tag}",
        "DRIFTLOOP_MONITORING_CONSUMER_GROUP": f"bench-mon-{tag}",
        "DRIFTLOOP_MONITORING_WINDOW_ROWS": "100000",
        **{f"DRIFTLOOP_MONITORING_{k.upper()}_TOPIC": t for k, t in topics.items()},
    }
    # Phase 1: the service learns the model (a restart then restores it before any consumer runs).
    proc = start_service(env)
    try:
        async with httpx.AsyncClient(headers={"Authorization": "Bearer dev-viewer"}) as client:
            while True:
                await asyncio.sleep(0.2)
                try:
                    status = (await client.get(f"http://127.0.0.1:{port}/v1/status", timeout=5)).json()
                except httpx.HTTPError:
                    continue
                if "bench" in status["models"]:
                    break
    finally:
        proc.terminate()
        proc.wait(30)
    events = args.rows // args.rows_per_event
    now = datetime.now(UTC).isoformat()
    batch = []
    for e in range(events):
        rows = []
        for i in range(args.rows_per_event):
            inputs = {
                c: (float(rng.normal()) if c[0] == "n" else "abcd"[int(rng.integers(4))]) for c in names
            }
            p = float(rng.uniform())
            rows.append(
                {
                    "prediction_id": f"{tag}-{e}-{i}",
                    "inputs": inputs,
                    "output": {"prediction": int(p > 0.5), "probabilities": {"0": 1 - p, "1": p}},
                }
            )
        value = orjson.dumps(
            {
                "model": "bench",
                "model_version": 1,
                "variant": "stable",
                "rollout_id": None,
                "request_id": f"r{e}",
                "predicted_at": now,
                "latency_ms": 1.0,
                "rows": rows,
            }
        )
        eid = str(uuid.uuid4())
        headers = [
            ("ce_specversion", SPEC_VERSION.encode()),
            ("ce_id", eid.encode()),
            ("ce_source", b"/bench"),
            ("ce_type", PredictionsLogged.event_type().encode()),
            ("ce_time", now.encode()),
            ("content-type", CONTENT_TYPE.encode()),
            ("ce_correlationid", eid.encode()),
            ("ce_subject", b"bench"),
        ]
        batch.append((topics["predictions"], b"bench", value, headers))
        if len(batch) >= 200:
            await publisher.send_many(batch)
            batch = []
    if batch:
        await publisher.send_many(batch)
    await publisher.stop()

    # Phase 2: the predictions are on the topic; time their consumption.
    proc = start_service(env)
    first = last = None
    try:
        async with httpx.AsyncClient(headers={"Authorization": "Bearer dev-viewer"}) as client:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                try:
                    status = (await client.get(f"http://127.0.0.1:{port}/v1/status", timeout=5)).json()
                except httpx.HTTPError:
                    continue
                cached = status["cached_predictions"]
                if cached and first is None:
                    first = (time.monotonic(), cached)
                if cached >= args.rows:
                    last = time.monotonic()
                    break
    finally:
        proc.terminate()
        proc.wait(30)
    if first is None or last is None:
        raise SystemExit("the service did not ingest every prediction in time")
    seconds = last - first[0]
    counted = args.rows - first[1]
    print(f"{args.rows} predictions, {args.features} features, {args.rows_per_event} rows per event")
    print(
        f"consumed {counted} predictions in {seconds:.2f} s after the first: "
        f"{counted / seconds:,.0f} predictions/s"
    )


if __name__ == "__main__":
    asyncio.run(main())
