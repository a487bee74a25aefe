"""Training's pure logic: the retrain policy's decision and the rules of a job's life. No I/O here."""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import orjson

from contracts.common import ID_MAX_CHARS, ModelSignature
from contracts.training import SkipReason, TrainingTrigger
from libs.cursors import (
    cursor_not_valid,
    cursor_of_another_list,
    cursor_position,
    cursor_time,
    encode_cursor,
)
from libs.errors import shown
from libs.modelspec import CATEGORIES_KEPT_MAX, CATEGORY_KEPT_MAX_CHARS, RetrainPolicy

BUDGET_WINDOW = timedelta(hours=24)

AUTOMATIC = frozenset(
    {
        TrainingTrigger.DRIFT_DETECTED,
        TrainingTrigger.PERFORMANCE_DEGRADED,
        TrainingTrigger.DATASET_REGISTERED,
    }
)


class JobState(StrEnum):
    """Where a training job is: requested -> running -> completed | failed (running again on resume)."""

    REQUESTED = "requested"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class PolicyState:
    """What the policy needs to know about a model's jobs."""

    in_flight_job_id: str | None = None
    last_completed_at: datetime | None = None
    jobs_last_24h: int = 0
    oldest_job_last_24h_at: datetime | None = None


@dataclass(frozen=True)
class Trigger:
    """What asks for a retrain, with what the policy weighs."""

    kind: TrainingTrigger
    ignore_cooldown: bool = False
    labelled_rows: int | None = None


@dataclass(frozen=True)
class Decision:
    """The policy's answer: accept, or skip with a reason and a message for people."""

    accepted: bool
    message: str
    reason: SkipReason | None = None
    retry_after_seconds: float | None = None
    in_flight_job_id: str | None = None


def decide(policy: RetrainPolicy, state: PolicyState, trigger: Trigger, now: datetime) -> Decision:
    """Apply the retrain policy: enabled, one job in flight, daily budget, cooldown, then labels."""
    automatic = trigger.kind in AUTOMATIC
    if automatic and not policy.enabled:
        return Decision(
            False,
            "the retrain policy is disabled for this model; enable retrain.enabled or ask manually",
            SkipReason.POLICY_DISABLED,
        )
    if state.in_flight_job_id is not None:
        return Decision(
            False,
            f"job {state.in_flight_job_id} is still in flight; one run per model at a time",
            SkipReason.IN_FLIGHT,
            in_flight_job_id=state.in_flight_job_id,
        )
    if state.jobs_last_24h >= policy.daily_budget:
        retry = None
        if state.oldest_job_last_24h_at is not None:
            retry = max(0.0, (state.oldest_job_last_24h_at + BUDGET_WINDOW - now).total_seconds())
        return Decision(
            False,
            f"{state.jobs_last_24h} jobs in the last 24 h; the daily budget is {policy.daily_budget}",
            SkipReason.BUDGET_EXHAUSTED,
            retry_after_seconds=retry,
        )
    cooldown_applies = not (trigger.kind is TrainingTrigger.MANUAL and trigger.ignore_cooldown)
    if cooldown_applies and state.last_completed_at is not None and policy.cooldown_seconds > 0:
        since = (now - state.last_completed_at).total_seconds()
        if since < policy.cooldown_seconds:
            remaining = policy.cooldown_seconds - since
            next_at = (now + timedelta(seconds=remaining)).strftime("%Y-%m-%dT%H:%M:%SZ")
            return Decision(
                False,
                f"last run finished {since:.0f} s ago; cooldown is {policy.cooldown_seconds:.0f} s "
                f"(next possible at {next_at})",
                SkipReason.COOLDOWN,
                retry_after_seconds=remaining,
            )
    if (
        trigger.kind is TrainingTrigger.PERFORMANCE_DEGRADED
        and trigger.labelled_rows is not None
        and trigger.labelled_rows < policy.min_labelled_rows
    ):
        # The concept moved: without enough labels of the new concept, a retrain would relearn the old one.
        return Decision(
            False,
            f"the window has {trigger.labelled_rows} labelled rows; the policy needs at least "
            f"{policy.min_labelled_rows} to retrain on degraded performance",
            SkipReason.NOT_ENOUGH_LABELS,
        )
    return Decision(True, "accepted")


def next_attempt_allowed(attempts: int, max_attempts: int) -> bool:
    """A job that has run ``attempts`` times may run again while it stays under ``max_attempts``."""
    return attempts < max_attempts


def job_id_for(model: str, event_id: str) -> str:
    """The job a trigger creates for a model is named after both, so a redelivered trigger (should the
    inbox ever miss it) cannot create a second job, and one dataset can start one job per model."""
    return f"job-{uuid.uuid5(uuid.NAMESPACE_URL, f'driftloop:{model}:{event_id}')}"


OWN_JOB_ID = re.compile(r"job-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
"""The job ids :func:`job_id_for` makes."""


def run_id_for(job_id: str, attempt: int) -> str:
    """One run id per attempt: the registry creates exactly one version per run id.

    A job id of another form (a request this service did not make) is named by its sha256: its own text
    could be too long for a run id (a job id of up to ``ID_MAX_CHARS`` characters made one a few longer, which
    no TrainingStarted could carry, and the runner retried that job's start for ever, every job behind it
    waiting) or give another job's run id (``abc`` and ``job-abc`` both gave ``run-abc-1``)."""
    if OWN_JOB_ID.fullmatch(job_id):
        return f"run-{job_id.removeprefix('job-')}-{attempt}"
    return f"run-{hashlib.sha256(job_id.encode()).hexdigest()}-{attempt}"


JOBS_LIST = "jobs"
"""The name inside the cursors of a model's job list (``GET /v1/models/{model}/jobs``)."""


@dataclass(frozen=True)
class JobPosition:
    """A job's place in its model's list, newest first: (created_at, job_id) is unique, so a page goes on
    from the last row of the one before, whatever was inserted meanwhile (an offset would skip or repeat)."""

    created_at: datetime
    job_id: str


def job_cursor(model: str, position: JobPosition) -> str:
    """The cursor of the page after ``position`` in ``model``'s job list."""
    return encode_cursor(JOBS_LIST, [model, position.created_at, position.job_id])


def decode_job_cursor(cursor: str, model: str) -> JobPosition:
    """The position inside a cursor of ``model``'s job list; 422 for a cursor :func:`job_cursor` did not make
    for it (another model's too: read as this one's, it would be a position among other rows)."""
    name, created_at, job_id = cursor_position(cursor, JOBS_LIST, 3, lists=(JOBS_LIST,))
    if type(name) is not str or type(job_id) is not str or name != model:
        raise cursor_of_another_list()
    # Only ids a job can have (contracts.common.JobId): a NUL could not be compared with a row in Postgres.
    if not 1 <= len(job_id) <= ID_MAX_CHARS or "\x00" in job_id:
        raise cursor_not_valid()
    return JobPosition(cursor_time(created_at), job_id)


def too_large_to_announce(signature: ModelSignature, size: int, limit: int) -> str:
    """Why a trained model whose TrainingCompleted would be ``size`` bytes, past the consumers' ``limit``, is
    failed, and what to do: the signature lists every level the model keeps of its categorical features and
    every class, and those are what grow with the data."""
    lists = [
        (len(orjson.dumps(f.categories)), f"{shown(f.name)} {{:,}} bytes ({len(f.categories):,} levels)")
        for f in signature.features
        if f.categories
    ]
    if signature.classes:
        lists.append(
            (
                len(orjson.dumps(signature.classes)),
                f"the classes of {shown(signature.target)} {{:,}} bytes ({len(signature.classes):,})",
            )
        )
    largest = sorted(lists, key=lambda item: -item[0])[:3]
    return (
        f"the trained model cannot be announced: its TrainingCompleted would be {size:,} bytes and consumers "
        f"accept {limit:,} bytes (max_event_bytes). Its signature lists every level it keeps of each "
        f"categorical feature (at most {CATEGORIES_KEPT_MAX:,}, of at most {CATEGORY_KEPT_MAX_CHARS} "
        "characters)"
        + (", the largest: " + ", ".join(text.format(n) for n, text in largest) if largest else "")
        + ". Leave some of these features out of the spec, or re-code their values into fewer or shorter "
        "levels"
    )
