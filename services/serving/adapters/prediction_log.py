"""The prediction log on Kafka: a bounded buffer, one sender task, batched sends.

Prediction logs are telemetry, not state: they bypass the outbox (one Postgres write per prediction would
cost more than the prediction). The request path only puts an item in a bounded in-memory buffer and
never waits; when the buffer is full the newest item is dropped and counted
(``driftloop_serving_prediction_log_dropped_total{reason="buffer-full"}``), and a send the broker refuses
is counted too (``reason="send-failed"``). Loss is therefore bounded (the buffer, plus a crash's worth of
in-flight items) and always visible in /metrics, never silent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter, Gauge

from contracts.envelope import CONTENT_TYPE, SPEC_VERSION, new_event_id
from contracts.predictions import TOPIC, PredictionsLogged
from libs.logging import get_logger
from libs.settings import KafkaSettings
from services.serving.domain import rows_of
from services.serving.scoring import LogItem

log = get_logger(__name__)

DROPPED = Counter(
    "driftloop_serving_prediction_log_dropped_total",
    "PredictionsLogged events not published: buffer-full (dropped newest) or send-failed.",
    ["reason"],
)
SENT = Counter("driftloop_serving_prediction_log_sent_total", "PredictionsLogged events published.")
BUFFERED = Gauge("driftloop_serving_prediction_log_buffered", "PredictionsLogged events waiting to be sent.")

Wire = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]

_EVENT_TYPE = PredictionsLogged.event_type().encode()
_SPEC_VERSION = SPEC_VERSION.encode()
_CONTENT_TYPE = CONTENT_TYPE.encode()


def _payload_rows(item: LogItem) -> list[dict[str, Any]]:
    # The request's own record objects are logged as they are (never mutated), not copied.
    inputs = item.raw_rows if item.raw_rows is not None else rows_of(item.columns)
    scores = item.scores
    if scores.probabilities is not None and scores.classes is not None:
        classes = [str(c) for c in scores.classes]
        return [
            {
                "prediction_id": pid,
                "entity_key": key,
                "inputs": row,
                "output": {"prediction": label, "probabilities": dict(zip(classes, proba, strict=True))},
            }
            for pid, key, row, label, proba in zip(
                item.prediction_ids,
                item.entity_keys,
                inputs,
                scores.labels,
                scores.probabilities,
                strict=True,
            )
        ]
    return [
        {"prediction_id": pid, "entity_key": key, "inputs": row, "output": {"prediction": label}}
        for pid, key, row, label in zip(
            item.prediction_ids, item.entity_keys, inputs, scores.labels, strict=True
        )
    ]


_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _elements(values: Sequence[Any]) -> list[bytes]:
    """Each value's JSON, from one orjson call over the list.

    A list of n values serialises to n - 1 separating commas plus any commas inside the values; when there
    are exactly n - 1, no value holds one and splitting at the commas gives the values. Otherwise (strings
    with commas, nested values) each value is serialised on its own.
    """
    if not values:
        return []
    inner = orjson.dumps(values, option=_NUMPY)[1:-1]
    if inner.count(b",") == len(values) - 1:
        return inner.split(b",")
    return [orjson.dumps(v, option=_NUMPY) for v in values]


def _objects(rows: Sequence[Mapping[str, Any]]) -> list[bytes] | None:
    """Each row object's JSON without its braces, from one orjson call; None when that cannot be split.

    Flat objects side by side are separated by exactly one ``},{`` each; when the whole list holds exactly
    n - 1 of them, none is inside a value (a string or a nested object) and splitting there is exact.
    """
    blob = orjson.dumps(rows, option=_NUMPY)
    if blob.count(b"},{") != len(rows) - 1 or blob[:2] != b"[{" or blob[-2:] != b"}]":
        return None
    return blob[2:-2].split(b"},{")


def _key(name: str) -> bytes:
    # A JSON object key as a literal in a bytes %-template.
    return orjson.dumps(name).replace(b"%", b"%%")


def _row_bytes(item: LogItem) -> list[bytes] | None:
    """Every row of the item as the JSON object the contract's PredictionRecord writes, built column by
    column with a handful of orjson calls and one C-level %-format per row (no per-row dicts); None when
    the item has a shape only the per-row builder handles."""
    n = len(item.prediction_ids)
    scores = item.scores
    if not (len(item.entity_keys) == len(scores.labels) == n and n > 0):
        return None
    inputs = _objects(item.raw_rows if item.raw_rows is not None else rows_of(item.columns))
    if inputs is None or len(inputs) != n:
        return None
    columns = [_elements(item.prediction_ids), _elements(item.entity_keys), inputs, _elements(scores.labels)]
    head = b'{"prediction_id":%b,"entity_key":%b,"inputs":{%b},"output":{"prediction":%b'
    if scores.probabilities is not None and scores.classes is not None:
        classes = [str(c) for c in scores.classes]
        probabilities = scores.probabilities
        if (
            len(probabilities) != n
            or len(set(classes)) != len(classes)
            or set(map(len, probabilities)) != {len(classes)}
        ):
            return None
        columns.extend(_elements(list(p)) for p in zip(*probabilities, strict=True))
        pairs = b",".join(_key(c) + b":%b" for c in classes)
        template = head + b',"probabilities":{' + pairs + b"}}}"
    else:
        template = head + b"}}"
    return [template % values for values in zip(*columns, strict=True)]


def _slow_row_bytes(item: LogItem) -> list[bytes]:
    return [orjson.dumps(row, option=_NUMPY) for row in _payload_rows(item)]


def encode(item: LogItem, *, source: str, max_bytes: int) -> list[Wire]:
    """The item as PredictionsLogged records in the CloudEvents Kafka binding, split to fit ``max_bytes``.

    Built straight to JSON instead of through the pydantic model, and column by column rather than per
    row: validating or building objects for every row of every request would cost more than the
    prediction, and the values are serving's own checked inputs and outputs. tests/unit/serving checks that
    the bytes decode to the same PredictionsLogged as the validated model's.
    """
    rows = _row_bytes(item)
    if rows is None:
        rows = _slow_row_bytes(item)
    head = orjson.dumps(
        {
            "model": item.model,
            "model_version": item.version,
            "variant": item.variant.value,
            "rollout_id": item.rollout_id,
            "request_id": item.request_id,
            "predicted_at": item.predicted_at.isoformat(),
            "latency_ms": max(0.0, item.latency_ms),
        }
    )
    prefix = head[:-1] + b',"rows":['
    ce_time = item.predicted_at.isoformat().replace("+00:00", "Z").encode()
    key = item.model.encode()
    out: list[Wire] = []
    pending = [rows]
    while pending:
        part = pending.pop(0)
        size = len(prefix) + sum(map(len, part)) + len(part) - 1 + 2
        if size > max_bytes and len(part) > 1:
            half = len(part) // 2
            pending[:0] = [part[:half], part[half:]]
            continue
        value = prefix + b",".join(part) + b"]}"
        event_id = new_event_id().encode()
        headers = [
            ("ce_specversion", _SPEC_VERSION),
            ("ce_id", event_id),
            ("ce_source", source.encode()),
            ("ce_type", _EVENT_TYPE),
            ("ce_time", ce_time),
            ("content-type", _CONTENT_TYPE),
            ("ce_correlationid", event_id),
            ("ce_subject", key),
        ]
        out.append((TOPIC, key, value, headers))
    return out


class KafkaPredictionLog:
    """Bounded buffer + one sender task; ``offer`` never blocks the request."""

    def __init__(
        self,
        kafka: KafkaSettings,
        *,
        source: str,
        buffer: int,
        batch: int,
        linger_ms: int,
        producer_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.kafka = kafka
        self.source = source
        self.batch = batch
        self.linger_ms = linger_ms
        self.queue: asyncio.Queue[LogItem] = asyncio.Queue(maxsize=buffer)
        self._producer_factory = producer_factory
        self._producer: Any = None
        self._stopping = False

    def offer(self, item: LogItem) -> bool:
        """Queue an item; when the buffer is full, drop it and count it."""
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            DROPPED.labels("buffer-full").inc()
            return False
        return True

    def _new_producer(self) -> Any:
        if self._producer_factory is not None:
            return self._producer_factory()
        # acks=1 and no idempotence: telemetry favours throughput; a retried duplicate row is harmless
        # to monitoring's windows, and the contract does not promise exactly-once for this topic.
        return AIOKafkaProducer(
            acks=1,
            linger_ms=self.linger_ms,
            # Many events per produce request: with the default 16 KiB batches a 100-row event (~27 KB)
            # is a request of its own, and per-request work costs the process 7x more CPU (bench/serving).
            max_batch_size=1024 * 1024,
            max_request_size=self.kafka.max_event_bytes + 64 * 1024,
            client_id="driftloop-serving-predictions",
            **self.kafka.client_options(),
        )

    async def run(self) -> None:
        """Send until stopped, then flush what is buffered (bounded by the stop timeout)."""
        delay = 0.5
        while self._producer is None:
            producer = self._new_producer()
            try:
                await producer.start()
                self._producer = producer
            except Exception as exc:
                if self._stopping:
                    return
                log.warning("prediction log cannot reach Kafka yet", error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        try:
            while not (self._stopping and self.queue.empty()):
                try:
                    first = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except TimeoutError:
                    continue
                items = [first]
                while len(items) < self.batch and not self.queue.empty():
                    items.append(self.queue.get_nowait())
                BUFFERED.set(self.queue.qsize())
                await self._send(items)
        finally:
            await self._producer.stop()

    async def _send(self, items: list[LogItem]) -> None:
        futures = []
        for item in items:
            # Encoding a 100-row item takes ~0.3 ms and a batch holds up to `batch` of them: yield between
            # items so requests are not queued behind a whole batch's encoding.
            await asyncio.sleep(0)
            try:
                wires = encode(item, source=self.source, max_bytes=self.kafka.max_event_bytes)
            except Exception as exc:
                DROPPED.labels("unencodable").inc()
                log.error("prediction log item cannot be encoded", model=item.model, error=repr(exc))
                continue
            for topic, key, value, headers in wires:
                try:
                    futures.append(
                        await self._producer.send(
                            self.kafka.physical(topic), value=value, key=key, headers=headers
                        )
                    )
                except Exception as exc:
                    DROPPED.labels("send-failed").inc()
                    log.warning("prediction log send failed", error=repr(exc))
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = sum(1 for r in results if isinstance(r, BaseException))
        if failed:
            DROPPED.labels("send-failed").inc(failed)
            log.warning("prediction log events not acknowledged", failed=failed)
        SENT.inc(len(results) - failed)

    async def stop(self) -> None:
        """Stop taking new work; ``run`` flushes the buffer and returns."""
        self._stopping = True
