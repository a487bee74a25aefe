"""In-memory fakes of the registry's ports, and a builder of the events it consumes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from contracts.common import ArtifactFormat, ArtifactRef, ModelSignature, Stage
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent, EventPayload, new_event
from contracts.examples import EXAMPLES
from contracts.training import TrainingCompleted
from contracts.validation import ValidationFailed, ValidationPassed
from libs.artifacts import ArtifactCorrupted, ArtifactNotFound, UntrustedArtifact
from services.registry.ports import Cause, LastMove, RegisteredRun
from services.registry.schemas import DatasetPublic


@dataclass
class FakeVersion:
    completed: TrainingCompleted
    stage: Stage
    cause: Cause


@dataclass
class HistoryEntry:
    model: str
    version: int
    from_stage: Stage | None
    to_stage: Stage
    reason: str
    cause: Cause


@dataclass
class FakeVersions:
    """:class:`services.registry.ports.Versions` in dicts."""

    versions: dict[tuple[str, int], FakeVersion] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)
    aliases: dict[tuple[str, str], int] = field(default_factory=dict)
    reports: list[tuple[Any, Cause]] = field(default_factory=list)
    tags: dict[tuple[str, int, str], str] = field(default_factory=dict)
    stage_sequences: dict[str, int] = field(default_factory=dict)

    async def find_run(self, model: str, run_id: str) -> RegisteredRun | None:
        for (m, n), v in self.versions.items():
            if m == model and v.completed.run_id == run_id:
                return RegisteredRun(n, v.completed.artifact.key, v.completed.profile.key)
        return None

    async def register(self, completed: TrainingCompleted, cause: Cause) -> int:
        number = 1 + max((n for m, n in self.versions if m == completed.model), default=0)
        self.versions[(completed.model, number)] = FakeVersion(completed, Stage.CANDIDATE, cause)
        self.history.append(
            HistoryEntry(
                completed.model,
                number,
                None,
                Stage.CANDIDATE,
                f"registered from run {completed.run_id}",
                cause,
            )
        )
        return number

    async def stage_for_update(self, model: str, version: int) -> Stage | None:
        v = self.versions.get((model, version))
        return v.stage if v else None

    async def versions_in(self, model: str, stage: Stage) -> list[int]:
        return sorted(n for (m, n), v in self.versions.items() if m == model and v.stage is stage)

    async def lock_stages(self, model: str) -> None:
        return None  # one transaction at a time

    async def move(
        self, model: str, version: int, from_stage: Stage, to_stage: Stage, reason: str, cause: Cause
    ) -> int:
        self.versions[(model, version)].stage = to_stage
        self.history.append(HistoryEntry(model, version, from_stage, to_stage, reason, cause))
        self.stage_sequences[model] = self.stage_sequences.get(model, 0) + 1
        return self.stage_sequences[model]

    async def last_move(self, model: str, version: int) -> LastMove | None:
        for h in reversed(self.history):
            if (h.model, h.version) == (model, version):
                return LastMove(h.from_stage, h.to_stage, h.cause.event_type)
        return None

    async def take_alias(self, model: str, alias: str, version: int, cause: Cause) -> None:
        self.aliases[(model, alias)] = version

    async def drop_aliases(self, model: str, version: int, aliases: tuple[str, ...]) -> None:
        for alias in aliases:
            if self.aliases.get((model, alias)) == version:
                del self.aliases[(model, alias)]

    async def aliases_of(self, model: str, version: int) -> list[str]:
        return sorted(a for (m, a), n in self.aliases.items() if m == model and n == version)

    async def report_verdict(self, model: str, version: int, report_id: str) -> str | None:
        for report, _ in self.reports:
            if (report.model, report.model_version, report.report_id) == (model, version, report_id):
                return "failed" if report.failed_checks else "passed"
        return None

    async def record_validation(self, report: ValidationPassed | ValidationFailed, cause: Cause) -> None:
        if all(c.event_id != cause.event_id for _, c in self.reports):
            self.reports.append((report, cause))

    async def model_exists(self, model: str) -> bool:
        return any(m == model for m, _ in self.versions)

    async def latest_signature(self, model: str) -> tuple[int, ModelSignature] | None:
        numbers = [n for m, n in self.versions if m == model]
        if not numbers:
            return None
        return max(numbers), self.versions[(model, max(numbers))].completed.signature

    async def set_tag(self, model: str, version: int, key: str, value: str, actor: str) -> str | None:
        previous = self.tags.get((model, version, key))
        self.tags[(model, version, key)] = value
        return previous

    async def delete_tag(self, model: str, version: int, key: str) -> str | None:
        return self.tags.pop((model, version, key), None)

    # -- inspection ---------------------------------------------------------------------------------

    def stage(self, model: str, version: int) -> Stage:
        return self.versions[(model, version)].stage

    def stages_of(self, model: str, version: int) -> list[Stage]:
        return [h.to_stage for h in self.history if h.model == model and h.version == version]


@dataclass
class FakeDatasets:
    """:class:`services.registry.ports.Datasets` in a dict."""

    rows: dict[tuple[str, int], DatasetPublic] = field(default_factory=dict)

    async def get(self, name: str, version: int) -> DatasetPublic | None:
        return self.rows.get((name, version))

    async def with_content(self, name: str, sha256: str) -> DatasetPublic | None:
        found = [d for (n, _), d in self.rows.items() if n == name and d.sha256 == sha256]
        return max(found, key=lambda d: d.version) if found else None

    async def lock_name(self, name: str) -> None:
        pass  # the fakes run one transaction at a time

    async def next_version(self, name: str) -> int:
        return 1 + max((v for n, v in self.rows if n == name), default=0)

    async def add(self, registered: DatasetRegistered, *, event_id: str, actor: str | None) -> None:
        d = registered
        self.rows[(d.name, d.dataset_version)] = DatasetPublic(
            name=d.name,
            version=d.dataset_version,
            sha256=d.sha256,
            artifact=d.artifact,
            row_count=d.row_count,
            columns=d.columns,
            source=d.source,
            derived_from=d.derived_from,
            models=d.models,
            description=d.description,
            registered_by=actor,
            event_id=event_id,
            created_at=datetime.now(UTC),
        )

    async def named_for(self, model: str) -> bool:
        return any(model in d.models for d in self.rows.values())


@dataclass
class FakeArtifacts:
    """:class:`services.registry.ports.Artifacts` in a dict; ``untrusted`` and ``corrupted`` keys fail, and
    the store keeps no size for ``unsized`` ones (only a read tells); ``reads`` names the keys read or
    stat'ed."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    untrusted: set[str] = field(default_factory=set)
    corrupted: set[str] = field(default_factory=set)
    unsized: set[str] = field(default_factory=set)
    reads: list[str] = field(default_factory=list)

    def _check(self, key: str) -> int:
        self.reads.append(f"read {key}")
        if key in self.corrupted:
            raise ArtifactCorrupted(f"artifact {key} is corrupted")
        if key not in self.blobs:
            raise ArtifactNotFound(f"no artifact {key}")
        return len(self.blobs[key])

    async def check_model(self, key: str) -> int:
        size = self._check(key)
        if key in self.untrusted:
            raise UntrustedArtifact(
                "the artifact is a pickle (or joblib) stream; only skops files are loaded"
            )
        return size

    async def verify(self, key: str) -> int:
        return self._check(key)

    async def size(self, key: str) -> int | None:
        self.reads.append(f"stat {key}")
        if key not in self.blobs:
            raise ArtifactNotFound(f"no artifact {key}")
        return None if key in self.unsized else len(self.blobs[key])

    async def put(self, data: bytes) -> ArtifactRef:
        key = hashlib.sha256(data).hexdigest()
        self.blobs[key] = data
        return ArtifactRef(key=key, uri=self.uri(key), format=ArtifactFormat.PARQUET, size_bytes=len(data))

    def uri(self, key: str) -> str:
        return f"memory://{key}"

    def stream(self, key: str) -> Iterator[bytes]:
        self._check(key)
        yield self.blobs[key]


def artifact(content: bytes, fmt: ArtifactFormat = ArtifactFormat.SKOPS) -> ArtifactRef:
    key = hashlib.sha256(content).hexdigest()
    return ArtifactRef(key=key, uri=f"memory://{key}", format=fmt, size_bytes=len(content))


def training_completed(
    artifacts: FakeArtifacts, *, model: str = "churn", run_id: str = "run-1", model_bytes: bytes | None = None
) -> TrainingCompleted:
    """A TrainingCompleted for ``model`` whose artifact and profile are in the fake store."""
    base = EXAMPLES[TrainingCompleted]
    assert isinstance(base, TrainingCompleted)
    model_bytes = model_bytes or f"model of {model} {run_id}".encode()
    profile_bytes = f"profile of {model} {run_id}".encode()
    artifacts.blobs[hashlib.sha256(model_bytes).hexdigest()] = model_bytes
    artifacts.blobs[hashlib.sha256(profile_bytes).hexdigest()] = profile_bytes
    return base.model_copy(
        update={
            "model": model,
            "run_id": run_id,
            "artifact": artifact(model_bytes),
            "profile": artifact(profile_bytes, ArtifactFormat.JSON),
        }
    )


def event_of(
    payload: EventPayload, *, source: str = "/driftloop/test", actor: str | None = None
) -> CloudEvent[Any]:
    return new_event(payload, source=source, actor=actor)
