"""Subscriptions with a fast payload reader keep every rule of the bus: what full validation refuses is
dead-lettered with its reason, a redelivery is not applied twice, a reused id is caught."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from contracts.envelope import CloudEvent, EventTypeRegistry, new_event
from contracts.predictions import PredictionsLogged, read_predictions_logged
from libs.bus import Delivery, InMemoryBus, Subscription, Transaction

REGISTRY = EventTypeRegistry([PredictionsLogged])
TOPIC = PredictionsLogged.topic


def logged(n_rows: int = 2, **overrides: Any) -> CloudEvent[PredictionsLogged]:
    body: dict[str, Any] = {
        "model": "churn",
        "model_version": 1,
        "variant": "stable",
        "request_id": "req-1",
        "predicted_at": "2026-11-28T07:00:00Z",
        "latency_ms": 1.0,
        "rows": [
            {
                "prediction_id": f"p-{i}",
                "inputs": {"tenure": i, "plan": "basic", "charges": 0.5 * i, "gap": None},
                "output": {"prediction": i % 2, "probabilities": {"0": 0.4, "1": 0.6}},
            }
            for i in range(n_rows)
        ],
    }
    body.update(overrides)
    return new_event(PredictionsLogged.model_validate(body), source="/serving")


class Recorder:
    """A batch handler that keeps what it was given, and counts the reader's calls."""

    def __init__(self) -> None:
        self.payloads: list[PredictionsLogged] = []
        self.reads = 0

    def reader(self, value: bytes) -> PredictionsLogged | None:
        self.reads += 1
        return read_predictions_logged(value)

    async def handle(self, deliveries: Any, tx: Transaction) -> None:
        self.payloads.extend(d.event.data for d in deliveries)

    def subscription(self, **kw: Any) -> Subscription:
        return Subscription(
            consumer="fast",
            topics=[TOPIC],
            batch_handler=self.handle,
            readers={PredictionsLogged: self.reader},
            max_retries=0,
            retry_backoff_s=0,
            **kw,
        )


@pytest.fixture
def bus() -> InMemoryBus:
    return InMemoryBus(REGISTRY)


async def test_the_handler_gets_from_the_reader_what_full_validation_gives(bus: InMemoryBus) -> None:
    rec = Recorder()
    bus.subscribe(rec.subscription())
    event = logged(3)
    await bus.publish(event)
    await bus.drain()
    assert rec.reads == 1
    [payload] = rec.payloads
    _, value, _ = event.to_kafka()
    assert read_predictions_logged(value) is not None  # the fast path, not the fallback
    assert payload == PredictionsLogged.model_validate_json(value)
    assert payload.model_dump_json() == event.data.model_dump_json()


def _raw(bus: InMemoryBus, body: Any, *, like: CloudEvent[Any] | None = None) -> None:
    _, _, headers = (like or logged()).to_kafka()
    value = body if isinstance(body, bytes) else orjson.dumps(body)
    bus.append_raw(TOPIC, b"churn", value, headers)


@pytest.mark.parametrize(
    ("change", "reason", "named"),
    [
        (lambda b: b["rows"][0]["inputs"].update(tenure=[1, 2]), "schema-invalid", "rows.0.inputs.tenure"),
        (lambda b: b["rows"][1].pop("prediction_id"), "schema-invalid", "rows.1.prediction_id"),
        (lambda b: b["rows"][0]["output"].update(prediction=None), "schema-invalid", "rows.0.output"),
        (lambda b: b.update(rows=[]), "schema-invalid", "rows"),
        (lambda b: b.update(model_version=0), "schema-invalid", "model_version"),
        (lambda b: b.update(surprise=1), "schema-invalid", "surprise"),
        (lambda b: b["rows"][1].update(prediction_id="p-1\x00"), "schema-invalid", "rows.1.prediction_id"),
        (lambda b: b["rows"][0].update(entity_key="c-\x00"), "schema-invalid", "rows.0.entity_key"),
        (lambda b: b.update(rollout_id="r-1\x00"), "schema-invalid", "rollout_id"),
    ],
)
async def test_a_malformed_record_on_the_fast_path_is_dead_lettered_with_its_reason(
    bus: InMemoryBus, change: Any, reason: str, named: str
) -> None:
    rec = Recorder()
    bus.subscribe(rec.subscription())
    body = orjson.loads(logged().to_kafka()[1])
    change(body)
    _raw(bus, body)
    good = logged()
    await bus.publish(good)
    await bus.drain()
    [dead] = bus.dead_letters
    assert dead.reason == reason
    assert named in dead.error
    assert dead.consumer == "fast"
    assert [p.request_id for p in rec.payloads] == [good.data.request_id]


async def test_a_value_that_is_not_json_on_the_fast_path_is_dead_lettered_as_such(bus: InMemoryBus) -> None:
    rec = Recorder()
    bus.subscribe(rec.subscription())
    _raw(bus, b'{"model": "churn", "rows": [')
    await bus.drain()
    assert [d.reason for d in bus.dead_letters] == ["not-json"]
    assert rec.payloads == []


async def test_a_redelivered_record_on_the_fast_path_is_not_applied_twice(bus: InMemoryBus) -> None:
    rec = Recorder()
    bus.subscribe(rec.subscription())
    event = logged()
    await bus.publish(event)
    await bus.drain()
    await bus.publish(event)  # the same bytes again, as Kafka redelivers after a crash
    await bus.drain()
    assert rec.reads == 2
    assert len(rec.payloads) == 1
    assert bus.dead_letters == []


async def test_a_reused_id_with_other_content_on_the_fast_path_is_dead_lettered(bus: InMemoryBus) -> None:
    rec = Recorder()
    bus.subscribe(rec.subscription())
    first = logged()
    await bus.publish(first)
    await bus.drain()
    other = orjson.loads(first.to_kafka()[1])
    other["request_id"] = "req-2"
    _raw(bus, other, like=first)
    await bus.drain()
    assert len(rec.payloads) == 1
    assert [d.reason for d in bus.dead_letters] == ["reused-event-id"]


async def test_a_reader_that_fails_leaves_the_record_to_full_validation(bus: InMemoryBus) -> None:
    seen: list[Delivery] = []

    def broken(value: bytes) -> PredictionsLogged | None:
        raise RuntimeError("a bug in the reader")

    async def handle(deliveries: Any, tx: Transaction) -> None:
        seen.extend(deliveries)

    bus.subscribe(
        Subscription(consumer="c", topics=[TOPIC], batch_handler=handle, readers={PredictionsLogged: broken})
    )
    event = logged()
    await bus.publish(event)
    await bus.drain()
    [delivery] = seen
    assert delivery.event is not None
    assert delivery.event.data == event.data
    assert bus.dead_letters == []


async def test_a_raw_subscription_with_a_reader_gets_malformed_records_with_their_error(
    bus: InMemoryBus,
) -> None:
    seen: list[Delivery] = []

    async def handle(deliveries: Any, tx: Transaction) -> None:
        seen.extend(deliveries)

    bus.subscribe(
        Subscription(
            consumer="trail",
            topics=[TOPIC],
            batch_handler=handle,
            raw=True,
            readers={PredictionsLogged: read_predictions_logged},
        )
    )
    body = orjson.loads(logged().to_kafka()[1])
    body["rows"][0]["inputs"]["tenure"] = {"nested": 1}
    _raw(bus, body)
    await bus.publish(logged())
    await bus.drain()
    bad, good = seen
    assert bad.event is None and bad.error is not None and bad.error.reason == "schema-invalid"
    assert good.event is not None and good.error is None
    assert bus.dead_letters == []
