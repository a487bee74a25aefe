"""Progress messages: one prefix, on stderr, so stdout stays clean for tables and pipes."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """Tell the user what is happening now, e.g. a download or a start that takes a while."""
    print(f"driftloop: {message}", file=sys.stderr, flush=True)
