"""The CloudEvents envelope: encoding to Kafka, decoding back, cascades, and every way decoding can fail."""

from __future__ import annotations

import math
import os
import re
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkCloudEvent
from cloudevents.v1 import kafka as ce_kafka_v1
from pydantic import ValidationError

from contracts.audit import AuditCheckpoint
from contracts.commands import RollbackRequested
from contracts.datasets import DatasetRegistered
from contracts.envelope import (
    BOUNDED_ATTRIBUTES,
    MAX_ATTRIBUTE_CHARS,
    REPLAYED_FROM,
    CloudEvent,
    EventIds,
    EventPayload,
    EventTypeRegistry,
    MalformedEvent,
    MissingAttribute,
    NotJson,
    OversizedEvent,
    SchemaInvalid,
    UnknownEventType,
    UnknownSchemaVersion,
    attribute_text_problem,
    new_event,
    parse_event_time,
    record_bytes,
)
from contracts.examples import EXAMPLES
from contracts.monitoring import DriftDetected
from contracts.registry import EVENT_TYPES
from contracts.training import TrainingCompleted, TrainingRequested
from tests.unit.event_times import ACCEPTED, REFUSED

EXAMPLE_LIST = list(EXAMPLES.values())
IDS = [type(e).__name__ for e in EXAMPLE_LIST]


def _encoded(payload: EventPayload, **kwargs: Any) -> tuple[bytes | None, bytes, dict[str, bytes]]:
    event = new_event(payload, source="/driftloop/test", **kwargs)
    key, value, headers = event.to_kafka()
    return key, value, dict(headers)


# --- round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", EXAMPLE_LIST, ids=IDS)
def test_every_event_type_survives_a_kafka_round_trip(payload: EventPayload) -> None:
    event = new_event(payload, source="/driftloop/test", actor="user:alice")
    key, value, headers = event.to_kafka()

    decoded = EVENT_TYPES.decode(value, headers)

    assert decoded.data == payload
    assert type(decoded.data) is type(payload)
    assert decoded.model_dump() == event.model_dump()
    assert decoded.topic == payload.topic
    assert key == event.key


@pytest.mark.parametrize("payload", EXAMPLE_LIST, ids=IDS)
def test_new_event_builds_what_validating_its_attributes_would(payload: EventPayload) -> None:
    root = new_event(EXAMPLES[DriftDetected], source="/driftloop/monitoring", actor="user:alice")
    for event in (new_event(payload, source="/driftloop/test"), new_event(payload, source="/s", cause=root)):
        validated: CloudEvent[Any] = CloudEvent.model_validate({**event.__dict__})
        assert event == validated and event.model_dump() == validated.model_dump()
        assert event.time.tzinfo is UTC and event.specversion == "1.0"
        with pytest.raises(ValidationError):
            event.id = "changed"  # type: ignore[misc]  # frozen as a validated event is


def test_new_event_refuses_an_empty_source_and_a_payload_that_is_no_event_payload() -> None:
    with pytest.raises(ValueError, match="needs a source"):
        new_event(EXAMPLES[DriftDetected], source="")
    with pytest.raises(TypeError, match="EventPayload, not dict"):
        new_event({"model": "churn"}, source="/driftloop/test")  # type: ignore[type-var]


@pytest.mark.parametrize("payload", EXAMPLE_LIST, ids=IDS)
def test_headers_follow_the_cloudevents_kafka_binary_binding(payload: EventPayload) -> None:
    event = new_event(payload, source="/driftloop/test")
    _, value, header_list = event.to_kafka()
    headers = dict(header_list)

    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"] == event.id.encode()
    assert headers["ce_type"] == type(payload).event_type().encode()
    assert headers["ce_source"] == b"/driftloop/test"
    assert headers["content-type"] == b"application/json"
    assert headers["ce_time"].endswith(b"Z")
    assert orjson.loads(value) == payload.model_dump(mode="json")
    assert len(header_list) == len(headers), "a header appears twice"


def test_model_events_are_keyed_by_model_name() -> None:
    key, _, headers = _encoded(EXAMPLES[TrainingCompleted])

    assert key == b"churn"
    assert headers["ce_subject"] == b"churn"


def test_dataset_events_are_keyed_by_dataset_name() -> None:
    key, _, _ = _encoded(EXAMPLES[DatasetRegistered])

    assert key == b"churn-base"


def test_audit_checkpoints_have_no_subject_and_no_key() -> None:
    key, _, headers = _encoded(EXAMPLES[AuditCheckpoint])

    assert key is None
    assert "ce_subject" not in headers


def test_an_explicit_subject_wins_over_the_payloads() -> None:
    event = new_event(EXAMPLES[TrainingCompleted], source="/driftloop/test", subject="other")

    assert event.subject == "other"


def test_decode_accepts_headers_as_a_list_or_a_mapping() -> None:
    event = new_event(EXAMPLES[DriftDetected], source="/driftloop/monitoring")
    _, value, header_list = event.to_kafka()

    assert EVENT_TYPES.decode(value, header_list) == EVENT_TYPES.decode(value, dict(header_list))


# --- cascades -----------------------------------------------------------------------------------------


def test_an_event_without_a_cause_starts_its_own_cascade() -> None:
    event = new_event(EXAMPLES[DriftDetected], source="/driftloop/monitoring")

    assert event.correlationid == event.id
    assert event.causationid is None
    assert event.actor is None


def test_an_event_joins_the_cascade_of_its_cause_and_names_it() -> None:
    drift = new_event(EXAMPLES[DriftDetected], source="/driftloop/monitoring")
    requested = new_event(EXAMPLES[TrainingRequested], source="/driftloop/training", cause=drift)
    completed = new_event(EXAMPLES[TrainingCompleted], source="/driftloop/training", cause=requested)

    assert requested.correlationid == drift.id
    assert requested.causationid == drift.id
    assert completed.correlationid == drift.id
    assert completed.causationid == requested.id


def test_the_actor_of_a_manual_command_follows_its_consequences() -> None:
    command = new_event(EXAMPLES[RollbackRequested], source="/driftloop/registry", actor="user:alice")
    consequence = new_event(EXAMPLES[TrainingRequested], source="/driftloop/training", cause=command)
    overridden = new_event(
        EXAMPLES[TrainingRequested], source="/driftloop/training", cause=command, actor="system:policy"
    )

    assert consequence.actor == "user:alice"
    assert overridden.actor == "system:policy"


def test_cascade_extensions_travel_as_headers() -> None:
    command = new_event(EXAMPLES[RollbackRequested], source="/driftloop/registry", actor="user:alice")
    consequence = new_event(EXAMPLES[TrainingRequested], source="/driftloop/training", cause=command)
    _, value, headers = consequence.to_kafka()

    decoded = EVENT_TYPES.decode(value, headers)

    assert (decoded.correlationid, decoded.causationid, decoded.actor) == (
        command.id,
        command.id,
        "user:alice",
    )


def test_a_message_without_correlation_header_is_its_own_cascade() -> None:
    _, value, headers = _encoded(EXAMPLES[DriftDetected])
    del headers["ce_correlationid"]

    decoded = EVENT_TYPES.decode(value, headers)

    assert decoded.correlationid == decoded.id


# --- decoding failures -------------------------------------------------------------------------------


def _valid_message() -> tuple[bytes, dict[str, bytes]]:
    _, value, headers = _encoded(EXAMPLES[TrainingCompleted])
    return value, headers


def _payload_without(field: str) -> bytes:
    payload = EXAMPLES[TrainingCompleted].model_dump(mode="json")
    del payload[field]
    return orjson.dumps(payload)


def test_a_value_that_is_not_json_is_refused_as_not_json() -> None:
    _, headers = _valid_message()

    with pytest.raises(NotJson, match="not JSON") as caught:
        EVENT_TYPES.decode(b"{this is not json", headers)
    assert caught.value.reason == "not-json"


def test_a_non_json_content_type_is_refused_as_not_json() -> None:
    value, headers = _valid_message()
    headers["content-type"] = b"application/avro"

    with pytest.raises(NotJson, match="application/avro"):
        EVENT_TYPES.decode(value, headers)


@pytest.mark.parametrize(
    "content_type",
    [
        b"application/json",
        b"Application/JSON",
        b"APPLICATION/JSON; charset=UTF-8",
        b"application/json;Charset=utf-8",
        b'application/JSON ; CHARSET="UTF-8"',
        b"",  # absent: CloudEvents' default for this binding
    ],
)
def test_the_json_media_type_is_read_in_any_case(content_type: bytes) -> None:
    # Media types and their parameters' names are case-insensitive (RFC 9110 §8.3.1).
    value, headers = _valid_message()
    headers["content-type"] = content_type

    assert EVENT_TYPES.decode(value, headers).datacontenttype == "application/json"


@pytest.mark.parametrize(
    "content_type", [b"application/avro", b"text/json", b"application/jsonx", b"application/cloudeventsjson"]
)
def test_another_media_type_in_any_case_is_refused_as_not_json(content_type: bytes) -> None:
    value, headers = _valid_message()
    headers["content-type"] = content_type

    with pytest.raises(NotJson, match=re.escape(repr(content_type.decode()))):
        EVENT_TYPES.decode(value, headers)


def test_a_message_without_value_is_refused_as_not_json() -> None:
    _, headers = _valid_message()

    with pytest.raises(NotJson, match="no value"):
        EVENT_TYPES.decode(None, headers)


def test_an_unknown_event_type_is_refused() -> None:
    value, headers = _valid_message()
    headers["ce_type"] = b"io.driftloop.SomethingElse.v1"

    with pytest.raises(UnknownEventType, match="SomethingElse") as caught:
        EVENT_TYPES.decode(value, headers)
    assert caught.value.reason == "unknown-type"


def test_an_unknown_schema_version_of_a_known_type_is_refused_as_such() -> None:
    value, headers = _valid_message()
    headers["ce_type"] = b"io.driftloop.TrainingCompleted.v9"

    with pytest.raises(UnknownSchemaVersion, match=r"TrainingCompleted\.v9") as caught:
        EVENT_TYPES.decode(value, headers)
    assert caught.value.reason == "unknown-schema-version"


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (_payload_without("model"), "model"),
        (_payload_without("artifact"), "artifact"),
        (
            orjson.dumps({**EXAMPLES[TrainingCompleted].model_dump(mode="json"), "surprise": 1}),
            "surprise",
        ),
        (
            orjson.dumps(
                {
                    **EXAMPLES[TrainingCompleted].model_dump(mode="json"),
                    "artifact": {
                        **EXAMPLES[TrainingCompleted].model_dump(mode="json")["artifact"],
                        "key": "x",
                    },
                }
            ),
            "artifact.key",
        ),
    ],
    ids=["missing-field", "missing-nested-object", "unknown-field", "invalid-nested-field"],
)
def test_a_schema_invalid_payload_is_refused_naming_the_field(value: bytes, named: str) -> None:
    _, headers = _valid_message()

    with pytest.raises(SchemaInvalid, match=rf"TrainingCompleted payload is invalid at {named}\b") as caught:
        EVENT_TYPES.decode(value, headers)
    assert caught.value.reason == "schema-invalid"


def test_a_json_value_that_is_not_an_object_is_schema_invalid() -> None:
    _, headers = _valid_message()

    with pytest.raises(SchemaInvalid, match="JSON object"):
        EVENT_TYPES.decode(b"[1, 2, 3]", headers)


def test_a_payload_breaking_a_cross_field_rule_is_schema_invalid() -> None:
    payload = EXAMPLES[DriftDetected].model_dump(mode="json")
    payload["drifted_features"] = ["no_such_feature"]
    _, _, headers = _encoded(EXAMPLES[DriftDetected])

    with pytest.raises(SchemaInvalid, match="no_such_feature"):
        EVENT_TYPES.decode(orjson.dumps(payload), headers)


def test_an_oversized_message_is_refused_before_parsing() -> None:
    value, headers = _valid_message()

    with pytest.raises(OversizedEvent, match=f"{len(value)} bytes") as caught:
        EVENT_TYPES.decode(value, headers, max_bytes=len(value) - 1)
    assert caught.value.reason == "oversized"


def test_headers_count_toward_the_size_limit() -> None:
    value, headers = _valid_message()
    limit = record_bytes(value, list(headers.items()))
    headers["x-padding"] = b"p" * 100

    with pytest.raises(OversizedEvent, match="value and headers"):
        EVENT_TYPES.decode(value, headers, max_bytes=limit + 99)
    assert (
        EVENT_TYPES.decode(value, headers, max_bytes=limit + 100 + len("x-padding")).id
        == headers["ce_id"].decode()
    )


@pytest.mark.parametrize("other", [{}, {"traceparent": b"\xff\x00"}], ids=["utf8", "binary-header"])
def test_a_replays_position_header_is_not_counted_toward_the_size_limit(other: dict[str, bytes]) -> None:
    value, headers = _valid_message()
    headers.update(other)
    limit = record_bytes(value, list(headers.items()))
    replayed = {**headers, REPLAYED_FROM: b"2147483647:9223372036854775807"}
    padded = {**headers, REPLAYED_FROM: b"0:" + b"9" * 100}

    assert record_bytes(value, list(replayed.items())) == limit
    assert EVENT_TYPES.decode(value, replayed, max_bytes=limit).id == headers["ce_id"].decode()
    with pytest.raises(OversizedEvent, match=f"are {limit + len(REPLAYED_FROM) + 102} bytes"):
        EVENT_TYPES.decode(value, padded, max_bytes=limit)
    with pytest.raises(OversizedEvent, match=f"are {limit} bytes, the limit is {limit - 1}"):
        EVENT_TYPES.decode(value, replayed, max_bytes=limit - 1)


def test_a_huge_header_is_oversized_even_when_it_is_not_utf8() -> None:
    value, headers = _valid_message()
    headers["x-blob"] = b"\xff" * 2_000_000

    with pytest.raises(OversizedEvent):
        EVENT_TYPES.decode(value, headers)


@pytest.mark.parametrize("header", BOUNDED_ATTRIBUTES)
def test_a_cloudevents_attribute_longer_than_the_bound_is_refused(header: str) -> None:
    value, headers = _valid_message()
    headers[header] = b"a" * (MAX_ATTRIBUTE_CHARS + 1)

    with pytest.raises(OversizedEvent, match=header) as caught:
        EVENT_TYPES.decode(value, headers)
    assert caught.value.reason == "oversized"


def test_attributes_at_the_bound_decode_and_follow_the_cascade() -> None:
    value, headers = _valid_message()
    for name in ("ce_correlationid", "ce_actor", "ce_subject"):
        headers[name] = "é".encode() * MAX_ATTRIBUTE_CHARS  # the bound counts characters, not bytes

    cause = EVENT_TYPES.decode(value, headers)
    effect = new_event(EXAMPLES[DriftDetected], source="/driftloop/test", cause=cause)

    assert len(effect.correlationid) == len(effect.actor or "") == MAX_ATTRIBUTE_CHARS


@pytest.mark.parametrize("header", ["ce_id", "ce_type", "ce_source", "ce_specversion"])
def test_a_message_missing_a_required_cloudevents_header_is_refused(header: str) -> None:
    value, headers = _valid_message()
    del headers[header]

    with pytest.raises(MissingAttribute, match=header) as caught:
        EVENT_TYPES.decode(value, headers)
    assert caught.value.reason == "missing-attribute"


@pytest.mark.parametrize("header", ["ce_subject", "ce_correlationid", "ce_causationid", "ce_actor"])
def test_an_optional_attribute_given_empty_is_refused_by_name(header: str) -> None:
    # Read as "", an empty actor or cause was kept and travelled into every event the record caused.
    value, headers = _valid_message()
    headers[header] = b""

    with pytest.raises(MalformedEvent, match=f"header '{header}' is empty") as caught:
        EVENT_TYPES.decode(value, headers)
    assert caught.value.reason == "malformed"
    del headers[header]
    assert EVENT_TYPES.decode(value, headers).id == headers["ce_id"].decode()


def test_an_event_with_an_empty_optional_attribute_is_sent_without_it() -> None:
    # A row kept before consumers refused "" may come back as a cause: its effect must still be readable.
    event = new_event(EXAMPLES[DriftDetected], source="/driftloop/test", subject="", actor="")
    event = event.model_copy(update={"causationid": "", "correlationid": ""})
    _, value, headers = event.to_kafka()

    assert not {"ce_subject", "ce_correlationid", "ce_causationid", "ce_actor"} & {k for k, _ in headers}
    decoded = EVENT_TYPES.decode(value, headers)
    assert (decoded.subject, decoded.causationid, decoded.actor) == (None, None, None)
    assert decoded.correlationid == decoded.id


def test_a_header_that_is_not_utf8_is_refused() -> None:
    value, headers = _valid_message()
    headers["ce_source"] = b"\xff\xfe"

    with pytest.raises(MissingAttribute, match="UTF-8"):
        EVENT_TYPES.decode(value, headers)


def test_a_binary_header_that_is_no_cloudevents_attribute_leaves_the_event_readable() -> None:
    # Kafka headers are bytes: a tracer's binary context or another framework's tag is not ours to refuse.
    value, headers = _valid_message()
    pairs = [*headers.items(), ("x-trace-bin", b"\x00\xff\x10"), ("x-tag", None)]

    event = EVENT_TYPES.decode(value, pairs)

    assert event.id == headers["ce_id"].decode()
    assert event.type == headers["ce_type"].decode()


@pytest.mark.parametrize("header", ["ce_subject", "content-type", "ce_somextension"])
def test_a_cloudevents_header_that_is_not_utf8_is_refused_by_name(header: str) -> None:
    value, headers = _valid_message()
    headers[header] = b"\xff\xfe"

    with pytest.raises(MissingAttribute, match=f"header '{header}' is not UTF-8"):
        EVENT_TYPES.decode(value, headers)


def test_a_repeated_attribute_is_refused_beside_a_binary_header() -> None:
    value, headers = _valid_message()
    pairs = [("ce_id", b"other"), *headers.items(), ("x-trace-bin", b"\xff"), ("x-a", b"1"), ("x-b", b"2")]

    with pytest.raises(MalformedEvent, match="'ce_id' appears 2 times"):
        EVENT_TYPES.decode(value, pairs)


def test_a_binary_header_still_counts_toward_the_size_limit() -> None:
    value, headers = _valid_message()
    pairs = [*headers.items(), ("x-blob", b"\xff" * 2000)]

    with pytest.raises(OversizedEvent):
        EVENT_TYPES.decode(value, pairs, max_bytes=len(value) + 1500)


def test_another_cloudevents_spec_version_is_refused() -> None:
    value, headers = _valid_message()
    headers["ce_specversion"] = b"0.3"

    with pytest.raises(MalformedEvent, match=r"0\.3"):
        EVENT_TYPES.decode(value, headers)


@pytest.mark.parametrize("time", REFUSED)
def test_a_time_that_is_not_rfc3339_is_refused(time: str) -> None:
    value, headers = _valid_message()
    headers["ce_time"] = time.encode()

    with pytest.raises(MalformedEvent, match=re.escape(repr(time))) as caught:
        EVENT_TYPES.decode(value, headers)
    assert caught.value.reason == "malformed"
    assert "RFC 3339" in caught.value.detail or "no UTC form" in caught.value.detail
    with pytest.raises(MalformedEvent):
        parse_event_time(time)


def test_an_event_without_a_time_is_read_as_of_now() -> None:
    value, headers = _valid_message()
    del headers["ce_time"]
    before = datetime.now(UTC)

    assert before <= EVENT_TYPES.decode(value, headers).time <= datetime.now(UTC)


@pytest.mark.parametrize(("time", "instant"), ACCEPTED)
def test_every_rfc3339_date_time_is_accepted(time: str, instant: datetime) -> None:
    value, headers = _valid_message()
    headers["ce_time"] = time.encode()

    event = EVENT_TYPES.decode(value, headers)

    assert event.time == instant
    assert parse_event_time(time) == instant
    # Published again, it is written in the canonical form, which reads back as the same instant.
    _, _, again = event.to_kafka()
    assert EVENT_TYPES.decode(value, again).time == instant


@pytest.mark.parametrize("header", ["ce_id", "ce_type", "ce_actor", "ce_time", "content-type"])
def test_a_cloudevents_attribute_given_twice_is_refused(header: str) -> None:
    # A consumer reading the last and the audit trail the first would each act on another event.
    value, headers = _valid_message()
    given = [*headers.items(), ("ce_actor", b"user:alice")]
    repeated = [*given, (header, b"user:mallory" if header == "ce_actor" else headers[header])]

    with pytest.raises(MalformedEvent, match=f"header '{header}' appears 2 times") as caught:
        EVENT_TYPES.decode(value, repeated)
    assert caught.value.reason == "malformed"


def test_other_headers_may_repeat() -> None:
    value, headers = _valid_message()
    event = EVENT_TYPES.decode(value, [*headers.items(), ("trace", b"a"), ("trace", b"b"), ("note", None)])
    assert event.id == headers["ce_id"].decode()


def test_every_decoding_failure_is_a_malformed_event_with_a_distinct_reason() -> None:
    failures = [
        OversizedEvent,
        MissingAttribute,
        NotJson,
        UnknownEventType,
        UnknownSchemaVersion,
        SchemaInvalid,
    ]

    assert all(issubclass(cls, MalformedEvent) for cls in failures)
    assert len({cls.reason for cls in failures} | {MalformedEvent.reason}) == len(failures) + 1


# --- versions -----------------------------------------------------------------------------------------


def _v0_message() -> tuple[bytes, dict[str, bytes]]:
    value, headers = _valid_message()
    old = orjson.loads(value)
    old["model_name"] = old.pop("model")
    headers["ce_type"] = b"io.driftloop.TrainingCompleted.v0"
    return orjson.dumps(old), headers


def test_an_upcaster_reads_an_old_version_as_the_current_one() -> None:
    registry = EventTypeRegistry(EVENT_TYPES.classes())

    def rename_model(payload: dict[str, Any]) -> dict[str, Any]:
        payload = dict(payload)
        payload["model"] = payload.pop("model_name")
        return payload

    registry.register_upcaster(
        "io.driftloop.TrainingCompleted.v0", TrainingCompleted.event_type(), rename_model
    )
    value, headers = _v0_message()

    decoded = registry.decode(value, headers)

    assert decoded.type == TrainingCompleted.event_type()
    assert decoded.data == EXAMPLES[TrainingCompleted]


def test_an_upcaster_that_cannot_read_the_old_payload_gives_schema_invalid() -> None:
    registry = EventTypeRegistry(EVENT_TYPES.classes())

    def broken(payload: dict[str, Any]) -> dict[str, Any]:
        return {"model": payload["field_that_is_not_there"]}

    registry.register_upcaster("io.driftloop.TrainingCompleted.v0", TrainingCompleted.event_type(), broken)
    value, headers = _v0_message()

    with pytest.raises(SchemaInvalid, match="upcasting"):
        registry.decode(value, headers)


# --- numbers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_payload_with_a_non_finite_number_cannot_be_built(bad: float) -> None:
    payload = EXAMPLES[TrainingCompleted].model_dump()
    payload["metrics"] = {"roc_auc": bad}

    with pytest.raises(ValidationError, match="finite"):
        TrainingCompleted.model_validate(payload)


# --- interoperability: the CloudEvents SDK ------------------------------------------------------------


def _caused_event(payload: EventPayload) -> CloudEvent[Any]:
    root = new_event(EXAMPLES[DriftDetected], source="/driftloop/monitoring", actor="user:alice")
    return new_event(payload, source="/driftloop/test", cause=root)


@pytest.mark.parametrize("payload", EXAMPLE_LIST, ids=IDS)
def test_the_cloudevents_sdk_reads_every_message_we_produce(payload: EventPayload) -> None:
    event = _caused_event(payload)
    key, value, headers = event.to_kafka()

    read = ce_kafka.from_binary(
        ce_kafka.KafkaMessage(headers=dict(headers), key=key, value=value), JSONFormat()
    )

    assert read.get_specversion() == "1.0"
    assert read.get_id() == event.id
    assert read.get_type() == event.type
    assert read.get_source() == event.source
    assert read.get_subject() == event.subject
    assert read.get_time() == event.time
    assert read.get_datacontenttype() == "application/json"
    assert read.get_extension("correlationid") == event.correlationid
    assert read.get_extension("causationid") == event.causationid
    assert read.get_extension("actor") == "user:alice"
    assert read.get_extension("partitionkey") == event.subject
    assert read.get_data() == payload.model_dump(mode="json")


CLOUDEVENTS_ATTRIBUTE_NAME = re.compile("[a-z0-9]{1,20}")
"""CloudEvents 1.0: lower-case ASCII letters and digits (MUST), at most 20 characters (SHOULD)."""
URI_REFERENCE_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")
"""An absolute-path reference of RFC 3986 (what our sources are): ``source`` is a URI-reference."""


@pytest.mark.parametrize("payload", EXAMPLE_LIST, ids=IDS)
def test_every_record_we_produce_follows_cloudevents_and_its_kafka_binary_binding(
    payload: EventPayload,
) -> None:
    event = _caused_event(payload)
    key, value, header_list = event.to_kafka()
    headers = {name: raw.decode() for name, raw in header_list}

    # Binary mode: the data is the value as it is, `content-type` is `datacontenttype`, every other
    # attribute is a `ce_` header, each once.
    assert value == event.payload_bytes()
    assert headers.pop("content-type") == event.datacontenttype == "application/json"
    assert len(headers) == len(header_list) - 1
    assert all(name.startswith("ce_") for name in headers)
    attributes = {name.removeprefix("ce_"): text for name, text in headers.items()}
    assert {"id", "source", "specversion", "type"} <= attributes.keys()
    assert {"correlationid", "causationid", "actor"} <= attributes.keys()
    for name, text in attributes.items():
        assert CLOUDEVENTS_ATTRIBUTE_NAME.fullmatch(name), name
        assert text, f"{name} is empty"
        assert attribute_text_problem(text) is None, name
    assert attributes["specversion"] == "1.0"
    assert URI_REFERENCE_PATH.fullmatch(attributes["source"])
    assert parse_event_time(attributes["time"]) == event.time  # an RFC 3339 date-time
    # The key is mapped from an attribute, which stays in the event (the binding's key mapping).
    assert key == (attributes["subject"].encode() if "subject" in attributes else None)


def test_the_legacy_cloudevents_sdk_api_reads_our_messages_too() -> None:
    event = _caused_event(EXAMPLES[TrainingCompleted])
    key, value, headers = event.to_kafka()

    read = ce_kafka_v1.from_binary(ce_kafka_v1.KafkaMessage(headers=dict(headers), key=key, value=value))

    assert (read["id"], read["type"], read["source"], read["subject"]) == (
        event.id,
        event.type,
        event.source,
        event.subject,
    )
    assert (read["correlationid"], read["causationid"], read["actor"]) == (
        event.correlationid,
        event.causationid,
        event.actor,
    )
    assert read.get_data() == EXAMPLES[TrainingCompleted].model_dump(mode="json")


SDK_ATTRIBUTES = {
    "id": "ext-1",
    "source": "/external/producer",
    "type": TrainingCompleted.event_type(),
    "subject": "churn",
    "time": datetime(2025, 6, 2, 9, 0, tzinfo=UTC),
    "datacontenttype": "application/json",
    "correlationid": "root-1",
    "actor": "user:bob",
}
"""A TrainingCompleted's attributes as another publisher gives them to a CloudEvents SDK."""


def test_a_message_written_by_the_cloudevents_sdk_decodes() -> None:
    payload = EXAMPLES[TrainingCompleted]
    sdk_event = SdkCloudEvent(attributes=dict(SDK_ATTRIBUTES), data=payload.model_dump(mode="json"))
    message = ce_kafka.to_binary(sdk_event, JSONFormat())

    decoded = EVENT_TYPES.decode(message.value, message.headers)

    assert decoded.data == payload
    assert (decoded.id, decoded.subject, decoded.correlationid, decoded.actor) == (
        "ext-1",
        "churn",
        "root-1",
        "user:bob",
    )
    assert decoded.time == datetime(2025, 6, 2, 9, 0, tzinfo=UTC)


# --- structured mode ---------------------------------------------------------------------------------


def _structured(**changes: Any) -> tuple[bytes, dict[str, bytes]]:
    """TrainingCompleted in the Kafka binding's structured mode, written as an SDK writes it; ``changes``
    replace (or, as None, drop) members of the JSON event."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": "ext-2",
        "source": "/external/producer",
        "type": TrainingCompleted.event_type(),
        "subject": "churn",
        "time": "2025-06-02T09:00:00Z",
        "datacontenttype": "application/json",
        "correlationid": "root-2",
        "data": EXAMPLES[TrainingCompleted].model_dump(mode="json"),
    }
    for name, replaced in changes.items():
        if replaced is None:
            event.pop(name, None)
        else:
            event[name] = replaced
    return orjson.dumps(event), {"content-type": b"application/cloudevents+json"}


def test_a_structured_mode_message_written_by_the_cloudevents_sdk_decodes_as_its_binary_twin() -> None:
    payload = EXAMPLES[TrainingCompleted]
    sdk_event = SdkCloudEvent(attributes=dict(SDK_ATTRIBUTES), data=payload.model_dump(mode="json"))
    structured = ce_kafka.to_structured(sdk_event, JSONFormat())
    binary = ce_kafka.to_binary(sdk_event, JSONFormat())

    decoded = EVENT_TYPES.decode(structured.value, structured.headers)

    assert structured.headers["content-type"] == b"application/cloudevents+json"
    assert decoded == EVENT_TYPES.decode(binary.value, binary.headers)
    assert (decoded.id, decoded.subject, decoded.correlationid, decoded.actor, decoded.data) == (
        "ext-1",
        "churn",
        "root-1",
        "user:bob",
        payload,
    )


def test_a_structured_event_with_its_content_type_written_otherwise_and_null_attributes_decodes() -> None:
    value, headers = _structured(subject=None, actor=None, causationid=None)
    headers["content-type"] = b"Application/CloudEvents+JSON; charset=utf-8"

    decoded = EVENT_TYPES.decode(value, headers)

    assert (decoded.id, decoded.subject, decoded.actor) == ("ext-2", None, None)


@pytest.mark.parametrize(
    ("changes", "content_type", "error", "message"),
    [
        ({}, b"application/cloudevents-batch+json", NotJson, "one event per record"),
        ({}, b"application/cloudevents+avro", NotJson, "JSON format"),
        ({"id": None}, None, MissingAttribute, "attribute 'id' is missing"),
        ({"specversion": None}, None, MissingAttribute, "attribute 'specversion' is missing"),
        ({"specversion": "0.3"}, None, MalformedEvent, "ce_specversion is '0.3'"),
        ({"data": None}, None, NotJson, "no data"),
        ({"data": None, "data_base64": "AAE="}, None, NotJson, "binary"),
        ({"datacontenttype": "text/plain"}, None, NotJson, "content-type is 'text/plain'"),
        ({"actor": {"name": "bob"}}, None, MalformedEvent, "attribute 'actor' is a JSON dict"),
        ({"actor": "bob\nmallory"}, None, MalformedEvent, "control character"),
        ({"time": "yesterday"}, None, MalformedEvent, "RFC 3339"),
        ({"data": {"model": "churn"}}, None, SchemaInvalid, "TrainingCompleted payload is invalid"),
    ],
)
def test_a_structured_event_is_refused_with_the_reason_its_binary_twin_would_get(
    changes: dict[str, Any], content_type: bytes | None, error: type[MalformedEvent], message: str
) -> None:
    value, headers = _structured(**changes)
    if content_type is not None:
        headers["content-type"] = content_type

    with pytest.raises(error, match=message) as caught:
        EVENT_TYPES.decode(value, headers)
    assert type(caught.value) is error


@pytest.mark.parametrize("value", [b"{not json", b"[1, 2]", None])
def test_a_structured_value_that_is_no_json_event_is_refused_as_not_json(value: bytes | None) -> None:
    with pytest.raises(NotJson):
        EVENT_TYPES.decode(value, {"content-type": b"application/cloudevents+json"})


def test_a_structured_value_with_binary_mode_headers_beside_it_is_refused() -> None:
    value, headers = _structured()
    headers["ce_id"] = b"other"

    with pytest.raises(MalformedEvent, match="has the binary mode's header 'ce_id' too") as caught:
        EVENT_TYPES.decode(value, headers)
    assert caught.value.reason == "malformed"


def test_fast_event_ids_are_distinct_random_version_4_uuids_and_a_forked_child_makes_its_own() -> None:
    ids = EventIds()
    made = [ids() for _ in range(3 * 256 + 5)]  # several reads of the OS's randomness
    assert len(set(made)) == len(made)
    for made_id in made:
        parsed = uuid.UUID(made_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == made_id
    ids()  # the buffer is part-used now: a child must not take the parent's next ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, "".join(ids() for _ in range(300)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    child = {text[i : i + 36] for i in range(0, len(text), 36)}
    parent = {ids() for _ in range(300)}
    assert len(child) == 300 and not child & parent


def test_event_ids_shared_by_threads_are_never_handed_out_twice() -> None:
    ids = EventIds()
    start = threading.Barrier(8)
    made: list[list[str]] = [[] for _ in range(8)]

    def take(mine: list[str]) -> None:
        start.wait()
        mine.extend(ids() for _ in range(5_000))

    threads = [threading.Thread(target=take, args=(mine,)) for mine in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [made_id for mine in made for made_id in mine]
    assert len(every) == 40_000 and len(set(every)) == 40_000
