"""How long the bus keeps its Postgres rows: which inbox rows may go, and when (pure rules, no I/O).

The inbox is what makes a redelivery a no-op, so a row may only go once its event can no longer be
delivered again: once Kafka no longer holds the record. Each event type lives on one topic
(``contracts.topics``: a payload's ``topic``), and Kafka deletes a record only when the whole segment
holding it is older than the topic's ``retention.ms``; a segment is rolled (closed, so it can age) at
``segment.ms``, Kafka's default 7 days, or sooner when it is full. A record therefore outlives its topic's
retention by up to ``segment.ms`` plus the broker's retention check (5 minutes). An inbox row is kept
twice its type's topic retention (the second for the segment, which is at most the retention for every
finite retention in the topic map while ``segment.ms`` is Kafka's default) plus :data:`INBOX_MARGIN`
(the retention check, and the producers' and Postgres' clocks, which stamp the record and the row). The
row's age counts from when the consumer handled the event, which is after the record was produced.

Never deleted: rows of types on a topic kept for ever (``FOREVER``), rows with no type (recorded before
bus migration 0003, or by a replica on the former code), and rows of a type this code does not know (a
newer release's, during a rolling upgrade): how long their record lives is not known.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from contracts.envelope import EventPayload
from contracts.topics import FOREVER, TopicSpec

INBOX_MARGIN = timedelta(days=1)
"""Added to twice a topic's retention before an inbox row of its events may go: Kafka's retention check
runs every 5 minutes, and the record's timestamp (the producer's clock) and the row's ``processed_at``
(Postgres') come from different clocks."""


def inbox_keep(retention_ms: int) -> timedelta | None:
    """How long an inbox row of an event on a topic of this retention is kept; None: for ever."""
    if retention_ms == FOREVER or retention_ms < 0:
        return None
    return 2 * timedelta(milliseconds=retention_ms) + INBOX_MARGIN


@dataclass(frozen=True)
class InboxClass:
    """The event types whose inbox rows are kept for the same time, deleted by one statement."""

    keep: timedelta
    event_types: tuple[str, ...]


def inbox_classes(
    topics: Mapping[str, TopicSpec], wire_types: Mapping[str, type[EventPayload]]
) -> list[InboxClass]:
    """The inbox's retention classes, shortest first: each ``ce_type`` of ``wire_types`` (as a consumer
    records it, old upcast versions included) whose payload is routed on a topic kept for a finite time.
    A type on no topic of ``topics``, or on one kept for ever, is in no class: its rows stay."""
    retention = {route.event: spec.retention_ms for spec in topics.values() for route in spec.routes}
    by_keep: dict[timedelta, list[str]] = {}
    for ce_type, payload in wire_types.items():
        ms = retention.get(payload)
        keep = None if ms is None else inbox_keep(ms)
        if keep is not None:
            by_keep.setdefault(keep, []).append(ce_type)
    return [InboxClass(keep, tuple(sorted(types))) for keep, types in sorted(by_keep.items())]


KEEP_FOR_EVER_DAYS = 36_500
"""From this many days (100 years), a keep period of a retention (sent outbox rows, monitoring's joined labels
and window reports) means for ever, as 0 does: no row is that old, and a keep much longer cannot be counted
back from today (a cutoff before year 1 made every round of the outbox's retention fail before it reached the
inbox; past timedelta's bound, the service did not start)."""


def keep_period(days: float) -> timedelta | None:
    """How long a retention keeps its rows, from its setting in days; None (0 days, or
    :data:`KEEP_FOR_EVER_DAYS` or more): for ever."""
    return timedelta(days=days) if 0 < days < KEEP_FOR_EVER_DAYS else None


outbox_keep = keep_period
"""How long a sent outbox row is kept (``outbox_keep_sent_days``)."""
