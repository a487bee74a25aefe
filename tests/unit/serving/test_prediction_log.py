"""The prediction log: its bytes are the PredictionsLogged contract, it splits big requests, and it never
blocks or loses silently."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from contracts.predictions import PredictionsLogged, Variant
from contracts.registry import EVENT_TYPES
from libs.settings import KafkaSettings
from services.serving.adapters.prediction_log import DROPPED, SENT, KafkaPredictionLog, encode
from services.serving.domain import columns_from_records
from services.serving.routing import Scores
from services.serving.scoring import LogItem
from tests.unit.serving.fakes import churn_signature, record


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


def decode(wire: tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]) -> Any:
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
    assert len(wires) > 1 and all(len(w[2]) <= 3_000 for w in wires)
    ids = [r.prediction_id for w in wires for r in decode(w).data.rows]
    assert ids == [f"churn:7:abc-{i}" for i in range(40)]


class FakeProducer:
    """Records sends; ``fail`` makes every acknowledgement fail."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[bytes] = []
        self.fail = fail

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(self, topic: str, *, value: bytes, key: bytes | None, headers: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.fail:
            future.set_exception(ConnectionError("broker away"))
        else:
            self.sent.append(value)
            future.set_result(None)
        return future


def log_with(producer: FakeProducer, buffer: int = 10) -> KafkaPredictionLog:
    return KafkaPredictionLog(
        KafkaSettings(), source="/s", buffer=buffer, batch=4, linger_ms=0, producer_factory=lambda: producer
    )


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
