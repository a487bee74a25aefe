"""The prediction log on Kafka: a bounded buffer, one sender task, batched sends; and the hand-off frame
that carries an item from the serving process to the producer process that runs this sender
(services/serving/adapters/log_producer.py).

Prediction logs are telemetry, not state: they bypass the outbox (one Postgres write per prediction would
cost more than the prediction). The request path only hands an item over and never waits; when the
buffer is full the newest item is dropped and counted
(``driftloop_serving_prediction_log_dropped_total{reason="buffer-full"}``), and a send the broker refuses
is counted too (``reason="send-failed"``). Loss is therefore bounded (the buffer, plus a crash's worth of
in-flight items) and always visible in /metrics, never silent.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import Counter, Gauge

from contracts.envelope import CONTENT_TYPE, SPEC_VERSION, new_event_id
from contracts.predictions import TOPIC, PredictionsLogged, Variant
from libs.logging import get_logger
from libs.settings import KafkaSettings
from services.serving.domain import FeatureColumns, LogItem, Scores, read_json, rows_of

log = get_logger(__name__)

DROPPED = Counter(
    "driftloop_serving_prediction_log_dropped_total",
    "PredictionsLogged events not published: buffer-full (dropped newest) or send-failed.",
    ["reason"],
)
SENT = Counter("driftloop_serving_prediction_log_sent_total", "PredictionsLogged events published.")
BUFFERED = Gauge("driftloop_serving_prediction_log_buffered", "PredictionsLogged events waiting to be sent.")

Wire = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]

_EVENT_TYPE = PredictionsLogged.event_type()


def _payload_rows(item: LogItem) -> list[dict[str, Any]]:
    # The request's own record objects are logged as they are (never mutated), not copied.
    inputs = item.raw_rows if item.raw_rows is not None else rows_of(item.columns)
    scores = item.scores
    if scores.probabilities is not None and scores.classes is not None:
        classes = [str(c) for c in scores.classes]
        if len(classes) == 2:
            # Binary classifiers, the common case: a dict display per row instead of dict(zip(...)), 40% of
            # the rows' cost at 100 rows (these loops are most of what encoding costs besides orjson).
            c0, c1 = classes
            return [
                {
                    "prediction_id": pid,
                    "entity_key": key,
                    "inputs": row,
                    "output": {"prediction": label, "probabilities": {c0: p0, c1: p1}},
                }
                for pid, key, row, label, (p0, p1) in zip(
                    item.prediction_ids,
                    item.entity_keys,
                    inputs,
                    scores.labels,
                    scores.probabilities,
                    strict=True,
                )
            ]
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


def encode(item: LogItem, *, source: str, max_bytes: int) -> list[Wire]:
    """The item as PredictionsLogged records in the CloudEvents Kafka binding, split to fit ``max_bytes``.

    Built straight to JSON instead of through the pydantic model: validating every row of every request
    would cost more than the prediction. tests/unit/serving checks that the bytes decode as the contract.
    """
    rows = _payload_rows(item)
    head = {
        "model": item.model,
        "model_version": item.version,
        "variant": item.variant.value,
        "rollout_id": item.rollout_id,
        "request_id": item.request_id,
        "predicted_at": item.predicted_at.isoformat(),
        "latency_ms": max(0.0, item.latency_ms),
    }
    out: list[Wire] = []
    pending = [rows]
    while pending:
        part = pending.pop(0)
        value = orjson.dumps({**head, "rows": part}, option=orjson.OPT_SERIALIZE_NUMPY)
        if len(value) > max_bytes and len(part) > 1:
            half = len(part) // 2
            pending[:0] = [part[:half], part[half:]]
            continue
        event_id = new_event_id()
        headers = [
            ("ce_specversion", SPEC_VERSION.encode()),
            ("ce_id", event_id.encode()),
            ("ce_source", source.encode()),
            ("ce_type", _EVENT_TYPE.encode()),
            ("ce_time", item.predicted_at.isoformat().replace("+00:00", "Z").encode()),
            ("content-type", CONTENT_TYPE.encode()),
            ("ce_correlationid", event_id.encode()),
            ("ce_subject", item.model.encode()),
        ]
        out.append((TOPIC, item.model.encode(), value, headers))
    return out


FRAME = struct.Struct("<II")
"""A hand-off frame's prefix: the bytes that follow it, and how many of them are the JSON head."""


def pack(item: LogItem, *, body_sent: bool) -> bytes:
    """One item as a hand-off frame: a JSON head (ids, keys, outputs, the request's metadata) and, for
    records read from a JSON body, that body as it came (``body_sent``: the previous frame carried the same
    body, as the two variants of one split request do). The inputs are not serialised here: formatting
    their floats is most of what encoding a log event costs, and the producer process does it."""
    scores = item.scores
    head: dict[str, Any] = {
        "model": item.model,
        "version": item.version,
        "variant": item.variant.value,
        "rollout_id": item.rollout_id,
        "request_id": item.request_id,
        "predicted_at": item.predicted_at.isoformat(),
        "latency_ms": item.latency_ms,
        "rows": item.columns.rows,
        "prediction_ids": item.prediction_ids,
        "entity_keys": item.entity_keys,
        "labels": scores.labels,
        "probabilities": scores.probabilities,
        "classes": scores.classes,
    }
    body = b""
    if item.body is not None:
        head["body"] = "same" if body_sent else "new"
        head["body_rows"] = item.body_rows
        if not body_sent:
            body = item.body
    elif item.raw_rows is not None:
        head["raw_rows"] = item.raw_rows
    else:
        head["columns"] = item.columns.columns
    encoded = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    return FRAME.pack(len(encoded) + len(body), len(encoded)) + encoded + body


class Unpacker:
    """Reads hand-off frames back into items, in the order they were packed (a frame may reuse the
    previous frame's body)."""

    def __init__(self) -> None:
        self._records: list[Any] | None = None

    def __call__(self, frame: bytes | memoryview, head_bytes: int) -> LogItem:
        """The item of one frame (without its prefix); raises ValueError when it cannot be read."""
        view = memoryview(frame)
        head = orjson.loads(view[:head_bytes])
        raw_rows: list[Any] | None = None
        if "body" in head:
            if head["body"] == "new":
                self._records = None
                body = read_json(bytes(view[head_bytes:]))
                records = body.get("records") if isinstance(body, dict) else None
                if not isinstance(records, list):
                    raise ValueError("a logged request body without a records list")
                self._records = records
            if self._records is None:
                raise ValueError("a frame reuses a body that was never read")
            picked = head["body_rows"]
            raw_rows = self._records if picked is None else [self._records[i] for i in picked]
        elif "raw_rows" in head:
            raw_rows = head["raw_rows"]
        return LogItem(
            model=head["model"],
            version=head["version"],
            variant=Variant(head["variant"]),
            rollout_id=head["rollout_id"],
            request_id=head["request_id"],
            predicted_at=datetime.fromisoformat(head["predicted_at"]),
            latency_ms=head["latency_ms"],
            prediction_ids=head["prediction_ids"],
            entity_keys=head["entity_keys"],
            columns=FeatureColumns(head["rows"], head.get("columns") or {}),
            raw_rows=raw_rows,
            scores=Scores(head["labels"], head["probabilities"], head["classes"]),
        )


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
        yield_between_items: bool = True,
    ) -> None:
        self.kafka = kafka
        self.source = source
        self.batch = batch
        self.linger_ms = linger_ms
        # Items, or items already encoded (the producer process encodes each as it reads it).
        self.queue: asyncio.Queue[LogItem | list[Wire]] = asyncio.Queue(maxsize=buffer)
        self._producer_factory = producer_factory
        self._partitioner = DefaultPartitioner()
        self.yield_between_items = yield_between_items
        self._producer: Any = None
        self._stopping = False
        # The same counts as the metrics, readable by the producer process that reports them to serving.
        self.counts = {"sent": 0, "send-failed": 0, "unencodable": 0}

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
                # Linger here, not only in the producer: each call of _send makes its own record batches,
                # and many small produce requests cost the process (and the broker) far more than a few
                # large ones.
                until = asyncio.get_running_loop().time() + self.linger_ms / 1000
                while len(items) < self.batch:
                    if not self.queue.empty():
                        items.append(self.queue.get_nowait())
                        continue
                    left = until - asyncio.get_running_loop().time()
                    if left <= 0 or self._stopping:
                        break
                    try:
                        items.append(await asyncio.wait_for(self.queue.get(), timeout=left))
                    except TimeoutError:
                        break
                BUFFERED.set(self.queue.qsize())
                await self._send(items)
        finally:
            await self._producer.stop()

    def encode(self, item: LogItem) -> list[Wire] | None:
        """The item's records, or None (counted and logged) when it cannot be encoded."""
        try:
            return encode(item, source=self.source, max_bytes=self.kafka.max_event_bytes)
        except Exception as exc:
            DROPPED.labels("unencodable").inc()
            self.counts["unencodable"] += 1
            log.error("prediction log item cannot be encoded", model=item.model, error=repr(exc))
            return None

    async def _send(self, items: list[LogItem | list[Wire]]) -> None:
        producer = self._producer
        topic = self.kafka.physical(TOPIC)
        # Whole record batches, one per partition, instead of one send() per event: aiokafka's per-message
        # path (a future, the accumulator, the partitioner) was ~35 µs an event, the largest cost of a
        # small one. Partitions are chosen as send() does: the default partitioner on the key.
        partitions = sorted(await producer.partitions_for(topic))
        open_batches: dict[int, Any] = {}
        counts: dict[int, int] = {}
        submitted: list[tuple[Any, int]] = []

        async def submit(partition: int) -> None:
            batch, n = open_batches.pop(partition), counts.pop(partition)
            try:
                submitted.append((await producer.send_batch(batch, topic, partition=partition), n))
            except Exception as exc:
                self._failed(n, exc)

        for item in items:
            # Encoding a 100-row item takes ~0.2 ms and a batch holds up to `batch` of them: on serving's
            # loop, yield between items so requests are not queued behind a whole batch's encoding (the
            # producer process has no requests to answer).
            if type(item) is list:
                wires = item
            else:
                if self.yield_between_items:
                    await asyncio.sleep(0)
                encoded = self.encode(item)  # type: ignore[arg-type]
                if encoded is None:
                    continue
                wires = encoded
            for _, key, value, headers in wires:
                partition = self._partitioner(key, partitions, partitions)
                for attempt in range(2):
                    if partition not in open_batches:
                        open_batches[partition], counts[partition] = producer.create_batch(), 0
                    if open_batches[partition].append(key=key, value=value, timestamp=None, headers=headers):
                        counts[partition] += 1
                        break
                    if attempt or counts[partition] == 0:  # larger than an empty batch takes
                        open_batches.pop(partition)
                        counts.pop(partition)
                        self._failed(1, ValueError(f"an event of {len(value)} bytes does not fit a batch"))
                        break
                    await submit(partition)  # full: send it, start another
        for partition in list(open_batches):
            await submit(partition)
        results = await asyncio.gather(*(f for f, _ in submitted), return_exceptions=True)
        failed = sum(n for (_, n), r in zip(submitted, results, strict=True) if isinstance(r, BaseException))
        if failed:
            self._failed(failed, next(r for r in results if isinstance(r, BaseException)), sent=True)
        done = sum(n for _, n in submitted) - failed
        SENT.inc(done)
        self.counts["sent"] += done

    def _failed(self, n: int, exc: BaseException, *, sent: bool = False) -> None:
        DROPPED.labels("send-failed").inc(n)
        self.counts["send-failed"] += n
        log.warning(
            "prediction log events not acknowledged" if sent else "prediction log send failed",
            failed=n,
            error=repr(exc),
        )

    async def stop(self) -> None:
        """Stop taking new work; ``run`` flushes the buffer and returns."""
        self._stopping = True
