"""The trail's rows appended, its checkpoints signed and its head are shown once the transaction that
makes them commits: a poll whose transaction rolls back shows nothing, and a redelivered one adds nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import REGISTRY

from contracts.envelope import CloudEvent
from contracts.monitoring import DriftDetected
from contracts.topics import DEAD_LETTER
from libs.bus import Delivery
from services.audit import handlers
from services.audit.domain import Signer
from tests.unit.audit.fakes import SEED, Clock, FakeTrail, delivery, example

TOPIC = DriftDetected.topic


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def append(
    trail: FakeTrail,
    deliveries: Sequence[Delivery],
    committed: list[Callable[[], None]],
    *,
    every: int = 1000,
) -> list[CloudEvent[Any]]:
    """One poll through the handler; what waits for its commit goes to ``committed``."""
    published: list[CloudEvent[Any]] = []

    async def publish(event: CloudEvent[Any]) -> None:
        published.append(event)

    await handlers.on_records(
        deliveries,
        trail=trail,
        signer=Signer(SEED),
        publish=publish,
        source="/driftloop/audit",
        clock=Clock(),
        dead_letter_topic=DEAD_LETTER,
        checkpoint_every_rows=every,
        after_commit=committed.append,
    )
    return published


def commit(callbacks: list[Callable[[], None]]) -> None:
    for callback in callbacks:
        callback()


async def test_rows_appended_and_the_head_are_shown_once_committed_and_once_only() -> None:
    trail = FakeTrail()
    batch = [delivery(example(DriftDetected), offset=i) for i in range(3)]
    before = sample("driftloop_audit_rows_appended_total", topic=TOPIC)

    rolled_back: list[Callable[[], None]] = []
    await append(FakeTrail(), batch, rolled_back)  # a transaction that never commits: nothing shown
    assert sample("driftloop_audit_rows_appended_total", topic=TOPIC) == before

    committed: list[Callable[[], None]] = []
    await append(trail, batch, committed)
    commit(committed)
    again: list[Callable[[], None]] = []
    await append(trail, batch, again)  # redelivered: no row appended, nothing to count
    commit(again)

    assert sample("driftloop_audit_rows_appended_total", topic=TOPIC) == before + 3
    assert sample("driftloop_audit_head_sequence") == 3


async def test_checkpoints_are_counted_by_what_triggered_them() -> None:
    trail = FakeTrail()
    by_rows, by_timer = (
        sample("driftloop_audit_checkpoints_signed_total", trigger=t) for t in ("rows", "timer")
    )

    committed: list[Callable[[], None]] = []
    [signed_by_rows] = await append(
        trail, [delivery(example(DriftDetected), offset=i) for i in range(4)], committed, every=4
    )
    assert signed_by_rows.data.sequence == 4
    assert sample("driftloop_audit_checkpoints_signed_total", trigger="rows") == by_rows  # not yet committed
    commit(committed)
    assert sample("driftloop_audit_checkpoints_signed_total", trigger="rows") == by_rows + 1

    committed = []
    await append(trail, [delivery(example(DriftDetected), offset=4)], committed, every=4)
    commit(committed)
    timed: list[Callable[[], None]] = []

    async def publish(event: CloudEvent[Any]) -> None:
        return None

    signed = await handlers.seal_head(
        trail=trail,
        signer=Signer(SEED),
        publish=publish,
        source="/driftloop/audit",
        clock=Clock(),
        after_commit=timed.append,
    )
    assert signed is not None and signed.sequence == 5
    commit(timed)
    assert sample("driftloop_audit_checkpoints_signed_total", trigger="timer") == by_timer + 1
    assert sample("driftloop_audit_checkpoints_signed_total", trigger="rows") == by_rows + 1
    assert sample("driftloop_audit_head_sequence") == 5


async def test_a_restarted_replica_shows_the_stored_head_before_any_append_or_timed_look() -> None:
    # The gauge read 0 after a restart until the first append or the keeper's first timed look, which on an
    # idle trail is checkpoint_every_s away: a dashboard saw the trail emptied at every deploy.
    trail = FakeTrail()
    committed: list[Callable[[], None]] = []
    await append(trail, [delivery(example(DriftDetected), offset=i) for i in range(4)], committed)
    commit(committed)
    handlers.HEAD_SEQUENCE.set(0)  # a new process: its gauge starts at 0

    await handlers.show_head(trail)  # as the service starts (bootstrap.show_stored_head)

    assert sample("driftloop_audit_head_sequence") == 4
