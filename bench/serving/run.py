"""Serving benchmark: driftloop vs `mlflow models serve` vs a bare FastAPI endpoint, in one run.

    .venv/bin/python -m bench.serving.run [--duration 10] [--connections 16]

Same scikit-learn model (bench/serving/model.py), one worker process each, same rows per request, one
server at a time on 127.0.0.1, load from wrk (a separate process, one thread). driftloop runs as
`python -m services.serving` with a live canary rollout (10%) and the prediction log on; a second driftloop
run with the prediction log off gives the logging cost. Needs the local infrastructure
(`deploy/local/driftloop infra up`) and wrk (`apt-get install wrk`). MLflow gets its own virtualenv under
.driftloop/bench/mlflow-venv, created on first use. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import sklearn

from bench.serving.model import KINDS, build_model, features, records
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
from contracts.envelope import new_event
from contracts.models import ModelVersionRegistered
from contracts.validation import CheckKind, CheckResult, ValidationPassed
from libs.artifacts import ArtifactStore, save_model
from libs.bus.kafka import KafkaPublisher
from libs.settings import PROJECT_ROOT, KafkaSettings

HERE = Path(__file__).resolve().parent
STATE = PROJECT_ROOT / ".driftloop" / "bench"
MLFLOW_VENV = STATE / "mlflow-venv"
MLFLOW_VERSION = "3.17.2"
KAFKA = os.environ.get("DRIFTLOOP_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
DATABASE = os.environ.get("DRIFTLOOP_DATABASE_URL", "postgresql://driftloop@127.0.0.1:54329/driftloop")
PORT = 18431


@dataclass
class Measure:
    server: str
    rows: int
    load: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    duration_s: float = 0.0
    cpu_ms: float = 0.0  # server CPU (process tree) per request: steadier than req/s on a shared machine
    broker_cpu_ms: float = 0.0  # Kafka broker CPU per request (driftloop's prediction log goes there)


def say(*parts: Any) -> None:
    print(*parts, flush=True)


# --- environment ---------------------------------------------------------------------------------------


def ensure_mlflow_venv() -> Path:
    """MLflow in its own virtualenv (its dependency pins are its own), with our scikit-learn/numpy/pandas."""
    python = MLFLOW_VENV / "bin" / "python"
    if (MLFLOW_VENV / "bin" / "mlflow").exists():
        return python
    say(f"creating {MLFLOW_VENV} with mlflow=={MLFLOW_VERSION} (once)")
    uv = PROJECT_ROOT / ".venv" / "bin" / "uv"
    import pandas

    pins = [
        f"mlflow=={MLFLOW_VERSION}",
        f"scikit-learn=={sklearn.__version__}",
        f"numpy=={np.__version__}",
        f"pandas=={pandas.__version__}",
    ]
    if uv.exists():
        subprocess.run([str(uv), "venv", str(MLFLOW_VENV), "--python", sys.executable], check=True)
        subprocess.run([str(uv), "pip", "install", "--python", str(python), *pins], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", str(MLFLOW_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", *pins], check=True)
    return python


def wait_http(check: Any, proc: subprocess.Popen[bytes], what: str, deadline_s: float = 90) -> None:
    until = time.monotonic() + deadline_s
    while time.monotonic() < until:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} before it was ready")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{what} not ready within {deadline_s}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- CPU accounting ------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and all its descendants."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = _stat(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    total, frontier = 0.0, [root]
    while frontier:
        pid = frontier.pop()
        if pid in stats:
            total += stats[pid][1]
        frontier += [child for child, (parent, _) in stats.items() if parent == pid]
    return total


def broker_pid() -> int | None:
    """The local Kafka broker's process, if it runs on this machine."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"java" in cmd and b"kafka" in cmd.lower():
                return int(entry.name)
    return None


# --- load --------------------------------------------------------------------------------------------------


def wrk(
    url: str, body: Path, *, token: str, duration: float, connections: int, delay_ms: float = 0
) -> Measure:
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_TOKEN": token, "BENCH_DELAY_MS": f"{delay_ms:.3f}"}
    proc = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{round(duration)}s",
            "--timeout",
            "10s",
            "-s",
            str(HERE / "predict.lua"),
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed: {proc.stderr or proc.stdout}")
    out = proc.stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("BENCH_JSON "))
    data = json.loads(line.removeprefix("BENCH_JSON "))
    return Measure(
        server="",
        rows=0,
        load="",
        connections=connections,
        rps=data["requests"] / (data["duration_us"] / 1e6),
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        non2xx=data["non2xx"],
        socket_errors=data["socket_errors"],
    )


def accounted(pid: int, run: Any) -> Measure:
    """Run one wrk measurement and charge the server's (and the broker's) CPU to its requests."""
    broker = broker_pid()
    cpu0, b0 = tree_cpu(pid), (tree_cpu(broker) if broker else 0.0)
    m: Measure = run()
    requests = max(1.0, m.rps * m.duration_s)
    m.cpu_ms = (tree_cpu(pid) - cpu0) * 1000 / requests
    m.broker_cpu_ms = (tree_cpu(broker) - b0) * 1000 / requests if broker else 0.0
    return m


def measure(
    server: str, url: str, bodies: dict[int, Path], *, pid: int, token: str, duration: float, connections: int
) -> list[Measure]:
    """Saturation (closed loop, ``connections``), then half of it (paced), for each payload size."""
    results = []
    for rows, body in bodies.items():
        wrk(url, body, token=token, duration=2, connections=connections)  # warm-up, discarded
        sat = accounted(pid, partial(wrk, url, body, token=token, duration=duration, connections=connections))
        sat.server, sat.rows, sat.load = server, rows, "saturation"
        # Paced: 4 connections, each waiting after its answer so the total is about half the saturated rate.
        pace_conns = 4
        target = sat.rps / 2
        delay_ms = max(0.0, 1000 * pace_conns / target - 1000 / sat.rps)
        paced = partial(
            wrk, url, body, token=token, duration=duration, connections=pace_conns, delay_ms=delay_ms
        )
        half = accounted(pid, paced)
        half.server, half.rows, half.load = server, rows, "half"
        say(
            f"  {server:<22} rows={rows:<3} saturated {sat.rps:8.1f} req/s ({sat.cpu_ms:.2f} CPU ms/req) "
            f"p50 {sat.p50_ms:6.2f} ms "
            f"p99 {sat.p99_ms:6.2f} ms | at {half.rps:7.1f} req/s "
            f"p50 {half.p50_ms:5.2f} ms p99 {half.p99_ms:5.2f} ms"
            + (f" | non-2xx {sat.non2xx + half.non2xx}" if sat.non2xx + half.non2xx else "")
        )
        results += [sat, half]
    return results


# --- servers -----------------------------------------------------------------------------------------------


def run_bare(work: Path, key: str, bodies: dict[int, Path], args: argparse.Namespace) -> list[Measure]:
    env = {**os.environ, "BENCH_ARTIFACTS": str(work / "artifacts"), "BENCH_MODEL_KEY": key}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.serving.bare_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(PORT),
            "--workers",
            "1",
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=(work / "bare.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{PORT}/predict"
    try:
        wait_http(
            lambda: httpx.post(url, content=bodies[1].read_bytes()).status_code == 200, proc, "bare endpoint"
        )
        return measure(
            "bare FastAPI",
            url,
            bodies,
            pid=proc.pid,
            token="",
            duration=args.duration,
            connections=args.connections,
        )
    finally:
        stop(proc)


def run_mlflow(
    work: Path, bodies: dict[int, Path], expected: np.ndarray, args: argparse.Namespace
) -> list[Measure]:
    python = ensure_mlflow_venv()
    model_dir = work / "mlflow-model"
    saved = subprocess.run(
        [str(python), str(HERE / "mlflow_model.py"), str(model_dir), args.model],
        capture_output=True,
        text=True,
        check=False,
    )
    if saved.returncode != 0:
        raise SystemExit(f"saving the model for MLflow failed: {saved.stderr[-2000:]}")
    line = saved.stdout.strip().splitlines()[-1]
    theirs = np.array([float(x) for x in line.split(",")])
    if not np.allclose(theirs, expected, atol=1e-9):
        raise SystemExit("MLflow's copy of the model predicts differently: not the same model")
    env = {
        **os.environ,
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_TRACKING_URI": f"file://{work / 'mlruns'}",
        # --env-manager local runs `uvicorn` from PATH: MLflow's own venv, not ours.
        "PATH": f"{MLFLOW_VENV / 'bin'}:{os.environ.get('PATH', '')}",
    }
    proc = subprocess.Popen(
        [
            str(MLFLOW_VENV / "bin" / "mlflow"),
            "models",
            "serve",
            "-m",
            str(model_dir),
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(PORT),
            "--workers",
            "1",
        ],
        cwd=work,
        env=env,
        stdout=(work / "mlflow.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{PORT}/invocations"
    try:
        wait_http(
            lambda: httpx.get(f"http://127.0.0.1:{PORT}/ping").status_code == 200, proc, "mlflow models serve"
        )
        return measure(
            f"mlflow models serve {MLFLOW_VERSION}",
            url,
            bodies,
            pid=proc.pid,
            token="",
            duration=args.duration,
            connections=args.connections,
        )
    finally:
        stop(proc)


def signature(kind: str) -> ModelSignature:
    numeric, categorical = features(kind)
    return ModelSignature(
        features=[FeatureSpec(name=n, type=FeatureType.NUMERIC) for n in numeric]
        + [
            FeatureSpec(name=n, type=FeatureType.CATEGORICAL, categories=list(levels))
            for n, levels in categorical.items()
        ],
        target="churned",
        task=Task.CLASSIFICATION,
        classes=[0, 1],
    )


async def announce(model: str, ref: ArtifactRef, kind: str) -> None:
    """Publish what the registry and validation would: versions 1 and 2 of the same artifact, both passed.
    Version 1 becomes stable, version 2 a canary at 10% that stays there (its min samples are unreachable)."""
    sha = "0" * 64
    publisher = KafkaPublisher(KafkaSettings(bootstrap=KAFKA))
    await publisher.start()
    try:
        for version in (1, 2):
            registered = ModelVersionRegistered(
                model=model,
                model_version=version,
                run_id="bench",
                job_id="bench",
                artifact=ref,
                profile=ArtifactRef(key=sha, uri="file:///none", format=ArtifactFormat.JSON, size_bytes=0),
                signature=signature(kind),
                metrics={"accuracy": 0.9},
                lineage=Lineage(
                    datasets=[DatasetRef(name="bench", version=1, sha256=sha)],
                    spec_hash=sha,
                    code_version="bench",
                    seed=1,
                ),
            )
            passed = ValidationPassed(
                model=model,
                model_version=version,
                report_id=f"bench-{version}",
                checks=[CheckResult(name="bench", kind=CheckKind.SANITY, passed=True)],
                duration_seconds=0,
            )
            await publisher.publish(new_event(registered, source="/bench"))
            await publisher.publish(new_event(passed, source="/bench"))
    finally:
        await publisher.stop()


async def start_group_at_end(group: str) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from contracts import commands, models, monitoring, validation

    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        described = await admin.describe_topics(
            [models.TOPIC, validation.TOPIC, monitoring.TOPIC, commands.TOPIC]
        )
    finally:
        await admin.close()
    partitions = [TopicPartition(t["topic"], p["partition"]) for t in described for p in t["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.commit(dict((await consumer.end_offsets(partitions)).items()))
    finally:
        await consumer.stop()


def dropped_predictions(base: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("driftloop_serving_prediction_log_dropped_total{")
    )


def run_driftloop(
    work: Path,
    model: str,
    env: dict[str, str],
    bodies: dict[int, Path],
    args: argparse.Namespace,
    *,
    logging_on: bool,
) -> tuple[list[Measure], float]:
    run_env = {**os.environ, **env, "DRIFTLOOP_SERVING_PREDICTION_LOG_ENABLED": str(logging_on).lower()}
    name = "driftloop" + ("" if logging_on else " (log off)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.serving"],
        cwd=PROJECT_ROOT,
        env=run_env,
        stdout=(work / f"driftloop-{'log' if logging_on else 'nolog'}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{PORT}"

    def routed() -> bool:
        r = httpx.get(f"{base}/v1/models/{model}", headers={"Authorization": "Bearer dev-viewer"})
        mine = r.json().get("this_replica") if r.status_code == 200 else None
        return bool(
            mine and mine["stable_version"] == 1 and mine["canary_version"] == 2 and mine["weight"] == 0.1
        )

    try:
        wait_http(routed, proc, name)
        results = measure(
            name,
            f"{base}/v1/models/{model}/predict",
            bodies,
            pid=proc.pid,
            token="dev-predict",
            duration=args.duration,
            connections=args.connections,
        )
        return results, dropped_predictions(base)
    finally:
        stop(proc)


# --- report ----------------------------------------------------------------------------------------------


def pick(results: list[Measure], server: str, rows: int, load: str) -> Measure:
    return next(m for m in results if m.server.startswith(server) and m.rows == rows and m.load == load)


def report(results: list[Measure], dropped: float, work: Path, args: argparse.Namespace) -> None:
    say(
        "\n| server | rows/request | saturated req/s | p50 ms | p99 ms | server CPU ms/req "
        "| broker CPU ms/req "
        "| half-load req/s | p50 ms | p99 ms |"
    )
    say("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    servers = list(dict.fromkeys(m.server for m in results))
    for server in servers:
        for rows in (1, 100):
            s, h = pick(results, server, rows, "saturation"), pick(results, server, rows, "half")
            say(
                f"| {server} | {rows} | {s.rps:.0f} | {s.p50_ms:.2f} | {s.p99_ms:.2f} | {s.cpu_ms:.2f} | "
                f"{s.broker_cpu_ms:.2f} | {h.rps:.0f} | {h.p50_ms:.2f} | {h.p99_ms:.2f} |"
            )
    say("")
    for rows in (1, 100):
        d = pick(results, "driftloop", rows, "saturation")
        parts = [f"rows={rows}:"]
        if any(m.server.startswith("mlflow") for m in results):
            mlf = pick(results, "mlflow", rows, "saturation")
            parts.append(
                f"driftloop/mlflow {d.rps / mlf.rps:.1f}x req/s, "
                f"{mlf.cpu_ms / d.cpu_ms:.1f}x by CPU (target >= 10x)"
            )
        bare = pick(results, "bare", rows, "saturation")
        parts.append(
            f"driftloop/bare {d.rps / bare.rps:.0%} req/s, "
            f"{bare.cpu_ms / d.cpu_ms:.0%} by CPU (target >= 80%)"
        )
        if any(m.server == "driftloop (log off)" for m in results):
            off = pick(results, "driftloop (log off)", rows, "saturation")
            parts.append(
                f"logging cost {1 - d.rps / off.rps:.1%} req/s, {d.cpu_ms / off.cpu_ms - 1:.1%} server CPU, "
                f"+{d.broker_cpu_ms - off.broker_cpu_ms:.2f} broker CPU ms/req (target <= 10%)"
            )
        h = pick(results, "driftloop", rows, "half")
        parts.append(f"p99 at {h.rps:.0f} req/s {h.p99_ms:.2f} ms (target <= 10 ms)")
        say("  ".join(parts))
    bad = sum(m.non2xx + m.socket_errors for m in results)
    say(f"non-2xx or socket errors over all runs: {bad}; prediction-log events dropped: {dropped:.0f}")
    out = work / "results.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "results": [asdict(m) for m in results],
                "dropped": dropped,
                "date": datetime.now(UTC).isoformat(),
            },
            indent=2,
        )
    )
    say(f"results: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=16, help="connections for the saturation runs")
    parser.add_argument(
        "--model", choices=KINDS, default="light", help="which model (see bench/serving/model.py)"
    )
    parser.add_argument("--skip-mlflow", action="store_true", help="leave MLflow out (no virtualenv needed)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk")

    tag = uuid.uuid4().hex[:8]
    work = STATE / "serving" / f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{tag}"
    work.mkdir(parents=True)
    model = build_model(args.model)
    stored = save_model(ArtifactStore(str(work / "artifacts")), model)
    import pandas as pd

    expected = model.predict_proba(pd.DataFrame(records(20, args.model)))[:, 1]
    bodies: dict[int, Path] = {}
    mlflow_bodies: dict[int, Path] = {}
    for rows in (1, 100):
        rs = records(rows, args.model)
        bodies[rows] = work / f"records-{rows}.json"
        bodies[rows].write_bytes(orjson.dumps({"records": rs}))
        mlflow_bodies[rows] = work / f"mlflow-{rows}.json"
        mlflow_bodies[rows].write_bytes(orjson.dumps({"dataframe_records": rs}))
    say(
        f"{args.model} model {stored.sha256[:12]} ({stored.size} bytes), "
        f"{args.duration:.0f}s per measurement, "
        f"{args.connections} connections at saturation, work dir {work}"
    )

    results: list[Measure] = []
    results += run_bare(work, stored.sha256, bodies, args)
    if not args.skip_mlflow:
        results += run_mlflow(work, mlflow_bodies, expected, args)

    bench_model = f"bench-{tag}"
    ref = ArtifactRef(key=stored.sha256, uri=stored.uri, format=ArtifactFormat.SKOPS, size_bytes=stored.size)
    env = {
        "DRIFTLOOP_ARTIFACTS_URL": str(work / "artifacts"),
        "DRIFTLOOP_KAFKA_BOOTSTRAP": KAFKA,
        "DRIFTLOOP_DATABASE_URL": DATABASE,
        "DRIFTLOOP_SERVING_DATABASE_SCHEMA": f"bench_{tag}",
        "DRIFTLOOP_SERVING_CONSUMER_GROUP": f"bench-serving-{tag}",
        "DRIFTLOOP_SERVING_HTTP_PORT": str(PORT),
        "DRIFTLOOP_SERVING_ROLLOUT_MIN_SAMPLES": str(2**31 - 1),
        "DRIFTLOOP_LOG_LEVEL": "WARNING",
        "DRIFTLOOP_ENV": "dev",
    }
    asyncio.run(start_group_at_end(env["DRIFTLOOP_SERVING_CONSUMER_GROUP"]))
    asyncio.run(announce(bench_model, ref, args.model))
    on, dropped = run_driftloop(work, bench_model, env, bodies, args, logging_on=True)
    # The second run restores its routing (stable 1, canary 2 at 10%) from Postgres alone.
    off, _ = run_driftloop(work, bench_model, env, bodies, args, logging_on=False)
    results += on + off
    report(results, dropped, work, args)


if __name__ == "__main__":
    main()
