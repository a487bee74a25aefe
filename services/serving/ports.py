"""What serving's handlers and its HTTP core need from the world, as Protocols."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from contracts.common import ModelSignature
from libs.stage_order import StageChangesApplied
from services.serving.domain import ModelRoute


@dataclass(frozen=True)
class VersionRecord:
    """What serving knows of one model version, learnt from events only."""

    model: str
    version: int
    artifact_key: str | None = None
    signature: ModelSignature | None = None
    validated: bool = False
    validation_report_id: str | None = None
    stage: str | None = None
    load_error: str | None = None

    @property
    def registered(self) -> bool:
        """True once ModelVersionRegistered told serving where the artifact is."""
        return self.artifact_key is not None and self.signature is not None


class ModelVersions(StageChangesApplied, Protocol):
    """Serving's own record of model versions (artifact key, signature, validation)."""

    async def registered(
        self, model: str, version: int, *, artifact_key: str, signature: ModelSignature, stage: str
    ) -> VersionRecord:
        """Record a registered version (idempotent) and return what is known of it."""
        ...

    async def validated(self, model: str, version: int, *, report_id: str) -> VersionRecord:
        """Record that a version passed validation (it may not be registered yet)."""
        ...

    async def get(self, model: str, version: int) -> VersionRecord | None:
        """One version, or None."""
        ...

    async def set_stage(self, model: str, version: int, stage: str) -> None:
        """Remember the registry's stage of a version."""
        ...

    async def load_failed(self, model: str, version: int, error: str) -> None:
        """Remember that a version's artifact could not be loaded."""
        ...


class Routes(Protocol):
    """The persisted routing state per model; ``save`` wakes every replica's routing."""

    async def lock(self, model: str) -> ModelRoute:
        """The model's route, locked until the transaction ends; for a model with none yet, an empty route
        (stored by ``save`` only: an event that changes nothing leaves no trace of the model)."""
        ...

    async def now(self) -> datetime:
        """When a decision on a locked route is made: the store's clock (Postgres'), which every replica
        reads alike. A step's bake time runs from one decision to the next, often taken by two replicas:
        timed on each one's own clock, a replica behind the one that started the step (or a clock stepped
        back) took the step's one healthy verdict for premature and ignored it, and the rollout stayed on
        that step."""
        ...

    async def save(self, route: ModelRoute, *, now: datetime) -> None:
        """Store the route (creating the model's row if new) and notify every replica (at commit)."""
        ...


class LoadedModel(Protocol):
    """A model in memory, warmed and ready to score."""

    model: str
    version: int


class ModelLoader(Protocol):
    """Loads a version's artifact from the shared store (skops, trusted types) and warms it."""

    async def load(self, record: VersionRecord) -> Any:
        """The warmed model; raises :class:`ModelLoadError` when the version cannot be served (its artifact
        or its warm-up at fault), and lets an infrastructure failure through as it is (an OSError, a
        :class:`~libs.errors.Outage`: ``libs.bus.core.is_transient``), for the caller to retry: the version
        is not at fault."""
        ...

    def keep_served(self, artifact_keys: Collection[str]) -> None:
        """Let go of every model whose artifact the routing table no longer serves (it is loaded again if
        asked for again); called at each table swap."""
        ...


class ModelLoadError(Exception):
    """A version's artifact is missing, corrupted, untrusted, or fails its warm-up prediction: the version's
    fault, never the infrastructure's."""
