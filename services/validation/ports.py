"""What validation's handlers need from the world, as Protocols (Postgres and the artifact store implement
them in adapters/, fakes in the unit tests)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from contracts.common import ArtifactRef, DatasetRef, Lineage, ModelSignature
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent
from contracts.models import ModelVersionRegistered
from contracts.validation import CheckResult
from libs.modelspec import ValidationSpec
from libs.stage_order import StageChangesApplied
from services.validation.domain import ChampionUnloadable, Measured

Publish = Callable[[CloudEvent[Any]], Awaitable[None]]

AfterCommit = Callable[[Callable[[], None]], None]
"""Call a callback once the delivery's transaction has committed, never if it rolls back
(:meth:`libs.bus.Transaction.after_commit`): for the counts and error lines that stand for one judged
candidate, though the handler may run more than once for it."""


@dataclass(frozen=True)
class VersionRecord:
    """A registered model version as validation keeps it."""

    model: str
    version: int
    artifact: ArtifactRef
    signature: ModelSignature
    metrics: dict[str, float]
    lineage: Lineage


@dataclass(frozen=True)
class Report:
    """One validation report."""

    report_id: str
    model: str
    version: int
    passed: bool
    checks: list[CheckResult]
    failed_checks: list[str]
    champion_version: int | None
    holdout: DatasetRef | None
    duration_seconds: float
    event_id: str
    created_at: datetime | None = None


@dataclass(frozen=True)
class Evaluation:
    """What to measure: the candidate, its champion (if any) and the holdout, all by artifact."""

    candidate: ArtifactRef
    signature: ModelSignature
    holdout: ArtifactRef
    spec: ValidationSpec
    seed: int
    champion: ArtifactRef | None = None
    champion_signature: ModelSignature | None = None


class EvaluationError(Exception):
    """Something needed for the measurement cannot be read; ``check`` names the failing check, and
    ``champion_unloadable`` why the champion's model could not be loaded, when that was found before."""

    def __init__(
        self, check: str, message: str, *, champion_unloadable: ChampionUnloadable | None = None
    ) -> None:
        super().__init__(message)
        self.check = check
        self.message = message
        self.champion_unloadable = champion_unloadable


class Versions(Protocol):
    """Registered versions."""

    async def record(self, registered: ModelVersionRegistered) -> None:
        """Remember a version (idempotent)."""
        ...

    async def get(self, model: str, version: int) -> VersionRecord | None:
        """One version, or None."""
        ...


class Champions(StageChangesApplied, Protocol):
    """The production version of each model."""

    async def get(self, model: str) -> int | None:
        """The champion, or None before the first promotion."""
        ...

    async def set(self, model: str, version: int) -> None:
        """``version`` is now in production."""
        ...

    async def clear(self, model: str, version: int) -> None:
        """``version`` left production (if it was the champion)."""
        ...


class Datasets(Protocol):
    """Dataset versions, to find a holdout's file."""

    async def record(self, registered: DatasetRegistered) -> None:
        """Remember a version (idempotent)."""
        ...

    async def artifact(self, ref: DatasetRef) -> ArtifactRef | None:
        """The file of a dataset version, or None when unknown."""
        ...


class Reports(Protocol):
    """Validation reports."""

    async def save(self, report: Report) -> None:
        """Store a report."""
        ...

    async def get(self, report_id: str) -> Report | None:
        """One report, or None."""
        ...

    async def for_version(self, model: str, version: int) -> Report | None:
        """The report of a version, or None."""
        ...


class Evaluator(Protocol):
    """Loads what an evaluation needs from the artifact store and measures it off the event loop."""

    async def validation_spec(self, spec: ArtifactRef) -> ValidationSpec:
        """The validation section of a stored model spec; raises EvaluationError when unreadable."""
        ...

    async def measure(self, evaluation: Evaluation) -> Measured:
        """Score candidate (and champion) on the holdout; raises EvaluationError naming what failed."""
        ...
