""".ci/run runs the checks and the tests, and at its end, however `driftloop test` ended, stops what
commands that have ended left running (`infra down --left-behind`; tests/unit/test_cli.py and
test_deploy_leases.py show that this leaves what a running command uses, and a developer's `up`, alone).

The script runs for real on a copy of the checkout whose deploy/local/driftloop is a fake: it notes each
command and can end `test` the way SIGKILL does (nothing of `driftloop test`'s own clean-up ran then).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.local.settings import PROJECT_ROOT

# FAKE_TEST_EXIT: how `test` ends; FAKE_LOG.ci: the CI variable `test` ran with.
DRIFTLOOP = """#!/bin/bash
echo "$*" >>"$FAKE_LOG"
case "$*" in
  test) echo "${CI-unset}" >"$FAKE_LOG.ci"; exit "$FAKE_TEST_EXIT" ;;
esac
"""


def run_ci(tmp_path: Path, *, test_exit: int) -> tuple[int, list[str]]:
    (tmp_path / ".ci").mkdir()
    shutil.copy2(PROJECT_ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    fake = tmp_path / "deploy" / "local" / "driftloop"
    fake.parent.mkdir(parents=True)
    fake.write_text(DRIFTLOOP)
    fake.chmod(0o755)
    log = tmp_path / "log"
    ci = subprocess.run(
        ["bash", str(tmp_path / ".ci" / "run")],
        env={"PATH": "/usr/bin:/bin", "FAKE_LOG": str(log), "FAKE_TEST_EXIT": str(test_exit)},
        capture_output=True,
        timeout=30,
        check=False,
    )
    return ci.returncode, log.read_text().splitlines()


@pytest.mark.parametrize("test_exit", [0, 1, 137])
def test_ci_stops_what_ended_commands_left_running_however_the_tests_ended(
    tmp_path: Path, test_exit: int
) -> None:
    code, done = run_ci(tmp_path, test_exit=test_exit)  # 137: SIGKILLed, no clean-up of its own

    assert done == ["check", "test", "infra down --left-behind"]
    assert code == test_exit


def test_ci_runs_the_tests_with_ci_set_so_a_test_that_did_not_run_fails_them(tmp_path: Path) -> None:
    # tests/strict_outcomes.py: under CI a skipped test, an expected failure or an unexpected pass fails the
    # session; without the variable a skip in CI passed the job.
    run_ci(tmp_path, test_exit=0)

    assert (tmp_path / "log.ci").read_text() == "true\n"
