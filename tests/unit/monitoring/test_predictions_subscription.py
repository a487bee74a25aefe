"""Monitoring's predictions subscription reads payloads as columns (contracts.predictions.
read_prediction_columns) and keeps every rule of the bus: a payload the reader cannot prove valid is validated
fully (and handed over as a PredictionsLogged), a malformed one is dead-lettered with the same reason as
without the reader, a redelivery is not applied twice."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from contracts.envelope import CloudEvent, EventTypeRegistry, new_event
from contracts.predictions import PredictionColumns, PredictionsLogged
from libs.bus import InMemoryBus, Subscription, Transaction
from services.monitoring.bootstrap import subscriptions
from services.monitoring.settings import MonitoringSettings

REGISTRY = EventTypeRegistry([PredictionsLogged])
TOPIC = PredictionsLogged.topic


def logged(n_rows: int = 3, request_id: str = "req-1") -> CloudEvent[PredictionsLogged]:
    return new_event(
        PredictionsLogged.model_validate(
            {
                "model": "churn",
                "model_version": 1,
                "variant": "canary",
                "rollout_id": "r-1",
                "request_id": request_id,
                "predicted_at": "2026-11-28T07:00:00Z",
                "latency_ms": 1.0,
                "rows": [
                    {
                        "prediction_id": f"{request_id}-{i}",
                        "inputs": {"tenure": i, "plan": "basic", "charges": 0.5 * i, "gap": None},
                        "output": {"prediction": i % 2, "probabilities": {"0": 0.4, "1": 0.6}},
                    }
                    for i in range(n_rows)
                ],
            }
        ),
        source="/serving",
    )


class Recorder:
    def __init__(self) -> None:
        self.payloads: list[Any] = []

    async def handle(self, deliveries: Any, tx: Transaction) -> None:
        self.payloads.extend(d.event.data for d in deliveries)


def predictions_subscription(handler: Any, *, with_reader: bool = True) -> Subscription:
    """The service's own predictions subscription (reader, types, consumer), its handler replaced."""
    [sub] = [s for s in subscriptions(MonitoringSettings(), object()) if s.consumer.endswith("-predictions")]  # type: ignore[arg-type]
    sub = dataclasses.replace(sub, batch_handler=handler, max_retries=0, retry_backoff_s=0)
    return sub if with_reader else dataclasses.replace(sub, readers={})


def _raw(bus: InMemoryBus, body: dict[str, Any], like: CloudEvent[Any]) -> None:
    _, _, headers = like.to_kafka()
    bus.append_raw(TOPIC, b"churn", orjson.dumps(body), headers)


async def test_a_valid_payload_reaches_the_handler_as_the_columns_of_what_full_validation_gives() -> None:
    bus = InMemoryBus(REGISTRY)
    rec = Recorder()
    bus.subscribe(predictions_subscription(rec.handle))
    event = logged()
    await bus.publish(event)
    await bus.drain()
    [payload] = rec.payloads
    assert type(payload) is PredictionColumns
    assert payload == PredictionColumns.of(PredictionsLogged.model_validate_json(event.to_kafka()[1]))
    assert payload.inputs["tenure"] == [0, 1, 2] and payload.prediction_ids == [
        "req-1-0",
        "req-1-1",
        "req-1-2",
    ]


async def test_a_payload_full_validation_coerces_reaches_the_handler_as_full_validation_reads_it() -> None:
    bus = InMemoryBus(REGISTRY)
    rec = Recorder()
    bus.subscribe(predictions_subscription(rec.handle))
    event = logged()
    body = orjson.loads(event.to_kafka()[1])
    body["rows"][1]["output"]["probabilities"] = {"0": 0, "1": 1}  # integers pydantic makes floats
    _raw(bus, body, event)
    await bus.drain()
    [payload] = rec.payloads
    assert type(payload) is PredictionsLogged
    assert payload.rows[1].output.probabilities == {"0": 0.0, "1": 1.0}
    assert bus.dead_letters == []


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b["rows"][2]["inputs"].update(tenure=[1, 2]),
        lambda b: b["rows"][1].pop("prediction_id"),
        lambda b: b["rows"][2]["output"].update(prediction=None),
        lambda b: b["rows"][0]["output"].update(probabilities={"1": "x"}),
        lambda b: b["rows"][1].update(surprise=1),
        lambda b: b.update(rows=[]),
        lambda b: b.update(model_version=0),
        lambda b: b["rows"][1].update(prediction_id="p-1\x00"),
        lambda b: b.update(rollout_id="r-1\x00"),
    ],
)
async def test_a_malformed_payload_is_dead_lettered_with_the_reason_it_has_without_the_reader(
    change: Any,
) -> None:
    dead = []
    for with_reader in (True, False):
        bus = InMemoryBus(REGISTRY)
        rec = Recorder()
        bus.subscribe(predictions_subscription(rec.handle, with_reader=with_reader))
        bad = logged(request_id="req-bad")
        body = orjson.loads(bad.to_kafka()[1])
        change(body)
        _raw(bus, body, bad)
        good = logged(request_id="req-good")
        await bus.publish(good)
        await bus.drain()
        [letter] = bus.dead_letters
        dead.append((letter.reason, letter.error))
        assert [p.request_id for p in rec.payloads] == ["req-good"]
    assert dead[0] == dead[1]
    assert dead[0][0] == "schema-invalid"


async def test_a_redelivered_payload_is_not_applied_twice() -> None:
    bus = InMemoryBus(REGISTRY)
    rec = Recorder()
    bus.subscribe(predictions_subscription(rec.handle))
    event = logged()
    await bus.publish(event)
    await bus.drain()
    await bus.publish(event)  # the same bytes again, as Kafka redelivers after a crash
    await bus.drain()
    assert len(rec.payloads) == 1
    assert bus.dead_letters == []
