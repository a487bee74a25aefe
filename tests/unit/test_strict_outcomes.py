"""A test that did not run fails the session under CI (tests/strict_outcomes.py), and is listed elsewhere.

Each case runs a pytest of its own, with the hooks loaded as tests/conftest.py loads them, on a file of tests
that skip, expect a failure or pass unexpectedly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.local.settings import PROJECT_ROOT

NOT_RUN = {
    "skipped": "import pytest\n\ndef test_needs_a_device():\n    pytest.skip('no such device here')\n",
    "skipif": "import pytest\n\n@pytest.mark.skipif(True, reason='not as root')\ndef test_x():\n    pass\n",
    "importorskip": "import pytest\n\ndef test_x():\n    pytest.importorskip('no_such_module_here')\n",
    "xfail": "import pytest\n\n@pytest.mark.xfail(reason='known bug')\ndef test_x():\n    assert False\n",
    "xpass": "import pytest\n\n@pytest.mark.xfail(reason='known bug')\ndef test_x():\n    pass\n",
    "fixture-skips": "import pytest\n\n@pytest.fixture\ndef dev():\n    pytest.skip('no dev')\n\n"
    "def test_x(dev):\n    pass\n",
}


def session(tmp_path: Path, body: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_case.py").write_text("def test_that_runs():\n    assert True\n\n" + body)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.strict_outcomes", "-p", "no:cacheprovider", "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("kind", list(NOT_RUN))
def test_a_test_that_did_not_run_fails_the_session_under_ci(tmp_path: Path, kind: str) -> None:
    ran = session(tmp_path, NOT_RUN[kind], ci="true")

    assert ran.returncode == pytest.ExitCode.TESTS_FAILED, ran.stdout + ran.stderr
    assert "1 tests did not run: a failure under CI" in ran.stdout, ran.stdout
    assert "test_case.py::test_" in ran.stdout.split("did not run", 1)[1]


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_outside_ci_a_test_that_did_not_run_is_listed_and_the_session_passes(
    tmp_path: Path, ci: str | None
) -> None:
    ran = session(tmp_path, NOT_RUN["skipped"], ci=ci)

    assert ran.returncode == pytest.ExitCode.OK, ran.stdout + ran.stderr
    assert "1 tests did not run (a failure under CI=true, as in .ci/run)" in ran.stdout
    assert "test_case.py::test_needs_a_device (skip: no such device here)" in ran.stdout


def test_under_ci_a_session_where_every_test_ran_passes(tmp_path: Path) -> None:
    ran = session(tmp_path, "", ci="true")

    assert ran.returncode == pytest.ExitCode.OK, ran.stdout + ran.stderr
    assert "did not run" not in ran.stdout


def test_a_failing_session_keeps_its_own_exit_code_under_ci(tmp_path: Path) -> None:
    ran = session(tmp_path, NOT_RUN["skipped"] + "\ndef test_broken():\n    assert False\n", ci="true")

    assert ran.returncode == pytest.ExitCode.TESTS_FAILED, ran.stdout + ran.stderr


def test_the_suite_loads_the_hooks(pytestconfig: pytest.Config) -> None:
    # This session's own hooks (tests/conftest.py loads them); .ci/run sets CI: tests/unit/test_deploy_ci.py.
    finish = pytestconfig.pluginmanager.hook.pytest_sessionfinish.get_hookimpls()
    assert any(impl.function.__module__ == "tests.strict_outcomes" for impl in finish)
