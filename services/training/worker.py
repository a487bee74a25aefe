"""One training run, as it executes in the fit process: load the data, build the training set by the
policy, split, fit, evaluate, profile, store. Everything it needs comes in as plain data and everything it
makes goes out through the content-addressed artifact store, so a re-run of the same job on the same data
and spec writes the same keys and measures the same metrics.

It runs in a separate process (see adapters/pool.py); its arguments and results are plain dicts.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import io
import platform
import resource
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from contracts.common import ArtifactFormat, ArtifactRef, FeatureSpec, FeatureType, ModelSignature, Task
from contracts.training import FailureReason
from libs.artifacts import (
    STORE_ATTEMPTS,
    STORE_RETRY_BACKOFF_S,
    ArtifactError,
    ArtifactStore,
    StoredArtifact,
    StoreUnavailable,
    frame_to_parquet,
    save_model,
)
from libs.csv_tables import integer_column, read_csv_table
from libs.errors import shown
from libs.logging import get_logger
from libs.metrics import Outputs, all_metrics, bool_label, model_outputs, number_label
from libs.modelspec import (
    CLASSES_MAX,
    ESTIMATORS,
    FIT_WEIGHT_COLUMN,
    FLOAT32_MAX,
    ModelSpec,
    SpecError,
    TrainingSetMode,
    build_pipeline,
    flat_params,
    kept_categories,
    levels_kept,
    load_canonical,
    takes_sparse_input,
)
from libs.profiles import (
    CategoricalProfile,
    NumericProfile,
    ReferenceProfile,
    category_key,
    encode_features,
    profile_features,
    profile_numeric,
)

WEIGHT_COLUMN = FIT_WEIGHT_COLUMN  # the name the worker and its callers use
T = TypeVar("T")
log = get_logger(__name__)
_progress_queue: Any = None


class _Plain(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputDataset(_Plain):
    """A base dataset version to train on."""

    name: str
    version: int
    sha256: str
    format: ArtifactFormat = ArtifactFormat.PARQUET


class TrainingInput(_Plain):
    """Everything one run needs, pinned."""

    job_id: str
    model: str
    spec_key: str = Field(description="Artifact key of the canonical spec JSON.")
    datasets: list[InputDataset]
    window_key: str | None = None
    window_format: ArtifactFormat = ArtifactFormat.PARQUET
    window_start: AwareDatetime | None = Field(
        default=None,
        description="The traffic window's own time range: its file also carries the model's older labelled "
        "rows, for training (docs/monitoring.md, 'Window data').",
    )
    window_end: AwareDatetime | None = None
    artifacts_url: str
    store_attempts: int = Field(
        STORE_ATTEMPTS,
        ge=1,
        description="Tries of one read or write of the artifact store that fails with an OSError "
        "(unreachable, timing out) before the run leaves it to the runner, which waits for the store; a "
        "missing or corrupted file is not tried again.",
    )
    store_retry_backoff_s: float = Field(
        STORE_RETRY_BACKOFF_S, ge=0, description="Wait before the second try; doubled before each next."
    )


class MaterialisedSet(_Plain):
    """A dataset file the run wrote (training rows or holdout rows)."""

    artifact: ArtifactRef
    rows: int
    columns: dict[str, str]


class TrainingResult(_Plain):
    """A successful run."""

    ok: Literal[True] = True
    artifact: ArtifactRef
    profile: ArtifactRef
    metrics: dict[str, float]
    signature: ModelSignature
    params: dict[str, bool | int | float | str | None]
    environment: dict[str, str]
    training_set: MaterialisedSet | None = Field(
        description="Base data plus labelled traffic before the holdout split; None when it is exactly one "
        "base dataset, whose file it then is."
    )
    holdout: MaterialisedSet
    train_rows: int
    traffic_rows: int
    seed: int
    seconds: dict[str, float]
    categories_seen: dict[str, int] = Field(
        default_factory=dict,
        description="Categorical features with more levels than a model keeps: name -> distinct levels seen.",
    )


class TrainingFailure(_Plain):
    """A run that cannot succeed, with the reason."""

    ok: Literal[False] = False
    reason: FailureReason
    message: str


class StoreOutage(_Plain):
    """The artifact store failed on every try of a read the run cannot go on without (the spec, a dataset,
    the window): nothing is wrong with the job, which the runner runs again once the store is back."""

    ok: Literal[False] = False
    store_outage: Literal[True] = True
    message: str


UNWRITTEN = "unwritten"
"""Key of a successful outcome's files the store refused after its tries (a list of bytes, each stored
under its sha256): the runner writes them, waiting for the store, before it records the run, so an outage
after the fit costs no refit."""


class KeepingStore(ArtifactStore):
    """The run's store: a write the store still refuses after its tries (StoreUnavailable) is kept in
    ``kept`` and its artifact returned as the store would have (the key is the bytes' sha256), and every
    later write is kept without trying; reads go to the store as ever."""

    def __init__(self, url: str, *, attempts: int, backoff_s: float) -> None:
        super().__init__(url, attempts=attempts, backoff_s=backoff_s)
        self.kept: dict[str, bytes] = {}
        self.down = False

    def put(self, data: bytes) -> StoredArtifact:
        if not self.down:
            try:
                return super().put(data)
            except StoreUnavailable as exc:
                self.down = True
                log.warning(
                    "artifact store unavailable; the run keeps its files for the runner", error=str(exc)
                )
        key = hashlib.sha256(data).hexdigest()
        self.kept[key] = data  # one writer per file; a dict item is set atomically
        return StoredArtifact(key, len(data), self.uri(key))


class TrainingError(Exception):
    """A run failed for a reason people can act on."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# --- progress, from the fit process to the service --------------------------------------------------


def install_progress_queue(queue: Any) -> None:
    """Where :func:`report` puts (job id, phase, fraction), in the fit process (see prepare_fit_process)."""
    global _progress_queue
    _progress_queue = queue


def prepare_fit_process(queue: Any, address_space_bytes: int | None = None) -> None:
    """Pool initializer: the progress queue (:func:`install_progress_queue`) and, when given, a bound on the
    fit process's address space (RLIMIT_AS), so that a fit outgrowing it fails with MemoryError, said as
    fit-error, rather than be killed by the kernel's OOM killer (worker-lost, after every attempt)."""
    install_progress_queue(queue)
    if address_space_bytes is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = address_space_bytes if hard == resource.RLIM_INFINITY else min(address_space_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def out_of_memory(exc: MemoryError) -> str:
    """The failure of a fit that ran out of memory, naming the fit process's bound when it has one."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    bound = (
        f" within the fit process's address space of {soft // 2**20} MB (fit_memory_limit_mb)"
        if soft != resource.RLIM_INFINITY
        else ""
    )
    return (
        f"the fit ran out of memory{bound} ({type(exc).__name__}: {exc}); train on fewer rows or features, "
        "or give training more memory"
    )


FIT_MODULES = (
    "pyarrow.parquet",
    "sklearn.ensemble",
    "sklearn.linear_model",
    "sklearn.model_selection",
    "skops.io",
)
"""What a fit imports beyond this module (seconds of it, scikit-learn's above all). The fork server imports
them once (its preload, :class:`~services.training.adapters.pool.ProcessPoolTrainer`), so every fit process
forked from it starts with them; :func:`warm_up` imports them where there is no fork server."""


def warm_up() -> str:
    """Import what a fit needs, so the first job does not pay for it."""
    for module in FIT_MODULES:
        importlib.import_module(module)
    _versions()
    return "ready"


def report(job_id: str, phase: str, fraction: float | None) -> None:
    """Tell the service where the run is; never blocks the fit."""
    if _progress_queue is not None:
        try:
            _progress_queue.put_nowait((job_id, phase, fraction))
        except Exception:  # a full or closed queue must not fail the fit
            return


# --- the run -------------------------------------------------------------------------------------------


def run_training(raw: dict[str, Any], overlap: bool = True) -> dict[str, Any]:
    """Run one training; returns a TrainingResult or TrainingFailure as a dict (never raises).

    ``overlap``: the work that does not need the fitted model runs on a second thread during the fit (see
    :func:`train`); the outcome is the same either way.
    """
    job = TrainingInput.model_validate(raw)
    # The store failing for a moment is tried again in place; a missing or corrupted file fails the run; a
    # write the store still refuses is kept for the runner (UNWRITTEN), a read is a StoreOutage.
    store = KeepingStore(job.artifacts_url, attempts=job.store_attempts, backoff_s=job.store_retry_backoff_s)
    try:
        outcome = train(job, overlap=overlap, store=store).model_dump(mode="json")
        if store.kept:
            outcome[UNWRITTEN] = list(store.kept.values())
        return outcome
    except TrainingError as exc:
        return TrainingFailure(reason=exc.reason, message=exc.message).model_dump(mode="json")
    except StoreUnavailable as exc:
        return StoreOutage(message=str(exc)).model_dump(mode="json")
    except (ArtifactError, OSError) as exc:
        # Every file a run reads is read (and its errors named) by the loading steps, and a write the store
        # keeps refusing is kept for the runner: what is left here is the store's, said so.
        return TrainingFailure(
            reason=FailureReason.ARTIFACT_STORE_ERROR, message=f"artifact store: {exc}"
        ).model_dump(mode="json")
    except MemoryError as exc:
        return TrainingFailure(reason=FailureReason.FIT_ERROR, message=out_of_memory(exc)).model_dump(
            mode="json"
        )
    except Exception as exc:
        return TrainingFailure(
            reason=FailureReason.FIT_ERROR, message=f"{type(exc).__name__}: {exc}"
        ).model_dump(mode="json")


class Beside:
    """Work handed to one second thread (``overlap``) or done at once in this one (not): either way its
    result, or its error, comes out of the future's ``result()``, so a run fails the same way in both modes.

    Leaving the block waits for the work already started and cancels the rest, so a run that fails never
    leaves a thread behind. ``busy`` is the seconds the work took.
    """

    def __init__(self, overlap: bool) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="training-beside") if overlap else None
        self.busy = 0.0

    @property
    def overlap(self) -> bool:
        """Whether the work runs on a second thread."""
        return self._pool is not None

    def __enter__(self) -> Beside:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` beside the caller, or now."""
        if self._pool is not None:
            return self._pool.submit(self._timed, fn, *args)
        done: Future[T] = Future()
        try:
            done.set_result(self._timed(fn, *args))
        except Exception as exc:
            done.set_exception(exc)
        return done

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            # One worker thread: the only writer.
            self.busy += time.perf_counter() - started


SPLIT_SCORING_ROWS = 4_096
"""Holdouts at least this long are scored in two halves at once when work runs beside the fit."""


class HalvesBeside:
    """A fitted estimator whose ``predict``/``predict_proba`` score the second half of the rows beside the
    caller while the caller scores the first. Estimators score each row on its own, so the two halves
    joined are what one call gives, value for value (a test compares them); scikit-learn's compiled
    predictors release the GIL, so on a free core the holdout is scored in about half the time."""

    def __init__(self, estimator: Any, beside: Beside) -> None:
        self.estimator = estimator
        self.beside = beside
        if hasattr(estimator, "classes_"):
            self.classes_ = estimator.classes_

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self._halves(self.estimator.predict, features)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self._halves(self.estimator.predict_proba, features)

    def _halves(self, score: Callable[[np.ndarray], Any], features: np.ndarray) -> np.ndarray:
        middle = len(features) // 2
        second = self.beside.submit(score, features[middle:])
        first = np.asarray(score(features[:middle]))
        return np.concatenate([first, np.asarray(second.result())])


def scorer(estimator: Any, features: Any, beside: Beside) -> Any:
    """The estimator, or (a long dense holdout, work beside the fit) the same scored in two halves at once."""
    if beside.overlap and isinstance(features, np.ndarray) and len(features) >= SPLIT_SCORING_ROWS:
        return HalvesBeside(estimator, beside)
    return estimator


def train(job: TrainingInput, *, overlap: bool = True, store: ArtifactStore | None = None) -> TrainingResult:
    """The run itself; raises :class:`TrainingError` for failures people can act on.

    With ``overlap``, what does not need the fitted model — the features' reference profile, the holdout
    file and the training-set file with their hashes, and, once the preprocessing is fitted, the holdout's
    transformed features — runs on a second thread while this one fits; then the two threads score halves
    of a long holdout at once (:class:`HalvesBeside`), and the second writes the model file while this one
    computes the metrics and the profile. The fit runs in scikit-learn's compiled code,
    mostly without the GIL, and numpy, pyarrow and hashlib release it too, so on a machine with a free core
    that work costs little wall time (when no core is free it slows the fit instead: docs/benchmarks.md).
    Without it, the same steps run one after the other; the outcome (metrics, keys, files, profile) is the
    same.

    ``seconds`` holds the phases this thread spends: load, split, prepare (handing the work over, or
    without overlap doing it), fit (the pipeline's: preprocessing, then estimator), files (waiting for the
    data files), evaluate (without overlap the model file too), profile, store (waiting for the model
    file); and beside, the time the handed-over work took wherever it ran.
    """
    if store is None:
        # The store failing for a moment is tried again in place; a missing or corrupted file fails the run.
        store = ArtifactStore(
            job.artifacts_url, attempts=job.store_attempts, backoff_s=job.store_retry_backoff_s
        )
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    report(job.job_id, "loading-data", 0.0)
    spec = _load_spec(store, job.spec_key)
    base = conformed_base(spec, job.datasets, [_load_base(store, d, spec) for d in job.datasets])
    window = _load_window(store, job, spec) if job.window_key else None
    traffic = labelled_traffic(window, spec) if window is not None else _empty(spec)
    frame = assemble_training_set(spec, base, traffic)
    check_numeric_values(spec, frame)
    seconds["load"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    train_rows, holdout_rows = split(spec, frame)
    seconds["split"] = time.perf_counter() - t1

    # The levels the model keeps (part of the fit's phase, as before): the profile keeps the same ones.
    t_levels = time.perf_counter()
    try:
        categories, categories_seen = kept_categories(spec, train_rows)
    except SpecError as exc:
        raise TrainingError(FailureReason.INVALID_SPEC, exc.message) from exc
    except (ValueError, TypeError) as exc:
        raise TrainingError(FailureReason.FIT_ERROR, f"the estimator could not be fitted: {exc}") from exc
    kept = {
        name: {category_key(level) for level in levels}
        for name, levels in levels_kept(spec, train_rows, categories).items()
    }
    levels_seconds = time.perf_counter() - t_levels

    with Beside(overlap) as beside:
        t_prepare = time.perf_counter()
        reference = reference_rows(train_rows, window, job.window_start, job.window_end)
        features = spec.feature_names
        feature_profiles = beside.submit(
            _profiled_features,
            {name: reference[name] for name in features},
            spec.feature_types(),
            spec.seed,
            kept,
        )
        # A training set that is one base dataset as it is already has its file and its hash: no copy.
        unchanged = (
            len(base) == 1 and len(frame) == len(base[0]) and WEIGHT_COLUMN not in frame and not len(traffic)
        )
        training_set = None if unchanged else beside.submit(_materialise, store, frame)
        holdout = beside.submit(
            _materialise, store, holdout_rows.drop(columns=[WEIGHT_COLUMN], errors="ignore")
        )
        seconds["prepare"] = time.perf_counter() - t_prepare

        t2 = time.perf_counter()
        report(job.job_id, "fitting", 0.1)
        target = train_rows[spec.target]
        fit_params = {}
        if WEIGHT_COLUMN in train_rows:
            fit_params["sample_weight"] = train_rows[WEIGHT_COLUMN].to_numpy()
        holdout_features: Future[Any] | None = None
        try:
            check_dense_encoding(spec, train_rows, categories)
            pipeline = build_pipeline(spec, categories)
            preprocess, estimator = pipeline.named_steps["preprocess"], pipeline.named_steps["estimator"]
            # What Pipeline.fit does (fit_transform the preprocessing, fit the estimator on its output), in
            # two steps: once the preprocessing is fitted, the holdout's features are transformed beside the
            # estimator's fit — the same fitted pipeline and the same holdout outputs (a test compares them).
            fitted_features = preprocess.fit_transform(train_rows[features], target)
            if beside.overlap:
                holdout_features = beside.submit(preprocess.transform, holdout_rows[features])
            estimator.fit(fitted_features, target, **fit_params)
        except (ValueError, TypeError) as exc:
            raise TrainingError(FailureReason.FIT_ERROR, f"the estimator could not be fitted: {exc}") from exc
        seconds["fit"] = time.perf_counter() - t2 + levels_seconds

        # The data files are written by now (a fraction of the fit's time): a failure there ends the run
        # here, before the model is evaluated and stored.
        t_files = time.perf_counter()
        training_file = None if training_set is None else training_set.result()
        holdout_file = holdout.result()
        seconds["files"] = time.perf_counter() - t_files

        t3 = time.perf_counter()
        report(job.job_id, "evaluating", 0.8)
        labels = holdout_rows[spec.target].to_numpy()
        holdout_transformed = (
            preprocess.transform(holdout_rows[features])
            if holdout_features is None
            else holdout_features.result()
        )
        scored_by = scorer(estimator, holdout_transformed, beside)
        if scored_by is estimator:
            model_file = beside.submit(save_model, store, pipeline)
            outputs = model_outputs(estimator, spec.task, holdout_transformed, labels)
        else:  # the second thread scores half the holdout first, then writes the model file
            outputs = model_outputs(scored_by, spec.task, holdout_transformed, labels)
            model_file = beside.submit(save_model, store, pipeline)
        metrics = all_metrics(outputs)
        seconds["evaluate"] = time.perf_counter() - t3

        t4 = time.perf_counter()
        report(job.job_id, "profiling", 0.9)
        try:
            profiled, encoded = feature_profiles.result()
            profile = ReferenceProfile(
                rows=len(reference),
                created_at=datetime.now(UTC),
                features=profiled,
                prediction=prediction_profile(spec, pipeline, reference, train_rows, outputs),
            )
        except ValidationError as exc:
            # A profile holds finite numbers only (JSON has no NaN or infinity): such a one is not stored.
            fields = ", ".join(
                f"{'.'.join(str(part) for part in e['loc'])} = {e['input']!r}" for e in exc.errors()[:5]
            )
            raise TrainingError(
                FailureReason.FIT_ERROR,
                f"the reference profile of the training data is not finite ({fields}): monitoring could not "
                "load it back; look for values a double cannot hold in the training data",
            ) from exc
        profile_ref = _ref(store.put(profile.to_bytes(encoded)), ArtifactFormat.JSON)
        seconds["profile"] = time.perf_counter() - t4

        t5 = time.perf_counter()
        report(job.job_id, "storing", 0.95)
        model_ref = _ref(model_file.result(), ArtifactFormat.SKOPS)
        seconds["store"] = time.perf_counter() - t5
    seconds["beside"] = beside.busy

    return TrainingResult(
        artifact=model_ref,
        profile=profile_ref,
        metrics=metrics,
        signature=signature(spec, pipeline, outputs.classes),
        params=flat_params(spec, pipeline),
        environment=environment(),
        training_set=training_file,
        holdout=holdout_file,
        train_rows=len(train_rows),
        traffic_rows=len(traffic),
        seed=spec.seed,
        seconds=seconds,
        categories_seen=categories_seen,
    )


ONE_HOT_DENSE_MAX_BYTES = 2 * 1024**3
"""The largest one-hot encoding (rows x levels x 8 bytes) an estimator that takes no sparse input
(hist_gradient_boosting) is fitted on. It is held dense in the fit process, twice while it is converted;
past this the run fails saying so, rather than exhaust the process's memory and be retried as a lost
worker."""


def check_dense_encoding(spec: ModelSpec, rows: pd.DataFrame, categories: list[Any] | None) -> None:
    """Refuse (:class:`TrainingError`) a fit whose estimator takes its inputs dense when the one-hot encoding
    of ``rows`` (the levels kept, ``categories``, or every level) would pass
    :data:`ONE_HOT_DENSE_MAX_BYTES`."""
    if takes_sparse_input(spec.estimator, spec.task):
        return
    names = [f.name for f in spec.features if f.type is FeatureType.CATEGORICAL]
    if categories is None:
        widths = {name: int(rows[name].nunique(dropna=False)) for name in names}
    else:
        widths = {name: len(levels) for name, levels in zip(names, categories, strict=True)}
    size = len(rows) * sum(widths.values()) * 8
    if size <= ONE_HOT_DENSE_MAX_BYTES:
        return
    largest = sorted(widths.items(), key=lambda item: -item[1])[:3]
    sparse = [name for name in ESTIMATORS if takes_sparse_input(name, spec.task)]
    raise TrainingError(
        FailureReason.INVALID_SPEC,
        f"{spec.estimator} takes its inputs dense, and the one-hot encoding of the categorical features "
        f"would be {len(rows):,} rows x {sum(widths.values()):,} levels x 8 = {size:,} bytes; a fit holds at "
        f"most {ONE_HOT_DENSE_MAX_BYTES:,} bytes dense (the largest: "
        + ", ".join(f"{shown(name)} {width:,} levels" for name, width in largest)
        + "). Choose an estimator that takes sparse inputs ("
        + ", ".join(sparse)
        + "), or re-code these features into fewer levels",
    )


def check_numeric_values(spec: ModelSpec, rows: pd.DataFrame) -> None:
    """Refuse (:class:`TrainingError`, naming the column) a numeric feature or a regression target of ``rows``
    (the training set, before the holdout split) that holds an infinity, which no estimator takes, or a finite
    value beyond float32's range (:data:`libs.modelspec.FLOAT32_MAX`), which serving refuses as an input
    (422): a model fitted on such a feature could never be served it, and one fitted on such a target learns
    to predict values no float32 engine holds, and its rmse overflowed to infinity (the run completed with
    rmse and r2 left out of its metrics). Within that range a scaler's variance cannot overflow a double (past
    some 1e154, the fit failed saying the input "contains NaN")."""
    columns = [(f.name, "numeric feature") for f in spec.features if f.type is FeatureType.NUMERIC]
    if spec.task is Task.REGRESSION:
        columns.append((spec.target, "regression target"))
    for name, kind in columns:
        column = rows[name]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            continue
        values = column.to_numpy(dtype=float, na_value=np.nan)
        # One pass over the column in the common case (every magnitude within float32's range).
        magnitude = float(np.fmax.reduce(np.abs(values), initial=0.0))
        if magnitude <= FLOAT32_MAX:
            continue
        feature = kind == "numeric feature"
        if magnitude == np.inf:
            # A target: fitted on, scikit-learn refuses it ("Input y contains infinity"); held out, every
            # metric came out infinite or NaN and the run completed with no metrics at all.
            raise TrainingError(
                FailureReason.FIT_ERROR,
                f"{kind} {shown(name)} holds an infinity in {int(np.isinf(values).sum()):,} row(s): "
                + (
                    "no estimator takes one; replace them by a finite value or leave them empty (missing "
                    "values are imputed)"
                    if feature
                    else "no estimator fits one, nor can a metric measure it; replace them by a finite value "
                    "or leave them empty (a row without a target is left out)"
                ),
            )
        beyond = int((np.abs(values) > FLOAT32_MAX).sum())
        largest = values[np.nanargmax(np.abs(values))]
        raise TrainingError(
            FailureReason.FIT_ERROR,
            f"{kind} {shown(name)} holds a value beyond float32's range (magnitude at most "
            f"{FLOAT32_MAX:.8g}, where models compute) in {beyond:,} row(s), such as {largest:.6g}: "
            + (
                "serving refuses such an input, so a model fitted on it could never be served it; change the "
                "column's unit or take its logarithm, or leave them empty (missing values are imputed)"
                if feature
                else "a model fitted on it would predict values no float32 engine holds, and its rmse "
                "overflows; change the target's unit or take its logarithm, or leave them empty (a row "
                "without a target is left out)"
            ),
        )


def _profiled_features(
    columns: dict[str, pd.Series],
    features: list[tuple[str, Literal["numeric", "categorical"]]],
    seed: int,
    kept: dict[str, set[str]],
) -> tuple[list[NumericProfile | CategoricalProfile], bytes]:
    # Encoded here too: the samples are most of the profile file's bytes (about 11 ms of JSON for 28
    # numeric features), and here it runs beside the fit. A categorical feature keeps the model's levels and
    # folds the rest into one bin: an id-like column would otherwise give one frequency per distinct value.
    profiled = profile_features(columns, features, seed=seed, kept=kept)
    return profiled, encode_features(profiled)


def prediction_profile(
    spec: ModelSpec, pipeline: Any, reference: pd.DataFrame, train_rows: pd.DataFrame, outputs: Outputs
) -> NumericProfile | CategoricalProfile:
    """The model's outputs on the reference rows: classes, or predicted values."""
    if reference is train_rows:
        predicted = outputs.pred  # the holdout's: the same world as the training rows
    elif spec.task is Task.CLASSIFICATION:
        predicted = np.asarray(pipeline.predict_proba(reference[spec.feature_names])).argmax(axis=1)
    else:
        predicted = np.asarray(pipeline.predict(reference[spec.feature_names]), dtype=float).reshape(-1)
    if spec.task is Task.CLASSIFICATION:
        # What profile_categorical gives for the predicted classes, counted by class code rather than by
        # each row's text (3 ms on 10,000 rows).
        frequencies: dict[str, int] = {}
        for code, count in enumerate(np.bincount(predicted, minlength=len(outputs.classes)).tolist()):
            if count:
                key = category_key(outputs.classes[code])
                frequencies[key] = frequencies.get(key, 0) + count
        return CategoricalProfile(
            name="prediction",
            count=int(predicted.size),
            missing=0,
            frequencies={key: frequencies[key] for key in sorted(frequencies)},
        )
    return profile_numeric("prediction", pd.Series(predicted), seed=spec.seed)


def _load_spec(store: ArtifactStore, key: str) -> ModelSpec:
    try:
        return load_canonical(store.get(key))
    except SpecError as exc:
        reason = {
            "unknown-estimator": FailureReason.UNKNOWN_ESTIMATOR,
            "unknown-feature": FailureReason.UNKNOWN_FEATURE,
        }.get(exc.reason, FailureReason.INVALID_SPEC)
        raise TrainingError(reason, f"the model spec is not usable: {exc.message}") from exc
    except ArtifactError as exc:
        raise TrainingError(FailureReason.INVALID_SPEC, f"the model spec cannot be read: {exc}") from exc


def read_frame(
    data: bytes, fmt: ArtifactFormat, columns: list[str] | None = None, *, target: str | None = None
) -> pd.DataFrame:
    """A dataset file's rows in numpy's types (:func:`numpy_types`, which leaves ``target`` its nullable
    integers and booleans, and :func:`integer_target`, which gives it them where the file holds integers
    with a gap; a CSV's "NA" missing in a numeric column only, as the registry reads an upload); of a Parquet
    file that has all ``columns``, only those are decoded."""
    if fmt is ArtifactFormat.CSV:
        frame = read_csv_table(data)
    else:
        frame = None
        if columns is not None:
            import pyarrow.parquet as pq

            if set(columns) <= set(pq.read_schema(io.BytesIO(data)).names):
                frame = pd.read_parquet(io.BytesIO(data), columns=columns)
        if frame is None:
            # Every column: a missing one is then reported with the file's other columns as hints.
            frame = pd.read_parquet(io.BytesIO(data))
    if target is not None:
        frame = integer_target(frame, data, fmt, target)
    return numpy_types(frame, target=target)


def integer_target(frame: pd.DataFrame, data: bytes, fmt: ArtifactFormat, target: str) -> pd.DataFrame:
    """``frame`` (read from ``data``) with its ``target`` as nullable integers where the file holds integers
    with a gap there: a CSV column whose fields are all integers or missing, a Parquet integer column with
    nulls (as the registry stores a CSV upload's). pandas reads them as float64 (int64 has no missing value),
    and a classifier fitted on them after the rows without a target were dropped had the classes 3.0 and 7.0
    where the same rows without a gap gave 3 and 7: serving answered 3.0 (FP64 in the Open Inference
    Protocol), the signature and the model card listed floats. :func:`_plain_target` makes them int64 once
    those rows are dropped. A target the file holds as floats (a Parquet double, a CSV's ``1.0``) stays
    float, and a target without a gap is read as int64 already."""
    read = frame[target] if target in frame.columns else None  # a DataFrame for a name the file has twice
    if not isinstance(read, pd.Series) or read.dtype != np.float64 or not read.isna().any():
        return frame
    if fmt is ArtifactFormat.CSV:
        column = integer_column(data, target)
        if column is None:
            return frame
        values = column.array
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        file = pq.ParquetFile(io.BytesIO(data))
        field = file.schema_arrow.get_field_index(target)  # -1 for a name the file has twice
        if field < 0 or not pa.types.is_integer(file.schema_arrow.field(field).type):
            return frame
        # The column decoded again from the file: its integers past 2**53 are not those of its float64 read.
        values = file.read(columns=[target]).column(0).to_pandas(types_mapper=pd.ArrowDtype).array
    return frame.assign(**{target: values})


def numpy_types(frame: pd.DataFrame, *, target: str | None = None) -> pd.DataFrame:
    """``frame`` with each column of pandas' nullable types (``boolean``, ``Int64`` and the other
    integers, ``Float64``, ``string``), of a pyarrow-backed type (``ArrowDtype``) or a ``category`` as the
    same values in the type a file without pandas' metadata gives (the registry's files): booleans with a gap
    as objects (True, False, None), text as ``str`` (NaN missing), integers with a gap and floats as float64
    (NaN missing), a category as its values in their own such type.

    pyarrow keeps these types in a Parquet file's pandas metadata, so a file another producer wrote with
    pandas brings them back, while every later step (the encoder, the signature's levels, the reference
    profile, the holdout's file) expects what numpy-typed data gives: a text feature of ``string`` with a gap
    failed the fit ("Encoders require their input argument must be uniformly strings or numbers. Got
    ['NAType', 'str']"), and a ``boolean`` one with a gap made the signature's levels ``[0, 1]`` while the
    profile counted ``True``/``False``, so serving refused ``true`` for it. Only such columns are converted,
    each in pyarrow's compiled code; a frame without one is returned as it is.

    The ``target``'s nullable integers and booleans are left as they are: :func:`_plain_target` makes them
    int64 and bool once the rows without a target are dropped, where integers with a gap as float64 would
    make a classifier's classes the floats 0.0 and 1.0."""
    converted = {}
    for position, (name, dtype) in enumerate(frame.dtypes.items()):
        # The nullable and pyarrow-backed types are those whose missing value is pd.NA (not the default
        # text type, "str", whose missing value is NaN, nor a timestamp's NaT).
        if not isinstance(dtype, pd.CategoricalDtype) and getattr(dtype, "na_value", None) is not pd.NA:
            continue
        if name == target and (pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_integer_dtype(dtype)):
            continue
        converted[position] = _as_numpy_typed(frame.iloc[:, position])
    if not converted:
        return frame
    frame = frame.copy(deep=False)
    for position, column in converted.items():
        frame.isetitem(position, column)
    return frame


def _as_numpy_typed(column: pd.Series) -> pd.Series:
    """One column's values as pyarrow turns them into pandas from a file without pandas' metadata."""
    import pyarrow as pa

    values = pa.array(column)  # an Array, or a pyarrow-backed column's own ChunkedArray
    if pa.types.is_dictionary(values.type):  # a category: its values, not a category again
        values = values.cast(values.type.value_type)
    plain = values.to_pandas()
    plain.index = column.index
    return plain


def _load_base(store: ArtifactStore, dataset: InputDataset, spec: ModelSpec) -> pd.DataFrame:
    label = f"{dataset.name} v{dataset.version}"
    needed = [*spec.feature_names, spec.target]
    try:
        frame = store.get_parsed(
            dataset.sha256, lambda data: read_frame(data, dataset.format, needed, target=spec.target)
        )
    except StoreUnavailable:
        raise  # the store's fault, not the dataset's: artifact-store-error
    except ArtifactError as exc:
        raise TrainingError(FailureReason.DATASET_UNAVAILABLE, f"dataset {label}: {exc}") from exc
    except Exception as exc:
        raise TrainingError(
            FailureReason.DATASET_UNAVAILABLE,
            f"dataset {label} is not a readable {dataset.format} file: {exc}",
        ) from exc
    _require_columns(frame, needed, label)
    return frame[needed]


def conformed_base(
    spec: ModelSpec, datasets: list[InputDataset], frames: list[pd.DataFrame]
) -> list[pd.DataFrame]:
    """The base datasets' rows, ready to be joined into one training set.

    A numeric feature that holds no value in a dataset (a text column of nulls) becomes a float column of
    missing values there: joined as it is, it turned the numbers of the other datasets into objects, which
    no estimator fits. Base datasets of which one holds numbers and another text in a numeric feature or
    the target are refused (:class:`TrainingError`, naming both): joined, the column holds both, and the
    failure named neither dataset. Categorical features are checked with the levels the model keeps
    (:func:`libs.modelspec.kept_categories`)."""
    numeric = [f.name for f in spec.features if f.type is FeatureType.NUMERIC]
    conformed = []
    for frame in frames:
        empty = [n for n in numeric if not pd.api.types.is_numeric_dtype(frame[n]) and frame[n].isna().all()]
        conformed.append(frame.assign(**{n: np.nan for n in empty}) if empty else frame)
    for name in [*numeric, spec.target]:
        kinds = ["numbers" if pd.api.types.is_numeric_dtype(f[name]) else "text" for f in conformed]
        if len(set(kinds)) < 2:
            continue
        held = [
            (kind, f"{d.name} v{d.version}")
            for kind, d, f in zip(kinds, datasets, conformed, strict=True)
            if f[name].notna().any()
        ]
        for kind, label in held[1:]:
            if kind != held[0][0]:
                raise TrainingError(
                    FailureReason.FIT_ERROR,
                    f"column {name!r} holds {held[0][0]} in {held[0][1]} and {kind} in {label}: the base "
                    "datasets of a model must give each column one type; upload one of them again, or change "
                    "the spec's base_datasets",
                )
    return [
        numeric_features(spec, frame, f"{d.name} v{d.version}", with_target=True)
        for d, frame in zip(datasets, conformed, strict=True)
    ]


NO_NUMBER_EXAMPLES = 3
"""Values a message quotes of a numeric feature's values that are no number."""


def numeric_features(
    spec: ModelSpec, frame: pd.DataFrame, label: str, *, with_target: bool = False
) -> pd.DataFrame:
    """``frame`` with each numeric feature as float64 numbers: a column of text (a CSV's, or a traffic
    window's, where monitoring writes a feature holding anything but numbers as text) is read value by value,
    text that reads as a number as that number. A value that reads as no number (``"abc"``) is refused
    (:class:`TrainingError`, fit-error), naming the feature, ``label`` and such values: joined to numbers,
    such a column made the training set's file unwritable (pyarrow's "Could not convert 'abc' with type str:
    tried to convert to double") or the fit fail naming no column. ``with_target``: a regression target too
    (a base dataset's; a window's labels are read by :func:`_conform_labels`)."""
    converted = {}
    columns = [(f.name, "numeric feature") for f in spec.features if f.type is FeatureType.NUMERIC]
    if with_target and spec.task is Task.REGRESSION:
        columns.append((spec.target, "regression target"))
    for name, kind in columns:
        column = frame[name]
        if pd.api.types.is_numeric_dtype(column):
            continue
        values = column.tolist()
        read = [_as_number(v) for v in values]
        bad = [v for v, number in zip(values, read, strict=True) if number is None]
        if bad:
            examples: list[str] = []
            for value in bad:
                quoted = shown(value) if isinstance(value, str) else shown(repr(value))
                if quoted not in examples:
                    examples.append(quoted)
                if len(examples) == NO_NUMBER_EXAMPLES:
                    break
            remedy = (
                "a numeric feature takes numbers (a missing value is imputed); correct the data, or declare "
                "the feature categorical in the spec"
                if kind == "numeric feature"
                else "a regression target takes numbers (a row without one is left out); correct the data, "
                "or make the model a classifier (task: classification)"
            )
            raise TrainingError(
                FailureReason.FIT_ERROR,
                f"{kind} {shown(name)} holds {len(bad):,} value(s) that are no number in {label} (of "
                f"{len(column):,} rows), such as {', '.join(examples)}: {remedy}",
            )
        converted[name] = np.array(read, dtype=np.float64)
    return frame.assign(**converted) if converted else frame


def _as_number(value: Any) -> float | None:
    """A numeric feature's value as a float (NaN when missing); None when it is no number."""
    if value is None or value is pd.NA or value is pd.NaT:
        return np.nan
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _require_columns(frame: pd.DataFrame, needed: list[str], label: str) -> None:
    columns = [str(c) for c in frame.columns]
    for name in needed:
        if name not in frame.columns:
            near = difflib.get_close_matches(name, columns, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise TrainingError(
                FailureReason.UNKNOWN_FEATURE,
                f"spec names column {name!r} which is not a column of {label}{hint}; "
                "fix the spec or the dataset",
            )


def _empty(spec: ModelSpec) -> pd.DataFrame:
    return pd.DataFrame(columns=[*spec.feature_names, spec.target])


def _load_window(store: ArtifactStore, job: TrainingInput, spec: ModelSpec) -> pd.DataFrame:
    """The traffic window's rows (labelled or not), oldest first."""
    assert job.window_key is not None
    try:
        # The labels as the target: integers with a gap stay integers (read_frame), or a model whose classes
        # come from the window alone had the classes 3.0 and 7.0.
        window = read_frame(store.get(job.window_key), job.window_format, target="label")
    except StoreUnavailable:
        raise  # the store's fault, not the window's: artifact-store-error
    except Exception as exc:
        raise TrainingError(
            FailureReason.DATASET_UNAVAILABLE, f"the traffic window {job.window_key[:12]}: {exc}"
        ) from exc
    absent = [name for name in spec.feature_names if name not in window.columns]
    if absent and "label" in window.columns:
        # Monitoring writes the features of the version it watched: a spec that adds one fails every retrain
        # on traffic until a version with it serves, and "fix the spec or the dataset" named neither cause
        # nor way out.
        raise TrainingError(
            FailureReason.UNKNOWN_FEATURE,
            f"the traffic window has no column {shown(absent[0])}"
            + (f" (nor {len(absent) - 1:,} more of the spec's features)" if len(absent) > 1 else "")
            + ": it holds the features of the version that served it, and the spec names more; a retrain on "
            "traffic needs a version serving them, so retrain on the base data (RetrainRequested) first",
        )
    _require_columns(window, [*spec.feature_names, "label"], "the traffic window")
    window = numeric_features(spec, window, f"the traffic window {job.window_key[:12]}")
    if "predicted_at" in window.columns:
        # Times as the window's file has them: a timestamp column, or text (a CSV). A value that is no time
        # is an unknown time: oldest, and outside the window's own time range (reference_rows).
        at = prediction_times(window["predicted_at"])
        if unknown := int(at.isna().sum() - window["predicted_at"].isna().sum()):
            log.warning(
                "traffic window rows whose predicted_at is no time, taken as of unknown time", rows=unknown
            )
        window = window.assign(predicted_at=at).sort_values(
            "predicted_at", kind="stable", na_position="first"
        )
    return window.reset_index(drop=True)


def prediction_times(column: pd.Series) -> pd.Series:
    """A window's ``predicted_at`` as UTC timestamps; NaT where a value is no time (ISO 8601 text or a
    timestamp)."""
    return pd.to_datetime(column, utc=True, errors="coerce", format="ISO8601")


def labelled_traffic(window: pd.DataFrame, spec: ModelSpec) -> pd.DataFrame:
    """The window's labelled rows, oldest first, with the label as the target column."""
    labelled = window[window["label"].notna()]
    rows = labelled[spec.feature_names].copy()
    rows[spec.target] = labelled["label"].to_numpy()
    return rows.reset_index(drop=True)


PROFILE_MIN_WINDOW_ROWS = 500


def reference_rows(
    train_rows: pd.DataFrame,
    window: pd.DataFrame | None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> pd.DataFrame:
    """The rows the reference profile describes: the data the new version will serve.

    A retrain after a shift carries the traffic window that showed it. Its rows, labelled or not, are the
    world as it is now, while the base data may be mostly the world before: profiling the mixed training
    set would make the new version drift on the very traffic it was trained for, and retrain again at
    every cooldown. The window's file also carries the model's older labelled rows (up to monitoring's
    ``export_labelled_rows``), which are as mixed, so only the rows predicted within the window's own time
    range (``start`` to ``end``, when known) count. They are the reference when there are at least
    ``PROFILE_MIN_WINDOW_ROWS``; otherwise (a manual retrain, a new base dataset, a tiny window) the
    training rows are.
    """
    if window is None:
        return train_rows
    if start is not None and end is not None and "predicted_at" in window.columns:
        at = prediction_times(window["predicted_at"])
        window = window[(at >= pd.Timestamp(start)) & (at <= pd.Timestamp(end))]
    return window if len(window) >= PROFILE_MIN_WINDOW_ROWS else train_rows


def assemble_training_set(spec: ModelSpec, base: list[pd.DataFrame], traffic: pd.DataFrame) -> pd.DataFrame:
    """Base rows then labelled traffic rows, combined by the policy; rows without a target are dropped."""
    policy = spec.retrain.training_set
    # Each dataset's rows without a target are dropped before the join: a dataset with no label at all (a
    # text column of nulls) would otherwise make the labels of the others objects, which no classifier fits.
    labelled = [
        _plain_target(rows, spec.target)
        for rows in (b.dropna(subset=[spec.target]) for b in base)
        if len(rows)
    ]
    base_rows = pd.concat(labelled, ignore_index=True) if labelled else _empty(spec)
    traffic = traffic.dropna(subset=[spec.target])
    if len(traffic) and len(base_rows):
        base_rows, traffic = _conform_labels(spec, base_rows, traffic)
    if len(traffic) and spec.task is Task.REGRESSION:
        traffic = _labels_within_float32(spec, traffic)
    if policy.mode is TrainingSetMode.SLIDING_WINDOW:
        assert policy.window_rows is not None
        combined = _concat(base_rows, traffic).tail(policy.window_rows)
    elif policy.mode is TrainingSetMode.WEIGHTED:
        combined = _concat(
            base_rows.assign(**{WEIGHT_COLUMN: 1.0}),
            traffic.assign(**{WEIGHT_COLUMN: float(policy.traffic_weight)}),
        )
    else:
        combined = _concat(base_rows, traffic)
    combined = combined.reset_index(drop=True)
    if len(combined) < policy.min_rows:
        raise TrainingError(
            FailureReason.DATASET_TOO_SMALL,
            f"the training set has {len(combined)} rows with a target; the spec needs at least "
            f"{policy.min_rows} (retrain.training_set.min_rows)",
        )
    classes = combined[spec.target].nunique() if spec.task is Task.CLASSIFICATION else None
    if classes is not None and classes < 2:
        raise TrainingError(
            FailureReason.DATASET_TOO_SMALL,
            f"the training set has only one class of {spec.target!r}; a classifier needs at least two",
        )
    if classes is not None and classes > CLASSES_MAX:
        raise TrainingError(
            FailureReason.INVALID_SPEC,
            f"the target {spec.target!r} has {classes:,} classes in the training set; a classifier is "
            f"trained for at most {CLASSES_MAX:,}: is it an id, or a number to predict with task regression?",
        )
    return combined


def _labels_within_float32(spec: ModelSpec, traffic: pd.DataFrame) -> pd.DataFrame:
    """``traffic`` without the rows whose regression label is beyond float32's range (monitoring may hold
    some from before ``contracts.common.GroundTruthLabel`` refused them in events): dropped and logged as a
    label that is no value of the target's type is, where in a base dataset such a target fails the run
    (:func:`check_numeric_values`): one client's label must not fail every retrain on the window."""
    labels = traffic[spec.target]
    if not pd.api.types.is_numeric_dtype(labels) or pd.api.types.is_bool_dtype(labels):
        return traffic
    beyond = np.abs(labels.to_numpy(dtype=float, na_value=np.nan)) > FLOAT32_MAX
    if not beyond.any():
        return traffic
    log.warning(
        "traffic labels dropped: beyond float32's range, where models compute",
        model=spec.name,
        target=spec.target,
        dropped=int(beyond.sum()),
        kept=int((~beyond).sum()),
    )
    return traffic[~beyond]


def _plain_target(rows: pd.DataFrame, target: str) -> pd.DataFrame:
    """``rows`` (each with a target) with the target in numpy's type for its values: a file's nullable or
    pyarrow-backed booleans and integers (:func:`numpy_types` leaves them to this, :func:`integer_target`
    reads a file's integers with a gap as them) become bool and int64, and so does a column of booleans
    held as objects (a CSV's, or a Parquet file's without pandas' types). scikit-learn took a nullable
    column's classes as floats (0.0 and 1.0, not False and True, and an integer past 2**53 not itself), which
    the holdout's booleans then did not meet in validation, and a boolean column of objects as no classes at
    all ("Unknown label type: unknown")."""
    column = rows[target]
    numpy_dtype = getattr(column.dtype, "numpy_dtype", None)
    if (
        numpy_dtype is not None
        and pd.api.types.is_extension_array_dtype(column)
        and (pd.api.types.is_bool_dtype(column) or pd.api.types.is_integer_dtype(column))
    ):
        return rows.assign(**{target: column.to_numpy(dtype=numpy_dtype)})
    if column.dtype == object and all(isinstance(v, bool | np.bool_) for v in column.tolist()):
        return rows.assign(**{target: column.to_numpy(dtype=bool)})
    return rows


def _conform_labels(
    spec: ModelSpec, base_rows: pd.DataFrame, traffic: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Traffic labels in the base target's type, value by value and only where that loses nothing.

    Labels come through JSON and the window file (a mixed column is text there: "True", "False", "1"),
    so a cast of the column would be wrong: text to bool is truthiness ("False" is True) and float to
    int truncates (19.75 is 19, a class 0.7 is 0). A boolean target takes booleans, "True"/"False" and
    the numbers 0 and 1; an integer or float target takes numbers and their text, exactly. A regression
    target of integers becomes float when a label has a fraction; a classification label that is no
    exact value of the target's type is no class. Rows whose label cannot be converted are dropped and
    counted (logged). A text target keeps its text labels as they are and reads any other (a number or a
    boolean: the window's label column holds numbers or booleans when every label in it is one) as its text,
    as monitoring judges a label against a class (:func:`~libs.profiles.category_key`: 1 and 1.0 are "1",
    True is "True"): joined as they were, text and numbers made the target of mixed types, and every retrain
    on the window failed as fit-error in scikit-learn's words ("'<' not supported between instances of
    'float' and 'str'"). Any other target keeps its labels as they are.
    """
    target = spec.target
    column = base_rows[target]
    if column.dtype == traffic[target].dtype and column.dtype != object:
        return base_rows, traffic
    convert: Callable[[Any], Any]
    if pd.api.types.is_bool_dtype(column) or (
        column.dtype == object and all(isinstance(v, bool | np.bool_) for v in column.tolist())
    ):
        convert, dtype = bool_label, "bool"
    elif pd.api.types.is_integer_dtype(column) or pd.api.types.is_float_dtype(column):
        convert, dtype = number_label, "float64"
    elif pd.api.types.is_string_dtype(column):
        convert, dtype = _label_text, str(column.dtype)
    else:
        return base_rows, traffic
    converted = [convert(v) for v in traffic[target].tolist()]
    keep = np.array([v is not None for v in converted], dtype=bool)
    if pd.api.types.is_integer_dtype(column):
        # A whole number the target's integer type cannot hold (a label of 1e300) is no value of it.
        bounds = np.iinfo(column.dtype)

        def held(v: Any) -> bool:
            return v is not None and float(v).is_integer() and bounds.min <= int(v) <= bounds.max

        integral = [v for v in converted if held(v)]
        if spec.task is Task.CLASSIFICATION:
            # A class of an integer target is an integer: a fractional label is no class.
            converted = [int(v) if v is not None and held(v) else None for v in converted]
            keep = np.array([v is not None for v in converted], dtype=bool)
            dtype = str(column.dtype)
        elif len(integral) == int(keep.sum()):
            converted = [int(v) if v is not None else None for v in converted]
            dtype = str(column.dtype)
        else:
            base_rows = base_rows.astype({target: "float64"})
    dropped = int(keep.size - keep.sum())
    if dropped:
        log.warning(
            "traffic labels dropped: not exactly a value of the target's type",
            model=spec.name,
            target=target,
            target_type=str(column.dtype),
            dropped=dropped,
            kept=int(keep.sum()),
        )
    values = pd.Series([v for v, k in zip(converted, keep.tolist(), strict=True) if k], dtype=dtype)
    kept = traffic[keep].copy()
    kept[target] = values.to_numpy()
    return base_rows, kept


def _label_text(value: Any) -> str:
    """A text target's label: text as it is, any other value as the class text monitoring judges it by."""
    return value if isinstance(value, str) else category_key(value)


def _concat(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    parts = [p for p in (first, second) if len(p)]
    if not parts:
        return first
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def split(spec: ModelSpec, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded holdout split, stratified by class when every class has at least two rows; both parts keep
    the frame's row order. Raises :class:`TrainingError` (dataset-too-small) when the rows left to fit hold
    a single class."""
    labels = None
    if spec.task is Task.CLASSIFICATION:
        codes, classes = pd.factorize(frame[spec.target], sort=True)
        counts = np.bincount(codes, minlength=len(classes))
        if counts.min() >= 2 and len(counts) <= len(frame) * spec.holdout_fraction:
            labels = codes
    held = holdout_mask(len(frame), spec.holdout_fraction, spec.seed, labels)
    if spec.task is Task.CLASSIFICATION and labels is None:
        fitted = np.unique(codes[~held])
        if fitted.size < 2:
            # Unstratified (a class of one row), the split may hold out every row but one class's: a linear
            # model then failed in scikit-learn's words, a tree was fitted into a model that knows one class.
            gone = [category_key(c) for i, c in enumerate(classes) if i not in fitted]
            raise TrainingError(
                FailureReason.DATASET_TOO_SMALL,
                f"the rows fitted (the training set but its holdout) hold only one class of "
                f"{shown(spec.target)}, {shown(category_key(classes[fitted[0]]))}: the holdout split took "
                "every row of "
                + ", ".join(shown(c) for c in gone[:3])
                + (f" and {len(gone) - 3:,} more" if len(gone) > 3 else "")
                + "; a classifier needs at least two classes among the rows it is fitted on, and each "
                "class at least two rows to keep one for the fit: add rows of the rarer classes",
            )
    # Positions, not a boolean mask: one take per part, and a sorted take reads each column in order.
    train_rows = frame.take(np.flatnonzero(~held))
    holdout_rows = frame.take(np.flatnonzero(held))
    return train_rows.reset_index(drop=True), holdout_rows.reset_index(drop=True)


def holdout_mask(rows: int, fraction: float, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Which of ``rows`` rows are held out: ceil(fraction x rows) of them, drawn with ``seed``.

    With ``labels`` (class codes 0..k-1) every class gives its share: floor(count x fraction) rows, and
    the rows left over go to the classes with the largest remainders (ties to the lower code). The same
    rows, labels and seed always give the same mask. (scikit-learn's StratifiedShuffleSplit, used before,
    took 10 ms of a 50,000-row split; this takes about 1 ms.)
    """
    n_test = min(rows, int(np.ceil(fraction * rows)))
    # One random order of the rows; each class holds out its first rows in that order.
    shuffled = np.random.default_rng(seed).permutation(rows)
    held = np.zeros(rows, dtype=bool)
    if labels is None:
        held[shuffled[:n_test]] = True
        return held
    counts = np.bincount(labels)
    exact = counts * (n_test / rows)
    quota = np.floor(exact).astype(np.int64)
    spare = n_test - int(quota.sum())
    if spare > 0:
        # At most one more row per class (spare < classes), so with a holdout fraction of at most one half
        # and two rows per class every class keeps a training row.
        by_remainder = np.lexsort((np.arange(counts.size), -(exact - quota)))
        quota[by_remainder[:spare]] += 1
    # Grouped by class, in the random order within each (a stable sort; 16-bit codes sort by radix): a row
    # is held out when its rank in its class is under the class's quota.
    codes = labels[shuffled]
    order = shuffled[np.argsort(codes.astype(np.uint16) if counts.size <= 65536 else codes, kind="stable")]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    ranked = labels[order]
    held[order[np.arange(rows) - starts[ranked] < quota[ranked]]] = True
    return held


def _ref(stored: StoredArtifact, fmt: ArtifactFormat) -> ArtifactRef:
    return ArtifactRef(key=stored.sha256, uri=stored.uri, format=fmt, size_bytes=stored.size)


def _materialise(store: ArtifactStore, frame: pd.DataFrame) -> MaterialisedSet:
    stored = store.put(frame_to_parquet(frame))
    return MaterialisedSet(
        artifact=_ref(stored, ArtifactFormat.PARQUET),
        rows=len(frame),
        columns={str(c): str(t) for c, t in frame.dtypes.items()},
    )


def _category(value: Any) -> bool | int | str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return str(value)


def signature(spec: ModelSpec, pipeline: Any, classes: tuple[Any, ...]) -> ModelSignature:
    """Features (categories from the spec, else as learned), target, task and classes."""
    learned: dict[str, list[Any]] = {}
    preprocess = pipeline.named_steps["preprocess"]
    if "categorical" in preprocess.named_transformers_:
        encoder = preprocess.named_transformers_["categorical"]
        names = [f.name for f in spec.features if f.type is FeatureType.CATEGORICAL]
        for name, cats in zip(names, encoder.categories_, strict=True):
            learned[name] = [
                _category(c) for c in cats if c is not None and not (isinstance(c, float) and np.isnan(c))
            ]
    features = [
        FeatureSpec(
            name=f.name,
            type=f.type,
            categories=f.categories if f.categories is not None else learned.get(f.name),
        )
        for f in spec.features
    ]
    return ModelSignature(
        features=features,
        target=spec.target,
        task=spec.task,
        classes=[_label(c) for c in classes] if spec.task is Task.CLASSIFICATION else None,
    )


def _label(value: Any) -> bool | int | float | str:
    if isinstance(value, np.generic):
        value = value.item()
    return value if isinstance(value, bool | int | float | str) else str(value)


def environment() -> dict[str, str]:
    """Versions of what fitted the model."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    # Read once per fit process: looking up six distributions' metadata takes milliseconds per job.
    out = {"python": platform.python_version()}
    for package in ("scikit-learn", "numpy", "pandas", "scipy", "skops", "pyarrow"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out
