"""docs/settings.md, generated from the settings classes: complete, fresh, true, and the only names the docs
use.

True means: every variable it names, set alone in the environment, brings its value to the field it is
listed for; and where several name one field, the first one set wins (a service's own over the shared one,
the nested Kafka names in their order).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings

from deploy import cli, settings_doc
from deploy.local.settings import LocalInfraSettings
from deploy.platform import SERVICES
from deploy.settings_doc import OTHER_VARIABLES, SERVICE_SETTINGS, Setting
from libs.settings import PROJECT_ROOT, KafkaSettings, ServiceSettings
from services.audit.settings import AuditSettings
from services.monitoring.settings import MonitoringSettings
from services.registry.settings import RegistrySettings
from services.serving.settings import ServingSettings

DOC = PROJECT_ROOT / settings_doc.SETTINGS_FILE
ALL_CLASSES: list[type[BaseSettings]] = [*SERVICE_SETTINGS, LocalInfraSettings]
KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No DRIFTLOOP_* variable of the shell (`driftloop test` sets the broker's and the database's)."""
    for name in [n for n in os.environ if n.upper().startswith("DRIFTLOOP_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def sections() -> dict[str, dict[str, str]]:
    """The committed page: section title -> setting -> its table row."""
    found: dict[str, dict[str, str]] = {}
    for part in DOC.read_text(encoding="utf-8").split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        found[title] = {
            line.split("`")[1]: line for line in body.splitlines() if line.startswith("| `") and "`" in line
        }
    return found


# --- fresh -------------------------------------------------------------------------------------------


def test_the_checked_in_settings_reference_is_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert settings_doc.stale_files() == []
    assert settings_doc.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_check_mode_names_a_stale_or_missing_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert settings_doc.main(["--check", "--root", str(tmp_path)]) == 1
    assert "docs/settings.md (missing)" in capsys.readouterr().err

    (tmp_path / "docs").mkdir()
    (tmp_path / settings_doc.SETTINGS_FILE).write_text(DOC.read_text().replace("`8101`", "`9999`"))
    assert settings_doc.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "docs/settings.md (out of date)" in err
    assert "python -m deploy.settings_doc" in err


def test_writing_repairs_what_check_mode_reports(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / settings_doc.SETTINGS_FILE).write_text("stale\n")

    assert settings_doc.write(tmp_path) == [settings_doc.SETTINGS_FILE]
    assert settings_doc.stale_files(tmp_path) == []
    assert settings_doc.write(tmp_path) == []


def test_ci_checks_the_reference_where_it_checks_the_contracts(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[list[tuple[str, list[str]]]] = []

    def run_steps(steps: list[tuple[str, list[str]]]) -> int:
        ran.append(list(steps))
        return 0

    monkeypatch.setattr(cli, "_run_steps", run_steps)

    assert cli.cmd_check(argparse.Namespace()) == 0

    commands = [command[1:] for _, command in ran[0]]
    assert ["-m", "contracts.generate", "--check"] in commands
    assert ["-m", "deploy.settings_doc", "--check"] in commands


def test_the_page_is_the_same_on_every_machine(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {
        "DRIFTLOOP_KAFKA_BOOTSTRAP": "elsewhere:9092",
        "DRIFTLOOP_ARTIFACTS_URL": "s3://elsewhere/artifacts",
        "DRIFTLOOP_AUDIT_HTTP_PORT": "9106",
        "DRIFTLOOP_LOCAL_STATE_DIR": "/elsewhere",
    }.items():
        clean_env.setenv(name, value)

    page = settings_doc.settings_page()

    assert page == DOC.read_text(encoding="utf-8")
    assert str(PROJECT_ROOT) not in page
    assert "<checkout>/.driftloop/tokens.json" in page


def test_no_secret_default_is_shown() -> None:
    class WithSecrets(ServiceSettings):
        service: ClassVar[str] = "example"
        token: SecretStr = Field(SecretStr("a-real-token"), description="A secret with a default.")
        database_url: str = Field(
            "postgresql://app:hunter2@db:5432/app", description="A URL with a password."
        )

    page = "\n".join(settings_doc.table(settings_doc.own_settings(WithSecrets)))

    assert "a-real-token" not in page
    assert "hunter2" not in page
    assert "`***` (not shown)" in page
    assert "`postgresql://app:***@db:5432/app`" in page


# --- complete ------------------------------------------------------------------------------------------


def settings_classes_in_the_code() -> set[type[BaseSettings]]:
    """Every settings class of libs, services and deploy: every settings.py's BaseSettings subclasses."""
    found = set()
    for path in sorted(PROJECT_ROOT.glob("*/**/settings.py")):
        parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
        if parts[0] not in ("libs", "services", "deploy"):
            continue
        module = importlib.import_module(".".join(parts))
        found |= {
            c
            for c in vars(module).values()
            if isinstance(c, type) and issubclass(c, BaseSettings) and c.__module__ == module.__name__
        }
    return found


def test_every_settings_class_is_in_the_reference() -> None:
    assert settings_classes_in_the_code() == {
        ServiceSettings,
        KafkaSettings,
        *SERVICE_SETTINGS,
        LocalInfraSettings,
    }
    assert [cls.service for cls in SERVICE_SETTINGS] == list(SERVICES)


def test_every_field_is_in_the_reference_with_the_variables_that_set_it() -> None:
    page = sections()
    assert {*page} >= {"Shared settings", "Kafka", *SERVICES, "Local infrastructure"}
    missing: list[str] = []

    def expect(section: str, field: str, *variables: str) -> None:
        row = page[section].get(field, "")
        missing.extend(f"{section}: {field} {v}" for v in variables if f"`{v}`" not in row)

    for cls in SERVICE_SETTINGS:
        for field in cls.model_fields:
            if field in inspect.get_annotations(cls):
                expect(
                    cls.service,
                    field,
                    f"DRIFTLOOP_{cls.service.upper()}_{field.upper()}",
                    f"DRIFTLOOP_{field.upper()}",
                )
            elif field != "kafka":
                expect(
                    "Shared settings",
                    field,
                    f"DRIFTLOOP_<SERVICE>_{field.upper()}",
                    f"DRIFTLOOP_{field.upper()}",
                )
    for field in KafkaSettings.model_fields:
        f = field.upper()
        expect(
            "Kafka",
            f"kafka.{field}",
            f"DRIFTLOOP_<SERVICE>_KAFKA__{f}",
            f"DRIFTLOOP_KAFKA__{f}",
            f"DRIFTLOOP_KAFKA_{f}",
        )
    for field in LocalInfraSettings.model_fields:
        expect("Local infrastructure", field, f"DRIFTLOOP_LOCAL_{field.upper()}")
    assert missing == []


def test_every_setting_has_a_description() -> None:
    classes: list[type[BaseModel]] = [ServiceSettings, KafkaSettings, *ALL_CLASSES]
    assert [
        f"{c.__name__}.{n}" for c in classes for n, i in c.model_fields.items() if not i.description
    ] == []


# --- true ----------------------------------------------------------------------------------------------

# Settings whose validators take more than their type says: a value each accepts, as written, as it arrives.
VALID: dict[str, tuple[str, Any]] = {
    "database_url": (
        "postgresql://someone@db.example:5432/other",
        "postgresql://someone@db.example:5432/other",
    ),
    "signing_key": (KEY, KEY),
    "trusted_public_keys": (json.dumps([KEY]), [KEY]),
    "rollout_steps": ("[0.25, 1.0]", [0.25, 1.0]),
    "fit_memory_limit_mb": ("8192", 8192),
    "log_level": ("debug", "DEBUG"),
    # Below half of stale_after_s's default (30 s): the midpoint of its bounds is not.
    "heartbeat_interval_s": ("3.0", 3.0),
}


def another_value(setting: Setting) -> tuple[str, Any]:
    """A value the setting accepts and does not have by default: as the environment writes it, and as it
    arrives."""
    if setting.name in VALID:
        return VALID[setting.name]
    info = setting.info
    current = info.get_default(call_default_factory=True)
    allowed = settings_doc.choices(info.annotation)
    kind = settings_doc.type_name(info.annotation)
    if allowed:
        chosen = next(c for c in allowed if c != str(getattr(current, "value", current)))
        return chosen, chosen
    if kind == "bool":
        return str(not current).lower(), not current
    if kind in ("int", "float"):
        upper = next((getattr(m, a) for m in info.metadata for a in ("le", "lt") if hasattr(m, a)), None)
        if kind == "int":
            value: float = current + 1 if upper is None or current + 1 <= upper else current - 1
        else:
            value = current + 1 if upper is None else (current + upper) / 2
        return repr(value), value
    if kind == "path":
        return "/srv/driftloop/elsewhere", Path("/srv/driftloop/elsewhere")
    if kind == "secret":
        return "not-the-default", "not-the-default"
    if kind == "JSON list of str":
        return '["elsewhere"]', ["elsewhere"]
    assert kind == "str", f"no test value for {setting.name} ({kind})"
    return f"{current or ''}x", f"{current or ''}x"


def arrived(settings: BaseModel, name: str) -> Any:
    value: Any = settings
    for part in name.split("."):
        value = getattr(value, part)
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return getattr(value, "value", value)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=[c.__name__ for c in ALL_CLASSES])
def test_every_variable_the_reference_names_sets_its_setting(
    cls: type[BaseSettings], clean_env: pytest.MonkeyPatch
) -> None:
    wrong = []
    checked = 0
    for setting in settings_doc.settings_of(cls):
        written, expected = another_value(setting)
        assert arrived(cls(), setting.name) != expected, f"{setting.name}: the test value is the default"
        for variable in setting.variables:
            clean_env.setenv(variable, written)
            got = arrived(cls(), setting.name)
            clean_env.delenv(variable)
            checked += 1
            if got != expected:
                wrong.append(f"{variable}={written} gave {setting.name}={got!r}, not {expected!r}")
    assert wrong == []
    assert checked >= len(cls.model_fields)


def test_a_services_own_variable_wins_over_the_shared_one(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DRIFTLOOP_DB_POOL_MAX", "5")
    clean_env.setenv("DRIFTLOOP_AUDIT_DB_POOL_MAX", "6")

    assert AuditSettings().db_pool_max == 6
    assert RegistrySettings().db_pool_max == 5


def test_a_services_own_setting_falls_back_to_the_shared_name(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DRIFTLOOP_WINDOW_ROWS", "123")
    assert MonitoringSettings().window_rows == 123

    clean_env.setenv("DRIFTLOOP_MONITORING_WINDOW_ROWS", "456")
    assert MonitoringSettings().window_rows == 456


def test_nested_kafka_variables_are_read_in_the_order_listed(clean_env: pytest.MonkeyPatch) -> None:
    (row,) = [s for s in settings_doc.settings_of(ServingSettings) if s.name == "kafka.topic_prefix"]
    assert row.variables == (
        "DRIFTLOOP_SERVING_KAFKA__TOPIC_PREFIX",
        "DRIFTLOOP_KAFKA__TOPIC_PREFIX",
        "DRIFTLOOP_KAFKA_TOPIC_PREFIX",
    )
    for i, variable in enumerate(row.variables):
        clean_env.setenv(variable, f"p{i}.")

    for i, variable in enumerate(row.variables):  # each, once those before it are unset, wins
        assert ServingSettings().kafka.topic_prefix == f"p{i}."
        clean_env.delenv(variable)
    assert ServingSettings().kafka.topic_prefix == ""


# --- the only names ----------------------------------------------------------------------------------

# Where the docs and the code that speaks to users name variables.
NAMED_IN = ["README.md", "docker-compose.yml", "docs", "deploy", "libs", "services"]
# docs/benchmarks.md is a log of past runs, which names variables as they were then (DRIFTLOOP_TMP_MODE:
# an experiment's switch that was never committed); a stale name there is history, not advice.
HISTORY = ["docs/benchmarks.md"]


def named_variables() -> list[tuple[str, int, str]]:
    """Every DRIFTLOOP_* name in those files: (file, line, name)."""
    found = []
    for top in NAMED_IN:
        paths = (
            [PROJECT_ROOT / top]
            if (PROJECT_ROOT / top).is_file()
            else sorted((PROJECT_ROOT / top).rglob("*"))
        )
        for path in paths:
            rel = str(path.relative_to(PROJECT_ROOT))
            if not path.is_file() or "__pycache__" in path.parts or rel in HISTORY:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # not text
            for number, line in enumerate(text.splitlines(), 1):
                found += [(rel, number, name) for name in re.findall(r"DRIFTLOOP_[A-Z0-9_]+", line)]
    return found


def unknown(named: list[tuple[str, int, str]]) -> list[str]:
    """The names no settings class reads and no known script or test reads either; a prefix
    (`DRIFTLOOP_AUDIT_` in `DRIFTLOOP_AUDIT_*`) counts when some variable starts with it."""
    real = settings_doc.all_variables() | set(OTHER_VARIABLES)
    prefixes = {v[: i + 1] for v in real for i, c in enumerate(v) if c == "_"}
    return [f"{rel}:{line}: {name}" for rel, line, name in named if name not in real | prefixes]


def test_every_variable_the_docs_name_is_read() -> None:
    named = named_variables()

    assert len(named) > 50, "the scan found too few names to prove anything"
    assert unknown(named) == []


def test_a_stale_name_is_found() -> None:
    named = [
        ("docs/x.md", 1, "DRIFTLOOP_MONITORING_WINDOW_SIZE"),  # no such setting
        ("docs/x.md", 2, "DRIFTLOOP_KAFKA_BOOTSTRAP_SERVERS"),
        # one underscore where the nested name has two
        ("docs/x.md", 3, "DRIFTLOOP_REGISTRY_KAFKA_BOOTSTRAP"),
        ("docs/x.md", 4, "DRIFTLOOP_NOPE_"),
        ("docs/x.md", 5, "DRIFTLOOP_MONITORING_WINDOW_ROWS"),
        ("docs/x.md", 6, "DRIFTLOOP_REGISTRY_KAFKA__BOOTSTRAP"),
        ("docs/x.md", 7, "DRIFTLOOP_AUDIT_"),
        ("docs/x.md", 8, "DRIFTLOOP_PYTHON"),
    ]

    assert unknown(named) == [
        "docs/x.md:1: DRIFTLOOP_MONITORING_WINDOW_SIZE",
        "docs/x.md:2: DRIFTLOOP_KAFKA_BOOTSTRAP_SERVERS",
        "docs/x.md:3: DRIFTLOOP_REGISTRY_KAFKA_BOOTSTRAP",
        "docs/x.md:4: DRIFTLOOP_NOPE_",
    ]


@pytest.mark.parametrize("name", sorted(OTHER_VARIABLES))
def test_each_variable_read_outside_the_settings_is_read_where_the_reference_says(name: str) -> None:
    where, _ = OTHER_VARIABLES[name]
    assert name in (PROJECT_ROOT / where).read_text(encoding="utf-8")
    assert name not in settings_doc.all_variables()
