"""A ModelVersionRegistered for a version monitoring knows already (another event id: not the inbox's
duplicate) changes nothing: Postgres keeps the version as first registered, and so does memory. Before, the
event's profile was loaded again, replacing in memory the reference Postgres did not replace (a restart judged
with the other one), and a profile no longer in the artifact store dead-lettered the event."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from contracts.common import ArtifactRef
from contracts.envelope import new_event
from contracts.examples import EXAMPLES
from contracts.models import ModelVersionRegistered
from libs.bus import PermanentError
from services.monitoring.bootstrap import make_monitor
from services.monitoring.domain import ModelReference
from services.monitoring.handlers import Monitor, on_model_version_registered
from services.monitoring.ports import ProfileUnavailable, StoredModel
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_domain import reference


class GoneArtifacts:
    """An artifact store that no longer has the profile."""

    def __init__(self) -> None:
        self.loads = 0

    async def profile(self, ref: ArtifactRef) -> Any:
        self.loads += 1
        raise ProfileUnavailable(f"profile {ref.uri} is not in the artifact store")


def stored_as(registered: ModelVersionRegistered) -> StoredModel:
    return StoredModel(
        registered.model,
        registered.model_version,
        registered.signature,
        dict(registered.metrics),
        registered.profile,
    )


class KnownVersions:
    """The model versions table, holding the example's version already (as the example registers it)."""

    def __init__(self, held: StoredModel) -> None:
        self.held = held
        self.saved: list[StoredModel] = []

    async def save_model(self, model: StoredModel) -> bool:
        self.saved.append(model)
        return False  # ON CONFLICT DO NOTHING: registered before

    async def model(self, model: str, version: int) -> StoredModel | None:
        return self.held if (model, version) == (self.held.model, self.held.version) else None


def example_known() -> tuple[ModelVersionRegistered, GoneArtifacts, Monitor, ModelReference]:
    """The example's version, known to monitoring (in memory), whose profile the store no longer has."""
    registered = EXAMPLES[ModelVersionRegistered]
    assert isinstance(registered, ModelVersionRegistered)
    artifacts = GoneArtifacts()
    monitor = make_monitor(MonitoringSettings(), artifacts=artifacts, source="/test/monitoring")
    known = dataclasses.replace(reference(), model=registered.model, version=registered.model_version)
    monitor.live.add_reference(known)
    return registered, artifacts, monitor, known


async def test_a_version_registered_again_changes_nothing() -> None:
    registered, artifacts, monitor, known = example_known()

    await on_model_version_registered(
        new_event(registered, source="/registry"),
        monitor=monitor,
        store=KnownVersions(stored_as(registered)),  # type: ignore[arg-type]
    )

    assert monitor.live.references[(registered.model, registered.model_version)] is known
    assert artifacts.loads == 0


@pytest.mark.parametrize("other", ["profile", "signature"])
async def test_a_version_registered_again_with_another_profile_or_signature_is_dead_lettered(
    other: str,
) -> None:
    """A version is one model: monitoring keeps it as first registered, as serving and validation do, and
    refuses in the open a registration that contradicts it (before, it was skipped without a word)."""
    registered, artifacts, monitor, known = example_known()
    if other == "profile":
        change: dict[str, Any] = {"profile": registered.profile.model_copy(update={"key": "0" * 64})}
    else:
        change = {"signature": registered.signature.model_copy(update={"target": "another_target"})}
    contradicting = registered.model_copy(update=change)

    with pytest.raises(PermanentError) as refused:
        await on_model_version_registered(
            new_event(contradicting, source="/registry"),
            monitor=monitor,
            store=KnownVersions(stored_as(registered)),  # type: ignore[arg-type]
        )

    assert f"{registered.model} version {registered.model_version} is registered with another" in str(
        refused.value
    )
    assert other in str(refused.value)
    assert monitor.live.references[(registered.model, registered.model_version)] is known
    assert artifacts.loads == 0
