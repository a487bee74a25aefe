"""Settings, auth and the HTTP app factory: the behaviour every service inherits."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated, ClassVar

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, Response, UploadFile
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from contracts.envelope import OversizedEvent, check_attributes
from deploy.settings_doc import SERVICE_SETTINGS
from libs.auth import (
    TOKEN_NAME_MAX_CHARS,
    OperatorDep,
    PredictDep,
    Principal,
    Role,
    TokenFileInvalid,
    TokenStore,
    ViewerDep,
    hash_token,
    issue_token,
)
from libs.db import CHANNEL_MAX_BYTES, notify_channel, shown_dsn
from libs.errors import Conflict, InvalidInput, NotFound, json_text
from libs.http import BodyRoute, Text, _check_not_shadowed, create_app, error_body
from libs.service import load_settings
from libs.settings import (
    MAX_EVENT_BYTES_LIMIT,
    KafkaSettings,
    ServiceSettings,
    database_password,
    settings_problems,
)
from tests.ports import free_port


class ExampleSettings(ServiceSettings):
    """Settings of a test service."""

    service: ClassVar[str] = "example"


def test_service_variable_overrides_the_shared_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_HTTP_PORT", "9000")
    monkeypatch.setenv("DRIFTLOOP_EXAMPLE_HTTP_PORT", "9001")
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", "postgresql://shared/db")
    settings = ExampleSettings()
    assert settings.http_port == 9001
    assert settings.database_url == "postgresql://shared/db"
    assert settings.db_schema == "example"


def test_prod_refuses_a_placeholder_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_ENV", "prod")
    monkeypatch.setenv("DRIFTLOOP_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("DRIFTLOOP_KAFKA_SASL_PASSWORD", "changeme")
    with pytest.raises(ValidationError, match="placeholder"):
        ExampleSettings()
    monkeypatch.setenv("DRIFTLOOP_KAFKA_SASL_PASSWORD", "s3cr3t-from-the-vault")
    assert ExampleSettings().env == "prod"


@pytest.mark.parametrize("password", ["driftloop", "changeme", "Password", "%64riftloop"])
def test_prod_refuses_a_placeholder_database_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], password: str
) -> None:
    # docker-compose.yml's database password is "driftloop": prod must not start with it.
    monkeypatch.setenv("DRIFTLOOP_ENV", "prod")
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", f"postgresql://driftloop:{password}@postgres:5432/driftloop")
    with pytest.raises(SystemExit):
        load_settings(ExampleSettings)
    err = capsys.readouterr().err
    assert "DRIFTLOOP_DATABASE_URL" in err
    assert "placeholder" in err
    assert f":{password}@" not in err  # the URL is never shown
    assert "postgres:5432" not in err


# Each place asyncpg takes the database password from: the URL's user info, its ?password=, PGPASSWORD.
PASSWORD_SOURCES = [
    ("postgresql://driftloop:{}@postgres:5432/driftloop", None, "the password in DRIFTLOOP_DATABASE_URL"),
    ("postgresql://driftloop@postgres:5432/driftloop?password={}", None, "the ?password= of"),
    ("postgresql://driftloop@postgres:5432/driftloop", "{}", "PGPASSWORD"),
]


def given_password(
    monkeypatch: pytest.MonkeyPatch, env: str, url: str, pgpassword: str | None, password: str
) -> None:
    """DRIFTLOOP_ENV, DRIFTLOOP_DATABASE_URL and PGPASSWORD (unset if None) with ``password`` put in."""
    monkeypatch.setenv("DRIFTLOOP_ENV", env)
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", url.format(password))
    if pgpassword is None:
        monkeypatch.delenv("PGPASSWORD", raising=False)
    else:
        monkeypatch.setenv("PGPASSWORD", pgpassword.format(password))


@pytest.mark.parametrize(("url", "pgpassword", "source"), PASSWORD_SOURCES)
def test_prod_refuses_a_placeholder_database_password_wherever_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    pgpassword: str | None,
    source: str,
) -> None:
    given_password(monkeypatch, "prod", url, pgpassword, "changeme")
    with pytest.raises(SystemExit):
        load_settings(ExampleSettings)
    err = capsys.readouterr().err
    assert source in err
    assert "placeholder" in err
    assert "changeme" not in err  # neither the password nor the URL is shown
    assert "postgres:5432" not in err


@pytest.mark.parametrize(("url", "pgpassword", "source"), PASSWORD_SOURCES)
@pytest.mark.parametrize(("env", "password"), [("dev", "driftloop"), ("prod", "s3cr3t-from-the-vault")])
def test_a_database_password_is_taken_in_dev_or_when_real(
    monkeypatch: pytest.MonkeyPatch, url: str, pgpassword: str | None, source: str, env: str, password: str
) -> None:
    given_password(monkeypatch, env, url, pgpassword, password)
    assert ExampleSettings().env == env


@pytest.mark.parametrize(
    ("url", "pgpassword"),
    [
        # asyncpg takes the URL's password first, then its ?password=, then PGPASSWORD.
        ("postgresql://driftloop:s3cr3t-from-the-vault@postgres:5432/driftloop", "driftloop"),
        ("postgresql://driftloop:s3cr3t-from-the-vault@postgres:5432/driftloop?password=driftloop", None),
        ("postgresql://driftloop@postgres:5432/driftloop?password=s3cr3t-from-the-vault", "driftloop"),
        # The last ?password= is the one asyncpg takes.
        ("postgresql://driftloop@postgres/driftloop?password=driftloop&password=s3cr3t-from-the-vault", None),
        # No password at all: a passfile or a client certificate; an empty PGPASSWORD authenticates nobody.
        ("postgresql://driftloop@postgres:5432/driftloop", None),
        ("postgresql://driftloop@postgres:5432/driftloop?sslmode=verify-full", ""),
    ],
)
def test_prod_takes_the_real_database_password_asyncpg_connects_with(
    monkeypatch: pytest.MonkeyPatch, url: str, pgpassword: str | None
) -> None:
    given_password(monkeypatch, "prod", url, pgpassword, "")
    assert ExampleSettings().database_url == url


@pytest.mark.parametrize(
    ("url", "pgpassword", "source"),
    [
        # An empty password in the URL is none for asyncpg, which goes on to the next place.
        ("postgresql://driftloop:@postgres:5432/driftloop", "driftloop", "PGPASSWORD"),
        ("postgresql://driftloop:@postgres:5432/driftloop?password=driftloop", None, "the ?password= of"),
        ("postgresql://driftloop@postgres:5432/driftloop?password=", "driftloop", "PGPASSWORD"),
        ("postgresql://driftloop@postgres/driftloop?password=s3cr3t&password=driftloop", None, "?password="),
    ],
)
def test_prod_refuses_the_placeholder_asyncpg_would_connect_with(
    monkeypatch: pytest.MonkeyPatch, url: str, pgpassword: str | None, source: str
) -> None:
    given_password(monkeypatch, "prod", url, pgpassword, "")
    with pytest.raises(ValidationError, match=re.escape(source)):
        ExampleSettings()


@pytest.mark.parametrize(
    ("url", "pgpassword"),
    [
        ("postgresql://u:userinfo@h/db?password=query", "environment"),
        ("postgresql://u:@h/db?password=query", "environment"),
        ("postgresql://u@h/db?password=&password=query&x=1", "environment"),
        ("postgresql://u@h/db?password=", "environment"),
        ("postgresql://u:%40t%25@h/db", None),
        ("postgresql://u:at@sign@h/db", None),
        ("postgresql://u@h/db", ""),
        ("postgresql://u@h/db", None),
    ],
)
def test_the_checked_database_password_is_the_one_asyncpg_connects_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, pgpassword: str | None
) -> None:
    # asyncpg's own parser (private: this pins its order, so that an upgrade that changes it fails here).
    from asyncpg.connect_utils import _parse_connect_dsn_and_args

    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-passfile"))
    monkeypatch.delenv("PGSERVICE", raising=False)
    given_password(monkeypatch, "dev", url, pgpassword, "")
    # Every argument but the URL unset, as libs.db.create_pool leaves them.
    unset = dict.fromkeys(inspect.signature(_parse_connect_dsn_and_args).parameters)
    _, params = _parse_connect_dsn_and_args(**{**unset, "dsn": url})
    given = database_password(url)
    assert (given[1] if given else None) == (params.password or None)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DRIFTLOOP_HTTP_PORT", "70000"),
        ("DRIFTLOOP_HTTP_PORT", "0"),
        ("DRIFTLOOP_DB_POOL_MAX", "0"),
        ("DRIFTLOOP_DB_POOL_MIN", "0"),
        ("DRIFTLOOP_DB_POOL_MIN", "50"),  # above the maximum, 8
        ("DRIFTLOOP_MAX_REQUEST_BYTES", "-1"),  # every POST would get 413
        ("DRIFTLOOP_CONSUMER_MAX_RETRIES", "-1"),
        ("DRIFTLOOP_CONSUMER_MAX_UNCERTAIN_RETRIES", "-1"),
        ("DRIFTLOOP_CONSUMER_RETRY_BACKOFF_S", "-1"),  # the outage retry loop would spin
        ("DRIFTLOOP_CONSUMER_RETRY_BACKOFF_S", "nan"),
        ("DRIFTLOOP_CONSUMER_RETRY_BACKOFF_S", "inf"),
        ("DRIFTLOOP_KAFKA_MAX_EVENT_BYTES", "0"),  # every event would be dead-lettered
        # an event is one outbox row: past Postgres' 1 GB, its transaction was retried for ever
        ("DRIFTLOOP_KAFKA_MAX_EVENT_BYTES", str(2**30)),
        # the service stopped at its first line with a traceback, and again at every restart
        ("DRIFTLOOP_LOG_LEVEL", "verbose"),
        ("DRIFTLOOP_LOG_LEVEL", "trace"),
        ("DRIFTLOOP_DATABASE_URL", "not a url"),
        ("DRIFTLOOP_DATABASE_URL", "mysql://driftloop@db/driftloop"),
        ("DRIFTLOOP_DATABASE_URL", "postgresql:///driftloop"),
        ("DRIFTLOOP_DATABASE_URL", "postgresql://driftloop@127.0.0.1:99999/driftloop"),
        ("DRIFTLOOP_DATABASE_URL", "postgresql://driftloop@127.0.0.1:abc/driftloop"),
        ("DRIFTLOOP_DATABASE_URL", "postgresql://driftloop@db/driftloop?port=0"),
    ],
)
def test_settings_refuse_values_no_service_can_run_with(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        ExampleSettings()


@pytest.mark.parametrize(("given", "level"), [("debug", "DEBUG"), ("Warning", "WARNING"), ("WARN", "WARN")])
def test_a_log_level_is_taken_in_any_case_as_logging_names_it(
    given: str, level: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLOOP_LOG_LEVEL", given)
    assert ExampleSettings().log_level == level


def test_a_level_a_library_registered_is_refused_as_any_unknown_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # Checked against whatever logging knew then, "trace" passed once a library had named a level TRACE (one
    # does under the whole test session), and failed in a service that had imported none.
    monkeypatch.setitem(logging._nameToLevel, "TRACE", 5)
    monkeypatch.setenv("DRIFTLOOP_LOG_LEVEL", "trace")
    with pytest.raises(ValidationError, match="it must be one of DEBUG, INFO, WARNING, ERROR or CRITICAL"):
        ExampleSettings()


def test_the_largest_event_size_gives_fetch_sizes_kafkas_protocol_carries() -> None:
    # At 512 MiB, a consumer's fetch_max_bytes was 2**31: every fetch request failed to encode (Int32).
    options = KafkaSettings(max_event_bytes=MAX_EVENT_BYTES_LIMIT).consumer_options()
    sizes = [options["fetch_max_bytes"], options["max_partition_fetch_bytes"]]
    assert all(isinstance(n, int) and n <= 2**31 - 1 for n in sizes), sizes


@pytest.mark.parametrize("settings_class", SERVICE_SETTINGS, ids=lambda c: c.service)
@pytest.mark.parametrize("port", ["70000", "0"])
def test_every_service_refuses_a_port_it_cannot_listen_on(
    settings_class: type[ServiceSettings], port: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each service declares its own http_port (its default): the bounds must hold there too.
    monkeypatch.setenv(f"DRIFTLOOP_{settings_class.service.upper()}_HTTP_PORT", port)
    with pytest.raises(ValidationError):
        settings_class()


@pytest.mark.parametrize(
    "variable",
    [
        "DRIFTLOOP_REGISTRY_MAX_UPLOAD_BYTES",
        "DRIFTLOOP_REGISTRY_MAX_REQUEST_BYTES",
        "DRIFTLOOP_REGISTRY_READ_POOL_MAX",
    ],
)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_the_registry_refuses_limits_and_pools_below_1(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.registry.settings import RegistrySettings

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        RegistrySettings()


@pytest.mark.parametrize(("heartbeat", "stale"), [("2", "3"), ("2", "4"), ("10", "5")])
def test_training_refuses_a_staleness_a_late_heartbeat_passes(
    heartbeat: str, stale: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another replica would take a live run's job over, fit it again, and at max_attempts fail it as
    # worker-lost.
    from services.training.settings import TrainingSettings

    monkeypatch.setenv("DRIFTLOOP_TRAINING_HEARTBEAT_INTERVAL_S", heartbeat)
    monkeypatch.setenv("DRIFTLOOP_TRAINING_STALE_AFTER_S", stale)
    with pytest.raises(ValidationError, match="more than twice DRIFTLOOP_TRAINING_HEARTBEAT_INTERVAL_S"):
        TrainingSettings()
    monkeypatch.setenv("DRIFTLOOP_TRAINING_STALE_AFTER_S", str(2 * float(heartbeat) + 0.5))
    assert TrainingSettings().stale_after_s > 2 * TrainingSettings().heartbeat_interval_s


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://driftloop@127.0.0.1:54329/driftloop",
        "postgres://driftloop:pw@db.internal/driftloop?sslmode=verify-full",
        "postgresql://driftloop@/driftloop?host=/var/run/postgresql",
        "postgresql://driftloop@db1:5432,db2:5433/driftloop",
        "postgresql://driftloop@[::1]:5432/driftloop",
    ],
)
def test_settings_take_the_postgres_urls_asyncpg_takes(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", url)
    assert ExampleSettings().database_url == url


def test_a_refused_database_url_is_named_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", "postgresql://audit:TopSecretPw@db.internal:99999/x")
    with pytest.raises(ValidationError) as caught:
        ExampleSettings()
    lines = settings_problems(caught.value)
    assert lines == ["DRIFTLOOP_DATABASE_URL is not valid: its port '99999' is not a number from 1 to 65535"]


def make_app(tmp_path: Path, *, env: str = "dev", max_request_bytes: int = 1000) -> httpx.AsyncClient:
    router = APIRouter(route_class=BodyRoute)

    @router.get("/read")
    async def read(who: ViewerDep) -> dict[str, str]:
        return {"actor": who.actor}

    @router.post("/command")
    async def command(who: OperatorDep) -> dict[str, str]:
        return {"actor": who.actor}

    @router.post("/predict")
    async def predict(who: PredictDep) -> dict[str, str]:
        return {"ok": "yes"}

    @router.get("/find/{name}")
    async def find(name: str, model: str | None = None) -> dict[str, str | None]:
        return {"name": name, "model": model}

    @router.get("/missing")
    async def missing() -> None:
        raise NotFound("model 'churn' has no version 9")

    @router.post("/conflict")
    async def conflict() -> None:
        raise Conflict("cannot move from archived to production", allowed=["archived"])

    @router.post("/echo")
    async def echo(body: dict[str, int]) -> dict[str, int]:
        return body

    settings = ExampleSettings(
        env=env, auth_tokens_file=tmp_path / "tokens.json", max_request_bytes=max_request_bytes
    )
    app = create_app(settings, title="t", description="d", routers=[router])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_roles_gate_reads_commands_and_predictions(tmp_path: Path) -> None:
    async with make_app(tmp_path) as client:
        assert (await client.get("/read")).status_code == 401
        assert (await client.get("/read", headers=bearer("nope"))).status_code == 401
        assert (await client.get("/read", headers=bearer("dev-viewer"))).json() == {
            "actor": "user:dev-viewer"
        }
        refused = await client.post("/command", headers=bearer("dev-viewer"))
        assert refused.status_code == 403
        assert "operator" in refused.json()["detail"]
        assert (await client.post("/command", headers=bearer("dev-operator"))).status_code == 200
        # Predict tokens and admin tokens are separate: neither can do the other's job.
        assert (await client.post("/predict", headers=bearer("dev-admin"))).status_code == 403
        assert (await client.post("/command", headers=bearer("dev-predict"))).status_code == 403
        assert (await client.post("/predict", headers=bearer("dev-predict"))).status_code == 200


async def test_an_auditor_reads_as_a_viewer_and_may_neither_command_nor_predict(tmp_path: Path) -> None:
    async with make_app(tmp_path) as client:
        read = await client.get("/read", headers=bearer("dev-auditor"))
        assert read.json() == {"actor": "user:dev-auditor"}
        assert (await client.post("/command", headers=bearer("dev-auditor"))).status_code == 403
        assert (await client.post("/predict", headers=bearer("dev-auditor"))).status_code == 403


def test_traffic_data_is_granted_to_auditors_and_admins_only() -> None:
    grants = {role for role in Role if Principal("p", role).grants(Role.auditor)}
    assert grants == {Role.auditor, Role.admin}


async def test_a_request_with_two_authorization_headers_is_401(tmp_path: Path) -> None:
    # The first was read and the second ignored: a viewer's and a bogus token read as the viewer.
    async with make_app(tmp_path) as client:
        for second in ("Bearer nope", "Bearer dev-admin"):
            headers = [("Authorization", "Bearer dev-viewer"), ("Authorization", second)]
            response = await client.get("/read", headers=headers)
            assert response.status_code == 401, response.text
            assert response.json()["detail"] == "the request has 2 Authorization headers: send one"


async def test_issued_tokens_work_and_dev_tokens_do_not_in_prod(tmp_path: Path) -> None:
    token = issue_token(tmp_path / "tokens.json", name="alice", role=Role.operator)
    assert token not in (tmp_path / "tokens.json").read_text()  # only the hash is stored
    async with make_app(tmp_path, env="prod") as client:
        assert (await client.get("/read", headers=bearer("dev-admin"))).status_code == 401
        assert (await client.post("/command", headers=bearer(token))).json() == {"actor": "user:alice"}


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("not json", "is not JSON"),
        ("[]", 'has no "tokens" list'),
        ('{"tokens": [{"name": "alice", "role": "operator"}]}', "has a malformed token (number 1)"),
        (
            '{"tokens": [{"name": "a", "role": "predict", "sha256": "00", "model": ["churn"]}]}',
            "has a token (number 1) with 'model', which a token does not have: its keys are models, name, "
            "role, sha256",
        ),
        (
            '{"tokens": [{"name": "a\\u0000b", "role": "operator", "sha256": "00"}]}',
            "has a token (number 1) whose name holds a NUL character",
        ),
        (
            f'{{"tokens": [{{"name": "{"x" * 600}", "role": "viewer", "sha256": "00"}}]}}',
            "has a token (number 1) whose name is 600 characters; at most 507",
        ),
        (
            '{"tokens": [{"name": "a", "role": "predict", "sha256": "00", "models": []}]}',
            "has a token (number 1) whose models must be a non-empty list of model names",
        ),
        (
            '{"tokens": [{"name": "a", "role": "predict", "sha256": "00", "models": "churn"}]}',
            "has a token (number 1) whose models must be a non-empty list of model names",
        ),
        (
            '{"tokens": [{"name": "a", "role": "predict", "sha256": "00", "models": null}]}',
            "has a token (number 1) whose models must be a non-empty list of model names",
        ),
        (
            '{"tokens": [{"name": "a", "role": "predict", "sha256": "00", "models": ["churn", "a:b"]}]}',
            "has a token (number 1) whose models name 'a:b', which is no model name",
        ),
        (
            '{"tokens": [{"name": "a", "role": "predict", "sha256": "00", "models": ["churn", "churn"]}]}',
            "has a token (number 1) whose models name 'churn' twice",
        ),
        (
            '{"tokens": [{"name": "a", "role": "predict", "sha256": "00"},'
            ' {"name": "b", "role": "viewer", "sha256": "01", "models": ["churn"]}]}',
            "has a token (number 2) whose models are given, but its role is viewer: only a predict token may",
        ),
    ],
)
def test_a_service_refuses_a_token_file_it_cannot_use_naming_file_and_setting(
    content: str, why: str, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(content)

    with pytest.raises(TokenFileInvalid) as caught:
        create_app(ExampleSettings(auth_tokens_file=path), title="t", description="d")

    assert str(caught.value).startswith(f"the token file {path} (DRIFTLOOP_AUTH_TOKENS_FILE) {why}")


def test_a_predict_token_with_models_is_limited_to_them_and_one_without_is_not(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(
        json.dumps(
            {
                "tokens": [
                    {
                        "name": "billing-client",
                        "role": "predict",
                        "sha256": hash_token("b"),
                        "models": ["churn"],
                    },
                    {
                        "name": "fraud-client",
                        "role": "predict",
                        "sha256": hash_token("f"),
                        "models": ["fraud", "x"],
                    },
                    {"name": "any-client", "role": "predict", "sha256": hash_token("a")},
                ]
            }
        )
    )

    store = TokenStore.load(path, dev=False)

    assert store.authenticate("b") == Principal("billing-client", Role.predict, frozenset({"churn"}))
    assert store.authenticate("f") == Principal("fraud-client", Role.predict, frozenset({"fraud", "x"}))
    assert store.authenticate("a") == Principal("any-client", Role.predict, None)


@pytest.mark.parametrize(
    ("role", "models", "why"),
    [
        (Role.predict, [], "the token's models must be a non-empty list of model names"),
        (Role.predict, ["churn", "churn"], "the token's models name 'churn' twice"),
        (Role.predict, [" churn"], "the token's models name ' churn', which is no model name"),
        (Role.operator, ["churn"], "the token's models are given, but its role is operator"),
    ],
)
def test_issue_token_refuses_models_that_cannot_be_a_scope_and_leaves_the_file(
    role: Role, models: list[str], why: str, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    with pytest.raises(ValueError, match=re.escape(why)):
        issue_token(path, name="client", role=role, models=models)
    assert not path.exists()


def test_issue_token_stores_the_models_it_limits_the_token_to(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token = issue_token(path, name="fraud-client", role=Role.predict, models=["fraud", "billing"])

    [row] = json.loads(path.read_text())["tokens"]
    assert row["models"] == ["fraud", "billing"]
    principal = TokenStore.load(path, dev=False).authenticate(token)
    assert principal == Principal("fraud-client", Role.predict, frozenset({"fraud", "billing"}))


def test_the_longest_token_name_makes_an_actor_every_consumer_accepts() -> None:
    actor = Principal("x" * TOKEN_NAME_MAX_CHARS, Role.operator).actor

    check_attributes({"ce_actor": actor})  # the consumers' bound: no OversizedEvent
    with pytest.raises(OversizedEvent):
        check_attributes({"ce_actor": actor + "x"})
    with pytest.raises(ValueError, match="507 fit the events' actor attribute"):
        issue_token(Path("/nonexistent/tokens.json"), name="x" * 508, role=Role.viewer)


async def test_typed_errors_become_clear_4xx(tmp_path: Path) -> None:
    async with make_app(tmp_path) as client:
        missing = await client.get("/missing")
        assert missing.status_code == 404
        assert missing.json()["detail"] == "model 'churn' has no version 9"
        conflict = await client.post("/conflict")
        assert conflict.status_code == 409
        assert conflict.json()["allowed"] == ["archived"]
        invalid = await client.post("/echo", json={"a": "not a number"})
        assert invalid.status_code == 422
        assert invalid.json()["detail"].startswith("body.a:")


async def test_oversized_body_is_refused_with_413(tmp_path: Path) -> None:
    async with make_app(tmp_path) as client:
        response = await client.post("/echo", content=b'{"a": 1, "pad": "' + b"x" * 5000 + b'"}')
        assert response.status_code == 413
        assert "1000 bytes" in response.json()["detail"]

        async def chunks():  # no Content-Length: counted as it streams
            for _ in range(10):
                yield b"x" * 500

        streamed = await client.post("/echo", content=chunks())
        assert streamed.status_code == 413


async def test_a_nul_character_in_the_path_or_the_query_is_refused_with_422(tmp_path: Path) -> None:
    async with make_app(tmp_path) as client:
        for url in ("/missing%00", "/find/churn?model=churn%00"):
            response = await client.get(url, headers=bearer("dev-viewer"))
            assert response.status_code == 422, url
            assert response.json()["code"] == "invalid-input"
            assert "NUL" in response.json()["detail"]
        assert (await client.get("/find/churn?model=churn", headers=bearer("dev-viewer"))).status_code == 200


@pytest.mark.parametrize(
    ("url", "where", "byte"),
    [
        ("/find/churn?model=%ff", "query", "0xff"),  # Latin-1's ÿ
        ("/find/churn?model=caf%E9", "query", "0xe9"),
        ("/find/churn?model=%ED%A0%80", "query", "0xed"),  # a lone surrogate, U+D800
        ("/find/%ED%B0%80x", "path", "0xed"),
        ("/find/a%C3?model=b", "path", "0xc3"),  # a cut sequence
    ],
)
async def test_a_path_or_query_whose_escapes_are_not_utf8_is_refused_with_422(
    tmp_path: Path, url: str, where: str, byte: str
) -> None:
    # Decoded with replacement characters, ?model=%ff was a search for U+FFFD: an answer to another question.
    async with make_app(tmp_path) as client:
        response = await client.get(url, headers=bearer("dev-viewer"))
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["code"] == "invalid-input"
        assert body["detail"].startswith(f"the {where} is not UTF-8") and byte in body["detail"], body
        fine = await client.get("/find/caf%C3%A9?model=%F0%9F%98%80+x", headers=bearer("dev-viewer"))
        assert fine.json() == {"name": "café", "model": "😀 x"}


async def test_a_query_parameter_given_twice_is_refused_with_422(tmp_path: Path) -> None:
    async with make_app(tmp_path) as client:
        for url in ("/find/c?model=churn&model=fraud", "/find/c?x=1&model=a&mod%65l=b", "/find/c?x&x"):
            response = await client.get(url, headers=bearer("dev-viewer"))
            assert response.status_code == 422, url
            assert response.json()["code"] == "invalid-input"
            assert (
                "more than once" in response.json()["detail"]
                and "give each parameter once" in response.json()["detail"]
            )
        once = await client.get("/find/c?model=churn", headers=bearer("dev-viewer"))
        assert once.status_code == 200


def test_free_text_with_a_nul_character_is_invalid_input() -> None:
    text = TypeAdapter(Text)
    assert text.validate_python("why: the canary is worse") == "why: the canary is worse"
    with pytest.raises(ValidationError):
        text.validate_python("why\x00")


async def test_health_and_metrics_are_served(tmp_path: Path) -> None:
    async with make_app(tmp_path) as client:
        assert (await client.get("/health/live")).json() == {"status": "live"}
        assert (await client.get("/health/ready")).status_code == 200
        assert "python_info" in (await client.get("/metrics")).text


async def test_metrics_answer_get_and_head_at_their_own_path_and_refuse_other_methods(tmp_path: Path) -> None:
    # Mounted, /metrics was a redirect to /metrics/ (an empty page to a client that does not follow it, such
    # as httpx by default), and /metrics/ answered any method with the page.
    async with make_app(tmp_path) as client:
        page = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
        assert page.status_code == 200 and "python_info" in page.text
        assert page.headers["content-type"].startswith("application/openmetrics-text")
        head = await client.head("/metrics")
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/plain")
        for method in ("POST", "PUT", "DELETE"):
            refused = await client.request(method, "/metrics")
            assert refused.status_code == 405, method
            assert refused.headers["allow"] == "GET, HEAD"
            assert refused.json()["code"] == "method-not-allowed"


def hot_router() -> APIRouter:
    """Endpoints of the shape a hot route must have: path parameters and the Request, a Response back."""
    router = APIRouter(route_class=BodyRoute)

    @router.post("/items/{name}/versions/{version}")
    async def item(name: str, version: Annotated[int, Field(ge=1)], request: Request) -> Response:
        body = await request.body()
        if body == b"conflict":
            raise Conflict(f"{name!r} is archived", allowed=["archived"])
        if body == b"bug":
            raise RuntimeError("a bug in the endpoint")
        # FastAPI's own path puts its exit stack in the scope; the hot lane does not.
        via = "fastapi" if "fastapi_middleware_astack" in request.scope else "hot"
        return Response(f"{name}:{version + 1}:{len(body)}", headers={"x-via": via})

    @router.get("/readers/{name}")
    async def reader(name: str, who: ViewerDep, request: Request) -> Response:
        via = "fastapi" if "fastapi_middleware_astack" in request.scope else "hot"
        return Response(f"{name}:{who.actor}", headers={"x-via": via})

    return router


def hot_app(tmp_path: Path, *, hot: bool) -> httpx.AsyncClient:
    settings = ExampleSettings(auth_tokens_file=tmp_path / "tokens.json", max_request_bytes=1000)
    router = hot_router()
    app: FastAPI = create_app(
        settings, title="t", description="d", hot=[router] if hot else [], routers=[] if hot else [router]
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


HOT_REQUESTS = [
    ("POST", "/items/churn/versions/7", b"abc"),
    ("POST", "/items/churn/versions/007", b""),
    ("POST", "/items/churn/versions/0", b""),  # fails the endpoint's own constraint: FastAPI's 422
    ("POST", "/items/churn/versions/seven", b""),  # not an int: FastAPI's 422
    ("GET", "/items/churn/versions/7", b""),  # another method: FastAPI's 405
    ("HEAD", "/items/churn/versions/7", b""),  # HEAD of a route without GET: FastAPI's 405 too
    ("POST", "/items/churn/versions/7/", b""),  # another path: FastAPI's redirect
    ("POST", "/items/churn/versions/7", b"conflict"),  # a typed error: the app's handler
    ("POST", "/items/churn/versions/7", b"bug"),  # no handler: Starlette's 500
    ("POST", "/items/churn/versions/7", b"x" * 2000),  # over the body limit: 413
    ("POST", "/items/churn%00/versions/7", b""),  # NUL in the path: 422
    ("GET", "/readers/churn", b""),  # a role check without a token: 401
    ("GET", "/readers/churn?x=1", b""),  # a query the route does not take: 422
    ("HEAD", "/readers/churn", b""),  # FastAPI answers HEAD, its checks included
]

# (headers, expected status) of a route that requires the viewer role, served by the lane and by FastAPI.
HOT_CALLERS = [
    ([("Authorization", "Bearer dev-viewer")], 200),
    ([("Authorization", "Bearer dev-admin")], 200),  # a role that includes viewer's
    ([("Authorization", "Bearer dev-predict")], 403),
    ([("Authorization", "Bearer nope")], 401),
    ([("Authorization", "Basic dev-viewer")], 401),
    ([("Authorization", "Bearer dev-viewer"), ("Authorization", "Bearer dev-admin")], 401),  # two
]


@pytest.mark.parametrize(("method", "url", "body"), HOT_REQUESTS)
async def test_a_hot_route_answers_exactly_as_fastapi_does(
    tmp_path: Path, method: str, url: str, body: bytes
) -> None:
    async with hot_app(tmp_path, hot=True) as hot, hot_app(tmp_path, hot=False) as plain:
        fast = await hot.request(method, url, content=body)
        slow = await plain.request(method, url, content=body)
    assert (fast.status_code, fast.content) == (slow.status_code, slow.content)
    assert fast.headers.get("content-type") == slow.headers.get("content-type")
    # Only what the hot lane fully matches bypasses FastAPI; the rest is FastAPI's own answer.
    assert fast.headers.get("x-via") == ("hot" if slow.headers.get("x-via") else None)
    assert slow.headers.get("x-via") in (None, "fastapi")


@pytest.mark.parametrize(("headers", "status"), HOT_CALLERS)
async def test_a_hot_route_checks_the_callers_role_as_fastapi_does(
    tmp_path: Path, headers: list[tuple[str, str]], status: int
) -> None:
    async with hot_app(tmp_path, hot=True) as hot, hot_app(tmp_path, hot=False) as plain:
        fast = await hot.get("/readers/churn", headers=headers)
        slow = await plain.get("/readers/churn", headers=headers)
    assert fast.status_code == slow.status_code == status
    assert (fast.content, fast.headers.get("www-authenticate")) == (
        slow.content,
        slow.headers.get("www-authenticate"),
    )
    assert (fast.headers.get("x-via"), slow.headers.get("x-via")) == (
        ("hot", "fastapi") if status == 200 else (None, None)
    )
    if status == 200:
        assert fast.text.startswith("churn:user:dev-")


async def test_a_hot_route_is_served_by_the_lane_and_documented(tmp_path: Path) -> None:
    async with hot_app(tmp_path, hot=True) as client:
        response = await client.post("/items/churn/versions/7", content=b"abc")
        assert (response.status_code, response.text, response.headers["x-via"]) == (200, "churn:8:3", "hot")
        assert "/items/{name}/versions/{version}" in (await client.get("/openapi.json")).json()["paths"]


def test_a_hot_route_must_take_only_its_path_and_the_request(tmp_path: Path) -> None:
    settings = ExampleSettings(auth_tokens_file=tmp_path / "tokens.json")
    for declare in (
        lambda r: r.post("/a/{name}")(_with_query),
        lambda r: r.post("/b")(_with_dependency),
        lambda r: r.post("/c")(_without_request),
    ):
        router = APIRouter(route_class=BodyRoute)
        declare(router)
        with pytest.raises(ValueError, match="only path parameters, the Request and role checks"):
            create_app(settings, title="t", description="d", hot=[router]).build_middleware_stack()


@pytest.mark.parametrize(
    ("method", "path", "refused"),
    [
        ("get", "/health/{probe}", True),  # /health/live and /health/ready are paths of it
        ("get", "/health/{probe:int}", False),  # no health route's path is a number
        ("post", "/health/{probe}", False),  # another method
        ("get", "/healthy/{probe}", False),
    ],
)
def test_a_hot_route_that_an_earlier_route_would_answer_is_refused(
    tmp_path: Path, method: str, path: str, refused: bool
) -> None:
    """The lane runs ahead of FastAPI's router, so it would serve a request that FastAPI gives to a route
    registered before the hot route (here the app's own health routes)."""
    settings = ExampleSettings(auth_tokens_file=tmp_path / "tokens.json")
    router = APIRouter(route_class=BodyRoute)
    getattr(router, method)(path)(_probe)
    if not refused:
        create_app(settings, title="t", description="d", hot=[router]).build_middleware_stack()
        return
    with pytest.raises(
        ValueError, match=r"the hot route /health/\{probe\} may answer requests for /health/live"
    ):
        create_app(settings, title="t", description="d", hot=[router])


@pytest.mark.parametrize(("earlier", "shadowed"), [("/items/{name}", True), ("/items/{name:int}", False)])
def test_a_literal_hot_path_that_an_earlier_parameter_takes_is_refused(earlier: str, shadowed: bool) -> None:
    first, hot = APIRouter(route_class=BodyRoute), APIRouter(route_class=BodyRoute)
    first.get(earlier)(_probe)
    hot.get("/items/special")(_probe)
    hot_routes = [route for route in hot.routes if isinstance(route, APIRoute)]
    if not shadowed:
        _check_not_shadowed(first.routes, hot_routes)
        return
    with pytest.raises(ValueError, match=r"may answer requests for /items/\{name\}, registered before it"):
        _check_not_shadowed(first.routes, hot_routes)


async def _probe(request: Request, probe: str = "") -> Response:
    return Response(probe)


async def _with_query(name: str, limit: int, request: Request) -> Response:
    return Response()


async def _with_dependency(
    settings: Annotated[ExampleSettings, Depends(_example_settings)], request: Request
) -> Response:
    return Response()


def _example_settings(request: Request) -> ExampleSettings:
    return request.app.state.settings


async def _without_request() -> Response:
    return Response()


async def test_every_error_body_has_the_same_keys(tmp_path: Path) -> None:
    async with make_app(tmp_path) as client:
        answers = [
            await client.get("/missing"),  # a typed error
            await client.post("/conflict"),
            await client.post("/echo", json={"a": "not a number"}),  # FastAPI's validation
            await client.post("/echo", content=b'{"a": 1, "pad": "' + b"x" * 5000 + b'"}'),  # the body limit
            await client.get("/read%00"),  # NUL in the path
            await client.get("/nowhere"),  # no such route: Starlette's 404
            await client.delete("/echo"),  # no such method: Starlette's 405
        ]
    assert [a.status_code for a in answers] == [404, 409, 422, 413, 422, 404, 405]
    for answer in answers:
        body = answer.json()
        assert body["error"] == body["detail"] and body["error"], body
        assert body["code"] in {
            "not-found",
            "conflict",
            "invalid-input",
            "payload-too-large",
            "method-not-allowed",
        }
    assert answers[-1].headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a": ', "the request body is not JSON: Expecting value (at character 6)"),
        (b'{"a": ' + b"[" * 3000 + b"]" * 3000 + b"}", "the JSON body is nested too deeply"),
        (b'{"a": "\xff"}', "the JSON body is not UTF-8 (byte 0xff at 7 cannot be decoded): send it as UTF-8"),
    ],
    ids=["syntax", "too-deep", "not-utf-8"],
)
async def test_a_body_fastapi_cannot_read_is_a_422_saying_why(
    tmp_path: Path, body: bytes, message: str
) -> None:
    async with make_app(tmp_path, max_request_bytes=10_000) as client:
        response = await client.post("/echo", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith(message) and response.json()["code"] == "invalid-input"


@pytest.mark.parametrize(
    ("headers", "came"),
    [
        ({}, "without a Content-Type"),
        ({"content-type": "text/plain"}, "as 'text/plain'"),
        ({"content-type": "application/x-www-form-urlencoded"}, "as 'application/x-www-form-urlencoded'"),
    ],
)
async def test_a_json_body_sent_without_a_json_content_type_is_a_422_naming_the_header(
    tmp_path: Path, headers: dict[str, str], came: str
) -> None:
    # FastAPI validated the body's bytes: "body: Input should be a valid dictionary", the header unnamed.
    async with make_app(tmp_path) as client:
        response = await client.post("/echo", content=b'{"a": 1}', headers=headers)
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert detail.startswith("the request body was not read as JSON: send it with Content-Type: ")
        assert detail.endswith(f"(it came {came})"), detail
        as_json = await client.post(
            "/echo", content=b'{"a": 1}', headers={"content-type": "application/json"}
        )
        assert as_json.json() == {"a": 1}


def test_an_error_naming_a_lone_surrogate_can_still_be_sent() -> None:
    # Python's json reader lets "\ud800" into a request, and so into the name an error gives back.
    body = error_body("feature '\ud800': not a feature", "invalid-input", feature="\udc00x", row=1)
    assert body["error"] == body["detail"] == "feature '\\ud800': not a feature"
    assert body["feature"] == "\\udc00x" and body["row"] == 1
    assert json.loads(json.dumps(body, ensure_ascii=False).encode()) == body
    assert error_body("é", "x")["error"] == "é"


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://audit:Secret@db.internal:5432/x", "postgresql://audit:***@db.internal:5432/x"),
        (
            "postgresql://audit@db/x?password=Secret&sslmode=require",
            "postgresql://audit@db/x?password=***&sslmode=require",
        ),
        (
            "postgresql://driftloop@127.0.0.1:54329/driftloop",
            "postgresql://driftloop@127.0.0.1:54329/driftloop",
        ),
    ],
)
def test_a_dsn_is_shown_without_its_password(dsn: str, shown: str) -> None:
    assert shown_dsn(dsn) == shown


def test_a_notify_channel_fits_postgres_whatever_the_schema_name() -> None:
    # As it reads while it fits: the channels of existing deployments do not change.
    assert notify_channel("driftloop_routes_", "serving") == "driftloop_routes_serving"
    # A schema name may have 63 characters; the channel may not ("channel name too long" from pg_notify).
    long_a, long_b = "s" * 62 + "a", "s" * 62 + "b"
    prefix = "driftloop_training_jobs_"
    a, b = notify_channel(prefix, long_a), notify_channel(prefix, long_b)
    assert len(a.encode()) <= CHANNEL_MAX_BYTES and len(b.encode()) <= CHANNEL_MAX_BYTES
    assert a != b and a.startswith("driftloop_training_jobs_sss")
    assert notify_channel(prefix, long_a) == a
    with pytest.raises(ValueError, match="lower-case identifier"):
        notify_channel("driftloop_outbox_", "Not-A-Schema")


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("DRIFTLOOP_HTTP_PORT", "70000", "DRIFTLOOP_HTTP_PORT='70000' is not valid:"),
        (
            "DRIFTLOOP_AUDIT_TOPICS",
            "a,b",
            "DRIFTLOOP_AUDIT_TOPICS='a,b' is not valid: it must be a JSON list",
        ),
        (
            "DRIFTLOOP_AUTH_TOKENS_FILE",
            "{tmp}",
            "the token file {tmp} (DRIFTLOOP_AUTH_TOKENS_FILE) cannot be read",
        ),
        (
            "DRIFTLOOP_LOG_LEVEL",
            "verbose",
            "DRIFTLOOP_LOG_LEVEL='verbose' is not valid: it must be one of DEBUG, INFO, WARNING, ERROR",
        ),
    ],
)
def test_a_service_with_a_setting_it_cannot_use_says_which_and_exits_2_without_a_traceback(
    variable: str, value: str, said: str, tmp_path: Path
) -> None:
    # The service's own entry point, as the supervisor or a container runs it; it stops before it
    # connects to anything. Should it not, there is nothing to connect to and it is stopped.
    nowhere = {
        "DRIFTLOOP_DATABASE_URL": f"postgresql://driftloop@127.0.0.1:{free_port()}/driftloop",
        "DRIFTLOOP_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "DRIFTLOOP_AUDIT_SIGNING_KEY_FILE": str(tmp_path / "signing.key"),
        "DRIFTLOOP_AUDIT_CHECKPOINT_FILE": str(tmp_path / "checkpoints.ndjson"),
    }
    env = {**os.environ, **nowhere, variable: value.format(tmp=tmp_path)}
    env.pop("DRIFTLOOP_ENV", None)
    done = subprocess.run(
        [sys.executable, "-m", "services.audit"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert f"driftloop audit: error: {said.format(tmp=tmp_path)}" in done.stderr
    assert "Traceback" not in done.stderr


def test_load_settings_names_a_token_file_it_cannot_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.json"
    path.write_text('{"tokens": {}}')
    monkeypatch.setenv("DRIFTLOOP_AUTH_TOKENS_FILE", str(path))

    with pytest.raises(SystemExit) as caught:
        load_settings(ExampleSettings)

    assert caught.value.code == 2
    assert (
        f'driftloop example: error: the token file {path} (DRIFTLOOP_AUTH_TOKENS_FILE) has no "tokens" list'
        in (capsys.readouterr().err)
    )


def form_app(tmp_path: Path, route_class: type[APIRoute] = BodyRoute) -> FastAPI:
    router = APIRouter(route_class=route_class)

    @router.post("/upload")
    async def upload(
        file: Annotated[UploadFile, File()], note: Annotated[str | None, Form()] = None
    ) -> dict[str, str | None]:
        return {"note": note, "filename": file.filename}

    settings = ExampleSettings(auth_tokens_file=tmp_path / "tokens.json", max_request_bytes=4_000_000)
    return create_app(settings, title="t", description="d", routers=[router])


def multipart(note: bytes, *, filename: bytes = b"d.csv", charset: str = "") -> tuple[bytes, dict[str, str]]:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n' + note + b"\r\n"
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n\r\n'
        b"a\n1\n\r\n--b--\r\n"
    )
    return body, {"content-type": f"multipart/form-data; boundary=b{charset}"}


@pytest.mark.parametrize(
    ("note", "filename", "field", "message"),
    [
        (b"caf\xe9", b"d.csv", "note", "the form field 'note' is not UTF-8 text (byte 0xe9 at 3"),
        (b"\xed\xa0\x80", b"d.csv", "note", "the form field 'note' is not UTF-8 text (byte 0xed at 0"),
        (b"cafe", b"d\xe9.csv", "filename", "a file name is not UTF-8 text (byte 0xe9 at 1"),
    ],
)
async def test_form_text_that_is_not_utf8_is_422_naming_the_field(
    tmp_path: Path, note: bytes, filename: bytes, field: str, message: str
) -> None:
    # Starlette read such bytes as Latin-1: 'caf\xe9' became 'café', a lone surrogate's bytes three letters.
    body, headers = multipart(note, filename=filename)
    transport = httpx.ASGITransport(app=form_app(tmp_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/upload", content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(message) and r.json()["field"] == field, r.text


async def test_form_text_in_the_charset_its_content_type_names_is_read_in_it(tmp_path: Path) -> None:
    transport = httpx.ASGITransport(app=form_app(tmp_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        body, headers = multipart("café".encode())
        assert (await client.post("/upload", content=body, headers=headers)).json()["note"] == "café"
        body, headers = multipart(b"caf\xe9", charset="; charset=iso-8859-1")
        assert (await client.post("/upload", content=body, headers=headers)).json()["note"] == "café"
        body, headers = multipart(b"cafe", charset="; charset=no-such-charset")
        r = await client.post("/upload", content=body, headers=headers)
    assert r.status_code == 422 and r.json()["field"] == "content-type", r.text
    assert r.json()["detail"].startswith("the Content-Type names the charset 'no-such-charset'")


@pytest.mark.parametrize("charset", ["rot13", "hex", "base64", "zlib"])
async def test_a_form_charset_that_names_a_codec_of_no_text_is_422_naming_it(
    tmp_path: Path, charset: str
) -> None:
    # Python finds these codecs, but bytes.decode refuses them with a LookupError, which FastAPI answered
    # with 400 "There was an error parsing the body", naming nothing.
    body, headers = multipart(b"cafe", charset=f"; charset={charset}")
    transport = httpx.ASGITransport(app=form_app(tmp_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/upload", content=body, headers=headers)
    assert r.status_code == 422 and r.json()["field"] == "content-type", r.text
    assert r.json()["detail"].startswith(f"the Content-Type names the charset {charset!r}, which this")


def test_an_app_refuses_a_form_route_that_would_read_text_as_latin1(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="/upload: its router needs route_class=BodyRoute"):
        form_app(tmp_path, route_class=APIRoute)


def json_app(tmp_path: Path, route_class: type[APIRoute] = BodyRoute) -> FastAPI:
    router = APIRouter(route_class=route_class)

    @router.post("/note")
    async def note(body: NoteCreate) -> dict[str, str]:
        return {"text": body.text}

    settings = ExampleSettings(auth_tokens_file=tmp_path / "tokens.json")
    return create_app(settings, title="t", description="d", routers=[router])


class NoteCreate(BaseModel):
    text: str


UTF8_JSON_REFUSED = [
    ('{"text": "caf\u00e9"}'.encode("utf-16"), "the JSON body reads as UTF-16, not UTF-8: send it as UTF-8"),
    ('{"text": "café"}'.encode("utf-16-le"), "the JSON body reads as UTF-16LE, not UTF-8: send it as UTF-8"),
    ('{"text": "café"}'.encode("utf-16-be"), "the JSON body reads as UTF-16BE, not UTF-8: send it as UTF-8"),
    ('{"text": "café"}'.encode("utf-32"), "the JSON body reads as UTF-32, not UTF-8: send it as UTF-8"),
    (
        '{"text": "café"}'.encode("utf-8-sig"),
        "the JSON body starts with a byte order mark (bytes EF BB BF): send it as UTF-8 without one",
    ),
    (
        b'{"text": "caf\xe9"}',
        "the JSON body is not UTF-8 (byte 0xe9 at 13 cannot be decoded): send it as UTF-8",
    ),
    (
        b'{"text": "\xed\xa0\x80"}',
        "the JSON body is not UTF-8 (byte 0xed at 10 cannot be decoded): send it as UTF-8",
    ),
]
"""JSON bodies that are not UTF-8 without a byte order mark, and what the answer says (RFC 8259, section
8.1). Python's json reader, which FastAPI's is, read all but the Latin-1 one (the lone surrogate's bytes as
one), which it refused saying "'utf-8' codec can't decode byte 0xe9 in position 13: invalid continuation
byte"."""


@pytest.mark.parametrize(("body", "message"), UTF8_JSON_REFUSED)
def test_json_text_is_utf8_without_a_byte_order_mark(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        json_text(body, field="(body)")
    assert refused.value.message == message and refused.value.extra == {"field": "(body)"}
    assert json_text('{"text": "café"}'.encode()) == '{"text": "café"}'


@pytest.mark.parametrize(("body", "message"), UTF8_JSON_REFUSED)
async def test_a_json_body_that_is_not_utf8_is_422_saying_what_it_is(
    tmp_path: Path, body: bytes, message: str
) -> None:
    transport = httpx.ASGITransport(app=json_app(tmp_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/note", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == message
        r = await client.post("/note", json={"text": "café"})
    assert r.status_code == 200 and r.json() == {"text": "café"}, r.text


def test_an_app_refuses_a_json_body_route_that_would_read_utf16(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="/note: its router needs route_class=BodyRoute"):
        json_app(tmp_path, route_class=APIRoute)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (
            multipart(b"x" * 1_100_000)[0],
            "multipart/form-data; boundary=b",
            413,
            "the form field 'note' is larger than the 1,048,576 bytes a text field may have",
        ),
        (
            b"x",
            "multipart/form-data",
            422,
            "the multipart body cannot be read: Missing boundary in multipart.",
        ),
        (
            b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
            "multipart/form-data; boundary=b",
            422,
            "the multipart body cannot be read: The Content-Disposition header field "
            '"name" must be provided.',
        ),
        (
            b"&".join([b"note=x"] * 1001),
            "application/x-www-form-urlencoded",
            422,
            "the multipart body cannot be read: Too many fields. Maximum number of fields is 1000.",
        ),
    ],
)
async def test_a_form_the_reader_refuses_is_a_4xx_saying_what_and_where(
    tmp_path: Path, body: bytes, content_type: str, status: int, message: str
) -> None:
    # Starlette answered 400 "Part exceeded maximum size of 1024KB." (which part?) and 400 for its other
    # refusals, where every other body that cannot be read is a 422.
    transport = httpx.ASGITransport(app=form_app(tmp_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.post("/upload", content=body, headers={"content-type": content_type})
    assert r.status_code == status, r.text
    assert r.json()["detail"] == message


def test_one_float32_bound_for_serving_training_and_validation() -> None:
    # A value serving refuses (422) is one no model is trained on or judged on: one definition, in libs.
    import numpy as np

    from libs import modelspec
    from services.serving import domain
    from services.training import worker
    from services.validation import scoring

    assert float(np.finfo(np.float32).max) == modelspec.FLOAT32_MAX
    assert domain.FLOAT32_MAX is worker.FLOAT32_MAX is scoring.FLOAT32_MAX is modelspec.FLOAT32_MAX
