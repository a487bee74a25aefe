"""Every whole number a query takes is written one way only (libs.http.InDigits), on every service: pydantic's
int reads '1_0' as 10, and '010', '+10', ' 10' and '10.0' as 10 too."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter

from libs.http import create_app
from libs.settings import ServiceSettings
from services.monitoring import api as monitoring_api
from services.monitoring.settings import MonitoringSettings
from services.training import api as training_api
from services.training.settings import TrainingSettings

VIEWER = {"Authorization": "Bearer dev-viewer"}


async def client_of(settings: ServiceSettings, router: APIRouter) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, title="t", description="", routers=[router])
    # Nothing behind the routes: a request that got past validation fails with a 500.
    app.state.runtime = app.state.monitor = object()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


@pytest.fixture
async def monitoring(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = MonitoringSettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
    async for c in client_of(settings, monitoring_api.router):
        yield c


@pytest.fixture
async def training(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = TrainingSettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
    async for c in client_of(settings, training_api.router):
        yield c


@pytest.mark.parametrize("limit", ["1_0", "010", "+10", "10.0", "%2010"])
@pytest.mark.parametrize("path", ["/v1/models/churn/drift", "/v1/models/churn/drift.html"])
async def test_a_monitoring_limit_written_another_way_is_422(
    monitoring: httpx.AsyncClient, path: str, limit: str
) -> None:
    r = await monitoring.get(f"{path}?limit={limit}", headers=VIEWER)
    assert r.status_code == 422, r.text
    assert "write a whole number in decimal digits" in r.json()["detail"], r.text


@pytest.mark.parametrize("limit", ["1_0", "010", "+10", "10.0", "%2010"])
async def test_a_training_limit_written_another_way_is_422(training: httpx.AsyncClient, limit: str) -> None:
    r = await training.get(f"/v1/models/churn/jobs?limit={limit}", headers=VIEWER)
    assert r.status_code == 422, r.text
    assert "write a whole number in decimal digits" in r.json()["detail"], r.text
