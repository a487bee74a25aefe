"""Serving's series labelled with a model version, in one place."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

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
    "Model calls that failed (a failed canary call is answered by the stable version).",
    _BY_VARIANT,
)
UNCOMPILED = Counter(
    "driftloop_serving_uncompiled_requests_total",
    "Requests to a compiled model that its estimator answered instead (a category sent as a number, or a "
    "non-finite output from the compiled copy's float32 arithmetic).",
    ["model", "version"],
)
ENGINE = Gauge(
    "driftloop_serving_model_engine",
    "1 for what computes a loaded version's answers: onnxruntime (a verified compiled copy) or "
    "scikit-learn (the pipeline itself).",
    ["model", "version", "engine"],
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
