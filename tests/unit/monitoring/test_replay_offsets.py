"""Where a restart replays from: the housekeeping saves the offsets under the topic the service reads, and
the restart looks them up under the same name, whatever ``predictions_topic`` is set to."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from services.monitoring import bootstrap, handlers
from services.monitoring.bootstrap import make_monitor
from services.monitoring.ports import ReplayReport
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.fakes import NoPolicies, publish_nothing


class Store(NoPolicies):
    """The MonitoringStore calls of a housekeeping tick and of a restore, on saved replay offsets only."""

    def __init__(self) -> None:
        self.offsets: dict[str, dict[int, int]] = {}

    async def save_replay_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        self.offsets[topic] = dict(offsets)

    async def replay_offsets(self, topic: str) -> dict[int, int]:
        return self.offsets.get(topic, {})

    async def expire_pending(self, *_: Any) -> list[tuple[str, str]]:
        return []

    async def watched_steps(self) -> list[Any]:
        return []

    async def pending_labels(self) -> set[tuple[str, str]]:
        return set()


class Runtime:
    def __init__(self, settings: MonitoringSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.registry = None

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        committed: list[Callable[[], None]] = []
        yield SimpleNamespace(conn=self.store, publish=publish_nothing, after_commit=committed.append)
        for callback in committed:
            callback()


@pytest.mark.parametrize("topic", ["mlops.predictions", "bench.predictions"])
async def test_a_restart_replays_from_the_offsets_the_last_tick_saved(
    monkeypatch: pytest.MonkeyPatch, topic: str
) -> None:
    settings = MonitoringSettings(predictions_topic=topic)
    store = Store()
    before = make_monitor(settings, artifacts=None, source="/t")
    before.live.next_offsets = {0: 42, 1: 7}  # what the live consumer had read, no window open
    await handlers.housekeeping(1_000.0, monitor=before, store=store, tally=handlers.Tally())  # type: ignore[arg-type]

    replays: list[tuple[str, dict[int, int]]] = []

    async def replay(_: Any, *, topic: str, start: dict[int, int], **__: Any) -> ReplayReport:
        replays.append((topic, start))
        return ReplayReport()

    monkeypatch.setattr(bootstrap, "PgMonitoringStore", lambda conn: conn)
    monkeypatch.setattr(bootstrap, "replay_predictions", replay)
    restarted = make_monitor(settings, artifacts=None, source="/t")
    await bootstrap.restore(Runtime(settings, store), restarted)  # type: ignore[arg-type]

    assert replays == [(topic, {0: 42, 1: 7})]
