"""The event payloads, the topic map and the generated specs."""

from __future__ import annotations

import base64
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, cast

import jsonschema_rs
import orjson
import pytest
import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, TypeAdapter, ValidationError

import contracts
from contracts import generate
from contracts.audit import AuditCheckpoint
from contracts.commands import (
    REASON_MAX_CHARS,
    ArchiveRequested,
    PromoteRequested,
    RetrainRequested,
    RollbackRequested,
)
from contracts.common import (
    ID_MAX_CHARS,
    PG_BIGINT_MAX,
    PG_INTEGER_MAX,
    SEED_MAX,
    ContractModel,
    ModelSignature,
    Task,
    TrafficWindow,
)
from contracts.datasets import DATASET_MODELS_MAX, DatasetRegistered
from contracts.envelope import EventPayload, SchemaInvalid, new_event
from contracts.examples import AUDIT_EXAMPLE_PUBLIC_KEY, EXAMPLES
from contracts.feedback import GroundTruthReceived
from contracts.models import ModelStageChanged, ModelVersionRegistered
from contracts.monitoring import CanaryVerdict, DriftDetected, PerformanceDegraded
from contracts.predictions import PredictionsLogged
from contracts.registry import ALL_PAYLOADS, EVENT_TYPES
from contracts.rollouts import RolloutPromoted, RolloutRolledBack, RolloutStarted, RolloutStepAdvanced
from contracts.topics import AUDIT, DEAD_LETTER, SERVICES, TOPICS
from contracts.training import TrainingCompleted, TrainingRequested
from contracts.validation import ValidationFailed, ValidationPassed

PAYLOAD_IDS = [cls.__name__ for cls in ALL_PAYLOADS]


def _all_contract_modules() -> list[str]:
    return [f"contracts.{m.name}" for m in pkgutil.iter_modules(contracts.__path__)]


def _concrete_payload_classes() -> set[type[EventPayload]]:
    for module in _all_contract_modules():
        importlib.import_module(module)
    found: set[type[EventPayload]] = set()
    stack = list(EventPayload.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.event_name and cls.__module__.startswith("contracts."):
            found.add(cls)
    return found


def _value_types() -> set[type[ContractModel]]:
    for module in _all_contract_modules():
        importlib.import_module(module)
    found: set[type[ContractModel]] = set()
    stack = list(ContractModel.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("contracts."):  # not a service's own subclass (monitoring's policy)
            found.add(cls)
    return found


# --- the catalogue of payload classes ----------------------------------------------------------------


def test_every_payload_class_is_registered_and_on_the_topic_map() -> None:
    assert _concrete_payload_classes() == set(ALL_PAYLOADS)
    assert set(EVENT_TYPES.classes()) == set(ALL_PAYLOADS)


def test_every_payload_has_an_example() -> None:
    assert set(EXAMPLES) == set(ALL_PAYLOADS)


@pytest.mark.parametrize("cls", ALL_PAYLOADS, ids=PAYLOAD_IDS)
def test_the_wire_name_is_the_class_name_at_version_one(cls: type[EventPayload]) -> None:
    assert cls.event_name == cls.__name__
    assert cls.version == 1
    assert cls.event_type() == f"io.driftloop.{cls.__name__}.v1"


def test_event_types_are_unique() -> None:
    types = [cls.event_type() for cls in ALL_PAYLOADS]
    assert len(types) == len(set(types))


@pytest.mark.parametrize("cls", ALL_PAYLOADS, ids=PAYLOAD_IDS)
def test_each_payload_names_the_topic_that_carries_it(cls: type[EventPayload]) -> None:
    carriers = [spec.name for spec in TOPICS.values() if cls in spec.events]
    assert carriers == [cls.topic]


@pytest.mark.parametrize("cls", ALL_PAYLOADS, ids=PAYLOAD_IDS)
def test_the_subject_field_is_a_field_of_the_payload(cls: type[EventPayload]) -> None:
    if cls.subject_field is not None:
        assert cls.subject_field in cls.model_fields
        assert EXAMPLES[cls].event_subject()
    else:  # no subject field (AuditCheckpoint): the payload implies no subject (the case ran no check)
        assert EXAMPLES[cls].event_subject() is None


def test_past_tense_facts_and_imperative_requests() -> None:
    requests = {cls.__name__ for cls in ALL_PAYLOADS if cls.__name__.endswith("Requested")}
    assert requests == {
        "TrainingRequested",
        "RetrainRequested",
        "PromoteRequested",
        "RollbackRequested",
        "ArchiveRequested",
    }
    assert all(
        cls.topic == "mlops.commands"
        for cls in ALL_PAYLOADS
        if cls.__name__ in requests - {"TrainingRequested"}
    )


# --- payload rules ------------------------------------------------------------------------------------


def _models() -> list[type[BaseModel]]:
    return [*ALL_PAYLOADS, *sorted(_value_types(), key=lambda c: c.__name__)]


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_field_has_a_description(model: type[BaseModel]) -> None:
    undescribed = [name for name, info in model.model_fields.items() if not (info.description or "").strip()]
    assert not undescribed, f"{model.__name__} fields without description: {undescribed}"
    assert (model.__doc__ or "").strip(), f"{model.__name__} has no docstring"


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_field_example_is_a_valid_value_of_its_field(model: type[BaseModel]) -> None:
    for name, info in model.model_fields.items():
        # Annotated[annotation, FieldInfo] re-applies the field's constraints (pattern, ge, ...).
        adapter: TypeAdapter[Any] = TypeAdapter(cast(Any, Annotated[info.annotation, info]))
        for example in info.examples or []:
            try:
                adapter.validate_python(example)
            except ValidationError as exc:
                pytest.fail(f"{model.__name__}.{name} example {example!r} is invalid: {exc}")


@pytest.mark.parametrize("cls", ALL_PAYLOADS, ids=PAYLOAD_IDS)
def test_payloads_are_frozen(cls: type[EventPayload]) -> None:
    example = EXAMPLES[cls]
    name = next(iter(cls.model_fields))

    with pytest.raises(ValidationError, match="frozen"):
        setattr(example, name, getattr(example, name))


@pytest.mark.parametrize("cls", ALL_PAYLOADS, ids=PAYLOAD_IDS)
def test_payloads_reject_unknown_fields(cls: type[EventPayload]) -> None:
    with pytest.raises(ValidationError, match="surprise"):
        cls.model_validate({**EXAMPLES[cls].model_dump(mode="json"), "surprise": 1})


def _nested_value_instances() -> dict[type[ContractModel], ContractModel]:
    """One instance of every value type found inside the examples."""
    found: dict[type[ContractModel], ContractModel] = {}

    def walk(value: Any) -> None:
        if isinstance(value, ContractModel):
            found.setdefault(type(value), value)
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    for example in EXAMPLES.values():
        walk(example)
    return found


NESTED = _nested_value_instances()


def test_the_examples_exercise_every_value_type() -> None:
    assert set(NESTED) == _value_types()


@pytest.mark.parametrize("instance", list(NESTED.values()), ids=lambda v: type(v).__name__)
def test_nested_value_types_are_frozen_and_reject_unknown_fields(instance: ContractModel) -> None:
    name = next(iter(type(instance).model_fields))
    with pytest.raises(ValidationError, match="frozen"):
        setattr(instance, name, getattr(instance, name))
    with pytest.raises(ValidationError, match="surprise"):
        type(instance).model_validate({**instance.model_dump(mode="json"), "surprise": 1})


@pytest.mark.parametrize("cls", ALL_PAYLOADS, ids=PAYLOAD_IDS)
def test_every_example_survives_json(cls: type[EventPayload]) -> None:
    example = EXAMPLES[cls]
    assert cls.model_validate_json(example.model_dump_json()) == example


def _with(cls: type[EventPayload], **changes: Any) -> dict[str, Any]:
    return {**EXAMPLES[cls].model_dump(mode="json"), **changes}


@pytest.mark.parametrize(
    ("cls", "changes", "message"),
    [
        (RolloutStarted, {"steps": [0.5, 0.1, 1.0]}, "strictly increasing"),
        (RolloutStarted, {"steps": [0.1, 0.5]}, "last step must be 1.0"),
        (RolloutStarted, {"weight": 0.5}, r"steps\[step_index\]"),
        (RolloutStarted, {"canary_version": 6}, "differ"),
        (RolloutStepAdvanced, {"canary_version": 6}, "canary_version must differ from stable_version"),
        (RolloutStepAdvanced, {"weight": 0.1}, "larger than previous_weight"),
        (RolloutPromoted, {"model_version": 6}, "model_version must differ from previous_version"),
        (RolloutRolledBack, {"canary_version": 7}, "canary_version must differ from stable_version"),
        (ValidationFailed, {"failed_checks": []}, "failed"),
        (ValidationPassed, {"failed_checks": ["roc_auc>=0.75"]}, "failed_checks"),
        (ModelStageChanged, {"to_stage": "canary"}, "not a change"),
        (DriftDetected, {"drifted_features": ["nope"]}, "no evidence"),
        (TrainingCompleted, {"model": "bad name/with slash"}, "pattern"),
        (TrainingCompleted, {"metrics": {"roc_auc": "high"}}, "number"),
    ],
    ids=[
        "decreasing-steps",
        "steps-not-ending-at-all-traffic",
        "weight-not-the-current-step",
        "canary-equals-stable",
        "step-canary-equals-stable",
        "step-not-growing",
        "promoted-equals-previous",
        "rolled-back-equals-stable",
        "failed-without-failures",
        "passed-with-failures",
        "stage-unchanged",
        "drifted-feature-without-evidence",
        "unsafe-model-name",
        "non-numeric-metric",
    ],
)
def test_payloads_refuse_inconsistent_content(
    cls: type[EventPayload], changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        cls.model_validate(_with(cls, **changes))


def test_a_cut_validation_event_may_name_failed_checks_it_leaves_out_and_never_a_passed_one() -> None:
    cut = _with(ValidationFailed, checks_truncated=True, checks_total=9, failed_checks_total=2)
    named = ValidationFailed.model_validate(
        {**cut, "failed_checks": ["roc_auc>=0.75", "slice:plan=basic:f1"]}
    )
    assert named.failed_checks == ["roc_auc>=0.75", "slice:plan=basic:f1"]
    for failed_checks in (["slice:plan=basic:f1"], ["roc_auc>=0.75", "sanity:not-constant"]):
        with pytest.raises(ValidationError, match="every check in checks that did not pass"):
            ValidationFailed.model_validate({**cut, "failed_checks": failed_checks})
    with pytest.raises(ValidationError, match="exactly"):
        ValidationFailed.model_validate(_with(ValidationFailed, failed_checks=["roc_auc>=0.75", "slice:x"]))


def test_a_classification_signature_must_list_its_classes() -> None:
    signature = EXAMPLES[TrainingCompleted].model_dump()["signature"]

    with pytest.raises(ValidationError, match="classes"):
        ModelSignature.model_validate({**signature, "classes": None})
    with pytest.raises(ValidationError, match="no classes"):
        ModelSignature.model_validate({**signature, "task": Task.REGRESSION})
    with pytest.raises(ValidationError, match="unique"):
        ModelSignature.model_validate({**signature, "features": signature["features"] * 2})


def test_a_window_cannot_end_before_it_starts() -> None:
    window = EXAMPLES[DriftDetected].model_dump()["window"]

    with pytest.raises(ValidationError, match="before its start"):
        TrafficWindow.model_validate({**window, "start": window["end"], "end": window["start"]})


def test_timestamps_must_carry_a_timezone() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        PredictionsLogged.model_validate(_with(PredictionsLogged, predicted_at="2025-06-02T09:20:03"))


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (TrainingRequested, "job_id"),
        (TrainingCompleted, "job_id"),
        (TrainingCompleted, "run_id"),
        (ModelVersionRegistered, "run_id"),
        (ModelVersionRegistered, "job_id"),
    ],
)
def test_a_job_or_run_id_fits_an_index_entry(cls: type[EventPayload], name: str) -> None:
    # Four-byte characters at the bound: 2,048 bytes, within a Postgres index entry beside any model name.
    cls.model_validate(_with(cls, **{name: "\U0001d4c1" * ID_MAX_CHARS}))
    with pytest.raises(ValidationError, match="at most 512 characters"):
        cls.model_validate(_with(cls, **{name: "r" * (ID_MAX_CHARS + 1)}))


@pytest.mark.parametrize(
    ("cls", "path", "largest"),
    [
        (DatasetRegistered, ("row_count",), PG_BIGINT_MAX),
        (DatasetRegistered, ("artifact", "size_bytes"), PG_BIGINT_MAX),
        (TrainingCompleted, ("train_rows",), PG_BIGINT_MAX),
        (TrainingCompleted, ("holdout_rows",), PG_BIGINT_MAX),
        (TrainingCompleted, ("lineage", "seed"), SEED_MAX),
        (DriftDetected, ("window", "size"), PG_INTEGER_MAX),
        (ValidationPassed, ("checks_total",), PG_INTEGER_MAX),
        (ValidationPassed, ("failed_checks_total",), PG_INTEGER_MAX),
    ],
)
def test_a_number_fits_the_column_its_consumers_keep_it_in(
    cls: type[EventPayload], path: tuple[str, ...], largest: int
) -> None:
    def with_value(value: int) -> dict[str, Any]:
        data = EXAMPLES[cls].model_dump(mode="json")
        *parents, leaf = path
        inner = data
        for name in parents:
            inner = inner[name]
        inner[leaf] = value
        return data

    if path == ("checks_total",):
        cls.model_validate({**with_value(largest), "checks_truncated": True})
    elif path != ("failed_checks_total",):
        cls.model_validate(with_value(largest))
    with pytest.raises(ValidationError, match=f"less than or equal to {largest}"):
        cls.model_validate(with_value(largest + 1))


def test_a_dataset_names_no_more_models_than_an_upload_may() -> None:
    # One event naming many models made training decide (and publish) a retrain for each in one transaction.
    event = new_event(EXAMPLES[DatasetRegistered], source="/driftloop/test")
    _, raw, headers = event.to_kafka()
    data = orjson.loads(raw)
    data["models"] = [f"m{i}" for i in range(DATASET_MODELS_MAX)]
    assert len(EVENT_TYPES.decode(orjson.dumps(data), headers).data.models) == DATASET_MODELS_MAX
    data["models"].append("one-more")
    with pytest.raises(
        SchemaInvalid, match=f"invalid at models: .*at most {DATASET_MODELS_MAX} items"
    ) as caught:
        EVENT_TYPES.decode(orjson.dumps(data), headers)
    assert caught.value.reason == "schema-invalid"


@pytest.mark.parametrize("cls", [RetrainRequested, PromoteRequested, RollbackRequested, ArchiveRequested])
def test_a_command_reason_says_something_within_the_bound_the_http_routes_keep(
    cls: type[EventPayload],
) -> None:
    # The routes refuse these with 422; another producer's command carried them to the registry and serving.
    event = new_event(EXAMPLES[cls], source="/driftloop/test")
    _, raw, headers = event.to_kafka()
    data = orjson.loads(raw)
    data["reason"] = "é" * REASON_MAX_CHARS
    assert EVENT_TYPES.decode(orjson.dumps(data), headers).data.reason == data["reason"]
    for reason, why in (
        (" \t\n", "a reason must say something"),
        ("r" * (REASON_MAX_CHARS + 1), "at most 2000"),
    ):
        data["reason"] = reason
        with pytest.raises(SchemaInvalid, match=f"invalid at reason: .*{why}") as caught:
            EVENT_TYPES.decode(orjson.dumps(data), headers)
        assert caught.value.reason == "schema-invalid"


def test_a_missing_input_value_is_null() -> None:
    logged = EXAMPLES[PredictionsLogged]
    assert isinstance(logged, PredictionsLogged)
    row = logged.rows[1]
    assert row.inputs["monthly_charges"] is None


def test_the_checkpoint_example_verifies_with_its_public_key() -> None:
    checkpoint = EXAMPLES[AuditCheckpoint]
    assert isinstance(checkpoint, AuditCheckpoint)
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(AUDIT_EXAMPLE_PUBLIC_KEY))

    key.verify(base64.b64decode(checkpoint.signature), checkpoint.signing_input())
    tampered = checkpoint.model_copy(update={"sequence": checkpoint.sequence - 1})
    with pytest.raises(InvalidSignature):
        key.verify(base64.b64decode(checkpoint.signature), tampered.signing_input())


# --- the topic map ------------------------------------------------------------------------------------


def test_every_topic_of_the_platform_is_on_the_map() -> None:
    assert list(TOPICS) == [
        "mlops.datasets",
        "mlops.training",
        "mlops.models",
        "mlops.validation",
        "mlops.rollouts",
        "mlops.monitoring",
        "mlops.predictions",
        "mlops.feedback",
        "mlops.commands",
        "mlops.audit",
        DEAD_LETTER,
    ]
    assert TOPICS["mlops.predictions"].partitions == 6
    assert TOPICS["mlops.predictions"].high_volume
    assert [name for name, spec in TOPICS.items() if spec.high_volume] == ["mlops.predictions"]


def test_producers_and_consumers_are_services_of_the_platform() -> None:
    for spec in TOPICS.values():
        assert set(spec.producers) | set(spec.consumers) <= set(SERVICES), spec.name
        for route in spec.routes:
            assert route.producers, f"{route.event.__name__} has no producer"


def test_audit_reads_every_topic_but_its_own_and_keeps_dead_letters_as_such() -> None:
    unaudited = {name for name, spec in TOPICS.items() if AUDIT not in spec.consumers}
    assert unaudited == {"mlops.audit"}
    assert TOPICS[DEAD_LETTER].consumers == (AUDIT,)
    assert not TOPICS[DEAD_LETTER].audited  # recorded as dead letters, not as the events they carry


def _consumers_of(cls: type[EventPayload]) -> set[str]:
    spec = TOPICS[cls.topic]
    return {c for route in spec.routes if route.event is cls for c in route.consumers}


def _producers_of(cls: type[EventPayload]) -> set[str]:
    spec = TOPICS[cls.topic]
    return {p for route in spec.routes if route.event is cls for p in route.producers}


@pytest.mark.parametrize(
    ("event", "producer", "consumer"),
    [
        (PredictionsLogged, "serving", "monitoring"),
        (DriftDetected, "monitoring", "training"),
        (PerformanceDegraded, "monitoring", "training"),
        (TrainingCompleted, "training", "registry"),
        (ModelVersionRegistered, "registry", "validation"),
        (ValidationPassed, "validation", "serving"),
        (ValidationFailed, "validation", "registry"),
        (RolloutStarted, "serving", "monitoring"),
        (CanaryVerdict, "monitoring", "serving"),
        (RolloutPromoted, "serving", "registry"),
        (RolloutRolledBack, "serving", "registry"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else v,
)
def test_the_topic_map_closes_the_loop(event: type[EventPayload], producer: str, consumer: str) -> None:
    assert producer in _producers_of(event)
    assert consumer in _consumers_of(event)


@pytest.mark.parametrize("service", sorted(set(SERVICES) - {AUDIT}))
def test_the_topic_map_names_exactly_the_events_each_service_handles(service: str) -> None:
    """The map is what docs/events.md and the AsyncAPI document say; each service's HANDLERS is what runs
    (audit records every topic and has no per-type handlers)."""
    handled = set(importlib.import_module(f"services.{service}.handlers").HANDLERS)
    routed = {route.event for spec in TOPICS.values() for route in spec.routes if service in route.consumers}
    assert sorted(t.__name__ for t in handled) == sorted(t.__name__ for t in routed)


# --- generated specs ------------------------------------------------------------------------------------


def test_the_checked_in_specs_are_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert generate.stale_files() == []
    assert generate.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_generation_is_the_same_in_every_process() -> None:
    # Within one process a set of strings iterates in one order, so generating twice there could not differ;
    # across processes str hashes, and with them that order, change with PYTHONHASHSEED.
    code = "import json; from contracts import generate; print(json.dumps(generate.expected_files()))"
    made = [
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        for seed in ("1", "2")
    ]
    assert json.loads(made[0]) == json.loads(made[1]) == generate.expected_files()


def _copy_of_generated(tmp_path: Path) -> Path:
    for rel in generate.expected_files():
        target = tmp_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(generate.ROOT / rel, target)
    return tmp_path


def test_check_mode_names_every_stale_missing_or_extra_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy_of_generated(tmp_path)
    (root / generate.schema_path(DriftDetected)).write_text("{}\n")
    (root / generate.CATALOGUE_FILE).unlink()
    (root / generate.SCHEMA_DIR / "Removed.v1.json").write_text("{}\n")

    assert generate.main(["--check", "--root", str(root)]) == 1

    err = capsys.readouterr().err
    assert "contracts/schemas/DriftDetected.v1.json (out of date)" in err
    assert "docs/events.md (missing)" in err
    assert "contracts/schemas/Removed.v1.json (no such event any more)" in err
    assert "python -m contracts.generate" in err


def test_writing_repairs_what_check_mode_reports(tmp_path: Path) -> None:
    root = _copy_of_generated(tmp_path)
    (root / generate.ASYNCAPI_FILE).write_text("stale\n")
    (root / generate.SCHEMA_DIR / "Removed.v1.json").write_text("{}\n")

    changed = generate.write(root)

    assert sorted(changed) == sorted([generate.ASYNCAPI_FILE, f"{generate.SCHEMA_DIR}/Removed.v1.json"])
    assert generate.stale_files(root) == []


@pytest.mark.parametrize("cls", ALL_PAYLOADS, ids=PAYLOAD_IDS)
def test_each_json_schema_is_draft_2020_12_and_strict(cls: type[EventPayload]) -> None:
    schema = json.loads((generate.ROOT / generate.schema_path(cls)).read_text())

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["x-cloudevents-type"] == cls.event_type()
    assert schema["x-topic"] == cls.topic
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {n for n, f in cls.model_fields.items() if f.is_required()}
    assert cls.model_validate(schema["examples"][0]) == EXAMPLES[cls]


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_the_asyncapi_document_describes_every_topic_message_and_operation() -> None:
    document = yaml.safe_load((generate.ROOT / generate.ASYNCAPI_FILE).read_text())

    assert document["asyncapi"] == "3.0.0"
    assert set(document["channels"]) == set(TOPICS)
    for name, channel in document["channels"].items():
        assert channel["address"] == name
        assert channel["bindings"]["kafka"]["partitions"] == TOPICS[name].partitions
        for message_ref in channel["messages"].values():
            _resolve(document, message_ref["$ref"])
    messages = document["components"]["messages"]
    for cls in ALL_PAYLOADS:
        message = messages[cls.event_name]
        assert message["headers"]["allOf"][1]["properties"]["ce_type"]["const"] == cls.event_type()
        payload_file = generate.ROOT / "contracts" / message["payload"]["$ref"]
        assert payload_file.resolve() == (generate.ROOT / generate.schema_path(cls)).resolve()
        _resolve(document, message["headers"]["allOf"][0]["$ref"])
    for operation in document["operations"].values():
        assert operation["action"] in {"send", "receive"}
        channel = _resolve(document, operation["channel"]["$ref"])
        for message_ref in operation["messages"]:
            assert message_ref["$ref"].startswith(operation["channel"]["$ref"] + "/messages/")
            assert _resolve(document, message_ref["$ref"]) in channel["messages"].values()


ASYNCAPI_SCHEMA = Path(__file__).parents[1] / "schemas" / "asyncapi-3.0.0.json"
"""The official AsyncAPI 3.0.0 JSON Schema, vendored (see tests/schemas/README.md)."""


def _asyncapi_problems(document: dict[str, Any]) -> list[str]:
    validator = jsonschema_rs.validator_for(json.loads(ASYNCAPI_SCHEMA.read_text()))
    return [
        f"/{'/'.join(map(str, e.instance_path))}: {e.message:.200}" for e in validator.iter_errors(document)
    ]


def test_the_asyncapi_document_is_valid_against_the_official_asyncapi_3_schema() -> None:
    """Any AsyncAPI 3.0 tool reads contracts/asyncapi.yaml: it validates against the official schema, with
    each message's payload schema (a file under contracts/schemas/) read in place of its reference, so they
    are checked as AsyncAPI Schema Objects too."""
    document = yaml.safe_load((generate.ROOT / generate.ASYNCAPI_FILE).read_text())
    for message in document["components"]["messages"].values():
        ref = message.get("payload", {}).get("$ref")
        if ref is not None:
            message["payload"] = json.loads((generate.ROOT / "contracts" / ref).read_text())

    assert _asyncapi_problems(document) == []


def test_the_asyncapi_schema_check_finds_a_wrong_document() -> None:
    document = yaml.safe_load((generate.ROOT / generate.ASYNCAPI_FILE).read_text())
    next(iter(document["operations"].values()))["action"] = "publish"  # AsyncAPI 2's word, not 3's

    assert _asyncapi_problems(document) != []


@pytest.mark.parametrize("cls", ALL_PAYLOADS, ids=lambda c: c.__name__)
def test_each_asyncapi_message_gives_the_kafka_key_it_is_sent_with(cls: type[EventPayload]) -> None:
    """The Kafka binding's key of each message says what the record's key is: the subject, as text, or no key
    at all for an event without a subject (the audit checkpoints), which was documented as a string."""
    messages = yaml.safe_load((generate.ROOT / generate.ASYNCAPI_FILE).read_text())["components"]["messages"]
    key, _, _ = new_event(EXAMPLES[cls], source="/driftloop/test").to_kafka()

    sent = key.decode() if key is not None else None
    assert jsonschema_rs.is_valid(messages[cls.event_name]["bindings"]["kafka"]["key"], sent), sent


def test_the_asyncapi_dead_letter_is_not_declared_json() -> None:
    """A dead letter's value is the original's bytes, and the records dead-lettered as not-json are the ones
    that are not: declared ``application/json`` (the document's default content type, which the DeadLetter
    message took), a consumer generated from the document would fail on them. Its key is the original's."""
    document = yaml.safe_load((generate.ROOT / generate.ASYNCAPI_FILE).read_text())
    dead_letter = document["components"]["messages"]["DeadLetter"]

    assert dead_letter.get("contentType", document["defaultContentType"]) == "application/octet-stream"
    key = dead_letter["bindings"]["kafka"]["key"]
    assert all(jsonschema_rs.is_valid(key, sent) for sent in ("churn", None)), key


def test_the_asyncapi_operations_follow_the_topic_map() -> None:
    operations = yaml.safe_load((generate.ROOT / generate.ASYNCAPI_FILE).read_text())["operations"]

    assert "training.receive.mlops.monitoring" in operations
    received = [
        ref["$ref"].rsplit("/", 1)[1] for ref in operations["training.receive.mlops.monitoring"]["messages"]
    ]
    assert received == ["DriftDetected", "PerformanceDegraded"]
    assert "serving.send.mlops.predictions" in operations
    assert "validation.send.mlops.rollouts" not in operations


def test_the_event_catalogue_lists_every_event_with_its_producers_and_consumers() -> None:
    catalogue = (generate.ROOT / generate.CATALOGUE_FILE).read_text()

    for cls in ALL_PAYLOADS:
        assert f"### {cls.event_name}" in catalogue
    assert "| [`DriftDetected`](#driftdetected) |" in catalogue
    drift_row = next(line for line in catalogue.splitlines() if line.startswith("| [`DriftDetected`]"))
    assert drift_row.endswith("| monitoring | training, audit |")


@pytest.mark.parametrize("observed_at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-05:00"])
def test_a_label_observed_at_a_time_with_no_utc_form_is_schema_invalid(observed_at: str) -> None:
    """A team publishing labels directly gets a dead letter naming the field, not a consumer that fails."""
    event = new_event(EXAMPLES[GroundTruthReceived], source="/team/labels")
    _, value, headers = event.to_kafka()
    payload = orjson.loads(value)
    payload["observed_at"] = observed_at
    with pytest.raises(SchemaInvalid, match="observed_at") as caught:
        EVENT_TYPES.decode(orjson.dumps(payload), headers)
    assert "no UTC form" in str(caught.value)
