"""Monitoring's HTTP API: the drift report per model (JSON and HTML), every model's status, and the
per-model drift policy."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import TypeAdapter

from contracts.common import ModelName
from libs.auth import OperatorDep, ViewerDep
from libs.errors import NotFound
from libs.http import BodyRoute, Cursor, InDigits, json_keys_once
from libs.service import Runtime
from services.monitoring import handlers, report
from services.monitoring.adapters.postgres import PgMonitoringStore
from services.monitoring.domain import (
    STATUS_ALERTS_PER_MODEL,
    DriftPolicy,
    decode_report_cursor,
    from_epoch,
    window_number,
)
from services.monitoring.handlers import Monitor
from services.monitoring.ports import EarlyStep
from services.monitoring.schemas import DriftPage, MonitoringStatus, WindowReport

router = APIRouter(prefix="/v1", tags=["monitoring"], route_class=BodyRoute)


def _runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def _monitor(request: Request) -> Monitor:
    monitor: Monitor = request.app.state.monitor
    return monitor


RuntimeDep = Annotated[Runtime, Depends(_runtime)]
MonitorDep = Annotated[Monitor, Depends(_monitor)]


class PolicyPublic(DriftPolicy):
    """A model's drift policy as in force (the defaults when no operator set one)."""


class PolicyUpdate(DriftPolicy):
    """A new drift policy for one model (every field optional; omitted ones take the service defaults)."""


_ANSWER = TypeAdapter(dict[str, Any])


def _json(answer: dict[str, Any]) -> Response:
    """``answer`` in JSON, byte for byte as FastAPI wrote it when these routes returned ``dict[str, Any]``
    (pydantic's serialiser: a non-finite number is null). The routes are documented by models (``responses``,
    services/monitoring/schemas.py) that answers are not validated against: as the response model, one would
    drop whatever a stored report holds that it does not name."""
    return Response(_ANSWER.dump_json(answer), media_type="application/json")


def _known(monitor: Monitor, model: str) -> None:
    if model not in monitor.live.models:
        raise NotFound(f"monitoring knows no model {model!r}: it needs a ModelVersionRegistered first")


async def _reports(
    rt: Runtime, model: str, limit: int, cursor: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    after = decode_report_cursor(cursor, model) if cursor is not None else None  # 422 before the database
    async with rt.pool.acquire() as conn:
        return await handlers.report_page(model, limit=limit, after=after, store=PgMonitoringStore(conn))


Limit = Annotated[int, InDigits, Query(ge=1, le=100, description="At most this many windows.")]


@router.get(
    "/models/{model}/drift",
    summary="The drift report of a model's latest windows (JSON), a page at a time.",
    responses={
        200: {"model": DriftPage, "description": "The newest windows first, and the next page's cursor."}
    },
)
async def drift_report(
    model: ModelName,
    _: ViewerDep,
    rt: RuntimeDep,
    monitor: MonitorDep,
    limit: Limit = 10,
    cursor: Cursor = None,
) -> Response:
    _known(monitor, model)
    windows, next_cursor = await _reports(rt, model, limit, cursor)
    return _json({"model": model, "windows": windows, "next_cursor": next_cursor})


@router.get(
    "/models/{model}/windows/{window_id}",
    summary="One judged window's full report (JSON): every feature's evidence, as DriftDetected names it.",
    responses={200: {"model": WindowReport, "description": "The window's report, as stored when judged."}},
)
async def window_report(model: ModelName, window_id: str, _: ViewerDep, rt: RuntimeDep) -> Response:
    async with rt.pool.acquire() as conn:
        store = PgMonitoringStore(conn)
        found = await store.window_report(model, window_id)
        number = window_number(model, window_id) if found is None else None
        through = await store.reports_pruned_through(model, number[0]) if number is not None else None
    pruned = number is not None and through is not None and number[1] <= through
    if found is None and pruned:
        # A DriftDetected or a grouped DataQualityIssue links here for as long as it is read: one read after
        # the retention says why the link no longer answers, where "judged no window" would deny the alert.
        raise NotFound(
            f"monitoring no longer holds the report of window {window_id!r} of model {model!r}: a report is "
            "deleted window_reports_keep_days after its window was judged (the newest of each model version "
            "is kept), and this window is no later than the last one deleted"
        )
    if found is None:
        raise NotFound(f"monitoring judged no window {window_id!r} of model {model!r}")
    return _json(found)


@router.get(
    "/models/{model}/drift.html",
    response_class=HTMLResponse,
    summary="The drift report as a page with per-feature histograms of reference and current.",
)
async def drift_page(
    model: ModelName,
    request: Request,
    _: ViewerDep,
    rt: RuntimeDep,
    monitor: MonitorDep,
    limit: Limit = 10,
    cursor: Cursor = None,
) -> HTMLResponse:
    _known(monitor, model)
    windows, next_cursor = await _reports(rt, model, limit, cursor)
    older = None
    if next_cursor is not None:
        older = f"{request.url.path}?{urlencode({'limit': limit, 'cursor': next_cursor})}"
    return HTMLResponse(report.render(model, windows, older=older, first=cursor is None))


@router.get(
    "/status",
    summary="The current status of every model monitoring knows.",
    responses={200: {"model": MonitoringStatus, "description": "Per model, and what is held back."}},
)
async def status(_: ViewerDep, rt: RuntimeDep, monitor: MonitorDep) -> Response:
    live = monitor.live
    async with rt.pool.acquire() as conn:
        store = PgMonitoringStore(conn)
        labels = await store.label_counts()
        outside = await store.labels_outside_classes()
        alerts = await store.recent_alerts(sorted(live.models), STATUS_ALERTS_PER_MODEL)
        steps = await store.watched_steps()
        kept = await store.kept_steps()
        given_up = await store.given_up_steps()
        latest: dict[str, dict[str, Any]] = {}
        for model in sorted(live.models):
            reports = await store.latest_reports(model, 1)
            if reports:
                latest[model] = reports[0].report
    models: dict[str, Any] = {}
    for (model, version), ref in sorted(live.references.items()):
        window = live.windows.get((model, version))
        entry = models.setdefault(
            model,
            {
                "versions": {},
                "labels": labels.get(model, {}),
                "last_window": None,
                "recent_alerts": alerts.get(model, []),
                "rollouts": [
                    {
                        "rollout_id": s.rollout_id,
                        "step_index": s.step_index,
                        "canary_version": s.canary_version,
                    }
                    for s in steps
                    if s.model == model
                ],
            },
        )
        entry["versions"][str(version)] = {
            "task": ref.task.value,
            "features": len(ref.features),
            "open_window": {"seq": window.seq, "rows": window.rows} if window else None,
            "baseline": ref.baseline,
            "labels_outside_classes": outside.get((model, version), 0),
        }
        if model in latest:
            r = latest[model]
            entry["last_window"] = {
                "id": r["window"]["id"],
                "end": r["window"]["end"],
                "drift_share": r["drift_share"],
                "drifted_features": r["drifted_features"],
                "alerted": r["alerted"],
            }
    unknown, skipped = live.skipped_rows()
    return _json(
        {
            "models": models,
            "unknown": unknown,
            "unknown_rows_not_listed": live.unknown_rows_not_listed,
            "skipped_before_registration": skipped,
            "windows_waiting_for_judgement": len(live.closed),
            "cached_predictions": live.cache.rows,
            "labels_waiting_for_prediction": len(live.pending_labels),
            "rollout_steps_kept": [_kept_public(s, monitor) for s in kept],
            "rollout_steps_given_up": [_given_up_public(s) for s in given_up],
            "replay": monitor.replay.public() if monitor.replay is not None else None,
        }
    )


def _early_public(step: EarlyStep) -> dict[str, Any]:
    """What ``/v1/status`` shows of any step whose event came before its rollout's start."""
    return {
        "rollout_id": step.rollout_id,
        "model": step.model,
        "step_index": step.step_index,
        "stable_version": step.stable_version,
        "canary_version": step.canary_version,
        "kept_at": from_epoch(step.received_at).isoformat(),
    }


def _kept_public(step: EarlyStep, monitor: Monitor) -> dict[str, Any]:
    """A step kept for its rollout's start: also its own start, when it is given up if the start does not
    come, and the traffic collected for it so far (the rollout's highest kept step only; 0 for the others)."""
    collector = monitor.live.kept.get(step.rollout_id)
    if collector is not None and collector.step_index != step.step_index:
        collector = None
    return {
        **_early_public(step),
        "started_at": from_epoch(step.started_at).isoformat(),
        "expires_at": from_epoch(step.received_at + monitor.rollout_start_wait_seconds).isoformat(),
        "canary_samples": collector.canary.rows if collector is not None else 0,
        "stable_samples": collector.stable.rows if collector is not None else 0,
    }


def _given_up_public(step: EarlyStep) -> dict[str, Any]:
    """A rollout's highest step given up for want of its start: also when it was given up."""
    given_up = step.given_up_at
    return {
        **_early_public(step),
        "given_up_at": from_epoch(given_up).isoformat() if given_up is not None else None,
    }


@router.get("/models/{model}/policy", summary="The drift policy in force for a model.")
async def get_policy(model: ModelName, _: ViewerDep, monitor: MonitorDep) -> PolicyPublic:
    # The defaults for any name would make a misspelt one look watched: a model is known by a registered
    # version or by a policy an operator set for it (one may be set before its first version).
    if model not in monitor.policies and model not in monitor.live.models:
        raise NotFound(
            f"monitoring knows no model {model!r}: no version of it is registered and no policy is set for "
            "it; check the name (a model's policy is the service defaults until an operator sets one)"
        )
    return PolicyPublic.model_validate(monitor.policy(model).model_dump())


@router.put(
    "/models/{model}/policy",
    summary="Set a model's drift policy (operator).",
    dependencies=[Depends(json_keys_once)],
)
async def put_policy(
    model: ModelName, body: PolicyUpdate, who: OperatorDep, rt: RuntimeDep, monitor: MonitorDep
) -> PolicyPublic:
    async with rt.begin() as tx:
        stored = await handlers.set_policy(
            model,
            body.model_dump(exclude_unset=True),
            actor=who.actor,
            monitor=monitor,
            store=PgMonitoringStore(tx.conn),
            publish=tx.publish,
        )
    # Not in force if a PUT that took the model's lock after this one has already put its own.
    monitor.hold_policy(model, stored)
    return PolicyPublic.model_validate(stored.policy.model_dump())
