"""The checkpoint keeper signs on its timer and copies checkpoints to the export file on every tick, the two
apart: checkpoints the consumer signed (every N rows) reach the file even while the keeper's own signing
fails, and a failure of either is retried on the next tick instead of ending the keeper."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from services.audit.bootstrap import CheckpointKeeper
from services.audit.settings import AuditSettings


class Keeper(CheckpointKeeper):
    """The keeper's loop with its two database steps replaced: signing fails, archiving is counted."""

    def __init__(self, tmp_path: Path, *, seal_fails: bool) -> None:
        settings = AuditSettings(checkpoint_every_s=0.01, checkpoint_file=tmp_path / "checkpoints.ndjson")
        super().__init__(rt=None, settings=settings, signer=None, archive=None, trust=None)  # type: ignore[arg-type]
        self.seal_fails = seal_fails
        self.sealed = 0
        self.archived = 0
        self.archived_enough = asyncio.Event()

    async def _seal(self) -> None:
        self.sealed += 1
        if self.seal_fails:
            raise ConnectionError("connection was closed in the middle of operation")

    async def _archive(self) -> None:
        self.archived += 1
        if self.archived == 1:
            raise OSError("No space left on device")  # once: the keeper goes on
        if self.archived >= 3:
            self.archived_enough.set()


async def run_until_archived(keeper: Keeper) -> Any:
    task = asyncio.create_task(keeper.run())
    try:
        await asyncio.wait_for(keeper.archived_enough.wait(), timeout=30)
    finally:
        keeper._stop.set()
        await asyncio.wait_for(task, timeout=30)


async def test_checkpoints_reach_the_file_while_signing_fails(tmp_path: Path) -> None:
    keeper = Keeper(tmp_path, seal_fails=True)
    await run_until_archived(keeper)
    assert keeper.sealed >= 2 and keeper.archived >= 3


async def test_signing_goes_on_after_archiving_failed(tmp_path: Path) -> None:
    keeper = Keeper(tmp_path, seal_fails=False)
    await run_until_archived(keeper)
    assert keeper.sealed >= 2


def keeper_failures(step: str) -> float:
    labels = {"step": step}
    return REGISTRY.get_sample_value("driftloop_audit_checkpoint_keeper_failures_total", labels) or 0.0


async def test_each_failed_step_is_counted_by_its_name(tmp_path: Path) -> None:
    # An operator alerts on a keeper that keeps failing by this count: the log alone said only "retrying".
    sign, archive = keeper_failures("sign"), keeper_failures("archive")
    keeper = Keeper(tmp_path, seal_fails=True)
    await run_until_archived(keeper)
    assert keeper_failures("sign") - sign == keeper.sealed >= 2
    assert keeper_failures("archive") - archive == 1  # the first archive only
