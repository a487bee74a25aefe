"""Fixtures shared by the unit tests."""

from __future__ import annotations

import gc
import json
import subprocess
from collections.abc import Iterator

import pytest

from libs.settings import DEV_ALLOWED_HOSTS

TEST_HOSTS = ("t", "testserver")
"""The host names the unit tests' clients call an app by (httpx's ``base_url="http://t"``, Starlette's
TestClient): allowed here, next to the default, never in the product's default."""


@pytest.fixture(autouse=True)
def test_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every app a unit test builds answers for :data:`TEST_HOSTS` too (tests/unit/test_http_hosts.py
    checks the defaults themselves)."""
    monkeypatch.setenv("DRIFTLOOP_ALLOWED_HOSTS", json.dumps([*DEV_ALLOWED_HOSTS, *TEST_HOSTS]))


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Throwaway processes a test starts; all killed at its end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def restored_collector() -> Iterator[None]:
    """The garbage collector's thresholds and frozen objects as they were, after a test that tunes it
    (``libs.service.tune_collector``)."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
