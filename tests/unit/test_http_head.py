"""Every GET route of every service answers HEAD as its GET (RFC 9110, 9.1: a general-purpose server supports
GET and HEAD; load balancers and uptime checkers probe health routes with it, and ``curl -I`` sends it): the
same status and headers, no body, the same checks first. FastAPI's routes answered it with 405. The OpenAPI
document lists GET only, as before.

httpx's ASGI transport stands in for the server here, and leaves a HEAD answer's body out as uvicorn does."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from libs.http import BodyRoute, create_app
from libs.settings import ServiceSettings
from tests.unit.test_openapi_errors import ADMIN, SETTINGS, app_of

# What a HEAD answer has to say as its GET does; the Date and such a server adds are not the app's.
SAME = ("content-type", "content-length", "www-authenticate", "allow", "retry-after")


def url_of(template: str) -> str:
    """A URL of the path ``template``: a version is 1, any other parameter its name."""
    return template.replace("{version}", "1").replace("{", "").replace("}", "")


def operations(service: str) -> dict[str, set[str]]:
    """Each path of the service's OpenAPI document and its methods, upper case."""
    paths = app_of(service).openapi()["paths"]
    return {path: {m.upper() for m in methods} for path, methods in paths.items()}


GET_ROUTES = [(s, p) for s in SETTINGS for p, methods in operations(s).items() if "GET" in methods]
VIEWED = [(s, p) for s, p in GET_ROUTES if p.startswith("/v1/")]  # a viewer's token, or 401
WITHOUT_GET = [(s, p) for s in SETTINGS for p, methods in operations(s).items() if "GET" not in methods]


async def get_and_head(
    service: str, url: str, headers: dict[str, str] | None = None
) -> tuple[httpx.Response, httpx.Response]:
    transport = httpx.ASGITransport(app=app_of(service), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as c:
        return await c.get(url), await c.head(url)


def assert_answered_alike(got: httpx.Response, head: httpx.Response) -> None:
    assert head.status_code == got.status_code, (got.status_code, head.status_code, got.text)
    assert {h: head.headers.get(h) for h in SAME} == {h: got.headers.get(h) for h in SAME}
    assert head.content == b""


def test_every_service_has_get_routes_to_answer_head() -> None:
    assert {s for s, _ in GET_ROUTES} == set(SETTINGS)
    assert ("audit", "/v1/export") in VIEWED and ("serving", "/v2/health/ready") in GET_ROUTES


@pytest.mark.parametrize(("service", "path"), VIEWED)
async def test_a_head_without_a_token_is_the_gets_401_without_its_body(service: str, path: str) -> None:
    got, head = await get_and_head(service, url_of(path))
    assert got.status_code == 401, got.text
    assert_answered_alike(got, head)


@pytest.mark.parametrize(("service", "path"), GET_ROUTES)
async def test_a_head_with_a_query_parameter_the_route_does_not_take_is_the_gets_422(
    service: str, path: str
) -> None:
    got, head = await get_and_head(service, url_of(path) + "?nope=1", ADMIN)
    assert got.status_code == 422, got.text
    assert_answered_alike(got, head)


@pytest.mark.parametrize("service", list(SETTINGS))
@pytest.mark.parametrize("path", ["/health/live", "/health/ready"])
async def test_every_services_health_answers_head(service: str, path: str) -> None:
    got, head = await get_and_head(service, path)
    assert got.status_code == 200, got.text
    assert_answered_alike(got, head)


@pytest.mark.parametrize(("service", "path"), WITHOUT_GET)
async def test_a_head_on_a_path_without_get_is_405_allowing_its_methods(service: str, path: str) -> None:
    """Serving's predict and infer among them: the hot lane leaves a HEAD to FastAPI, which refuses it."""
    transport = httpx.ASGITransport(app=app_of(service), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as c:
        r = await c.head(url_of(path))
    assert r.status_code == 405
    assert set(r.headers["allow"].split(", ")) == operations(service)[path]
    assert r.content == b""


async def test_a_405_allows_head_where_the_path_has_get() -> None:
    transport = httpx.ASGITransport(app=app_of("monitoring"), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as c:
        r = await c.delete("/v1/models/m/policy")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD, PUT"


@pytest.mark.parametrize("service", list(SETTINGS))
def test_the_openapi_document_lists_no_head_operation(service: str) -> None:
    assert not [p for p, methods in operations(service).items() if "HEAD" in methods]


class Downloads:
    """A route streaming a file, as the registry's downloads do: what a HEAD made of it."""

    def __init__(self) -> None:
        self.chunks_read = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in (b"abc", b"de"):
            self.chunks_read += 1
            yield chunk

    def app(self) -> httpx.AsyncClient:
        router = APIRouter(route_class=BodyRoute)

        @router.get("/file", response_class=StreamingResponse)
        async def download() -> Response:
            return StreamingResponse(
                self.chunks(), media_type="text/csv", headers={"Content-Length": "5", "ETag": '"k"'}
            )

        @router.get("/page", response_class=StreamingResponse)
        async def page() -> Response:
            return StreamingResponse(self.chunks(), media_type="application/x-ndjson")

        app = create_app(ServiceSettings(env="test"), title="t", description="t", routers=[router])
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.mark.parametrize("path", ["/file", "/page"])
async def test_a_head_never_reads_a_streamed_answer(path: str) -> None:
    downloads = Downloads()
    async with downloads.app() as c:
        head = await c.head(path)
        assert downloads.chunks_read == 0
        got = await c.get(path)
    assert downloads.chunks_read == 2 and got.content == b"abcde"
    assert_answered_alike(got, head)
    assert head.headers.get("etag") == got.headers.get("etag")
    # The stream's own Content-Length where the route set one; chunked otherwise, for both.
    assert head.headers.get("content-length") == ("5" if path == "/file" else None)
