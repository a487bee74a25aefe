"""The Trainer port on a process pool: one fit at a time in a separate process, so the service's event loop
(consumers, relay, HTTP) keeps running while scikit-learn works."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.forkserver
import os
import queue as queue_module
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from libs.logging import get_logger
from services.training.ports import FitProcessDied, FitProcessUnavailable, Progress
from services.training.worker import FIT_MODULES, prepare_fit_process, run_training, warm_up

log = get_logger(__name__)


class ProcessPoolTrainer:
    """Runs :func:`services.training.worker.run_training` in a one-process pool (forkserver or spawn: the
    service has threads, which fork would copy in a broken state). Progress comes back on a queue.
    ``overlap``: the run's work that does not need the fitted model runs beside the fit (TrainingSettings
    ``overlap_fit``); ``address_space_bytes``: the fit process's RLIMIT_AS (``fit_memory_limit_mb``), None
    for none."""

    def __init__(
        self,
        start_method: str = "forkserver",
        *,
        poll_s: float = 0.5,
        overlap: bool = True,
        retry_pause_s: float = 0.5,
        start_timeout_s: float = 120.0,
        report_grace_s: float = 2.0,
        address_space_bytes: int | None = None,
    ) -> None:
        self._start_method = start_method
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # The fork server imports scikit-learn once; every fit process forked from it starts warm, so a
            # process replaced after a crash or a timeout costs milliseconds, not an import. The worker module
            # alone does not import it (a fit does, FIT_MODULES): preloaded alone, as until 2026-12-02, every
            # fit process imported scikit-learn again, seconds of its first job.
            self._context.set_forkserver_preload(["services.training.worker", *FIT_MODULES])
        self._poll_s = poll_s
        self._retry_pause_s = retry_pause_s
        self._start_timeout_s = start_timeout_s
        self._report_grace_s = report_grace_s
        self._address_space_bytes = address_space_bytes
        self._starting: _Start | None = None
        self._aborted: tuple[int, ...] = ()  # the fit processes killed by abort, until seen reaped
        self._overlap = overlap
        self._executor: ProcessPoolExecutor | None = None
        self._progress: Any = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._progress = self._context.Queue(maxsize=1000)
            self._executor = ProcessPoolExecutor(
                max_workers=1,
                mp_context=self._context,
                initializer=prepare_fit_process,
                initargs=(self._progress, self._address_space_bytes),
            )
        return self._executor

    async def warm_up(self) -> None:
        """Start the fit process and import scikit-learn there, before the first job needs it. Only an
        optimisation: a pool that fails to start (its process or the fork server dying) is let go, logged,
        and the first job starts a new one."""
        try:
            await (await self._submit(warm_up))
        except Exception as exc:
            log.warning("fit process not warmed up; the first job starts a new one", error=repr(exc))
            self._discard()

    async def train(self, job_input: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Run one training in the pool; raises BrokenProcessPool when the fit process dies (or what starting
        it raised), the pool let go so the next run starts a new one."""
        job_id = job_input["job_id"]
        phase: tuple[str, float | None] = ("loading-data", 0.0)
        future: asyncio.Future[Any] | None = None
        watch: _EndWatch | None = None
        executor: ProcessPoolExecutor | None = None
        processes: dict[int, Any] = {}
        try:
            future = await self._hand_over(job_input)
            executor = self._executor
            processes = dict(getattr(executor, "_processes", None) or {})
            watch = _EndWatch(executor, forked=self._start_method == "forkserver")
            while True:
                done, _ = await asyncio.wait({future}, timeout=self._poll_s)
                reported = [(p, f) for owner, p, f in self._drain() if owner == job_id]
                for phase in reported:
                    await progress(*phase)
                if done:
                    return dict(future.result())
                watch.check(self._report_grace_s)
                if not reported:
                    # scikit-learn has no progress callback: a long fit re-reports its phase (the caller
                    # throttles), so followers see it is alive and how long it has run.
                    await progress(*phase)
        except Exception as exc:
            # The fit process died under the run (BrokenProcessPool), or none could take it: a pool in that
            # state would fail every later run too. The run itself never raises here (run_training returns
            # its failure), so nothing else lands.
            ended = None
            if isinstance(exc, BrokenProcessPool) and not isinstance(exc, FitProcessEnded):
                ended = await self._how_it_ended(executor, processes)
            self._let_go(exc)
            if ended is not None:
                raise FitProcessDied(ended) from exc
            raise
        finally:
            if watch is not None:
                watch.close()
            if future is not None and not future.done():
                # Given up on (the job's time ran out, the process ended unreported): the pool fails it
                # later, and nobody is left to read that.
                future.add_done_callback(_ignored)

    async def _how_it_ended(
        self, executor: ProcessPoolExecutor | None, processes: dict[int, Any]
    ) -> str | None:
        """How the run's fit process ended, said for the job's failure; None when it is not known, or when
        this pool killed it (``abort``, ``close``: the run was given up). BrokenProcessPool says only
        "terminated abruptly": a SIGKILL the service did not send is most often the kernel's OOM killer."""
        if executor is None or self._executor is not executor:
            return None
        # The pool's own thread joins the processes once it has failed the run; reading an exit code before
        # that would race it for the fork server's report (and leave one of the two reading 255).
        manager = getattr(executor, "_executor_manager_thread", None)
        if manager is None or not await self._within(lambda: not manager.is_alive()):
            return None
        for pid, process in processes.items():
            code = process.exitcode
            if code is None or code == 0:
                continue
            if code == -signal.SIGKILL:
                return (
                    f"the fit process (pid {pid}) was killed (SIGKILL), most often by the kernel for lack of "
                    "memory; look for the OOM killer in the kernel log (dmesg), then give training more "
                    "memory or train on fewer rows or features"
                )
            if code < 0:
                return f"the fit process (pid {pid}) was killed by signal {_signal_name(-code)}"
            return f"the fit process (pid {pid}) exited with code {code}"
        return None

    def _let_go(self, exc: BaseException) -> None:
        """Let the pool go after ``exc``; when its process ended unreported, its fork server too: stopped or
        wedged, it would start no process for the next pool either."""
        if isinstance(exc, FitProcessEnded) and self._start_method == "forkserver":
            _kill_fork_server()
        self._discard()

    async def _hand_over(self, job_input: dict[str, Any]) -> asyncio.Future[Any]:
        """Submit the run to the fit process. A pool that cannot take it is let go and the run handed to a
        new one, once, a moment later: its process died while idle (the OOM killer; the fork server's end
        takes it too), so the pool is broken before the run began (BrokenProcessPool, or FitProcessEnded when
        a stopped fork server did not report it), or a process cannot be started (the fork server's socket
        gone: BrokenPipeError, ConnectionError, EOFError; a new pool starts a new fork server, once the old
        one is seen to have exited), or not within start_timeout_s (a fork server that is frozen:
        TimeoutError). None is the run's doing, nor worth one of its attempts."""
        await self._aborted_reaped()
        for tries_left in (1, 0):
            try:
                await self._idle_process_ended_unreported()
                return await self._submit(run_training, job_input, self._overlap)
            except (BrokenProcessPool, OSError, EOFError) as exc:
                self._let_go(exc)
                if not tries_left:
                    raise FitProcessUnavailable(
                        f"no fit process could be started for the run, with a new pool either: {exc!r}"
                    ) from exc
                log.warning(
                    "the fit process could not take the run; handing it to a new one", error=repr(exc)
                )
                # A fork server killed a moment ago may not have exited yet: it would be used again.
                await asyncio.sleep(self._retry_pause_s)
        raise AssertionError("unreachable")

    async def _aborted_reaped(self) -> None:
        """Wait up to report_grace_s for the fork server to reap the fit processes ``abort`` killed (a living
        one does so within milliseconds); one that does not is stopped or wedged, so it is killed and the
        run goes to a new one. Handed to it, the run waited for a fork that never came, until
        start_timeout_s."""
        aborted, self._aborted = self._aborted, ()
        if not aborted or await self._within(lambda: all(_reaped(pid) for pid in aborted)):
            return
        server = _fork_server_pid()
        log.warning(
            "the fork server did not reap the fit process killed at the run's time limit: stopped or wedged, "
            "it is killed and a new one started",
            fit_pids=list(aborted),
            fork_server_pid=server,
            report_grace_s=self._report_grace_s,
        )
        _kill_fork_server()
        # Seen still running, it would be used again (multiprocessing asks it, not the kernel); one that
        # outlasts the grace too is the hand-over's to retry, as after a start timeout.
        if server is not None:
            await self._within(lambda: _exited(server))

    async def _within(self, done: Callable[[], bool]) -> bool:
        """Whether ``done()`` comes true within report_grace_s, looked at every poll_s."""
        deadline = time.monotonic() + self._report_grace_s
        while not done():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self._poll_s)
        return True

    async def _idle_process_ended_unreported(self) -> None:
        """Raise FitProcessEnded when the pool's idle process has ended and the pool is not told within
        report_grace_s; return once it is (the submit then raises BrokenProcessPool) or the process lives.
        Handed over, the run would wait for a process that is gone."""
        executor = self._executor
        if executor is None:
            return
        watch = _EndWatch(executor, forked=self._start_method == "forkserver")
        try:
            while watch.ended() is not None and not getattr(executor, "_broken", False):
                watch.check(self._report_grace_s)
                await asyncio.sleep(self._poll_s)
        finally:
            watch.close()

    async def _submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Hand ``fn(*args)`` to the pool; its result, as a future of the event loop.

        Submitting starts the fit process when the pool has none, and that waits for the fork server to fork
        it (or for a spawned interpreter to take its start): done on the event loop, a fork server that never
        answers (stopped, swapped out, wedged) held the loop, and with it every consumer, the outbox relay,
        heartbeats and the HTTP API, for as long as it lasted. So it is done on a thread of its own, waited
        for at most ``start_timeout_s``; past that the pool is let go and its fork server killed (which ends
        the thread's wait, and makes the next pool start a new one), and TimeoutError is raised."""
        executor = self._pool()
        start = _Start(executor, asyncio.get_running_loop())
        self._starting = start
        threading.Thread(target=start.run, args=(fn, *args), name="fit-process-start", daemon=True).start()
        try:
            submitted = await asyncio.wait_for(asyncio.shield(start.handed), self._start_timeout_s)
        except TimeoutError:
            if not start.abandon():
                submitted = await start.handed  # handed over as the wait ran out: taken after all
            else:
                log.error(
                    "the fit process did not start in time; its pool and fork server are let go",
                    start_timeout_s=self._start_timeout_s,
                )
                self._let_go_starting(executor, kill_fork_server=True)
                raise TimeoutError(
                    f"the fit process did not start within start_timeout_s={self._start_timeout_s:g}s "
                    "(the fork server does not answer)"
                ) from None
        except asyncio.CancelledError:
            # The run was given up meanwhile (the service stopping): the pool must not be shut down here, on
            # the loop, while its start may hold its lock.
            if start.abandon():
                self._let_go_starting(executor, kill_fork_server=False)
            raise
        finally:
            if self._starting is start:
                self._starting = None
        return asyncio.wrap_future(submitted)

    def _let_go_starting(self, executor: ProcessPoolExecutor, *, kill_fork_server: bool) -> None:
        """Forget a pool whose start still waits, without its lock (the starting thread holds it and shuts the
        pool down once its wait ends); with ``kill_fork_server``, kill the fork server it waits for."""
        if self._executor is executor:
            self._executor = None
            if self._progress is not None:
                self._progress.close()
                self._progress = None
        _kill_processes(executor)
        if kill_fork_server and self._start_method == "forkserver":
            _kill_fork_server()

    def _drain(self) -> list[tuple[str, str, float | None]]:
        items = []
        while self._progress is not None:
            try:
                items.append(self._progress.get_nowait())
            except (queue_module.Empty, OSError, ValueError):
                break
        return items

    def abort(self) -> None:
        """Kill the fit process (a run over its time limit); the next run starts a new one, from a new fork
        server when the old one does not reap the killed process (see ``_aborted_reaped``)."""
        if self._executor is not None and self._start_method == "forkserver":
            self._aborted = tuple((getattr(self._executor, "_processes", None) or {}).keys())
        self._discard()

    def close(self) -> None:
        """Stop the pool and its process."""
        self._discard()

    def _discard(self) -> None:
        executor = self._executor
        if executor is None:
            return
        starting = self._starting
        if starting is not None and starting.executor is executor and starting.abandon():
            # Its start still waits, holding the pool's lock: shutting it down here would wait too.
            self._let_go_starting(executor, kill_fork_server=False)
            return
        self._executor = None
        _kill_processes(executor)
        executor.shutdown(wait=False, cancel_futures=True)
        if self._progress is not None:
            self._progress.close()
            self._progress = None


class FitProcessEnded(BrokenProcessPool):
    """The fit process ended under a run and its pool was not told (its fork server, which reports a
    process's end, is stopped or wedged): the run is lost as if the pool had said so."""


class _EndWatch:
    """Sees a pool's fit process end by the process itself (a pidfd), not by its fork server's word: a fork
    server that is stopped (SIGSTOP, frozen, swapped out) never reports it, and the pool then waited for a
    dead process until job_timeout_s. Linux only (pidfd_open, 5.3); elsewhere it watches nothing and the
    pool's own watch is all there is."""

    def __init__(self, executor: ProcessPoolExecutor | None, *, forked: bool) -> None:
        self._forked = forked
        self._pidfds: dict[int, int | None] = {}
        self._ended_at: float | None = None
        for pid in list((getattr(executor, "_processes", None) or {}).keys()):
            try:
                self._pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                self._pidfds[pid] = None  # gone already
            except (AttributeError, OSError) as exc:  # no pidfds on this system
                log.debug("fit process not watched", pid=pid, error=repr(exc))

    def ended(self) -> int | None:
        """The id of a watched process that has ended, if any."""
        for pid, pidfd in self._pidfds.items():
            if pidfd is None:
                return pid
            ready = select.poll()  # not select.select: the service's descriptors may number past 1024
            ready.register(pidfd, select.POLLIN)
            if ready.poll(0):
                return pid
        return None

    def check(self, grace_s: float) -> None:
        """Raise FitProcessEnded when a watched process ended more than ``grace_s`` ago (a living fork server
        reports a process's end within milliseconds: the pool's own BrokenProcessPool then comes first)."""
        pid = self.ended()
        if pid is None:
            return
        now = time.monotonic()
        if self._ended_at is None:
            self._ended_at = now
        if now - self._ended_at < grace_s:
            return
        server = _fork_server_pid() if self._forked else None
        raise FitProcessEnded(
            f"the fit process (pid {pid}) ended and its pool was not told within {grace_s:g}s"
            + (
                f": its fork server (pid {server}) is stopped or wedged, so it is killed and a new one "
                "started"
                if server is not None
                else ""
            )
        )

    def close(self) -> None:
        for pidfd in self._pidfds.values():
            if pidfd is not None:
                os.close(pidfd)
        self._pidfds = {}


class _Start:
    """One hand-over of work to a pool, on a thread of its own: ``handed`` gets the pool's future (or what
    submitting raised) unless the caller gave up on it first (``abandon``), in which case the thread lets
    the pool go once its wait ends."""

    def __init__(self, executor: ProcessPoolExecutor, loop: asyncio.AbstractEventLoop) -> None:
        self.executor = executor
        self.loop = loop
        self.handed: asyncio.Future[Future[Any]] = loop.create_future()
        self._lock = threading.Lock()
        self._abandoned = False
        self._delivered = False

    def run(self, fn: Callable[..., Any], *args: Any) -> None:
        submitted: Future[Any] | None = None
        error: BaseException | None = None
        try:
            submitted = self.executor.submit(fn, *args)
        except BaseException as exc:  # handed to the caller, which decides
            error = exc
        with self._lock:
            if not self._abandoned:
                self._delivered = True
                try:
                    self.loop.call_soon_threadsafe(self._deliver, submitted, error)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass
                else:
                    return
        # Given up on (or nobody left to take it): the work must not run in a pool nobody watches.
        if submitted is not None:
            submitted.cancel()
        _kill_processes(self.executor)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _deliver(self, submitted: Future[Any] | None, error: BaseException | None) -> None:
        if self.handed.done():
            return
        if error is not None:
            self.handed.set_exception(error)
        else:
            assert submitted is not None
            self.handed.set_result(submitted)

    def abandon(self) -> bool:
        """Give up on the hand-over; False when it was already handed (the caller takes it)."""
        with self._lock:
            if self._delivered:
                return False
            self._abandoned = True
            return True


def _kill_processes(executor: ProcessPoolExecutor) -> None:
    # The executor cannot cancel a running call; killing its process is the only way to stop a fit.
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        try:
            process.kill()
        except Exception as exc:
            log.debug("fit process already gone", error=repr(exc))


def _kill_fork_server() -> None:
    """Kill this process's fork server (multiprocessing keeps its pid privately): a fork that never answers
    is over, and the next pool starts a new server once this one is seen to have exited."""
    pid = _fork_server_pid()
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as exc:
        log.debug("fork server already gone", error=repr(exc))


def _reaped(pid: int) -> bool:
    """Whether a process is gone, reaped by its parent (not a zombie). Linux (/proc); elsewhere always True,
    and nothing is waited for."""
    return not os.path.exists(f"/proc/{pid}")


def _exited(pid: int) -> bool:
    """Whether a process has exited: gone, or a zombie its parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(") ")[2].startswith("Z")
    except OSError:
        return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _fork_server_pid() -> int | None:
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    pid: int | None = getattr(server, "_forkserver_pid", None)
    return pid


def _ignored(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
