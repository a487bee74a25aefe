"""Stand-ins shared by the bus's unit tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from contracts.envelope import CloudEvent
from libs.bus import Claim
from libs.bus.core import InboxEntry


class NullTransaction:
    """A transaction that keeps nothing: every event is new to the inbox, what is published goes nowhere.
    For tests about what the runner and the dispatcher do with records, not about effects."""

    conn = None

    async def publish(self, event: CloudEvent[Any]) -> None:
        return None

    def after_commit(self, callback: Callable[[], None]) -> None:
        callback()

    async def claim(self, consumer: str, items: Sequence[InboxEntry]) -> list[Claim]:
        return [Claim.NEW for _ in items]


class RecordingConn:
    """An asyncpg connection that records the statements it is given and their arguments, and answers none
    of them."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.arguments: list[tuple[Any, ...]] = []

    async def execute(self, sql: str, *args: Any) -> str:
        self.statements.append(sql)
        self.arguments.append(args)
        return "OK"
