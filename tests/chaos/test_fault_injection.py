"""Fault injection: services SIGKILLed at random moments during cascades, the broker and Postgres restarted.

Three models serve version 1; then, under live traffic, each gets a cascade: a drift (the traffic shifts),
a good new dataset, a bad one (labels inverted). While they run, the chaos kills services (at least 20
times), restarts the broker once and Postgres once. Then: every cascade ended, the bad candidate was
rolled back, every event of every audited topic is in the audit trail exactly once, the chain verifies,
every label serving accepted is on the record, and no service is left crash-looping.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from contracts.envelope import CloudEvent
from contracts.rollouts import RolloutPromoted, RolloutRolledBack
from contracts.training import TrainingFailed, TrainingRequested
from contracts.validation import ValidationFailed
from deploy.local.infra import LocalInfra
from deploy.loop import EventTail, LoopClient, Traffic, poll, spec_yaml
from deploy.platform import SERVICES
from deploy.sandbox import Sandbox
from deploy.scenario import REFERENCE, SHIFTED, TARGET, generate
from tests.chaos.faults import TELEMETRY, Chaos
from tests.chaos.ledger import read_topics, read_trail

pytestmark = pytest.mark.timeout(720)

ENDS = (RolloutPromoted, RolloutRolledBack, ValidationFailed, TrainingFailed)


class RecordingClient(LoopClient):
    """A LoopClient that remembers the event id of every label serving accepted (202)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accepted_labels: list[str] = []

    async def feedback(self, items: list[dict[str, Any]]) -> httpx.Response:
        response = await super().feedback(items)
        if response.status_code == 202:
            self.accepted_labels.extend(response.json()["event_ids"])
        return response


@dataclass
class Cascade:
    """One cascade this test started: on which model, how, and what it must end with."""

    model: str
    how: str
    must_roll_back: bool
    known_before: set[str]
    requested: CloudEvent[Any] | None = None
    ended: CloudEvent[Any] | None = None


async def serve_version_1(client: LoopClient, tail: EventTail, model: str, *, cooldown_s: float) -> None:
    await client.put_spec(model, spec_yaml(model, dataset=f"{model}-base", cooldown_s=cooldown_s))
    await client.upload_dataset(f"{model}-base", generate(6_000, REFERENCE, seed=1), [model])
    await tail.wait_for(RolloutPromoted, lambda e: e.subject == model, deadline_s=240)
    await client.wait_served(model)


def requested_ids(tail: EventTail, model: str) -> set[str]:
    return {e.id for e in tail.events(TrainingRequested) if e.subject == model}


async def follow(cascade: Cascade, tail: EventTail, *, deadline_s: float) -> None:
    """Wait for the cascade's TrainingRequested, then for the event that ends it."""
    try:
        cascade.requested = await tail.wait_for(
            TrainingRequested,
            lambda e: e.subject == cascade.model and e.id not in cascade.known_before,
            deadline_s=deadline_s,
        )
        root = cascade.requested.correlationid
        # Every event of a rollout stays in the cascade that started it, a rollback because a newer
        # candidate superseded the canary included.
        cascade.ended = await tail.wait_for(
            ENDS, lambda e: e.subject == cascade.model and e.correlationid == root, deadline_s=deadline_s
        )
    except TimeoutError as exc:
        raise TimeoutError(f"{cascade.model} ({cascade.how}): {exc}\n{history(tail, cascade)}") from None


def history(tail: EventTail, cascade: Cascade) -> str:
    """What the tail saw of the cascade's model since it was requested, for the failure message."""
    root = cascade.requested.correlationid if cascade.requested else None
    since = next(
        (s.seen_at for s in tail.seen if cascade.requested and s.event.id == cascade.requested.id), 0.0
    )
    lines = [
        f"  {s.seen_at - since:7.1f}s {type(s.event.data).__name__:<24} "
        f"{'in the cascade' if s.event.correlationid == root else 'elsewhere':<14} "
        f"id {s.event.id} caused by {s.event.causationid}"
        for s in tail.seen
        if s.event.subject == cascade.model and s.seen_at >= since and not isinstance(s.event.data, TELEMETRY)
    ]
    since_what = "its TrainingRequested" if cascade.requested else "the start"
    return "\n".join([f"events about {cascade.model} since {since_what}:", *lines])


async def trigger(
    client: LoopClient, tail: EventTail, traffic: dict[str, Traffic], models: Sequence[str], round_: int
) -> list[Cascade]:
    """One cascade per model: a drift on the first, a good dataset on the second, a bad one on the third.

    What each cascade must not take for its own (the retrains already requested) is noted once, before its
    upload; the upload alone is retried while the registry is down. (Retrying the whole round noted it again
    after a first upload that got through had started its retrain, and then waited for one that never came.)
    """
    drifting, improving, breaking = models
    cascades = []
    if round_ == 0:
        cascades.append(Cascade(drifting, "drift", False, requested_ids(tail, drifting)))
        traffic[drifting].phase = SHIFTED
    good = generate(6_000, REFERENCE, seed=10 + round_)
    cascades.append(Cascade(improving, "good dataset", False, requested_ids(tail, improving)))
    await retry_http(lambda: client.upload_dataset(f"{improving}-base", good, [improving]))
    bad = generate(6_000, REFERENCE, seed=20 + round_)
    bad[TARGET] = 1 - bad[TARGET]  # labels inverted: the candidate learns the opposite
    cascades.append(Cascade(breaking, "bad dataset", True, requested_ids(tail, breaking)))
    await retry_http(lambda: client.upload_dataset(f"{breaking}-base", bad, [breaking]))
    return cascades


async def retry_http(call: Any, *, deadline_s: float = 120) -> Any:
    """An operator's command, repeated while the service that takes it is being killed."""
    until = time.monotonic() + deadline_s
    while True:
        try:
            return await call()
        except httpx.HTTPError:
            if time.monotonic() > until:
                raise
            await asyncio.sleep(0.5)


@pytest.fixture
async def observer(chaos_platform: Sandbox) -> AsyncIterator[tuple[RecordingClient, EventTail]]:
    """The operator's client and a tail of every event, stopped however the test ends: the event loop
    outlives the test, and the tests after it must not share it with this one's consumer."""
    client = RecordingClient(chaos_platform.platform)
    tail = EventTail(chaos_platform.bootstrap, prefix=chaos_platform.prefix, from_beginning=True)
    await tail.start()
    try:
        yield client, tail
    finally:
        await tail.stop()
        await client.close()


async def test_every_cascade_completes_and_the_trail_holds_every_record_once_despite_kills_and_restarts(
    chaos_platform: Sandbox, local_infra: LocalInfra, observer: tuple[RecordingClient, EventTail]
) -> None:
    seed = int(os.environ.get("DRIFTLOOP_CHAOS_SEED") or secrets.randbits(32))
    print(f"chaos: seed {seed} (replay with DRIFTLOOP_CHAOS_SEED={seed})", flush=True)
    rng = random.Random(seed)
    sandbox = chaos_platform
    client, tail = observer
    started = time.monotonic()
    models = [f"chaos-{secrets.token_hex(2)}-{role}" for role in ("drift", "good", "bad")]
    traffic = {
        m: Traffic(client, m, phase=REFERENCE, requests_per_s=8, rows_per_request=10, seed=i * 100_000)
        for i, m in enumerate(models)
    }
    chaos_task: asyncio.Task[None] | None = None
    followed: list[asyncio.Task[None]] = []
    try:
        # The drifting model's cooldown lets the first of monitoring's signals (drift, degraded performance)
        # start the retrain and the policy skip the rest; it ends before the shift can be detected.
        await asyncio.gather(
            *(serve_version_1(client, tail, m, cooldown_s=20 if m == models[0] else 0) for m in models)
        )
        print(
            f"chaos: version 1 of {len(models)} models serving after {time.monotonic() - started:.0f}s",
            flush=True,
        )
        for t in traffic.values():
            t.start()
        await poll(
            lambda: _true(all(t.stats.rows >= 300 for t in traffic.values())), deadline_s=60, what="traffic"
        )

        chaos = Chaos(sandbox.platform, local_infra, tail, rng)
        cascades: list[Cascade] = []

        def all_ended() -> bool:
            return all(t.done() for t in followed)

        chaos_task = asyncio.create_task(chaos.run(stop=all_ended))
        round_ = 0
        while True:
            new = await trigger(client, tail, traffic, models, round_)
            cascades.extend(new)
            followed.extend(asyncio.create_task(follow(c, tail, deadline_s=360)) for c in new)
            while not all_ended():
                if chaos_task.done():
                    chaos_task.result()
                await asyncio.sleep(0.5)
            if chaos.enough():
                break
            round_ += 1
        await chaos_task
        for task in followed:
            task.result()  # a cascade that did not end raises its TimeoutError here
    finally:
        # The event loop outlives this test (session scope): nothing of it may go on killing services or
        # restarting the broker and Postgres under the tests after it.
        pending = [t for t in [chaos_task, *followed] if t is not None and not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if chaos_task in pending:
            local_infra.up()  # a restart cut short leaves the broker or Postgres down otherwise
        for t in traffic.values():
            await t.stop()
    chaos_s = time.monotonic() - started
    print(
        f"chaos: {len(chaos.kills)} kills, {len(chaos.faults) - len(chaos.kills)} restarts, "
        f"{len(cascades)} cascades in {chaos_s:.0f}s",
        flush=True,
    )
    for c in cascades:
        assert c.ended is not None
        print(f"chaos: {c.model} ({c.how}) ended with {type(c.ended.data).__name__}", flush=True)

    # Every cascade ended with a decision: the validation gate's, or the canary's. A job that failed for
    # good (TrainingFailed) did not complete. The bad candidates never reached the stable route.
    for c in cascades:
        ended = c.ended.data if c.ended is not None else None
        assert isinstance(ended, (RolloutPromoted, RolloutRolledBack, ValidationFailed)), (c.how, ended)
        if c.must_roll_back:
            assert not isinstance(ended, RolloutPromoted), (c.how, ended)

    # No service is left crash-looping: all ready, and none restarts while we watch.
    health = sandbox.platform.wait_ready(timeout_s=120)
    assert all(v == "ready" for v in health.values()), health
    pids = {s: sandbox.platform.state()[s]["pid"] for s in SERVICES}
    for _ in range(10):
        await asyncio.sleep(0.5)
        assert {s: sandbox.platform.state()[s]["pid"] for s in SERVICES} == pids, (
            "a service restarted by itself"
        )

    # Serving answers from the routing it decided: each model's replica holds the stable version and canary
    # its route has. A replica whose LISTEN connection the Postgres restart closed never read its routing
    # again (until 2026-12-02), and went on serving what it had.
    async def replica_follows_its_routes() -> bool:
        for m in models:
            route = await client.route(m)
            if route is None:
                return False
            rollout = route["rollout"]
            canary = rollout["canary_version"] if rollout and rollout["status"] == "active" else None
            here = route["this_replica"] or {}
            if (here.get("stable_version"), here.get("canary_version")) != (route["stable_version"], canary):
                return False
        return True

    await poll(replica_follows_its_routes, deadline_s=30, interval_s=0.5, what="serving to follow its routes")

    # Every event on the audited topics is in the trail exactly once; the chain verifies.
    on_topics, ends = await read_topics(sandbox.bootstrap, sandbox.prefix)
    published = on_topics.events()

    async def trail_complete() -> Any:
        trail = await read_trail(sandbox.database_url, ends)
        return trail if set(trail.events()) >= set(published) else None

    try:
        trail = await poll(trail_complete, deadline_s=120, interval_s=1.0, what="the trail to catch up")
    except TimeoutError:
        trail = await read_trail(sandbox.database_url, ends)
    recorded = trail.events()
    lost = sorted(map(str, set(published) - set(recorded)))
    twice = {str(k): n for k, n in recorded.items() if n > 1}
    extra = sorted(set(trail.rows) - set(on_topics.rows))
    resent = sum(n - 1 for n in published.values() if n > 1)
    print(
        f"chaos: {len(published)} events in {len(on_topics.rows)} records on the topics "
        f"({resent} re-sent copies), {len(trail.rows)} rows in the trail",
        flush=True,
    )
    assert not lost, f"{len(lost)} events never reached the trail, e.g. {lost[:5]}"
    assert not twice, f"{len(twice)} events are in the trail more than once, e.g. {list(twice.items())[:5]}"
    assert not extra, f"{len(extra)} trail rows at positions with no record, e.g. {extra[:5]}"

    verify = await client.audit_verify()
    assert verify["ok"], verify

    # Every label serving accepted was published, so it is on the record.
    feedback = {i for (topic, i) in on_topics.event_counts() if topic == "mlops.feedback"}
    lost = [i for i in client.accepted_labels if i not in feedback]
    assert client.accepted_labels and not lost, (
        f"{len(lost)} of {len(client.accepted_labels)} accepted labels lost"
    )
    print(f"chaos: done in {time.monotonic() - started:.0f}s", flush=True)


async def _true(value: bool) -> bool:
    return value
