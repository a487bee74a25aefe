"""An in-memory bus with the interface of the Kafka one, for unit tests.

Events go through the same CloudEvents encoding and the same :class:`Dispatcher` rules (inbox dedupe,
retries, dead letters) as on Kafka; only the log and the transactions live in memory.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from contracts.envelope import CloudEvent, EventPayload, EventTypeRegistry
from libs.bus.core import (
    Claim,
    Dispatcher,
    Held,
    InboxEntry,
    Record,
    Subscription,
    encode_outgoing,
    judge_claims,
)


@dataclass
class DeadLetter:
    record: Record
    consumer: str
    reason: str
    error: str


@dataclass
class MemoryTransaction:
    """Buffers published events and inbox claims; both take effect only if the block succeeds."""

    bus: InMemoryBus
    conn: Any = None
    published: list[CloudEvent[Any]] = field(default_factory=list)
    claims: dict[tuple[str, str, str], Held] = field(default_factory=dict)
    on_commit: list[Callable[[], None]] = field(default_factory=list)

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.on_commit.append(callback)

    async def publish(self, event: CloudEvent[Any]) -> None:
        # Refused here, as the outbox refuses it: the handler's transaction fails, not a later relay.
        encode_outgoing(event, max_bytes=self.bus.max_event_bytes)
        self.published.append(event)

    async def claim(self, consumer: str, items: Sequence[InboxEntry]) -> list[Claim]:
        new: set[tuple[str, str]] = set()
        held: dict[tuple[str, str], Held] = {}
        for item in items:
            key = (consumer, item.source, item.event_id)
            old = self.bus.inbox.get(key) or self.claims.get(key)
            if old is not None:
                held[(item.source, item.event_id)] = old
            elif (item.source, item.event_id) not in new:
                new.add((item.source, item.event_id))
                self.claims[key] = (item.sha256, item.event_type)
        return judge_claims(items, new, held)


class InMemoryBus:
    """Topics as lists, consumer groups as positions; ``drain()`` delivers until nothing is left."""

    def __init__(self, registry: EventTypeRegistry, *, max_event_bytes: int = 1_000_000) -> None:
        self.registry = registry
        self.max_event_bytes = max_event_bytes
        self.log: dict[str, list[Record]] = defaultdict(list)
        self.inbox: dict[tuple[str, str, str], Held] = {}
        """(consumer, source, event id) → the payload's sha256 and the event's type, as the Postgres inbox
        keeps them."""
        self.dead_letters: list[DeadLetter] = []
        self._subscriptions: list[tuple[Subscription, Dispatcher, dict[str, int]]] = []

    # -- the producer side, as on Kafka -----------------------------------------------------------

    async def publish(self, event: CloudEvent[Any]) -> None:
        """Put an event on its topic; one consumers would refuse as oversized is refused (EventTooLarge)."""
        key, value, headers = encode_outgoing(event, max_bytes=self.max_event_bytes)
        self.append_raw(event.topic, key, value, headers)

    def append_raw(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]
    ) -> None:
        """Put bytes on a topic as they are, for tests of malformed input."""
        self.log[topic].append(Record(topic, 0, len(self.log[topic]), key, value, tuple(headers)))

    # -- the consumer side ------------------------------------------------------------------------

    def subscribe(self, subscription: Subscription) -> None:
        dispatcher = Dispatcher(subscription, registry=self.registry, begin=self._begin, dead_letters=self)
        self._subscriptions.append((subscription, dispatcher, defaultdict(int)))

    async def drain(self, *, max_rounds: int = 1000) -> None:
        """Deliver every pending record to every subscription, including events the handlers emit."""
        for _ in range(max_rounds):
            progressed = False
            for sub, dispatcher, positions in self._subscriptions:
                for topic in sub.topics:
                    pending = self.log[topic][positions[topic] :]
                    if pending:
                        progressed = True
                        await dispatcher.dispatch(pending)
                        positions[topic] += len(pending)
            if not progressed:
                return
        raise RuntimeError(f"the bus did not settle in {max_rounds} rounds: a handler loop?")

    async def dead_letter(self, record: Record, *, consumer: str, reason: str, error: str) -> None:
        self.dead_letters.append(DeadLetter(record, consumer, reason, error))

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[MemoryTransaction]:
        tx = MemoryTransaction(self)
        yield tx
        self.inbox.update(tx.claims)
        for event in tx.published:
            await self.publish(event)
        for callback in tx.on_commit:
            callback()

    # -- inspection for tests ---------------------------------------------------------------------

    def events(self, topic: str | None = None, of: type[EventPayload] | None = None) -> list[CloudEvent[Any]]:
        """Every decodable event published so far, optionally of one topic or payload type."""
        out = []
        for name, records in self.log.items():
            if topic is not None and name != topic:
                continue
            for r in records:
                try:
                    event = self.registry.decode(r.value, r.headers, max_bytes=self.max_event_bytes)
                except ValueError:
                    continue
                if of is None or isinstance(event.data, of):
                    out.append(event)
        return out
