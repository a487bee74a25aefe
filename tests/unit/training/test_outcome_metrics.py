"""Training's jobs are counted by outcome, and timed, once the outcome commits: recording a completion is
tried again after an outage, and the try that was rolled back counts nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY

from contracts.envelope import CloudEvent
from contracts.training import TrainingCompleted, TrainingFailed
from tests.unit.training.data import churn_frame, churn_spec
from tests.unit.training.fakes import Harness
from tests.unit.training.test_handlers import drift, register, requested_job, upload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    h = Harness(str(tmp_path / "artifacts"))
    h.runner.retry_first_s = 0.0
    return h


def jobs(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("driftloop_training_jobs_total", {"model": "churn", "outcome": outcome})
        or 0.0
    )


def timed(outcome: str) -> float:
    labels = {"model": "churn", "outcome": outcome}
    return REGISTRY.get_sample_value("driftloop_training_job_duration_seconds_count", labels) or 0.0


def commit_of_completion_fails_once(harness: Harness) -> list[bool]:
    """The first transaction that publishes a TrainingCompleted fails at its commit (Postgres away); the list
    returned is empty once it has."""
    begin, failing = harness.runner.begin, [True]

    @asynccontextmanager
    async def flaky() -> AsyncIterator[Any]:
        async with begin() as tx:
            yield tx
            published: list[CloudEvent[Any]] = cast(Any, tx).published  # the harness's transaction
            if failing and any(isinstance(e.data, TrainingCompleted) for e in published):
                failing.clear()
                raise ConnectionError("connection was closed in the middle of operation")

    harness.runner.begin = flaky
    return failing


async def test_a_completed_job_is_counted_and_timed_once_though_its_first_commit_failed(
    harness: Harness,
) -> None:
    await requested_job(harness)
    failing = commit_of_completion_fails_once(harness)
    completed, seconds = jobs("completed"), timed("completed")

    assert await harness.runner.run_once()
    await harness.bus.drain()

    assert not failing  # the first commit failed, and recording the outcome was tried again
    assert len(harness.events(TrainingCompleted)) == 1
    assert jobs("completed") == completed + 1
    assert timed("completed") == seconds + 1


async def test_a_failed_job_is_counted_by_its_reason_and_timed_as_failed(harness: Harness) -> None:
    await upload(harness, "churn-base", churn_frame(20))
    await register(harness, churn_spec())
    await harness.bus.publish(drift(harness, "churn"))
    too_small, seconds = jobs("dataset-too-small"), timed("failed")

    await harness.run_jobs()

    [failed] = harness.events(TrainingFailed)
    assert failed.data.reason.value == "dataset-too-small"
    assert jobs("dataset-too-small") == too_small + 1
    assert timed("failed") == seconds + 1
