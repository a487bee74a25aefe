"""The transport-independent heart of the bus: subscriptions, deliveries, and the dispatch rules.

One :class:`Dispatcher` decides what happens to each record — decode, dedupe through the inbox, run the
handler in a transaction, retry, dead-letter — whether the records come from Kafka
(:mod:`libs.bus.kafka`) or from the in-memory bus used in unit tests (:mod:`libs.bus.memory`).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from contracts.envelope import (
    MAX_ATTRIBUTE_CHARS,
    CloudEvent,
    EventPayload,
    EventTypeRegistry,
    HeaderList,
    MalformedEvent,
    OversizedEvent,
    PayloadReader,
    check_attributes,
    record_bytes,
    structured_headers,
)
from contracts.topics import DEAD_LETTER
from libs.bus import metrics
from libs.errors import Outage, PayloadTooLarge
from libs.logging import get_logger, handling

log = get_logger(__name__)

RETRY_DELAY_MAX_S = 5.0
"""The longest wait between two tries of one event, whatever failed: the delay doubles from the
subscription's ``retry_backoff_s`` up to this. The consumer settles one poll at a time, so every record behind
a retried event waits with it: a handler failure still there after a few doublings is seldom one a longer wait
cures, and an outage that ends is noticed within this long. Uncapped, the handler's 20th retry waited
0.2 * 2**19 s (some 29 hours) and the 1,025th was no number a float holds (OverflowError)."""

Headers = tuple[tuple[str, bytes | None], ...]
"""A record's headers as Kafka gives them: a header's value may be null."""


@dataclass(frozen=True)
class Record:
    """One message as it came off a topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int = 0


@dataclass(frozen=True)
class UnreadableRecord(Record):
    """Stands in for an offset the Kafka client could not parse: its key, value and headers are unknown.

    Dispatched like any record, so it is dead-lettered (reason ``unreadable``) and its offset settled in
    order with the records around it."""

    error: str = ""


class Unreadable(MalformedEvent):
    """The Kafka client could not parse the record at this offset, or one before it in its record batch."""

    reason = "unreadable"


@dataclass(frozen=True)
class Delivery:
    """A record and the event decoded from it (``event`` is None only in raw subscriptions)."""

    record: Record
    event: CloudEvent[Any] | None
    error: MalformedEvent | None = None


class Transaction(Protocol):
    """What a handler gets: the open database transaction and a way to emit events inside it."""

    conn: Any

    async def publish(self, event: CloudEvent[Any]) -> None:
        """Emit an event; it leaves only if the transaction commits (transactional outbox)."""
        ...

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the transaction has committed, never if it rolls back: for effects
        outside the database (a service's metrics) that must happen once per settled event, though a handler
        may run more than once for it (a failed poll is replayed one event per transaction)."""
        ...


class Claim(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    REUSED_ID = "reused-id"


class InboxEntry(NamedTuple):
    """A delivered event as the inbox records it. CloudEvents identify an event by its source and id
    together; the hash is of the value as delivered and the type is its ``ce_type`` as delivered, so a reused
    id with other content is caught, a payload of the same bytes under another type too (a RollbackRequested
    that leaves ``to_version`` out has the bytes of a PromoteRequested)."""

    source: str
    event_id: str
    sha256: str
    event_type: str | None = None
    """None: not known (an inbox row stored before the inbox recorded types, bus migration 0003): such a
    row is compared by its payload alone."""


Held = tuple[str, str | None]
"""What the inbox holds for an event it recorded: the payload's sha256, and its type (None: not recorded)."""


LEGACY_SOURCE = ""
"""The source of inbox rows stored before the inbox recorded sources (bus migration 0002). Such a row
stands for its event id under any source. No event has it: the bus refuses an empty source."""


class InboxTransaction(Transaction, Protocol):
    """A transaction that can also record handled events in the inbox."""

    async def claim(self, consumer: str, items: Sequence[InboxEntry]) -> list[Claim]:
        """Record handled events; say for each whether it is new, a duplicate or a reused id."""
        ...


def judge_claims(
    items: Sequence[InboxEntry], new: AbstractSet[tuple[str, str]], held: Mapping[tuple[str, str], Held]
) -> list[Claim]:
    """Each item's verdict, given the (source, event id) pairs the inbox has just recorded (``new``) and
    what it held before for the others (``held``; a row stored before sources were, under
    :data:`LEGACY_SOURCE`)."""
    claims: list[Claim] = []
    first: dict[tuple[str, str], InboxEntry] = {}
    for item in items:
        key = (item.source, item.event_id)
        if key in first:
            # The same event twice in one poll: the first one is the one that counts.
            earlier = first[key]
            claims.append(_same_event(item, (earlier.sha256, earlier.event_type)))
            continue
        first[key] = item
        if key in new:
            claims.append(Claim.NEW)
        else:
            was = held.get(key, held.get((LEGACY_SOURCE, item.event_id)))
            claims.append(Claim.REUSED_ID if was is None else _same_event(item, was))
    return claims


def _same_event(item: InboxEntry, held: Held) -> Claim:
    """DUPLICATE if ``item`` is the event the inbox holds under its id (a type not recorded on either side
    is not compared), else REUSED_ID."""
    sha, event_type = held
    same_type = event_type is None or item.event_type is None or event_type == item.event_type
    return Claim.DUPLICATE if sha == item.sha256 and same_type else Claim.REUSED_ID


TransactionFactory = Callable[[], AbstractAsyncContextManager[InboxTransaction]]
Handler = Callable[[CloudEvent[Any], Transaction], Awaitable[None]]
BatchHandler = Callable[[Sequence[Delivery], Transaction], Awaitable[None]]
BatchPrepare = Callable[[Sequence[Delivery]], Awaitable[None]]
Decoded = tuple[list[Delivery], list[tuple[Record, MalformedEvent]]]
"""A poll's deliveries, and the records to dead-letter with the decoder's verdict."""


class DeadLetterSink(Protocol):
    """Where records that cannot be handled go, with the reason; returns once the write is durable."""

    async def dead_letter(self, record: Record, *, consumer: str, reason: str, error: str) -> None: ...


class RawSender(Protocol):
    """What the outbox relay and the dead-letter writer need of a producer."""

    async def send_many(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]]
    ) -> None:
        """Send (topic, key, value, headers) records (a null value: a tombstone) and return once the broker
        acknowledged them all."""
        ...


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help (the event is wrong, not the world).

    The event is dead-lettered at once with ``reason`` (subclasses name theirs). ``on_dead_lettered``, if
    the handler set it, is called once the dead letter is written: the refusal's counterpart of
    ``Transaction.after_commit`` (a handler may refuse one event more than once, it is dead-lettered once)."""

    reason: str = "rejected"
    on_dead_lettered: Callable[[], None] | None = None


class ReusedEventId(PermanentError):
    """An event id seen before arrived with a different payload."""

    reason = "reused-event-id"


class InboxKeyTooLarge(PermanentError):
    """The inbox cannot record an event's source and id: each is within its length, but together, in UTF-8,
    they pass what a Postgres index entry may hold. Retrying cannot help; the event is dead-lettered as
    ``oversized``, as the decoder refuses an attribute that is too long."""

    reason = "oversized"


class EventTooLarge(PermanentError, PayloadTooLarge):
    """An event to publish is larger than consumers accept (they would dead-letter it as ``oversized``): it is
    refused where it is made. From a handler, the event being handled is dead-lettered as
    ``output-oversized``; from an HTTP request, the answer is 413."""

    reason = "output-oversized"


def encode_outgoing(event: CloudEvent[Any], *, max_bytes: int) -> tuple[bytes | None, bytes, HeaderList]:
    """The event as a Kafka record (key, value, headers), or :class:`EventTooLarge` if a consumer with
    ``max_bytes`` would refuse it: the same limits as decoding (value and headers, attribute lengths)."""
    key, value, headers = event.to_kafka()
    size = record_bytes(value, headers)
    if size > max_bytes:
        raise EventTooLarge(
            f"{event.type} {event.id} would be {size} bytes (value and headers), the limit is {max_bytes}: "
            "consumers would dead-letter it; split it or make it smaller"
        )
    if size - len(value) > MAX_ATTRIBUTE_CHARS:
        try:
            check_attributes({name: raw.decode() for name, raw in headers})
        except OversizedEvent as exc:
            raise EventTooLarge(f"{event.type} {event.id}: {exc.detail}") from exc
    return key, value, headers


def bytes_over_limit(event: CloudEvent[Any], *, max_bytes: int) -> int:
    """By how many bytes the event's value and headers pass ``max_bytes`` (0: consumers accept its size).
    For a producer that can make an event smaller (carry less evidence) before it publishes it."""
    _, value, headers = event.to_kafka()
    return max(0, record_bytes(value, headers) - max_bytes)


# SQLSTATEs of a database that is away, busy or failing over, not of a wrong event: class 08 (connection),
# 40 (transaction rollback: serialization failure, deadlock), 53 (insufficient resources: disk full, out of
# memory, too many connections), and single states of classes that also hold the event's own errors.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53"})
_TRANSIENT_SQLSTATES = frozenset(
    {
        "25006",  # read_only_sql_transaction: a standby during failover
        # lock_timeout: a wait for a lock that another transaction holds and releases when it ends; no input
        # makes that wait last (no handler locks with NOWAIT, or from a second transaction of its own).
        "55P03",  # lock_not_available
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: starting up or shutting down
        "57P05",  # idle_session_timeout
    }
)
# SQLSTATEs that may be the database's (overloaded, an operator cancelling queries) or the event's own doing:
# 57014, query_canceled (statement_timeout, pg_cancel_backend), is most often a handler's query that runs past
# the timeout on every try for one huge or hostile event. Retried as an outage would hold its partition for
# good; as :attr:`Transience.UNCERTAIN`, it is retried for a while, then dead-lettered.
_UNCERTAIN_SQLSTATES = frozenset({"57014"})
# So are the classes of the server's own failures: 58, system_error (58030 io_error: a disk failing under a
# table) and XX, internal_error (XX001 data_corrupted, XX002 index_corrupted). They are the machine's as
# likely as the event's: taken for the event's, a failing disk dead-lettered good events after three quick
# retries.
_UNCERTAIN_SQLSTATE_CLASSES = frozenset({"58", "XX"})


class Transience(enum.Enum):
    """How long an error is worth retrying, when it may not be the event's fault."""

    OUTAGE = "outage"
    """The infrastructure's for certain (Postgres away, busy or failing over, a connection lost, an adapter's
    :class:`~libs.errors.Outage`): retried without limit."""
    UNCERTAIN = "uncertain"
    """An OSError or a timeout that may be an outage or may be the handler's own doing (a wait of its own
    that will never end, a disk error on one file, a statement past Postgres' ``statement_timeout`` on every
    try for one event): retried as an outage for a while, then dead-lettered."""


# OSErrors about a path, not about a connection: the same call with the same input fails the same way.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP})


def transience(exc: BaseException) -> Transience | None:
    """Whether ``exc`` may be the infrastructure's fault rather than the event's, and for how long it is worth
    retrying (None: it is the event's, or a bug; retried ``max_retries`` times, then dead-lettered).

    Postgres errors are told apart by their SQLSTATE; a cancelled statement (57014: a statement timeout) is
    uncertain, as a timeout of the handler's own is. An OSError about a path (FileNotFoundError,
    PermissionError, ...) or one that is also a ValueError (``io.UnsupportedOperation``, asyncpg's
    ``DataError`` for a query argument of the wrong type) says the input was wrong, not the world: None. Code
    that knows an OSError is an outage whatever its type (connecting to Postgres, the artifact store, the
    bus's own transaction) raises :class:`~libs.errors.Outage` for it."""
    import asyncpg

    if isinstance(exc, Outage):
        return Transience.OUTAGE
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES:
            return Transience.OUTAGE
        uncertain = state in _UNCERTAIN_SQLSTATES or state[:2] in _UNCERTAIN_SQLSTATE_CLASSES
        return Transience.UNCERTAIN if uncertain else None
    if isinstance(exc, ValueError):
        return None
    if isinstance(exc, (asyncpg.InterfaceError, ConnectionError)):
        return Transience.OUTAGE
    if isinstance(exc, _PATH_ERRORS) or (isinstance(exc, OSError) and exc.errno in _PATH_ERRNOS):
        return None
    if isinstance(exc, OSError):  # TimeoutError (asyncio's too) is one
        return Transience.UNCERTAIN
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may be the infrastructure's fault rather than the event's (:func:`transience` says
    for how long the bus retries it): an HTTP request that failed so gets 503, a service's own loop tries
    again."""
    return transience(exc) is not None


class TransactionFailed(Outage):
    """The consumer's own transaction (opening it, the inbox claim, the commit) failed with an OSError, a
    timeout or a stray CancelledError (:func:`being_cancelled`): none of that holds anything of the event, so
    it is an outage whatever the error's type."""


class HandlerCancelled(Exception):
    """A handler raised :class:`asyncio.CancelledError` while its consumer was not being cancelled: it awaited
    a task or a future that something else cancelled, or a library turned an inner cancellation into one.
    That is the handler's failure, retried and dead-lettered (``handler-failed``) as any other; let through
    as a CancelledError, it ended the consumer's task, and the service stopped consuming."""


def being_cancelled() -> bool:
    """Whether the running task itself is being cancelled (a shutdown, an ``asyncio.timeout`` around it):
    then a CancelledError is a stop, to let through at once. One raised while it is not was raised by what
    the task awaited, and is that code's failure (:class:`HandlerCancelled`)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def stop_if_being_cancelled(exc: BaseException) -> None:
    """Let ``exc``, caught by a loop of the bus, through as a stop if the running task is being cancelled
    (a shutdown), also when the code under it turned the cancellation into another error; otherwise return,
    and the caller takes it as its work's failure, a CancelledError too: raised while the task is not being
    cancelled (:func:`being_cancelled`), it came from something that was cancelled elsewhere (aiokafka,
    asyncpg, a handler's own task), and let through it ended the loop."""
    if not being_cancelled():
        return
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    raise asyncio.CancelledError() from exc


@dataclass
class Subscription:
    """A consumer group, the topics it reads, and what to do with each event type.

    ``handlers`` map payload classes to per-event handlers. A ``batch_handler`` instead receives every
    handled event of one poll in one transaction (for high-volume topics). ``raw`` subscriptions get
    every record, undecodable ones too, and keep their own dedupe (the audit trail does).

    ``batch_prepare`` (batch handlers only) gets the next poll's deliveries while the current poll's
    transaction is in flight, when the transport has the next poll in hand (see ``Dispatcher.dispatch``'s
    ``upcoming``): work that needs no database, done while the database works. The handler must not rely
    on it: it may be skipped, run for records that are read again later, or fail (it is then only logged).

    ``readers`` give high-volume payload types a faster reader than full pydantic validation (e.g.
    ``contracts.predictions.read_predictions_logged``). A reader returns the payload full validation would,
    or None, and then the record is validated fully: a malformed record is dead-lettered (or, in a raw
    subscription, delivered with its error) with the same reason with or without a reader.
    """

    consumer: str
    topics: Sequence[str]
    handlers: Mapping[type[EventPayload], Handler] = field(default_factory=dict)
    batch_handler: BatchHandler | None = None
    batch_types: frozenset[type[EventPayload]] | None = None
    batch_prepare: BatchPrepare | None = None
    raw: bool = False
    max_retries: int = 3
    retry_backoff_s: float = 0.2
    """The first retry's delay, a handler's failure's as an outage's; it doubles per retry up to
    :data:`RETRY_DELAY_MAX_S` (5 s)."""
    max_uncertain_retries: int = 20
    """Retries of an event whose handler keeps raising a :attr:`Transience.UNCERTAIN` error (an OSError or a
    timeout of its own, a statement timeout), with the outage's backoff (doubling from ``retry_backoff_s`` up
    to 5 s: about 80 s at the defaults), before it is dead-lettered as ``handler-failed``. An outage is
    retried without limit, and starts the count again.
    Services set it, with ``max_retries`` and ``retry_backoff_s``, from their settings
    (``ServiceSettings.consumer_limits``: ``DRIFTLOOP_CONSUMER_MAX_UNCERTAIN_RETRIES``)."""
    max_event_bytes: int = 1_000_000
    readers: Mapping[type[EventPayload], PayloadReader] = field(default_factory=dict)

    def wants(self, payload_type: type[EventPayload]) -> bool:
        if self.batch_handler is not None:
            return self.batch_types is None or payload_type in self.batch_types
        return payload_type in self.handlers


class Dispatcher:
    """Applies one subscription's rules to batches of records. Returns only when each record is settled:
    handled, skipped as duplicate or not wanted, or durably dead-lettered."""

    def __init__(
        self,
        subscription: Subscription,
        *,
        registry: EventTypeRegistry,
        begin: TransactionFactory,
        dead_letters: DeadLetterSink,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.sub = subscription
        self.registry = registry
        self.begin = begin
        self.dead_letters = dead_letters
        self.stopping = stopping
        # The last ``upcoming`` poll and its decoding, reused when that poll is dispatched.
        self._ahead: tuple[Sequence[Record], Decoded] | None = None
        # Positions dead-lettered by a dispatch that then failed: when the transport reads them again, they
        # are settled already (see ``dispatch``); forgotten once a poll holding them (or later offsets of
        # their partition) settles, or their partition is revoked.
        self._dead_lettered: set[tuple[str, int, int]] = set()

    async def dispatch(self, records: Sequence[Record], *, upcoming: Sequence[Record] = ()) -> None:
        """Settle every record, in order.

        ``upcoming``: the next poll, already in hand. With a ``batch_prepare``, it is decoded and prepared
        while this poll's transaction is in flight; passing the same sequence object to the next call
        reuses that decoding. Without one, ``upcoming`` is ignored.
        """
        if not records:
            return
        for topic, count in Counter(r.topic for r in records).items():
            metrics.CONSUMED.labels(self.sub.consumer, topic).inc(count)
        ahead, self._ahead = self._ahead, None
        reuse = ahead is not None and ahead[0] is records
        deliveries, rejected = ahead[1] if ahead is not None and reuse else self._decode(records)
        if self._dead_lettered:
            deliveries, rejected = self._without_dead_lettered(deliveries, rejected)
        for r, exc in rejected:
            await self._dead_letter(r, exc.reason, exc.detail)
        if deliveries:
            if self.sub.batch_handler is not None:
                if upcoming and self.sub.batch_prepare is not None:
                    await self._dispatch_batch_preparing(deliveries, upcoming)
                else:
                    await self._dispatch_batch(deliveries)
            elif len(deliveries) == 1 or not await self._dispatch_group(deliveries):
                for d in deliveries:
                    await self._dispatch_one(d)
        if self._dead_lettered:
            self._forget_settled(records)

    def _forget_settled(self, records: Sequence[Record]) -> None:
        """Forget the positions remembered as dead-lettered that this poll's records settled: in each of its
        partitions, those up to its last offset there.

        Not all of them: the transport may hand out another partition's records (fetched ahead) before it
        reads again the partition it sought back, and that poll settling says nothing of the others."""
        last: dict[tuple[str, int], int] = {}
        for r in records:
            where = (r.topic, r.partition)
            last[where] = max(r.offset, last.get(where, -1))
        self._dead_lettered = {p for p in self._dead_lettered if p[2] > last.get((p[0], p[1]), -1)}

    def forget_partitions(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Forget what was remembered of these (topic, partition)s: the transport no longer reads them (a
        rebalance moved them). Whoever reads them next reads them as any other delivery."""
        gone = set(partitions)
        self._dead_lettered = {p for p in self._dead_lettered if (p[0], p[1]) not in gone}

    def _without_dead_lettered(
        self, deliveries: list[Delivery], rejected: list[tuple[Record, MalformedEvent]]
    ) -> Decoded:
        """The poll without the records an earlier, failed dispatch of it already dead-lettered.

        Not through the inbox: a dead-lettered event's id must stay free, so that an operator who replays it
        from the dead-letter topic (a new offset) has it handled."""
        done = self._dead_lettered

        def fresh(r: Record) -> bool:
            if (r.topic, r.partition, r.offset) in done:
                metrics.DUPLICATES.labels(self.sub.consumer, r.topic).inc()
                return False
            return True

        return [d for d in deliveries if fresh(d.record)], [(r, exc) for r, exc in rejected if fresh(r)]

    def _decode(self, records: Sequence[Record]) -> Decoded:
        """The deliveries of a poll, and the records to dead-letter (none in a raw subscription)."""
        deliveries: list[Delivery] = []
        rejected: list[tuple[Record, MalformedEvent]] = []
        readers = self.sub.readers or None
        for r in records:
            try:
                event = self.registry.decode(
                    r.value, r.headers, max_bytes=self.sub.max_event_bytes, readers=readers
                )
            except MalformedEvent as exc:
                # Nothing of an unreadable record was read, so the decoder's verdict (no headers) is beside
                # the point. Checked only here: a record that decodes is never one.
                verdict = Unreadable(r.error) if isinstance(r, UnreadableRecord) else exc
                if self.sub.raw:
                    deliveries.append(Delivery(r, None, verdict))
                else:
                    rejected.append((r, verdict))
                continue
            if self.sub.raw or self.sub.wants(type(event.data)):
                deliveries.append(Delivery(r, event))
            else:
                metrics.IGNORED.labels(self.sub.consumer, r.topic).inc()
        return deliveries, rejected

    async def _dispatch_batch_preparing(self, deliveries: list[Delivery], upcoming: Sequence[Record]) -> None:
        """Settle this poll in a task while the next one is decoded and prepared here; return once this
        poll is settled. A failed preparation costs only its time: the handler does the work itself."""
        prepare = self.sub.batch_prepare
        assert prepare is not None
        settling = asyncio.ensure_future(self._dispatch_batch(deliveries))
        try:
            decoded = self._decode(upcoming)
            self._ahead = (upcoming, decoded)
            if decoded[0]:
                await prepare(decoded[0])
        except asyncio.CancelledError as exc:
            if being_cancelled():
                settling.cancel()
                await asyncio.gather(settling, return_exceptions=True)
                raise
            # The preparation's own (it awaited something cancelled elsewhere): a failed preparation.
            log.warning("preparing the next batch failed, its handler will do the work", error=repr(exc))
        except Exception as exc:
            log.warning("preparing the next batch failed, its handler will do the work", error=repr(exc))
        await settling

    async def _dispatch_group(self, deliveries: list[Delivery]) -> bool:
        """Group commit: every event of the poll in one transaction, in order. One commit per poll instead
        of one per event is what lets the inbox keep up with Kafka. Returns False (nothing committed) if
        any handler failed, and the caller replays the events one transaction each, isolating the failure.
        """

        async def run_all(tx: Transaction, fresh: list[Delivery]) -> None:
            for d in fresh:
                event = d.event
                assert event is not None
                with handling(event.id, event.correlationid, event.type):
                    await self.sub.handlers[type(event.data)](event, tx)

        try:
            await self._attempt(deliveries, run_all)
            return True
        except Exception as exc:
            # Only an outage is the whole poll's: anything else may be one event's, and replaying them one
            # per transaction finds it (an uncertain error is retried there, within its bound).
            if transience(exc) is Transience.OUTAGE:
                raise
            log.info("group commit failed, replaying one event per transaction", error=repr(exc))
            return False

    async def _dispatch_one(self, d: Delivery) -> None:
        assert d.event is not None
        event = d.event
        handler = self.sub.handlers[type(event.data)]
        with handling(event.id, event.correlationid, event.type):
            await self._with_retries(
                [d],
                lambda tx, fresh: handler(fresh[0].event, tx) if fresh else _noop(),  # type: ignore[arg-type]
            )

    async def _dispatch_batch(self, deliveries: list[Delivery]) -> None:
        handler = self.sub.batch_handler
        assert handler is not None
        try:
            await self._attempt(deliveries, lambda tx, fresh: handler(fresh, tx) if fresh else _noop())
            return
        except Exception as exc:
            if transience(exc) is Transience.OUTAGE:
                raise
            log.warning("batch failed, isolating the failing event", size=len(deliveries), error=repr(exc))
        # One poison event must not sink the rest: replay one per transaction.
        for d in deliveries:
            await self._with_retries([d], lambda tx, fresh: handler(fresh, tx) if fresh else _noop())

    async def _with_retries(
        self, deliveries: list[Delivery], run: Callable[[Transaction, list[Delivery]], Awaitable[None]]
    ) -> None:
        record = deliveries[0].record
        attempt = uncertain = 0
        # Doubled as they are used, never raised to a power: a float that doubles past its range is inf, and
        # min() makes it the cap, where backoff * 2**n raised OverflowError past n = 1,023.
        transient_delay = handler_delay = self.sub.retry_backoff_s
        while True:
            try:
                await self._attempt(deliveries, run)
                return
            except ReusedEventId as exc:
                await self._dead_letter(record, exc.reason, str(exc))
                return
            except PermanentError as exc:
                await self._dead_letter(record, exc.reason, f"{type(exc).__name__}: {exc}")
                if exc.on_dead_lettered is not None:
                    exc.on_dead_lettered()
                return
            except Exception as exc:
                kind = transience(exc)
                if kind is Transience.OUTAGE:
                    # The infrastructure was failing: the uncertain errors before it (a statement timing out
                    # on a database about to fail over) are no evidence against the event.
                    uncertain = 0
                elif kind is Transience.UNCERTAIN:
                    uncertain += 1
                    if uncertain > self.sub.max_uncertain_retries:
                        # It may have been an outage, but one that outlasted the bound is far likelier the
                        # handler's own (a wait that never ends): holding the partition for ever is worse.
                        log.error(
                            "handler failed with an OSError or a timeout on every retry, dead-lettering",
                            attempts=uncertain,
                            error=repr(exc),
                        )
                        await self._dead_letter(
                            record,
                            "handler-failed",
                            f"{type(exc).__name__}: {exc} (on {uncertain} attempts in a row; an OSError, a "
                            "timeout or a cancelled statement raised by a handler is retried for a while in "
                            "case it is an outage)",
                        )
                        return
                if kind is not None:
                    if self.stopping():
                        raise
                    # Maybe not the event's fault: wait for the infrastructure rather than dead-letter.
                    log.warning(
                        "infrastructure unavailable, retrying",
                        error=repr(exc),
                        delay_s=transient_delay,
                        bounded=kind is Transience.UNCERTAIN,
                    )
                    metrics.RETRIED.labels(self.sub.consumer, record.topic).inc()
                    await asyncio.sleep(transient_delay)
                    transient_delay = min(transient_delay * 2, RETRY_DELAY_MAX_S)
                    continue
                attempt += 1
                if attempt > self.sub.max_retries:
                    log.error("handler failed, dead-lettering", attempts=attempt, error=repr(exc))
                    await self._dead_letter(record, "handler-failed", f"{type(exc).__name__}: {exc}")
                    return
                metrics.RETRIED.labels(self.sub.consumer, record.topic).inc()
                log.warning(
                    "handler failed, retrying", attempt=attempt, error=repr(exc), delay_s=handler_delay
                )
                await asyncio.sleep(handler_delay)
                handler_delay = min(handler_delay * 2, RETRY_DELAY_MAX_S)

    async def _attempt(
        self, deliveries: list[Delivery], run: Callable[[Transaction, list[Delivery]], Awaitable[None]]
    ) -> None:
        """One try: the inbox claim and ``run`` in one transaction. An OSError or a timeout of the
        transaction itself (opening it, the claim, the commit) is raised as :class:`TransactionFailed`, an
        outage: only what ``run`` raises is classified by its type."""
        in_handler = False
        try:
            async with self.begin() as tx:
                if self.sub.raw:
                    fresh = deliveries
                else:
                    items = [
                        InboxEntry(
                            d.event.source,
                            d.event.id,
                            hashlib.sha256(d.record.value or b"").hexdigest(),
                            _delivered_type(d.record),
                        )
                        for d in deliveries
                        if d.event is not None
                    ]
                    claims = await tx.claim(self.sub.consumer, items)
                    fresh = []
                    for d, claim in zip(deliveries, claims, strict=True):
                        if claim is Claim.NEW:
                            fresh.append(d)
                        elif claim is Claim.DUPLICATE:
                            metrics.DUPLICATES.labels(self.sub.consumer, d.record.topic).inc()
                        else:
                            assert d.event is not None
                            raise ReusedEventId(
                                f"event id {d.event.id} from source {d.event.source} was handled before"
                                " with a different payload or type"
                            )
                in_handler = True
                try:
                    await run(tx, fresh)
                except asyncio.CancelledError as exc:
                    stop_if_being_cancelled(exc)
                    # Turned here, inside the transaction: it rolls back as for any failing handler.
                    raise HandlerCancelled(
                        f"the handler was cancelled ({_cancelled_error(exc)}) while its consumer was not: "
                        "it raised CancelledError itself, or something it awaited was cancelled elsewhere"
                    ) from exc
                in_handler = False
        except asyncio.CancelledError as exc:
            stop_if_being_cancelled(exc)
            raise TransactionFailed(f"the consumer's transaction failed: {_cancelled_error(exc)}") from exc
        except Exception as exc:
            # The consumer being stopped, with the cancellation turned into another error by the handler (or
            # a library under it): still a stop, never the event's failure to retry or dead-letter.
            stop_if_being_cancelled(exc)
            # An OSError (TimeoutError, asyncio's too, is one) outside the handler is the transaction's own.
            if not isinstance(exc, OSError) or in_handler or transience(exc) is Transience.OUTAGE:
                raise
            raise TransactionFailed(
                f"the consumer's transaction failed: {type(exc).__name__}: {exc}"
            ) from exc
        for topic, count in Counter(d.record.topic for d in fresh).items():
            metrics.PROCESSED.labels(self.sub.consumer, topic).inc(count)

    async def _dead_letter(self, record: Record, reason: str, error: str) -> None:
        where = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        if _dead_lettered_by(record, self.sub.consumer):
            # This consumer's own dead letter, read back from the dead-letter topic, failed again. Writing it
            # once more would feed itself for ever; it is already kept there, so it is left as it is.
            metrics.DEAD_LETTERS_LEFT.labels(self.sub.consumer, record.topic).inc()
            log.error(
                "a dead letter of this consumer failed again; left on its topic, not written again",
                reason=reason,
                error=error,
                **where,
            )
        else:
            consumer = self.sub.consumer
            await self.dead_letters.dead_letter(record, consumer=consumer, reason=reason, error=error)
            # Said only once it is true: a write that failed is the runner's to retry, not a dead letter yet.
            metrics.DEAD_LETTERED.labels(self.sub.consumer, record.topic, reason).inc()
            log.warning("dead-lettered", reason=reason, error=error, **where)
        self._dead_lettered.add((record.topic, record.partition, record.offset))


def _delivered_type(record: Record) -> str:
    """The ``ce_type`` of a record that decoded (so it has exactly one, in UTF-8), as delivered: an upcast
    event is recorded under its own type, so a redelivery after an upcaster is added is still a duplicate. An
    event in structured mode has its type in its value (:func:`contracts.envelope.structured_headers`)."""
    for name, raw in record.headers:
        if name == "ce_type" and raw is not None:
            return raw.decode()
    return structured_headers(record.value)["ce_type"]


def _dead_lettered_by(record: Record, consumer: str) -> bool:
    """Whether the record is a dead letter this consumer wrote, read from the dead-letter topic (its
    ``dlq_consumer`` header). Elsewhere the header proves nothing: a dead letter copied back to its topic
    with its headers (an operator's replay), or any record claiming to be one, is dead-lettered like any
    other when it fails."""
    if record.topic != DEAD_LETTER:
        return False
    mark = consumer.encode()
    return any(name == "dlq_consumer" and value == mark for name, value in record.headers)


def _cancelled_error(exc: asyncio.CancelledError) -> str:
    """A CancelledError for a dead letter's error: its message, if whoever cancelled gave one."""
    return f"CancelledError: {exc}" if str(exc) else "CancelledError"


async def _noop() -> None:
    return None
