"""Closed-loop latency: from DriftDetected to the retrained candidate serving canary traffic, and to its
promotion, on a whole platform (six service processes on the real broker and Postgres).

One isolated platform (deploy/sandbox.py: its own database, topic prefix, artifacts and ports, from port
18301) runs with the rollout and monitoring settings of `driftloop demo` (deploy/cli.py LOCAL_PROFILE).
Setup: N models share one spec shape (the demo's: logistic regression, 7 features + noise features) and
one base dataset of 50,000 rows x 30 features from the reference world; each is trained, validated and
promoted as version 1. Then, **one model at a time** (the loops are sequenced, never overlapping, so each
number is one loop's latency on an otherwise idle platform), live traffic from the shifted world
(deploy/scenario.py: covariate shift and concept drift) is sent to the model with every label a second
later, and the cascade is followed: the monitoring service detects the drift on that traffic and publishes
DriftDetected; training retrains (base data plus the labelled traffic it exported), the registry
registers the version, validation gates it, serving starts the canary and promotes it step by step. The
loop's traffic stops at the promotion. The model's drift alerts are muted as soon as its loop's drift is
detected: its new version would drift on the same traffic (see :func:`mute_alerts`) and retrain in the
background of the next loops; retrains outside the loops' cascades are counted and printed.

Each stage is timed from DriftDetected's own time (every event's CloudEvents time is set by the service
that made it, on this machine's clock); "canary" is when the traffic generator got the first prediction
answered by the candidate version. Monitoring's labelled-performance alert is turned off for these
models (a per-model policy, performance_tolerance 1), so every loop is started by a DriftDetected, the
path the target names (a PerformanceDegraded would start the very same cascade, usually a little earlier).

Side by side, after the loops: the compute the loop cannot avoid, measured in this process on the same
artifacts: fitting the same spec on the loop's own training set, and validating the candidate against
its champion on the same holdout (what bench/training measures). Loop latency / that compute shows what
the event-driven path adds.

    .venv/bin/python -m bench.loop.run            # --loops 10 --rows 50000 --features 30

It starts the local infrastructure if it is not running (and stops only what it started).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from contracts.common import ArtifactFormat, ArtifactRef
from contracts.envelope import CloudEvent
from contracts.models import ModelVersionRegistered
from contracts.monitoring import DriftDetected
from contracts.rollouts import RolloutPromoted, RolloutRolledBack, RolloutStarted, RolloutStepAdvanced
from contracts.training import TrainingCompleted, TrainingFailed, TrainingRequested, TrainingSkipped
from contracts.validation import ValidationFailed, ValidationPassed
from deploy.cli import LOCAL_PROFILE
from deploy.demo import COOLDOWN_S
from deploy.local.infra import LocalInfra
from deploy.local.settings import PROJECT_ROOT
from deploy.loop import OPERATOR, EventTail, LoopClient, Traffic, poll, spec_yaml
from deploy.sandbox import Sandbox
from deploy.scenario import REFERENCE, SHIFTED, base_features, generate
from libs.artifacts import ArtifactStore
from libs.modelspec import build_pipeline, load_canonical
from services.training.worker import WEIGHT_COLUMN, read_frame, split
from services.validation.adapters.evaluator import StoreEvaluator
from services.validation.domain import judge
from services.validation.ports import Evaluation

PORT_BASE = 18301
TARGET_P50_S = 30.0
TARGET_P95_S = 60.0
# (key, what marks it), in cascade order; every time is seconds after DriftDetected's.
STAGES = (
    ("requested", "TrainingRequested"),
    ("trained", "TrainingCompleted"),
    ("registered", "ModelVersionRegistered"),
    ("validated", "ValidationPassed"),
    ("rollout", "RolloutStarted"),
    ("canary", "first answer by the candidate"),
    ("promoted", "RolloutPromoted"),
)
ENDINGS = (RolloutPromoted, RolloutRolledBack, ValidationFailed, TrainingFailed, TrainingSkipped)


@dataclass
class LoopResult:
    """One loop: when each stage happened after the drift, and what the services reported."""

    model: str
    outcome: str
    cascade: str = ""
    drifted: str = ""
    detect_s: float | None = None
    marks: dict[str, float] = field(default_factory=dict)
    train_run_s: float | None = None
    validation_run_s: float | None = None
    train_rows: int | None = None
    steps: int = 0
    requests: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    completed: TrainingCompleted | None = None
    baseline_fit_s: float | None = None
    baseline_validation_s: float | None = None


def epoch(event: CloudEvent[Any]) -> float:
    return event.time.timestamp()


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank (p95 of 10 values is the largest: no interpolation flatters it)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def mute_alerts(client: LoopClient, model: str, *, drift: bool) -> None:
    """Monitoring policy for a bench model: no labelled-performance alerts; no drift alerts either once
    its loop's drift was detected.

    The retrained version's reference profile is mostly the base data (50,000 base rows against a few
    thousand labelled traffic rows), so on the shifted traffic it drifts too as soon as it has two windows,
    and after its promotion that would start a second retrain in the background of the next loops."""
    body: dict[str, float] = {"performance_tolerance": 1.0}
    if drift:
        body["share_threshold"] = 1.0
    r = await client.http.put(
        client.url("monitoring", f"/v1/models/{model}/policy"), json=body, headers=OPERATOR
    )
    r.raise_for_status()


async def serve_versions_1(
    client: LoopClient, tail: EventTail, models: list[str], *, rows: int, n_noise: int
) -> dict[str, CloudEvent[Any]]:
    """Every model trained on one reference dataset, validated and promoted as version 1."""
    dataset = f"{models[0]}-base"
    for model in models:
        await client.put_spec(
            model, spec_yaml(model, dataset=dataset, n_noise=n_noise, cooldown_s=COOLDOWN_S)
        )
        await mute_alerts(client, model, drift=False)
    frame = generate(rows, REFERENCE, seed=1, n_noise=n_noise)
    await client.upload_dataset(dataset, frame, models)
    promoted = set(models)
    await poll(
        lambda: _ready(promoted <= {e.subject for e in tail.events(RolloutPromoted)}),
        deadline_s=120 + 60 * len(models),
        what="every version 1 promoted",
    )
    return {
        model: next(
            e for e in tail.events(ModelVersionRegistered) if e.subject == model and e.data.model_version == 1
        )
        for model in models
    }


async def past_training_cooldown(tail: EventTail, model: str) -> None:
    """Wait until the spec's retrain cooldown since the model's last training has passed."""
    done = [
        s.seen_at
        for s in tail.seen
        if isinstance(s.event.data, TrainingCompleted) and s.event.subject == model
    ]
    if done:
        await asyncio.sleep(max(0.0, max(done) + COOLDOWN_S + 1 - time.monotonic()))


async def one_loop(
    client: LoopClient, tail: EventTail, model: str, *, args: argparse.Namespace, n_noise: int, seed: int
) -> LoopResult:
    """Shift the model's traffic and follow its cascade from DriftDetected to the end."""
    await past_training_cooldown(tail, model)
    traffic = Traffic(
        client,
        model,
        phase=SHIFTED,
        requests_per_s=args.rate,
        rows_per_request=args.rows_per_request,
        label_delay_s=1.0,
        n_noise=n_noise,
        seed=seed,
    )
    shifted_at = time.time()
    traffic.start()
    try:
        drift = await tail.wait_for(DriftDetected, lambda e: e.subject == model, deadline_s=180)
        await mute_alerts(client, model, drift=True)
        in_cascade: Callable[[CloudEvent[Any]], bool] = lambda e: e.correlationid == drift.correlationid  # noqa: E731
        end = await tail.wait_for(ENDINGS, in_cascade, deadline_s=300)
    finally:
        await traffic.stop()

    d = drift.data
    result = LoopResult(
        model=model,
        outcome=type(end.data).__name__,
        cascade=drift.correlationid,
        drifted=f"{len(d.drifted_features)}/{len(d.features)} ({', '.join(d.drifted_features)})",
        requests=traffic.stats.requests,
        failed=traffic.stats.failed,
        failures=list(traffic.stats.failures),
    )
    t0 = epoch(drift)
    result.detect_s = t0 - shifted_at
    cascade = [s.event for s in tail.seen if in_cascade(s.event)]

    def first(of: type[Any]) -> CloudEvent[Any] | None:
        return next((e for e in cascade if isinstance(e.data, of)), None)

    for key, of in (
        ("requested", TrainingRequested),
        ("trained", TrainingCompleted),
        ("registered", ModelVersionRegistered),
        ("validated", ValidationPassed),
        ("rollout", RolloutStarted),
        ("promoted", RolloutPromoted),
    ):
        found = first(of)
        if found is not None:
            result.marks[key] = epoch(found) - t0
    completed, validated, started = first(TrainingCompleted), first(ValidationPassed), first(RolloutStarted)
    if completed is not None:
        result.completed = completed.data
        result.train_run_s = completed.data.duration_seconds
        result.train_rows = completed.data.train_rows + completed.data.holdout_rows
    if validated is not None:
        result.validation_run_s = validated.data.duration_seconds
    if started is not None:
        answered = traffic.stats.first_answer_at.get(started.data.canary_version)
        if answered is not None:
            result.marks["canary"] = answered - t0
    result.steps = sum(isinstance(e.data, RolloutStepAdvanced) for e in cascade)
    return result


async def pure_compute(artifacts: str, loop: LoopResult, champion: ModelVersionRegistered) -> None:
    """Fit the loop's spec on the loop's training set in this process, and validate the candidate against
    its champion on the same holdout: the work no loop can skip."""
    assert loop.completed is not None
    store = ArtifactStore(artifacts)
    lineage = loop.completed.lineage
    assert lineage.spec is not None and lineage.holdout is not None
    spec = load_canonical(store.get(lineage.spec.key))
    # The first dataset of the lineage is the training set as fitted (base rows plus weighted traffic).
    frame = read_frame(store.get(lineage.datasets[0].sha256), ArtifactFormat.PARQUET)
    train_rows, _ = split(spec, frame)
    fit_params = {}
    if WEIGHT_COLUMN in train_rows:
        fit_params["estimator__sample_weight"] = train_rows[WEIGHT_COLUMN].to_numpy()
    started = time.perf_counter()
    build_pipeline(spec).fit(train_rows[spec.feature_names], train_rows[spec.target], **fit_params)
    loop.baseline_fit_s = time.perf_counter() - started

    holdout = ArtifactRef(key=lineage.holdout.sha256, uri="", format=ArtifactFormat.PARQUET, size_bytes=0)
    started = time.perf_counter()
    measured = await StoreEvaluator(store).measure(
        Evaluation(
            candidate=loop.completed.artifact,
            signature=loop.completed.signature,
            holdout=holdout,
            spec=spec.validation,
            seed=lineage.seed,
            champion=champion.artifact,
            champion_signature=champion.signature,
        )
    )
    judge(
        spec.validation,
        task=loop.completed.signature.task,
        n_classes=len(loop.completed.signature.classes or []) or None,
        measured=measured,
        candidate=loop.completed.signature,
        champion_signature=champion.signature,
        champion_version=champion.model_version,
    )
    loop.baseline_validation_s = time.perf_counter() - started


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(loops: list[LoopResult], extra_retrains: list[str], load_before: str) -> bool:
    """Print the per-loop rows, the percentiles, the targets and the baseline; True when all are met."""
    header = [
        "loop",
        "outcome",
        "shift → drift",
        *[k for k, _ in STAGES],
        "train run",
        "validation run",
        "steps",
        "requests",
    ]
    print(
        "\nSeconds after DriftDetected (each stage's event time; canary = first answer by the candidate; "
        "shift → drift: from the first shifted request to DriftDetected, not part of the target):\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for i, loop in enumerate(loops, 1):
        cells = [
            str(i),
            loop.outcome,
            fmt(loop.detect_s),
            *[fmt(loop.marks.get(k)) for k, _ in STAGES],
            fmt(loop.train_run_s),
            fmt(loop.validation_run_s),
            str(loop.steps),
            str(loop.requests),
        ]
        print("| " + " | ".join(cells) + " |")

    promoted = [lp for lp in loops if "promoted" in lp.marks and "canary" in lp.marks]
    print(f"\n{len(promoted)} of {len(loops)} loops reached promotion.\n")
    print("| stage | p50 (s) | p95 (s) | max (s) | stage alone p50 (s) |")
    print("| --- | --- | --- | --- | --- |")
    previous: str | None = None
    for key, what in STAGES:
        values = [lp.marks[key] for lp in promoted if key in lp.marks]
        if not values:
            continue
        alone = [
            lp.marks[key] - (lp.marks[previous] if previous else 0.0) for lp in promoted if key in lp.marks
        ]
        print(
            f"| → {what} | {nearest_rank(values, 0.5):.1f} | {nearest_rank(values, 0.95):.1f} | "
            f"{max(values):.1f} | {statistics.median(alone):.1f} |"
        )
        previous = key

    ok = len(promoted) == len(loops)
    failed = sum(lp.failed for lp in loops)
    requests = sum(lp.requests for lp in loops)
    if promoted:
        canary = [lp.marks["canary"] for lp in promoted]
        p50, p95 = nearest_rank(canary, 0.5), nearest_rank(canary, 0.95)
        met = p50 <= TARGET_P50_S and p95 <= TARGET_P95_S
        ok = ok and met
        print(
            f"\nTarget DriftDetected → canary: p50 ≤ {TARGET_P50_S:.0f} s, p95 ≤ {TARGET_P95_S:.0f} s; "
            f"measured p50 {p50:.1f} s, p95 {p95:.1f} s: {'MET' if met else 'NOT MET'}"
        )
        promotion = [lp.marks["promoted"] for lp in promoted]
        print(
            f"DriftDetected → promotion: p50 {nearest_rank(promotion, 0.5):.1f} s, "
            f"p95 {nearest_rank(promotion, 0.95):.1f} s (canary → promotion is mostly the bake time, "
            f"{LOCAL_PROFILE['DRIFTLOOP_SERVING_ROLLOUT_BAKE_SECONDS']} s per step)"
        )
    print(
        f"Failed requests: {failed} of {requests} (target 0, during every swap): "
        f"{'MET' if failed == 0 else 'NOT MET'}"
    )
    for lp in loops:
        for why in lp.failures[:5]:
            print(f"  failed request ({lp.model}): {why}")
    ok = ok and failed == 0
    print(
        f"Retrains outside the loops' cascades (would share the machine with a loop): {len(extra_retrains)}"
    )
    for line in extra_retrains:
        print(f"  {line}")

    measured = [
        lp for lp in promoted if lp.baseline_fit_s is not None and lp.baseline_validation_s is not None
    ]
    if measured:
        fit = statistics.median(lp.baseline_fit_s or 0.0 for lp in measured)
        val = statistics.median(lp.baseline_validation_s or 0.0 for lp in measured)
        canary_p50 = nearest_rank([lp.marks["canary"] for lp in measured], 0.5)
        ratios = [
            lp.marks["canary"] / ((lp.baseline_fit_s or 0.0) + (lp.baseline_validation_s or 0.0))
            for lp in measured
        ]
        print(
            f"\nBaseline, in this process on the same artifacts (medians of {len(measured)} loops): "
            f"fit {fit:.2f} s + validation {val:.2f} s = {fit + val:.2f} s"
        )
        print(
            f"Loop latency DriftDetected → canary / that compute: median {statistics.median(ratios):.1f}× "
            f"(p50 latency {canary_p50:.1f} s against {fit + val:.2f} s of compute)"
        )
    print(f"\nload average before {load_before}, after {loadavg()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    for lp in loops:
        print(
            f"  {lp.model}: drifted {lp.drifted}; training set {lp.train_rows} rows (base + labelled traffic)"
        )
    return ok


async def _ready(value: bool) -> bool:
    return value


def loadavg() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


async def run(args: argparse.Namespace, bootstrap: str, server_url: str) -> bool:
    n_noise = args.features - len(base_features(0))
    run_id = secrets.token_hex(3)
    state_dir = PROJECT_ROOT / ".driftloop" / "bench" / "loop" / run_id
    state_dir.mkdir(parents=True, exist_ok=True)
    sandbox = Sandbox(bootstrap, server_url, state_dir, args.port_base, settings=dict(LOCAL_PROFILE))
    print(
        f"bench/loop: {args.loops} loops, base dataset {args.rows:,} rows x {args.features} features, "
        f"traffic {args.rate:g} requests/s x {args.rows_per_request} rows, labels 1 s later"
    )
    print(f"settings (deploy/cli.py LOCAL_PROFILE): {LOCAL_PROFILE}")
    print(f"platform state and logs: {state_dir}")
    started = time.monotonic()
    await sandbox.start()
    print(f"six services ready in {time.monotonic() - started:.1f}s")
    client = LoopClient(sandbox.platform)
    tail = EventTail(bootstrap, prefix=sandbox.prefix)
    await tail.start()
    loops: list[LoopResult] = []
    try:
        models = [f"loop-{run_id}-{i:02d}" for i in range(args.loops)]
        started = time.monotonic()
        champions = await serve_versions_1(client, tail, models, rows=args.rows, n_noise=n_noise)
        setup_s = time.monotonic() - started
        print(f"{len(models)} models trained, validated and promoted as version 1 in {setup_s:.1f}s")
        load_before = loadavg()
        for i, model in enumerate(models):
            loop = await one_loop(client, tail, model, args=args, n_noise=n_noise, seed=10_000 * (i + 1))
            loops.append(loop)
            print(
                f"loop {i + 1}/{len(models)} {model}: {loop.outcome}; canary at "
                f"{fmt(loop.marks.get('canary'))} s, promoted at {fmt(loop.marks.get('promoted'))} s "
                f"after DriftDetected; {loop.failed} failed requests",
                flush=True,
            )
        artifacts = sandbox.env["DRIFTLOOP_ARTIFACTS_URL"]
        for loop in loops:
            if loop.completed is not None and "promoted" in loop.marks:
                await pure_compute(artifacts, loop, champions[loop.model].data)
    finally:
        await tail.stop()
        await client.close()
        sandbox.stop()
    cascades = {lp.cascade for lp in loops}
    extra = [
        f"{e.subject}: {e.data.trigger.value} at {e.time:%H:%M:%S} ({e.data.reason})"
        for e in tail.events(TrainingRequested)
        if e.data.trigger.value != "dataset-registered" and e.correlationid not in cascades
    ]
    ok = report(loops, extra, load_before)
    if ok:  # a failed run keeps its database and topics for a post-mortem
        await sandbox.remove()
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loops", type=int, default=10, help="loops, one model each, run one after another")
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the base dataset")
    parser.add_argument("--features", type=int, default=30, help="features (7 of the scenario plus noise)")
    parser.add_argument("--rate", type=float, default=20.0, help="predict requests per second")
    parser.add_argument("--rows-per-request", type=int, default=25)
    parser.add_argument("--port-base", type=int, default=PORT_BASE)
    args = parser.parse_args()
    lease = LocalInfra().lease("bench/loop/run.py")
    try:
        up = lease.up()
        ok = asyncio.run(run(args, up.kafka_bootstrap, up.database_url))
    finally:
        lease.end(platform=None)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
