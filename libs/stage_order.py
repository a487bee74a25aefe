"""Following the registry's stage changes in its order (``ModelStageChanged.sequence``).

Training (the production version, parent of the next model), validation (the champion) and serving (its
mirror of each version's stage) each keep the last numbered change of a model they applied, in a
``stage_changes_applied`` table of their own schema (their migrations), and compare each change with it
(:func:`contracts.models.stage_change_order`): a change re-sent under a new id after a later one was applied
would set them back.
"""

from __future__ import annotations

from typing import Protocol

import asyncpg

from contracts.common import Stage
from contracts.envelope import CloudEvent
from contracts.models import (
    AppliedStageChange,
    ModelStageChanged,
    StageChangeOrder,
    stage_change_order,
    stale_stage_change,
)
from libs.bus import PermanentError


class StageChangesApplied(Protocol):
    """The last numbered stage change of each model a service applied."""

    async def last_change(self, model: str) -> AppliedStageChange | None:
        """The last numbered stage change of the model applied here, locked until the transaction ends;
        None before the first."""
        ...

    async def keep_change(self, model: str, change: AppliedStageChange) -> None:
        """``change`` is now the last numbered stage change of the model applied here."""
        ...


class PgStageChangesApplied:
    """:class:`StageChangesApplied` on the ``stage_changes_applied`` table of the connection's schema (a
    base of the service's adapter, which holds ``conn``)."""

    conn: asyncpg.Connection

    async def last_change(self, model: str) -> AppliedStageChange | None:
        row = await self.conn.fetchrow(
            """SELECT sequence, version, to_stage, event_id FROM stage_changes_applied WHERE model = $1
               FOR UPDATE""",
            model,
        )
        if row is None:
            return None
        return AppliedStageChange(row["sequence"], row["version"], Stage(row["to_stage"]), row["event_id"])

    async def keep_change(self, model: str, change: AppliedStageChange) -> None:
        await self.conn.execute(
            """INSERT INTO stage_changes_applied (model, sequence, version, to_stage, event_id)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (model) DO UPDATE SET sequence = EXCLUDED.sequence, version = EXCLUDED.version,
                   to_stage = EXCLUDED.to_stage, event_id = EXCLUDED.event_id, applied_at = now()""",
            model,
            change.sequence,
            change.model_version,
            change.to_stage.value,
            change.event_id,
        )


async def take_in_order(event: CloudEvent[ModelStageChanged], applied: StageChangesApplied) -> bool:
    """Whether to apply the change: True for a new one (kept as the last applied when numbered), False for
    the last one applied received again under another id (nothing to do). A stale one (older than the last
    applied, or unnumbered after a numbered one) raises :class:`PermanentError` naming both changes: it is
    dead-lettered."""
    d = event.data
    last = await applied.last_change(d.model)
    order = stage_change_order(d, last)
    if order is StageChangeOrder.REPEAT:
        return False
    if order is StageChangeOrder.STALE:
        assert last is not None
        raise PermanentError(stale_stage_change(event.type, event.id, d, last))
    if (kept := AppliedStageChange.of(d, event.id)) is not None:
        await applied.keep_change(d.model, kept)
    return True
