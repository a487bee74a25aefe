"""The registry and serving on one in-memory bus, each on its fakes: where a manual command and a stage change
the registry makes on its own cross, do both end on the same version?

The registry moves a version to production only to follow serving (RolloutPromoted, RolloutRolledBack), and
serving takes the registry's echoes of its own decisions as no news, so serving decides what serves and the
registry follows in serving's order. That holds when serving acted on a command about a version the
registry rejected meanwhile by a failed validation, which serving had not heard of yet: the registry
follows serving there too (docs/registry.md, "A verdict that overtakes serving's decision"), while a
version a rollback rejected is never brought back.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from contracts import commands, models, monitoring, validation
from contracts.commands import PromoteRequested, RollbackRequested
from contracts.common import Stage
from contracts.envelope import CloudEvent, EventPayload, new_event
from contracts.registry import EVENT_TYPES
from contracts.rollouts import RolloutPromoted
from contracts.validation import CheckKind, CheckResult, ValidationFailed
from libs.bus import InMemoryBus, Subscription, Transaction
from services.registry.bootstrap import TOPICS as REGISTRY_TOPICS
from services.registry.handlers import HANDLERS as REGISTRY_HANDLERS
from services.serving import handlers as serving
from services.serving.domain import RolloutPolicy
from tests.unit.registry.fakes import FakeArtifacts, FakeDatasets, training_completed
from tests.unit.registry.fakes import FakeVersions as RegistryVersions
from tests.unit.serving.fakes import FakeLoader, FakeRoutes, passed
from tests.unit.serving.fakes import FakeVersions as ServingVersions

MODEL = "churn"


class Platform:
    """Serving and the registry, wired like their bootstraps do. Serving is subscribed first, so in each
    round of the bus serving reads a command before the registry reads what else came meanwhile; the registry
    reads validation's topic before the rollouts topic (its topic order)."""

    def __init__(self) -> None:
        self.bus = InMemoryBus(EVENT_TYPES)
        self.serving_versions, self.routes, self.loader = ServingVersions(), FakeRoutes(), FakeLoader()
        self.registry_versions, self.artifacts = RegistryVersions(), FakeArtifacts()
        ids = iter(f"r-{i}" for i in range(1, 100))
        # A failed transaction leaves the fakes as they were, as a rolled-back one leaves Postgres.
        bus_begin = self.bus._begin

        @asynccontextmanager
        async def begin() -> AsyncIterator[Any]:
            saved = copy.deepcopy((self.registry_versions, self.serving_versions, self.routes))
            try:
                async with bus_begin() as tx:
                    yield tx
            except BaseException:
                self.registry_versions, self.serving_versions, self.routes = saved
                raise

        self.bus._begin = begin  # type: ignore[method-assign]

        def serve(handler: Any) -> Any:
            async def run(event: CloudEvent[Any], tx: Transaction) -> None:
                await serving.handle(
                    handler,
                    event,
                    tx,
                    versions=self.serving_versions,
                    routes=self.routes,
                    loader=self.loader,
                    source="/driftloop/serving",
                    policy=RolloutPolicy(steps=(0.1, 1.0), min_samples=1, bake_seconds=0.0),
                    new_id=lambda: next(ids),
                )

            return run

        def register(handler: Any) -> Any:
            async def run(event: CloudEvent[Any], tx: Transaction) -> None:
                await handler(
                    event,
                    versions=self.registry_versions,
                    datasets=FakeDatasets(),
                    artifacts=self.artifacts,
                    publish=tx.publish,
                    source="/driftloop/registry",
                )

            return run

        self.bus.subscribe(
            Subscription(
                consumer="serving",
                topics=[models.TOPIC, validation.TOPIC, monitoring.TOPIC, commands.TOPIC],
                handlers={p: serve(h) for p, h in serving.HANDLERS.items()},
            )
        )
        self.bus.subscribe(
            Subscription(
                consumer="registry",
                topics=list(REGISTRY_TOPICS),
                handlers={p: register(h) for p, h in REGISTRY_HANDLERS.items()},
            )
        )

    async def send(self, *payloads: EventPayload | CloudEvent[Any]) -> None:
        """Publish all, then let both services read until nothing is left."""
        for p in payloads:
            await self.bus.publish(
                p if isinstance(p, CloudEvent) else new_event(p, source="/x", actor="user:op")
            )
        await self.bus.drain()

    async def train(self, run_id: str) -> int:
        """A training run the registry registers (serving learns of it from the registry); its number."""
        await self.send(
            new_event(training_completed(self.artifacts, model=MODEL, run_id=run_id), source="/t")
        )
        return max(n for m, n in self.registry_versions.versions if m == MODEL)

    def registry_production(self) -> list[int]:
        return sorted(
            n for (m, n), v in self.registry_versions.versions.items() if v.stage is Stage.PRODUCTION
        )

    @property
    def serving_stable(self) -> int | None:
        return self.routes.rows[MODEL].stable_version

    def stage(self, version: int) -> Stage:
        return self.registry_versions.versions[(MODEL, version)].stage


def failed(version: int) -> ValidationFailed:
    check = CheckResult(
        name="accuracy>=0.9", kind=CheckKind.THRESHOLD, value=0.6, threshold=0.9, passed=False
    )
    return ValidationFailed(
        model=MODEL,
        model_version=version,
        report_id=f"vr-{version}-f",
        checks=[check],
        failed_checks=[check.name],
        duration_seconds=1.0,
    )


@pytest.fixture
async def platform() -> Platform:
    p = Platform()
    v1 = await p.train("run-1")
    await p.send(passed(v1))  # the first validated version serves at once
    assert p.serving_stable == 1 and p.registry_production() == [1]
    return p


async def test_serving_decisions_and_the_registry_agree_when_they_do_not_cross(platform: Platform) -> None:
    v2 = await platform.train("run-2")
    await platform.send(PromoteRequested(model=MODEL, model_version=v2, reason="by hand"))
    assert platform.serving_stable == 2 and platform.registry_production() == [2]
    await platform.send(RollbackRequested(model=MODEL, model_version=v2, reason="by hand"))
    assert platform.serving_stable == 1 and platform.registry_production() == [1]
    assert platform.stage(2) is Stage.REJECTED
    assert platform.bus.dead_letters == []


async def test_a_promotion_that_crossed_a_failed_validation_leaves_both_on_the_promoted_version(
    platform: Platform,
) -> None:
    v2 = await platform.train("run-2")
    await platform.send(PromoteRequested(model=MODEL, model_version=v2, reason="by hand"), failed(v2))
    # The registry read the verdict first and rejected the candidate; serving had promoted it on the command.
    # The registry follows serving, as it does when the verdict comes after the promotion.
    assert (platform.serving_stable, platform.registry_production(), platform.stage(v2)) == (
        2,
        [2],
        Stage.PRODUCTION,
    )
    assert platform.bus.dead_letters == []
    assert platform.registry_versions.aliases[(MODEL, "champion")] == 2
    assert platform.serving_versions.rows[(MODEL, 2)].stage == Stage.PRODUCTION.value
    [moves] = [
        h for h in platform.registry_versions.history if h.to_stage is Stage.PRODUCTION and h.version == 2
    ]
    assert moves.from_stage is Stage.REJECTED and "registry follows serving" in moves.reason
    # Undoing it is an ordinary rollback, which the registry's route takes too (v2 is production there).
    await platform.send(RollbackRequested(model=MODEL, model_version=v2, reason="validation failed"))
    assert platform.serving_stable == 1 and platform.registry_production() == [1]
    assert platform.stage(v2) is Stage.REJECTED and platform.bus.dead_letters == []


async def test_a_rollback_that_crossed_its_targets_failed_validation_leaves_both_on_the_target(
    platform: Platform,
) -> None:
    v2 = await platform.train("run-2")
    await platform.send(PromoteRequested(model=MODEL, model_version=v2, reason="by hand"))
    v3 = await platform.train("run-3")
    await platform.send(
        RollbackRequested(model=MODEL, model_version=v2, to_version=v3, reason="back to the new one"),
        failed(v3),
    )
    assert (platform.serving_stable, platform.registry_production(), platform.bus.dead_letters) == (
        3,
        [3],
        [],
    )
    assert platform.stage(v2) is Stage.REJECTED
    await platform.send(
        RollbackRequested(model=MODEL, model_version=v3, to_version=1, reason="validation failed")
    )
    assert platform.serving_stable == 1 and platform.registry_production() == [1]


async def test_a_version_taken_off_traffic_by_a_rollback_is_not_brought_back_by_its_promotion_resent(
    platform: Platform,
) -> None:
    v2 = await platform.train("run-2")
    await platform.send(PromoteRequested(model=MODEL, model_version=v2, reason="by hand"))
    await platform.send(RollbackRequested(model=MODEL, model_version=v2, reason="by hand"))
    [promoted] = [e for e in platform.bus.events(of=RolloutPromoted) if e.data.model_version == v2]
    await platform.send(promoted.model_copy(update={"id": "resent-1"}))
    # Rejected by a rollback, not by a verdict it overtook: the re-sent promotion is refused, not followed.
    assert platform.registry_production() == [1] and platform.stage(v2) is Stage.REJECTED
    [refused] = platform.bus.dead_letters
    assert refused.consumer == "registry" and "churn version 2 is rejected" in refused.error
