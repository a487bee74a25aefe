"""Exports stream at most DRIFTLOOP_AUDIT_EXPORT_CONCURRENCY at once: each holds a database connection until
its client has read it all, so one more is refused with a 429 and Retry-After instead of taking a connection
the trail's writer needs; a finished or failed export gives its slot back."""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from libs.errors import InvalidInput
from libs.http import create_app
from services.audit import api, core
from services.audit.settings import AuditSettings
from tests.waiting import eventually

AUDITOR = {"Authorization": "Bearer dev-auditor"}  # exports need the auditor role


class Trail:
    """A stand-in for the reading transaction: an export enters it, then waits until let go."""

    def __init__(self) -> None:
        self.inside = 0
        self.entered = 0
        self.go = asyncio.Event()

    @asynccontextmanager
    async def reading(self, *_: Any, **__: Any) -> AsyncIterator[object]:
        self.inside += 1
        self.entered += 1
        try:
            await self.go.wait()
            yield object()
        finally:
            self.inside -= 1


@pytest.fixture
def trail(monkeypatch: pytest.MonkeyPatch) -> Trail:
    trail = Trail()

    async def export_lines(_: object, *, from_seq: int, **__: Any) -> AsyncIterator[bytes]:
        if from_seq == 99:
            raise InvalidInput("no row 98", field="from_seq")
        yield b'{"header": true}\n'

    monkeypatch.setattr(api, "reading", trail.reading)
    monkeypatch.setattr(core, "export_lines", export_lines)
    return trail


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = AuditSettings(env="test", export_concurrency=2)
    app = create_app(settings, title="audit", description="audit", routers=[api.router])
    app.state.audit = types.SimpleNamespace(
        settings=settings,
        pool=None,
        role="audit_writer",
        archive=types.SimpleNamespace(read=lambda **_: []),
        exports=api.export_slots(settings.export_concurrency),
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit", headers=AUDITOR) as c:
        yield c


async def test_one_export_more_than_allowed_is_429_with_retry_after_and_a_slot_comes_back(
    client: httpx.AsyncClient, trail: Trail
) -> None:
    held = [asyncio.create_task(client.get("/v1/export")) for _ in range(2)]

    async def both_inside() -> bool:
        return trail.inside == 2

    await eventually(both_inside, deadline_s=5, interval_s=0.01)

    refused = await asyncio.wait_for(client.get("/v1/export"), timeout=10)
    assert refused.status_code == 429, refused.text
    assert refused.headers["Retry-After"] == "5"
    assert "2 exports are being streamed already" in refused.json()["detail"]
    assert "DRIFTLOOP_AUDIT_EXPORT_CONCURRENCY=2" in refused.json()["detail"]
    assert trail.inside == 2  # the refused one never took a connection

    trail.go.set()
    for r in await asyncio.gather(*held):
        assert r.status_code == 200 and r.text == '{"header": true}\n'
    again = await client.get("/v1/export")
    assert again.status_code == 200, again.text


async def test_an_export_refused_for_its_range_gives_its_slot_back(
    client: httpx.AsyncClient, trail: Trail
) -> None:
    trail.go.set()
    for _ in range(3):  # more than the two slots: each refusal released its own
        r = await client.get("/v1/export", params={"from_seq": 99})
        assert r.status_code == 422, r.text
    assert (await client.get("/v1/export")).status_code == 200


async def test_an_export_of_no_rows_is_refused_before_it_takes_a_slot_or_a_snapshot(trail: Trail) -> None:
    trail.go.set()
    settings = AuditSettings(env="test", export_concurrency=2)
    app = create_app(settings, title="audit", description="audit", routers=[api.router])
    slots = api.export_slots(settings.export_concurrency)
    slots.held = 2  # every slot taken: a range checked after the slot would be a 429
    app.state.audit = types.SimpleNamespace(settings=settings, pool=None, role="audit_writer", exports=slots)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit", headers=AUDITOR) as client:
        r = await client.get("/v1/export", params={"from_seq": 5, "to_seq": 3})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "to_seq must not be below from_seq"
    assert trail.entered == 0


async def test_a_head_of_the_export_takes_no_slot_connection_or_snapshot(
    client: httpx.AsyncClient, trail: Trail, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A load balancer's or curl's HEAD: its answer is what the request decides, with the GET's headers.
    exported = 0

    async def export_lines(*_: Any, **__: Any) -> AsyncIterator[bytes]:
        nonlocal exported
        exported += 1
        yield b'{"header": true}\n'

    monkeypatch.setattr(core, "export_lines", export_lines)
    trail.go.set()
    head = await client.head("/v1/export", params={"from_seq": 2})
    assert (trail.entered, exported) == (0, 0)
    assert head.status_code == 200, head.text
    assert head.headers["content-type"] == "application/x-ndjson"
    assert "content-length" not in head.headers and head.content == b""
    got = await client.get("/v1/export", params={"from_seq": 2})
    assert (got.status_code, got.headers["content-type"], exported) == (200, "application/x-ndjson", 1)


async def test_a_head_of_the_export_is_refused_as_its_get_would_be(trail: Trail) -> None:
    settings = AuditSettings(env="test", export_concurrency=2)
    app = create_app(settings, title="audit", description="audit", routers=[api.router])
    slots = api.export_slots(settings.export_concurrency)
    slots.held = 2
    app.state.audit = types.SimpleNamespace(settings=settings, pool=None, role="audit_writer", exports=slots)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit") as anyone:
        unknown = await anyone.head("/v1/export")
        client = httpx.AsyncClient(transport=transport, base_url="http://audit", headers=AUDITOR)
        async with client:
            full = await client.head("/v1/export")
            empty = await client.head("/v1/export", params={"from_seq": 5, "to_seq": 3})
    assert (unknown.status_code, unknown.headers["www-authenticate"], unknown.content) == (401, "Bearer", b"")
    assert (full.status_code, full.headers["retry-after"], full.content) == (429, "5", b"")
    assert (empty.status_code, empty.content) == (422, b"")
    assert slots.held == 2 and trail.entered == 0


def test_exports_may_not_take_every_connection_of_the_pool() -> None:
    with pytest.raises(
        ValueError, match="DRIFTLOOP_AUDIT_EXPORT_CONCURRENCY \\(8\\) must be below DRIFTLOOP_DB_POOL_MAX"
    ):
        AuditSettings(env="test", export_concurrency=8, db_pool_max=8)


REPORT = {
    "ok": True,
    "mode": "fast",
    "from_seq": 1,
    "to_seq": 0,
    "rows_checked": 0,
    "checkpoints_checked": 0,
    "covered_by_checkpoint": 0,
    "head_hash": "0" * 64,
    "first_bad_seq": None,
    "problem": None,
    "detail": None,
    "exact": True,
    "seals_checked": False,
    "elapsed_s": 0.0,
    "rows_per_s": 0,
}


def verifying_app() -> tuple[FastAPI, api.Slots]:
    """An audit app that runs one verification at a time (``core.verify_trail``, which each test replaces),
    and its slots."""
    settings = AuditSettings(env="test", verify_concurrency=1)
    app = create_app(settings, title="audit", description="audit", routers=[api.router])
    slots = api.verify_slots(settings.verify_concurrency)
    app.state.audit = types.SimpleNamespace(
        settings=settings,
        pool=None,
        role="audit_writer",
        keys=None,
        signer=types.SimpleNamespace(sealer=None),
        archive=types.SimpleNamespace(read=lambda **_: []),
        verifications=slots,
    )
    return app, slots


def verifications_run(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replaces ``core.verify_trail`` (tested on its own in test_verification.py) by one that answers at once;
    the arguments of each call it got, so a test shows what the route asked for, not only that it asked."""
    calls: list[dict[str, Any]] = []

    async def verify_trail(chain: object, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return types.SimpleNamespace(as_json=lambda: REPORT)

    monkeypatch.setattr(core, "verify_trail", verify_trail)
    return calls


async def test_one_verification_more_than_allowed_is_429_and_its_slot_comes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each verification holds verify_parallelism connections of the writer's pool while it runs; they were
    # not counted, so a few viewers asking at once took every connection the trail's writer needed.
    running = 0
    go = asyncio.Event()

    async def verify_trail(*_: Any, **__: Any) -> Any:
        nonlocal running
        running += 1
        await go.wait()
        return types.SimpleNamespace(as_json=lambda: REPORT)

    monkeypatch.setattr(core, "verify_trail", verify_trail)
    app, _ = verifying_app()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit", headers=AUDITOR) as client:
        held = asyncio.create_task(client.get("/v1/verify"))

        async def inside() -> bool:
            return running == 1

        await eventually(inside, deadline_s=5, interval_s=0.01)
        refused = await asyncio.wait_for(client.get("/v1/verify", params={"full": "true"}), timeout=10)
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "5"
        assert refused.json()["detail"] == (
            "1 verifications are running already, the most at once (DRIFTLOOP_AUDIT_VERIFY_CONCURRENCY=1): "
            "try again in 5 s"
        )
        assert running == 1  # the refused one never started
        go.set()
        assert (await held).json() == REPORT
        assert (await client.get("/v1/verify")).status_code == 200


def test_verifications_may_not_take_every_connection_of_the_pool() -> None:
    with pytest.raises(
        ValueError, match=r"\(2\) x DRIFTLOOP_AUDIT_VERIFY_PARALLELISM \(4\) = 8 must be below"
    ):
        AuditSettings(env="test", verify_concurrency=2, verify_parallelism=4, db_pool_max=8)
    AuditSettings(env="test", verify_concurrency=2, verify_parallelism=3, db_pool_max=8)


async def test_a_verification_of_no_rows_is_refused_before_it_takes_a_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = verifications_run(monkeypatch)
    app, slots = verifying_app()
    slots.held = 1  # every slot taken: a range checked after the slot would be a 429
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit", headers=AUDITOR) as client:
        r = await client.get("/v1/verify", params={"from_seq": 5, "to_seq": 3})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "to_seq must not be below from_seq"
    assert calls == []


async def test_a_head_of_verify_is_answered_from_the_request_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whether the chain holds is in the body (200 either way), and finding out reads the whole range: a HEAD
    # ran the whole verification for headers alone. It is refused as its GET would be (token, range, slots).
    calls = verifications_run(monkeypatch)
    app, slots = verifying_app()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit", headers=AUDITOR) as client:
        head = await client.head("/v1/verify", params={"full": "true"})
        assert (head.status_code, head.headers["content-type"], head.content) == (
            200,
            "application/json",
            b"",
        )
        assert "content-length" not in head.headers
        assert calls == []
        empty = await client.head("/v1/verify", params={"from_seq": 5, "to_seq": 3})
        slots.held = 1
        busy = await client.head("/v1/verify")
        slots.held = 0
        got = await client.get("/v1/verify")
    assert (empty.status_code, busy.status_code, busy.headers["retry-after"]) == (422, 429, "5")
    assert (got.json(), len(calls)) == (REPORT, 1)


async def test_a_verification_checks_the_range_and_the_depth_asked_with_the_parallelism_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The stand-in took any arguments: a route that dropped the range or `full` still passed every test here.
    calls = verifications_run(monkeypatch)
    app, _ = verifying_app()
    audit = app.state.audit
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit", headers=AUDITOR) as client:
        ranged = await client.get("/v1/verify", params={"from_seq": 3, "to_seq": 7, "full": "true"})
        whole = await client.get("/v1/verify")
    assert (ranged.status_code, whole.status_code) == (200, 200), (ranged.text, whole.text)
    common = {
        "keys": audit.keys,
        "sealer": audit.signer.sealer,
        "archives": [audit.archive],
        "parallelism": audit.settings.verify_parallelism,
    }
    assert calls == [
        {**common, "from_seq": 3, "to_seq": 7, "full": True},
        {**common, "from_seq": 1, "to_seq": None, "full": False},
    ]
