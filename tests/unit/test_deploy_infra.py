"""The local Kafka and Postgres: what counts as ours, and what a start that fails half-way leaves behind.

Processes here are throwaway ones (`sleep`, a Python that sleeps) whose command lines look like a broker's
or a postmaster's; nothing starts Kafka or Postgres.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest

from deploy.local import infra as infra_module
from deploy.local.broker import MAIN_CLASS, POM, KafkaBroker
from deploy.local.errors import JarsDownloadFailed, StartFailed
from deploy.local.infra import EVERYTHING, PLATFORM, LocalInfra
from deploy.local.postgres import LocalPostgres
from deploy.local.processes import (
    MAX_LOG_BYTES,
    command_args,
    exclusive,
    log_tails,
    open_log,
    runs_exactly,
    truncate_log,
    wait_until,
)
from deploy.local.settings import LocalInfraSettings, StateLayout
from tests.ports import free_port


def look_alike(processes: list[subprocess.Popen[bytes]], program: str, *args: str) -> int:
    """A sleeping process whose command line reads ``program args...`` (argv[0] is only a name)."""
    process = subprocess.Popen(
        [program, "-c", "import time; time.sleep(60)", *args],
        executable=sys.executable,
        start_new_session=True,
    )
    processes.append(process)
    # Until it has exec'd, a child's command line is still its parent's.
    assert wait_until(lambda: command_args(process.pid)[:1] == [program], timeout_s=10, interval_s=0.01)
    return process.pid


def settings_in(tmp_path: Path) -> LocalInfraSettings:
    return LocalInfraSettings(
        state_dir=tmp_path / ".driftloop",
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        postgres_port=free_port(),
    )


# --- a start that fails or is interrupted half-way ----------------------------------------------------


class SlowBroker:
    """A broker whose process starts and is then interrupted while it is waited for (Ctrl-C)."""

    name = "kafka"
    bootstrap = "127.0.0.1:9"

    def __init__(self, processes: list[subprocess.Popen[bytes]]) -> None:
        self.processes = processes
        self.process: subprocess.Popen[bytes] | None = None

    def preflight(self) -> None:
        pass

    def running_pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    def start(self) -> bool:
        self.process = subprocess.Popen(["sleep", "300"], start_new_session=True)
        self.processes.append(self.process)
        raise KeyboardInterrupt  # "starting Kafka ..." and the user presses Ctrl-C

    def stop(self) -> bool:
        if self.running_pid() is None:
            return False
        assert self.process is not None
        self.process.terminate()
        self.process.wait()
        return True


class RunningPostgres:
    """A cluster that was already running before `up` (someone else's `up`): never ours to stop here."""

    name = "postgres"
    url = "postgresql://driftloop@127.0.0.1:9/driftloop"

    def __init__(self) -> None:
        self.stopped = False

    def preflight(self) -> None:
        pass

    def running_pid(self) -> int | None:
        return 1

    def start(self) -> bool:
        return False

    def stop(self) -> bool:
        self.stopped = True
        return True


def test_a_broker_interrupted_while_it_comes_up_is_stopped_and_what_ran_before_is_left_alone(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DRIFTLOOP_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("DRIFTLOOP_DATABASE_URL", raising=False)
    infra = LocalInfra(settings_in(tmp_path))
    broker, postgres = SlowBroker(processes), RunningPostgres()
    infra.broker, infra.postgres = broker, postgres  # type: ignore[assignment]

    with pytest.raises(KeyboardInterrupt):
        infra.up()

    assert broker.process is not None and broker.process.poll() is not None, "the broker was left running"
    assert not postgres.stopped


class RunningBroker:
    """A broker that was already running before `up`."""

    name = "kafka"
    bootstrap = "127.0.0.1:9"

    def preflight(self) -> None:
        pass

    def running_pid(self) -> int | None:
        return 1

    def start(self) -> bool:
        return False

    def stop(self) -> bool:
        return False


def test_up_creates_the_platform_topics_under_the_configured_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DRIFTLOOP_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.delenv("DRIFTLOOP_DATABASE_URL", raising=False)
    monkeypatch.setenv("DRIFTLOOP_KAFKA_TOPIC_PREFIX", "team-a.")
    created: list[tuple[str, str]] = []

    def create_platform_topics(bootstrap: str, replication_factor: int = 1, *, prefix: str = "") -> list[str]:
        created.append((bootstrap, prefix))
        return []

    monkeypatch.setattr(infra_module, "create_platform_topics", create_platform_topics)
    infra = LocalInfra(settings_in(tmp_path))
    infra.broker, infra.postgres = RunningBroker(), RunningPostgres()  # type: ignore[assignment]

    infra.up()

    assert created == [("127.0.0.1:9", "team-a.")]


def test_a_broker_of_ours_that_runs_but_does_not_answer_is_named_and_left_running(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a command SIGKILLed while its broker came up leaves: our broker's process, not answering yet.
    monkeypatch.delenv("DRIFTLOOP_KAFKA_BOOTSTRAP", raising=False)
    settings = settings_in(tmp_path).model_copy(update={"ready_timeout_s": 0.5})
    infra = LocalInfra(settings)
    broker = look_alike(processes, "java", "-cp", "libs/*", MAIN_CLASS, str(infra.layout.kafka_config))

    with pytest.raises(StartFailed) as caught:  # not aiokafka's KafkaConnectionError, as a traceback
        infra.up(("kafka",))

    assert f"Kafka (pid {broker}) runs but did not answer" in caught.value.message
    assert "infra down" in caught.value.hint
    assert infra.broker.running_pid() == broker, "a broker this `up` did not start was stopped"


def test_a_broker_that_exits_while_starting_shows_what_it_logged_and_what_its_jvm_said(
    tmp_path: Path,
) -> None:
    settings = settings_in(tmp_path)
    broker = KafkaBroker(settings, StateLayout.from_settings(settings))
    layout = broker.layout
    layout.logs.mkdir(parents=True)
    layout.kafka_log.write_text("[earlier] INFO the run before\n")
    layout.kafka_console_log.write_text("")
    since = {layout.kafka_log: layout.kafka_log.stat().st_size, layout.kafka_console_log: 0}
    with layout.kafka_log.open("a") as log:
        log.write("[now] ERROR Exiting Kafka due to fatal exception\n")
    # Said before log4j is set up, or outside it: only the console has it.
    layout.kafka_console_log.write_text("Error occurred during initialization of VM\n")

    with pytest.raises(StartFailed) as caught:
        broker._wait_ready(2**22 + 1, since)  # no such process: it exited

    message = caught.value.message
    assert f"Last lines of {layout.kafka_log}:\n[now] ERROR Exiting Kafka" in message
    assert f"Last lines of {layout.kafka_console_log}:\nError occurred during initialization" in message
    assert "the run before" not in message


# --- which processes are ours -------------------------------------------------------------------------


def test_a_broker_of_another_checkout_whose_path_contains_ours_is_not_ours(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    settings = settings_in(tmp_path / "srv" / "dl")
    layout = StateLayout.from_settings(settings)
    broker = KafkaBroker(settings, layout)
    # The other checkout lives at <tmp>/copy<our path>: its config path ends with ours.
    other_config = tmp_path / "copy" / str(layout.kafka_config).lstrip("/")
    look_alike(processes, "java", "-cp", "libs/*", MAIN_CLASS, str(other_config))

    assert broker.running_pid() is None
    assert not broker.stop()

    ours = look_alike(processes, "java", "-cp", "libs/*", MAIN_CLASS, str(layout.kafka_config))
    assert broker.running_pid() == ours


def test_a_stale_postmaster_pid_naming_another_process_is_not_our_server(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    settings = settings_in(tmp_path)
    postgres = LocalPostgres(settings, StateLayout.from_settings(settings))
    data = postgres.layout.postgres_data
    data.mkdir(parents=True)
    postgres.layout.logs.mkdir(parents=True)
    postgres.layout.postgres_log.touch()
    # After a reboot the pid in postmaster.pid went to a developer's `tail -f` of the server's log.
    tail = subprocess.Popen(["tail", "-f", str(postgres.layout.postgres_log)], start_new_session=True)
    processes.append(tail)
    assert wait_until(lambda: command_args(tail.pid)[:1] == ["tail"], timeout_s=10, interval_s=0.01)
    (data / "postmaster.pid").write_text(f"{tail.pid}\n{data}\n")

    assert postgres.running_pid() is None
    assert not postgres.stop()
    assert tail.poll() is None, "`infra down` stopped a process that is not the server"

    postgres._discard_stale_pid_file()  # what start() does before pg_ctl, which would refuse otherwise
    assert not (data / "postmaster.pid").exists()


def test_the_postmaster_of_this_data_folder_is_ours_and_one_of_another_folder_is_not(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    settings = settings_in(tmp_path)
    postgres = LocalPostgres(settings, StateLayout.from_settings(settings))
    data = postgres.layout.postgres_data
    data.mkdir(parents=True)
    other = look_alike(processes, "/usr/lib/postgresql/16/bin/postgres", "-D", f"{data}-copy", "-p", "5")
    (data / "postmaster.pid").write_text(f"{other}\n")
    assert postgres.running_pid() is None

    ours = look_alike(processes, "/usr/lib/postgresql/16/bin/postgres", "-D", str(data), "-p", "5")
    (data / "postmaster.pid").write_text(f"{ours}\n{data}\n")
    assert postgres.running_pid() == ours


def test_whole_arguments_match_never_parts_of_them(processes: list[subprocess.Popen[bytes]]) -> None:
    pid = look_alike(processes, "java", "kafka.Kafka", "/srv/dl/server.properties")

    assert runs_exactly(pid, ("kafka.Kafka", "/srv/dl/server.properties"), program="java")
    assert not runs_exactly(pid, ("kafka.Kafka", "/srv/dl/server.prop"), program="java")
    assert not runs_exactly(pid, ("kafka.Kafka", "/srv/dl/server.properties"), program="jav")
    assert not runs_exactly(pid, ("/srv/dl/server.properties", "kafka.Kafka"))
    assert not runs_exactly(2**22 + 1, ("kafka.Kafka",))  # no such process


# --- the broker's jars ----------------------------------------------------------------------------------


def test_a_damaged_jar_from_the_maven_repository_is_refused_not_stamped_as_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Maven copies what its repository holds without checking it again: here a proxy's error page, saved
    # once as the jar.
    tools = tmp_path / "bin"
    tools.mkdir()
    mvn = tools / "mvn"
    mvn.write_text(
        "#!/bin/sh\n"
        'for arg; do case "$arg" in -DoutputDirectory=*) out="${arg#-DoutputDirectory=}";; esac; done\n'
        'printf "<html>502 Bad Gateway</html>" > "$out/kafka_2.13-4.4.0.jar"\n'
    )
    mvn.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    settings = settings_in(tmp_path)
    broker = KafkaBroker(settings, StateLayout.from_settings(settings))

    with pytest.raises(JarsDownloadFailed) as caught:
        broker.ensure_jars()

    assert "kafka_2.13-4.4.0.jar" in caught.value.message
    assert "find ~/.m2/repository -name kafka_2.13-4.4.0.jar -delete" in caught.value.hint
    assert not broker.jars_present(), "the damaged jars were stamped as the broker's: never fetched again"


# --- the cluster's files ------------------------------------------------------------------------------


def test_a_cluster_whose_initdb_was_killed_is_made_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_in(tmp_path)
    postgres = LocalPostgres(settings, StateLayout.from_settings(settings))
    data = postgres.layout.postgres_data
    # What initdb leaves when SIGKILLed after its first files: PG_VERSION, no global/pg_control.
    (data / "global").mkdir(parents=True)
    (data / "PG_VERSION").write_text("16\n")
    (data / "postgresql.conf").write_text("")

    assert postgres._cluster_version() is None
    postgres._discard_half_made_cluster()

    assert not data.exists()
    assert "initdb never finished" in capsys.readouterr().err

    # A finished cluster is kept.
    (data / "global").mkdir(parents=True)
    (data / "PG_VERSION").write_text("16\n")
    (data / "global" / "pg_control").write_bytes(b"\0" * 8)
    postgres._discard_half_made_cluster()
    assert postgres._cluster_version() == "16"


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder the server user may pass through, outside pytest's own (mode 700, not ours to open)."""
    with tempfile.TemporaryDirectory(prefix="driftloop-test-") as folder:
        Path(folder).chmod(0o755)
        yield Path(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="Postgres runs as another user only when we are root")
def test_the_server_user_can_write_its_log_under_a_restrictive_umask(open_folder: Path) -> None:
    try:
        user = pwd.getpwnam("postgres").pw_name
    except KeyError:
        pytest.skip("no postgres user on this machine")
    settings = settings_in(open_folder)
    postgres = LocalPostgres(settings, StateLayout.from_settings(settings))
    previous = os.umask(0o027)  # a hardened root shell
    try:
        postgres._prepare_dirs(user)
    finally:
        os.umask(previous)

    # pg_ctl -l opens the log as the server user.
    log = postgres.layout.postgres_log
    append = subprocess.run(
        ["runuser", "-u", user, "--", "sh", "-c", f'echo started >> "{log}"'], capture_output=True, text=True
    )
    assert append.returncode == 0, append.stderr
    assert log.read_text() == "started\n"
    # Its logging collector makes its own files in logs/postgres/, as the server user.
    ring = postgres.layout.postgres_log_dir / "postgres-00.log"
    create = subprocess.run(
        ["runuser", "-u", user, "--", "sh", "-c", f'echo running > "{ring}"'], capture_output=True, text=True
    )
    assert create.returncode == 0, create.stderr


# --- logs ---------------------------------------------------------------------------------------------


def test_a_log_over_its_limit_is_rotated_when_its_process_starts_again(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "kafka.log"
    log.parent.mkdir()
    log.write_bytes(b"old run\n" * 10)
    (tmp_path / "logs" / "kafka.log.1").write_text("the run before\n")

    with open_log(log, max_bytes=1000) as f:  # small enough: kept
        f.write(b"new run\n")
    assert log.read_bytes() == b"old run\n" * 10 + b"new run\n"

    with open_log(log, max_bytes=50) as f:  # too large: rotated, one generation kept
        f.write(b"newest run\n")
    assert log.read_bytes() == b"newest run\n"
    assert (tmp_path / "logs" / "kafka.log.1").read_bytes() == b"old run\n" * 10 + b"new run\n"


def log4j_properties(text: str) -> dict[str, str]:
    """A log4j2 properties file as key -> value (no continuation lines: the broker's has none)."""
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def test_the_broker_logs_into_a_file_log4j_rolls_at_the_size_limit_keeping_one_generation(
    tmp_path: Path,
) -> None:
    # A broker runs for months: a log only rotated when it starts again filled the disk.
    settings = settings_in(tmp_path)
    broker = KafkaBroker(settings, StateLayout.from_settings(settings))
    broker._write_config()

    config = log4j_properties((broker.layout.kafka / "log4j2.properties").read_text())

    appenders = {key.split(".")[1] for key in config if key.startswith("appender.")}
    assert appenders == {"file"}, "something still logs to the console, which only a restart rotates"
    assert config["appender.file.type"] == "RollingFile"
    assert config["appender.file.fileName"] == str(broker.layout.kafka_log)
    assert config["appender.file.filePattern"] == f"{broker.layout.kafka_log}.%i"
    assert config["appender.file.policies.size.type"] == "SizeBasedTriggeringPolicy"
    assert config["appender.file.policies.size.size"] == str(MAX_LOG_BYTES)
    assert config["appender.file.strategy.max"] == "1"
    assert config["rootLogger.appenderRef.file.ref"] == config["appender.file.name"]


def test_a_state_folder_with_percent_or_dollar_signs_is_written_literally_in_the_broker_log4j(
    tmp_path: Path,
) -> None:
    settings = settings_in(tmp_path / "100%d ${env:HOME}")
    broker = KafkaBroker(settings, StateLayout.from_settings(settings))
    broker._write_config()

    config = log4j_properties((broker.layout.kafka / "log4j2.properties").read_text())

    # %d would be a date in the rolled file's name, ${env:HOME} a lookup, in both.
    folder = str(broker.layout.logs).replace("${", "$${")
    assert config["appender.file.fileName"] == f"{folder}/kafka.log"
    assert config["appender.file.filePattern"] == f"{folder.replace('%', '%%')}/kafka.log.%i"


def server_settings(postgres: LocalPostgres) -> dict[str, str]:
    """The ``-c name=value`` settings of the server's command line."""
    words = shlex.split(postgres._server_options())
    return dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "-c")


def test_postgres_logs_through_its_collector_into_a_ring_of_hourly_files(tmp_path: Path) -> None:
    # A cluster runs for months: pg_ctl's -l file was rotated only when it started again.
    settings = settings_in(tmp_path)
    postgres = LocalPostgres(settings, StateLayout.from_settings(settings))

    options = server_settings(postgres)

    assert options["logging_collector"] == "on"
    assert options["log_directory"] == str(postgres.layout.postgres_log_dir)
    assert options["log_filename"] == "postgres-%H.log"  # 24 names: a day of logs
    assert options["log_rotation_age"] == "1h"
    assert options["log_truncate_on_rotation"] == "on"  # the hour's file of the day before is emptied
    # A rotation by size reopens the same name and appends to it (it never empties it): no bound, off.
    assert options["log_rotation_size"] == "0"


def test_a_collector_file_left_from_a_day_before_is_removed_when_postgres_starts_again(
    tmp_path: Path,
) -> None:
    # The collector empties a file only when its hour comes round while the server runs: a cluster started
    # at nine every morning and stopped before ten would append to postgres-09.log for ever.
    settings = settings_in(tmp_path)
    postgres = LocalPostgres(settings, StateLayout.from_settings(settings))
    ring = postgres.layout.postgres_log_dir
    ring.mkdir(parents=True)
    stale, recent = ring / "postgres-09.log", ring / "postgres-08.log"
    stale.write_text("yesterday at nine\n")
    recent.write_text("an hour ago\n")
    now = time.time()
    os.utime(stale, (now - 24 * 3600, now - 24 * 3600))
    os.utime(recent, (now - 3600, now - 3600))

    postgres._prepare_dirs(None)

    assert not stale.exists()
    assert recent.read_text() == "an hour ago\n"
    # A start that fails shows pg_ctl's file and the collector's newest.
    assert postgres._start_logs() == [postgres.layout.postgres_log, recent]


def test_the_end_of_a_log_rotated_since_its_offset_is_shown_whole_and_an_empty_one_left_out(
    tmp_path: Path,
) -> None:
    rotated, quiet = tmp_path / "kafka.log", tmp_path / "kafka.out"
    rotated.write_text("after the rotation\n")
    quiet.write_text("before the start\n")

    tails = log_tails([rotated, quiet], {rotated: 5000, quiet: quiet.stat().st_size})

    assert tails == f"Last lines of {rotated}:\nafter the rotation"
    assert log_tails([quiet], {quiet: quiet.stat().st_size}) == f"Nothing was logged in {quiet}."


def test_a_log_that_cannot_be_copied_is_left_as_it_is(tmp_path: Path) -> None:
    log = tmp_path / "serving.log"
    log.write_bytes(b"running\n" * 10)
    (tmp_path / "serving.log.1").write_text("the generation before\n")
    (tmp_path / "serving.log.1.partial").mkdir()  # the copy cannot be written, as on a full disk

    with pytest.raises(OSError):
        truncate_log(log, max_bytes=50)

    assert log.read_bytes() == b"running\n" * 10
    assert (tmp_path / "serving.log.1").read_text() == "the generation before\n"
    assert not truncate_log(log, max_bytes=1000)  # within its limit: nothing to do


class SlowToStopPlatform:
    """A platform whose stop takes until the test lets it end (a real one may take 40 s)."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.may_end = threading.Event()
        self.running = True

    def supervisor_pid(self) -> int | None:
        return 4242 if self.running else None

    def stop(self) -> bool:
        self.stopping.set()
        self.may_end.wait(timeout=30)
        self.running = False
        return True


def test_a_command_waiting_for_another_to_finish_stopping_says_so_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    infra = LocalInfra(LocalInfraSettings(state_dir=tmp_path))
    up = infra.lease("driftloop up", EVERYTHING)
    up.note_started(PLATFORM)
    platform = SlowToStopPlatform()
    ending = threading.Thread(target=up.end, args=(platform,))
    joining = threading.Thread(target=lambda: infra.lease("driftloop test").lease.close())
    said: list[str] = []

    def waiting_said() -> bool:
        said.extend(line for line in capsys.readouterr().err.splitlines() if "waiting for" in line)
        return bool(said)

    ending.start()
    try:
        assert platform.stopping.wait(timeout=10)
        joining.start()  # the `test` starting now waits on infra.lock while the platform stops
        assert wait_until(waiting_said, timeout_s=10, interval_s=0.05), "the waiting command said nothing"
        time.sleep(0.5)  # still waiting: nothing more is said meanwhile
        assert joining.is_alive()
    finally:
        platform.may_end.set()
        ending.join(timeout=10)
        joining.join(timeout=10)
    waiting_said()

    assert said == [
        f"driftloop: waiting for another driftloop command (pid {os.getpid()}) to finish stopping what no "
        "running command uses ..."
    ]
    assert not joining.is_alive() and not platform.running


def test_a_lock_held_without_a_note_is_waited_for_naming_the_lock_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock_file = tmp_path / "infra.lock"
    entered = threading.Event()

    def take() -> None:
        with exclusive(lock_file):
            entered.set()

    with lock_file.open("a") as held:  # as a driftloop from before the notes holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        taker = threading.Thread(target=take)
        taker.start()
        assert wait_until(lambda: "waiting for" in capsys.readouterr().err, timeout_s=10, interval_s=0.05)
        assert not entered.is_set()
    taker.join(timeout=10)

    assert entered.is_set()
    assert lock_file.read_text() == ""  # the note goes with the lock


def test_the_broker_pom_is_well_formed_xml_that_maven_can_read() -> None:
    # Maven refuses a POM that is not well-formed XML before it fetches anything: a comment holding
    # "--strict-checksums" (XML forbids two dashes in a comment) broke every first `infra up`, while a
    # machine with the jars already stamped never read the POM again.
    root = ElementTree.parse(POM).getroot()

    assert root.tag == "{http://maven.apache.org/POM/4.0.0}project"
