"""A store outage is never the job's fault: a run that finds the artifact store still failing after its own
tries is not failed. Before the fit it waits and starts again, keeping its job, run and attempt; after the
fit the runner writes the files the store refused, waiting as long as it takes, and the fit is kept."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest

from contracts.training import TrainingCompleted, TrainingFailed, TrainingStarted
from libs.artifacts import ArtifactStore
from services.training.adapters.pool import ProcessPoolTrainer
from services.training.domain import JobState
from services.training.ports import Progress
from services.training.runner import STORE_WAITS
from services.training.worker import UNWRITTEN, run_training
from tests.unit.store_fakes import FlakyStore
from tests.unit.training.data import churn_frame, churn_spec, put_frame
from tests.unit.training.fakes import Harness
from tests.unit.training.test_handlers import requested_job
from tests.waiting import eventually

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATTEMPTS = 2
"""The store's own tries of one read or write, in these tests (5 in the service)."""


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    h = Harness(str(tmp_path / "artifacts"))
    h.trainer.job_overrides = {"store_attempts": ATTEMPTS, "store_retry_backoff_s": 0}
    h.runner.retry_first_s = 0.0
    return h


def waits(phase: str) -> float:
    return STORE_WAITS.labels(phase=phase)._value.get()


async def test_a_store_away_longer_than_its_tries_before_the_fit_is_waited_for_and_the_job_completes(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await requested_job(harness)
    [base] = [d for d in harness.datasets.rows.values() if d.name == "churn-base"]
    flaky = FlakyStore(monkeypatch)
    flaky.failing_reads[base.sha256] = 3 * ATTEMPTS  # three runs' worth of tries, then the store is back
    before = waits("load")
    assert await harness.runner.run_once()
    await harness.bus.drain()
    assert harness.events(TrainingFailed) == []
    [started] = harness.events(TrainingStarted)
    [completed] = harness.events(TrainingCompleted)
    assert started.data.attempt == 1 and completed.data.run_id == started.data.run_id
    assert len(harness.trainer.runs) == 4
    assert flaky.reads[base.sha256] == 3 * ATTEMPTS + 1
    assert waits("load") - before == 3


async def test_a_runner_stopped_while_it_waits_for_the_store_hands_its_job_back_uncounted(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Left running, the job was resumed only once its heartbeat went stale, as a lost run: one attempt more.
    await requested_job(harness)
    [base] = [d for d in harness.datasets.rows.values() if d.name == "churn-base"]
    flaky = FlakyStore(monkeypatch)
    flaky.failing_reads[base.sha256] = 10**6  # away for as long as the test runs
    harness.runner.retry_first_s = 0.01
    before = waits("load")

    async def waiting() -> bool:
        return waits("load") > before

    running = asyncio.create_task(harness.runner.run())
    await eventually(waiting, interval_s=0.01)
    harness.runner.stop()
    await asyncio.wait_for(running, timeout=10.0)  # a bound, not a measure
    await harness.bus.drain()

    assert harness.events(TrainingFailed) == []
    [started] = harness.events(TrainingStarted)
    job = harness.jobs.rows[started.data.job_id]
    assert (job.state, job.attempts) == (JobState.REQUESTED, 0)


async def test_a_store_away_after_the_fit_is_waited_for_and_the_fit_kept(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await requested_job(harness)
    flaky = FlakyStore(monkeypatch)
    # Every try of the fit process's first write fails (the store is then taken for down: its other files
    # are kept without trying), and the runner's first three tries too.
    flaky.failing_writes = ATTEMPTS + 3
    before = waits("write")
    assert await harness.runner.run_once()
    await harness.bus.drain()
    assert harness.events(TrainingFailed) == []
    [completed] = harness.events(TrainingCompleted)
    assert len(harness.trainer.runs) == 1  # fitted once
    assert waits("write") - before == 3
    store = ArtifactStore(harness.store.url)
    assert completed.data.lineage.holdout is not None
    holdout = completed.data.lineage.holdout.sha256
    for key in (completed.data.artifact.key, completed.data.profile.key, holdout):
        assert store.get(key)


def test_the_fit_process_keeps_the_files_the_store_refuses_and_hands_them_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(str(tmp_path))
    spec = churn_spec()
    raw = {
        "job_id": "job-kept",
        "model": spec.name,
        "spec_key": store.put(spec.canonical_json()).sha256,
        "datasets": [{"name": "churn-base", "version": 1, "sha256": put_frame(store, churn_frame()).key}],
        "artifacts_url": str(tmp_path),
        "store_attempts": ATTEMPTS,
        "store_retry_backoff_s": 0,
    }
    flaky = FlakyStore(monkeypatch)
    flaky.failing_writes = 1_000
    outcome = run_training(raw)
    assert outcome["ok"], outcome
    kept = outcome[UNWRITTEN]
    assert flaky.failing_writes == 1_000 - ATTEMPTS  # one write tried, the others kept without trying
    keys = {hashlib.sha256(data).hexdigest() for data in kept}
    files = {outcome["artifact"]["key"], outcome["profile"]["key"], outcome["holdout"]["artifact"]["key"]}
    assert files <= keys


class PoolTrainer:
    """The service's fit process pool (spawned), with the store's tries of these tests."""

    def __init__(self) -> None:
        self.pool = ProcessPoolTrainer("spawn", poll_s=0.05)
        self.runs = 0

    async def train(self, job_input: dict[str, Any], progress: Progress) -> dict[str, Any]:
        self.runs += 1
        overrides = {"store_attempts": ATTEMPTS, "store_retry_backoff_s": 0}
        return await self.pool.train({**job_input, **overrides}, progress)

    def abort(self) -> None:
        self.pool.abort()


async def test_files_a_fit_process_could_not_write_cross_to_the_runner_and_are_written_once_the_store_is_back(
    harness: Harness,
) -> None:
    # The store's staging folder is a file: every write fails (an OSError) while reads still work. The fit
    # process hands the files over with its outcome; the runner writes them once the folder is back.
    await requested_job(harness)
    trainer = PoolTrainer()
    harness.runner.trainer = trainer
    staging = Path(harness.store.root) / "tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.write_bytes(b"not a folder")
    before = waits("write")

    async def waited_twice() -> bool:
        return waits("write") - before >= 2

    async def store_back() -> None:
        await eventually(waited_twice, deadline_s=120, interval_s=0.05)
        staging.unlink()

    try:
        back = asyncio.create_task(store_back())
        assert await harness.runner.run_once()
        await back
    finally:
        trainer.pool.close()
    await harness.bus.drain()
    assert harness.events(TrainingFailed) == []
    [completed] = harness.events(TrainingCompleted)
    assert trainer.runs == 1
    assert completed.data.lineage.holdout is not None
    holdout = completed.data.lineage.holdout.sha256
    for key in (completed.data.artifact.key, completed.data.profile.key, holdout):
        assert harness.store.get(key)


async def test_the_runner_listens_again_before_each_look_and_a_failure_to_is_retried(
    harness: Harness,
) -> None:
    # The LISTEN that wakes the runner was made once, at start: after Postgres closed its connection the
    # runner found jobs by its poll alone until it restarted. Now it is made sure of before each look; made
    # anew, the runner looks at once, and a failure to listen (Postgres away) is retried as any round's.
    calls: list[str] = []

    async def listen() -> bool:
        calls.append("listen")
        if len(calls) == 1:
            raise ConnectionRefusedError("the database is away")
        return len(calls) == 2

    harness.runner.listen = listen
    harness.runner.retry_first_s = 0.01
    await requested_job(harness)

    async def started() -> bool:
        return bool(harness.events(TrainingStarted))

    running = asyncio.create_task(harness.runner.run())
    await eventually(started, interval_s=0.01)
    harness.runner.stop()
    await asyncio.wait_for(running, timeout=10.0)  # a bound, not a measure
    assert calls[:2] == ["listen", "listen"]


async def test_a_job_dispatched_during_a_look_that_found_none_is_looked_for_at_once(harness: Harness) -> None:
    # The wake-up was cleared after the look: a NOTIFY that came during a look finding nothing was cleared
    # with it, and its job waited runner_poll_s.
    runner = harness.runner
    runner.poll_s = 3600.0
    looks: list[int] = []

    async def look() -> bool:
        looks.append(len(looks))
        if len(looks) == 1:
            runner.wake()  # a job dispatched while this look ran, after it read the queue
        return False

    runner.run_once = look  # type: ignore[method-assign]

    async def looked_again() -> bool:
        return len(looks) >= 2

    running = asyncio.create_task(runner.run())
    try:
        await eventually(looked_again, deadline_s=10.0, interval_s=0.01)
    finally:
        runner.stop()
        await asyncio.wait_for(running, timeout=10.0)  # a bound, not a measure
