"""Each gate on known inputs: thresholds, champion/challenger, slices, signature, latency, sanity."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.common import FeatureSpec, ModelSignature, Task
from contracts.validation import CheckKind, Comparator
from libs.metrics import Outputs, metric, paired_bootstrap_difference
from libs.modelspec import ValidationSpec
from services.validation.domain import (
    NO_CHAMPION,
    ChampionComparison,
    Measured,
    SliceMeasure,
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


def test_nan_outputs_and_constant_outputs_fail_sanity() -> None:
    finite, varied = sanity_checks(measured(nonfinite_outputs=3, distinct_outputs=1))
    assert not finite.passed and "3 NaN" in finite.detail
    assert not varied.passed and "the same for everything" in varied.detail


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


def test_an_oversized_reports_event_keeps_every_other_check_and_the_failed_slices_first() -> None:
    slices = [
        SliceMeasure(level="a-reported", rows=5, value=0.9),
        SliceMeasure(level="b-failed", rows=100, value=0.5),
        SliceMeasure(level="c-passed", rows=100, value=0.9),
        SliceMeasure(level="d-failed", rows=100, value=0.6),
    ]
    checks = judge(
        SPEC,
        task=Task.CLASSIFICATION,
        n_classes=2,
        measured=measured(slices=slices, slice_feature="plan", slice_metric="roc_auc"),
        candidate=signature(),
        champion_signature=None,
        champion_version=None,
    )
    names = [c.name for c in checks]

    one_less = cut_checks(checks, excess=1)
    assert [c.name for c in one_less] == [n for n in names if "a-reported" not in n]
    failed_only = cut_checks(one_less, excess=1)
    assert [c.name for c in failed_only if c.kind is CheckKind.SLICE] == [
        "slice:plan=b-failed:roc_auc",
        "slice:plan=d-failed:roc_auc",
    ]
    # Everything that can go has gone: the other checks, and one failed check to say why it failed.
    least = cut_checks(checks, excess=10**6)
    assert least == [
        c for c in checks if c.kind is not CheckKind.SLICE or c.name == "slice:plan=b-failed:roc_auc"
    ]


def test_an_oversized_reports_event_cuts_a_long_detail_before_leaving_out_slices() -> None:
    long = failure(
        "signature-compatible", "; ".join(f"feature 'f{i:05d}' of the champion is gone" for i in range(5_000))
    )
    kept = cut_checks([long], excess=10_000)
    [short] = kept
    assert len(short.detail) < 1_100 and short.detail.startswith(long.detail[:1_000])
    assert short.detail.endswith(f"… ({len(long.detail) - 1_000:,} more characters in the stored report)")
