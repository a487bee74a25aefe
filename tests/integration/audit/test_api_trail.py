"""The audit API in process on a trail in the real Postgres: what a client program reads."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.audit import AuditCheckpoint
from contracts.envelope import NotJson
from libs.bus.core import Delivery, Record
from libs.http import create_app
from services.audit import api
from services.audit.adapters.files import CheckpointFile
from services.audit.adapters.postgres import reading
from services.audit.domain import DATA_MAX_DEPTH, KeyRing
from services.audit.settings import AuditSettings
from tests.integration.audit.conftest import ROLE, TrailDb
from tests.unit.audit.fakes import small_and_large

VIEWER = {"Authorization": "Bearer dev-viewer"}
AUDITOR = {"Authorization": "Bearer dev-auditor"}  # the export needs the auditor role


class ReadWatched(CheckpointFile):
    """The checkpoint file, noting the thread each read runs on."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.read_on: list[int] = []

    def read(
        self, *, after: int = 0, upto: int | None = None, page: int | None = None
    ) -> list[AuditCheckpoint]:
        self.read_on.append(threading.get_ident())
        return super().read(after=after, upto=upto, page=page)


@pytest.fixture
async def client(trail_db: TrailDb, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = AuditSettings(env="test", writer_role=ROLE, db_schema=trail_db.schema)
    app = create_app(settings, title="audit", description="audit", routers=[api.router])
    app.state.audit = api.AuditContext(
        settings=settings,
        pool=trail_db.pool,
        signer=trail_db.signer,
        keys=KeyRing([trail_db.signer.public_raw]),
        archive=ReadWatched(tmp_path / "checkpoints.ndjson"),
        exports=api.export_slots(settings.export_concurrency),
        verifications=api.verify_slots(settings.verify_concurrency),
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit", headers=VIEWER) as c:
        c.app = app  # type: ignore[attr-defined]
        yield c


def nested(depth: int) -> bytes:
    """A JSON value nested ``depth`` levels deep."""
    return b'{"a":' * (depth - 1) + b"[1]" + b"}" * (depth - 1)


async def test_a_value_nested_too_deep_for_the_response_is_shown_as_text_not_a_500(
    trail_db: TrailDb, client: httpx.AsyncClient
) -> None:
    # Any producer can send JSON nested 1,000 levels deep (as an undecodable record, the trail keeps it);
    # the response's serializer stops at about 250, so every page holding the row was a 500.
    deep, shallow = nested(1000), nested(20)
    await trail_db.record(
        [
            Delivery(Record("mlops.models", 0, i, b"churn", value, ()), None, NotJson("not an event"))
            for i, value in enumerate((deep, shallow))
        ]
    )

    r = await client.get("/v1/events", params={"order": "oldest"})
    assert r.status_code == 200, r.text
    first, second = r.json()["events"]
    assert first["data"] is None and first["value"] == deep.decode()
    assert second["data"] == json.loads(shallow) and second["value"] is None
    one = await client.get("/v1/events/1")
    assert one.status_code == 200 and one.json()["value"] == deep.decode()


async def test_a_trace_100_events_deep_shows_data_as_deep_as_an_event_may_show_it(
    trail_db: TrailDb, client: httpx.AsyncClient
) -> None:
    # The trace's own nesting counts towards the serializer's limit: its deepest event's data must fit.
    def link(i: int, value: bytes, cause: int | None = None) -> Delivery:
        headers = [("ce_id", f"e{i}".encode()), ("ce_correlationid", b"deep")]
        if i:
            headers.append(("ce_causationid", f"e{i - 1 if cause is None else cause}".encode()))
        record = Record("mlops.models", 0, i, b"churn", value, tuple(headers))
        return Delivery(record, None, NotJson("not an event"))

    await trail_db.record([link(i, b"{}") for i in range(99)] + [link(99, nested(DATA_MAX_DEPTH))])
    await trail_db.record([link(100, nested(DATA_MAX_DEPTH + 1), cause=98)])  # e99's sibling

    r = await client.get("/v1/trace/deep")
    assert r.status_code == 200, r.text
    node = r.json()["roots"][0]
    for _ in range(98):
        node = node["children"][0]
    deepest, beyond = node["children"]
    assert deepest["data"] == json.loads(nested(DATA_MAX_DEPTH))
    assert beyond["data"] is None and beyond["value"] == nested(DATA_MAX_DEPTH + 1).decode()


@pytest.mark.parametrize(
    "meta",
    [
        {"error": {"reason": 1}},
        {"error": "text"},
        {"kafka": {"partition": "0"}},
        {"kafka": {"offset": None, "reuse": "x"}},
        {"kind": 7},
        {"recorded_at": ["2025"]},
        {"headers": ["ce_id"]},
    ],
    ids=[
        "error-number",
        "error-text",
        "partition-text",
        "offset-null",
        "kind-number",
        "time-list",
        "headers",
    ],
)
async def test_a_record_replaced_by_json_of_another_shape_is_shown_unreadable_not_a_500(
    trail_db: TrailDb, client: httpx.AsyncClient, meta: dict[str, Any]
) -> None:
    # docs/audit.md: a row whose record was replaced in the database still shows, flagged unreadable; a
    # record that is JSON with fields of other types made the response fail its schema instead.
    await trail_db.fill(3)
    stored = json.loads(
        (await trail_db.pool.fetchval("SELECT record FROM trail WHERE seq = 2")).split(b"\n")[0]
    )
    changed = {**stored, **meta}
    if "kafka" in meta:
        changed["kafka"] = {**stored["kafka"], **meta["kafka"]}
    record = json.dumps(changed, sort_keys=True).encode() + b"\n{}"
    await trail_db.superuser("UPDATE trail SET record = $1 WHERE seq = 2", record)

    for path in ("/v1/events", "/v1/events/2"):
        r = await client.get(path)
        assert r.status_code == 200, (path, r.text)
        body = r.json()
        row = body if path.endswith("/2") else body["events"][1]
        assert row["seq"] == 2 and row["unreadable"].startswith("row 2 cannot be read: "), row
        assert row["kind"] is None


async def test_the_checkpoint_file_is_read_off_the_event_loop(
    trail_db: TrailDb, client: httpx.AsyncClient
) -> None:
    # Each export and verification reads every line of the file for its range's checkpoints: a year of
    # checkpoints once a minute is 525,600 lines (0.3 s per 100,000 measured, 1.7 s when every line was
    # made a checkpoint) with the writer's event loop stopped.
    await trail_db.fill(12, every=5)
    archive: ReadWatched = client.app.state.audit.archive  # type: ignore[attr-defined]
    async with reading(trail_db.pool, ROLE) as trail:
        archive.append(await trail.checkpoints())
    archive.read_on.clear()

    export = await client.get("/v1/export", headers=AUDITOR)
    assert export.status_code == 200 and export.text.count('"checkpoint"') == 2
    verify = await client.get("/v1/verify")
    assert verify.status_code == 200 and verify.json()["ok"], verify.text
    assert len(archive.read_on) == 2
    assert threading.get_ident() not in archive.read_on


@pytest.mark.parametrize("order", ["newest", "oldest"])
async def test_pages_of_large_records_end_at_query_max_bytes_and_the_cursors_return_every_event_once(
    trail_db: TrailDb, client: httpx.AsyncClient, order: str
) -> None:
    budget = 1024 * 1024
    context = client.app.state.audit  # type: ignore[attr-defined]
    client.app.state.audit = replace(  # type: ignore[attr-defined]
        context, settings=context.settings.model_copy(update={"query_max_bytes": budget})
    )
    await trail_db.record(small_and_large([0, 600_000, 0, 600_000, 600_000, 0, 2_000_000, 0, 0]))

    pages: list[list[int]] = []
    params = {"order": order, "limit": "5"}
    while True:
        r = await client.get("/v1/events", params=params)
        assert r.status_code == 200, r.text
        answer = r.json()
        pages.append([e["seq"] for e in answer["events"]])
        # About the budget and one record: the rows past it were not read, nor sent.
        assert len(pages[-1]) >= 1 and len(r.content) < 4 * budget
        if answer["next_cursor"] is None:
            break
        params["cursor"] = answer["next_cursor"]
    assert [seq for page in pages for seq in page] == sorted(range(1, 10), reverse=order == "newest")
    assert any(len(page) < 5 for page in pages[:-1])  # the bytes ended a page early; its cursor went on
