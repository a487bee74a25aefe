"""The CloudEvents 1.0 envelope in the Kafka *binary* binding.

Every message on every driftloop topic is one CloudEvent: the attributes travel as ``ce_*`` headers,
``content-type`` is ``application/json``, and the value is the JSON payload. Any CloudEvents SDK can read
it. Consumers also read the binding's *structured* mode in the JSON event format (``content-type``
``application/cloudevents+json``, the whole event in the value), which the binding says receivers should
support and SDKs offer publishers (:func:`from_structured`). Payload classes subclass
:class:`EventPayload`; their ``event_type`` names them on the wire and their ``topic`` says where they are
published.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/json"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
"""The content type of a structured-mode record in the JSON event format (:func:`from_structured`)."""
TYPE_PREFIX = "io.driftloop."
DEFAULT_MAX_EVENT_BYTES = 1_000_000
"""Consumers refuse larger records (value and headers, see :func:`record_bytes`) as ``oversized``."""
REPLAYED_FROM = "dlq_replayed_from"
"""The header an operator's replay of a dead letter adds to the original (``driftloop deadletter replay``,
``libs.bus.dead_letters``): ``<partition>:<offset>`` of the dead letter it was replayed from. The size limit
leaves it out (:func:`uncounted_bytes`), so an event that was within the limit when it was published is
within it when it is replayed; the producer sends it within the room it keeps above the limit for the
dead-letter headers."""
REPLAYED_FROM_MAX_VALUE_BYTES = 32
"""The longest :data:`REPLAYED_FROM` value the size limit leaves out: a position's two numbers (a partition
of at most 10 digits, an offset of at most 19) and the colon take at most 30 bytes. A longer one is counted,
so the header cannot carry more than a position past the limit."""
MAX_ATTRIBUTE_CHARS = 512
"""The longest CloudEvents attribute (id, source, type, time, subject, correlation id, causation id, actor)
a consumer accepts. Attributes travel into every event a cascade causes (the correlation id, the actor) and
into indexed columns (the audit trail cuts to the same 512), so they are bounded on their own, not only by
the record's size."""
BOUNDED_ATTRIBUTES = (
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_time",
    "ce_subject",
    "ce_correlationid",
    "ce_causationid",
    "ce_actor",
)

HeaderList = list[tuple[str, bytes]]


class EventPayload(BaseModel):
    """Base of every event payload: frozen, no unknown fields, described fields, a wire name and a topic."""

    # allow_inf_nan=False: JSON has no NaN or infinity; orjson would write them as null and the consumer
    # would then reject the event, so they are refused where the payload is built.
    model_config = ConfigDict(
        frozen=True, extra="forbid", use_attribute_docstrings=False, allow_inf_nan=False
    )

    # Set on each concrete payload class (see contracts/<family>.py).
    event_name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    topic: ClassVar[str] = ""
    # The payload field whose value becomes the CloudEvents subject and so the Kafka key: the model name
    # on model topics, so each model's events stay in order on one partition. None: no natural subject.
    subject_field: ClassVar[str | None] = "model"

    @classmethod
    def event_type(cls) -> str:
        """The CloudEvents ``type`` attribute, e.g. ``io.driftloop.TrainingCompleted.v1``."""
        return f"{TYPE_PREFIX}{cls.event_name or cls.__name__}.v{cls.version}"

    def event_subject(self) -> str | None:
        """The CloudEvents ``subject`` this payload implies (its ``subject_field``), or None."""
        if self.subject_field is None:
            return None
        value = getattr(self, self.subject_field, None)
        return value if isinstance(value, str) else None


P = TypeVar("P", bound=EventPayload)


# --- decoding errors: typed, so a consumer can dead-letter with a precise reason -------------------


class MalformedEvent(ValueError):
    """A message that cannot become a valid event. ``reason`` is a short machine-readable code."""

    reason: str = "malformed"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class OversizedEvent(MalformedEvent):
    """The value and headers are larger than the consumer's limit, or a CloudEvents attribute is longer than
    :data:`MAX_ATTRIBUTE_CHARS`."""

    reason = "oversized"


class MissingAttribute(MalformedEvent):
    """A required CloudEvents header is absent, empty or not UTF-8."""

    reason = "missing-attribute"


class NotJson(MalformedEvent):
    """The value is not JSON, or the content type is not application/json."""

    reason = "not-json"


class UnknownEventType(MalformedEvent):
    """The ``ce_type`` names no event this consumer knows."""

    reason = "unknown-type"


class UnknownSchemaVersion(MalformedEvent):
    """The event type is known, but not in this schema version (and no upcaster applies)."""

    reason = "unknown-schema-version"


class SchemaInvalid(MalformedEvent):
    """The JSON does not match the payload schema of its type."""

    reason = "schema-invalid"


def record_bytes(value: bytes | None, headers: Iterable[tuple[str, bytes | None]]) -> int:
    """What the event size limit counts: the value, and each header's name and value, but a replay's
    :data:`REPLAYED_FROM` header (:func:`uncounted_bytes`)."""
    headers = headers if isinstance(headers, (list, tuple)) else list(headers)
    return (
        (len(value) if value is not None else 0)
        + sum(len(name) + (len(raw) if raw is not None else 0) for name, raw in headers)
        - uncounted_bytes(headers)
    )


def uncounted_bytes(headers: Iterable[tuple[str, bytes | None]]) -> int:
    """The bytes of ``headers`` the size limit leaves out: the name and value of the first
    :data:`REPLAYED_FROM` header, if its value is a position's length (:data:`REPLAYED_FROM_MAX_VALUE_BYTES`
    at most), else none. A replay adds that header to an event that was within the limit; counted, the
    event came back ``oversized``."""
    for name, raw in headers:
        if name == REPLAYED_FROM:
            return (
                len(name) + len(raw) if raw is not None and len(raw) <= REPLAYED_FROM_MAX_VALUE_BYTES else 0
            )
    return 0


def check_attributes(attributes: Mapping[str, str]) -> None:
    """Raise :class:`OversizedEvent` if a CloudEvents attribute (by header name) is longer than
    :data:`MAX_ATTRIBUTE_CHARS`."""
    for name in BOUNDED_ATTRIBUTES:
        text = attributes.get(name)
        if text is not None and len(text) > MAX_ATTRIBUTE_CHARS:
            raise OversizedEvent(
                f"header {name!r} is {len(text)} characters, a CloudEvents attribute may have at most "
                f"{MAX_ATTRIBUTE_CHARS}"
            )


# --- the envelope ---------------------------------------------------------------------------------


class EventIds:
    """Fresh event ids: random version-4 UUIDs from the OS's random source, made 256 at a time (one read
    of the randomness, formatted without a ``UUID`` object): 0.6 µs an id instead of ``str(uuid4())``'s
    2.5, on every event the platform publishes. Safe to share between threads (an id is taken with one
    ``popleft``, which is atomic; two threads refilling at once only add more ids). A forked child starts
    with none ready, so it never repeats its parent's ids."""

    _BATCH = 256

    def __init__(self) -> None:
        self._ready: deque[str] = deque()
        os.register_at_fork(after_in_child=self._ready.clear)

    def __call__(self) -> str:
        while True:
            try:
                return self._ready.popleft()
            except IndexError:
                self._refill()

    def _refill(self) -> None:
        h = os.urandom(16 * self._BATCH).hex()
        # The version nibble is 4, the variant's two high bits 10 (RFC 9562): the rest stays random.
        self._ready.extend(
            f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-{_VARIANT[h[i + 16]]}"
            f"{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
            for i in range(0, len(h), 32)
        )


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}

new_event_id: Callable[[], str] = EventIds()
"""A fresh event id: a random UUID (time-ordered ids are not needed; Kafka offsets give order)."""


class CloudEvent(BaseModel, Generic[P]):
    """One event: the CloudEvents attributes plus a typed payload in ``data``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(
        default_factory=new_event_id,
        min_length=1,
        description="Event id (CloudEvents `id`), unique among the events of its source.",
    )
    source: str = Field(
        min_length=1, description="URI-reference of the producer, e.g. `/driftloop/registry`."
    )
    type: str = Field(description="Event type, e.g. `io.driftloop.TrainingCompleted.v1`.")
    time: datetime = Field(default_factory=lambda: datetime.now(UTC), description="When it happened (UTC).")
    subject: str | None = Field(default=None, description="The model name the event is about.")
    specversion: str = Field(default=SPEC_VERSION, description="CloudEvents spec version.")
    datacontenttype: str = Field(default=CONTENT_TYPE, description="Always `application/json`.")
    correlationid: str = Field(description="Id of the root event of the cascade this event belongs to.")
    causationid: str | None = Field(default=None, description="Id of the event that directly caused this.")
    actor: str | None = Field(default=None, description="Who asked, for manual commands (`user:alice`).")
    data: P = Field(description="The typed payload.")

    @classmethod
    def _trusted(cls, **values: Any) -> CloudEvent[Any]:
        """Build from attributes that were already checked, without validating them again.

        What ``model_construct`` does, minus its per-call field bookkeeping; every field must be given.
        """
        event = cls.__new__(cls)
        object.__setattr__(event, "__dict__", values)
        object.__setattr__(event, "__pydantic_fields_set__", set(values))
        object.__setattr__(event, "__pydantic_extra__", None)
        object.__setattr__(event, "__pydantic_private__", None)
        return event

    @property
    def topic(self) -> str:
        return type(self.data).topic

    @property
    def key(self) -> bytes | None:
        """Kafka key: the model name, so each model's events stay in order on one partition."""
        return self.subject.encode() if self.subject else None

    def payload_bytes(self) -> bytes:
        # pydantic-core's serializer writes JSON bytes directly: no intermediate dict on the hot path.
        return self.data.__pydantic_serializer__.to_json(self.data)

    def payload_sha256(self) -> str:
        return hashlib.sha256(self.payload_bytes()).hexdigest()

    def to_kafka(self) -> tuple[bytes | None, bytes, HeaderList]:
        """(key, value, headers) in the CloudEvents Kafka binary binding."""
        headers: HeaderList = [
            ("ce_specversion", self.specversion.encode()),
            ("ce_id", self.id.encode()),
            ("ce_source", self.source.encode()),
            ("ce_type", self.type.encode()),
            ("ce_time", self.time.astimezone(UTC).isoformat().replace("+00:00", "Z").encode()),
            ("content-type", self.datacontenttype.encode()),
        ]
        # An empty optional attribute is left out, as consumers refuse one that is present and empty (one
        # could come back from a row kept before they did).
        if self.correlationid:
            headers.append(("ce_correlationid", self.correlationid.encode()))
        if self.subject:
            headers.append(("ce_subject", self.subject.encode()))
        if self.causationid:
            headers.append(("ce_causationid", self.causationid.encode()))
        if self.actor:
            headers.append(("ce_actor", self.actor.encode()))
        return self.key, self.payload_bytes(), headers


def new_event(
    payload: P,
    *,
    source: str,
    subject: str | None = None,
    cause: CloudEvent[Any] | None = None,
    actor: str | None = None,
    event_id: str | None = None,
    correlation_id: str | None = None,
) -> CloudEvent[P]:
    """Wrap a payload. With ``cause``, the new event joins the cause's cascade (correlation) and
    names it as its direct cause; the actor is inherited unless given. The subject defaults to the
    payload's own (its model name), then to the cause's.

    ``correlation_id`` puts the event in that cascade instead: an event about a long-running process
    (a rollout) stays in the cascade that started the process, whatever caused it this time."""
    # Built without validating: every service publishes through here, and validating what the types already
    # say cost more than the rest of the event (3 µs). What the types do not say is checked here.
    if not isinstance(payload, EventPayload):
        raise TypeError(f"an event's payload is an EventPayload, not {type(payload).__name__}")
    if not source:
        raise ValueError("an event needs a source (CloudEvents requires a non-empty one)")
    eid = event_id or new_event_id()
    if subject is None:
        subject = payload.event_subject() or (cause.subject if cause else None)
    return CloudEvent._trusted(
        id=eid,
        source=source,
        type=type(payload).event_type(),
        time=datetime.now(UTC),
        subject=subject,
        specversion=SPEC_VERSION,
        datacontenttype=CONTENT_TYPE,
        correlationid=correlation_id or (cause.correlationid if cause else eid),
        causationid=cause.id if cause else None,
        actor=actor if actor is not None else (cause.actor if cause else None),
        data=payload,
    )


# --- decoding -------------------------------------------------------------------------------------

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
PayloadReader = Callable[[bytes], EventPayload | None]
"""A faster reader of one payload type's JSON, for high-volume consumers. It returns the payload that
``model_validate_json`` would return, or None for anything outside the shape it checks, which then goes
through the full validation (and so is rejected with the same reason as without the reader)."""


_ONE_EACH = frozenset({*BOUNDED_ATTRIBUTES, "ce_specversion", "content-type"})
"""Headers a record may carry once: given twice, consumers and the audit trail could each read another."""


def _refuse_repeated_attributes(pairs: Iterable[tuple[str, bytes | None]]) -> None:
    """Raise :class:`MalformedEvent` if a CloudEvents attribute header is given more than once."""
    counts = Counter(name for name, _ in pairs)
    repeated = sorted(name for name, n in counts.items() if n > 1 and name in _ONE_EACH)
    if repeated:
        name = repeated[0]
        raise MalformedEvent(
            f"header {name!r} appears {counts[name]} times: a CloudEvents attribute comes once"
        )


OPTIONAL_ATTRIBUTES = ("ce_subject", "ce_correlationid", "ce_causationid", "ce_actor")
"""The optional CloudEvents attributes consumers read, each of which must be non-empty when present."""


_NOT_CLOUDEVENTS_TEXT = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(chr(plane + 0xFFFE) + chr(plane + 0xFFFF) for plane in range(0, 0x110000, 0x10000))
    + "]"
)
"""What the CloudEvents 1.0 type system leaves out of a ``String``: the control characters U+0000-U+001F and
U+007F-U+009F, Unicode's noncharacters and lone surrogates."""


def attribute_text_problem(text: str) -> str | None:
    """Why ``text`` cannot be the value of a CloudEvents attribute, or None: it holds a character the
    CloudEvents 1.0 ``String`` type disallows (:data:`_NOT_CLOUDEVENTS_TEXT`). A producer that sent one would
    send an event that is not a valid CloudEvent, and a newline, say, is not usable in an HTTP header."""
    found = _NOT_CLOUDEVENTS_TEXT.search(text)
    if found is None:
        return None
    c = found.group()
    if c == "\x00":
        what = "a NUL character"
    elif c < "\xa0":
        what = "a control character"
    elif "\ud800" <= c <= "\udfff":
        what = "a lone surrogate"
    else:
        what = "a Unicode noncharacter"
    return f"holds {what} (U+{ord(c):04X}), which a CloudEvents attribute may not hold"


def _refuse_disallowed_text(hdr: Mapping[str, str]) -> None:
    """Raise :class:`MalformedEvent` naming the first attribute header that holds a character CloudEvents
    disallows (:func:`attribute_text_problem`)."""
    for name, text in hdr.items():
        if name not in _ONE_EACH:
            continue
        if "\x00" in text:
            # Consumers store the attributes in Postgres text, which cannot hold NUL: the inbox keys on source
            # and id, the registry's stage history and monitoring's rollout steps keep the cascade and actor.
            raise MalformedEvent(
                f"header {name!r} holds a NUL character, which no consumer can store (Postgres text "
                "refuses it)"
            )
        # ce_time is read as an RFC 3339 date-time (ASCII digits and separators only), and its refusal names
        # the form it should have.
        why = attribute_text_problem(text) if name != "ce_time" else None
        if why is not None:
            raise MalformedEvent(f"header {name!r} {why} (CloudEvents 1.0, type String)")


def _is_attribute_header(name: str) -> bool:
    """Whether a header carries a CloudEvents attribute (binary mode: ``ce_*``, and ``content-type``)."""
    return name.startswith("ce_") or name == "content-type"


def _text_headers(
    value: bytes | None, pairs: Iterable[tuple[str, bytes | None]], max_bytes: int
) -> tuple[int, dict[str, str]]:
    """``decode``'s header pass for a record with a header that is not UTF-8: (record_bytes, the text
    headers). Only an attribute must be text; any other header may hold any bytes (Kafka headers are bytes: a
    tracer's binary context, another framework's tag) and is left out."""
    size = len(value) if value is not None else 0
    hdr: dict[str, str] = {}
    binary: tuple[str, UnicodeDecodeError] | None = None
    for k, v in pairs:
        if v is None:
            continue
        size += len(k) + len(v)
        try:
            hdr[k] = v.decode()
        except UnicodeDecodeError as exc:
            if binary is None and _is_attribute_header(k):
                binary = (k, exc)
            continue
    # Too big is the more useful verdict, whatever the bytes are.
    if size > max_bytes and (size := size - uncounted_bytes(pairs)) > max_bytes:
        raise OversizedEvent(f"value and headers are {size} bytes, the limit is {max_bytes}")
    if binary is not None:
        raise MissingAttribute(f"header {binary[0]!r} is not UTF-8: {binary[1]}") from binary[1]
    return size, hdr


def is_structured(content_type: str | None) -> bool:
    """Whether a record's ``content-type`` says structured mode: a CloudEvents format's media type
    (``application/cloudevents``, ``+json`` or another format, or a batch), case-insensitive. Every consumer
    asks it of every record: the platform's own content type is answered by one comparison."""
    return (
        content_type is not None
        and content_type != CONTENT_TYPE
        and content_type[:23].lower() == "application/cloudevents"
    )


def from_structured(value: bytes | None, headers: Mapping[str, str]) -> tuple[bytes, HeaderList]:
    """The binary-mode record a structured-mode one stands for: each attribute of the CloudEvents JSON format
    in ``value`` a ``ce_*`` header, ``datacontenttype`` the ``content-type``, ``data`` the value. Consumers
    then read it as any other record, with the same checks and refusals (a structured event with no ``id``
    is ``missing-attribute``, as a binary one without ``ce_id``). ``headers`` are the record's, as text.

    Refused: another format or a batch (``not-json``; the binding's receivers need read only the JSON
    format), a value that is not a JSON object or has binary data (``data_base64``) or none (``not-json``),
    an attribute that is not a string, number or boolean, and ``ce_*`` headers beside a structured value
    (``malformed``: which would be the event's?). A ``null`` attribute is absent (the JSON format's rule)."""
    content_type = headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != STRUCTURED_CONTENT_TYPE:
        raise NotJson(
            f"content-type is {content_type!r}: of the CloudEvents structured formats consumers read the "
            f"JSON format ({STRUCTURED_CONTENT_TYPE!r}), one event per record"
        )
    both = sorted(name for name in headers if name.startswith("ce_"))
    if both:
        raise MalformedEvent(
            f"a structured-mode record ({STRUCTURED_CONTENT_TYPE}) has the binary mode's header {both[0]!r} "
            "too: an event travels in one mode"
        )
    if value is None:
        raise NotJson("the message has no value")
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise NotJson(f"value is not JSON: {exc}") from exc
    if not isinstance(event, dict):
        raise NotJson(
            f"a structured-mode value is one event in the CloudEvents JSON format, a JSON object; got "
            f"{type(event).__name__}"
        )
    missing = [name for name in ("specversion", "id", "source", "type") if event.get(name) is None]
    if missing:
        raise MissingAttribute(
            f"attribute {missing[0]!r} is missing: not a CloudEvent in the JSON format "
            f"({STRUCTURED_CONTENT_TYPE})"
        )
    if "data_base64" in event:
        raise NotJson("the event's data is binary (data_base64), expected a JSON payload in 'data'")
    if event.get("data") is None:
        raise NotJson("the event has no data: its payload goes in 'data'")
    data = event.pop("data")
    pairs: HeaderList = []
    for name, attribute in event.items():
        text = _attribute_text(attribute)
        if text is None and attribute is not None:
            raise MalformedEvent(
                f"attribute {name!r} is a JSON {type(attribute).__name__}: a CloudEvents attribute is a "
                "string, a number or a boolean"
            )
        if text is not None:
            pairs.append((_attribute_header(name), text.encode()))
    return orjson.dumps(data), pairs


def structured_headers(value: bytes | None) -> dict[str, str]:
    """The headers, as text, a structured-mode value stands for in binary mode (:func:`from_structured`), as
    far as it has them: none when it is no JSON object, and no attribute that is not a string, number or
    boolean. For readers of what the bus took, such as the audit trail's indexed copies."""
    try:
        event = orjson.loads(value) if value is not None else None
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(event, dict):
        return {}
    return {
        _attribute_header(name): text
        for name, attribute in event.items()
        if name not in ("data", "data_base64") and (text := _attribute_text(attribute)) is not None
    }


def _attribute_text(attribute: Any) -> str | None:
    """A JSON-format attribute's value as binary mode's header text; None for null (absent) and for what no
    attribute can be (an object, an array, a fraction)."""
    if isinstance(attribute, bool):
        return "true" if attribute else "false"
    if isinstance(attribute, str | int):
        return str(attribute)
    return None


def _attribute_header(name: str) -> str:
    return "content-type" if name == "datacontenttype" else f"ce_{name}"


CE_TIME_FORM = (
    "an RFC 3339 date-time: date, 'T', time with seconds (a fraction optional), then 'Z' or a +hh:mm/-hh:mm "
    "offset, e.g. 2025-01-01T00:00:00Z or 2025-01-01T01:00:00.5+01:00 ('t' and 'z' may be lower case)"
)
"""What ``ce_time`` must be, as a refusal says it."""

_RFC3339_DATE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
"""RFC 3339 §5.6 ``date-time``, ASCII digits only; the ranges of the numbers are checked apart. It fixes
where each part is: the second at 17..18, the offset (when not 'Z') in the last six characters. No groups:
every consumer reads every record's time with it, and reading groups cost more than the match."""

_ZONELESS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]+)?)?)?")


def parse_event_time(text: str) -> datetime:
    """``ce_time`` (CloudEvents ``time``) as an aware datetime, or :class:`MalformedEvent` saying why it is
    not one: exactly an RFC 3339 ``date-time`` (:data:`CE_TIME_FORM`) that has a UTC form (years 1..9999).

    The one reading of the attribute: the bus decodes events with it and the audit trail indexes their time
    with it, so both take and refuse the same texts. ISO 8601 forms RFC 3339 leaves out (a space for the
    'T', no seconds, basic format, week dates, a comma, an offset without its colon) are refused. A leap
    second (second 60, which RFC 3339 allows at 23:59 UTC) is read as 23:59:59.999999: datetime has no
    second 60."""
    if _RFC3339_DATE_TIME.fullmatch(text) is None:
        why = " (it has no UTC offset: 'Z' for UTC)" if _ZONELESS.fullmatch(text) else ""
        raise MalformedEvent(f"ce_time {text!r} is not an RFC 3339 date-time{why}: give {CE_TIME_FORM}")
    last = text[-1]
    # Two ASCII digits compare as text as they do as numbers: hour past 23, minute past 59.
    if last not in "Zz" and (text[-5:-3] > "23" or text[-2] > "5"):
        raise MalformedEvent(
            f"ce_time {text!r} is not an RFC 3339 date-time (its UTC offset is out of range): give "
            f"{CE_TIME_FORM}"
        )
    # The shape puts 'T' at 10 and 'Z' last: upper() makes a lower-case 't' or 'z' what fromisoformat reads.
    normal = text.upper() if text[10] == "t" or last == "z" else text
    leap = text[17:19] == "60"
    if leap:
        normal = f"{normal[:17]}59{normal[19:]}"
    try:
        time = datetime.fromisoformat(normal)
        utc = time.astimezone(UTC)
    except ValueError as exc:  # 2025-02-30, hour 24, minute 60, year 0
        raise MalformedEvent(
            f"ce_time {text!r} is not an RFC 3339 date-time ({exc}): give {CE_TIME_FORM}"
        ) from exc
    except OverflowError as exc:
        raise MalformedEvent(
            f"ce_time {text!r} has no UTC form (it falls before year 1 or after year 9999 in UTC)"
        ) from exc
    if leap:
        if (utc.hour, utc.minute) != (23, 59):
            raise MalformedEvent(
                f"ce_time {text!r} is not an RFC 3339 date-time (second 60 is a leap second, which falls "
                "only at 23:59 UTC)"
            )
        time = time.replace(microsecond=999_999)
    return time


class EventTypeRegistry:
    """Maps wire types to payload classes, with upcasters from old versions to the current one."""

    def __init__(self, payload_classes: Sequence[type[EventPayload]] = ()) -> None:
        self._classes: dict[str, type[EventPayload]] = {}
        self._upcasters: dict[str, tuple[Upcaster, str]] = {}
        for cls in payload_classes:
            self.register(cls)

    def register(self, cls: type[EventPayload]) -> None:
        self._classes[cls.event_type()] = cls

    def register_upcaster(self, old_type: str, new_type: str, upcast: Upcaster) -> None:
        """``old_type`` payloads are converted by ``upcast`` and read as ``new_type``."""
        self._upcasters[old_type] = (upcast, new_type)

    def classes(self) -> list[type[EventPayload]]:
        return list(self._classes.values())

    def wire_types(self) -> dict[str, type[EventPayload]]:
        """Every ``ce_type`` this registry reads, current or upcast, with the payload class it is read as:
        what a consumer may have recorded an event under (the inbox keeps the type as delivered)."""
        types = dict(self._classes)
        for old in self._upcasters:
            ce_type, seen = old, set()
            while ce_type in self._upcasters and ce_type not in seen:
                seen.add(ce_type)
                ce_type = self._upcasters[ce_type][1]
            if ce_type in self._classes:
                types[old] = self._classes[ce_type]
        return types

    def resolve(
        self, ce_type: str, payload: dict[str, Any]
    ) -> tuple[str, type[EventPayload], dict[str, Any]]:
        seen = set()
        while ce_type in self._upcasters and ce_type not in seen:
            seen.add(ce_type)
            upcast, new_type = self._upcasters[ce_type]
            try:
                payload = upcast(payload)
            except Exception as exc:
                # An old payload the upcaster cannot read is as malformed as an invalid one: dead-letter it
                # with a reason instead of crashing the consumer.
                raise SchemaInvalid(f"upcasting {ce_type!r} to {new_type!r} failed: {exc!r}") from exc
            ce_type = new_type
        cls = self._classes.get(ce_type)
        if cls is not None:
            return ce_type, cls, payload
        base, _, version = ce_type.rpartition(".v")
        if base and version.isdigit() and any(t.rpartition(".v")[0] == base for t in self._classes):
            raise UnknownSchemaVersion(
                f"event type {ce_type!r} has a schema version this consumer does not know"
            )
        raise UnknownEventType(f"unknown event type {ce_type!r}")

    def decode(
        self,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] | Mapping[str, bytes | None],
        *,
        max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        readers: Mapping[type[EventPayload], PayloadReader] | None = None,
    ) -> CloudEvent[Any]:
        """Kafka record -> CloudEvent, or a :class:`MalformedEvent` saying exactly what is wrong.

        ``max_bytes`` bounds the value and the headers together (:func:`record_bytes`); each CloudEvents
        attribute is also bounded (:data:`MAX_ATTRIBUTE_CHARS`). ``readers`` are optional faster readers per
        payload class (see :data:`PayloadReader`)."""
        value_bytes = len(value) if value is not None else 0
        if value_bytes > max_bytes:
            raise OversizedEvent(f"payload is {value_bytes} bytes, the limit is {max_bytes}")
        # A consumer's records carry a tuple: asking the Mapping ABC about it cost a microsecond a record.
        pairs = headers if type(headers) is tuple or not isinstance(headers, Mapping) else headers.items()
        # record_bytes(), counted in the same pass that decodes the headers (the consumer hot path).
        size = value_bytes
        hdr: dict[str, str] = {}
        present = 0
        try:
            for k, v in pairs:
                present += 1
                if v is not None:
                    size += len(k) + len(v)
                    hdr[k] = v.decode()
        except UnicodeDecodeError:
            size, hdr = _text_headers(value, pairs, max_bytes)
            present = sum(1 for _ in pairs)  # the loop above stopped short of counting them all
        # A replay's header is not counted (record_bytes), looked for only when the size is over the limit.
        if size > max_bytes and (size := size - uncounted_bytes(pairs)) > max_bytes:
            raise OversizedEvent(f"value and headers are {size} bytes, the limit is {max_bytes}")
        if present != len(hdr):
            _refuse_repeated_attributes(pairs)
        if is_structured(hdr.get("content-type")):
            # Its size is the record's, checked above: the same event in binary mode is a few bytes larger.
            value, binary = from_structured(value, hdr)
            return self.decode(value, binary, max_bytes=max_bytes + size, readers=readers)
        if size - value_bytes > MAX_ATTRIBUTE_CHARS:
            # Only headers longer than the bound together can hold an attribute longer than it.
            check_attributes(hdr)
        # One look at all the header text: isprintable() is False for every character CloudEvents disallows in
        # an attribute (and for a few more, such as a tab in another header), and costs far less than the
        # exact test, which then names the attribute. An attribute read with such a character would travel
        # into the events it causes (a cascade's actor and correlation id), which would not be CloudEvents.
        if not "".join(hdr.values()).isprintable():
            _refuse_disallowed_text(hdr)
        for required in ("ce_type", "ce_id", "ce_source", "ce_specversion"):
            if required not in hdr:
                raise MissingAttribute(
                    f"header {required!r} is missing: not a CloudEvents binary-mode message"
                )
        ce_type, ce_id = hdr["ce_type"], hdr["ce_id"]
        if not ce_id or not hdr["ce_source"]:
            # Source and id together identify an event (the inbox keys on them); CloudEvents requires both.
            empty = "ce_id" if not ce_id else "ce_source"
            raise MissingAttribute(f"header {empty!r} is empty: CloudEvents requires a non-empty {empty[3:]}")
        if hdr["ce_specversion"] != SPEC_VERSION:
            raise MalformedEvent(f"ce_specversion is {hdr['ce_specversion']!r}, expected {SPEC_VERSION!r}")
        optional = (
            subject := hdr.get("ce_subject"),
            correlationid := hdr.get("ce_correlationid"),
            causationid := hdr.get("ce_causationid"),
            actor := hdr.get("ce_actor"),
        )
        if "" in optional:
            # CloudEvents: an attribute that is present is non-empty. Read as "" it would be kept as a value
            # (an actor or cause of no one) and travel into the events it causes.
            empty = OPTIONAL_ATTRIBUTES[optional.index("")]
            raise MalformedEvent(
                f"header {empty!r} is empty: a CloudEvents attribute that is present must be non-empty "
                "(leave the header out when there is no value)"
            )
        content_type = hdr.get("content-type") or CONTENT_TYPE
        # A media type is case-insensitive (RFC 9110 §8.3.1); its parameters do not matter: JSON is UTF-8,
        # and a charset parameter has no effect on it (RFC 8259 §11).
        if content_type != CONTENT_TYPE and content_type.partition(";")[0].strip().lower() != CONTENT_TYPE:
            raise NotJson(f"content-type is {content_type!r}, expected {CONTENT_TYPE!r}")
        if value is None:
            raise NotJson("the message has no value")
        ce_type, data = self._payload(ce_type, value, readers)
        raw_time = hdr.get("ce_time")
        # Absent, the time is now; present, it is RFC 3339 (an empty one too is refused, as the trail would
        # index no time for it).
        time = parse_event_time(raw_time) if raw_time is not None else datetime.now(UTC)
        # Every attribute was checked above: build without validating them again (the consumer hot path).
        return CloudEvent._trusted(
            id=ce_id,
            source=hdr["ce_source"],
            type=ce_type,
            time=time,
            subject=subject,
            specversion=SPEC_VERSION,
            datacontenttype=CONTENT_TYPE,
            correlationid=correlationid or ce_id,
            causationid=causationid,
            actor=actor,
            data=data,
        )

    def _payload(
        self, ce_type: str, value: bytes, readers: Mapping[type[EventPayload], PayloadReader] | None = None
    ) -> tuple[str, EventPayload]:
        """Parse and validate the payload, upcasting old versions; returns the (current) type and payload."""
        current = self._classes.get(ce_type)
        cls: type[EventPayload] | None = current
        try:
            if current is not None and ce_type not in self._upcasters:
                reader = readers.get(current) if readers else None
                if reader is not None:
                    try:
                        fast = reader(value)
                    except Exception:
                        # A reader is only a shortcut: if it fails, the full validation decides.
                        fast = None
                    if fast is not None:
                        return ce_type, fast
                # The common case: parse and validate in one pass inside pydantic-core.
                return ce_type, current.model_validate_json(value)
            try:
                payload = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise NotJson(f"value is not JSON: {exc}") from exc
            if not isinstance(payload, dict):
                raise SchemaInvalid(f"payload must be a JSON object, got {type(payload).__name__}")
            ce_type, cls, payload = self.resolve(ce_type, payload)
            return ce_type, cls.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            if first["type"] == "json_invalid":
                raise NotJson(f"value is not JSON: {first['msg']}") from exc
            if first["type"] == "model_type" and not first["loc"]:
                raise SchemaInvalid(f"payload must be a JSON object, got {first['input']!r:.80}") from exc
            where = ".".join(str(p) for p in first["loc"]) or "(root)"
            name = cls.__name__ if cls is not None else ce_type
            raise SchemaInvalid(
                f"{name} payload is invalid at {where}: {first['msg']} ({exc.error_count()} error(s))"
            ) from exc
