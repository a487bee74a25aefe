"""A service process stops, in order and with status 1, when any of its tasks ends before it was asked to
stop (libs.service.serve)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from fastapi import FastAPI

import libs.service
from contracts.registry import EVENT_TYPES
from libs.service import Runtime, ServiceParts, serve
from libs.settings import ServiceSettings


class _Loop:
    """The relay's and the retention's shape: runs until stopped."""

    def __init__(self) -> None:
        self.stopped = asyncio.Event()

    async def run(self) -> None:
        await self.stopped.wait()

    def stop(self) -> None:
        self.stopped.set()


class _Server:
    """uvicorn's shape: serves until ``should_exit`` is set."""

    def __init__(self) -> None:
        self.exiting = asyncio.Event()

    @property
    def should_exit(self) -> bool:
        return self.exiting.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self.exiting.set()

    async def serve(self) -> None:
        await self.exiting.wait()


class _Runtime:
    def __init__(self) -> None:
        self.closed = False
        self.relay_loop = _Loop()

    def consumer(self, subscription: Any) -> Any:  # pragma: no cover - no subscriptions here
        raise AssertionError(subscription)

    def relay(self) -> _Loop:
        return self.relay_loop

    def retention(self) -> _Loop:
        return _Loop()

    async def close(self, *, grace_s: float | None = None) -> None:
        self.closed = True


@pytest.fixture
def fake_runtime(monkeypatch: pytest.MonkeyPatch, restored_collector: None) -> _Runtime:
    runtime = _Runtime()

    async def start(cls: type[Runtime], settings: ServiceSettings, migrations: Any) -> _Runtime:
        return runtime

    monkeypatch.setattr(Runtime, "start", classmethod(start))
    monkeypatch.setattr(libs.service, "http_server", lambda app, settings: _Server())
    return runtime


async def _ends_by_returning() -> None:
    return None


async def _ends_cancelled() -> None:
    # What a loop does when something it awaited was cancelled elsewhere and it lets that through.
    never = asyncio.get_running_loop().create_future()
    never.cancel()
    await never


async def _ends_by_raising() -> None:
    raise RuntimeError("boom")


@pytest.mark.parametrize("task", [_ends_by_returning, _ends_cancelled, _ends_by_raising])
async def test_a_task_that_ends_early_stops_the_service_in_order_with_status_1(
    fake_runtime: _Runtime, task: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    stopped: list[bool] = []

    async def on_stop() -> None:
        stopped.append(True)

    async def build(runtime: Any) -> ServiceParts:
        return ServiceParts(app=FastAPI(), tasks=[task], on_stop=[on_stop])

    with pytest.raises(SystemExit) as exited:
        # Awaited here, not in a task: asyncio lets a SystemExit out of a task only through the event loop.
        await serve(ServiceSettings(), migrations=[], build=build)
    assert exited.value.code == 1
    # The orderly stop ran: the hooks, the relay told to stop, the connections closed.
    assert stopped == [True]
    assert fake_runtime.relay_loop.stopped.is_set()
    assert fake_runtime.closed


async def test_a_stop_hook_that_fails_skips_neither_the_others_nor_the_stop(fake_runtime: _Runtime) -> None:
    stopped: list[str] = []

    async def failing() -> None:
        stopped.append("failing")
        raise RuntimeError("the hook's own bug")

    async def after() -> None:
        stopped.append("after")

    async def build(runtime: Any) -> ServiceParts:
        return ServiceParts(app=FastAPI(), on_stop=[failing, after])

    async def ask_to_stop() -> None:
        # Runs once serve waits on its tasks, its signal handlers in place.
        signal.raise_signal(signal.SIGTERM)

    stopping = asyncio.create_task(ask_to_stop())
    with pytest.raises(SystemExit) as exited:
        await serve(ServiceSettings(), migrations=[], build=build)
    await stopping
    assert exited.value.code == 1
    assert stopped == ["failing", "after"]
    assert fake_runtime.relay_loop.stopped.is_set()
    assert fake_runtime.closed


class _Pool:
    def __init__(self, closed: list[str], *, held: bool = False) -> None:
        self.closed = closed
        self.held = held
        """A connection the build took is still out: ``close`` waits for it, as asyncpg's does."""

    async def close(self) -> None:
        if self.held:
            await asyncio.Event().wait()  # never released
        self.closed.append("pool")

    def terminate(self) -> None:
        self.closed.append("pool terminated")


class _Producer:
    def __init__(self, closed: list[str], *, failing: bool = False) -> None:
        self.closed = closed
        self.failing = failing

    async def stop(self) -> None:
        self.closed.append("producer")
        if self.failing:
            raise OSError("the broker went away as the producer stopped")


class _StoreUnreadable(Exception):
    """What a build raises in these tests: a store it reads at start it could not read."""


def _starts_with(monkeypatch: pytest.MonkeyPatch, pool: _Pool, producer: _Producer) -> None:
    """``Runtime.start`` opening these fakes: the pool first, the producer second, as it does."""

    async def start(cls: type[Runtime], settings: ServiceSettings, migrations: Any) -> Runtime:
        return Runtime(
            settings=settings,
            pool=pool,
            publisher=producer,  # type: ignore[arg-type]
            dead_letters=None,  # type: ignore[arg-type]
            begin=None,  # type: ignore[arg-type]
            registry=EVENT_TYPES,
        )

    monkeypatch.setattr(Runtime, "start", classmethod(start))


async def _build_that_raises(runtime: Any) -> ServiceParts:
    raise _StoreUnreadable("the reference profiles could not be read")


async def test_a_build_that_raises_stops_the_producer_then_closes_the_pool_and_raises_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed: list[str] = []
    _starts_with(monkeypatch, _Pool(closed), _Producer(closed))

    with pytest.raises(_StoreUnreadable, match="the reference profiles could not be read"):
        await serve(ServiceSettings(), migrations=[], build=_build_that_raises)
    assert closed == ["producer", "pool"]


async def test_a_producer_that_fails_to_stop_after_a_failed_build_leaves_neither_the_pool_nor_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed: list[str] = []
    _starts_with(monkeypatch, _Pool(closed), _Producer(closed, failing=True))

    with pytest.raises(_StoreUnreadable):
        await serve(ServiceSettings(), migrations=[], build=_build_that_raises)
    assert closed == ["producer", "pool"]


async def test_a_build_that_exits_keeps_its_exit_status_and_still_closes_what_was_opened(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed: list[str] = []
    _starts_with(monkeypatch, _Pool(closed), _Producer(closed))

    async def build(runtime: Any) -> ServiceParts:
        raise SystemExit(2)

    with pytest.raises(SystemExit) as exited:
        await serve(ServiceSettings(), migrations=[], build=build)
    assert exited.value.code == 2
    assert closed == ["producer", "pool"]


async def test_a_build_that_raises_holding_a_pool_connection_exits_with_its_error_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pool.close() waits for every connection to come back: one the build took (a LISTEN) never does.
    closed: list[str] = []
    _starts_with(monkeypatch, _Pool(closed, held=True), _Producer(closed))
    monkeypatch.setattr(libs.service, "ABANDON_GRACE_S", 0.01)

    with pytest.raises(_StoreUnreadable):
        await asyncio.wait_for(serve(ServiceSettings(), migrations=[], build=_build_that_raises), timeout=30)
    assert closed == ["producer", "pool terminated"]
