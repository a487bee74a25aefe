"""The pytest plugin `driftloop test` loads (``-p``): pytest outlives a closing terminal's SIGHUP.

pytest runs in driftloop's process group, so a closing terminal's SIGHUP (the shell's to its jobs, the
kernel's to the foreground group) reaches it as well as driftloop, and would end it on the spot, its
session clean-up (sandbox platforms, databases, topics) skipped. driftloop passes that hang-up on as one
SIGINT; pytest itself takes SIGHUP and does nothing with it. With a handler, not SIG_IGN or a blocked
mask: both are inherited through exec by every process pytest starts (services, Kafka, Postgres), which
would then not end on SIGHUP as they do anywhere else; a handler is reset to the default by exec.

Until the plugin is configured pytest has started nothing, so a hang-up that ends it then leaves nothing
running.
"""

from __future__ import annotations

import signal
from types import FrameType

import pytest

_before: pytest.StashKey[signal._HANDLER] = pytest.StashKey()


def _passed_on_by_driftloop(signum: int, frame: FrameType | None) -> None:
    """driftloop got the same SIGHUP and sends pytest one SIGINT for it."""


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Take SIGHUP, unless it is ignored already (nohup): then what pytest starts ignores it too, as it
    would without driftloop."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        config.stash[_before] = signal.signal(signal.SIGHUP, _passed_on_by_driftloop)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Give SIGHUP back what it had."""
    if _before in config.stash:
        signal.signal(signal.SIGHUP, config.stash[_before])
