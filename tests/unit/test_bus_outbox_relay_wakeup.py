"""The outbox relay wakes for every commit: a row committed while the relay looks at the outbox is sent at
once, not after its idle wait (architecture.md, "Exactly-once effects" 4)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from libs.bus.postgres import OutboxRelay
from tests.waiting import eventually


class CommitDuringLookup:
    """A service's schema, as the relay's connection sees it: an outbox that a transaction commits a row
    to (and NOTIFYs, as ``PgTransaction.flush`` does) right after the relay's first look at it, so the
    look found nothing and the NOTIFY arrives before the relay goes idle."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.listeners: list[Callable[..., None]] = []
        self.looks = 0

    def commit_a_row(self) -> None:
        self.rows.append(
            {"seq": 1, "topic": "mlops.models", "key": b"churn", "value": b"{}", "headers": [], "sent": False}
        )
        for notify in self.listeners:
            notify(self, 0, "driftloop_outbox_registry", "")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        yield

    async def add_listener(self, channel: str, callback: Callable[..., None]) -> None:
        self.listeners.append(callback)

    async def remove_listener(self, channel: str, callback: Callable[..., None]) -> None:
        self.listeners.remove(callback)

    def is_closed(self) -> bool:
        return False

    async def fetchval(self, sql: str, *args: Any) -> Any:
        if "pg_try_advisory_xact_lock" in sql:
            return True
        return sum(1 for r in self.rows if not r["sent"])  # the backlog's count

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        unsent = [r for r in self.rows if not r["sent"]]
        self.looks += 1
        if self.looks == 1:
            self.commit_a_row()  # after the relay's snapshot: it does not see the row this time
        return unsent

    async def execute(self, sql: str, seqs: list[int]) -> None:
        for r in self.rows:
            if r["seq"] in seqs:
                r["sent"] = True


class _Acquired:
    """What asyncpg's ``pool.acquire()`` returns: awaited, a connection; in ``async with``, one too."""

    def __init__(self, conn: CommitDuringLookup) -> None:
        self.conn = conn

    def __await__(self) -> Generator[Any, None, CommitDuringLookup]:
        return self._get().__await__()

    async def _get(self) -> CommitDuringLookup:
        return self.conn

    async def __aenter__(self) -> CommitDuringLookup:
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Pool:
    def __init__(self, conn: CommitDuringLookup) -> None:
        self.conn = conn

    def acquire(self) -> _Acquired:
        return _Acquired(self.conn)

    async def release(self, conn: CommitDuringLookup) -> None:
        return None


class Broker:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None]] = []

    async def send_many(self, items: Sequence[tuple[str, bytes | None, bytes | None, Any]]) -> None:
        self.sent += [(topic, value) for topic, _, value, _ in items]


async def test_a_row_committed_while_the_relay_looks_is_sent_without_waiting_for_the_idle_interval() -> None:
    outbox, broker = CommitDuringLookup(), Broker()
    # Idle for an hour: only the NOTIFY can make the relay look again within the test's deadline.
    relay = OutboxRelay(_Pool(outbox), "registry", broker, idle_s=3600)

    async def sent() -> bool:
        return broker.sent == [("mlops.models", b"{}")]

    running = asyncio.create_task(relay.run())
    try:
        await eventually(sent, deadline_s=5.0, interval_s=0.01)
    finally:
        relay.stop()
        await asyncio.wait_for(running, timeout=5.0)
