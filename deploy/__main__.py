"""`python -m deploy ...` is the `driftloop` command, for places without the console script (containers); the
console script runs :func:`run` too."""

from __future__ import annotations

from deploy.local.console import say


def run() -> int:
    """The `driftloop` command: deploy.cli's main, imported here, so that a Ctrl-C while its modules load
    (a second or more) ends the command quietly with 130, as one during the command does: no traceback."""
    try:
        from deploy.cli import main
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    return main()


if __name__ == "__main__":
    raise SystemExit(run())
