"""The audit trail's rules, free of I/O: the stored record, the hash chain, seals, signed checkpoints,
verification, causal trees and query cursors.

The canonical form (docs/audit.md says the same for readers outside the platform):

    record      = meta ‖ 0x0A ‖ value       meta: one line of compact JSON (sorted keys), value: the Kafka
                                           value's bytes exactly as they arrived (empty for a tombstone)
    row_hash(n) = SHA-256( row_hash(n-1) ‖ uint64_be(n) ‖ SHA-256(record(n)) ),   row_hash(0) = 32 zero bytes

Hashing the record's digest rather than the record keeps the chain step fixed-size, so a verifier can let
the database hash the records while it chains the digests. ``seal(n)`` is a keyed BLAKE2b of
``row_hash(n)`` with a key derived from the signing key: whoever rewrites the chain from row n on without
that key leaves the old seals behind, which names n exactly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from contracts.audit import AuditCheckpoint, checkpoint_signing_input
from contracts.envelope import (
    TYPE_PREFIX,
    MalformedEvent,
    is_structured,
    parse_event_time,
    structured_headers,
)
from contracts.feedback import TOPIC as FEEDBACK_TOPIC
from contracts.predictions import TOPIC as PREDICTIONS_TOPIC
from contracts.topics import TOPICS
from libs.bus.core import Record
from libs.errors import InvalidInput

FORMAT = "driftloop-audit/1"
GENESIS = bytes(32)
SEQ_BYTES = 8
SEQ_MAX = 2**63 - 1
"""The trail's sequence numbers are Postgres bigints."""
DIGEST_BYTES = 32
LINK_BYTES = SEQ_BYTES + DIGEST_BYTES + DIGEST_BYTES
"""One chain link as a verifier reads it: uint64_be(seq) ‖ SHA-256(record) ‖ row_hash."""

_SEQ = struct.Struct(">Q")  # uint64_be(seq)

# Values copied into indexed columns are cut to this, so a hostile header can never exceed a btree row.
INDEX_TEXT_MAX = 512
SEAL_DOMAIN = b"driftloop-audit-seal/v1"


class Kind(StrEnum):
    """What a trail row holds."""

    EVENT = "event"
    """A CloudEvent the platform's registry decoded."""
    UNDECODABLE = "undecodable"
    """A record that is not a valid event of the platform; kept as it came, with the reason."""
    DEAD_LETTER = "dead-letter"
    """A record from the dead-letter topic: the original plus the dlq_* headers saying why."""


# --- the record and the chain -----------------------------------------------------------------------


def chain_hash(prev: bytes, seq: int, record: bytes) -> bytes:
    """row_hash(seq) from row_hash(seq-1) and the row's record."""
    return hashlib.sha256(prev + seq.to_bytes(SEQ_BYTES, "big") + hashlib.sha256(record).digest()).digest()


def _text_or_base64(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode()}


def _headers_json(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, Any]:
    """Header name -> UTF-8 text; ``{"base64": ...}`` for other bytes; a list for a repeated name."""
    try:
        out: dict[str, Any] = {name: raw.decode() for name, raw in headers}  # type: ignore[union-attr]
        if len(out) == len(headers):
            return out
    except (UnicodeDecodeError, AttributeError):
        pass  # binary or null values: the careful way below
    out = {}
    for name, raw in headers:
        value = _text_or_base64(raw)
        if name in out:
            # Kafka allows a header name twice; keep every value, in order, rather than pick one.
            previous = out[name]
            out[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            out[name] = value
    return out


def utc_text(when: datetime) -> str:
    """RFC 3339 UTC with microseconds, as the record and the checkpoints write times."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _first_text(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if value.__class__ is str:
        return value
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def _index_text(value: str | None) -> str | None:
    if value is None or (len(value) <= INDEX_TEXT_MAX and "\x00" not in value):
        return value
    # Postgres text cannot hold NUL; the exact bytes stay in the record.
    return value.replace("\x00", "")[:INDEX_TEXT_MAX]


def _parse_time(text: str | None) -> datetime | None:
    """A ``recorded_at`` the trail wrote (:func:`utc_text`), as a datetime; None for a text Python does not
    read as an ISO 8601 time with an offset and a UTC form. Until the trail read ``ce_time`` as the bus does
    (:func:`_event_time`), it made the ``event_time`` copy this way too."""
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
        # A time whose UTC form is outside years 1..9999 cannot be stored as timestamptz and read back.
        when.astimezone(UTC)
    except (ValueError, OverflowError):
        return None
    return when if when.tzinfo is not None else None


def _event_time(text: str | None) -> datetime | None:
    """The indexed copy of ``ce_time``: read as the bus reads it (:func:`parse_event_time`), so the trail
    indexes a time exactly when the platform's decoder takes it; None for any other text."""
    if not text:
        return None
    try:
        return parse_event_time(text)
    except MalformedEvent:
        return None


class Attributes(NamedTuple):
    """The CloudEvents attributes of a record, as far as its headers carry them (the indexed copies)."""

    event_id: str | None
    event_type: str | None
    subject: str | None
    correlation_id: str | None
    causation_id: str | None
    actor: str | None
    event_time: datetime | None

    @classmethod
    def of(cls, headers: Mapping[str, Any]) -> Attributes:
        """Read the ce_* headers (already decoded to JSON values) the way the envelope does."""
        event_id = _index_text(_first_text(headers, "ce_id"))
        return cls(
            event_id,
            _index_text(_first_text(headers, "ce_type")),
            _index_text(_first_text(headers, "ce_subject")),
            _index_text(_first_text(headers, "ce_correlationid")) or event_id,
            _index_text(_first_text(headers, "ce_causationid")),
            _index_text(_first_text(headers, "ce_actor")),
            _event_time(_first_text(headers, "ce_time")),
        )


def attribute_headers(meta: Mapping[str, Any], value: bytes | None) -> Mapping[str, Any]:
    """Where a record's CloudEvents attributes are, as ``ce_*`` names: its headers, or, for an event the bus
    took in the Kafka binding's structured mode, the JSON event in its value
    (:func:`contracts.envelope.structured_headers`). A structured record the bus refused is indexed by its
    headers alone, as it was before consumers read that mode."""
    headers: Mapping[str, Any] = meta["headers"]
    if meta["kind"] == Kind.EVENT.value and is_structured(_first_text(headers, "content-type")):
        return structured_headers(value)
    return headers


class Incoming(NamedTuple):
    """One record to append, with how the platform's decoder saw it."""

    record: Record
    error: MalformedEvent | None = None
    decoded: bool = True
    """False when the platform's decoder did not produce an event from it."""
    reuse: int = 0
    """How many other records the trail holds at the record's Kafka position (see :func:`new_positions`):
    0 but when the position was used again (a topic deleted and created again, a log truncated)."""


def record_meta(
    incoming: Incoming, *, recorded_at: datetime | str, dead_letter_topic: str
) -> tuple[dict[str, Any], Kind]:
    """The meta object of a record (everything but the value) and its kind."""
    r = incoming.record
    headers = _headers_json(r.headers)
    error: dict[str, str] | None = None
    if r.topic == dead_letter_topic:
        kind = Kind.DEAD_LETTER
        reason, detail = _first_text(headers, "dlq_reason"), _first_text(headers, "dlq_error")
        if reason is not None:
            error = {"reason": reason, "detail": detail or ""}
    elif incoming.error is not None or not incoming.decoded:
        kind = Kind.UNDECODABLE
    else:
        kind = Kind.EVENT
    if error is None and incoming.error is not None:
        error = {"reason": incoming.error.reason, "detail": incoming.error.detail}
    kafka: dict[str, Any] = {
        "key": _text_or_base64(r.key),
        "offset": r.offset,
        "partition": r.partition,
        "timestamp_ms": r.timestamp_ms,
        "tombstone": r.value is None,
        "topic": r.topic,
    }
    if incoming.reuse:
        # Only a record at a reused position says so: every other record's meta stays as it always was.
        kafka["reuse"] = incoming.reuse
    meta = {
        "error": error,
        "format": FORMAT,
        "headers": headers,
        "kafka": kafka,
        "kind": kind.value,
        "recorded_at": recorded_at if isinstance(recorded_at, str) else utc_text(recorded_at),
    }
    return meta, kind


def encode_record(meta: Mapping[str, Any], value: bytes | None) -> bytes:
    """meta ‖ LF ‖ value: orjson never writes a raw newline, so the first LF ends the meta."""
    return orjson.dumps(meta, option=orjson.OPT_SORT_KEYS) + b"\n" + (value or b"")


def decode_record(record: bytes) -> tuple[dict[str, Any], bytes | None]:
    """(meta, value) of a stored record; value is None for a tombstone."""
    meta_bytes, _, value = record.partition(b"\n")
    meta = orjson.loads(meta_bytes)
    return meta, None if meta["kafka"]["tombstone"] else value


class KafkaPosition(NamedTuple):
    """Where a record sits in Kafka: the trail holds each position at most once."""

    topic: str
    partition: int
    offset: int


class TrailRow(NamedTuple):
    """One row of the trail, ready to be written, its fields in the table's column order (so COPY takes
    it as it is). Everything after ``seal`` is a copy of a record field, for the indexes and the unique
    Kafka position (``reuse`` last: the column came with migration 0003)."""

    seq: int
    record: bytes
    row_hash: bytes
    seal: bytes
    topic: str
    partition: int
    offset: int
    kind: str
    event_id: str | None
    event_type: str | None
    subject: str | None
    correlation_id: str | None
    causation_id: str | None
    actor: str | None
    event_time: datetime | None
    recorded_at: datetime
    reuse: int

    @property
    def position(self) -> KafkaPosition:
        """Where the record sat in Kafka."""
        return KafkaPosition(self.topic, self.partition, self.offset)

    @property
    def attributes(self) -> Attributes:
        """The indexed copies of the CloudEvents attributes."""
        return Attributes(*self[8:15])


@dataclass(frozen=True)
class ChainHead:
    """The last row of the trail (seq 0 and the genesis hash when it is empty), and the newest checkpoint a
    writer builds on (one it trusts: :class:`CheckpointTrust`)."""

    seq: int = 0
    row_hash: bytes = GENESIS
    checkpoint_seq: int = 0


class Unchained(NamedTuple):
    """A row before it is numbered and chained: everything of it that does not depend on the head, so it
    can be made before the chain lock is taken. Fields as :class:`TrailRow`'s, ``digest`` (SHA-256 of the
    record) in place of the number, hash and seal."""

    record: bytes
    digest: bytes
    topic: str
    partition: int
    offset: int
    kind: str
    event_id: str | None
    event_type: str | None
    subject: str | None
    correlation_id: str | None
    causation_id: str | None
    actor: str | None
    event_time: datetime | None
    recorded_at: datetime
    reuse: int


def unchained_rows(
    incoming: Iterable[Incoming], *, recorded_at: datetime, dead_letter_topic: str
) -> Iterator[Unchained]:
    """The head-independent part of each record's row, in order.

    Most records are decoded events with text headers: their meta and indexed copies are made inline (the
    same bytes as :func:`record_meta` and :meth:`Attributes.of`, checked by the unit tests); any other
    record takes the general path.
    """
    recorded_text = utc_text(recorded_at)
    # Rows are made with tuple.__new__ rather than _make, a Python-level call per row.
    sha256, dumps, make, ce_time = hashlib.sha256, orjson.dumps, tuple.__new__, _event_time
    # The newline after the meta comes from orjson, saving a copy of the record.
    option = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
    event, limit = Kind.EVENT.value, INDEX_TEXT_MAX
    for item in incoming:
        r = item.record
        headers: dict[str, Any] | None = None
        if item.decoded and item.error is None and not item.reuse and r.topic != dead_letter_topic:
            try:
                # A null value is left out, so the count below sends the record the general way.
                headers = {name: raw.decode() for name, raw in r.headers if raw is not None}
            except UnicodeDecodeError:  # a binary value
                headers = None
        if headers is None or len(headers) != len(r.headers) or is_structured(headers.get("content-type")):
            meta, kind = record_meta(item, recorded_at=recorded_text, dead_letter_topic=dead_letter_topic)
            record = encode_record(meta, r.value)
            yield make(
                Unchained,
                (
                    record,
                    sha256(record).digest(),
                    r.topic,
                    r.partition,
                    r.offset,
                    kind.value,
                    *Attributes.of(attribute_headers(meta, r.value)),
                    recorded_at,
                    item.reuse,
                ),
            )
            continue
        key: Any = r.key
        if key is not None:
            try:
                key = key.decode()
            except UnicodeDecodeError:
                key = _text_or_base64(key)
        value = r.value
        meta = {
            "error": None,
            "format": FORMAT,
            "headers": headers,
            "kafka": {
                "key": key,
                "offset": r.offset,
                "partition": r.partition,
                "timestamp_ms": r.timestamp_ms,
                "tombstone": value is None,
                "topic": r.topic,
            },
            "kind": event,
            "recorded_at": recorded_text,
        }
        record = dumps(meta, option=option)
        if value:
            record += value
        get = headers.get
        event_id, event_type, subject = get("ce_id"), get("ce_type"), get("ce_subject")
        correlation_id, causation_id, actor = get("ce_correlationid"), get("ce_causationid"), get("ce_actor")
        # One look at all the header text rather than one per copy: only when some header is long or
        # holds a NUL do the copies need cutting (_index_text leaves every other value as it is).
        texts = "".join(headers.values())
        if len(texts) > limit or "\x00" in texts:
            event_id, event_type, subject, correlation_id, causation_id, actor = map(
                _index_text, (event_id, event_type, subject, correlation_id, causation_id, actor)
            )
        when = ce_time(get("ce_time"))
        yield make(
            Unchained,
            (
                record,
                sha256(record).digest(),
                r.topic,
                r.partition,
                r.offset,
                event,
                event_id,
                event_type,
                subject,
                correlation_id or event_id,
                causation_id,
                actor,
                when,
                recorded_at,
                0,
            ),
        )


class PreparedRows:
    """Rows made ahead of their transaction (see :func:`unchained_rows`), by Kafka position, each taken
    once by the record it was made from; the oldest are forgotten beyond ``limit``."""

    def __init__(self, limit: int = 20_000) -> None:
        self.limit = limit
        self._rows: dict[tuple[str, int, int], tuple[Record, Unchained]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, records: Sequence[Record], rows: Iterable[Unchained]) -> None:
        """Keep the rows of these records (same order)."""
        held = self._rows
        for r, row in zip(records, rows, strict=True):
            held[(r.topic, r.partition, r.offset)] = (r, row)
        while len(held) > self.limit:
            del held[next(iter(held))]

    def take(self, record: Record) -> Unchained | None:
        """The row made from this very record, if any (a record read again at the same position is taken
        only if it is the same record)."""
        found = self._rows.pop((record.topic, record.partition, record.offset), None)
        if found is None or (found[0] is not record and found[0] != record):
            return None
        return found[1]


class ChainBuilder:
    """Numbers, chains and seals records after a head, one row at a time, so a writer can send the
    first rows while the next are built; ``head`` follows the last row built."""

    def __init__(
        self, head: ChainHead, *, recorded_at: datetime, sealer: Sealer, dead_letter_topic: str
    ) -> None:
        self.head = head
        self.recorded_at = recorded_at
        self.sealer = sealer
        self.dead_letter_topic = dead_letter_topic

    def rows(self, incoming: Iterable[Incoming], prepared: PreparedRows | None = None) -> Iterator[TrailRow]:
        """The trail rows of ``incoming``, in order; rows ``prepared`` for these very records are used
        as they are (their recorded_at is when they were prepared), the others are made here."""
        prev, seq = self.head.row_hash, self.head.seq
        # The chain step and the seal inline (chain_hash and Sealer.seal, byte for byte): a Python call per
        # row each is a sizeable share of what a row costs.
        sha256, keyed, pack_seq, make = hashlib.sha256, self.sealer.keyed, _SEQ.pack, tuple.__new__
        for row in self._unchained(incoming, prepared):
            seq += 1
            prev = sha256(b"".join((prev, pack_seq(seq), row[1]))).digest()
            sealing = keyed()
            sealing.update(prev)
            yield make(TrailRow, (seq, row[0], prev, sealing.digest(), *row[2:]))
        self.head = ChainHead(seq, prev, self.head.checkpoint_seq)

    def _unchained(self, incoming: Iterable[Incoming], prepared: PreparedRows | None) -> Iterator[Unchained]:
        at, dead_letter_topic = self.recorded_at, self.dead_letter_topic
        if not prepared:
            yield from unchained_rows(incoming, recorded_at=at, dead_letter_topic=dead_letter_topic)
            return
        for item in incoming:
            row = prepared.take(item.record)
            if row is None or item.reuse:  # prepared before the transaction knew the position was reused
                row = next(unchained_rows((item,), recorded_at=at, dead_letter_topic=dead_letter_topic))
            yield row


def chain_rows(
    head: ChainHead,
    incoming: Sequence[Incoming],
    *,
    recorded_at: datetime,
    sealer: Sealer,
    dead_letter_topic: str,
) -> list[TrailRow]:
    """Number, chain and seal records after ``head``, in the order given."""
    builder = ChainBuilder(head, recorded_at=recorded_at, sealer=sealer, dead_letter_topic=dead_letter_topic)
    return list(builder.rows(incoming))


class PartitionEnds:
    """The highest Kafka offset the trail holds in each partition (-1: none), as far as one writer knows:
    what it read under the chain lock and what it appended since, valid only at the head it left.

    Records beyond their partition's end are new, so a writer that knows the ends looks up only records at
    or below them (a redelivery). Another writer appending, a transaction rolled back after
    :meth:`left`, or a database restored to another state each show as a head other than the one left,
    and then nothing is known until read again. Ends known too high cost only an exact look-up; too low
    they could let a redelivered record through, which the head check rules out.
    """

    def __init__(self) -> None:
        self._head: tuple[int, bytes] | None = None
        self._ends: dict[tuple[str, int], int] = {}

    def at(self, head: ChainHead) -> dict[tuple[str, int], int]:
        """The ends known at ``head``, read under the chain lock; the caller adds the ends it reads."""
        if self._head != (head.seq, head.row_hash):
            self._head, self._ends = (head.seq, head.row_hash), {}
        return self._ends

    def left(self, head: ChainHead, appended: Iterable[Incoming]) -> None:
        """This writer appended ``appended`` after the head given to :meth:`at`, leaving ``head``."""
        ends = self._ends
        for item in appended:
            r = item.record
            key = (r.topic, r.partition)
            end = ends.get(key)
            if end is None:
                continue  # a partition not read under the lock stays unknown
            if r.offset > end:
                ends[key] = r.offset
        self._head = (head.seq, head.row_hash)


class SealedHead:
    """The head one writer left, when it knows every row since the newest checkpoint up to it bears this
    trail's seal: rows it appended onto such a head itself, or rows whose seals it checked.

    A checkpoint vouches for every row up to it, and verification checks the seals only of rows no
    checkpoint vouches for: a checkpoint signed over rows rewritten in the database (their hashes
    recomputed, which needs no key) would hide them for good. So a writer signs only once it knows the
    rows since the newest checkpoint are sealed. Under a head it left, it knows; any other head read under
    the chain lock (another writer, a rolled-back transaction, a restart, rows changed in the database)
    is unknown, and the seals since the newest checkpoint are checked before the next checkpoint. A row
    changed below a head left as it was breaks the chain at the head at the latest, which verification
    finds without seals.
    """

    def __init__(self) -> None:
        self._head: tuple[int, bytes] | None = None
        self._unsealed: tuple[int, int] | None = None

    def unsealed(self, checkpoint_seq: int) -> int | None:
        """The row found without its seal since the checkpoint at ``checkpoint_seq``, if this writer found
        one: while that is still the newest checkpoint, every later one is refused without reading again."""
        if self._unsealed is not None and self._unsealed[0] == checkpoint_seq:
            return self._unsealed[1]
        return None

    def found_unsealed(self, checkpoint_seq: int, seq: int) -> None:
        """Row ``seq``, after the checkpoint at ``checkpoint_seq``, does not bear the trail's seal."""
        self._unsealed = (checkpoint_seq, seq)

    def knows(self, head: ChainHead) -> bool:
        """Whether ``head``, read under the chain lock, is one this writer left with its rows sealed."""
        return self._head == (head.seq, head.row_hash)

    def left(self, head: ChainHead) -> None:
        """This writer left ``head`` with every row since the newest checkpoint known sealed."""
        self._head = (head.seq, head.row_hash)


class Refusal(StrEnum):
    """Why a checkpoint of a head was not signed."""

    UNSEALED = "unsealed"
    """A row since the newest trusted checkpoint does not bear the trail's seal."""
    TAKEN = "taken"
    """Its sequence holds a checkpoint row this writer did not sign (written in the database)."""


class RefusedHead:
    """The head the timed checkpoint was last refused at, and why, so that the next tick does not try the
    same checkpoint again.

    With no row arriving, the timer meets the very head it was refused at every ``checkpoint_every_s``: the
    seals since the checkpoint read again, found wanting again and logged again, or the same sequence,
    held by a forged row, tried and logged again, for as long as the trail stayed idle. The refusal holds
    while what it was decided on stays: the head (its sequence and row hash, which commits to every row
    before it), the trusted checkpoint it builds on and the newest checkpoint row the database holds, as
    read under the chain lock. Any of them moving (rows appended, a checkpoint signed, the forged row
    deleted, the trail restored) makes the next tick try again. Remembering only ever refuses, so it can
    never let a checkpoint through that a fresh attempt would refuse.
    """

    def __init__(self) -> None:
        self._at: tuple[ChainHead, StoredCheckpoint | None] | None = None
        self._why: Refusal | None = None

    def at(self, head: ChainHead, newest: StoredCheckpoint | None) -> Refusal | None:
        """Why a checkpoint of ``head``, under the database's ``newest`` checkpoint, was refused before; None
        when it was not tried there."""
        return self._why if self._at == (head, newest) else None

    def refused(self, head: ChainHead, newest: StoredCheckpoint | None, why: Refusal) -> None:
        """A checkpoint of ``head``, under the database's ``newest`` checkpoint, was refused for ``why``."""
        self._at, self._why = (head, newest), why


KafkaContent = tuple[bytes, bytes]
"""What tells a record read at a Kafka position from another record at the same position: its key,
timestamp, tombstone flag and headers (as the trail stores them, one line of JSON) and the SHA-256 of its
value. A redelivery is the very same record, so all of them match; a record at a position used again (the
topic deleted and created again, a log truncated by an unclean leader election) is another record, and
differs at least in its timestamp. ``recorded_at``, which the stored record also holds, is not part of it:
each reading would have its own."""


def kafka_content(meta: Mapping[str, Any], value_digest: bytes) -> KafkaContent:
    """The :data:`KafkaContent` of a stored record, from its meta and the SHA-256 of its value."""
    kafka = meta["kafka"]
    identity = [kafka["key"], kafka["timestamp_ms"], kafka["tombstone"], meta["headers"]]
    return orjson.dumps(identity, option=orjson.OPT_SORT_KEYS), value_digest


def record_content(record: Record) -> KafkaContent:
    """The :data:`KafkaContent` of a record as read from Kafka (the same bytes as :func:`kafka_content` of
    the record the trail would store)."""
    identity = [
        _text_or_base64(record.key),
        record.timestamp_ms,
        record.value is None,
        _headers_json(record.headers),
    ]
    value_digest = hashlib.sha256(record.value or b"").digest()
    return orjson.dumps(identity, option=orjson.OPT_SORT_KEYS), value_digest


HeldAt = list[tuple[int, KafkaContent | None]]
"""The records the trail holds at one Kafka position: each one's reuse number and content (None for a row
whose record cannot be read: changed in the database, which verification names)."""


def new_positions(
    incoming: Sequence[Incoming],
    held: Mapping[KafkaPosition, HeldAt],
    positions: Sequence[KafkaPosition] | None = None,
) -> list[Incoming]:
    """The records the trail does not hold yet, in order: a redelivery adds nothing.

    A record at a position the trail (or this batch) holds is a redelivery only if it is the very record
    held there (:data:`KafkaContent`). Another record at a taken position is new: it comes back with its
    ``reuse``, one more than the highest held there. ``held`` is what the trail holds at these positions,
    ``positions`` the records' positions in the same order, when the caller has them already.
    """
    if positions is None:
        positions = [KafkaPosition(i.record.topic, i.record.partition, i.record.offset) for i in incoming]
    if not held and len(set(positions)) == len(positions):
        return list(incoming)  # the usual batch: nothing seen before, nothing twice
    # Contents are worked out only at taken positions: a record first seen in this batch is kept as it is
    # until another record of the batch lands on its position.
    taken: dict[KafkaPosition, list[tuple[int, KafkaContent | Record | None]]] = {
        p: list(at) for p, at in held.items()
    }
    fresh = []
    for item, position in zip(incoming, positions, strict=True):
        at = taken.get(position)
        if at is None:
            taken[position] = [(item.reuse, item.record)]
            fresh.append(item)
            continue
        content = record_content(item.record)
        if any((record_content(c) if isinstance(c, Record) else c) == content for _, c in at):
            continue
        reuse = max(n for n, _ in at) + 1
        at.append((reuse, content))
        fresh.append(item._replace(reuse=reuse))
    return fresh


UNINDEXED_TOPICS = frozenset({PREDICTIONS_TOPIC})
"""Topics whose rows the event-id index leaves out (migration 0002 names them): serving produces predictions
directly, never re-sent through an outbox, and they are most rows."""


def event_id_of(record: Record) -> str | None:
    """The record's CloudEvents id (its ``ce_id`` header, or the ``id`` of an event in structured mode) as
    the trail indexes it, if it has one."""
    event_id = _header_text(record, "ce_id")
    if event_id is None and is_structured(_header_text(record, "content-type")):
        event_id = structured_headers(record.value).get("ce_id")
    return None if event_id is None else _index_text(event_id)


def _header_text(record: Record, name: str) -> str | None:
    """The first header of that name as text; None if there is none or it is not UTF-8."""
    for header, raw in record.headers:
        if header == name:
            try:
                return raw.decode() if raw is not None else None
            except UnicodeDecodeError:
                return None
    return None


HeldEvent = tuple[bytes, bytes]
"""What makes a record a re-sent copy of a row holding its (topic, event id): all of its headers (as the
trail stores them, keys sorted) and the SHA-256 of its value (of nothing for a tombstone). A relay that sends
a batch again sends the very same headers; two consumers' dead letters of one event differ in their
``dlq_*`` headers, two publishers' events in ``ce_source``, two ids in their full ``ce_id`` (the index keeps
512 characters). The value goes by its digest, as in :data:`KafkaContent`: the database hashes a held one,
so a look-up never brings back a record, which can be as large as the broker's largest message."""


def held_event(meta: Mapping[str, Any], value_digest: bytes) -> HeldEvent:
    """The :data:`HeldEvent` of a stored record, from its meta and the SHA-256 of the bytes stored after it
    (a tombstone's, whatever they are, count as none, as :func:`decode_record` reads them)."""
    digest = _NO_VALUE_DIGEST if meta["kafka"]["tombstone"] else value_digest
    return orjson.dumps(meta["headers"], option=orjson.OPT_SORT_KEYS), digest


_NO_VALUE_DIGEST = hashlib.sha256(b"").digest()


def _incoming_event(record: Record) -> HeldEvent:
    headers = orjson.dumps(_headers_json(record.headers), option=orjson.OPT_SORT_KEYS)
    return headers, hashlib.sha256(record.value or b"").digest()


def event_keys(incoming: Sequence[Incoming]) -> list[tuple[str, str] | None]:
    """(topic, event id) of each record the trail checks for re-sent copies, None for the others; in the
    order of ``incoming``."""
    return [_event_key(item.record) for item in incoming]


def _event_key(record: Record) -> tuple[str, str] | None:
    if record.topic in UNINDEXED_TOPICS:
        return None
    event_id = event_id_of(record)
    return None if event_id is None else (record.topic, event_id)


def without_resent_copies(
    incoming: Sequence[Incoming],
    keys: Sequence[tuple[str, str] | None],
    held: Mapping[tuple[str, str], Sequence[HeldEvent]],
) -> list[Incoming]:
    """The records that are not a re-sent copy of an event the trail, or this batch, already holds.

    ``keys`` are :func:`event_keys` of ``incoming``. An outbox relay that dies (or loses its database)
    between handing a batch to the broker and marking it sent sends the batch again: new Kafka positions,
    the same records — same topic, byte-identical headers and value. The trail keeps the first. A record
    that shares an id with another but differs in any header (another source, another consumer's dead
    letter) or in its value is not a copy; it is kept, and a query by that id shows both.
    """
    seen: dict[tuple[str, str], set[HeldEvent]] = {k: set(v) for k, v in held.items()}
    # A record can be a copy only of one held or of another in this batch: only those are hashed.
    in_batch = Counter(key for key in keys if key is not None)
    kept = []
    for item, key in zip(incoming, keys, strict=True):
        if key is not None and (key in seen or in_batch[key] > 1):
            events = seen.setdefault(key, set())
            event = _incoming_event(item.record)
            if event in events:
                continue
            events.add(event)
        kept.append(item)
    return kept


# --- keys: seals and signed checkpoints -------------------------------------------------------------


def key_id_of(public_raw: bytes) -> str:
    """First 16 hex digits of SHA-256 of the raw public key (AuditCheckpoint.key_id)."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def public_key_raw(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class Sealer:
    """Keyed BLAKE2b over a row hash, with a key derived from the signing key's seed."""

    def __init__(self, seed: bytes) -> None:
        # Keyed once; each seal copies the keyed state instead of keying again.
        self._keyed = hashlib.blake2b(key=hashlib.sha256(SEAL_DOMAIN + seed).digest(), digest_size=16)
        self.keyed = self._keyed.copy
        """A keyed hash ready for one row hash: ``seal(h)`` is ``keyed()`` updated with ``h``, digested."""

    def seal(self, row_hash: bytes) -> bytes:
        """16 bytes only the holder of the signing key can make for this row hash."""
        h = self._keyed.copy()
        h.update(row_hash)
        return h.digest()


class Signer:
    """Signs checkpoints with the Ed25519 key of this trail and seals rows with a key derived from it."""

    def __init__(self, seed: bytes) -> None:
        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_raw = public_key_raw(self._private.public_key())
        self.key_id = key_id_of(self.public_raw)
        self.sealer = Sealer(seed)

    @property
    def public_key_b64(self) -> str:
        """The public key, raw 32 bytes in base64: what outside verifiers pin."""
        return base64.b64encode(self.public_raw).decode()

    def checkpoint(self, head: ChainHead, *, signed_at: datetime) -> AuditCheckpoint:
        """A signed checkpoint of ``head`` (seq >= 1: every row up to it is covered)."""
        head_hex = head.row_hash.hex()
        signed_at = signed_at.astimezone(UTC)
        signature = self._private.sign(checkpoint_signing_input(head.seq, head_hex, head.seq, signed_at))
        return AuditCheckpoint(
            sequence=head.seq,
            head_hash=head_hex,
            row_count=head.seq,
            signed_at=signed_at,
            key_id=self.key_id,
            signature=base64.b64encode(signature).decode(),
        )


class NotACheckpoint(NamedTuple):
    """A row of the checkpoints table whose columns are not a checkpoint (written in the database), as a
    verification reads it: it vouches for nothing, and is named ``bad-checkpoint`` at its sequence, as a
    forged checkpoint is."""

    sequence: int
    why: str

    @property
    def signature(self) -> str:
        """It has none: the merge of the checkpoint sources keeps it apart by its sequence (the database holds
        one row per sequence)."""
        return ""


class KeyRing:
    """The public keys a verifier trusts, by key id."""

    def __init__(self, public_keys: Iterable[bytes]) -> None:
        self._raw = {key_id_of(raw): raw for raw in public_keys}
        self.keys = {key_id: Ed25519PublicKey.from_public_bytes(raw) for key_id, raw in self._raw.items()}

    def public_keys(self) -> dict[str, str]:
        """key id -> raw public key in base64."""
        return {key_id: base64.b64encode(raw).decode() for key_id, raw in self._raw.items()}

    def check(self, checkpoint: AuditCheckpoint | NotACheckpoint) -> str | None:
        """None when the signature is good, else why not."""
        if isinstance(checkpoint, NotACheckpoint):
            return f"its row is not a checkpoint (written in the database): {checkpoint.why}"
        key = self.keys.get(checkpoint.key_id)
        if key is None:
            return (
                f"it is signed by key {checkpoint.key_id}, which is not trusted here, so it vouches for "
                "nothing (if it is a retired key of this trail, add its public key to "
                "DRIFTLOOP_AUDIT_TRUSTED_PUBLIC_KEYS, or give it to driftloop audit verify --public-key)"
            )
        try:
            key.verify(base64.b64decode(checkpoint.signature), checkpoint.signing_input())
        except (InvalidSignature, binascii.Error, ValueError):
            return "its signature does not match its contents (forged or altered)"
        if checkpoint.row_count != checkpoint.sequence:
            return f"it claims {checkpoint.row_count} rows up to sequence {checkpoint.sequence}"
        return None


class StoredCheckpoint(NamedTuple):
    """A row of the checkpoints table: its sequence, the checkpoint (None: the row's columns are not one,
    which only a row written in the database can be; ``why`` says what is wrong), and the trail's row hash
    at its sequence (None: the trail has no such row, or its hash was nulled)."""

    seq: int
    checkpoint: AuditCheckpoint | None
    row_hash: bytes | None
    why: str | None = None

    @property
    def sequence(self) -> int:
        """Its sequence, under the name the pages of checkpoints go by (``core.checkpoint_pages``)."""
        return self.seq

    @property
    def signature(self) -> str:
        """The checkpoint's signature ("" for a row that is not one): the database holds one row per
        sequence, so the merge of the pages keeps each apart by its sequence."""
        return "" if self.checkpoint is None else self.checkpoint.signature


def _identity(checkpoint: AuditCheckpoint | None, seq: int = 0) -> tuple[Any, ...]:
    if checkpoint is None:
        return (seq, None)
    return (
        checkpoint.sequence,
        checkpoint.head_hash,
        checkpoint.row_count,
        checkpoint.signed_at,
        checkpoint.key_id,
        checkpoint.signature,
    )


class CheckpointTrust:
    """Which checkpoints of the database one writer builds on: those signed over their own contents by a key
    of ``keys`` (its own and the retired ones it is configured with) whose head hash is the trail's row
    hash at their sequence.

    A row of the checkpoints table is only a row: whoever can rewrite the trail's rows (the threat the trail
    is built against) can insert one. A writer that took the newest row for a checkpoint stopped signing for
    good under one forged far ahead, and, under one forged at the head, checked the seals only of the rows
    after it before signing the next, so rows rewritten below it were vouched for (the forged row deleted
    afterwards). A checkpoint found good is not checked again while it is read back as it was, so a writer
    pays one signature check per checkpoint, not per transaction; the trusted one a writer fell back to under
    an untrusted newest is remembered too, and confirmed by one read while that newest stays.
    """

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys
        self._good: tuple[Any, ...] | None = None
        self._fallback: tuple[tuple[Any, ...], int] | None = None
        self._refused: set[tuple[Any, ...]] = set()

    def distrust(self, stored: StoredCheckpoint) -> str | None:
        """Why ``stored`` vouches for nothing here (a writer must not build on it, nor copy it to the
        checkpoint file), None when it does."""
        _, checkpoint, row_hash, unreadable = stored
        if checkpoint is None:
            return f"its row is not a checkpoint: {unreadable}"
        identity = _identity(checkpoint)
        if identity != self._good:
            why = self.keys.check(checkpoint)
            if why is not None:
                return why
        if row_hash is None:
            return f"the trail has no row {checkpoint.sequence} (or its hash was nulled) for it to match"
        if row_hash.hex() != checkpoint.head_hash:
            return f"its head hash is not the hash of the trail's row {checkpoint.sequence}"
        self._good = identity
        return None

    def signed(self, checkpoint: AuditCheckpoint) -> None:
        """This writer kept ``checkpoint``, which it signed over a head read under the chain lock: the newest
        it trusts, above any it fell back to."""
        self._good = _identity(checkpoint)
        if self._fallback is not None:
            self._fallback = (self._fallback[0], checkpoint.sequence)

    def fallback(self, newest: StoredCheckpoint) -> int | None:
        """The sequence of the trusted checkpoint this writer fell back to when it met the untrusted
        ``newest`` before (0: none), to be confirmed still there before it is built on; None when it has not
        met ``newest``."""
        if self._fallback is not None and self._fallback[0] == _identity(newest.checkpoint, newest.seq):
            return self._fallback[1]
        return None

    def fell_back(self, newest: StoredCheckpoint, trusted_seq: int) -> None:
        """Under the untrusted ``newest``, the newest trusted checkpoint is at ``trusted_seq`` (0: none)."""
        self._fallback = (_identity(newest.checkpoint, newest.seq), trusted_seq)

    def refused(self, stored: StoredCheckpoint) -> bool:
        """Note an untrusted checkpoint not copied to the file; whether it is the first time (it is logged and
        counted once, though read again on every copy while no newer trusted one passes it)."""
        identity = _identity(stored.checkpoint, stored.seq)
        if identity in self._refused:
            return False
        self._refused.add(identity)
        return True

    def passed(self, seq: int) -> None:
        """The checkpoint file holds a checkpoint at ``seq``: those refused up to it are never read again."""
        self._refused = {r for r in self._refused if r[0] > seq}


def checkpoint_due(head_seq: int, last_checkpoint_seq: int, every_rows: int) -> bool:
    """Enough rows since the last checkpoint to sign a new one."""
    return head_seq - last_checkpoint_seq >= every_rows


# --- rows as read back ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRow:
    """A trail row as read back: the hashed record plus the indexed copies of its fields.

    ``record`` and ``row_hash`` are typed as the trail writes them; read back, either can be None when a
    superuser nulled it (constraints dropped first), and the readers check for that."""

    seq: int
    record: bytes
    row_hash: bytes
    topic: str
    partition: int
    offset: int
    kind: str
    attributes: Attributes
    recorded_at: datetime
    reuse: int = 0


_ATTRIBUTE_COLUMNS = (
    "event_id",
    "event_type",
    "subject",
    "correlation_id",
    "causation_id",
    "actor",
    "event_time",
)


def column_mismatch(row: StoredRow) -> str | None:
    """Which indexed column disagrees with the row's (hashed) record, if any."""
    if row.record is None:
        return "record"
    try:
        meta, value = decode_record(row.record)
        kafka = meta["kafka"]
        expected = {
            "topic": kafka["topic"],
            "kafka_partition": kafka["partition"],
            "kafka_offset": kafka["offset"],
            "kafka_reuse": kafka.get("reuse", 0),
            "kind": meta["kind"],
            "recorded_at": _parse_time(meta["recorded_at"]),
        }
        derived = Attributes.of(attribute_headers(meta, value))
    except (ValueError, KeyError, TypeError, AttributeError):  # JSON, but not the meta of a record
        # As event_view reads it: headers that are no object (AttributeError) failed a full verification.
        return "record"
    actual = {
        "topic": row.topic,
        "kafka_partition": row.partition,
        "kafka_offset": row.offset,
        "kafka_reuse": row.reuse,
        "kind": row.kind,
        "recorded_at": row.recorded_at,
    }
    for name, value in expected.items():
        if actual[name] != value:
            return name
    for name in _ATTRIBUTE_COLUMNS:
        if getattr(row.attributes, name) != getattr(derived, name):
            # A row recorded before the trail read ce_time as the bus does holds the copy made then.
            if name == "event_time" and row.attributes.event_time == _parse_time(
                _first_text(meta["headers"], "ce_time")
            ):
                continue
            return name
    return None


# --- reading the trail: events, causal trees, cursors ------------------------------------------------


_LONG_INTEGER = re.compile(rb"[0-9]{19}")


def _json_value(value: bytes) -> Any:
    """A record's JSON value, its integers exactly as recorded. orjson reads an integer beyond 64 bits (from
    19 digits on) as a float, which would show an audit-log reader another number than the one the trail
    holds; a value with such a run of digits (perhaps inside a string or a fraction, where both read it
    the same) is read by Python's json instead, which keeps every integer. Raises JSONDecodeError when the
    value is not strict JSON."""
    data = orjson.loads(value)
    if _LONG_INTEGER.search(value) is None:
        return data
    try:
        return json.loads(value)
    except RecursionError:  # orjson reads 1,024 levels, Python's json fewer: keep orjson's reading
        return data


DATA_MAX_DEPTH = 128
"""The deepest JSON value shown as an event's ``data``; a deeper one is shown as ``value``, its text. The
response's serializer refuses values nested about 255 levels (a trace's own nesting, up to
:data:`MAX_NESTING` events, counts too), and any producer can send JSON 1,000 levels deep: every page
holding it would be a 500."""


def _deeper_than(limit: int, value: bytes, data: Any) -> bool:
    """Whether ``data`` (read from ``value``) nests more than ``limit`` arrays and objects deep."""
    if value.count(b"[") + value.count(b"{") <= limit:
        return False  # it cannot nest deeper than it has brackets (those in strings counted too)
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def event_view(row: StoredRow) -> dict[str, Any]:
    """A row for people and programs: every field comes from the hashed record, none from the copies; a
    row whose record cannot be read (changed in the database) is flagged ``unreadable``."""
    if row.record is None:
        return _unreadable_view(row, "the row has no record")
    try:
        return _record_view(row, *decode_record(row.record))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSON, but not the meta of a record
        return _unreadable_view(row, f"its record is not a record ({exc.__class__.__name__}: {exc})")


def checked_view(row: StoredRow, *, traffic_data: bool = True) -> dict[str, Any]:
    """:func:`event_view`, flagged ``integrity`` when an indexed copy disagrees with the hashed record: the
    row was found (by a query or a trace) through a copy that no longer says what the record says. Without
    ``traffic_data`` a traffic row's payload is withheld (:func:`withhold_traffic`)."""
    view = event_view(row)
    column = None if "unreadable" in view else column_mismatch(row)
    if column is not None:
        view["integrity"] = f"indexed column {column} does not match the hashed record"
    return view if traffic_data else withhold_traffic(view)


TRAFFIC_TOPICS = frozenset({PREDICTIONS_TOPIC, FEEDBACK_TOPIC})
"""Topics whose events carry traffic data: each request's inputs and outputs (PredictionsLogged), labels
(GroundTruthReceived), often personal data. The trail shows it to callers granted the auditor role only."""

_TRAFFIC_EVENT_NAMES = frozenset(
    event.event_name or event.__name__ for topic in TRAFFIC_TOPICS for event in TOPICS[topic].events
)

DATA_WITHHELD = "traffic data (inputs, outputs, labels) needs the auditor role"


def carries_traffic(view: Mapping[str, Any]) -> bool:
    """Whether a row's payload is traffic data: read from a traffic topic, a dead letter of a record read
    from one (whose value is that record's), or any record whose type names a traffic event."""
    topic = view["topic"]
    if view["kind"] == Kind.DEAD_LETTER:
        topic = _first_text(view.get("headers") or {}, "dlq_origin_topic")
    name = (view["type"] or "").removeprefix(TYPE_PREFIX).rpartition(".v")[0]
    return topic in TRAFFIC_TOPICS or name in _TRAFFIC_EVENT_NAMES


def withhold_traffic(view: dict[str, Any]) -> dict[str, Any]:
    """``view`` with a traffic row's payload (``data``, and ``value`` where the record has one) replaced by
    null and ``data_withheld`` saying why; every other field, the hash included, as it was, so the reader
    still sees that the event happened and where it sits in the chain. So are the texts that say why a
    record was refused (the error's ``detail``, a dead letter's ``dlq_error`` header), which may quote it
    (a value that did not validate, a handler's message): their reason stays."""
    if carries_traffic(view):
        view["data"] = None
        if "value" in view:
            view["value"] = None
        if (error := view.get("error")) and "detail" in error:
            view["error"] = {**error, "detail": DATA_WITHHELD}
        if (headers := view.get("headers")) and "dlq_error" in headers:
            view["headers"] = {**headers, "dlq_error": DATA_WITHHELD}
        view["data_withheld"] = DATA_WITHHELD
    return view


_VIEW_FIELDS = (
    "recorded_at",
    "kind",
    "topic",
    "partition",
    "offset",
    "key",
    "id",
    "type",
    "source",
    "subject",
    "time",
    "correlationid",
    "causationid",
    "actor",
    "data",
    "error",
)


def _unreadable_view(row: StoredRow, why: str) -> dict[str, Any]:
    """Only what the row has besides its record: the fields a record would give are null, never taken
    from the indexed copies, and ``unreadable`` says why."""
    return {
        "seq": row.seq,
        "row_hash": row.row_hash.hex() if row.row_hash is not None else None,
        **dict.fromkeys(_VIEW_FIELDS),
        "unreadable": f"row {row.seq} cannot be read: {why}. The row was changed in the database; "
        "GET /v1/verify names the first changed row",
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_meta(meta: Any) -> None:
    """ValueError saying how a record's meta differs from what the trail writes (:func:`record_meta`), in
    the fields a view shows: a record replaced in the database by JSON of another shape."""
    kafka, error = meta["kafka"], meta["error"]
    expected = [
        ("headers", isinstance(meta["headers"], dict)),
        ("kind", isinstance(meta["kind"], str)),
        ("recorded_at", isinstance(meta["recorded_at"], str)),
        ("kafka", isinstance(kafka, dict)),
        ("kafka.topic", isinstance(kafka["topic"], str)),
        ("kafka.partition", _is_int(kafka["partition"])),
        ("kafka.offset", _is_int(kafka["offset"])),
        ("kafka.reuse", _is_int(kafka.get("reuse", 0))),
        (
            "error",
            error is None or (isinstance(error, dict) and all(isinstance(v, str) for v in error.values())),
        ),
    ]
    wrong = [name for name, good in expected if not good]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} of another type than the trail writes")


def _record_view(row: StoredRow, meta: dict[str, Any], value: bytes | None) -> dict[str, Any]:
    _check_meta(meta)
    headers = attribute_headers(meta, value)
    kafka = meta["kafka"]
    data: Any = None
    raw_value: Any = None
    if value is not None:
        try:
            data = _json_value(value)
        except orjson.JSONDecodeError:
            raw_value = _text_or_base64(value)
        else:
            if isinstance(data, (dict, list)) and _deeper_than(DATA_MAX_DEPTH, value, data):
                data, raw_value = None, _text_or_base64(value)
            elif headers is not meta["headers"] and isinstance(data, dict):
                data = data.get("data")  # a structured event: its payload; its attributes are read apart
    view: dict[str, Any] = {
        "seq": row.seq,
        "row_hash": row.row_hash.hex() if row.row_hash is not None else None,
        "recorded_at": meta["recorded_at"],
        "kind": meta["kind"],
        "topic": kafka["topic"],
        "partition": kafka["partition"],
        "offset": kafka["offset"],
        "key": kafka["key"],
        "id": _first_text(headers, "ce_id"),
        "type": _first_text(headers, "ce_type"),
        "source": _first_text(headers, "ce_source"),
        "subject": _first_text(headers, "ce_subject"),
        "time": _first_text(headers, "ce_time"),
        "correlationid": _first_text(headers, "ce_correlationid") or _first_text(headers, "ce_id"),
        "causationid": _first_text(headers, "ce_causationid"),
        "actor": _first_text(headers, "ce_actor"),
        "data": data,
        "error": meta["error"],
    }
    if "reuse" in kafka:
        view["reuse"] = kafka["reuse"]
    if meta["kind"] != Kind.EVENT:
        view["headers"] = meta["headers"]
        view["value"] = raw_value
    elif raw_value is not None:
        view["value"] = raw_value
    return view


@dataclass
class TraceNode:
    """One event of a cascade and the events it caused."""

    view: dict[str, Any]
    children: list[TraceNode] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """Nested JSON; the view's fields plus dead_letters and children."""
        return {
            **self.view,
            "dead_letters": self.dead_letters,
            "children": [c.as_json() for c in self.children],
        }


def _depth(roots: Sequence[TraceNode]) -> int:
    deepest, stack = 0, [(r, 1) for r in roots]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((c, level + 1) for c in node.children)
    return deepest


MAX_NESTING = 100
"""Deeper causal chains come back flat (each event names its parent), so any JSON parser reads them."""


@dataclass(frozen=True)
class TraceCut:
    """Why a trace holds fewer events than its cascade: the bound that cut it (the setting's name) and a
    sentence saying so to people."""

    by: str
    reason: str


def causal_tree(
    correlation_id: str, rows: Sequence[StoredRow], *, truncation: TraceCut | None, traffic_data: bool = True
) -> dict[str, Any]:
    """The cascade of one correlation id as a tree built from causationid links, in trail order;
    ``truncation`` says why events of the cascade after ``rows`` were left out.

    Dead letters hang off the event they carry. An event whose cause is not in the cascade (not recorded
    yet, or outside the trail) becomes a root with ``cause_missing`` set. Causationid links that go round
    in a loop (an event caused by itself, or A by B and B by A) are cut where the loop's earliest event in
    the trail names its cause: that event becomes a root with ``cause_cycle`` set, so every event of the
    cascade is in the tree exactly once.
    """
    nodes: dict[str, TraceNode] = {}
    order: list[TraceNode] = []
    dead: list[dict[str, Any]] = []
    for row in rows:
        view = checked_view(row, traffic_data=traffic_data)
        if view["kind"] == Kind.DEAD_LETTER:
            dead.append(view)
            continue
        node = TraceNode(view)
        order.append(node)
        if view["id"] is not None and view["id"] not in nodes:
            nodes[view["id"]] = node
    roots: list[TraceNode] = []
    parents: dict[int, TraceNode] = {}  # by id() of the child
    for node in order:
        cause = node.view["causationid"]
        parent = nodes.get(cause) if cause is not None else None
        if parent is node:
            node.view["cause_cycle"] = cause
            roots.append(node)
        elif parent is not None:
            parent.children.append(node)
            parents[id(node)] = parent
        else:
            if cause is not None:
                node.view["cause_missing"] = cause
            roots.append(node)
    reached = _reached(roots)
    for node in order:
        if id(node) in reached:
            continue
        # Only a loop keeps an event out of reach of every root, but this event may merely hang off it:
        # follow its causes until one repeats, and cut the loop at its earliest event.
        path: list[TraceNode] = []
        seen: set[int] = set()
        walker = node
        while id(walker) not in seen:
            seen.add(id(walker))
            path.append(walker)
            walker = parents[id(walker)]
        loop = path[next(i for i, n in enumerate(path) if n is walker) :]
        cut = min(loop, key=lambda n: n.view["seq"])
        parent = parents.pop(id(cut))
        parent.children = [c for c in parent.children if c is not cut]
        cut.view["cause_cycle"] = cut.view["causationid"]
        roots.append(cut)
        reached |= _reached([cut])
    roots.sort(key=lambda n: n.view["seq"])
    orphans = []
    for letter in dead:
        carrier = nodes.get(letter["id"]) if letter["id"] is not None else None
        if carrier is not None:
            carrier.dead_letters.append(letter)
        else:
            orphans.append(letter)
    result: dict[str, Any] = {
        "correlation_id": correlation_id,
        "events": len(order),
        "truncated": truncation is not None,
        "truncated_by": truncation.by if truncation is not None else None,
        "truncated_reason": truncation.reason if truncation is not None else None,
        "dead_letters": orphans,
    }
    if _depth(roots) > MAX_NESTING:
        result["flat"] = [
            {
                **n.view,
                "parent": parents[id(n)].view["id"] if id(n) in parents else None,
                "dead_letters": n.dead_letters,
            }
            for n in order
        ]
    else:
        result["roots"] = [r.as_json() for r in roots]
    return result


def _reached(roots: Iterable[TraceNode]) -> set[int]:
    """id() of every node in the trees under ``roots``."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.children)
    return seen


@dataclass(frozen=True)
class EventQuery:
    """Filters of an events query; every given filter must hold. ``after``/``before`` come from a cursor."""

    model: str | None = None
    event_type: str | None = None
    actor: str | None = None
    correlation_id: str | None = None
    kind: Kind | None = None
    since: datetime | None = None
    until: datetime | None = None
    newest_first: bool = True
    after: int | None = None
    before: int | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        for name, value in (
            ("model", self.model),
            ("type", self.event_type),
            ("actor", self.actor),
            ("correlation_id", self.correlation_id),
        ):
            check_indexed_filter(name, value)


def check_indexed_filter(name: str, value: str | None) -> None:
    """422 for a filter on an indexed attribute that is longer than the index holds: it could never match.
    Only an undecodable record has an attribute that long (the envelope refuses them); its indexed copy holds
    the first :data:`INDEX_TEXT_MAX` characters, which find it. An empty filter is 422 too: it is a filter
    left blank (``?model=``), not one left out, and would answer an empty page as if nothing matched."""
    if value == "":
        raise InvalidInput(
            f"{name} is empty: give a value to match, or leave {name} out to match every event", field=name
        )
    if value is not None and len(value) > INDEX_TEXT_MAX:
        raise InvalidInput(
            f"{name} is longer than {INDEX_TEXT_MAX} characters: the trail indexes an attribute by its "
            f"first {INDEX_TEXT_MAX} (only an undecodable record has a longer one); query by its first "
            f"{INDEX_TEXT_MAX}",
            field=name,
        )


def event_type_filter(value: str | None) -> str | None:
    """Accept the wire type (``io.driftloop.DriftDetected.v1``) or the bare name (``DriftDetected``)."""
    if not value or "." in value:  # None, or the empty text that check_indexed_filter refuses
        return value
    return f"io.driftloop.{value}.v1"


def encode_cursor(newest_first: bool, seq: int) -> str:
    """An opaque cursor for the page after the row ``seq``."""
    raw = f"{'d' if newest_first else 'a'}{seq}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_CURSOR_TEXT = re.compile(r"[ad][1-9][0-9]{0,18}")
"""What :func:`encode_cursor` writes inside the base64: the order, then a sequence number without sign,
space or leading zero."""


def decode_cursor(cursor: str, *, newest_first: bool) -> int:
    """The sequence number inside a cursor; 422 when it was not made by this list in this order."""
    try:
        # validate=True: a character outside the URL-safe alphabet is an error, not skipped.
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError, as is a non-ASCII cursor
        raw = ""
    if _CURSOR_TEXT.fullmatch(raw) is None or int(raw[1:]) > SEQ_MAX:
        raise InvalidInput("cursor is not valid: pass the next_cursor of a previous page", field="cursor")
    if raw[0] != ("d" if newest_first else "a"):
        raise InvalidInput(
            "cursor belongs to the other sort order: pass the next_cursor of this list", field="cursor"
        )
    return int(raw[1:])


EVENT_TIME_FORM = (
    "an ISO 8601 (RFC 3339) date and time with its time zone, e.g. 2025-01-01T00:00:00Z or "
    "2025-01-01T01:00:00.5+01:00"
)
"""What ``since`` and ``until`` of an events query must look like, as the 422 says it."""

_EVENT_TIME_TEXT = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]+)?)?"
    r"(?P<zone>[Zz]|[+-][0-9]{2}:?[0-9]{2})?"
)
"""A date and a time of day, seconds and their fraction optional, then the zone (checked apart, to say that
it is missing)."""

_NUMBER_TEXT = re.compile(r"\s*[+-]?[0-9]+(?:\.[0-9]*)?\s*")
_PLUS_READ_AS_SPACE = re.compile(r" ([0-9]{2}:?[0-9]{2})$")
"""A zone offset after a space: what ``+01:00`` becomes in a query string that was not %-encoded."""


def event_time(name: str, text: str) -> datetime:
    """``since`` or ``until`` of an events query: :data:`EVENT_TIME_FORM`, nothing else. A number is refused
    rather than read as Unix time (audit-log consumers and the trail itself speak ISO 8601; ``12`` is more
    likely a mistake than 1970-01-01T00:00:12Z), as is a date or time without its zone."""
    shape = _EVENT_TIME_TEXT.fullmatch(text)
    if shape is None:
        if _NUMBER_TEXT.fullmatch(text):
            why = "is a number, not a time (Unix times are not read)"
        elif re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
            why = "is a date: it needs a time of day and a time zone"
        elif _EVENT_TIME_TEXT.fullmatch(_PLUS_READ_AS_SPACE.sub(r"+\1", text)):
            why = (
                "has a space where its zone's '+' goes: a '+' in a URL's query means a space, so write it "
                "%2B (2025-01-01T01:00:00%2B01:00)"
            )
        else:
            why = "is not a time"
        raise InvalidInput(f"{name} {why}: give {EVENT_TIME_FORM}", field=name)
    if shape["zone"] is None:
        raise InvalidInput(f"{name} needs a time zone ('Z' for UTC): give {EVENT_TIME_FORM}", field=name)
    try:
        return datetime.fromisoformat(text.upper())
    except ValueError as exc:  # 2025-02-30, hour 24, an offset of 24 hours or more
        raise InvalidInput(f"{name} is not a time ({exc}): give {EVENT_TIME_FORM}", field=name) from exc


def time_range(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """``since`` and ``until`` of an events query, read by :func:`event_time`, in UTC; 422 for a time that
    is not :data:`EVENT_TIME_FORM`, one whose UTC time falls outside years 1..9999, or ``until`` before
    ``since``."""
    bounds: dict[str, datetime | None] = {}
    for name, text in (("since", since), ("until", until)):
        if text is None:
            bounds[name] = None
            continue
        value = event_time(name, text)
        try:
            bounds[name] = value.astimezone(UTC)
        except OverflowError as exc:
            raise InvalidInput(
                f"{name}: time out of range: {value.isoformat()} is outside years 1..9999 in UTC", field=name
            ) from exc
    since_utc, until_utc = bounds["since"], bounds["until"]
    if since_utc is not None and until_utc is not None and until_utc < since_utc:
        raise InvalidInput("until must not be before since", field="until")
    return since_utc, until_utc


def export_header(
    *, from_seq: int, to_seq: int, prev_hash: bytes | None, exported_at: datetime
) -> dict[str, Any]:
    """First line of an NDJSON export: where it starts and the hash to chain its first row from (null when
    the row before it had its hash nulled in the database: nothing can be chained from it)."""
    return {
        "format": "driftloop-audit-export/1",
        "from_seq": from_seq,
        "to_seq": to_seq,
        "prev_hash": prev_hash.hex() if prev_hash is not None else None,
        "exported_at": utc_text(exported_at),
    }


def export_row(seq: int, record: bytes | None, row_hash: bytes | None) -> dict[str, Any]:
    """One row of an export: the record exactly (text when it is UTF-8, else base64) and its hash. A row
    whose record or hash was nulled in the database goes out with null there, so the export still streams
    and a reader that verifies it fails at that row."""
    line: dict[str, Any] = {"seq": seq, "row_hash": row_hash.hex() if row_hash is not None else None}
    if record is None:
        line["record"] = None
        return line
    try:
        line["record"] = record.decode()
    except UnicodeDecodeError:
        line["record_base64"] = base64.b64encode(record).decode()
    return line
