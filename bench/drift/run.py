"""bench/drift: one window of 100k rows x 30 features against its reference, driftloop vs Evidently.

    .venv/bin/python bench/drift/run.py [--rows 100000] [--repeat 5]

Builds a reference (100k rows: 20 numeric, 10 categorical features) and a current window with a few
shifted features, profiles the reference as training does (libs.profiles), and times driftloop's
judgement of the window (services.monitoring.domain.judge_window, the code the service runs) against
Evidently's DataDriftPreset on the same two frames, run in its own virtualenv under
.driftloop/bench/evidently-venv (created here on first use: evidently==0.7.23, pandas<3). Prints both
times, the ratio, and whether per-feature verdicts agree where both used the same test.
Evidently needs the raw reference; driftloop only its profile, so profiling is reported separately.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from contracts.common import FeatureSpec, FeatureType, ModelSignature, Task  # noqa: E402
from contracts.monitoring import DriftTest  # noqa: E402
from libs.profiles import build_profile  # noqa: E402
from services.monitoring.domain import ClosedWindow, DriftPolicy, ModelReference, judge_window  # noqa: E402

WORK = ROOT / ".driftloop" / "bench" / "drift"
VENV = ROOT / ".driftloop" / "bench" / "evidently-venv"
N_NUMERIC, N_CATEGORICAL = 20, 10
SAME_TEST = {
    "Wasserstein distance (normed)": DriftTest.WASSERSTEIN,
    "Jensen-Shannon distance": DriftTest.JENSEN_SHANNON,
}


def make_data(rows: int, seed: int = 42) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)

    def frame(shifted: bool) -> pd.DataFrame:
        cols: dict[str, Any] = {}
        for i in range(N_NUMERIC):
            shift = {0: 0.5, 1: 0.25, 2: 0.12, 3: 0.05}.get(i, 0.0) if shifted else 0.0
            if i % 4 == 3:
                cols[f"n{i}"] = rng.lognormal(shift, 0.8, rows)
            else:
                cols[f"n{i}"] = rng.normal(10 * i + shift * (i + 1), i + 1, rows)
        for j in range(N_CATEGORICAL):
            levels = [f"c{j}_{k}" for k in range(3 + j)]
            p = np.linspace(1, 2, len(levels))
            if shifted and j < 2:
                p = p[::-1] * (2.0 if j == 0 else 1.1)
            cols[f"c{j}"] = rng.choice(levels, rows, p=p / p.sum())
        return pd.DataFrame(cols)

    return frame(False), frame(True)


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    if python.exists():
        return python
    uv = ROOT / ".venv" / "bin" / "uv"
    subprocess.run([str(uv), "venv", "-p", sys.executable, str(VENV)], check=True)
    subprocess.run(
        [str(uv), "pip", "install", "--python", str(python), "evidently==0.7.23", "pandas<3", "pyarrow"],
        check=True,
    )
    return python


def driftloop_window(current: pd.DataFrame, numeric: list[str], categorical: list[str]) -> ClosedWindow:
    n = len(current)
    return ClosedWindow(
        model="bench",
        version=1,
        seq=1,
        start=0.0,
        end=1.0,
        numeric={c: current[c].to_numpy(dtype=float) for c in numeric},
        categorical={c: current[c].tolist() for c in categorical},
        type_mismatches={},
        prediction=[0] * n,
        score=np.full(n, np.nan),
        prediction_ids=[str(i) for i in range(n)],
        predicted_at=np.zeros(n),
        first_offsets={},
        next_offsets={},
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    reference, current = make_data(args.rows)
    numeric = [f"n{i}" for i in range(N_NUMERIC)]
    categorical = [f"c{j}" for j in range(N_CATEGORICAL)]
    ref_path, cur_path = WORK / "reference.parquet", WORK / "current.parquet"
    reference.to_parquet(ref_path, index=False)
    current.to_parquet(cur_path, index=False)

    began = time.perf_counter()
    profile = build_profile(
        reference, [(c, "numeric") for c in numeric] + [(c, "categorical") for c in categorical]
    )
    profile_s = time.perf_counter() - began
    signature = ModelSignature(
        features=[FeatureSpec(name=c, type=FeatureType.NUMERIC) for c in numeric]
        + [FeatureSpec(name=c, type=FeatureType.CATEGORICAL) for c in categorical],
        target="y",
        task=Task.REGRESSION,
    )
    model = ModelReference.build("bench", 1, signature, {}, profile)
    window = driftloop_window(current, numeric, categorical)
    policy = DriftPolicy()
    times = []
    for _ in range(args.repeat):
        began = time.perf_counter()
        judgement = judge_window(model, window, policy)
        times.append(time.perf_counter() - began)
    ours = float(np.median(times))

    python = ensure_venv()
    out = subprocess.run(
        [
            str(python),
            str(Path(__file__).with_name("evidently_side.py")),
            str(ref_path),
            str(cur_path),
            ",".join(numeric),
            ",".join(categorical),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    theirs = json.loads(out.stdout.strip().splitlines()[-1])

    print(
        f"window: {args.rows} rows x {len(numeric) + len(categorical)} features (reference {args.rows} rows)"
    )
    print(
        f"driftloop judge_window: median {ours * 1000:.1f} ms of {args.repeat} runs "
        f"(min {min(times) * 1000:.1f} ms); profiling the reference once: {profile_s:.2f} s"
    )
    print(f"evidently DataDriftPreset: {theirs['seconds']:.2f} s")
    print(f"ratio: {theirs['seconds'] / ours:.0f}x faster")
    same = agree = 0
    print(f"{'feature':8} {'test':15} {'driftloop':>10} {'evidently':>10}  verdicts")
    for r in judgement.features:
        ev = theirs["columns"][r.name]
        ev_test = SAME_TEST.get(ev["method"])
        ev_drift = ev["value"] >= ev["threshold"]
        if ev_test is r.test:
            same += 1
            agree += ev_drift == r.drifted
        print(
            f"{r.name:8} {r.test.value:15} {r.statistic:10.4f} {ev['value']:10.4f}  "
            f"{'drift' if r.drifted else 'ok':5} / {'drift' if ev_drift else 'ok':5}"
            f"{'' if ev_test is r.test else '  (different test: ' + ev['method'] + ')'}"
        )
    print(f"same test on {same} of {len(judgement.features)} features; verdicts agree on {agree} of {same}")


if __name__ == "__main__":
    main()
