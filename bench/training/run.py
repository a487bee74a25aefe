"""Training overhead and validation time on 50,000 rows x 30 features.

Side by side in one run, on the same generated data (numpy, seeded) and the same spec:

- direct: the spec's scikit-learn Pipeline (``libs.modelspec.build_pipeline``) fitted in this process on
  the same training rows the service fits on: scikit-learn's own cost, the baseline;
- service: the service's job path, ``ProcessPoolTrainer.train`` on a warm pool, which is what the job
  runner awaits: read the Parquet base data from the artifact store and verify its hash, build the
  training set, split, fit, evaluate on the holdout, profile, and store model, profile, training set and
  holdout (plus the inter-process hop). Postgres and Kafka are left out: a job's three small transactions
  cost milliseconds. The service's "fit" phase is ``Pipeline.fit`` alone (building the pipeline and
  selecting the feature columns, as the direct side does too); everything else, the split included, is
  work around the fit. With the service's default ``overlap_fit``, part of that work runs on a second
  thread during the fit: what it costs the fit shows as the fit phase against the direct fit (printed),
  and "service - direct, paired by run" counts it whole;
- validation: ``StoreEvaluator.measure`` plus ``domain.judge`` for a candidate against a champion on the
  candidate's 10,000-row holdout (500 paired bootstrap resamples, slices, 7 latency runs), as the
  validation service runs it.

    .venv/bin/python bench/training/run.py                    # --rows 50000 --repeat 3
    .venv/bin/python bench/training/run.py --repeat 7 --compare-stepwise   # also overlap_fit off
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
# One thread for every fit, here and in the fit process (which inherits the environment): on a shared
# 2-core machine, OpenMP threads fighting the neighbours make single runs vary by 3x; set --threads to
# measure with more.
THREADS = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), "1")
os.environ["OMP_NUM_THREADS"] = THREADS

from contracts.common import ArtifactRef, ModelSignature  # noqa: E402
from libs.artifacts import ArtifactStore  # noqa: E402
from libs.modelspec import ModelSpec, build_pipeline, spec_from_data  # noqa: E402
from services.training.adapters.pool import ProcessPoolTrainer  # noqa: E402
from services.training.settings import TrainingSettings  # noqa: E402
from services.training.worker import split  # noqa: E402
from services.validation.adapters.evaluator import StoreEvaluator  # noqa: E402
from services.validation.domain import judge  # noqa: E402
from services.validation.ports import Evaluation  # noqa: E402


def frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """28 numeric and 2 categorical features; a binary target from a few of them plus noise."""
    rng = np.random.default_rng(seed)
    data = {f"n{i:02d}": rng.normal(0, 1, rows) for i in range(28)}
    data["region"] = rng.choice(["north", "south", "east", "west"], rows)
    data["plan"] = rng.choice(["basic", "plus", "premium"], rows, p=[0.5, 0.3, 0.2])
    out = pd.DataFrame(data)
    logit = out["n00"] - 0.8 * out["n01"] + 0.5 * out["n02"] * out["n03"] + 0.6 * (out["plan"] == "premium")
    out["churned"] = (logit + rng.logistic(0, 1, rows) > 0).astype("int64")
    return out


def spec(name: str, estimator: str, params: dict[str, Any]) -> ModelSpec:
    features = [{"name": f"n{i:02d}", "type": "numeric"} for i in range(28)]
    features += [{"name": "region", "type": "categorical"}, {"name": "plan", "type": "categorical"}]
    return spec_from_data(
        {
            "name": name,
            "features": features,
            "target": "churned",
            "task": "classification",
            "estimator": estimator,
            "params": params,
            "seed": 11,
            "base_datasets": ["bench-base"],
            "retrain": {"training_set": {"min_rows": 50}},
            "validation": {
                "thresholds": {"roc_auc": 0.7},
                "slices": {"feature": "plan", "min_rows": 100},
                "latency_budget_ms_per_row": 1.0,
            },
        }
    )


def median_seconds(samples: list[float]) -> str:
    return f"{statistics.median(samples):.3f} s (min {min(samples):.3f})"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--estimator", default="hist_gradient_boosting")
    parser.add_argument(
        "--params", default="{}", help="estimator parameters as JSON, e.g. '{\"max_iter\": 300}'"
    )
    parser.add_argument("--threads", default="1", help="OpenMP threads per fit (pass as --threads=N)")
    parser.add_argument(
        "--compare-stepwise",
        action="store_true",
        help="also run the service with overlap_fit off (every step after the other), interleaved",
    )
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="driftloop-bench-training-")
    store = ArtifactStore(folder)
    data = frame(args.rows)
    buffer = io.BytesIO()
    data.to_parquet(buffer, index=False)
    base = store.put(buffer.getvalue())
    model_spec = spec("bench", args.estimator, json.loads(args.params))
    spec_key = store.put(model_spec.canonical_json()).sha256
    job = {
        "job_id": "bench",
        "model": "bench",
        "spec_key": spec_key,
        "datasets": [{"name": "bench-base", "version": 1, "sha256": base.sha256, "format": "parquet"}],
        "artifacts_url": folder,
    }
    train_rows, _ = split(model_spec, data)
    features = model_spec.feature_names
    print(
        f"{args.rows:,} rows x {len(features)} features, {args.estimator} {args.params}, "
        f"{args.repeat} runs each, OMP_NUM_THREADS={THREADS}"
    )

    # The service's own default (TrainingSettings.overlap_fit), as bootstrap passes it.
    overlap = bool(TrainingSettings.model_fields["overlap_fit"].default)
    trainer = ProcessPoolTrainer("forkserver", overlap=overlap)
    await trainer.warm_up()
    stepwise_trainer = ProcessPoolTrainer("forkserver", overlap=False) if args.compare_stepwise else None
    if stepwise_trainer is not None:
        await stepwise_trainer.warm_up()

    async def no_progress(phase: str, fraction: float | None) -> None:
        return None

    direct: list[float] = []
    service: list[float] = []
    around: list[float] = []  # each service run's wall time minus its own fit: the service's extra work
    result: dict[str, Any] = {}
    phase_runs: list[dict[str, float]] = []
    stepwise: list[float] = []
    stepwise_around: list[float] = []
    stepwise_phases: list[dict[str, float]] = []
    for _ in range(args.repeat):  # interleaved, so a busy neighbour hurts both sides alike
        started = time.perf_counter()
        build_pipeline(model_spec).fit(train_rows[features], train_rows["churned"])
        direct.append(time.perf_counter() - started)
        started = time.perf_counter()
        result = await trainer.train(job, no_progress)
        service.append(time.perf_counter() - started)
        assert result["ok"], result
        around.append(service[-1] - result["seconds"]["fit"])
        phase_runs.append(result["seconds"])
        if stepwise_trainer is not None:
            started = time.perf_counter()
            other = await stepwise_trainer.train(job, no_progress)
            stepwise.append(time.perf_counter() - started)
            assert other["ok"], other
            assert other["metrics"] == result["metrics"], (other["metrics"], result["metrics"])
            stepwise_around.append(stepwise[-1] - other["seconds"]["fit"])
            stepwise_phases.append(other["seconds"])
    trainer.close()
    if stepwise_trainer is not None:
        stepwise_trainer.close()
    ratio = statistics.median(service) / statistics.median(direct)
    best = min(service) / min(direct)
    share = statistics.median(around) / statistics.median(direct)
    phases = ", ".join(
        f"{k} {statistics.median(run[k] for run in phase_runs):.3f}" for k in result["seconds"]
    )
    extra = statistics.median(service) - statistics.median(direct)
    print(f"direct Pipeline.fit      {median_seconds(direct)}")
    print(f"service job path         {median_seconds(service)} (overlap_fit={overlap})")
    print(f"  phases, median of runs  {phases} (s; beside: busy time of the second thread, overlapped)")
    fits = [run["fit"] for run in phase_runs]
    print(
        f"  its fit phase          {median_seconds(fits)} = "
        f"{statistics.median(fits) / statistics.median(direct):.3f} x the direct fit"
        " (work beside the fit that slowed it would show here, not in the work around it)"
    )
    print(
        f"ratio service / direct   median {ratio:.3f} ({100 * (ratio - 1):+.1f}%), "
        f"best {best:.3f} ({100 * (best - 1):+.1f}%)"
    )
    print(f"  overhead {extra:+.3f} s (medians); target: overhead <= +10%")
    print(
        f"work around the fit      {median_seconds(around)} = {100 * share:.1f}% of the direct fit "
        "(each run's wall time minus its own fit phase: robust to a noisy neighbour)"
    )
    paired = [s - d for s, d in zip(service, direct, strict=True)]
    print(
        f"  service - direct, paired by run  {median_seconds(paired)} = "
        f"{100 * statistics.median(paired) / statistics.median(direct):.1f}% of the direct fit"
    )
    if stepwise:
        steps = ", ".join(
            f"{k} {statistics.median(run[k] for run in stepwise_phases):.3f}" for k in stepwise_phases[0]
        )
        stepwise_fits = [run["fit"] for run in stepwise_phases]
        print(f"stepwise (overlap_fit=False) job path  {median_seconds(stepwise)}")
        print(f"  phases, median of runs  {steps} (s)")
        print(
            f"  its fit phase          {median_seconds(stepwise_fits)} = "
            f"{statistics.median(stepwise_fits) / statistics.median(direct):.3f} x the direct fit"
        )
        print(
            f"  work around the fit    {median_seconds(stepwise_around)} = "
            f"{100 * statistics.median(stepwise_around) / statistics.median(direct):.1f}% of the direct fit"
        )

    # Validation: the candidate above against a champion trained on other rows with another estimator.
    champion_spec = spec("bench", "logistic_regression", {"max_iter": 200})
    champion_job = {
        **job,
        "job_id": "bench-champion",
        "spec_key": store.put(champion_spec.canonical_json()).sha256,
    }
    trainer = ProcessPoolTrainer("forkserver")
    champion = await trainer.train(champion_job, no_progress)
    trainer.close()
    holdout = ArtifactRef.model_validate(result["holdout"]["artifact"])
    signature = ModelSignature.model_validate(result["signature"])
    evaluator = StoreEvaluator(store)
    timings = []
    checks: list[Any] = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        measured = await evaluator.measure(
            Evaluation(
                candidate=ArtifactRef.model_validate(result["artifact"]),
                signature=signature,
                holdout=holdout,
                spec=model_spec.validation,
                seed=11,
                champion=ArtifactRef.model_validate(champion["artifact"]),
                champion_signature=ModelSignature.model_validate(champion["signature"]),
            )
        )
        checks = judge(
            model_spec.validation,
            task=signature.task,
            n_classes=2,
            measured=measured,
            candidate=signature,
            champion_signature=ModelSignature.model_validate(champion["signature"]),
            champion_version=1,
        )
        timings.append(time.perf_counter() - started)
    print(
        f"validation ({result['holdout']['rows']:,} holdout rows, {len(checks)} checks, "
        f"{model_spec.validation.champion.resamples} resamples)  {median_seconds(timings)}"
    )
    for check in checks:
        print(f"  {'pass' if check.passed else 'FAIL'}  {check.name:36s} {check.detail}")


if __name__ == "__main__":
    asyncio.run(main())
