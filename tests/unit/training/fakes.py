"""In-memory fakes of training's ports, and a harness wiring the handlers and the job runner to them."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from contracts.common import ArtifactFormat, ArtifactRef
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent
from contracts.models import AppliedStageChange
from contracts.registry import EVENT_TYPES
from contracts.training import FailureReason
from libs.artifacts import ArtifactStore
from libs.bus import InMemoryBus, Subscription, Transaction
from libs.bus.core import encode_outgoing
from libs.modelspec import ModelSpec
from services.training.bootstrap import TOPICS
from services.training.domain import BUDGET_WINDOW, JobPosition, JobState, PolicyState, run_id_for
from services.training.handlers import HANDLERS
from services.training.ports import DatasetRecord, Job, Progress, StoredSpec
from services.training.runner import JobRunner
from services.training.worker import run_training


class FakeClock:
    """A clock the test moves."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FakeSpecs:
    def __init__(self, clock: FakeClock) -> None:
        self.by_model: dict[str, StoredSpec] = {}
        self.clock = clock

    async def get(self, model: str) -> StoredSpec | None:
        return self.by_model.get(model)

    async def put(self, spec: ModelSpec, artifact: ArtifactRef, *, actor: str | None) -> StoredSpec:
        # Kept as the table keeps it (JSON) and read back as PgSpecs reads it.
        kept = ModelSpec.from_stored(spec.model_dump(mode="json"))
        stored = StoredSpec(spec.name, kept, spec.spec_hash(), artifact, actor, self.clock())
        self.by_model[spec.name] = stored
        return stored

    async def models_for_dataset(self, name: str) -> list[str]:
        return sorted(m for m, s in self.by_model.items() if name in s.spec.base_datasets)


class FakeDatasets:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], DatasetRecord] = {}

    async def record(self, event: DatasetRegistered) -> bool:
        key = (event.name, event.dataset_version)
        if key in self.rows:
            return False
        self.rows[key] = DatasetRecord(
            event.name,
            event.dataset_version,
            event.sha256,
            event.artifact,
            event.row_count,
            dict(event.columns),
            event.source,
            list(event.models),
        )
        return True

    async def latest(self, name: str) -> DatasetRecord | None:
        versions = [r for (n, _), r in self.rows.items() if n == name]
        return max(versions, key=lambda r: r.version) if versions else None

    async def get(self, name: str, version: int) -> DatasetRecord | None:
        return self.rows.get((name, version))

    async def version_for(self, name: str, sha256: str) -> tuple[int, bool]:
        same = [r.version for (n, _), r in self.rows.items() if n == name and r.sha256 == sha256]
        if same:
            return min(same), False
        return max([v for (n, v) in self.rows if n == name], default=0) + 1, True


class FakeProduction:
    def __init__(self) -> None:
        self.by_model: dict[str, int] = {}
        self.changes: dict[str, AppliedStageChange] = {}

    async def get(self, model: str) -> int | None:
        return self.by_model.get(model)

    async def set(self, model: str, version: int) -> None:
        self.by_model[model] = version

    async def clear(self, model: str, version: int) -> None:
        if self.by_model.get(model) == version:
            del self.by_model[model]

    async def last_change(self, model: str) -> AppliedStageChange | None:
        return self.changes.get(model)

    async def keep_change(self, model: str, change: AppliedStageChange) -> None:
        self.changes[model] = change


@dataclass
class FakeJobs:
    """Jobs and JobQueue in memory; ``stale`` marks running jobs as presumed dead. ``clock``: the store's,
    as Postgres' is PgJobs'."""

    clock: FakeClock
    rows: dict[str, Job] = field(default_factory=dict)
    dispatched: list[str] = field(default_factory=list)
    stale: set[str] = field(default_factory=set)

    async def now(self) -> datetime:
        return self.clock()

    async def policy_state(self, model: str, now: datetime) -> PolicyState:
        mine = [j for j in self.rows.values() if j.model == model]
        flight = [j.job_id for j in mine if j.state in (JobState.REQUESTED, JobState.RUNNING)]
        done = [j.finished_at for j in mine if j.state is JobState.COMPLETED and j.finished_at]
        recent = [j.created_at for j in mine if j.created_at > now - BUDGET_WINDOW]
        return PolicyState(
            in_flight_job_id=flight[0] if flight else None,
            last_completed_at=max(done) if done else None,
            jobs_last_24h=len(recent),
            oldest_job_last_24h_at=min(recent) if recent else None,
        )

    async def create(self, job: Job) -> None:
        assert job.job_id not in self.rows
        self.rows[job.job_id] = job

    async def dispatch(self, job: Job) -> bool:
        if (
            job.job_id not in self.rows
            and (await self.policy_state(job.model, self.clock())).in_flight_job_id
        ):
            return False  # not recorded: the partial unique index jobs_one_in_flight, ON CONFLICT DO NOTHING
        self.rows.setdefault(job.job_id, job)
        if self.rows[job.job_id].dispatched_at is not None:
            return False
        self._update(job.job_id, dispatched_at=self.clock())
        self.dispatched.append(job.job_id)
        return True

    async def get(self, job_id: str) -> Job | None:
        return self.rows.get(job_id)

    async def for_model(self, model: str, *, limit: int, after: JobPosition | None = None) -> list[Job]:
        listed = sorted(
            (j for j in self.rows.values() if j.model == model),
            key=lambda j: (j.created_at, j.job_id),
            reverse=True,
        )
        if after is not None:
            listed = [j for j in listed if (j.created_at, j.job_id) < (after.created_at, after.job_id)]
        return listed[:limit]

    async def claim_next(self, *, stale_after_s: float) -> Job | None:
        for job in sorted(self.rows.values(), key=lambda j: j.created_at):
            runnable = job.state is JobState.REQUESTED and job.dispatched_at is not None
            if runnable or (job.state is JobState.RUNNING and job.job_id in self.stale):
                self.stale.discard(job.job_id)
                attempt = job.attempts + 1
                return self._update(
                    job.job_id,
                    state=JobState.RUNNING,
                    attempts=attempt,
                    run_id=run_id_for(job.job_id, attempt),
                    heartbeat_at=self.clock(),
                )
        return None

    async def heartbeat(self, job_id: str, run_id: str) -> bool:
        job = self.rows[job_id]
        if job.run_id != run_id or job.state is not JobState.RUNNING:
            return False
        self._update(job_id, heartbeat_at=self.clock())
        return True

    async def complete(self, job_id: str, run_id: str, result: dict[str, Any]) -> bool:
        job = self.rows[job_id]
        if job.run_id != run_id or job.state is not JobState.RUNNING:
            return False
        self._update(job_id, state=JobState.COMPLETED, finished_at=self.clock(), result=result)
        return True

    async def fail(self, job_id: str, run_id: str | None, reason: FailureReason, message: str) -> bool:
        job = self.rows[job_id]
        if job.state not in (JobState.REQUESTED, JobState.RUNNING) or (run_id and job.run_id != run_id):
            return False
        self._update(
            job_id,
            state=JobState.FAILED,
            finished_at=self.clock(),
            failure_reason=reason.value,
            failure_message=message,
        )
        return True

    async def requeue(self, job_id: str, run_id: str) -> bool:
        job = self.rows[job_id]
        if job.run_id != run_id or job.state is not JobState.RUNNING:
            return False
        self._update(job_id, state=JobState.REQUESTED, heartbeat_at=None)
        return True

    async def release(self, job_id: str, run_id: str) -> bool:
        job = self.rows[job_id]
        if job.run_id != run_id or job.state is not JobState.RUNNING:
            return False
        self._update(job_id, state=JobState.REQUESTED, heartbeat_at=None, attempts=job.attempts - 1)
        return True

    def _update(self, job_id: str, **changes: Any) -> Job:
        self.rows[job_id] = dataclasses.replace(self.rows[job_id], **changes)
        return self.rows[job_id]


class FakeSpecStore:
    """Canonical specs in a real artifact store (a temporary folder): the fit process reads them back."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    async def put_spec(self, spec: ModelSpec) -> ArtifactRef:
        stored = self.store.put(spec.canonical_json())
        return ArtifactRef(
            key=stored.sha256, uri=stored.uri, format=ArtifactFormat.JSON, size_bytes=stored.size
        )


class InProcessTrainer:
    """The Trainer port without a process pool: the same worker function, called directly."""

    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.die_next: BaseException | None = None
        self.job_overrides: dict[str, Any] = {}
        """Fields of every run's input set here (the store's tries and waits, for tests of an outage)."""

    async def train(self, job_input: dict[str, Any], progress: Progress) -> dict[str, Any]:
        self.runs.append(job_input)
        await progress("loading-data", 0.0)
        if self.die_next is not None:
            exc, self.die_next = self.die_next, None
            raise exc
        return run_training({**job_input, **self.job_overrides})

    def abort(self) -> None:
        return None


class Harness:
    """Training's handlers on an in-memory bus and its job runner, all on fakes."""

    def __init__(self, artifacts: str, *, max_attempts: int = 3) -> None:
        self.clock = FakeClock()
        self.store = ArtifactStore(artifacts)
        self.specs = FakeSpecs(self.clock)
        self.datasets = FakeDatasets()
        self.jobs = FakeJobs(self.clock)
        self.production = FakeProduction()
        self.spec_store = FakeSpecStore(self.store)
        self.bus = InMemoryBus(EVENT_TYPES)
        self.trainer = InProcessTrainer()

        def bind(handler: Any) -> Any:
            async def run(event: CloudEvent[Any], tx: Transaction) -> None:
                await handler(event, **self.ports(tx.publish))

            return run

        self.bus.subscribe(
            Subscription(
                consumer="training",
                topics=list(TOPICS),
                handlers={payload: bind(h) for payload, h in HANDLERS.items()},
            )
        )
        self.artifacts = artifacts
        self.max_attempts = max_attempts
        self.runner = self.new_runner()

    def new_runner(self) -> JobRunner:
        """A job runner on these fakes and the in-process trainer: the harness's own, or a restarted
        service's."""
        return JobRunner(
            begin=self._begin,
            queue_on=lambda _conn: self.jobs,
            datasets_on=lambda _conn: self.datasets,
            trainer=self.trainer,
            artifacts_url=self.artifacts,
            source="/driftloop/training",
            code_version="test",
            max_attempts=self.max_attempts,
            progress_interval_s=0.0,
            max_event_bytes=self.bus.max_event_bytes,
        )

    def ports(self, publish: Any) -> dict[str, Any]:
        return {
            "specs": self.specs,
            "datasets": self.datasets,
            "jobs": self.jobs,
            "production": self.production,
            "spec_store": self.spec_store,
            "publish": publish,
            "source": "/driftloop/training",
        }

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[_Tx]:
        """The runner's transaction, as on Postgres: an event consumers would refuse as oversized is refused
        when published, and a block that raises leaves the jobs and datasets as they were."""
        tx = _Tx(self.bus.max_event_bytes)
        jobs, datasets = dict(self.jobs.rows), dict(self.datasets.rows)
        try:
            yield tx
        except BaseException:
            self.jobs.rows, self.datasets.rows = jobs, datasets
            raise
        for event in tx.published:
            await self.bus.publish(event)
        for callback in tx.committed:
            callback()

    async def run_jobs(self) -> int:
        """Deliver everything, run every runnable job, deliver what they published; returns jobs run."""
        ran = 0
        await self.bus.drain()
        while await self.runner.run_once():
            ran += 1
            await self.bus.drain()
        return ran

    def events(self, of: type[Any]) -> list[CloudEvent[Any]]:
        return self.bus.events(of=of)


@dataclass
class _Tx:
    max_event_bytes: int
    conn: Any = None
    published: list[CloudEvent[Any]] = field(default_factory=list)
    committed: list[Callable[[], None]] = field(default_factory=list)

    async def publish(self, event: CloudEvent[Any]) -> None:
        encode_outgoing(event, max_bytes=self.max_event_bytes)
        self.published.append(event)

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.committed.append(callback)
