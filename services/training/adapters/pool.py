"""The Trainer port on a process pool: one fit at a time in a separate process, so the service's event loop
(consumers, relay, HTTP) keeps running while scikit-learn works."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue as queue_module
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from libs.logging import get_logger
from services.training.ports import FitProcessUnavailable, Progress
from services.training.worker import install_progress_queue, run_training, warm_up

log = get_logger(__name__)


class ProcessPoolTrainer:
    """Runs :func:`services.training.worker.run_training` in a one-process pool (forkserver or spawn: the
    service has threads, which fork would copy in a broken state). Progress comes back on a queue.
    ``overlap``: the run's work that does not need the fitted model runs beside the fit (TrainingSettings
    ``overlap_fit``)."""

    def __init__(
        self,
        start_method: str = "forkserver",
        *,
        poll_s: float = 0.5,
        overlap: bool = True,
        retry_pause_s: float = 0.5,
    ) -> None:
        self._context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # The fork server imports scikit-learn once; every fit process forked from it starts warm, so a
            # process replaced after a crash or a timeout costs milliseconds, not an import.
            self._context.set_forkserver_preload(["services.training.worker"])
        self._poll_s = poll_s
        self._retry_pause_s = retry_pause_s
        self._overlap = overlap
        self._executor: ProcessPoolExecutor | None = None
        self._progress: Any = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._progress = self._context.Queue(maxsize=1000)
            self._executor = ProcessPoolExecutor(
                max_workers=1,
                mp_context=self._context,
                initializer=install_progress_queue,
                initargs=(self._progress,),
            )
        return self._executor

    async def warm_up(self) -> None:
        """Start the fit process and import scikit-learn there, before the first job needs it. Only an
        optimisation: a pool that fails to start (its process or the fork server dying) is let go, logged,
        and the first job starts a new one."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool(), warm_up)
        except Exception as exc:
            log.warning("fit process not warmed up; the first job starts a new one", error=repr(exc))
            self._discard()

    async def train(self, job_input: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Run one training in the pool; raises BrokenProcessPool when the fit process dies (or what starting
        it raised), the pool let go so the next run starts a new one."""
        job_id = job_input["job_id"]
        phase: tuple[str, float | None] = ("loading-data", 0.0)
        try:
            future = await self._hand_over(job_input)
            while True:
                done, _ = await asyncio.wait({future}, timeout=self._poll_s)
                reported = [(p, f) for owner, p, f in self._drain() if owner == job_id]
                for phase in reported:
                    await progress(*phase)
                if done:
                    return dict(future.result())
                if not reported:
                    # scikit-learn has no progress callback: a long fit re-reports its phase (the caller
                    # throttles), so followers see it is alive and how long it has run.
                    await progress(*phase)
        except Exception:
            # The fit process died under the run (BrokenProcessPool), or none could take it: a pool in that
            # state would fail every later run too. The run itself never raises here (run_training returns
            # its failure), so nothing else lands.
            self._discard()
            raise

    async def _hand_over(self, job_input: dict[str, Any]) -> asyncio.Future[Any]:
        """Submit the run to the fit process. A pool that cannot take it is let go and the run handed to a
        new one, once, a moment later: its process died while idle (the OOM killer; the fork server's end
        takes it too), so the pool is broken before the run began (BrokenProcessPool), or a process cannot
        be started (the fork server's socket gone: BrokenPipeError, ConnectionError, EOFError; a new pool
        starts a new fork server, once the old one is seen to have exited). Neither is the run's doing, nor
        worth one of its attempts."""
        for tries_left in (1, 0):
            try:
                return asyncio.get_running_loop().run_in_executor(
                    self._pool(), run_training, job_input, self._overlap
                )
            except (BrokenProcessPool, OSError, EOFError) as exc:
                self._discard()
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

    def _drain(self) -> list[tuple[str, str, float | None]]:
        items = []
        while self._progress is not None:
            try:
                items.append(self._progress.get_nowait())
            except (queue_module.Empty, OSError, ValueError):
                break
        return items

    def abort(self) -> None:
        """Kill the fit process (a run over its time limit); the next run starts a new one."""
        self._discard()

    def close(self) -> None:
        """Stop the pool and its process."""
        self._discard()

    def _discard(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # The executor cannot cancel a running call; killing its process is the only way to stop a fit.
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            try:
                process.kill()
            except Exception as exc:
                log.debug("fit process already gone", error=repr(exc))
        executor.shutdown(wait=False, cancel_futures=True)
        if self._progress is not None:
            self._progress.close()
            self._progress = None
