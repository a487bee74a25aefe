"""The six services as supervised processes: started together, restarted when they crash, stopped together.

`driftloop up` starts a detached supervisor (``python -m deploy.platform``) that owns the service
processes; `driftloop down` sends it SIGTERM and it stops them gracefully. Each service logs to
``<state>/logs/<service>.log``; the supervisor keeps ``<state>/platform/state.json`` (pids, restarts) for
`driftloop status`, and for `down` to stop the services itself should the supervisor be gone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deploy.local.errors import StartFailed
from deploy.local.processes import (
    MAX_LOG_BYTES,
    command_args,
    ensure_port_free,
    exclusive,
    find_process,
    log_tail,
    open_log,
    pid_alive,
    read_pid,
    runs_exactly,
    signal_process,
    terminate_all,
    truncate_log,
    wait_until,
)
from deploy.local.settings import PROJECT_ROOT

SERVICES = ("registry", "training", "validation", "serving", "monitoring", "audit")
DEFAULT_PORT_BASE = 8101
MAX_BACKOFF_S = 10.0
HEALTHY_AFTER_S = 30.0  # a process that lived this long starts again from the shortest backoff
LOG_CHECK_S = 10.0  # how often the supervisor looks at the size of the logs its processes are writing


def service_ports(port_base: int = DEFAULT_PORT_BASE) -> dict[str, int]:
    """The HTTP port of each service: registry at the base, then in SERVICES order."""
    return {name: port_base + i for i, name in enumerate(SERVICES)}


def service_env(base_env: Mapping[str, str], port_base: int) -> dict[str, str]:
    """The environment every service process gets: the caller's, plus each service's port."""
    env = dict(base_env)
    for name, port in service_ports(port_base).items():
        env[f"DRIFTLOOP_{name.upper()}_HTTP_PORT"] = str(port)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


SUPERVISOR = ("-m", "deploy.platform", "--state")


def supervisor_args(state_dir: Path) -> tuple[str, ...]:
    """The arguments after the interpreter that start, and identify, the supervisor of ``state_dir``."""
    return (*SUPERVISOR, str(state_dir))


def service_args(name: str) -> tuple[str, ...]:
    """The arguments after the interpreter that start, and identify, a service process."""
    return ("-m", f"services.{name}")


def supervised_state_dir(pid: int) -> Path | None:
    """The state folder of the platform whose supervisor ``pid`` is, or None when it is not a supervisor."""
    argv = command_args(pid)
    for i in range(len(argv) - len(SUPERVISOR)):
        if tuple(argv[i : i + len(SUPERVISOR)]) == SUPERVISOR:
            return Path(argv[i + len(SUPERVISOR)])
    return None


def reap_group(pid: int) -> None:
    """SIGKILL what is left of a service's process group once the service itself has exited.

    Each service runs in its own session (its pid is its group id), so its helpers are in that group:
    training's fork server, fit worker and multiprocessing's resource tracker. A SIGKILLed service cannot
    stop them, and they would live on without it (about 300 MB each time); like a cgroup's kill mode,
    the supervisor does.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class Child:
    """One supervised service process."""

    name: str
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.5
    next_start: float = 0.0


@dataclass
class Supervisor:
    """Keeps every service running until told to stop."""

    state_dir: Path
    env: dict[str, str]
    services: Sequence[str] = SERVICES
    children: dict[str, Child] = field(default_factory=dict)
    stopping: bool = False
    max_log_bytes: int = MAX_LOG_BYTES

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "platform" / "state.json"

    def start(self, child: Child) -> None:
        with open_log(self.logs / f"{child.name}.log") as log:
            child.process = subprocess.Popen(
                [sys.executable, *service_args(child.name)],
                cwd=PROJECT_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child.started_at = time.monotonic()

    def run(self) -> int:
        """Start every service, restart those that exit, until SIGTERM or SIGINT (or SIGHUP)."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._stop)
        try:
            self._supervise()
        finally:
            # Whatever ends the supervisor (a signal, an error of its own), its services end with it:
            # they run in their own sessions and would otherwise live on, unsupervised.
            self.stop_children()
            self.state_file.unlink(missing_ok=True)
        return 0

    def _supervise(self) -> None:
        for name in self.services:
            self.children[name] = child = Child(name)
            self.start(child)
        self.write_state()
        next_log_check = 0.0
        while not self.stopping:
            now = time.monotonic()
            if now >= next_log_check:
                self.bound_logs()
                next_log_check = now + LOG_CHECK_S
            for child in self.children.values():
                assert child.process is not None
                code = child.process.poll()
                if code is None:
                    if now - child.started_at > HEALTHY_AFTER_S:
                        child.backoff_s = 0.5
                    continue
                if child.next_start == 0.0:
                    # Crashed (or was killed): restart after a growing pause, so a crash loop cannot spin.
                    reap_group(child.process.pid)
                    child.next_start = now + child.backoff_s
                    self._note(f"{child.name} exited with {code}; restarting in {child.backoff_s:.1f}s")
                elif now >= child.next_start:
                    child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
                    try:
                        self.start(child)
                    except OSError as exc:
                        # A full process or file table, or a log that cannot be opened (disk full), passes:
                        # tried again after the next pause. Raised, it ended the supervisor and every service
                        # with it, for good.
                        child.next_start = now + child.backoff_s
                        self._note(
                            f"{child.name} did not start ({exc}); trying again in {child.backoff_s:.1f}s"
                        )
                        continue
                    child.restarts += 1
                    child.next_start = 0.0
                    self.write_state()
            time.sleep(0.2)

    def bound_logs(self) -> None:
        """Keep the services' logs and the supervisor's own within ``max_log_bytes`` (one earlier generation
        each) while they run: a log was rotated only when its process started again, and a platform left up
        for months filled the disk with them."""
        for log in [*(self.logs / f"{name}.log" for name in self.children), self.logs / "supervisor.log"]:
            # A log that cannot be copied now (disk full) is tried again at the next check; it must not take
            # the supervisor, and the platform, down.
            with contextlib.suppress(OSError):
                truncate_log(log, self.max_log_bytes)

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def stop_children(self, grace_s: float = 20.0) -> None:
        live = [c.process for c in self.children.values() if c.process and c.process.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for c in self.children.values():
            if c.process is not None:
                reap_group(c.process.pid)

    def write_state(self) -> None:
        state = {
            "supervisor": os.getpid(),
            "services": {
                c.name: {"pid": c.process.pid if c.process else None, "restarts": c.restarts}
                for c in self.children.values()
            },
        }
        tmp = self.state_file.with_suffix(".tmp")
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(state))
            tmp.replace(self.state_file)
        except OSError as exc:
            # Disk full: `status` reads the pids of the last state written until the next write succeeds; the
            # platform runs on (an error here ended the supervisor and every service with it).
            self._note(f"the platform's state could not be written ({exc})")

    def _note(self, message: str) -> None:
        # A line that cannot be written (disk full) must not take the supervisor, and the platform, down.
        with contextlib.suppress(OSError), open(self.logs / "supervisor.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")


# --- control from the CLI and from tests --------------------------------------------------------------


@dataclass(frozen=True)
class Supervision:
    """What ``Platform.start`` found or did: the supervisor's pid, and whether it started it now."""

    pid: int
    started: bool


@dataclass(frozen=True)
class Platform:
    """Handle on a supervised platform: where its state lives and how to reach its services."""

    state_dir: Path
    port_base: int = DEFAULT_PORT_BASE
    services: tuple[str, ...] = SERVICES

    @property
    def state_file(self) -> Path:
        return self.state_dir / "platform" / "state.json"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "platform" / "supervisor.pid"

    @property
    def log(self) -> Path:
        return self.state_dir / "logs" / "supervisor.log"

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{service_ports(self.port_base)[service]}"

    def supervisor_pid(self) -> int | None:
        """The pid of this platform's supervisor when it runs: the pid file's if that process really is
        it (a stale file may name any process), else one found in /proc by its arguments."""
        args = supervisor_args(self.state_dir)
        pid = read_pid(self.pid_file)
        if pid is not None and pid_alive(pid) and runs_exactly(pid, args):
            return pid
        return find_process(args)

    def state(self) -> dict[str, dict[str, int | None]]:
        try:
            return dict(json.loads(self.state_file.read_text())["services"])
        except (OSError, ValueError, KeyError):
            return {}

    def preflight(self) -> None:
        """Check that no other process listens on the services' ports: its /health/ready would answer for
        a service that never started (an orphan of another run, another program)."""
        ports = service_ports(self.port_base)
        for name in self.services:
            ensure_port_free(ports[name], f"the {name} service")

    def start(self, env: Mapping[str, str]) -> Supervision:
        """Start the supervisor detached unless it runs; one check-and-start at a time per state folder."""
        with exclusive(self.state_dir / "platform" / "start.lock", "starting the platform's supervisor"):
            running = self.supervisor_pid()
            if running is not None:
                return Supervision(running, started=False)
            self.preflight()
            args = supervisor_args(self.state_dir)
            command = [sys.executable, *args]
            if self.services != SERVICES:
                command += ["--services", ",".join(self.services)]
            with open_log(self.log) as log:
                process = subprocess.Popen(
                    command,
                    cwd=PROJECT_ROOT,
                    env=service_env(env, self.port_base),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self.pid_file.write_text(str(process.pid))
                # Popen returns before /proc shows the new command line: until it does, whoever looks next
                # (a second `up` waiting on the lock, wait_ready) would not recognise the supervisor.
                wait_until(
                    lambda: runs_exactly(process.pid, args) or process.poll() is not None,
                    timeout_s=10,
                    interval_s=0.01,
                )
            except BaseException:
                terminate_all([process.pid], timeout_s=40)
                raise
            return Supervision(process.pid, started=True)

    def _orphaned_services(self) -> list[int]:
        # The services of a supervisor that was killed: still listed in its state file, each still running
        # `python -m services.<name>` as the leader of its own session, as the supervisor started it.
        pids = []
        for name, row in self.state().items():
            pid = row.get("pid")
            if isinstance(pid, int) and pid_alive(pid) and runs_exactly(pid, service_args(name)):
                with contextlib.suppress(OSError):
                    if os.getsid(pid) == pid:
                        pids.append(pid)
        return pids

    def stop(self, timeout_s: float = 40.0) -> bool:
        """SIGTERM the supervisor and wait for it and its services to exit; services it left behind (it
        was killed) are stopped from its state file. True if anything of the platform was running."""
        pid = self.supervisor_pid()
        if pid is not None:
            signal_process(pid, signal.SIGTERM)  # gone meanwhile (another `down`) is fine
            if not wait_until(lambda: not pid_alive(pid), timeout_s=timeout_s, interval_s=0.2):
                self._kill_supervisor(pid)
        orphans = self._orphaned_services()
        if orphans:
            terminate_all(orphans, timeout_s=20)
            for orphan in orphans:
                reap_group(orphan)
        # Nothing of it runs now: what the files say is history (a state folder never made has none; one
        # under a file cannot, NotADirectoryError).
        for history in (self.pid_file, self.state_file):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                history.unlink()
        return pid is not None or bool(orphans)

    @staticmethod
    def _kill_supervisor(pid: int) -> None:
        # Its group when it leads one (as started); killpg of a pid that leads none would fail (ESRCH).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)

    def health(self) -> dict[str, str]:
        """Each service's readiness as its /health/ready says, or why it cannot be asked."""
        result: dict[str, str] = {}
        with httpx.Client(timeout=2.0) as client:
            for name in self.services:
                try:
                    response = client.get(f"{self.url(name)}/health/ready")
                    result[name] = (
                        "ready" if response.status_code == 200 else f"not ready ({response.status_code})"
                    )
                except httpx.HTTPError:
                    result[name] = "down"
        return result

    def wait_ready(self, timeout_s: float = 120.0) -> dict[str, str]:
        """Poll until every service is ready or the deadline passes; returns the last health. Raises
        StartFailed at once when the supervisor is gone: nothing would become ready any more."""
        last: dict[str, str] = {}
        supervised = True

        def settled() -> bool:
            nonlocal last, supervised
            last = self.health()
            if all(v == "ready" for v in last.values()):
                return True
            supervised = self.supervisor_pid() is not None
            return not supervised

        wait_until(settled, timeout_s=timeout_s, interval_s=0.5)
        if not supervised:
            raise StartFailed(
                f"the services' supervisor exited while they were starting. Last lines of {self.log}:\n"
                + log_tail(self.log),
                hint=f"fix the cause shown above (each service logs to {self.log.parent}/<service>.log) "
                "and run the command again.",
            )
        return last


def main() -> int:
    parser = argparse.ArgumentParser(
        description="driftloop's service supervisor (started by `driftloop up`)."
    )
    parser.add_argument("--state", type=Path, required=True, help="state folder (logs, pids)")
    parser.add_argument("--services", default=",".join(SERVICES), help="comma-separated services to run")
    args = parser.parse_args()
    supervisor = Supervisor(args.state, dict(os.environ), [s for s in args.services.split(",") if s])
    return supervisor.run()


if __name__ == "__main__":
    raise SystemExit(main())
