"""Each service's OpenAPI document says how it refuses: the error answers its app gives (a 422 that says
what and where, 401, 404, 409, 413, ...) have the documented status and body. No database: the requests
here are refused before any handler reads a row."""

from __future__ import annotations

import importlib
import types
from typing import Any

import httpx
import jsonschema_rs
import pytest
from fastapi import APIRouter, FastAPI
from openapi_spec_validator import validate as validate_openapi

from libs.http import BodyRoute, create_app
from services.registry.settings import RegistrySettings

ADMIN = {"Authorization": "Bearer dev-admin"}
SETTINGS = {
    "registry": "services.registry.settings:RegistrySettings",
    "training": "services.training.settings:TrainingSettings",
    "validation": "services.validation.settings:ValidationSettings",
    "serving": "services.serving.settings:ServingSettings",
    "monitoring": "services.monitoring.settings:MonitoringSettings",
    "audit": "services.audit.settings:AuditSettings",
}


def app_of(service: str) -> FastAPI:
    module, name = SETTINGS[service].split(":")
    settings = getattr(importlib.import_module(module), name)(env="test")
    api = importlib.import_module(f"services.{service}.api")
    hot = [api.hot_router] if hasattr(api, "hot_router") else []
    app = create_app(settings, title=service, description=service, routers=[api.router], hot=hot)
    if service == "serving":  # the routes' context; these requests are refused before they use it
        app.state.serving = types.SimpleNamespace(max_feedback_items=10_000)
    return app


async def answer(service: str, method: str, url: str, **kw: Any) -> tuple[dict[str, Any], httpx.Response]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app_of(service)), base_url="http://t"
    ) as c:
        doc = (await c.get("/openapi.json")).json()
        return doc, await c.request(method, url, **kw)


def documented(doc: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any] | None:
    responses = doc["paths"][path][method]["responses"]
    response = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX")
    if response is None:
        return None
    return {**response["content"]["application/json"]["schema"], "components": doc["components"]}


def _schema_of(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` itself, or the component it refers to."""
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].removeprefix("#/components/schemas/")]
    return schema


def conforms(doc: dict[str, Any], path: str, method: str, r: httpx.Response) -> list[str]:
    """What in ``r``'s JSON body the document's schema for it refuses; a schema naming no properties (which
    any object would pass) fails at once."""
    schema = documented(doc, path, method, r.status_code)
    assert schema is not None, f"{method.upper()} {path}: {r.status_code} is not documented"
    assert _schema_of(doc, schema).get("properties"), f"{method.upper()} {path}: {schema} names nothing"
    return [e.message for e in jsonschema_rs.validator_for(schema).iter_errors(r.json())]


@pytest.mark.parametrize("service", list(SETTINGS))
async def test_the_openapi_document_is_valid_against_the_openapi_schema(service: str) -> None:
    """What /openapi.json serves is a valid OpenAPI document (the official schema of its version, plus the
    checks no schema can make: unique operation ids, path parameters that are declared), so any client
    generator or gateway reads it."""
    doc, _ = await answer(service, "GET", "/health/live")

    validate_openapi(doc)


@pytest.mark.parametrize("service", list(SETTINGS))
async def test_every_operation_documents_its_error_answers(service: str) -> None:
    doc, _ = await answer(service, "GET", "/health/live")
    for path, operations in doc["paths"].items():
        if not path.startswith(("/v1/", "/v2/")):
            continue
        for method, operation in operations.items():
            assert {"422", "4XX"} <= operation["responses"].keys(), f"{method.upper()} {path}"
    assert "HTTPValidationError" not in doc.get("components", {}).get("schemas", {})


@pytest.mark.parametrize(
    ("service", "path", "url"),
    [
        ("registry", "/v1/datasets", "/v1/datasets?limit=0"),
        ("audit", "/v1/events", "/v1/events?limit=0"),
        ("training", "/v1/models/{model}/jobs", "/v1/models/m/jobs?limit=0"),
    ],
)
async def test_a_422_answer_has_the_documented_body(service: str, path: str, url: str) -> None:
    doc, r = await answer(service, "GET", url, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert conforms(doc, path, "get", r) == []


@pytest.mark.parametrize("service", list(SETTINGS))
async def test_a_401_answer_has_the_documented_body(service: str) -> None:
    doc, _ = await answer(service, "GET", "/health/live")
    path = next(p for p in doc["paths"] if p.startswith("/v1/") and "get" in doc["paths"][p])
    _, r = await answer(service, "GET", path.replace("{", "").replace("}", ""))
    assert r.status_code == 401, r.text
    assert conforms(doc, path, "get", r) == []


@pytest.mark.parametrize("service", list(SETTINGS))
async def test_every_documented_refusal_is_an_error_body_in_json(service: str) -> None:
    """Every 4xx answer is libs.http's error envelope in JSON, whatever the route's own answer is: a route
    that answers Markdown or HTML had its refusals documented in that media type, and one that describes a
    status of its own (the registry's 404 and 409 of a command, an upload's 422) documented it with no body
    at all, which a client generated from the document reads for that status in place of the 4XX range."""
    doc, _ = await answer(service, "GET", "/health/live")
    wrong = []
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                content = response.get("content", {})
                schema = content.get("application/json", {}).get("schema")
                if status.startswith("4") and (list(content) != ["application/json"] or schema is None):
                    wrong.append(f"{method.upper()} {path} {status}: {sorted(content)}")

    assert wrong == []


@pytest.mark.parametrize(
    ("service", "path", "url"),
    [
        ("registry", "/v1/models/{model}/versions/{version}/card", "/v1/models/m/versions/1/card"),
        ("monitoring", "/v1/models/{model}/drift.html", "/v1/models/m/drift.html"),
    ],
)
async def test_a_route_answering_text_documents_its_refusals_as_the_json_they_are(
    service: str, path: str, url: str
) -> None:
    doc, r = await answer(service, "GET", url)
    assert r.status_code == 401 and r.headers["content-type"] == "application/json", r.text
    assert conforms(doc, path, "get", r) == []


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/models/{model}/versions/{version}/promote", "404"),
        ("/v1/models/{model}/versions/{version}/promote", "409"),
        ("/v1/datasets", "422"),
        ("/v1/datasets", "413"),
    ],
)
async def test_a_status_a_route_describes_itself_keeps_the_error_body(path: str, status: str) -> None:
    doc, _ = await answer("registry", "GET", "/health/live")
    response = doc["paths"][path]["post"]["responses"][status]

    assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert response["description"] != "Successful Response"  # the route's own words stay


async def test_feedback_that_is_not_json_is_a_documented_422() -> None:
    doc, r = await answer(
        "serving",
        "POST",
        "/v1/feedback",
        content=b"not json",
        headers={"Authorization": "Bearer dev-predict"},
    )
    assert r.status_code == 422, r.text
    assert conforms(doc, "/v1/feedback", "post", r) == []


@pytest.mark.parametrize(
    ("service", "path", "url"),
    [
        ("registry", "/v1/models/{model}/versions/{version}/tags/{key}", "/v1/models/m/versions/1/tags/k"),
        ("monitoring", "/v1/models/{model}/policy", "/v1/models/m/policy"),
        ("training", "/v1/models/{model}/spec", "/v1/models/m/spec"),
    ],
)
async def test_a_405_allows_every_method_of_the_resource(service: str, path: str, url: str) -> None:
    doc, r = await answer(service, "OPTIONS", url, headers=ADMIN)
    assert r.status_code == 405
    documented = {m.upper() for m in doc["paths"][path]}
    # A GET route answers HEAD too, which the document does not list (libs.http.BodyRoute).
    head = {"HEAD"} if "GET" in documented else set()
    assert set(r.headers["allow"].replace(" ", "").split(",")) == documented | head


@pytest.mark.parametrize("path", ["/v1/models", "/v1/versions"])
async def test_the_registry_tag_filter_documents_that_a_key_is_needed(path: str) -> None:
    """parse_tag_filter refuses an empty key (`?tag=`, `?tag==x`); the document says so."""
    doc, _ = await answer("registry", "GET", "/health/live")
    [tag] = [p for p in doc["paths"][path]["get"]["parameters"] if p["name"] == "tag"]
    schema = {**tag["schema"], "components": doc["components"]}
    assert [jsonschema_rs.is_valid(schema, v) for v in ("", "=x", "owner", "owner=alice")] == [
        False,
        False,
        True,
        True,
    ]


@pytest.mark.parametrize(
    ("service", "path", "url"),
    [
        ("validation", "/v1/models/{model}/versions/{version}/report", "/v1/models/m/versions/{v}/report"),
        ("registry", "/v1/datasets/{name}/versions/{version}", "/v1/datasets/d/versions/{v}"),
        ("registry", "/v1/models/{model}/versions/{version}", "/v1/models/m/versions/{v}"),
        ("serving", "/v2/models/{name}/versions/{version}", "/v2/models/m/versions/{v}"),
    ],
)
@pytest.mark.parametrize("text", ["01", "1.0", "+1", "1_0", "0", "2147483648"])
async def test_a_version_written_another_way_is_a_documented_404_in_every_service(
    service: str, path: str, url: str, text: str
) -> None:
    # FastAPI's int path parameter read '01', '1.0' and '+1' as version 1 and '1_0' as 10: one version with
    # many names. Every service's version paths read a version one way (contracts.common.parse_version).
    doc, r = await answer(service, "GET", url.format(v=text), headers=ADMIN)
    assert r.status_code == 404, r.text
    assert "a whole number from 1 to 2147483647" in r.json()["detail"], r.text
    assert conforms(doc, path, "get", r) == []


@pytest.mark.parametrize("service", list(SETTINGS))
async def test_every_operation_documents_the_503_of_an_outage_with_its_retry_after(service: str) -> None:
    doc, _ = await answer(service, "GET", "/health/live")
    missing = []
    for path, operations in doc["paths"].items():
        if not path.startswith(("/v1/", "/v2/")) or path.startswith("/v2/health/"):
            continue
        for method, operation in operations.items():
            outage = operation["responses"].get("503", {})
            if "Retry-After" not in outage.get("headers", {}) or list(outage.get("content", {})) != [
                "application/json"
            ]:
                missing.append(f"{method.upper()} {path}")
    assert missing == []


async def test_an_outage_answer_has_the_documented_body_and_header() -> None:
    """Postgres away (an OSError from the handler) is a 503 with Retry-After, as the document says."""
    router = APIRouter(route_class=BodyRoute)

    @router.get("/v1/things")
    async def things() -> dict[str, str]:
        raise ConnectionRefusedError("connection refused")

    app = create_app(
        RegistrySettings(env="test"), title="t", description="t", routers=[router], ready=_unready
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        doc = (await c.get("/openapi.json")).json()
        r = await c.get("/v1/things")
        not_ready = await c.get("/health/ready")

    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
    assert conforms(doc, "/v1/things", "get", r) == []
    assert not_ready.status_code == 503
    assert conforms(doc, "/health/ready", "get", not_ready) == []


async def _unready() -> dict[str, bool]:
    return {"database": False}


async def test_the_oip_readiness_documents_its_503() -> None:
    doc, _ = await answer("serving", "GET", "/health/live")
    response = doc["paths"]["/v2/health/ready"]["get"]["responses"]["503"]
    schema = {**response["content"]["application/json"]["schema"], "components": doc["components"]}
    assert jsonschema_rs.is_valid(schema, {"ready": False, "checks": {"database": False}})


NO_BODY = {"204", "304"}


@pytest.mark.parametrize("service", list(SETTINGS))
async def test_every_success_answer_documents_what_it_holds(service: str) -> None:
    """A generated client reads a 2xx answer as the document says: one documented with no schema, an empty
    one or an object without properties (FastAPI's ``dict[str, Any]``) is ``Any`` to it, though the route
    answers a fixed structure. So every 2xx in JSON names its properties, text is a string, and any other
    media type (a file download, the audit export) is a file: ``format: binary``."""
    doc, _ = await answer(service, "GET", "/health/live")
    vague = []
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if not status.startswith("2") or status in NO_BODY:
                    continue
                where = f"{method.upper()} {path} {status}"
                content = response.get("content", {})
                if not content:
                    vague.append(f"{where}: no content")
                for media_type, described in content.items():
                    schema = _schema_of(doc, described.get("schema", {}))
                    if media_type == "application/json":
                        if not schema or (schema.get("type") == "object" and not schema.get("properties")):
                            vague.append(f"{where} {media_type}: {schema}")
                    elif media_type.startswith("text/"):
                        if schema.get("type") != "string":
                            vague.append(f"{where} {media_type}: {schema}")
                    elif schema != {"type": "string", "format": "binary"}:
                        vague.append(f"{where} {media_type}: {schema}")

    assert vague == []
