"""Who may call each route of the six services, as one table (libs.auth: viewer reads, operator also sends
commands, auditor also reads traffic data and exports the audit trail, predict only predicts and sends
feedback). Each route is asked by every development token and by
a caller without one, and those the route lets past its token check must be exactly those its role admits:
a route added without a role, or with a weaker one than the table says (a viewer who may change state, a
predict token that may read the audit trail or the registry's datasets), fails here. The token check comes
first, so no route's state is built: a caller let past it gets whatever the route answers without it."""

from __future__ import annotations

import importlib

import httpx
import pytest
from fastapi.routing import APIRoute

from tests.unit.test_openapi_errors import SETTINGS, app_of

OPEN, ANY, VIEWER, OPERATOR, PREDICT = "open", "any token", "viewer", "operator", "predict"
AUDITOR = "auditor"

ROLES: dict[tuple[str, str, str], str] = {
    ("registry", "GET", "/v1/models"): VIEWER,
    ("registry", "GET", "/v1/models/{model}"): VIEWER,
    ("registry", "GET", "/v1/models/{model}/versions"): VIEWER,
    ("registry", "GET", "/v1/versions"): VIEWER,
    ("registry", "GET", "/v1/models/{model}/versions/{version}"): VIEWER,
    ("registry", "GET", "/v1/models/{model}/versions/{version}/artifact"): VIEWER,
    ("registry", "GET", "/v1/models/{model}/versions/{version}/card"): VIEWER,
    ("registry", "PUT", "/v1/models/{model}/versions/{version}/tags/{key}"): OPERATOR,
    ("registry", "DELETE", "/v1/models/{model}/versions/{version}/tags/{key}"): OPERATOR,
    ("registry", "POST", "/v1/models/{model}/versions/{version}/promote"): OPERATOR,
    ("registry", "POST", "/v1/models/{model}/versions/{version}/rollback"): OPERATOR,
    ("registry", "POST", "/v1/models/{model}/versions/{version}/archive"): OPERATOR,
    ("registry", "POST", "/v1/models/{model}/retrain"): OPERATOR,
    ("registry", "POST", "/v1/datasets"): OPERATOR,
    ("registry", "GET", "/v1/datasets"): VIEWER,
    ("registry", "GET", "/v1/datasets/{name}/versions/{version}"): VIEWER,
    ("registry", "GET", "/v1/datasets/{name}/versions/{version}/file"): VIEWER,
    ("training", "PUT", "/v1/models/{model}/spec"): OPERATOR,
    ("training", "GET", "/v1/models/{model}/spec"): VIEWER,
    ("training", "GET", "/v1/jobs/{job_id}"): VIEWER,
    ("training", "GET", "/v1/models/{model}/jobs"): VIEWER,
    ("validation", "GET", "/v1/reports/{report_id}"): VIEWER,
    ("validation", "GET", "/v1/models/{model}/versions/{version}/report"): VIEWER,
    ("serving", "GET", "/v2"): OPEN,
    ("serving", "GET", "/v2/health/live"): OPEN,
    ("serving", "GET", "/v2/health/ready"): OPEN,
    ("serving", "GET", "/v2/models/{name}/ready"): OPEN,
    ("serving", "GET", "/v2/models/{name}/versions/{version}/ready"): OPEN,
    ("serving", "GET", "/v2/models/{name}"): ANY,
    ("serving", "GET", "/v2/models/{name}/versions/{version}"): ANY,
    ("serving", "POST", "/v2/models/{name}/infer"): PREDICT,
    ("serving", "POST", "/v2/models/{name}/versions/{version}/infer"): PREDICT,
    ("serving", "POST", "/v1/models/{name}/predict"): PREDICT,
    ("serving", "POST", "/v1/feedback"): PREDICT,
    ("serving", "GET", "/v1/models"): VIEWER,
    ("serving", "GET", "/v1/models/{name}"): VIEWER,
    ("serving", "POST", "/v1/models/{name}/rollback"): OPERATOR,
    ("serving", "POST", "/v1/models/{name}/promote"): OPERATOR,
    ("monitoring", "GET", "/v1/models/{model}/drift"): VIEWER,
    ("monitoring", "GET", "/v1/models/{model}/windows/{window_id}"): VIEWER,
    ("monitoring", "GET", "/v1/models/{model}/drift.html"): VIEWER,
    ("monitoring", "GET", "/v1/status"): VIEWER,
    ("monitoring", "GET", "/v1/models/{model}/policy"): VIEWER,
    ("monitoring", "PUT", "/v1/models/{model}/policy"): OPERATOR,
    ("audit", "GET", "/v1/events"): VIEWER,
    ("audit", "GET", "/v1/events/{seq}"): VIEWER,
    ("audit", "GET", "/v1/trace/{correlation_id:path}"): VIEWER,
    ("audit", "GET", "/v1/verify"): VIEWER,
    ("audit", "GET", "/v1/export"): AUDITOR,
    ("audit", "GET", "/v1/checkpoints"): VIEWER,
    ("audit", "GET", "/v1/keys"): VIEWER,
    ("audit", "GET", "/v1/head"): VIEWER,
}
"""Every route the services add to create_app's own (health and /metrics, open), and who may call it."""

CALLERS = (None, "dev-viewer", "dev-operator", "dev-admin", "dev-predict", "dev-auditor")
ADMITTED = {
    OPEN: set(CALLERS),
    ANY: set(CALLERS) - {None},
    VIEWER: {"dev-viewer", "dev-operator", "dev-admin", "dev-auditor"},
    OPERATOR: {"dev-operator", "dev-admin"},
    AUDITOR: {"dev-auditor", "dev-admin"},
    PREDICT: {"dev-predict"},
}
"""The callers each role lets past the token check (libs.auth.GRANTS; admin may do everything but predict)."""


def service_routes() -> set[tuple[str, str, str]]:
    """(service, method, path) of every route of the six services' routers, hot routes included."""
    found = set()
    for service in SETTINGS:
        api = importlib.import_module(f"services.{service}.api")
        for router in (api.router, getattr(api, "hot_router", None)):
            for route in router.routes if router is not None else ():
                if isinstance(route, APIRoute):
                    found |= {(service, method, route.path) for method in route.methods or ()}
    return found


def test_every_route_has_its_role_in_the_table() -> None:
    routes = service_routes()
    assert not routes - ROLES.keys(), "routes without a role in ROLES: give each one"
    assert not ROLES.keys() - routes, "ROLES names routes that are gone"


async def admitted(service: str, method: str, path: str) -> set[str | None]:
    """The callers the route does not refuse with 401 or 403."""
    url = path.replace("{version}", "1").replace("{", "").replace("}", "")  # every other parameter: its name
    let_past = set()
    transport = httpx.ASGITransport(app=app_of(service), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for caller in CALLERS:
            headers = {"Authorization": f"Bearer {caller}"} if caller is not None else {}
            answer = await client.request(method, url, headers=headers)
            if answer.status_code not in (401, 403):
                let_past.add(caller)
    return let_past


@pytest.mark.parametrize(("service", "method", "path"), sorted(ROLES))
async def test_a_route_lets_past_exactly_the_callers_its_role_admits(
    service: str, method: str, path: str
) -> None:
    assert await admitted(service, method, path) == ADMITTED[ROLES[service, method, path]]
