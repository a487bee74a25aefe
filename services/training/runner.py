"""The job runner: takes dispatched jobs from Postgres, runs each fit off the event loop, and finishes the
job and publishes its outcome in one transaction.

A job is claimed (state running, one more attempt, a new run id) in the same transaction that publishes
TrainingStarted. While the fit runs, the runner writes a heartbeat; a job whose heartbeat went stale belongs
to a dead worker and is claimed again by any runner — re-run from scratch, which gives the same result
because data, spec and seed are pinned. Completion and failure are conditional on the run still owning the
job, so a job completes (or fails) exactly once, whoever finishes it; a heartbeat that finds the job taken
over stops the fit there, rather than let it hold its core until it ends. A fit is never redone for the sake
of recording it: the database failing meanwhile is waited out with the outcome in hand (heartbeats go on), and
any other error completing the job fails it, naming the error (completion-error). The artifact store away
fails no job either: before the fit the run waits and starts again; after it the runner writes the files the
store refused (the fit process hands them over) once the store is back. A run the service's own stop cuts
short hands its job back with its attempt uncounted: a deploy is no lost worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any

from prometheus_client import Counter, Histogram

from contracts.common import ArtifactFormat, DatasetRef, Lineage, ModelSignature
from contracts.datasets import HOLDOUT_SUFFIX, TRAINING_SET_SUFFIX, DatasetRegistered
from contracts.envelope import DEFAULT_MAX_EVENT_BYTES, CloudEvent, new_event
from contracts.training import (
    FailureReason,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
)
from libs.artifacts import ArtifactStore
from libs.bus import EventTooLarge, Transaction, bytes_over_limit
from libs.bus.core import is_transient
from libs.logging import bound, get_logger
from services.training.domain import next_attempt_allowed, too_large_to_announce
from services.training.ports import (
    Datasets,
    FitProcessDied,
    FitProcessUnavailable,
    Job,
    JobQueue,
    Progress,
    Trainer,
)
from services.training.worker import UNWRITTEN, MaterialisedSet, TrainingFailure, TrainingResult

log = get_logger(__name__)

RETRY_FIRST_S = 0.5
"""The runner's wait after an error of the infrastructure; it doubles on each further one, up to
RETRY_MAX_S."""
RETRY_MAX_S = 10.0

STORE_WAITS = Counter(
    "driftloop_training_store_waits_total",
    "Waits of a run for the artifact store, still failing after its own tries (an outage, never the job's "
    "fault): before the fit (phase load) the run starts again after the wait; after it (phase write) the "
    "runner writes the run's files again, the fit kept.",
    ["phase"],
)

RUNNER_FAILURES = Counter(
    "driftloop_training_runner_failures_total",
    "Rounds of the job runner's loop that raised (Postgres away, most often): logged as the warning 'job "
    "runner error, retrying' and retried with back-off (up to 10 s). A count that keeps rising is a runner "
    "that gets no job done.",
)

RUNS_LET_GO = Counter(
    "driftloop_training_runs_let_go_total",
    "Runs that found, by a heartbeat during the fit, that another run had taken their job over (this one was "
    "presumed dead: its heartbeat went stale, a long pause or a network partition): the fit process is "
    "killed and the job left to the other run, logged as the warning 'the job was taken over by another "
    "run; its fit is stopped'. A count that keeps rising is stale_after_s too short for this machine's "
    "pauses.",
)

JOBS = Counter(
    "driftloop_training_jobs_total",
    "Training jobs finished, by model and outcome: completed, or the reason it failed (invalid-spec, "
    "fit-error, timeout, worker-lost, ...: contracts.training.FailureReason). Counted once the outcome "
    "commits, however often recording it was tried.",
    ["model", "outcome"],
)
JOB_SECONDS = Histogram(
    "driftloop_training_job_duration_seconds",
    "How long the run that finished a training job took, its fit and any waits for the artifact store "
    "included, by model and outcome (completed, failed); a job failed for a worker lost too often before "
    "its run is not timed.",
    ["model", "outcome"],
    buckets=(0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0),
)
COMPLETED = "completed"
FAILED = "failed"


def count_outcome(tx: Transaction, model: str, outcome: str, duration: float | None) -> None:
    """Count a job's outcome (``completed`` or a failure's reason) once ``tx`` commits: recording it may be
    tried again after an outage, and a rolled-back try must count nothing."""

    def count() -> None:
        JOBS.labels(model, outcome).inc()
        if duration is not None:
            JOB_SECONDS.labels(model, COMPLETED if outcome == COMPLETED else FAILED).observe(duration)

    tx.after_commit(count)


Begin = Callable[[], AbstractAsyncContextManager[Transaction]]


class Stopped(Exception):
    """The service stopping ended the run (its fit process killed with the pool, or a wait for the store cut
    short): no worker was lost, and the job is handed back with its attempt uncounted."""


class LostOwnership(Exception):
    """Another run took the job over (this one was presumed dead): its outcome must not be recorded."""


class Unannounceable(Exception):
    """The run's TrainingCompleted would be larger than consumers accept; the message says why and what to
    do."""


class JobRunner:
    """Runs training jobs one at a time in this process; several replicas share the queue."""

    def __init__(
        self,
        *,
        begin: Begin,
        queue_on: Callable[[Any], JobQueue],
        datasets_on: Callable[[Any], Datasets],
        trainer: Trainer,
        artifacts_url: str,
        source: str,
        code_version: str,
        heartbeat_interval_s: float = 2.0,
        stale_after_s: float = 30.0,
        max_attempts: int = 3,
        job_timeout_s: float = 3600.0,
        progress_interval_s: float = 5.0,
        poll_s: float = 5.0,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        retry_first_s: float = RETRY_FIRST_S,
        listen: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.begin = begin
        self.queue_on = queue_on
        self.datasets_on = datasets_on
        self.trainer = trainer
        self.artifacts_url = artifacts_url
        self.source = source
        self.code_version = code_version
        self.heartbeat_interval_s = heartbeat_interval_s
        self.stale_after_s = stale_after_s
        self.max_attempts = max_attempts
        self.job_timeout_s = job_timeout_s
        self.progress_interval_s = progress_interval_s
        self.poll_s = poll_s
        self.max_event_bytes = max_event_bytes
        self.retry_first_s = retry_first_s
        self.listen = listen
        """Made sure of before each look for work: the LISTEN that wakes the runner when a job is dispatched
        (``libs.db.Listening.ensure``), made again after Postgres closed its connection, which before left
        the runner to find jobs by ``poll_s`` alone until it restarted."""
        self._wake = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        """Look for work now (a job was dispatched)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop after the job in hand: a run the stop cuts short (the pool closed under its fit) hands its job
        back, its attempt uncounted, for the next runner to run at once."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Run jobs until stopped; errors of the infrastructure are retried with backoff."""
        delay = self.retry_first_s
        while not self._stopping:
            try:
                if self.listen is not None:
                    await self.listen()  # listening anew, what was dispatched meanwhile is found by this look
                # Cleared before the look, not after it: a job dispatched during a look that found nothing
                # (its NOTIFY came meanwhile) must cut the wait short, not be cleared with it and wait poll_s.
                self._wake.clear()
                worked = await self.run_once()
                delay = self.retry_first_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                RUNNER_FAILURES.inc()
                log.warning("job runner error, retrying", error=repr(exc), delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if worked:
                continue
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)

    async def run_once(self) -> bool:
        """Claim and run one job; False when there was none."""
        async with self.begin() as tx:
            job = await self.queue_on(tx.conn).claim_next(stale_after_s=self.stale_after_s)
            if job is None:
                return False
            assert job.run_id is not None
            if job.attempts > self.max_attempts:
                await self.queue_on(tx.conn).fail(
                    job.job_id, job.run_id, FailureReason.WORKER_LOST, self._lost_message(job)
                )
                await tx.publish(self._failed(job, FailureReason.WORKER_LOST, self._lost_message(job), None))
                count_outcome(tx, job.model, FailureReason.WORKER_LOST.value, None)
                log.error("job failed: worker lost too often", job_id=job.job_id, attempts=job.attempts - 1)
                return True
            job_input = await self._input(job, self.datasets_on(tx.conn))
            await tx.publish(self._event(job, self._started(job)))
        with bound(job_id=job.job_id, run_id=job.run_id, model=job.model):
            log.info("training started", attempt=job.attempts)
            await self._execute(job, job_input)
        return True

    def _lost_message(self, job: Job) -> str:
        return (
            f"the worker running job {job.job_id} was lost {job.attempts - 1} times "
            f"(max_attempts {self.max_attempts}); look at the training logs, then ask for a retrain"
        )

    async def _input(self, job: Job, datasets: Datasets) -> dict[str, Any]:
        inputs = []
        for ref in job.request.datasets:
            known = await datasets.get(ref.name, ref.version)
            fmt = known.artifact.format if known is not None else ArtifactFormat.PARQUET
            inputs.append(
                {"name": ref.name, "version": ref.version, "sha256": ref.sha256, "format": fmt.value}
            )
        window = job.request.traffic_window
        return {
            "job_id": job.job_id,
            "model": job.model,
            "spec_key": job.spec_artifact.key,
            "datasets": inputs,
            "window_key": window.data.key if window is not None and window.data is not None else None,
            "window_format": (
                window.data.format.value if window is not None and window.data is not None else "parquet"
            ),
            "window_start": window.start.isoformat() if window is not None else None,
            "window_end": window.end.isoformat() if window is not None else None,
            "artifacts_url": self.artifacts_url,
        }

    async def _execute(self, job: Job, job_input: dict[str, Any]) -> None:
        assert job.run_id is not None
        started = time.monotonic()
        last_progress = -self.progress_interval_s
        # Set by a heartbeat that finds the job no longer this run's: the fit is then stopped, not finished.
        taken_over = asyncio.Event()

        async def progress(phase: str, fraction: float | None) -> None:
            nonlocal last_progress
            now = time.monotonic()
            if now - last_progress < self.progress_interval_s:
                return
            last_progress = now
            event = TrainingProgress(
                job_id=job.job_id,
                run_id=job.run_id or "",
                model=job.model,
                phase=phase,
                fraction=fraction,
                elapsed_seconds=round(now - started, 3),
            )
            try:
                async with self.begin() as tx:
                    if await self.queue_on(tx.conn).heartbeat(job.job_id, job.run_id or ""):
                        await tx.publish(self._event(job, event))
                    else:
                        taken_over.set()
            except Exception as exc:
                # What followers see, no more: raised into the trainer, it would kill the fit (a lost run, one
                # more attempt) or, a TimeoutError (the pool's acquire), pass for the job's own time limit.
                # Missed like a heartbeat: a long outage makes the job stale, as it should.
                log.warning("training progress not recorded", phase=phase, error=repr(exc))

        # Beating until the outcome is recorded: a completion waiting for the database is not a lost run.
        heartbeats = asyncio.create_task(self._heartbeats(job, taken_over))
        stopped = False
        try:
            raw = await self._fit(job, job_input, progress, taken_over)
            delay = self.retry_first_s
            while raw is not None and raw.get("store_outage"):
                # The store is away before the fit: nothing is wrong with the job, nothing is fitted yet.
                # The run keeps the job (heartbeats go on) and starts again once the store answers.
                if self._stopping:
                    raise Stopped
                if taken_over.is_set():
                    return  # another run has the job: nothing of this one's is recorded
                STORE_WAITS.labels(phase="load").inc()
                log.warning(
                    "artifact store unavailable before the fit; the run waits for it and starts again",
                    error=raw.get("message"),
                    delay_s=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                raw = await self._fit(job, job_input, progress, taken_over)
            if raw is not None and UNWRITTEN in raw:
                raw = await self._write_unwritten(raw)
            if raw is not None:
                await self._record(job, raw, time.monotonic() - started)
        except Stopped:
            stopped = True
        finally:
            heartbeats.cancel()
            with suppress(asyncio.CancelledError):
                await heartbeats
        if stopped:  # once no heartbeat of this run can follow: the next claim takes its run id again
            await self._release(job)

    async def _fit(
        self, job: Job, job_input: dict[str, Any], progress: Progress, taken_over: asyncio.Event
    ) -> dict[str, Any] | None:
        """The run's outcome (a TrainingResult or TrainingFailure as a dict); None when the fit process was
        lost (the job is then requeued or failed) or stopped because another run took the job over."""
        started = time.monotonic()
        fit = asyncio.ensure_future(self.trainer.train(job_input, progress))
        watch = asyncio.ensure_future(taken_over.wait())
        finished = False
        try:
            done, _ = await asyncio.wait(
                {fit, watch}, timeout=self.job_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            finished = fit in done
        finally:
            watch.cancel()
            if not finished:
                fit.cancel()
                await asyncio.wait({fit})
                if not fit.cancelled():
                    fit.exception()  # given up on: whatever it ended with is no outcome
        if finished:
            try:
                return fit.result()
            except Exception as exc:
                if self._stopping:
                    # The service's own stop closed the pool under the fit (SIGTERM: a deploy, a scale-down).
                    # Taken for a lost worker, it cost the job an attempt, and on its last one failed it as
                    # worker-lost.
                    raise Stopped from exc
                # The fit process died under us (killed, out of memory): another attempt, if allowed.
                await self._lost(job, exc, time.monotonic() - started)
                return None
        # Stopped: the fit process is killed, or it would hold its core until the fit ends.
        self.trainer.abort()
        if taken_over.is_set():
            RUNS_LET_GO.inc()
            log.warning(
                "the job was taken over by another run; its fit is stopped and the job left to that run",
                fitted_s=round(time.monotonic() - started, 1),
                stale_after_s=self.stale_after_s,
            )
            return None
        return TrainingFailure(
            reason=FailureReason.TIMEOUT,
            message=f"the run took longer than job_timeout_s={self.job_timeout_s:.0f}s and was stopped",
        ).model_dump(mode="json")

    async def _write_unwritten(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Write the files of a fitted run that the store refused (the fit kept, the keys already in the
        outcome), waiting for the store as long as it takes; the outcome without them. Raises Stopped when
        the runner stops meanwhile (the job is handed back). An error of the store that is no outage fails
        the run with artifact-store-error."""
        unwritten: list[bytes] = raw.pop(UNWRITTEN)
        store = ArtifactStore(self.artifacts_url)  # one try per write: the waiting is done here
        delay = self.retry_first_s
        for data in unwritten:
            while True:
                try:
                    await asyncio.to_thread(store.put, data)
                    break
                except Exception as exc:
                    if not is_transient(exc):
                        return TrainingFailure(
                            reason=FailureReason.ARTIFACT_STORE_ERROR,
                            message=f"the model was fitted, but the artifact store refused its files: "
                            f"{type(exc).__name__}: {exc}",
                        ).model_dump(mode="json")
                    if self._stopping:
                        raise Stopped from exc
                    STORE_WAITS.labels(phase="write").inc()
                    log.warning(
                        "artifact store unavailable after the fit; the run's files wait for it, the fit kept",
                        error=repr(exc),
                        files=len(unwritten),
                        delay_s=delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
        log.info("the run's files are written after the store's outage", files=len(unwritten))
        return raw

    async def _record(self, job: Job, raw: dict[str, Any], duration: float) -> None:
        """Complete or fail the job as the run's outcome says, once. The fit is never redone for the sake of
        recording it: an error of the infrastructure (Postgres away) is retried with the outcome in hand, and
        any other error completing it fails the job, naming the error."""
        try:
            if not raw.get("ok"):
                failure = TrainingFailure.model_validate(raw)
                await self._retried(lambda: self._fail(job, failure.reason, failure.message, duration))
                return
            try:
                await self._retried(lambda: self._complete(job, TrainingResult.model_validate(raw), duration))
            except LostOwnership:
                raise
            except (Unannounceable, EventTooLarge) as exc:
                # The outcome cannot be announced: consumers would refuse the event. Failed once, saying
                # why, rather than left running to be fitted again as a lost run.
                message = (
                    str(exc)
                    if isinstance(exc, Unannounceable)
                    else f"the trained model cannot be announced: {exc}"
                )
                await self._retried(lambda: self._fail(job, FailureReason.INVALID_SPEC, message, duration))
            except Exception as exc:
                # A bug, or a conflict in training's tables: it would fail the same way after every refit.
                log.exception("recording the completed run failed", error=repr(exc))
                message = (
                    "the model was fitted, but recording the job's outcome failed: "
                    f"{type(exc).__name__}: {exc}. This is a fault of the training service, not of the data "
                    "or the spec: look at the training logs, then ask for a retrain"
                )
                await self._retried(
                    lambda: self._fail(job, FailureReason.COMPLETION_ERROR, message, duration)
                )
        except LostOwnership:
            log.warning("job was taken over by another run; this run's outcome is dropped")

    async def _retried(self, record: Callable[[], Awaitable[None]]) -> None:
        """``record()``, again after each error of the infrastructure, backing off as ``run`` does, until it
        goes through or the runner stops (the job, left running, is then resumed as a lost run)."""
        delay = self.retry_first_s
        while True:
            try:
                await record()
                return
            except Exception as exc:
                if not is_transient(exc) or self._stopping:
                    raise
                log.warning(
                    "recording the run's outcome failed on the infrastructure; retrying, the outcome kept",
                    error=repr(exc),
                    delay_s=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _heartbeats(self, job: Job, taken_over: asyncio.Event) -> None:
        """Beat until cancelled; set ``taken_over`` and stop when a beat finds the job no longer this run's
        (another run claimed it, this one presumed dead), as completion and failure would."""
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                async with self.begin() as tx:
                    owned = await self.queue_on(tx.conn).heartbeat(job.job_id, job.run_id or "")
            except Exception as exc:  # the next beat retries; a long outage makes the job stale, as it should
                log.warning("heartbeat failed", error=repr(exc))
                continue
            if not owned:
                taken_over.set()
                return

    async def _release(self, job: Job) -> None:
        """Hand the job of a run the stop cut short back to the queue, its attempt uncounted, so that the next
        runner (another replica at once, or this service restarted) runs it. The database away at that moment
        leaves it running: resumed, as a lost run, once its heartbeat is stale."""
        assert job.run_id is not None
        try:
            async with self.begin() as tx:
                released = await self.queue_on(tx.conn).release(job.job_id, job.run_id)
        except Exception as exc:
            log.warning(
                "the job could not be handed back as the runner stops; it is resumed once its heartbeat is "
                "stale, as a lost run",
                error=repr(exc),
            )
            return
        if released:
            log.info(
                "the runner stops: the job is handed back, its attempt not counted", attempt=job.attempts
            )

    async def _lost(self, job: Job, exc: BaseException, duration: float) -> None:
        assert job.run_id is not None
        log.error("the fit process was lost", error=repr(exc), attempt=job.attempts)
        async with self.begin() as tx:
            queue = self.queue_on(tx.conn)
            if next_attempt_allowed(job.attempts, self.max_attempts):
                await queue.requeue(job.job_id, job.run_id)
                return
            message = cut_message(
                f"no fit process could be started on attempt {job.attempts} of {self.max_attempts}: {exc}"
                if isinstance(exc, FitProcessUnavailable)
                else f"the fit process died on attempt {job.attempts} of {self.max_attempts}: {exc}"
                if isinstance(exc, FitProcessDied)
                else f"the fit process died on attempt {job.attempts} of {self.max_attempts}: {exc!r}"
            )
            if await queue.fail(job.job_id, job.run_id, FailureReason.WORKER_LOST, message):
                await tx.publish(self._failed(job, FailureReason.WORKER_LOST, message, duration))
                count_outcome(tx, job.model, FailureReason.WORKER_LOST.value, duration)

    async def _fail(self, job: Job, reason: FailureReason, message: str, duration: float) -> None:
        message = cut_message(message)
        async with self.begin() as tx:
            if not await self.queue_on(tx.conn).fail(job.job_id, job.run_id, reason, message):
                raise LostOwnership(job.job_id)
            await tx.publish(self._failed(job, reason, message, duration))
            count_outcome(tx, job.model, reason.value, duration)
        log.warning("training failed", reason=reason.value, detail=message)

    async def _complete(self, job: Job, result: TrainingResult, duration: float) -> None:
        assert job.run_id is not None
        request = job.request
        async with self.begin() as tx:
            datasets = self.datasets_on(tx.conn)
            training_ref, training_event = None, None
            if result.training_set is not None:
                training_ref, training_event = await self._register_set(
                    datasets,
                    job,
                    f"{job.model}{TRAINING_SET_SUFFIX}",
                    f"training-set:{job.job_id}",
                    result.training_set,
                )
            holdout_ref, holdout_event = await self._register_set(
                datasets, job, f"{job.model}{HOLDOUT_SUFFIX}", f"holdout:{job.job_id}", result.holdout
            )
            completed = TrainingCompleted(
                job_id=job.job_id,
                run_id=job.run_id,
                model=job.model,
                artifact=result.artifact,
                profile=result.profile,
                metrics=result.metrics,
                signature=ModelSignature.model_validate(result.signature.model_dump()),
                lineage=Lineage(
                    datasets=[training_ref, *request.datasets] if training_ref else list(request.datasets),
                    holdout=holdout_ref,
                    spec_hash=job.spec_hash,
                    spec=job.spec_artifact,
                    params=result.params,
                    code_version=self.code_version,
                    parent_version=request.parent_version,
                    seed=result.seed,
                    environment=result.environment,
                ),
                train_rows=result.train_rows,
                holdout_rows=result.holdout.rows,
                duration_seconds=round(duration, 3),
                categories_seen=result.categories_seen,
            )
            announced = self._event(job, completed)
            # The signature lists every level kept of each categorical feature, and every class: measured
            # here, so the failure can say which features take the room.
            if excess := bytes_over_limit(announced, max_bytes=self.max_event_bytes):
                raise Unannounceable(
                    too_large_to_announce(
                        completed.signature, self.max_event_bytes + excess, self.max_event_bytes
                    )
                )
            if not await self.queue_on(tx.conn).complete(
                job.job_id, job.run_id, completed.model_dump(mode="json")
            ):
                raise LostOwnership(job.job_id)
            for event in (training_event, holdout_event):
                if event is not None:
                    await tx.publish(event)
            await tx.publish(announced)
            count_outcome(tx, job.model, COMPLETED, duration)
        log.info(
            "training completed",
            metrics=result.metrics,
            categories_seen=result.categories_seen or None,
            duration_s=round(duration, 2),
            train_rows=result.train_rows,
            traffic_rows=result.traffic_rows,
        )

    async def _register_set(
        self, datasets: Datasets, job: Job, name: str, source: str, materialised: MaterialisedSet
    ) -> tuple[DatasetRef, CloudEvent[Any] | None]:
        """The dataset version of a file the run wrote: an existing one with the same bytes, or a new one
        (recorded here and announced with DatasetRegistered)."""
        sha = materialised.artifact.key
        version, new = await datasets.version_for(name, sha)
        ref = DatasetRef(name=name, version=version, sha256=sha, rows=materialised.rows)
        if not new:
            return ref, None
        window = job.request.traffic_window
        registered = DatasetRegistered(
            name=name,
            dataset_version=version,
            sha256=sha,
            artifact=materialised.artifact,
            row_count=materialised.rows,
            columns=materialised.columns,
            source=source,
            derived_from=list(job.request.datasets),
            description=(
                (
                    "holdout rows"
                    if source.startswith("holdout:")
                    else "training set (before the holdout split)"
                )
                + f" of job {job.job_id}"
                + (f", with labelled traffic of window {window.id}" if window is not None else "")
            ),
        )
        await datasets.record(registered)
        return ref, self._event(job, registered)

    def _started(self, job: Job) -> TrainingStarted:
        assert job.run_id is not None
        return TrainingStarted(
            job_id=job.job_id,
            run_id=job.run_id,
            model=job.model,
            attempt=job.attempts,
            spec_hash=job.spec_hash,
            datasets=list(job.request.datasets),
        )

    def _failed(
        self, job: Job, reason: FailureReason, message: str, duration: float | None
    ) -> CloudEvent[Any]:
        failed = TrainingFailed(
            job_id=job.job_id,
            run_id=job.run_id,
            model=job.model,
            reason=reason,
            message=message,
            attempt=max(1, min(job.attempts, self.max_attempts)),
            duration_seconds=round(duration, 3) if duration is not None else None,
        )
        return self._event(job, failed)

    def _event(self, job: Job, payload: Any) -> CloudEvent[Any]:
        return new_event(payload, source=self.source, cause=request_event(job))


MESSAGE_MAX_CHARS = 10_000
"""The longest failure message a TrainingFailed carries (and the job keeps)."""


def cut_message(message: str) -> str:
    """``message``, or its first :data:`MESSAGE_MAX_CHARS` characters and how long it was. A fit error's
    message is its exception's text, which may quote what it read (every column, a value): one of megabytes
    made the TrainingFailed larger than consumers take, so it was never published, and the job, left
    running, was fitted again until it failed as worker-lost."""
    if len(message) <= MESSAGE_MAX_CHARS:
        return message
    return f"{message[:MESSAGE_MAX_CHARS]}… (cut: {len(message):,} characters in all)"


def request_event(job: Job) -> CloudEvent[TrainingRequested]:
    """The job's TrainingRequested as an event, so the job's events join its cascade."""
    e = job.request_event
    return CloudEvent[TrainingRequested](
        id=e.id,
        source=e.source,
        type=e.type,
        subject=e.subject,
        correlationid=e.correlationid,
        causationid=e.causationid,
        actor=e.actor,
        data=job.request,
    )
