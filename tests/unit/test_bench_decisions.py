"""The decision error-rate benchmark (bench/decisions/run.py) runs its cases on the repository's own rules:
a smoke run with very few draws."""

import pytest

import bench.decisions.run as decisions


def test_error_rate_case_runs_both_rules_on_the_same_draws() -> None:
    rates = decisions.run("error-rate", draws=4, seed=1)
    assert {r.case for r in rates} == {"error-rate"}
    assert all(0.0 <= r.before <= 1.0 and 0.0 <= r.now <= 1.0 for r in rates)
    # A canary failing every request is caught by both rules, at the 20th request (error_rate_min_requests).
    always = next(r for r in rates if r.condition.startswith("failing 100%"))
    assert (always.before, always.now) == (1.0, 1.0)
    assert always.note == "caught at request 20 -> 20 (median)"


def test_a_case_gives_the_same_rates_for_the_same_seed() -> None:
    first = decisions.run("canary-accuracy", draws=3, seed=5)
    assert decisions.run("canary-accuracy", draws=3, seed=5) == first


def test_main_prints_a_table_row_per_condition(capsys: pytest.CaptureFixture[str]) -> None:
    decisions.main(["divergence", "--draws", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| divergence |")]
    assert len(rows) == len(decisions.run("divergence", draws=2))
