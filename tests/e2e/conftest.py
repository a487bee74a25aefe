"""The whole platform as separate processes for end-to-end tests, isolated from everything else.

One platform per test session: its own database, its own topic namespace (a prefix), its own artifact
store, state folder and ports, so it never sees events of other tests and other tests never see its.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from deploy.loop import EventTail, LoopClient
from deploy.sandbox import Sandbox

E2E_PORT_BASE = 18101


@pytest.fixture(scope="session")
async def e2e(
    request: pytest.FixtureRequest,
    kafka_bootstrap: str,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Sandbox]:
    sandbox = Sandbox(kafka_bootstrap, database_url, tmp_path_factory.mktemp("platform"), E2E_PORT_BASE)
    failed_before = request.session.testsfailed
    # A failure keeps the database and topics for a post-mortem.
    async with sandbox.running(keep=lambda: request.session.testsfailed > failed_before):
        yield sandbox


@pytest.fixture
async def client(e2e: Sandbox) -> AsyncIterator[LoopClient]:
    c = LoopClient(e2e.platform)
    yield c
    await c.close()


@pytest.fixture
async def tail(e2e: Sandbox) -> AsyncIterator[EventTail]:
    t = EventTail(e2e.bootstrap, prefix=e2e.prefix)
    await t.start()
    yield t
    await t.stop()


@pytest.fixture
def logs(e2e: Sandbox) -> Iterator[Path]:
    yield e2e.state_dir / "logs"
