"""A batch subscription's look-ahead: the next poll is prepared while this poll's transaction is open."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from contracts.envelope import CloudEvent, EventTypeRegistry
from libs.bus import Delivery, Dispatcher, Record, Subscription, Transaction
from tests.unit.bus_fakes import NullTransaction
from tests.unit.test_bus import REGISTRY, thing


def record_of(event: CloudEvent[Any], offset: int) -> Record:
    key, value, headers = event.to_kafka()
    return Record(event.topic, 0, offset, key, value, tuple(headers))


def poll(first: int, n: int) -> list[Record]:
    return [record_of(thing(i), offset=i) for i in range(first, first + n)]


class CountingRegistry:
    """The test registry, counting how often each record is decoded."""

    def __init__(self, registry: EventTypeRegistry) -> None:
        self.registry = registry
        self.decoded: list[bytes | None] = []

    def decode(self, value: bytes | None, headers: Any, **kw: Any) -> CloudEvent[Any]:
        self.decoded.append(value)
        return self.registry.decode(value, headers, **kw)


class Journal:
    """What happened, in order: transactions opened and closed, handler and preparation calls."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self.dead_letters: list[tuple[int, str]] = []
        self.fail_prepare = False

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        self.entries.append("begin")
        yield NullTransaction()
        self.entries.append("commit")

    async def dead_letter(self, record: Record, *, consumer: str, reason: str, error: str) -> None:
        self.dead_letters.append((record.offset, reason))

    def subscription(self, **kw: Any) -> Subscription:
        async def handle(deliveries: Sequence[Delivery], tx: Transaction) -> None:
            self.entries.append(f"handle {[d.record.offset for d in deliveries]}")

        async def prepare(deliveries: Sequence[Delivery]) -> None:
            if self.fail_prepare:
                raise RuntimeError("preparation broke")
            self.entries.append(f"prepare {[d.record.offset for d in deliveries]}")

        return Subscription(
            consumer="batcher", topics=["test.things"], batch_handler=handle, batch_prepare=prepare, **kw
        )


def dispatcher(journal: Journal, registry: Any = REGISTRY, **kw: Any) -> Dispatcher:
    return Dispatcher(
        journal.subscription(**kw), registry=registry, begin=journal.begin, dead_letters=journal
    )


async def test_the_next_poll_is_prepared_while_this_polls_transaction_is_open() -> None:
    journal = Journal()
    registry = CountingRegistry(REGISTRY)
    d = dispatcher(journal, registry, raw=True)
    first, second = poll(0, 2), poll(2, 2)
    await d.dispatch(first, upcoming=second)
    assert journal.entries.index("prepare [2, 3]") < journal.entries.index("commit")
    await d.dispatch(second)
    assert journal.entries[-3:] == ["begin", "handle [2, 3]", "commit"]
    # The look-ahead's decoding is the one the next poll uses.
    assert len(registry.decoded) == 4


async def test_a_poll_not_announced_as_upcoming_is_decoded_afresh() -> None:
    journal = Journal()
    registry = CountingRegistry(REGISTRY)
    d = dispatcher(journal, registry, raw=True)
    await d.dispatch(poll(0, 2), upcoming=poll(2, 2))
    await d.dispatch(poll(2, 2))  # the same records read again, not the same poll
    assert len(registry.decoded) == 6
    assert journal.entries[-2:] == ["handle [2, 3]", "commit"]


async def test_a_failing_preparation_leaves_the_work_to_the_handler() -> None:
    journal = Journal()
    journal.fail_prepare = True
    d = dispatcher(journal, raw=True)
    await d.dispatch(poll(0, 2), upcoming=poll(2, 2))
    await d.dispatch(poll(2, 1))
    assert journal.entries == ["begin", "handle [0, 1]", "commit", "begin", "handle [2]", "commit"]


async def test_no_look_ahead_without_a_prepare_step() -> None:
    journal = Journal()
    sub = journal.subscription(raw=True)
    sub.batch_prepare = None
    d = Dispatcher(sub, registry=REGISTRY, begin=journal.begin, dead_letters=journal)
    await d.dispatch(poll(0, 1), upcoming=poll(1, 1))
    assert journal.entries == ["begin", "handle [0]", "commit"]


async def test_a_malformed_upcoming_record_is_dead_lettered_once_when_its_poll_is_dispatched() -> None:
    journal = Journal()
    d = dispatcher(journal)
    bad = Record("test.things", 0, 9, None, b"not json", ())
    upcoming = [*poll(2, 1), bad]
    await d.dispatch(poll(0, 1), upcoming=upcoming)
    assert journal.dead_letters == []
    assert "prepare [2]" in journal.entries
    await d.dispatch(upcoming)
    assert [offset for offset, _ in journal.dead_letters] == [9]
    assert journal.entries[-2:] == ["handle [2]", "commit"]


async def test_a_failing_transaction_fails_the_dispatch_after_the_preparation() -> None:
    journal = Journal()

    @asynccontextmanager
    async def broken() -> AsyncIterator[Any]:
        yield NullTransaction()
        raise ConnectionResetError("the database went away before commit")

    d = Dispatcher(journal.subscription(raw=True), registry=REGISTRY, begin=broken, dead_letters=journal)
    with pytest.raises(ConnectionResetError):
        await d.dispatch(poll(0, 2), upcoming=poll(2, 2))
    assert "prepare [2, 3]" in journal.entries
