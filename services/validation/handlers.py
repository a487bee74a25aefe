"""Validation's event handlers: a registered candidate is gated (thresholds, champion/challenger, slices,
signature, latency, sanity) and the outcome is published as ValidationPassed or ValidationFailed with the
full report, which is also stored for the HTTP API.

Handlers are plain functions; bootstrap binds the ports of the delivery's transaction.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from prometheus_client import Counter

from contracts.common import ArtifactFormat, ArtifactRef, Stage, Task
from contracts.datasets import DatasetRegistered
from contracts.envelope import CloudEvent, EventPayload, new_event
from contracts.models import (
    ModelStageChanged,
    ModelVersionRegistered,
)
from contracts.validation import CheckResult, ValidationFailed, ValidationPassed
from libs.bus import EventTooLarge, PermanentError, bytes_over_limit
from libs.errors import NotFound
from libs.logging import get_logger
from libs.modelspec import ValidationSpec
from libs.stage_order import take_in_order
from services.validation.domain import (
    Carried,
    ChampionUnloadable,
    cut_checks,
    failure,
    gates_of_another_task,
    judge,
    report_id_for,
    slice_summary_name,
    too_large_to_announce,
)
from services.validation.ports import (
    AfterCommit,
    Champions,
    Datasets,
    Evaluation,
    EvaluationError,
    Evaluator,
    Publish,
    Report,
    Reports,
    Versions,
)

log = get_logger(__name__)

FAILED_CHECKS_LOGGED = 10
"""Failed checks a log line names; it counts them all."""

CHAMPIONS_UNLOADABLE = Counter(
    "driftloop_validation_champions_unloadable_total",
    "Candidates gated while their champion's model could not be loaded, by reason: its artifact missing, "
    "corrupted (its bytes no longer hash to its key), untrusted (no skops file, or types outside the trusted "
    "list: possibly tampered with) or unloadable (skops cannot build it). Each is judged on its absolute "
    "checks alone, as a first version is, and logged as an error; the production artifact needs replacing. "
    "Counted once per candidate judged (its report committed), whether it passed or failed, however many "
    "times its registration was delivered.",
    ["model", "reason"],
)

VALIDATIONS = Counter(
    "driftloop_validation_validations_total",
    "Candidates judged, by model and outcome (passed: ValidationPassed, failed: ValidationFailed). Counted "
    "once the report commits, however many times the candidate's registration was delivered.",
    ["model", "outcome"],
)


def _validated(model: str, passed: bool) -> None:
    """Count a judged candidate; called once its report is committed."""
    VALIDATIONS.labels(model, "passed" if passed else "failed").inc()


def _champion_unloadable(
    registered: ModelVersionRegistered, champion: int, artifact: ArtifactRef, problem: ChampionUnloadable
) -> None:
    """Say loudly that the champion's model cannot be loaded: what serves production may be damaged or
    tampered with, and no candidate is compared with it offline until it is replaced. Called once the
    candidate's report is committed: once per judged candidate, never for a delivery that rolled back."""
    CHAMPIONS_UNLOADABLE.labels(model=registered.model, reason=problem.reason).inc()
    log.error(
        "champion artifact is untrusted, possibly tampered with: candidate judged without the comparison"
        if problem.reason == "untrusted"
        else "champion model cannot be loaded: candidate judged without the comparison",
        model=registered.model,
        candidate=registered.model_version,
        champion=champion,
        champion_artifact=artifact.key,
        reason=problem.reason,
        detail=problem.detail,
    )


# --- the core, shared with the HTTP API ---------------------------------------------------------------


async def report(report_id: str, *, reports: Reports) -> Report:
    """One report, or 404."""
    found = await reports.get(report_id)
    if found is None:
        raise NotFound(f"no validation report {report_id!r}")
    return found


async def report_for_version(model: str, version: int, *, reports: Reports) -> Report:
    """The report of a model version, or 404."""
    found = await reports.for_version(model, version)
    if found is None:
        raise NotFound(f"model {model!r} version {version} has no validation report (yet)")
    return found


async def validate(
    event: CloudEvent[ModelVersionRegistered],
    *,
    versions: Versions,
    champions: Champions,
    datasets: Datasets,
    reports: Reports,
    evaluator: Evaluator,
    publish: Publish,
    after_commit: AfterCommit,
    source: str,
    max_event_bytes: int = 1_000_000,
    **_: Any,
) -> Report | None:
    """Gate a candidate and publish the outcome; None when the version was validated before."""
    d = event.data
    if await reports.for_version(d.model, d.model_version) is not None:
        log.info(
            "version validated before; registration received again, nothing to do",
            model=d.model,
            version=d.model_version,
            event_id=event.id,
        )
        return None
    started = time.monotonic()
    champion_version = await champions.get(d.model)
    champion = None
    if champion_version is not None and champion_version != d.model_version:
        champion = await versions.get(d.model, champion_version)
    if champion_version == d.model_version:
        champion_version = None
    n_classes = (
        len(d.signature.classes) if d.signature.task is Task.CLASSIFICATION and d.signature.classes else None
    )
    holdout_ref = d.lineage.holdout
    checks: list[CheckResult]
    slice_summary: str | None = None
    unloadable: ChampionUnloadable | None = None
    try:
        spec = await evaluator.validation_spec(d.lineage.spec) if d.lineage.spec else ValidationSpec()
        if d.lineage.spec and (problem := gates_of_another_task(spec, d.signature.task, d.signature.classes)):
            raise EvaluationError(
                "spec-readable", f"the model spec {d.lineage.spec.key[:12]} cannot be used: {problem}"
            )
        if holdout_ref is None:
            raise EvaluationError(
                "holdout-available", "the candidate's lineage names no holdout: nothing to validate it on"
            )
        holdout = await datasets.artifact(holdout_ref) or ArtifactRef(
            # A dataset's sha256 is its key in the store: usable before its DatasetRegistered arrives.
            key=holdout_ref.sha256,
            uri="",
            format=ArtifactFormat.PARQUET,
            size_bytes=0,
        )
        if champion_version is not None and champion is None:
            log.warning("champion unknown to validation", model=d.model, champion=champion_version)
        measured = await evaluator.measure(
            Evaluation(
                candidate=d.artifact,
                signature=d.signature,
                holdout=holdout,
                spec=spec,
                seed=d.lineage.seed,
                champion=champion.artifact if champion else None,
                champion_signature=champion.signature if champion else None,
            )
        )
        unloadable = measured.champion_unloadable
        if measured.champion_outputs_unusable is not None and champion is not None:
            log.warning(
                "champion's outputs on the holdout are unusable: candidate judged without the comparison",
                model=d.model,
                candidate=d.model_version,
                champion=champion.version,
                detail=measured.champion_outputs_unusable,
            )
        checks = judge(
            spec,
            task=d.signature.task,
            n_classes=n_classes,
            measured=measured,
            candidate=d.signature,
            champion_signature=champion.signature if champion else None,
            champion_version=champion_version,
        )
        slice_summary = slice_summary_name(spec, measured)
    except EvaluationError as exc:
        checks = [failure(exc.check, exc.message)]
        unloadable = exc.champion_unloadable
    failed = [c.name for c in checks if not c.passed]
    report_id = report_id_for(d.model, d.model_version)
    duration = round(time.monotonic() - started, 3)
    fields: dict[str, Any] = {
        "model": d.model,
        "model_version": d.model_version,
        "report_id": report_id,
        "checks": checks,
        "failed_checks": failed,
        "champion_version": champion_version,
        "holdout": holdout_ref,
        "duration_seconds": duration,
        "checks_total": len(checks),
        "failed_checks_total": len(failed),
    }
    outcome: ValidationFailed | ValidationPassed = (
        ValidationFailed(**fields) if failed else ValidationPassed(**fields)
    )
    out = new_event(outcome, source=source, cause=event)
    # Thousands of slices, or a limit set low, pass what consumers accept: the event carries what matters
    # most and fits, the stored report every check. The verdict is the report's whatever is cut.
    carried = Carried(checks=outcome.checks, failed_checks=outcome.failed_checks, slice_summary=slice_summary)
    while excess := bytes_over_limit(out, max_bytes=max_event_bytes):
        cut = cut_checks(carried, excess)
        if cut == carried:
            raise EventTooLarge(
                too_large_to_announce(outcome, size=max_event_bytes + excess, limit=max_event_bytes)
            )
        carried = cut
        outcome = type(outcome)(
            **{
                **dict(outcome),
                "checks": cut.checks,
                "failed_checks": cut.failed_checks,
                "checks_truncated": True,
            }
        )
        out = new_event(outcome, source=source, cause=event)
    stored = Report(
        report_id=report_id,
        model=d.model,
        version=d.model_version,
        passed=not failed,
        checks=checks,
        failed_checks=failed,
        champion_version=champion_version,
        holdout=holdout_ref,
        duration_seconds=duration,
        event_id=out.id,
    )
    await reports.save(stored)
    await publish(out)
    after_commit(partial(_validated, d.model, not failed))
    if unloadable is not None and champion is not None:
        # Once committed: a delivery retried, or dead-lettered (its report too large) and replayed, counted
        # once per run before, and an alert on the counter saw candidates that were never judged.
        after_commit(partial(_champion_unloadable, d, champion.version, champion.artifact, unloadable))
    log.info(
        "validation passed" if not failed else "validation failed",
        model=d.model,
        version=d.model_version,
        # Thousands of failed slices would make one log line as large as the report.
        failed_checks=failed[:FAILED_CHECKS_LOGGED],
        failed_checks_total=len(failed),
        duration_s=duration,
    )
    return stored


# --- the handlers ---------------------------------------------------------------------------------------


async def on_model_version_registered(
    event: CloudEvent[ModelVersionRegistered], *, versions: Versions, **ports: Any
) -> None:
    """Remember the version (it may be a champion later), then gate it. A version announced again with
    another model (another artifact) is dead-lettered: its report judged the first one."""
    d = event.data
    held = await versions.get(d.model, d.model_version)
    if held is not None and held.artifact.key != d.artifact.key:
        raise PermanentError(
            f"{d.model} version {d.model_version} is known with artifact {held.artifact.key}; this "
            f"{event.type} {event.id} (run {d.run_id}) names artifact {d.artifact.key}: a version is one "
            "model, and its validation stands for the first"
        )
    await versions.record(d)
    await validate(event, versions=versions, **ports)


async def on_model_stage_changed(
    event: CloudEvent[ModelStageChanged], *, champions: Champions, **_: Any
) -> None:
    """Track the champion: the production version. A change older than the last one applied (by the
    registry's ``sequence``) is dead-lettered: applied, it would make an earlier version champion again."""
    d = event.data
    if not await take_in_order(event, champions):
        log.info("stage change received again; already applied", model=d.model, sequence=d.sequence)
        return
    if d.to_stage is Stage.PRODUCTION:
        await champions.set(d.model, d.model_version)
    elif d.from_stage is Stage.PRODUCTION:
        await champions.clear(d.model, d.model_version)


async def on_dataset_registered(
    event: CloudEvent[DatasetRegistered], *, datasets: Datasets, **_: Any
) -> None:
    """Remember where each dataset version lives (holdouts are looked up by reference)."""
    await datasets.record(event.data)


ValidationHandler = Callable[..., Awaitable[None]]

HANDLERS: dict[type[EventPayload], ValidationHandler] = {
    ModelVersionRegistered: on_model_version_registered,
    ModelStageChanged: on_model_stage_changed,
    DatasetRegistered: on_dataset_registered,
}
"""Event type -> handler. Every handler receives the same ports and takes what it needs."""
