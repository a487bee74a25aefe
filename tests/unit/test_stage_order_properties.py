"""Properties of following the registry's stage changes in its order (libs/stage_order.py), as training and
validation do to track a model's production version (hypothesis).

The registry's history is a random walk of its stage machine (a promotion archives the production version
first, as the registry does), numbered 1, 2, ... after an optional run of unnumbered changes from before its
migration 0003. Delivered in that order, with any change re-sent under a new id at any later point, a
consumer ends where the registry is. Delivered in any order: a change is applied only when newer than every
numbered one applied before it, the last one again changes nothing, and an older one (or an unnumbered one
after a numbered one) is refused before anything changes, naming both numbers: an older change never
overwrites a newer one. Out of order, the changes refused are lost to the consumer until an operator acts
on the dead letters, so its state is that of the changes it applied, in their order: docs/registry.md
("Consumers keep the last number they applied per model and dead-letter an older change"), not that of the
whole history. Derandomised: the same examples on every run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.common import Stage
from contracts.envelope import CloudEvent, new_event
from contracts.models import ModelStageChanged
from libs.bus import PermanentError
from services.registry.domain import TRANSITIONS
from services.training.handlers import on_model_stage_changed as training_follows
from services.validation.handlers import on_model_stage_changed as validation_follows
from tests.stage_changes import stage_change
from tests.unit.training.fakes import FakeProduction

PROPERTY = settings(derandomize=True, deadline=None, database=None, max_examples=150)
MODEL = "churn"


@dataclass(frozen=True)
class History:
    """The registry's stage changes of one model, in its order, and its production version at the end."""

    changes: list[ModelStageChanged]
    production: int | None


@st.composite
def histories(draw: st.DrawFn) -> History:
    stages = {1: Stage.CANDIDATE}
    moves: list[tuple[int, Stage, Stage]] = []
    for _ in range(draw(st.integers(1, 14))):
        if len(stages) < 5 and draw(st.booleans()):
            stages[len(stages) + 1] = Stage.CANDIDATE  # registered: no stage change
        version = draw(st.sampled_from(sorted(stages)))
        target = draw(st.sampled_from(TRANSITIONS[stages[version]]))
        if target is Stage.PRODUCTION:
            # The registry archives the production version just before it promotes another.
            for previous, stage in sorted(stages.items()):
                if stage is Stage.PRODUCTION:
                    moves.append((previous, stage, Stage.ARCHIVED))
                    stages[previous] = Stage.ARCHIVED
        moves.append((version, stages[version], target))
        stages[version] = target
    # Changes made before registry migration 0003 have no number; numbering starts at 1 after it.
    unnumbered = draw(st.integers(0, len(moves)))
    changes = [
        ModelStageChanged(
            model=MODEL,
            model_version=version,
            from_stage=from_stage,
            to_stage=to_stage,
            reason="test",
            sequence=None if i < unnumbered else i - unnumbered + 1,
        )
        for i, (version, from_stage, to_stage) in enumerate(moves)
    ]
    production = [v for v, s in stages.items() if s is Stage.PRODUCTION]
    assert len(production) <= 1
    return History(changes, production[0] if production else None)


@st.composite
def in_order_with_resends(draw: st.DrawFn, history: History) -> list[int]:
    """Each change in the registry's order, and after any of them any earlier one (or itself) re-sent; an
    unnumbered one only once a numbered one came. Before, nothing tells an unnumbered change re-sent from a
    new one: such changes are applied as they come (the contract's ``sequence``), so an old one re-sent then
    sets a consumer back, as before the registry numbered its changes."""
    delivery: list[int] = []
    for i, change in enumerate(history.changes):
        delivery.append(i)
        resendable = [j for j in range(i + 1) if change.sequence is not None or j == i]
        delivery += draw(st.lists(st.sampled_from(resendable), max_size=2))
    return delivery


@st.composite
def shuffled_with_resends(draw: st.DrawFn, history: History) -> list[int]:
    """The changes in any order (delayed, across a replay), some of them more than once."""
    order = draw(st.permutations(range(len(history.changes))))
    resent = draw(st.lists(st.integers(0, len(history.changes) - 1), max_size=4))
    delivery = list(order)
    for change in resent:
        delivery.insert(draw(st.integers(0, len(delivery))), change)
    return delivery


class Consumer:
    """Training's and validation's tracking of the production version, each on its own store."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.training, self.validation = FakeProduction(), FakeProduction()

    def state(self) -> tuple[object, ...]:
        return (
            self.training.by_model.get(MODEL),
            self.training.changes.get(MODEL),
            self.validation.by_model.get(MODEL),
            self.validation.changes.get(MODEL),
        )

    def receive(self, event: CloudEvent[ModelStageChanged]) -> str | None:
        """Both follow the event; the dead letter's error when it is refused (by both), else None."""
        errors = []
        for follow, store in (
            (lambda e, s: training_follows(e, production=s), self.training),
            (lambda e, s: validation_follows(e, champions=s), self.validation),
        ):
            try:
                self.loop.run_until_complete(follow(event, store))
            except PermanentError as exc:
                errors.append(str(exc))
        assert len(errors) in (0, 2), errors
        return errors[0] if errors else None


def deliver(history: History, delivery: list[int]) -> tuple[Consumer, list[int]]:
    """The consumer after the deliveries (each under an event id of its own), and the changes it applied,
    checking each outcome against the registry's order as it goes."""
    loop = asyncio.new_event_loop()
    try:
        return follow_in_turn(history, delivery, Consumer(loop))
    finally:
        loop.close()


def follow_in_turn(history: History, delivery: list[int], consumer: Consumer) -> tuple[Consumer, list[int]]:
    applied: list[int] = []
    newest: int | None = None  # the largest number applied so far
    for i in delivery:
        change = history.changes[i]
        before = consumer.state()
        error = consumer.receive(new_event(change, source="/driftloop/registry"))
        if change.sequence is None:
            expected = "stale" if newest is not None else "new"
        elif newest is None or change.sequence > newest:
            expected = "new"
        else:
            expected = "repeat" if change.sequence == newest else "stale"
        if expected == "stale":
            assert error is not None and "stale stage change" in error
            assert f"but stage change {newest} " in error
            number = f"stage change {change.sequence}" if change.sequence else "an unnumbered stage change"
            assert f"is {number} of {MODEL}" in error
        else:
            assert error is None
        if expected == "new":
            applied.append(i)
            if change.sequence is not None:
                newest = change.sequence
                assert consumer.training.changes[MODEL].sequence == newest
                assert consumer.validation.changes[MODEL].sequence == newest
        else:
            # Refused or received again: nothing changed, the newer change applied is still the last one.
            assert consumer.state() == before
    return consumer, applied


def replayed(history: History, applied: list[int]) -> int | None:
    """The production version a consumer holds after applying exactly these changes, in this order."""
    production: int | None = None
    for i in applied:
        change = history.changes[i]
        if change.to_stage is Stage.PRODUCTION:
            production = change.model_version
        elif change.from_stage is Stage.PRODUCTION and production == change.model_version:
            production = None
    return production


@PROPERTY
@given(st.data())
def test_changes_delivered_in_order_with_any_resent_end_where_the_registry_is(data: st.DataObject) -> None:
    history = data.draw(histories())
    delivery = data.draw(in_order_with_resends(history))
    consumer, applied = deliver(history, delivery)
    # Every change applied once, in the registry's order, however many times some were re-sent (an
    # unnumbered change re-sent at once is applied again: applying a change twice in a row changes nothing).
    assert [i for n, i in enumerate(applied) if i not in applied[:n]] == list(range(len(history.changes)))
    assert consumer.training.by_model.get(MODEL) == history.production
    assert consumer.validation.by_model.get(MODEL) == history.production


@PROPERTY
@given(st.data())
def test_changes_delivered_in_any_order_never_let_an_older_one_overwrite_a_newer_one(
    data: st.DataObject,
) -> None:
    history = data.draw(histories())
    delivery = data.draw(shuffled_with_resends(history))
    consumer, applied = deliver(history, delivery)
    numbers = [history.changes[i].sequence for i in applied]
    numbered = [n for n in numbers if n is not None]
    # Applied: the unnumbered ones that came before any numbered one, then numbered ones, each newer.
    assert numbers == [None] * (len(numbers) - len(numbered)) + numbered
    assert numbered == sorted(set(numbered))
    newest = max((c.sequence for c in history.changes if c.sequence is not None), default=None)
    assert numbered[-1:] == ([newest] if newest is not None else [])
    assert consumer.training.by_model.get(MODEL) == replayed(history, applied)
    assert consumer.validation.by_model.get(MODEL) == replayed(history, applied)


@pytest.mark.parametrize("resent", ["the newest", "an older one"])
def test_the_newest_change_delivered_last_of_all_ends_where_the_registry_is(resent: str) -> None:
    # Out of order but the newest last: what the consumer tracks is where the registry ended.
    history = History(
        [
            stage_change(1, Stage.CANDIDATE, Stage.PRODUCTION, 1).data,
            stage_change(2, Stage.CANDIDATE, Stage.CANARY, 2).data,
            stage_change(1, Stage.PRODUCTION, Stage.ARCHIVED, 3).data,
            stage_change(2, Stage.CANARY, Stage.PRODUCTION, 4).data,
        ],
        production=2,
    )
    consumer, applied = deliver(history, [1, 0, 2, 3, 3 if resent == "the newest" else 0])
    assert applied == [1, 2, 3]  # the first change, delayed behind the second, was refused
    assert consumer.training.by_model.get(MODEL) == consumer.validation.by_model.get(MODEL) == 2
