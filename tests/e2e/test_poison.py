"""Poison on every topic the platform consumes, against every service as its own process: each consumer
of the topic dead-letters the record with its reason, no service stops being ready, and the next cascade
goes through.

The bus's handling of each kind of poison is tested on its own in tests/integration/test_bus_kafka.py;
this is the same promise kept by the six services as they ship, with their own subscriptions.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from contracts.envelope import EventPayload, new_event
from contracts.examples import EXAMPLES
from contracts.models import ModelVersionRegistered
from contracts.topics import AUDIT, DEAD_LETTER, TOPICS
from deploy.loop import EventTail, LoopClient, poll
from deploy.sandbox import Sandbox
from libs.bus.kafka import KafkaPublisher
from libs.settings import KafkaSettings
from tests.e2e.steps import serve_version_1

Sent = tuple[str, str]
"""(topic, event id) of one poison record."""


def topic_of(event: type[EventPayload]) -> tuple[str, set[str]]:
    """The topic that carries ``event`` and the services (audit aside) that react to it."""
    [(topic, consumers)] = [
        (spec.name, set(route.consumers) - {AUDIT})
        for spec in TOPICS.values()
        for route in spec.routes
        if route.event is event
    ]
    return topic, consumers


async def test_every_consumer_dead_letters_poison_with_its_reason_and_goes_on(
    e2e: Sandbox, client: LoopClient, tail: EventTail
) -> None:
    kafka = KafkaSettings(bootstrap=e2e.bootstrap, topic_prefix=e2e.prefix)
    records: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = []
    expected: dict[Sent, tuple[set[str], str]] = {}

    def poison(topic: str, payload: EventPayload, value: bytes, consumers: set[str], reason: str) -> None:
        """A record under the headers of a real event of ``payload``'s type, with ``value`` as its body."""
        key, _, real = new_event(payload, source="/e2e/poison").to_kafka()
        event_id = f"poison-{uuid.uuid4().hex}"
        headers: list[tuple[str, bytes | None]] = [(k, v) for k, v in real if k != "ce_id"]
        records.append((topic, key, value, [*headers, ("ce_id", event_id.encode())]))
        expected[(topic, event_id)] = (consumers, reason)

    for spec in TOPICS.values():
        consumers = set(spec.consumers) - {AUDIT}
        if spec.name != DEAD_LETTER and spec.routes and consumers:
            # Not JSON: every consumer of the topic reads it, whatever types it handles.
            poison(spec.name, EXAMPLES[spec.routes[0].event], b"\x00\x01 not json", consumers, "not-json")
    # Well-formed JSON that breaks the contract: a version past what any service can store.
    topic, consumers = topic_of(ModelVersionRegistered)
    example = EXAMPLES[ModelVersionRegistered]
    too_big = example.model_dump(mode="json") | {"model_version": 2**40}
    poison(topic, example, orjson.dumps(too_big), consumers, "schema-invalid")

    publisher = KafkaPublisher(kafka)
    await publisher.start()
    try:
        await publisher.send_many(records)
    finally:
        await publisher.stop()

    got: dict[Sent, dict[str, str]] = defaultdict(dict)  # consumer's service -> reason
    reader = AIOKafkaConsumer(
        kafka.physical(DEAD_LETTER), bootstrap_servers=e2e.bootstrap, auto_offset_reset="earliest"
    )
    await reader.start()

    async def all_dead_lettered() -> bool | None:
        for batch in (await reader.getmany(timeout_ms=200)).values():
            for record in batch:
                h: dict[str, Any] = dict(record.headers)
                sent = (kafka.logical(h["dlq_origin_topic"].decode()), h["ce_id"].decode())
                if sent in expected:
                    got[sent][h["dlq_consumer"].decode().split("-")[0]] = h["dlq_reason"].decode()
        return all(want <= set(got[sent]) for sent, (want, _) in expected.items()) or None

    try:
        await poll(all_dead_lettered, deadline_s=90, what="every consumer's dead letter")
    finally:
        await reader.stop()
    for sent, (_, reason) in expected.items():
        assert set(got[sent].values()) == {reason}, (sent, got[sent])
    health = e2e.platform.health()
    assert set(health.values()) == {"ready"}, health
    # And they go on: a new model's first cascade runs through every consumer's topics after the poison.
    await serve_version_1(client, tail)
