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
import contextlib
import re
import struct
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

import orjson
from aiokafka import AIOKafkaProducer
from prometheus_client import Counter, Gauge

from contracts.envelope import CONTENT_TYPE, SPEC_VERSION, new_event_id, record_bytes
from contracts.predictions import TOPIC, PredictionsLogged, Variant
from libs.bus.kafka import KeyPartitioner
from libs.logging import get_logger
from libs.settings import KafkaSettings
from services.serving.domain import FeatureColumns, LogItem, Scores, read_json, rows_of

log = get_logger(__name__)

DROPPED = Counter(
    "driftloop_serving_prediction_log_dropped_total",
    "PredictionsLogged events not published, by reason: buffer-full (dropped newest), send-failed (not "
    "acknowledged by the broker), unencodable, oversized (a row larger than the event limit, which every "
    "consumer would dead-letter), producer-down (offered while no producer process ran), "
    "producer-exited (handed to a producer process that died before reporting them), producer-stalled "
    "(handed to a producer process that stopped reporting and was killed).",
    ["reason"],
)
SENT = Counter("driftloop_serving_prediction_log_sent_total", "PredictionsLogged events published.")
BUFFERED = Gauge("driftloop_serving_prediction_log_buffered", "PredictionsLogged events waiting to be sent.")

Wire = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]

_EVENT_TYPE = PredictionsLogged.event_type().encode()
_SPEC_VERSION = SPEC_VERSION.encode()
_CONTENT_TYPE = CONTENT_TYPE.encode()


# The record texts of a ``{"records": [...]}`` body: where the first record opens, where the last one
# closes, and what stands between two records (JSON's whitespace only).
_RECORDS_OPEN = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"records"[ \t\r\n]*:[ \t\r\n]*\[[ \t\r\n]*\{')
_RECORDS_CLOSE = re.compile(rb"\}[ \t\r\n]*\][ \t\r\n]*\}[ \t\r\n]*\Z")
_BETWEEN_RECORDS = re.compile(rb"\}[ \t\r\n]*,[ \t\r\n]*\{")
_WHITESPACE = (b" ", b"\n", b"\r", b"\t")
_CLOSE_WITHIN = 256
COLUMNWISE_FROM_ROWS = 8
"""From this many records a body's records are cut out of it (fewer are read, as cheaply) and an event's
rows are built a column at a time (fewer, one dict per row)."""


def record_texts(body: bytes, count: int | None) -> list[bytes] | None:
    """The text of each record of a request body, between its braces, as the client wrote it; None when it
    cannot be cut out without reading the body (which :class:`Unpacker` then does).

    ``count`` (``LogItem.body_records``) says the body is strict JSON whose only member is ``records``, an
    array of ``count`` objects (serving read it so and answered every record). Between two records there is
    then a ``}``, a comma and a ``{``, with only whitespace between them; inside a record the same bytes can
    only be part of a string or a nested value. So the body is cut there when the cuts are exactly
    ``count - 1``: one more means some record holds such a string or value, and the body is read instead.
    With no backslash in the body, no key is escaped, so the one ``"records"`` found is the only member,
    and the array runs from just after it to the closing ``]}``. Parsing the text of the event gives what
    reading the body and encoding its records gives; for bodies orjson wrote, the bytes are the same
    (tests/unit/serving/test_log_producer.py). One difference: an integer of 20 digits or more is logged as
    the client wrote it, where reading would log the float orjson reads it as (and the model was given).
    """
    if count is None or count < COLUMNWISE_FROM_ROWS or b"\\" in body or body.count(b'"records"') != 1:
        return None
    opened = _RECORDS_OPEN.match(body)
    closed = _RECORDS_CLOSE.search(body, max(0, len(body) - _CLOSE_WITHIN))
    if opened is None or closed is None or closed.start() < opened.end():
        return None
    inner = body[opened.end() : closed.start()]
    if any(space in inner for space in _WHITESPACE):
        texts = _BETWEEN_RECORDS.split(inner)
    else:
        texts = inner.split(b"},{")
    return texts if len(texts) == count else None


def _tokens(values: Any) -> list[bytes]:
    """Each value as JSON: one orjson call cut at its commas, unless some value has a comma of its own."""
    tokens = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
    if len(tokens) == len(values):
        return tokens
    return [orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY) for value in values]


def _texts_of(rows: list[dict[str, Any]]) -> list[bytes]:
    """Each record's JSON between its braces, as :func:`record_texts` gives them from a body."""
    if rows:
        texts = orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY)[2:-2].split(b"},{")
        if len(texts) == len(rows):
            return texts
    return [orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1] for row in rows]


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


def _row_parts(item: LogItem) -> tuple[list[bytes], int]:
    """The event's rows as JSON, in pieces: ``stride`` pieces a row, the last one ending in a comma.

    From ``COLUMNWISE_FROM_ROWS`` rows (or with the records cut out of the body) they are made a column at
    a time: a row's pieces are constants and its values of each column, cut from one orjson call per
    column. The bytes are those of ``orjson.dumps`` of one object per row (prediction id, entity key,
    inputs, output), which is how fewer rows are made, as it costs them less; for 100 rows, columns cost
    about half as much."""
    if item.record_texts is not None:
        texts = item.record_texts
    elif len(item.prediction_ids) >= COLUMNWISE_FROM_ROWS:
        texts = _texts_of(item.raw_rows if item.raw_rows is not None else rows_of(item.columns))
    else:
        parts: list[bytes] = []
        for row in _payload_rows(item):
            parts += (orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY), b",")
        return parts, 2
    scores = item.scores
    columns = [
        (b'{"prediction_id":', _tokens(item.prediction_ids)),
        (b',"entity_key":', _tokens(item.entity_keys)),
        (b',"inputs":{', texts),
        (b'},"output":{"prediction":', _tokens(scores.labels)),
    ]
    n = len(scores.labels)
    close = b"}},"
    if scores.probabilities is not None and scores.classes is not None:
        # Transposed: one column of probabilities per class (no rows would give no classes at all).
        per_class = zip(*scores.probabilities, strict=True) if n else [()] * len(scores.classes)
        for i, (label, probabilities) in enumerate(zip(scores.classes, per_class, strict=True)):
            key = orjson.dumps(str(label))
            columns.append(((b',"probabilities":{' if i == 0 else b",") + key + b":", _tokens(probabilities)))
        close = b"}}},"
    stride = 2 * len(columns) + 1
    parts = [close] * (stride * n)
    for i, (constant, values) in enumerate(columns):
        if len(values) != n:
            raise ValueError(f"{len(values)} values for {n} rows")
        parts[2 * i :: stride] = [constant] * n
        parts[2 * i + 1 :: stride] = values
    return parts, stride


def encode(item: LogItem, *, source: str, max_bytes: int) -> list[Wire]:
    """The item as PredictionsLogged records in the CloudEvents Kafka binding, split to fit ``max_bytes``.

    Built straight to JSON instead of through the pydantic model: validating every row of every request
    would cost more than the prediction. tests/unit/serving checks that the bytes decode as the contract.
    """
    parts, stride = _row_parts(item)
    predicted_at = item.predicted_at.isoformat()
    head = (
        orjson.dumps(
            {
                "model": item.model,
                "model_version": item.version,
                "variant": item.variant.value,
                "rollout_id": item.rollout_id,
                "request_id": item.request_id,
                "predicted_at": predicted_at,
                "latency_ms": max(0.0, item.latency_ms),
            }
        )[:-1]
        + b',"rows":['
    )
    model = item.model.encode()
    ce_time = predicted_at.replace("+00:00", "Z").encode()
    source_bytes = source.encode()
    # The limit counts the headers too (contracts.envelope.record_bytes): the id twice (ce_id and the
    # correlation id), the rest as sent.
    room = max_bytes - record_bytes(b"", _headers(b"", source_bytes, ce_time, model)) - 2 * _ID_BYTES
    out: list[Wire] = []
    pending = [(0, len(parts) // stride)]
    while pending:
        first, end = pending.pop(0)
        # The rows' pieces without the last row's comma.
        if end > first:
            value = b"".join(
                (head, *parts[first * stride : end * stride - 1], parts[end * stride - 1][:-1], b"]}")
            )
        else:
            value = head + b"]}"
        if len(value) > room and end - first > 1:
            half = (first + end) // 2
            pending[:0] = [(first, half), (half, end)]
            continue
        out.append((TOPIC, model, value, _headers(new_event_id().encode(), source_bytes, ce_time, model)))
    return out


_ID_BYTES = len(str(uuid.UUID(int=0)))
"""An event id's length (ids are UUIDs)."""


def _headers(event_id: bytes, source: bytes, ce_time: bytes, model: bytes) -> list[tuple[str, bytes]]:
    return [
        ("ce_specversion", _SPEC_VERSION),
        ("ce_id", event_id),
        ("ce_source", source),
        ("ce_type", _EVENT_TYPE),
        ("ce_time", ce_time),
        ("content-type", _CONTENT_TYPE),
        ("ce_correlationid", event_id),
        ("ce_subject", model),
    ]


FRAME = struct.Struct("<II")
"""A hand-off frame's prefix: the bytes that follow it, and how many of them are the JSON head."""


_NUMBER_FORMATS = frozenset("fd")
_INDEX_FORMATS = frozenset("bhilqBHILQ")


def frame_pieces(item: LogItem, *, body_sent: bool) -> tuple[bytes, bytes]:
    """One item as a hand-off frame: a JSON head (the request's metadata, and what cannot go more cheaply),
    the model's outputs as the bytes of its arrays, and, for records read from a JSON body, that body as it
    came (``body_sent``: the previous frame carried the same body, as the two variants of one split request
    do).

    This runs on the request's event loop, so it formats nothing it can avoid: the inputs stay the body's
    text, the probabilities and labels go as their arrays' bytes (``Scores.array``), the prediction ids as
    their prefix (``LogItem.id_prefix``), entity keys only when some row has one. For 100 rows that is
    4.7 µs instead of 12.1 µs in a tight loop (the bench's light model), and 14.7 KB instead of 20.0 KB.
    Items of fewer than ``COLUMNWISE_FROM_ROWS`` rows go as lists. The producer process reads it all back
    (:class:`Unpacker`) into the item that was offered."""
    scores = item.scores
    head: dict[str, Any] = {
        "model": item.model,
        "version": item.version,
        "variant": item.variant.value,
        "rollout_id": item.rollout_id,
        "request_id": item.request_id,
        "predicted_at": item.predicted_at.isoformat(),
        "latency_ms": item.latency_ms,
        "rows": len(item.prediction_ids),
        "body_rows": item.body_rows,
        "classes": scores.classes,
    }
    # Small items go as lists: for them the arrays' bytes and their checks cost more than formatting a few
    # values (pack 3.9 µs against 3.5 at one row, break-even at 8 rows, 4.7 against 12.1 at 100).
    compact = len(item.prediction_ids) >= COLUMNWISE_FROM_ROWS
    if compact and item.id_prefix is not None:
        head["id_prefix"] = item.id_prefix
    else:
        head["prediction_ids"] = item.prediction_ids
    if item.entity_keys.count(None) != len(item.entity_keys):
        head["entity_keys"] = item.entity_keys
    arrays = b""
    array, index = scores.array, scores.label_index
    if (
        compact
        and array is not None
        and index is not None
        and array.ndim == 2
        and array.dtype.char in _NUMBER_FORMATS
        and index.dtype.char in _INDEX_FORMATS
    ):
        probabilities, labels = array.tobytes(), index.tobytes()
        head["arrays"] = [array.dtype.char, array.shape[1], len(probabilities), index.dtype.char, len(labels)]
        arrays = probabilities + labels
    else:
        head["labels"] = scores.labels
        head["probabilities"] = scores.probabilities
    body = b""
    if item.body is not None:
        head["body"] = "same" if body_sent else "new"
        head["body_records"] = item.body_records
        if not body_sent:
            body = item.body
    elif item.raw_rows is not None:
        head["raw_rows"] = item.raw_rows
    else:
        head["columns"] = item.columns.columns
    encoded = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    # The body apart, the request's own bytes: the flush joins every frame's pieces at once, so the body is
    # copied once, into that write, instead of into a frame and then again into the write.
    return b"".join((FRAME.pack(len(encoded) + len(arrays) + len(body), len(encoded)), encoded, arrays)), body


def pack(item: LogItem, *, body_sent: bool) -> bytes:
    """:func:`frame_pieces` as one frame."""
    return b"".join(frame_pieces(item, body_sent=body_sent))


class Unpacker:
    """Reads hand-off frames back into items, in the order they were packed (a frame may reuse the
    previous frame's body)."""

    def __init__(self) -> None:
        self._body: bytes | None = None
        self._texts: list[bytes] | None = None
        self._records: list[Any] | None = None

    def __call__(self, frame: bytes | memoryview, head_bytes: int) -> LogItem:
        """The item of one frame (without its prefix); raises ValueError when it cannot be read."""
        try:
            return self._item(frame, head_bytes)
        except Exception:
            # The frame may have carried a new body and failed before it was kept: the next frame that
            # reuses "the same" body would take an earlier request's, and log its records as its own.
            # Forgotten, that frame is refused (and counted) instead.
            self._body = self._texts = self._records = None
            raise

    def _item(self, frame: bytes | memoryview, head_bytes: int) -> LogItem:
        view = memoryview(frame)
        head = orjson.loads(view[:head_bytes])
        rows: int = head["rows"]
        picked: list[int] | None = head["body_rows"]
        classes = head["classes"]
        at = head_bytes
        if "arrays" in head:
            number, width, number_bytes, integer, index_bytes = head["arrays"]
            if number not in _NUMBER_FORMATS or integer not in _INDEX_FORMATS:
                raise ValueError(f"arrays of {number!r} and {integer!r} are not handed over")
            flat = cast(list[float], view[at : at + number_bytes].cast(number).tolist())  # typeshed: ints
            at += number_bytes
            index = view[at : at + index_bytes].cast(integer).tolist()
            at += index_bytes
            if len(index) != rows or len(flat) != rows * width:
                raise ValueError(f"{len(flat)} probabilities and {len(index)} labels for {rows} rows")
            by_class = [flat[j::width] for j in range(width)]
            probabilities: list[list[float]] | None = (
                list(map(list, zip(*by_class, strict=True))) if width else [[] for _ in range(rows)]
            )
            labels = [classes[i] for i in index]
        else:
            probabilities, labels = head["probabilities"], head["labels"]
        if "id_prefix" in head:
            prefix = head["id_prefix"]
            ids = [f"{prefix}{i}" for i in (range(rows) if picked is None else picked)]
        else:
            ids = head["prediction_ids"]
        raw_rows: list[Any] | None = None
        texts: list[bytes] | None = None
        if "body" in head:
            if head["body"] == "new":
                self._body = bytes(view[at:])
                self._records = None
                self._texts = record_texts(self._body, head.get("body_records"))
            if self._body is None:
                raise ValueError("a frame reuses a body that was never read")
            if self._texts is not None:
                texts = self._texts if picked is None else [self._texts[i] for i in picked]
            else:
                records = self._read_records()
                raw_rows = records if picked is None else [records[i] for i in picked]
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
            prediction_ids=ids,
            entity_keys=head.get("entity_keys") or [None] * rows,
            columns=FeatureColumns(rows, head.get("columns") or {}),
            raw_rows=raw_rows,
            scores=Scores(labels, probabilities, classes),
            record_texts=texts,
        )

    def _read_records(self) -> list[Any]:
        if self._records is None:
            assert self._body is not None
            body = read_json(self._body)
            records = body.get("records") if isinstance(body, dict) else None
            if not isinstance(records, list):
                raise ValueError("a logged request body without a records list")
            self._records = records
        return self._records


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
        self._partition = KeyPartitioner()
        self.yield_between_items = yield_between_items
        self._producer: Any = None
        self._stopping = False
        # The same counts as the metrics, readable by the producer process that reports them to serving.
        self.counts = {"sent": 0, "send-failed": 0, "unencodable": 0, "oversized": 0}
        self.settled = 0
        """Items done with: sent, failed, unencodable or left out. The counts are of events, and an item
        over the event limit is several: the producer process reports this too, so that serving knows how
        many of the items it handed over are still in flight (lost, should the process die)."""

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
                # As KafkaPublisher.start: a failed start leaves its client to stop, one more at every try for
                # as long as the broker is away.
                with contextlib.suppress(Exception):
                    await producer.stop()
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
                self.settled += len(items)
        finally:
            await self._producer.stop()

    def encode(self, item: LogItem) -> list[Wire] | None:
        """The item's records, or None (counted and logged) when it cannot be encoded; a record still over
        the event limit is left out and counted (``oversized``)."""
        limit = self.kafka.max_event_bytes
        try:
            wires = encode(item, source=self.source, max_bytes=limit)
        except Exception as exc:
            DROPPED.labels("unencodable").inc()
            self.counts["unencodable"] += 1
            log.error("prediction log item cannot be encoded", model=item.model, error=repr(exc))
            return None
        # Only a record of one row can be over (encode splits the others): every consumer would dead-letter
        # it as oversized, after this log counted it as sent.
        fitting = [wire for wire in wires if record_bytes(wire[2], wire[3]) <= limit]
        if len(fitting) < len(wires):
            over = len(wires) - len(fitting)
            DROPPED.labels("oversized").inc(over)
            self.counts["oversized"] += over
            log.error(
                "prediction log rows larger than the event limit left out",
                model=item.model,
                request_id=item.request_id,
                events=over,
                limit=limit,
            )
        return fitting

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
            # Encoding a 100-row item takes ~0.1 ms and a batch holds up to `batch` of them: on serving's
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
                partition = self._partition(key, partitions)
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
