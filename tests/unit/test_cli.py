"""The CLI's error messages: what is wrong and what to do, never a traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.cli import COMMANDS, build_parser, main
from deploy.local.broker import KafkaBroker
from deploy.local.errors import PortTaken
from deploy.local.settings import LocalInfraSettings, StateLayout
from libs.auth import Principal, Role, TokenStore
from tests.ports import free_port


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
