"""The bus's rules (dedupe, outbox, retries, dead letters), shown on the in-memory bus."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field

from contracts.envelope import CloudEvent, EventPayload, EventTypeRegistry, new_event
from libs.bus import InMemoryBus, PermanentError, Subscription, Transaction
from tests.unit import metrics_lint


class ThingHappened(EventPayload):
    """A test fact."""

    event_name = "ThingHappened"
    topic = "test.things"
    n: int = Field(description="A number.")


class ThingCounted(EventPayload):
    """What the test handler emits."""

    event_name = "ThingCounted"
    topic = "test.counts"
    n: int = Field(description="The number seen.")


class ThingUndone(EventPayload):
    """A test fact of another type whose payload has the shape of :class:`ThingHappened`'s."""

    event_name = "ThingUndone"
    topic = "test.things"
    n: int = Field(description="A number.")


REGISTRY = EventTypeRegistry([ThingHappened, ThingCounted, ThingUndone])


def thing(n: int, **kw: Any) -> CloudEvent[ThingHappened]:
    return new_event(ThingHappened(n=n), source="/test", subject="model-a", **kw)


@pytest.fixture
def bus() -> InMemoryBus:
    return InMemoryBus(REGISTRY)


def counting_subscription(seen: list[int], **kw: Any) -> Subscription:
    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        seen.append(event.data.n)
        await tx.publish(new_event(ThingCounted(n=event.data.n), source="/counter", cause=event))

    return Subscription(consumer="counter", topics=["test.things"], handlers={ThingHappened: on_thing}, **kw)


async def test_handler_effect_and_emitted_event_follow_the_cause(bus: InMemoryBus) -> None:
    seen: list[int] = []
    bus.subscribe(counting_subscription(seen))
    cause = thing(7, actor="user:alice")
    await bus.publish(cause)
    await bus.drain()
    assert seen == [7]
    [emitted] = bus.events("test.counts")
    assert emitted.correlationid == cause.id
    assert emitted.causationid == cause.id
    assert emitted.actor == "user:alice"
    assert emitted.subject == "model-a"


async def test_duplicate_event_changes_nothing(bus: InMemoryBus) -> None:
    seen: list[int] = []
    bus.subscribe(counting_subscription(seen))
    event = thing(1)
    await bus.publish(event)
    await bus.publish(event)
    await bus.drain()
    assert seen == [1]
    assert len(bus.events("test.counts")) == 1
    assert bus.dead_letters == []


async def test_reused_id_with_other_payload_is_dead_lettered_not_skipped(bus: InMemoryBus) -> None:
    seen: list[int] = []
    bus.subscribe(counting_subscription(seen))
    first = thing(1)
    await bus.publish(first)
    await bus.publish(thing(2, event_id=first.id))
    await bus.drain()
    assert seen == [1]
    [dead] = bus.dead_letters
    assert dead.reason == "reused-event-id"


async def test_a_reused_id_on_an_event_of_another_type_with_the_same_bytes_is_dead_lettered_not_skipped(
    bus: InMemoryBus,
) -> None:
    """The type is part of what an event says: a payload with the same bytes under another ``ce_type`` (a
    RollbackRequested that leaves ``to_version`` out reads exactly as the PromoteRequested before it) is
    another event, not a redelivery; handled once under that id, it is refused as a reused id."""
    seen: list[tuple[str, int]] = []

    async def on_any(event: CloudEvent[Any], tx: Transaction) -> None:
        seen.append((type(event.data).__name__, event.data.n))

    bus.subscribe(
        Subscription(
            consumer="both", topics=["test.things"], handlers={ThingHappened: on_any, ThingUndone: on_any}
        )
    )
    first = thing(1)
    await bus.publish(first)
    undone = new_event(ThingUndone(n=1), source=first.source, event_id=first.id)
    assert undone.to_kafka()[1] == first.to_kafka()[1]
    await bus.publish(undone)
    await bus.publish(first)  # a redelivery of the first is still a no-op
    await bus.drain()
    assert seen == [("ThingHappened", 1)]
    [dead] = bus.dead_letters
    assert dead.reason == "reused-event-id"
    assert dict(dead.record.headers)["ce_type"] == ThingUndone.event_type().encode()


async def test_two_sources_may_use_one_event_id(bus: InMemoryBus) -> None:
    """CloudEvents identify an event by source and id: another publisher's "1" is another event, handled
    whether its payload is the same or not; a redelivery of either is still a no-op."""
    seen: list[int] = []
    bus.subscribe(counting_subscription(seen))
    events = [
        new_event(ThingHappened(n=n), source=source, event_id="1")
        for source, n in [("/team-a", 1), ("/team-b", 1), ("/team-c", 2)]
    ]
    for event in [*events, *events]:
        await bus.publish(event)
    await bus.drain()
    assert seen == [1, 1, 2]
    assert bus.dead_letters == []
    await bus.publish(new_event(ThingHappened(n=3), source="/team-a", event_id="1"))
    await bus.drain()
    assert [d.reason for d in bus.dead_letters] == ["reused-event-id"]
    assert "source /team-a" in bus.dead_letters[0].error


async def test_an_event_with_a_binary_header_of_its_own_is_handled(bus: InMemoryBus) -> None:
    """Only the CloudEvents headers must be text: a non-UTF-8 trace context (a key that is not UTF-8 too)
    beside them leaves the event as good as it was; a non-UTF-8 attribute is dead-lettered by name."""
    seen: list[int] = []
    bus.subscribe(counting_subscription(seen))
    key, value, headers = thing(1).to_kafka()
    bus.append_raw("test.things", b"\xff\xfe", value, [*headers, ("trace-bin", b"\x01\xff")])
    key, value, headers = thing(2).to_kafka()
    bus.append_raw("test.things", key, value, [*headers, ("ce_traceparent", b"\x01\xff")])
    await bus.drain()
    assert seen == [1]
    [dead] = bus.dead_letters
    assert dead.reason == "missing-attribute"
    assert "'ce_traceparent' is not UTF-8" in dead.error


@pytest.mark.parametrize("empty", ["ce_id", "ce_source"])
async def test_an_event_without_an_id_or_source_is_dead_lettered(bus: InMemoryBus, empty: str) -> None:
    seen: list[int] = []
    bus.subscribe(counting_subscription(seen))
    key, value, headers = thing(1).to_kafka()
    bus.append_raw("test.things", key, value, [(k, b"" if k == empty else v) for k, v in headers])
    await bus.drain()
    assert seen == []
    [dead] = bus.dead_letters
    assert dead.reason == "missing-attribute"
    assert f"{empty!r} is empty" in dead.error


async def test_failing_handler_is_retried_then_dead_lettered_and_the_next_event_proceeds(
    bus: InMemoryBus,
) -> None:
    attempts: list[int] = []
    seen: list[int] = []

    async def flaky(event: CloudEvent[Any], tx: Transaction) -> None:
        if event.data.n == 13:
            attempts.append(13)
            await tx.publish(new_event(ThingCounted(n=-1), source="/x", cause=event))
            raise RuntimeError("unlucky")
        seen.append(event.data.n)

    bus.subscribe(
        Subscription(
            consumer="flaky",
            topics=["test.things"],
            handlers={ThingHappened: flaky},
            max_retries=2,
            retry_backoff_s=0.0,
        )
    )
    await bus.publish(thing(13))
    await bus.publish(thing(14))
    await bus.drain()
    # Once in the poll's group commit, then alone: the first try and two retries.
    assert len(attempts) == 4
    assert seen == [14]
    [dead] = bus.dead_letters
    assert dead.reason == "handler-failed"
    assert "unlucky" in dead.error
    # Events published by a failed attempt never leave: the transaction rolled back.
    assert bus.events("test.counts") == []


async def test_permanent_error_skips_retries(bus: InMemoryBus) -> None:
    calls: list[int] = []

    async def refuse(event: CloudEvent[Any], tx: Transaction) -> None:
        calls.append(1)
        raise PermanentError("model 'x' is unknown")

    bus.subscribe(Subscription(consumer="c", topics=["test.things"], handlers={ThingHappened: refuse}))
    await bus.publish(thing(1))
    await bus.drain()
    assert calls == [1]
    assert bus.dead_letters[0].reason == "rejected"


async def test_what_waits_for_the_outcome_happens_once_though_a_failed_poll_is_replayed(
    bus: InMemoryBus,
) -> None:
    """A poll whose group commit fails is replayed one event per transaction, so a handler runs twice for
    the events before the failing one: its after-commit effect and a refusal's dead-letter effect once."""
    runs: list[int] = []
    committed: list[int] = []
    dead_lettered: list[int] = []

    async def handle(event: CloudEvent[Any], tx: Transaction) -> None:
        n = event.data.n
        runs.append(n)
        if n == 2:
            exc = PermanentError(f"{n} is refused")
            exc.on_dead_lettered = lambda: dead_lettered.append(n)
            raise exc
        tx.after_commit(lambda: committed.append(n))

    bus.subscribe(Subscription(consumer="c", topics=["test.things"], handlers={ThingHappened: handle}))
    for n in (1, 2, 3):
        await bus.publish(thing(n))
    await bus.drain()
    assert runs == [1, 2, 1, 2, 3]  # the group, then one by one
    assert committed == [1, 3] and dead_lettered == [2]


@pytest.mark.parametrize(
    ("value", "headers", "reason"),
    [
        (b"not json", None, "not-json"),
        (b'{"n": 1}', {"ce_type": b"io.driftloop.NoSuchThing.v1"}, "unknown-type"),
        (b'{"n": 1}', {"ce_type": b"io.driftloop.ThingHappened.v9"}, "unknown-schema-version"),
        (b'{"n": "many"}', None, "schema-invalid"),
        (b'{"n": 1, "extra": true}', None, "schema-invalid"),
        (b'{"n": 1}', {"ce_type": None}, "missing-attribute"),
        (b'{"n": 1, "pad": "' + b"x" * 2_000_000 + b'"}', None, "oversized"),
    ],
)
async def test_poison_message_is_dead_lettered_with_reason_and_consumer_goes_on(
    bus: InMemoryBus, value: bytes, headers: dict[str, bytes | None] | None, reason: str
) -> None:
    seen: list[int] = []
    bus.subscribe(counting_subscription(seen))
    _, _, good_headers = thing(0).to_kafka()
    raw = dict(good_headers)
    for k, v in (headers or {}).items():
        if v is None:
            raw.pop(k)
        else:
            raw[k] = v
    bus.append_raw("test.things", b"model-a", value, list(raw.items()))
    await bus.publish(thing(5))
    await bus.drain()
    [dead] = bus.dead_letters
    assert dead.reason == reason
    assert dead.error
    assert seen == [5]


async def test_batch_handler_isolates_the_poison_event(bus: InMemoryBus) -> None:
    stored: list[int] = []

    async def store(deliveries: Any, tx: Transaction) -> None:
        ns = [d.event.data.n for d in deliveries]
        if 666 in ns:
            raise ValueError("cannot store 666")
        stored.extend(ns)

    bus.subscribe(
        Subscription(
            consumer="batch", topics=["test.things"], batch_handler=store, max_retries=1, retry_backoff_s=0
        )
    )
    for n in (1, 2, 666, 3):
        await bus.publish(thing(n))
    await bus.drain()
    assert stored == [1, 2, 3]
    assert [d.reason for d in bus.dead_letters] == ["handler-failed"]


async def test_events_of_other_types_on_the_topic_are_ignored_not_dead_lettered(bus: InMemoryBus) -> None:
    seen: list[int] = []

    async def on_happened(event: CloudEvent[Any], tx: Transaction) -> None:
        seen.append(1)

    bus.subscribe(Subscription(consumer="c", topics=["test.counts"], handlers={ThingHappened: on_happened}))
    await bus.publish(new_event(ThingCounted(n=1), source="/t"))
    await bus.drain()
    assert seen == []
    assert bus.dead_letters == []


class _ConsumerBuilt(Exception):
    """Stops the runner right where it built its consumer."""


async def test_the_kafka_runner_lets_the_broker_hold_a_fetch_only_as_long_as_the_settings_say(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # aiokafka keeps one fetch per broker in flight: a fetch held for idle partitions holds up the busy ones.
    from libs.bus import kafka
    from libs.settings import KafkaSettings

    built: dict[str, Any] = {}

    def consumer(**options: Any) -> None:
        built.update(options)
        raise _ConsumerBuilt

    monkeypatch.setattr(kafka, "AIOKafkaConsumer", consumer)
    monkeypatch.setenv("DRIFTLOOP_KAFKA_FETCH_MAX_WAIT_MS", "40")
    runner = kafka.ConsumerRunner(
        Subscription(consumer="c", topics=["mlops.monitoring"], batch_handler=_noop_batch, raw=True),
        kafka=KafkaSettings(),
        registry=EventTypeRegistry(),
        begin=None,  # type: ignore[arg-type]
        dead_letters=None,  # type: ignore[arg-type]
    )
    with pytest.raises(_ConsumerBuilt):
        await runner.run()
    assert built["fetch_max_wait_ms"] == 40
    assert KafkaSettings.model_fields["fetch_max_wait_ms"].default == 100


async def _noop_batch(deliveries: Any, tx: Transaction) -> None:
    return None


def hostile_text(i: int) -> str:
    """A different text each time, of the kinds a producer may put in an event: long, not ASCII, path-like."""
    return ["x" * 300 + str(i), f"m\u00e9t\u00e9o-{i}", f"../{i}/admin", f"io.driftloop.Thing{i}.v1"][i % 4]


async def test_hostile_events_add_no_series(bus: InMemoryBus) -> None:
    """No label of the bus takes its value from an event: a producer writing events of made-up types, sources,
    ids, subjects and payloads, or that a handler refuses with text of their own, adds dead letters, not
    series to /metrics (dead letters are counted by their reason, which the bus names)."""

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        if event.data.n % 2:
            raise PermanentError(f"refused: {event.subject}")

    bus.subscribe(
        Subscription(consumer="counter", topics=["test.things"], handlers={ThingHappened: on_thing})
    )
    _, _, good_headers = thing(0).to_kafka()

    async def send(i: int) -> None:
        text = hostile_text(i)
        await bus.publish(new_event(ThingHappened(n=i), source=f"/{text}", subject=text))
        for header, value, payload in [
            ("ce_type", text, b'{"n": 1}'),
            ("ce_source", f"/{text}", b'{"n": 2}'),
            ("ce_id", text, b'{"n": 2}'),
            ("ce_subject", text, b'{"n": "' + text.encode() + b'"}'),
            ("ce_type", "io.driftloop.ThingHappened.v1", text.encode()),
        ]:
            headers = {**dict(good_headers), header: value.encode()}
            bus.append_raw("test.things", text.encode(), payload, list(headers.items()))
        await bus.drain()

    for i in range(8):  # every kind once, so that each bounded series there is to be exists
        await send(i)
    before = metrics_lint.series()
    for i in range(8, 108):
        await send(i)

    assert {d.reason for d in bus.dead_letters} == {"not-json", "rejected", "schema-invalid", "unknown-type"}
    assert metrics_lint.series() == before
