"""Every app answers only for the host names it is called by (``allowed_hosts``): a web page made to resolve
to 127.0.0.1 (DNS rebinding) names its own host in its requests' Host header, and is refused, so it cannot
use the dev-* tokens the services take outside prod. In prod any host is answered unless a list is set."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request, Response

from libs.http import BodyRoute, create_app
from libs.settings import COMPOSE_HOSTS, ServiceSettings
from tests.unit.test_deploy_compose import services

ADMIN = {"Authorization": "Bearer dev-admin"}
REFUSED = (
    "this service does not answer for the host 'evil.example:8101' (the request's Host header): call it by "
    "a name it answers for (outside prod, unless set otherwise: localhost, 127.0.0.1 or [::1]), or add this "
    "one to DRIFTLOOP_ALLOWED_HOSTS"
)


@pytest.fixture(autouse=True)
def product_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The product's own default, without the unit tests' host names (tests/unit/conftest.py)."""
    monkeypatch.delenv("DRIFTLOOP_ALLOWED_HOSTS")


def app_with(settings: ServiceSettings) -> FastAPI:
    """An app with a route on each lane (FastAPI's router and the hot lane)."""
    plain = APIRouter(prefix="/v1", route_class=BodyRoute)
    hot = APIRouter(prefix="/v2", route_class=BodyRoute)

    @plain.get("/plain")
    async def on_plain() -> dict[str, str]:
        return {"lane": "plain"}

    @hot.post("/hot/{name}")
    async def on_hot(name: str, request: Request) -> Response:
        return Response(name)

    return create_app(settings, title="t", description="t", routers=[plain], hot=[hot])


@pytest.fixture
async def dev() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_with(ServiceSettings(env="dev")))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8101", headers=ADMIN) as c:
        yield c


ROUTES = [
    ("GET", "/health/live"),
    ("GET", "/health/ready"),
    ("GET", "/metrics"),
    ("GET", "/v1/plain"),
    ("POST", "/v2/hot/churn"),
    ("GET", "/no/such/path"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_a_request_naming_another_host_is_refused_on_every_route(
    dev: httpx.AsyncClient, method: str, path: str
) -> None:
    r = await dev.request(method, path, headers={"Host": "evil.example:8101"})
    assert r.status_code == 421, r.text
    assert r.json() == {"error": REFUSED, "detail": REFUSED, "code": "misdirected-request"}


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8101", "127.0.0.1:8101", "[::1]", "[::1]:8101", "LocalHost:8101"]
)
@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/health/ready"), ("GET", "/v1/plain"), ("POST", "/v2/hot/a")]
)
async def test_the_names_of_this_machine_are_answered_on_any_port(
    dev: httpx.AsyncClient, host: str, method: str, path: str
) -> None:
    r = await dev.request(method, path, headers={"Host": host})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("service", [name for name, _ in services()])
async def test_the_compose_files_service_names_are_answered(dev: httpx.AsyncClient, service: str) -> None:
    assert service in COMPOSE_HOSTS
    r = await dev.get("/health/ready", headers={"Host": f"{service}:8101"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "host", ["evil.example", "127.0.0.1.evil.example", "localhost.", "[::2]:8101", "localhost:80:80", "[::1"]
)
async def test_only_the_names_themselves_are_answered(dev: httpx.AsyncClient, host: str) -> None:
    r = await dev.get("/health/live", headers={"Host": host})
    assert r.status_code == 421, r.text


async def test_test_mode_takes_the_dev_default() -> None:
    transport = httpx.ASGITransport(app=app_with(ServiceSettings(env="test")))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8104") as c:
        assert (await c.get("/health/live")).status_code == 200
        assert (await c.get("/health/live", headers={"Host": "evil.example"})).status_code == 421


async def test_prod_answers_any_host_by_default() -> None:
    transport = httpx.ASGITransport(app=app_with(ServiceSettings(env="prod")))
    async with httpx.AsyncClient(transport=transport, base_url="http://10.0.3.7:8101") as c:
        for host in ("10.0.3.7:8101", "registry.driftloop.svc.cluster.local", "evil.example:8101"):
            r = await c.get("/health/ready", headers={"Host": host})
            assert r.status_code == 200, r.text


@pytest.mark.parametrize("env", ["dev", "prod"])
async def test_a_list_that_is_set_is_what_is_answered(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_ALLOWED_HOSTS", '["API.example.com", "*.svc.cluster.local"]')
    transport = httpx.ASGITransport(app=app_with(ServiceSettings(env=env)))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as c:
        for host in ("api.example.com", "api.example.com:443", "registry.driftloop.svc.cluster.local:8101"):
            r = await c.get("/v1/plain", headers={"Host": host})
            assert r.status_code == 200, (host, r.text)
        for host in ("localhost", "127.0.0.1", "svc.cluster.local", "example.com", "evil.example"):
            r = await c.get("/v1/plain", headers={"Host": host})
            assert r.status_code == 421, (host, r.text)


async def asgi(app: FastAPI, scope_type: str, hosts: list[bytes]) -> list[dict[str, object]]:
    """What ``app`` sends for a request with exactly these Host headers (an HTTP client always sends one)."""
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        if scope_type == "websocket":
            return {"type": "websocket.connect"}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": scope_type,
        "asgi": {"version": "3.0"},
        "http_version": "1.0",
        "method": "GET",
        "scheme": "http" if scope_type == "http" else "ws",
        "path": "/health/live",
        "raw_path": b"/health/live",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", host) for host in hosts],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8101),
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    return sent


@pytest.mark.parametrize(
    ("hosts", "refused"),
    [
        ([b"localhost"], None),
        ([], "the request has no Host header: name the service's host in one"),
        ([b"localhost", b"evil.example"], "the request has more than one Host header: send one"),
        ([b"localhost", b"localhost"], "the request has more than one Host header: send one"),
    ],
)
async def test_a_request_without_one_host_header_is_a_bad_request(
    hosts: list[bytes], refused: str | None
) -> None:
    start, *rest = await asgi(app_with(ServiceSettings(env="dev")), "http", hosts)
    body = b"".join(m.get("body", b"") for m in rest)  # type: ignore[misc]
    if refused is None:
        assert start["status"] == 200
    else:
        assert start["status"] == 400
        assert refused.encode() in body


async def test_a_websocket_naming_another_host_is_closed_before_it_is_accepted() -> None:
    sent = await asgi(app_with(ServiceSettings(env="dev")), "websocket", [b"evil.example:8101"])
    assert sent == [{"type": "websocket.close", "code": 1008}]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (["localhost:8101"], "'localhost:8101' is not a host name"),
        (["::1"], "'::1' is not a host name"),
        (["http://localhost"], "'http://localhost' is not a host name"),
        ([], "name at least one host"),
        ("localhost,api.example.com", "it must be a JSON list"),
    ],
)
def test_a_host_list_that_is_not_one_is_refused_when_the_settings_load(value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ServiceSettings(allowed_hosts=value)


NETWORKS = ["api.example.com", "10.0.0.0/8", "[fd00::/8]"]


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("10.1.2.3", 200),
        ("10.1.2.3:8101", 200),
        ("10.255.255.255:9090", 200),
        ("11.1.2.3", 421),
        ("9.255.255.255:8101", 421),
        ("[fd00::1]", 200),
        ("[FD12:3456::a]:8101", 200),
        ("[fe80::1]", 421),
        ("[fc00::1]:8101", 421),
        ("api.example.com:443", 200),
    ],
)
async def test_an_ip_address_inside_a_network_of_the_list_is_answered(host: str, status: int) -> None:
    transport = httpx.ASGITransport(app=app_with(ServiceSettings(env="prod", allowed_hosts=NETWORKS)))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as c:
        for method, path in [("GET", "/health/ready"), ("GET", "/v1/plain"), ("POST", "/v2/hot/a")]:
            r = await c.request(method, path, headers={"Host": host})
            assert r.status_code == status, (method, path, r.text)


@pytest.mark.parametrize(
    "host",
    ["10.1.2.3.nip.io", "10.1.2.3.", "10.1.2", "010.1.2.3", "10.1.2.300", "10.1.2.3.4", "1e10", "[10.1.2.3]"],
)
async def test_a_name_that_only_looks_like_an_address_is_not_in_a_network(host: str) -> None:
    transport = httpx.ASGITransport(app=app_with(ServiceSettings(env="prod", allowed_hosts=NETWORKS)))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.get("/health/live", headers={"Host": host})
        assert r.status_code == 421, r.text


@pytest.mark.parametrize(
    ("allowed", "answered", "refused"),
    [
        (["0.0.0.0/0"], ["0.0.0.0", "10.1.2.3:8101", "255.255.255.255"], ["[::1]", "[::ffff:10.1.2.3]", "x"]),
        (["[::/0]"], ["[::1]", "[fd00::1]:8101", "[::ffff:10.1.2.3]"], ["127.0.0.1", "10.1.2.3:8101", "x"]),
        (["10.0.0.0/8"], ["10.1.2.3"], ["[::ffff:10.1.2.3]", "[::ffff:a01:203]", "[::a01:203]"]),
        (["[::ffff:10.0.0.0/104]"], ["[::ffff:10.1.2.3]:8101", "[::ffff:a01:203]"], ["10.1.2.3", "11.1.2.3"]),
    ],
)
async def test_a_network_answers_the_addresses_of_its_own_version(
    allowed: list[str], answered: list[str], refused: list[str]
) -> None:
    """``/0`` is any address of its version, on purpose; an IPv4-mapped IPv6 address is an IPv6 address."""
    transport = httpx.ASGITransport(app=app_with(ServiceSettings(env="prod", allowed_hosts=allowed)))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        for host in answered:
            assert (await c.get("/health/live", headers={"Host": host})).status_code == 200, host
        for host in refused:
            assert (await c.get("/health/live", headers={"Host": host})).status_code == 421, host


@pytest.mark.parametrize(
    ("allowed", "answered", "refused"),
    [
        (None, ["[0:0::1]", "[::0001]:8101", "[0000:0000:0000:0000:0000:0000:0000:0001]"], ["[::2]", "[::]"]),
        (["10.1.2.3"], ["10.1.2.3:8101"], ["10.1.2.4", "010.1.2.3", "10.1.2.03", "[::ffff:10.1.2.3]"]),
        (["[::ffff:10.1.2.3]"], ["[::ffff:a01:203]", "[0::ffff:10.1.2.3]:8101"], ["10.1.2.3"]),
        (["[FD00::1]"], ["[fd00::1]", "[fd00:0::1]:8101"], ["[fd00::2]"]),
    ],
)
async def test_an_address_is_answered_however_the_host_writes_it(
    allowed: list[str] | None, answered: list[str], refused: list[str]
) -> None:
    """An address entry (the dev default's ``[::1]`` among them) is compared as an address, not as text."""
    settings = ServiceSettings(env="dev") if allowed is None else ServiceSettings(allowed_hosts=allowed)
    transport = httpx.ASGITransport(app=app_with(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as c:
        for host in answered:
            for method, path in [("GET", "/health/live"), ("POST", "/v2/hot/a")]:
                assert (await c.request(method, path, headers={"Host": host})).status_code == 200, host
        for host in refused:
            assert (await c.get("/health/live", headers={"Host": host})).status_code == 421, host


def test_networks_load_as_written_in_lower_case() -> None:
    hosts = ["10.0.0.0/8", "0.0.0.0/0", "[FD00::/8]", "[::/0]", "[::ffff:10.0.0.0/104]", "192.168.1.7/32"]
    assert ServiceSettings(allowed_hosts=hosts).allowed_hosts == [host.lower() for host in hosts]


NOT_A_NAME = (
    r"is not a host name: .* an IPv4 address or network \(10.1.2.3, 10.0.0.0/8\), "
    r"or an IPv6 address or network in brackets \(\[::1\], \[fd00::/8\]\)"
)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (
            "10.0.0.1/8",
            r"'10.0.0.1/8' has host bits set: write a network with its first address \(10.0.0.0/8\)",
        ),
        ("[fd00::1/8]", r"'\[fd00::1/8\]' has host bits set: .* first address \(\[fd00::/8\]\)"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not an IP network"),
        ("300.0.0.0/8", "'300.0.0.0/8' is not an IP network"),
        ("[10.0.0.0/8]", r"'\[10.0.0.0/8\]' is not an IP network"),
        ("[fd00::/129]", "is not an IP network"),
        ("fd00::/8", rf"'fd00::/8' {NOT_A_NAME}"),
        ("[fd00::]/8", rf"'\[fd00::\]/8' {NOT_A_NAME}"),
        ("10.0.0.0/8:8101", rf"'10.0.0.0/8:8101' {NOT_A_NAME}"),
    ],
)
def test_a_network_that_is_not_one_is_refused_when_the_settings_load(value: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ServiceSettings(allowed_hosts=["localhost", value])
