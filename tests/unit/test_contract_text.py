"""What text an event may carry. Services store it in Postgres text and jsonb, which cannot hold a NUL
character, as UTF-8, which has no lone surrogate: ids, names and keys holding either are schema-invalid
(named by the dead letter), free text for people gets U+FFFD in their place, and traffic data (a
prediction's inputs and output, a ground-truth label) is carried exactly, for monitoring to store with the
same stand-in."""

from __future__ import annotations

import copy
import fnmatch
import re
import typing
from typing import Annotated, Any

import jsonschema_rs
import orjson
import pytest
from pydantic import AfterValidator, BaseModel, ValidationError

from contracts import generate
from contracts.common import NUL_STAND_IN, ContractModel, FreeText, Storable
from contracts.envelope import (
    BOUNDED_ATTRIBUTES,
    EventPayload,
    MalformedEvent,
    NotJson,
    PayloadReader,
    SchemaInvalid,
    attribute_text_problem,
    new_event,
)
from contracts.examples import EXAMPLES
from contracts.feedback import GroundTruthReceived
from contracts.monitoring import CanaryVerdict
from contracts.predictions import PredictionsLogged, read_prediction_columns, read_predictions_logged
from contracts.registry import ALL_PAYLOADS, EVENT_TYPES
from contracts.rollouts import RolloutPromoted, RolloutRolledBack, RolloutStarted, RolloutStepAdvanced
from contracts.training import TrainingCompleted

READERS: dict[type[EventPayload], PayloadReader] = {PredictionsLogged: read_predictions_logged}

FREE_TEXT = [
    "*Requested.reason",
    "ModelStageChanged.reason",
    "RolloutRolledBack.message",
    "CanaryVerdict.reason",
    "CanaryVerdict.evidence.*.detail",
    "DataQualityIssue.message",
    "DatasetRegistered.description",
    "TrainingSkipped.message",
    "TrainingFailed.message",
    "Validation*.checks.*.detail",
]
"""Paths (``<event>.<field>...``, ``*`` for any part) of the free text in the examples."""

TRAFFIC_DATA = [
    "PredictionsLogged.rows.*.inputs.*",
    "PredictionsLogged.rows.*.output.prediction",
    "PredictionsLogged.rows.*.output.probabilities.*",
    "GroundTruthReceived.label",
]
"""Paths of the traffic data in the examples: values as the caller sent them and the model answered, and the
keys of the dicts among them (feature names, class labels)."""


def _message(cls: type[EventPayload], payload: Any) -> tuple[bytes, dict[str, bytes]]:
    _, _, headers = new_event(EXAMPLES[cls], source="/driftloop/test").to_kafka()
    return orjson.dumps(payload), dict(headers)


def _decode(cls: type[EventPayload], payload: Any) -> EventPayload:
    value, headers = _message(cls, payload)
    return EVENT_TYPES.decode(value, headers, readers=READERS).data


def _with(cls: type[EventPayload], path: list[Any], text: str) -> dict[str, Any]:
    payload = EXAMPLES[cls].model_dump(mode="json")
    place = payload
    for part in path[:-1]:
        place = place[part]
    place[path[-1]] = text
    return payload


# --- the defects: ids holding NUL were accepted, then their consumer could not store them ----------------


@pytest.mark.parametrize(
    ("cls", "path"),
    [
        (GroundTruthReceived, ["prediction_id"]),
        (GroundTruthReceived, ["entity_key"]),
        (RolloutStarted, ["rollout_id"]),
        (RolloutStepAdvanced, ["rollout_id"]),
        (RolloutPromoted, ["rollout_id"]),
        (RolloutRolledBack, ["rollout_id"]),
        (CanaryVerdict, ["rollout_id"]),
        (PredictionsLogged, ["rollout_id"]),
        (PredictionsLogged, ["request_id"]),
        (PredictionsLogged, ["rows", 0, "prediction_id"]),
        (PredictionsLogged, ["rows", 0, "entity_key"]),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else ".".join(map(str, v)),
)
def test_an_id_holding_a_nul_is_schema_invalid_naming_the_field(
    cls: type[EventPayload], path: list[Any]
) -> None:
    payload = _with(cls, path, "r-91c2\x00")
    named = ".".join(map(str, path))

    with pytest.raises(SchemaInvalid, match=rf"{cls.__name__} payload is invalid at {named}: .*NUL"):
        _decode(cls, payload)
    with pytest.raises(ValidationError, match="NUL character"):
        cls.model_validate(payload)


def test_a_prediction_id_holding_a_nul_is_left_by_both_fast_readers_to_full_validation() -> None:
    for path in (["rows", 1, "prediction_id"], ["rows", 0, "entity_key"]):
        value = orjson.dumps(_with(PredictionsLogged, path, "p-2\x00"))
        assert read_predictions_logged(value) is None
        assert read_prediction_columns(value) is None
    # ... and the same payload without the NUL is theirs.
    value = orjson.dumps(_with(PredictionsLogged, ["rows", 0, "entity_key"], "p-2"))
    assert read_predictions_logged(value) is not None and read_prediction_columns(value) is not None


# --- every string of every example, one at a time -----------------------------------------------------


def _strings(value: Any, path: list[Any]) -> typing.Iterator[tuple[list[Any], bool]]:
    """(path, is a key) of every string in a dumped payload, the keys of its objects included (field names
    too: a field name holding NUL is an unknown field)."""
    if isinstance(value, str):
        yield path, False
    elif isinstance(value, dict):
        for key, item in value.items():
            yield [*path, key], True
            yield from _strings(item, [*path, key])
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, [*path, i])


def _cases() -> list[tuple[type[EventPayload], list[Any], bool]]:
    return [
        (cls, path, is_key)
        for cls in ALL_PAYLOADS
        for path, is_key in _strings(EXAMPLES[cls].model_dump(mode="json"), [])
    ]


def _with_nul(payload: dict[str, Any], path: list[Any], is_key: bool, nul: str = "\x00") -> dict[str, Any]:
    changed = copy.deepcopy(payload)
    place = changed
    for part in path[:-1]:
        place = place[part]
    last = path[-1]
    if is_key:
        # Rebuilt, so the key keeps its place (JSON objects in order: columns, features).
        items = list(place.items())
        place.clear()
        place.update((k + nul if k == last else k, v) for k, v in items)
    else:
        place[last] = place[last] + nul
    return changed


@pytest.mark.parametrize(
    ("cls", "path", "is_key"),
    _cases(),
    ids=lambda v: v.__name__ if isinstance(v, type) else ".".join(map(str, v)) if isinstance(v, list) else "",
)
def test_every_string_of_every_event_is_an_id_free_text_or_traffic_data(
    cls: type[EventPayload], path: list[Any], is_key: bool
) -> None:
    where = ".".join(map(str, [cls.__name__, *path]))
    payload = EXAMPLES[cls].model_dump(mode="json")
    changed = _with_nul(payload, path, is_key)

    traffic = [p for p in TRAFFIC_DATA if fnmatch.fnmatchcase(where, p)]
    # A field's own name is no traffic data, nor free text: only the keys of a dict of traffic data are.
    if traffic and not (is_key and not traffic[0].endswith("*")):
        assert _decode(cls, changed).model_dump(mode="json") == changed
    elif not is_key and any(fnmatch.fnmatchcase(where, p) for p in FREE_TEXT):
        assert _decode(cls, changed).model_dump(mode="json") == _with_nul(payload, path, is_key, NUL_STAND_IN)
    else:
        with pytest.raises(SchemaInvalid) as caught:
            _decode(cls, changed)
        reported = re.match(rf"{cls.__name__} payload is invalid at (.+?): ", caught.value.detail, re.DOTALL)
        assert reported is not None, caught.value.detail
        at, asked = reported.group(1), ".".join(map(str, path))
        # The field itself, the key (`metrics.roc_auc\0.[key]`), or the list or dict the string is in.
        assert at.startswith(asked) or asked.startswith(at + "."), (at, asked)


def _bare_str(tp: Any, covered: bool = False) -> bool:
    """Whether an annotation holds a ``str`` that no check covers (an Identifier, FreeText or a pattern)."""
    if typing.get_origin(tp) is Annotated:
        inner, *metadata = typing.get_args(tp)
        return _bare_str(inner, covered or any(_covers(m) for m in metadata))
    if tp is str:
        return not covered
    return any(_bare_str(arg, covered) for arg in typing.get_args(tp))


def _covers(metadata: Any) -> bool:
    if isinstance(metadata, Storable):
        return True
    if isinstance(metadata, AfterValidator) and metadata is typing.get_args(FreeText)[1]:
        return True
    return getattr(metadata, "pattern", None) is not None


UNCHECKED = {
    "PredictionRecord.inputs": "traffic data",
    "PredictionOutput.prediction": "traffic data",
    "PredictionOutput.probabilities": "traffic data (class labels as the model gives them)",
    "GroundTruthReceived.label": "traffic data",
    "DriftPolicy.feature_tests": "feature names checked by the policy's own validator",
    "DriftPolicy.feature_thresholds": "feature names checked by the policy's own validator",
}


def _contract_models() -> list[type[BaseModel]]:
    found: set[type[BaseModel]] = set(ALL_PAYLOADS)
    stack: list[type[BaseModel]] = list(ContractModel.__subclasses__())
    while stack:
        model = stack.pop()
        stack.extend(model.__subclasses__())
        if model.__module__.startswith("contracts."):
            found.add(model)
    return sorted(found, key=lambda m: m.__name__)


@pytest.mark.parametrize("model", _contract_models(), ids=lambda m: m.__name__)
def test_every_string_field_says_which_kind_of_text_it_is(model: type[BaseModel]) -> None:
    unruled = [
        name
        for name, info in model.model_fields.items()
        if f"{model.__name__}.{name}" not in UNCHECKED
        and _bare_str(info.annotation, any(_covers(m) for m in info.metadata))
    ]
    assert not unruled, f"{model.__name__}: {unruled} are plain str; make each an Identifier or FreeText"


def test_the_json_schemas_refuse_a_nul_in_an_id_or_a_key_and_allow_it_in_free_text() -> None:
    def valid(cls: type[EventPayload], payload: dict[str, Any]) -> bool:
        schema = orjson.loads((generate.ROOT / generate.schema_path(cls)).read_bytes())
        return bool(jsonschema_rs.is_valid(schema, payload))

    completed = EXAMPLES[TrainingCompleted].model_dump(mode="json")
    assert valid(TrainingCompleted, completed)
    assert not valid(TrainingCompleted, _with_nul(completed, ["run_id"], is_key=False))
    assert not valid(TrainingCompleted, _with_nul(completed, ["metrics", "roc_auc"], is_key=True))
    assert not valid(
        TrainingCompleted, _with_nul(completed, ["lineage", "environment", "python"], is_key=False)
    )
    assert not valid(TrainingCompleted, {**completed, "metrics": {"roc_auc": "high"}})  # values still typed
    truth = EXAMPLES[GroundTruthReceived].model_dump(mode="json")
    assert not valid(GroundTruthReceived, {**truth, "prediction_id": "p-1\x00"})
    assert valid(GroundTruthReceived, {**truth, "label": "yes\x00"})
    rolled_back = EXAMPLES[RolloutRolledBack].model_dump(mode="json")
    assert valid(RolloutRolledBack, {**rolled_back, "message": "saw \x00"})
    assert not valid(RolloutRolledBack, {**rolled_back, "rollout_id": "r-1\x00"})


# --- free text -----------------------------------------------------------------------------------------


def test_free_text_built_with_a_nul_or_a_lone_surrogate_is_published_with_the_stand_in() -> None:
    rolled_back = RolloutRolledBack.model_validate(
        {**EXAMPLES[RolloutRolledBack].model_dump(), "message": "saw 'a\x00b' and '\ud800'"}
    )
    assert rolled_back.message == f"saw 'a{NUL_STAND_IN}b' and '{NUL_STAND_IN}'"
    _, value, _ = new_event(rolled_back, source="/driftloop/test").to_kafka()
    assert RolloutRolledBack.model_validate_json(value) == rolled_back


# --- lone surrogates -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [b'"p-\\ud800"', b'"p-\\udc00"', b'"p-\xed\xa0\x80"'],
    ids=["escaped-high", "escaped-low", "raw-utf8-surrogate"],
)
def test_a_lone_surrogate_is_not_json_to_the_consumers_readers(text: bytes) -> None:
    field = b'"prediction_id"'
    for cls in (GroundTruthReceived, PredictionsLogged):
        value, headers = _message(cls, EXAMPLES[cls].model_dump(mode="json"))
        at = value.index(field) + len(field) + 1
        end = value.index(b'"', at + 1) + 1
        broken = value[:at] + text + value[end:]
        with pytest.raises(NotJson):
            EVENT_TYPES.decode(broken, headers, readers=READERS)
        with pytest.raises(NotJson):
            EVENT_TYPES.decode(broken, headers)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        # pydantic's own word where a length is checked: it reads the text as UTF-8 for that.
        ("prediction_id", "unable to parse raw data as a unicode string"),
        ("entity_key", "holds a lone surrogate"),
    ],
)
def test_an_id_built_with_a_lone_surrogate_is_refused_where_the_event_is_made(
    field: str, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        GroundTruthReceived.model_validate({**EXAMPLES[GroundTruthReceived].model_dump(), field: "p-\ud800"})


# --- the envelope ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", BOUNDED_ATTRIBUTES)
def test_a_cloudevents_attribute_holding_a_nul_is_malformed(header: str) -> None:
    value, headers = _message(GroundTruthReceived, EXAMPLES[GroundTruthReceived].model_dump(mode="json"))
    headers[header] = b"user:al\x00ice"

    with pytest.raises(MalformedEvent, match=rf"header '{header}' holds a NUL character") as caught:
        EVENT_TYPES.decode(value, headers)
    assert caught.value.reason == "malformed"


# ce_time is an RFC 3339 date-time, ASCII only: one with any such character is refused as not one
# (tests/unit/event_times.py).
@pytest.mark.parametrize("header", [name for name in BOUNDED_ATTRIBUTES if name != "ce_time"])
@pytest.mark.parametrize(
    ("char", "what"),
    [
        ("\n", "a control character (U+000A)"),
        ("\t", "a control character (U+0009)"),
        ("\x7f", "a control character (U+007F)"),
        ("\x85", "a control character (U+0085)"),
        ("\ufdd0", "a Unicode noncharacter (U+FDD0)"),
        ("\U0010ffff", "a Unicode noncharacter (U+10FFFF)"),
    ],
    ids=["newline", "tab", "delete", "c1-control", "noncharacter", "last-noncharacter"],
)
def test_a_cloudevents_attribute_holding_a_character_cloudevents_disallows_is_malformed(
    header: str, char: str, what: str
) -> None:
    """CloudEvents 1.0's String type has no control characters, noncharacters or lone surrogates. Read, such
    an attribute would travel into the events it causes (a cascade's actor and correlation id), which would
    then not be CloudEvents: the record is dead-lettered naming the header and the character."""
    value, headers = _message(GroundTruthReceived, EXAMPLES[GroundTruthReceived].model_dump(mode="json"))
    headers[header] = f"user:al{char}ice".encode()

    with pytest.raises(MalformedEvent, match=rf"header '{header}' holds {re.escape(what)}") as caught:
        EVENT_TYPES.decode(value, headers)
    assert caught.value.reason == "malformed"


def test_every_character_cloudevents_disallows_fails_the_decoders_quick_look() -> None:
    """The decoder looks at all header text with str.isprintable() and runs the exact test only when that is
    False: so every character the exact test refuses must be one isprintable() is False for."""
    disallowed = [c for c in map(chr, range(0x110000)) if attribute_text_problem(c) is not None]

    assert len(disallowed) == 32 + 33 + 2048 + 32 + 34  # C0, DEL and C1, surrogates, noncharacters
    assert [c for c in disallowed if c.isprintable()] == []


def test_attributes_in_any_script_and_other_headers_with_any_text_still_decode() -> None:
    value, headers = _message(GroundTruthReceived, EXAMPLES[GroundTruthReceived].model_dump(mode="json"))
    # Printable to CloudEvents but not to str.isprintable() (a no-break space, a format character), and a
    # control character in a header that is no CloudEvents attribute.
    headers["ce_actor"] = "user:Zoë\u00a0Ødegård\u200d".encode()
    headers["x-trace-note"] = b"line one\nline two"

    event = EVENT_TYPES.decode(value, headers)

    assert event.actor == "user:Zoë\u00a0Ødegård\u200d"
