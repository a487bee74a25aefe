"""The registry of every event type: ``EVENT_TYPES`` decodes any message of the platform.

Upcasters for old schema versions are registered here, next to the types they feed, so every consumer
reads old events the same way.
"""

from __future__ import annotations

from contracts.envelope import EventPayload, EventTypeRegistry
from contracts.topics import TOPICS

ALL_PAYLOADS: tuple[type[EventPayload], ...] = tuple(
    event for spec in TOPICS.values() for event in spec.events
)
"""Every payload class, in topic-map order."""

EVENT_TYPES = EventTypeRegistry(ALL_PAYLOADS)
"""Wire type -> payload class for every event of the platform."""
