"""Progress messages: one prefix, on stderr, so stdout stays clean for tables and pipes."""

from __future__ import annotations

import contextlib
import sys


def say(message: str) -> None:
    """Tell the user what is happening now, e.g. a download or a start that takes a while."""
    # A closed terminal answers EIO: what the message tells of goes on without it (a hang-up's clean-up,
    # pytest's and then the infrastructure's, must not be cut short by the news of it).
    with contextlib.suppress(OSError):
        print(f"driftloop: {message}", file=sys.stderr, flush=True)
