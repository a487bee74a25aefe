"""A query parameter a route does not take is refused (422 naming it and the ones it takes), on every
service and both lanes: FastAPI ignores it, so ``GET /v1/models?stag=production`` (a typo of ``stage``)
answered another question than the one asked."""

from __future__ import annotations

from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel

from libs.http import BodyRoute, create_app
from libs.settings import ServiceSettings
from tests.unit.test_openapi_errors import ADMIN, answer, conforms


@pytest.mark.parametrize(
    ("service", "path", "url", "takes"),
    [
        ("registry", "/v1/models", "/v1/models?stag=production", "cursor, limit, prefix, stage, tag"),
        ("audit", "/v1/events", "/v1/events?modle=churn", "actor, correlation_id, cursor, kind, limit"),
        ("training", "/v1/models/{model}/jobs", "/v1/models/m/jobs?limt=5", "cursor, limit"),
        ("monitoring", "/v1/models/{model}/drift", "/v1/models/m/drift?limt=5", "cursor, limit"),
        (
            "validation",
            "/v1/models/{model}/versions/{version}/report",
            "/v1/models/m/versions/1/report?x=1",
            "none",
        ),
        ("serving", "/v1/models", "/v1/models?stag=production", "none"),
    ],
)
async def test_an_undeclared_query_parameter_is_a_documented_422_naming_it(
    service: str, path: str, url: str, takes: str
) -> None:
    doc, r = await answer(service, "GET", url, headers=ADMIN)
    assert r.status_code == 422, r.text
    given = url.partition("?")[2].partition("=")[0]
    assert r.json()["detail"].startswith(f"{path} takes no query parameter {given!r}; it takes {takes}"), (
        r.text
    )
    assert r.json()["field"] == given
    assert conforms(doc, path, "get", r) == []


async def test_an_undeclared_query_parameter_is_refused_on_the_hot_lane() -> None:
    """Serving's predict is served by HotRoutes, ahead of FastAPI: the same rule, before the token is read."""
    path = "/v1/models/{name}/predict"
    doc, r = await answer("serving", "POST", "/v1/models/churn/predict?version=2", json={"records": []})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == f"{path} takes no query parameter 'version'; it takes none"
    assert conforms(doc, path, "post", r) == []


class Page(BaseModel):
    size: int = 10


def _sort(order: str = "newest") -> str:
    return order


def example_app() -> httpx.AsyncClient:
    router = APIRouter(prefix="/v1", route_class=BodyRoute)
    hot = APIRouter(prefix="/v2", route_class=BodyRoute)

    @router.get("/items")
    async def items(
        order: Annotated[str, Depends(_sort)], page: Annotated[Page, Query()], q: str = ""
    ) -> dict[str, str]:
        return {"order": order, "q": q, "size": str(page.size)}

    @hot.post("/items/{name}")
    async def item(name: str, request: Request) -> Response:
        return Response(name)

    app = create_app(ServiceSettings(env="test"), title="t", description="t", routers=[router], hot=[hot])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.mark.parametrize(
    "query",
    ["", "?", "?q=x", "?order=oldest", "?size=5", "?q=x&order=oldest&size=5", "?q", "?&"],
)
async def test_the_parameters_of_a_route_its_dependencies_and_its_query_model_are_taken(query: str) -> None:
    async with example_app() as c:
        r = await c.get(f"/v1/items{query}")
    assert r.status_code == 200, r.text


async def test_an_undeclared_parameter_among_declared_ones_is_named() -> None:
    async with example_app() as c:
        r = await c.get("/v1/items?q=x&ordr=oldest")
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "/v1/items takes no query parameter 'ordr'; it takes order, q, size"
    assert r.json()["allowed"] == ["order", "q", "size"]


async def test_a_long_undeclared_parameter_is_quoted_short() -> None:
    async with example_app() as c:
        r = await c.get(f"/v1/items?{'x' * 5000}=1")
    assert r.status_code == 422, r.text
    assert len(r.json()["detail"]) < 200, r.text


async def test_a_long_parameter_given_twice_is_quoted_short() -> None:
    # Quoted whole, a name as long as the request line may be (hundreds of KiB) came back twice.
    async with example_app() as c:
        r = await c.get(f"/v1/items?{'x' * 5000}=1&{'x' * 5000}=2")
    assert r.status_code == 422, r.text
    assert "more than once" in r.json()["detail"] and len(r.json()["detail"]) < 200, r.text


@pytest.mark.parametrize(("query", "status"), [("", 200), ("?", 200), ("?debug=1", 422)])
async def test_a_hot_route_takes_no_query_parameter(query: str, status: int) -> None:
    async with example_app() as c:
        r = await c.post(f"/v2/items/churn{query}")
    assert r.status_code == status, r.text


@pytest.mark.parametrize("query", ["?x=1", "?"])
async def test_the_health_routes_take_no_query_parameter(query: str) -> None:
    async with example_app() as c:
        r = await c.get(f"/health/live{query}")
    assert r.status_code == (422 if query == "?x=1" else 200), r.text
