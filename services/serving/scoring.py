"""The one prediction core behind both HTTP protocols: route each row, score it, log it, count it.

Both the simple JSON API and the Open Inference Protocol call :meth:`Predictor.predict`; they differ only
in how they read inputs and write outputs.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from contracts.common import ModelSignature
from contracts.predictions import Variant
from libs.errors import DomainError, InvalidInput, NotFound, Unavailable
from libs.logging import get_logger
from services.serving.domain import (
    FeatureColumns,
    LogItem,
    assign_variants,
    check_row_count,
    error_rate_breached,
    prediction_id_prefix,
    shadowed_rows,
    shown_model,
)
from services.serving.metrics import MODEL_ERRORS, UNSEEN, request_series
from services.serving.routing import ModelRouting, RoutingState, Scores, ServedModel

log = get_logger(__name__)

SHADOW_DROPPED = Counter(
    "driftloop_serving_shadow_dropped_total",
    "Shadow scorings dropped, by reason: queue-full (shadow_buffer scorings waiting), bytes-full (the "
    "requests they hold would pass shadow_buffer_bytes).",
    ["reason"],
)
for _reason in ("queue-full", "bytes-full"):  # exported at 0 from the start, as before the reasons
    SHADOW_DROPPED.labels(_reason)
SHADOW_QUEUE = Gauge("driftloop_serving_shadow_queue", "Shadow scorings waiting.")


class PredictionLog(Protocol):
    """Takes prediction-log items without ever blocking; False when one was dropped (and counted)."""

    def offer(self, item: LogItem) -> bool:
        """Queue an item for publishing."""
        ...


Parse = Callable[[ModelSignature, Sequence[int] | None], FeatureColumns]
"""Reads a request's inputs for one model's signature, optionally only some rows; 422 on bad input."""


@dataclass(frozen=True)
class PredictRequest:
    """A predict request as both protocols hand it over."""

    model: str
    rows: int
    parse: Parse
    entity_keys: list[str | None]
    raw_rows: list[dict[str, Any]] | None = None
    version: int | None = None
    body: bytes | None = None
    """The JSON body ``raw_rows`` were read from (its ``records``), when there is one."""
    body_records: int | None = None
    """How many records ``body`` holds when it is strict JSON with no member but ``records`` (LogItem)."""
    scope: frozenset[str] | None = None
    """The models the caller's token may use (None: every one): a 404 names no served model outside them."""


@dataclass
class PredictResult:
    """Per-row answers, in request order."""

    request_id: str
    labels: list[Any]
    probabilities: list[list[float] | None]
    classes: dict[int, list[Any] | None]
    versions: list[int]
    variants: list[Variant]
    prediction_ids: list[str]


@dataclass
class _StepCounts:
    rows: int = 0
    requests: int = 0
    errors: int = 0
    flushed_rows: int = 0
    breached: bool = False


ErrorBreach = Callable[[str, str, str], None]
"""Called with (model, rollout id, message) at each canary failure while the step's error rate is over the
threshold; the receiver keeps one rollback attempt at a time, and makes another after one that failed."""


@dataclass
class CanaryStats:
    """Canary rows, requests and failures per (model, rollout, step), counted by this replica."""

    threshold: float
    min_requests: int
    alpha: float = 0.01
    on_breach: ErrorBreach | None = None
    counts: dict[tuple[str, str, int], _StepCounts] = field(default_factory=lambda: defaultdict(_StepCounts))

    def served(self, model: str, rollout_id: str, step: int, rows: int) -> None:
        c = self.counts[(model, rollout_id, step)]
        c.rows += rows
        c.requests += 1

    def failed(self, model: str, rollout_id: str, step: int) -> None:
        """Count a canary failure; over the threshold, report the breach (logged once per step). Reported
        again at every later failure: a rollback attempt that failed (the database away) is made again, where
        a breach reported once left the failing canary its share of traffic for the rest of the step."""
        c = self.counts[(model, rollout_id, step)]
        c.requests += 1
        c.errors += 1
        if not error_rate_breached(
            c.requests, c.errors, threshold=self.threshold, min_requests=self.min_requests, alpha=self.alpha
        ):
            return
        message = (
            f"canary failed {c.errors} of {c.requests} requests on step {step} on this replica: more than "
            f"the threshold of {self.threshold:.1%} at significance {self.alpha:g}"
        )
        if not c.breached:
            c.breached = True
            log.warning("canary error rate breached", model=model, rollout_id=rollout_id, detail=message)
        if self.on_breach is not None:
            self.on_breach(model, rollout_id, message)

    def unflushed(self) -> list[tuple[str, str, int, int]]:
        """(model, rollout id, step, rows) not yet taken for a flush; marks them taken. The flush that takes
        them is saved again until it is known saved, never given back
        (:class:`~services.serving.domain.SampleFlush`): given back after a commit whose answer was lost,
        they were added twice."""
        out = []
        for (model, rid, step), c in self.counts.items():
            if c.rows > c.flushed_rows:
                out.append((model, rid, step, c.rows - c.flushed_rows))
                c.flushed_rows = c.rows
        return out

    def forget_ended(self, live: Collection[tuple[str, str, int]]) -> None:
        """Drop the counts of every (model, rollout, step) not in ``live`` whose rows are all flushed: kept,
        they grow with every step the replica ever served, and :meth:`unflushed` walks them all each flush.
        A request still on the older table may count in an ended step again; that entry goes next time."""
        for key in [k for k, c in self.counts.items() if k not in live and c.rows == c.flushed_rows]:
            del self.counts[key]


_JOB_BYTES, _FEATURE_BYTES, _ROW_BYTES, _VALUE_BYTES = 1024, 200, 160, 40
"""About the memory a queued shadow job holds besides its body: the job itself, each column, each row (its
prediction id, entity key, and a JSON request's record) and each value (a Python object and its column's
pointer to it)."""


def shadow_job_bytes(body: bytes | None, rows: int, features: int) -> int:
    """About the memory a shadow job holds until it is scored, in O(1): the request's body (all of it: the
    job keeps it for the prediction log) and its rows' values. Measured with tracemalloc on JSON and Open
    Inference Protocol requests of 1 to 10,000 rows and 3 to 100 features, it was 0.8 to 1.4 times what the
    job kept alive; the body's length alone was a fifth to a third of that, and nothing for the protocol's
    requests, whose body the job does not keep (their values are estimated as numbers: long texts in a
    tensor are counted short)."""
    body_bytes = 0 if body is None else len(body)
    return body_bytes + _JOB_BYTES + features * _FEATURE_BYTES + rows * (_ROW_BYTES + features * _VALUE_BYTES)


@dataclass
class _ShadowJob:
    served: ServedModel
    columns: FeatureColumns
    prediction_ids: list[str]
    entity_keys: list[str | None]
    raw_rows: list[dict[str, Any]] | None
    rollout_id: str | None
    request_id: str
    body: bytes | None = None
    body_rows: list[int] | None = None
    body_records: int | None = None
    nbytes: int = 0
    """What the job counts against ``shadow_buffer_bytes`` until it is scored (:func:`shadow_job_bytes`)."""


def _refused(model: ServedModel, exc: Exception) -> DomainError:
    if isinstance(exc, DomainError):
        return exc
    if isinstance(exc, ValueError | TypeError):
        return InvalidInput(
            f"model {model.model} version {model.version} refused the input: {exc}", reason="model-refused"
        )
    return Unavailable(f"model {model.model} version {model.version} failed: {type(exc).__name__}")


class Predictor:
    """Routes, scores, logs and counts predict requests against the current routing table."""

    def __init__(
        self,
        state: RoutingState,
        prediction_log: PredictionLog,
        stats: CanaryStats,
        *,
        max_rows: int,
        shadow_buffer: int = 1000,
        shadow_buffer_bytes: int = 64 * 1024 * 1024,
        rng: random.Random | None = None,
    ) -> None:
        self.state = state
        self.prediction_log = prediction_log
        self.stats = stats
        self.max_rows = max_rows
        self.rng = rng or random.Random()
        self.shadow_queue: asyncio.Queue[_ShadowJob] = asyncio.Queue(maxsize=shadow_buffer)
        # The job bound alone let a slow candidate under large requests hold gigabytes (1,000 jobs of up to
        # a request's size limit each, and their parsed rows): the replica's memory, which the answers need.
        self.shadow_buffer_bytes = shadow_buffer_bytes
        self.shadow_bytes = 0
        """What the jobs queued, or being scored, hold by :func:`shadow_job_bytes`."""

    def routing(self, model: str, scope: frozenset[str] | None = None) -> ModelRouting:
        """The model's routing, or 404 naming the served models the caller may use (``scope``, the token's
        models; None: every one): a client limited to some models learns nothing of the others."""
        routing = self.state.table.models.get(model)
        if routing is None:
            if model in self.state.table.held and (scope is None or model in scope):
                raise Unavailable(
                    f"model {shown_model(model)} cannot be served yet: the artifact store did not give its "
                    "version; this replica tries again at its next routing sync, retry shortly"
                )
            models = self.state.table.models
            served = sorted(models if scope is None else scope.intersection(models))
            raise NotFound(
                f"model {shown_model(model)} is not served here; served models: "
                f"{', '.join(served) or 'none yet'}",
                models=served,
            )
        return routing

    def predict(self, request: PredictRequest) -> PredictResult:
        """Answer every row; a failing canary call is answered by the stable version, and counted against the
        canary when the stable version answers it. A request naming a version is answered by that version
        alone and is no traffic of the rollout: not counted as the canary's, logged without the rollout id."""
        check_row_count(request.rows, self.max_rows)
        routing = self.routing(request.model, request.scope)  # one table for the request, even across a swap
        n = request.rows
        token = secrets.token_hex(12)
        request_id = f"req-{token}"
        groups: list[tuple[Variant, ServedModel, list[int] | None]] = []
        shadow: list[int] = []
        if request.version is not None:
            found = routing.by_version(request.version)
            if found is None:
                raise NotFound(
                    f"model {shown_model(request.model)} version {request.version} is not serving; serving "
                    f"versions: {routing.versions}",
                    versions=routing.versions,
                )
            groups.append((found[1] if found[1] is not Variant.SHADOW else Variant.CANARY, found[0], None))
        else:
            draw = self.rng.random()
            variants = assign_variants(routing.view, request.entity_keys, draw)
            canary_rows = [i for i, v in enumerate(variants) if v is Variant.CANARY]
            if not canary_rows:
                groups.append((Variant.STABLE, self._stable(routing), None))
            elif len(canary_rows) == n:
                assert routing.canary is not None
                groups.append((Variant.CANARY, routing.canary, None))
            else:
                assert routing.canary is not None
                stable_rows = [i for i, v in enumerate(variants) if v is Variant.STABLE]
                groups.append((Variant.STABLE, self._stable(routing), stable_rows))
                groups.append((Variant.CANARY, routing.canary, canary_rows))
            shadow = shadowed_rows(routing.view, request.entity_keys, draw)

        result = PredictResult(
            request_id=request_id,
            labels=[None] * n,
            probabilities=[None] * n,
            classes={},
            versions=[0] * n,
            variants=[Variant.STABLE] * n,
            prediction_ids=[""] * n,
        )
        for variant, served, rows in groups:
            variant, served, columns, scores, latency_s = self._score(routing, variant, served, request, rows)
            self._record(routing, request, result, token, variant, served, rows, columns, scores, latency_s)
        if shadow and routing.canary is not None:
            self._queue_shadow(routing, request, result, shadow)
        return result

    def _stable(self, routing: ModelRouting) -> ServedModel:
        model = routing.default
        if model is None:
            raise Unavailable(f"model {routing.model!r} has no loaded version yet; retry shortly")
        return model

    def _score(
        self,
        routing: ModelRouting,
        variant: Variant,
        served: ServedModel,
        request: PredictRequest,
        rows: list[int] | None,
    ) -> tuple[Variant, ServedModel, FeatureColumns, Scores, float]:
        started = time.perf_counter()
        # A model error is a model call that failed; a request whose input the signature refuses never called
        # the model (a 422 for the client), and counted, any client could raise the error count of a healthy
        # version at will.
        columns: FeatureColumns | None = None
        try:
            columns = request.parse(served.signature, rows)
            scores = served.predict(columns)
            return variant, served, columns, scores, time.perf_counter() - started
        except Exception as exc:
            if variant is not Variant.CANARY or routing.stable is None or request.version is not None:
                if columns is not None:
                    MODEL_ERRORS.labels(served.model, str(served.version), variant.value).inc()
                raise _refused(served, exc) from exc
            canary_error = exc
        stable = routing.stable
        started = time.perf_counter()
        columns = None
        try:
            columns = request.parse(stable.signature, rows)
            scores = stable.predict(columns)
        except Exception as exc:
            # The stable version cannot answer these rows either: the input is at fault, not the canary, so
            # nothing counts against it (bad requests would otherwise roll back a healthy canary).
            if columns is not None:
                MODEL_ERRORS.labels(stable.model, str(stable.version), Variant.STABLE.value).inc()
            raise _refused(stable, exc) from exc
        MODEL_ERRORS.labels(served.model, str(served.version), variant.value).inc()
        if routing.rollout_id is not None:
            self.stats.failed(routing.model, routing.rollout_id, routing.step_index)
        log.warning(
            "canary call failed, the stable version answers",
            model=served.model,
            version=served.version,
            error=repr(canary_error),
        )
        return Variant.STABLE, stable, columns, scores, time.perf_counter() - started

    def _record(
        self,
        routing: ModelRouting,
        request: PredictRequest,
        result: PredictResult,
        token: str,
        variant: Variant,
        served: ServedModel,
        rows: list[int] | None,
        columns: FeatureColumns,
        scores: Scores,
        latency_s: float,
    ) -> None:
        requests, rows_total, latency = request_series(served.model, served.version, variant)
        requests.inc()
        rows_total.inc(columns.rows)
        latency.observe(latency_s)
        for feature, count in columns.unseen.items():
            UNSEEN.labels(served.model, feature).inc(count)
        probs = scores.probabilities
        prefix = prediction_id_prefix(served.model, served.version, token)
        if rows is None:  # one variant answers the whole request: the common case, without a loop per row
            pids = [f"{prefix}{i}" for i in range(request.rows)]
            result.prediction_ids = pids
            result.labels = list(scores.labels)
            result.probabilities = list(probs) if probs is not None else [None] * request.rows
            result.versions = [served.version] * request.rows
            result.variants = [variant] * request.rows
        else:
            pids = [f"{prefix}{i}" for i in rows]
            for j, i in enumerate(rows):
                result.prediction_ids[i] = pids[j]
                result.labels[i] = scores.labels[j]
                result.probabilities[i] = probs[j] if probs is not None else None
                result.versions[i] = served.version
                result.variants[i] = variant
        result.classes[served.version] = scores.classes
        # Only what the rollout routed is its traffic: a request naming the canary's version went there by the
        # client's choice, and counted, one client could fill a step's samples and dilute its error rate.
        rollout_id = routing.rollout_id if variant is not Variant.STABLE and request.version is None else None
        if variant is Variant.CANARY and rollout_id is not None:
            self.stats.served(routing.model, rollout_id, routing.step_index, columns.rows)
        keys = request.entity_keys
        self.prediction_log.offer(
            LogItem(
                model=served.model,
                version=served.version,
                variant=variant,
                rollout_id=rollout_id,
                request_id=result.request_id,
                predicted_at=datetime.now(UTC),
                latency_ms=latency_s * 1000.0,
                prediction_ids=pids,
                entity_keys=list(keys) if rows is None else [keys[i] for i in rows],
                columns=columns,
                raw_rows=(
                    None
                    if request.raw_rows is None
                    else request.raw_rows
                    if rows is None
                    else [request.raw_rows[i] for i in rows]
                ),
                scores=scores,
                body=request.body if request.raw_rows is not None else None,
                body_rows=rows,
                body_records=request.body_records if request.raw_rows is not None else None,
                id_prefix=prefix,
            )
        )

    def _queue_shadow(
        self, routing: ModelRouting, request: PredictRequest, result: PredictResult, rows: list[int]
    ) -> None:
        assert routing.canary is not None
        # Decided before the candidate reads the rows: a job that would be dropped costs the request nothing.
        if self.shadow_queue.full():
            SHADOW_DROPPED.labels("queue-full").inc()
            return
        body = request.body if request.raw_rows is not None else None
        nbytes = shadow_job_bytes(body, len(rows), len(routing.canary.signature.features))
        if self.shadow_bytes + nbytes > self.shadow_buffer_bytes:
            SHADOW_DROPPED.labels("bytes-full").inc()
            return
        try:
            columns = request.parse(routing.canary.signature, rows)
        except DomainError as exc:
            MODEL_ERRORS.labels(routing.model, str(routing.canary.version), Variant.SHADOW.value).inc()
            log.warning("shadow candidate cannot read the input", model=routing.model, error=exc.message)
            return
        job = _ShadowJob(
            served=routing.canary,
            columns=columns,
            prediction_ids=[result.prediction_ids[i] for i in rows],
            entity_keys=[request.entity_keys[i] for i in rows],
            raw_rows=None if request.raw_rows is None else [request.raw_rows[i] for i in rows],
            rollout_id=routing.rollout_id,
            request_id=result.request_id,
            body=body,
            body_rows=rows,
            body_records=request.body_records if request.raw_rows is not None else None,
            nbytes=nbytes,
        )
        self.shadow_queue.put_nowait(job)  # not full: checked above, and nothing ran since
        self.shadow_bytes += nbytes
        SHADOW_QUEUE.set(self.shadow_queue.qsize())

    def score_shadow(self, job: _ShadowJob) -> None:
        """Score one shadow job and log it; its answer goes nowhere else. A job whose candidate stopped
        serving while it waited (its rollout ended) is not counted: the version's series went with it, and
        counting would bring them back until the next swap (services/serving/metrics.py).

        The job's bytes count against ``shadow_buffer_bytes`` until it is scored, not only until it is taken
        off the queue: its rows are held until then. :meth:`run_shadow` runs nothing between the take and the
        scoring, so this frees them no later; what the log item keeps afterwards the prediction log bounds."""
        try:
            self._score_shadow(job)
        finally:
            self.shadow_bytes -= job.nbytes

    def _score_shadow(self, job: _ShadowJob) -> None:
        served = job.served
        routing = self.state.table.models.get(served.model)
        counted = routing is not None and routing.by_version(served.version) is not None
        started = time.perf_counter()
        try:
            scores = served.predict(job.columns)
        except Exception as exc:
            if counted:
                MODEL_ERRORS.labels(served.model, str(served.version), Variant.SHADOW.value).inc()
            log.warning("shadow scoring failed", model=served.model, version=served.version, error=repr(exc))
            return
        latency_s = time.perf_counter() - started
        if counted:
            requests, rows, latency = request_series(served.model, served.version, Variant.SHADOW)
            requests.inc()
            rows.inc(job.columns.rows)
            latency.observe(latency_s)
        self.prediction_log.offer(
            LogItem(
                model=served.model,
                version=served.version,
                variant=Variant.SHADOW,
                rollout_id=job.rollout_id,
                request_id=job.request_id,
                predicted_at=datetime.now(UTC),
                latency_ms=latency_s * 1000.0,
                prediction_ids=job.prediction_ids,
                entity_keys=job.entity_keys,
                columns=job.columns,
                raw_rows=job.raw_rows,
                scores=scores,
                body=job.body,
                body_rows=job.body_rows,
                body_records=job.body_records,
            )
        )

    async def run_shadow(self, stopping: Callable[[], bool]) -> None:
        """Score shadow jobs one at a time until stopped; the answers were sent long before."""
        while not stopping():
            try:
                job = await asyncio.wait_for(self.shadow_queue.get(), timeout=0.5)
            except TimeoutError:
                continue
            SHADOW_QUEUE.set(self.shadow_queue.qsize())
            self.score_shadow(job)
            # Yield between jobs so a backlog never starves the requests.
            await asyncio.sleep(0)
