"""A command's standard output, and its reader going away (`driftloop audit tail | head`)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import sys

from rich.console import Console

READER_GONE = 128 + signal.SIGPIPE
"""The exit status of a command whose reader stopped reading: what a shell reports for a command SIGPIPE
ended, never 1 (a failed verification, an error)."""


class StdoutConsole(Console):
    """A rich console whose closed pipe raises BrokenPipeError, as a :func:`print` to it does, for the
    command's main to end as a reader gone (rich's own exits with status 1, the status of an error)."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def output_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone: tells a BrokenPipeError of the command's
    own output from one of a connection it made (which is an error to report)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no stdout, or not a file (a test's capture)
        return True


def discard_output() -> None:
    """Send stdout to /dev/null once writing to it failed: what is still buffered for it goes nowhere, so
    Python's last flush does not fail (and print an exception) again."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no stdout, or not a file
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def reader_gone() -> int:
    """End a command whose output's reader went away: nothing more can be said to it, and nothing is wrong
    to say on stderr; the exit status to return."""
    discard_output()
    return READER_GONE


_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""What a terminal acts on rather than prints: C0 and C1 controls (ESC starts a sequence that can clear the
screen, move the cursor over lines printed before, set the clipboard), DEL, and the bidirectional marks and
overrides that show text in another order than it has."""


def terminal_text(text: str) -> str:
    """Text a producer wrote, as a terminal may print it: each control character as its escape (``\\x1b``,
    ``\\u202e``), so a header cannot drive the reader's terminal. rich takes some controls out of Text, but
    passes ESC on."""
    return _CONTROLS.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
