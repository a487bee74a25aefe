"""The operator's side of the dead-letter topic: read dead letters, and replay chosen ones to their topic.

A dead letter (:func:`libs.bus.kafka.dead_letter_message`) is the original record (key, value, headers) plus
``dlq_*`` headers saying why and where from. Replaying one produces the original again on its origin topic
with its key, so it lands on the partition of its key, after whatever that key got meanwhile: a new offset,
the same event id. Consumers that handled it already skip it (their inbox dedupes by source and id); the
consumer that dead-lettered it handles it now, or dead-letters it again with the new reason.

Reading stops at the topic's end offsets as they were when reading began, so a replay whose events are
dead-lettered again while it runs never reads them back, and never loops. Partitions are read one after
another, each in order: the dead letters of one key are on one partition (the key is kept), so their
replays keep their order, and ``after`` (a partition and an offset) says where a run that stopped half-way
goes on from.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from contracts.envelope import REPLAYED_FROM
from contracts.topics import DEAD_LETTER
from libs.bus.core import Headers, RawSender, Record
from libs.bus.kafka import TOO_LARGE, UNREADABLE, record_of
from libs.settings import KafkaSettings

SKIPPED_UNLESS_NAMED = {
    "tombstone": "a tombstone (no value): consumers refuse it as not-json",
    "unreadable": "unreadable: the Kafka client could not parse the original, so the dead letter holds "
    "none of it; named, it is replayed from its origin record if that can be read now",
    "not-json": "its value is not JSON (or missing): replayed as it is, it would be refused again",
}
"""Dead letters ``replay`` passes over unless the operator names them (``named``), by kind, with why."""

BROKER_ERRORS = (TimeoutError, KafkaError, OSError)
"""What a broker that stopped answering raises, to a read or a send: a replay stops at it, saying how far
it got."""

IDLE_TIMEOUT_S = 30.0
"""How long reading waits for a record that is there (below the end offset) before giving up: the broker
stopped answering."""


class DeadLetterTopicMissing(Exception):
    """The dead-letter topic does not exist on the cluster (under this topic prefix)."""


class OriginUnavailable(Exception):
    """The record a dead letter came from cannot be read from its topic any more; the message says why."""


def _text(headers: Headers, name: str) -> str | None:
    """The first header ``name`` as text (bytes that are not UTF-8 replaced), None when absent or null."""
    for key, raw in headers:
        if key == name:
            return raw.decode(errors="replace") if raw is not None else None
    return None


def _int(headers: Headers, name: str) -> int | None:
    text = _text(headers, name)
    return int(text) if text is not None and text.isdigit() else None


@dataclass(frozen=True)
class DeadLetterEntry:
    """One record of the dead-letter topic, read: where it is, why it is there, where it came from."""

    record: Record
    reason: str | None
    error: str | None
    consumer: str | None
    origin_topic: str | None
    origin_partition: int | None
    origin_offset: int | None
    event_id: str | None
    event_type: str | None
    truncated: tuple[str, ...]
    """What the dead-letter writer cut to make it fit (``key``, ``value``, ``headers``); empty when whole."""
    original_sha256: str | None
    """The SHA-256 of the original value, given when the value was cut."""

    @classmethod
    def of(cls, record: Record) -> DeadLetterEntry:
        """Read a record of the dead-letter topic; headers it lacks are None."""
        h = record.headers
        cut = _text(h, "dlq_truncated")
        return cls(
            record=record,
            reason=_text(h, "dlq_reason"),
            error=_text(h, "dlq_error"),
            consumer=_text(h, "dlq_consumer"),
            origin_topic=_text(h, "dlq_origin_topic"),
            origin_partition=_int(h, "dlq_origin_partition"),
            origin_offset=_int(h, "dlq_origin_offset"),
            event_id=_text(h, "ce_id"),
            event_type=_text(h, "ce_type"),
            truncated=tuple(part for part in (cut or "").split(",") if part),
            original_sha256=_text(h, "dlq_original_value_sha256"),
        )

    @property
    def position(self) -> str:
        """``<partition>:<offset>`` on the dead-letter topic."""
        return f"{self.record.partition}:{self.record.offset}"

    @property
    def origin(self) -> str:
        """``<topic> <partition>:<offset>`` of the original, as far as the headers say."""
        return f"{self.origin_topic or '?'} {self.origin_partition}:{self.origin_offset}"

    @property
    def kind(self) -> str | None:
        """Why ``replay`` passes over it unless named (a key of :data:`SKIPPED_UNLESS_NAMED`), or None."""
        if self.reason == "unreadable":
            return "unreadable"
        if self.record.value is None:
            return "tombstone"
        if self.reason == "not-json":
            return "not-json"
        return None

    def as_json(self) -> dict[str, Any]:
        """What ``driftloop deadletter list --json`` prints of it."""
        return {
            "partition": self.record.partition,
            "offset": self.record.offset,
            "timestamp_ms": self.record.timestamp_ms,
            "reason": self.reason,
            "error": self.error,
            "consumer": self.consumer,
            "origin_topic": self.origin_topic,
            "origin_partition": self.origin_partition,
            "origin_offset": self.origin_offset,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "truncated": list(self.truncated),
            "tombstone": self.record.value is None,
        }


def _type_matches(event_type: str | None, wanted: str) -> bool:
    """A ``ce_type`` in full (``io.driftloop.DriftDetected.v1``) or by its name (``DriftDetected``)."""
    if event_type is None:
        return False
    return event_type == wanted or event_type.removeprefix("io.driftloop.").rpartition(".v")[0] == wanted


@dataclass(frozen=True)
class DeadLetterSelection:
    """Which dead letters to read: every filter given must hold (any of a filter's values)."""

    topics: frozenset[str] = frozenset()
    """Origin topics, logical names (``mlops.models``)."""
    consumers: frozenset[str] = frozenset()
    reasons: frozenset[str] = frozenset()
    event_types: frozenset[str] = frozenset()
    since: datetime | None = None
    """Dead-lettered at or after this time (the dead letter's timestamp)."""
    until: datetime | None = None
    """Dead-lettered before this time."""
    after: tuple[int, int] | None = None
    """Go on after this (partition, offset): lower partitions are passed over, this one read past the offset,
    higher ones from their start. What an interrupted replay says to go on with."""
    named: frozenset[tuple[int, int]] = frozenset()
    """Only these (partition, offset); ``replay`` takes them whatever their kind."""

    def first_offset(self, partition: int) -> int | None:
        """Where reading ``partition`` may start (None: pass over it); ``since`` is applied by the reader."""
        start = 0
        if self.after is not None:
            if partition < self.after[0]:
                return None
            if partition == self.after[0]:
                start = self.after[1] + 1
        if self.named:
            offsets = [o for p, o in self.named if p == partition]
            if not offsets:
                return None
            start = max(start, min(offsets))
        return start

    def last_offset(self, partition: int) -> int | None:
        """The last offset of ``partition`` worth reading (None: up to the end)."""
        offsets = [o for p, o in self.named if p == partition]
        return max(offsets) if offsets else None

    def matches(self, entry: DeadLetterEntry) -> bool:
        """Whether ``entry`` is selected."""
        r = entry.record
        if self.named and (r.partition, r.offset) not in self.named:
            return False
        if self.after is not None and (r.partition, r.offset) <= self.after:
            return False
        if self.topics and entry.origin_topic not in self.topics:
            return False
        if self.consumers and entry.consumer not in self.consumers:
            return False
        if self.reasons and entry.reason not in self.reasons:
            return False
        if self.event_types and not any(_type_matches(entry.event_type, t) for t in self.event_types):
            return False
        if self.since is not None and r.timestamp_ms < self.since.timestamp() * 1000:
            return False
        return not (self.until is not None and r.timestamp_ms >= self.until.timestamp() * 1000)


@dataclass(frozen=True)
class Replay:
    """A dead letter to produce again: the original's key, value and headers, to its origin topic."""

    entry: DeadLetterEntry
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    from_origin: bool
    """The original was read from its topic (the dead letter was truncated, or unreadable)."""


@dataclass(frozen=True)
class Skip:
    """A selected dead letter ``replay`` passes over: ``reason`` a short name (the counts), ``detail`` why."""

    entry: DeadLetterEntry
    reason: str
    detail: str


class OriginReader(Protocol):
    """The origin topics, as a replay needs them."""

    async def __call__(self, topic: str, partition: int, offset: int) -> Record:
        """The record at (logical topic, partition, offset), or :class:`OriginUnavailable` saying why not."""
        ...

    async def has_topic(self, topic: str) -> bool:
        """Whether the (logical) topic exists: a send to one that does not would wait for it, then fail."""
        ...


def replayed_headers(headers: Headers, entry: DeadLetterEntry) -> list[tuple[str, bytes]]:
    """The original's headers without the ``dlq_*`` ones, plus :data:`~contracts.envelope.REPLAYED_FROM`
    (``<partition>:<offset>`` of the dead letter). Consumers decode only the ``ce_*`` and ``content-type``
    headers; any other passes through them (and into the audit trail). It is a ``dlq_*`` header, so a replay
    dead-lettered again does not carry it into its new dead letter (the writer drops every ``dlq_*`` header
    of the original). The size limit leaves it out, so an original that was within ``max_event_bytes`` is
    still within it; the producer sends it within its headroom above the limit
    (:data:`~libs.bus.kafka.RECORD_HEADROOM_BYTES`)."""
    kept = [(name, raw) for name, raw in headers if not name.startswith("dlq_")]
    # A null header value goes out null, as it came in (aiokafka's producer takes it).
    return [*kept, (REPLAYED_FROM, entry.position.encode())]  # type: ignore[list-item]


async def plan_replay(entry: DeadLetterEntry, *, named: bool, origin_of: OriginReader) -> Replay | Skip:
    """What replaying ``entry`` means: the record to produce, or why it is passed over.

    A dead letter whose value or headers were cut (``dlq_truncated``) is replayed from its origin record,
    if that is still in its topic and its value's SHA-256 is ``dlq_original_value_sha256``; a named
    unreadable one from its origin record, if it can be read now. Tombstones, unreadable and ``not-json``
    dead letters are passed over unless ``named``."""
    if entry.origin_topic is None or entry.origin_partition is None or entry.origin_offset is None:
        return Skip(
            entry, "no-origin", "it has no dlq_origin_* headers: not a dead letter the platform wrote"
        )
    if entry.origin_topic == DEAD_LETTER:
        return Skip(entry, "dead-letter-topic", "its origin is the dead-letter topic itself")
    if not await origin_of.has_topic(entry.origin_topic):
        return Skip(entry, "no-topic", f"its topic {entry.origin_topic} does not exist (any more)")
    if not named and (kind := entry.kind) is not None:
        return Skip(
            entry, kind, f"{SKIPPED_UNLESS_NAMED[kind]}; name it (--at {entry.position}) to replay it"
        )
    source = entry.record
    from_origin = bool(entry.truncated) or entry.reason == "unreadable"
    if from_origin:
        try:
            source = await origin_of(entry.origin_topic, entry.origin_partition, entry.origin_offset)
        except OriginUnavailable as exc:
            what = "cut to fit (" + ",".join(entry.truncated) + ")" if entry.truncated else "unreadable"
            return Skip(entry, "origin-unavailable", f"it was {what} and its original {exc}")
        if entry.truncated:
            digest = hashlib.sha256(source.value or b"").hexdigest()
            if digest != entry.original_sha256:
                return Skip(
                    entry,
                    "origin-changed",
                    f"the record at {entry.origin} is not its original: its value's SHA-256 is {digest}, "
                    f"the dead letter says {entry.original_sha256} (the topic was re-created?)",
                )
    return Replay(
        entry=entry,
        topic=entry.origin_topic,
        key=source.key,
        value=source.value,
        headers=replayed_headers(source.headers, entry),
        from_origin=from_origin,
    )


@dataclass
class ReplayReport:
    """What a replay did: counts, the last dead letter replayed, and the failure that stopped it if any."""

    replayed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    last_replayed: DeadLetterEntry | None = None
    failure: str | None = None


async def replay(
    entries: AsyncIterator[DeadLetterEntry] | Iterable[DeadLetterEntry],
    *,
    named: bool,
    origin_of: OriginReader,
    sender: RawSender | None,
    on_step: Callable[[Replay | Skip], None] = lambda step: None,
) -> ReplayReport:
    """Replay ``entries`` in order, each sent and acknowledged before the next (so a failure says exactly
    how far it got, and a key's replays keep their order); ``sender`` None is a dry run. Stops at the first
    broker error (:data:`BROKER_ERRORS`), whether reading the dead letters, reading an origin record or
    sending, with ``failure`` set: ``last_replayed`` is then where to go on from. A record too large for the
    producer is skipped (``too-large``)."""
    report = ReplayReport()

    async def each() -> AsyncIterator[DeadLetterEntry]:
        if isinstance(entries, AsyncIterator):
            async for entry in entries:
                yield entry
        else:
            for entry in entries:
                yield entry

    reading = each()
    read: DeadLetterEntry | None = None
    while True:
        try:
            entry = await anext(reading, None)
        except BROKER_ERRORS as exc:
            where = f"after {read.position}" if read is not None else "from the start"
            report.failure = f"reading the dead letters {where} failed: {exc!r}"
            return report
        if entry is None:
            return report
        read = entry
        try:
            step = await plan_replay(entry, named=named, origin_of=origin_of)
        except BROKER_ERRORS as exc:
            report.failure = f"reading the original of {entry.position} ({entry.origin}) failed: {exc!r}"
            on_step(Skip(entry, "failed", report.failure))
            return report
        if isinstance(step, Replay) and sender is not None:
            try:
                await sender.send_many([(step.topic, step.key, step.value, step.headers)])
            except TOO_LARGE as exc:
                step = Skip(
                    entry, "too-large", f"the producer or the broker refuses it as too large: {exc!r}"
                )
            except BROKER_ERRORS as exc:
                report.failure = f"replaying {entry.position} to {step.topic} failed: {exc!r}"
                on_step(Skip(entry, "failed", report.failure))
                return report
        if isinstance(step, Skip):
            report.skipped[step.reason] += 1
        else:
            report.replayed += 1
            report.last_replayed = entry
        on_step(step)


# --- Kafka ------------------------------------------------------------------------------------------


async def _reader(kafka: KafkaSettings) -> AIOKafkaConsumer:
    """A started consumer of no group: it commits nothing and moves no service's offsets."""
    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **kafka.consumer_options())
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()  # a failed start leaves its client open (aiokafka warns "Unclosed" at exit)
        raise
    return consumer


async def read_dead_letters(
    kafka: KafkaSettings, selection: DeadLetterSelection, *, topic: str = DEAD_LETTER
) -> AsyncIterator[DeadLetterEntry]:
    """The selected dead letters, partition after partition, each in offset order, up to the end offsets the
    topic had when reading began. Raises :class:`DeadLetterTopicMissing`, or aiokafka's KafkaError when the
    broker cannot be reached."""
    physical = kafka.physical(topic)
    partitions = await _partitions(kafka, physical)
    consumer = await _reader(kafka)
    try:
        tps = [TopicPartition(physical, p) for p in partitions]
        ends: Mapping[TopicPartition, int] = await consumer.end_offsets(tps)
        since: Mapping[TopicPartition, Any] = {}
        if selection.since is not None:
            since = await consumer.offsets_for_times(
                {tp: int(selection.since.timestamp() * 1000) for tp in tps}
            )
        for tp in tps:
            first = selection.first_offset(tp.partition)
            if first is None:
                continue
            if (at := since.get(tp)) is not None:
                first = max(first, at.offset)
            elif selection.since is not None:
                continue  # nothing at or after that time
            end = ends[tp]
            if (last := selection.last_offset(tp.partition)) is not None:
                end = min(end, last + 1)
            async for record in _read_partition(consumer, kafka, tp, first, end):
                entry = DeadLetterEntry.of(record)
                if selection.matches(entry):
                    yield entry
    finally:
        await consumer.stop()


async def _partitions(kafka: KafkaSettings, physical: str) -> list[int]:
    """The partitions of ``physical``, sorted (:class:`DeadLetterTopicMissing` if it does not exist)."""
    admin = AIOKafkaAdminClient(client_id="driftloop-deadletter", **kafka.client_options())
    await admin.start()
    try:
        if physical not in await admin.list_topics():
            raise DeadLetterTopicMissing(
                f"the topic {physical} does not exist at {kafka.bootstrap}"
                + (f" (topic prefix {kafka.topic_prefix!r})" if kafka.topic_prefix else "")
            )
        [described] = await admin.describe_topics([physical])
    finally:
        await admin.close()
    return sorted(p["partition"] for p in described["partitions"])


async def _read_partition(
    consumer: AIOKafkaConsumer, kafka: KafkaSettings, tp: TopicPartition, first: int, end: int
) -> AsyncIterator[Record]:
    consumer.assign([tp])
    consumer.seek(tp, first)
    if await consumer.position(tp) >= end:
        return
    idle_since = time.monotonic()
    while await consumer.position(tp) < end:
        batch = await consumer.getmany(tp, timeout_ms=1000, max_records=500)
        messages = batch.get(tp, [])
        if messages:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > IDLE_TIMEOUT_S:
            raise TimeoutError(
                f"no record of {tp.topic} partition {tp.partition} came in {IDLE_TIMEOUT_S:.0f}s at offset "
                f"{await consumer.position(tp)} (its end was {end}): is the broker still up?"
            )
        for message in messages:
            if message.offset >= end:
                return
            yield record_of(kafka, message)


class OriginRecords:
    """Reads single records of the origin topics by position, for :func:`plan_replay`; use as an async
    context manager."""

    def __init__(self, kafka: KafkaSettings, *, wait_s: float = 10.0) -> None:
        self.kafka = kafka
        self.wait_s = wait_s
        self._consumer: AIOKafkaConsumer | None = None
        self._topics: set[str] | None = None

    async def __aenter__(self) -> OriginRecords:
        self._consumer = await _reader(self.kafka)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def has_topic(self, topic: str) -> bool:
        assert self._consumer is not None, "OriginRecords is used as an async context manager"
        if self._topics is None:
            self._topics = set(await self._consumer.topics())
        return self.kafka.physical(topic) in self._topics

    async def __call__(self, topic: str, partition: int, offset: int) -> Record:
        consumer = self._consumer
        assert consumer is not None, "OriginRecords is used as an async context manager"
        tp = TopicPartition(self.kafka.physical(topic), partition)
        where = f"({tp.topic} {partition}:{offset})"
        if not await self.has_topic(topic):
            raise OriginUnavailable(f"{where} cannot be read: the topic does not exist")
        consumer.assign([tp])
        begin = (await consumer.beginning_offsets([tp]))[tp]
        end = (await consumer.end_offsets([tp]))[tp]
        if offset < begin:
            raise OriginUnavailable(f"{where} is gone: the topic starts at offset {begin} now (retention)")
        if offset >= end:
            raise OriginUnavailable(f"{where} is not there: the partition ends at offset {end} (re-created?)")
        consumer.seek(tp, offset)
        until = time.monotonic() + self.wait_s
        while time.monotonic() < until:
            try:
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=1)
            except UNREADABLE as exc:
                raise OriginUnavailable(f"{where} cannot be parsed by the Kafka client: {exc!r}") from exc
            for message in batch.get(tp, []):
                if message.offset != offset:
                    raise OriginUnavailable(f"{where} is gone: the next record is at {message.offset}")
                return record_of(self.kafka, message)
        raise OriginUnavailable(f"{where} did not come within {self.wait_s:.0f}s")
