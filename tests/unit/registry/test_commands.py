"""Manual commands and dataset uploads: the core functions the HTTP API calls, on fakes."""

from __future__ import annotations

import re
from typing import Any

import pytest

from contracts.commands import ArchiveRequested, PromoteRequested, RetrainRequested, RollbackRequested
from contracts.common import Stage
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent
from libs.bus.core import bytes_over_limit, encode_outgoing
from libs.errors import Conflict, InvalidInput, NotFound
from services.registry import core
from services.registry.dataset_files import TableLimits, canonicalise
from services.registry.domain import Command
from services.registry.ports import Cause
from tests.unit.registry.fakes import FakeArtifacts, FakeDatasets, FakeVersions, training_completed

SOURCE = "/driftloop/registry"
CAUSE = Cause("e-1", "io.driftloop.TrainingCompleted.v1", None, "/driftloop/training", "e-1")


class Outbox:
    def __init__(self) -> None:
        self.events: list[CloudEvent[Any]] = []

    async def __call__(self, event: CloudEvent[Any]) -> None:
        self.events.append(event)


@pytest.fixture
async def versions() -> FakeVersions:
    v = FakeVersions()
    artifacts = FakeArtifacts()
    for run in ("a", "b", "c"):
        await v.register(training_completed(artifacts, run_id=run), CAUSE)
    v.versions[("churn", 2)].stage = Stage.PRODUCTION
    v.versions[("churn", 3)].stage = Stage.REJECTED
    return v


async def command(versions: FakeVersions, which: Command, version: int, **kw: Any) -> tuple[Any, Outbox]:
    outbox = Outbox()
    event = await core.request_command(
        which,
        "churn",
        version,
        reason="because",
        actor="user:alice",
        versions=versions,
        publish=outbox,
        source=SOURCE,
        **kw,
    )
    return event, outbox


async def test_promote_of_a_candidate_publishes_the_command_with_the_actor(versions: FakeVersions) -> None:
    event, outbox = await command(versions, Command.PROMOTE, 1)
    assert outbox.events == [event]
    assert isinstance(event.data, PromoteRequested) and event.data.model_version == 1
    assert event.actor == "user:alice" and event.source == SOURCE and event.subject == "churn"
    assert versions.stage("churn", 1) is Stage.CANDIDATE  # serving acts; the registry records the outcome


async def test_promote_of_a_rejected_version_is_a_conflict_listing_the_allowed_moves(
    versions: FakeVersions,
) -> None:
    with pytest.raises(Conflict) as caught:
        await command(versions, Command.PROMOTE, 3)
    assert caught.value.status == 409
    assert caught.value.extra == {"stage": "rejected", "allowed": ["archived"], "commands": ["archive"]}
    assert "cannot promote churn version 3: it is rejected" in caught.value.message


async def test_rollback_applies_to_versions_on_traffic_only(versions: FakeVersions) -> None:
    event, _ = await command(versions, Command.ROLLBACK, 2)
    assert isinstance(event.data, RollbackRequested)
    with pytest.raises(Conflict) as caught:
        await command(versions, Command.ROLLBACK, 1)
    assert caught.value.extra["commands"] == ["promote", "archive"]


async def test_rollback_to_a_rejected_version_is_a_conflict(versions: FakeVersions) -> None:
    with pytest.raises(Conflict, match="version 3 is rejected; it cannot move to production"):
        await command(versions, Command.ROLLBACK, 2, to_version=3)


async def test_rollback_of_a_canary_naming_a_to_version_is_a_conflict(versions: FakeVersions) -> None:
    # Serving gives a rolled-back canary's traffic to the stable version whatever to_version says.
    versions.versions[("churn", 1)].stage = Stage.CANARY
    with pytest.raises(Conflict, match="to_version is for a production rollback: churn version 1 is canary"):
        await command(versions, Command.ROLLBACK, 1, to_version=2)
    event, _ = await command(versions, Command.ROLLBACK, 1)
    assert isinstance(event.data, RollbackRequested) and event.data.to_version is None


async def test_archive_of_production_is_a_conflict(versions: FakeVersions) -> None:
    with pytest.raises(Conflict, match="archive applies to candidate, rejected versions"):
        await command(versions, Command.ARCHIVE, 2)
    event, _ = await command(versions, Command.ARCHIVE, 3)
    assert isinstance(event.data, ArchiveRequested)


async def test_unknown_model_or_version_is_not_found(versions: FakeVersions) -> None:
    with pytest.raises(NotFound, match="has no version 9"):
        await command(versions, Command.PROMOTE, 9)
    outbox = Outbox()
    with pytest.raises(NotFound, match="model 'nope' is not registered"):
        await core.request_command(
            Command.PROMOTE,
            "nope",
            1,
            reason="x",
            actor="user:a",
            versions=versions,
            publish=outbox,
            source=SOURCE,
        )
    assert outbox.events == []


async def test_retrain_needs_a_version_or_a_dataset_naming_the_model(versions: FakeVersions) -> None:
    datasets = FakeDatasets()
    outbox = Outbox()
    event = await core.request_retrain(
        "churn",
        reason="new export",
        ignore_cooldown=True,
        actor="user:bob",
        versions=versions,
        datasets=datasets,
        publish=outbox,
        source=SOURCE,
    )
    assert isinstance(event.data, RetrainRequested) and event.data.ignore_cooldown
    assert event.actor == "user:bob"
    with pytest.raises(NotFound, match="no dataset names it"):
        await core.request_retrain(
            "fraud",
            reason="x",
            ignore_cooldown=False,
            actor="user:bob",
            versions=versions,
            datasets=datasets,
            publish=outbox,
            source=SOURCE,
        )


CSV = b"tenure_months,monthly_charges,plan,churned\n1,20.5,basic,0\n24,70.1,premium,1\n"
LIMITS = TableLimits(columns=100, rows=1000, cells=10_000, text_bytes=1_000_000)


async def upload(
    versions: FakeVersions, datasets: FakeDatasets, data: bytes, models: list[str], outbox: Outbox
) -> tuple[Any, bool]:
    return await core.upload_dataset(
        "churn-base",
        canonicalise(data, filename="churn.csv", limits=LIMITS),
        models=models,
        description="export",
        actor="user:alice",
        versions=versions,
        datasets=datasets,
        artifacts=FakeArtifacts(),
        publish=outbox,
        source=SOURCE,
        max_event_bytes=1_000_000,
    )


async def test_upload_stores_a_new_version_and_announces_it_once(versions: FakeVersions) -> None:
    datasets, outbox = FakeDatasets(), Outbox()
    first, created = await upload(versions, datasets, CSV, ["churn"], outbox)
    assert created and first.version == 1 and first.row_count == 2
    again, created_again = await upload(versions, datasets, CSV, ["churn"], outbox)
    assert not created_again and again.version == 1
    changed, _ = await upload(versions, datasets, CSV + b"3,30.0,plus,0\n", ["churn"], outbox)
    assert changed.version == 2
    assert [e.data.dataset_version for e in outbox.events] == [1, 2]
    announced = outbox.events[0]
    assert isinstance(announced.data, DatasetRegistered)
    assert announced.data.models == ["churn"] and announced.data.source == "upload"
    assert announced.data.sha256 == first.sha256 == announced.data.artifact.key
    assert announced.actor == "user:alice"


async def test_upload_missing_a_feature_of_the_model_names_the_column(versions: FakeVersions) -> None:
    data = b"tenure_months,monthly_charges,churned\n1,20.5,0\n"
    with pytest.raises(InvalidInput) as caught:
        await upload(versions, FakeDatasets(), data, ["churn"], Outbox())
    assert caught.value.extra["column"] == "plan"
    assert (
        "column 'plan' is missing: it is a feature of churn (signature of version 3)" in caught.value.message
    )


async def test_upload_with_text_in_a_numeric_feature_names_the_column(versions: FakeVersions) -> None:
    data = b"tenure_months,monthly_charges,plan,churned\ntwelve,20.5,basic,0\n"
    with pytest.raises(InvalidInput, match="column 'tenure_months' must be numeric"):
        await upload(versions, FakeDatasets(), data, ["churn"], Outbox())


async def test_upload_for_a_model_without_versions_is_not_checked_against_a_signature(
    versions: FakeVersions,
) -> None:
    stored, created = await upload(versions, FakeDatasets(), b"a,b\n1,2\n", ["fraud"], Outbox())
    assert created and stored.columns == {"a": "int64", "b": "int64"}


@pytest.mark.parametrize(
    ("name", "models", "description", "message"),
    [
        ("churn\n", [], None, "dataset name 'churn\\n' must match"),
        ("churn-base", ["churn\n"], None, "model name 'churn\\n' must match"),
        ("churn-base", [], "a\x00b", "description holds a NUL character"),
    ],
)
async def test_an_upload_the_event_could_not_carry_is_refused_before_the_file_is_stored(
    versions: FakeVersions, name: str, models: list[str], description: str | None, message: str
) -> None:
    datasets, artifacts, outbox = FakeDatasets(), FakeArtifacts(), Outbox()
    with pytest.raises(InvalidInput, match=re.escape(message)):
        await core.upload_dataset(
            name,
            canonicalise(CSV, filename="churn.csv", limits=LIMITS),
            models=models,
            description=description,
            actor="user:alice",
            versions=versions,
            datasets=datasets,
            artifacts=artifacts,
            publish=outbox,
            source=SOURCE,
            max_event_bytes=1_000_000,
        )
    assert artifacts.blobs == {} and datasets.rows == {} and outbox.events == []


class SizedOutbox(Outbox):
    """The transaction's publish as on Postgres: an event consumers would refuse as oversized (over
    ``max_bytes``) is refused."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    async def __call__(self, event: CloudEvent[Any]) -> None:
        encode_outgoing(event, max_bytes=self.max_bytes)
        await super().__call__(event)


async def test_an_upload_too_wide_for_its_event_is_refused_naming_the_limit_before_the_file_is_stored(
    versions: FakeVersions,
) -> None:
    # Wide data (max_dataset_columns raised): DatasetRegistered lists every column's name and type, and
    # 10,000 columns of 100-character names make it 1.1 MB, over the default max_event_bytes of 1,000,000.
    # It was refused only when published, with a 413 that spoke of the event, after the file was stored.
    # The same at a tenth of the scale: 100 such columns against a limit of 10,000 bytes (canonicalising
    # 10,000 columns took most of the registry's unit tests' time).
    names = [f"sensor_{i:05d}_" + "reading" * 13 for i in range(100)]
    data = (",".join(names) + "\n" + ",".join("1" for _ in names) + "\n").encode()
    wide = canonicalise(
        data,
        filename="wide.csv",
        limits=TableLimits(columns=200, rows=10, cells=1_000, text_bytes=10**6),
    )
    datasets, artifacts, outbox = FakeDatasets(), FakeArtifacts(), SizedOutbox(max_bytes=10_000)
    with pytest.raises(InvalidInput) as caught:
        await core.upload_dataset(
            "sensors",
            wide,
            models=[],
            description=None,
            actor="user:alice",
            versions=versions,
            datasets=datasets,
            artifacts=artifacts,
            publish=outbox,
            source=SOURCE,
            max_event_bytes=10_000,
        )
    message = caught.value.message
    assert "100 columns" in message and "10,000 bytes" in message, message
    assert caught.value.extra["field"] == "file"
    assert artifacts.blobs == {} and datasets.rows == {} and outbox.events == []


async def test_an_upload_whose_event_passes_the_limit_only_with_the_files_uri_is_refused_before_it_is_stored(
    versions: FakeVersions,
) -> None:
    # The event was measured with an empty URI, the stored file's (here memory://<64 hex>) added after: an
    # upload whose DatasetRegistered fell within the URI's length of the limit passed the check, was stored,
    # and was refused when published (413 speaking of the event).
    dataset = canonicalise(CSV, filename="churn.csv", limits=LIMITS)

    async def upload_under(limit: int, outbox: Outbox, artifacts: FakeArtifacts) -> None:
        await core.upload_dataset(
            "churn-base",
            dataset,
            models=[],
            description=None,
            actor="user:alice",
            versions=versions,
            datasets=FakeDatasets(),
            artifacts=artifacts,
            publish=outbox,
            source=SOURCE,
            max_event_bytes=limit,
        )

    measured = Outbox()
    await upload_under(1_000_000, measured, FakeArtifacts())
    size = bytes_over_limit(measured.events[0], max_bytes=0)
    # A few bytes under the event's size (an event time of whole seconds is written 7 characters shorter).
    limit = size - 8

    class LimitedOutbox(Outbox):
        async def __call__(self, event: CloudEvent[Any]) -> None:
            encode_outgoing(event, max_bytes=limit)
            await super().__call__(event)

    artifacts, outbox = FakeArtifacts(), LimitedOutbox()
    with pytest.raises(InvalidInput) as caught:
        await upload_under(limit, outbox, artifacts)
    assert f"consumers accept {limit:,} bytes" in caught.value.message
    assert artifacts.blobs == {} and outbox.events == []
