"""Validation's pure logic: from measured numbers and the spec's gates to a verdict per check. No I/O.

The numbers come from scoring.py (predictions, bootstrap, timing); here they meet their thresholds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import orjson

from contracts.common import ModelSignature, Task
from contracts.validation import (
    CheckKind,
    CheckResult,
    Comparator,
    ConfidenceInterval,
    ValidationFailed,
    ValidationPassed,
)
from libs.metrics import METRICS, metrics_for, primary_metric
from libs.modelspec import FLOAT32_MAX, ValidationSpec

NO_CHAMPION = "no champion"


@dataclass(frozen=True)
class ChampionComparison:
    """Challenger minus champion on the same rows, with its bootstrap interval."""

    metric: str
    challenger: float
    champion: float
    difference: float
    low: float
    high: float
    level: float
    resamples: int


@dataclass(frozen=True)
class SliceMeasure:
    """One level of the slice feature: its rows and the metric on them."""

    level: str | None
    """The level's text; None for the rows where the feature has no value, a group of their own."""
    rows: int
    value: float
    kind: str | None = None
    """The level's type (``text``, ``integer``, ``number``, ``boolean``, or the Python type's name), set only
    when another level of the holdout has the same text (the integer 1 and the text "1"): they are different
    values to the model, and their checks need different names."""


@dataclass(frozen=True)
class SlicesLeftOut:
    """The levels of the slice feature past ``max_slice_levels``, those with the fewest rows: not measured one
    by one, so a feature of a million levels (an id, a postcode) costs no million checks."""

    levels: int
    rows: int
    max_slice_levels: int


ChampionProblem = Literal["missing", "corrupted", "untrusted", "unloadable"]


@dataclass(frozen=True)
class ChampionUnloadable:
    """Why the champion's model could not be loaded: its artifact is missing, corrupted (its bytes no longer
    hash to its key), untrusted (no skops file, or types outside the trusted list) or unloadable (skops cannot
    build it). The comparison with it cannot be measured; the candidate is judged on its absolute checks."""

    reason: ChampionProblem
    detail: str


@dataclass(frozen=True)
class Measured:
    """What scoring measured on the holdout: ``rows`` are the rows with a usable label, every check's rows."""

    rows: int
    metrics: dict[str, float]
    nonfinite_outputs: int
    """Rows whose output is NaN, infinite or beyond float32's range (any of a row's probabilities)."""
    distinct_outputs: int
    latency_ms_per_row: float
    champion: ChampionComparison | None = None
    champion_error: str | None = None
    champion_unloadable: ChampionUnloadable | None = None
    """Set when the champion's model could not be loaded: the comparison is reported, not judged."""
    champion_outputs_unusable: str | None = None
    """Set when the champion's outputs on the holdout are NaN, infinite or beyond float32's range (how many,
    and one): no metric of them means anything, so the comparison is reported, not judged."""
    nonfinite_example: str | None = None
    """One of the candidate's outputs counted in ``nonfinite_outputs``."""
    slice_feature: str | None = None
    slice_metric: str | None = None
    slices: list[SliceMeasure] = field(default_factory=list)
    slices_left_out: SlicesLeftOut | None = None
    """Set when the holdout has more levels of the slice feature than ``max_slice_levels``."""
    unlabelled_rows: int = 0
    """Holdout rows left out of every check: their label is missing or no value of the target's type."""
    unusable_labels: tuple[str, ...] = ()
    """A few of the values present that are no label of the target's type (as ``repr``)."""
    unknown_labels: dict[str, int] = field(default_factory=dict)
    """Labels that are none of the candidate's classes, with their rows: scored as probability 0."""
    inputs_vary: bool = True
    """At least two of the rows hold different inputs: only then can outputs that never vary be the model's
    doing (one row, or rows all alike, give any model one output)."""


def champion_unknown(version: int) -> str:
    """Why a champion validation never recorded (its ModelVersionRegistered dead-lettered here, then the
    version promoted by hand) is not compared: its artifact and signature come from that registration."""
    return (
        f"champion v{version} is unknown to validation: its ModelVersionRegistered was never recorded here "
        "(dead-lettered, or before what validation's consumer read), so its model and signature are not "
        "known; replay that registration to validation, then ask for a retrain (this version's report is "
        "final)"
    )


CLASSES_NAMED = 5
"""Classes a message names; it counts them all."""


def gates_of_another_task(
    spec: ValidationSpec, task: Task, classes: Sequence[object] | None = None
) -> str | None:
    """Why the spec's gates cannot judge a model of ``task`` (of ``classes``), or None: they name metrics of
    the other task (the candidate's lineage names another model's spec; a spec is checked against its own
    task only), or metrics of two classes for a candidate of more (the spec cannot know how many classes the
    data will have)."""
    rule = spec.slices
    named = [
        *((f"validation.thresholds.{m}", m) for m in spec.thresholds),
        *([("validation.champion.metric", spec.champion.metric)] if spec.champion.metric else []),
        *([("validation.slices.metric", rule.metric)] if rule is not None and rule.metric else []),
    ]
    foreign = [(where, name) for where, name in named if METRICS[name].task is not task]
    if foreign:
        tasks = sorted({METRICS[name].task.value for _, name in foreign})
        gates = " and ".join(f"{name} ({where})" for where, name in foreign)
        return (
            f"it gates on {gates}, metrics of {' and '.join(tasks)}, but the candidate is a {task.value} "
            "model: its lineage names the spec of another model"
        )
    n = len(classes) if task is Task.CLASSIFICATION and classes else None
    binary = [(where, name) for where, name in named if METRICS[name].binary_only and n is not None and n > 2]
    if not binary:
        return None
    gates = " and ".join(f"{name} ({where})" for where, name in binary)
    assert classes is not None
    shown_classes = ", ".join(str(c)[:40] for c in classes[:CLASSES_NAMED])
    more = f" and {len(classes) - CLASSES_NAMED:,} more" if len(classes) > CLASSES_NAMED else ""
    *others, last = metrics_for(task, n)
    return (
        f"it gates on {gates}, metrics of two classes, but the candidate has {n:,} classes "
        f"({shown_classes}{more}): gate on {', '.join(others)} or {last}"
    )


def champion_metric(spec: ValidationSpec, task: Task, n_classes: int | None) -> str:
    """The metric champion/challenger compares (the spec's, else the task's primary one)."""
    return spec.champion.metric or primary_metric(task, n_classes)


def slice_metric(spec: ValidationSpec, task: Task, n_classes: int | None) -> str:
    """The metric slices are judged on."""
    rule = spec.slices
    return (rule.metric if rule and rule.metric else None) or champion_metric(spec, task, n_classes)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _comparator(metric: str) -> Comparator:
    return Comparator.GE if METRICS[metric].higher_is_better else Comparator.LE


def _meets(value: float, threshold: float, comparator: Comparator) -> bool:
    return value >= threshold if comparator is Comparator.GE else value <= threshold


def _outputs_unusable_hint(measured: Measured) -> str:
    """Why a metric of the candidate may be undefined: its own outputs (the check that fails for them)."""
    if not measured.nonfinite_outputs:
        return ""
    return ": the candidate's outputs are not all usable numbers (see sanity:finite-outputs)"


def threshold_checks(spec: ValidationSpec, measured: Measured) -> list[CheckResult]:
    """Absolute thresholds: a minimum for higher-is-better metrics, a maximum for the others."""
    checks = []
    for metric, threshold in spec.thresholds.items():
        comparator = _comparator(metric)
        value = _finite(measured.metrics.get(metric))
        name = f"{metric}{comparator.value}{threshold:g}"
        if value is None:
            checks.append(
                CheckResult(
                    name=name,
                    kind=CheckKind.THRESHOLD,
                    metric=metric,
                    threshold=threshold,
                    comparator=comparator,
                    passed=False,
                    detail=f"{metric} is undefined on this holdout ({measured.rows} rows)"
                    + _outputs_unusable_hint(measured),
                )
            )
            continue
        passed = _meets(value, threshold, comparator)
        checks.append(
            CheckResult(
                name=name,
                kind=CheckKind.THRESHOLD,
                metric=metric,
                value=value,
                threshold=threshold,
                comparator=comparator,
                passed=passed,
                detail=f"{value:.4f} {comparator.value if passed else 'misses'} {threshold:g} "
                f"on {measured.rows:,} holdout rows",
            )
        )
    return checks


def champion_check(
    spec: ValidationSpec, metric: str, measured: Measured, champion: int | None
) -> CheckResult:
    """Non-inferiority: passed when the interval of (challenger - champion) stays within δ of zero on the
    bad side, i.e. the holdout gives evidence the challenger is not worse by more than δ."""
    delta = spec.champion.max_degradation
    higher = METRICS[metric].higher_is_better
    comparator = Comparator.GE if higher else Comparator.LE
    threshold = -delta if higher else delta
    name = f"challenger-vs-champion:{metric}"
    if champion is None:
        return CheckResult(
            name=name,
            kind=CheckKind.CHAMPION_CHALLENGER,
            metric=metric,
            threshold=threshold,
            comparator=comparator,
            passed=True,
            detail=f"skipped: {NO_CHAMPION} (first version of the model)",
        )
    # A damaged production artifact, or a champion whose outputs no metric can use, must not freeze the loop:
    # the candidate is judged as a first version is, and the canary rollout's live comparison with the stable
    # version is the safety net.
    why_not_judged = (
        f"champion v{champion} cannot be loaded ({unloadable.reason}): {unloadable.detail}"
        if (unloadable := measured.champion_unloadable) is not None
        else f"champion v{champion} gives outputs no metric can use: {measured.champion_outputs_unusable}"
        if measured.champion_outputs_unusable is not None
        else None
    )
    if why_not_judged is not None:
        return CheckResult(
            name=name,
            kind=CheckKind.CHAMPION_CHALLENGER,
            metric=metric,
            passed=True,
            detail=f"reported, not judged: {why_not_judged}; the candidate is judged on its absolute checks "
            "alone, as a first version is, and its canary rollout compares it live with the stable version",
        )
    comparison = measured.champion
    if comparison is None:
        return CheckResult(
            name=name,
            kind=CheckKind.CHAMPION_CHALLENGER,
            metric=metric,
            threshold=threshold,
            comparator=comparator,
            passed=False,
            # A champion scoring gave no comparison for says why; without that, it was never scored.
            detail=f"champion v{champion} could not be scored on the holdout: {measured.champion_error}"
            if measured.champion_error is not None
            else champion_unknown(champion),
        )
    bound = comparison.low if higher else comparison.high
    value, low, high = (_finite(v) for v in (comparison.difference, comparison.low, comparison.high))
    if value is None or low is None or high is None:
        return CheckResult(
            name=name,
            kind=CheckKind.CHAMPION_CHALLENGER,
            metric=metric,
            threshold=threshold,
            comparator=comparator,
            passed=False,
            detail=f"{metric} is undefined on this holdout: champion and challenger cannot be compared"
            + _outputs_unusable_hint(measured),
        )
    passed = _meets(bound, threshold, comparator)
    side = "lower" if higher else "upper"
    return CheckResult(
        name=name,
        kind=CheckKind.CHAMPION_CHALLENGER,
        metric=metric,
        value=value,
        threshold=threshold,
        comparator=comparator,
        interval=ConfidenceInterval(low=low, high=high, level=comparison.level),
        passed=passed,
        detail=f"challenger {comparison.challenger:.4f} vs champion v{champion} {comparison.champion:.4f}: "
        f"difference {value:+.4f}, {comparison.level:.0%} CI [{low:+.4f}, {high:+.4f}] "
        f"({comparison.resamples} paired resamples); passed when the CI's {side} bound "
        f"{comparator.value} {threshold:+g} (δ = {delta:g})",
    )


def slice_levels_left_out_name(feature: str, metric: str) -> str:
    """The name of the check summing up the levels not checked one by one: the feature followed by ``:``
    where a level's check has ``=``, so no level, whatever its text, gives the same name."""
    return f"slice:{feature}:other-levels:{metric}"


def slice_summary_name(spec: ValidationSpec, measured: Measured) -> str | None:
    """The name of the report's check summing up the slice levels left out, or None when it has none."""
    if spec.slices is None or measured.slice_metric is None or measured.slices_left_out is None:
        return None
    return slice_levels_left_out_name(spec.slices.feature, measured.slice_metric)


def slice_check_name(feature: str, level: SliceMeasure, metric: str) -> str:
    """The name of one level's check: ``slice:<feature>=<text>:<metric>``. The rows without a value, and a
    level whose text another level of another type shares, have the feature followed by ``:`` where a
    plain level's check has ``=`` (``slice:<feature>:missing:<metric>``,
    ``slice:<feature>:<kind>=<text>:<metric>``), so no level, whatever its text, takes their names, and
    neither takes the name of the levels left out (:func:`slice_levels_left_out_name`)."""
    if level.level is None:
        return f"slice:{feature}:missing:{metric}"
    if level.kind is not None:
        return f"slice:{feature}:{level.kind}={level.level}:{metric}"
    return f"slice:{feature}={level.level}:{metric}"


def slice_checks(spec: ValidationSpec, measured: Measured) -> list[CheckResult]:
    """One check per level of the slice feature measured, and one for the levels left out past
    ``max_slice_levels``; small or undefined slices and the levels left out are reported, not judged."""
    rule = spec.slices
    if rule is None or measured.slice_metric is None:
        return []
    metric = measured.slice_metric
    comparator = _comparator(metric)
    threshold = rule.min_value if rule.min_value is not None else spec.thresholds.get(metric)
    checks = []
    for s in measured.slices:
        value = _finite(s.value)
        name = slice_check_name(rule.feature, s, metric)
        base = {"name": name, "kind": CheckKind.SLICE, "metric": metric, "value": value}
        if s.rows < rule.min_rows:
            detail = f"reported, not judged: {s.rows} rows < min_rows {rule.min_rows}"
            checks.append(CheckResult(**base, passed=True, detail=detail))
        elif value is None:
            detail = f"reported, not judged: {metric} is undefined on these {s.rows} rows (one class?)"
            checks.append(CheckResult(**base, passed=True, detail=detail))
        elif threshold is None:
            detail = f"{value:.4f} on {s.rows} rows (no threshold for {metric}: reported only)"
            checks.append(CheckResult(**base, passed=True, detail=detail))
        else:
            passed = _meets(value, threshold, comparator)
            checks.append(
                CheckResult(
                    **base,
                    threshold=threshold,
                    comparator=comparator,
                    passed=passed,
                    detail=f"{value:.4f} {comparator.value if passed else 'misses'} {threshold:g} "
                    f"on {s.rows} rows",
                )
            )
    if (out := measured.slices_left_out) is not None:
        checked = len(measured.slices)
        detail = (
            f"reported, not judged: {out.levels:,} levels of {rule.feature} with {out.rows:,} rows in all "
            f"are not checked one by one: the holdout has {checked + out.levels:,} levels, more than "
            f"max_slice_levels {out.max_slice_levels:,}, and the {checked:,} with the most rows are checked. "
            "A feature of that many levels (an id, a postcode) is seldom meant as slices: slice on a coarser "
            "feature, or raise DRIFTLOOP_VALIDATION_MAX_SLICE_LEVELS"
        )
        name = slice_levels_left_out_name(rule.feature, metric)
        checks.append(CheckResult(name=name, kind=CheckKind.SLICE, metric=metric, passed=True, detail=detail))
    return checks


def signature_check(
    spec: ValidationSpec,
    candidate: ModelSignature,
    champion: ModelSignature | None,
    champion_version: int | None = None,
) -> CheckResult:
    """The candidate takes what the champion takes (clients keep working) and gives the same classes; a
    champion whose signature is unknown (``champion_version`` without ``champion``) is not checked here: the
    champion/challenger check fails saying why."""
    name = "signature-compatible"
    if champion is None:
        detail = (
            f"skipped: {NO_CHAMPION}"
            if champion_version is None
            else f"not checked: champion v{champion_version} is unknown to validation "
            "(see challenger-vs-champion)"
        )
        return CheckResult(name=name, kind=CheckKind.SIGNATURE, passed=True, detail=detail)
    problems = signature_problems(candidate, champion, exact=spec.schema_compatibility == "exact")
    return CheckResult(
        name=name,
        kind=CheckKind.SIGNATURE,
        passed=not problems,
        detail="; ".join(problems)
        if problems
        else f"same features, types, target and classes as the champion ({spec.schema_compatibility})",
    )


def signature_problems(candidate: ModelSignature, champion: ModelSignature, *, exact: bool) -> list[str]:
    """Why the candidate cannot replace the champion for its clients (empty: it can)."""
    problems = []
    if exact and candidate != champion:
        problems.append("signature differs from the champion's and the rule is exact")
    new = {f.name: f for f in candidate.features}
    old = {f.name: f for f in champion.features}
    for missing in sorted(set(old) - set(new)):
        problems.append(f"feature {missing!r} of the champion is gone")
    for added in sorted(set(new) - set(old)):
        problems.append(f"feature {added!r} is new: clients do not send it")
    for shared in sorted(set(new) & set(old)):
        if new[shared].type != old[shared].type:
            problems.append(
                f"feature {shared!r} changed type {old[shared].type.value} -> {new[shared].type.value}"
            )
    if candidate.target != champion.target:
        problems.append(f"target changed {champion.target!r} -> {candidate.target!r}")
    if candidate.task != champion.task:
        problems.append(f"task changed {champion.task.value} -> {candidate.task.value}")
    if candidate.classes != champion.classes:
        problems.append(f"classes changed {champion.classes} -> {candidate.classes}")
    return problems


def latency_check(spec: ValidationSpec, measured: Measured) -> CheckResult:
    """The median batched prediction time per row is within the budget."""
    budget = spec.latency_budget_ms_per_row
    value = measured.latency_ms_per_row
    passed = value <= budget
    return CheckResult(
        name="latency-per-row",
        kind=CheckKind.LATENCY,
        metric="ms_per_row",
        value=value,
        threshold=budget,
        comparator=Comparator.LE,
        passed=passed,
        detail=f"median {value:.4f} ms per row {'within' if passed else 'over'} the budget of {budget:g} ms",
    )


def sanity_checks(measured: Measured) -> list[CheckResult]:
    """Outputs are numbers, and they vary where the inputs do: on a holdout of one row, or of rows that all
    hold the same inputs, any model gives one output, so not-constant is reported, not judged."""
    distinct = measured.distinct_outputs
    if distinct < 2 and not measured.inputs_vary:
        holdout = (
            "the holdout's one row gives the model one input"
            if measured.rows == 1
            else f"the holdout's {measured.rows:,} rows all hold the same inputs"
        )
        varied = CheckResult(
            name="sanity:not-constant",
            kind=CheckKind.SANITY,
            value=float(distinct),
            passed=True,
            detail=f"reported, not judged: {holdout}, to which any model gives one output ({distinct} "
            "distinct); whether its outputs vary takes at least 2 rows with different inputs",
        )
    else:
        varied = CheckResult(
            name="sanity:not-constant",
            kind=CheckKind.SANITY,
            value=float(distinct),
            threshold=2.0,
            comparator=Comparator.GE,
            passed=distinct >= 2,
            detail=f"{distinct} distinct outputs on {measured.rows} rows"
            + ("" if distinct >= 2 else ": the model answers the same for everything"),
        )
    return [
        CheckResult(
            name="sanity:finite-outputs",
            kind=CheckKind.SANITY,
            value=float(measured.nonfinite_outputs),
            threshold=0.0,
            comparator=Comparator.EQ,
            passed=measured.nonfinite_outputs == 0,
            detail=f"{measured.nonfinite_outputs:,} NaN, infinite or out-of-range outputs (beyond float32's "
            f"range: magnitude at most {FLOAT32_MAX:.8g}) on {measured.rows:,} rows"
            + (f", such as {measured.nonfinite_example}" if measured.nonfinite_example is not None else ""),
        ),
        varied,
    ]


UNKNOWN_LABELS_NAMED = 5


def _rows(n: int) -> str:
    return f"{n:,} row" if n == 1 else f"{n:,} rows"


def labels_check(measured: Measured) -> CheckResult:
    """Holdout rows left out for want of a usable label, and classes the candidate never saw: reported, not
    judged (the metrics judge what those rows cost)."""
    total = measured.rows + measured.unlabelled_rows
    parts = []
    if measured.unlabelled_rows:
        what = "missing" + (
            f" or no value of the target's type, such as {', '.join(measured.unusable_labels)}"
            if measured.unusable_labels
            else ""
        )
        parts.append(
            f"{measured.unlabelled_rows:,} of {total:,} holdout rows have no usable label ({what}): left out "
            f"of every check, which ran on the other {measured.rows:,}"
        )
    if measured.unknown_labels:
        rows = sum(measured.unknown_labels.values())
        named = [
            f"{label} ({_rows(n)})"
            for label, n in list(measured.unknown_labels.items())[:UNKNOWN_LABELS_NAMED]
        ]
        more = len(measured.unknown_labels) - UNKNOWN_LABELS_NAMED
        parts.append(
            f"{_rows(rows)} {'has' if rows == 1 else 'have'} a class the candidate never saw in training: "
            f"{', '.join(named)}"
            + (f" and {more} more" if more > 0 else "")
            + "; every metric scores them as the model giving that class probability 0"
        )
    return CheckResult(
        name="sanity:holdout-labels",
        kind=CheckKind.SANITY,
        value=float(measured.unlabelled_rows),
        passed=True,
        detail="; ".join(parts) if parts else f"all {total:,} holdout rows have a usable label",
    )


def judge(
    spec: ValidationSpec,
    *,
    task: Task,
    n_classes: int | None,
    measured: Measured,
    candidate: ModelSignature,
    champion_signature: ModelSignature | None,
    champion_version: int | None,
) -> list[CheckResult]:
    """Every check of the gate, in report order."""
    metric = champion_metric(spec, task, n_classes)
    return [
        *threshold_checks(spec, measured),
        champion_check(spec, metric, measured, champion_version),
        *slice_checks(spec, measured),
        signature_check(spec, candidate, champion_signature, champion_version),
        latency_check(spec, measured),
        *sanity_checks(measured),
        labels_check(measured),
    ]


DETAIL_CHARS_WHEN_CUT = 1_000
"""A detail longer than this is cut in an event whose checks would pass the event size limit."""

FAILED_DETAIL_CHARS_WHEN_CUT = 200
"""A failed check's detail longer than this is cut when even the failed checks would pass the limit."""


@dataclass(frozen=True)
class Carried:
    """What a validation event carries of its report: checks, and the names of the failed ones (which may
    name failed checks the event leaves out)."""

    checks: list[CheckResult]
    failed_checks: list[str]
    slice_summary: str | None = None
    """The name of the check summing up the slice levels left out (:func:`slice_summary_name`), if the report
    has one: the only word an event has of those levels, it is left out after every other check."""


def _json_bytes(check: CheckResult) -> int:
    return len(check.model_dump_json().encode())


def _name_bytes(name: str) -> int:
    # The name as a JSON string, and its comma.
    return len(orjson.dumps(name)) + 1


_CUT_DETAIL = re.compile(r"(.*)… \(([0-9,]+) more characters in the stored report\)", re.DOTALL)


def _shortened(check: CheckResult, chars: int) -> CheckResult:
    # A detail cut before is cut again from its start, counting from the stored report's length.
    kept, more = check.detail, 0
    if (was_cut := _CUT_DETAIL.fullmatch(check.detail)) is not None:
        kept, more = was_cut[1], int(was_cut[2].replace(",", ""))
    if len(kept) <= chars:
        return check
    more += len(kept) - chars
    detail = f"{kept[:chars]}… ({more:,} more characters in the stored report)"
    return check.model_copy(update={"detail": detail})


def _leave_out_order(check: CheckResult, slice_summary: str | None) -> int:
    """Which checks an event leaves out first: passed before failed, slices before the others, and among
    passed slices those only reported before those judged; the slice summary last."""
    if check.name == slice_summary:
        return 5
    if check.passed:
        if check.kind is CheckKind.SLICE:
            return 0 if check.threshold is None else 1
        return 2
    return 3 if check.kind is CheckKind.SLICE else 4


def cut_checks(carried: Carried, excess: int) -> Carried:
    """What an event carries of its report when all of ``carried`` would pass the event size limit by
    ``excess`` bytes: each step is taken only while less than about ``excess`` bytes are freed.

    1. details longer than 1,000 characters are cut;
    2. passed checks are left out: slices only reported, then passed slices, then the other passed checks;
    3. failed checks' details longer than 200 characters are cut;
    4. failed checks are left out, slices first, their names staying in ``failed_checks``;
    5. the slice summary (``carried.slice_summary``) is left out;
    6. names of failed checks left out are dropped from ``failed_checks``.

    The slice summary goes so late because it alone says how many levels were never checked one by one,
    while a failed check left out stays named. Within a step the last in report order goes first. One check
    always stays: when any failed, a failed one (one that is no slice if there is one, else the smallest),
    named in ``failed_checks``; so the verdict is the report's, whatever is cut. The stored report keeps
    every check in full. Nothing changes when nothing more can be cut."""
    shown = list(carried.checks)
    names = list(carried.failed_checks)
    freed = 0

    def order(check: CheckResult) -> int:
        return _leave_out_order(check, carried.slice_summary)

    def shorten(chars: int, *, failed_only: bool) -> None:
        nonlocal freed
        for i, check in enumerate(shown):
            if failed_only and check.passed:
                continue
            short = _shortened(check, chars)
            if short is not check:
                freed += _json_bytes(check) - _json_bytes(short)
                shown[i] = short

    failed = [i for i, c in enumerate(shown) if not c.passed]
    if failed:
        keep = min(failed, key=lambda i: (shown[i].kind is CheckKind.SLICE, _json_bytes(shown[i]), i))
    else:
        keep = min(range(len(shown)), key=lambda i: (-order(shown[i]), i), default=-1)
    left_out: set[int] = set()

    def leave_out(orders: tuple[int, ...]) -> None:
        nonlocal freed
        candidates = sorted(
            (i for i, c in enumerate(shown) if i != keep and order(c) in orders),
            key=lambda i: (order(shown[i]), -i),
        )
        for i in candidates:
            if freed >= excess:
                return
            left_out.add(i)
            freed += _json_bytes(shown[i]) + 1  # and its comma; a failed one stays named

    shorten(DETAIL_CHARS_WHEN_CUT, failed_only=False)
    if freed < excess:
        leave_out((0, 1, 2))
    if freed < excess:
        shorten(FAILED_DETAIL_CHARS_WHEN_CUT, failed_only=True)
    if freed < excess:
        leave_out((3, 4))
    if freed < excess:
        leave_out((5,))
    if freed < excess:
        carried_names = {c.name for i, c in enumerate(shown) if i not in left_out}
        for j in reversed(range(len(names))):
            if freed >= excess:
                break
            if names[j] not in carried_names:
                freed += _name_bytes(names.pop(j))
    return Carried(
        checks=[c for i, c in enumerate(shown) if i not in left_out],
        failed_checks=names,
        slice_summary=carried.slice_summary,
    )


NAME_CHARS_IN_MESSAGES = 80
"""A check name longer than this is cut where a message names it (a slice level can be any length)."""


def too_large_to_announce(outcome: ValidationPassed | ValidationFailed, *, size: int, limit: int) -> str:
    """Why a report cannot be announced: even cut as far as it goes, its event passes the event size limit."""
    names = ", ".join(
        n if len(n) <= NAME_CHARS_IN_MESSAGES else f"{n[:NAME_CHARS_IN_MESSAGES]}…"
        for n in (c.name for c in outcome.checks)
    )
    return (
        f"{type(outcome).__name__} of {outcome.model} version {outcome.model_version} (report "
        f"{outcome.report_id}) would be {size:,} bytes with as little as it can carry, "
        f"{len(outcome.checks)} of its {outcome.checks_total} checks ({names}), over the limit of {limit} "
        "bytes (max_event_bytes) that consumers accept: the candidate is not gated and no report is stored; "
        "raise the limit (and the topic's message size) and replay this dead letter"
    )


def failure(name: str, detail: str) -> CheckResult:
    """A check that could not even be measured (model or holdout unreadable): it fails, with the reason."""
    return CheckResult(name=name, kind=CheckKind.SANITY, passed=False, detail=detail)


def report_id_for(model: str, version: int) -> str:
    """One report per candidate version."""
    return f"vr-{model}-v{version}"
