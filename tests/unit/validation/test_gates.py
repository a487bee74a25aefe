"""Each gate on known inputs: thresholds, champion/challenger, slices, signature, latency, sanity."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from contracts.common import FeatureSpec, ModelSignature, Task
from contracts.validation import CheckKind, CheckResult, Comparator, ValidationFailed, ValidationPassed
from libs.metrics import Outputs, metric, paired_bootstrap_difference
from libs.modelspec import ValidationSpec
from services.validation.domain import (
    NO_CHAMPION,
    Carried,
    ChampionComparison,
    Measured,
    SliceMeasure,
    SlicesLeftOut,
    champion_check,
    cut_checks,
    failure,
    judge,
    latency_check,
    sanity_checks,
    signature_check,
    slice_checks,
    threshold_checks,
)
from services.validation.scoring import latency_ms_per_row

SPEC = ValidationSpec.model_validate(
    {
        "thresholds": {"roc_auc": 0.75, "log_loss": 0.5},
        "champion": {"max_degradation": 0.02},
        "slices": {"feature": "plan", "min_value": 0.7, "min_rows": 30},
        "latency_budget_ms_per_row": 1.0,
    }
)


def measured(**changes: object) -> Measured:
    values: dict[str, object] = {
        "rows": 1000,
        "metrics": {"roc_auc": 0.86, "log_loss": 0.41, "accuracy": 0.8},
        "nonfinite_outputs": 0,
        "distinct_outputs": 950,
        "latency_ms_per_row": 0.01,
    }
    values.update(changes)
    return Measured(**values)  # type: ignore[arg-type]


def comparison(diff: float, low: float, high: float, metric_name: str = "roc_auc") -> ChampionComparison:
    return ChampionComparison(metric_name, 0.8 + diff, 0.8, diff, low, high, 0.95, 500)


def signature(**changes: object) -> ModelSignature:
    values: dict[str, object] = {
        "features": [
            FeatureSpec(name="x0", type="numeric"),
            FeatureSpec(name="plan", type="categorical", categories=["basic", "plus"]),
        ],
        "target": "churned",
        "task": Task.CLASSIFICATION,
        "classes": [0, 1],
    }
    values.update(changes)
    return ModelSignature(**values)


def test_threshold_is_a_minimum_for_higher_is_better_and_a_maximum_otherwise() -> None:
    auc, loss = threshold_checks(SPEC, measured())
    assert (auc.name, auc.comparator, auc.passed, auc.value) == ("roc_auc>=0.75", Comparator.GE, True, 0.86)
    assert (loss.name, loss.comparator, loss.passed) == ("log_loss<=0.5", Comparator.LE, True)
    auc, loss = threshold_checks(SPEC, measured(metrics={"roc_auc": 0.7, "log_loss": 0.9}))
    assert not auc.passed and not loss.passed
    assert "misses" in auc.detail


def test_threshold_on_a_metric_undefined_on_the_holdout_fails() -> None:
    [auc, _] = threshold_checks(SPEC, measured(metrics={"log_loss": 0.3}))
    assert not auc.passed and auc.value is None and "undefined" in auc.detail


def test_first_version_passes_champion_and_signature_checks_as_skipped_with_no_champion() -> None:
    check = champion_check(SPEC, "roc_auc", measured(), None)
    assert check.passed and NO_CHAMPION in check.detail
    sig = signature_check(SPEC, signature(), None)
    assert sig.passed and NO_CHAMPION in sig.detail


def test_challenger_passes_when_the_ci_lower_bound_stays_within_delta() -> None:
    check = champion_check(SPEC, "roc_auc", measured(champion=comparison(0.001, -0.015, 0.017)), 6)
    assert check.passed
    assert check.name == "challenger-vs-champion:roc_auc"
    assert check.threshold == -0.02 and check.comparator is Comparator.GE
    assert check.interval is not None and check.interval.low == -0.015


def test_challenger_fails_when_the_ci_reaches_below_minus_delta_even_with_a_small_point_loss() -> None:
    check = champion_check(SPEC, "roc_auc", measured(champion=comparison(-0.01, -0.031, 0.01)), 6)
    assert not check.passed and check.value == -0.01
    assert "champion v6" in check.detail


def test_lower_is_better_metric_is_judged_on_the_upper_bound() -> None:
    rmse = champion_check(SPEC, "rmse", measured(champion=comparison(0.01, -0.005, 0.03, "rmse")), 2)
    assert not rmse.passed and rmse.comparator is Comparator.LE and rmse.threshold == 0.02
    better = champion_check(SPEC, "rmse", measured(champion=comparison(-0.2, -0.3, -0.1, "rmse")), 2)
    assert better.passed


def test_champion_that_could_not_be_scored_fails_the_check_with_the_reason() -> None:
    check = champion_check(SPEC, "roc_auc", measured(champion_error="no column 'x9'"), 3)
    assert not check.passed and "no column 'x9'" in check.detail


def test_a_champion_validation_never_recorded_fails_the_comparison_saying_so() -> None:
    # The production version's ModelVersionRegistered never reached validation (dead-lettered, then promoted
    # by hand): nothing was scored, and the report said "could not be scored on the holdout: None" beside a
    # signature check "skipped: no champion".
    checks = judge(
        SPEC,
        task=Task.CLASSIFICATION,
        n_classes=2,
        measured=measured(),
        candidate=signature(),
        champion_signature=None,
        champion_version=4,
    )
    by_name = {c.name: c for c in checks}
    versus = by_name["challenger-vs-champion:roc_auc"]
    assert not versus.passed
    assert "champion v4 is unknown to validation" in versus.detail and "None" not in versus.detail
    sig = by_name["signature-compatible"]
    assert "champion v4 is unknown to validation" in sig.detail and NO_CHAMPION not in sig.detail


def test_slices_below_the_minimum_fail_and_small_or_undefined_slices_are_reported() -> None:
    slices = [
        SliceMeasure("basic", 500, 0.9),
        SliceMeasure("plus", 300, 0.6),
        SliceMeasure("premium", 12, 0.1),
        SliceMeasure("trial", 40, float("nan")),
    ]
    checks = slice_checks(SPEC, measured(slice_metric="roc_auc", slices=slices))
    by_name = {c.name: c for c in checks}
    assert by_name["slice:plan=basic:roc_auc"].passed
    assert not by_name["slice:plan=plus:roc_auc"].passed
    assert by_name["slice:plan=premium:roc_auc"].passed
    assert "not judged" in by_name["slice:plan=premium:roc_auc"].detail
    assert by_name["slice:plan=trial:roc_auc"].passed and by_name["slice:plan=trial:roc_auc"].value is None


def test_new_categories_are_compatible_but_lost_features_and_changed_types_are_not() -> None:
    wider = signature(
        features=[
            FeatureSpec(name="x0", type="numeric"),
            FeatureSpec(name="plan", type="categorical", categories=["basic", "plus", "gold"]),
        ]
    )
    assert signature_check(SPEC, wider, signature()).passed
    narrower = signature(features=[FeatureSpec(name="x0", type="numeric")])
    check = signature_check(SPEC, narrower, signature())
    assert not check.passed and "'plan' of the champion is gone" in check.detail
    retyped = signature(
        features=[FeatureSpec(name="x0", type="categorical"), FeatureSpec(name="plan", type="categorical")]
    )
    assert "changed type" in signature_check(SPEC, retyped, signature()).detail
    assert not signature_check(SPEC, signature(classes=[0, 1, 2]), signature()).passed


def test_exact_rule_refuses_even_new_categories() -> None:
    exact = SPEC.model_copy(update={"schema_compatibility": "exact"})
    wider = signature(
        features=[
            FeatureSpec(name="x0", type="numeric"),
            FeatureSpec(name="plan", type="categorical", categories=["basic", "plus", "gold"]),
        ]
    )
    assert not signature_check(exact, wider, signature()).passed


def test_latency_over_budget_fails() -> None:
    assert latency_check(SPEC, measured(latency_ms_per_row=0.5)).passed
    slow = latency_check(SPEC, measured(latency_ms_per_row=2.5))
    assert not slow.passed and slow.name == "latency-per-row" and slow.threshold == 1.0


class BatchRecorder:
    """A classifier that answers 0.5 for every row and keeps the rows of every call it gets."""

    classes_ = np.array([0, 1])

    def __init__(self) -> None:
        self.calls: list[list[float]] = []

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        self.calls.append(frame["x"].tolist())
        return np.full((len(frame), 2), 0.5)


@pytest.mark.parametrize("holdout_rows", [1, 3, 50, 80])
def test_latency_is_timed_on_batches_of_batch_rows_whatever_the_holdouts_size(holdout_rows: int) -> None:
    # A call's fixed cost over the rows of a holdout smaller than a batch: a model of 0.05 ms a row in batches
    # measured 24 ms a row on one row, and failed the budget for the holdout's size.
    model = BatchRecorder()
    holdout = pd.DataFrame({"x": np.arange(holdout_rows, dtype=float)})
    latency_ms_per_row(model, Task.CLASSIFICATION, holdout, repeats=3, batch_rows=50)
    assert len(model.calls) == 1 + 3  # the warm-up call, then the timed ones
    assert all(len(rows) == 50 for rows in model.calls)
    assert all(set(rows) == set(range(min(holdout_rows, 50))) for rows in model.calls)


def test_nan_outputs_and_constant_outputs_fail_sanity() -> None:
    finite, varied = sanity_checks(measured(nonfinite_outputs=3, distinct_outputs=1))
    assert not finite.passed and "3 NaN" in finite.detail
    assert not varied.passed and "the same for everything" in varied.detail


def test_not_constant_is_reported_not_judged_where_the_inputs_do_not_vary() -> None:
    # One row, or rows all alike, give any model one output: it failed every such holdout.
    _, one_row = sanity_checks(measured(rows=1, distinct_outputs=1, inputs_vary=False))
    assert one_row.passed and one_row.threshold is None and one_row.value == 1.0
    assert one_row.detail == (
        "reported, not judged: the holdout's one row gives the model one input, to which any model gives one "
        "output (1 distinct); whether its outputs vary takes at least 2 rows with different inputs"
    )
    _, alike = sanity_checks(measured(rows=40, distinct_outputs=1, inputs_vary=False))
    assert alike.passed and "the holdout's 40 rows all hold the same inputs" in alike.detail
    _, constant = sanity_checks(measured(rows=40, distinct_outputs=1, inputs_vary=True))
    assert not constant.passed and constant.threshold == 2.0


def test_judge_runs_every_gate_once_in_report_order() -> None:
    checks = judge(
        SPEC,
        task=Task.CLASSIFICATION,
        n_classes=2,
        measured=measured(slice_metric="roc_auc", slices=[SliceMeasure("basic", 100, 0.9)]),
        candidate=signature(),
        champion_signature=None,
        champion_version=None,
    )
    names = [c.name for c in checks]
    assert names == [
        "roc_auc>=0.75",
        "log_loss<=0.5",
        "challenger-vs-champion:roc_auc",
        "slice:plan=basic:roc_auc",
        "signature-compatible",
        "latency-per-row",
        "sanity:finite-outputs",
        "sanity:not-constant",
        "sanity:holdout-labels",
    ]
    assert len(set(names)) == len(names)


def _binary_outputs(scores: np.ndarray, y: np.ndarray) -> Outputs:
    proba = np.column_stack([1 - scores, scores])
    return Outputs(Task.CLASSIFICATION, y, (scores > 0.5).astype(int), proba, (0, 1))


def test_metrics_agree_with_scikit_learn() -> None:
    from sklearn import metrics as skm

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    scores = np.clip(y * 0.3 + rng.random(400) * 0.7, 0.001, 0.999).round(2)  # ties on purpose
    out = _binary_outputs(scores, y)
    assert metric(out, "roc_auc") == pytest.approx(skm.roc_auc_score(y, scores), abs=1e-12)
    assert metric(out, "accuracy") == pytest.approx(skm.accuracy_score(y, out.pred))
    assert metric(out, "f1") == pytest.approx(skm.f1_score(y, out.pred))
    assert metric(out, "log_loss") == pytest.approx(skm.log_loss(y, out.proba), rel=1e-9)
    target, guess = rng.normal(size=300), rng.normal(size=300)
    reg = Outputs(Task.REGRESSION, target, guess)
    assert metric(reg, "rmse") == pytest.approx(np.sqrt(skm.mean_squared_error(target, guess)))
    assert metric(reg, "mae") == pytest.approx(skm.mean_absolute_error(target, guess))
    assert metric(reg, "r2") == pytest.approx(skm.r2_score(target, guess))
    # A target far from zero against its spread: sum(y²) - sum(y)²/n lost every digit (NaN at 1e9).
    for offset in (1e7, 1e9):
        far = Outputs(Task.REGRESSION, target + offset, target + offset + rng.normal(0, 0.3, 300))
        assert metric(far, "r2") == pytest.approx(skm.r2_score(far.y, far.pred), abs=1e-6)


def test_paired_bootstrap_is_seeded_and_zero_for_identical_models() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    good = _binary_outputs(np.clip(y * 0.5 + rng.random(500) * 0.5, 0, 1), y)
    bad = _binary_outputs(rng.random(500), y)
    first = paired_bootstrap_difference(bad, good, "roc_auc", resamples=200, level=0.95, seed=9)
    again = paired_bootstrap_difference(bad, good, "roc_auc", resamples=200, level=0.95, seed=9)
    assert first == again
    diff, low, high = first
    assert low <= diff <= high < 0
    assert paired_bootstrap_difference(good, good, "roc_auc", resamples=100, level=0.9, seed=1) == (0, 0, 0)


def carried(checks: list[CheckResult]) -> Carried:
    return Carried(checks=checks, failed_checks=[c.name for c in checks if not c.passed])


def four_slices(slices_left_out: SlicesLeftOut | None = None) -> list[CheckResult]:
    slices = [
        SliceMeasure(level="a-reported", rows=5, value=0.9),
        SliceMeasure(level="b-failed", rows=100, value=0.5),
        SliceMeasure(level="c-passed", rows=100, value=0.9),
        SliceMeasure(level="d-failed", rows=100, value=0.6),
    ]
    return judge(
        SPEC,
        task=Task.CLASSIFICATION,
        n_classes=2,
        measured=measured(
            slices=slices, slice_feature="plan", slice_metric="roc_auc", slices_left_out=slices_left_out
        ),
        candidate=signature(),
        champion_signature=None,
        champion_version=None,
    )


def test_an_oversized_reports_event_leaves_out_passed_slices_then_other_passed_checks_then_failed_ones() -> (
    None
):
    checks = four_slices()
    names = [c.name for c in checks]
    failed = ["slice:plan=b-failed:roc_auc", "slice:plan=d-failed:roc_auc"]

    one_less = cut_checks(carried(checks), excess=1)
    assert [c.name for c in one_less.checks] == [n for n in names if "a-reported" not in n]
    no_passed_slice = cut_checks(one_less, excess=1)
    assert [c.name for c in no_passed_slice.checks if c.kind is CheckKind.SLICE] == failed
    # Then the passed checks that are no slice, the last in report order first.
    next_cut = cut_checks(no_passed_slice, excess=1)
    assert next_cut.checks == [c for c in no_passed_slice.checks if c.name != "sanity:holdout-labels"]
    state = no_passed_slice
    while any(c.passed for c in state.checks):
        state = cut_checks(state, excess=1)
    assert [c.name for c in state.checks] == failed and state.failed_checks == failed
    # Then the failed ones, their names staying, until one is left; then the names of those left out.
    state = cut_checks(state, excess=1)
    assert [c.name for c in state.checks] == failed[:1] and state.failed_checks == failed
    least = cut_checks(state, excess=1)
    assert [c.name for c in least.checks] == failed[:1] and least.failed_checks == failed[:1]
    assert cut_checks(least, excess=1) == least  # nothing left to cut
    assert cut_checks(carried(checks), excess=10**6) == least


def test_an_oversized_reports_event_cuts_a_long_detail_before_leaving_out_slices() -> None:
    long = failure(
        "signature-compatible", "; ".join(f"feature 'f{i:05d}' of the champion is gone" for i in range(5_000))
    )
    kept = cut_checks(carried([long]), excess=10_000)
    [short] = kept.checks
    assert len(short.detail) < 1_100 and short.detail.startswith(long.detail[:1_000])
    assert short.detail.endswith(f"… ({len(long.detail) - 1_000:,} more characters in the stored report)")
    # Cut again (the event still too large: a failed check's detail goes down to 200 characters), it counts
    # from the stored detail, not from the cut one.
    [shorter] = cut_checks(kept, excess=10_000).checks
    assert (
        shorter.detail
        == f"{long.detail[:200]}… ({len(long.detail) - 200:,} more characters in the stored report)"
    )
    assert cut_checks(Carried([shorter], [shorter.name]), excess=10_000).checks == [shorter]


def test_failed_checks_keep_their_names_when_they_do_not_fit_and_keep_one_that_is_no_slice() -> None:
    checks = four_slices()
    roc_auc = next(c for c in checks if c.name == "roc_auc>=0.75")
    gone = failure(
        "signature-compatible", "; ".join(f"feature 'f{i:05d}' of the champion is gone" for i in range(20))
    )
    checks = [roc_auc.model_copy(update={"passed": False, "detail": "x" * 300}), *checks[1:]]
    checks = [gone if c.name == "signature-compatible" else c for c in checks]
    failed = [c.name for c in checks if not c.passed]
    assert failed == [
        "roc_auc>=0.75",
        "slice:plan=b-failed:roc_auc",
        "slice:plan=d-failed:roc_auc",
        "signature-compatible",
    ]
    only_failed = [c for c in checks if not c.passed]
    # Every passed check gone and a few bytes more to free: the failed details are cut to 200 characters.
    passed_bytes = sum(len(c.model_dump_json()) + 1 for c in checks if c.passed)
    shorter = cut_checks(carried(checks), excess=passed_bytes + 10)
    assert [c.name for c in shorter.checks] == failed and shorter.failed_checks == failed
    assert [len(c.detail) < 260 for c in shorter.checks] == [True, True, True, True]
    assert shorter.checks[0].detail == "x" * 200 + "… (100 more characters in the stored report)"
    # Then failed slices go before the others, every name staying; the one kept is no slice.
    fewer = cut_checks(shorter, excess=1)
    assert [c.name for c in fewer.checks] == [failed[0], failed[1], failed[3]]
    fewest = cut_checks(carried(only_failed), excess=10**6)
    assert [c.name for c in fewest.checks] == ["roc_auc>=0.75"] and fewest.failed_checks == ["roc_auc>=0.75"]


def test_an_oversized_reports_event_keeps_the_slice_summary_until_every_other_check_is_left_out() -> None:
    # The summary, a passed slice only reported and the last slice in report order, was the first check an
    # event left out: an event cut for thousands of slices never said that levels went unchecked.
    left_out = SlicesLeftOut(levels=9_000, rows=20_000, max_slice_levels=4)
    checks = four_slices(left_out)
    summary = next(c for c in checks if c.name == "slice:plan:other-levels:roc_auc")
    failed = [c.name for c in checks if not c.passed]
    state = Carried(checks=checks, failed_checks=failed, slice_summary=summary.name)
    cuts = []
    while (cut := cut_checks(state, excess=1)) != state:
        state = cut
        cuts.append(cut)
    # Every other check but the failed one kept goes first, its name staying; then the summary; then the
    # names of the failed checks left out.
    assert [c.name for c in cuts[-3].checks] == [failed[0], summary.name] and cuts[-3].failed_checks == failed
    assert [c.name for c in cuts[-2].checks] == [failed[0]] and cuts[-2].failed_checks == failed
    assert [c.name for c in state.checks] == failed[:1] and state.failed_checks == failed[:1]
    # Nothing failed: the summary is the check that stays.
    passed = [c.model_copy(update={"passed": True}) for c in checks]
    least = cut_checks(Carried(checks=passed, failed_checks=[], slice_summary=summary.name), excess=10**6)
    assert least.checks == [summary]


@pytest.mark.parametrize("excess", [1, 100, 300, 1_000, 2_000, 3_000, 10**6])
@pytest.mark.parametrize("fail", [False, True])
def test_cutting_never_changes_the_verdict(excess: int, fail: bool) -> None:
    checks = four_slices()
    if not fail:
        checks = [c.model_copy(update={"passed": True}) for c in checks]
    fields: dict[str, Any] = {
        "model": "churn",
        "model_version": 3,
        "report_id": "vr-churn-v3",
        "duration_seconds": 1.0,
        "checks_truncated": True,
        "checks_total": len(checks),
        "failed_checks_total": sum(not c.passed for c in checks),
    }
    state = carried(checks)
    while (cut := cut_checks(state, excess)) != state:
        state = cut
        outcome = (ValidationFailed if fail else ValidationPassed)(
            **fields, checks=state.checks, failed_checks=state.failed_checks
        )
        assert bool(outcome.failed_checks) == fail and any(not c.passed for c in outcome.checks) == fail
    assert len(state.checks) == 1
