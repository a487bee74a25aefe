"""Properties of the registry's stage machine and of its handlers driving it (hypothesis), and of the rules
around it a client or a producer reaches: commands, aliases, names, cursors, tag filters.

The transition table is read from docs/registry.md: what the registry allows is what the page says, every
other move is a 409 naming both stages. The handlers run on the unit fakes under random sequences of the
events the registry consumes (any version, any stable or previous one, re-sent under new ids): one version
at most is production and holds ``champion``, every move in the history is allowed (or is the one documented
exception), the ``ModelStageChanged`` events are numbered 1, 2, ... and replayed in that order give the
registry's stages, and an event the registry cannot apply is dead-lettered and changes nothing.
Derandomised: the same examples on every run.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pydantic import TypeAdapter, ValidationError

from contracts.commands import ArchiveRequested, PromoteRequested, RollbackRequested
from contracts.common import NAME_MAX_CHARS, VERSION_MAX, ModelName, Stage
from contracts.datasets import HOLDOUT_SUFFIX, TRAINING_SET_SUFFIX
from contracts.envelope import CloudEvent, EventPayload
from contracts.examples import EXAMPLES
from contracts.models import ModelStageChanged
from contracts.rollouts import RolloutPromoted, RolloutRolledBack, RolloutStarted
from contracts.validation import CheckKind, CheckResult, ValidationFailed, ValidationPassed
from libs.bus import PermanentError
from libs.errors import Conflict, InvalidInput, NotFound
from services.registry.core import request_command
from services.registry.domain import (
    ALIASES,
    CHALLENGER,
    CHAMPION,
    COMMAND_STAGES,
    CURSOR_LISTS,
    Command,
    IllegalTransition,
    alias_effect,
    allowed_targets,
    check_command,
    check_name,
    check_transition,
    check_upload_name,
    commands_for,
    decode_name_cursor,
    decode_version_cursor,
    encode_cursor,
    is_name,
    may_be_challenger,
    parse_tag_filter,
    rejected_by_failed_validation,
    serves_after_rollback,
    verdict_overtaken,
)
from services.registry.handlers import HANDLERS
from services.training.handlers import on_model_stage_changed as training_follows
from tests.unit.registry import test_handlers as handler_events
from tests.unit.registry.fakes import (
    FakeArtifacts,
    FakeDatasets,
    FakeVersions,
    HistoryEntry,
    event_of,
    training_completed,
)
from tests.unit.training.fakes import FakeProduction

PROPERTY = settings(derandomize=True, deadline=None, database=None, max_examples=200)

stages = st.sampled_from(list(Stage))
commands = st.sampled_from(list(Command))


def documented_transitions() -> dict[Stage, set[Stage]]:
    """The ``| from | allowed to |`` table of docs/registry.md, *Stages*."""
    text = (Path(__file__).parents[3] / "docs" / "registry.md").read_text()
    table = text.split("| from | allowed to |", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip("| ").split(" | ") for line in table.splitlines()[2:]]
    return {Stage(source): {Stage(t.strip()) for t in targets.split(",")} for source, targets in rows}


DOCUMENTED = documented_transitions()


# --- the stage machine ----------------------------------------------------------------------------------


def test_the_documented_table_names_every_stage() -> None:
    assert set(DOCUMENTED) == set(Stage)


@PROPERTY
@given(stages, stages, st.integers(1, VERSION_MAX))
def test_a_move_is_allowed_exactly_when_the_documented_table_allows_it(
    current: Stage, target: Stage, version: int
) -> None:
    allowed = target in DOCUMENTED[current]
    assert (target.value in allowed_targets(current)) is allowed
    assert set(allowed_targets(current)) == {s.value for s in DOCUMENTED[current]}
    if allowed:
        check_transition("churn", version, current, target)
        return
    with pytest.raises(IllegalTransition) as caught:
        check_transition("churn", version, current, target)
    refused = caught.value
    assert refused.status == 409
    assert f"churn version {version} is {current.value}; it cannot move to {target.value}" in refused.message
    assert refused.extra == {"stage": current.value, "allowed": allowed_targets(current)}


def reachable(start: Stage, *, allows: Any) -> set[Stage]:
    """Every stage a version in ``start`` can reach by moves ``allows(current, target)`` lets through."""
    seen, frontier = {start}, [start]
    while frontier:
        here = frontier.pop()
        for there in Stage:
            if there not in seen and allows(here, there):
                seen.add(there)
                frontier.append(there)
    return seen


def legal(current: Stage, target: Stage) -> bool:
    try:
        check_transition("churn", 1, current, target)
    except IllegalTransition:
        return False
    return True


@pytest.mark.parametrize("start", list(Stage))
def test_the_stages_reachable_by_legal_moves_are_those_the_documented_table_reaches(start: Stage) -> None:
    assert reachable(start, allows=legal) == reachable(start, allows=lambda a, b: b in DOCUMENTED[a])


@PROPERTY
@given(stages, st.lists(stages, max_size=30))
def test_a_walk_of_random_moves_goes_only_where_the_table_allows_and_a_refusal_moves_nothing(
    start: Stage, targets: list[Stage]
) -> None:
    here = start
    for target in targets:
        before = here
        try:
            check_transition("churn", 1, here, target)
        except IllegalTransition as exc:
            assert here is before and exc.extra["stage"] == here.value
            continue
        assert target in DOCUMENTED[here]
        here = target
    assert here in reachable(start, allows=lambda a, b: b in DOCUMENTED[a])


@PROPERTY
@given(commands, stages, st.integers(1, VERSION_MAX))
def test_a_command_is_accepted_exactly_for_its_stages_and_then_makes_an_allowed_move(
    command: Command, stage: Stage, version: int
) -> None:
    applies = stage in COMMAND_STAGES[command]
    assert (command.value in commands_for(stage)) is applies
    if applies:
        check_command(command, "churn", version, stage)
        # What the command leads to (serving's promotion, rollback, the registry's archive) is a move the
        # table allows from where the version is now.
        outcome = {Command.PROMOTE: Stage.PRODUCTION, Command.ROLLBACK: Stage.REJECTED}.get(
            command, Stage.ARCHIVED
        )
        assert outcome in DOCUMENTED[stage]
        return
    with pytest.raises(IllegalTransition) as caught:
        check_command(command, "churn", version, stage)
    assert caught.value.status == 409
    assert f"cannot {command.value} churn version {version}: it is {stage.value}" in caught.value.message
    assert caught.value.extra == {
        "stage": stage.value,
        "allowed": allowed_targets(stage),
        "commands": commands_for(stage),
    }


def test_the_commands_apply_to_the_stages_the_docs_give_them() -> None:
    # A promote: whatever may move to production; a rollback: what takes traffic; an archive: candidate or
    # rejected only, nothing that serves (docs/registry.md, ArchiveRequested).
    assert set(COMMAND_STAGES[Command.PROMOTE]) == {s for s in Stage if Stage.PRODUCTION in DOCUMENTED[s]}
    assert set(COMMAND_STAGES[Command.ROLLBACK]) == {Stage.CANARY, Stage.PRODUCTION}
    assert set(COMMAND_STAGES[Command.ARCHIVE]) == {Stage.CANDIDATE, Stage.REJECTED}


@PROPERTY
@given(stages)
def test_aliases_follow_the_stage_moved_to(stage: Stage) -> None:
    effect = alias_effect(stage)
    assert not set(effect.take) & set(effect.drop)
    assert set(effect.take) | set(effect.drop) <= set(ALIASES)
    assert (CHAMPION in effect.take) is (stage is Stage.PRODUCTION)
    if stage in (Stage.ARCHIVED, Stage.REJECTED):
        assert set(effect.drop) == set(ALIASES)
    # The challenger is a validated version on its way to production: production takes it away.
    assert (CHALLENGER in effect.drop) is (stage not in (Stage.CANDIDATE, Stage.CANARY))
    assert may_be_challenger(stage) is (stage in (Stage.CANDIDATE, Stage.CANARY))


@PROPERTY
@given(stages)
def test_the_verdict_and_rollback_rules_agree_with_the_table(stage: Stage) -> None:
    assert serves_after_rollback(stage) is (Stage.PRODUCTION in DOCUMENTED[stage])
    assert rejected_by_failed_validation(stage) is (stage is Stage.CANDIDATE)
    if rejected_by_failed_validation(stage):
        assert Stage.REJECTED in DOCUMENTED[stage]


causes = st.sampled_from(
    [
        "io.driftloop.ValidationFailed.v1",
        "io.driftloop.RolloutRolledBack.v1",
        "io.driftloop.ArchiveRequested.v1",
        "io.driftloop.RolloutPromoted.v1",
        "io.driftloop.ValidationFailed.v2",
        "",
    ]
)


@PROPERTY
@given(stages, st.none() | stages, causes)
def test_only_a_candidates_rejection_by_a_failed_validation_gives_way_to_serving(
    current: Stage, last_from: Stage | None, cause: str
) -> None:
    expected = (
        current is Stage.REJECTED
        and last_from is Stage.CANDIDATE
        and cause == "io.driftloop.ValidationFailed.v1"
    )
    assert verdict_overtaken(current, last_from, cause) is expected


# --- names ----------------------------------------------------------------------------------------------

# Characters near the rule's edges: ASCII marks, white space, look-alike and non-ASCII letters and digits
# (a Kelvin sign, a Turkish dotless i, Arabic-Indic digits, full-width letters), NUL, line breaks.
name_chars = st.sampled_from(
    list("aZ09._-") + list(" \t\n\r\x00/\\:=+~@%#é\u212a\u0131\u0661\uff41\u200b\U0001f600")
) | st.characters(codec="utf-8")
texts = (
    st.text(name_chars, max_size=NAME_MAX_CHARS + 3)
    | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True)
    | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{120,140}\n?", fullmatch=True)
)
NAME_ALPHABET = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def named_as_the_docs_say(value: str) -> bool:
    """docs/registry.md: ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``, the whole value."""
    return (
        1 <= len(value) <= NAME_MAX_CHARS
        and value[0] in NAME_ALPHABET
        and all(c in NAME_ALPHABET or c in "._-" for c in value)
    )


MODEL_NAMES = TypeAdapter(ModelName)


@settings(PROPERTY, max_examples=100)
@given(texts)
def test_a_name_is_accepted_exactly_when_the_docs_rule_holds_and_the_contracts_agree(value: str) -> None:
    expected = named_as_the_docs_say(value)
    assert is_name(value) is expected
    try:
        MODEL_NAMES.validate_python(value)
        contract_accepts = True
    except ValidationError:
        contract_accepts = False
    assert contract_accepts is expected
    if expected:
        assert check_name(value, what="model name", field="model") == value
    else:
        with pytest.raises(InvalidInput) as caught:
            check_name(value, what="model name", field="model")
        assert caught.value.status == 422 and caught.value.extra == {"field": "model"}


@settings(PROPERTY, max_examples=100)
@given(
    texts | st.builds(lambda n, s: n[:100] + s, texts, st.sampled_from([TRAINING_SET_SUFFIX, HOLDOUT_SUFFIX]))
)
def test_an_upload_name_is_a_name_not_reserved_for_trainings_output(value: str) -> None:
    expected = named_as_the_docs_say(value) and not value.endswith((TRAINING_SET_SUFFIX, HOLDOUT_SUFFIX))
    if expected:
        assert check_upload_name(value) == value
        return
    with pytest.raises(InvalidInput) as caught:
        check_upload_name(value)
    assert caught.value.status == 422 and caught.value.extra == {"field": "name"}


# --- cursors --------------------------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True)
numbers = st.integers(1, VERSION_MAX) | st.sampled_from([1, VERSION_MAX])
REFUSALS = {
    "cursor is not valid: pass the next_cursor of a previous page",
    "cursor does not belong to this list: pass its own next_cursor",
}


@PROPERTY
@given(names, numbers, st.sampled_from(["versions", "datasets"]))
def test_a_cursor_round_trips_through_its_own_list_and_is_refused_by_the_others(
    name: str, version: int, of: Literal["versions", "datasets"]
) -> None:
    assert decode_name_cursor(encode_cursor("models", [name])) == name
    cursor = encode_cursor(of, [name, version])
    assert decode_version_cursor(cursor, of) == (name, version)
    other: Literal["versions", "datasets"] = "datasets" if of == "versions" else "versions"
    for refuse in (lambda: decode_version_cursor(cursor, other), lambda: decode_name_cursor(cursor)):
        with pytest.raises(InvalidInput, match="cursor does not belong to this list"):
            refuse()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, -1, 1, VERSION_MAX, VERSION_MAX + 1, 2**63, 2**64 - 1])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([*CURSOR_LISTS, "churn", "", "churn\n", "a\x00b", "Ünïcode"])
    | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)
positions = st.builds(
    lambda of, rest: [of, *rest],
    st.sampled_from(list(CURSOR_LISTS)) | json_values,
    st.lists(names | json_values, max_size=3),
)
EDGE_NAMES = [
    "churn",
    "a",
    "a" * NAME_MAX_CHARS,
    "a" * (NAME_MAX_CHARS + 1),
    "",
    "churn\n",
    "a\x00b",
    "ü",
    7,
    None,
]
EDGE_NUMBERS = [1, VERSION_MAX, 0, -1, VERSION_MAX + 1, 2**63, 2**64, 2**70, 1.0, True, "7", None]


def as_json(value: Any) -> bytes:
    """JSON as a client may write it: integers of any size (orjson writes none beyond 64 bits)."""
    return json.dumps(value).encode()


def b64(raw: bytes, *, pad: bool) -> str:
    cursor = base64.urlsafe_b64encode(raw).decode()
    return cursor if pad else cursor.rstrip("=")


def decoders() -> dict[str, Any]:
    """Each list's decoder of its cursors, by the list's name."""
    return {
        "models": decode_name_cursor,
        "versions": lambda c: decode_version_cursor(c, "versions"),
        "datasets": lambda c: decode_version_cursor(c, "datasets"),
    }


def refused(decode: Any, cursor: str) -> str | None:
    """The message of the 422 ``decode`` answers ``cursor`` with; None when it decodes it (to a name and a
    version the registry can hold)."""
    try:
        decoded = decode(cursor)
    except InvalidInput as exc:
        assert exc.status == 422 and exc.extra == {"field": "cursor"}
        assert exc.message in REFUSALS
        return exc.message
    name, version = (decoded, 1) if isinstance(decoded, str) else decoded
    assert is_name(name) and type(version) is int and 1 <= version <= VERSION_MAX
    return None


own_cursors = st.builds(
    lambda name, version: encode_cursor("versions", [name, version]), names, numbers
) | st.builds(lambda name: encode_cursor("models", [name]), names)
hostile_cursors = (
    # A cursor the registry gave, with other text spliced in (white space, a sign, a letter from elsewhere),
    # four times: the padding the registry adds is then right, and only what the text is can refuse it.
    st.builds(
        lambda cursor, text, at: cursor[:at] + text * 4 + cursor[at:],
        own_cursors,
        st.text(st.sampled_from(" \n\t\r.,!%*~:\x00é"), min_size=1, max_size=3),
        st.integers(0, 60),
    )
    | st.text(max_size=60)
    | st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/ \n", max_size=60)
    | st.builds(b64, st.binary(max_size=60), pad=st.booleans())
    | st.builds(b64, json_values.map(as_json), pad=st.booleans())
    | st.builds(
        lambda c, n: c * n, st.sampled_from(["A", "[", "W1s", "-", "\u00e9"]), st.integers(1, 200_000)
    )
    | st.builds(lambda depth: b64(b"[" * depth + b"]" * depth, pad=False), st.integers(1, 3000))
)


@PROPERTY
@given(hostile_cursors)
def test_any_text_a_client_sends_as_a_cursor_decodes_to_what_the_registry_holds_or_is_a_422(
    cursor: str,
) -> None:
    # A character outside base64 is refused, not skipped (the standard alphabet's + and / are read as the
    # URL-safe - and _).
    foreign = re.search(r"[^A-Za-z0-9_+/=-]", cursor) is not None
    for decode in decoders().values():
        message = refused(decode, cursor)
        if foreign:
            assert message is not None and message.startswith("cursor is not valid")


def check_decoding(position: list[Any], *, pad: bool) -> None:
    """Each list decodes the cursor of ``position`` exactly when it is its own, of its key's size, holding a
    name and a version the registry can hold; any other is a 422, "does not belong" when another list of the
    registry made it, "not valid" when none did."""
    raw = as_json(position)
    cursor = b64(raw, pad=pad)
    parsed = orjson.loads(raw)  # what the registry reads: an integer beyond 64 bits is a float
    for of, decode in decoders().items():
        size = 1 if of == "models" else 2
        key = parsed[1:]
        holds = (
            parsed[0] == of
            and len(key) == size
            and type(key[0]) is str
            and is_name(key[0])
            and (size == 1 or (type(key[1]) is int and 1 <= key[1] <= VERSION_MAX))
        )
        message = refused(decode, cursor)
        assert (message is None) is holds, (of, parsed, message)
        if parsed[0] != of and parsed[0] in CURSOR_LISTS:
            assert message is not None and message.startswith("cursor does not belong to this list")
        if parsed[0] not in CURSOR_LISTS:
            assert message is not None and message.startswith("cursor is not valid")


@PROPERTY
@given(positions, st.booleans())
def test_a_cursor_of_any_json_decodes_only_to_its_own_lists_name_and_number(
    position: list[Any], pad: bool
) -> None:
    check_decoding(position, pad=pad)


def test_a_cursor_at_the_edges_of_the_names_and_numbers_decodes_only_when_the_registry_holds_them() -> None:
    # Every list, name and number at the edges, in a key of each size: few enough to try them all.
    for of, name, number in itertools.product(CURSOR_LISTS, EDGE_NAMES, EDGE_NUMBERS):
        for position in ([of, name], [of, name, number]):
            check_decoding(position, pad=False)


# --- tag filters ----------------------------------------------------------------------------------------


@PROPERTY
@given(st.none() | st.text(st.sampled_from("ab=\n \x00é") | st.characters(), max_size=20))
def test_a_tag_filter_is_split_at_its_first_equals_sign_and_refused_only_without_a_key(
    tag: str | None,
) -> None:
    if tag is None:
        assert parse_tag_filter(tag) is None
        return
    if tag == "" or tag.startswith("="):
        with pytest.raises(InvalidInput) as caught:
            parse_tag_filter(tag)
        assert caught.value.status == 422 and caught.value.extra == {"field": "tag"}
        return
    parsed = parse_tag_filter(tag)
    assert parsed is not None
    key, value = parsed
    assert "=" not in key and key
    assert (key if value is None else f"{key}={value}") == tag
    assert (value is None) is ("=" not in tag)


# --- the handlers, driven by random events --------------------------------------------------------------

MODEL = "churn"
SOURCE = "/driftloop/registry"
VALIDATION_FAILED = ValidationFailed.event_type()
ROLLED_BACK = RolloutRolledBack.event_type()


def passed(version: int, report_id: str) -> ValidationPassed:
    base = EXAMPLES[ValidationPassed]
    assert isinstance(base, ValidationPassed)
    return base.model_copy(update={"model": MODEL, "model_version": version, "report_id": report_id})


def failed(version: int, report_id: str) -> ValidationFailed:
    check = CheckResult(
        name="roc_auc>=0.75", kind=CheckKind.THRESHOLD, value=0.6, threshold=0.75, passed=False
    )
    return ValidationFailed(
        model=MODEL,
        model_version=version,
        report_id=report_id,
        checks=[check],
        failed_checks=[check.name],
        duration_seconds=1.0,
    )


def started(version: int, stable: int | None) -> RolloutStarted:
    return handler_events.started(MODEL, version, stable)


def promoted(version: int, previous: int | None, *, manual: bool = False) -> RolloutPromoted:
    return RolloutPromoted(
        rollout_id=f"r-{version}",
        model=MODEL,
        model_version=version,
        previous_version=previous,
        steps_completed=0 if manual else 2,
        duration_seconds=10,
        manual=manual,
    )


def rolled_back(version: int, stable: int | None) -> RolloutRolledBack:
    return handler_events.rolled_back(MODEL, version, stable)


def archive_requested(version: int) -> ArchiveRequested:
    return ArchiveRequested(model=MODEL, model_version=version, reason="not needed")


@dataclass
class Expected:
    """What docs/registry.md says the registry holds after the events so far: the model of the test."""

    stages: dict[int, Stage] = field(default_factory=dict)
    champion: int | None = None
    challenger: int | None = None
    reports: dict[tuple[int, str], bool] = field(default_factory=dict)
    last_moves: dict[int, tuple[Stage | None, str]] = field(default_factory=dict)

    @property
    def production(self) -> list[int]:
        return [v for v, s in self.stages.items() if s is Stage.PRODUCTION]

    def move(self, version: int, to: Stage, cause: str) -> None:
        if self.stages[version] is to:
            return
        self.last_moves[version] = (self.stages[version], cause)
        self.stages[version] = to
        if to is Stage.PRODUCTION:
            self.champion = version
        if self.challenger == version and to not in (Stage.CANDIDATE, Stage.CANARY):
            self.challenger = None
        if self.champion == version and to is not Stage.PRODUCTION:
            self.champion = None

    def older_than_the_stages(self, version: int, replaced: int | None) -> bool:
        """A rollout event bringing an archived version back over another production version than it names."""
        others = [v for v in self.production if v != version]
        return self.stages.get(version) is Stage.ARCHIVED and bool(others) and replaced not in others

    def overtaken(self, version: int) -> bool:
        return self.stages.get(version) is Stage.REJECTED and self.last_moves.get(version) == (
            Stage.CANDIDATE,
            VALIDATION_FAILED,
        )

    def promote(self, version: int, cause: str) -> None:
        for previous in self.production:
            if previous != version:
                self.move(previous, Stage.ARCHIVED, cause)
        self.move(version, Stage.PRODUCTION, cause)

    def apply(self, payload: Any, cause: str) -> bool:
        """Apply an event the registry consumes; False when it is to be dead-lettered (nothing changes)."""
        version = getattr(payload, "model_version", None) or getattr(payload, "canary_version", None)
        stage = self.stages.get(version)  # type: ignore[arg-type]
        if stage is None:
            return False
        assert isinstance(version, int)
        if isinstance(payload, ValidationPassed | ValidationFailed):
            ok = isinstance(payload, ValidationPassed)
            report = (version, payload.report_id)
            if report in self.reports:
                # The same report again changes nothing; with the other outcome it is refused.
                return self.reports[report] is ok
            self.reports[report] = ok
            if not ok and stage is Stage.CANDIDATE:
                self.move(version, Stage.REJECTED, cause)
            if ok and stage in (Stage.CANDIDATE, Stage.CANARY):
                self.challenger = version
            return True
        if isinstance(payload, RolloutStarted):
            if self.older_than_the_stages(version, payload.stable_version):
                return False
            if stage is not Stage.CANARY and Stage.CANARY not in DOCUMENTED[stage]:
                return False
            self.move(version, Stage.CANARY, cause)
            return True
        if isinstance(payload, RolloutPromoted):
            if self.older_than_the_stages(version, payload.previous_version):
                return False
            moves = stage is Stage.PRODUCTION or Stage.PRODUCTION in DOCUMENTED[stage]
            if not (moves or self.overtaken(version)):
                return False
            self.promote(version, cause)
            return True
        if isinstance(payload, RolloutRolledBack):
            stable = payload.stable_version
            if stable is not None and stage is Stage.REJECTED and self.older_than_the_stages(stable, version):
                return False
            if stage is not Stage.REJECTED and Stage.REJECTED not in DOCUMENTED[stage]:
                return False
            self.move(version, Stage.REJECTED, cause)
            if stable in self.stages and (
                Stage.PRODUCTION in DOCUMENTED[self.stages[stable]] or self.overtaken(stable)
            ):
                self.promote(stable, cause)
            return True
        if isinstance(payload, ArchiveRequested):
            if stage not in (Stage.ARCHIVED, Stage.CANDIDATE, Stage.REJECTED):
                return False
            self.move(version, Stage.ARCHIVED, cause)
            return True
        raise AssertionError(f"no expectation for {type(payload).__name__}")


picks = st.integers(0, 99)
other_picks = st.none() | picks


class RegistryStages(RuleBasedStateMachine):
    """The registry's handlers on the unit fakes, each event in a transaction of its own (a dead-lettered one
    leaves the fakes as they were), against :class:`Expected`."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.versions = FakeVersions()
        self.artifacts = FakeArtifacts()
        self.expected = Expected()
        self.changes: list[ModelStageChanged] = []
        self.sent: list[EventPayload] = []
        self.training = FakeProduction()
        self.runs = 0

    def teardown(self) -> None:
        self.loop.close()

    def run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    def deliver(self, payload: EventPayload) -> str | None:
        """Handle the event in a transaction; the dead letter's error when it is refused, else None."""
        event = event_of(payload)
        # What a rolled-back transaction leaves: the fakes as they were (copied a level deep, which is all a
        # handler changes; deepcopy of the events they hold took most of the test's time).
        v = self.versions
        saved = FakeVersions(
            {key: replace(version) for key, version in v.versions.items()},
            list(v.history),
            dict(v.aliases),
            list(v.reports),
            dict(v.tags),
            dict(v.stage_sequences),
        )
        published: list[CloudEvent[Any]] = []

        async def publish(e: CloudEvent[Any]) -> None:
            published.append(e)

        handler = HANDLERS[type(payload)]
        try:
            self.run(
                handler(
                    event,
                    versions=self.versions,
                    datasets=FakeDatasets(),
                    artifacts=self.artifacts,
                    publish=publish,
                    source=SOURCE,
                )
            )
        except PermanentError as exc:
            self.versions = saved
            return str(exc)
        for e in published:
            if isinstance(e.data, ModelStageChanged):
                self.changes.append(e.data)
                # Training follows the registry's changes as they come, in its order.
                self.run(training_follows(e, production=self.training))
        return None

    def expect(self, payload: EventPayload, *, again: bool = False) -> None:
        """Deliver the event as the expectation says it is applied or refused; ``again``: then under a new id,
        which changes nothing."""
        self.sent.append(payload)
        applies = self.expected.apply(payload, type(payload).event_type())
        error = self.deliver(payload)
        assert (error is None) is applies, error
        if applies and again:
            changes, stages = len(self.changes), self.stages()
            assert self.deliver(payload) is None
            assert len(self.changes) == changes and self.stages() == stages

    def stages(self) -> dict[int, Stage]:
        return {n: v.stage for (_, n), v in self.versions.versions.items()}

    # -- events ----------------------------------------------------------------------------------------

    @initialize()
    def first_version(self) -> None:
        self.train()

    def version(self, pick: int) -> int:
        """A version of the model, or now and then one it lacks."""
        return pick % (self.runs + 1) + 1

    def other(self, pick: int | None, version: int) -> int | None:
        """Another version (an event's stable or previous one), or none."""
        return None if pick is None or self.version(pick) == version else self.version(pick)

    @precondition(lambda self: self.runs < 6)
    @rule()
    def train(self) -> None:
        self.runs += 1
        completed = training_completed(self.artifacts, model=MODEL, run_id=f"run-{self.runs}")
        assert self.deliver(completed) is None
        self.expected.stages[self.runs] = Stage.CANDIDATE

    @rule(pick=picks)
    def train_again(self, pick: int) -> None:
        # The same run delivered again, under a new event id: nothing changes.
        changes, stages = len(self.changes), self.stages()
        run_id = f"run-{pick % self.runs + 1}"
        assert self.deliver(training_completed(self.artifacts, model=MODEL, run_id=run_id)) is None
        assert len(self.changes) == changes and self.stages() == stages

    @rule(pick=picks, report=st.sampled_from(["vr-a", "vr-b"]), ok=st.booleans(), again=st.booleans())
    def validated(self, pick: int, report: str, ok: bool, again: bool) -> None:
        version = self.version(pick)
        self.expect((passed if ok else failed)(version, f"{report}-{version}"), again=again)

    @rule(pick=picks, stable=other_picks, again=st.booleans())
    def rollout_started(self, pick: int, stable: int | None, again: bool) -> None:
        version = self.version(pick)
        self.expect(started(version, self.other(stable, version)), again=again)

    @rule(pick=picks, previous=other_picks, manual=st.booleans(), again=st.booleans())
    def rollout_promoted(self, pick: int, previous: int | None, manual: bool, again: bool) -> None:
        version = self.version(pick)
        self.expect(promoted(version, self.other(previous, version), manual=manual), again=again)

    @rule(pick=picks, stable=other_picks, again=st.booleans())
    def rollout_rolled_back(self, pick: int, stable: int | None, again: bool) -> None:
        version = self.version(pick)
        self.expect(rolled_back(version, self.other(stable, version)), again=again)

    @rule(pick=picks, again=st.booleans())
    def archive(self, pick: int, again: bool) -> None:
        self.expect(archive_requested(self.version(pick)), again=again)

    @rule(pick=picks)
    def promoted_over_the_production_version(self, pick: int) -> None:
        # Serving's promotion, naming the production version the registry holds: never out of date.
        version = self.version(pick)
        production = [v for v in self.expected.production if v != version]
        self.expect(promoted(version, production[0] if production else None))

    @rule(pick=picks, healthy=st.booleans())
    def rollout(self, pick: int, healthy: bool) -> None:
        # Serving rolls a version out over the production version, then promotes it or rolls it back.
        version = self.version(pick)
        production = [v for v in self.expected.production if v != version]
        stable = production[0] if production else None
        self.expect(started(version, stable))
        self.expect(promoted(version, stable) if healthy else rolled_back(version, stable))

    @rule(pick=picks)
    def resent_later(self, pick: int) -> None:
        # An event delivered before, re-sent under a new id after others (a replay, a producer's retry).
        if self.sent:
            self.expect(self.sent[pick % len(self.sent)])

    @rule(command=commands, pick=picks, to_pick=st.sampled_from([None, "itself"]) | picks)
    def command_carried_out_at_once(self, command: Command, pick: int, to_pick: int | str | None) -> None:
        """A command an operator sends over HTTP: refused (404, 409) as the docs say, or accepted, and then
        its outcome, as serving or the registry carries it out before anything else happens, is applied."""
        version = self.version(pick)
        to_version = None
        if command is Command.ROLLBACK and to_pick is not None:
            to_version = version if to_pick == "itself" else self.version(int(to_pick))
        stage = self.expected.stages.get(version)
        target = self.expected.stages.get(to_version) if to_version is not None else None
        sent: list[CloudEvent[Any]] = []

        async def publish(e: CloudEvent[Any]) -> None:
            sent.append(e)

        request = request_command(
            command,
            MODEL,
            version,
            reason="operator",
            actor="user:op",
            to_version=to_version,
            versions=self.versions,
            publish=publish,
            source=SOURCE,
        )
        if stage is None:
            with pytest.raises(NotFound):
                self.run(request)
            return
        if stage not in COMMAND_STAGES[command]:
            with pytest.raises(IllegalTransition):
                self.run(request)
            return
        if to_version is not None and (stage is Stage.CANARY or to_version == version):
            with pytest.raises(Conflict):
                self.run(request)
            return
        if to_version is not None and target is None:
            with pytest.raises(NotFound):
                self.run(request)
            return
        if (
            target is not None
            and target is not Stage.PRODUCTION
            and Stage.PRODUCTION not in DOCUMENTED[target]
        ):
            with pytest.raises(IllegalTransition):
                self.run(request)
            return
        self.run(request)
        assert [type(e.data) for e in sent] == [
            {Command.PROMOTE: PromoteRequested, Command.ROLLBACK: RollbackRequested}.get(
                command, ArchiveRequested
            )
        ]
        production = [v for v in self.expected.production if v != version]
        outcome: EventPayload
        if command is Command.PROMOTE:
            outcome = promoted(version, production[0] if production else None, manual=True)
        elif command is Command.ARCHIVE:
            outcome = archive_requested(version)
        else:
            stable = to_version if to_version is not None else next(iter(production), None)
            outcome = rolled_back(version, stable)
        assert self.expected.apply(outcome, type(outcome).event_type())
        assert self.deliver(outcome) is None

    # -- what holds after every event ------------------------------------------------------------------

    @invariant()
    def stages_and_aliases_are_as_the_docs_say(self) -> None:
        assert self.stages() == self.expected.stages
        aliases = {a: n for (m, a), n in self.versions.aliases.items() if m == MODEL}
        assert aliases.get(CHAMPION) == self.expected.champion
        assert aliases.get(CHALLENGER) == self.expected.challenger

    @invariant()
    def at_most_one_version_is_production_and_it_holds_champion(self) -> None:
        production = [n for n, s in self.stages().items() if s is Stage.PRODUCTION]
        assert len(production) <= 1
        assert self.versions.aliases.get((MODEL, CHAMPION)) == (production[0] if production else None)
        challenger = self.versions.aliases.get((MODEL, CHALLENGER))
        assert challenger is None or self.stages()[challenger] in (Stage.CANDIDATE, Stage.CANARY)

    @invariant()
    def every_move_in_the_history_is_allowed_or_the_documented_exception(self) -> None:
        last: dict[int, HistoryEntry] = {}
        for h in self.versions.history:
            before = last.get(h.version)
            if before is None:
                assert (h.from_stage, h.to_stage) == (None, Stage.CANDIDATE)
            elif h.to_stage not in DOCUMENTED[h.from_stage]:  # type: ignore[index]
                # A verdict that overtook serving's decision: rejected as a candidate by a failed validation,
                # then production by serving's promotion (or rollback to it).
                assert (h.from_stage, h.to_stage) == (Stage.REJECTED, Stage.PRODUCTION)
                assert (before.from_stage, before.cause.event_type) == (Stage.CANDIDATE, VALIDATION_FAILED)
            if before is not None:
                assert h.from_stage is before.to_stage
                # A version a rollback rejected never serves again (only archived may follow).
                if before.to_stage is Stage.REJECTED and before.cause.event_type == ROLLED_BACK:
                    assert h.to_stage is Stage.ARCHIVED
            last[h.version] = h

    @invariant()
    def the_stage_changes_numbered_in_order_replay_to_the_registrys_stages(self) -> None:
        assert [c.sequence for c in self.changes] == list(range(1, len(self.changes) + 1))
        replayed = {n: Stage.CANDIDATE for n in self.stages()}
        last: dict[int, ModelStageChanged] = {}
        for c in self.changes:
            assert replayed[c.model_version] is c.from_stage
            replayed[c.model_version] = c.to_stage
            last[c.model_version] = c
        assert replayed == self.stages()
        # Training, following them, takes as parent the version the registry has in production.
        production = [n for n, s in replayed.items() if s is Stage.PRODUCTION]
        assert self.training.by_model.get(MODEL) == (production[0] if production else None)
        for n, c in last.items():
            # Champion moves only with its holder's stage changes: the last one says whether it holds it.
            assert (CHAMPION in c.aliases) is (self.versions.aliases.get((MODEL, CHAMPION)) == n)


RegistryStages.TestCase.settings = settings(
    derandomize=True, deadline=None, database=None, max_examples=100, stateful_step_count=40
)
test_the_registry_follows_random_events_as_the_docs_say = RegistryStages.TestCase
