"""Model metrics, one definition each, shared by training (holdout metrics) and validation (gates).

Every metric is computed from per-row weights, so the same code gives the point estimate (all weights 1),
a paired bootstrap (weights = how often each row was drawn) and a slice (weights 0 outside it). Training's
holdout metrics and validation's recomputed ones therefore agree to the last digit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from contracts.common import Task

LOG_LOSS_EPS = 1e-15
# Resamples of a bootstrap drawn at once, and the cells (resamples x rows) one chunk may hold: its draws, its
# counts and its weights take 8 bytes a cell each, so about 100 MB whatever the holdout's size (100
# resamples of 5 million rows at once were 12 GB). The draws come from one stream whatever the chunk size,
# so chunking changes no interval.
BOOTSTRAP_CHUNK_RESAMPLES = 100
BOOTSTRAP_CHUNK_CELLS = 1 << 22


@dataclass(frozen=True)
class MetricDef:
    """A metric's name, the task it applies to and its direction."""

    name: str
    task: Task
    higher_is_better: bool
    binary_only: bool = False
    description: str = ""


METRICS: dict[str, MetricDef] = {
    m.name: m
    for m in (
        MetricDef("accuracy", Task.CLASSIFICATION, True, description="share of rows classified right"),
        MetricDef(
            "f1", Task.CLASSIFICATION, True, description="F1 of the positive class (binary), else macro F1"
        ),
        MetricDef(
            "roc_auc",
            Task.CLASSIFICATION,
            True,
            binary_only=True,
            description="area under the ROC curve of the positive-class score (binary only)",
        ),
        MetricDef("log_loss", Task.CLASSIFICATION, False, description="mean negative log-likelihood"),
        MetricDef("rmse", Task.REGRESSION, False, description="root mean squared error"),
        MetricDef("mae", Task.REGRESSION, False, description="mean absolute error"),
        MetricDef("r2", Task.REGRESSION, True, description="coefficient of determination"),
    )
}


def metrics_for(task: Task, n_classes: int | None = None) -> list[str]:
    """The metric names that apply to a task (roc_auc only for two classes, when the count is known)."""
    return [
        m.name
        for m in METRICS.values()
        if m.task is task and not (m.binary_only and n_classes is not None and n_classes != 2)
    ]


def primary_metric(task: Task, n_classes: int | None = None) -> str:
    """The metric champion/challenger compares when the spec names none."""
    if task is Task.REGRESSION:
        return "rmse"
    return "roc_auc" if n_classes in (None, 2) else "accuracy"


@dataclass(frozen=True)
class Outputs:
    """A model's outputs on labelled rows, encoded for the metrics.

    Classification: ``y`` and ``pred`` are class indices into ``classes`` (``y`` is -1 for a label the
    model does not know), ``proba`` the class probabilities. Regression: ``y`` and ``pred`` are floats.

    A row whose label the model does not know is scored by every metric as a row of none of its classes,
    the model giving its class probability 0: accuracy counts it wrong, log_loss charges it -log(1e-15),
    f1 counts it a false positive of the class predicted, and for the positive class of binary f1 and
    roc_auc it is a negative.
    """

    task: Task
    y: np.ndarray
    pred: np.ndarray
    proba: np.ndarray | None = None
    classes: tuple[Any, ...] = ()

    @property
    def rows(self) -> int:
        return int(self.y.shape[0])

    def of_rows(self, rows: np.ndarray) -> Outputs:
        """The outputs of the rows at the indices ``rows`` only (a slice of the holdout)."""
        proba = self.proba[rows] if self.proba is not None else None
        return Outputs(self.task, self.y[rows], self.pred[rows], proba, self.classes)


def encode_labels(values: Sequence[Any] | np.ndarray, classes: Sequence[Any]) -> np.ndarray:
    """Class indices of labels; -1 for labels that are not among ``classes``."""
    index = {_label_key(c): i for i, c in enumerate(classes)}
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iuf":
        # Numbers meet only numeric classes, compared as floats as _label_key does, without a key per row.
        # A NaN class matches no value there either (NaN != NaN), so it is left out of the search.
        numeric = sorted((key[1], i) for key, i in index.items() if key[0] == "n" and key[1] == key[1])
        if not numeric:
            return np.full(values.shape[0], -1, dtype=np.int64)
        keys = np.array([k for k, _ in numeric], dtype=float)
        positions = np.array([i for _, i in numeric], dtype=np.int64)
        as_float = values.astype(float)
        found = np.minimum(np.searchsorted(keys, as_float), keys.size - 1)
        return np.where(keys[found] == as_float, positions[found], -1).astype(np.int64)
    return np.array([index.get(_label_key(v), -1) for v in values], dtype=np.int64)


def _label_key(value: Any) -> Any:
    # numpy scalars and Python values of the same label must meet (np.int64(1) == 1, "1" != 1).
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        return ("n", float(value))
    return ("s", str(value))


def bool_label(value: Any) -> bool | None:
    """A boolean label: a boolean, its text, or the number 0 or 1; None for anything else (training reads
    traffic labels with it, validation holdout labels)."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, str) and value in ("True", "False", "true", "false"):
        return value in ("True", "true")
    number = number_label(value)
    return bool(number) if number is not None and number in (0, 1) else None


def number_label(value: Any) -> int | float | None:
    """A numeric label as an exact number (an int when it is one); None for a boolean, text that is no
    number, NaN, infinity, or an integer a double cannot hold."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                return None
    if isinstance(value, int):
        return value if float(value) == value else None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def classifier_outputs(model: Any, frame: Any, labels: Sequence[Any] | np.ndarray) -> Outputs:
    """Score a fitted classifier on a frame and encode its outputs against the true labels."""
    classes = tuple(_plain(c) for c in model.classes_)
    proba = np.asarray(model.predict_proba(frame), dtype=float)
    pred = proba.argmax(axis=1)
    return Outputs(Task.CLASSIFICATION, encode_labels(labels, classes), pred, proba, classes)


def regressor_outputs(model: Any, frame: Any, targets: Sequence[Any] | np.ndarray) -> Outputs:
    """Score a fitted regressor on a frame."""
    pred = np.asarray(model.predict(frame), dtype=float).reshape(-1)
    return Outputs(Task.REGRESSION, np.asarray(targets, dtype=float), pred)


def model_outputs(model: Any, task: Task, frame: Any, labels: Sequence[Any] | np.ndarray) -> Outputs:
    """Score a fitted model of either task."""
    if task is Task.CLASSIFICATION:
        return classifier_outputs(model, frame, labels)
    return regressor_outputs(model, frame, labels)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def weighted(outputs: Outputs, name: str, weights: np.ndarray) -> np.ndarray:
    """One metric under each row of ``weights`` (shape resamples × rows); NaN where it is undefined."""
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    total = w.sum(axis=1)
    # Overflow too: an error beyond 1e154 squares to infinity, a metric the caller finds undefined (validation
    # fails such outputs by name, sanity:finite-outputs), not a warning.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if outputs.task is Task.REGRESSION:
            err = outputs.pred - outputs.y
            if name == "rmse":
                return np.sqrt((w @ (err * err)) / total)
            if name == "mae":
                return (w @ np.abs(err)) / total
            if name == "r2":
                sse = w @ (err * err)
                # Centred first: r2 does not change under a shift of y, and sum(y²) - sum(y)²/n loses every
                # digit when the mean is large against the spread (a target near 1e9 gave NaN).
                y = outputs.y - outputs.y.mean()
                sy, syy = w @ y, w @ (y * y)
                sst = syy - sy * sy / total
                return np.where(sst > 0, 1 - sse / np.where(sst > 0, sst, 1), np.nan)
        else:
            if name == "accuracy":
                return (w @ (outputs.pred == outputs.y).astype(float)) / total
            if name == "log_loss":
                assert outputs.proba is not None
                known = outputs.y >= 0
                p_true = np.where(
                    known, outputs.proba[np.arange(outputs.rows), np.maximum(outputs.y, 0)], 0.0
                )
                return (w @ -np.log(np.clip(p_true, LOG_LOSS_EPS, 1.0))) / total
            if name == "f1":
                return _f1(outputs, w)
            if name == "roc_auc":
                return _roc_auc(outputs, w)
    raise KeyError(f"metric {name!r} does not apply to {outputs.task.value}")


def _f1(outputs: Outputs, w: np.ndarray) -> np.ndarray:
    k = len(outputs.classes)
    labels = [1] if k == 2 else list(range(k))
    scores = []
    present = []
    for c in labels:
        tp = w @ ((outputs.pred == c) & (outputs.y == c)).astype(float)
        fp = w @ ((outputs.pred == c) & (outputs.y != c)).astype(float)
        fn = w @ ((outputs.pred != c) & (outputs.y == c)).astype(float)
        denom = 2 * tp + fp + fn
        scores.append(np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0))
        present.append(denom > 0)
    if k == 2:
        # No positive row and none predicted: undefined, as macro F1 leaves such a class out (0.0 failed a
        # slice the model got entirely right).
        return np.where(present[0], scores[0], np.nan)
    stacked, mask = np.vstack(scores), np.vstack(present)
    counted = mask.sum(axis=0)
    return np.where(counted > 0, (stacked * mask).sum(axis=0) / np.maximum(counted, 1), np.nan)


def _roc_auc(outputs: Outputs, w: np.ndarray) -> np.ndarray:
    if len(outputs.classes) != 2 or outputs.proba is None:
        return np.full(w.shape[0], np.nan)
    score = outputs.proba[:, 1]
    # Rank once: rows with equal scores form one group, so ties count one half (Mann-Whitney U).
    uniq, group = np.unique(score, return_inverse=True)
    pos = (outputs.y == 1).astype(float)
    # Every row not of the positive class is a negative, a class the model never saw (-1) too: as binary f1
    # counts it. Left out, such rows made the score look better than the model is.
    neg = 1.0 - pos
    out = np.empty(w.shape[0])
    for b in range(w.shape[0]):
        pw = np.bincount(group, weights=w[b] * pos, minlength=uniq.size)
        nw = np.bincount(group, weights=w[b] * neg, minlength=uniq.size)
        total_p, total_n = pw.sum(), nw.sum()
        if total_p == 0 or total_n == 0:
            out[b] = np.nan
            continue
        below = np.cumsum(nw) - nw
        out[b] = float(pw @ (below + 0.5 * nw)) / (total_p * total_n)
    return out


def metric(outputs: Outputs, name: str, mask: np.ndarray | None = None) -> float:
    """One metric over all rows (or the rows of ``mask``); NaN where it is undefined."""
    w = np.ones(outputs.rows) if mask is None else mask.astype(float)
    return float(weighted(outputs, name, w)[0])


def all_metrics(outputs: Outputs) -> dict[str, float]:
    """Every metric of the task that is defined on these rows (undefined ones are left out)."""
    values = {name: metric(outputs, name) for name in metrics_for(outputs.task, len(outputs.classes) or None)}
    return {k: v for k, v in values.items() if np.isfinite(v)}


def resamples_per_chunk(rows: int, max_cells: int = BOOTSTRAP_CHUNK_CELLS) -> int:
    """How many bootstrap resamples of ``rows`` rows are drawn at once: at most 100, and no more than fit in
    ``max_cells`` (resamples x rows), but always one."""
    return max(1, min(BOOTSTRAP_CHUNK_RESAMPLES, max_cells // max(rows, 1)))


def bootstrap_weights(
    rows: int, resamples: int, seed: int, *, max_cells: int = BOOTSTRAP_CHUNK_CELLS
) -> Iterator[np.ndarray]:
    """Row-count matrices of a seeded bootstrap (each row of a matrix is one resample), in chunks of at most
    ``max_cells`` cells (one resample when a single one is larger)."""
    rng = np.random.default_rng(seed)
    chunk = resamples_per_chunk(rows, max_cells)
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        drawn = rng.integers(0, rows, size=(b, rows))
        if b > 1:
            drawn += (np.arange(b) * rows)[:, None]
        counts = np.bincount(drawn.ravel(), minlength=b * rows)
        del drawn
        weights = counts.reshape(b, rows).astype(float)
        del counts
        yield weights
        # Not held while the next chunk is drawn: the caller's copy of this one is alive until then too.
        del weights
        done += b


def paired_bootstrap_difference(
    challenger: Outputs, champion: Outputs, name: str, *, resamples: int, level: float, seed: int
) -> tuple[float, float, float]:
    """Challenger minus champion on the same rows: point estimate and a percentile CI at ``level``."""
    point = metric(challenger, name) - metric(champion, name)
    diffs = [
        weighted(challenger, name, w) - weighted(champion, name, w)
        for w in bootstrap_weights(challenger.rows, resamples, seed)
    ]
    d = np.concatenate(diffs)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return point, float("nan"), float("nan")
    alpha = (1 - level) / 2
    low, high = np.quantile(d, [alpha, 1 - alpha])
    return point, float(low), float(high)
