"""Processes, pid files and ports of the local infrastructure, read from /proc where Linux offers it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from deploy.local.console import say
from deploy.local.errors import PermissionProblem, PortTaken, StateUnusable

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


PID_LIMIT = 2**22
"""Linux's highest pid_max: every pid is below it."""


def read_pid(path: Path) -> int | None:
    """The pid stored in a pid file, or None when the file is missing or garbled: a number no process can
    have is garbled too (0 and -1 would mean this process group and every process to os.kill, a number
    beyond a C long an OverflowError)."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if 0 < pid < PID_LIMIT else None


def command_args(pid: int) -> list[str]:
    """The process's arguments as they were passed to it (/proc/<pid>/cmdline split on NUL), or [] when
    they cannot be read (gone, or hidden from this user)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return [os.fsdecode(arg) for arg in raw.split(b"\0")] if raw else []


def command_line(pid: int) -> str:
    """The process's command line joined by spaces, or '' when it cannot be read (for messages)."""
    return " ".join(command_args(pid)).encode(errors="surrogateescape").decode(errors="replace").strip()


def runs_exactly(pid: int, args: Sequence[str], *, program: str | None = None) -> bool:
    """True when the process was started with ``args`` as consecutive whole arguments and, when given,
    an executable whose file name is ``program``.

    Whole arguments, never substrings: another checkout whose path merely contains ours (``/tmp/copy/srv/dl``
    around ``/srv/dl``), or a ``tail -f`` of our log, is not ours, and must not be stopped as if it were.
    """
    argv = command_args(pid)
    if not argv or (program is not None and Path(argv[0]).name != program):
        return False
    wanted = list(args)
    return any(argv[i : i + len(wanted)] == wanted for i in range(len(argv) - len(wanted) + 1))


def find_process(args: Sequence[str], *, program: str | None = None) -> int | None:
    """The pid of a live process started with exactly these arguments (see ``runs_exactly``), if any."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            pid = int(proc.name)
            if runs_exactly(pid, args, program=program) and pid_alive(pid):
                return pid
    return None


def descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (children, their children, ...), read from /proc."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (proc / "stat").read_text()
                # The parent's pid is the second field after the parenthesised command name.
                parents[int(proc.name)] = int(stat.rsplit(")", 1)[-1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def process_owner(pid: int) -> str:
    """The name of the user a process runs as, or its uid when the name is unknown."""
    try:
        uid = Path(f"/proc/{pid}").stat().st_uid
    except OSError:
        return "another user"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


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


def ensure_port_free(port: int, purpose: str, setting: str | None = None) -> None:
    """Raise PortTaken, naming the owner, when another process listens on the port."""
    owner = port_owner(port)
    if owner is None and not port_open(port):
        return
    who = owner.describe() if owner else "another process"
    raise PortTaken(
        f"port {port} ({purpose}) is already in use by {who}, which is not this checkout's.",
        hint=f"stop that process, or choose another port with {setting}=<port>."
        if setting
        else "stop that process, then run the command again.",
    )


@contextlib.contextmanager
def exclusive(lock_file: Path, doing: str = "") -> Iterator[None]:
    """Hold an exclusive flock on ``lock_file`` for the block: one check-and-start at a time.

    ``doing`` (``stopping the platform``) is written into the file while it is held, so that a command
    that has to wait meanwhile says once what it waits for (a platform's stop may take 40 s) instead of
    hanging silently; it is only for that message."""
    with _opened_lock(lock_file) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for {_lock_holder(lock_file)} ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        _write_note(lock, f"{os.getpid()}\n{doing}" if doing else "")
        try:
            yield
        finally:
            _write_note(lock, "")
            fcntl.flock(lock, fcntl.LOCK_UN)


def _opened_lock(lock_file: Path) -> IO[str]:
    """The lock file, open for appending; its folder (the state's, the first thing a command writes there)
    is made if missing, and one that cannot be is a StateUnusable naming it."""
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        return lock_file.open("a")
    except OSError as exc:
        state = lock_file.parent.parent if lock_file.parent.name == "platform" else lock_file.parent
        raise StateUnusable(
            f"cannot use {state} for driftloop's state: {exc.strerror} ({exc.filename})",
            hint="set DRIFTLOOP_LOCAL_STATE_DIR to a folder this user can write (it is made if missing), "
            "or give this user the rights to that one.",
        ) from exc


def _write_note(lock: IO[str], note: str) -> None:
    # Only for another command's message: a note that cannot be written (disk full) changes nothing else.
    with contextlib.suppress(OSError):
        lock.truncate(0)
        lock.write(note)
        lock.flush()


def _lock_holder(lock_file: Path) -> str:
    """``another driftloop command (pid 1234) to finish stopping the platform``, as its note says."""
    try:
        pid, doing = lock_file.read_text().split("\n", 1)
        if doing:
            return f"another driftloop command (pid {int(pid)}) to finish {doing}"
    except (OSError, ValueError):
        pass  # not written yet (or no longer), or by a driftloop from before notes
    return f"another driftloop command to finish with {lock_file}"


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


def signal_process(pid: int, signum: signal.Signals) -> None:
    """Send a signal; a process already gone is fine, one of another user's is a PermissionProblem."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # gone already: what we wanted
    except PermissionError as err:
        raise PermissionProblem(
            f"pid {pid} ({command_line(pid)[:80] or 'a process'}) runs as {process_owner(pid)}, "
            "and this user may not stop it.",
            hint="run the command as that user or as root (e.g. with sudo).",
        ) from err


def terminate_all(
    pids: Sequence[int], *, timeout_s: float, first_signal: signal.Signals = signal.SIGTERM
) -> list[int]:
    """Send ``first_signal`` (SIGTERM) to each, SIGKILL to those left at the deadline; returns those."""
    for pid in pids:
        signal_process(pid, first_signal)

    def gone(pid: int) -> bool:
        _reap(pid)
        return not pid_alive(pid)

    wait_until(lambda: all(gone(pid) for pid in pids), timeout_s=timeout_s)
    killed = [pid for pid in pids if not gone(pid)]
    for pid in killed:
        signal_process(pid, signal.SIGKILL)
    wait_until(lambda: all(gone(pid) for pid in killed), timeout_s=10)
    return killed


def terminate(pid: int, *, timeout_s: float, first_signal: signal.Signals = signal.SIGTERM) -> bool:
    """Send ``first_signal`` (SIGTERM), SIGKILL after the deadline; True if it had to be killed."""
    return bool(terminate_all([pid], timeout_s=timeout_s, first_signal=first_signal))


# A log over this size is moved to <name>.1 (replacing the one before) when its process starts again, and
# the platform's logs also while their processes run (truncate_log); Kafka's log4j rolls kafka.log at it.
MAX_LOG_BYTES = 20 * 1024 * 1024


def rotate_log(path: Path, max_bytes: int = MAX_LOG_BYTES) -> None:
    """Keep one earlier generation: move a log over ``max_bytes`` to ``<name>.1`` before a new start."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > max_bytes:
            path.replace(path.with_name(path.name + ".1"))


def truncate_log(path: Path, max_bytes: int = MAX_LOG_BYTES) -> bool:
    """Keep one earlier generation of a log its process is still writing: over ``max_bytes``, copy it to
    ``<name>.1`` and empty it in place (logrotate's copytruncate); True if it did.

    A service runs for months without starting again, so ``rotate_log`` alone let its log grow until the
    disk was full. Moving the file would only rename what the process goes on writing through its open
    descriptor; ``open_log`` opens every log for appending (O_APPEND), so once emptied the process's next
    line starts it again, with no hole before it. Lines written between the end of the copy and the
    truncation, a moment, are lost. A copy that fails (disk full) keeps the ``.1`` there was and empties
    nothing."""
    previous = path.with_name(path.name + ".1")
    partial = path.with_name(path.name + ".1.partial")
    try:
        with path.open("rb") as log:
            if os.fstat(log.fileno()).st_size <= max_bytes:
                return False
            with partial.open("wb") as copy:
                shutil.copyfileobj(log, copy)  # up to the end as it is now, lines written meanwhile too
        partial.replace(previous)
    except FileNotFoundError:
        return False
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise
    os.truncate(path, 0)
    return True


def open_log(path: Path, max_bytes: int = MAX_LOG_BYTES) -> IO[bytes]:
    """Open a process's log for appending (making its folder), rotated first when it grew too large."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rotate_log(path, max_bytes)
    return path.open("ab")


def log_tail(path: Path, lines: int = 30, since: int = 0) -> str:
    """The last lines of a log file written after byte offset ``since``, for error messages; a log now
    shorter than ``since`` was rotated meanwhile (Kafka's log4j, at its size limit) and is read whole."""
    try:
        with path.open("rb") as log:
            if since <= os.fstat(log.fileno()).st_size:
                log.seek(since)
            return text_tail(log.read().decode(errors="replace"), lines)
    except OSError:
        return f"(no log at {path})"


def log_sizes(paths: Iterable[Path]) -> dict[Path, int]:
    """The size of each log that exists, taken before a start, for ``log_tails``."""
    sizes: dict[Path, int] = {}
    for path in paths:
        with contextlib.suppress(OSError):
            sizes[path] = path.stat().st_size
    return sizes


def log_tails(paths: Sequence[Path], since: Mapping[Path, int], lines: int = 30) -> str:
    """``Last lines of <log>:`` and what each log got after its size in ``since`` (all of a log that is not
    in it), for error messages; a log that got nothing is left out.

    Kafka and Postgres write their own logs, which are rotated while they run, and a process that fails
    before its logging is set up (a JVM that cannot start, a port Postgres cannot bind) says why on its
    console, which is kept in another file: the reason is in either."""
    parts = []
    for path in paths:
        tail = log_tail(path, lines, since.get(path, 0)) if path.exists() else ""
        if tail.strip():
            parts.append(f"Last lines of {path}:\n{tail}")
    if not parts:
        return "Nothing was logged in " + " or ".join(str(path) for path in paths) + "."
    return "\n".join(parts)


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
