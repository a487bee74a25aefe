"""Serving's HTTP surface: the Open Inference Protocol v2 (JSON), the simple v1 predict API, feedback, and
the operator's rollout commands. Both predict protocols call the same core (services/serving/scoring.py).

Predict routes read the body with orjson instead of pydantic models: with 100-row requests, model-driven
parsing would cost more than the prediction. Inputs are checked against the model's signature there.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import Histogram
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from contracts.commands import PromoteRequested, RollbackRequested
from contracts.common import FeatureType, Label, ModelName, ModelVersion
from contracts.envelope import CloudEvent, new_event
from contracts.feedback import GroundTruthReceived
from libs.auth import GRANTS, OperatorDep, PredictDep, Principal, Role, TokenStore, ViewerDep
from libs.bus.core import TransactionFactory
from libs.errors import Conflict, DomainError, Forbidden, InvalidInput, NotFound, Unauthorized
from libs.http import Text, json_body
from services.serving.domain import (
    ModelRoute,
    columns_from_records,
    columns_from_tensors,
    parse_json,
    parse_prediction_id,
    read_json,
    tensor_rows,
    tensors_from_json,
)
from services.serving.routing import ModelRouting, RoutingState, ServedModel
from services.serving.schemas import InferAnswer, InferBody, PredictAnswer, PredictBody
from services.serving.scoring import Predictor, PredictRequest, PredictResult

REQUEST_SECONDS = Histogram(
    "driftloop_serving_request_seconds",
    "Whole predict requests (reading, checking, scoring, answering), per model and protocol.",
    ["model", "protocol"],
    buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

SERVER_NAME = "driftloop-serving"
SERVER_VERSION = "0.1.0"


@dataclass
class ServingContext:
    """What the routes need; bootstrap puts one on ``app.state.serving``."""

    predictor: Predictor
    state: RoutingState
    begin: TransactionFactory
    source: str
    read_route: Callable[[str], Awaitable[ModelRoute | None]]
    read_routes: Callable[[], Awaitable[list[ModelRoute]]]
    ready: Callable[[], Awaitable[dict[str, bool]]]
    max_feedback_items: int = 10_000


def _context(request: Request) -> ServingContext:
    ctx: ServingContext = request.app.state.serving
    return ctx


ContextDep = Annotated[ServingContext, Depends(_context)]


def _caller(request: Request, role: Role | None) -> Principal:
    """The bearer token's principal, if it grants ``role`` (any role when None): libs.auth's rule, as a
    plain function so the predict routes skip FastAPI's dependency resolution, which costs more per
    request than everything serving adds to the model call."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    store: TokenStore = request.app.state.tokens
    principal = store.authenticate(token.strip())
    if principal is None:
        raise Unauthorized("unknown or revoked token")
    if role is not None and principal.role not in GRANTS[role]:
        raise Forbidden(f"role {principal.role.value!r} may not do this; it needs {role.value!r}")
    return principal


async def _any_token(request: Request) -> Principal:
    """Any valid token (predict clients and people alike) may read model metadata."""
    return _caller(request, None)


AnyTokenDep = Annotated[Principal, Depends(_any_token)]


async def _json_body(request: Request) -> Any:
    return read_json(await request.body())


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


router = APIRouter()
predict_router = APIRouter()
"""The hot routes: served ahead of FastAPI's router (``libs.http.HotRoutes``), so their endpoints take only
the path and the Request."""

# --- Open Inference Protocol v2 ------------------------------------------------------------------------


def _datatype(values: list[Any]) -> str:
    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, bool):
        return "BOOL"
    if isinstance(sample, int):
        return "INT64"
    if isinstance(sample, float):
        return "FP64"
    return "BYTES"


def _feature_datatype(served: ServedModel, name: str) -> str:
    spec = next(f for f in served.signature.features if f.name == name)
    if spec.type is FeatureType.NUMERIC:
        return "FP64"
    if spec.categories and all(type(c) is int for c in spec.categories):
        return "INT64"
    return "BYTES"


def _metadata(routing: ModelRouting, served: ServedModel) -> dict[str, Any]:
    outputs: list[dict[str, Any]] = [
        {
            "name": "predict",
            "datatype": _datatype(list(served.classes or [])) if served.gives_probabilities else "FP64",
            "shape": [-1],
        }
    ]
    if served.gives_probabilities:
        outputs.append(
            {"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(served.classes or [])]}
        )
    return {
        "name": routing.model,
        "versions": [str(v) for v in routing.versions],
        "platform": "scikit-learn",
        "inputs": [
            {"name": f.name, "datatype": _feature_datatype(served, f.name), "shape": [-1]}
            for f in served.signature.features
        ],
        "outputs": outputs,
        "parameters": {
            "task": served.signature.task.value,
            "classes": served.classes,
            "rollout_id": routing.rollout_id,
            "canary_weight": routing.weight,
            "engine": served.engine,
            "engine_note": served.engine_note or None,
        },
    }


@router.get("/v2", tags=["open inference protocol"], summary="Server metadata.")
async def server_metadata() -> Response:
    return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []})


@router.get("/v2/health/live", tags=["open inference protocol"], summary="The server is up.")
async def server_live() -> Response:
    return _json({"live": True})


@router.get(
    "/v2/health/ready", tags=["open inference protocol"], summary="Routing is loaded; the database answers."
)
async def server_ready(ctx: ContextDep) -> Response:
    checks = await ctx.ready()
    ok = all(checks.values())
    return _json({"ready": ok, "checks": checks}, 200 if ok else 503)


@router.get("/v2/models/{name}", tags=["open inference protocol"], summary="Model metadata.")
async def model_metadata(name: str, ctx: ContextDep, _: AnyTokenDep) -> Response:
    routing = ctx.predictor.routing(name)
    served = routing.default
    if served is None:
        raise NotFound(f"model {name!r} has no loaded version")
    return _json(_metadata(routing, served))


@router.get(
    "/v2/models/{name}/versions/{version}", tags=["open inference protocol"], summary="Version metadata."
)
async def version_metadata(name: str, version: int, ctx: ContextDep, _: AnyTokenDep) -> Response:
    routing = ctx.predictor.routing(name)
    found = routing.by_version(version)
    if found is None:
        raise NotFound(
            f"model {name!r} version {version} is not serving; serving versions: {routing.versions}"
        )
    return _json({**_metadata(routing, found[0]), "versions": [str(version)]})


@router.get("/v2/models/{name}/ready", tags=["open inference protocol"], summary="The model can answer.")
async def model_ready(name: str, ctx: ContextDep) -> Response:
    routing = ctx.state.table.models.get(name)
    ready = routing is not None and routing.default is not None
    return _json({"name": name, "ready": ready}, 200 if ready else 404)


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    tags=["open inference protocol"],
    summary="The version can answer.",
)
async def version_ready(name: str, version: int, ctx: ContextDep) -> Response:
    routing = ctx.state.table.models.get(name)
    ready = routing is not None and routing.by_version(version) is not None
    return _json({"name": name, "version": str(version), "ready": ready}, 200 if ready else 404)


async def _infer(name: str, version: int | None, request: Request, ctx: ContextDep) -> Response:
    started = time.perf_counter()
    response = await _infer_inner(name, version, request, ctx)
    REQUEST_SECONDS.labels(name, "v2").observe(time.perf_counter() - started)
    return response


async def _infer_inner(name: str, version: int | None, request: Request, ctx: ContextDep) -> Response:
    if request.headers.get("inference-header-content-length") is not None:
        raise InvalidInput(
            "the binary tensor extension is not supported: send JSON tensors (binary_data=False)",
            reason="binary-data",
        )
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise InvalidInput("the request must be a JSON object with 'inputs'", reason="wrong-type")
    tensors = tensors_from_json(body.get("inputs"))
    rows = tensor_rows(tensors)
    params = body.get("parameters") or {}
    key = params.get("entity_key") if isinstance(params, dict) else None
    if key is not None and not isinstance(key, str | int):
        raise InvalidInput("parameters.entity_key must be a string", reason="wrong-type")
    wanted = _requested_outputs(body.get("outputs"))
    result = ctx.predictor.predict(
        PredictRequest(
            model=name,
            rows=rows,
            parse=lambda sig, idx: columns_from_tensors(sig, tensors, idx),
            # One key (or one random draw) for the whole request: one version answers an OIP request.
            entity_keys=[str(key) if key is not None else None] * rows,
            version=version,
        )
    )
    return _json(_infer_response(name, body.get("id"), result, wanted))


def _requested_outputs(outputs: Any) -> set[str]:
    known = {"predict", "predict_proba"}
    if outputs is None:
        return known
    if not isinstance(outputs, list):
        raise InvalidInput("outputs must be a list of {name}", reason="wrong-type")
    names = {o.get("name") for o in outputs if isinstance(o, dict)}
    unknown = sorted(str(n) for n in names - known)
    if unknown:
        raise InvalidInput(
            f"unknown output {unknown[0]!r}; outputs: predict, predict_proba", reason="unknown"
        )
    return {str(n) for n in names}


def _infer_response(name: str, request_id: Any, result: PredictResult, wanted: set[str]) -> dict[str, Any]:
    version = result.versions[0]
    n = len(result.labels)
    outputs: list[dict[str, Any]] = []
    if "predict" in wanted:
        outputs.append(
            {"name": "predict", "shape": [n], "datatype": _datatype(result.labels), "data": result.labels}
        )
    probs = result.probabilities
    if "predict_proba" in wanted and n and probs[0] is not None:
        k = len(probs[0] or [])
        flat = [p for row in probs for p in (row or [])]
        outputs.append({"name": "predict_proba", "shape": [n, k], "datatype": "FP64", "data": flat})
    classes = result.classes.get(version)
    return {
        "model_name": name,
        "model_version": str(version),
        "id": str(request_id) if request_id is not None else result.request_id,
        "parameters": {
            "variant": result.variants[0].value,
            "request_id": result.request_id,
            "prediction_ids": result.prediction_ids,
            "classes": classes,
        },
        "outputs": outputs,
    }


_INFER_DOCS: dict[str, Any] = {
    "openapi_extra": json_body(InferBody, "An Open Inference Protocol v2 inference request, JSON tensors."),
    "responses": {200: {"model": InferAnswer, "description": "An Open Inference Protocol v2 response."}},
}


@predict_router.post(
    "/v2/models/{name}/infer", tags=["open inference protocol"], summary="Score tensors.", **_INFER_DOCS
)
async def infer(name: str, request: Request) -> Response:
    """Needs a predict token (checked in the route, see :func:`_caller`)."""
    _caller(request, Role.predict)
    return await _infer(name, None, request, _context(request))


@predict_router.post(
    "/v2/models/{name}/versions/{version}/infer",
    tags=["open inference protocol"],
    summary="Score tensors with one version.",
    **_INFER_DOCS,
)
async def infer_version(name: str, version: int, request: Request) -> Response:
    """Needs a predict token (checked in the route, see :func:`_caller`)."""
    _caller(request, Role.predict)
    return await _infer(name, version, request, _context(request))


# --- simple JSON API ---------------------------------------------------------------------------------------


@predict_router.post(
    "/v1/models/{name}/predict",
    tags=["predict"],
    summary="Score records: {records: [{feature: value}], entity_keys?: [key]}.",
    openapi_extra=json_body(PredictBody, "The rows to score, as records."),
    responses={200: {"model": PredictAnswer, "description": "One prediction per record, in order."}},
)
async def predict(name: str, request: Request) -> Response:
    """Needs a predict token (checked in the route, see :func:`_caller`)."""
    started = time.perf_counter()
    _caller(request, Role.predict)
    ctx = _context(request)
    raw = await request.body()
    body, strict = parse_json(raw)
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        raise InvalidInput("the request must be a JSON object with a 'records' list", reason="wrong-type")
    records: list[Any] = body["records"]
    keys = body.get("entity_keys")
    if keys is None:
        entity_keys: list[str | None] = [None] * len(records)
    elif not isinstance(keys, list) or len(keys) != len(records):
        raise InvalidInput(
            "entity_keys must be a list with one key (or null) per record", reason="wrong-shape"
        )
    else:
        entity_keys = [None if k is None else str(k) for k in keys]
    result = ctx.predictor.predict(
        PredictRequest(
            model=name,
            rows=len(records),
            parse=lambda sig, idx: columns_from_records(
                sig, records if idx is None else [records[i] for i in idx]
            ),
            entity_keys=entity_keys,
            raw_rows=records,
            # The prediction log hands these bytes on as they came, and when the records are all there is in
            # strict JSON, it may cut their text out instead of reading them again.
            body=raw,
            body_records=len(records) if strict and len(body) == 1 else None,
        )
    )
    response = _json({"model": name, "request_id": result.request_id, "predictions": _predictions(result)})
    REQUEST_SECONDS.labels(name, "v1").observe(time.perf_counter() - started)
    return response


def _predictions(result: PredictResult) -> list[dict[str, Any]]:
    """One object per row of the v1 answer. The variant goes as the enum member: orjson writes its value."""
    keys = {v: None if c is None else [str(k) for k in c] for v, c in result.classes.items()}
    rows = zip(result.prediction_ids, result.labels, result.probabilities, strict=True)
    variants = result.variants
    if len(keys) == 1 and variants and variants.count(variants[0]) == len(variants):
        # One version and variant answered every row (no split canary): the common case, with its
        # constants hoisted and, for a binary classifier, a dict display per row instead of
        # dict(zip(...)); half the cost of the loop below at 100 rows.
        ((version, names),) = keys.items()
        variant = variants[0]
        if names is None or result.probabilities[0] is None:
            return [
                {"prediction_id": pid, "prediction": label, "model_version": version, "variant": variant}
                for pid, label, _ in rows
            ]
        if len(names) == 2:
            c0, c1 = names
            # Every row has its probabilities (the first has, and one version gives all or none).
            return [
                {
                    "prediction_id": pid,
                    "prediction": label,
                    "model_version": version,
                    "variant": variant,
                    "probabilities": {c0: p0, c1: p1},
                }
                for pid, label, (p0, p1) in cast(Iterable[tuple[str, Any, list[float]]], rows)
            ]
    predictions = []
    for (pid, label, probs), version, variant in zip(rows, result.versions, variants, strict=True):
        row: dict[str, Any] = {
            "prediction_id": pid,
            "prediction": label,
            "model_version": version,
            "variant": variant,
        }
        names = keys.get(version)
        if probs is not None and names is not None:
            row["probabilities"] = dict(zip(names, probs, strict=True))
        predictions.append(row)
    return predictions


class FeedbackCreate(BaseModel):
    """A ground-truth label for an earlier prediction."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prediction_id: Text = Field(min_length=1, description="The id the predict response gave.")
    label: Label = Field(description="The true class label or value.")
    observed_at: AwareDatetime | None = Field(
        default=None, description="When the outcome was observed; now if absent."
    )
    model: ModelName | None = Field(
        default=None, description="Model name; read from the prediction id if absent."
    )
    entity_key: Text | None = Field(default=None, description="Caller's entity id, if any.")


class FeedbackAccepted(BaseModel):
    accepted: int = Field(description="Labels published.")
    event_ids: list[str] = Field(description="The GroundTruthReceived events, one per label.")


_FEEDBACK = TypeAdapter(FeedbackCreate | list[FeedbackCreate])


@router.post(
    "/v1/feedback",
    tags=["predict"],
    summary="Ground truth for earlier predictions.",
    status_code=202,
    openapi_extra=json_body(FeedbackCreate | list[FeedbackCreate], "One label, or a list of them."),
    responses={202: {"model": FeedbackAccepted, "description": "Published as GroundTruthReceived."}},
)
async def feedback(request: Request, ctx: ContextDep, principal: PredictDep) -> Response:
    body = await _json_body(request)
    try:
        parsed = _FEEDBACK.validate_python(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"{where}: {first['msg']}", reason="invalid-feedback") from exc
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise InvalidInput("no feedback items", reason="empty")
    if len(items) > ctx.max_feedback_items:
        raise InvalidInput(f"at most {ctx.max_feedback_items} feedback items per request", reason="too-many")
    events: list[CloudEvent[Any]] = []
    now = datetime.now(UTC)
    known: dict[str, bool] = {}
    for i, item in enumerate(items):
        named = parse_prediction_id(item.prediction_id)
        model = item.model or (named[0] if named else None)
        if model is None:
            raise InvalidInput(
                f"[{i}].prediction_id {item.prediction_id!r} is not a driftloop prediction id; "
                "send 'model' too",
                reason="unknown-prediction-id",
            )
        if named is not None and item.model is not None and named[0] != item.model:
            raise InvalidInput(f"[{i}]: prediction {item.prediction_id!r} was made by model {named[0]!r}")
        if model not in known:
            known[model] = model in ctx.state.table.models or await ctx.read_route(model) is not None
        if not known[model]:
            raise NotFound(f"[{i}]: model {model!r} is not known to serving")
        payload = GroundTruthReceived(
            prediction_id=item.prediction_id,
            model=model,
            model_version=named[1] if named else None,
            label=item.label,
            observed_at=item.observed_at or now,
            entity_key=item.entity_key,
        )
        events.append(new_event(payload, source=ctx.source, actor=principal.actor))
    async with ctx.begin() as tx:
        for event in events:
            await tx.publish(event)
    return _json({"accepted": len(events), "event_ids": [e.id for e in events]}, 202)


# --- rollout state and operator commands ----------------------------------------------------------------


def _route_public(route: ModelRoute, routing: ModelRouting | None) -> dict[str, Any]:
    r = route.rollout
    return {
        "model": route.model,
        "stable_version": route.stable_version,
        "previous_stable_version": route.previous_stable_version,
        "rollout": None
        if r is None
        else {
            "rollout_id": r.rollout_id,
            "status": r.status.value,
            "canary_version": r.canary_version,
            "stable_version": r.stable_version,
            "mode": r.mode.value,
            "steps": list(r.steps),
            "step_index": r.step_index,
            "weight": r.weight,
            "min_samples": r.min_samples,
            "bake_seconds": r.bake_seconds,
            "samples_seen": r.samples_seen,
            "started_at": r.started_at.isoformat(),
            "step_started_at": r.step_started_at.isoformat(),
            "ended_at": r.ended_at.isoformat() if r.ended_at else None,
            "end_reason": r.end_reason,
        },
        "this_replica": None
        if routing is None
        else {
            "stable_version": routing.stable.version if routing.stable else None,
            "canary_version": routing.canary.version if routing.canary else None,
            "rollout_id": routing.rollout_id,
            "weight": routing.weight,
            "mode": routing.mode.value,
        },
    }


@router.get("/v1/models", tags=["rollouts"], summary="Every model's routing state.")
async def list_models(ctx: ContextDep, _: ViewerDep) -> Response:
    routes = await ctx.read_routes()
    table = ctx.state.table.models
    return _json({"models": [_route_public(r, table.get(r.model)) for r in routes]})


@router.get("/v1/models/{name}", tags=["rollouts"], summary="One model's routing state.")
async def get_model(name: str, ctx: ContextDep, _: ViewerDep) -> Response:
    route = await ctx.read_route(name)
    if route is None:
        raise NotFound(f"model {name!r} is not known to serving")
    return _json(_route_public(route, ctx.state.table.models.get(name)))


class RollbackCreate(BaseModel):
    """Take a version off traffic."""

    model_config = ConfigDict(extra="forbid")

    model_version: ModelVersion | None = Field(
        default=None, description="Version to take off traffic; default: the live canary, else production."
    )
    to_version: ModelVersion | None = Field(
        default=None, description="For a production rollback: the version to serve instead."
    )
    reason: Text = Field(min_length=1, description="Why, for the audit trail.")


class PromoteCreate(BaseModel):
    """Give a version all traffic now."""

    model_config = ConfigDict(extra="forbid")

    model_version: ModelVersion | None = Field(
        default=None, description="Version to promote; default: the live canary."
    )
    reason: Text = Field(min_length=1, description="Why, for the audit trail.")


async def _accepted(ctx: ServingContext, event: CloudEvent[Any]) -> Response:
    async with ctx.begin() as tx:
        await tx.publish(event)
    return _json(
        {
            "accepted": True,
            "command": type(event.data).__name__,
            "event_id": event.id,
            "model_version": event.data.model_version,
            "actor": event.actor,
        },
        202,
    )


@router.post(
    "/v1/models/{name}/rollback",
    tags=["rollouts"],
    summary="Roll back the canary or production.",
    status_code=202,
)
async def request_rollback(
    name: str, body: RollbackCreate, ctx: ContextDep, principal: OperatorDep
) -> Response:
    route = await ctx.read_route(name)
    if route is None:
        raise NotFound(f"model {name!r} is not known to serving")
    live = route.active
    allowed = [v for v in ((live.canary_version if live else None), route.stable_version) if v is not None]
    version = body.model_version or (live.canary_version if live else route.stable_version)
    if version is None or version not in allowed:
        raise Conflict(
            f"version {version} of {name!r} is not serving; it can roll back {allowed}", allowed=allowed
        )
    if live is None and body.to_version is None and route.previous_stable_version is None:
        raise Conflict(
            f"{name!r} has no earlier version to go back to: name one with to_version", allowed=allowed
        )
    payload = RollbackRequested(
        model=name, model_version=version, to_version=body.to_version, reason=body.reason
    )
    return await _accepted(ctx, new_event(payload, source=ctx.source, actor=principal.actor))


@router.post(
    "/v1/models/{name}/promote", tags=["rollouts"], summary="Promote a version now.", status_code=202
)
async def request_promote(
    name: str, body: PromoteCreate, ctx: ContextDep, principal: OperatorDep
) -> Response:
    route = await ctx.read_route(name)
    if route is None:
        raise NotFound(f"model {name!r} is not known to serving")
    live = route.active
    version = body.model_version or (live.canary_version if live else None)
    if version is None:
        raise Conflict(f"{name!r} has no live canary: name the version to promote", allowed=[])
    if version == route.stable_version:
        raise Conflict(f"version {version} of {name!r} is already stable", allowed=[])
    payload = PromoteRequested(model=name, model_version=version, reason=body.reason)
    return await _accepted(ctx, new_event(payload, source=ctx.source, actor=principal.actor))


async def _domain_error(_: Request, exc: Exception) -> Response:
    """Errors carry ``error`` (what Open Inference Protocol clients read) besides ``detail`` and ``code``."""
    assert isinstance(exc, DomainError)
    response = _json({"error": exc.message, "detail": exc.message, "code": exc.code, **exc.extra}, exc.status)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def mount(app: FastAPI, ctx: ServingContext) -> None:
    """Give the routes their context and the error shape both protocols' clients understand."""
    app.state.serving = ctx
    app.add_exception_handler(DomainError, _domain_error)
