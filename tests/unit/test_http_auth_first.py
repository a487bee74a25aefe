"""A route whose body FastAPI reads (a JSON model, a form) checks the caller's token before it reads a byte of
the body, on every service: FastAPI parses such a body before it solves the route's dependencies, so a
request without a token made the registry read and parse up to its 65 MiB limit (for a 64 MiB JSON array of
zeros, 13 s of its event loop and 580 MB more memory on a 2-core test host) before answering 401, and told
the caller what was wrong with the body (422) rather than that it may not ask. And no route reads a body
before the token, whether or not it takes one."""

from __future__ import annotations

import importlib
import json
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.types import Message

from tests.unit.test_openapi_errors import SETTINGS, app_of

BODY = b'{"not": json'


def body_routes() -> list[tuple[str, str, str]]:
    """(service, method, path) of every route of the six services whose body FastAPI reads."""
    found = []
    for service in SETTINGS:
        for route in importlib.import_module(f"services.{service}.api").router.routes:
            if isinstance(route, APIRoute) and route.body_field is not None:
                found += [(service, method, route.path) for method in sorted(route.methods or ())]
    return found


async def answer(app: FastAPI, method: str, path: str, token: str | None) -> tuple[int, dict[str, Any], int]:
    """The status and body of the answer to a request with ``BODY``, and how many times the app asked for the
    body. Called straight, not through httpx, to count that."""
    reads = 0

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": BODY, "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    url = path.replace("{version}", "1").replace("{", "").replace("}", "")  # every other parameter: its name
    headers = [
        (b"host", b"t"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
    ]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": url,
        "raw_path": url.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("t", 80),
    }
    await app(scope, receive, send)
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), reads


ROUTES = body_routes()


def test_the_services_have_routes_whose_body_fastapi_reads() -> None:
    assert {service for service, _, _ in ROUTES} == {"registry", "serving", "monitoring"}, ROUTES


@pytest.mark.parametrize(("service", "method", "path"), ROUTES)
async def test_a_request_without_a_valid_token_is_refused_before_its_body_is_read(
    service: str, method: str, path: str
) -> None:
    app = app_of(service)
    for token in (None, "not-a-token"):
        status, body, reads = await answer(app, method, path, token)
        assert (status, body["code"], reads) == (401, "unauthorized", 0), body


@pytest.mark.parametrize(("service", "method", "path"), ROUTES)
async def test_a_token_whose_role_may_not_is_refused_before_the_body_is_read(
    service: str, method: str, path: str
) -> None:
    for token in ("dev-predict", "dev-auditor"):  # every route here is an operator's command
        status, body, reads = await answer(app_of(service), method, path, token)
        assert (status, body["code"], reads) == (403, "forbidden", 0), body


@pytest.mark.parametrize(("service", "method", "path"), ROUTES)
async def test_a_caller_who_may_gets_the_body_read_and_judged(service: str, method: str, path: str) -> None:
    status, body, reads = await answer(app_of(service), method, path, "dev-admin")
    assert (status, body["code"]) == (422, "invalid-input"), body
    assert reads >= 1


OPEN = {
    ("serving", "GET", "/v2"),
    ("serving", "GET", "/v2/health/live"),
    ("serving", "GET", "/v2/health/ready"),
    ("serving", "GET", "/v2/models/{name}/ready"),
    ("serving", "GET", "/v2/models/{name}/versions/{version}/ready"),
}
"""The routes a client without a token may call: readiness and server metadata (docs/serving.md, HTTP)."""


def token_routes() -> list[tuple[str, str, str]]:
    """(service, method, path) of every route of the six services (their hot routes included) but OPEN."""
    found = []
    for service in SETTINGS:
        api = importlib.import_module(f"services.{service}.api")
        for router in (api.router, getattr(api, "hot_router", None)):
            for route in router.routes if router is not None else ():
                if isinstance(route, APIRoute):
                    found += [(service, method, route.path) for method in sorted(route.methods or ())]
    return [route for route in found if route not in OPEN]


@pytest.mark.parametrize(("service", "method", "path"), token_routes())
async def test_no_route_reads_a_body_before_the_token(service: str, method: str, path: str) -> None:
    """Whatever the route takes: the registry's check for repeated JSON keys, a dependency of its whole
    router, read and parsed a JSON body sent to a route that takes none (a GET, a DELETE) before the token
    was looked at, so 64 MiB of small objects cost 10 s of the registry's event loop and 1.6 GB before
    the 401."""
    status, body, reads = await answer(app_of(service), method, path, None)
    assert (status, body["code"], reads) == (401, "unauthorized", 0), body
