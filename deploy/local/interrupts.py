"""Ctrl-C, SIGTERM and SIGHUP in the CLI: each ends a command the same way, through its clean-up.

Python turns Ctrl-C into KeyboardInterrupt, but dies at once on SIGTERM and SIGHUP, skipping every
``finally``: a `demo` or `test` ended by a service manager, a closed terminal or ``kill`` left its
services and infrastructure running. ``terminations_raise`` makes those signals raise ``Terminated`` (a
KeyboardInterrupt, so the clean-up that handles Ctrl-C handles them too); ``DeferredSignals`` keeps a
second signal from cutting that clean-up short; ``run_to_completion`` runs a child (pytest) that must do
its own clean-up before we do ours.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import ClassVar

from deploy.local.console import say
from deploy.local.processes import descendants

ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# si_code of a signal the kernel sent on its own: a terminal's Ctrl-C goes that way to every process of
# the foreground group at once (``kill`` gives SI_USER, and reaches only the process it names).
SI_KERNEL = 0x80


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program was, so it unwinds through clean-up like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def interruption(signum: int) -> KeyboardInterrupt:
    """The exception a signal stands for: KeyboardInterrupt for SIGINT, Terminated for the others."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _in_main_thread() -> bool:
    # Only the main thread may set signal handlers (infra.up also runs in worker threads in tests).
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def terminations_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise Terminated (unless they are ignored, as under nohup)."""
    if not _in_main_thread():
        yield
        return
    previous = {
        signum: handler
        for signum in (signal.SIGTERM, signal.SIGHUP)
        if (handler := signal.getsignal(signum)) not in (signal.SIG_IGN, None)
    }
    for signum in previous:
        signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class DeferredSignals:
    """Hold Ctrl-C, SIGTERM and SIGHUP while clean-up runs, then deliver the first one, unless the clean-up
    runs because of an exception already (which then goes on): a second Ctrl-C must not leave half of what
    a command started running. Nested, the inner one hands what it held to the outer one."""

    _active: ClassVar[list[DeferredSignals]] = []

    def __init__(self, doing: str = "stopping what this command started") -> None:
        self.doing = doing
        self.received: int | None = None
        self.previous: dict[int, signal._HANDLER] = {}

    def _hold(self, signum: int, frame: FrameType | None = None) -> None:
        if self.received is None:
            name = signal.Signals(signum).name
            say(f"{name} received while {self.doing}: finishing that first, so nothing is left running")
            self.received = signum

    def __enter__(self) -> DeferredSignals:
        if _in_main_thread():
            for signum in ENDING_SIGNALS:
                handler = signal.getsignal(signum)
                if handler not in (signal.SIG_IGN, None):  # None: set outside Python, left alone
                    self.previous[signum] = handler
                    signal.signal(signum, self._hold)
            DeferredSignals._active.append(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self not in DeferredSignals._active:
            return  # entered outside the main thread: nothing was held
        DeferredSignals._active.remove(self)
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.received is None:
            return
        if DeferredSignals._active:
            DeferredSignals._active[-1]._hold(self.received)
        elif kind is None and sys.exc_info()[1] is None:
            raise interruption(self.received)


@dataclass(frozen=True)
class ChildOutcome:
    """How a child run by ``run_to_completion`` ended."""

    returncode: int
    signal_received: int | None = None
    """The first ending signal we got while it ran (it was passed on as SIGINT)."""
    left_behind: tuple[int, ...] = ()
    """What ran below the child when it had to be killed (what its own clean-up would have stopped)."""


def run_to_completion(
    command: Sequence[str],
    *,
    name: str,
    cwd: Path,
    env: Mapping[str, str],
    grace_s: float,
    kill_after_s: float = 10.0,
) -> ChildOutcome:
    """Run a child in our process group (it shares the terminal: pdb works) until it exits.

    An ending signal to us reaches it as one SIGINT, the signal its clean-up is written for (pytest tears
    down its session fixtures: sandbox platforms, databases, topics); a terminal's Ctrl-C already reached
    it, and a second one would cut that clean-up short, so that one is not passed on. A child still running
    ``grace_s`` later gets SIGTERM, then SIGKILL; what ran below it then is returned as ``left_behind``.
    Call it from the main thread: the signals are taken with sigtimedwait, which sees the sender.

    The child starts with our signal mask and dispositions, which everything it starts inherits. A closing
    terminal's SIGHUP reaches it as well as us; a child that must clean up first has to outlive it with a
    handler of its own (pytest: ``deploy.local.pytest_hangup``) and wait for our SIGINT.
    """
    # Ignored signals stay ignored (nohup): blocked, they would still be queued and seen below.
    watched = {s for s in ENDING_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    # Blocked from before the child starts to the end, so no signal is lost or raised while it starts; it
    # gets the mask we had back before its exec (blocked, SIGHUP would stay blocked in all it starts).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    try:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            # Not safe with threads in general; here one C call, which takes no lock a thread may hold.
            preexec_fn=functools.partial(signal.pthread_sigmask, signal.SIG_SETMASK, mask),
        )
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    received: int | None = None
    deadline = float("inf")
    left_behind: tuple[int, ...] = ()
    try:
        while (code := process.poll()) is None:
            info = signal.sigtimedwait(watched, 0.2)
            if info is not None and received is None:
                received = info.si_signo
                deadline = time.monotonic() + grace_s
                if not (info.si_signo == signal.SIGINT and info.si_code == SI_KERNEL):
                    process.send_signal(signal.SIGINT)
                signame = signal.Signals(received).name
                say(f"{signame}: letting {name} finish its clean-up (up to {grace_s:.0f}s)")
            elif info is not None:
                say(f"still letting {name} finish its clean-up ({deadline - time.monotonic():.0f}s left)")
            if time.monotonic() >= deadline:
                left_behind = tuple(descendants(process.pid))
                say(f"{name} did not finish its clean-up within {grace_s:.0f}s: stopping it")
                process.terminate()
                try:
                    code = process.wait(timeout=kill_after_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    code = process.wait()
                break
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return ChildOutcome(code, received, left_behind)
