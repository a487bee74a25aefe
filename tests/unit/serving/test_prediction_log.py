"""The prediction log: its bytes are the PredictionsLogged contract, it splits big requests, and it never
blocks or loses silently."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka.errors import KafkaConnectionError
from aiokafka.partitioner import DefaultPartitioner

from contracts.envelope import record_bytes
from contracts.predictions import (
    PredictionColumns,
    PredictionOutput,
    PredictionRecord,
    PredictionsLogged,
    Variant,
    read_prediction_columns,
    read_predictions_logged,
)
from contracts.registry import EVENT_TYPES
from libs.settings import KafkaSettings
from services.serving.adapters import prediction_log
from services.serving.adapters.prediction_log import DROPPED, SENT, KafkaPredictionLog, encode
from services.serving.domain import columns_from_records, rows_of
from services.serving.routing import Scores
from services.serving.scoring import LogItem
from tests.unit.serving.fakes import churn_signature, record
from tests.waiting import eventually


def item(rows: int = 2, *, raw: bool = True) -> LogItem:
    records = [record(tenure_months=i, monthly_charges=None if i % 2 else 50.5) for i in range(rows)]
    columns = columns_from_records(churn_signature(), records)
    return LogItem(
        model="churn",
        version=7,
        variant=Variant.CANARY,
        rollout_id="r-1",
        request_id="req-1",
        predicted_at=datetime(2026, 1, 1, tzinfo=UTC),
        latency_ms=1.5,
        prediction_ids=[f"churn:7:abc-{i}" for i in range(rows)],
        entity_keys=[f"c-{i}" if i % 2 else None for i in range(rows)],
        columns=columns,
        raw_rows=records if raw else None,
        scores=Scores([i % 2 for i in range(rows)], [[0.25, 0.75]] * rows, [0, 1]),
    )


def decode(wire: tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]) -> Any:
    topic, key, value, headers = wire
    assert topic == "mlops.predictions" and key == b"churn"
    return EVENT_TYPES.decode(value, headers)


def test_encoded_bytes_are_a_valid_predictions_logged_event() -> None:
    [wire] = encode(item(), source="/driftloop/serving", max_bytes=1_000_000)
    event = decode(wire)
    assert isinstance(event.data, PredictionsLogged) and event.subject == "churn"
    data = event.data
    assert (data.model_version, data.variant, data.rollout_id, data.latency_ms) == (
        7,
        Variant.CANARY,
        "r-1",
        1.5,
    )
    first, second = data.rows
    assert first.prediction_id == "churn:7:abc-0" and first.entity_key is None and second.entity_key == "c-1"
    assert second.inputs == {"tenure_months": 1, "monthly_charges": None, "plan": "basic"}
    assert second.output.prediction == 1 and second.output.probabilities == {"0": 0.25, "1": 0.75}


def test_inputs_from_columns_write_missing_as_null() -> None:
    [wire] = encode(item(raw=False), source="/s", max_bytes=1_000_000)
    rows = decode(wire).data.rows
    assert rows[1].inputs["monthly_charges"] is None and rows[0].inputs["monthly_charges"] == 50.5


def test_a_request_too_big_for_one_event_is_split_in_order() -> None:
    wires = encode(item(rows=40), source="/s", max_bytes=3_000)
    # What consumers count against the limit: the value and the headers.
    assert len(wires) > 1 and all(record_bytes(w[2], w[3]) <= 3_000 for w in wires)
    ids = [r.prediction_id for w in wires for r in decode(w).data.rows]
    assert ids == [f"churn:7:abc-{i}" for i in range(40)]


def test_the_headers_count_against_the_limit_as_consumers_count_them() -> None:
    [(_, _, value, headers)] = encode(item(rows=40), source="/s", max_bytes=1_000_000)
    limit = len(value) + 10  # the value alone would fit, with its headers it does not

    wires = encode(item(rows=40), source="/s", max_bytes=limit)

    assert len(wires) == 2 and all(record_bytes(w[2], w[3]) <= limit for w in wires)
    assert record_bytes(value, headers) > limit


def validated(log_item: LogItem) -> PredictionsLogged:
    """The slow path: the event built and validated row by row through the contract's pydantic models,
    then through its JSON (which writes NaN and infinity as null)."""
    inputs = log_item.raw_rows if log_item.raw_rows is not None else rows_of(log_item.columns)
    scores = log_item.scores
    rows = []
    for i, pid in enumerate(log_item.prediction_ids):
        probabilities = None
        if scores.probabilities is not None and scores.classes is not None:
            probabilities = {
                str(c): float(p) for c, p in zip(scores.classes, scores.probabilities[i], strict=True)
            }
        rows.append(
            PredictionRecord(
                prediction_id=pid,
                entity_key=log_item.entity_keys[i],
                inputs={
                    k: None if isinstance(v, float) and not math.isfinite(v) else v
                    for k, v in inputs[i].items()
                },
                output=PredictionOutput(prediction=scores.labels[i], probabilities=probabilities),
            )
        )
    event = PredictionsLogged(
        model=log_item.model,
        model_version=log_item.version,
        variant=log_item.variant,
        rollout_id=log_item.rollout_id,
        request_id=log_item.request_id,
        predicted_at=log_item.predicted_at,
        latency_ms=log_item.latency_ms,
        rows=rows,
    )
    return PredictionsLogged.model_validate_json(event.model_dump_json())


def custom(
    records: list[dict[str, Any]],
    labels: Any,
    probabilities: Any,
    classes: list[Any] | None,
    *,
    raw: bool = True,
    keys: list[str | None] | None = None,
) -> LogItem:
    n = len(records)
    base = item(rows=1)
    base.prediction_ids = [f'churn:7:id,"{i}%s' for i in range(n)]
    base.entity_keys = keys if keys is not None else [None if i % 3 else f"k,{i}}},{{" for i in range(n)]
    base.raw_rows = records if raw else None
    base.columns = columns_from_records(churn_signature(), records) if not raw else base.columns
    base.scores = Scores(labels, probabilities, classes)
    return base


VARIED = {
    "columns with missing values and categories": lambda: custom(
        [
            record(
                tenure_months=i, monthly_charges=None if i % 2 else 20.25 * i, plan=("basic", "pro")[i % 2]
            )
            for i in range(30)
        ],
        [i % 2 for i in range(30)],
        [[0.1 * (i % 10), 1 - 0.1 * (i % 10)] for i in range(30)],
        [0, 1],
        raw=False,
    ),
    "raw records with NaN, infinity, None, unicode and separators in strings": lambda: custom(
        [
            {"tenure_months": float("nan"), "monthly_charges": float("inf"), "plan": "ba},{sic"},
            {"tenure_months": None, "monthly_charges": -0.0, "plan": 'pr\u00f6,"%s'},
            {"tenure_months": 3, "monthly_charges": 1e-300, "plan": "basic"},
            {"tenure_months": True, "monthly_charges": 12345678901234, "plan": ""},
        ],
        [1, 0, 1, 1],
        [[0.25, 0.75], [0.5, 0.5], [1e-17, 1.0], [0.0, 1.0]],
        [0, 1],
    ),
    "string labels and classes with commas, quotes and percent signs": lambda: custom(
        [record(tenure_months=i) for i in range(5)],
        ["yes, churn", 'no "stay"', "100%", "yes, churn", "%b"],
        [[0.2, 0.3, 0.4, 0.1]] * 5,
        ["yes, churn", 'no "stay"', "100%", "%b"],
        keys=["a,b", None, '"q"', "},{", "x"],
    ),
    "a regression without probabilities": lambda: custom(
        [record(tenure_months=i) for i in range(7)], [0.5 * i - 1 for i in range(7)], None, None
    ),
    "numpy labels and probabilities": lambda: custom(
        [record(tenure_months=i) for i in range(6)],
        list(np.array([0, 1, 1, 0, 1, 0], dtype=np.int64)),
        np.array([[0.3, 0.7]] * 6),
        [0, 1],
        raw=False,
    ),
    "one row": lambda: custom([record()], [True], [[0.4, 0.6]], [False, True]),
    "empty records": lambda: custom([{}, {}], [0, 1], [[1.0, 0.0], [0.0, 1.0]], [0, 1]),
}


@pytest.mark.parametrize("case", list(VARIED))
def test_encoded_bytes_decode_to_the_rowwise_validated_event(case: str) -> None:
    log_item = VARIED[case]()
    [wire] = encode(log_item, source="/s", max_bytes=1_000_000)
    assert decode(wire).data == validated(log_item)


@pytest.mark.parametrize("case", list(VARIED))
def test_the_consumers_fast_readers_take_the_encoded_bytes_as_the_validated_event(case: str) -> None:
    # Monitoring and audit read this topic with the fast readers: what they cannot prove valid goes to full
    # validation (slow), so the encoder's bytes must take their fast path and read as the validated event.
    log_item = VARIED[case]()
    [(_, _, value, _)] = encode(log_item, source="/s", max_bytes=1_000_000)
    expected = validated(log_item)
    assert read_predictions_logged(value) == expected
    assert read_prediction_columns(value) == PredictionColumns.of(expected)


async def test_items_encoded_before_they_are_queued_are_sent_as_they_are() -> None:
    # The producer process queues records it encoded as it read them; the in-loop log queues items.
    producer = FakeProducer()
    log = log_with(producer)
    task = asyncio.create_task(log.run())
    encoded = log.encode(VARIED["one row"]())
    assert encoded is not None
    await log.queue.put(encoded)
    log.offer(item())
    await log.stop()
    await asyncio.wait_for(task, timeout=5)
    assert producer.sent == [encoded[0][2], producer.sent[1]] and len(producer.sent) == 2
    assert read_predictions_logged(producer.sent[1]) == validated(item())


def test_an_unencodable_item_is_counted_not_raised() -> None:
    log = log_with(FakeProducer())
    bad = item()
    bad.scores = Scores([0], [[0.5, 0.5]], [0, 1])  # one answer for two rows
    before = DROPPED.labels("unencodable")._value.get()
    assert log.encode(bad) is None
    assert DROPPED.labels("unencodable")._value.get() == before + 1 and log.counts["unencodable"] == 1


def one_row_over(limit: int, rows: int = 40) -> LogItem:
    """An item whose third row alone, as an event, is larger than ``limit`` (a long category)."""
    log_item = item(rows=rows)
    assert log_item.raw_rows is not None
    log_item.raw_rows[2] = log_item.raw_rows[2] | {"plan": "p" * limit}
    return log_item


async def test_a_row_larger_than_the_event_limit_alone_is_dropped_and_counted_not_sent() -> None:
    # Every consumer dead-letters an event over the limit (monitoring and audit alike): sent, it would be
    # counted as sent here and lost there. The rows that fit are still sent.
    producer = FakeProducer()
    log = KafkaPredictionLog(
        KafkaSettings(max_event_bytes=3_000),
        source="/s",
        buffer=10,
        batch=4,
        linger_ms=0,
        producer_factory=lambda: producer,
    )
    before, sent_before = DROPPED.labels("oversized")._value.get(), SENT._value.get()
    task = asyncio.create_task(log.run())
    log_item = one_row_over(3_000)
    log.offer(log_item)
    await log.stop()
    await asyncio.wait_for(task, timeout=5)
    assert DROPPED.labels("oversized")._value.get() == before + 1 and log.counts["oversized"] == 1
    assert len(producer.sent) > 1 and SENT._value.get() == sent_before + len(producer.sent)
    assert all(len(value) <= 3_000 for value in producer.sent)
    ids = [r.prediction_id for v in producer.sent for r in PredictionsLogged.model_validate_json(v).rows]
    assert ids == [pid for i, pid in enumerate(log_item.prediction_ids) if i != 2]


def test_split_events_decode_to_the_validated_rows_in_order() -> None:
    log_item = VARIED["raw records with NaN, infinity, None, unicode and separators in strings"]()
    assert log_item.raw_rows is not None and log_item.scores.probabilities is not None
    log_item.raw_rows = log_item.raw_rows * 10
    for name in ("prediction_ids", "entity_keys"):
        setattr(log_item, name, [f"{v}-{i}" for i, v in enumerate(getattr(log_item, name) * 10)])
    log_item.scores = Scores(log_item.scores.labels * 10, log_item.scores.probabilities * 10, [0, 1])
    wires = encode(log_item, source="/s", max_bytes=1_500)
    assert len(wires) > 2 and all(record_bytes(w[2], w[3]) <= 1_500 for w in wires)
    assert [r for w in wires for r in decode(w).data.rows] == validated(log_item).rows


class FakeBatch:
    """A record batch that takes everything."""

    def __init__(self) -> None:
        self.values: list[bytes] = []

    def append(self, *, key: bytes | None, value: bytes, timestamp: Any, headers: Any) -> object:
        self.values.append(value)
        return object()


class FakeProducer:
    """Records the batches sent; ``fail`` makes every acknowledgement fail."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[bytes] = []
        self.fail = fail
        self.partitions = {0, 1, 2}
        self.sent_to: list[tuple[int, int]] = []
        """(partition, events) of each batch sent."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def partitions_for(self, topic: str) -> set[int]:
        return self.partitions

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.fail:
            future.set_exception(ConnectionError("broker away"))
        else:
            self.sent.extend(batch.values)
            self.sent_to.append((partition, len(batch.values)))
            future.set_result(None)
        return future


def log_with(producer: FakeProducer, buffer: int = 10) -> KafkaPredictionLog:
    return KafkaPredictionLog(
        KafkaSettings(), source="/s", buffer=buffer, batch=4, linger_ms=0, producer_factory=lambda: producer
    )


class RefusingStart(FakeProducer):
    """A producer whose start fails (the broker not up yet), as aiokafka's does: a client left to stop."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = False

    async def start(self) -> None:
        raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 19092)]")

    async def stop(self) -> None:
        self.stopped = True


async def test_a_producer_whose_start_failed_is_stopped_before_the_next_try() -> None:
    # Each try while the broker was away left its producer unstopped (aiokafka then reported an "Unclosed
    # AIOKafkaProducer" error for each), one more every few seconds for as long as the broker was away.
    refused, producer = RefusingStart(), FakeProducer()
    producers = iter([refused, producer])
    log = KafkaPredictionLog(
        KafkaSettings(), source="/s", buffer=10, batch=4, linger_ms=0, producer_factory=producers.__next__
    )
    task = asyncio.create_task(log.run())
    log.offer(item())

    async def sent() -> bool:
        return bool(producer.sent)

    await eventually(sent, deadline_s=10, interval_s=0.05)
    await log.stop()
    await asyncio.wait_for(task, timeout=5)
    assert refused.stopped


async def test_full_buffer_drops_the_newest_and_counts_it() -> None:
    log = log_with(FakeProducer(), buffer=2)
    before = DROPPED.labels("buffer-full")._value.get()
    assert [log.offer(item()) for _ in range(3)] == [True, True, False]
    assert DROPPED.labels("buffer-full")._value.get() == before + 1


async def test_sender_publishes_everything_then_flushes_on_stop() -> None:
    producer = FakeProducer()
    log = log_with(producer)
    sent_before = SENT._value.get()
    task = asyncio.create_task(log.run())
    for _ in range(7):
        log.offer(item())
    await log.stop()
    await asyncio.wait_for(task, timeout=5)
    assert len(producer.sent) == 7 and SENT._value.get() == sent_before + 7


async def test_unacknowledged_sends_are_counted_not_silent() -> None:
    log = log_with(FakeProducer(fail=True))
    before = DROPPED.labels("send-failed")._value.get()
    task = asyncio.create_task(log.run())
    log.offer(item())
    log.offer(item())
    await log.stop()
    await asyncio.wait_for(task, timeout=5)
    assert DROPPED.labels("send-failed")._value.get() == before + 2


async def test_each_model_goes_to_the_partition_the_default_partitioner_picks_as_partitions_change() -> None:
    producer = FakeProducer()
    log = log_with(producer, buffer=100)
    task = asyncio.create_task(log.run())
    models = [f"model-{i}" for i in range(12)]
    for partitions in ({0, 1, 2}, set(range(7))):
        producer.partitions, producer.sent_to = partitions, []
        for model in models * 2:
            log.offer(dataclasses.replace(item(), model=model))

        async def all_sent() -> bool:
            return sum(n for _, n in producer.sent_to) >= 2 * len(models)

        await eventually(all_sent, deadline_s=5, interval_s=0.01)
        ordered = sorted(partitions)
        expected = Counter(DefaultPartitioner()(model.encode(), ordered, ordered) for model in models * 2)
        sent = Counter[int]()
        for partition, n in producer.sent_to:
            sent[partition] += n
        assert sent == expected and len(expected) > 1
    await log.stop()
    await asyncio.wait_for(task, timeout=5)


def dict_per_row(log_item: LogItem) -> bytes:
    """The event as one dict per row encoded by orjson: what the column-wise encoder must write byte for
    byte."""
    scores = log_item.scores
    inputs = log_item.raw_rows if log_item.raw_rows is not None else rows_of(log_item.columns)
    rows = []
    for i, pid in enumerate(log_item.prediction_ids):
        output: dict[str, Any] = {"prediction": scores.labels[i]}
        if scores.probabilities is not None and scores.classes is not None:
            output["probabilities"] = dict(
                zip([str(c) for c in scores.classes], scores.probabilities[i], strict=True)
            )
        rows.append(
            {
                "prediction_id": pid,
                "entity_key": log_item.entity_keys[i],
                "inputs": inputs[i],
                "output": output,
            }
        )
    head = {
        "model": log_item.model,
        "model_version": log_item.version,
        "variant": log_item.variant.value,
        "rollout_id": log_item.rollout_id,
        "request_id": log_item.request_id,
        "predicted_at": log_item.predicted_at.isoformat(),
        "latency_ms": log_item.latency_ms,
        "rows": rows,
    }
    return orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)


@pytest.mark.parametrize("columnwise_from", [1, 10**9])
@pytest.mark.parametrize("case", list(VARIED))
def test_rows_built_a_column_at_a_time_or_one_dict_at_a_time_are_the_same_bytes(
    case: str, columnwise_from: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prediction_log, "COLUMNWISE_FROM_ROWS", columnwise_from)
    log_item = VARIED[case]()
    [(_, _, value, _)] = encode(log_item, source="/s", max_bytes=1_000_000)
    assert value == dict_per_row(log_item)


def test_the_help_of_the_dropped_counter_names_every_reason_it_is_counted_under() -> None:
    adapters = Path(prediction_log.__file__).parent
    reasons = {
        reason
        for source in (adapters / "prediction_log.py", adapters / "log_producer.py")
        for reason in re.findall(r'DROPPED\.labels\("([a-z-]+)"\)', source.read_text())
    }
    assert reasons >= {
        "buffer-full",
        "send-failed",
        "unencodable",
        "oversized",
        "producer-down",
        "producer-exited",
        "producer-stalled",
    }
    help_text = prediction_log.DROPPED._documentation
    assert [reason for reason in sorted(reasons) if reason not in help_text] == []
