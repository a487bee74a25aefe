"""Serving benchmark: driftloop vs `mlflow models serve` vs a bare FastAPI endpoint, in one run.

    .venv/bin/python -m bench.serving.run [--model light|churn] [--rounds 3] [--duration 5] [--connections 16]

Same scikit-learn model (bench/serving/model.py), one worker process each, same rows per request, all on
127.0.0.1, load from wrk (a separate process, one thread). driftloop runs as `python -m services.serving`
with a live canary rollout (10% of traffic) and the prediction log on, answering with the engine it chose
at load (a verified ONNX Runtime copy, or the pipeline: printed at start); a second driftloop replica of
the same deployment with the prediction log off gives the logging cost. All servers are up at once and are
measured in turn, round after round, and the median of the rounds is reported: on a machine shared with
other work this keeps a passing load spike from landing on one server only. Every round starts all servers
anew, in an order rotated by round, so no server is always the first started.

Each round, for 1 row and then 100 rows per request: every server at saturation (closed loop,
--connections) in slices of --slice seconds taken in turn, each pass in another order, --duration seconds
per server in all; then each server at about half of its rate (4 connections pacing themselves). Recorded:
req/s, p50/p99 and the CPU the server's process tree (and the Kafka broker) spent per request, which moves
less than req/s when neighbours compete for the cores.

Needs the local infrastructure (`deploy/local/driftloop infra up`) and wrk (`apt-get install wrk`). MLflow
gets its own virtualenv under .driftloop/bench/mlflow-venv, created on first use. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pandas as pd
import sklearn
from scipy.stats import quantile_test

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
from deploy.local.broker import create_platform_topics, delete_platform_topics
from deploy.local.interrupts import terminations_raise
from libs.artifacts import ArtifactStore, save_model
from libs.bus.kafka import KafkaPublisher
from libs.settings import PROJECT_ROOT, KafkaSettings

HERE = Path(__file__).resolve().parent
STATE = PROJECT_ROOT / ".driftloop" / "bench"
MLFLOW_VENV = STATE / "mlflow-venv"
MLFLOW_VERSION = "3.17.2"
KAFKA = os.environ.get("DRIFTLOOP_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
DATABASE = os.environ.get("DRIFTLOOP_DATABASE_URL", "postgresql://driftloop@127.0.0.1:54329/driftloop")
BASE_PORT = 18431
BARE, MLFLOW, DRIFTLOOP, DRIFTLOOP_INLOOP, DRIFTLOOP_NOLOG = (
    "bare FastAPI",
    f"mlflow {MLFLOW_VERSION}",
    "driftloop",
    "driftloop, log in loop",
    "driftloop, log off",
)
LOG_MODES = {
    DRIFTLOOP: {"DRIFTLOOP_SERVING_PREDICTION_LOG_ENABLED": "true"},
    DRIFTLOOP_INLOOP: {
        "DRIFTLOOP_SERVING_PREDICTION_LOG_ENABLED": "true",
        "DRIFTLOOP_SERVING_PREDICTION_LOG_PROCESS": "false",
    },
    DRIFTLOOP_NOLOG: {"DRIFTLOOP_SERVING_PREDICTION_LOG_ENABLED": "false"},
}


@dataclass
class Measure:
    """One wrk run against one server."""

    server: str
    rows: int
    load: str
    round: int
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    duration_s: float
    cpu_ms: float = 0.0
    main_cpu_ms: float = 0.0
    broker_cpu_ms: float = 0.0
    steal_pct: float = 0.0
    migrations: float = 0.0
    preempted: float = 0.0
    on_cpu: int = -1
    """The CPU the serving process last ran on: it rarely moves (see ``migrations``), so a measurement
    runs mostly on one CPU, and the two CPUs of a shared VM are not always equally fast."""
    drain_s: float = 0.0
    """How long the server's prediction-log producer kept working after its load stopped (see
    :func:`drain`): counted in ``duration_s``, so in ``rps``, as time the load took."""


@dataclass
class Server:
    """A running server under test."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    token: str
    bodies: dict[int, Path]
    extra: dict[str, Any] = field(default_factory=dict)


def say(*parts: Any) -> None:
    print(*parts, flush=True)


# --- processes -----------------------------------------------------------------------------------------


def wait_http(check: Any, proc: subprocess.Popen[bytes], what: str, deadline_s: float = 120) -> None:
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
    """Stop a server and everything it started (each runs in its own session: `mlflow models serve`
    runs its scorer as a child process, which must not outlive the run)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _last_cpu(pid: int) -> int:
    """The CPU a process last ran on, from /proc."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[36])


def _sched(pid: int) -> tuple[int, int]:
    """(migrations to another CPU, involuntary context switches) of a process so far, from /proc."""
    counts = {}
    for line in Path(f"/proc/{pid}/sched").read_text().splitlines():
        name, _, value = line.partition(":")
        counts[name.strip()] = value.strip()
    return int(counts.get("se.nr_migrations", 0)), int(counts.get("nr_involuntary_switches", 0))


def _stats() -> dict[int, tuple[int, float]]:
    """Every process's parent and CPU seconds."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = _stat(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return stats


def _tree(root: int, stats: dict[int, tuple[int, float]]) -> list[int]:
    """A process and all its descendants, of those in ``stats``."""
    tree, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier += [child for child, (parent, _) in stats.items() if parent == pid]
    return tree


def tree_cpu(root: int) -> float:
    """CPU seconds of a process and all its descendants."""
    stats = _stats()
    return sum(stats[pid][1] for pid in _tree(root, stats) if pid in stats)


def machine_steal() -> tuple[int, int]:
    """Jiffies the hypervisor took from this VM's CPUs (steal) and all jiffies, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[7], sum(fields[:8])


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


# --- load ----------------------------------------------------------------------------------------------


def wrk(
    url: str, body: Path, *, token: str, duration: int, connections: int, delay_ms: float = 0
) -> dict[str, Any]:
    env = {**os.environ, "BENCH_BODY": str(body), "BENCH_TOKEN": token, "BENCH_DELAY_MS": f"{delay_ms:.3f}"}
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "-s",
        str(HERE / "predict.lua"),
    ]
    proc = subprocess.run([*cmd, url], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed: {proc.stderr or proc.stdout}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON "))
    data: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
    return data


def one(
    server: Server, rows: int, load: str, rnd: int, *, connections: int, duration: int, delay_ms: float = 0
) -> Measure:
    """One accounted wrk run: rate, latency, and the CPU it cost the server (and the broker)."""
    broker = broker_pid()
    cpu0, b0 = tree_cpu(server.proc.pid), (tree_cpu(broker) if broker else 0.0)
    main0, sched0 = _stat(server.proc.pid)[1], _sched(server.proc.pid)
    steal0, all0 = machine_steal()
    data = wrk(
        server.url,
        server.bodies[rows],
        token=server.token,
        duration=duration,
        connections=connections,
        delay_ms=delay_ms,
    )
    steal1, all1 = machine_steal()
    drain_s = drain(log_producers(server.proc.pid))
    settle(server.proc.pid)
    cpu, b = tree_cpu(server.proc.pid) - cpu0, (tree_cpu(broker) - b0 if broker else 0.0)
    main = _stat(server.proc.pid)[1] - main0
    moved, preempted = (after - before for before, after in zip(sched0, _sched(server.proc.pid), strict=True))
    seconds = data["duration_us"] / 1e6 + drain_s
    requests = max(1, data["requests"])
    return Measure(
        server=server.name,
        rows=rows,
        load=load,
        round=rnd,
        connections=connections,
        rps=data["requests"] / seconds,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        non2xx=data["non2xx"],
        socket_errors=data["socket_errors"],
        duration_s=seconds,
        cpu_ms=cpu * 1000 / requests,
        main_cpu_ms=main * 1000 / requests,
        broker_cpu_ms=b * 1000 / requests,
        steal_pct=100 * (steal1 - steal0) / max(1, all1 - all0),
        migrations=moved * 1000 / requests,
        preempted=preempted * 1000 / requests,
        on_cpu=_last_cpu(server.proc.pid),
        drain_s=drain_s,
    )


def _run_ns(pids: list[int]) -> int:
    """Nanoseconds the threads of these processes have run, from /proc (finer than the CPU ticks)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(task.read_text().split()[0])
    return total


def log_producers(pid: int) -> list[int]:
    """The prediction-log producer processes under a server."""
    found = []
    for child in _tree(pid, _stats()):
        with contextlib.suppress(OSError):
            if b"log_producer" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
    return found


def drain(
    pids: list[int],
    *,
    poll_s: float = 0.005,
    window_s: float = 0.05,
    busy_share: float = 0.5,
    quiet_s: float = 0.15,
    deadline_s: float = 10.0,
) -> float:
    """Seconds these processes kept working after the load stopped: a prediction log's producer finishing the
    backlog it fell behind by. That time is the load's, and ``one`` adds it to the measurement's duration.
    (Only the producer's: a server's own processes answer the requests still in flight when wrk stops, which
    wrk does not count, and the slower the server the longer that takes.) Busy means more than
    ``busy_share`` of a core over the last ``window_s`` (an idle driftloop server does ~1 ms of work every
    100 ms, and now and then ~12 ms at once); the work of a busy window is taken to have run first, at one
    core, so the drain ends where that work would have ended. Until ``quiet_s`` pass without a busy window.
    A producer that keeps up drains in 0 s."""
    start = last_busy = time.monotonic()
    if not pids:
        return 0.0
    samples = collections.deque([(start, _run_ns(pids))])
    while True:
        time.sleep(poll_s)
        now, ran = time.monotonic(), _run_ns(pids)
        samples.append((now, ran))
        while now - samples[1][0] >= window_s:
            samples.popleft()
        since, ran_before = samples[0]
        used = (ran - ran_before) / 1e9
        if used > busy_share * (now - since):
            last_busy = max(last_busy, min(now, since + used))
        if now - last_busy >= quiet_s or now - start >= deadline_s:
            return last_busy - start


def settle(pid: int, *, window_s: float = 0.25, idle_share: float = 0.05, deadline_s: float = 10.0) -> None:
    """Wait until a server's process tree is idle again (under ``idle_share`` of a core over ``window_s``).
    A server that fell behind under load finishes its backlog after the load stops (the prediction log's
    producer: 0.2-0.3 CPU s after a 100-row saturation run, before its socket's buffer was enlarged): that
    work is counted in the measurement's CPU, its time by :func:`drain`, and it no longer runs into the next
    server's measurement."""
    until = time.monotonic() + deadline_s
    last = tree_cpu(pid)
    while time.monotonic() < until:
        time.sleep(window_s)
        now = tree_cpu(pid)
        if now - last < idle_share * window_s:
            return
        last = now


def saturate(servers: list[Server], rows: int, rnd: int, args: argparse.Namespace) -> dict[str, Measure]:
    """Every server of a round at saturation, in slices of ``--slice`` seconds taken in turn (each pass in
    another order), ``--duration`` seconds each in all.

    This host's speed changes for tens of seconds at a time (steal spikes; the CPU per request of one idle-
    started server doubles): a server measured whole, right after another, could get a slow spell the other
    missed, and the ratio of the two took it all. Slices spread each spell over every server."""
    for server in servers:
        wrk(server.url, server.bodies[rows], token=server.token, duration=1, connections=args.connections)
    slices: dict[str, list[Measure]] = {server.name: [] for server in servers}
    for k in range(max(1, math.ceil(args.duration / args.slice))):
        shift = k % len(servers)
        for server in servers[shift:] + servers[:shift]:
            slices[server.name].append(
                one(server, rows, "saturation", rnd, connections=args.connections, duration=args.slice)
            )
    return {name: combined(parts) for name, parts in slices.items()}


def combined(parts: list[Measure]) -> Measure:
    """The slices of one server's measurement as one: rates over the total time, costs per request over all
    requests, the median of the slices' latency percentiles (wrk reports no histogram to merge)."""
    requests = [m.rps * m.duration_s for m in parts]
    total, seconds = sum(requests), sum(m.duration_s for m in parts)

    def per_request(attr: str) -> float:
        return sum(getattr(m, attr) * n for m, n in zip(parts, requests, strict=True)) / max(1.0, total)

    return replace(
        parts[-1],
        rps=total / seconds,
        p50_ms=statistics.median(m.p50_ms for m in parts),
        p99_ms=statistics.median(m.p99_ms for m in parts),
        non2xx=sum(m.non2xx for m in parts),
        socket_errors=sum(m.socket_errors for m in parts),
        duration_s=seconds,
        cpu_ms=per_request("cpu_ms"),
        main_cpu_ms=per_request("main_cpu_ms"),
        broker_cpu_ms=per_request("broker_cpu_ms"),
        migrations=per_request("migrations"),
        preempted=per_request("preempted"),
        steal_pct=sum(m.steal_pct * m.duration_s for m in parts) / seconds,
        drain_s=sum(m.drain_s for m in parts),
    )


def half_load(server: Server, sat: Measure, args: argparse.Namespace) -> list[Measure]:
    """About half of the saturated rate: 4 connections, each pausing after its answer."""
    rows, rnd = sat.rows, sat.round
    pace = 4
    delay_ms = max(0.0, 1000 * pace / (sat.rps / 2) - 1000 / sat.rps)
    half = one(server, rows, "half", rnd, connections=pace, duration=args.duration, delay_ms=delay_ms)
    say(
        f"  round {rnd + 1} {server.name:<18} rows={rows:<3} saturated {sat.rps:7.1f} req/s "
        f"{sat.cpu_ms:5.2f} CPU ms/req ({sat.main_cpu_ms:4.2f} main; per 1,000 requests {sat.migrations:.0f} "
        f"moves, {sat.preempted:.0f} preemptions; on CPU {sat.on_cpu}) p99 {sat.p99_ms:7.2f} ms | "
        f"at {half.rps:6.1f} req/s p50 "
        f"{half.p50_ms:5.2f} ms p99 {half.p99_ms:6.2f} ms | "
        f"steal {sat.steal_pct:.1f}%, {half.steal_pct:.1f}% | "
        f"drained {1000 * sat.drain_s:.0f} ms after {sat.duration_s - sat.drain_s:.1f} s of load"
    )
    return [sat, half]


# --- the servers -----------------------------------------------------------------------------------------


def port_free(port: int) -> None:
    """Refuse a port something else listens on: a leftover server would answer the readiness check and
    be measured instead of ours."""
    import socket

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(f"port {port} is taken by another process: stop it or pass --base-port")


def start_bare(work: Path, key: str, bodies: dict[int, Path], port: int) -> Server:
    env = {**os.environ, "BENCH_ARTIFACTS": str(work / "artifacts"), "BENCH_MODEL_KEY": key}
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.serving.bare_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    out = (work / "bare.log").open("wb")
    proc = subprocess.Popen(
        cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/predict"
    wait_http(lambda: httpx.post(url, content=bodies[1].read_bytes()).status_code == 200, proc, BARE)
    return Server(BARE, proc, url, "", bodies)


def ensure_mlflow_venv() -> Path:
    """MLflow in its own virtualenv, with our scikit-learn, numpy and pandas so the model is the same."""
    python = MLFLOW_VENV / "bin" / "python"
    if (MLFLOW_VENV / "bin" / "mlflow").exists():
        return python
    say(f"creating {MLFLOW_VENV} with mlflow=={MLFLOW_VERSION} (once)")
    pins = [
        f"mlflow=={MLFLOW_VERSION}",
        f"scikit-learn=={sklearn.__version__}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
    ]
    uv = PROJECT_ROOT / ".venv" / "bin" / "uv"
    if uv.exists():
        subprocess.run([str(uv), "venv", str(MLFLOW_VENV), "--python", sys.executable], check=True)
        subprocess.run([str(uv), "pip", "install", "--python", str(python), *pins], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", str(MLFLOW_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", *pins], check=True)
    return python


def start_mlflow(work: Path, kind: str, bodies: dict[int, Path], expected: np.ndarray, port: int) -> Server:
    python = ensure_mlflow_venv()
    model_dir = work / "mlflow-model"
    shutil.rmtree(model_dir, ignore_errors=True)  # saved again each round: MLflow refuses to overwrite
    saved = subprocess.run(
        [str(python), str(HERE / "mlflow_model.py"), str(model_dir), kind],
        capture_output=True,
        text=True,
        check=False,
    )
    if saved.returncode != 0:
        raise SystemExit(f"saving the model for MLflow failed: {saved.stderr[-2000:]}")
    theirs = np.array([float(x) for x in saved.stdout.strip().splitlines()[-1].split(",")])
    if not np.allclose(theirs, expected, atol=1e-9):
        raise SystemExit("MLflow's copy of the model predicts differently: not the same model")
    env = {
        **os.environ,
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_TRACKING_URI": f"file://{work / 'mlruns'}",
        # --env-manager local runs `uvicorn` from PATH: MLflow's own virtualenv, not ours.
        "PATH": f"{MLFLOW_VENV / 'bin'}:{os.environ.get('PATH', '')}",
    }
    cmd = [
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
        str(port),
        "--workers",
        "1",
    ]
    out = (work / "mlflow.log").open("wb")
    proc = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_http(lambda: httpx.get(f"http://127.0.0.1:{port}/ping").status_code == 200, proc, MLFLOW)
    return Server(MLFLOW, proc, f"http://127.0.0.1:{port}/invocations", "", bodies)


def signature(kind: str) -> ModelSignature:
    numeric, categorical = features(kind)
    return ModelSignature(
        features=[FeatureSpec(name=n, type=FeatureType.NUMERIC) for n in numeric]
        + [
            FeatureSpec(name=n, type=FeatureType.CATEGORICAL, categories=list(v))
            for n, v in categorical.items()
        ],
        target="churned",
        task=Task.CLASSIFICATION,
        classes=[0, 1],
    )


async def announce(kafka: KafkaSettings, model: str, ref: ArtifactRef, kind: str) -> None:
    """Publish what the registry and validation would: versions 1 and 2 of the same artifact, both passed.
    Version 1 becomes stable, version 2 a canary at 10% that stays there (its min samples are unreachable)."""
    sha = "0" * 64
    publisher = KafkaPublisher(kafka)
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


async def drop_schema(schema: str) -> None:
    """The benchmark's own serving schema goes when the benchmark is done."""
    import asyncpg

    conn = await asyncpg.connect(DATABASE)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


def start_driftloop(
    work: Path, model: str, env: dict[str, str], bodies: dict[int, Path], port: int, *, name: str
) -> Server:
    run_env = {**os.environ, **env, "DRIFTLOOP_SERVING_HTTP_PORT": str(port), **LOG_MODES[name]}
    out = (work / f"driftloop-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.serving"],
        cwd=PROJECT_ROOT,
        env=run_env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def routed() -> bool:
        r = httpx.get(f"{base}/v1/models/{model}", headers={"Authorization": "Bearer dev-viewer"})
        mine = r.json().get("this_replica") if r.status_code == 200 else None
        return bool(
            mine and mine["stable_version"] == 1 and mine["canary_version"] == 2 and mine["weight"] == 0.1
        )

    wait_http(routed, proc, name)
    meta = httpx.get(f"{base}/v2/models/{model}", headers={"Authorization": "Bearer dev-predict"}).json()
    params = meta.get("parameters", {})
    say(f"{name}: engine {params.get('engine')} {params.get('engine_note') or ''}".rstrip())
    return Server(name, proc, f"{base}/v1/models/{model}/predict", "dev-predict", bodies, {"base": base})


def dropped_predictions(base: str) -> float:
    """Prediction-log items the server dropped, from its /metrics. Until 1d0b703 /metrics answered with a
    redirect that httpx does not follow, and this read an empty page as nothing dropped: a page that is not
    the metrics is an error now."""
    response = httpx.get(f"{base}/metrics")
    response.raise_for_status()
    text = response.text
    if "driftloop_serving_prediction_log_" not in text:
        raise RuntimeError(f"{base}/metrics has no prediction-log series: {text[:200]!r}")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("driftloop_serving_prediction_log_dropped_total{")
    )


def logging_path_cpu_us(
    kafka: KafkaSettings, kind: str, model: str, ref: ArtifactRef, rows: int, n: int = 2000
) -> dict[str, float]:
    """CPU microseconds the prediction log costs per request, measured on its own (steadier than a
    difference of two loaded throughputs): on the event loop (the hand-off to the producer process), in
    the producer process (decoding, encoding, producing; its start-up subtracted), and, for comparison,
    the in-loop log (encoding and producing on the event loop)."""
    from contracts.rollouts import RolloutMode
    from services.serving.adapters.log_producer import ProcessPredictionLog
    from services.serving.adapters.prediction_log import KafkaPredictionLog
    from services.serving.domain import columns_from_records
    from services.serving.routing import ModelRouting, RoutingState, RoutingTable, ServedModel
    from services.serving.scoring import CanaryStats, LogItem, Predictor, PredictRequest
    from services.serving.settings import ServingSettings

    # As the service sends them by default.
    defaults = ServingSettings.model_fields
    sender = {name: defaults[f"prediction_log_{name}"].default for name in ("batch", "linger_ms")}

    items: list[LogItem] = []

    class Capture:
        def offer(self, item: LogItem) -> bool:
            items.append(item)
            return True

    served = ServedModel(model, 1, ref.key, signature(kind), build_model(kind))
    state = RoutingState()
    state.swap(RoutingTable({model: ModelRouting(model, served, None, None, 0.0, RolloutMode.CANARY, 0)}))
    predictor = Predictor(state, Capture(), CanaryStats(0.05, 20), max_rows=10_000)
    rs = records(rows, kind)
    body = orjson.dumps({"records": rs})
    rs = orjson.loads(body)["records"]
    for _ in range(n):
        predictor.predict(
            PredictRequest(
                model,
                rows,
                lambda sig, _: columns_from_records(sig, rs),
                [None] * rows,
                rs,
                body=body,
                body_records=rows,  # as the v1 API says of a strict body holding only records
            )
        )

    def cpu(who: int) -> float:
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    async def in_loop() -> float:
        log = KafkaPredictionLog(kafka, source="/bench", buffer=n + 1, **sender)
        for item in items:
            log.offer(item)
        before = cpu(resource.RUSAGE_SELF)
        task = asyncio.create_task(log.run())
        await log.stop()
        await task
        return (cpu(resource.RUSAGE_SELF) - before) * 1e6 / n

    async def handed_over(batch: list[LogItem], *, offer: bool = True) -> tuple[float, float]:
        log = ProcessPredictionLog(kafka, source="/bench", buffer=n + 1, handoff_bytes=1 << 30, **sender)
        task = asyncio.create_task(log.run())
        await log.connected()
        assert log.process is not None
        # Its start-up (imports) is not part of the per-item cost, and varies by more than the items do.
        children = cpu(resource.RUSAGE_CHILDREN) + _stat(log.process.pid)[1]
        before = cpu(resource.RUSAGE_SELF)
        # Paced, about 2,000 requests/s as under load: the producer's backlog stays as small as it is
        # in service (a burst of thousands of items at once would mostly measure its garbage collector).
        for i in range(0, len(batch), 10):
            for item in batch[i : i + 10] if offer else ():
                log.offer(item)
            await asyncio.sleep(0.005)
        await log.stop()
        await task
        # The loop's share: offering, the batched writes, reading the producer's counts (idle waiting
        # costs no CPU).
        return cpu(resource.RUSAGE_SELF) - before, cpu(resource.RUSAGE_CHILDREN) - children

    async def measure_all() -> dict[str, float]:
        # The same run without items: the pacing loop, the producer's idle wake-ups.
        idle_loop_s, idle_child_s = await handed_over(items, offer=False)
        loop_s, child_s = await handed_over(items)
        return {
            "loop": (loop_s - idle_loop_s) * 1e6 / n,
            "producer": (child_s - idle_child_s) * 1e6 / n,
            "in_loop": await in_loop(),
        }

    return asyncio.run(measure_all())


# --- report ------------------------------------------------------------------------------------------------


def median(results: list[Measure], server: str, rows: int, load: str, attr: str) -> float:
    return statistics.median(
        getattr(m, attr) for m in results if (m.server, m.rows, m.load) == (server, rows, load)
    )


def per_round(results: list[Measure], a: str, b: str, rows: int) -> list[float]:
    """Saturated req/s of ``a`` over ``b``, round by round: the two were measured minutes apart at most,
    which takes out most of the drift of a shared machine's speed that comparing medians leaves in."""
    rps = {(m.server, m.round): m.rps for m in results if (m.rows, m.load) == (rows, "saturation")}
    return [rps[a, r] / rps[b, r] for r in sorted({r for s, r in rps if s == a}) if (b, r) in rps]


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median of ``values`` at ``level`` or more (scipy's order-statistic
    interval of a quantile: from the k-th smallest to the k-th largest value), or None when there are too
    few values for one (fewer than 6 at 95%)."""
    interval = quantile_test(values, q=statistics.median(values), p=0.5).confidence_interval(level)
    low, high = float(interval.low), float(interval.high)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


def judged(name: str, ratios: list[float], *, cost: bool, target: float) -> str:
    """``ratios`` (one per round) against a target, with the interval of their median: met when the whole
    interval is on the right side of the target, missed when the whole of it is on the wrong side, and
    otherwise not established. ``cost`` reads a ratio r as the share lost, 1 - r (the target an upper
    bound); otherwise r is the gain (the target a lower bound)."""
    if not ratios:
        return f"{name}: no paired rounds"

    def show(r: float) -> str:
        return f"{1 - r:.1%}" if cost else f"{r:.1f}x" if r >= 2 else f"{r:.0%}"

    good = (lambda r: 1 - r <= target) if cost else (lambda r: r >= target)
    interval = median_interval(ratios)
    if interval is None:
        verdict = f"not established (an interval needs 6 rounds or more, {len(ratios)} run)"
        span = ""
    else:
        lo, hi = (show(interval[1]), show(interval[0])) if cost else (show(interval[0]), show(interval[1]))
        span = f", 95% interval of the median {lo} to {hi}"
        verdict = (
            "met"
            if all(map(good, interval))
            else "missed"
            if not any(map(good, interval))
            else "not established"
        )
    rounds = ", ".join(show(r) for r in ratios)
    return f"{name} by round: {rounds}; median {show(statistics.median(ratios))}{span}: {verdict}"


def say_verdicts(results: list[Measure], rows: int) -> None:
    """Each target judged on driftloop's ratios to the other server, paired within each round."""
    paired = [("prediction log", DRIFTLOOP_NOLOG, True, 0.10), ("vs bare", BARE, False, 0.80)]
    if any(m.server == MLFLOW for m in results):
        paired.append(("vs MLflow", MLFLOW, False, 10))
    say(f"  rows={rows}, paired within each round:")
    for name, other, cost, target in paired:
        say("    " + judged(name, per_round(results, DRIFTLOOP, other, rows), cost=cost, target=target))


def pooled(paths: list[Path]) -> list[Measure]:
    """The measurements of several runs' results.json as one list, each run's rounds numbered apart, so that
    ratios stay paired within a round of one run."""
    results = []
    for i, path in enumerate(paths):
        for m in json.loads(path.read_text())["results"]:
            results.append(Measure(**{**m, "round": i * 1000 + m["round"]}))
    return results


def report(
    results: list[Measure],
    servers: list[str],
    log_cpu: dict[int, dict[str, float]],
    dropped: float,
    args: argparse.Namespace,
    work: Path,
) -> None:
    say(f"\nmedians of {args.rounds} rounds, {args.model} model, {args.duration} s per measurement\n")
    say(
        "| server | rows/request | saturated req/s | p50 ms | p99 ms | server CPU ms/req | broker CPU ms/req "
        "| at ~half: req/s | p50 ms | p99 ms |"
    )
    say("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for server in servers:
        for rows in (1, 100):

            def sat(a: str, s: str = server, r: int = rows) -> float:
                return median(results, s, r, "saturation", a)

            def half(a: str, s: str = server, r: int = rows) -> float:
                return median(results, s, r, "half", a)

            say(
                f"| {server} | {rows} | {sat('rps'):.0f} | {sat('p50_ms'):.1f} | {sat('p99_ms'):.1f} | "
                f"{sat('cpu_ms'):.2f} | {sat('broker_cpu_ms'):.2f} | {half('rps'):.0f} | "
                f"{half('p50_ms'):.1f} | {half('p99_ms'):.1f} |"
            )
    say("")
    for rows in (1, 100):
        d_rps, d_cpu = (
            median(results, DRIFTLOOP, rows, "saturation", "rps"),
            median(results, DRIFTLOOP, rows, "saturation", "cpu_ms"),
        )
        parts = [f"rows={rows}:"]
        if MLFLOW in servers:
            m_rps, m_cpu = (
                median(results, MLFLOW, rows, "saturation", "rps"),
                median(results, MLFLOW, rows, "saturation", "cpu_ms"),
            )
            parts.append(
                f"vs MLflow {d_rps / m_rps:.1f}x req/s, {m_cpu / d_cpu:.1f}x less CPU/req (target >= 10x);"
            )
        b_rps, b_cpu = (
            median(results, BARE, rows, "saturation", "rps"),
            median(results, BARE, rows, "saturation", "cpu_ms"),
        )
        parts.append(f"vs bare {d_rps / b_rps:.0%} req/s, {b_cpu / d_cpu:.0%} by CPU/req (target >= 80%);")
        off_rps = median(results, DRIFTLOOP_NOLOG, rows, "saturation", "rps")
        off_cpu = median(results, DRIFTLOOP_NOLOG, rows, "saturation", "cpu_ms")
        costs = log_cpu[rows]
        parts.append(
            f"prediction log {1 - d_rps / off_rps:.1%} of req/s (target <= 10%); in process, per request: "
            f"{costs['loop']:.0f} us on the event loop = {costs['loop'] / 1000 / off_cpu:.1%} of a "
            f"request's CPU, {costs['producer']:.0f} us in the producer process (in-loop log: "
            f"{costs['in_loop']:.0f} us);"
        )
        for other in servers:
            if other.startswith("driftloop, ") and other != DRIFTLOOP_NOLOG:
                o_rps = median(results, other, rows, "saturation", "rps")
                o_p99 = median(results, other, rows, "half", "p99_ms")
                parts.append(f"[{other}: log {1 - o_rps / off_rps:.1%} of req/s, p99 at half {o_p99:.1f} ms]")
        parts.append(
            f"p99 at {median(results, DRIFTLOOP, rows, 'half', 'rps'):.0f} req/s: "
            f"{median(results, DRIFTLOOP, rows, 'half', 'p99_ms'):.1f} ms (target <= 10 ms)"
        )
        say(" ".join(parts))
        say_verdicts(results, rows)
    bad = sum(m.non2xx + m.socket_errors for m in results)
    say(
        f"non-2xx or socket errors over all runs: {bad}; "
        f"prediction-log events dropped by driftloop: {dropped:.0f}; CPU time the hypervisor took (steal), "
        f"most in one measurement: {max(m.steal_pct for m in results):.1f}%"
    )
    out = work / "results.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "results": [asdict(m) for m in results],
                "log_cpu_us": log_cpu,
                "dropped": dropped,
                "date": datetime.now(UTC).isoformat(),
            },
            indent=2,
        )
    )
    say(f"raw results: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", choices=KINDS, default="light", help="which model (bench/serving/model.py)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all servers; medians are reported")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument(
        "--slice",
        type=int,
        default=1,
        help="saturation is measured in slices of this many seconds, the servers in turn (--duration: one "
        "slice, each server whole)",
    )
    parser.add_argument("--connections", type=int, default=16, help="connections for the saturation runs")
    parser.add_argument(
        "--base-port", type=int, default=BASE_PORT, help="first of the ports used (5, plus one per --variant)"
    )
    parser.add_argument("--skip-mlflow", action="store_true", help="leave MLflow out (no virtualenv needed)")
    parser.add_argument(
        "--compare-in-loop",
        action="store_true",
        help="also run a replica with the prediction log encoded and produced on its event loop (the design "
        "before the producer process)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:ENV=VALUE[,ENV=VALUE]",
        help="also run a replica (prediction log on) with these settings, for a side-by-side A/B, e.g. "
        "'no batching:DRIFTLOOP_SERVING_PREDICTION_LOG_HANDOFF_FLUSH_MS=0'",
    )
    parser.add_argument(
        "--pool",
        nargs="+",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: judge the targets on the paired rounds of these earlier runs together",
    )
    args = parser.parse_args()
    if args.pool:
        earlier = pooled(args.pool)
        say(f"{len({m.round for m in earlier})} rounds from {len(args.pool)} runs, pooled")
        for rows in (1, 100):
            say_verdicts(earlier, rows)
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk")

    tag = uuid.uuid4().hex[:8]
    work = STATE / "serving" / f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{tag}"
    work.mkdir(parents=True)
    model = build_model(args.model)
    stored = save_model(ArtifactStore(str(work / "artifacts")), model)
    ref = ArtifactRef(key=stored.sha256, uri=stored.uri, format=ArtifactFormat.SKOPS, size_bytes=stored.size)
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
        f"{args.model} model {stored.sha256[:12]}, {args.rounds} rounds of {args.duration} s measurements, "
        f"{args.connections} connections at saturation; work dir {work}"
    )

    bench_model = f"bench-{tag}"
    schema = f"bench_{tag}"
    # Its own topics, deleted at the end: the platform's would keep every logged prediction for a week
    # (about 2 GB a run) and feed them to anything else running on the broker. Being new, they hold only
    # what the bench publishes, which is all the replicas' consumer group reads (from the earliest).
    kafka = KafkaSettings(bootstrap=KAFKA, topic_prefix=f"bench{tag}.")
    env = {
        "DRIFTLOOP_ARTIFACTS_URL": str(work / "artifacts"),
        "DRIFTLOOP_KAFKA_BOOTSTRAP": KAFKA,
        "DRIFTLOOP_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "DRIFTLOOP_DATABASE_URL": DATABASE,
        "DRIFTLOOP_SERVING_DATABASE_SCHEMA": schema,
        "DRIFTLOOP_SERVING_CONSUMER_GROUP": f"bench-serving-{tag}",
        "DRIFTLOOP_SERVING_ROLLOUT_MIN_SAMPLES": str(2**31 - 1),
        "DRIFTLOOP_LOG_LEVEL": "WARNING",
        "DRIFTLOOP_ENV": "dev",
    }
    results: list[Measure] = []
    base_port = args.base_port
    variants: list[str] = []
    for spec in args.variant:
        label, _, assignments = spec.partition(":")
        name = f"driftloop, {label}"
        LOG_MODES[name] = {"DRIFTLOOP_SERVING_PREDICTION_LOG_ENABLED": "true"} | dict(
            a.split("=", 1) for a in assignments.split(",") if a
        )
        variants.append(name)
    for port in range(base_port, base_port + 5 + len(variants)):
        port_free(port)
    # Every server, by name, with how to start it. All are started anew each round, in an order rotated
    # by round, and measured in the order they started: in the earlier design (one start, driftloop
    # always the first replica and always measured right after MLflow or bare) an identical replica
    # started last was 9-50% faster at 100 rows, so no variant may keep a position.
    starters: list[tuple[str, Any]] = [(BARE, lambda: start_bare(work, stored.sha256, bodies, base_port))]
    if not args.skip_mlflow:
        starters.append(
            (MLFLOW, lambda: start_mlflow(work, args.model, mlflow_bodies, expected, base_port + 1))
        )
    replicas = [(DRIFTLOOP, base_port + 2), (DRIFTLOOP_NOLOG, base_port + 3)]
    if args.compare_in_loop:
        replicas.append((DRIFTLOOP_INLOOP, base_port + 4))
    replicas += [(name, base_port + 5 + i) for i, name in enumerate(variants)]
    for name, port in replicas:
        # Replicas of the same deployment: whichever starts first in a round consumes nothing new (the
        # group is at the end after round 0), every one restores the routing (stable 1, canary 2 at
        # 10%) from Postgres.
        starters.append(
            (name, lambda n=name, p=port: start_driftloop(work, bench_model, env, bodies, p, name=n))
        )
    names = [name for name, _ in starters]
    dropped = 0.0
    servers: list[Server] = []
    try:
        create_platform_topics(KAFKA, prefix=kafka.topic_prefix)
        asyncio.run(announce(kafka, bench_model, ref, args.model))
        split = len(starters) - len(replicas)
        fixed, driftloops = starters[:split], starters[split:]
        for rnd in range(args.rounds):
            # The replicas rotate among themselves too: each round another one starts first.
            turn = rnd % len(driftloops)
            everyone = fixed + driftloops[turn:] + driftloops[:turn]
            shift = rnd % len(everyone)
            order = everyone[shift:] + everyone[:shift]
            say(f"round {rnd + 1}: starting {', '.join(name for name, _ in order)}")
            for _, start in order:
                servers.append(start())
            for rows in (1, 100):
                saturated = saturate(servers, rows, rnd, args)
                for server in servers:
                    results += half_load(server, saturated[server.name], args)
            dropped += sum(
                dropped_predictions(s.extra["base"])
                for s in servers
                if s.name.startswith("driftloop") and s.name != DRIFTLOOP_NOLOG
            )
            while servers:
                stop(servers.pop().proc)
        log_cpu = {rows: logging_path_cpu_us(kafka, args.model, bench_model, ref, rows) for rows in (1, 100)}
    finally:
        for server in servers:
            stop(server.proc)
        asyncio.run(drop_schema(schema))
        delete_platform_topics(KAFKA, prefix=kafka.topic_prefix)
    report(results, names, log_cpu, dropped, args, work)


if __name__ == "__main__":
    with terminations_raise():  # a SIGTERM stops the servers it started too, as Ctrl-C does
        main()
