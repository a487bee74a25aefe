"""Every service's HTTP answer while Postgres or the artifact store is unavailable: a 503 with Retry-After
that says so (the request may be sent again), never a 500; an error that is the service's own fault stays a
500. Routes on FastAPI's router and on the hot lane (serving's predict path) alike."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from fastapi import APIRouter, Request

from libs.artifacts import StoreUnavailable
from libs.http import UNAVAILABLE_RETRY_AFTER_S, BodyRoute, create_app
from libs.settings import ServiceSettings

ERRORS: dict[str, Exception] = {
    "refused": ConnectionRefusedError(111, "Connection refused"),
    "timeout": TimeoutError("timed out"),
    "postgres-restarting": asyncpg.CannotConnectNowError("the database system is starting up"),
    "postgres-admin-shutdown": asyncpg.AdminShutdownError("terminating connection"),
    # The bus dead-letters an event after a while for it (it may be the event's); a request may be sent again.
    "statement-timeout": asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
    "pool-closed": asyncpg.InterfaceError("pool is closed"),
    "unique-violation": asyncpg.UniqueViolationError("duplicate key"),
    "missing-file": FileNotFoundError(2, "No such file"),
    "store-refusing": StoreUnavailable("the artifact store failed on reading ... (PermissionError: denied)"),
}


def router(prefix: str) -> APIRouter:
    r = APIRouter(prefix=prefix, route_class=BodyRoute)

    @r.get("/fail/{kind}")
    async def fail(kind: str, request: Request) -> None:
        raise ERRORS[kind]

    return r


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        ServiceSettings(env="test"), title="t", description="t", routers=[router("/v1")], hot=[router("/v2")]
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


@pytest.mark.parametrize("lane", ["/v1", "/v2"])
@pytest.mark.parametrize(
    "kind",
    [
        "refused",
        "timeout",
        "postgres-restarting",
        "postgres-admin-shutdown",
        "statement-timeout",
        "pool-closed",
        "store-refusing",
    ],
)
async def test_an_unavailable_dependency_is_a_503_with_retry_after(
    client: httpx.AsyncClient, lane: str, kind: str
) -> None:
    r = await client.get(f"{lane}/fail/{kind}")
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == str(UNAVAILABLE_RETRY_AFTER_S)
    body = r.json()
    assert body["code"] == "unavailable"
    assert body["detail"].startswith("a service this one depends on is unavailable (")


@pytest.mark.parametrize("lane", ["/v1", "/v2"])
@pytest.mark.parametrize("kind", ["unique-violation", "missing-file"])
async def test_an_error_that_is_no_outage_stays_a_500(
    client: httpx.AsyncClient, lane: str, kind: str
) -> None:
    r = await client.get(f"{lane}/fail/{kind}")
    assert r.status_code == 500
