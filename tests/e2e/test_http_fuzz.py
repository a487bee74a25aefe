"""Hostile HTTP input against every service of the running platform: no request may get a 5xx.

Schemathesis reads each service's OpenAPI document and sends what it describes and what it does not:
boundary values (integers past any column's range, empty and huge strings), arbitrary Unicode and NUL
characters, bodies that are not JSON or not UTF-8. Each service must answer every one of them with a
4xx that says what was wrong (or a success), never a server error. The seed is fixed, so a failure
reproduces; the command it prints (`st replay ...` is not kept) shows the request.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.sandbox import Sandbox

SEED = 20261129
EXAMPLES = 25
"""Per operation and phase: about 1,500 requests over the six services."""


@pytest.mark.parametrize(
    ("service", "token"),
    [
        ("registry", "dev-admin"),
        ("training", "dev-admin"),
        ("validation", "dev-admin"),
        ("serving", "dev-admin"),
        ("serving", "dev-predict"),  # the predict routes refuse every other role before reading
        ("monitoring", "dev-admin"),
        ("audit", "dev-admin"),
    ],
)
def test_no_request_gets_a_server_error(e2e: Sandbox, tmp_path: Path, service: str, token: str) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli is not None, "schemathesis is a dev dependency (requirements.lock)"
    url = f"{e2e.platform.url(service)}/openapi.json"
    run = subprocess.run(
        [
            cli,
            "run",
            url,
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {token}",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            str(EXAMPLES),
            "--seed",
            str(SEED),
            "--workers",
            "1",
            "--generation-database",
            "none",
            "--no-color",
            "--warnings",
            "off",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"{service} answered with a server error:\n{run.stdout[-6000:]}\n{run.stderr}"
