"""The fit process pool: a pool that cannot start its process is replaced, never left to fail every run, and a
warm-up that fails does not take the service down."""

from __future__ import annotations

import asyncio
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from contracts.training import FailureReason, TrainingCompleted, TrainingFailed, TrainingStarted
from services.training import worker
from services.training.adapters import pool as pool_module
from services.training.adapters.pool import ProcessPoolTrainer
from services.training.domain import JobState
from services.training.ports import FitProcessUnavailable
from services.training.worker import run_training
from tests.unit.training.data import churn_frame, churn_spec
from tests.unit.training.fakes import Harness
from tests.unit.training.test_handlers import let_go_count, register, upload
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


def what_a_fit_imports_found_loaded(raw: dict[str, Any], overlap: bool = True) -> dict[str, Any]:
    """Stands in for run_training in the fit process: which of what a fit imports were loaded before it ran
    (this module loads none of them)."""
    return {"ok": True, "loaded": [name for name in worker.FIT_MODULES if name in sys.modules]}


async def test_a_fit_process_starts_with_scikit_learn_imported_by_the_fork_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fork server's preload held the worker module only, which does not import scikit-learn: each fit
    # process (the first, and each one replaced after a crash or a timeout) imported it again, seconds.
    monkeypatch.setattr(pool_module, "run_training", what_a_fit_imports_found_loaded)
    trainer = ProcessPoolTrainer("forkserver", poll_s=0.01)

    try:
        answer = await trainer.train({"job_id": "j1"}, progress)

        assert answer["loaded"] == list(worker.FIT_MODULES)
    finally:
        trainer.close()


class FrozenStart(BrokenExecutor):
    """An executor whose process start waits for a fork server that does not answer: ``submit`` returns only
    once ``answer`` is set (or after ``wait_s``), holding the executor's lock meanwhile, which ``shutdown``
    takes too, as ProcessPoolExecutor's do while the fork server is stopped."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(works=True)
        self.answer = threading.Event()
        self.wait_s = wait_s
        self.lock = threading.Lock()

    def submit(self, fn: Any, /, *args: Any) -> Future[Any]:
        with self.lock:
            self.answer.wait(self.wait_s)
            return super().submit(fn, *args)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self.lock:
            super().shutdown(wait, cancel_futures=cancel_futures)


def frozen_pool(trainer: ProcessPoolTrainer, wait_s: float = 3.0) -> list[FrozenStart]:
    """Make every pool of the trainer one whose process start waits for a fork server that does not answer."""
    made: list[FrozenStart] = []

    def pool() -> Any:
        if trainer._executor is None:
            trainer._executor = FrozenStart(wait_s)  # type: ignore[assignment]
            made.append(trainer._executor)  # type: ignore[arg-type]
        return trainer._executor

    trainer._pool = pool  # type: ignore[method-assign]
    return made


async def test_a_fit_process_start_that_hangs_does_not_hold_the_event_loop() -> None:
    # Starting the fit process waits for the fork server to fork it. It ran on the event loop: a fork server
    # stopped (or wedged) held the loop, and with it the consumers, the outbox relay, the heartbeats and
    # the HTTP API, for as long as it lasted.
    trainer = ProcessPoolTrainer("spawn", poll_s=0.01, retry_pause_s=0, start_timeout_s=0.2)
    made = frozen_pool(trainer)
    ticks_while_starting = 0

    async def ticker() -> None:
        # Counts the loop's turns taken while a start holds its pool's lock (waits on the frozen fork server).
        nonlocal ticks_while_starting
        while True:
            await asyncio.sleep(0.01)
            ticks_while_starting += any(e.lock.locked() for e in made)

    ticking = asyncio.create_task(ticker())
    try:
        with pytest.raises(
            FitProcessUnavailable, match=r"did not start within start_timeout_s=0.2s .*fork server"
        ):
            await trainer.train({"job_id": "j1"}, progress)
    finally:
        ticking.cancel()
    # The loop kept running while the starts waited (two tries of 0.2 s); held by a start, it never would.
    assert ticks_while_starting > 0
    assert len(made) == 2 and trainer._executor is None
    for executor in made:
        executor.answer.set()

    async def let_go() -> bool:
        # Once its wait ends, each starting thread shuts down the pool it was given up on (never the loop,
        # which would wait on the pool's lock held by the start).
        return all(e.shut_down for e in made)

    await eventually(let_go, deadline_s=5.0, interval_s=0.02)


async def test_a_run_given_up_while_its_process_starts_lets_the_pool_go_without_waiting_for_it() -> None:
    # The service stopping (or the job's time running out) while the fit process starts: letting the pool
    # go on the loop would wait for the lock its start holds.
    trainer = ProcessPoolTrainer("spawn", poll_s=0.01, retry_pause_s=0, start_timeout_s=30)
    made = frozen_pool(trainer)
    run = asyncio.create_task(trainer.train({"job_id": "j1"}, progress))

    async def starting() -> bool:
        return bool(made) and made[0].lock.locked()

    await eventually(starting, deadline_s=5.0, interval_s=0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    trainer.close()  # waiting for the start's lock, this would never return: the start ends only below
    assert trainer._executor is None
    made[0].answer.set()

    async def let_go() -> bool:
        return made[0].shut_down

    await eventually(let_go, deadline_s=5.0, interval_s=0.02)


HELD_FIT_PID = "held-fit.pid"


def fork_server() -> int:
    """The id of this process's fork server (multiprocessing keeps it privately)."""
    pid: int = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    assert pid is not None
    return pid


def process_ended(pid: int) -> bool:
    """Whether a process is gone or a zombie (a stopped fork server, its parent, can neither reap it nor tell
    the pool)."""
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rpartition(") ")[2].startswith("Z")


def held_once(pid_file: Path) -> None:
    """In the fit process: the first time, write its process id to ``pid_file`` and wait to be killed."""
    if not pid_file.exists():
        written = pid_file.with_suffix(".tmp")
        written.write_text(str(os.getpid()))
        written.rename(pid_file)
        time.sleep(600)  # the test kills this process long before


def fit_held_first(raw: dict[str, Any], overlap: bool = True) -> dict[str, Any]:
    """Stands in for run_training in the fit process: the first run writes its process id next to the
    artifacts and waits to be killed; a later run trains."""
    held_once(Path(raw["artifacts_url"]) / HELD_FIT_PID)
    return run_training(raw, overlap)


# How long a pool whose fork server the test stopped waits for the report that cannot come: the default 2 s
# is a living server's margin (it reports in milliseconds); here it would only be the test's time.
STOPPED_SERVER_GRACE_S = 0.5


async def churn_job_held_in_its_fit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    max_attempts: int = 3,
    report_grace_s: float = 2.0,
) -> tuple[Harness, ProcessPoolTrainer, Path]:
    """A harness whose runner fits in a forkserver pool, its first fit held until killed (``fit_held_first``:
    the fit process's id in the returned file), the churn model's first job requested; the caller closes the
    trainer."""
    monkeypatch.setattr(pool_module, "run_training", fit_held_first)
    artifacts = tmp_path / "artifacts"
    h = Harness(str(artifacts), max_attempts=max_attempts)
    trainer = ProcessPoolTrainer("forkserver", poll_s=0.02, retry_pause_s=0.1, report_grace_s=report_grace_s)
    h.runner.trainer = trainer
    await register(h, churn_spec())
    await upload(h, "churn-base", churn_frame(), models=["churn"])
    return h, trainer, artifacts / HELD_FIT_PID


async def run_with_the_fit_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, max_attempts: int, stop_the_fork_server: bool = True
) -> tuple[Harness, int, int]:
    """Run a retrain whose fit process is killed (SIGKILL, as by the OOM killer), by default while its fork
    server is stopped (SIGSTOP: it can neither fork nor report a child's end); the harness, the fit process's
    id and the fork server's."""
    h, trainer, pid_file = await churn_job_held_in_its_fit(
        tmp_path,
        monkeypatch,
        max_attempts=max_attempts,
        report_grace_s=STOPPED_SERVER_GRACE_S if stop_the_fork_server else 2.0,
    )
    # Far below the default hour, so that a runner that notices the fit's end only when its time is up
    # fails the test (as timeout) rather than hang it; the outcome is what is checked, never the time taken.
    h.runner.job_timeout_s = 120.0
    stopped: list[int] = []

    async def held_fit() -> int | None:
        return written_pid(pid_file)

    async def stop_the_fork_server_and_kill_the_fit() -> tuple[int, int]:
        # Not warmed up first (that imported scikit-learn in a process the test kills unused): this wait takes
        # in the fork server's start, hence a bound as loose as the runs' own.
        fit = await eventually(held_fit, deadline_s=120, interval_s=0.02)
        server = fork_server()  # the one that forked the held fit
        if stop_the_fork_server:
            stopped.append(server)
            os.kill(server, signal.SIGSTOP)
        os.kill(fit, signal.SIGKILL)
        return fit, server

    killing = asyncio.create_task(stop_the_fork_server_and_kill_the_fit())
    try:
        await h.run_jobs()
        fit, server = await killing
    finally:
        killing.cancel()
        trainer.close()
        for server_stopped in stopped:
            with suppress(OSError):  # a stopped server left behind would hold the pool's threads at exit
                os.kill(server_stopped, signal.SIGKILL)
    return h, fit, server


async def test_a_fit_process_that_dies_while_the_fork_server_is_stopped_is_retried_with_a_new_fork_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fork server reports a fit process's end to the pool; stopped (SIGSTOP, wedged) it reports
    # nothing, and the run waited for a process already dead until job_timeout_s, then failed as timeout.
    h, _, server = await run_with_the_fit_killed(tmp_path, monkeypatch, max_attempts=2)

    assert [(e.data.reason, e.data.message) for e in h.events(TrainingFailed)] == []
    assert [e.data.attempt for e in h.events(TrainingStarted)] == [1, 2]
    [completed] = h.events(TrainingCompleted)
    assert completed.data.run_id.endswith("-2")
    assert fork_server() != server  # the second attempt's process came from a new fork server


async def test_a_fit_process_that_dies_while_the_fork_server_is_stopped_fails_its_last_attempt_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, fit, server = await run_with_the_fit_killed(tmp_path, monkeypatch, max_attempts=1)

    [failed] = h.events(TrainingFailed)
    assert failed.data.reason is FailureReason.WORKER_LOST, failed.data.message
    message = failed.data.message
    assert message.startswith("the fit process died on attempt 1 of 1: "), message
    assert f"fit process (pid {fit})" in message and f"fork server (pid {server})" in message, message


async def test_a_fit_process_that_died_idle_while_the_fork_server_is_stopped_costs_the_next_run_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its pool never learns of the end (the fork server would say it): the next run was handed to a process
    # that is gone, and waited for it until the job's time was up.
    monkeypatch.setattr(pool_module, "run_training", quick_fit)
    trainer = ProcessPoolTrainer(
        "forkserver", poll_s=0.02, retry_pause_s=0.1, report_grace_s=STOPPED_SERVER_GRACE_S
    )
    server: int | None = None
    try:
        first = await trainer.train({"job_id": "j1"}, progress)
        server = fork_server()
        os.kill(server, signal.SIGSTOP)
        os.kill(first["pid"], signal.SIGKILL)

        async def ended() -> bool:
            return process_ended(first["pid"])

        await eventually(ended, interval_s=0.02)
        # Bounded so that a run waiting for the dead process fails the test rather than hang it.
        second = await asyncio.wait_for(trainer.train({"job_id": "j2"}, progress), timeout=120)

        assert second["ok"] and second["pid"] != first["pid"]
        assert fork_server() != server
    finally:
        trainer.close()
        if server is not None:
            with suppress(OSError):
                os.kill(server, signal.SIGKILL)


def fit_held_then_quick(raw: dict[str, Any], overlap: bool = True) -> dict[str, Any]:
    """Stands in for run_training in the fit process: the first run writes its process id to ``pid_file``
    and waits to be killed; a later run answers at once, saying which process ran it."""
    held_once(Path(raw["pid_file"]))
    return quick_fit(raw, overlap)


def written_pid(pid_file: Path) -> int | None:
    """The process id ``held_once`` wrote, once it has."""
    return int(pid_file.read_text()) if pid_file.exists() else None


async def timed_out_run_then_another(
    trainer: ProcessPoolTrainer, pid_file: Path, *, stop_the_fork_server: bool
) -> tuple[int, int, dict[str, Any]]:
    """A run held in its fit process until its time runs out (the runner cancels it, then aborts), the fork
    server stopped meanwhile or not, then another run: the held fit's id, the fork server's, the second
    run's outcome."""
    first = asyncio.create_task(trainer.train({"job_id": "j1", "pid_file": str(pid_file)}, progress))

    async def held_fit() -> int | None:
        return written_pid(pid_file)

    fit = await eventually(held_fit, interval_s=0.02)
    server = fork_server()
    if stop_the_fork_server:
        os.kill(server, signal.SIGSTOP)
    first.cancel()  # what the runner's wait_for does when job_timeout_s runs out, then it aborts
    with pytest.raises(asyncio.CancelledError):
        await first
    trainer.abort()
    # Bounded so that a run waiting for a fork that never comes fails the test rather than hang it.
    second = await asyncio.wait_for(
        trainer.train({"job_id": "j2", "pid_file": str(pid_file)}, progress), timeout=120
    )
    return fit, server, second


async def test_a_run_timed_out_under_a_stopped_fork_server_costs_the_next_run_no_start_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run's time runs out while the fork server is stopped: the fit process killed, the server can
    # neither reap it nor fork the next one, and the next run waited for it until fit_start_timeout_s gave
    # up (two minutes by default) before it got a new server.
    monkeypatch.setattr(pool_module, "run_training", fit_held_then_quick)
    # A start that waits for the stopped server fails the test (the bound above) rather than pass late.
    trainer = ProcessPoolTrainer(
        "forkserver",
        poll_s=0.02,
        retry_pause_s=0.1,
        start_timeout_s=600,
        report_grace_s=STOPPED_SERVER_GRACE_S,
    )
    server: int | None = None
    try:
        fit, server, second = await timed_out_run_then_another(
            trainer, tmp_path / "held-fit.pid", stop_the_fork_server=True
        )

        assert second["ok"] and second["pid"] != fit
        assert fork_server() != server
        assert process_ended(server)  # the stopped server was killed, not left behind
    finally:
        trainer.close()
        if server is not None:
            with suppress(OSError):
                os.kill(server, signal.SIGKILL)


async def test_a_run_timed_out_under_a_living_fork_server_keeps_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It reaps the killed fit process at once: the next run's process is forked from it, warm, not from a
    # new server that imports scikit-learn again.
    monkeypatch.setattr(pool_module, "run_training", fit_held_then_quick)
    trainer = ProcessPoolTrainer("forkserver", poll_s=0.02, retry_pause_s=0.1, start_timeout_s=600)
    try:
        fit, server, second = await timed_out_run_then_another(
            trainer, tmp_path / "held-fit.pid", stop_the_fork_server=False
        )

        assert second["ok"] and second["pid"] != fit
        assert fork_server() == server
    finally:
        trainer.close()


async def test_a_run_whose_job_was_taken_over_kills_its_fit_process_and_the_next_run_gets_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fit went on to its end (or job_timeout_s, an hour) in a process holding one of the machine's cores,
    # while the run that took the job over fitted it again.
    h, trainer, pid_file = await churn_job_held_in_its_fit(tmp_path, monkeypatch)
    h.runner.heartbeat_interval_s = 0.02
    # A bound, not a measure: a run that does not let go ends as timeout and fails the test rather than hang.
    h.runner.job_timeout_s = 60.0
    await h.bus.drain()
    before = let_go_count()
    try:
        run = asyncio.create_task(h.runner.run_once())

        async def held_fit() -> int | None:
            return written_pid(pid_file)

        fit = await eventually(held_fit, interval_s=0.02)
        [started] = h.events(TrainingStarted)
        h.jobs.stale.add(started.data.job_id)
        assert await h.jobs.claim_next(stale_after_s=0) is not None  # another replica took the job over

        assert await run
        assert let_go_count() == before + 1  # let go when a heartbeat saw it, not stopped at job_timeout_s

        async def fit_ended() -> bool:
            return process_ended(fit)

        await eventually(fit_ended, interval_s=0.02)  # killed, not left fitting to its end
        # That replica presumed dead in turn: the job is resumed here, in a new fit process, and completes
        # once.
        h.jobs.stale.add(started.data.job_id)
        assert await h.run_jobs() == 1
        assert h.events(TrainingFailed) == []
        [completed] = h.events(TrainingCompleted)
        assert completed.data.run_id.endswith("-3")
    finally:
        trainer.close()


async def test_a_fit_process_killed_by_a_sigkill_the_service_did_not_send_fails_naming_memory_as_likely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the kernel's OOM killer does: the job failed as worker-lost with BrokenProcessPool's "terminated
    # abruptly", which says nothing of memory, the first thing to look at.
    h, fit, _ = await run_with_the_fit_killed(
        tmp_path, monkeypatch, max_attempts=1, stop_the_fork_server=False
    )

    [failed] = h.events(TrainingFailed)
    assert failed.data.reason is FailureReason.WORKER_LOST, failed.data.message
    message = failed.data.message
    assert message.startswith("the fit process died on attempt 1 of 1: "), message
    assert (
        f"the fit process (pid {fit}) was killed (SIGKILL), most often by the kernel for lack of memory;"
        in message
    ), message


def exits_with_three(raw: dict[str, Any], overlap: bool = True) -> dict[str, Any]:
    """Stands in for run_training in the fit process: the process ends at once, with exit code 3."""
    os._exit(3)


async def test_a_fit_process_that_exits_under_a_run_is_named_with_its_exit_code_and_no_word_of_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool_module, "run_training", exits_with_three)
    trainer = ProcessPoolTrainer("forkserver", poll_s=0.02)
    try:
        with pytest.raises(Exception) as raised:
            await trainer.train({"job_id": "j1"}, progress)
    finally:
        trainer.close()
    assert "exited with code 3" in str(raised.value), repr(raised.value)
    assert "memory" not in str(raised.value)


FIT_MEMORY_LIMIT_MB = 8192  # well above what a fit process maps with scikit-learn loaded


def fit_beyond_its_memory(raw: dict[str, Any], overlap: bool = True) -> dict[str, Any]:
    """Stands in for run_training in the fit process: the run's fit asks for twice the fit process's bound."""

    def outgrown(*args: Any, **kwargs: Any) -> Any:
        return bytearray(2 * FIT_MEMORY_LIMIT_MB * 2**20)

    worker.train = outgrown  # in the fit process only, which the test ends
    return run_training(raw, overlap)


async def test_a_fit_beyond_the_fit_processs_memory_limit_fails_as_fit_error_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unbounded, it grows until the kernel's OOM killer takes it (or another process): worker-lost after every
    # attempt. Bounded (fit_memory_limit_mb), it fails once, saying why.
    monkeypatch.setattr(pool_module, "run_training", fit_beyond_its_memory)
    h = Harness(str(tmp_path / "artifacts"))
    trainer = ProcessPoolTrainer("forkserver", poll_s=0.02, address_space_bytes=FIT_MEMORY_LIMIT_MB * 2**20)
    h.runner.trainer = trainer
    await register(h, churn_spec())
    await upload(h, "churn-base", churn_frame(), models=["churn"])
    try:
        await h.run_jobs()
    finally:
        trainer.close()

    [failed] = h.events(TrainingFailed)
    assert failed.data.reason is FailureReason.FIT_ERROR, failed.data.message
    assert failed.data.message.startswith(
        f"the fit ran out of memory within the fit process's address space of {FIT_MEMORY_LIMIT_MB} MB "
        "(fit_memory_limit_mb) (MemoryError"
    ), failed.data.message
    assert [e.data.attempt for e in h.events(TrainingStarted)] == [1]


async def test_a_service_stopped_mid_fit_hands_its_job_back_uncounted_and_the_next_runner_completes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGTERM (a deploy, a scale-down) closes the pool under the fit, as the service's stop does. Taken for a
    # lost worker, each stop cost the job an attempt, and on its last one failed it as worker-lost: "the fit
    # process died on attempt 1 of 1".
    h, trainer, pid_file = await churn_job_held_in_its_fit(tmp_path, monkeypatch, max_attempts=1)
    await h.bus.drain()
    try:
        running = asyncio.create_task(h.runner.run())

        async def held_fit() -> int | None:
            return written_pid(pid_file)

        await eventually(held_fit, interval_s=0.02)
        h.runner.stop()  # what training's on_stop does: the runner told, then the pool closed
        await asyncio.to_thread(trainer.close)
        await asyncio.wait_for(running, timeout=60.0)  # a bound, not a measure
    finally:
        trainer.close()
    await h.bus.drain()
    assert h.events(TrainingFailed) == []
    [started] = h.events(TrainingStarted)
    job = h.jobs.rows[started.data.job_id]
    assert (job.state, job.attempts) == (JobState.REQUESTED, 0)  # handed back, runnable at once

    assert await h.new_runner().run_once()  # the restarted service (or another replica)
    await h.bus.drain()
    assert h.events(TrainingFailed) == []
    assert [e.data.attempt for e in h.events(TrainingStarted)] == [1, 1]
    [completed] = h.events(TrainingCompleted)
    assert completed.data.run_id == started.data.run_id  # the same attempt, so the same run id
    assert h.jobs.rows[started.data.job_id].attempts == 1
