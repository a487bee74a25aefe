"""What the registry's handlers and core functions need from the world, as Protocols.

The Postgres adapters (``adapters/postgres.py``) implement them inside one transaction; unit tests use
in-memory fakes (``tests/unit/registry/fakes.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from contracts.common import ArtifactRef, ModelSignature, Stage
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent
from contracts.training import TrainingCompleted
from contracts.validation import ValidationFailed, ValidationPassed
from services.registry.schemas import DatasetPublic, ModelPublic, VersionPublic, VersionSummaryPublic

Publish = Callable[[CloudEvent[Any]], Awaitable[None]]


@dataclass(frozen=True)
class RegisteredRun:
    """The version a training run became."""

    version: int
    artifact_key: str
    profile_key: str


@dataclass(frozen=True)
class Cause:
    """The event behind a change, as the stage history records it."""

    event_id: str
    event_type: str
    actor: str | None
    source: str
    correlation_id: str

    @classmethod
    def of(cls, event: CloudEvent[Any]) -> Cause:
        """The cause record of an event."""
        return cls(event.id, event.type, event.actor, event.source, event.correlationid)


@dataclass(frozen=True)
class LastMove:
    """The latest change of a version's stage, as its history records it."""

    from_stage: Stage | None
    to_stage: Stage
    event_type: str


class Versions(Protocol):
    """Model versions, their stages, aliases and validation reports (one open transaction)."""

    async def find_run(self, model: str, run_id: str) -> RegisteredRun | None:
        """The version a run already became, if any."""
        ...

    async def register(self, completed: TrainingCompleted, cause: Cause) -> int:
        """Create the next version of the model at stage candidate, with lineage; returns its number."""
        ...

    async def stage_for_update(self, model: str, version: int) -> Stage | None:
        """The version's stage, locked until the transaction ends; None when there is no such version."""
        ...

    async def versions_in(self, model: str, stage: Stage) -> list[int]:
        """Versions of a model currently in ``stage``."""
        ...

    async def lock_stages(self, model: str) -> None:
        """Hold the model's stages until the transaction ends: another change of any of its versions waits
        (each :meth:`move` takes this lock too), so what is read in a stage after it stays true."""
        ...

    async def move(
        self, model: str, version: int, from_stage: Stage, to_stage: Stage, reason: str, cause: Cause
    ) -> int:
        """Set the stage and append the change to the history; returns the change's number among the
        model's stage changes (1, 2, ...: ``ModelStageChanged.sequence``)."""
        ...

    async def last_move(self, model: str, version: int) -> LastMove | None:
        """The latest entry of the version's stage history (its registration when it never moved)."""
        ...

    async def take_alias(self, model: str, alias: str, version: int, cause: Cause) -> None:
        """Point ``alias`` at ``version`` (moving it from whichever version held it)."""
        ...

    async def drop_aliases(self, model: str, version: int, aliases: tuple[str, ...]) -> None:
        """Remove these aliases from the version, if it holds them."""
        ...

    async def aliases_of(self, model: str, version: int) -> list[str]:
        """Aliases the version holds, sorted."""
        ...

    async def report_verdict(self, model: str, version: int, report_id: str) -> str | None:
        """``passed`` or ``failed``: the outcome of the version's validation report of this id, or None when
        the version holds no such report."""
        ...

    async def record_validation(self, report: ValidationPassed | ValidationFailed, cause: Cause) -> None:
        """Keep a validation outcome for the version page and the model card."""
        ...

    async def model_exists(self, model: str) -> bool:
        """Whether the model has at least one version."""
        ...

    async def latest_signature(self, model: str) -> tuple[int, ModelSignature] | None:
        """The newest version's number and signature."""
        ...

    async def set_tag(self, model: str, version: int, key: str, value: str, actor: str) -> str | None:
        """Set (or replace) a tag on a version; the value it had, or None."""
        ...

    async def delete_tag(self, model: str, version: int, key: str) -> str | None:
        """Remove a tag; the value it had, or None when it was not set."""
        ...


class Datasets(Protocol):
    """Dataset versions (one open transaction)."""

    async def get(self, name: str, version: int) -> DatasetPublic | None:
        """One dataset version."""
        ...

    async def with_content(self, name: str, sha256: str) -> DatasetPublic | None:
        """The version of ``name`` whose file has this hash, if any."""
        ...

    async def lock_name(self, name: str) -> None:
        """Hold the lock on ``name`` until commit: whatever adds a version of it waits for the others."""
        ...

    async def next_version(self, name: str) -> int:
        """The number the next version of ``name`` gets (under :meth:`lock_name`)."""
        ...

    async def add(self, registered: DatasetRegistered, *, event_id: str, actor: str | None) -> None:
        """Record a dataset version."""
        ...

    async def named_for(self, model: str) -> bool:
        """Whether some dataset says it is meant for ``model``."""
        ...


class Artifacts(Protocol):
    """The content-addressed artifact store."""

    async def check_model(self, key: str) -> int:
        """Verify the hash and that the blob is a skops file of trusted types, without loading it."""
        ...

    async def verify(self, key: str) -> int:
        """Verify the hash of a stored artifact; returns its size."""
        ...

    async def size(self, key: str) -> int | None:
        """The stored file's size, from the store's metadata: nothing of it is read or hashed; None when the
        store keeps none (only a read would tell)."""
        ...

    async def put(self, data: bytes) -> ArtifactRef:
        """Store bytes (as Parquet: the registry stores only canonical dataset files)."""
        ...

    def uri(self, key: str) -> str:
        """The URI the store gives the file of ``key`` (its ArtifactRef's), stored or not; nothing is read."""
        ...

    def stream(self, key: str) -> Iterator[bytes]:
        """The artifact's chunks; the hash is checked again at the end."""
        ...


class Queries(Protocol):
    """The read side of the HTTP API."""

    async def models(
        self,
        *,
        prefix: str | None,
        stage: Stage | None,
        tag: tuple[str, str | None] | None,
        after: str | None,
        limit: int,
    ) -> list[ModelPublic]:
        """Models by name, after ``after``."""
        ...

    async def versions(
        self,
        *,
        model: str | None,
        prefix: str | None,
        stage: Stage | None,
        tag: tuple[str, str | None] | None,
        after: tuple[str, int] | None,
        limit: int,
    ) -> list[VersionSummaryPublic]:
        """Versions by (model, version descending), after ``after``."""
        ...

    async def version(self, model: str, version: int) -> VersionPublic | None:
        """One version with lineage, history and reports."""
        ...

    async def version_by_alias(self, model: str, alias: str) -> int | None:
        """The version an alias points at."""
        ...

    async def model(self, name: str) -> ModelPublic | None:
        """One model."""
        ...

    async def datasets(
        self, *, prefix: str | None, model: str | None, after: tuple[str, int] | None, limit: int
    ) -> list[DatasetPublic]:
        """Dataset versions by (name, version descending), after ``after``."""
        ...
