"""A whole platform for fault injection, on the project's own local broker and Postgres (it restarts them).

The platform is a sandbox (its own database, topic prefix, artifacts and ports) so it shares the
infrastructure with everything else; the broker and Postgres restarts are not isolated, which is why this
suite insists on the local infrastructure it can restart, and leaves both up and answering when it ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from deploy.local.infra import LocalInfra
from deploy.sandbox import FAST_LOOP_SETTINGS, Sandbox

CHAOS_PORT_BASE = 18201

# The same rules as production, with the clocks a test can wait for: a job whose worker was killed is
# taken over after 10 s instead of 30, and the runner looks for such jobs every 2 s instead of 5. A job
# whose workers are killed again and again still fails for good, after 5 runs instead of 3: with kills
# every few seconds a run of a few seconds is hit more often than any production worker would be.
CHAOS_SETTINGS = {
    **FAST_LOOP_SETTINGS,
    "DRIFTLOOP_TRAINING_STALE_AFTER_S": "10",
    "DRIFTLOOP_TRAINING_RUNNER_POLL_S": "2",
    "DRIFTLOOP_TRAINING_MAX_ATTEMPTS": "5",
}


@pytest.fixture(scope="session")
def local_infra(kafka_bootstrap: str, database_url: str) -> Iterator[LocalInfra]:
    """The project's local broker and Postgres, which these tests may restart; a clear failure otherwise."""
    infra = LocalInfra()
    problems = []
    if kafka_bootstrap != infra.broker.bootstrap or infra.broker.running_pid() is None:
        problems.append(f"the broker {kafka_bootstrap} is not the local one ({infra.broker.bootstrap})")
    if database_url != infra.postgres.url or infra.postgres.running_pid() is None:
        problems.append(f"the database {database_url} is not the local cluster ({infra.postgres.url})")
    if problems:
        pytest.fail(
            "the fault-injection tests restart the broker and Postgres, so they run only on the project's "
            f"own local infrastructure (deploy/local): {'; '.join(problems)}. Run them with "
            "`deploy/local/driftloop test tests/chaos`, with DRIFTLOOP_LOCAL_* settings for a private "
            "broker and cluster if others use the default ones.",
            pytrace=False,
        )
    try:
        yield infra
    finally:
        # Whatever happened, the tests after these find the broker and Postgres up and answering.
        infra.up()


@pytest.fixture
async def chaos_platform(
    request: pytest.FixtureRequest, local_infra: LocalInfra, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Sandbox]:
    failed_before = request.session.testsfailed
    sandbox = Sandbox(
        local_infra.broker.bootstrap,
        local_infra.postgres.url,
        tmp_path_factory.mktemp("chaos-platform"),
        CHAOS_PORT_BASE,
        settings=CHAOS_SETTINGS,
    )
    # A failure keeps the database and topics for a post-mortem.
    async with sandbox.running(keep=lambda: request.session.testsfailed > failed_before):
        yield sandbox
