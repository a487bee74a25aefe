"""The six services as supervised processes: started together, restarted when they crash, stopped together.

`driftloop up` starts a detached supervisor (``python -m deploy.platform``) that owns the service
processes; `driftloop down` sends it SIGTERM and it stops them gracefully. Each service logs to
``<state>/logs/<service>.log``; the supervisor keeps ``<state>/platform/state.json`` (pids, restarts) for
`driftloop status`.
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

from deploy.local.processes import pid_alive, wait_until
from deploy.local.settings import PROJECT_ROOT

SERVICES = ("registry", "training", "validation", "serving", "monitoring", "audit")
DEFAULT_PORT_BASE = 8101
MAX_BACKOFF_S = 10.0
HEALTHY_AFTER_S = 30.0  # a process that lived this long starts again from the shortest backoff


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

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "platform" / "state.json"

    def start(self, child: Child) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{child.name}.log", "ab")  # noqa: SIM115 - owned by the child process
        child.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{child.name}"],
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        child.started_at = time.monotonic()

    def run(self) -> int:
        """Start every service, restart those that exit, until SIGTERM or SIGINT."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for name in self.services:
            self.children[name] = child = Child(name)
            self.start(child)
        self.write_state()
        while not self.stopping:
            now = time.monotonic()
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
                    child.restarts += 1
                    child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)
                    child.next_start = 0.0
                    self.start(child)
                    self.write_state()
            time.sleep(0.2)
        self.stop_children()
        self.state_file.unlink(missing_ok=True)
        return 0

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
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "supervisor": os.getpid(),
            "services": {
                c.name: {"pid": c.process.pid if c.process else None, "restarts": c.restarts}
                for c in self.children.values()
            },
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def _note(self, message: str) -> None:
        with open(self.logs / "supervisor.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")


# --- control from the CLI and from tests --------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """Handle on a supervised platform: where its state lives and how to reach its services."""

    state_dir: Path
    port_base: int = DEFAULT_PORT_BASE

    @property
    def state_file(self) -> Path:
        return self.state_dir / "platform" / "state.json"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "platform" / "supervisor.pid"

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{service_ports(self.port_base)[service]}"

    def supervisor_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def state(self) -> dict[str, dict[str, int | None]]:
        try:
            return dict(json.loads(self.state_file.read_text())["services"])
        except (OSError, ValueError, KeyError):
            return {}

    def start(self, env: Mapping[str, str]) -> int:
        """Start the supervisor detached (unless it runs); returns its pid."""
        running = self.supervisor_pid()
        if running is not None:
            return running
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / "logs" / "supervisor.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy.platform", "--state", str(self.state_dir)],
            cwd=PROJECT_ROOT,
            env=service_env(env, self.port_base),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.pid_file.write_text(str(process.pid))
        return process.pid

    def stop(self, timeout_s: float = 40.0) -> bool:
        """SIGTERM the supervisor and wait for it and its services to exit; True if one was running."""
        pid = self.supervisor_pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        if not wait_until(lambda: not pid_alive(pid), timeout_s=timeout_s, interval_s=0.2):
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def health(self) -> dict[str, str]:
        """Each service's readiness as its /health/ready says, or why it cannot be asked."""
        result: dict[str, str] = {}
        with httpx.Client(timeout=2.0) as client:
            for name in SERVICES:
                try:
                    response = client.get(f"{self.url(name)}/health/ready")
                    result[name] = (
                        "ready" if response.status_code == 200 else f"not ready ({response.status_code})"
                    )
                except httpx.HTTPError:
                    result[name] = "down"
        return result

    def wait_ready(self, timeout_s: float = 120.0) -> dict[str, str]:
        """Poll until every service is ready or the deadline passes; returns the last health."""
        last: dict[str, str] = {}

        def all_ready() -> bool:
            nonlocal last
            last = self.health()
            return all(v == "ready" for v in last.values())

        wait_until(all_ready, timeout_s=timeout_s, interval_s=0.5)
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
