"""Serving's series per model version and per model, and their lifetime: a version's series exist while
the version serves on this replica, and go with it, and a model's while the model does; and the failures
of the replica's two timer loops and of its error-rate rollbacks.

Every routing swap (:meth:`services.serving.routing.RoutingState.swap`) calls :func:`keep_served`: each
series whose model version the new table does not serve (promoted over, rolled back, replaced, its model
no longer served) is removed from the registry, with the handles this process cached for it, and so is
each series per model (whole requests timed, unseen categories) of a model the table no longer routes.
Otherwise automatic retraining (a new version per drift event) would grow /metrics, and this process,
without bound, and dashboards would list versions and models long dead.

The swap also sets the gauges of each live rollout this replica routes (its canary's weight and its step,
by model and mode) from the table it now holds, and removes a model's once its rollout ends (promoted,
rolled back, replaced): :func:`show_rollouts`. Nothing of this runs per request.

Removing a counter is what Prometheus expects of a labelled series that is gone for good: the scrape after
it marks the series stale. What the version counted after the last scrape before its removal is not seen
(at most one scrape interval's worth, for a version that no longer takes traffic). A version that serves
again (a production rollback to it) starts its series from zero, which ``rate()`` and ``increase()`` read
as a counter reset.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from contracts.predictions import Variant

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BY_VARIANT = ("model", "version", "variant")

REQUESTS = Counter(
    "driftloop_serving_requests_total",
    "Predict requests answered, per model, version and variant (a request split across variants counts "
    "once per variant).",
    _BY_VARIANT,
)
ROWS = Counter("driftloop_serving_rows_total", "Rows scored.", _BY_VARIANT)
LATENCY = Histogram(
    "driftloop_serving_model_latency_seconds",
    "Model time per request and variant.",
    _BY_VARIANT,
    buckets=_LATENCY_BUCKETS,
)
MODEL_ERRORS = Counter(
    "driftloop_serving_model_errors_total",
    "Model calls that failed (a failed canary call is answered by the stable version); a request whose input "
    "the model's signature refuses (422) calls no model and is not counted.",
    _BY_VARIANT,
)
UNCOMPILED = Counter(
    "driftloop_serving_uncompiled_requests_total",
    "Requests to a compiled model that its estimator answered instead (a category sent as a number, or a "
    "non-finite output from the compiled copy's float32 arithmetic).",
    ["model", "version"],
)
REQUEST_SECONDS = Histogram(
    "driftloop_serving_request_seconds",
    "Whole predict requests answered with predictions (reading, checking, scoring, answering), per model and "
    "protocol; a refused request (4xx) is not timed.",
    ["model", "protocol"],
    buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
UNSEEN = Counter(
    "driftloop_serving_unseen_categories_total",
    "Categorical values the model did not see in training (allowed; the encoder ignores them).",
    ["model", "feature"],
)
ENGINE = Gauge(
    "driftloop_serving_model_engine_info",
    "1 for what computes a loaded version's answers: onnxruntime (a verified compiled copy) or "
    "scikit-learn (the pipeline itself). An info metric (its value is its labels), named as one.",
    ["model", "version", "engine"],
)

CANARY_WEIGHT = Gauge(
    "driftloop_serving_canary_weight",
    "The live rollout's canary weight as this replica routes it, by model and mode: the share of the "
    "model's requests the candidate answers (canary) or also scores (shadow), from 0 to 1. Present only "
    "while a rollout of the model is live: it leaves /metrics once the rollout is promoted or rolled back.",
    ["model", "mode"],
)
ROLLOUT_STEP = Gauge(
    "driftloop_serving_rollout_step",
    "The live rollout's step as this replica routes it, by model and mode (0 for the first); present only "
    "while a rollout of the model is live.",
    ["model", "mode"],
)

LOOP_FAILURES = Counter(
    "driftloop_serving_loop_failures_total",
    "Rounds of a replica's timer loops that failed, by loop (routing-sync: the re-read of the routes, the "
    "replica answering from the routing it last read meanwhile, for every model or for those whose new "
    "versions the store could not give; sample-flush: the canary rows it served added to the step's count, "
    "the flush saved again, the same, meanwhile): logged as a warning and tried again. A "
    "count that keeps rising is a replica on stale routing (a canary rolled back still taking its traffic "
    "here), or a step whose samples stop growing.",
    ["loop"],
)
for _loop in ("routing-sync", "sample-flush"):  # exported at 0 from the start: an alert reads the first rise
    LOOP_FAILURES.labels(_loop)

ERROR_RATE_ROLLBACK_FAILURES = Counter(
    "driftloop_serving_error_rate_rollback_failures_total",
    "Rollbacks of a canary over ERROR_RATE_THRESHOLD that this replica could not make (Postgres away): "
    'logged as "error-rate rollback failed"; the next canary failure over the threshold, a second later, '
    "tries again. Meanwhile the failing canary keeps its share of the traffic (its callers answered by the "
    "stable version): a count that keeps rising is a rollback that does not happen.",
)

_PER_VERSION: tuple[tuple[MetricWrapperBase, tuple[str, ...]], ...] = (
    (REQUESTS, _BY_VARIANT),
    (ROWS, _BY_VARIANT),
    (LATENCY, _BY_VARIANT),
    (MODEL_ERRORS, _BY_VARIANT),
    (UNCOMPILED, ("model", "version")),
    (ENGINE, ("model", "version", "engine")),
)

_PER_MODEL: tuple[tuple[MetricWrapperBase, tuple[str, ...]], ...] = (
    (REQUEST_SECONDS, ("model", "protocol")),
    (UNSEEN, ("model", "feature")),
)

_SERIES: dict[tuple[str, int, Variant], tuple[Any, Any, Any]] = {}


def request_series(model: str, version: int, variant: Variant) -> tuple[Any, Any, Any]:
    """The request, row and latency series of one model version and variant (``labels()`` is a lookup
    under a lock: once per series, not per request)."""
    key = (model, version, variant)
    series = _SERIES.get(key)
    if series is None:
        labels = (model, str(version), variant.value)
        series = (REQUESTS.labels(*labels), ROWS.labels(*labels), LATENCY.labels(*labels))
        _SERIES[key] = series
    return series


def keep_served(served: Collection[tuple[str, int]]) -> None:
    """Remove every per-version series, and every cached handle, of a (model, version) not in ``served``,
    and every per-model series of a model none of ``served`` belongs to (archived, deleted, its versions
    no longer on traffic).

    Runs once per routing swap, never per request. The series to remove are read from the registry itself,
    so one created by any path (a load that never reached the table, a late shadow scoring, a request that
    took an older table and ended after its swap) goes too, at the first swap after it was created."""
    for key in [k for k in _SERIES if (k[0], k[1]) not in served]:
        # A handle kept for a removed series would count into a series no longer exported.
        del _SERIES[key]
    wanted = {(model, str(version)) for model, version in served}
    _remove_series(_PER_VERSION, lambda labels: (labels[0], labels[1]) in wanted)
    models = {model for model, _ in served}
    _remove_series(_PER_MODEL, lambda labels: labels[0] in models)


def show_rollouts(live: Mapping[str, tuple[str, float, int]]) -> None:
    """Set the gauges of each live rollout, model -> (mode, weight, step index), and remove those of every
    other model (its rollout promoted, rolled back, or no longer routed here). Runs once per routing swap."""
    for model, (mode, weight, step) in live.items():
        CANARY_WEIGHT.labels(model, mode).set(weight)
        ROLLOUT_STEP.labels(model, mode).set(step)
    wanted = {(model, mode) for model, (mode, _, _) in live.items()}
    _remove_series(
        ((CANARY_WEIGHT, ("model", "mode")), (ROLLOUT_STEP, ("model", "mode"))), wanted.__contains__
    )


def _remove_series(
    metrics: Sequence[tuple[MetricWrapperBase, tuple[str, ...]]], keep: Callable[[tuple[str, ...]], bool]
) -> None:
    """Remove each series of ``metrics`` (with the label names to read, in declaration order) whose label
    values ``keep`` refuses."""
    for metric, names in metrics:
        present = {
            tuple(sample.labels[n] for n in names) for family in metric.collect() for sample in family.samples
        }
        for labels in present:
            if not keep(labels):
                metric.remove(*labels)
