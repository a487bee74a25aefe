"""A path with a slash more or less than a route's is redirected to the route's path, on the host and scheme
the client used: the redirect names the path alone, never a host. Starlette built it from the request's Host
header, so any client-chosen host came back in Location (``Host: evil.example`` was sent to
``http://evil.example/...``), and behind a proxy ending TLS an ``https`` request was sent to ``http``."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.test_openapi_errors import app_of


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("/health/live/", "/health/live"),
        ("/v1/models/?stage=production", "/v1/models?stage=production"),
        ("/metrics/", "/metrics"),
        ("/v1/models/a%3Fb%23c/", "/v1/models/a%3Fb%23c"),  # a "?" or a "#" of the path stays in it
    ],
)
async def test_a_stray_slash_is_redirected_to_the_path_alone_whatever_the_host(
    url: str, location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLOOP_ALLOWED_HOSTS", '["*"]')  # as in prod: any Host reaches the routes
    transport = httpx.ASGITransport(app=app_of("registry"), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="https://t") as c:
        r = await c.get(url, headers={"Host": "evil.example"})
    assert r.status_code == 307, r.text
    assert r.headers["location"] == location
