"""docker-compose.yml: the containers can write what they write, their logs are bounded, and nothing is open
beyond this host; the image alone takes no development token; Prometheus and Grafana come only when asked for.

Read from the files themselves (no Docker engine here): each service's settings are loaded with the
environment its container gets, the image's ENV lines plus the compose file's.
"""

from __future__ import annotations

import base64
import importlib
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.local.settings import PROJECT_ROOT
from libs.auth import DEV_TOKENS, TokenStore
from libs.http import create_app
from libs.settings import ServiceSettings

COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
# The only folder the image's user (uid 10001) may write: its home, the shared volume.
DATA = "/data/"


def image_env() -> dict[str, str]:
    """The ENV lines of deploy/compose/Dockerfile."""
    text = (PROJECT_ROOT / "deploy" / "compose" / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def services() -> list[tuple[str, dict[str, Any]]]:
    return [
        (spec["command"][2].removeprefix("services."), spec)
        for spec in COMPOSE["services"].values()
        if spec.get("command", [])[:2] == ["python", "-m"] and spec["command"][2].startswith("services.")
    ]


def settings_of(
    name: str, environment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> type[ServiceSettings]:
    """The settings class of service ``name``, with ``environment`` as the container's whole environment."""
    for variable in [v for v in os.environ if v.startswith("DRIFTLOOP_")]:  # the container has none
        monkeypatch.delenv(variable)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, str(value))
    module = importlib.import_module(f"services.{name}.settings")
    (settings_class,) = [
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, ServiceSettings) and c.service == name
    ]
    return settings_class


def test_every_service_of_the_platform_is_in_the_compose_file() -> None:
    assert sorted(name for name, _ in services()) == sorted(
        ["registry", "training", "validation", "serving", "monitoring", "audit"]
    )


@pytest.mark.parametrize(("name", "spec"), services(), ids=[name for name, _ in services()])
def test_every_file_a_service_writes_is_on_the_data_volume(
    name: str, spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_class = settings_of(name, {**image_env(), **spec.get("environment", {})}, monkeypatch)
    settings = settings_class()

    written = {
        field: str(getattr(settings, field))
        for field, info in settings_class.model_fields.items()
        if (info.annotation in (Path, Path | None) or field == "artifacts_url") and getattr(settings, field)
    }
    assert written, "no file settings found: the check would prove nothing"
    outside = {field: path for field, path in written.items() if not path.startswith(DATA)}
    assert not outside, f"{name} would write outside {DATA} (root-owned /app in the image): {outside}"


def test_no_port_is_published_beyond_this_host() -> None:
    published = {name: port for name, spec in COMPOSE["services"].items() for port in spec.get("ports", [])}
    assert published, "the services' ports are published"
    assert {name: port for name, port in published.items() if not str(port).startswith("127.0.0.1:")} == {}


def test_every_containers_log_is_bounded() -> None:
    # Docker's default json-file driver keeps a container's output without bound; these run for months.
    unbounded = {
        name: spec.get("logging")
        for name, spec in COMPOSE["services"].items()
        if spec.get("logging", {}).get("driver") != "json-file"
        or not {"max-size", "max-file"} <= spec["logging"].get("options", {}).keys()
    }
    assert unbounded == {}


def test_prometheus_is_opt_in_pinned_and_reads_deploy_prometheus() -> None:
    """`docker compose up` starts what it did; `--profile observability` adds Prometheus, at a version of
    Prometheus the rules were written for, with deploy/prometheus/ as its configuration folder."""
    prometheus = COMPOSE["services"]["prometheus"]
    source, target, mode = next(v for v in prometheus["volumes"] if v.startswith("./")).split(":")

    assert prometheus["profiles"] == ["observability"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"]), "pin Prometheus's version"
    assert (PROJECT_ROOT / source / "prometheus.yml").is_file() and mode == "ro"
    assert f"--config.file={target}/prometheus.yml" in prometheus["command"]
    assert [name for name, spec in COMPOSE["services"].items() if spec.get("profiles")] == [
        "prometheus",
        "grafana",
    ]


def test_grafana_is_opt_in_pinned_and_reads_deploy_grafana() -> None:
    """Grafana comes with Prometheus (`--profile observability`), at a pinned version, with deploy/grafana/'s
    provisioning and dashboard mounted read-only, healthy once its API answers, and signed in to only with
    the admin password of the environment (its default is for development) or as an anonymous viewer."""
    grafana = COMPOSE["services"]["grafana"]
    mounted = [v.split(":") for v in grafana["volumes"] if v.startswith("./")]
    environment = grafana["environment"]

    assert grafana["profiles"] == ["observability"]
    assert re.fullmatch(r"grafana/grafana(-oss)?:\d+\.\d+\.\d+", grafana["image"]), "pin Grafana's version"
    assert mounted and all(
        source.startswith("./deploy/grafana/") and (PROJECT_ROOT / source).is_dir() and mode == "ro"
        for source, _, mode in mounted
    ), mounted
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert "http://127.0.0.1:3000/api/health" in grafana["healthcheck"]["test"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:-[^}]+\}", environment["GF_SECURITY_ADMIN_PASSWORD"])
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer", "an anonymous visitor may only look"


def token_store(settings: ServiceSettings) -> TokenStore:
    """The tokens the service's app takes with these settings."""
    return create_app(settings, title="t", description="t").state.tokens


@pytest.mark.parametrize(("name", "spec"), services(), ids=[name for name, _ in services()])
def test_the_image_alone_takes_no_development_token(
    name: str, spec: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image listens on every address (DRIFTLOOP_HTTP_HOST=0.0.0.0), so a container started from it
    without the compose file (docker run -p 8101:8101, a cluster) is reached from other hosts: it must not
    take the dev-* tokens, which anyone can read in libs/auth.py (dev-admin may do everything but predict).
    It took them, as DRIFTLOOP_ENV defaulted to dev. The compose file, which publishes on 127.0.0.1 only,
    still runs the services in development mode."""
    environment: dict[str, Any] = {**image_env()}
    if name == "audit":  # the signing key a deployment gives it (prod requires one)
        environment["DRIFTLOOP_AUDIT_SIGNING_KEY"] = base64.b64encode(os.urandom(32)).decode()
    alone = settings_of(name, environment, monkeypatch)()
    assert all(token_store(alone).authenticate(token) is None for token in DEV_TOKENS), alone.env

    composed = settings_of(name, {**image_env(), **spec.get("environment", {})}, monkeypatch)()
    assert token_store(composed).authenticate("dev-viewer") is not None, composed.env
