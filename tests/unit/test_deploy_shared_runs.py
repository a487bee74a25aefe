"""Two `driftloop test` or `demo` runs at once on one checkout: the first to end must not stop the Kafka,
Postgres or supervisor the other still uses; the last to end stops what they started; a run killed with
SIGKILL leaves nothing that blocks that stop.

Each run is the real CLI in a process of its own, on a state folder of the test's: Kafka and Postgres are
`sleep` processes found by pid files there (as the real ones are found by theirs), so every run sees the
same ones; the platform is a real supervisor of no services. Nothing starts Kafka or Postgres.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.processes import pid_alive, read_pid, wait_until
from deploy.local.settings import PROJECT_ROOT
from deploy.platform import Platform

# The CLI with its infrastructure on the state folder argv[1], then the driftloop arguments. A run's
# pytest session or demo notes that it is using the stack, then waits for its go file.
LAUNCHER = """
import asyncio, os, subprocess, sys
from pathlib import Path

import deploy.cli as cli
from deploy.local import infra as infra_module
from deploy.local.infra import LocalInfra
from deploy.local.processes import pid_alive, read_pid, terminate
from deploy.local.settings import LocalInfraSettings
from deploy.platform import Platform

STATE = Path(sys.argv[1])
EVENTS = STATE / "events"


def note(event):
    with EVENTS.open("a") as f:
        f.write(event + "\\n")


class SleepComponent:
    bootstrap = "127.0.0.1:9"
    url = "postgresql://x@127.0.0.1:9/x"

    def __init__(self, name):
        self.name = name
        self.pid_file = STATE / f"{name}.pid"

    def preflight(self):
        pass

    def running_pid(self):
        pid = read_pid(self.pid_file)
        return pid if pid is not None and pid_alive(pid) else None

    def start(self):
        if self.running_pid() is not None:
            return False
        # Not on the run's output: a reader of that waits for every writer to end.
        process = subprocess.Popen(
            ["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.pid_file.write_text(str(process.pid))
        note(f"{self.name} started")
        return True

    def stop(self):
        pid = self.running_pid()
        if pid is None:
            return False
        terminate(pid, timeout_s=10)
        note(f"{self.name} stopped")
        return True


def local_infra():
    infra = LocalInfra(LocalInfraSettings(state_dir=STATE))
    infra.broker, infra.postgres = SleepComponent("kafka"), SleepComponent("postgres")
    return infra


async def demo_run(platform, bootstrap, **_):
    name = os.environ["RUN"]
    note(f"{name} using it")
    while not (STATE / f"go-{name}").exists():
        await asyncio.sleep(0.05)
    return 0


infra_module.create_platform_topics = lambda *args, **kwargs: []
cli.LocalInfra = local_infra
cli.local_platform = lambda: Platform(STATE / "platform", services=())
if sys.argv[2] == "demo":  # as the CLI, which loads the demo (pandas and friends) only to run it
    import deploy.demo

    deploy.demo.run = demo_run
sys.exit(cli.main(sys.argv[2:]))
"""

SESSION = """
import os, time
from pathlib import Path

STATE = Path(os.environ["STATE"])


def test_uses_the_infrastructure_until_told():
    name = os.environ["RUN"]
    with (STATE / "events").open("a") as f:
        f.write(f"{name} using it\\n")
    deadline = time.monotonic() + 120
    while not (STATE / f"go-{name}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
"""


class Stack:
    """The state folder the runs share, and the runs."""

    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "state"
        self.state.mkdir()
        (self.state / "events").touch()
        self.launcher = tmp_path / "launcher.py"
        self.launcher.write_text(LAUNCHER)
        self.session = tmp_path / "test_session.py"
        self.session.write_text(SESSION)
        self.runs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def events(self) -> list[str]:
        return (self.state / "events").read_text().splitlines()

    def start(self, name: str, command: str) -> None:
        """Start run ``name`` (`test` or `demo`) and wait until it uses the stack."""
        pytest_args = [
            "-c",
            os.devnull,
            "--rootdir",
            str(self.session.parent),
            "-p",
            "no:cacheprovider",
            "-q",
        ]
        argv = {"test": ["test", str(self.session), *pytest_args], "demo": ["demo", "--wait", "10"]}[command]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLOOP_")}
        self.runs[name] = subprocess.Popen(
            [sys.executable, str(self.launcher), str(self.state), *argv],
            cwd=PROJECT_ROOT,
            env={**env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "STATE": str(self.state), "RUN": name},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert wait_until(lambda: f"{name} using it" in self.events, timeout_s=60, interval_s=0.05), (
            self.events
        )

    def finish(self, name: str) -> str:
        """Let run ``name`` end; returns its output (it must have succeeded)."""
        (self.state / f"go-{name}").touch()
        output, _ = self.runs[name].communicate(timeout=90)
        assert self.runs[name].returncode == 0, output.decode()
        return output.decode()

    def kill(self, name: str) -> None:
        """SIGKILL run ``name`` and all it started in its session (its pytest): no clean-up runs."""
        os.killpg(self.runs[name].pid, signal.SIGKILL)
        self.runs[name].wait()

    def pid(self, component: str) -> int | None:
        pid = read_pid(self.state / f"{component}.pid")
        return pid if pid is not None and pid_alive(pid) else None

    def infrastructure_runs(self) -> bool:
        return self.pid("kafka") is not None and self.pid("postgres") is not None

    def supervisor(self) -> int | None:
        return Platform(self.state / "platform", services=()).supervisor_pid()

    def close(self) -> None:
        for run in self.runs.values():
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        Platform(self.state / "platform", services=()).stop()
        for component in ("kafka", "postgres"):
            if (pid := self.pid(component)) is not None:
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    shared = Stack(tmp_path)
    try:
        yield shared
    finally:
        shared.close()


@pytest.mark.parametrize("command", ["test", "demo"])
def test_the_first_of_two_runs_to_end_leaves_everything_to_the_other_and_the_last_stops_it(
    stack: Stack, command: str
) -> None:
    stack.start("first", command)
    stack.start("second", command)

    output = stack.finish("first")

    assert stack.infrastructure_runs(), stack.events
    second = stack.runs["second"].pid
    assert f"still used by pid {second} (driftloop {command})" in output
    if command == "demo":
        assert stack.supervisor() is not None, "the first demo stopped the supervisor the second one uses"

    stack.finish("second")

    assert stack.pid("kafka") is None and stack.pid("postgres") is None, stack.events
    assert stack.supervisor() is None
    assert stack.events.count("kafka started") == 1  # the second run found it running


def test_a_test_run_leaves_the_infrastructure_to_a_demo_and_the_demo_stops_it_at_its_end(
    stack: Stack,
) -> None:
    stack.start("tests", "test")
    stack.start("demo", "demo")

    stack.finish("tests")
    assert stack.infrastructure_runs() and stack.supervisor() is not None

    stack.finish("demo")
    assert stack.pid("kafka") is None and stack.supervisor() is None


def test_a_run_killed_with_sigkill_does_not_keep_the_last_run_from_stopping_the_infrastructure(
    stack: Stack,
) -> None:
    stack.start("killed", "test")
    stack.start("last", "test")

    stack.kill("killed")
    assert stack.infrastructure_runs()
    stack.finish("last")

    assert stack.pid("kafka") is None and stack.pid("postgres") is None, stack.events
