"""A replica's two timer loops, the routing sync and the canary sample flush, count each round that failed
and carry on: the count is what an operator alerts on (a replica on stale routing, a step whose samples stop
growing), where the warning in the log could not be."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from services.serving.bootstrap import flush_canary_samples
from services.serving.domain import ModelRoute, SampleFlush
from services.serving.ports import VersionRecord
from services.serving.routing import RoutingState, RoutingSync
from services.serving.scoring import CanaryStats
from tests.unit.serving.fakes import (
    FakeLoader,
    FakeRoutes,
    FakeRoutingSource,
    FakeSampleCounts,
    FakeVersions,
    passed,
    registered,
)
from tests.unit.serving.test_handlers import World


def loop_failures(loop: str) -> float:
    return REGISTRY.get_sample_value("driftloop_serving_loop_failures_total", {"loop": loop}) or 0.0


class RoutesAwayOnce(FakeRoutingSource):
    """The routes' database away at the first read (restarting), back at the next; the sync is stopped once
    it has waited for a change, that is once a read went through."""

    def __init__(self, routes: FakeRoutes, versions: FakeVersions) -> None:
        super().__init__(routes, versions)
        self.reads = 0
        self.sync: RoutingSync | None = None

    async def snapshot(self) -> list[tuple[ModelRoute, dict[int, VersionRecord]]]:
        self.reads += 1
        if self.reads == 1:
            raise ConnectionRefusedError("connection refused")
        return await super().snapshot()

    async def wait_for_change(self, timeout_s: float) -> None:
        assert self.sync is not None
        self.sync.stop()


async def test_a_failed_routing_sync_is_counted_and_the_next_try_syncs() -> None:
    world = World()
    await world.send(registered(1), passed(1))
    source = RoutesAwayOnce(world.routes, world.versions)
    state = RoutingState()
    source.sync = sync = RoutingSync(state, source, FakeLoader())
    before = loop_failures("routing-sync")

    await asyncio.wait_for(sync.run(), timeout=30)

    assert loop_failures("routing-sync") - before == 1
    assert source.reads == 2, "the loop read again after the failure"
    assert state.synced.is_set() and state.table.models["churn"].versions == [1]


class SampleCountsAwayOnce(FakeSampleCounts):
    """Canary sample counts, refusing the first save (Postgres restarting: nothing committed); stops the
    flush once it has saved some."""

    def __init__(self, stopping: asyncio.Event) -> None:
        super().__init__()
        self.stopping = stopping

    async def save(self, flush: SampleFlush) -> None:
        if not self.flushes:
            self.flushes.append(flush)
            raise ConnectionRefusedError("connection refused")
        await super().save(flush)
        self.stopping.set()


async def test_a_failed_sample_flush_is_counted_and_the_next_flush_saves_its_rows() -> None:
    stats = CanaryStats(threshold=0.5, min_requests=3)
    stats.served("churn", "r-1", 0, rows=3)
    stopping = asyncio.Event()
    counts = SampleCountsAwayOnce(stopping)
    before = loop_failures("sample-flush")

    await asyncio.wait_for(
        flush_canary_samples(
            stats, RoutingState(), counts.save, replica="serving-0/1a2b", every_s=0.01, stopping=stopping
        ),
        timeout=30,
    )

    assert loop_failures("sample-flush") - before == 1
    assert [f.sequence for f in counts.flushes] == [1, 1]
    assert counts.samples == {("churn", "r-1", 0): 3}, "the rows of the failed flush, saved once by the next"


class AnswerLostOnce(FakeSampleCounts):
    """Canary sample counts whose first save commits and loses its answer (the connection dropped after
    COMMIT), while the replica serves 2 more canary rows; stops the flush once those are saved."""

    def __init__(self, stats: CanaryStats, stopping: asyncio.Event) -> None:
        super().__init__()
        self.stats = stats
        self.stopping = stopping
        self.answers_lost = 1

    async def save(self, flush: SampleFlush) -> None:
        if not self.flushes:
            self.stats.served("churn", "r-1", 0, rows=2)
        await super().save(flush)
        if self.samples[("churn", "r-1", 0)] >= 5:
            self.stopping.set()


async def test_a_sample_flush_whose_answer_was_lost_counts_its_rows_once() -> None:
    """The flush is saved again under its token, which the store recorded with the rows it added: where the
    rows were given back and added again, the step reached its minimum samples early."""
    stats = CanaryStats(threshold=0.5, min_requests=3)
    stats.served("churn", "r-1", 0, rows=3)
    stopping = asyncio.Event()
    counts = AnswerLostOnce(stats, stopping)
    before = loop_failures("sample-flush")

    await asyncio.wait_for(
        flush_canary_samples(
            stats, RoutingState(), counts.save, replica="serving-0/1a2b", every_s=0.01, stopping=stopping
        ),
        timeout=30,
    )

    assert loop_failures("sample-flush") - before == 1
    first, again, rows_since = counts.flushes
    assert again == first == SampleFlush("serving-0/1a2b", 1, (("churn", "r-1", 0, 3),))
    assert rows_since == SampleFlush("serving-0/1a2b", 2, (("churn", "r-1", 0, 2),))
    assert counts.samples == {("churn", "r-1", 0): 5}
    assert stats.unflushed() == []
