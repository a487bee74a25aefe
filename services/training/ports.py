"""What training's handlers and job runner need from the world, as Protocols (Postgres and the artifact
store implement them in adapters/, fakes in the unit tests)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from contracts.common import ArtifactRef, DatasetRef
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent
from contracts.training import FailureReason, TrainingRequested
from libs.modelspec import ModelSpec
from libs.stage_order import StageChangesApplied
from services.training.domain import JobPosition, JobState, PolicyState

Publish = Callable[[CloudEvent[Any]], Awaitable[None]]


@dataclass(frozen=True)
class StoredSpec:
    """A model's current spec, with where its canonical JSON is stored."""

    model: str
    spec: ModelSpec
    spec_hash: str
    artifact: ArtifactRef
    registered_by: str | None
    registered_at: datetime


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset version training knows of."""

    name: str
    version: int
    sha256: str
    artifact: ArtifactRef
    row_count: int
    columns: dict[str, str]
    source: str
    models: list[str]

    def ref(self) -> DatasetRef:
        """This version pinned by hash, for requests and lineage."""
        return DatasetRef(name=self.name, version=self.version, sha256=self.sha256, rows=self.row_count)


@dataclass(frozen=True)
class RequestEnvelope:
    """The CloudEvents attributes of a job's TrainingRequested, so the job's later events join its cascade."""

    id: str
    source: str
    type: str
    correlationid: str
    causationid: str | None
    actor: str | None
    subject: str | None


@dataclass(frozen=True)
class Job:
    """One training job as stored."""

    job_id: str
    model: str
    state: JobState
    trigger: str
    request: TrainingRequested
    request_event: RequestEnvelope
    spec_hash: str
    spec_artifact: ArtifactRef
    attempts: int
    run_id: str | None
    created_at: datetime
    dispatched_at: datetime | None = None
    heartbeat_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    failure_reason: str | None = None
    failure_message: str | None = None
    result: dict[str, Any] | None = None


class Specs(Protocol):
    """The models' specs."""

    async def get(self, model: str) -> StoredSpec | None:
        """The model's current spec, or None."""
        ...

    async def put(self, spec: ModelSpec, artifact: ArtifactRef, *, actor: str | None) -> StoredSpec:
        """Make ``spec`` the model's current spec."""
        ...

    async def models_for_dataset(self, name: str) -> list[str]:
        """Models whose spec names the dataset as base data."""
        ...


class Datasets(Protocol):
    """Dataset versions seen on the datasets topic (and the ones training materialises)."""

    async def record(self, event: DatasetRegistered) -> bool:
        """Remember a version; False when it was known already."""
        ...

    async def latest(self, name: str) -> DatasetRecord | None:
        """The newest version of a dataset, or None."""
        ...

    async def get(self, name: str, version: int) -> DatasetRecord | None:
        """One version, or None."""
        ...

    async def version_for(self, name: str, sha256: str) -> tuple[int, bool]:
        """The version a file gets under ``name``: the existing one with the same hash (and False), or the
        next free number (and True)."""
        ...


class ProductionVersions(StageChangesApplied, Protocol):
    """Which version of each model serves in production (the parent of the next one)."""

    async def get(self, model: str) -> int | None:
        """The production version, or None before the first promotion."""
        ...

    async def set(self, model: str, version: int) -> None:
        """``version`` is now in production."""
        ...

    async def clear(self, model: str, version: int) -> None:
        """``version`` left production (if it was the one recorded)."""
        ...


class Jobs(Protocol):
    """Training jobs and their state."""

    async def now(self) -> datetime:
        """The jobs' clock (Postgres'), which stamps when a job finishes: a job's creation and the policy's
        cooldown and daily budget are timed on it too. Timed on the clock of the replica taking a trigger,
        one an hour ahead of the database's skipped a 30-minute cooldown at once, and one behind held it
        longer by as much."""
        ...

    async def policy_state(self, model: str, now: datetime) -> PolicyState:
        """What the retrain policy needs at ``now`` (:meth:`now`): the job in flight, the last completion,
        the 24 h before ``now``."""
        ...

    async def create(self, job: Job) -> None:
        """Insert a new job in state requested."""
        ...

    async def dispatch(self, job: Job) -> bool:
        """Mark a job runnable (inserting it if this store has not seen it) and wake the runner;
        False when the job was dispatched before."""
        ...

    async def get(self, job_id: str) -> Job | None:
        """One job, or None."""
        ...

    async def for_model(self, model: str, *, limit: int, after: JobPosition | None = None) -> list[Job]:
        """The model's jobs newest first (by created_at, then job_id), those after ``after`` only."""
        ...


class JobQueue(Protocol):
    """The job runner's view of the jobs: claim, heartbeat, finish; every change conditional on the run."""

    async def claim_next(self, *, stale_after_s: float) -> Job | None:
        """Take a dispatched requested job, or a running one whose heartbeat is stale: state running, one
        more attempt, a new run id. None when there is nothing to do."""
        ...

    async def heartbeat(self, job_id: str, run_id: str) -> bool:
        """Refresh the heartbeat; False when the run no longer owns the job."""
        ...

    async def complete(self, job_id: str, run_id: str, result: dict[str, Any]) -> bool:
        """running -> completed for this run only; False when the run no longer owns the job."""
        ...

    async def fail(self, job_id: str, run_id: str | None, reason: FailureReason, message: str) -> bool:
        """-> failed (for this run, when given); False when the job is finished or owned by another run."""
        ...

    async def requeue(self, job_id: str, run_id: str) -> bool:
        """running -> requested, for a run whose process died while the attempt limit allows another."""
        ...

    async def release(self, job_id: str, run_id: str) -> bool:
        """running -> requested with the run's attempt given back (the next claim is that attempt again, with
        the same run id), for a run its own service stopped: a stop is no lost worker. False when the run no
        longer owns the job."""
        ...


class SpecStore(Protocol):
    """Where canonical specs are stored for other services to read."""

    async def put_spec(self, spec: ModelSpec) -> ArtifactRef:
        """Store the canonical JSON; returns its artifact (key = spec hash)."""
        ...


Progress = Callable[[str, float | None], Awaitable[None]]


class FitProcessUnavailable(Exception):
    """No fit process could be started for a run (the fork server gone, a pool broken before the run, with a
    new pool too): the run never began."""


class FitProcessDied(Exception):
    """The run's fit process ended under it, by a signal the service did not send or an exit; the message
    says how (a SIGKILL: most often the kernel's OOM killer) and what to look at."""


class Trainer(Protocol):
    """Runs one training off the event loop and reports its phases."""

    async def train(self, job_input: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Run :func:`services.training.worker.run_training` on ``job_input``; returns its outcome. Raises
        FitProcessUnavailable when no process could take the run, FitProcessDied when its process ended and
        how is known, anything else when it died otherwise."""
        ...

    def abort(self) -> None:
        """Stop the run in progress (timeout); the next train starts a fresh process."""
        ...
