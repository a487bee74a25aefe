"""The CLI's error messages (what is wrong and what to do, never a traceback), and what a failing `up` or
`demo` leaves behind: nothing it started."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.abc
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from deploy import cli
from deploy.cli import COMMANDS, LOCAL_PROFILE, build_parser, main, platform_env
from deploy.local.broker import KafkaBroker
from deploy.local.errors import PortTaken
from deploy.local.infra import UpResult
from deploy.local.interrupts import ChildOutcome
from deploy.local.processes import read_pid
from deploy.local.settings import LocalInfraSettings, StateLayout
from deploy.platform import Supervision
from libs.auth import Principal, Role, TokenStore
from services.audit import cli as audit_cli
from services.audit.settings import AuditSettings
from services.serving.settings import ServingSettings
from tests.ports import free_port
from tests.unit.infra_fakes import FakeInfra


@pytest.fixture
def foreign_listener() -> Iterator[int]:
    """A port held by a process that is not driftloop's (this test process)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_port_taken_by_a_foreign_process_names_the_owner(foreign_listener: int, tmp_path: Path) -> None:
    settings = LocalInfraSettings(
        state_dir=tmp_path, kafka_port=foreign_listener, kafka_controller_port=free_port()
    )
    broker = KafkaBroker(settings, StateLayout.from_settings(settings))

    with pytest.raises(PortTaken) as caught:
        broker.preflight()

    assert f"port {foreign_listener} (Kafka) is already in use by pid " in caught.value.message
    assert "python" in caught.value.message
    assert "DRIFTLOOP_LOCAL_KAFKA_PORT" in caught.value.hint


def test_cli_prints_what_is_wrong_and_what_to_do_without_a_traceback(
    foreign_listener: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DRIFTLOOP_LOCAL_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("DRIFTLOOP_LOCAL_KAFKA_PORT", str(foreign_listener))
    monkeypatch.delenv("DRIFTLOOP_KAFKA_BOOTSTRAP", raising=False)

    code = main(["infra", "up"])

    err = capsys.readouterr().err
    assert code == 1
    assert f"driftloop: error: port {foreign_listener} (Kafka) is already in use" in err
    assert "driftloop: what to do: stop that process, or choose another port" in err
    assert "Traceback" not in err


def test_unknown_arguments_are_refused_except_where_they_pass_through() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["infra", "status", "--bogus"])
    assert caught.value.code == 2

    args, extra = build_parser().parse_known_args(["test", "-x", "-k", "bus"])
    assert args.command.passthrough
    assert extra == ["-x", "-k", "bus"]


def test_every_command_in_the_table_is_reachable() -> None:
    parser = build_parser()
    for command in COMMANDS:
        args, _ = parser.parse_known_args(list(command.path))
        assert args.command is command


def test_token_issue_prints_a_token_that_the_services_accept_in_prod(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens.json"

    assert main(["token", "issue", "billing-client", "--role", "predict", "--file", str(tokens)]) == 0
    assert main(["token", "issue", "alice", "--role", "operator", "--file", str(tokens)]) == 0

    out = capsys.readouterr().out.split()
    store = TokenStore.load(tokens, dev=False)
    assert store.authenticate(out[0]) == Principal("billing-client", Role.predict)
    assert store.authenticate(out[1]) == Principal("alice", Role.operator)
    assert out[0] not in tokens.read_text()  # only its hash is kept
    assert store.authenticate("dev-admin") is None


def test_token_issue_says_which_token_it_added(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokens = tmp_path / "tokens.json"
    assert main(["token", "issue", "compliance", "--role", "auditor", "--file", str(tokens)]) == 0
    assert main(["token", "issue", "bob", "--role", "viewer", "--file", str(tokens)]) == 0
    said = capsys.readouterr().err
    assert "added an auditor token for 'compliance' to" in said
    assert "added a viewer token for 'bob' to" in said


def test_token_issue_limits_a_predict_token_to_the_models_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens.json"
    issue = ["token", "issue", "billing-client", "--role", "predict", "--file", str(tokens)]

    assert main([*issue, "--model", "churn", "--model", "fraud"]) == 0

    captured = capsys.readouterr()
    store = TokenStore.load(tokens, dev=False)
    assert store.authenticate(captured.out.strip()) == Principal(
        "billing-client", Role.predict, frozenset({"churn", "fraud"})
    )
    assert "added a predict token for 'billing-client' (models: churn, fraud) to" in captured.err


@pytest.mark.parametrize(
    ("arguments", "why"),
    [
        (["--role", "viewer", "--model", "churn"], "its role is viewer: only a predict token may be limited"),
        (
            ["--role", "predict", "--model", "a/b"],
            "--model: the token's models name 'a/b', which is no model",
        ),
        (["--role", "predict", "--model", "x", "--model", "x"], "--model: the token's models name 'x' twice"),
    ],
    ids=["another-role", "bad-name", "twice"],
)
def test_token_issue_refuses_models_that_cannot_limit_the_token(
    arguments: list[str], why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.json"

    with pytest.raises(SystemExit) as caught:
        main(["token", "issue", "client", *arguments, "--file", str(path)])

    assert caught.value.code == 2
    assert why in capsys.readouterr().err
    assert not path.exists()


@pytest.mark.parametrize(
    "content",
    ["not json", '{"x": 1}', "[]", '{"tokens": [{"name": "a", "role": "root", "sha256": "00"}]}', None],
    ids=["not-json", "no-tokens-list", "a-list", "unknown-role", "a-directory"],
)
def test_token_issue_names_a_token_file_it_cannot_use_and_leaves_it_as_it_was(
    content: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)

    assert main(["token", "issue", "alice", "--role", "viewer", "--file", str(path)]) == 1

    err = capsys.readouterr().err
    assert f"driftloop: error: the token file {path} (--file) " in err
    assert "driftloop: what to do: correct the file" in err
    assert "Traceback" not in err
    assert content is None or path.read_text() == content


def test_token_issue_refuses_a_blank_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tokens.json"

    with pytest.raises(SystemExit) as caught:
        main(["token", "issue", "   ", "--role", "viewer", "--file", str(path)])

    assert caught.value.code == 2
    assert "a name (not blank)" in capsys.readouterr().err
    assert not path.exists()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("bad\x00name", "NUL character"),
        ("x" * 508, "508 characters; at most 507"),
        ("ops\nteam", "control character (U+000A)"),
        ("ops\x85team", "control character (U+0085)"),
        ("ops\ufffeteam", "Unicode noncharacter (U+FFFE)"),
    ],
    ids=["nul", "too-long", "newline", "c1-control", "noncharacter"],
)
def test_token_issue_refuses_a_name_no_event_could_carry_as_its_actor(
    name: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.json"

    with pytest.raises(SystemExit) as caught:
        main(["token", "issue", name, "--role", "operator", "--file", str(path)])

    assert caught.value.code == 2
    assert why in capsys.readouterr().err
    assert not path.exists()


def test_infra_topics_creates_the_topics_under_the_configured_prefix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DRIFTLOOP_KAFKA_TOPIC_PREFIX", "team-a.")
    created: list[tuple[str, int, str]] = []

    def create_platform_topics(bootstrap: str, replication_factor: int = 1, *, prefix: str = "") -> list[str]:
        created.append((bootstrap, replication_factor, prefix))
        return [f"{prefix}io.driftloop.models"]

    monkeypatch.setattr(cli, "broker_answers", lambda bootstrap: True)
    monkeypatch.setattr(cli, "create_platform_topics", create_platform_topics)

    argv = ["infra", "topics", "--bootstrap", "kafka.internal:9092", "--replication-factor", "3"]
    assert main(argv) == 0

    assert created == [("kafka.internal:9092", 3, "team-a.")]
    assert "created topics: team-a.io.driftloop.models" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["99999", "abc"])
def test_audit_commands_name_a_database_url_they_cannot_use_without_its_password(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Built without validation: the settings refuse such a URL themselves; a form they let through must
    # still get a message from the command, not a traceback.
    url = f"postgresql://audit:TopSecretPw@127.0.0.1:{port}/driftloop"
    settings = AuditSettings.model_construct(database_url=url)

    assert audit_cli.tail(limit=1, settings=settings) == 1
    assert audit_cli.trace("some-cascade", settings=settings) == 1

    err = capsys.readouterr().err
    assert err.count("driftloop: error: DRIFTLOOP_DATABASE_URL is not a Postgres URL that can be used") == 2
    assert "postgresql://audit:***@127.0.0.1" in err and "TopSecretPw" not in err


def test_audit_tail_names_a_database_it_cannot_reach_without_its_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", f"postgresql://audit:TopSecretPw@127.0.0.1:{free_port()}/x")

    assert main(["audit", "tail"]) == 1

    err = capsys.readouterr().err
    assert "driftloop: error: cannot reach Postgres at postgresql://audit:***@127.0.0.1:" in err
    assert "TopSecretPw" not in err


def test_ctrl_c_ends_audit_tail_follow_with_130_as_every_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    @contextlib.asynccontextmanager
    async def interrupted_pool(settings: AuditSettings) -> AsyncIterator[object]:
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the command waits
        await asyncio.sleep(10)
        raise AssertionError("SIGINT did not interrupt the command")
        yield

    monkeypatch.setattr(audit_cli, "_pool", interrupted_pool)
    # Ctrl-C as from a terminal, whatever this process inherited (a background job ignores SIGINT).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = main(["audit", "tail", "-f"])
    finally:
        signal.signal(signal.SIGINT, previous)

    assert status == 130
    assert "driftloop: interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--model", "--type"])
def test_audit_tail_refuses_an_empty_filter_as_a_usage_error(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["audit", "tail", option, ""])

    assert exited.value.code == 2
    assert f"argument {option}: is empty: give a value" in capsys.readouterr().err


@pytest.mark.parametrize("variable", ["DRIFTLOOP_AUDIT_SIGNING_KEY_FILE", "DRIFTLOOP_AUDIT_CHECKPOINT_FILE"])
def test_audit_verify_names_the_setting_of_a_file_it_cannot_read(
    variable: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(variable, str(tmp_path))  # a directory

    assert main(["audit", "verify"]) == 1

    err = capsys.readouterr().err
    assert f"driftloop: error: {variable} {tmp_path} cannot be read: Is a directory" in err


# --- what `up` and `demo` leave behind when they fail --------------------------------------------------


CHOSEN = UpResult((), "127.0.0.1:19092", "postgresql://driftloop@127.0.0.1:54329/driftloop")


class FakePlatform:
    """A supervised platform that was (or was not) running before, and becomes ready (or not)."""

    def __init__(
        self, *, running_before: bool = False, ready: bool = True, start_error: bool = False
    ) -> None:
        self.running = running_before
        self.ready = ready
        self.start_error = start_error
        self.stops = 0
        self.log = Path("/nonexistent/logs/supervisor.log")

    def start(self, env: dict[str, str]) -> Supervision:
        if self.start_error:
            raise PortTaken("port 8101 (the registry service) is already in use by pid 7 (nc -l 8101).")
        started = not self.running
        self.running = True
        return Supervision(4242, started=started)

    def supervisor_pid(self) -> int | None:
        return 4242 if self.running else None

    def wait_ready(self, timeout_s: float) -> dict[str, str]:
        return self.health()

    def health(self) -> dict[str, str]:
        return {"registry": "ready", "audit": "ready" if self.ready else "down"}

    def state(self) -> dict[str, dict[str, int | None]]:
        return {}

    def url(self, service: str) -> str:
        return "http://127.0.0.1:8101"

    def stop(self) -> bool:
        self.stops += 1
        self.running = False
        return True


@pytest.fixture
def infra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeInfra:
    fake = FakeInfra(tmp_path / ".driftloop", monkeypatch)
    monkeypatch.setattr(cli, "LocalInfra", lambda: fake.local)
    return fake


def use_platform(monkeypatch: pytest.MonkeyPatch, platform: FakePlatform) -> FakePlatform:
    monkeypatch.setattr(cli, "local_platform", lambda: platform)
    return platform


def test_a_demo_whose_services_never_get_ready_stops_what_it_started(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    platform = use_platform(monkeypatch, FakePlatform(ready=False))

    assert main(["demo", "--wait", "0"]) == 1

    assert platform.stops == 1
    assert infra.stopped == ["kafka", "postgres"]
    err = capsys.readouterr().err
    assert "driftloop: error: the services did not become ready." in err
    assert "stopping what the demo started" in err


def test_a_demo_that_cannot_start_the_services_stops_the_infrastructure_it_started(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    platform = use_platform(monkeypatch, FakePlatform(start_error=True))

    assert main(["demo"]) == 1

    assert platform.stops == 0  # it never started one
    assert infra.stopped == ["kafka", "postgres"]
    assert "port 8101 (the registry service) is already in use" in capsys.readouterr().err


def test_a_demo_leaves_a_platform_that_ran_before_it_alone(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch
) -> None:
    platform = use_platform(monkeypatch, FakePlatform(running_before=True, ready=False))

    assert main(["demo", "--wait", "0"]) == 1

    assert platform.stops == 0
    assert infra.stopped == []  # the platform that was running keeps using it


def test_keep_running_keeps_nothing_of_a_demo_that_never_got_ready(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch
) -> None:
    platform = use_platform(monkeypatch, FakePlatform(ready=False))

    assert main(["demo", "--wait", "0", "--keep-running"]) == 1

    assert platform.stops == 1
    assert infra.stopped == ["kafka", "postgres"]


def test_up_that_does_not_get_ready_stops_what_it_started_and_says_so(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    platform = use_platform(monkeypatch, FakePlatform(ready=False))

    assert main(["up", "--wait", "0"]) == 1

    assert platform.stops == 1
    assert infra.stopped == ["kafka", "postgres"]
    assert "stopping what this `up` started" in capsys.readouterr().err


def test_up_that_gets_ready_leaves_everything_running(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch
) -> None:
    platform = use_platform(monkeypatch, FakePlatform())

    assert main(["up"]) == 0

    assert platform.running and platform.stops == 0
    assert infra.stopped == []


def pytest_that_exits(monkeypatch: pytest.MonkeyPatch, code: int, meanwhile: Callable[[], object]) -> None:
    """`driftloop test`'s pytest, as one that ends with ``code`` after ``meanwhile`` happened elsewhere."""

    def run(command: list[str], **_: object) -> ChildOutcome:
        meanwhile()
        return ChildOutcome(code)

    monkeypatch.setattr(cli, "run_to_completion", run)


def test_a_test_run_stops_the_infrastructure_it_started(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_platform(monkeypatch, FakePlatform())
    pytest_that_exits(monkeypatch, 3, lambda: None)

    assert main(["test", "-q"]) == 3

    assert infra.stopped == ["kafka", "postgres"]


def test_a_test_run_leaves_the_infrastructure_to_a_platform_started_meanwhile(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `driftloop test` in one terminal started Kafka and Postgres; `driftloop up` in another found them
    # running and started the services on them. The tests ending must not pull them from under it.
    platform = use_platform(monkeypatch, FakePlatform())
    pytest_that_exits(monkeypatch, 0, lambda: platform.start({}))

    assert main(["test", "-q"]) == 0

    assert infra.stopped == []
    assert platform.running and platform.stops == 0
    assert "this checkout's platform (supervisor pid 4242) runs on them" in capsys.readouterr().err


def test_a_test_run_leaves_the_infrastructure_to_an_up_that_got_ready_meanwhile(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    platform = use_platform(monkeypatch, FakePlatform())
    pytest_that_exits(monkeypatch, 0, lambda: main(["up"]))

    assert main(["test", "-q"]) == 0

    assert infra.stopped == [] and platform.running
    assert "leaving Kafka and Postgres running: taken over by `driftloop up`" in capsys.readouterr().err


def test_infra_up_takes_over_what_a_running_test_started(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_platform(monkeypatch, FakePlatform())
    pytest_that_exits(monkeypatch, 0, lambda: main(["infra", "up"]))

    assert main(["test", "-q"]) == 0

    assert infra.stopped == []
    err = capsys.readouterr().err
    assert "Kafka and Postgres stay running after the commands that started them end" in err


def test_infra_down_stops_what_running_commands_use_and_names_them(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_platform(monkeypatch, FakePlatform())
    running = infra.local.lease("driftloop test")  # a test run in another terminal
    running.up()

    assert main(["infra", "down"]) == 0

    assert infra.stopped == ["kafka", "postgres"]
    err = capsys.readouterr().err
    assert (
        "stopping Kafka and Postgres although running commands use them (they will fail): "
        f"pid {os.getpid()} (driftloop test)"
    ) in err


def test_infra_down_names_the_platform_that_runs_on_what_it_stops(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An `up` that got ready has ended: its platform runs on, with no lease to name it.
    platform = use_platform(monkeypatch, FakePlatform(running_before=True))
    infra.local.up()

    assert main(["infra", "down"]) == 0

    assert infra.stopped == ["kafka", "postgres"] and platform.stops == 0
    assert (
        "stopping Kafka and Postgres although this checkout's platform (supervisor pid 4242) runs on them"
    ) in capsys.readouterr().err


def test_a_test_run_whose_infrastructure_was_stopped_under_it_says_nothing_of_stopping_or_leaving_it(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_platform(monkeypatch, FakePlatform())
    pytest_that_exits(monkeypatch, 1, lambda: main(["infra", "down"]))

    assert main(["test", "-q"]) == 1

    assert infra.stopped == ["kafka", "postgres"]  # by `infra down`, once
    err = capsys.readouterr().err
    assert "stopping Kafka and Postgres although running commands use them" in err
    assert "which no running command uses" not in err and "leaving" not in err


def test_infra_status_names_the_running_commands_that_use_it(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    running = infra.local.lease("driftloop demo")
    running.up()

    assert main(["infra", "status"]) == 0

    assert f"driftloop: in use by: pid {os.getpid()} (driftloop demo)" in capsys.readouterr().err


def test_infra_down_left_behind_stops_only_what_no_running_command_uses(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    use_platform(monkeypatch, FakePlatform())
    running = infra.local.lease("driftloop test")
    running.up()

    assert main(["infra", "down", "--left-behind"]) == 0
    assert infra.stopped == []
    assert "nothing left behind by a command that has ended was running" in capsys.readouterr().err

    running.lease.close()  # as its process's end (SIGKILL) leaves it: no `end`, nothing stopped by it

    assert main(["infra", "down", "--left-behind"]) == 0
    assert infra.stopped == ["kafka", "postgres"]


@pytest.mark.parametrize("command", [["infra", "up"], ["up"]])
def test_infra_down_left_behind_leaves_what_a_developer_brought_up_alone(
    infra: FakeInfra, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    # A `driftloop test` started Kafka and Postgres and was killed; then the developer brought them up.
    use_platform(monkeypatch, FakePlatform())
    killed = infra.local.lease("driftloop test")
    killed.up()
    killed.lease.close()
    assert main(command) == 0

    assert main(["infra", "down", "--left-behind"]) == 0

    assert infra.stopped == []


def test_the_services_use_the_broker_and_database_infra_chose_over_a_dead_one_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DRIFTLOOP_KAFKA_BOOTSTRAP", "127.0.0.1:1")  # infra said: does not answer
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/gone")
    monkeypatch.setenv("DRIFTLOOP_MONITORING_WINDOW_ROWS", "500")
    chosen = CHOSEN

    env = platform_env(chosen)

    assert env["DRIFTLOOP_KAFKA_BOOTSTRAP"] == chosen.kafka_bootstrap
    assert env["DRIFTLOOP_DATABASE_URL"] == chosen.database_url
    assert env["DRIFTLOOP_MONITORING_WINDOW_ROWS"] == "500"  # the caller's other settings still win
    bake = "DRIFTLOOP_SERVING_ROLLOUT_BAKE_SECONDS"
    assert env[bake] == LOCAL_PROFILE[bake]  # the laptop profile under them


def test_no_variable_a_service_reads_first_overrides_the_broker_and_database_infra_chose(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each of these is read before DRIFTLOOP_KAFKA_BOOTSTRAP or DRIFTLOOP_DATABASE_URL (docs/settings.md).
    monkeypatch.setenv("DRIFTLOOP_KAFKA__BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setenv("DRIFTLOOP_SERVING_KAFKA__BOOTSTRAP", "127.0.0.1:2")
    monkeypatch.setenv("DRIFTLOOP_AUDIT_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/gone")
    monkeypatch.setenv("DRIFTLOOP_AUDIT_KAFKA__TOPIC_PREFIX", "mine.")  # not the broker: kept
    chosen = CHOSEN

    env = platform_env(chosen)

    assert not {
        "DRIFTLOOP_KAFKA__BOOTSTRAP",
        "DRIFTLOOP_SERVING_KAFKA__BOOTSTRAP",
        "DRIFTLOOP_AUDIT_DATABASE_URL",
    } & (env.keys())
    assert env["DRIFTLOOP_AUDIT_KAFKA__TOPIC_PREFIX"] == "mine."
    with monkeypatch.context() as services:
        for name in [n for n in os.environ if n.startswith("DRIFTLOOP_")]:
            services.delenv(name)
        for name, value in env.items():
            services.setenv(name, value)
        for settings in (AuditSettings(), ServingSettings()):
            assert settings.kafka.bootstrap == chosen.kafka_bootstrap
            assert settings.database_url == chosen.database_url
    err = capsys.readouterr().err
    assert "ignoring DRIFTLOOP_AUDIT_DATABASE_URL: the services use what `infra up` chose" in err


def test_a_malformed_setting_is_named_with_what_to_do_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DRIFTLOOP_LOCAL_KAFKA_PORT", "19092x")

    assert main(["infra", "status"]) == 1

    err = capsys.readouterr().err
    assert "driftloop: error: DRIFTLOOP_LOCAL_KAFKA_PORT='19092x' is not valid:" in err
    assert "driftloop: what to do: correct or unset it" in err
    assert "Traceback" not in err


def test_an_invalid_setting_is_named_without_printing_any_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A check across settings (the keys decode) fails: pydantic's input for it is every setting.
    signing_key = base64.b64encode(b"k" * 32).decode()
    monkeypatch.setenv("DRIFTLOOP_ENV", "prod")
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", "postgresql://audit:TopSecretPw@db.internal/driftloop")
    monkeypatch.setenv("DRIFTLOOP_AUDIT_SIGNING_KEY", signing_key)
    monkeypatch.setenv("DRIFTLOOP_AUDIT_TRUSTED_PUBLIC_KEYS", '["x"]')

    assert main(["audit", "tail"]) == 1

    err = capsys.readouterr().err
    assert "driftloop: error: DRIFTLOOP_AUDIT_TRUSTED_PUBLIC_KEYS[0] is not base64" in err
    assert "TopSecretPw" not in err and signing_key not in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DRIFTLOOP_AUDIT_TOPICS", "io.driftloop.models,io.driftloop.rollouts"),
        ("DRIFTLOOP_AUDIT_TRUSTED_PUBLIC_KEYS", "notjson"),
    ],
)
def test_a_list_setting_that_is_not_json_is_named_and_shown_as_a_json_list(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(variable, value)

    assert main(["audit", "tail"]) == 1

    err = capsys.readouterr().err
    assert f"driftloop: error: {variable}" in err
    assert 'is not valid: it must be a JSON list, e.g. ["a", "b"]' in err
    assert "Traceback" not in err


@pytest.mark.parametrize("count", ["0", "-1", "ten"])
def test_audit_tail_refuses_a_count_that_is_not_1_or_more(
    count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["audit", "tail", "-n", count])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "argument -n/--lines:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--from", "0"], "argument --from:"),
        (["--from", "-3"], "argument --from:"),
        (["--to", "0"], "argument --to:"),
        (["--to", "last"], "argument --to:"),
    ],
)
def test_audit_verify_refuses_a_row_number_that_is_not_1_or_more_naming_its_option(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The core's own check would name from_seq or to_seq, which this command has no option for.
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["audit", "verify", *argv])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["infra", "topics", "--wait", "nan"],
        ["up", "--wait", "-5"],
        ["up", "--wait", "-0.1"],
        ["demo", "--wait", "inf"],
        ["demo", "--wait", "soon"],
    ],
)
def test_wait_refuses_what_is_not_a_finite_number_of_seconds_0_or_more(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == 2
    assert "argument --wait:" in capsys.readouterr().err


@pytest.mark.parametrize("seconds", ["0.5", "0"])
def test_wait_takes_a_fraction_of_a_second_or_0_to_look_once(seconds: str) -> None:
    assert build_parser().parse_args(["infra", "topics", "--wait", seconds]).wait == float(seconds)


def test_the_platform_lives_in_the_state_folder_the_leases_and_infrastructure_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second stack beside the default one (docs/operations.md) must not see, start or stop the default
    # checkout's platform: its supervisor pid, services' state and logs are under its own state folder.
    monkeypatch.setenv("DRIFTLOOP_LOCAL_STATE_DIR", str(tmp_path / "elsewhere"))

    platform = cli.local_platform()

    assert platform.state_dir == cli.LocalInfra().layout.root == (tmp_path / "elsewhere").resolve()
    assert platform.pid_file.is_relative_to(tmp_path / "elsewhere")


# The variables that name the services' own files, the fallbacks included (docs/settings.md).
SERVICE_FILE_VARIABLES = (
    "DRIFTLOOP_ARTIFACTS_URL",
    "DRIFTLOOP_AUTH_TOKENS_FILE",
    "DRIFTLOOP_AUDIT_SIGNING_KEY_FILE",
    "DRIFTLOOP_SIGNING_KEY_FILE",
    "DRIFTLOOP_AUDIT_CHECKPOINT_FILE",
    "DRIFTLOOP_CHECKPOINT_FILE",
)


@pytest.fixture
def second_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state folder of its own (a second stack beside the default one), with none of the services' files
    named by the caller; its resolved path."""
    monkeypatch.setenv("DRIFTLOOP_LOCAL_STATE_DIR", str(tmp_path / "second"))
    for name in SERVICE_FILE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return (tmp_path / "second").resolve()


def read_as_a_service(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> AuditSettings:
    """The audit settings in ``env`` alone, as the process the supervisor starts with it reads them."""
    with monkeypatch.context() as service:
        for name in [n for n in os.environ if n.startswith("DRIFTLOOP_")]:
            service.delenv(name)
        for name, value in env.items():
            service.setenv(name, value)
        return AuditSettings()


def test_the_services_of_a_second_stack_keep_their_files_in_its_state_folder(
    second_stack: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not the checkout's .driftloop/: two stacks would share one token file and one checkpoint file.
    settings = read_as_a_service(monkeypatch, platform_env(CHOSEN))

    assert settings.artifacts_url == str(second_stack / "artifacts")
    assert settings.auth_tokens_file == second_stack / "tokens.json"
    assert settings.signing_key_file == second_stack / "audit" / "signing.key"
    assert settings.checkpoint_file == second_stack / "audit" / "checkpoints.ndjson"


def test_the_callers_own_files_win_over_the_state_folders(
    second_stack: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLOOP_ARTIFACTS_URL", "s3://bucket/driftloop")
    # Read after DRIFTLOOP_AUDIT_CHECKPOINT_FILE: the state folder's must not be set ahead of it.
    monkeypatch.setenv("DRIFTLOOP_CHECKPOINT_FILE", "/archive/checkpoints.ndjson")

    env = platform_env(CHOSEN)
    settings = read_as_a_service(monkeypatch, env)

    assert env["DRIFTLOOP_ARTIFACTS_URL"] == settings.artifacts_url == "s3://bucket/driftloop"
    assert settings.checkpoint_file == Path("/archive/checkpoints.ndjson")
    assert settings.auth_tokens_file == second_stack / "tokens.json"  # what the caller left unset


def test_token_issue_adds_to_the_token_file_of_the_state_folder(
    second_stack: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "issue", "alice", "--role", "viewer"]) == 0

    token = capsys.readouterr().out.strip()
    store = TokenStore.load(second_stack / "tokens.json", dev=False)
    assert store.authenticate(token) == Principal("alice", Role.viewer)


@pytest.mark.parametrize(
    ("variable", "path"),
    [
        ("DRIFTLOOP_AUDIT_SIGNING_KEY_FILE", Path("audit", "signing.key")),
        ("DRIFTLOOP_AUDIT_CHECKPOINT_FILE", Path("audit", "checkpoints.ndjson")),
    ],
)
def test_audit_verify_reads_the_key_and_checkpoints_of_the_state_folder(
    variable: str, path: Path, second_stack: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (second_stack / path).mkdir(parents=True)  # a directory: the command says which file it read

    assert main(["audit", "verify"]) == 1

    err = capsys.readouterr().err
    assert f"driftloop: error: {variable} {second_stack / path} cannot be read: Is a directory" in err


def test_the_audit_commands_read_the_callers_files_over_the_state_folders(
    second_stack: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLOOP_AUDIT_SIGNING_KEY_FILE", "/keys/audit.key")
    monkeypatch.setenv("DRIFTLOOP_CHECKPOINT_FILE", "/archive/checkpoints.ndjson")

    settings = cli.platform_settings(AuditSettings)

    assert settings.signing_key_file == Path("/keys/audit.key")
    assert settings.checkpoint_file == Path("/archive/checkpoints.ndjson")
    assert settings.auth_tokens_file == second_stack / "tokens.json"


async def test_audit_verify_of_an_empty_range_says_it_is_empty_not_rows_24_to_23() -> None:
    from contracts.monitoring import DriftDetected
    from services.audit.core import verify_trail
    from services.audit.domain import KeyRing, Signer
    from tests.unit.audit.fakes import SEED, FakeTrail, delivery, example, record

    trail, signer = FakeTrail(), Signer(SEED)
    await record(trail, signer, [delivery(example(DriftDetected), offset=i) for i in range(23)], every=10)
    keys = KeyRing([signer.public_raw])

    empty = await verify_trail(trail, keys=keys, sealer=None, from_seq=24)  # one past the end
    nothing = await verify_trail(FakeTrail(), keys=keys, sealer=None)
    some = await verify_trail(trail, keys=keys, sealer=None, from_seq=21)

    assert empty.ok and nothing.ok
    line = audit_cli.verdict(empty)
    assert "24..23" not in line
    assert "nothing to verify: the trail ends at row 23, before --from 24" in line
    assert "nothing to verify: the trail has no rows yet" in audit_cli.verdict(nothing)
    assert "rows 21..23 chain (fast)" in audit_cli.verdict(some)


TOO_LONG = "characters, more than the 512 the trail indexes it by"


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["audit", "trace", "cascade-\udcff"], "is not UTF-8 text: b'"),
        (["audit", "tail", "--model", "\udcffchurn"], "is not UTF-8 text: b'"),
        (["audit", "tail", "--type", "\udce9"], "is not UTF-8 text: b'"),
        # Longer than the trail indexes was an error of the query (exit 1), once the database was reached.
        (["audit", "trace", "c" * 513], TOO_LONG),
        (["audit", "trace", "c" * 100_000, "--json"], TOO_LONG),
        (["audit", "tail", "--model", "m" * 513], TOO_LONG),
        (["audit", "tail", "--type", "T" * 513], TOO_LONG),
    ],
    ids=[
        "trace",
        "tail-model",
        "tail-type",
        "trace-long",
        "trace-json-huge",
        "tail-model-long",
        "tail-type-long",
    ],
)
def test_audit_text_no_query_takes_is_a_usage_error_not_a_postgres_refusal(
    argv: list[str], why: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A byte that is not UTF-8 on the command line ($'\xff' in a shell) arrives as a lone surrogate.
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", f"postgresql://audit@127.0.0.1:{free_port()}/x")

    with pytest.raises(SystemExit) as caught:
        main(argv)

    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert why in err
    assert "Postgres" not in err and "Traceback" not in err


def test_audit_verify_to_below_from_is_a_usage_error_naming_the_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", f"postgresql://audit@127.0.0.1:{free_port()}/x")

    with pytest.raises(SystemExit) as caught:
        main(["audit", "verify", "--from", "5", "--to", "3"])

    assert caught.value.code == 2
    assert "--to 3 is below --from 5" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["down"], ["infra", "status"], ["status"]])
@pytest.mark.parametrize("state", ["", "a-file"], ids=["empty", "a-file"])
def test_a_state_folder_setting_that_names_no_folder_is_refused_naming_it(
    command: list[str],
    state: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Empty, it would put the state in the current folder (Path("") is "."); a file, `down` crashed.
    if state:
        state = str(tmp_path / state)
        Path(state).write_text("not a folder")
    monkeypatch.setenv("DRIFTLOOP_LOCAL_STATE_DIR", state)

    assert main(command) == 1

    err = capsys.readouterr().err
    assert f"driftloop: error: DRIFTLOOP_LOCAL_STATE_DIR={state!r} is not valid" in err
    assert ("is empty" if not state else "is not a folder") in err
    assert "Traceback" not in err


def test_infra_topics_refuses_a_replication_factor_below_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["infra", "topics", "--bootstrap", "127.0.0.1:1", "--wait", "0", "--replication-factor", "0"])
    assert caught.value.code == 2
    assert "argument --replication-factor: must be 1 or more, not 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["down"], ["infra", "down", "--left-behind"]])
def test_a_state_folder_that_cannot_be_made_is_an_error_naming_it_not_a_traceback(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    state = tmp_path / "a-file" / "state"  # under a file: no folder can be made there
    monkeypatch.setenv("DRIFTLOOP_LOCAL_STATE_DIR", str(state))

    assert main(command) == 1

    err = capsys.readouterr().err
    assert f"driftloop: error: cannot use {state} for driftloop's state: Not a directory" in err
    assert "driftloop: what to do: set DRIFTLOOP_LOCAL_STATE_DIR to a folder this user can write" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("garbled", ["99999999999999999999", "0", "-1", "4194305"])
def test_pid_files_naming_no_possible_process_are_stale_not_a_crash_nor_a_signal_to_a_group(
    garbled: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # 0 and -1 would mean this process group and every process to os.kill; beyond pid_max (2**22) an
    # OverflowError, or a pid that cannot exist.
    layout = StateLayout(tmp_path)
    for pid_file in (
        tmp_path / "platform" / "supervisor.pid",
        layout.kafka_pid,
        layout.postgres_data / "postmaster.pid",
    ):
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{garbled}\n")
        assert read_pid(pid_file) is None
    monkeypatch.setenv("DRIFTLOOP_LOCAL_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("DRIFTLOOP_LOCAL_KAFKA_PORT", str(free_port()))
    monkeypatch.setenv("DRIFTLOOP_LOCAL_POSTGRES_PORT", str(free_port()))

    assert main(["down"]) == 0

    err = capsys.readouterr().err
    assert "nothing of ours was running" in err and "Traceback" not in err


# --- misuse: what a user sees when the command line, its output or a Ctrl-C is not what a command expects --


def test_ctrl_c_while_the_command_line_is_read_ends_with_130_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Building the parser imports what the commands' arguments need (a second or more after `driftloop`
    # starts): a Ctrl-C then went out of main as a KeyboardInterrupt, which Python prints as a traceback.
    def interrupted_parser() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted_parser)
    try:
        status: object = main(["audit", "tail", "-f"])
    except KeyboardInterrupt:
        status = "KeyboardInterrupt went out of main"

    assert status == 130
    assert "driftloop: interrupted" in capsys.readouterr().err


class _InterruptedImport(importlib.abc.MetaPathFinder):
    """A Ctrl-C while ``deploy.cli`` and what it imports load."""

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name == "deploy.cli":
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_the_command_loads_ends_with_130_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The console script imported deploy.cli (over a second) before any of its code could answer a Ctrl-C.
    from deploy import __main__ as entry

    monkeypatch.delitem(sys.modules, "deploy.cli")
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport(), *sys.meta_path])

    assert entry.run() == 130
    assert "driftloop: interrupted" in capsys.readouterr().err


@pytest.fixture
def cascade(monkeypatch: pytest.MonkeyPatch) -> str:
    """A trail of one cascade for the audit commands, in memory (the pool and its transactions are fakes);
    its correlation id."""
    from contracts.monitoring import DriftDetected
    from services.audit.domain import Signer
    from tests.unit.audit.fakes import SEED, FakeTrail, delivery, example, record

    trail = FakeTrail()
    event = example(DriftDetected)
    asyncio.run(record(trail, Signer(SEED), [delivery(event, offset=0)]))

    @contextlib.asynccontextmanager
    async def pool(settings: AuditSettings) -> AsyncIterator[object]:
        yield object()

    @contextlib.asynccontextmanager
    async def reading(pool: object, role: str) -> AsyncIterator[FakeTrail]:
        yield trail

    monkeypatch.setattr(audit_cli, "_pool", pool)
    monkeypatch.setattr(audit_cli, "reading", reading)
    return event.correlationid or event.id


@contextlib.contextmanager
def stdout_to_a_pipe(*, read: bool) -> Iterator[None]:
    """sys.stdout to a pipe: read (its reader is there) or not (`driftloop ... | head -0`)."""
    read_end, write_end = os.pipe()
    if not read:
        os.close(read_end)
    stream = open(write_end, "w")  # noqa: SIM115  # closed below, after main is done with it
    previous, sys.stdout = sys.stdout, stream
    try:
        yield
    finally:
        sys.stdout = previous
        with contextlib.suppress(OSError):
            stream.close()
        if read:
            os.close(read_end)


def test_a_reader_that_stops_reading_ends_a_command_quietly_with_141(
    cascade: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with stdout_to_a_pipe(read=False):
        status = main(["audit", "trace", cascade, "--json"])

    assert status == 141  # 128 + SIGPIPE, as a shell reports a command its reader left
    assert capsys.readouterr().err == ""


def test_a_reader_that_stops_reading_a_status_table_ends_it_quietly_with_141(
    infra: FakeInfra, capsys: pytest.CaptureFixture[str]
) -> None:
    # rich's console ended such a command with 1, the status of components not ready.
    infra.local.lease("driftloop demo").up()

    with stdout_to_a_pipe(read=False):
        status = main(["infra", "status"])

    assert status == 141
    assert "Traceback" not in capsys.readouterr().err


def test_a_broken_pipe_of_the_trail_is_an_error_not_a_reader_gone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Any BrokenPipeError ended an audit command quietly with 141, one of the connection to the trail too:
    # a command that could not read the trail said nothing.
    @contextlib.asynccontextmanager
    async def broken_pool(settings: AuditSettings) -> AsyncIterator[object]:
        raise BrokenPipeError(32, "Broken pipe")
        yield

    monkeypatch.setattr(audit_cli, "_pool", broken_pool)
    with stdout_to_a_pipe(read=True):
        status = main(["audit", "tail"])

    assert status == 1
    assert "driftloop: error: [Errno 32] Broken pipe" in capsys.readouterr().err


def test_an_audit_command_with_stdout_closed_ends_with_its_status_not_a_traceback(
    cascade: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `driftloop audit trace <id> >&-`: Python has no sys.stdout then, and the command's last flush of it
    # raised AttributeError ('NoneType' object has no attribute 'flush').
    monkeypatch.setattr(sys, "stdout", None)

    assert main(["audit", "trace", cascade]) == 0


@contextlib.contextmanager
def unwritable_stdout(kind: str) -> Iterator[str]:
    """sys.stdout that nothing can be written to, set in the test's body (pytest sets its capture again
    after the fixtures); the reason the error gives."""
    if kind == "closed":  # `>&-`: no sys.stdout, and print() writes nothing
        previous, sys.stdout = sys.stdout, None
        try:
            yield "standard output is closed"
        finally:
            sys.stdout = previous
    elif kind == "reader-gone":
        with stdout_to_a_pipe(read=False):
            yield "Broken pipe"
    else:  # Linux's /dev/full, as the platform runs on Linux only: missing, the test fails rather than skip
        with open("/dev/full", "w") as full:
            previous, sys.stdout = sys.stdout, full
            try:
                yield "No space left on device"
            finally:
                sys.stdout = previous


@pytest.mark.parametrize("kind", ["closed", "reader-gone", "disk-full"])
def test_token_issue_stores_no_token_it_could_not_show(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The token's hash was stored first and the token printed after: with stdout closed the command said
    # it added a token and exited 0; with a full disk or no reader, the token was lost on the way out.
    # Either way a token that grants a role was in the file, and nobody had it.
    tokens = tmp_path / "tokens.json"

    with unwritable_stdout(kind) as why:
        status = main(["token", "issue", "alice", "--role", "operator", "--file", str(tokens)])

    err = capsys.readouterr().err
    assert status == 1
    assert (
        f"driftloop: error: the token could not be written to standard output ({why}), so none was stored"
        in err
    )
    assert "added" not in err and "Traceback" not in err
    assert not tokens.exists()


@pytest.mark.parametrize("count", ["1001", "99999999999999999999999"])
def test_audit_tail_count_above_the_query_limit_is_a_usage_error_naming_the_setting(
    count: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `-n 0` was a usage error (2) and `-n 1001` an error (1), for the same mistake.
    monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", f"postgresql://audit@127.0.0.1:{free_port()}/x")
    monkeypatch.setenv("DRIFTLOOP_AUDIT_QUERY_MAX_LIMIT", "1000")

    with pytest.raises(SystemExit) as caught:
        main(["audit", "tail", "-n", count])

    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"argument -n/--lines: must be 1000 or less (DRIFTLOOP_AUDIT_QUERY_MAX_LIMIT), not {count}" in err


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (["--at", "7"], "argument --at: not a position: '7'; give PARTITION:OFFSET"),
        (["--after", "0:-1"], "argument --after: not a position: '0:-1'"),
        (["--since", "2026-12-02 08:00"], "argument --since: not an RFC 3339 date-time: '2026-12-02 08:00'"),
        (["--until", "2026-12-02T08:00:00"], "argument --until: not an RFC 3339 date-time"),
        (["--topic", ""], "argument --topic: is empty: give a value"),
        (
            ["--since", "2026-12-02T09:00:00Z", "--until", "2026-12-02T08:00:00Z"],
            "--until 2026-12-02T08:00:00+00:00 is not after --since 2026-12-02T09:00:00+00:00",
        ),
    ],
)
@pytest.mark.parametrize("command", ["list", "replay"])
def test_deadletter_commands_refuse_a_selection_they_cannot_read_as_a_usage_error(
    command: str, arguments: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["deadletter", command, *arguments])

    assert exited.value.code == 2
    assert said in capsys.readouterr().err
