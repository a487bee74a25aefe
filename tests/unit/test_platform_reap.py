"""The supervisor reaps what a killed service leaves behind in its process group, nothing of the
platform outlives it, and its logs stay bounded while it runs; `down` stops only what is really the
platform's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.local.errors import PortTaken, StartFailed
from deploy.local.processes import command_args, descendants, pid_alive, wait_until
from deploy.platform import Child, Platform, Supervision, Supervisor, reap_group, supervised_state_dir
from tests.ports import free_port

# A "service" that starts a helper in its own group (as training's fork server is) and prints its pid.
SERVICE = """
import subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(helper.pid, flush=True)
time.sleep(60)
"""


def test_a_killed_service_leaves_no_helper_behind() -> None:
    service = subprocess.Popen(
        [sys.executable, "-c", SERVICE], stdout=subprocess.PIPE, start_new_session=True, text=True
    )
    assert service.stdout is not None
    helper = int(service.stdout.readline())
    os.kill(service.pid, signal.SIGKILL)
    service.wait()
    assert pid_alive(helper), "the helper outlives its SIGKILLed service: the leak this guards against"
    reap_group(service.pid)
    assert wait_until(lambda: not pid_alive(helper), timeout_s=5, interval_s=0.05)
    reap_group(service.pid)  # nothing left: a no-op


# --- what the supervisor leaves when it dies, and what `down` may stop --------------------------------


class SleepingServices(Supervisor):
    """The supervisor with `sleep` for services: "steady" runs, "crashy" exits, and its restart fails with
    ``fault`` (a fault of the supervisor's own)."""

    fault: Exception = RuntimeError("a fault of the supervisor's own")

    def start(self, child: Child) -> None:
        if child.name == "crashy" and child.process is not None:
            raise self.fault
        child.process = subprocess.Popen(
            ["sleep", "300"] if child.name == "steady" else ["true"], start_new_session=True
        )
        child.started_at = time.monotonic()


def test_a_supervisor_that_dies_of_an_error_stops_its_services_first(tmp_path: Path) -> None:
    supervisor = SleepingServices(tmp_path, {}, ["steady", "crashy"])

    with pytest.raises(RuntimeError, match="a fault of the supervisor's own"):
        supervisor.run()

    steady = supervisor.children["steady"].process
    assert steady is not None
    assert steady.poll() is not None, "the service outlived its supervisor"
    assert not (tmp_path / "platform" / "state.json").exists()


class ShortOfProcesses(SleepingServices):
    """ "crashy"'s first two restarts fail as a full process table makes them; the third runs it for good."""

    attempts = 0

    def start(self, child: Child) -> None:
        if child.name == "crashy" and child.process is not None:
            self.attempts += 1
            if self.attempts <= 2:
                raise OSError(11, "Resource temporarily unavailable")
            child.process = subprocess.Popen(["sleep", "300"], start_new_session=True)
            child.started_at = time.monotonic()
            return
        super().start(child)


def test_a_restart_that_fails_is_tried_again_and_the_platform_runs_on(tmp_path: Path) -> None:
    # Raised, the full process table ended the supervisor and every service with it, for good.
    supervisor = ShortOfProcesses(tmp_path, {}, ["steady", "crashy"])
    supervisor.logs.mkdir()  # where the services' logs are made (these services log nowhere)
    loop = threading.Thread(target=supervisor._supervise)
    loop.start()
    try:

        def restarted_once() -> bool:
            crashy = supervisor.children.get("crashy")
            return crashy is not None and crashy.restarts == 1

        assert wait_until(restarted_once, timeout_s=30, interval_s=0.05)
        assert loop.is_alive()
        steady, restarted = supervisor.children["steady"].process, supervisor.children["crashy"].process
        assert steady is not None and steady.poll() is None
        assert restarted is not None and restarted.poll() is None
        notes = (tmp_path / "logs" / "supervisor.log").read_text()
        assert notes.count("crashy did not start (") == 2 and "Resource temporarily unavailable" in notes
        state = json.loads((tmp_path / "platform" / "state.json").read_text())
        assert state["services"]["crashy"] == {"pid": restarted.pid, "restarts": 1}
    finally:
        supervisor.stopping = True
        loop.join(timeout=30)
        supervisor.stop_children()


def test_a_state_that_cannot_be_written_is_noted_and_the_supervisor_goes_on(tmp_path: Path) -> None:
    supervisor = Supervisor(tmp_path, {}, [])
    supervisor.logs.mkdir()
    (tmp_path / "platform").write_text("")  # no folder can be made there, as on a full or read-only disk
    supervisor.write_state()
    assert "the platform's state could not be written (" in (supervisor.logs / "supervisor.log").read_text()


def fake_service(processes: list[subprocess.Popen[bytes]], name: str) -> int:
    """A process that looks like `python -m services.<name>` to /proc, in its own session as started."""
    process = subprocess.Popen(
        ["python", "-c", "import time; time.sleep(300)", "-m", f"services.{name}"],
        executable=sys.executable,
        start_new_session=True,
    )
    processes.append(process)
    # Until it has exec'd, a child's command line is still its parent's.
    assert wait_until(lambda: command_args(process.pid)[:1] == ["python"], timeout_s=10, interval_s=0.01)
    return process.pid


def test_down_stops_the_services_of_a_supervisor_that_was_killed(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    registry, serving = fake_service(processes, "registry"), fake_service(processes, "serving")
    unrelated = subprocess.Popen(["sleep", "300"], start_new_session=True)  # a pid since reused
    processes.append(unrelated)
    state = {"registry": {"pid": registry}, "serving": {"pid": serving}, "audit": {"pid": unrelated.pid}}
    (tmp_path / "platform").mkdir()
    (tmp_path / "platform" / "state.json").write_text(json.dumps({"supervisor": 1, "services": state}))

    assert Platform(tmp_path).stop()

    assert wait_until(lambda: not pid_alive(registry) and not pid_alive(serving), timeout_s=10)
    assert unrelated.poll() is None, "a process that is not a service was stopped"


def test_a_stale_supervisor_pid_file_names_nothing_down_may_stop(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    platform = Platform(tmp_path)
    platform.pid_file.parent.mkdir(parents=True)
    # After a reboot the pid went to an unrelated process, here one that is not a group leader either
    # (killpg would fail with ESRCH on it) and ignores SIGTERM.
    victim = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 300 & wait"])
    processes.append(victim)
    platform.pid_file.write_text(str(victim.pid))
    try:
        assert platform.supervisor_pid() is None
        assert not platform.stop(timeout_s=1)
        assert victim.poll() is None, "`down` signalled a process that is not its supervisor"
    finally:
        for helper in descendants(victim.pid):
            os.kill(helper, signal.SIGKILL)


# --- starting: one supervisor, on ports nobody else holds ---------------------------------------------


def empty_platform(tmp_path: Path) -> Platform:
    """A platform with no services: its supervisor starts in a moment and runs nothing."""
    return Platform(tmp_path / "state", port_base=free_port(), services=())


def test_two_starts_at_once_make_one_supervisor(tmp_path: Path) -> None:
    platform = empty_platform(tmp_path)
    barrier = threading.Barrier(2)
    results: list[Supervision] = []

    def start() -> None:
        barrier.wait()
        results.append(platform.start(dict(os.environ)))

    threads = [threading.Thread(target=start) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(results) == 2
        assert results[0].pid == results[1].pid
        assert sorted(r.started for r in results) == [False, True]
        supervisors = [p for p in descendants(os.getpid()) if supervised_state_dir(p) == platform.state_dir]
        assert supervisors == [results[0].pid]
    finally:
        platform.stop()
    assert platform.supervisor_pid() is None


def test_a_start_refuses_a_service_port_another_process_holds(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        platform = Platform(tmp_path / "state", port_base=port - 3, services=("serving",))

        with pytest.raises(PortTaken) as caught:
            platform.start(dict(os.environ))

    assert f"port {port} (the serving service) is already in use by pid {os.getpid()}" in caught.value.message
    assert platform.supervisor_pid() is None


def test_waiting_for_readiness_ends_at_once_when_the_supervisor_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    platform = Platform(tmp_path / "state", port_base=free_port(), services=("registry",))
    platform.log.parent.mkdir(parents=True)
    platform.log.write_text("Traceback ...\nModuleNotFoundError: No module named 'services'\n")
    polls: list[dict[str, str]] = []
    health = Platform.health

    def counted(self: Platform) -> dict[str, str]:
        polls.append(health(self))
        return polls[-1]

    monkeypatch.setattr(Platform, "health", counted)

    with pytest.raises(StartFailed) as caught:
        platform.wait_ready(timeout_s=60)

    assert len(polls) == 1  # ended at the first look, not after polling until the deadline
    assert "the services' supervisor exited while they were starting" in caught.value.message
    assert "No module named 'services'" in caught.value.message


# --- logs of a platform left running ------------------------------------------------------------------

# A "service" that logs a numbered line every few milliseconds for as long as it runs.
CHATTY_SERVICE = """
import itertools, sys, time
for n in itertools.count():
    print(f"line {n}", flush=True)
    time.sleep(0.002)
"""


def test_a_running_services_log_is_kept_within_its_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("deploy.platform.service_args", lambda name: ("-c", CHATTY_SERVICE))
    monkeypatch.setattr("deploy.platform.LOG_CHECK_S", 0.05)
    supervisor = Supervisor(tmp_path, dict(os.environ), ["chatty"], max_log_bytes=2000)
    log, previous = tmp_path / "logs" / "chatty.log", tmp_path / "logs" / "chatty.log.1"
    loop = threading.Thread(target=supervisor._supervise)
    loop.start()
    try:
        # The service never starts again, yet its log is emptied in place once over the limit, its lines
        # kept as the one earlier generation.
        assert wait_until(previous.exists, timeout_s=30, interval_s=0.05)
        child = supervisor.children["chatty"]
        assert child.process is not None and child.process.poll() is None
        assert child.restarts == 0
        assert previous.read_text().startswith("line ")
        assert previous.stat().st_size > 2000
        # Its next lines start the log again (it appends), with no hole of NULs where the old ones were.
        assert wait_until(lambda: log.read_bytes().startswith(b"line "), timeout_s=10, interval_s=0.01)
    finally:
        supervisor.stopping = True
        loop.join(timeout=30)
        supervisor.stop_children()
