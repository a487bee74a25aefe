"""The fit process pool: a pool that cannot start its process is replaced, never left to fail every run, and a
warm-up that fails does not take the service down."""

from __future__ import annotations

import os
import signal
from concurrent.futures import Future
from typing import Any

import pytest

from services.training.adapters import pool as pool_module
from services.training.adapters.pool import ProcessPoolTrainer
from services.training.ports import FitProcessUnavailable
from tests.waiting import eventually


class BrokenExecutor:
    """An executor whose process cannot be started: the fork server's socket is gone (BrokenPipeError);
    with ``works`` one that takes the run and answers at once."""

    def __init__(self, works: bool = False) -> None:
        self.works = works
        self.shut_down = False
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any) -> Future[Any]:
        self.submitted += 1
        if not self.works:
            raise BrokenPipeError(32, "Broken pipe")
        done: Future[Any] = Future()
        done.set_result({"ok": True})
        return done

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.shut_down = True


def broken_pool(trainer: ProcessPoolTrainer, broken: int | None = None) -> list[BrokenExecutor]:
    """Make the trainer's pools: the first ``broken`` of them (all when None) cannot start a process."""
    made: list[BrokenExecutor] = []

    def pool() -> Any:
        if trainer._executor is None:
            works = broken is not None and len(made) >= broken
            trainer._executor = BrokenExecutor(works)  # type: ignore[assignment]
            made.append(trainer._executor)  # type: ignore[arg-type]
        return trainer._executor

    trainer._pool = pool  # type: ignore[method-assign]
    return made


async def progress(phase: str, fraction: float | None) -> None:
    return None


async def test_a_run_the_pool_cannot_start_a_process_for_goes_to_a_new_pool() -> None:
    trainer = ProcessPoolTrainer("spawn", poll_s=0.01, retry_pause_s=0)
    made = broken_pool(trainer, broken=1)

    assert await trainer.train({"job_id": "j1"}, progress) == {"ok": True}

    assert [(e.submitted, e.shut_down) for e in made] == [(1, True), (1, False)]


async def test_a_run_no_new_pool_can_start_a_process_for_either_is_a_clear_error_and_the_pool_is_let_go() -> (
    None
):
    trainer = ProcessPoolTrainer("spawn", poll_s=0.01, retry_pause_s=0)
    made = broken_pool(trainer)

    for _ in range(2):
        with pytest.raises(FitProcessUnavailable, match=r"no fit process could be started .*BrokenPipeError"):
            await trainer.train({"job_id": "j1"}, progress)

    # Each try found the pool it failed with gone: the next one starts a new process, not the broken one.
    assert len(made) == 4
    assert all(e.shut_down and e.submitted == 1 for e in made)
    assert trainer._executor is None


async def test_a_failed_warm_up_leaves_the_service_running_and_the_pool_to_be_made_again() -> None:
    trainer = ProcessPoolTrainer("spawn", poll_s=0.01, retry_pause_s=0)
    made = broken_pool(trainer)

    await trainer.warm_up()  # no exception: warming up is an optimisation

    assert len(made) == 1 and made[0].shut_down
    assert trainer._executor is None


def quick_fit(raw: dict[str, Any], overlap: bool = True) -> dict[str, Any]:
    """Stands in for run_training in the fit process: says which process ran it."""
    return {"ok": True, "pid": os.getpid()}


async def test_a_fit_process_that_died_while_idle_costs_the_next_run_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The OOM killer (or the fork server's end) takes the idle fit process: the pool is broken before the
    # next run begins, and that run must go to a new process, not count as a run whose process died.
    monkeypatch.setattr(pool_module, "run_training", quick_fit)
    trainer = ProcessPoolTrainer("forkserver", poll_s=0.01)

    try:
        first = await trainer.train({"job_id": "j1"}, progress)
        executor = trainer._executor
        os.kill(first["pid"], signal.SIGKILL)

        async def broken() -> bool:
            return bool(getattr(executor, "_broken", False))

        await eventually(broken, interval_s=0.05)

        second = await trainer.train({"job_id": "j2"}, progress)

        assert second["ok"] and second["pid"] != first["pid"]
    finally:
        trainer.close()
