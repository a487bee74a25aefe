"""Measuring a candidate (and its champion) on the candidate's holdout: metrics, a paired bootstrap, slices,
batched latency and output sanity. CPU work on fitted models and frames; no database, no network."""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from contracts.common import FeatureType, ModelSignature, Task
from libs.bus.core import is_transient
from libs.errors import shown
from libs.metrics import (
    Outputs,
    all_metrics,
    bool_label,
    metric,
    model_outputs,
    number_label,
    paired_bootstrap_difference,
)
from libs.modelspec import FLOAT32_MAX, ValidationSpec
from libs.profiles import category_key
from services.validation.domain import (
    ChampionComparison,
    Measured,
    SliceMeasure,
    SlicesLeftOut,
    champion_metric,
    slice_metric,
)


class HoldoutMismatch(ValueError):
    """The holdout lacks a column the model needs."""


class HoldoutUnlabelled(ValueError):
    """No row of the holdout has a label the metrics can use."""


class CandidateFailed(Exception):
    """The candidate raised while scoring the holdout, or returned outputs that are not those of its rows:
    the candidate's fault, whatever the exception."""


CANDIDATE_ERROR_MAX_CHARS = 1_000
"""Characters of a candidate's own error message that a check's detail quotes (a model's message may quote
the whole input it refused)."""


def _candidate_failed(exc: Exception) -> CandidateFailed:
    text = str(exc)
    if len(text) > CANDIDATE_ERROR_MAX_CHARS:
        text = f"{text[:CANDIDATE_ERROR_MAX_CHARS]}… ({len(text):,} characters)"
    return CandidateFailed(f"{type(exc).__name__}: {text}")


def _scored_by_candidate(candidate: Any, task: Task, x: pd.DataFrame, y: np.ndarray) -> Outputs:
    """The candidate's outputs on ``x``; raises CandidateFailed for whatever it raises (an error of the
    infrastructure, which the bus retries, excepted) or for outputs that are not one per row."""
    try:
        outputs = model_outputs(candidate, task, x, y)
    except MemoryError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        raise _candidate_failed(exc) from exc
    rows = len(x)
    if outputs.proba is not None:
        shape = outputs.proba.shape
        if shape != (rows, len(outputs.classes)):
            raise CandidateFailed(
                f"its predict_proba returned shape {shape} for {rows:,} rows and "
                f"{len(outputs.classes):,} classes"
            )
    elif outputs.pred.shape != (rows,):
        raise CandidateFailed(f"its predict returned {outputs.pred.size:,} values for {rows:,} rows")
    return outputs


@dataclass(frozen=True)
class HoldoutLabels:
    """A holdout's label column as the metrics take it: which rows have a usable label, and those labels."""

    usable: np.ndarray
    values: np.ndarray
    missing: int
    unusable: tuple[str, ...]
    """A few of the values present that are no label of the target's type."""


LabelKind = Literal["number", "boolean", "any"]
UNUSABLE_EXAMPLES = 3


def _label_kind(task: Task, classes: Sequence[Any]) -> LabelKind:
    if task is Task.REGRESSION:
        return "number"
    if classes and all(isinstance(c, bool | np.bool_) for c in classes):
        return "boolean"
    if classes and all(isinstance(c, numbers.Real) and not isinstance(c, bool | np.bool_) for c in classes):
        return "number"
    return "any"


def read_labels(column: pd.Series, task: Task, classes: Sequence[Any]) -> HoldoutLabels:
    """Which rows of a label column carry a label, read as the target's type the way training reads
    traffic labels: a regressor takes finite numbers and their text; a classifier whose classes are numbers
    takes those too, one whose classes are booleans takes booleans, "True"/"False" and 0 or 1, one whose
    classes are text takes anything present. A missing value (null, NaN) is no label; nor is a value the
    target's type cannot hold (text in a numeric label column, as a CSV gives it), nor a regression label
    beyond float32's range, which training refuses as a target. A label of the right
    type that is none of the classes is a label: a class the model never saw."""
    missing = column.isna().to_numpy()
    present = column[~missing]
    kind = _label_kind(task, classes)
    values: np.ndarray
    if kind == "any":
        values = present.to_numpy()
        ok = np.ones(len(values), dtype=bool)
    elif (
        kind == "number"
        and pd.api.types.is_numeric_dtype(present)
        and not pd.api.types.is_bool_dtype(present)
    ):
        numeric = present.to_numpy(dtype=float)
        ok = np.isfinite(numeric)
        if task is Task.REGRESSION:
            ok &= np.abs(numeric) <= FLOAT32_MAX
        # A classifier's labels keep their type (an integer class beyond 2**53 stays itself); a nullable
        # column (the registry's Int64) has no missing value left here, so its numpy type holds it.
        own = getattr(present.dtype, "numpy_dtype", present.dtype)
        values = (present.to_numpy(dtype=own) if task is Task.CLASSIFICATION else numeric)[ok]
    elif kind == "boolean" and pd.api.types.is_bool_dtype(present):
        values = present.to_numpy(dtype=bool)
        ok = np.ones(len(values), dtype=bool)
    else:  # text, or another type than the target's: value by value (the rare case, never the hot path)
        read = (
            bool_label
            if kind == "boolean"
            else _regression_label
            if task is Task.REGRESSION
            else number_label
        )
        converted = [read(v) for v in present.tolist()]
        ok = np.array([v is not None for v in converted], dtype=bool)
        kept = [v for v in converted if v is not None]
        values = np.array(kept, dtype=float if task is Task.REGRESSION else object)
    unusable: list[str] = []
    if not ok.all():
        for v in present[~ok].tolist():
            text = repr(v)
            if text not in unusable:
                unusable.append(text)
            if len(unusable) == UNUSABLE_EXAMPLES:
                break
    usable = ~missing
    usable[usable] = ok
    return HoldoutLabels(usable=usable, values=values, missing=int(missing.sum()), unusable=tuple(unusable))


def _regression_label(value: Any) -> int | float | None:
    """A regression label: a number within float32's range (:data:`libs.modelspec.FLOAT32_MAX`), as
    training fits targets; None for anything else (a target near 1e200 made rmse overflow to infinity)."""
    number = number_label(value)
    return number if number is not None and abs(number) <= FLOAT32_MAX else None


def _unlabelled_message(target: str, labels: HoldoutLabels, kind: LabelKind, classes: Sequence[Any]) -> str:
    rows = labels.usable.size
    parts = []
    if labels.missing:
        parts.append(f"{labels.missing:,} missing")
    if labels.unusable:
        wanted = {"number": "a number", "boolean": "a boolean", "any": "a label"}[kind]
        parts.append(f"{rows - labels.missing:,} not {wanted} (such as {', '.join(labels.unusable)})")
    of_classes = f"; the candidate's classes are {list(classes)}" if classes else ""
    return (
        f"the holdout's label column {target!r} has no usable label in its {rows:,} rows: "
        f"{', '.join(parts) or 'no rows'}{of_classes}"
    )


def _unknown_labels(outputs: Outputs, values: np.ndarray) -> dict[str, int]:
    """Labels of the holdout that are none of the model's classes, with their row counts (most first)."""
    if outputs.task is not Task.CLASSIFICATION:
        return {}
    unknown = outputs.y < 0
    if not unknown.any():
        return {}
    counts = pd.Series([str(v.item() if isinstance(v, np.generic) else v) for v in values[unknown]])
    return {str(k): int(n) for k, n in counts.value_counts().items()}


def _inputs(frame: pd.DataFrame, signature: ModelSignature, who: str) -> pd.DataFrame:
    names = [f.name for f in signature.features]
    missing = [n for n in [*names, signature.target] if n not in frame.columns]
    if missing:
        raise HoldoutMismatch(f"the holdout has no column {missing[0]!r}, which the {who} needs")
    return frame[names]


NO_NUMBER_EXAMPLES = 3


def _numeric_features_hold_numbers(frame: pd.DataFrame, signature: ModelSignature) -> None:
    """Refuse (HoldoutMismatch, naming the feature and such values) a holdout whose numeric feature holds a
    value that reads as no number, such as ``"abc"``, an infinity, or a finite number beyond float32's range
    (:data:`libs.modelspec.FLOAT32_MAX`): no model is given one (training refuses them in its rows, serving
    answers 422), and the failure is the holdout's, not the candidate's (an infinity failed candidate-scores;
    1e300 was scored, and the candidate judged on an input it can never be served). Text that reads as a
    number within that range is left to the model."""
    for feature in signature.features:
        if feature.type is not FeatureType.NUMERIC:
            continue
        column = frame[feature.name]
        if pd.api.types.is_numeric_dtype(column):
            # Integers and booleans hold no value beyond float32's range (an int64 is at most 9.2e18): only a
            # float column is looked at (one pass, at C speed).
            if not pd.api.types.is_float_dtype(column):
                continue
            values = column.to_numpy(dtype=float, na_value=np.nan)
        else:
            read = [_as_number(v) for v in column[column.notna()].tolist()]
            bad = [v for v, number in read if number is None]
            if bad:
                examples = list(dict.fromkeys(shown(v if isinstance(v, str) else repr(v)) for v in bad))
                raise HoldoutMismatch(
                    f"the holdout's numeric feature {shown(feature.name)} holds {len(bad):,} value(s) that "
                    f"are no number (of {len(column):,} rows), such as "
                    f"{', '.join(examples[:NO_NUMBER_EXAMPLES])}"
                )
            values = np.array([number for _, number in read], dtype=float)
        magnitude = np.abs(values)
        if not (magnitude > FLOAT32_MAX).any():
            continue
        infinite = int(np.isinf(values).sum())
        if infinite:
            raise HoldoutMismatch(
                f"the holdout's numeric feature {shown(feature.name)} holds an infinity in {infinite:,} "
                f"row(s) (of {len(column):,} rows): no model takes one; replace them by a finite value or "
                "leave them empty (missing values are imputed)"
            )
        beyond = int((magnitude > FLOAT32_MAX).sum())
        largest = values[np.nanargmax(magnitude)]
        raise HoldoutMismatch(
            f"the holdout's numeric feature {shown(feature.name)} holds a value beyond float32's range "
            f"(magnitude at most {FLOAT32_MAX:.8g}, where models compute) in {beyond:,} row(s) "
            f"(of {len(column):,} rows), such as {largest:.6g}: no model is given one "
            "(training refuses it, serving answers 422); replace them by a value within that range or leave "
            "them empty (missing values are imputed)"
        )


LEVEL_EXAMPLES = 3


def _categorical_features_hold_levels(frame: pd.DataFrame, signature: ModelSignature) -> None:
    """Refuse (HoldoutMismatch, naming the feature and such values) a holdout whose categorical feature holds
    values of another type than the levels the candidate learned: numbers or booleans where it learned text,
    text, booleans, fractions or infinities where it learned integers. None of them can be one of its levels
    (serving answers 422 wrong-type); scikit-learn's encoder raised on numbers among text levels, which failed
    candidate-scores and blamed the model for the holdout, and took text among integer levels for unseen
    levels, scoring the candidate on inputs it was never given. Text levels that all read as numbers are left
    alone: the training column may have held numbers, which the signature keeps as text when they are no
    integers (``1.5``); so are levels of booleans or of mixed types."""
    for feature in signature.features:
        levels = feature.categories or []
        if feature.type is not FeatureType.CATEGORICAL or not levels:
            continue
        if all(isinstance(level, str) for level in levels):
            if all(_as_number(level)[1] is not None for level in levels):
                continue
            learned, fits = "text", _is_text
            other = "a number or a boolean"
        elif all(isinstance(level, int) and not isinstance(level, bool) for level in levels):
            learned, fits = "integers", _is_integer
            other = "text, a boolean, a fraction or an infinity"
        else:
            continue
        column = frame[feature.name]
        present = column[column.notna()]
        if learned == "text" and _all_text(present):
            continue  # the common case, told at C speed
        if (
            learned == "integers"
            and pd.api.types.is_numeric_dtype(present)
            and not pd.api.types.is_bool_dtype(present)
        ):
            if pd.api.types.is_integer_dtype(present):
                continue
            numbers = present.to_numpy(dtype=float)
            # Finite too: inf == round(inf), and an infinity let through made the candidate's encoder raise,
            # failing candidate-scores for the holdout's value.
            if np.all(np.isfinite(numbers) & (numbers == np.round(numbers))):
                continue
        bad = [v for v in present.tolist() if not fits(v)]
        if not bad:
            continue
        examples = ", ".join(repr(v) for v in list(dict.fromkeys(bad))[:NO_NUMBER_EXAMPLES])
        named = ", ".join(shown(v) if isinstance(v, str) else repr(v) for v in levels[:LEVEL_EXAMPLES])
        more = f" and {len(levels) - LEVEL_EXAMPLES:,} more" if len(levels) > LEVEL_EXAMPLES else ""
        no = "text" if learned == "text" else "integer"
        raise HoldoutMismatch(
            f"the holdout's categorical feature {shown(feature.name)} holds {len(bad):,} value(s) that are "
            f"no {no} (of {len(column):,} rows), such as {examples}: the candidate learned its levels as "
            f"{learned} ({named}{more}), which {other} is none of; write them as {learned}"
        )


def _all_text(values: pd.Series) -> bool:
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype(object)
    return pd.api.types.is_string_dtype(values) and pd.api.types.infer_dtype(values) in ("string", "empty")


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    return isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())


def _as_number(value: Any) -> tuple[Any, float | None]:
    """The value, and the number it reads as (None: it reads as no number)."""
    try:
        return value, float(value)
    except (TypeError, ValueError, OverflowError):
        return value, None


def measure(
    spec: ValidationSpec,
    *,
    candidate: Any,
    signature: ModelSignature,
    holdout: pd.DataFrame,
    champion: Any | None = None,
    champion_signature: ModelSignature | None = None,
    seed: int = 0,
    latency_repeats: int = 7,
    latency_batch_rows: int = 1000,
    max_slice_levels: int = 10_000,
) -> Measured:
    """Everything the gate needs, measured on the same rows for candidate and champion: the holdout rows
    with a usable label (the others are left out of every check and counted)."""
    _inputs(holdout, signature, "candidate")
    _numeric_features_hold_numbers(holdout, signature)
    _categorical_features_hold_levels(holdout, signature)
    try:
        classes = (
            tuple(c.item() if isinstance(c, np.generic) else c for c in candidate.classes_)
            if signature.task is Task.CLASSIFICATION
            else ()
        )
    except Exception as exc:  # no classes_, or one that is no sequence: the candidate is no classifier
        raise _candidate_failed(exc) from exc
    labels = read_labels(holdout[signature.target], signature.task, classes)
    if not labels.usable.any():
        kind = _label_kind(signature.task, classes)
        raise HoldoutUnlabelled(_unlabelled_message(signature.target, labels, kind, classes))
    unlabelled = int((~labels.usable).sum())
    if unlabelled:
        holdout = holdout[labels.usable].reset_index(drop=True)
    x = _inputs(holdout, signature, "candidate")
    y = labels.values
    outputs = _scored_by_candidate(candidate, signature.task, x, y)
    n_classes = len(outputs.classes) if signature.task is Task.CLASSIFICATION else None
    values = _output_values(outputs)
    unusable = _unusable_outputs(values)
    with np.errstate(over="ignore"):  # rounding 1e300 to 12 decimals overflows: infinity is as distinct
        distinct = int(np.unique(np.round(values, 12), axis=0).shape[0])
    # Looked at only when the outputs never vary (a model that answers differently was given different
    # inputs): a column with two values, a missing one counting as a value, stops the search.
    inputs_vary = distinct >= 2 or any(x[name].nunique(dropna=False) > 1 for name in x.columns)

    comparison: ChampionComparison | None = None
    champion_error: str | None = None
    champion_outputs_unusable: str | None = None
    if champion_signature is not None and champion_signature.task is not signature.task:
        # The model's spec was put again with the other task: the champion is not even scored (rmse of a
        # classifier raised KeyError in our own comparison, and the candidate was never judged).
        champion_error = (
            f"the champion is a {champion_signature.task.value} model and the candidate a "
            f"{signature.task.value} one: no metric measures both"
        )
    elif champion is not None and champion_signature is not None:
        metric_name = champion_metric(spec, signature.task, n_classes)
        theirs: Outputs | None = None
        try:
            theirs = model_outputs(
                champion, champion_signature.task, _inputs(holdout, champion_signature, "champion"), y
            )
        except MemoryError:
            raise
        except Exception as exc:
            # Whatever the champion raises on this holdout (a feature that changed type makes numpy's
            # isnan refuse it: TypeError) is the champion's, never the candidate's; an outage (an OSError, a
            # timeout) is nobody's and must not judge the candidate: the bus retries the event.
            if is_transient(exc):
                raise
            champion_error = str(exc) if isinstance(exc, HoldoutMismatch) else f"{type(exc).__name__}: {exc}"
        if theirs is not None:
            if outputs.task is Task.CLASSIFICATION and list(outputs.classes) != list(theirs.classes):
                champion_error = (
                    f"the champion's classes {list(theirs.classes)} differ from the candidate's "
                    f"{list(outputs.classes)}"
                )
            elif (theirs_unusable := _unusable_outputs(_output_values(theirs))).rows:
                # The champion's own outputs make its metric meaningless (rmse of 1e200 is infinite): compared
                # with, it failed a sound candidate as "undefined", or (4e38, finite) passed any candidate.
                champion_outputs_unusable = (
                    f"its outputs on {theirs_unusable.rows:,} of the {theirs.rows:,} holdout rows are "
                    f"{UNUSABLE_OUTPUTS}, such as {theirs_unusable.example}"
                )
            else:
                # Our own computation on both models' outputs: what it raises is a bug of validation, which
                # the bus retries and dead-letters, never a verdict on either model.
                comparison = _compare(spec, metric_name, outputs, theirs, seed)

    slices: list[SliceMeasure] = []
    slices_left_out: SlicesLeftOut | None = None
    feature = spec.slices.feature if spec.slices is not None else None
    slice_name = None
    if feature is not None and feature in holdout.columns:
        slice_name = slice_metric(spec, signature.task, n_classes)
        codes, names = slice_levels(holdout[feature])
        # Each level measured on its own rows only: a metric over every row with the others masked out was
        # rows x levels of work (hours for millions of rows of thousands of stores).
        sizes = np.bincount(codes, minlength=len(names))
        checked = np.arange(len(names))
        if len(names) > max_slice_levels:
            # Cut before any metric is computed: the levels with the most rows, ties in text order (the names
            # are sorted, the rows without a value last, and the sort stable), reported back in that order.
            checked = np.sort(np.argsort(-sizes, kind="stable")[:max_slice_levels])
            slices_left_out = SlicesLeftOut(
                levels=len(names) - len(checked),
                rows=int(len(codes) - sizes[checked].sum()),
                max_slice_levels=max_slice_levels,
            )
        order = np.argsort(codes, kind="stable")
        bounds = np.concatenate(([0], np.cumsum(sizes)))
        for code in checked:
            rows = order[bounds[code] : bounds[code + 1]]
            level, level_kind = names[code]
            slices.append(
                SliceMeasure(
                    level=level,
                    rows=int(rows.size),
                    value=metric(outputs.of_rows(rows), slice_name),
                    kind=level_kind,
                )
            )

    try:
        latency = latency_ms_per_row(
            candidate, signature.task, x, repeats=latency_repeats, batch_rows=latency_batch_rows
        )
    except MemoryError:
        raise
    except Exception as exc:  # a candidate that scored the holdout once and fails on a batch of it
        if is_transient(exc):
            raise
        raise _candidate_failed(exc) from exc

    return Measured(
        rows=outputs.rows,
        metrics=all_metrics(outputs),
        nonfinite_outputs=unusable.rows,
        nonfinite_example=unusable.example,
        distinct_outputs=distinct,
        latency_ms_per_row=latency,
        champion=comparison,
        champion_error=champion_error,
        champion_outputs_unusable=champion_outputs_unusable,
        slice_feature=feature,
        slice_metric=slice_name,
        slices=slices,
        slices_left_out=slices_left_out,
        unlabelled_rows=unlabelled,
        unusable_labels=labels.unusable,
        unknown_labels=_unknown_labels(outputs, y),
        inputs_vary=inputs_vary,
    )


_KINDS = {str: "text", int: "integer", float: "number", bool: "boolean"}


def _level_of(value: Any) -> tuple[str, str]:
    """A present value's level as (text, kind): the text categories are counted under
    (:func:`~libs.profiles.category_key`) and its type; 1.0 is the integer 1 (JSON has one kind of number)."""
    if isinstance(value, np.generic):
        value = value.item()
    kind = type(value)
    if kind is float and value.is_integer():
        kind = int
    return category_key(value), _KINDS.get(kind, kind.__name__)


def slice_levels(column: pd.Series) -> tuple[np.ndarray, list[tuple[str | None, str | None]]]:
    """Each row's level of the slice feature (an index into the levels) and the levels, as (text, kind):
    sorted by text, the rows without a value last as the level (None, None). Values are one level when they
    are one value to the model's categories (the integer 1 and the float 1.0), two when their types differ
    (the integer 1 and the text "1", the boolean True and the text "True"): such levels share their text
    and keep their kind, which names their checks apart; every other level's kind is None."""
    present = column.notna().to_numpy()
    values = column[present]
    keyed: list[tuple[str, str]] = []
    if values.dtype == object and pd.api.types.infer_dtype(values, skipna=False) != "string":
        # One type at a time: pandas takes values that compare equal for one (True and 1 and 1.0), which may
        # be two levels; and a value that cannot be hashed (a list) by its text. Text alone, the common case,
        # is factorized at once.
        types = values.map(type)
        codes = np.empty(len(values), dtype=np.intp)
        for t in pd.unique(types):
            mask = (types == t).to_numpy()
            hashable = t.__hash__ is not None
            found, distinct = pd.factorize(values[mask] if hashable else values[mask].map(str))
            codes[mask] = found + len(keyed)
            keyed.extend(_level_of(u) if hashable else (u, t.__name__) for u in distinct.tolist())
    else:
        codes, distinct = pd.factorize(values)
        keyed.extend(_level_of(u) for u in distinct.tolist())
    levels = sorted(set(keyed))
    rank = {level: i for i, level in enumerate(levels)}
    texts = pd.Series([text for text, _ in levels], dtype=object)
    shared = set(texts[texts.duplicated()])
    row_levels = np.full(len(column), len(levels), dtype=np.intp)  # the rows without a value: the last
    row_levels[present] = np.array([rank[k] for k in keyed], dtype=np.intp)[codes]
    named: list[tuple[str | None, str | None]] = [
        (text, kind if text in shared else None) for text, kind in levels
    ]
    if not present.all():
        named.append((None, None))
    return row_levels, named


UNUSABLE_OUTPUTS = f"NaN, infinite or beyond float32's range (magnitude at most {FLOAT32_MAX:.8g})"
"""What makes a model's output unusable: no metric of it means anything (rmse of 1e200 overflows to
infinity), and no model is served or fitted beyond float32's range (:data:`libs.modelspec.FLOAT32_MAX`)."""


@dataclass(frozen=True)
class UnusableOutputs:
    """Rows whose output (a prediction, or any of a row's probabilities) is unusable, and one such value."""

    rows: int
    example: str | None


def _output_values(outputs: Outputs) -> np.ndarray:
    return np.asarray(outputs.proba if outputs.proba is not None else outputs.pred, dtype=float)


def _unusable_outputs(values: np.ndarray) -> UnusableOutputs:
    """The rows of ``values`` holding a NaN, an infinity or a number beyond float32's range."""
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(values) <= FLOAT32_MAX)  # NaN compares false: unusable too
    rows = bad.any(axis=1) if values.ndim > 1 else bad
    count = int(rows.sum())
    return UnusableOutputs(rows=count, example=f"{values[bad][0]:.6g}" if count else None)


def _compare(
    spec: ValidationSpec, name: str, ours: Outputs, theirs: Outputs, seed: int
) -> ChampionComparison:
    rule = spec.champion
    diff, low, high = paired_bootstrap_difference(
        ours, theirs, name, resamples=rule.resamples, level=rule.confidence_level, seed=seed
    )
    return ChampionComparison(
        metric=name,
        challenger=metric(ours, name),
        champion=metric(theirs, name),
        difference=diff,
        low=low,
        high=high,
        level=rule.confidence_level,
        resamples=rule.resamples,
    )


def latency_ms_per_row(model: Any, task: Task, x: pd.DataFrame, *, repeats: int, batch_rows: int) -> float:
    """Median over ``repeats`` timed runs of one batch of ``batch_rows`` rows, per row: robust to a busy
    neighbour on the machine. A holdout of fewer rows is repeated to fill the batch: a call's fixed cost
    divided among a few rows is no per-row cost (a model of 0.05 ms a row in batches measured 24 ms on one
    row, and failed the budget for the holdout's size)."""
    if len(x) == 0:
        return 0.0
    batch = x.iloc[:batch_rows] if len(x) >= batch_rows else x.iloc[np.arange(batch_rows) % len(x)]
    predict = model.predict_proba if task is Task.CLASSIFICATION else model.predict
    predict(batch)  # the first call pays for lazy set-up, not for the model
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000.0 / len(batch)
