"""The audit API refuses malformed query input with a 422 that says what was wrong, before any row is read
(no database here: the app has no trail, so a request that got past the checks would be a 500)."""

from __future__ import annotations

import types
from collections.abc import AsyncIterator

import httpx
import pytest

from libs.http import create_app
from services.audit import api
from services.audit.settings import AuditSettings

AUDITOR = {"Authorization": "Bearer dev-auditor"}  # the export needs the auditor role; the rest, a viewer


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = AuditSettings(env="test")
    app = create_app(settings, title="audit", description="audit", routers=[api.router])
    app.state.audit = types.SimpleNamespace(settings=settings)  # no pool: nothing here may read the trail
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit", headers=AUDITOR) as c:
        yield c


@pytest.mark.parametrize("name", ["since", "until"])
@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("1700000000", "a number"),  # pydantic reads it as Unix time
        ("12", "a number"),
        ("-5", "a number"),
        ("1700000000.5", "a number"),
        ("1e9", "is not a time"),
        ("2025-01-01", "needs a time of day and a time zone"),  # pydantic reads it as naive midnight
        ("2025-01-01T00:00:00", "needs a time zone"),
        ("yesterday", "is not a time"),
        ("20250101T000000Z", "is not a time"),
        ("2025-02-30T00:00:00Z", "is not a time"),
        ("2025-01-01T00:00:00+24:00", "is not a time"),
    ],
)
async def test_a_time_that_is_not_iso_8601_with_a_zone_is_refused_saying_what_it_must_be(
    client: httpx.AsyncClient, name: str, value: str, says: str
) -> None:
    r = await client.get("/v1/events", params={name: value})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(f"{name} ") and says in detail, detail
    assert "ISO 8601" in detail and "2025-01-01T00:00:00Z" in detail, detail


@pytest.mark.parametrize("order", ["newest", "oldest"])
async def test_an_empty_cursor_is_refused_not_taken_for_the_first_page(
    client: httpx.AsyncClient, order: str
) -> None:
    # A client that sends the last page's null next_cursor as `cursor=` would page through the trail again
    # and again; the empty text is no cursor of any page.
    r = await client.get("/v1/events", params={"cursor": "", "order": order})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "cursor is not valid: pass the next_cursor of a previous page"


@pytest.mark.parametrize("name", ["model", "type", "actor", "correlation_id"])
async def test_a_filter_longer_than_the_index_holds_is_refused(client: httpx.AsyncClient, name: str) -> None:
    r = await client.get("/v1/events", params={name: "x" * 513})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{name} is longer than 512 characters"), r.text


@pytest.mark.parametrize("name", ["model", "type", "actor", "correlation_id"])
async def test_an_empty_filter_is_refused_naming_it_not_answered_with_an_empty_page(
    client: httpx.AsyncClient, name: str
) -> None:
    r = await client.get("/v1/events", params={name: ""})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(f"{name} is empty: give a value to match, or leave {name} out"), detail


@pytest.mark.parametrize(
    "url",
    [
        "/v1/events/1_0",  # pydantic's int read it as 10: the trail's row 10
        "/v1/events/010",
        "/v1/events/+10",
        "/v1/events/10.0",
        "/v1/events/%2010",
        "/v1/verify?from_seq=1_0",
        "/v1/verify?to_seq=05",
        "/v1/export?from_seq=2.0",
        "/v1/export?to_seq=+3",
        "/v1/events?limit=1_0",
        "/v1/checkpoints?limit=010",
    ],
)
async def test_a_sequence_number_or_limit_written_another_way_is_refused(
    client: httpx.AsyncClient, url: str
) -> None:
    r = await client.get(url)
    assert r.status_code == 422, r.text
    assert "write a whole number in decimal digits" in r.json()["detail"], r.text


@pytest.mark.parametrize("name", ["since", "until"])
@pytest.mark.parametrize("zone", ["+00:00", "+0100", "+05:30"])
async def test_a_zone_whose_plus_came_as_a_space_is_refused_saying_to_write_it_2b(
    client: httpx.AsyncClient, name: str, zone: str
) -> None:
    # '+' in a query string is a space: curl 'http://.../v1/events?since=2025-01-01T00:00:00+00:00' sent
    # "2025-01-01T00:00:00 00:00", answered with "is not a time", which named nothing that was wrong.
    r = await client.get(f"/v1/events?{name}=2025-01-01T00:00:00{zone}")
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{name} has a space where its zone's '+' goes"), r.text
    assert "%2B" in r.json()["detail"]
