"""What the audit service's handlers and core need from the world, as Protocols (fakes in unit tests)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

from contracts.audit import AuditCheckpoint
from contracts.envelope import CloudEvent
from services.audit.domain import (
    ChainHead,
    EventQuery,
    HeldAt,
    HeldEvent,
    KafkaPosition,
    NotACheckpoint,
    StoredCheckpoint,
    StoredRow,
    TrailRow,
)
from services.audit.verification import Finding, LinkScanner, RecordScanner

Publish = Callable[[CloudEvent[Any]], Awaitable[None]]
Clock = Callable[[], datetime]
AfterCommit = Callable[[Callable[[], None]], None]
"""Call a callback once the transaction has committed, never if it rolls back
(:meth:`libs.bus.Transaction.after_commit`): for the counts and the head gauge, which must follow only what
the trail holds, though a poll's handler may run more than once for it."""


class TrailWriter(Protocol):
    """The append side of the trail, inside one transaction."""

    async def lock_head(self) -> tuple[ChainHead, StoredCheckpoint | None]:
        """Wait until no other writer holds the chain, keep it until commit, and return its head and the
        newest checkpoint the database holds (untrusted: the head's ``checkpoint_seq`` is left 0 for the
        writer to set to the newest it trusts)."""
        ...

    async def checkpoints_below(self, seq: int, *, limit: int) -> list[StoredCheckpoint]:
        """The newest ``limit`` checkpoints of a sequence below ``seq``, newest first, in this transaction:
        where a writer looks for one it trusts when the newest is not."""
        ...

    async def partition_ends(self, partitions: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The highest Kafka offset the trail holds in each of these (topic, partition) pairs, -1 for
        none."""
        ...

    async def held_at(self, positions: Sequence[KafkaPosition]) -> dict[KafkaPosition, HeldAt]:
        """What the trail holds at these Kafka positions (those it holds nothing at are left out)."""
        ...

    async def held_events(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[HeldEvent]]:
        """The headers and the SHA-256 of the value of each row already holding one of these (topic, event id)
        pairs."""
        ...

    async def append(self, rows: Iterable[TrailRow]) -> None:
        """Write rows that directly follow the head returned by :meth:`lock_head`. ``rows`` may be built
        as they are taken, so the first can be on their way while the next are made."""
        ...

    async def add_checkpoint(self, checkpoint: AuditCheckpoint, event_id: str) -> bool:
        """Keep a signed checkpoint with the id of the event that announces it; False (nothing kept) when its
        sequence holds a checkpoint already, one this writer did not sign (written in the database)."""
        ...

    def seals(self, after: int, upto: int) -> AsyncGenerator[list[tuple[int, bytes, bytes]], None]:
        """(seq, row_hash, seal) of rows after..upto in order, in batches, in this transaction: what a
        writer checks before a checkpoint vouches for rows it did not append itself."""
        ...


class TrailReader(Protocol):
    """Queries on the trail."""

    async def head(self) -> ChainHead:
        """The last row."""
        ...

    async def find(self, query: EventQuery, *, budget: int) -> tuple[list[StoredRow], bool]:
        """Rows matching the query, in its order, at most ``query.limit`` and as many as start before their
        records' sizes add up to ``budget`` bytes (the first always), and whether rows after those were
        left out for the budget."""
        ...

    async def row(self, seq: int) -> StoredRow | None:
        """One row by sequence number."""
        ...

    async def cascade(self, correlation_id: str, *, limit: int, budget: int) -> tuple[list[StoredRow], bool]:
        """Rows of one correlation id in trail order, at most ``limit`` and as many as start before their
        records' sizes add up to ``budget`` bytes (the first always), and whether rows after those were
        left out for the budget."""
        ...

    async def checkpoints(
        self, *, limit: int | None = None, after: int = 0, upto: int | None = None, page: int | None = None
    ) -> list[AuditCheckpoint]:
        """Signed checkpoints, newest first when limited, else those of ``after+1 .. upto`` (no ``upto``:
        every one after ``after``) in sequence order, the first ``page`` of them when paged."""
        ...

    def export_rows(self, after: int, upto: int) -> AsyncIterator[list[tuple[int, bytes, bytes]]]:
        """(seq, record, row_hash) of rows after..upto in order, in batches, from one consistent snapshot."""
        ...


class ChainSource(Protocol):
    """What verification reads; each scan may run on its own connection, at the same time as others."""

    async def head_seq(self) -> int:
        """The highest sequence number (0: empty)."""
        ...

    async def row_hashes(self, seqs: Sequence[int]) -> dict[int, bytes]:
        """Row hashes at these sequence numbers (absent rows are left out; a hash nulled in the database
        comes back as None)."""
        ...

    async def scan_links(self, scanner: LinkScanner) -> Finding | None:
        """Feed the scanner the chain links of its range, then finish it."""
        ...

    async def scan_rows(self, scanner: RecordScanner) -> Finding | None:
        """Feed the scanner whole rows of its range, then finish it."""
        ...

    def seals(self, after: int, upto: int) -> AsyncGenerator[list[tuple[int, bytes, bytes]], None]:
        """(seq, row_hash, seal) of rows after..upto in order, in batches."""
        ...

    async def newest_checkpoint(self) -> int:
        """The highest sequence the database holds a checkpoint of (0: none)."""
        ...

    async def checkpoints(
        self, *, after: int, upto: int | None, page: int | None = None
    ) -> Sequence[AuditCheckpoint | NotACheckpoint]:
        """The checkpoints the database holds for rows ``after+1 .. upto`` (no ``upto``: every one after
        ``after``, beyond the last row too), in sequence order; the first ``page`` of them when paged. A row
        that is not a checkpoint comes as one that is not, for the verification to name."""
        ...


class CheckpointArchive(Protocol):
    """The copy of the checkpoints outside the database."""

    def read(
        self, *, after: int = 0, upto: int | None = None, page: int | None = None
    ) -> list[AuditCheckpoint]:
        """The checkpoints in the archive for rows ``after+1 .. upto`` (default: every one); the ``page``
        of the lowest sequences when paged (more when the last sequence has several: a page never splits
        one), in sequence order."""
        ...

    def last_sequence(self) -> int:
        """The highest sequence in the archive (0: none)."""
        ...

    def append(self, checkpoints: Sequence[AuditCheckpoint]) -> int:
        """Add the checkpoints newer than the archive's newest; returns how many were added."""
        ...
