"""Processes, pid files and ports of the local infrastructure, read from /proc where Linux offers it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from deploy.local.errors import PortTaken

T = TypeVar("T")


@dataclass(frozen=True)
class PortOwner:
    """The process listening on a port, as far as /proc lets us see it."""

    pid: int | None
    command: str

    def describe(self) -> str:
        """Human description such as ``pid 1234 (java -cp ...)``."""
        if self.pid is None:
            return "a process this user cannot see (another user's, or outside this machine's namespace)"
        return f"pid {self.pid} ({' '.join(self.command.split())[:120]})"


def pid_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state letter follows the parenthesised command name, which may itself contain spaces.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def read_pid(path: Path) -> int | None:
    """The pid stored in a pid file, or None when the file is missing or garbled."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def command_line(pid: int) -> str:
    """The process's command line joined by spaces, or '' when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def port_owner(port: int) -> PortOwner | None:
    """Who listens on the port, or None when nobody listens on it."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in targets:
                        pid = int(proc.name)
                        return PortOwner(pid, command_line(pid))
    return PortOwner(None, "")


def ensure_port_free(port: int, purpose: str, setting: str) -> None:
    """Raise PortTaken, naming the owner, when another process listens on the port."""
    owner = port_owner(port)
    if owner is None and not port_open(port):
        return
    who = owner.describe() if owner else "another process"
    raise PortTaken(
        f"port {port} ({purpose}) is already in use by {who}, which is not this checkout's.",
        hint=f"stop that process, or choose another port with {setting}=<port>.",
    )


def wait_until(check: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.25) -> bool:
    """Poll ``check`` until it is true or the deadline passes; returns its last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def _reap(pid: int) -> None:
    # A child started by this very process stays a zombie until waited for; other pids are not ours to reap.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def terminate(pid: int, *, timeout_s: float, first_signal: signal.Signals = signal.SIGTERM) -> bool:
    """Send ``first_signal`` (SIGTERM), SIGKILL after the deadline; True if it had to be killed."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, first_signal)

    def gone() -> bool:
        _reap(pid)
        return not pid_alive(pid)

    if wait_until(gone, timeout_s=timeout_s):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(gone, timeout_s=10)
    return True


def log_tail(path: Path, lines: int = 30, since: int = 0) -> str:
    """The last lines of a log file written after byte offset ``since``, for error messages."""
    try:
        with path.open("rb") as log:
            log.seek(since)
            return text_tail(log.read().decode(errors="replace"), lines)
    except OSError:
        return f"(no log at {path})"


def text_tail(text: str, lines: int = 25) -> str:
    """The last lines of a command's output, for error messages."""
    return "\n".join(text.splitlines()[-lines:])


def run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion on a private event loop in a worker thread.

    The infrastructure code is synchronous and is called both from the CLI and from pytest fixtures,
    where an event loop may already be running or registered; a separate thread keeps them apart.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
