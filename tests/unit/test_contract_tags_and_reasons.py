"""A tag travels over Kafka within the bounds the registry's route keeps, and a reason a service composes
itself is always within the commands' cap: an event a producer makes is always valid."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from contracts.commands import REASON_MAX_CHARS, within_reason
from contracts.envelope import EventPayload, SchemaInvalid, new_event
from contracts.examples import EXAMPLES
from contracts.models import TAG_VALUE_MAX_CHARS, ModelStageChanged, ModelVersionTagged
from contracts.monitoring import CanaryVerdict
from contracts.registry import EVENT_TYPES
from contracts.training import TrainingRequested
from services.registry.schemas import TagCreate


def decoded(cls: type[EventPayload], **changes: Any) -> EventPayload:
    """The example event of ``cls`` with ``changes`` in its JSON, as a consumer decodes it."""
    _, raw, headers = new_event(EXAMPLES[cls], source="/driftloop/test").to_kafka()
    data = {**orjson.loads(raw), **changes}
    return EVENT_TYPES.decode(orjson.dumps(data), headers).data


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("key", "k" * 129),
        ("key", "a=b"),
        ("key", ""),
        ("key", " approved"),
        ("value", "v" * (TAG_VALUE_MAX_CHARS + 1)),
        ("previous", "v" * 10_000),
    ],
)
def test_a_tag_beyond_what_the_registry_route_takes_is_schema_invalid(field: str, value: str) -> None:
    # Over Kafka the key was any text of one character or more and the value of any length, into the audit
    # trail, where the registry's route refuses a key outside its pattern and a value over 500 characters.
    with pytest.raises(SchemaInvalid, match=field):
        decoded(ModelVersionTagged, **{field: value})


def test_a_tag_the_registry_route_takes_is_a_valid_event() -> None:
    longest = "v" * TAG_VALUE_MAX_CHARS
    assert TagCreate(value=longest).value == longest
    with pytest.raises(ValidationError):
        TagCreate(value=longest + "v")
    event = decoded(ModelVersionTagged, key="k" * 128, value=longest, previous=longest)
    assert isinstance(event, ModelVersionTagged) and event.value == longest


def test_within_reason_keeps_a_reason_under_the_cap_and_cuts_a_longer_one_within_it() -> None:
    assert within_reason("r" * REASON_MAX_CHARS) == "r" * REASON_MAX_CHARS
    cut = within_reason("r" * 10_000)
    assert len(cut) == REASON_MAX_CHARS and cut.endswith("r… (10,000 characters)")


@pytest.mark.parametrize("cls", [TrainingRequested, CanaryVerdict, ModelStageChanged])
def test_a_composed_reason_past_the_cap_makes_a_valid_event_within_it(cls: type[EventPayload]) -> None:
    # A manual retrain's reason is "requested by <actor>: <the command's reason>", the command's reason up to
    # the cap already: the event carried more than any command may.
    long = "requested by user:" + "a" * 200 + ": " + "r" * REASON_MAX_CHARS
    made = EXAMPLES[cls].model_copy(update={"reason": long})
    made = type(made).model_validate(made.model_dump())
    assert len(made.reason) == REASON_MAX_CHARS  # type: ignore[attr-defined]
    read = decoded(cls, reason=long)
    assert read.reason == made.reason  # type: ignore[attr-defined]
    assert cls.model_json_schema()["properties"]["reason"]["maxLength"] == REASON_MAX_CHARS
