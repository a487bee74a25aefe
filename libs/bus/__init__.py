"""The event bus: exactly-once effects on top of Kafka's at-least-once delivery.

- :class:`Subscription` says which events a consumer group handles and how;
- :class:`ConsumerRunner` runs it on Kafka with manual offset commits after the handler's transaction;
- :class:`PgTransaction` gives handlers the inbox (dedupe) and the outbox (emit in the same transaction);
- :class:`OutboxRelay` publishes the outbox with an idempotent producer;
- :class:`InMemoryBus` runs the same rules in memory for unit tests.
"""

from libs.bus.core import (
    BatchHandler,
    BatchPrepare,
    Claim,
    Delivery,
    Dispatcher,
    EventTooLarge,
    Handler,
    PermanentError,
    Record,
    Subscription,
    Transaction,
    TransactionFactory,
    bytes_over_limit,
)
from libs.bus.memory import InMemoryBus

__all__ = [
    "BatchHandler",
    "BatchPrepare",
    "Claim",
    "Delivery",
    "Dispatcher",
    "EventTooLarge",
    "Handler",
    "InMemoryBus",
    "PermanentError",
    "Record",
    "Subscription",
    "Transaction",
    "TransactionFactory",
    "bytes_over_limit",
]
