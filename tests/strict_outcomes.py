"""Under CI (the ``CI`` environment variable set, as `.ci/run` does), a test that did not run is a failure.

pytest counts a skipped test (``pytest.skip``, ``skipif``, ``importorskip``), an expected failure and an
unexpected pass as a success of the session: a test skipped in CI for a missing package or a missing device
passed the job without its check ever having been made. On a developer's machine they stay what pytest makes
them (a test may need root) and are listed at the end; in CI the session fails, naming each. tests/conftest.py
loads these hooks; tests/unit/test_strict_outcomes.py runs them in a pytest session of their own.
"""

from __future__ import annotations

import os

import pytest

CI_ENV = "CI"

# The tests of this session that did not run as written, one line each (a hook's report carries no session).
_not_run: list[str] = []


def in_ci() -> bool:
    """Whether the ``CI`` variable is set to anything but empty, 0, false or no."""
    return os.environ.get(CI_ENV, "").strip().lower() not in ("", "0", "false", "no")


def pytest_sessionstart(session: pytest.Session) -> None:
    _not_run.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Note a test skipped in any phase, an expected failure, and an unexpected pass."""
    if hasattr(report, "wasxfail"):
        kind = "xfail" if report.skipped else "xpass"
        _not_run.append(f"{report.nodeid} ({kind}: {report.wasxfail or 'no reason given'})")
    elif report.skipped:
        longrepr = report.longrepr
        reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
        _not_run.append(f"{report.nodeid} (skip: {reason.removeprefix('Skipped: ')})")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI, a session whose tests passed but where some did not run exits as failed."""
    if _not_run and in_ci() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _not_run:
        return
    if in_ci():
        title = f"{len(_not_run)} tests did not run: a failure under {CI_ENV}, where every test runs"
    else:
        title = f"{len(_not_run)} tests did not run (a failure under {CI_ENV}=true, as in .ci/run)"
    terminalreporter.section(title, red=in_ci(), yellow=not in_ci())
    for line in _not_run:
        terminalreporter.line(line)
