"""Measuring a candidate (and its champion) on the candidate's holdout: metrics, a paired bootstrap, slices,
batched latency and output sanity. CPU work on fitted models and frames; no database, no network."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from contracts.common import ModelSignature, Task
from libs.metrics import Outputs, all_metrics, metric, model_outputs, paired_bootstrap_difference
from libs.modelspec import ValidationSpec
from services.validation.domain import (
    ChampionComparison,
    Measured,
    SliceMeasure,
    champion_metric,
    slice_metric,
)

MISSING_LEVEL = "__missing__"


class HoldoutMismatch(ValueError):
    """The holdout lacks a column the model needs."""


def _inputs(frame: pd.DataFrame, signature: ModelSignature, who: str) -> pd.DataFrame:
    names = [f.name for f in signature.features]
    missing = [n for n in [*names, signature.target] if n not in frame.columns]
    if missing:
        raise HoldoutMismatch(f"the holdout has no column {missing[0]!r}, which the {who} needs")
    return frame[names]


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
) -> Measured:
    """Everything the gate needs, measured on the same rows for candidate and champion."""
    x = _inputs(holdout, signature, "candidate")
    y = holdout[signature.target].to_numpy()
    outputs = model_outputs(candidate, signature.task, x, y)
    n_classes = len(outputs.classes) if signature.task is Task.CLASSIFICATION else None
    values = np.asarray(outputs.proba if outputs.proba is not None else outputs.pred, dtype=float)
    bad = ~np.isfinite(values)
    nonfinite = int(bad.any(axis=1).sum() if values.ndim > 1 else bad.sum())
    distinct = int(np.unique(np.round(values, 12), axis=0).shape[0])

    comparison: ChampionComparison | None = None
    champion_error: str | None = None
    if champion is not None and champion_signature is not None:
        metric_name = champion_metric(spec, signature.task, n_classes)
        try:
            theirs = model_outputs(
                champion, champion_signature.task, _inputs(holdout, champion_signature, "champion"), y
            )
            comparison = _compare(spec, metric_name, outputs, theirs, seed)
        except Exception as exc:
            # Whatever the champion raises on this holdout (a feature that changed type makes numpy's
            # isnan refuse it: TypeError) is the champion's, never the candidate's.
            champion_error = str(exc) if isinstance(exc, HoldoutMismatch) else f"{type(exc).__name__}: {exc}"

    slices: list[SliceMeasure] = []
    feature = spec.slices.feature if spec.slices is not None else None
    slice_name = None
    if feature is not None and feature in holdout.columns:
        slice_name = slice_metric(spec, signature.task, n_classes)
        levels = holdout[feature].astype(object).where(holdout[feature].notna(), MISSING_LEVEL).astype(str)
        for level in sorted(levels.unique()):
            mask = (levels == level).to_numpy()
            slices.append(
                SliceMeasure(level=level, rows=int(mask.sum()), value=metric(outputs, slice_name, mask))
            )

    return Measured(
        rows=outputs.rows,
        metrics=all_metrics(outputs),
        nonfinite_outputs=nonfinite,
        distinct_outputs=distinct,
        latency_ms_per_row=latency_ms_per_row(
            candidate, signature.task, x, repeats=latency_repeats, batch_rows=latency_batch_rows
        ),
        champion=comparison,
        champion_error=champion_error,
        slice_feature=feature,
        slice_metric=slice_name,
        slices=slices,
    )


def _compare(
    spec: ValidationSpec, name: str, ours: Outputs, theirs: Outputs, seed: int
) -> ChampionComparison:
    if ours.task is Task.CLASSIFICATION and list(ours.classes) != list(theirs.classes):
        raise ValueError(f"the champion's classes {list(theirs.classes)} differ from {list(ours.classes)}")
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
    """Median over ``repeats`` timed runs of one batch, per row: robust to a busy neighbour on the machine."""
    batch = x.iloc[:batch_rows]
    if len(batch) == 0:
        return 0.0
    predict = model.predict_proba if task is Task.CLASSIFICATION else model.predict
    predict(batch)  # the first call pays for lazy set-up, not for the model
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000.0 / len(batch)
