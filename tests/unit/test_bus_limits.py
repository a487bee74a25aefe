"""The event size limits, at both ends: a consumer refuses a record whose value and headers together are
over the limit, or whose CloudEvents attributes are too long; a producer refuses to make one, so an
oversized event never reaches the outbox and the input that made it is dead-lettered with the reason."""

from __future__ import annotations

from typing import Any

import pytest

from contracts.envelope import MAX_ATTRIBUTE_CHARS, CloudEvent, new_event
from libs.bus import InMemoryBus, PermanentError, Subscription, Transaction, bytes_over_limit
from libs.bus.core import EventTooLarge, encode_outgoing
from libs.bus.kafka import KafkaPublisher
from libs.bus.postgres import PgTransaction
from libs.errors import PayloadTooLarge
from libs.settings import KafkaSettings
from tests.unit.bus_fakes import RecordingConn
from tests.unit.test_bus import REGISTRY, ThingCounted, ThingHappened, counting_subscription, thing


@pytest.fixture
def bus() -> InMemoryBus:
    return InMemoryBus(REGISTRY, max_event_bytes=10_000)


# --- what a consumer refuses ---------------------------------------------------------------------------


async def test_a_huge_correlation_id_is_dead_lettered_as_oversized_and_never_propagates() -> None:
    bus = InMemoryBus(REGISTRY)
    seen: list[int] = []
    bus.subscribe(counting_subscription(seen))
    key, value, headers = thing(1).to_kafka()
    hostile = [(n, b"c" * 900_000 if n == "ce_correlationid" else v) for n, v in headers]
    bus.append_raw("test.things", key, value, hostile)
    await bus.publish(thing(2))

    await bus.drain()

    [dead] = bus.dead_letters
    assert dead.reason == "oversized"
    assert "ce_correlationid" in dead.error
    assert seen == [2]
    # Nothing the handler emitted carries the hostile header on.
    assert all(len(e.correlationid) <= MAX_ATTRIBUTE_CHARS for e in bus.events("test.counts"))


async def test_headers_count_toward_the_size_limit(bus: InMemoryBus) -> None:
    seen: list[int] = []
    bus.subscribe(counting_subscription(seen, max_event_bytes=10_000))
    key, value, headers = thing(1).to_kafka()
    bus.append_raw("test.things", key, value, [*headers, ("x-padding", b"p" * 10_000)])

    await bus.drain()

    [dead] = bus.dead_letters
    assert dead.reason == "oversized"
    assert "value and headers" in dead.error
    assert seen == []


# --- what a producer refuses ---------------------------------------------------------------------------


def emitting(size: int) -> Subscription:
    """A handler that emits an event whose actor is ``size`` characters long."""

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        await tx.publish(
            new_event(ThingCounted(n=event.data.n), source="/counter", cause=event, actor="a" * size)
        )

    return Subscription(
        consumer="counter",
        topics=["test.things"],
        handlers={ThingHappened: on_thing},
        retry_backoff_s=0,
    )


async def test_a_handler_that_emits_an_event_too_large_for_its_consumers_has_its_input_dead_lettered(
    bus: InMemoryBus,
) -> None:
    bus.subscribe(emitting(size=20_000))
    await bus.publish(thing(1))

    await bus.drain()

    [dead] = bus.dead_letters
    assert dead.reason == "output-oversized"
    assert "ThingCounted" in dead.error and "10000" in dead.error
    assert bus.events("test.counts") == []


async def test_an_event_with_an_over_long_attribute_is_refused_where_it_is_made(bus: InMemoryBus) -> None:
    bus.subscribe(emitting(size=MAX_ATTRIBUTE_CHARS + 1))
    await bus.publish(thing(1))

    await bus.drain()

    [dead] = bus.dead_letters
    assert dead.reason == "output-oversized"
    assert "ce_actor" in dead.error


async def test_an_event_within_the_limits_is_published() -> None:
    event = new_event(ThingCounted(n=1), source="/counter", actor="a" * MAX_ATTRIBUTE_CHARS)
    _, value, _ = encode_outgoing(event, max_bytes=10_000)
    assert REGISTRY.decode(*event.to_kafka()[1:], max_bytes=10_000).actor == event.actor
    assert value == event.payload_bytes()


def test_bytes_over_limit_measures_what_the_refusal_counts() -> None:
    event = new_event(ThingCounted(n=1), source="/counter")
    _, value, headers = event.to_kafka()
    size = len(value) + sum(len(name) + len(raw) for name, raw in headers)
    assert bytes_over_limit(event, max_bytes=size) == 0
    assert bytes_over_limit(event, max_bytes=size - 7) == 7
    encode_outgoing(event, max_bytes=size)
    with pytest.raises(EventTooLarge):
        encode_outgoing(event, max_bytes=size - 1)


def test_event_too_large_is_permanent_for_a_handler_and_413_for_a_request() -> None:
    assert issubclass(EventTooLarge, PermanentError)
    assert issubclass(EventTooLarge, PayloadTooLarge)
    assert EventTooLarge("too big").status == 413


async def test_the_in_memory_bus_refuses_to_publish_an_oversized_event(bus: InMemoryBus) -> None:
    with pytest.raises(EventTooLarge):
        await bus.publish(thing(1, actor="a" * 20_000))
    assert bus.log["test.things"] == []


async def test_the_outbox_refuses_an_oversized_event_and_writes_nothing() -> None:
    conn = RecordingConn()
    tx = PgTransaction(conn, "registry", max_event_bytes=10_000)

    with pytest.raises(EventTooLarge, match="10000"):
        await tx.publish(thing(1, actor="a" * 20_000))
    await tx.flush()
    assert conn.statements == []

    await tx.publish(thing(2))
    await tx.flush()
    assert any("INSERT INTO outbox" in sql for sql in conn.statements)


async def test_a_direct_kafka_publish_refuses_an_oversized_event() -> None:
    publisher = KafkaPublisher(KafkaSettings(max_event_bytes=10_000))  # never started: nothing may be sent

    with pytest.raises(EventTooLarge):
        await publisher.publish(thing(1, actor="a" * 20_000))
