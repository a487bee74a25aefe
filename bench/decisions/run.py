"""Error rates of the platform's automatic decisions, each rule as it is now beside the rule before, on the
same simulated draws.

The documented rates of these decisions come from here (docs/monitoring.md, docs/serving.md,
docs/benchmarks.md "Decision error rates"). "now" calls the repository's own code; "before" is the rule it
replaced (2026-12-02), written out below:

- canary-accuracy: ``judge_canary``'s accuracy comparison (the margin as the null) against the pooled
  two-proportion z-test of "worse at all" with the measured gap checked after;
- canary-mae: its MAE comparison (Welch, stable's MAE times 1 + margin as the null) against the Welch test of
  "worse at all" with the measured ratio checked after;
- divergence: its prediction divergence (the limit counted from the sampling floor) against the fixed limit;
- drift-js: ``judge_feature``'s Jensen–Shannon verdict (the threshold counted from the sampling floor)
  against the distance reaching the fixed threshold;
- drift-chi2: ``judge_feature``'s chi-square p-value (Monte Carlo on a sparse table) against the asymptotic
  one, in a family of 7 (Bonferroni: drift at p < 0.05/7);
- error-rate: serving's ``error_rate_breached`` at each canary failure (an exact binomial test) against the
  measured share over the threshold.

Each case draws its own seeded stream, so a case gives the same numbers alone or in ``all``. The default
draws keep ``all`` to a few minutes on 2 cores; the documented numbers name the draws they used.

    .venv/bin/python -m bench.decisions.run                      # all cases, default draws
    .venv/bin/python -m bench.decisions.run drift-chi2 --draws 2000 --seed 0
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from scipy import stats as sps

from contracts.common import FeatureType, Task
from services.monitoring.domain import (
    CanaryComparison,
    CanaryPolicy,
    CanaryStep,
    DriftPolicy,
    FeatureReference,
    LabelledComparison,
    judge_canary,
    judge_feature,
)
from services.serving.domain import error_rate_breached
from services.serving.settings import ServingSettings


@dataclass(frozen=True)
class Rate:
    """The share of draws in which a decision fired, by the rule before and the rule now."""

    case: str
    condition: str
    before: float
    now: float
    draws: int
    note: str = ""


CANARY = CanaryPolicy()
DRIFT = DriftPolicy()
REFERENCE_ROWS = 16_000  # a reference profile's rows, as the demo's training set
FAMILY = 7  # the demo's features: a feature's p-value is corrected among 7


# --- canary: labelled comparisons --------------------------------------------------------------------------


def _quiet_step(rows: int = 4) -> CanaryStep:
    """A step whose latencies and predictions are alike on both sides: only labelled outcomes differ."""
    step = CanaryStep(
        rollout_id="bench",
        model="m",
        stable_version=1,
        canary_version=2,
        step_index=0,
        started_at=0.0,
        min_samples=1,
        bake_seconds=0.0,
    )
    for side in (step.canary, step.stable):
        side.add(np.zeros(rows), np.full(rows, 0.5), [1] * rows, np.ones(rows), most=50_000)
    return step


def _evidence(
    step: CanaryStep, task: Task, labelled: LabelledComparison, name: str, edges: np.ndarray | None = None
) -> CanaryComparison:
    decision = judge_canary(step, task=task, labelled=labelled, policy=CANARY, score_edges=edges)
    return next(e for e in decision.evidence if e.name == name)


def accuracy_before(s_correct: int, s_n: int, c_correct: int, c_n: int) -> bool:
    """Until 2026-12-02: pooled z-test of 'canary less accurate at all', and the gap over the margin."""
    ps, pc = s_correct / s_n, c_correct / c_n
    pooled = (s_correct + c_correct) / (s_n + c_n)
    se = math.sqrt(pooled * (1 - pooled) * (1 / s_n + 1 / c_n))
    p = float(sps.norm.sf((ps - pc) / se)) if se > 0 else (1.0 if pc >= ps else 0.0)
    return p < CANARY.alpha and ps - pc > CANARY.margin


def canary_accuracy(rng: np.random.Generator, draws: int) -> list[Rate]:
    """A candidate 0 to 0.06 less accurate than stable (0.76), 2,300 labelled rows a side: steps failed."""
    step, n, stable = _quiet_step(), 2_300, 0.76
    out = []
    for gap in (0.0, 0.01, 0.02, 0.04, 0.06):
        before = now = 0
        for _ in range(draws):
            s, c = int(rng.binomial(n, stable)), int(rng.binomial(n, stable - gap))
            labelled = LabelledComparison(stable_correct=s, stable_n=n, canary_correct=c, canary_n=n)
            before += accuracy_before(s, n, c, n)
            now += _evidence(step, Task.CLASSIFICATION, labelled, "accuracy").passed is False
        out.append(
            Rate(
                "canary-accuracy",
                f"{gap:.2f} less accurate, {n:,} rows a side",
                before / draws,
                now / draws,
                draws,
            )
        )
    return out


def mae_before(stable_errors: np.ndarray, canary_errors: np.ndarray) -> bool:
    """Until 2026-12-02: Welch test of 'canary MAE higher at all', and the measured MAE over the margin."""
    p = float(sps.ttest_ind(canary_errors, stable_errors, equal_var=False, alternative="greater").pvalue)
    return p < CANARY.alpha and canary_errors.mean() > stable_errors.mean() * (1 + CANARY.margin)


def canary_mae(rng: np.random.Generator, draws: int) -> list[Rate]:
    """A candidate whose absolute errors (lognormal, sigma 1) are 0 to 10% larger, 2,300 rows a side."""
    step, n = _quiet_step(), 2_300
    out = []
    for worse in (0.0, 0.01, 0.02, 0.05, 0.10):
        before = now = 0
        for _ in range(draws):
            se, ce = rng.lognormal(0.0, 1.0, n), rng.lognormal(0.0, 1.0, n) * (1 + worse)
            labelled = LabelledComparison(stable_n=n, canary_n=n, stable_abs_errors=se, canary_abs_errors=ce)
            before += mae_before(se, ce)
            now += _evidence(step, Task.REGRESSION, labelled, "mae").passed is False
        out.append(
            Rate(
                "canary-mae", f"MAE {worse:.0%} higher, {n:,} rows a side", before / draws, now / draws, draws
            )
        )
    return out


# --- canary: prediction divergence -------------------------------------------------------------------------


def _scored_step(
    canary: np.ndarray, stable: np.ndarray, predictions: tuple[list[int], list[int]] | None
) -> CanaryStep:
    step = _quiet_step(rows=0)
    for side, scores, classes in (
        (step.canary, canary, predictions and predictions[0]),
        (step.stable, stable, predictions and predictions[1]),
    ):
        n = scores.size
        side.add(np.zeros(n), scores, classes or [1] * n, np.ones(n), most=50_000)
    return step


def divergence(rng: np.random.Generator, draws: int) -> list[Rate]:
    """Scores of an equal canary (Beta(2, 5), 10 profile decile bins) or one leaning the other way (Beta(5,
    2)); K equally likely classes: steps failing the prediction divergence."""
    edges = np.quantile(rng.beta(2, 5, 20_000), np.linspace(0, 1, 11)[1:-1])

    def rates(make: Callable[[], CanaryStep]) -> tuple[float, float]:
        before = now = 0
        for _ in range(draws):
            e = _evidence(make(), Task.CLASSIFICATION, LabelledComparison(), "prediction_divergence", edges)
            before += (e.canary_value or 0.0) > CANARY.divergence_threshold
            now += e.passed is False
        return before / draws, now / draws

    out = []
    for nc, ns in ((20, 180), (50, 450), (200, 1_800)):

        def equal(nc: int = nc, ns: int = ns) -> CanaryStep:
            return _scored_step(rng.beta(2, 5, nc), rng.beta(2, 5, ns), None)

        def shifted(nc: int = nc, ns: int = ns) -> CanaryStep:
            return _scored_step(rng.beta(5, 2, nc), rng.beta(2, 5, ns), None)

        b, a = rates(equal)
        out.append(Rate("divergence", f"equal scores, {nc}/{ns} predictions", b, a, draws))
        b, a = rates(shifted)
        out.append(Rate("divergence", f"Beta(5,2) canary scores, {nc}/{ns}", b, a, draws))
    for k in (10, 50):
        nc, ns = 50, 450

        def classes(nc: int = nc, ns: int = ns, k: int = k) -> CanaryStep:
            c, s = rng.integers(0, k, nc).tolist(), rng.integers(0, k, ns).tolist()
            return _scored_step(np.full(nc, np.nan), np.full(ns, np.nan), (c, s))

        b, a = rates(classes)
        out.append(Rate("divergence", f"equal classes, K={k}, {nc}/{ns}", b, a, draws))
    return out


# --- drift: categorical features ---------------------------------------------------------------------------


def _shares(k: int, shape: str) -> np.ndarray:
    p = np.ones(k) if shape == "uniform" else 1.0 / np.arange(1, k + 1)
    return p / p.sum()


def _reference(rng: np.random.Generator, p: np.ndarray) -> tuple[FeatureReference, np.ndarray]:
    """A profile of 16,000 rows drawn from the shares ``p`` (it lists the levels its rows had), and its counts
    over every level plus one brand-new (0 where the rows lacked it)."""
    counts = rng.multinomial(REFERENCE_ROWS, p).astype(float)
    kept = counts > 0
    ref = FeatureReference(
        name="f",
        kind=FeatureType.CATEGORICAL,
        count=REFERENCE_ROWS,
        missing=0,
        categories=[f"c{i:04d}" for i in np.flatnonzero(kept)],
        category_counts=counts[kept],
    )
    return ref, np.append(counts, 0.0)


def _window(
    rng: np.random.Generator, p: np.ndarray, n: int, new_share: float = 0.0, moved: float = 0.0
) -> np.ndarray:
    """A window's counts over every level plus the brand-new one: ``new_share`` of rows of a new level,
    ``moved`` of the rest drawn from the shares in reverse order."""
    new = int(rng.binomial(n, new_share))
    k = int(rng.binomial(n - new, moved))
    return np.append(rng.multinomial(n - new - k, p) + rng.multinomial(k, p[::-1]), new)


def _values(counts: np.ndarray) -> list[str]:
    levels = [f"c{i:04d}" for i in range(counts.size - 1)] + ["brand-new"]
    return np.repeat(np.array(levels), counts.astype(int)).tolist()


SHIFTS: dict[str, dict[str, float]] = {
    "unshifted": {},
    "new level 5%": {"new_share": 0.05},
    "new level 15%": {"new_share": 0.15},
    "30% moved": {"moved": 0.3},
}


def drift_js(rng: np.random.Generator, draws: int) -> list[Rate]:
    """A categorical feature of K levels judged by Jensen–Shannon (windows of over 1,000 rows): drifted."""
    out = []
    cases = (
        (4, "zipf", 1_001, ("unshifted", "new level 15%", "30% moved")),
        (4, "zipf", 5_000, ("unshifted", "30% moved")),
        (100, "zipf", 1_001, ("unshifted", "new level 15%", "30% moved")),
        (300, "uniform", 2_000, ("unshifted",)),
        (300, "zipf", 2_000, ("unshifted", "new level 15%", "30% moved")),
        (300, "uniform", 5_000, ("unshifted",)),
        (300, "zipf", 5_000, ("unshifted",)),
        (1_000, "uniform", 1_001, ("unshifted",)),
        (1_000, "zipf", 1_001, ("unshifted", "new level 15%", "30% moved")),
        (1_000, "uniform", 2_000, ("unshifted",)),
        (1_000, "zipf", 2_000, ("unshifted",)),
    )
    for k, shape, n, shifts in cases:
        p = _shares(k, shape)
        ref, _ = _reference(rng, p)
        for shift in shifts:
            before = now = 0
            for _ in range(draws):
                r = judge_feature(ref, _values(_window(rng, p, n, **SHIFTS[shift])), DRIFT)
                assert r.test.value == "jensen_shannon"
                before += r.statistic >= DRIFT.jensen_shannon_threshold
                now += r.drifted
            out.append(
                Rate(
                    "drift-js",
                    f"{k:,} levels ({shape}), {n:,} rows, {shift}",
                    before / draws,
                    now / draws,
                    draws,
                )
            )
    return out


def chi_square_before(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    """Until 2026-12-02: the asymptotic p-value of the 2 x K table, however sparse."""
    table = np.vstack([ref_counts, cur_counts])
    table = table[:, table.sum(axis=0) > 0]
    return float(sps.chi2_contingency(table, correction=False).pvalue)


def drift_chi2(rng: np.random.Generator, draws: int) -> list[Rate]:
    """A categorical feature of K Zipf levels judged by chi-square in a family of 7 (drift at p < 0.05/7):
    windows drifted; shifted windows a quarter of the draws. The note: windows that drew tables."""
    bar = DRIFT.alpha / FAMILY
    out = []
    cases = [(30, 100)] + [(k, n) for k in (300, 1_000) for n in (100, 300, 1_000)]
    for k, n in cases:
        p = _shares(k, "zipf")
        ref, ref_counts = _reference(rng, p)
        for shift, kw in SHIFTS.items():
            windows = draws if shift == "unshifted" else max(1, draws // 4)
            before = now = drew = 0
            for _ in range(windows):
                counts = _window(rng, p, n, **kw)
                r = judge_feature(ref, _values(counts), DRIFT, family=FAMILY)
                assert r.test.value == "chi2" and r.p_value is not None
                before += chi_square_before(ref_counts, counts.astype(float)) < bar
                now += r.p_value < bar
                drew += r.p_draws is not None
            note = f"tables drawn in {drew / windows:.0%}" if shift == "unshifted" else ""
            out.append(
                Rate(
                    "drift-chi2",
                    f"{k:,} levels, {n:,} rows, {shift}",
                    before / windows,
                    now / windows,
                    windows,
                    note,
                )
            )
    return out


# --- serving: the canary's error rate ----------------------------------------------------------------------


def error_rate(rng: np.random.Generator, draws: int) -> list[Rate]:
    """A canary failing a share of its requests, judged after each failure over a step of 100 or 1,000
    requests: steps rolled back; and of 2,000 requests, the median request at which a bad one is caught."""
    fields = ServingSettings.model_fields
    threshold = float(fields["error_rate_threshold"].default)
    least = int(fields["error_rate_min_requests"].default)
    alpha = float(fields["error_rate_alpha"].default)
    rules: dict[str, Callable[[int, int], bool]] = {
        "before": lambda requests, errors: requests >= least and errors > threshold * requests,
        "now": lambda requests, errors: error_rate_breached(
            requests, errors, threshold=threshold, min_requests=least, alpha=alpha
        ),
    }

    def caught(fails: np.ndarray, rule: Callable[[int, int], bool]) -> int | None:
        for errors, request in enumerate(fails.tolist(), 1):
            if rule(request, errors):
                return int(request)
        return None

    out = []
    for share in (0.0, 0.01, 0.02, 0.03, 0.05):
        for n in (100, 1_000):
            hits = {name: 0 for name in rules}
            for _ in range(draws):
                fails = np.flatnonzero(rng.random(n) < share) + 1  # the requests that failed, 1-based
                for name, rule in rules.items():
                    hits[name] += caught(fails, rule) is not None
            out.append(
                Rate(
                    "error-rate",
                    f"failing {share:.0%}, {n:,} requests",
                    hits["before"] / draws,
                    hits["now"] / draws,
                    draws,
                )
            )
    for share in (0.15, 0.3, 1.0):
        windows = max(1, draws // 2)
        at: dict[str, list[int]] = {name: [] for name in rules}
        for _ in range(windows):
            fails = np.flatnonzero(rng.random(2_000) < share) + 1
            for name, rule in rules.items():
                request = caught(fails, rule)
                if request is not None:
                    at[name].append(request)
        median = {name: f"{np.median(v):.0f}" if v else "-" for name, v in at.items()}
        out.append(
            Rate(
                "error-rate",
                f"failing {share:.0%}, 2,000 requests",
                len(at["before"]) / windows,
                len(at["now"]) / windows,
                windows,
                f"caught at request {median['before']} -> {median['now']} (median)",
            )
        )
    return out


CASES: dict[str, Callable[[np.random.Generator, int], list[Rate]]] = {
    "canary-accuracy": canary_accuracy,
    "canary-mae": canary_mae,
    "divergence": divergence,
    "drift-js": drift_js,
    "drift-chi2": drift_chi2,
    "error-rate": error_rate,
}
DEFAULT_DRAWS = {
    "canary-accuracy": 1_000,
    "canary-mae": 500,
    "divergence": 500,
    "drift-js": 100,
    "drift-chi2": 400,
    "error-rate": 1_000,
}


def run(case: str, draws: int | None = None, seed: int = 0) -> list[Rate]:
    """The rates of one case; its draws from a stream of its own (``seed`` and the case's place)."""
    rng = np.random.default_rng([seed, list(CASES).index(case)])
    return CASES[case](rng, draws if draws is not None else DEFAULT_DRAWS[case])


def percent(share: float) -> str:
    return f"{share:.2%}" if 0 < share < 0.1 else f"{share:.0%}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("case", nargs="?", default="all", choices=[*CASES, "all"])
    parser.add_argument(
        "--draws",
        type=int,
        default=None,
        help="draws per condition (default per case: "
        + ", ".join(f"{k} {v:,}" for k, v in DEFAULT_DRAWS.items())
        + ")",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cases = list(CASES) if args.case == "all" else [args.case]
    print(f"driftloop decision error rates — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, seed {args.seed}")
    print()
    print("| decision | condition | before | now | draws | note |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for case in cases:
        started = time.perf_counter()
        for r in run(case, args.draws, args.seed):
            print(
                f"| {r.case} | {r.condition} | {percent(r.before)} | {percent(r.now)} | {r.draws:,} "
                f"| {r.note} |",
                flush=True,
            )
        print(f"<!-- {case}: {time.perf_counter() - started:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
