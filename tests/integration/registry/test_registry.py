"""The registry on the real broker, the real database and a real artifact store folder."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

from contracts.commands import REASON_MAX_CHARS, ArchiveRequested, PromoteRequested, within_reason
from contracts.common import ArtifactFormat
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent, new_event
from contracts.examples import EXAMPLES
from contracts.models import ModelStageChanged, ModelVersionRegistered, ModelVersionTagged
from contracts.registry import EVENT_TYPES
from contracts.rollouts import RollbackReason, RolloutPromoted, RolloutRolledBack, RolloutStarted
from contracts.validation import ValidationFailed, ValidationPassed
from libs.artifacts import ArtifactCorrupted, UntrustedArtifact, load_model
from services.registry import core
from services.registry.adapters.artifacts import StoreArtifacts
from services.registry.adapters.postgres import PgDatasets, PgVersions
from tests.integration.kafka_tools import eventually, unique
from tests.integration.registry.harness import AUTH, RunningRegistry, running_registry
from tests.unit.test_artifacts import pickle_that_creates


@pytest.fixture(scope="module")
async def registry(
    kafka_bootstrap: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningRegistry]:
    artifacts = tmp_path_factory.mktemp("artifacts")
    async with running_registry(kafka_bootstrap, database_url, artifacts, max_upload_bytes=64 * 1024) as r:
        yield r


def model_name() -> str:
    return unique("itest").replace("_", "-")


def serving(payload: Any, cause: CloudEvent[Any] | None = None) -> CloudEvent[Any]:
    return new_event(payload, source="/driftloop/serving", cause=cause)


def passed(model: str, version: int) -> CloudEvent[Any]:
    base = EXAMPLES[ValidationPassed]
    assert isinstance(base, ValidationPassed)
    payload = base.model_copy(update={"model": model, "model_version": version})
    return new_event(payload, source="/driftloop/validation")


def rollout(model: str, version: int, stable: int | None) -> list[CloudEvent[Any]]:
    return [
        passed(model, version),
        serving(
            RolloutStarted(
                rollout_id=f"r-{version}",
                model=model,
                stable_version=stable,
                canary_version=version,
                steps=[0.5, 1.0],
                weight=0.5,
                min_samples=1,
                bake_seconds=0,
            )
        ),
    ]


async def register(registry: RunningRegistry, model: str, run_id: str) -> CloudEvent[Any]:
    event = registry.training_completed(model, run_id)
    await registry.send(event)
    await registry.wait_handled(event)
    return event


async def test_training_completed_delivered_twice_gives_one_version(registry: RunningRegistry) -> None:
    model = model_name()
    event = registry.training_completed(model, "run-1")
    same_run_new_id = new_event(event.data, source="/driftloop/training")
    await registry.send(event, event, same_run_new_id)
    await registry.wait_handled(same_run_new_id)

    assert await registry.versions_of(model) == [1]
    [announced] = await registry.outbox(ModelVersionRegistered, model)
    assert announced["payload"]["model_version"] == 1
    assert announced["headers"]["ce_causationid"] == event.id
    page = (await registry.http.get(f"/v1/models/{model}/versions", headers=AUTH["viewer"])).json()
    assert [(v["version"], v["stage"]) for v in page["items"]] == [(1, "candidate")]


async def test_stage_history_of_a_promote_and_a_rollback_is_complete_and_ordered(
    registry: RunningRegistry,
) -> None:
    model = model_name()
    await register(registry, model, "run-1")
    promoted = serving(
        RolloutPromoted(
            rollout_id="r-1",
            model=model,
            model_version=1,
            previous_version=None,
            steps_completed=2,
            duration_seconds=5,
        )
    )
    await registry.send(*rollout(model, 1, None), promoted)
    await registry.wait_handled(promoted)

    await register(registry, model, "run-2")
    rolled_back = serving(
        RolloutRolledBack(
            rollout_id="r-2",
            model=model,
            stable_version=1,
            canary_version=2,
            step_index=0,
            weight=0.5,
            reason=RollbackReason.UNHEALTHY_VERDICT,
            message="errors 5% vs 0.1%",
        )
    )
    await registry.send(*rollout(model, 2, 1), rolled_back)
    await registry.wait_handled(rolled_back)

    v1 = (await registry.http.get(f"/v1/models/{model}/versions/1", headers=AUTH["viewer"])).json()
    v2 = (await registry.http.get(f"/v1/models/{model}/versions/2", headers=AUTH["viewer"])).json()
    history = {
        n: [(h["from_stage"], h["to_stage"], h["event_type"].split(".")[2]) for h in v["stage_history"]]
        for n, v in ((1, v1), (2, v2))
    }
    assert history[1] == [
        (None, "candidate", "TrainingCompleted"),
        ("candidate", "canary", "RolloutStarted"),
        ("canary", "production", "RolloutPromoted"),
    ]
    assert history[2] == [
        (None, "candidate", "TrainingCompleted"),
        ("candidate", "canary", "RolloutStarted"),
        ("canary", "rejected", "RolloutRolledBack"),
    ]
    assert v1["stage_history"][2]["event_id"] == promoted.id
    assert v2["stage_history"][2]["event_id"] == rolled_back.id
    assert v2["stage_history"][2]["source"] == "/driftloop/serving"
    times = [h["changed_at"] for h in v1["stage_history"] + v2["stage_history"][1:]]
    assert times == sorted(times)
    assert v1["stage"] == "production" and v1["aliases"] == ["champion"]
    assert v2["stage"] == "rejected" and v2["aliases"] == []
    assert [r["report_id"] for r in v2["validation_reports"]] == ["vr-5d1e"]

    changes = [e["payload"] for e in await registry.outbox(ModelStageChanged, model)]
    assert [(c["model_version"], c["from_stage"], c["to_stage"]) for c in changes] == [
        (1, "candidate", "canary"),
        (1, "canary", "production"),
        (2, "candidate", "canary"),
        (2, "canary", "rejected"),
    ]
    assert changes[1]["caused_by"] == {"id": promoted.id, "type": promoted.type}
    # Numbered per model in the order made, and the history says which number each change had.
    assert [c["sequence"] for c in changes] == [1, 2, 3, 4]
    assert [h["sequence"] for h in v1["stage_history"]] == [None, 1, 2]
    assert [h["sequence"] for h in v2["stage_history"]] == [None, 3, 4]

    champion = await registry.http.get(f"/v1/models/{model}/versions/champion", headers=AUTH["viewer"])
    assert champion.json()["version"] == 1


async def test_a_promotion_overtaken_by_a_failed_validation_moves_the_rejected_version_to_production(
    registry: RunningRegistry,
) -> None:
    """The registry read a candidate's failed validation before serving's promotion of it on an operator's
    command: it follows serving (docs/registry.md, "A verdict that overtakes serving's decision")."""
    model = model_name()
    await register(registry, model, "run-1")
    first = serving(
        RolloutPromoted(
            rollout_id="r-1",
            model=model,
            model_version=1,
            previous_version=None,
            steps_completed=2,
            duration_seconds=5,
        )
    )
    await registry.send(*rollout(model, 1, None), first)
    await registry.wait_handled(first)
    await register(registry, model, "run-2")
    failed = EXAMPLES[ValidationFailed].model_copy(update={"model": model, "model_version": 2})
    promoted = serving(
        RolloutPromoted(
            rollout_id="r-2",
            model=model,
            model_version=2,
            previous_version=1,
            steps_completed=0,
            duration_seconds=0,
            manual=True,
        )
    )
    await registry.send(new_event(failed, source="/driftloop/validation"), promoted)
    await registry.wait_handled(promoted)

    v2 = (await registry.http.get(f"/v1/models/{model}/versions/2", headers=AUTH["viewer"])).json()
    assert [(h["from_stage"], h["to_stage"], h["event_type"].split(".")[2]) for h in v2["stage_history"]] == [
        (None, "candidate", "TrainingCompleted"),
        ("candidate", "rejected", "ValidationFailed"),
        ("rejected", "production", "RolloutPromoted"),
    ]
    assert "registry follows serving" in v2["stage_history"][2]["reason"]
    assert v2["stage"] == "production" and v2["aliases"] == ["champion"]
    assert await registry.versions_of(model) == [1, 2]
    changes = [e["payload"] for e in await registry.outbox(ModelStageChanged, model)]
    assert [(c["model_version"], c["from_stage"], c["to_stage"]) for c in changes][-3:] == [
        (2, "candidate", "rejected"),
        (1, "production", "archived"),
        (2, "rejected", "production"),
    ]


async def test_a_cut_validation_report_is_kept_with_its_totals_and_where_the_whole_is(
    registry: RunningRegistry,
) -> None:
    # A report too large for its event: the version page showed the part the event carried as the report.
    model = model_name()
    await register(registry, model, "run-1")
    base = EXAMPLES[ValidationFailed]
    assert isinstance(base, ValidationFailed)
    cut = base.model_copy(
        update={
            "model": model,
            "model_version": 1,
            "checks_truncated": True,
            "checks_total": 5_000,
            "failed_checks_total": 1_200,
        }
    )
    event = new_event(cut, source="/driftloop/validation")
    whole = passed(model, 1)  # validation's event of another report, from before the totals
    whole = new_event(
        whole.data.model_copy(update={"report_id": "vr-whole", "checks_total": None}),
        source="/driftloop/validation",
    )
    await registry.send(whole, event)
    await registry.wait_handled(event)

    page = (await registry.http.get(f"/v1/models/{model}/versions/1", headers=AUTH["viewer"])).json()
    reports = {r["report_id"]: r for r in page["validation_reports"]}
    shown = reports[cut.report_id]
    assert shown["checks_truncated"] is True
    assert (shown["checks_total"], shown["failed_checks_total"]) == (5_000, 1_200)
    assert shown["full_report_path"] == f"/v1/reports/{cut.report_id}"
    assert len(shown["checks"]) == len(cut.checks)
    assert reports["vr-whole"]["checks_truncated"] is False
    assert reports["vr-whole"]["checks_total"] == len(whole.data.checks)
    assert reports["vr-whole"]["failed_checks_total"] == 0
    card = await registry.http.get(f"/v1/models/{model}/versions/1/card", headers=AUTH["viewer"])
    assert f"{len(cut.checks)} of the 5000 checks" in card.text


async def test_a_report_re_sent_under_a_new_event_id_is_listed_once(registry: RunningRegistry) -> None:
    model = model_name()
    await register(registry, model, "run-1")
    first = passed(model, 1)
    again = new_event(first.data, source="/driftloop/validation")
    await registry.send(first, again)
    await registry.wait_handled(again)
    page = (await registry.http.get(f"/v1/models/{model}/versions/1", headers=AUTH["viewer"])).json()
    assert [r["report_id"] for r in page["validation_reports"]] == [first.data.report_id]
    assert page["aliases"] == ["challenger"]


def dead_lettered(registry: RunningRegistry, reason: str) -> float:
    """How many of the input topic's records this registry's consumer dead-lettered with ``reason``."""
    consumer = str(getattr(registry.rt.settings, "consumer_group", "registry"))
    labels = {"consumer": consumer, "topic": registry.topic, "reason": reason}
    return prometheus_client.REGISTRY.get_sample_value("driftloop_bus_dead_lettered_total", labels) or 0.0


async def test_a_run_id_too_long_for_the_index_is_dead_lettered_at_once_as_schema_invalid(
    registry: RunningRegistry,
) -> None:
    # 1,000 distinct three-byte characters: 3,000 bytes that do not compress, past a btree entry (2,704).
    model = model_name()
    long_run = "".join(chr(0x4E00 + i) for i in range(1_000))
    before = {r: dead_lettered(registry, r) for r in ("schema-invalid", "handler-failed")}
    await settle(registry, registry.training_completed(model, long_run))
    assert dead_lettered(registry, "schema-invalid") == before["schema-invalid"] + 1
    assert dead_lettered(registry, "handler-failed") == before["handler-failed"]
    assert await registry.versions_of(model) == []


async def test_commands_over_http_become_events_with_the_actor(registry: RunningRegistry) -> None:
    model = model_name()
    await register(registry, model, "run-1")

    denied = await registry.http.post(
        f"/v1/models/{model}/versions/1/promote", json={"reason": "go"}, headers=AUTH["viewer"]
    )
    assert denied.status_code == 403
    missing = await registry.http.post(
        f"/v1/models/{model}/versions/9/promote", json={"reason": "go"}, headers=AUTH["operator"]
    )
    assert missing.status_code == 404 and "has no version 9" in missing.json()["detail"]
    illegal = await registry.http.post(
        f"/v1/models/{model}/versions/1/rollback", json={"reason": "bad"}, headers=AUTH["operator"]
    )
    assert illegal.status_code == 409
    assert illegal.json()["allowed"] == ["canary", "production", "rejected", "archived"]
    assert illegal.json()["commands"] == ["promote", "archive"]

    blank = await registry.http.post(
        f"/v1/models/{model}/versions/1/promote", json={"reason": " \t"}, headers=AUTH["operator"]
    )
    assert blank.status_code == 422 and blank.json()["detail"].startswith("body.reason: "), blank.text

    accepted = await registry.http.post(
        f"/v1/models/{model}/versions/1/promote", json={"reason": "looks good"}, headers=AUTH["operator"]
    )
    assert accepted.status_code == 202
    assert accepted.json()["actor"] == "user:dev-operator"
    [promote] = await registry.outbox(PromoteRequested, model)
    assert promote["headers"]["ce_actor"] == "user:dev-operator"
    assert promote["payload"] == {"model": model, "model_version": 1, "reason": "looks good"}

    archive = await registry.http.post(
        f"/v1/models/{model}/versions/1/archive", json={"reason": "superseded"}, headers=AUTH["admin"]
    )
    assert archive.status_code == 202
    # The registry owns archiving: the command comes back to it as an event, as through the relay.
    [row] = await registry.fetch(
        "SELECT value, headers FROM outbox WHERE event_id = $1", archive.json()["event_id"]
    )
    request = EVENT_TYPES.decode(row["value"], [(k, v.encode()) for k, v in row["headers"]])
    assert isinstance(request.data, ArchiveRequested)
    await registry.send(request)
    await registry.wait_handled(request)
    v1 = (await registry.http.get(f"/v1/models/{model}/versions/1", headers=AUTH["viewer"])).json()
    assert v1["stage"] == "archived"
    assert v1["stage_history"][-1]["actor"] == "user:dev-admin"
    assert v1["stage_history"][-1]["reason"] == "archived on request: superseded"


async def test_an_archive_on_a_longest_reason_is_cut_alike_in_history_and_event(
    registry: RunningRegistry,
) -> None:
    # "archived on request: <reason>" around a reason at the commands' cap ran past it, into the history row
    # and an event that every consumer and the audit trail take; and a body in UTF-16 was read.
    model = model_name()
    await register(registry, model, "run-1")
    url = f"/v1/models/{model}/versions/1/archive"
    headers = {**AUTH["operator"], "content-type": "application/json"}
    utf16 = await registry.http.post(url, content='{"reason": "x"}'.encode("utf-16"), headers=headers)
    assert utf16.status_code == 422 and utf16.json()["detail"].startswith("the JSON body reads as UTF-16")
    longest = "r" * REASON_MAX_CHARS
    archive = await registry.http.post(url, json={"reason": longest}, headers=AUTH["operator"])
    assert archive.status_code == 202, archive.text
    [row] = await registry.fetch(
        "SELECT value, headers FROM outbox WHERE event_id = $1", archive.json()["event_id"]
    )
    request = EVENT_TYPES.decode(row["value"], [(k, v.encode()) for k, v in row["headers"]])
    await registry.send(request)
    await registry.wait_handled(request)

    cut = within_reason(f"archived on request: {longest}")
    assert len(cut) == REASON_MAX_CHARS and cut.endswith("r… (2,021 characters)")
    v1 = (await registry.http.get(f"/v1/models/{model}/versions/1", headers=AUTH["viewer"])).json()
    assert v1["stage"] == "archived" and v1["stage_history"][-1]["reason"] == cut
    [change] = await registry.outbox(ModelStageChanged, model)
    assert change["payload"]["reason"] == cut


async def test_a_download_the_client_holds_already_is_304_with_nothing_read(
    registry: RunningRegistry,
) -> None:
    # The file is named by its hash, which is its ETag: a client that sends it back holds these bytes, and
    # gets 304 without the file being read or hashed (it answers so even once the stored copy is damaged).
    model = model_name()
    event = await register(registry, model, "run-1")
    key = event.data.artifact.key
    url = f"/v1/models/{model}/versions/1/artifact"
    first = await registry.http.get(url, headers=AUTH["viewer"])
    assert first.status_code == 200 and first.headers["etag"] == f'"{key}"'
    for held in (f'"{key}"', f'W/"{key}"', f'"other", "{key}"', "*"):
        again = await registry.http.get(url, headers={**AUTH["viewer"], "If-None-Match": held})
        assert again.status_code == 304, held
        assert again.content == b"" and again.headers["etag"] == f'"{key}"'
    other = await registry.http.get(url, headers={**AUTH["viewer"], "If-None-Match": '"other"'})
    assert other.status_code == 200 and other.content == first.content
    # The profile is another file, with another tag.
    profile = await registry.http.get(
        f"{url}?kind=profile", headers={**AUTH["viewer"], "If-None-Match": f'"{key}"'}
    )
    assert profile.status_code == 200 and profile.headers["etag"] == f'"{event.data.profile.key}"'
    # Still checked: who may read it, and that the version exists.
    assert (await registry.http.get(url, headers={"If-None-Match": f'"{key}"'})).status_code == 401
    missing = f"/v1/models/{model}/versions/2/artifact"
    assert (
        await registry.http.get(missing, headers={**AUTH["viewer"], "If-None-Match": "*"})
    ).status_code == 404

    path = registry.stored_path(key)
    path.write_bytes(path.read_bytes()[:-1])
    kept = await registry.http.get(url, headers={**AUTH["viewer"], "If-None-Match": f'"{key}"'})
    assert kept.status_code == 304
    assert (await registry.http.get(url, headers=AUTH["viewer"])).status_code == 500


async def test_artifact_modified_on_disk_is_refused_with_a_clear_error(registry: RunningRegistry) -> None:
    model = model_name()
    event = await register(registry, model, "run-1")
    key = event.data.artifact.key
    ok = await registry.http.get(f"/v1/models/{model}/versions/1/artifact", headers=AUTH["viewer"])
    assert ok.status_code == 200 and ok.headers["x-content-sha256"] == key
    assert len(ok.content) == event.data.artifact.size_bytes

    path = registry.stored_path(key)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))

    refused = await registry.http.get(f"/v1/models/{model}/versions/1/artifact", headers=AUTH["viewer"])
    assert refused.status_code == 500
    body = refused.json()
    assert body["code"] == "artifact-corrupted"
    assert (
        f"artifact {key} is corrupted" in body["detail"]
        and "restore it from a backup or retrain" in body["detail"]
    )
    with pytest.raises(ArtifactCorrupted, match=f"artifact {key} is corrupted"):
        load_model(registry.store, key)

    # A new run announcing the damaged artifact is not registered either.
    again = registry.training_completed(model, "run-2", artifact=event.data.artifact)
    await registry.send(again)
    later = await register(registry, model, "run-3")  # one partition: settled after `again`
    rows = await registry.fetch(
        "SELECT version, run_id FROM model_versions WHERE model = $1 ORDER BY 1", model
    )
    assert [(r["version"], r["run_id"]) for r in rows] == [(1, "run-1"), (2, later.data.run_id)]


async def test_pickle_payload_is_refused_and_never_executed(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    model = model_name()
    marker = tmp_path / "pickle-ran"
    payload = registry.raw_artifact(pickle_that_creates(marker, protocol=2), ArtifactFormat.SKOPS)
    poisoned = registry.training_completed(model, "run-pickle", artifact=payload)
    await registry.send(poisoned)
    after = await register(registry, model, "run-clean")  # same partition: settled after the pickle

    assert await registry.versions_of(model) == [1]
    [v1] = await registry.fetch("SELECT run_id FROM model_versions WHERE model = $1", model)
    assert v1["run_id"] == after.data.run_id
    with pytest.raises(UntrustedArtifact, match="pickle"):
        load_model(registry.store, payload.key)
    assert not marker.exists()


async def test_lists_are_paginated_with_an_opaque_cursor(registry: RunningRegistry) -> None:
    model = model_name()
    for run in ("a", "b", "c"):
        await register(registry, model, f"run-{run}")
    first = (await registry.http.get(f"/v1/models/{model}/versions?limit=2", headers=AUTH["viewer"])).json()
    assert [v["version"] for v in first["items"]] == [3, 2]
    second = (
        await registry.http.get(
            f"/v1/models/{model}/versions",
            params={"limit": 2, "cursor": first["next_cursor"]},
            headers=AUTH["viewer"],
        )
    ).json()
    assert [v["version"] for v in second["items"]] == [1] and second["next_cursor"] is None

    too_big = await registry.http.get(f"/v1/models/{model}/versions?limit=101", headers=AUTH["viewer"])
    assert too_big.status_code == 422
    garbage = await registry.http.get(f"/v1/models/{model}/versions?cursor=xyz", headers=AUTH["viewer"])
    assert garbage.status_code == 422 and "cursor" in garbage.json()["detail"]
    unknown = await registry.http.get("/v1/models/no-such-model/versions", headers=AUTH["viewer"])
    assert unknown.status_code == 404
    searched = (
        await registry.http.get(
            "/v1/versions", params={"prefix": model, "stage": "candidate"}, headers=AUTH["viewer"]
        )
    ).json()
    assert [v["version"] for v in searched["items"]] == [3, 2, 1]

    tagged = await registry.http.put(
        f"/v1/models/{model}/versions/2/tags/team", json={"value": "growth"}, headers=AUTH["operator"]
    )
    assert tagged.status_code == 200
    by_tag = (
        await registry.http.get(
            f"/v1/models/{model}/versions", params={"tag": "team=growth"}, headers=AUTH["viewer"]
        )
    ).json()
    assert [(v["version"], v["tags"]) for v in by_tag["items"]] == [(2, {"team": "growth"})]
    # Tags are on the record: who set or removed what, and what it replaced.
    tag_url = f"/v1/models/{model}/versions/2/tags/team"
    assert (await registry.http.delete(tag_url, headers=AUTH["operator"])).status_code == 204
    assert (await registry.http.delete(tag_url, headers=AUTH["operator"])).status_code == 404
    tags = await registry.outbox(ModelVersionTagged, model)
    assert [(t["payload"]["value"], t["payload"]["previous"]) for t in tags] == [
        ("growth", None),
        (None, "growth"),
    ]
    assert {t["headers"]["ce_actor"] for t in tags} == {"user:dev-operator"}
    models = (await registry.http.get("/v1/models", params={"prefix": model}, headers=AUTH["viewer"])).json()
    assert [(m["name"], m["latest_version"], m["stages"]) for m in models["items"]] == [
        (model, 3, {"candidate": 3})
    ]


async def test_a_cursor_of_the_datasets_list_is_refused_by_the_versions_list(
    registry: RunningRegistry,
) -> None:
    # Both lists are sorted by (name, number), and their cursors had the same shape: the versions list read
    # a dataset's cursor as a version's and answered a page from wherever that fell.
    name = model_name()
    await register(registry, name, "run-a")
    await register(registry, name, "run-b")
    for rows in (b"a\n1\n", b"a\n2\n"):
        uploaded = await registry.http.post(
            "/v1/datasets",
            files={"file": ("d.csv", rows, "text/csv")},
            data={"name": name},
            headers=AUTH["operator"],
        )
        assert uploaded.status_code == 201, uploaded.text
    pages = {
        path: (
            await registry.http.get(path, params={"prefix": name, "limit": 1}, headers=AUTH["viewer"])
        ).json()
        for path in ("/v1/datasets", "/v1/versions")
    }
    for made_by, read_by in (("/v1/datasets", "/v1/versions"), ("/v1/versions", "/v1/datasets")):
        cursor = pages[made_by]["next_cursor"]
        assert cursor is not None
        own = await registry.http.get(
            made_by, params={"prefix": name, "cursor": cursor}, headers=AUTH["viewer"]
        )
        assert own.status_code == 200 and len(own.json()["items"]) == 1, own.text
        foreign = await registry.http.get(
            read_by, params={"prefix": name, "cursor": cursor}, headers=AUTH["viewer"]
        )
        assert foreign.status_code == 422, foreign.text
        assert foreign.json()["detail"] == "cursor does not belong to this list: pass its own next_cursor"


async def test_dataset_upload_is_validated_stored_and_announced(registry: RunningRegistry) -> None:
    model = model_name()
    await register(registry, model, "run-1")
    name = model_name()
    csv = b"tenure_months,monthly_charges,plan,churned\n1,20.5,basic,0\n24,70.1,premium,1\n"

    async def upload(data: bytes, filename: str = "d.csv", role: str = "operator", **form: str) -> Any:
        return await registry.http.post(
            "/v1/datasets",
            files={"file": (filename, data, "text/csv")},
            data={"name": name, "models": model, "description": "export", **form},
            headers=AUTH[role],
        )

    assert (await upload(csv, role="viewer")).status_code == 403
    created = await upload(csv)
    assert created.status_code == 201, created.text
    dataset = created.json()["dataset"]
    assert (dataset["version"], dataset["row_count"], dataset["models"]) == (1, 2, [model])
    assert dataset["columns"]["plan"] == "string"
    assert registry.stored_path(dataset["sha256"]).read_bytes()[:4] == b"PAR1"
    same = await upload(csv)
    assert same.status_code == 200 and same.json() == {"created": False, "dataset": dataset}

    [announced] = await registry.outbox(DatasetRegistered, name)
    assert announced["payload"]["models"] == [model]
    assert announced["headers"]["ce_actor"] == "user:dev-operator"

    latin1 = await upload(b"tenure_months,monthly_charges,plan,churned\n1,2.0,b\xe1sic,0\n")
    assert latin1.status_code == 422 and latin1.json()["column"] == "plan"
    assert "not UTF-8" in latin1.json()["detail"]
    missing = await upload(b"tenure_months,monthly_charges,churned\n1,2.0,0\n")
    assert missing.status_code == 422 and missing.json()["column"] == "plan"
    too_large = await upload(b"a,b\n" + b"1,2\n" * 20_000)
    assert too_large.status_code == 413

    downloaded = await registry.http.get(f"/v1/datasets/{name}/versions/1/file", headers=AUTH["viewer"])
    assert downloaded.status_code == 200 and downloaded.content[:4] == b"PAR1"
    listed = (await registry.http.get("/v1/datasets", params={"model": model}, headers=AUTH["viewer"])).json()
    assert [(d["name"], d["version"]) for d in listed["items"]] == [(name, 1)]

    retrain = await registry.http.post(
        f"/v1/models/{model_name()}/retrain", json={"reason": "x"}, headers=AUTH["operator"]
    )
    assert retrain.status_code == 404


async def upload_csv(registry: RunningRegistry, name: str, csv: bytes = b"a,b\n1,2\n") -> Any:
    return await registry.http.post(
        "/v1/datasets",
        files={"file": ("d.csv", csv, "text/csv")},
        data={"name": name},
        headers=AUTH["operator"],
    )


async def waiting_on(conn: Any, sessions: int = 1) -> None:
    """Return once ``sessions`` other sessions wait for a lock this connection's transaction holds."""

    async def waiting() -> bool:
        # pg_locks, not pg_stat_activity: that one is a snapshot taken once per transaction.
        count = await conn.fetchval(
            """SELECT count(DISTINCT pid) FROM pg_locks
               WHERE NOT granted AND pg_backend_pid() = ANY(pg_blocking_pids(pid))"""
        )
        return bool(count >= sessions)

    await eventually(waiting, deadline_s=30)


def training_set(registry: RunningRegistry, name: str) -> DatasetRegistered:
    ref = registry.raw_artifact(f"PAR1 training set {name}".encode(), ArtifactFormat.PARQUET)
    return DatasetRegistered(
        name=name,
        dataset_version=1,
        sha256=ref.key,
        artifact=ref,
        row_count=1,
        columns={"a": "int64"},
        source="training-set:job-1",
    )


async def test_the_same_file_uploaded_at_once_gives_one_version_announced_once(
    registry: RunningRegistry,
) -> None:
    name = model_name()
    async with registry.rt.begin() as tx:
        # The name held, so that the four uploads are all under way before any of them goes on.
        await PgDatasets(tx.conn).lock_name(name)
        uploads = [asyncio.create_task(upload_csv(registry, name)) for _ in range(4)]
        await waiting_on(tx.conn, sessions=4)
    results = await asyncio.gather(*uploads)
    assert sorted(r.status_code for r in results) == [200, 200, 200, 201], [r.text for r in results]
    assert {r.json()["dataset"]["version"] for r in results} == {1}
    assert len(await registry.outbox(DatasetRegistered, name)) == 1


async def test_an_upload_racing_a_dataset_registered_event_takes_the_next_version(
    registry: RunningRegistry,
) -> None:
    name = model_name()
    event = new_event(training_set(registry, name), source="/driftloop/training")
    async with registry.rt.begin() as tx:
        # Training's DatasetRegistered for version 1 is being recorded while an operator uploads.
        datasets = PgDatasets(tx.conn)
        assert await core.record_dataset(
            event, datasets=datasets, artifacts=StoreArtifacts(registry.store), source=registry.rt.source()
        )
        upload = asyncio.create_task(upload_csv(registry, name))
        await waiting_on(tx.conn)
    r = await upload
    assert r.status_code == 201, r.text
    assert r.json()["dataset"]["version"] == 2


async def test_an_upload_whose_number_another_writer_took_meanwhile_is_a_conflict(
    registry: RunningRegistry,
) -> None:
    name = model_name()
    async with registry.rt.pool.acquire() as conn, conn.transaction():
        # A writer that does not take the name's lock (a replica on older code) adds version 1 meanwhile.
        await PgDatasets(conn).add(training_set(registry, name), event_id=unique("ev"), actor=None)
        upload = asyncio.create_task(upload_csv(registry, name))
        await waiting_on(conn)
    r = await upload
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (
        f"another version of dataset {name!r} was registered while this one was stored; upload the file "
        "again (it gets the next version)"
    )
    assert (await upload_csv(registry, name)).json()["dataset"]["version"] == 2


async def settle(registry: RunningRegistry, *events: CloudEvent[Any]) -> None:
    """Send events and wait until the consumer settled them (handled or dead-lettered): a marker sent after
    them on the topic's one partition is handled."""
    marker = registry.training_completed(model_name(), "run-marker")
    await registry.send(*events, marker)
    await registry.wait_handled(marker)


@pytest.mark.parametrize("order", ["upload first", "training first", "at once"])
@pytest.mark.parametrize("output", ["training", "holdout"])
async def test_an_upload_cannot_take_a_version_of_a_name_training_registers_its_output_under(
    registry: RunningRegistry, order: str, output: str
) -> None:
    name = f"{model_name()}-{output}"
    # Training numbers the versions of <model>-training and <model>-holdout in its own tables: version 1
    # here, announced while an operator uploads a file under the same name.
    event = new_event(training_set(registry, name), source="/driftloop/training")
    if order == "upload first":
        upload = await upload_csv(registry, name)
        await settle(registry, event)
    elif order == "training first":
        await settle(registry, event)
        upload = await upload_csv(registry, name)
    else:
        upload, _ = await asyncio.gather(upload_csv(registry, name), settle(registry, event))
    assert upload.status_code == 422, upload.text
    assert upload.json()["field"] == "name"
    assert upload.json()["detail"] == (
        f"dataset name {name!r} is reserved for training's output: each run registers its training set "
        f"and holdout as <model>-training and <model>-holdout; upload under another name"
    )
    # Training's version is the one recorded, with training's file: lineage naming it finds it.
    rows = await registry.fetch("SELECT version, sha256, source FROM datasets WHERE name = $1", name)
    assert [tuple(r) for r in rows] == [(1, event.data.sha256, "training-set:job-1")]
    assert await registry.outbox(DatasetRegistered, name) == []


@pytest.mark.parametrize("fault", ["none", "missing", "another size"])
async def test_a_dataset_registered_whose_file_the_store_lacks_or_holds_at_another_size_is_rejected(
    registry: RunningRegistry, fault: str
) -> None:
    # Recorded, every download of it would fail (404, or 500 from the stat) for a fault of this event.
    name = f"{model_name()}-training"
    registered = training_set(registry, name)
    if fault == "missing":
        registry.stored_path(registered.artifact.key).unlink()
    elif fault == "another size":
        wrong = registered.artifact.model_copy(update={"size_bytes": registered.artifact.size_bytes + 1})
        registered = registered.model_copy(update={"artifact": wrong})
    before = dead_lettered(registry, "rejected")
    await settle(registry, new_event(registered, source="/driftloop/training"))
    rows = await registry.fetch("SELECT version FROM datasets WHERE name = $1", name)
    assert [r["version"] for r in rows] == ([1] if fault == "none" else [])
    assert dead_lettered(registry, "rejected") == before + (fault != "none")


async def test_model_card_in_markdown_and_html(registry: RunningRegistry) -> None:
    model = model_name()
    await register(registry, model, "run-1")
    check = passed(model, 1)
    await registry.send(check)
    await registry.wait_handled(check)
    md = await registry.http.get(f"/v1/models/{model}/versions/1/card", headers=AUTH["viewer"])
    assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
    assert f"# Model card: {model} version 1" in md.text
    assert "## Validation report vr-5d1e" in md.text and "## Stage history" in md.text
    html = await registry.http.get(
        f"/v1/models/{model}/versions/challenger/card?format=html", headers=AUTH["viewer"]
    )
    assert html.status_code == 200 and html.text.startswith("<!doctype html>")
    assert (await registry.http.get(f"/v1/models/{model}/versions/1/card")).status_code == 401


@pytest.mark.parametrize(
    "field",
    [
        "train_rows",
        "lineage.seed",
        "lineage.datasets.rows",
        "artifact.size_bytes",
        "dataset.row_count",
        "report.checks_total",
    ],
)
async def test_a_number_past_what_postgres_stores_is_dead_lettered_at_once_as_schema_invalid(
    registry: RunningRegistry, field: str
) -> None:
    # 2**63 passes a bigint column (and 2**64 orjson's range for jsonb): the contract's bounds keep them out.
    model = model_name()
    completed = registry.training_completed(model, "run-1")
    c = completed.data
    too_big = {"artifact.size_bytes": 2**64, "report.checks_total": 2**31}.get(field, 2**63)
    event: CloudEvent[Any]
    if field == "report.checks_total":
        await register(registry, model, "run-1")
        report = passed(model, 1).data
        event = new_event(report.model_copy(update={"checks_total": too_big}), source="/driftloop/validation")
    elif field == "dataset.row_count":
        event = new_event(
            training_set(registry, f"{model}-training").model_copy(update={"row_count": too_big}),
            source="/driftloop/training",
        )
    else:
        if field == "train_rows":
            c = c.model_copy(update={"train_rows": too_big})
        elif field == "lineage.seed":
            c = c.model_copy(update={"lineage": c.lineage.model_copy(update={"seed": too_big})})
        elif field == "lineage.datasets.rows":
            cut = [d.model_copy(update={"rows": too_big}) for d in c.lineage.datasets]
            c = c.model_copy(update={"lineage": c.lineage.model_copy(update={"datasets": cut})})
        else:
            c = c.model_copy(update={"artifact": c.artifact.model_copy(update={"size_bytes": too_big})})
        event = new_event(c, source="/driftloop/training")
    before = {r: dead_lettered(registry, r) for r in ("schema-invalid", "handler-failed")}
    await settle(registry, event)
    assert dead_lettered(registry, "schema-invalid") == before["schema-invalid"] + 1
    assert dead_lettered(registry, "handler-failed") == before["handler-failed"]
    assert await registry.versions_of(model) == ([1] if field == "report.checks_total" else [])


@pytest.mark.parametrize("second", ["production", "candidate"])
async def test_two_promotions_of_a_model_at_once_leave_one_version_in_production(
    registry: RunningRegistry, second: str
) -> None:
    model = model_name()
    for run in ("run-1", "run-2", "run-3"):
        await register(registry, model, run)

    async def promote(tx: Any, version: int) -> None:
        event = serving(PromoteRequested(model=model, model_version=version, reason=f"promote {version}"))
        await core.promote(
            model,
            version,
            reason=f"promote {version}",
            event=event,
            versions=PgVersions(tx.conn),
            publish=tx.publish,
            source=registry.rt.source(),
        )

    async def promote_alone(version: int) -> None:
        async with registry.rt.begin() as tx:
            await promote(tx, version)

    if second == "production":
        await promote_alone(1)
    async with registry.rt.begin() as tx:
        # Version 2 is being promoted (version 1 archived, not yet committed) when version 3's promotion
        # arrives (a rollout event and a replica's redelivery on another consumer, say).
        await promote(tx, 2)
        other = asyncio.create_task(promote_alone(3))
        await waiting_on(tx.conn)
    await other

    rows = await registry.fetch(
        "SELECT version, stage FROM model_versions WHERE model = $1 ORDER BY version", model
    )
    stages = {r["version"]: r["stage"] for r in rows}
    assert [v for v, s in stages.items() if s == "production"] == [3], stages
    assert stages[2] == "archived", stages
