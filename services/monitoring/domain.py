"""Monitoring's pure logic: reference preparation, columnar windows, the drift judgement, debouncing,
labelled performance and canary verdicts. No I/O: the handlers feed it and persist what it decides.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import numbers
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
import pydantic_core

from contracts.common import PG_INTEGER_MAX, VERSION_MAX, FeatureType, ModelSignature, Task
from contracts.monitoring import (
    P_VALUE_TESTS,
    CanaryComparison,
    CorrectionMethod,
    DriftDetected,
    DriftTest,
    FeatureDrift,
    Verdict,
)
from contracts.monitoring import DriftPolicy as PolicyContract
from contracts.predictions import PredictionColumns, PredictionsLogged, Variant
from libs.bus.retention import keep_period
from libs.cursors import (
    cursor_not_valid,
    cursor_of_another_list,
    cursor_position,
    cursor_time,
    encode_cursor,
)
from libs.metrics import Outputs, weighted
from libs.profiles import (
    CategoricalProfile,
    NumericProfile,
    ReferenceProfile,
    bin_counts,
    category_key,
    count_categories,
    refolded,
)
from services.monitoring import stats

# Numeric features with at most this many distinct reference values are compared as categories, as
# Evidently does (binary flags, small counts): a KS or Wasserstein on five values says little.
LOW_CARDINALITY = 5
HISTOGRAM_TOP_CATEGORIES = 20


def epoch(ts: datetime) -> float:
    """Seconds since the epoch (UTC) of an aware datetime."""
    return ts.timestamp()


LATEST = datetime.max.replace(tzinfo=UTC)
"""The last time an event may carry (9999-12-31T23:59:59.999999Z), a sentinel careless producers send."""

_LATEST_S = epoch(LATEST)
"""Its epoch seconds, rounded up to 10000-01-01 (a double holds about 30 µs there), as are the times of the
last 16 µs of year 9999."""


def from_epoch(seconds: float) -> datetime:
    """Aware UTC datetime from epoch seconds. Those of the last microseconds of year 9999 (:data:`_LATEST_S`)
    are read as :data:`LATEST`: turned back as they are, the first second of year 10000 raised ValueError, and
    one prediction dated so (valid by the contract) set its whole drift window aside and failed its label's
    join."""
    if seconds == _LATEST_S:
        return LATEST
    return datetime.fromtimestamp(seconds, UTC)


# --- retention of joined labels -----------------------------------------------------------------------------

EARLIEST = datetime.min.replace(tzinfo=UTC)
"""Before every row: where a round of the joined labels' retention starts."""

LABELLED_MARGIN = timedelta(days=1)
"""Added to how long a label may still be joined or corrected before its row may go: monitoring's clock (which
holds predictions) and Postgres' (which stamps ``received_at``) differ, and a tick may come late."""


def labelled_keep(keep_days: float, label_wait_s: float, max_clock_skew_s: float) -> timedelta | None:
    """How long a joined label's row is kept at least, counted from when its label was received; None (0
    days): for ever.

    ``keep_days``, but never less than a label may still reach the row: a label joins a prediction held in
    memory, and one is held at most ``label_wait_s`` after it was consumed (dated at most
    ``max_clock_skew_s`` ahead of that), while the label it joined may have waited ``label_wait_s`` for it
    before; so a correction, or a shadow's scoring joined to the label, comes at most twice the wait plus the
    skew after the label was received. Deleted sooner, such a label would be stored again as a new one, and
    counted twice. From :data:`~libs.bus.retention.KEEP_FOR_EVER_DAYS` days on, for ever too."""
    keep = keep_period(keep_days)
    if keep is None:
        return None
    reachable = timedelta(seconds=2 * label_wait_s + max_clock_skew_s) + LABELLED_MARGIN
    return max(keep, reachable)


STATUS_ALERTS_PER_MODEL = 10
"""Alerts ``GET /v1/status`` lists per model, newest first: the retention of alerts keeps them however old."""


# --- policy ----------------------------------------------------------------------------------------------


class DriftPolicy(PolicyContract):
    """A model's drift policy (the contract's fields, see ``contracts.monitoring.DriftPolicy``) with the
    logic that reads it."""

    def threshold_for(self, feature: str, test: DriftTest) -> float:
        """The threshold a feature is judged with by ``test``."""
        named = self.feature_tests.get(feature)
        # A feature's threshold is given for the test its policy names (validated for it): when the feature
        # cannot take that test (a distance of 2.0 for `wasserstein` on a categorical feature, judged by
        # chi-square instead), it is no threshold of the test chosen (an α of 2.0: drift in every window).
        if feature in self.feature_thresholds and (named is None or named is test):
            return self.feature_thresholds[feature]
        return {
            DriftTest.KS: self.alpha,
            DriftTest.CHI2: self.alpha,
            DriftTest.WASSERSTEIN: self.wasserstein_threshold,
            DriftTest.JENSEN_SHANNON: self.jensen_shannon_threshold,
            DriftTest.PSI: self.psi_threshold,
        }[test]


# --- references ------------------------------------------------------------------------------------------


@dataclass
class FeatureReference:
    """One feature's reference, prepared once per model version for fast window judgements."""

    name: str
    kind: FeatureType
    count: int
    missing: int
    # numeric
    sample: np.ndarray | None = None
    edges: np.ndarray | None = None
    histogram: np.ndarray | None = None
    grid: stats.WassersteinGrid | None = None
    distinct: int = 0
    # categorical (and low-cardinality numeric: the sample's values as categories)
    categories: list[str] = field(default_factory=list)
    category_counts: np.ndarray | None = None
    # A profile that keeps the model's levels: the reference count of every other level, in one bin that the
    # window's values of other levels join. None: the categories are every level the reference had.
    other: float | None = None
    # The JSON types of the model's levels (the signature's categories): a window's value of another type is
    # never one of the categories, though its text may read alike ("1" and 1); see count_window_categories.
    # Empty when the signature lists no levels.
    level_types: frozenset[type] = frozenset()

    @property
    def compared_as_categories(self) -> bool:
        return self.kind is FeatureType.CATEGORICAL or self.distinct <= LOW_CARDINALITY

    @property
    def missing_share(self) -> float:
        total = self.count + self.missing
        return self.missing / total if total else 0.0

    @property
    def other_share(self) -> float:
        """The reference's share of rows whose level the model does not keep (0 without such a bin)."""
        total = self.count + self.missing
        return (self.other or 0.0) / total if total else 0.0

    @classmethod
    def from_profile(
        cls, profile: NumericProfile | CategoricalProfile, levels: Sequence[Any] | None = None
    ) -> FeatureReference:
        """The reference of a profiled feature; ``levels``: the signature's categories of it."""
        if isinstance(profile, CategoricalProfile):
            cats = sorted(profile.frequencies)
            return cls(
                name=profile.name,
                kind=FeatureType.CATEGORICAL,
                count=profile.count,
                missing=profile.missing,
                categories=cats,
                category_counts=np.array([profile.frequencies[c] for c in cats], dtype=float),
                other=None if profile.other is None else float(profile.other),
                level_types=frozenset(map(type, levels or [])),
            )
        sample = np.asarray(profile.sample, dtype=float)
        values, counts = np.unique(sample, return_counts=True)
        measurable = stats.WassersteinGrid.measurable(sample)
        ref = cls(
            name=profile.name,
            kind=FeatureType.NUMERIC,
            count=profile.count,
            missing=profile.missing,
            sample=sample,
            edges=np.asarray(profile.edges, dtype=float),
            histogram=np.asarray(profile.histogram, dtype=float),
            grid=stats.WassersteinGrid.from_sample(sample) if measurable else None,
            distinct=int(values.size),
        )
        if ref.distinct <= LOW_CARDINALITY:
            ref.categories = [category_key(v) for v in values.tolist()]
            ref.category_counts = counts.astype(float)
        return ref


def _as_kept_now(
    profile: NumericProfile | CategoricalProfile, levels: Sequence[Any] | None
) -> NumericProfile | CategoricalProfile:
    """A categorical profile written before categories were folded, of more levels than a model keeps, folded
    in memory as training folds one now (:func:`libs.profiles.refolded`): an id-like column's 200,000 levels
    cost every window as much, and its fresh ids were all new categories. The stored profile is untouched."""
    return refolded(profile, levels) if isinstance(profile, CategoricalProfile) else profile


@dataclass
class ModelReference:
    """What monitoring knows of one registered model version."""

    model: str
    version: int
    signature: ModelSignature
    baseline: dict[str, float]
    rows: int
    features: list[FeatureReference]
    prediction: FeatureReference | None
    positive_class: str | None

    @property
    def task(self) -> Task:
        return self.signature.task

    @classmethod
    def build(
        cls,
        model: str,
        version: int,
        signature: ModelSignature,
        baseline: dict[str, float],
        profile: ReferenceProfile,
    ) -> ModelReference:
        by_name = {f.name: f for f in profile.features}
        features = [
            FeatureReference.from_profile(_as_kept_now(by_name[f.name], f.categories), f.categories)
            for f in signature.features
            if f.name in by_name
        ]
        prediction = FeatureReference.from_profile(profile.prediction) if profile.prediction else None
        positive = None
        if signature.task is Task.CLASSIFICATION and signature.classes:
            positive = str(signature.classes[-1])
        return cls(model, version, signature, dict(baseline), profile.rows, features, prediction, positive)

    @property
    def numeric(self) -> list[FeatureReference]:
        return [f for f in self.features if f.kind is FeatureType.NUMERIC]

    @property
    def categorical(self) -> list[FeatureReference]:
        return [f for f in self.features if f.kind is FeatureType.CATEGORICAL]


# --- rows: PredictionsLogged -> columns --------------------------------------------------------------------


@dataclass
class RowBatch:
    """Rows of consecutive requests for one model version, as columns (the unit of every window update)."""

    model: str
    version: int
    numeric: dict[str, np.ndarray]  # float64, NaN for missing
    categorical: dict[str, list[Any]]  # raw values, None for missing
    type_mismatches: dict[str, int]
    prediction: list[Any]
    score: np.ndarray  # positive-class probability or regression value; NaN when unknown
    prediction_ids: list[str]
    predicted_at: np.ndarray  # epoch seconds per row
    variant: list[str]  # per request
    rollout_id: list[str | None]  # per request
    latency_ms: np.ndarray  # per request
    request_rows: np.ndarray  # rows per request
    request_at: np.ndarray  # epoch seconds per request
    partition: np.ndarray  # per request
    offset: np.ndarray  # per request
    mismatch_rows: dict[str, np.ndarray] = field(default_factory=dict)
    """Per numeric feature with ``type_mismatches``, the rows (indices) of its values that are no number: a
    slice counts its own. Counted whole in a batch's first slice, a poll that closed a window mid-batch
    reported the poll's mismatches in that window and none in the windows holding their rows."""

    @property
    def size(self) -> int:
        return len(self.prediction_ids)

    @property
    def requests(self) -> int:
        return int(self.request_rows.size)

    def row_slice(self, first_request: int, end_request: int) -> RowBatch:
        """The rows of requests [first_request, end_request)."""
        bounds = np.concatenate(([0], np.cumsum(self.request_rows)))
        a, b = int(bounds[first_request]), int(bounds[end_request])
        r = slice(first_request, end_request)
        mismatch_rows = {k: v[(v >= a) & (v < b)] - a for k, v in self.mismatch_rows.items()}
        mismatch_rows = {k: v for k, v in mismatch_rows.items() if v.size}
        return RowBatch(
            model=self.model,
            version=self.version,
            numeric={k: v[a:b] for k, v in self.numeric.items()},
            categorical={k: v[a:b] for k, v in self.categorical.items()},
            type_mismatches={k: int(v.size) for k, v in mismatch_rows.items()},
            prediction=self.prediction[a:b],
            score=self.score[a:b],
            prediction_ids=self.prediction_ids[a:b],
            predicted_at=self.predicted_at[a:b],
            variant=self.variant[r],
            rollout_id=self.rollout_id[r],
            latency_ms=self.latency_ms[r],
            request_rows=self.request_rows[r],
            request_at=self.request_at[r],
            partition=self.partition[r],
            offset=self.offset[r],
            mismatch_rows=mismatch_rows,
        )

    def row_variants(self) -> np.ndarray:
        return np.repeat(np.asarray(self.variant, dtype=object), self.request_rows)

    def row_rollouts(self) -> np.ndarray:
        return np.repeat(np.asarray(self.rollout_id, dtype=object), self.request_rows)


_NO_ROWS = np.empty(0, dtype=np.int64)


def _as_float_column(values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """A numeric column as float64 (NaN for missing) and the rows of its values that are no number: text that
    does not read as one, an infinity, or an integer beyond a double."""
    try:
        # numpy turns None into NaN and bools into 0/1 on its own, at C speed.
        column = np.array(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        # numpy also reads text ("1.5", "nan", "inf", "1e999"; serving refuses text in a numeric feature, a
        # log written otherwise can hold it). An infinity can only be such text (JSON has none, and a too
        # large integer raises above): the values are then read one by one, the infinity counted as a type
        # mismatch instead of measured (an infinite Wasserstein distance: drift for a few such values).
        # Checked vectorised: this runs for every value consumed.
        if not np.isinf(column).any():
            return column, _NO_ROWS
    out = np.full(len(values), np.nan)
    bad: list[int] = []
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            x = float(v)
        except (TypeError, ValueError, OverflowError):  # not a number, or an integer beyond a double
            bad.append(i)
            continue
        if math.isinf(x):
            bad.append(i)
        else:
            out[i] = x
    return out, np.array(bad, dtype=np.int64)


def _feature_column(requests: Sequence[PredictionColumns], name: str) -> list[Any]:
    """One feature's values across the requests' rows (None where a request's rows lack it)."""
    if len(requests) == 1:
        only = requests[0].inputs.get(name)
        return only if only is not None else [None] * requests[0].size
    out: list[Any] = []
    for c in requests:
        values = c.inputs.get(name)
        out += values if values is not None else [None] * c.size
    return out


def rows_of(
    model: ModelReference, requests: Sequence[tuple[PredictionColumns | PredictionsLogged, int, int]]
) -> RowBatch:
    """Columns of the rows of ``requests`` (payload, partition, offset), all for ``model``'s version.

    A payload comes as columns (``contracts.predictions.read_prediction_columns``, monitoring's reader) or
    as a validated PredictionsLogged (full validation's answer), which is turned into columns first."""
    cols = [p if type(p) is PredictionColumns else PredictionColumns.of(p) for p, _, _ in requests]  # type: ignore[arg-type]
    numeric: dict[str, np.ndarray] = {}
    mismatch_rows: dict[str, np.ndarray] = {}
    for f in model.numeric:
        column, bad = _as_float_column(_feature_column(cols, f.name))
        numeric[f.name] = column
        if bad.size:
            mismatch_rows[f.name] = bad
    categorical = {f.name: list(_feature_column(cols, f.name)) for f in model.categorical}
    prediction = list(itertools.chain.from_iterable(c.predictions for c in cols))
    if model.positive_class is not None:
        pos = model.positive_class
        score, _ = _as_float_column([p.get(pos) if p else None for c in cols for p in c.probabilities])
    elif model.task is Task.REGRESSION:
        score, _ = _as_float_column(prediction)
    else:
        score = np.full(len(prediction), np.nan)
    counts = np.array([c.size for c in cols], dtype=np.int64)
    request_at = np.array([epoch(c.predicted_at) for c in cols], dtype=np.float64)
    return RowBatch(
        model=model.model,
        version=model.version,
        numeric=numeric,
        categorical=categorical,
        type_mismatches={k: int(v.size) for k, v in mismatch_rows.items()},
        prediction=prediction,
        score=score,
        prediction_ids=list(itertools.chain.from_iterable(c.prediction_ids for c in cols)),
        predicted_at=np.repeat(request_at, counts),
        variant=[c.variant.value for c in cols],
        rollout_id=[c.rollout_id for c in cols],
        latency_ms=np.array([c.latency_ms for c in cols], dtype=np.float64),
        request_rows=counts,
        request_at=request_at,
        partition=np.array([part for _, part, _ in requests], dtype=np.int64),
        offset=np.array([off for _, _, off in requests], dtype=np.int64),
        mismatch_rows=mismatch_rows,
    )


# --- windows ---------------------------------------------------------------------------------------------


@dataclass
class ClosedWindow:
    """A window's rows, concatenated, ready to judge."""

    model: str
    version: int
    seq: int
    start: float  # the earliest event time (predicted_at) in the window, not its first request's
    end: float  # the latest
    numeric: dict[str, np.ndarray]
    categorical: dict[str, list[Any]]
    type_mismatches: dict[str, int]
    prediction: list[Any]
    score: np.ndarray
    prediction_ids: list[str]
    predicted_at: np.ndarray
    first_offsets: dict[int, int]
    next_offsets: dict[int, int]
    too_few_rows: bool = False
    """Closed with fewer than ``min_window_rows`` rows because its version got no traffic for the label wait:
    set aside unjudged, not judged (``LiveState.close_idle``)."""

    @property
    def size(self) -> int:
        return len(self.prediction_ids)

    @property
    def window_id(self) -> str:
        return f"{self.model}:{self.version}:{self.seq:06d}"


def window_number(model: str, window_id: str) -> tuple[int, int] | None:
    """(version, seq) of one of the model's window ids (``ClosedWindow.window_id``); None for an id of
    another shape or model."""
    version, _, seq = window_id.removeprefix(f"{model}:").partition(":")
    if not window_id.startswith(f"{model}:") or not all(
        part.isascii() and part.isdigit() and len(part) <= 9 for part in (version, seq)
    ):
        return None
    return int(version), int(seq)


DRIFT_LIST = "drift"
"""The name inside the cursors of a model's drift windows (``GET /v1/models/{model}/drift`` and its page)."""


@dataclass(frozen=True)
class ReportPosition:
    """A window report's place in its model's list, newest first: (judged_at, seq, version) is unique (two
    versions' windows of one number can be judged in one transaction, at one ``now()``), so a page goes on
    from the last row of the one before, whatever was judged meanwhile."""

    judged_at: datetime
    seq: int
    version: int


def report_cursor(model: str, position: ReportPosition) -> str:
    """The cursor of the page after ``position`` in ``model``'s drift windows."""
    return encode_cursor(DRIFT_LIST, [model, position.judged_at, position.seq, position.version])


def decode_report_cursor(cursor: str, model: str) -> ReportPosition:
    """The position inside a cursor of ``model``'s drift windows; 422 for a cursor :func:`report_cursor` did
    not make for them (another model's too: read as this one's, it would be a position among other rows)."""
    name, judged_at, seq, version = cursor_position(cursor, DRIFT_LIST, 4, lists=(DRIFT_LIST,))
    if type(name) is not str or type(seq) is not int or type(version) is not int or name != model:
        raise cursor_of_another_list()
    # Numbers the table's integer columns can hold: a larger one could not be compared with a row.
    if not 0 <= seq <= PG_INTEGER_MAX or not 1 <= version <= VERSION_MAX:
        raise cursor_not_valid()
    return ReportPosition(cursor_time(judged_at), seq, version)


@dataclass
class DriftWindow:
    """The open window of one model version: chunks appended as batches arrive, concatenated at close."""

    model: str
    version: int
    seq: int
    parts: list[RowBatch] = field(default_factory=list)
    rows: int = 0
    first_at: float | None = None
    # Earliest and latest event time: with several partitions or serving replicas (clocks differ) a request
    # can come after one answered later, so the first and the last request do not bound the window.
    earliest_at: float | None = None
    latest_at: float | None = None
    last_arrival: float = 0.0
    first_offsets: dict[int, int] = field(default_factory=dict)
    next_offsets: dict[int, int] = field(default_factory=dict)

    def add(self, part: RowBatch, *, arrival: float) -> None:
        if part.size == 0:
            return
        self.parts.append(part)
        self.rows += part.size
        if self.first_at is None:
            self.first_at = float(part.request_at[0])
        low, high = float(part.request_at.min()), float(part.request_at.max())
        self.earliest_at = low if self.earliest_at is None else min(self.earliest_at, low)
        self.latest_at = high if self.latest_at is None else max(self.latest_at, high)
        self.last_arrival = arrival
        for p, o in zip(part.partition.tolist(), part.offset.tolist(), strict=True):
            self.first_offsets.setdefault(p, o)
            self.next_offsets[p] = o + 1

    def close(self, *, too_few_rows: bool = False) -> ClosedWindow:
        parts = self.parts
        first = parts[0]
        mismatches: Counter[str] = Counter()
        for p in parts:
            mismatches.update(p.type_mismatches)
        return ClosedWindow(
            model=self.model,
            version=self.version,
            seq=self.seq,
            start=float(self.earliest_at or 0.0),
            end=float(self.latest_at or 0.0),
            numeric={k: np.concatenate([p.numeric[k] for p in parts]) for k in first.numeric},
            categorical={k: [v for p in parts for v in p.categorical[k]] for k in first.categorical},
            type_mismatches=dict(mismatches),
            prediction=[v for p in parts for v in p.prediction],
            score=np.concatenate([p.score for p in parts]),
            prediction_ids=[v for p in parts for v in p.prediction_ids],
            predicted_at=np.concatenate([p.predicted_at for p in parts]),
            first_offsets=dict(self.first_offsets),
            next_offsets=dict(self.next_offsets),
            too_few_rows=too_few_rows,
        )


def split_point(
    batch: RowBatch,
    *,
    window_rows: int,
    window_seconds: float,
    min_rows: int,
    already: int,
    first_at: float | None,
) -> int | None:
    """Index of the first request that no longer belongs to the open window, or None when all fit.

    A window closes at a request boundary once it holds ``window_rows`` rows (the request that reaches it
    stays in), or before a request that comes ``window_seconds`` (event time) after the window's first one,
    provided the window already holds ``min_rows`` rows.
    """
    if batch.requests == 0:
        return None
    cum = already + np.cumsum(batch.request_rows)
    before = cum - batch.request_rows
    full = np.flatnonzero(cum >= window_rows)
    candidates = []
    if full.size:
        candidates.append(int(full[0]) + 1)
    start = first_at if first_at is not None else float(batch.request_at[0])
    late = np.flatnonzero((batch.request_at >= start + window_seconds) & (before >= max(min_rows, 1)))
    if late.size:
        candidates.append(int(late[0]))
    return min(candidates) if candidates else None


# --- judgement -------------------------------------------------------------------------------------------


@dataclass
class Histogram:
    """Reference and current shares over the same bins, for the HTML report."""

    labels: list[str]
    reference: list[float]
    current: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "reference": self.reference, "current": self.current}


@dataclass
class FeatureResult:
    """One feature's raw result before correction and debouncing."""

    name: str
    kind: FeatureType
    test: DriftTest
    statistic: float
    p_value: float | None
    threshold: float
    n_current: int
    n_reference: int
    n_missing: int
    histogram: Histogram | None
    unseen: int = 0
    drifted: bool = False
    p_adjusted: float | None = None
    untested: str | None = None  # why the window could not be compared with the reference
    # Tables drawn for a Monte Carlo p-value (chi-square on a sparse table); None: the test's distribution.
    p_draws: int | None = None

    @property
    def tested(self) -> bool:
        """The window had values and the test could compare them with the reference."""
        return self.n_current > 0 and self.untested is None

    def evidence(self, consecutive: int) -> FeatureDrift:
        return FeatureDrift(
            feature=self.name,
            feature_type=self.kind,
            test=self.test,
            statistic=_finite(self.statistic),
            p_value=self.p_adjusted,
            threshold=self.threshold,
            drifted=self.drifted,
            consecutive_windows=consecutive,
            n_current=self.n_current,
            n_reference=self.n_reference,
            n_missing=self.n_missing,
        )


LARGEST_DOUBLE = sys.float_info.max
"""What an event or a report says of a statistic beyond a double (a normalised Wasserstein distance of a
window of 1.7e308 against a reference spread of 0.001): at least this; JSON has no infinity. Before, 1e300,
which a true distance can be."""


def _finite(x: float) -> float:
    if math.isnan(x):
        return 0.0  # not reached: judge_feature leaves a feature whose test gives NaN untested
    if math.isinf(x):
        return LARGEST_DOUBLE if x > 0 else -LARGEST_DOUBLE
    return x


@dataclass
class QualityFinding:
    """A data-quality observation of a window (missing values, unseen categories, type mismatches, a
    feature that could not be tested)."""

    kind: Literal["missing-values", "unseen-category", "out-of-range", "type-mismatch"]
    feature: str
    count: int
    share: float
    message: str


@dataclass
class WindowJudgement:
    """Everything one window said: per-feature results, the prediction's, and data quality."""

    window: ClosedWindow
    features: list[FeatureResult]
    prediction: FeatureResult | None
    quality: list[QualityFinding]
    correction: CorrectionMethod
    alpha: float

    @property
    def drift_share(self) -> float:
        tested = [f for f in self.features if f.tested]
        return sum(f.drifted for f in tested) / len(tested) if tested else 0.0


def choose_test(ref: FeatureReference, n_current: int, policy: DriftPolicy) -> DriftTest:
    """The documented rule (docs/monitoring.md): a policy override first; else, by the smaller sample, a
    p-value test up to ``small_sample_max`` values (KS for numeric, chi-square for categories) and a
    distance above it (normalised Wasserstein for numeric, Jensen–Shannon for categories). Numeric
    features with at most five distinct reference values count as categories."""
    override = policy.feature_tests.get(ref.name)
    if override is not None and _eligible(ref, override):
        return override
    small = min(n_current, ref.count) <= policy.small_sample_max
    if ref.compared_as_categories:
        return DriftTest.CHI2 if small else DriftTest.JENSEN_SHANNON
    return DriftTest.KS if small else DriftTest.WASSERSTEIN


def _eligible(ref: FeatureReference, test: DriftTest) -> bool:
    if test in (DriftTest.KS, DriftTest.WASSERSTEIN):
        return ref.kind is FeatureType.NUMERIC and ref.sample is not None and ref.sample.size > 0
    if test is DriftTest.CHI2:
        return ref.compared_as_categories
    return True  # PSI and Jensen–Shannon work on bins and on categories


OTHER_LEVELS = "(levels the model does not keep)"
"""The label of a folded profile's one bin for every level the model does not keep (histograms only: bins are
matched by position, so a category spelled alike stays its own)."""


_JSON_TYPE = {str: "text", int: "integer", bool: "boolean", float: "number"}


def count_window_categories(
    values: Sequence[Any] | np.ndarray, level_types: frozenset[type]
) -> tuple[dict[str, int], dict[str, int]]:
    """A window's categorical values counted as the reference profile counts its own (per
    :func:`~libs.profiles.category_key`), and apart, those of another JSON type than the model's levels
    (``level_types``; none apart when it is empty), labelled with their type: "1" is not the integer level
    1, nor true the level 1, though their text reads alike (docs/serving.md, "Categories"). Serving refuses
    such values; a prediction log written before it did can hold them."""
    if not level_types:
        return count_categories(values), {}
    # By (type, value), at C speed: a plain Counter would merge True with 1 (they hash equal).
    raw = Counter(zip(map(type, values), values, strict=True))
    counted: dict[str, int] = {}
    foreign: dict[str, int] = {}
    for (t, value), n in raw.items():
        if value is None:
            continue
        if t is float and value.is_integer():
            t = int  # 1.0 is the integer 1, as serving takes it (JSON has one kind of number)
        if t in level_types:
            key = category_key(value)
            counted[key] = counted.get(key, 0) + n
        else:
            key = f"{category_key(value)} ({_JSON_TYPE.get(t, t.__name__)})"
            foreign[key] = foreign.get(key, 0) + n
    return counted, foreign


def _category_counts(
    ref: FeatureReference, counted: dict[str, int], foreign: dict[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Reference and current counts over the union of categories (reference order, then unseen ones, then
    ``foreign``: values of another type than the levels, never looked up among the reference's categories). A
    profile that keeps the model's levels has one bin for the others, foreign values included, on both sides
    (dropped when empty on both)."""
    index = {c: i for i, c in enumerate(ref.categories)}
    foreign = foreign or {}
    assert ref.category_counts is not None
    if ref.other is not None:
        kept = len(ref.categories)
        current = np.zeros(kept + 1)
        for c, n in counted.items():
            current[index.get(c, kept)] += n
        current[kept] += sum(foreign.values())
        if not ref.other and not current[kept]:
            return ref.category_counts, current[:kept], list(ref.categories)
        return np.append(ref.category_counts, ref.other), current, [*ref.categories, OTHER_LEVELS]
    unseen = sorted(c for c in counted if c not in index)
    index.update((c, len(ref.categories) + j) for j, c in enumerate(unseen))
    labels = ref.categories + unseen + sorted(foreign)
    current = np.zeros(len(labels))
    for c, n in counted.items():
        current[index[c]] = n
    offset = len(ref.categories) + len(unseen)
    for j, c in enumerate(sorted(foreign)):
        current[offset + j] = foreign[c]
    ref_counts = np.zeros(len(labels))
    ref_counts[: len(ref.categories)] = ref.category_counts
    return ref_counts, current, labels


def _untestable(ref: FeatureReference, test: DriftTest) -> str | None:
    """Why ``test`` cannot compare a window with this reference, if it cannot."""
    if ref.count == 0:
        return f"the reference has no values of {ref.name} (all {ref.missing} rows missing)"
    if test is DriftTest.WASSERSTEIN and ref.grid is None:
        assert ref.sample is not None
        return (
            f"the reference values of {ref.name} span {ref.sample[0]:.4g} to {ref.sample[-1]:.4g}, beyond "
            "what a double can measure: the Wasserstein distance cannot be computed"
        )
    return None


def judge_feature(
    ref: FeatureReference, values: np.ndarray | list[Any], policy: DriftPolicy, *, family: int = 1
) -> FeatureResult:
    """Compare one feature's window values with its reference (before correction); ``family``: at most how
    many p-values are corrected together with this one (:func:`strictest_bar`)."""
    counted: dict[str, int] | None = None
    foreign: dict[str, int] = {}
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        present_num = values[~np.isnan(values)]
        n_missing = int(values.size - present_num.size)
        present: np.ndarray | list[Any] = present_num
        n = int(present_num.size)
    else:
        # The same category keys as the reference profile's (libs.profiles.category_key).
        counted, foreign = count_window_categories(values, ref.level_types)
        n = sum(counted.values()) + sum(foreign.values())
        n_missing = len(values) - n
        present = []
    test = choose_test(ref, n, policy)
    threshold = policy.threshold_for(ref.name, test)

    def untested_result(why: str, histogram: Histogram | None = None, unseen: int = 0) -> FeatureResult:
        # Nothing the test could compare: not "no drift" (a p-value of 1, a distance of 0), no verdict.
        return FeatureResult(
            name=ref.name,
            kind=ref.kind,
            test=test,
            statistic=0.0,
            p_value=None,
            threshold=threshold,
            n_current=n,
            n_reference=ref.count,
            n_missing=n_missing,
            histogram=histogram,
            unseen=unseen,
            untested=why,
        )

    untested = _untestable(ref, test)
    if untested is not None:
        return untested_result(untested)
    hist: Histogram | None = None
    unseen = 0
    statistic, p_value = 0.0, None
    p_draws: int | None = None
    binned_reference: np.ndarray | None = None  # what a binned distance compared the window with
    if ref.compared_as_categories and test in (DriftTest.CHI2, DriftTest.JENSEN_SHANNON, DriftTest.PSI):
        if counted is None:
            distinct, freq = np.unique(np.asarray(present, dtype=float), return_counts=True)
            # np.unique already holds -0.0 and 0.0 as one value: one key per distinct number.
            counted = {category_key(v): c for v, c in zip(distinct.tolist(), freq.tolist(), strict=True)}
        ref_counts, cur_counts, labels = _category_counts(ref, counted, foreign)
        unseen = int(cur_counts[len(ref.categories) :].sum())
        if n:
            if test is DriftTest.CHI2:
                statistic, p_value = stats.chi_square(ref_counts, cur_counts)
                # The asymptotic p-value of a sparse table is too small; it can only matter when it would
                # count as drift (below the threshold uncorrected: no correction lowers a p-value).
                if p_value < threshold and stats.chi_square_sparse(ref_counts, cur_counts):
                    p_draws = stats.monte_carlo_draws(strictest_bar(policy, threshold, family))
                    p_value = stats.chi_square_monte_carlo(ref_counts, cur_counts, p_draws)
            elif test is DriftTest.PSI:
                statistic, binned_reference = stats.psi(ref_counts, cur_counts), ref_counts
            else:
                statistic, binned_reference = stats.jensen_shannon(ref_counts, cur_counts), ref_counts
        hist = _category_histogram(labels, ref_counts, cur_counts)
    else:
        assert ref.edges is not None and ref.histogram is not None
        cur = np.asarray(present, dtype=float)
        cur_bins = bin_counts(cur, ref.edges)
        if n:
            if test is DriftTest.KS:
                assert ref.sample is not None
                statistic, p_value = stats.ks_test(ref.sample, cur)
            elif test is DriftTest.WASSERSTEIN:
                assert ref.grid is not None
                statistic = stats.wasserstein_normed(ref.grid, cur)
            elif test is DriftTest.PSI:
                statistic, binned_reference = stats.psi(ref.histogram, cur_bins), ref.histogram
            else:
                statistic, binned_reference = stats.jensen_shannon(ref.histogram, cur_bins), ref.histogram
        hist = _numeric_histogram(ref.edges, ref.histogram, cur_bins)
    if n and (math.isnan(statistic) or (p_value is not None and math.isnan(p_value))):
        # A test that gives no number measured nothing (NaN >= threshold is False, and the statistic would
        # be published as 0).
        return untested_result(f"{test.value} gave no number for this window", hist, unseen)
    if binned_reference is not None and statistic >= threshold:
        # Two samples of one population are not at distance 0: the threshold counts from the distance
        # sampling alone gives a window of this size (only computed when it matters: it can only raise it).
        raise_threshold = (
            stats.psi_threshold_at if test is DriftTest.PSI else stats.jensen_shannon_threshold_at
        )
        threshold = raise_threshold(threshold, binned_reference, n)
    # Tests on the sample (KS, Wasserstein, and categories of a low-cardinality numeric) see the sample;
    # binned tests and categorical frequencies see every reference row.
    uses_sample = ref.sample is not None and (
        test in (DriftTest.KS, DriftTest.WASSERSTEIN)
        or (ref.kind is FeatureType.NUMERIC and ref.compared_as_categories)
    )
    n_reference = int(ref.sample.size) if uses_sample and ref.sample is not None else ref.count
    result = FeatureResult(
        name=ref.name,
        kind=ref.kind,
        test=test,
        statistic=float(statistic),
        p_value=p_value,
        threshold=threshold,
        n_current=n,
        n_reference=n_reference,
        n_missing=n_missing,
        histogram=hist,
        unseen=unseen,
        p_draws=p_draws,
    )
    if test not in P_VALUE_TESTS:
        result.drifted = n > 0 and statistic >= threshold
    return result


def _numeric_histogram(edges: np.ndarray, ref: np.ndarray, cur: np.ndarray) -> Histogram:
    labels = []
    bounds = [-math.inf, *edges.tolist(), math.inf]
    for a, b in itertools.pairwise(bounds):
        labels.append(f"({_fmt(a)}, {_fmt(b)}]" if b != math.inf else f"({_fmt(a)}, ∞)")
    return Histogram(labels, _shares(ref, ref.sum()), _shares(cur, cur.sum()))


def _category_histogram(labels: list[str], ref: np.ndarray, cur: np.ndarray) -> Histogram:
    order = np.argsort(-(ref / max(ref.sum(), 1) + cur / max(cur.sum(), 1)), kind="stable")
    keep = order[:HISTOGRAM_TOP_CATEGORIES]
    return Histogram([labels[i] for i in keep], _shares(ref[keep], ref.sum()), _shares(cur[keep], cur.sum()))


def _shares(counts: np.ndarray, total: float) -> list[float]:
    shares = counts / total if total else np.zeros(counts.size)
    return [round(float(x), 6) for x in shares]


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "-∞" if x < 0 else "∞"
    return f"{x:.4g}"


def strictest_bar(policy: DriftPolicy, threshold: float, family: int) -> float:
    """The smallest value a raw p-value may have to stay below to drift, corrected in a family of at most
    ``family`` p-values: ``threshold / family`` with Bonferroni and with Benjamini–Hochberg (the bar of its
    first rank), the threshold itself uncorrected. A Monte Carlo p-value's resolution is chosen from it."""
    if policy.correction is CorrectionMethod.NONE:
        return threshold
    return threshold / max(family, 1)


def correct(results: list[FeatureResult], policy: DriftPolicy) -> None:
    """Adjust the p-values of the p-value tests as one family and set their verdicts (in place)."""
    tested = [r for r in results if r.test in P_VALUE_TESTS and r.p_value is not None and r.tested]
    if not tested:
        return
    raw = np.array([r.p_value for r in tested], dtype=float)
    if policy.correction is CorrectionMethod.BONFERRONI:
        adjusted = stats.bonferroni(raw)
    elif policy.correction is CorrectionMethod.FDR_BH:
        adjusted = stats.benjamini_hochberg(raw)
    else:
        adjusted = raw
    for r, p in zip(tested, adjusted.tolist(), strict=True):
        r.p_adjusted = float(p)
        r.drifted = p < r.threshold


def judge_window(model: ModelReference, window: ClosedWindow, policy: DriftPolicy) -> WindowJudgement:
    """Judge one window: every feature, corrected as one family; the prediction; data quality."""
    results: list[FeatureResult] = []
    for ref in model.features:
        values: np.ndarray | list[Any] = (
            window.numeric[ref.name] if ref.kind is FeatureType.NUMERIC else window.categorical[ref.name]
        )
        results.append(judge_feature(ref, values, policy, family=len(model.features)))
    correct(results, policy)
    prediction = None
    if model.prediction is not None:
        if model.prediction.kind is FeatureType.NUMERIC:
            values = window.score if not np.all(np.isnan(window.score)) else _floats(window.prediction)
        else:
            values = window.prediction
        prediction = judge_feature(model.prediction, values, policy)
        if prediction.p_value is not None:
            # The prediction is its own family of one: judged at alpha, uncorrected.
            prediction.p_adjusted = prediction.p_value
            prediction.drifted = prediction.n_current > 0 and prediction.p_value < prediction.threshold
    return WindowJudgement(
        window=window,
        features=results,
        prediction=prediction,
        quality=quality_findings(model, window, results, policy),
        correction=policy.correction,
        alpha=policy.alpha,
    )


def _floats(values: list[Any]) -> np.ndarray:
    column, _ = _as_float_column(values)
    return column


UNSEEN_SHARE_TOLERANCE = 0.01
"""How much more of a window than of the reference may be categories unseen by the reference (or the model)
before it is a finding."""


def unseen_share_allowed(ref: FeatureReference, window_rows: int) -> float:
    """The largest share of a window's rows that may have unseen categories without a finding: 1% above the
    reference's own share of levels the model does not keep (a folded profile's bin; 0 for a profile that
    lists every category), plus three standard errors of a window's share at the reference's, as such a
    bin (an id-like feature's) holds a good part of every window."""
    share = ref.other_share
    return share + UNSEEN_SHARE_TOLERANCE + 3 * math.sqrt(share * (1 - share) / max(window_rows, 1))


def quality_findings(
    model: ModelReference, window: ClosedWindow, results: list[FeatureResult], policy: DriftPolicy
) -> list[QualityFinding]:
    """Missing values above the reference's share, unseen categories, values of the wrong type. Messages show
    a long feature name shortened (:func:`shown_name`): the finding's ``feature`` has it whole."""
    findings: list[QualityFinding] = []
    size = max(window.size, 1)
    refs = {f.name: f for f in model.features}
    for r in results:
        name = shown_name(r.name)
        if r.untested is not None and r.n_current:
            findings.append(
                QualityFinding(
                    "missing-values" if refs[r.name].count == 0 else "out-of-range",
                    r.name,
                    r.n_current,
                    r.n_current / size,
                    f"{name} not tested: {r.untested.replace(r.name, name)}",
                )
            )
        share = r.n_missing / size
        ref_share = refs[r.name].missing_share
        if r.n_missing and share > ref_share + policy.missing_share_tolerance:
            findings.append(
                QualityFinding(
                    "missing-values",
                    r.name,
                    r.n_missing,
                    share,
                    f"{share:.1%} of {name} missing (reference: {ref_share:.1%})",
                )
            )
        ref = refs[r.name]
        if (
            r.unseen
            and ref.kind is FeatureType.CATEGORICAL
            and r.unseen / size > unseen_share_allowed(ref, size)
        ):
            findings.append(
                QualityFinding(
                    "unseen-category",
                    r.name,
                    r.unseen,
                    r.unseen / size,
                    f"{r.unseen / size:.1%} of {name} are categories the reference never had"
                    if ref.other is None
                    else f"{r.unseen / size:.1%} of {name} are categories the model does not keep "
                    f"(reference: {ref.other_share:.1%})",
                )
            )
    for feature, bad in sorted(window.type_mismatches.items()):
        findings.append(
            QualityFinding(
                "type-mismatch",
                feature,
                bad,
                bad / size,
                f"{bad} values of numeric feature {shown_name(feature)} are not numbers",
            )
        )
    return findings


NAME_SHOWN_CHARS = 80
"""The longest feature name a message shows whole; a longer one is cut (the event's fields carry it whole)."""


def shown_name(name: str) -> str:
    """A feature name as a message for people shows it: cut to :data:`NAME_SHOWN_CHARS`, ending in "…"."""
    return name if len(name) <= NAME_SHOWN_CHARS else name[: NAME_SHOWN_CHARS - 1] + "…"


VALUE_SHOWN_CHARS = 40
CLASSES_SHOWN = 10


def shown_value(value: Any) -> str:
    """A label or a class as a message for people shows it: its ``repr``, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= VALUE_SHOWN_CHARS else f"{text[:VALUE_SHOWN_CHARS]}..."


METRIC_SHOWN_FIXED_BELOW = 1e6
"""The largest metric a message shows with four decimals; a larger one (an error of a regression model that
predicted 1e300: its true, finite MAE) is shown with four significant digits, not its 300 digits."""


def shown_metric(x: float) -> str:
    """A metric as a message for people shows it: four decimals, or four significant digits when large."""
    return f"{x:.4f}" if abs(x) < METRIC_SHOWN_FIXED_BELOW else f"{x:.4g}"


def shown_classes(classes: Sequence[Any]) -> str:
    """A model's classes as a message shows them: the first 10, and how many in all beyond that."""
    shown = ", ".join(shown_value(c) for c in classes[:CLASSES_SHOWN])
    return shown if len(classes) <= CLASSES_SHOWN else f"{shown}, ... ({len(classes)} classes)"


ALL_FEATURES = ""
"""The feature under which an issue that stands for many features keeps its cooldown: no feature is named
"" (a signature's names are at least one character long)."""

WORST_SHOWN = 3
"""Features an issue that stands for many names, the worst first."""

_MANY_FEATURES_HAVE = {
    "missing-values": "have missing values",
    "unseen-category": "have categories the reference never had or the model does not keep",
    "out-of-range": "have values out of the range the test can measure",
    "type-mismatch": "have values of the wrong type",
}


@dataclass
class QualityIssue:
    """What one DataQualityIssue of a window says: one feature's finding, or one issue that stands for every
    feature with the same kind of finding (``feature`` None, the worst feature's count and share)."""

    kind: Literal["missing-values", "unseen-category", "out-of-range", "type-mismatch"]
    feature: str | None
    count: int
    share: float
    message: str
    features_total: int | None = None

    @property
    def cooldown_key(self) -> str:
        """The feature its cooldown is kept under."""
        return self.feature if self.feature is not None else ALL_FEATURES


def quality_issues(
    findings: Sequence[QualityFinding], *, per_kind: int, window_report: str
) -> list[QualityIssue]:
    """The issues a window's findings make: one per finding while at most ``per_kind`` features share a
    kind, else one for that kind standing for them all, naming how many, the worst few and
    ``window_report`` (where every finding is listed). So an outage that empties every feature of a wide
    model is one issue, not thousands; nothing is left out of the window's report."""
    by_kind: dict[str, list[QualityFinding]] = {}
    for finding in findings:
        by_kind.setdefault(finding.kind, []).append(finding)
    issues: list[QualityIssue] = []
    for kind, found in by_kind.items():
        worst: dict[str, QualityFinding] = {}
        for finding in found:
            if finding.feature not in worst or finding.share > worst[finding.feature].share:
                worst[finding.feature] = finding
        if len(worst) <= per_kind:
            issues += [QualityIssue(f.kind, f.feature, f.count, f.share, f.message) for f in found]
            continue
        # Stable: among equally bad features, the model's order.
        ranked = sorted(worst.values(), key=lambda f: -f.share)
        shown = ", ".join(f"{shown_name(f.feature)} {f.share:.1%}" for f in ranked[:WORST_SHOWN])
        more = len(ranked) - WORST_SHOWN
        message = (
            f"{len(ranked):,} features {_MANY_FEATURES_HAVE[kind]} (worst: {shown}"
            f"{f' and {more:,} more' if more > 0 else ''}); the window's report lists every one: "
            f"{window_report}"
        )
        first = ranked[0]
        issues.append(QualityIssue(first.kind, None, first.count, first.share, message, len(ranked)))
    return issues


# --- debouncing ------------------------------------------------------------------------------------------


@dataclass
class DebounceState:
    """Per model version: consecutive drifted windows per feature and the last alert's window end."""

    consecutive: dict[str, int] = field(default_factory=dict)
    last_alert_at: float | None = None


@dataclass
class DebounceDecision:
    """What debouncing made of a window: updated counters, the features that count, and whether to alert."""

    state: DebounceState
    debounced: list[str]
    share: float
    alert: bool
    in_cooldown: bool


def in_cooldown(end: float, last: float | None, cooldown_seconds: float) -> bool:
    """Whether an alert of a window ending at ``end`` (event time) is held back by the last one, sent for a
    window ending at ``last``: within ``cooldown_seconds`` of it, before it (rows that came late) as after it.
    Not one further before: a window whose rows carried a clock years ahead would otherwise hold back every
    alert of the version until real time caught up with it."""
    return last is not None and abs(end - last) < cooldown_seconds


def debounce(state: DebounceState, judgement: WindowJudgement, policy: DriftPolicy) -> DebounceDecision:
    """One shift, one alert: a feature counts once it drifted ``consecutive_windows`` windows in a row; the
    model alerts when the share of such features reaches ``share_threshold``, and then stays quiet within
    ``cooldown_seconds`` of event time (:func:`in_cooldown`)."""
    counts = dict(state.consecutive)
    for r in judgement.features:
        counts[r.name] = counts.get(r.name, 0) + 1 if r.drifted else 0
    tested = [r for r in judgement.features if r.tested]
    debounced = [r.name for r in tested if counts.get(r.name, 0) >= policy.consecutive_windows]
    share = len(debounced) / len(tested) if tested else 0.0
    end = judgement.window.end
    quiet = in_cooldown(end, state.last_alert_at, policy.cooldown_seconds)
    alert = bool(debounced) and share >= policy.share_threshold and not quiet
    new_state = DebounceState(consecutive=counts, last_alert_at=end if alert else state.last_alert_at)
    return DebounceDecision(new_state, debounced, share, alert, quiet)


def drift_rank(evidence: FeatureDrift, debounced: set[str]) -> tuple[bool, bool, float, str]:
    """Sort key of a feature's evidence, most drifted first: drifted after debouncing, then drifted in this
    window, then by how far past its threshold (p-value over α for tests, threshold over distance for
    distances: the smaller, the further)."""
    if evidence.p_value is not None:
        margin = evidence.p_value / evidence.threshold
    else:
        margin = evidence.threshold / evidence.statistic if evidence.statistic > 0 else math.inf
    return (evidence.feature not in debounced, not evidence.drifted, margin, evidence.feature)


def cut_evidence(alert: DriftDetected, excess: int) -> DriftDetected:
    """The alert with the evidence of its most drifted features that fit, at least ``excess`` bytes smaller
    (a feature less at least). Features are taken most drifted first, each when it fits in what is left: one
    too large on its own (a very long name) is left out and the ones after it still get in. At least one
    feature that drifted after debouncing is kept, so the alert keeps its reason: when none fits, the one
    whose evidence is smallest (:func:`least_evidence`; the caller then finds the alert still too large).
    The kept features stay in the model's order; the totals still count every feature."""
    debounced = set(alert.drifted_features)
    ranked = sorted(alert.features, key=lambda f: drift_rank(f, debounced))
    cost = {f.feature: _evidence_bytes(f, f.feature in debounced) for f in ranked}
    room = sum(cost.values()) - max(excess, 1)
    kept: set[str] = set()
    for f in ranked:
        if cost[f.feature] <= room:
            kept.add(f.feature)
            room -= cost[f.feature]
    if not kept & debounced:
        return least_evidence(alert)
    return _with_evidence(alert, kept)


def least_evidence(alert: DriftDetected) -> DriftDetected:
    """The alert with the least evidence it can carry: that of the one feature that drifted after debouncing
    whose evidence takes the fewest bytes (the shortest name)."""
    debounced = set(alert.drifted_features)
    smallest = min(
        (f for f in alert.features if f.feature in debounced), key=lambda f: _evidence_bytes(f, True)
    )
    return _with_evidence(alert, {smallest.feature})


def _with_evidence(alert: DriftDetected, kept: set[str]) -> DriftDetected:
    return DriftDetected(
        **{
            **dict(alert),
            "features": [f for f in alert.features if f.feature in kept],
            "drifted_features": [name for name in alert.drifted_features if name in kept],
            "evidence_truncated": True,
        }
    )


def _evidence_bytes(evidence: FeatureDrift, debounced: bool) -> int:
    """What a feature's evidence takes in a DriftDetected's JSON: its item and comma, and its name in
    ``drifted_features`` when it drifted after debouncing."""
    item = len(evidence.__pydantic_serializer__.to_json(evidence)) + 1
    return item + (len(pydantic_core.to_json(evidence.feature)) + 1 if debounced else 0)


# --- labelled performance --------------------------------------------------------------------------------

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "roc_auc": True, "rmse": False, "mae": False}


@dataclass
class LabelledRow:
    """A prediction joined with its label."""

    prediction: Any
    score: float | None
    label: Any
    late: bool


def same_label(a: Any, b: Any) -> bool:
    """Whether a prediction and a label (or the positive class) name the same class: alike as text ("1" is
    1, as before), or as categories are counted (:func:`~libs.profiles.category_key`): JSON has one kind of
    number, so a label of 1.0 (a pandas column of integer codes with a gap sends it) is the class 1."""
    return str(a) == str(b) or category_key(a) == category_key(b)


def outside_classes(label: Any, classes: Sequence[Any] | None) -> bool:
    """Whether a classifier's label names none of its classes (:func:`same_label`: ``"1"`` and ``1.0`` name
    the class 1, ``True`` and ``"yes"`` do not); False when the classes are not known."""
    return bool(classes) and not any(same_label(label, c) for c in classes or ())


def regression_value(value: Any) -> float | None:
    """A regression model's prediction or label as a float; None when it is no number (text, a boolean, an
    integer beyond a double, NaN or infinity)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def regression_pairs(pairs: Sequence[tuple[Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and labels as floats, leaving out every pair where either is no number."""
    kept = [
        (p, y)
        for p, y in ((regression_value(a), regression_value(b)) for a, b in pairs)
        if p is not None and y is not None
    ]
    return np.array([p for p, _ in kept], dtype=float), np.array([y for _, y in kept], dtype=float)


def absolute_errors(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """|prediction - label| per pair; infinity where the difference is beyond a double (a prediction of
    1e308 against a label of -1e308: each finite, so accepted, their difference not)."""
    with np.errstate(over="ignore"):
        return np.abs(pred - truth)


def _unit_exponent(values: np.ndarray) -> int:
    """The power of two that brings finite, non-negative ``values`` below 1. Dividing by it is exact, and
    the squares and sums of what it gives cannot overflow, so a mean or a root mean square of large errors
    is computed as it is of small ones (and is at most the largest of them)."""
    peak = float(values.max()) if values.size else 0.0
    return math.frexp(peak)[1] if peak > 0 else 0


def _times_power_of_two(x: float, exponent: int) -> float:
    """``x * 2**exponent``; infinity if beyond a double."""
    try:
        return math.ldexp(x, exponent)
    except OverflowError:
        return math.inf


def _error_metrics(errors: np.ndarray) -> dict[str, float]:
    """RMSE and MAE of absolute errors: infinite (not measurable) when an error is."""
    if not np.isfinite(errors).all():
        return {"rmse": math.inf, "mae": math.inf}
    exponent = _unit_exponent(errors)
    unit = np.ldexp(errors, -exponent)
    return {
        "rmse": _times_power_of_two(float(np.sqrt(np.mean(unit**2))), exponent),
        "mae": _times_power_of_two(float(np.mean(unit)), exponent),
    }


def unscorable(rows: Sequence[LabelledRow], task: Task) -> int:
    """Rows the metrics leave out: a regression model's rows whose prediction or label is no number."""
    if task is not Task.REGRESSION:
        return 0
    return len(rows) - regression_pairs([(r.prediction, r.label) for r in rows])[0].size


def performance_metrics(
    rows: Sequence[LabelledRow], task: Task, classes: Sequence[Any] | None
) -> dict[str, float]:
    """Accuracy / F1 / ROC AUC (classification, ``classes`` the signature's, the last one positive) or
    RMSE / MAE (regression) over labelled rows. A regression window with an error beyond a double has
    infinite RMSE and MAE: not measurable. F1 is training's (:mod:`libs.metrics`), the baseline it is
    compared with: the positive class's of a binary model, undefined (left out) when no label and no
    prediction is positive, and macro F1 over the classes present otherwise."""
    if not rows:
        return {}
    if task is Task.REGRESSION:
        pred, truth = regression_pairs([(r.prediction, r.label) for r in rows])
        if not pred.size:
            return {}
        return _error_metrics(absolute_errors(pred, truth))
    correct_ = np.array([same_label(r.prediction, r.label) for r in rows], dtype=bool)
    out = {"accuracy": float(correct_.mean())}
    if classes:
        outputs = class_outputs(rows, classes)
        f1 = float(weighted(outputs, "f1", np.ones(len(rows)))[0])
        if math.isfinite(f1):
            out["f1"] = f1
        true_pos = outputs.y == len(classes) - 1
        scores = np.array([r.score if r.score is not None else np.nan for r in rows], dtype=float)
        if not np.isnan(scores).any() and 0 < true_pos.sum() < len(rows):
            out["roc_auc"] = _roc_auc(true_pos, scores)
    return out


def class_outputs(rows: Sequence[LabelledRow], classes: Sequence[Any]) -> Outputs:
    """Labelled rows encoded for :mod:`libs.metrics`: the index of the class each prediction and label names
    (:func:`same_label`), -1 for none (a label outside the classes is a row of none of them there too)."""
    by_text: dict[str, int] = {}
    by_key: dict[str, int] = {}
    for i, c in enumerate(classes):
        by_text.setdefault(str(c), i)
        by_key.setdefault(category_key(c), i)

    def index(value: Any) -> int:
        found = by_text.get(str(value))
        return found if found is not None else by_key.get(category_key(value), -1)

    return Outputs(
        Task.CLASSIFICATION,
        y=np.array([index(r.label) for r in rows], dtype=np.int64),
        pred=np.array([index(r.prediction) for r in rows], dtype=np.int64),
        classes=tuple(classes),
    )


def _roc_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    # Mann–Whitney U with average ranks for ties.
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class Degradation:
    """A metric worse than its baseline beyond the tolerance."""

    metric: str
    value: float
    baseline: float
    threshold: float
    higher_is_better: bool


def degradations(
    metrics: dict[str, float],
    baseline: dict[str, float],
    tolerance: float,
    standard_errors: dict[str, float] | None = None,
    *,
    z: float = 2.0,
) -> list[Degradation]:
    """Metrics worse than baseline: below baseline - tolerance, or error metrics above baseline * (1 + 4 *
    tolerance) (a relative band, since errors have the target's unit) — by more than ``z`` standard errors
    of the window's estimate, so that a small window's sampling noise is not read as a shift."""
    ses = standard_errors or {}
    found = []
    for name, value in metrics.items():
        if name not in baseline or name not in HIGHER_IS_BETTER:
            continue
        base = baseline[name]
        margin = z * ses.get(name, 0.0)
        if HIGHER_IS_BETTER[name]:
            threshold = base - tolerance
            if value + margin < threshold:
                found.append(Degradation(name, value, base, threshold, True))
        else:
            threshold = base * (1 + 4 * tolerance)
            if value - margin > threshold:
                found.append(Degradation(name, value, base, threshold, False))
    return found


def metric_standard_errors(
    rows: Sequence[LabelledRow],
    task: Task,
    classes: Sequence[Any] | None,
    *,
    resamples: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Bootstrap standard errors of the window's metrics (vectorised; a few milliseconds for 500 rows)."""
    if task is Task.REGRESSION:
        pred, truth = regression_pairs([(r.prediction, r.label) for r in rows])
        errors = absolute_errors(pred, truth)
        if errors.size < 2 or not np.isfinite(errors).all():
            return {}  # too few rows, or metrics not measurable
        exponent = _unit_exponent(errors)
        unit = np.ldexp(errors, -exponent)[
            np.random.default_rng(seed).integers(0, errors.size, size=(resamples, errors.size))
        ]
        return {
            "rmse": _times_power_of_two(float(np.sqrt((unit**2).mean(axis=1)).std()), exponent),
            "mae": _times_power_of_two(float(unit.mean(axis=1).std()), exponent),
        }
    n = len(rows)
    if n < 2:
        return {}
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    correct = np.array([same_label(r.prediction, r.label) for r in rows], dtype=bool)
    out = {"accuracy": float(correct[idx].mean(axis=1).std())}
    if classes:
        outputs = class_outputs(rows, classes)
        # The same resamples as counts per row; one in which F1 is undefined says nothing of its spread.
        counts = np.zeros((resamples, n))
        np.add.at(counts, (np.arange(resamples)[:, None], idx), 1.0)
        f1 = weighted(outputs, "f1", counts)
        if np.isfinite(f1).any():
            out["f1"] = float(np.nanstd(f1))
        positives = int((outputs.y == len(classes) - 1).sum())
        if 0 < positives < n:
            # Hanley & McNeil (1982): the AUC's standard error from its value and the class counts.
            auc = performance_metrics(rows, task, classes).get("roc_auc")
            if auc is not None:
                negatives = n - positives
                q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
                var = (
                    auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)
                ) / (positives * negatives)
                out["roc_auc"] = float(np.sqrt(max(var, 0.0)))
    return out


# --- canary analysis -------------------------------------------------------------------------------------


@dataclass
class ReservoirSample:
    """A uniform random sample of at most ``most`` items of a stream of unknown length, each item one value
    per column (Vitter's Algorithm R): after ``seen`` items, each of them is in it with the same chance,
    ``most / seen``, in as little memory as the first ``most`` took. Vectorised per chunk, with no loop per
    item: item ``i`` (0-based, ``i >= most``) draws a slot uniformly in ``[0, i]`` and takes it if the slot is
    below ``most``; the draws do not depend on the sample, so a chunk's are drawn at once, and of a chunk's
    items drawing one slot the last one stays, as it would one by one."""

    columns: list[list[np.ndarray]] = field(default_factory=list)
    """Per column, its chunks: those of the first items while the sample fills, then one array of ``most``."""
    seen: int = 0
    kept: int = 0

    def offer(self, values: Sequence[np.ndarray], most: int, rng: np.random.Generator) -> None:
        """Sample these items (``values``: one array per column, of one length) into the sample."""
        n = values[0].size
        if not n:
            return  # no empty chunk: a side's rows and requests come apart, and a chunk per poll would grow
        if not self.columns:
            self.columns = [[] for _ in values]
        fill = min(max(most - self.kept, 0), n)
        if fill:
            for chunks, column in zip(self.columns, values, strict=True):
                chunks.append(column if fill == n else column[:fill])
            self.kept += fill
            if self.kept >= most:
                # Full: one array per column from now on, replaced in place; a copy, as a slice would keep
                # its whole chunk alive and the caller's arrays are not the sample's to change.
                self.columns = [[np.concatenate(chunks)] for chunks in self.columns]
        if fill < n:
            slot = rng.integers(0, np.arange(self.seen + fill + 1, self.seen + n + 1))
            taken = np.flatnonzero(slot < most)
            if taken.size:
                slots, last = np.unique(slot[taken][::-1], return_index=True)
                items = taken[::-1][last] + fill
                for chunks, column in zip(self.columns, values, strict=True):
                    chunks[0][slots] = column[items]
        self.seen += n

    def column(self, index: int, empty: np.ndarray) -> np.ndarray:
        """The sample's values of one column (``empty`` before any item)."""
        chunks = self.columns[index] if self.columns else []
        return np.concatenate(chunks) if chunks else empty


@dataclass
class VariantTraffic:
    """One variant's traffic during a rollout step: every row and request counted, and a uniform random sample
    of them, at most a bound of each (``canary_step_max_rows``), kept for the comparisons. Kept as the first
    ones up to the bound, a busy model's step was judged on its first seconds: a canary that degraded later
    in the step passed."""

    rows: int = 0
    """Every row of the variant in the step, kept or not (what ``min_samples`` and the verdict count)."""
    requests: int = 0
    row_sample: ReservoirSample = field(default_factory=ReservoirSample)
    """Rows: when each was predicted, its score, its predicted value (an object array: any JSON value)."""
    request_sample: ReservoirSample = field(default_factory=ReservoirSample)
    """Requests: their latencies."""
    row_rng: np.random.Generator = field(default_factory=np.random.default_rng, repr=False)
    """Which rows the sample keeps (:meth:`seed` sets it)."""
    request_rng: np.random.Generator = field(default_factory=np.random.default_rng, repr=False)
    """Which requests the sample keeps: a generator of their own, so the draws of each do not depend on how
    rows and requests came interleaved in polls."""

    def seed(self, seed: int) -> None:
        """Draw the samples from generators seeded by ``seed``."""
        rows, requests = np.random.SeedSequence(seed).spawn(2)
        self.row_rng, self.request_rng = np.random.default_rng(rows), np.random.default_rng(requests)

    @property
    def rows_kept(self) -> int:
        return self.row_sample.kept

    @property
    def requests_kept(self) -> int:
        return self.request_sample.kept

    @property
    def rows_not_kept(self) -> int:
        """The rows sampled out: counted in ``rows``, left out of the comparisons."""
        return self.row_sample.seen - self.row_sample.kept

    def add(
        self,
        at: np.ndarray,
        score: np.ndarray,
        prediction: np.ndarray | Sequence[Any],
        latency: np.ndarray,
        *,
        most: int,
    ) -> None:
        """Count these rows and their requests, and sample them into the kept ones (at most ``most`` each).
        ``prediction``, one per row, is best an object array: a list is made one."""
        if not isinstance(prediction, np.ndarray):
            prediction = np.fromiter(prediction, dtype=object, count=len(prediction))
        self.row_sample.offer((at, score, prediction), most, self.row_rng)
        self.request_sample.offer((latency,), most, self.request_rng)
        self.rows += at.size
        self.requests += latency.size

    def latencies(self) -> np.ndarray:
        return self.request_sample.column(0, np.empty(0))

    def predicted_at(self) -> np.ndarray:
        return self.row_sample.column(0, np.empty(0))

    def scores(self) -> np.ndarray:
        return self.row_sample.column(1, np.empty(0))

    def predictions(self) -> list[Any]:
        """The kept rows' predicted values, in the order of :meth:`scores`."""
        return self.row_sample.column(2, np.empty(0, dtype=object)).tolist()


@dataclass
class CanaryStep:
    """A rollout step being watched."""

    rollout_id: str
    model: str
    stable_version: int | None
    canary_version: int
    step_index: int
    started_at: float
    """When serving started the step (the event's time, serving's clock): the step's time range."""
    min_samples: int
    bake_seconds: float
    learned_at: float | None = None
    """When monitoring handled the step's event, on monitoring's clock (Postgres', ``Monitor.now``); None for
    a step stored before it was kept (bakes from ``started_at``)."""
    canary: VariantTraffic = field(default_factory=VariantTraffic)
    stable: VariantTraffic = field(default_factory=VariantTraffic)
    first_offsets: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Each variant's sample drawn from a generator seeded by the step and the variant: the draws do not
        # depend on how the rows come in polls, so a restart that reads the step's traffic again keeps the
        # same sample and comes to the same verdict.
        for variant, traffic in ((Variant.CANARY, self.canary), (Variant.STABLE, self.stable)):
            name = f"{self.rollout_id}\0{self.step_index}\0{variant.value}".encode()
            traffic.seed(int.from_bytes(hashlib.sha256(name).digest()[:16]))

    @property
    def bake_from(self) -> float:
        """Where the bake time runs from on monitoring's clock: when monitoring learned of the step, or the
        step's start if later. Serving ignores a verdict given before its bake time passed on its own clock,
        and monitoring gives one per step: timed from the start with monitoring's clock ahead, the step
        would never advance. Whichever clock is ahead, the bake time from here is over on serving's too."""
        return self.started_at if self.learned_at is None else max(self.started_at, self.learned_at)


@dataclass
class CanaryPolicy:
    """Tolerances of canary analysis (from settings)."""

    min_labelled: int = 100
    alpha: float = 0.01
    margin: float = 0.02
    latency_ratio: float = 1.5
    latency_slack_ms: float = 5.0
    divergence_threshold: float = 0.35
    timeout_seconds: float = 600.0
    label_grace_seconds: float = 60.0


@dataclass
class LabelledComparison:
    """Labelled outcomes of both variants over the step (correct counts, or absolute errors)."""

    stable_correct: int = 0
    stable_n: int = 0
    canary_correct: int = 0
    canary_n: int = 0
    stable_abs_errors: np.ndarray | None = None
    canary_abs_errors: np.ndarray | None = None
    unscorable: int = 0  # a regression model's rows left out: prediction or label no number
    # A classifier's labels that name none of the version's classes (counted as wrong): mostly such labels
    # on a side say its accuracy measures the labels' encoding, and the verdict's reason says so.
    stable_outside: int = 0
    canary_outside: int = 0
    classes: Sequence[Any] = ()


@dataclass
class CanaryDecision:
    """A verdict with its evidence, or a reason to wait."""

    verdict: Verdict
    evidence: list[CanaryComparison]
    reason: str


def canary_ready(step: CanaryStep, now: float) -> Literal["wait", "judge", "timeout"]:
    """Judge once the canary has min_samples predictions in the step and the bake time passed."""
    baked = now - step.bake_from >= step.bake_seconds
    if step.canary.rows >= step.min_samples and baked:
        return "judge"
    return "wait"


def canary_due(step: CanaryStep, now: float, policy: CanaryPolicy) -> bool:
    """Whether the step may get its verdict now: its samples and bake time are in, or it timed out."""
    return canary_ready(step, now) == "judge" or canary_timed_out(step, now, policy)


def canary_timed_out(step: CanaryStep, now: float, policy: CanaryPolicy) -> bool:
    """Whether the canary is still short of ``min_samples`` ``timeout_seconds`` after the step began on
    monitoring's clock (:attr:`CanaryStep.bake_from`). One that has them waits for its bake time, however long
    serving's is: timed out while baking, a step was rolled back as short of predictions it had. Timed from
    the step's start (serving's clock), a step dated in the past (serving's clock behind, or its event read
    late) timed out at the first tick, before its canary could answer."""
    return step.canary.rows < step.min_samples and now - step.bake_from >= policy.timeout_seconds


def _p95(values: np.ndarray) -> float | None:
    return float(np.percentile(values, 95)) if values.size else None


@dataclass(frozen=True)
class _Divergence:
    """The Jensen–Shannon distance of canary and stable predictions, what was compared, and the stable counts
    and canary values it was measured on (for the distance sampling alone gives)."""

    distance: float
    what: str
    stable_counts: np.ndarray
    canary_n: int


def _prediction_divergence(step: CanaryStep, task: Task, edges: np.ndarray | None) -> _Divergence | None:
    cs, ss = step.canary.scores(), step.stable.scores()
    if cs.size and ss.size and not np.isnan(cs).all() and not np.isnan(ss).all():
        cs, ss = cs[~np.isnan(cs)], ss[~np.isnan(ss)]
        if edges is not None and edges.size:
            bins = edges
        else:
            # Interpolating between -1.7e308 and 1.7e308 overflows: such an edge is left out.
            with np.errstate(over="ignore", invalid="ignore"):
                bins = np.quantile(ss, np.linspace(0, 1, 11)[1:-1])
        bins = np.unique(bins[np.isfinite(bins)])
        stable_counts = bin_counts(ss, bins)
        return _Divergence(
            stats.jensen_shannon(stable_counts, bin_counts(cs, bins)), "scores", stable_counts, cs.size
        )
    canary, stable = step.canary.predictions(), step.stable.predictions()
    if canary and stable:
        # Classes named as labels are matched (category_key): a stable version trained on the classes 3.0 and
        # 7.0 (before 2026-12-02, integers with a gap) and its retrain on 3 and 7 predict the same classes,
        # which by their text ("3.0", "3") diverged completely and rolled every such canary back.
        stable_keys = [category_key(v) for v in stable]
        canary_keys = [category_key(v) for v in canary]
        labels = sorted({*stable_keys, *canary_keys})
        index = {c: i for i, c in enumerate(labels)}
        a, b = np.zeros(len(labels)), np.zeros(len(labels))
        for key in stable_keys:
            a[index[key]] += 1
        for key in canary_keys:
            b[index[key]] += 1
        return _Divergence(stats.jensen_shannon(a, b), "predicted classes", a, len(canary_keys))
    return None


def judge_canary(
    step: CanaryStep,
    *,
    task: Task,
    labelled: LabelledComparison,
    policy: CanaryPolicy,
    score_edges: np.ndarray | None = None,
) -> CanaryDecision:
    """Compare canary with stable over the step: latency p95, prediction divergence, labelled performance.

    Unhealthy when any comparison that could be made failed; else inconclusive when one could not be
    measured (its numbers beyond a double: an absolute error of 1e308 against -1e308, the tolerance of a
    huge stable latency), since it may hide anything; else healthy when the ones made passed. Labelled
    performance counts once both variants have ``min_labelled`` labelled rows: classification by a
    one-sided two-proportion z-test on accuracy, regression by a one-sided Welch test on absolute errors
    (MAE): unhealthy when they show, at ``alpha``, the canary worse by more than ``margin`` (accuracy lower
    by more than it, MAE higher by more than that share). Until 2026-12-02 the tests' null was "no worse"
    and the margin a second condition on the measured gap, so a canary worse by less than the margin failed
    by chance in about one step in eighteen at the demo's sample sizes (a candidate 0.01 less accurate,
    2,300 labelled rows a side; now one in 800), and the demo's retrained model was once rolled back on a
    gap of 0.031 (p=0.0075).
    """
    evidence: list[CanaryComparison] = [
        CanaryComparison(
            name="error_rate",
            stable_value=None,
            canary_value=None,
            passed=None,
            detail="not measurable: PredictionsLogged carries only answered requests",
        )
    ]
    if step.stable_version is None or step.stable.rows == 0:
        evidence.append(
            CanaryComparison(
                name="stable_traffic",
                stable_value=None,
                canary_value=float(step.canary.rows),
                passed=None,
                detail="no stable traffic in the step to compare with",
            )
        )
    unmeasurable: list[str] = []
    s95, c95 = _p95(step.stable.latencies()), _p95(step.canary.latencies())
    if s95 is not None and c95 is not None:
        allowed = s95 * policy.latency_ratio + policy.latency_slack_ms
        if math.isfinite(allowed):
            evidence.append(
                CanaryComparison(
                    name="latency_p95_ms",
                    stable_value=round(s95, 4),
                    canary_value=round(c95, 4),
                    threshold=round(allowed - s95, 4),
                    passed=c95 <= allowed,
                    detail=f"canary p95 {c95:.2f} ms vs stable {s95:.2f} ms; allowed up to {allowed:.2f} ms",
                )
            )
        else:
            unmeasurable.append("latency_p95_ms")
            evidence.append(
                CanaryComparison(
                    name="latency_p95_ms",
                    stable_value=round(s95, 4),
                    canary_value=round(c95, 4),
                    passed=None,
                    detail=f"not measurable: the tolerance of stable's p95 of {s95:.3g} ms "
                    f"(x {policy.latency_ratio} + {policy.latency_slack_ms} ms) is beyond a double",
                )
            )
    divergence = _prediction_divergence(step, task, score_edges)
    if divergence is not None:
        limit, floor_note = policy.divergence_threshold, ""
        if divergence.distance > limit:
            # Two samples of equal models are not at distance 0, the fewer values the farther: the limit
            # counts from the distance sampling alone gives samples of these sizes.
            limit = stats.jensen_shannon_threshold_at(limit, divergence.stable_counts, divergence.canary_n)
            floor_note = (
                f", raised from {policy.divergence_threshold} by what {divergence.canary_n} canary values "
                "measure by chance"
            )
        evidence.append(
            CanaryComparison(
                name="prediction_divergence",
                stable_value=0.0,
                canary_value=round(divergence.distance, 6),
                threshold=round(limit, 6),
                passed=divergence.distance <= limit,
                detail=f"Jensen–Shannon distance of {divergence.what}: {divergence.distance:.3f} "
                f"(limit {limit:.3g}{floor_note})",
            )
        )
    outcome, measurable = _labelled_comparison(task, labelled, policy)
    evidence.append(outcome)
    if not measurable:
        unmeasurable.append(outcome.name)
    verdict, reason = _verdict_of(evidence, unmeasurable)
    sides = [("stable", labelled.stable_outside, labelled.stable_n)]
    sides.append(("canary", labelled.canary_outside, labelled.canary_n))
    if outcome.passed is not None and (note := labels_outside_classes_note(sides, labelled.classes)):
        reason = f"{reason}; {note}"
    return CanaryDecision(verdict, evidence, reason)


def _verdict_of(evidence: list[CanaryComparison], unmeasurable: list[str]) -> tuple[Verdict, str]:
    judged = [e for e in evidence if e.passed is not None]
    failed = [e for e in judged if e.passed is False]
    if failed:
        return Verdict.UNHEALTHY, f"canary failed: {', '.join(e.name for e in failed)}"
    if unmeasurable:
        return Verdict.INCONCLUSIVE, f"not measurable: {', '.join(unmeasurable)}"
    if not judged:
        return Verdict.INCONCLUSIVE, "nothing could be compared (no stable traffic, no labels)"
    return Verdict.HEALTHY, f"all {len(judged)} comparisons made are within tolerance"


def labels_outside_classes_note(sides: Sequence[tuple[str, int, int]], classes: Sequence[Any]) -> str:
    """What a canary verdict's reason or a performance alert says of its labelled rows when most labels of a
    side (``(name, outside, labelled)``; the name may be empty) name no class of the version: an encoding
    mistake, such as "yes"/"no" for the classes 0/1, reads as accuracy 0. Empty otherwise."""
    shown = [f"{side} {outside} of {n}".lstrip() for side, outside, n in sides if n and outside * 2 > n]
    if not shown:
        return ""
    return (
        f"most labels name no class of the model ({' and '.join(shown)} labelled rows; classes "
        f"{shown_classes(classes)}) "
        "and count as wrong predictions: check the labels' encoding"
    )


def _mean_error(errors: np.ndarray | None) -> float | None:
    """The mean of absolute errors (None without any; infinite when one is), overflow-free."""
    if errors is None or not errors.size:
        return None
    return _error_metrics(errors)["mae"]


def _labelled_comparison(
    task: Task, lab: LabelledComparison, policy: CanaryPolicy
) -> tuple[CanaryComparison, bool]:
    """The labelled comparison, and whether it could be measured."""
    enough = lab.stable_n >= policy.min_labelled and lab.canary_n >= policy.min_labelled
    if task is Task.REGRESSION:
        se, ce = lab.stable_abs_errors, lab.canary_abs_errors
        s_mae, c_mae = _mean_error(se), _mean_error(ce)
        beyond = [side for side, mae in (("stable", s_mae), ("canary", c_mae)) if mae == math.inf]
        if beyond:
            return CanaryComparison(
                name="mae",
                stable_value=s_mae if s_mae != math.inf else None,
                canary_value=c_mae if c_mae != math.inf else None,
                passed=None,
                detail=f"not measurable: an absolute error of {' and '.join(beyond)} is beyond a double "
                "(a prediction and its label too far apart)",
            ), False
        if not enough or se is None or ce is None or s_mae is None or c_mae is None:
            return CanaryComparison(
                name="mae",
                stable_value=s_mae,
                canary_value=c_mae,
                passed=None,
                detail=f"needs {policy.min_labelled} labelled rows per variant "
                f"(stable {lab.stable_n}, canary {lab.canary_n})",
            ), True
        # Both sides scaled by one power of two (exact, and the test does not depend on the unit): the
        # variances of large errors cannot overflow.
        exponent = _unit_exponent(np.concatenate((se, ce)))
        _, p = stats.welch_greater(np.ldexp(se, -exponent), np.ldexp(ce, -exponent), ratio=1 + policy.margin)
        worse = p < policy.alpha
        threshold = s_mae * policy.margin
        if not math.isfinite(threshold):
            return CanaryComparison(
                name="mae",
                stable_value=s_mae,
                canary_value=c_mae,
                passed=None,
                detail=f"not measurable: the margin of stable's MAE of {s_mae:.3g} is beyond a double",
            ), False
        return CanaryComparison(
            name="mae",
            stable_value=s_mae,
            canary_value=c_mae,
            threshold=threshold,
            passed=not worse,
            detail=f"one-sided Welch test of canary MAE over stable's by more than {policy.margin:.1%}: "
            f"p={p:.3g} over {lab.stable_n} vs {lab.canary_n} labelled rows",
        ), True
    s_acc = lab.stable_correct / lab.stable_n if lab.stable_n else None
    c_acc = lab.canary_correct / lab.canary_n if lab.canary_n else None
    if not enough or s_acc is None or c_acc is None:
        return CanaryComparison(
            name="accuracy",
            stable_value=s_acc,
            canary_value=c_acc,
            passed=None,
            detail=f"needs {policy.min_labelled} labelled rows per variant "
            f"(stable {lab.stable_n}, canary {lab.canary_n})",
        ), True
    _, p = stats.two_proportion_worse(
        lab.stable_correct, lab.stable_n, lab.canary_correct, lab.canary_n, margin=policy.margin
    )
    worse = p < policy.alpha
    return CanaryComparison(
        name="accuracy",
        stable_value=round(s_acc, 6),
        canary_value=round(c_acc, 6),
        threshold=policy.margin,
        passed=not worse,
        detail=f"one-sided two-proportion z-test of canary accuracy lower by more than {policy.margin:g}: "
        f"p={p:.3g} over {lab.stable_n} vs {lab.canary_n} "
        "labelled rows",
    ), True


def canary_evidence(variant: str, rollout_id: str | None, rollout: str) -> bool:
    """Whether a request's rows are the canary side of rollout ``rollout``: its candidate's rows (canary or
    shadow) that the rollout routed, which carry its id. A request naming the candidate's version is the
    client's choice, not the rollout's traffic (serving logs it without a rollout id): counted, one client
    calling the version could fill a step's samples and skew its verdict."""
    return rollout_id == rollout and variant in (Variant.CANARY.value, Variant.SHADOW.value)
