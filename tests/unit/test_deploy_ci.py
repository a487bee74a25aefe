""".ci/run stops, at the end, only what CI started: a developer's own running infrastructure stays up.

The script runs for real on a copy of the checkout whose deploy/local/driftloop is a fake: it notes each
command, prints the status table of the infrastructure it is told was running, and can end `test` the way
SIGKILL does (nothing of `driftloop test`'s own clean-up ran then).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from deploy.local.settings import PROJECT_ROOT

# FAKE_RUNNING: the state of both components (`stopped` or `ready`); FAKE_TEST_EXIT: how `test` ends.
DRIFTLOOP = """#!/bin/bash
echo "$*" >>"$FAKE_LOG"
case "$*" in
  "infra status")
    echo " component │ state   │ pid │ address         │ detail"
    echo " kafka     │ $FAKE_RUNNING │ -   │ 127.0.0.1:19092 │"
    echo " postgres  │ $FAKE_RUNNING │ -   │ 127.0.0.1:54329 │"
    [ "$FAKE_RUNNING" = ready ] ;;
  test) exit "$FAKE_TEST_EXIT" ;;
esac
"""


def run_ci(tmp_path: Path, *, running_before: str, test_exit: int) -> list[str]:
    (tmp_path / ".ci").mkdir()
    shutil.copy2(PROJECT_ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    fake = tmp_path / "deploy" / "local" / "driftloop"
    fake.parent.mkdir(parents=True)
    fake.write_text(DRIFTLOOP)
    fake.chmod(0o755)
    log = tmp_path / "log"
    subprocess.run(
        ["bash", str(tmp_path / ".ci" / "run")],
        env={
            "PATH": "/usr/bin:/bin",
            "FAKE_LOG": str(log),
            "FAKE_RUNNING": running_before,
            "FAKE_TEST_EXIT": str(test_exit),
        },
        capture_output=True,
        timeout=30,
        check=False,
    )
    return log.read_text().splitlines()


@pytest.mark.parametrize("test_exit", [0, 1, 137])
def test_ci_leaves_infrastructure_that_ran_before_it_alone(tmp_path: Path, test_exit: int) -> None:
    assert run_ci(tmp_path, running_before="ready", test_exit=test_exit) == ["infra status", "check", "test"]


def test_ci_stops_the_infrastructure_it_started_when_the_tests_could_not(tmp_path: Path) -> None:
    done = run_ci(tmp_path, running_before="stopped", test_exit=137)  # SIGKILLed: no clean-up of its own

    assert done == ["infra status", "check", "test", "infra down"]
