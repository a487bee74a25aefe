"""A CancelledError a handler raises while its consumer is not being cancelled is the handler's failure: its
event is retried, then dead-lettered, and the consumer goes on. A consumer that is being cancelled stops at
once, whatever its handler makes of the cancellation, dead-lettering and committing nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from contracts.envelope import CloudEvent
from libs.bus import Delivery, Dispatcher, InMemoryBus, Subscription, Transaction
from tests.unit.bus_fakes import NullTransaction
from tests.unit.test_bus import REGISTRY, ThingHappened, thing
from tests.unit.test_bus_dead_letters import Sink, record_of
from tests.unit.test_bus_runner import (
    DeadLetterTopic,
    FakeConsumer,
    Store,
    good,
    handled,
    run_until,
    runner_on,
    tp,
)


async def awaits_a_task_cancelled_elsewhere() -> None:
    other = asyncio.create_task(asyncio.Event().wait())
    other.cancel()
    await other


async def awaits_a_future_cancelled_elsewhere() -> None:
    future = asyncio.get_running_loop().create_future()
    future.cancel("its caller gave up")
    await future


async def raises_it_itself() -> None:
    raise asyncio.CancelledError()


CANCELLED_INSIDE: dict[str, Callable[[], Awaitable[None]]] = {
    "awaited-task-cancelled": awaits_a_task_cancelled_elsewhere,
    "awaited-future-cancelled": awaits_a_future_cancelled_elsewhere,
    "raised-by-the-handler": raises_it_itself,
}


@asynccontextmanager
async def null_transaction() -> AsyncIterator[NullTransaction]:
    yield NullTransaction()


def subscription(**kw: Any) -> Subscription:
    return Subscription(consumer="c", topics=["test.things"], max_retries=2, retry_backoff_s=0.0, **kw)


async def finished(consumer: asyncio.Task[None]) -> asyncio.Task[None]:
    """``consumer`` once it has ended, however it ended."""
    await asyncio.wait([consumer])
    return consumer


@pytest.mark.parametrize("cancelled", CANCELLED_INSIDE.values(), ids=CANCELLED_INSIDE.keys())
async def test_a_handler_raising_cancelled_error_has_its_event_dead_lettered_and_the_consumer_goes_on(
    cancelled: Callable[[], Awaitable[None]],
) -> None:
    bus = InMemoryBus(REGISTRY)
    calls: list[int] = []
    handled: list[int] = []

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        calls.append(event.data.n)
        if event.data.n == 2:
            await cancelled()
        tx.after_commit(lambda: handled.append(event.data.n))

    bus.subscribe(subscription(handlers={ThingHappened: on_thing}))
    for n in (1, 2, 3):
        await bus.publish(thing(n))

    consumer = await finished(asyncio.create_task(bus.drain()))
    assert not consumer.cancelled()
    consumer.result()

    [dead] = bus.dead_letters
    assert (dead.record.offset, dead.reason) == (1, "handler-failed")
    assert dead.error.startswith("HandlerCancelled: the handler was cancelled (CancelledError")
    assert calls.count(2) == 1 + 3  # its try in the group commit, then max_retries=2 after the first
    assert handled == [1, 3]

    await bus.publish(thing(4))
    await bus.drain()
    assert handled == [1, 3, 4]


async def test_a_batch_handler_raising_cancelled_error_has_only_the_failing_event_dead_lettered() -> None:
    bus = InMemoryBus(REGISTRY)
    handled: list[int] = []

    async def on_batch(deliveries: Sequence[Delivery], tx: Transaction) -> None:
        numbers = [d.event.data.n for d in deliveries if d.event is not None]
        if 2 in numbers:
            await awaits_a_task_cancelled_elsewhere()
        tx.after_commit(lambda: handled.extend(numbers))

    bus.subscribe(subscription(batch_handler=on_batch))
    for n in (1, 2, 3):
        await bus.publish(thing(n))

    consumer = await finished(asyncio.create_task(bus.drain()))
    assert not consumer.cancelled()

    assert [(d.record.offset, d.reason) for d in bus.dead_letters] == [(1, "handler-failed")]
    assert handled == [1, 3]


async def test_a_preparation_raising_cancelled_error_is_a_failed_preparation() -> None:
    handled: list[int] = []

    async def on_batch(deliveries: Sequence[Delivery], tx: Transaction) -> None:
        handled.extend(d.event.data.n for d in deliveries if d.event is not None)

    async def prepare(deliveries: Sequence[Delivery]) -> None:
        await awaits_a_future_cancelled_elsewhere()

    sink = Sink()
    d = Dispatcher(
        subscription(batch_handler=on_batch, batch_prepare=prepare),
        registry=REGISTRY,
        begin=null_transaction,
        dead_letters=sink,
    )
    first, upcoming = [record_of(thing(1), 0)], [record_of(thing(2), 1)]

    consumer = await finished(asyncio.create_task(d.dispatch(first, upcoming=upcoming)))
    assert not consumer.cancelled()
    await d.dispatch(upcoming)

    assert handled == [1, 2]
    assert sink.written == []


async def times_out_with_asyncio_timeout() -> None:
    async with asyncio.timeout(0):
        await asyncio.Event().wait()


async def times_out_with_wait_for() -> None:
    await asyncio.wait_for(asyncio.Event().wait(), 0)


@pytest.mark.parametrize(
    "wait", [times_out_with_asyncio_timeout, times_out_with_wait_for], ids=["asyncio.timeout", "wait_for"]
)
async def test_a_handlers_own_timeout_stays_a_timeout(wait: Callable[[], Awaitable[None]]) -> None:
    """asyncio.timeout cancels the consumer's own task to end the wait, and turns that into TimeoutError once
    it has: the bus must not take it for a stop, nor for a cancelled handler."""
    bus = InMemoryBus(REGISTRY)

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        await wait()

    bus.subscribe(subscription(handlers={ThingHappened: on_thing}, max_uncertain_retries=1))
    await bus.publish(thing(1))

    consumer = await finished(asyncio.create_task(bus.drain()))
    assert not consumer.cancelled()

    [dead] = bus.dead_letters
    assert dead.reason == "handler-failed"
    assert dead.error.startswith("TimeoutError:  (on 2 attempts in a row;")


def turning_it_into(error: type[Exception] | None) -> Callable[[asyncio.Event], Any]:
    """A slow handler (it waits for ever on an event) that, cancelled, lets the CancelledError through
    (``error`` None) or raises ``error`` instead, as a library turning a cancellation into its own error."""

    def handler(started: asyncio.Event) -> Any:
        async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
            if error is not None and started.is_set():
                raise error("aborted")  # every later try fails at once: it would be dead-lettered
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError as exc:
                if error is None:
                    raise
                raise error("aborted") from exc

        return on_thing

    return handler


@pytest.mark.parametrize(
    "handler",
    [turning_it_into(None), turning_it_into(RuntimeError), turning_it_into(TimeoutError)],
    ids=["let-through", "turned-into-an-error", "turned-into-an-uncertain-error"],
)
async def test_cancelling_the_consumer_during_a_slow_handler_ends_it_dead_lettering_nothing(
    handler: Callable[[asyncio.Event], Any],
) -> None:
    bus = InMemoryBus(REGISTRY)
    started = asyncio.Event()
    bus.subscribe(subscription(handlers={ThingHappened: handler(started)}, max_uncertain_retries=3))
    for n in (1, 2):
        await bus.publish(thing(n))

    consumer = asyncio.create_task(bus.drain())
    await started.wait()
    consumer.cancel()

    assert (await finished(consumer)).cancelled()
    assert bus.dead_letters == []
    assert bus.inbox == {}  # nothing committed: the poll is read again by whoever reads next


async def test_a_runner_whose_dead_letter_write_is_cancelled_by_its_client_reads_the_poll_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class CancelledOnce(DeadLetterTopic):
        cancelled = False

        async def send_many(self, items: Any) -> None:
            if not self.cancelled:
                self.cancelled = True
                raise asyncio.CancelledError()  # as a client whose send future another task cancelled
            await super().send_many(items)

    consumer = FakeConsumer({tp(0): [[good(1), (None, b"not json", ()), good(3)]]})
    store, dead = Store(), CancelledOnce()
    runner = runner_on(consumer, store, dead)

    await run_until(runner, lambda: runner._settled.get(tp(0)) == 3, monkeypatch)

    assert [h["dlq_reason"] for *_, h in dead.sent] == [b"missing-attribute"]
    assert handled(store)[-1] == 3


async def test_the_consumers_own_transaction_raising_cancelled_error_is_retried_as_an_outage() -> None:
    # Opening it, the inbox claim or the commit: none of it is the event's, as for an OSError there.
    cancelled_next = 30
    handled: list[int] = []

    @asynccontextmanager
    async def begin() -> AsyncIterator[NullTransaction]:
        nonlocal cancelled_next
        if cancelled_next:
            cancelled_next -= 1
            await awaits_a_future_cancelled_elsewhere()
        yield NullTransaction()

    async def on_thing(event: CloudEvent[Any], tx: Transaction) -> None:
        handled.append(event.data.n)

    sink = Sink()
    d = Dispatcher(
        subscription(handlers={ThingHappened: on_thing}), registry=REGISTRY, begin=begin, dead_letters=sink
    )

    consumer = await finished(asyncio.create_task(d.dispatch([record_of(thing(1), 0)])))
    assert not consumer.cancelled()

    assert (sink.written, handled, cancelled_next) == ([], [1], 0)
