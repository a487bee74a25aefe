"""The fit process pool: a pool that cannot start its process is replaced, never left to fail every run, and a
warm-up that fails does not take the service down."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest

from services.training.adapters.pool import ProcessPoolTrainer


class BrokenExecutor:
    """An executor whose process cannot be started: the fork server's socket is gone (BrokenPipeError)."""

    def __init__(self) -> None:
        self.shut_down = False
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any) -> Future[Any]:
        self.submitted += 1
        raise BrokenPipeError(32, "Broken pipe")

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.shut_down = True


def broken_pool(trainer: ProcessPoolTrainer) -> list[BrokenExecutor]:
    made: list[BrokenExecutor] = []

    def pool() -> Any:
        if trainer._executor is None:
            trainer._executor = BrokenExecutor()  # type: ignore[assignment]
            made.append(trainer._executor)  # type: ignore[arg-type]
        return trainer._executor

    trainer._pool = pool  # type: ignore[method-assign]
    return made


async def test_a_pool_that_cannot_start_its_process_is_replaced_for_the_next_run() -> None:
    trainer = ProcessPoolTrainer("spawn", poll_s=0.01)
    made = broken_pool(trainer)

    async def progress(phase: str, fraction: float | None) -> None:
        return None

    for _ in range(2):
        with pytest.raises(BrokenPipeError):
            await trainer.train({"job_id": "j1"}, progress)

    # Each run found the pool it failed with gone: the next one starts a new process, not the broken one.
    assert len(made) == 2
    assert all(e.shut_down and e.submitted == 1 for e in made)


async def test_a_failed_warm_up_leaves_the_service_running_and_the_pool_to_be_made_again() -> None:
    trainer = ProcessPoolTrainer("spawn", poll_s=0.01)
    made = broken_pool(trainer)

    await trainer.warm_up()  # no exception: warming up is an optimisation

    assert len(made) == 1 and made[0].shut_down
    assert trainer._executor is None
