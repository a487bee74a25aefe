"""Where the real broker and database come from, for every test level that needs them.

In this order: DRIFTLOOP_KAFKA_BOOTSTRAP / DRIFTLOOP_DATABASE_URL from the environment (what
`driftloop test` sets); else the project's own local infrastructure (deploy.local), started once per
session under a lease and stopped at its end unless another command still uses it (see
deploy/local/leases.py); else testcontainers when a Docker engine
answers. Tests under tests/integration, tests/e2e and tests/chaos are marked by their folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.local.broker import create_platform_topics, delete_topics
from deploy.local.errors import InfraError
from deploy.local.infra import DATABASE_ENV, KAFKA_ENV, InfraLease, LocalInfra
from deploy.local.postgres import drop_schemas
from libs.bus.kafka import KafkaPublisher
from libs.settings import KafkaSettings
from tests.integration.kafka_tools import made_by_this_session
from tests.strict_outcomes import (  # noqa: F401  (hooks: under CI a test that did not run fails)
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_sessionstart,
    pytest_terminal_summary,
)

TESTS = Path(__file__).resolve().parent
LEVEL_MARKERS = {
    "integration": pytest.mark.integration,
    "e2e": pytest.mark.e2e,
    "chaos": pytest.mark.chaos,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by folder, so `-m "not integration"` runs the unit tests alone."""
    for item in items:
        with contextlib.suppress(ValueError):
            level = item.path.resolve().relative_to(TESTS).parts[0]
            if level in LEVEL_MARKERS:
                item.add_marker(LEVEL_MARKERS[level])


def docker_engine_answers() -> bool:
    """True when a Docker engine is reachable (`docker info` succeeds)."""
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


class TestBackends:
    """Finds (and, if it must, starts) the broker and the database once per session."""

    __test__ = False  # a helper class, not a test case

    def __init__(self) -> None:
        self.infra = LocalInfra()
        self.lease: InfraLease | None = None
        self.containers: list[Any] = []
        self.local_errors: dict[str, InfraError] = {}

    def _local(self, component: str) -> str | None:
        try:
            if self.lease is None:
                self.lease = self.infra.lease("pytest (tests/conftest.py)")
            result = self.lease.up((component,))
        except InfraError as err:
            self.local_errors[component] = err
            return None
        return result.kafka_bootstrap if component == "kafka" else result.database_url

    def _nothing_found(self, component: str, variable: str) -> None:
        err = self.local_errors.get(component)
        reason = f"{err.message} ({err.hint})" if err else "unknown reason"
        pytest.fail(
            f"no {component} for the tests: {variable} is not set, the local infrastructure could not start "
            f"({reason}), and no Docker engine answers for testcontainers.",
            pytrace=False,
        )

    def kafka_bootstrap(self) -> str:
        """Bootstrap servers of a broker that has the platform topics."""
        if bootstrap := os.environ.get(KAFKA_ENV):
            return bootstrap
        if bootstrap := self._local("kafka"):
            return bootstrap
        if docker_engine_answers():
            from testcontainers.community.kafka import KafkaContainer

            container = KafkaContainer().with_kraft().start()
            self.containers.append(container)
            bootstrap = container.get_bootstrap_server()
            create_platform_topics(bootstrap)
            return bootstrap
        self._nothing_found("kafka", KAFKA_ENV)
        raise AssertionError("unreachable")

    def database_url(self) -> str:
        """URL of a Postgres database the tests may create schemas in."""
        if url := os.environ.get(DATABASE_ENV):
            return url
        if url := self._local("postgres"):
            return url
        if docker_engine_answers():
            from testcontainers.community.postgres import PostgresContainer

            container = PostgresContainer(
                "postgres:16", username="driftloop", password="driftloop", dbname="driftloop", driver=None
            ).start()
            self.containers.append(container)
            return str(container.get_connection_url())
        self._nothing_found("postgres", DATABASE_ENV)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Stop what this session started, unless another command still uses it, and nothing else."""
        for container in reversed(self.containers):
            container.stop()
        if self.lease is not None:
            self.lease.end(platform=None)


@pytest.fixture(scope="session")
def test_backends() -> Iterator[TestBackends]:
    """The session's source of broker and database; cleans up what it started."""
    backends = TestBackends()
    try:
        yield backends
    finally:
        backends.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(test_backends: TestBackends) -> Iterator[str]:
    """Bootstrap servers of the real broker, with the platform topics created; at the end of the session,
    the topics its tests made are deleted."""
    bootstrap = test_backends.kafka_bootstrap()
    yield bootstrap
    with _reported("delete the session's topics"):
        delete_topics(bootstrap, made_by_this_session)


@pytest.fixture
async def publisher(kafka_bootstrap: str) -> AsyncIterator[KafkaPublisher]:
    """A started publisher to the real broker."""
    p = KafkaPublisher(KafkaSettings(bootstrap=kafka_bootstrap))
    await p.start()
    yield p
    await p.stop()


@pytest.fixture(scope="session")
def database_url(test_backends: TestBackends) -> Iterator[str]:
    """URL of the real Postgres database; at the end of the session, the schemas its tests made are
    dropped."""
    url = test_backends.database_url()
    yield url
    with _reported("drop the session's schemas"):
        drop_schemas(url, made_by_this_session)


@contextlib.contextmanager
def _reported(what: str) -> Iterator[None]:
    """Clean-up that fails is a warning in the session's summary, not a failed test."""
    try:
        yield
    except Exception as exc:
        warnings.warn(f"could not {what}: {exc!r}", stacklevel=1)
