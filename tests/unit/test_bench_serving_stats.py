"""The serving benchmark's verdicts: ratios paired within a round, an order-statistics interval for their
median, and met / missed / not established against a target."""

import argparse
import json
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from scipy.stats import binom

import bench.serving.run as serving_bench
from bench.serving.run import Measure, Server, combined, judged, median_interval, per_round, pooled


def saturated(server: str, rnd: int, rps: float, rows: int = 100) -> Measure:
    return Measure(server, rows, "saturation", rnd, 16, rps, 1.0, 2.0, 0, 0, 5.0)


def test_ratios_are_paired_within_each_round() -> None:
    results = [
        saturated("on", 1, 900),
        saturated("off", 1, 1000),
        saturated("on", 2, 1500),
        saturated("off", 2, 1500),
        saturated("on", 3, 800),  # no partner in round 3
        saturated("off", 4, 700),
        saturated("on", 2, 1, rows=1),  # another size
        Measure("off", 100, "half", 1, 4, 1.0, 1.0, 2.0, 0, 0, 5.0),  # not at saturation
    ]
    assert per_round(results, "on", "off", 100) == [0.9, 1.0]


def test_pooled_runs_keep_each_pair_within_its_own_run(tmp_path: Path) -> None:
    runs = [
        [saturated("on", 0, 900), saturated("off", 0, 1000), saturated("on", 1, 600)],
        [saturated("off", 1, 1200), saturated("on", 0, 400), saturated("off", 0, 500)],
    ]
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps({"results": [asdict(m) for m in run]}))
    # Round 1's "on" (first run) and "off" (second run) are not a pair.
    assert per_round(pooled(paths), "on", "off", 100) == [0.9, 0.8]


@pytest.mark.parametrize("n", [6, 9, 12, 30])
def test_the_interval_covers_the_median_at_the_level_asked(n: int) -> None:
    values = [float(v) for v in range(n, 0, -1)]
    lo, hi = median_interval(values) or (None, None)
    assert lo is not None and hi is not None
    k = int(lo)  # the k-th smallest of 1..n is k
    assert hi == n + 1 - k
    # The coverage of (x_k, x_{n-k+1}) is 1 - 2 P(Bin(n, 1/2) <= k - 1); k is the widest that keeps 95%.
    assert 1 - 2 * binom.cdf(k - 1, n, 0.5) >= 0.95
    assert 1 - 2 * binom.cdf(k, n, 0.5) < 0.95


def test_too_few_rounds_give_no_interval() -> None:
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    assert median_interval([1.0] * 6) == (1.0, 1.0)


def test_a_cost_is_met_only_when_the_whole_interval_is_within_the_target() -> None:
    cheap = [0.97, 0.95, 0.99, 0.96, 0.98, 0.94]
    assert judged("log", cheap, cost=True, target=0.10).endswith(": met")
    dear = [0.80, 0.85, 0.75, 0.88, 0.82, 0.79]
    assert judged("log", dear, cost=True, target=0.10).endswith(": missed")
    spread = [0.97, 0.80, 0.99, 0.85, 0.95, 0.70]
    assert judged("log", spread, cost=True, target=0.10).endswith(": not established")
    assert "needs 6 rounds" in judged("log", cheap[:3], cost=True, target=0.10)


def test_a_gain_reads_its_target_as_a_lower_bound() -> None:
    text = judged("vs MLflow", [12.0, 11.0, 13.0, 14.0, 10.5, 12.5], cost=False, target=10)
    assert text == (
        "vs MLflow by round: 12.0x, 11.0x, 13.0x, 14.0x, 10.5x, 12.5x; median 12.2x, "
        "95% interval of the median 10.5x to 14.0x: met"
    )
    assert judged("vs MLflow", [9.0, 12.0, 13.0, 14.0, 8.0, 12.5], cost=False, target=10).endswith(
        "not established"
    )


def test_slices_combine_into_rates_over_the_whole_time_and_costs_over_all_requests() -> None:
    def piece(rps: float, seconds: float, cpu_ms: float, steal: float, p99: float) -> Measure:
        return Measure(
            "on",
            1,
            "saturation",
            3,
            16,
            rps,
            1.0,
            p99,
            1,
            0,
            seconds,
            cpu_ms=cpu_ms,
            steal_pct=steal,
            drain_s=seconds / 10,
        )

    whole = combined(
        [piece(1000, 1.0, 0.2, 0.0, 5.0), piece(3000, 2.0, 0.4, 30.0, 9.0), piece(500, 1.0, 1.0, 0, 7)]
    )
    assert whole.rps == pytest.approx((1000 + 6000 + 500) / 4)
    assert whole.cpu_ms == pytest.approx((1000 * 0.2 + 6000 * 0.4 + 500 * 1.0) / 7500)
    assert whole.steal_pct == pytest.approx(60 / 4)
    assert (whole.p99_ms, whole.non2xx, whole.duration_s, whole.round) == (7.0, 3, 4.0, 3)
    assert whole.drain_s == pytest.approx(0.4)


def test_the_time_a_producer_keeps_working_after_the_load_counts_and_an_idle_one_drains_at_once() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stopper = threading.Timer(0.5, busy.kill)
        stopper.start()
        # A low share counts as busy: on a loaded machine the loop gets less than the half core the bench
        # asks of a producer, and this test is about following the process, not about the share.
        assert serving_bench.drain([busy.pid], busy_share=0.1) >= 0.4  # busy until killed 0.5 s later
        stopper.join()
        assert serving_bench.drain([idle.pid], busy_share=0.1) < 0.4
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()


def test_saturation_takes_its_slices_in_turn_each_pass_in_another_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken: list[str] = []

    def fake_one(server: Server, rows: int, load: str, rnd: int, **kwargs: Any) -> Measure:
        taken.append(server.name)
        return Measure(server.name, rows, load, rnd, 16, 100.0, 1.0, 2.0, 0, 0, kwargs["duration"])

    monkeypatch.setattr(serving_bench, "one", fake_one)
    monkeypatch.setattr(serving_bench, "wrk", lambda *a, **k: {})
    servers = [Server(name, None, "", "", {1: Path("body.json")}) for name in "abc"]  # type: ignore[arg-type]
    args = argparse.Namespace(duration=5, slice=1, connections=16)
    measured = serving_bench.saturate(servers, 1, 0, args)
    assert taken == list("abcbcacababcbca")
    assert {name: m.duration_s for name, m in measured.items()} == dict.fromkeys("abc", 5.0)
