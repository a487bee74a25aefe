"""Hostile HTTP input against every service of the running platform: no request may get a 5xx.

Schemathesis reads each service's OpenAPI document and sends what it describes and what it does not:
boundary values (integers past any column's range, empty and huge strings), arbitrary Unicode and NUL
characters, bodies that are not JSON or not UTF-8. Each service must answer every one of them with a
4xx that says what was wrong (or a success), never a server error. The seed is fixed, so a failure
reproduces; the report prints the request as a curl command.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.loop import EventTail, LoopClient
from deploy.sandbox import Sandbox
from tests.e2e.steps import serve_version_1

SEED = 20261129
EXAMPLES = 25
"""Test cases per operation and phase."""


def fuzz(url: str, token: str, workdir: Path, only: str | None = None) -> subprocess.CompletedProcess[str]:
    """Schemathesis against one service, or its paths matching ``only`` (a ``schemathesis.toml`` in
    ``workdir`` applies); the requests and answers go to ``workdir/requests.har``."""
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli is not None, "schemathesis is a dev dependency (requirements.lock)"
    command = [
        cli,
        "run",
        f"{url}/openapi.json",
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
    ]
    if only is not None:
        command += ["--include-path-regex", only]
    command += ["--report", "har", "--report-har-path", str(workdir / "requests.har")]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("service", ["registry", "training", "validation", "serving", "monitoring", "audit"])
def test_no_request_gets_a_server_error(e2e: Sandbox, tmp_path: Path, service: str) -> None:
    run = fuzz(e2e.platform.url(service), "dev-admin", tmp_path)
    assert run.returncode == 0, f"{service} answered with a server error:\n{run.stdout[-6000:]}\n{run.stderr}"


async def test_the_predict_routes_of_a_served_model_answer_hostile_bodies_with_4xx(
    e2e: Sandbox, client: LoopClient, tail: EventTail, tmp_path: Path
) -> None:
    # With a model that serves, the requests get past the route's look-up to the body's reading and the
    # checks against the signature; the predict routes refuse every role but predict before that.
    model = await serve_version_1(client, tail)
    (tmp_path / "schemathesis.toml").write_text(f'[parameters]\nname = "{model}"\n')
    run = await asyncio.to_thread(
        fuzz, e2e.platform.url("serving"), "dev-predict", tmp_path, "/(predict|infer|feedback)$"
    )
    assert run.returncode == 0, f"serving answered with a server error:\n{run.stdout[-6000:]}\n{run.stderr}"
    # The requests reached the model's routes (a name it does not serve would be a 404 each time).
    entries = json.loads((tmp_path / "requests.har").read_text())["log"]["entries"]
    statuses = {
        e["response"]["status"] for e in entries if f"/v1/models/{model}/predict" in e["request"]["url"]
    }
    assert 422 in statuses, statuses
