"""Ctrl-C, SIGTERM and SIGHUP to `driftloop test` and `driftloop demo`: whatever ends them, what they
started is stopped, pytest's own session clean-up first.

Each test runs the real CLI in a process of its own with fake infrastructure and a fake platform, which
note what happens in an events file; pytest, where it runs, is a real one running a tiny test session.
"""

from __future__ import annotations

import fcntl
import os
import select
import shlex
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.local.interrupts import run_to_completion
from deploy.local.processes import descendants, pid_alive, read_pid, wait_until
from deploy.local.settings import PROJECT_ROOT

# The CLI with fakes: argv is the events file, pytest's grace in seconds, then the driftloop arguments.
LAUNCHER = """
import asyncio, os, sys, time
from pathlib import Path
from typing import Any

import deploy.cli as cli
from deploy.local import infra as infra_module
from deploy.local.infra import LocalInfra
from deploy.local.settings import LocalInfraSettings
from deploy.platform import Supervision

EVENTS = Path(sys.argv[1])
# The fakes below, not a broker or database this test run was given.
os.environ.pop("DRIFTLOOP_KAFKA_BOOTSTRAP", None)
os.environ.pop("DRIFTLOOP_DATABASE_URL", None)


def note(event):
    with EVENTS.open("a") as f:
        f.write(event + "\\n")


class FakeComponent:
    bootstrap = "127.0.0.1:9"
    url = "postgresql://x@127.0.0.1:9/x"

    def __init__(self, name):
        self.name = name
        self.running = False

    def preflight(self):
        pass

    def running_pid(self):
        return 1 if self.running else None

    def start(self):
        self.running = True
        note(f"{self.name} started")
        return True

    def stop(self):
        self.running = False
        note(f"{self.name} stopped")
        return True


def local_infra():
    # The real one (its leases are on a state folder of the test's), with fake Kafka and Postgres.
    infra = LocalInfra(LocalInfraSettings(state_dir=EVENTS.parent / "state"))
    infra.broker, infra.postgres = FakeComponent("kafka"), FakeComponent("postgres")
    return infra


class FakePlatform:
    log = Path("/nonexistent/logs/supervisor.log")

    def start(self, env):
        note("platform started")
        return Supervision(4242, started=True)

    def wait_ready(self, timeout_s):
        return {"registry": "ready"}

    def supervisor_pid(self):
        return None

    def stop(self):
        note("platform stopping")
        time.sleep(float(os.environ.get("PLATFORM_STOP_S", "0")))
        note("platform stopped")
        return True


async def demo_run(platform, bootstrap, **_):
    note("demo running")
    await asyncio.sleep(60)
    return 0


if sys.argv[3] == "demo":  # as the CLI, which loads the demo (pandas and friends) only to run it
    import deploy.demo

    deploy.demo.run = demo_run
infra_module.create_platform_topics = lambda *args, **kwargs: []
cli.LocalInfra = local_infra
cli.local_platform = FakePlatform
cli.PYTEST_GRACE_S = float(sys.argv[2])
sys.exit(cli.main(sys.argv[3:]))
"""

# The session `driftloop test` runs: a session fixture whose teardown takes a while (as stopping a sandbox
# platform and dropping its database do), around a test that runs until it is interrupted; it notes every
# SIGINT pytest gets.
SESSION = """
import os, signal, subprocess, time
from pathlib import Path
from typing import Any

import pytest

EVENTS = Path(os.environ["EVENTS"])


def note(event):
    with EVENTS.open("a") as f:
        f.write(event + "\\n")


def interrupted(signum, frame):
    note("pytest got SIGINT")  # counted: a second one would cut the clean-up short
    time.sleep(0.2)  # so one that comes right after this one is not merged with it
    raise KeyboardInterrupt


@pytest.fixture(scope="session")
def sandbox():
    signal.signal(signal.SIGINT, interrupted)
    state = os.environ.get("SANDBOX_STATE")
    if state:  # a platform supervisor, as the e2e and chaos sandboxes start (here with no services)
        from deploy.platform import Platform  # only here: every session's start would pay for it

        Platform(Path(state), services=()).start(dict(os.environ))
    service = os.environ.get("SERVICE_PID_FILE")
    if service:  # a process as a test starts a service: a session of its own, no handler for SIGHUP
        Path(service).write_text(str(subprocess.Popen(["sleep", "300"], start_new_session=True).pid))
    note("session set up")
    yield
    time.sleep(float(os.environ["TEARDOWN_S"]))
    note("session torn down")


def test_runs_until_interrupted(sandbox):
    # Busy, not asleep: a signal is taken the moment it comes, not merged with one that follows it.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pass
"""


class Run:
    """One `driftloop` process with its events file."""

    def __init__(self, tmp_path: Path, argv: list[str], *, grace_s: float = 60.0, **env: str) -> None:
        self.tmp_path = tmp_path
        self.events_file = tmp_path / "events"
        self.events_file.touch()
        launcher = tmp_path / "launcher.py"
        launcher.write_text(LAUNCHER)
        self.command = [sys.executable, str(launcher), str(self.events_file), str(grace_s), *argv]
        # Without the plugins of the project's own test run (hypothesis, schemathesis, ...): seconds less.
        self.env = {
            **os.environ,
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "EVENTS": str(self.events_file),
            "TEARDOWN_S": "0.5",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.output = b""

    def start(self, **popen: Any) -> subprocess.Popen[bytes]:
        then = popen.pop("preexec_fn", None)

        def as_from_a_terminal() -> None:
            # Signals as a terminal starts a command, whatever this test process inherited: under nohup or
            # from a shell's background job SIGINT is ignored (Python then installs no KeyboardInterrupt).
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            if then is not None:
                then()

        # Own session: the signals of a test reach this process (and its group) only.
        self.process = subprocess.Popen(
            self.command,
            cwd=PROJECT_ROOT,
            env=self.env,
            start_new_session=True,
            preexec_fn=as_from_a_terminal,
            **popen,
        )
        assert self.process is not None
        return self.process

    @property
    def events(self) -> list[str]:
        return self.events_file.read_text().splitlines()

    def wait_for(self, event: str, timeout_s: float = 30.0) -> None:
        assert wait_until(lambda: event in self.events, timeout_s=timeout_s, interval_s=0.05), self.events

    def finish(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        if self.process.stdout is not None:
            self.output, _ = self.process.communicate(timeout=timeout_s)
            return self.process.returncode
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def runs() -> Iterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.kill()


# What a `driftloop test` ended by a signal must show: pytest interrupted once, its session torn down, and
# only then the infrastructure stopped.
CLEAN_END = [
    "postgres started",
    "kafka started",
    "session set up",
    "pytest got SIGINT",
    "session torn down",
    "kafka stopped",
    "postgres stopped",
]


def driftloop_test(tmp_path: Path, runs: list[Run], *, grace_s: float = 60.0, **env: str) -> Run:
    session = tmp_path / "test_session.py"
    session.write_text(SESSION)
    argv = [
        "test",
        str(session),
        "-c",
        os.devnull,
        "--rootdir",
        str(tmp_path),
        "-p",
        "no:cacheprovider",
        "-q",
    ]
    run = Run(tmp_path, argv, grace_s=grace_s, **env)
    runs.append(run)
    return run


@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [
        pytest.param(signal.SIGINT, 130, id="SIGINT"),
        pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
        pytest.param(signal.SIGHUP, 129, id="SIGHUP"),
    ],
)
def test_a_signal_to_driftloop_test_lets_pytest_clean_up_before_the_infrastructure_stops(
    tmp_path: Path, runs: list[Run], signum: signal.Signals, exit_code: int
) -> None:
    run = driftloop_test(tmp_path, runs)
    run.start(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run.wait_for("session set up")

    assert run.process is not None
    os.kill(run.process.pid, signum)  # to driftloop alone, as `kill` or a service manager sends it

    assert run.finish() == exit_code, run.output.decode()
    assert run.events == CLEAN_END


def test_ctrl_c_at_the_terminal_reaches_pytest_once_so_its_clean_up_is_not_cut_short(
    tmp_path: Path, runs: list[Run]
) -> None:
    run = driftloop_test(tmp_path, runs)
    terminal, side = os.openpty()

    def take_terminal() -> None:  # the terminal driftloop runs in, its group in the foreground
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        run.start(stdin=side, stdout=side, stderr=side, preexec_fn=take_terminal)
        os.close(side)
        run.wait_for("session set up")

        os.write(terminal, b"\x03")  # Ctrl-C: SIGINT to driftloop and pytest at once, from the kernel

        assert run.process is not None
        output = b""
        while run.process.poll() is None and select.select([terminal], [], [], 30)[0]:
            try:
                output += os.read(terminal, 65536)
            except OSError:  # the terminal's other side closed
                break
        assert run.finish() == 130, output.decode(errors="replace")
    finally:
        os.close(terminal)
    assert run.events == CLEAN_END


def test_a_closing_terminal_lets_pytest_clean_up_instead_of_killing_it(
    tmp_path: Path, runs: list[Run]
) -> None:
    run = driftloop_test(tmp_path, runs)
    run.start(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run.wait_for("session set up")

    assert run.process is not None
    os.killpg(run.process.pid, signal.SIGHUP)  # what a shell sends its jobs when its terminal closes

    assert run.finish() == 129, run.output.decode()
    assert run.events == CLEAN_END


def test_a_terminal_closing_under_its_shell_lets_pytest_clean_up(tmp_path: Path, runs: list[Run]) -> None:
    run = driftloop_test(tmp_path, runs, HISTFILE=os.devnull)
    typed = shlex.join(run.command).encode() + b"\n"
    run.command = ["bash", "--norc", "--noprofile", "-i"]  # a terminal's shell, with job control
    terminal, side = os.openpty()

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    job: list[int] = []
    try:
        shell = run.start(stdin=side, stdout=side, stderr=side, preexec_fn=take_terminal)
        os.close(side)
        os.write(terminal, typed)
        output = b""
        deadline = time.monotonic() + 30
        # Looked at often: pytest writes nothing once the session is set up, so a wait for its output alone
        # lasted the whole 30 s.
        while "session set up" not in run.events and time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.05)[0]:
                output += os.read(terminal, 65536)  # read, so nothing blocks on a full terminal
        assert "session set up" in run.events, output.decode(errors="replace")
        job = [shell.pid, *descendants(shell.pid)]
    finally:
        # Hang-up: the kernel sends the shell SIGHUP; it sends SIGHUP to its jobs, and as it exits the
        # kernel sends SIGHUP to the terminal's foreground group (driftloop's, with pytest in it).
        os.close(terminal)
    try:
        assert wait_until(lambda: not any(pid_alive(pid) for pid in job), timeout_s=60, interval_s=0.1)
        assert run.events == CLEAN_END
    finally:
        for pid in job:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_pytest_that_does_not_finish_its_clean_up_is_stopped_with_the_platforms_it_left(
    tmp_path: Path, runs: list[Run]
) -> None:
    state = tmp_path / "sandbox"
    run = driftloop_test(tmp_path, runs, grace_s=1.0, TEARDOWN_S="600", SANDBOX_STATE=str(state))
    run.start(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run.wait_for("session set up")
    supervisor = read_pid(state / "platform" / "supervisor.pid")
    assert supervisor is not None and pid_alive(supervisor)

    try:
        assert run.process is not None
        os.kill(run.process.pid, signal.SIGTERM)

        assert run.finish() == 143, run.output.decode()
        assert "pytest did not finish its clean-up within 1s" in run.output.decode()
        assert not pid_alive(supervisor), "the sandbox's supervisor outlived the pytest that started it"
        assert run.events[-2:] == ["kafka stopped", "postgres stopped"]
    finally:
        if pid_alive(supervisor):
            os.kill(supervisor, signal.SIGKILL)


def test_sigterm_to_a_demo_stops_what_it_started(tmp_path: Path, runs: list[Run]) -> None:
    run = Run(tmp_path, ["demo"])
    runs.append(run)
    run.start(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run.wait_for("demo running")

    assert run.process is not None
    os.kill(run.process.pid, signal.SIGTERM)

    assert run.finish() == 143, run.output.decode()
    assert run.events[-4:] == ["platform stopping", "platform stopped", "kafka stopped", "postgres stopped"]
    assert "driftloop: stopped by SIGTERM" in run.output.decode()


def test_a_second_interrupt_while_the_demo_cleans_up_does_not_leave_the_infrastructure_running(
    tmp_path: Path, runs: list[Run]
) -> None:
    run = Run(tmp_path, ["demo"], PLATFORM_STOP_S="1.5")
    runs.append(run)
    run.start(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run.wait_for("demo running")
    assert run.process is not None

    os.kill(run.process.pid, signal.SIGINT)
    run.wait_for("platform stopping")
    os.kill(run.process.pid, signal.SIGINT)  # impatient: Ctrl-C again
    os.kill(run.process.pid, signal.SIGTERM)

    assert run.finish() == 130, run.output.decode()
    assert run.events[-4:] == ["platform stopping", "platform stopped", "kafka stopped", "postgres stopped"]
    assert "finishing that first, so nothing is left running" in run.output.decode()


def test_what_pytest_starts_under_driftloop_test_ends_on_sighup_as_it_would_anywhere(
    tmp_path: Path, runs: list[Run]
) -> None:
    service_pid = tmp_path / "service.pid"
    run = driftloop_test(tmp_path, runs, SERVICE_PID_FILE=str(service_pid))
    run.start(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run.wait_for("session set up")
    service = read_pid(service_pid)
    assert service is not None and pid_alive(service)

    try:
        os.kill(service, signal.SIGHUP)  # a service manager's reload or stop, a test of its ending signals

        assert wait_until(lambda: not pid_alive(service), timeout_s=10, interval_s=0.05), (
            f"SIGHUP did not end what pytest started: {signal_dispositions(service)}"
        )
    finally:
        if pid_alive(service):
            os.kill(service, signal.SIGKILL)
    assert run.process is not None
    os.kill(run.process.pid, signal.SIGTERM)
    assert run.finish() == 143, run.output.decode()


def signal_dispositions(pid: int) -> str:
    """The SigBlk and SigIgn lines of a process's /proc status."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return ", ".join(line for line in status if line.startswith(("SigBlk", "SigIgn")))


def signals_in(status: str, field: str) -> set[int]:
    """The signals set in a mask field (SigBlk, SigIgn, ...) of a /proc/<pid>/status text."""
    mask = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith(f"{field}:"))
    return {signum for signum in range(1, 65) if mask >> (signum - 1) & 1}


# A child that writes its own /proc status where argv[1] says.
STATUS_REPORTER = (
    "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(open('/proc/self/status').read())"
)


def test_the_child_starts_with_the_signal_mask_and_dispositions_of_its_caller(tmp_path: Path) -> None:
    report = tmp_path / "status"
    ours = Path("/proc/thread-self/status").read_text()

    outcome = run_to_completion(
        [sys.executable, "-c", STATUS_REPORTER, str(report)],
        name="child",
        cwd=tmp_path,
        env=os.environ,
        grace_s=5,
    )

    assert outcome.returncode == 0
    # Inherited by all it starts (services, Kafka, Postgres): they must get SIGHUP as they would anywhere.
    theirs = report.read_text()
    assert signals_in(theirs, "SigBlk") == signals_in(ours, "SigBlk")
    assert (signal.SIGHUP in signals_in(theirs, "SigIgn")) == (signal.SIGHUP in signals_in(ours, "SigIgn"))
