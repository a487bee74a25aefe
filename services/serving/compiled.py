"""Compiling a loaded scikit-learn pipeline for inference (ONNX Runtime), verified before it is served.

A small pipeline's ``predict_proba`` spends a millisecond in pandas and scikit-learn's input validation for
a few microseconds of arithmetic; the same pipeline as an ONNX graph answers in 10-20 µs. A compiled copy
is only ever served after it agreed with the pipeline on a verification sample: every probability (or
regression output) within ``tolerance`` and the same predicted class on every row. When anything fails
(the packages are not installed, a step has no converter, the copy disagrees), the pipeline itself serves
and the reason is logged, shown in the model's metadata and counted.

ONNX Runtime's imputer has no double-precision kernel, so numeric inputs are cast to float32: that is the
precision the tolerance is checked at. Only linear models are compiled: their outputs move smoothly with
the inputs, while a tree's answer jumps where float32 rounding takes a value across a split. Missing
categorical values travel as a sentinel string (ONNX
string tensors have no null); a categorical imputer is converted with that sentinel as its missing value.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from contracts.common import FeatureType, ModelSignature, Task
from services.serving.domain import MISSING, FeatureColumns

ONNX = "onnxruntime"
SKLEARN = "scikit-learn"
DEFAULT_TOLERANCE = 1e-5
"""Largest difference allowed between a compiled model's outputs and the pipeline's: absolute for
probabilities, relative (to the output's size, at least 1) for regression outputs."""

MISSING_CATEGORY = "\x00driftloop:missing"
"""What a missing categorical value becomes in a string tensor."""


class NotCompilable(Exception):
    """The compiled copy cannot serve this model; the message says why."""


@dataclass(frozen=True)
class CompiledModel:
    """A verified ONNX Runtime session for one pipeline and signature."""

    session: Any
    signature: ModelSignature
    output: str
    max_abs_diff: float
    verified_rows: int

    def feeds(self, columns: FeatureColumns) -> dict[str, np.ndarray] | None:
        """The session's inputs, or None when a value has no faithful string-tensor form (a category given
        as a number or boolean, which the input check lets through only for a feature whose signature lists
        no levels): such a request is answered by the pipeline."""
        feeds: dict[str, np.ndarray] = {}
        for spec in self.signature.features:
            values = columns.columns[spec.name]
            if spec.type is FeatureType.NUMERIC:
                feeds[spec.name] = np.asarray(values, dtype=np.float32).reshape(-1, 1)
                continue
            out = []
            for v in values:
                if type(v) is str:
                    out.append(v)
                elif type(v) is float and v != v:
                    out.append(MISSING_CATEGORY)
                else:
                    return None
            feeds[spec.name] = np.asarray(out, dtype=object).reshape(-1, 1)
        return feeds

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Probabilities (classifiers) or predictions (regressors), as float64."""
        out = np.asarray(self.session.run([self.output], feeds)[0], dtype=np.float64)
        if self.signature.task is Task.REGRESSION and out.ndim == 2 and out.shape[1] == 1:
            return out[:, 0]
        return out


def _categorical_estimators(estimator: Any) -> list[Any]:
    """Every fitted SimpleImputer or OneHotEncoder inside a pipeline (recursively)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    found: list[Any] = []
    if isinstance(estimator, Pipeline):
        for _, step in estimator.steps:
            found += _categorical_estimators(step)
    elif isinstance(estimator, ColumnTransformer):
        for _, part, _ in estimator.transformers_:
            if not isinstance(part, str):
                found += _categorical_estimators(part)
    elif isinstance(estimator, SimpleImputer | OneHotEncoder):
        found.append(estimator)
    return found


def _for_string_tensors(estimator: Any) -> Any:
    """A copy of the pipeline whose categorical imputers take ``MISSING_CATEGORY`` as the missing value
    (what the string tensors carry); the fitted statistics are untouched."""
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import OneHotEncoder

    converted = copy.deepcopy(estimator)
    for step in _categorical_estimators(converted):
        if isinstance(step, SimpleImputer):
            stats = np.asarray(step.statistics_)
            if stats.dtype == object:
                if not (isinstance(step.missing_values, float) and math.isnan(step.missing_values)):
                    raise NotCompilable(f"categorical imputer with missing_values={step.missing_values!r}")
                step.missing_values = MISSING_CATEGORY
        elif isinstance(step, OneHotEncoder):
            categories = []
            for cats in step.categories_:
                if cats.dtype != object:
                    raise NotCompilable("a one-hot encoder learned numeric categories")
                # A missing value seen in training is a category of its own: the sentinel stands for it.
                missing = [c for c in cats if isinstance(c, float) and c != c]
                if any(not isinstance(c, str) for c in cats if not (isinstance(c, float) and c != c)):
                    raise NotCompilable("a one-hot encoder learned non-string categories")
                categories.append(
                    np.array([c if isinstance(c, str) else MISSING_CATEGORY for c in cats], dtype=object)
                    if missing
                    else cats
                )
            step.categories_ = categories
    return converted


def _session(estimator: Any, signature: ModelSignature) -> tuple[Any, str]:
    try:
        import onnxruntime as ort
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    except ImportError as exc:
        raise NotCompilable(f"onnxruntime and skl2onnx are not installed ({exc.name})") from exc
    inputs = [
        (f.name, FloatTensorType([None, 1]) if f.type is FeatureType.NUMERIC else StringTensorType([None, 1]))
        for f in signature.features
    ]
    classifier = signature.task is Task.CLASSIFICATION
    options = {"zipmap": False} if classifier else None
    try:
        graph = to_onnx(
            _for_string_tensors(estimator),
            initial_types=inputs,
            options={type(_final_step(estimator)): options} if options else None,
        )
    except NotCompilable:
        raise
    except Exception as exc:
        raise NotCompilable(f"no ONNX conversion: {type(exc).__name__}: {exc}") from exc
    opts = ort.SessionOptions()
    # One thread: requests are small and the cores are the server's other requests'.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise NotCompilable(f"ONNX Runtime refused the graph: {type(exc).__name__}: {exc}") from exc
    outputs = [o.name for o in session.get_outputs()]
    if classifier and len(outputs) < 2:
        raise NotCompilable(f"the graph has no probability output (outputs: {outputs})")
    return session, outputs[1] if classifier else outputs[0]


def _check_smooth(final: Any) -> None:
    """Only models whose output moves smoothly with their inputs are compiled. A tree compares each input
    with split values: in float32, the compiled copy's precision, a value next to a split falls on the
    other side and the answer jumps (another class, a probability 1.0 away), and no random sample finds it."""
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge

    if not isinstance(final, LogisticRegression | LinearRegression | Ridge):
        raise NotCompilable(
            f"{type(final).__name__} splits on thresholds, which float32 inputs can cross: "
            "only linear models are compiled"
        )


def _final_step(estimator: Any) -> Any:
    steps = getattr(estimator, "steps", None)
    return steps[-1][1] if steps else estimator


def _fitted_numeric_centres(estimator: Any) -> dict[str, tuple[float, float]]:
    """(centre, spread) per numeric input, from a fitted StandardScaler reached through the pipeline,
    so the verification sample looks like the training data; features without one get none."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    found: dict[str, tuple[float, float]] = {}

    def walk(est: Any, names: Sequence[str] | None) -> None:
        if isinstance(est, Pipeline):
            for _, step in est.steps:
                if isinstance(step, StandardScaler):
                    walk(step, names)
                    return
                if isinstance(step, ColumnTransformer | Pipeline):
                    walk(step, names)
                    return
        elif isinstance(est, ColumnTransformer):
            for _, part, cols in est.transformers_:
                if not isinstance(part, str) and isinstance(cols, list | tuple):
                    walk(part, [str(c) for c in cols])
        # A scaler fitted with_std=False (or with neither) learned no spread: its scale_ is None, and its
        # features get the wide sample, as features without a scaler do.
        elif (
            isinstance(est, StandardScaler)
            and names is not None
            and est.mean_ is not None
            and est.scale_ is not None
        ):
            for name, mean, scale in zip(names, est.mean_, est.scale_, strict=False):
                found[name] = (float(mean), float(scale))

    names = getattr(estimator, "feature_names_in_", None)
    walk(estimator, [str(n) for n in names] if names is not None else None)
    return found


def verification_sample(
    estimator: Any, signature: ModelSignature, rows: int = 256, seed: int = 0
) -> FeatureColumns:
    """Rows to check a compiled copy on: numeric values around the training data's centre and spread
    where the pipeline learned them (else over several orders of magnitude), every known category, an
    unseen one, and missing values in every feature."""
    rng = np.random.default_rng(seed)
    centres = _fitted_numeric_centres(estimator)
    columns: dict[str, list[Any]] = {}
    for index, spec in enumerate(signature.features):
        if spec.type is FeatureType.NUMERIC:
            if spec.name in centres:
                mean, scale = centres[spec.name]
                values = mean + scale * rng.normal(0, 2, rows)
            else:
                values = rng.choice([-1, 1], rows) * 10 ** rng.uniform(-2, 4, rows)
            col: list[Any] = [float(v) for v in values]
        else:
            known = list(spec.categories or [])
            pool = [*known, "\x01unseen category"]
            col = [pool[i] for i in rng.integers(0, len(pool), rows)]
        for i in range(index % 7, rows, 7):
            col[i] = MISSING
        columns[spec.name] = col
    return FeatureColumns(rows, columns)


def frame(signature: ModelSignature, columns: FeatureColumns) -> pd.DataFrame:
    """The pipeline's input: one column per feature, in the signature's order.

    A categorical column whose every value is missing goes as object, as a column holding text does, not as
    the float64 column pandas makes of NaN alone: a one-hot encoder of text levels cannot compare floats
    with them (a TypeError from its isnan), so a one-row request with a missing category was refused where
    the same row beside a known level was answered. The look stops at a column's first value that is not
    missing, its first in the common case (asking pandas for the frame's dtypes cost half again a frame)."""
    x = pd.DataFrame(columns.columns, columns=[f.name for f in signature.features])
    for spec in signature.features:
        if spec.type is FeatureType.CATEGORICAL and all(
            type(v) is float and v != v for v in columns.columns[spec.name]
        ):
            x[spec.name] = x[spec.name].astype(object)
    return x


def compile_model(
    estimator: Any, signature: ModelSignature, *, tolerance: float = DEFAULT_TOLERANCE
) -> CompiledModel:
    """A compiled copy verified against the pipeline; :class:`NotCompilable` saying why not."""
    _check_smooth(_final_step(estimator))
    session, output = _session(estimator, signature)
    compiled = CompiledModel(session, signature, output, 0.0, 0)
    sample = verification_sample(estimator, signature)
    feeds = compiled.feeds(sample)
    if feeds is None:
        raise NotCompilable("the verification sample has no string-tensor form")
    classifier = signature.task is Task.CLASSIFICATION
    try:
        x = frame(signature, sample)
        expected = np.asarray(
            estimator.predict_proba(x) if classifier else estimator.predict(x), dtype=np.float64
        )
    except Exception as exc:
        raise NotCompilable(f"the pipeline cannot score the verification sample: {exc!r}") from exc
    try:
        got = compiled.run(feeds)
    except Exception as exc:
        raise NotCompilable(f"the compiled copy cannot score the verification sample: {exc!r}") from exc
    if got.shape != expected.shape:
        raise NotCompilable(f"the compiled copy answers shape {got.shape}, the pipeline {expected.shape}")
    # Probabilities are compared as they are; a regression output relative to its size (at least 1), as
    # float32 inputs carry a relative error.
    scale = 1.0 if classifier else np.maximum(1.0, np.abs(expected))
    diff = float(np.max(np.abs(got - expected) / scale)) if got.size else 0.0
    if not diff <= tolerance:
        raise NotCompilable(f"the compiled copy differs by {diff:.3g} (tolerance {tolerance:g})")
    if classifier and not np.array_equal(got.argmax(axis=1), expected.argmax(axis=1)):
        raise NotCompilable("the compiled copy predicts another class on some verification rows")
    return CompiledModel(session, signature, output, diff, sample.rows)
