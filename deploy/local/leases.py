"""Leases on what a state folder runs (Kafka, Postgres, the platform): which commands use it now, and what
they started, so that the last of them to end stops it and no other's end pulls it from under one still
running.

A lease is a file ``<pid>-<token>.lease`` under ``<state>/leases/`` naming its command and what it uses,
with an exclusive flock its command holds for as long as it runs. The kernel drops that lock when the
process ends, however it ends (SIGKILL, the OOM killer): a lease file nobody holds locked is a dead
command's, and is ignored and removed. The pid is for messages only; a pid used again by another process
cannot keep a lease alive. The file ``started`` lists what lease holders started and is theirs to stop.

A flock belongs to the open file, which a fork without exec shares with the child (multiprocessing's fork
start method, ``os.fork``): the child would hold the lease for a command that died, and its clean-up would
remove the lease file, or unlock it, under the parent. So a forked child lets go of its copies at once,
closing them without unlocking (``os.register_at_fork``); an exec drops them anyway (not inheritable).

Nothing here locks the folder: callers take the state's one up/down lock (``infra.lock``) around taking a
lease and around deciding what to stop, so a command cannot join while the last one decides to stop.
Looking at the holders needs no lock: a lease file is only removed once nobody holds it, and no two
leases share a name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

LEASE_SUFFIX = ".lease"
STARTED = "started"
ANYTHING = "*"


@dataclass(frozen=True)
class Holder:
    """A live command holding a lease: its pid, its command line and what it uses."""

    pid: int | None
    command: str
    uses: frozenset[str]

    def needs(self, thing: str) -> bool:
        """Whether this holder uses ``thing`` (one whose file cannot be read uses everything)."""
        return thing in self.uses or ANYTHING in self.uses

    def describe(self) -> str:
        """``pid 1234 (driftloop test)``, for messages."""
        return f"pid {self.pid} ({self.command})" if self.pid is not None else self.command


class Lease:
    """This process's lease, held until ``close`` (a forked child does not hold it)."""

    def __init__(self, path: Path, handle: IO[str], holder: Holder) -> None:
        self.path = path
        self.holder = holder
        self._handle: IO[str] | None = handle
        _HELD.add(self)

    @property
    def held(self) -> bool:
        return self._handle is not None

    def close(self) -> None:
        """Give the lease up (idempotent)."""
        if self._handle is None:
            return
        # Removed before it is unlocked: nobody sees it unlocked and takes it for a dead command's.
        self.path.unlink(missing_ok=True)
        self._handle.close()
        self._handle = None
        _HELD.discard(self)

    def _let_go_in_child(self) -> None:
        # The parent's lease, not this process's: the descriptor is closed (never flock(LOCK_UN), which
        # would unlock the file for the parent too) and the file is left to the parent.
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None


_HELD: weakref.WeakSet[Lease] = weakref.WeakSet()
"""The leases this process holds, for a forked child to let go of."""


def _let_go_after_fork() -> None:
    for lease in list(_HELD):
        lease._let_go_in_child()
    _HELD.clear()


os.register_at_fork(after_in_child=_let_go_after_fork)


class Leases:
    """The leases in one folder, and the list of what their holders started."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def started_file(self) -> Path:
        return self.folder / STARTED

    def take(self, command: str, uses: Iterable[str]) -> Lease:
        """A lease for this process's ``command``, which uses ``uses`` (names such as ``kafka``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        holder = Holder(os.getpid(), command, frozenset(uses))
        # Locked and written under a name no reader looks at, then renamed: a reader never finds it
        # unlocked, nor half written. The descriptor is not inherited by what this process starts.
        fd, temporary = tempfile.mkstemp(prefix=".", suffix=".taking", dir=self.folder)
        handle = os.fdopen(fd, "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            json.dump({"pid": holder.pid, "command": command, "uses": sorted(holder.uses)}, handle)
            handle.flush()
            path = self.folder / f"{holder.pid}-{secrets.token_hex(4)}{LEASE_SUFFIX}"
            os.replace(temporary, path)
        except BaseException:
            handle.close()
            Path(temporary).unlink(missing_ok=True)
            raise
        return Lease(path, handle, holder)

    def holders(self) -> list[Holder]:
        """The live holders (this process's own leases included); dead commands' lease files are removed."""
        live = []
        for path in sorted(self.folder.glob(f"*{LEASE_SUFFIX}")):
            try:
                with path.open() as lease:
                    try:
                        fcntl.flock(lease, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    except BlockingIOError:
                        live.append(_holder(lease.read(), path))
                        continue
                    path.unlink(missing_ok=True)  # its command has ended without giving it up
            except FileNotFoundError:
                continue  # given up meanwhile
        return live

    def started(self) -> frozenset[str]:
        """What lease holders started and nobody has stopped or taken over since."""
        try:
            return frozenset(self.started_file.read_text().split())
        except FileNotFoundError:
            return frozenset()

    def add_started(self, things: Iterable[str]) -> None:
        """Note that a lease holder is starting ``things``: the last holder to end stops them."""
        self._write_started(self.started() | set(things))

    def forget(self, things: Iterable[str]) -> None:
        """Take ``things`` off the list: stopped, or taken over by a command that keeps them running."""
        remaining = self.started() - set(things)
        if remaining != self.started():
            self._write_started(remaining)

    def _write_started(self, things: Iterable[str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.started_file.with_name(STARTED + ".partial")
        partial.write_text("".join(f"{thing}\n" for thing in sorted(things)))
        partial.replace(self.started_file)


def _holder(text: str, path: Path) -> Holder:
    # A lease file is written whole before it is renamed into place; one edited by hand still counts
    # (it is locked), as a command using everything.
    with contextlib.suppress(ValueError, KeyError, TypeError):
        record = json.loads(text)
        return Holder(int(record["pid"]), str(record["command"]), frozenset(map(str, record["uses"])))
    return Holder(None, f"the command holding {path}", frozenset({ANYTHING}))
