"""The registry's handlers on fakes, wired through the in-memory bus (same dispatch rules as Kafka)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from contracts.commands import (
    REASON_MAX_CHARS,
    ArchiveRequested,
    PromoteRequested,
    RetrainRequested,
    within_reason,
)
from contracts.common import ArtifactFormat, Stage
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent, EventPayload
from contracts.examples import EXAMPLES
from contracts.models import ModelStageChanged, ModelVersionRegistered
from contracts.registry import EVENT_TYPES
from contracts.rollouts import RollbackReason, RolloutPromoted, RolloutRolledBack, RolloutStarted
from contracts.validation import CheckKind, CheckResult, ValidationFailed, ValidationPassed
from libs.bus import InMemoryBus, Subscription, Transaction
from services.registry.bootstrap import TOPICS
from services.registry.handlers import HANDLERS, RegistryHandler
from services.registry.metrics import counting
from tests.unit.registry.fakes import (
    FakeArtifacts,
    FakeDatasets,
    FakeVersions,
    artifact,
    event_of,
    training_completed,
)

SOURCE = "/driftloop/registry"


class Registry:
    """The registry's handlers on fakes. A failed transaction leaves the fakes as they were, as a rolled-back
    transaction leaves Postgres (the bus may run several events in one transaction: group commit)."""

    def __init__(self) -> None:
        self.versions = FakeVersions()
        self.datasets = FakeDatasets()
        self.artifacts = FakeArtifacts()
        self.bus = InMemoryBus(EVENT_TYPES)
        # The bus's own transactions, wrapped so the fakes roll back with them.
        bus_begin = self.bus._begin

        @asynccontextmanager
        async def begin() -> AsyncIterator[Any]:
            saved = copy.deepcopy((self.versions, self.datasets))
            try:
                async with bus_begin() as tx:
                    yield tx
            except BaseException:
                self.versions, self.datasets = saved
                raise

        self.bus._begin = begin  # type: ignore[method-assign]
        self.bus.subscribe(
            Subscription(
                consumer="registry",
                topics=list(TOPICS),
                handlers={t: self._bind(h) for t, h in HANDLERS.items()},
                retry_backoff_s=0,
            )
        )

    def _bind(self, handler: RegistryHandler) -> Any:
        async def run(event: CloudEvent[Any], tx: Transaction) -> None:
            await handler(
                event,
                versions=self.versions,
                datasets=self.datasets,
                artifacts=self.artifacts,
                publish=counting(tx),
                source=SOURCE,
            )

        return run

    async def deliver(self, *payloads: EventPayload | CloudEvent[Any]) -> list[CloudEvent[Any]]:
        events = [p if isinstance(p, CloudEvent) else event_of(p) for p in payloads]
        for e in events:
            await self.bus.publish(e)
        await self.bus.drain()
        return events

    def stage_changes(self) -> list[ModelStageChanged]:
        return [e.data for e in self.bus.events(of=ModelStageChanged)]


def passed(model: str, version: int) -> ValidationPassed:
    base = EXAMPLES[ValidationPassed]
    assert isinstance(base, ValidationPassed)
    return base.model_copy(update={"model": model, "model_version": version})


def failed(model: str, version: int) -> ValidationFailed:
    check = CheckResult(
        name="roc_auc>=0.75", kind=CheckKind.THRESHOLD, value=0.6, threshold=0.75, passed=False
    )
    return ValidationFailed(
        model=model,
        model_version=version,
        report_id="vr-f",
        checks=[check],
        failed_checks=["roc_auc>=0.75"],
        duration_seconds=1.0,
    )


def started(model: str, version: int, stable: int | None = None) -> RolloutStarted:
    return RolloutStarted(
        rollout_id=f"r-{version}",
        model=model,
        stable_version=stable,
        canary_version=version,
        steps=[0.1, 1.0],
        weight=0.1,
        min_samples=10,
        bake_seconds=1,
    )


def promoted(model: str, version: int, previous: int | None = None) -> RolloutPromoted:
    return RolloutPromoted(
        rollout_id=f"r-{version}",
        model=model,
        model_version=version,
        previous_version=previous,
        steps_completed=2,
        duration_seconds=10,
    )


def rolled_back(model: str, version: int, stable: int | None) -> RolloutRolledBack:
    return RolloutRolledBack(
        rollout_id=f"r-{version}",
        model=model,
        stable_version=stable,
        canary_version=version,
        step_index=0,
        weight=0.1,
        reason=RollbackReason.UNHEALTHY_VERDICT,
        message="canary error rate 4% vs 0.2%",
    )


@pytest.fixture
def registry() -> Registry:
    return Registry()


async def to_production(r: Registry, model: str, run_id: str, previous: int | None = None) -> int:
    await r.deliver(training_completed(r.artifacts, model=model, run_id=run_id))
    version = max(n for m, n in r.versions.versions if m == model)
    await r.deliver(
        passed(model, version), started(model, version, previous), promoted(model, version, previous)
    )
    return version


# --- registration ---------------------------------------------------------------------------------------


async def test_training_completed_becomes_a_candidate_and_is_announced(registry: Registry) -> None:
    done = training_completed(registry.artifacts)
    [cause] = await registry.deliver(done)
    assert registry.versions.stage("churn", 1) is Stage.CANDIDATE
    [announced] = registry.bus.events(of=ModelVersionRegistered)
    assert announced.data.model_version == 1
    assert announced.data.lineage == done.lineage
    assert announced.data.artifact == done.artifact
    assert announced.causationid == cause.id and announced.correlationid == cause.correlationid
    assert announced.source == SOURCE


async def test_duplicate_event_changes_nothing(registry: Registry) -> None:
    [event] = await registry.deliver(training_completed(registry.artifacts))
    await registry.deliver(event)
    assert list(registry.versions.versions) == [("churn", 1)]
    assert len(registry.bus.events(of=ModelVersionRegistered)) == 1


async def test_same_run_announced_twice_under_new_event_ids_gives_one_version(registry: Registry) -> None:
    done = training_completed(registry.artifacts, run_id="run-a")
    await registry.deliver(done, done)
    assert list(registry.versions.versions) == [("churn", 1)]
    assert len(registry.bus.events(of=ModelVersionRegistered)) == 1
    assert registry.bus.dead_letters == []


async def test_versions_are_numbered_per_model(registry: Registry) -> None:
    await registry.deliver(
        training_completed(registry.artifacts, model="churn", run_id="a"),
        training_completed(registry.artifacts, model="fraud", run_id="b"),
        training_completed(registry.artifacts, model="churn", run_id="c"),
    )
    assert sorted(registry.versions.versions) == [("churn", 1), ("churn", 2), ("fraud", 1)]


async def test_same_run_with_another_artifact_is_dead_lettered(registry: Registry) -> None:
    await registry.deliver(training_completed(registry.artifacts, run_id="run-a", model_bytes=b"one"))
    await registry.deliver(training_completed(registry.artifacts, run_id="run-a", model_bytes=b"two"))
    assert list(registry.versions.versions) == [("churn", 1)]
    [dead] = registry.bus.dead_letters
    assert dead.reason == "rejected" and "already version 1" in dead.error


async def test_pickle_artifact_is_not_registered(registry: Registry) -> None:
    done = training_completed(registry.artifacts, model_bytes=b"\x80\x05pickle")
    registry.artifacts.untrusted.add(done.artifact.key)
    await registry.deliver(done)
    assert registry.versions.versions == {}
    assert registry.bus.events(of=ModelVersionRegistered) == []
    [dead] = registry.bus.dead_letters
    assert "pickle" in dead.error


async def test_corrupted_artifact_is_not_registered(registry: Registry) -> None:
    done = training_completed(registry.artifacts)
    registry.artifacts.corrupted.add(done.profile.key)
    await registry.deliver(done)
    assert registry.versions.versions == {}
    [dead] = registry.bus.dead_letters
    assert "corrupted" in dead.error


@pytest.mark.parametrize("kind", ["artifact", "profile"])
async def test_a_run_announcing_another_size_than_the_store_holds_is_not_registered(
    registry: Registry, kind: str
) -> None:
    # Its downloads would be refused: they check the stored file's length against the recorded one.
    done = training_completed(registry.artifacts)
    ref = getattr(done, kind)
    done = done.model_copy(update={kind: ref.model_copy(update={"size_bytes": ref.size_bytes + 1})})
    await registry.deliver(done)
    assert registry.versions.versions == {}
    assert registry.bus.events(of=ModelVersionRegistered) == []
    [dead] = registry.bus.dead_letters
    assert dead.reason == "rejected"
    assert (
        f"is {ref.size_bytes:,} bytes in the store, not the {ref.size_bytes + 1:,} the event says"
        in dead.error
    )


async def test_missing_artifact_is_retried_then_dead_lettered(registry: Registry) -> None:
    done = training_completed(registry.artifacts)
    del registry.artifacts.blobs[done.artifact.key]
    await registry.deliver(done)
    [dead] = registry.bus.dead_letters
    assert dead.reason == "handler-failed" and "ArtifactNotFound" in dead.error


# --- validation ------------------------------------------------------------------------------------------


async def test_validation_passed_keeps_candidate_and_makes_it_challenger(registry: Registry) -> None:
    await registry.deliver(training_completed(registry.artifacts), passed("churn", 1))
    assert registry.versions.stage("churn", 1) is Stage.CANDIDATE
    assert registry.versions.aliases == {("churn", "challenger"): 1}
    [(report, _)] = registry.versions.reports
    assert report.report_id == "vr-5d1e"
    assert registry.stage_changes() == []


async def test_validation_failed_rejects_the_candidate(registry: Registry) -> None:
    _, cause = await registry.deliver(training_completed(registry.artifacts), failed("churn", 1))
    assert registry.versions.stage("churn", 1) is Stage.REJECTED
    [change] = registry.bus.events(of=ModelStageChanged)
    assert (change.data.from_stage, change.data.to_stage) == (Stage.CANDIDATE, Stage.REJECTED)
    assert change.data.caused_by is not None and change.data.caused_by.id == cause.id
    assert "roc_auc>=0.75" in change.data.reason
    assert len(registry.versions.reports) == 1


async def test_a_rejection_names_a_few_failed_checks_and_counts_the_rest(registry: Registry) -> None:
    # Thousands of failed slices: the reason listed every name, and ModelStageChanged carries the reason.
    checks = [
        CheckResult(name=f"slice:store=s-{i:05d}:roc_auc", kind=CheckKind.SLICE, value=0.5, passed=False)
        for i in range(3_000)
    ]
    report = ValidationFailed(
        model="churn",
        model_version=1,
        report_id="vr-f",
        checks=checks,
        failed_checks=[c.name for c in checks],
        duration_seconds=1.0,
        checks_total=4_000,
        failed_checks_total=3_500,
    )
    await registry.deliver(training_completed(registry.artifacts), report)
    [change] = registry.stage_changes()
    assert change.to_stage is Stage.REJECTED
    assert change.reason.startswith("validation vr-f failed: slice:store=s-00000:roc_auc, ")
    assert len(change.reason) < 1_200
    named = change.reason.count("slice:")
    assert change.reason.endswith(f" and {3_500 - named} more")


@pytest.mark.parametrize(
    ("stage", "moves"),
    [
        (Stage.CANARY, [started("churn", 1)]),
        # Promoted by an operator before validation had finished.
        (Stage.PRODUCTION, [promoted("churn", 1)]),
        (Stage.ARCHIVED, [ArchiveRequested(model="churn", model_version=1, reason="tidy")]),
    ],
)
async def test_a_late_validation_failure_keeps_the_report_and_leaves_the_stage(
    registry: Registry, stage: Stage, moves: list[EventPayload]
) -> None:
    await registry.deliver(training_completed(registry.artifacts), *moves)
    assert registry.versions.stage("churn", 1) is stage
    aliases = dict(registry.versions.aliases)
    changes = len(registry.stage_changes())
    await registry.deliver(failed("churn", 1))
    assert registry.versions.stage("churn", 1) is stage
    assert registry.versions.aliases == aliases
    assert len(registry.stage_changes()) == changes
    [(report, _)] = registry.versions.reports
    assert report.failed_checks == ["roc_auc>=0.75"]
    assert registry.bus.dead_letters == []


async def test_a_report_re_sent_under_a_new_event_id_changes_nothing(registry: Registry) -> None:
    await registry.deliver(training_completed(registry.artifacts, run_id="run-1"), passed("churn", 1))
    await registry.deliver(training_completed(registry.artifacts, run_id="run-2"), passed("churn", 2))
    assert registry.versions.aliases == {("churn", "challenger"): 2}
    await registry.deliver(passed("churn", 1))  # the same report of version 1, as a new event
    assert registry.versions.aliases == {("churn", "challenger"): 2}
    assert [r.model_version for r, _ in registry.versions.reports] == [1, 2]
    assert registry.bus.dead_letters == []


async def test_a_report_re_sent_with_another_outcome_is_dead_lettered(registry: Registry) -> None:
    await registry.deliver(training_completed(registry.artifacts), passed("churn", 1))
    report_id = passed("churn", 1).report_id
    await registry.deliver(failed("churn", 1).model_copy(update={"report_id": report_id}))
    assert registry.versions.stage("churn", 1) is Stage.CANDIDATE
    assert registry.versions.aliases == {("churn", "challenger"): 1}
    assert len(registry.versions.reports) == 1
    [dead] = registry.bus.dead_letters
    assert dead.reason == "rejected"
    assert f"already holds validation report {report_id}, which passed" in dead.error
    assert "says it failed" in dead.error


async def test_validation_of_an_unknown_version_is_dead_lettered(registry: Registry) -> None:
    await registry.deliver(passed("churn", 9))
    [dead] = registry.bus.dead_letters
    assert "lacks" in dead.error


# --- rollouts --------------------------------------------------------------------------------------------


async def test_promotion_archives_the_previous_production_and_moves_champion(registry: Registry) -> None:
    await to_production(registry, "churn", "run-1")
    await to_production(registry, "churn", "run-2", previous=1)
    assert registry.versions.stage("churn", 1) is Stage.ARCHIVED
    assert registry.versions.stage("churn", 2) is Stage.PRODUCTION
    assert registry.versions.aliases == {("churn", "champion"): 2}
    assert registry.versions.stages_of("churn", 1) == [
        Stage.CANDIDATE,
        Stage.CANARY,
        Stage.PRODUCTION,
        Stage.ARCHIVED,
    ]
    moves = [(c.model_version, c.from_stage, c.to_stage, c.aliases) for c in registry.stage_changes()]
    assert moves == [
        (1, Stage.CANDIDATE, Stage.CANARY, ["challenger"]),
        (1, Stage.CANARY, Stage.PRODUCTION, ["champion"]),
        (2, Stage.CANDIDATE, Stage.CANARY, ["challenger"]),
        (1, Stage.PRODUCTION, Stage.ARCHIVED, []),
        (2, Stage.CANARY, Stage.PRODUCTION, ["champion"]),
    ]
    archive = registry.bus.events(of=ModelStageChanged)[3]
    assert archive.data.caused_by is not None and archive.data.caused_by.type == RolloutPromoted.event_type()


async def test_stage_changes_are_numbered_per_model_in_the_order_they_are_made(registry: Registry) -> None:
    await to_production(registry, "churn", "run-1")
    await to_production(registry, "fraud", "run-1")
    await to_production(registry, "churn", "run-2", previous=1)
    numbered = [(c.model, c.model_version, c.to_stage, c.sequence) for c in registry.stage_changes()]
    assert numbered == [
        ("churn", 1, Stage.CANARY, 1),
        ("churn", 1, Stage.PRODUCTION, 2),
        ("fraud", 1, Stage.CANARY, 1),
        ("fraud", 1, Stage.PRODUCTION, 2),
        ("churn", 2, Stage.CANARY, 3),
        ("churn", 1, Stage.ARCHIVED, 4),
        ("churn", 2, Stage.PRODUCTION, 5),
    ]
    # A fact repeated changes nothing and takes no number.
    await registry.deliver(promoted("churn", 2, 1))
    assert [c.sequence for c in registry.stage_changes() if c.model == "churn"] == [1, 2, 3, 4, 5]


async def test_rollback_rejects_the_canary_and_production_stays(registry: Registry) -> None:
    await to_production(registry, "churn", "run-1")
    await registry.deliver(training_completed(registry.artifacts, run_id="run-2"))
    await registry.deliver(passed("churn", 2), started("churn", 2, 1), rolled_back("churn", 2, 1))
    assert registry.versions.stage("churn", 2) is Stage.REJECTED
    assert registry.versions.stage("churn", 1) is Stage.PRODUCTION
    assert registry.versions.aliases == {("churn", "champion"): 1}
    assert registry.versions.stages_of("churn", 2) == [Stage.CANDIDATE, Stage.CANARY, Stage.REJECTED]


async def test_rollback_of_production_restores_the_archived_stable_version(registry: Registry) -> None:
    await to_production(registry, "churn", "run-1")
    await to_production(registry, "churn", "run-2", previous=1)
    await registry.deliver(rolled_back("churn", 2, 1))
    assert registry.versions.stage("churn", 2) is Stage.REJECTED
    assert registry.versions.stage("churn", 1) is Stage.PRODUCTION
    assert registry.versions.aliases == {("churn", "champion"): 1}


async def test_rollback_of_production_to_a_candidate_makes_the_candidate_production(
    registry: Registry,
) -> None:
    # The rollback command takes any to_version that may move to production (a validated candidate too),
    # and serving then serves it alone: the registry's stage and champion must say so.
    await to_production(registry, "churn", "run-1")
    await registry.deliver(training_completed(registry.artifacts, run_id="run-2"), passed("churn", 2))
    await to_production(registry, "churn", "run-3", previous=1)
    assert registry.versions.stage("churn", 2) is Stage.CANDIDATE
    await registry.deliver(rolled_back("churn", 3, 2))
    assert registry.versions.stage("churn", 3) is Stage.REJECTED
    assert registry.versions.stage("churn", 2) is Stage.PRODUCTION
    assert registry.versions.aliases == {("churn", "champion"): 2}
    last = registry.stage_changes()[-1]
    assert (last.model_version, last.from_stage, last.to_stage) == (2, Stage.CANDIDATE, Stage.PRODUCTION)
    assert registry.bus.dead_letters == []


async def test_illegal_transition_is_dead_lettered_with_the_allowed_ones(registry: Registry) -> None:
    await registry.deliver(training_completed(registry.artifacts), failed("churn", 1), started("churn", 1))
    assert registry.versions.stage("churn", 1) is Stage.REJECTED
    [dead] = registry.bus.dead_letters
    assert dead.reason == "rejected"
    assert "is rejected; it cannot move to canary (allowed: archived)" in dead.error


async def test_a_fact_repeated_under_a_new_id_changes_nothing(registry: Registry) -> None:
    await to_production(registry, "churn", "run-1")
    before = len(registry.stage_changes())
    await registry.deliver(promoted("churn", 1))
    assert len(registry.stage_changes()) == before
    assert registry.bus.dead_letters == []


async def replaced(r: Registry) -> None:
    """Version 1 served, then version 2 replaced it: 1 is archived, 2 is production."""
    await to_production(r, "churn", "run-1")
    await to_production(r, "churn", "run-2", previous=1)
    assert (r.versions.stage("churn", 1), r.versions.stage("churn", 2)) == (Stage.ARCHIVED, Stage.PRODUCTION)


@pytest.mark.parametrize(
    "stale",
    [
        promoted("churn", 1),  # version 1's own promotion, replacing nothing
        started("churn", 1),  # version 1's first rollout
        rolled_back("churn", 2, 1),  # production rolled back from 2 to 1, before 3 replaced 1
    ],
    ids=["promoted", "started", "rolled-back"],
)
async def test_a_rollout_fact_re_sent_after_production_moved_on_is_dead_lettered(
    registry: Registry, stale: EventPayload
) -> None:
    await replaced(registry)
    production = 2
    if isinstance(stale, RolloutRolledBack):
        await registry.deliver(stale)
        await to_production(registry, "churn", "run-3", previous=1)
        production = 3
    stages = {n: v.stage for (_, n), v in registry.versions.versions.items()}
    changes = len(registry.stage_changes())
    await registry.deliver(stale)  # re-sent under a new event id
    assert {n: v.stage for (_, n), v in registry.versions.versions.items()} == stages
    assert registry.versions.aliases.get(("churn", "champion")) == production
    assert len(registry.stage_changes()) == changes
    [dead] = registry.bus.dead_letters
    assert dead.reason == "rejected"
    assert f"production is version {production}" in dead.error


async def test_an_archived_version_rolled_out_or_promoted_again_serves_again(registry: Registry) -> None:
    await replaced(registry)
    await registry.deliver(started("churn", 1, 2))
    assert registry.versions.stage("churn", 1) is Stage.CANARY
    await registry.deliver(promoted("churn", 1, 2))
    assert (registry.versions.stage("churn", 1), registry.versions.stage("churn", 2)) == (
        Stage.PRODUCTION,
        Stage.ARCHIVED,
    )
    assert registry.bus.dead_letters == []


async def test_an_archived_version_promoted_at_once_on_request_serves_again(registry: Registry) -> None:
    await replaced(registry)
    await registry.deliver(promoted("churn", 1, 2).model_copy(update={"manual": True, "steps_completed": 0}))
    assert (registry.versions.stage("churn", 1), registry.versions.stage("churn", 2)) == (
        Stage.PRODUCTION,
        Stage.ARCHIVED,
    )
    assert registry.bus.dead_letters == []


# --- datasets and commands --------------------------------------------------------------------------------


def dataset(
    version: int, sha_byte: str = "a", *, store: FakeArtifacts | None = None, **kw: Any
) -> DatasetRegistered:
    """A dataset of one byte's file, put in ``store`` when given (the file another service stored)."""
    sha = sha_byte * 64
    if store is not None:
        store.blobs[sha] = b"x"
    return DatasetRegistered(
        name="churn-training",
        dataset_version=version,
        sha256=sha,
        artifact=artifact(b"x", ArtifactFormat.PARQUET).model_copy(update={"key": sha}),
        row_count=10,
        columns={"a": "int64"},
        source="training-set:job-1",
        **kw,
    )


async def test_dataset_registered_by_training_is_recorded_once(registry: Registry) -> None:
    registered = dataset(3, store=registry.artifacts, models=["churn"])
    await registry.deliver(registered, registered)
    assert list(registry.datasets.rows) == [("churn-training", 3)]
    assert registry.datasets.rows[("churn-training", 3)].models == ["churn"]
    # Its file was looked for once, by a stat: nothing of it read, and the second event answered from the row.
    assert registry.artifacts.reads == [f"stat {registered.artifact.key}"]
    assert registry.bus.dead_letters == []


async def test_a_dataset_whose_file_the_store_lacks_is_dead_lettered_and_not_recorded(
    registry: Registry,
) -> None:
    # Recorded, every download of it would be a 404, long after the event that was at fault.
    registered = dataset(1)
    await registry.deliver(registered)
    assert registry.datasets.rows == {}
    [dead] = registry.bus.dead_letters
    assert dead.reason == "rejected"
    assert (
        f"dataset churn-training version 1 is not recorded: the store holds no file {registered.artifact.key}"
        in dead.error
    )
    assert "where the event says 1 bytes" in dead.error


async def test_a_dataset_whose_file_the_store_holds_at_another_size_is_dead_lettered(
    registry: Registry,
) -> None:
    # Recorded, every download of it would be refused (500): they check the stored length against the record.
    registered = dataset(1, store=registry.artifacts)
    registry.artifacts.blobs[registered.artifact.key] = b"xy"
    await registry.deliver(registered)
    assert registry.datasets.rows == {}
    [dead] = registry.bus.dead_letters
    assert dead.reason == "rejected"
    assert (
        f"dataset churn-training version 1 is not recorded: its file {registered.artifact.key} is 2 bytes "
        "in the store, not the 1 the event says"
    ) in dead.error


async def test_a_dataset_recorded_already_is_answered_from_its_row_whatever_the_store_holds_now(
    registry: Registry,
) -> None:
    registered = dataset(1, store=registry.artifacts)
    await registry.deliver(registered)
    row = registry.datasets.rows[("churn-training", 1)]
    del registry.artifacts.blobs[registered.artifact.key]
    registry.artifacts.reads.clear()
    await registry.deliver(registered)  # the same fact again, under a new event id
    assert registry.datasets.rows == {("churn-training", 1): row}
    assert registry.bus.dead_letters == []
    assert registry.artifacts.reads == []


@pytest.mark.parametrize("held", [b"x", b"xy", "corrupted"])
async def test_a_dataset_in_a_store_that_keeps_no_sizes_is_checked_by_reading_its_file(
    registry: Registry, held: bytes | str
) -> None:
    # Some fsspec stores give no size: the file is read (and hashed) then, the one way to know its length.
    registered = dataset(1, store=registry.artifacts)
    key = registered.artifact.key
    registry.artifacts.unsized.add(key)
    if held == "corrupted":
        registry.artifacts.corrupted.add(key)
    else:
        assert isinstance(held, bytes)
        registry.artifacts.blobs[key] = held
    await registry.deliver(registered)
    assert registry.artifacts.reads == [f"stat {key}", f"read {key}"]
    if held == b"x":
        assert list(registry.datasets.rows) == [("churn-training", 1)]
        assert registry.bus.dead_letters == []
        return
    assert registry.datasets.rows == {}
    [dead] = registry.bus.dead_letters
    assert dead.reason == "rejected"
    assert "dataset churn-training version 1 is not recorded: " in dead.error
    assert ("is corrupted" if held == "corrupted" else "is 2 bytes in the store, not the 1") in dead.error


async def test_datasets_the_registry_published_itself_are_skipped(registry: Registry) -> None:
    # The registry records its own uploads in the transaction that publishes them.
    own = event_of(dataset(1), source=SOURCE)
    await registry.datasets.add(own.data, event_id=own.id, actor=None)
    before = dict(registry.datasets.rows)
    await registry.deliver(own)
    assert registry.datasets.rows == before
    assert registry.bus.dead_letters == []


@pytest.mark.parametrize("held", [None, "b"])
async def test_a_dataset_under_the_registrys_source_that_it_does_not_hold_is_dead_lettered(
    registry: Registry, held: str | None
) -> None:
    """The registry's own uploads are recorded when published: one under its source that it lacks, or holds as
    another file, was published elsewhere (another deployment under the same source) and is refused in the
    open, not skipped without a word."""
    if held is not None:
        other = event_of(dataset(1, held), source=SOURCE)
        await registry.datasets.add(other.data, event_id=other.id, actor=None)
    await registry.deliver(event_of(dataset(1, "a"), source=SOURCE))
    [dead] = registry.bus.dead_letters
    assert dead.reason == "rejected"
    assert f"under this registry's source {SOURCE}" in dead.error
    assert ("holds it as sha256 " + "b" * 64 if held else "does not hold it") in dead.error
    assert [d.sha256 for d in registry.datasets.rows.values()] == (["b" * 64] if held else [])


async def test_dataset_version_reused_with_other_content_is_dead_lettered(registry: Registry) -> None:
    await registry.deliver(dataset(1, "a", store=registry.artifacts), dataset(1, "b"))
    assert registry.datasets.rows[("churn-training", 1)].sha256 == "a" * 64
    [dead] = registry.bus.dead_letters
    assert "already registered with sha256" in dead.error


async def test_a_dataset_whose_file_is_another_artifact_than_its_hash_is_dead_lettered(
    registry: Registry,
) -> None:
    # The file is served by its sha256: recorded, the dataset would hand out whatever artifact that names.
    other = dataset(1, "a").artifact.model_copy(update={"key": "b" * 64})
    await registry.deliver(dataset(1, "a").model_copy(update={"artifact": other}))
    assert registry.datasets.rows == {}
    [dead] = registry.bus.dead_letters
    assert dead.reason == "rejected"
    assert f"sha256 {'a' * 64} but its artifact is {'b' * 64}" in dead.error


async def test_archive_request_archives_a_candidate_with_the_actor_in_history(registry: Registry) -> None:
    await registry.deliver(training_completed(registry.artifacts))
    request = ArchiveRequested(model="churn", model_version=1, reason="superseded")
    [cause] = await registry.deliver(event_of(request, actor="user:alice"))
    assert registry.versions.stage("churn", 1) is Stage.ARCHIVED
    last = registry.versions.history[-1]
    assert last.cause.actor == "user:alice" and last.cause.event_id == cause.id
    [change] = registry.bus.events(of=ModelStageChanged)
    assert change.actor == "user:alice"


async def test_a_version_serving_put_on_traffic_before_its_failed_verdict_arrived_is_production(
    registry: Registry,
) -> None:
    # Serving promoted version 1, then rolled production back to version 2, each on a command accepted while
    # the version was a candidate; each failed validation reached the registry first. The registry follows
    # serving both times (docs/registry.md, "A verdict that overtakes serving's decision").
    await registry.deliver(
        *(training_completed(registry.artifacts, run_id=f"run-{n}") for n in (1, 2)),
        failed("churn", 1),
        failed("churn", 2),
    )
    manual = promoted("churn", 1).model_copy(update={"manual": True, "steps_completed": 0})
    await registry.deliver(manual, rolled_back("churn", 1, stable=2))
    assert registry.bus.dead_letters == []
    assert [registry.versions.stage("churn", n) for n in (1, 2)] == [Stage.REJECTED, Stage.PRODUCTION]
    moves = [(c.model_version, c.from_stage, c.to_stage) for c in registry.stage_changes()]
    assert moves == [
        (1, Stage.CANDIDATE, Stage.REJECTED),
        (2, Stage.CANDIDATE, Stage.REJECTED),
        (1, Stage.REJECTED, Stage.PRODUCTION),
        (1, Stage.PRODUCTION, Stage.REJECTED),
        (2, Stage.REJECTED, Stage.PRODUCTION),
    ]
    followed = [c for c in registry.stage_changes() if c.from_stage is Stage.REJECTED]
    assert all(c.reason.endswith("so the registry follows serving") for c in followed)
    assert followed[-1].aliases == ["champion"]


async def test_a_reason_composed_around_a_longest_text_is_cut_alike_in_the_event_and_the_history(
    registry: Registry,
) -> None:
    # "archived on request: <the command's reason>" and "rollout ... rolled back (...): <its message>" run
    # past the cap when the text they wrap is at it; ModelStageChanged.reason had no bound, so any length went
    # to every consumer and the audit trail.
    await registry.deliver(
        training_completed(registry.artifacts, run_id="run-1"),
        training_completed(registry.artifacts, run_id="run-2"),
    )
    longest = "r" * REASON_MAX_CHARS
    await registry.deliver(
        ArchiveRequested(model="churn", model_version=1, reason=longest),
        passed("churn", 2),
        started("churn", 2),
        rolled_back("churn", 2, None).model_copy(update={"message": longest}),
    )
    assert registry.bus.dead_letters == []
    changes = {c.to_stage: c for c in registry.stage_changes()}
    archived, rejected = changes[Stage.ARCHIVED], changes[Stage.REJECTED]
    for change, text in [
        (archived, f"archived on request: {longest}"),
        (rejected, f"rollout r-2 rolled back (unhealthy-verdict): {longest}"),
    ]:
        assert change.reason == within_reason(text) and len(change.reason) == REASON_MAX_CHARS
        [entry] = [
            h
            for h in registry.versions.history
            if (h.version, h.to_stage) == (change.model_version, change.to_stage)
        ]
        assert entry.reason == change.reason  # the version's page shows what the event said
    assert archived.reason.endswith("r… (2,021 characters)")


async def test_archive_request_for_production_is_dead_lettered(registry: Registry) -> None:
    await to_production(registry, "churn", "run-1")
    await registry.deliver(ArchiveRequested(model="churn", model_version=1, reason="tidy"))
    assert registry.versions.stage("churn", 1) is Stage.PRODUCTION
    [dead] = registry.bus.dead_letters
    assert "archive applies to candidate, rejected versions" in dead.error


async def test_commands_for_serving_and_training_are_skipped(registry: Registry) -> None:
    await registry.deliver(
        training_completed(registry.artifacts),
        PromoteRequested(model="churn", model_version=1, reason="x"),
        RetrainRequested(model="churn", reason="x"),
    )
    assert registry.versions.stage("churn", 1) is Stage.CANDIDATE
    assert registry.bus.dead_letters == []
