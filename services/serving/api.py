"""Serving's HTTP surface: the Open Inference Protocol v2 (JSON), the simple v1 predict API, feedback, and
the operator's rollout commands. Both predict protocols call the same core (services/serving/scoring.py).

Predict routes read the body with orjson instead of pydantic models: with 100-row requests, model-driven
parsing would cost more than the prediction. Inputs are checked against the model's signature there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

from contracts.commands import PromoteRequested, RollbackRequested
from contracts.common import (
    VERSION_TEXT,
    FeatureType,
    Label,
    ModelName,
    ModelVersion,
    Task,
    UtcDatetime,
    label_within_float32,
    parse_version,
    unstorable_text,
)
from contracts.envelope import MAX_ATTRIBUTE_CHARS, CloudEvent, new_event
from contracts.feedback import GroundTruthReceived
from libs.auth import GRANTS, OperatorDep, PredictDep, Principal, Role, TokenStore, ViewerDep
from libs.bus.core import TransactionFactory
from libs.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized, shown
from libs.http import (
    PLATFORM_VERSION,
    BodyRoute,
    Reason,
    Text,
    VersionPath,
    check_json_content_type,
    error_body,
    json_body,
    json_keys_once,
    path_version,
)
from services.serving.domain import (
    ModelRoute,
    answering_variants,
    check_entity_keys,
    check_parameters,
    columns_from_records,
    columns_from_tensors,
    json_kind,
    parse_json,
    parse_prediction_id,
    read_json,
    refuse_unknown_members,
    shown_model,
    tensor_rows,
    tensors_from_json,
)
from services.serving.metrics import REQUEST_SECONDS
from services.serving.routing import ModelRouting, RoutingState, ServedModel
from services.serving.schemas import (
    CommandAccepted,
    InferAnswer,
    InferBody,
    ModelMetadata,
    ModelReady,
    ModelRoutePublic,
    ModelRoutes,
    PredictAnswer,
    PredictBody,
    ServerLive,
    ServerMetadata,
    ServerReady,
    VersionReady,
)
from services.serving.scoring import Predictor, PredictRequest, PredictResult

SERVER_NAME = "driftloop-serving"


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
    # One pass over the raw headers (ASGI gives their names in lower case) finds the first and any second,
    # without building Starlette's Headers; a second is refused as libs.auth refuses it: whom the first
    # names need not be whom the caller (or a proxy that added one) meant.
    found: bytes | None = None
    for key, value in request.scope["headers"]:
        if key == b"authorization":
            if found is not None:
                sent = sum(k == b"authorization" for k, _ in request.scope["headers"])
                raise Unauthorized(f"the request has {sent} Authorization headers: send one")
            found = value
    scheme, _, token = (found or b"").decode("latin-1").partition(" ")
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
    check_json_content_type(request, reason="not-json")
    return read_json(await request.body())


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


router = APIRouter(route_class=BodyRoute)
hot_router = APIRouter(route_class=BodyRoute)
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
    # The levels' one type (docs/serving.md, "Categories"): a category is sent as a value of that type.
    kinds = set(map(type, spec.categories or ()))
    if kinds == {int}:
        return "INT64"
    if kinds == {bool}:
        return "BOOL"
    return "BYTES"


def _metadata(routing: ModelRouting, served: ServedModel) -> dict[str, Any]:
    outputs: list[dict[str, Any]] = [
        {
            "name": "predict",
            # The labels' type for a classifier (with or without predict_proba), numbers for a regressor.
            "datatype": _datatype(served.classes)
            if served.signature.task is Task.CLASSIFICATION and served.classes
            else "FP64",
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


@router.get(
    "/v2",
    tags=["open inference protocol"],
    summary="Server metadata.",
    responses={200: {"model": ServerMetadata, "description": "The server's name, version and extensions."}},
)
async def server_metadata() -> Response:
    return _json({"name": SERVER_NAME, "version": PLATFORM_VERSION, "extensions": []})


@router.get(
    "/v2/health/live",
    tags=["open inference protocol"],
    summary="The server is up.",
    responses={200: {"model": ServerLive, "description": "Live."}},
)
async def server_live() -> Response:
    return _json({"live": True})


@router.get(
    "/v2/health/ready",
    tags=["open inference protocol"],
    summary="Routing is loaded; the database answers.",
    responses={
        200: {"model": ServerReady},
        503: {"model": ServerReady, "description": "Not ready: no routing loaded, or the database away."},
    },
)
async def server_ready(ctx: ContextDep) -> Response:
    checks = await ctx.ready()
    ok = all(checks.values())
    return _json({"ready": ok, "checks": checks}, 200 if ok else 503)


def _path_version(name: str, version: str) -> int:
    """The version the path names, or 404 naming the model (the message is built only then: infer with a
    version is a hot route)."""
    number = parse_version(version)
    return number if number is not None else path_version(version, f"model {shown_model(name)}")


@router.get(
    "/v2/models/{name}",
    tags=["open inference protocol"],
    summary="Model metadata.",
    responses={200: {"model": ModelMetadata, "description": "The model's inputs, outputs and versions."}},
)
async def model_metadata(name: str, ctx: ContextDep, caller: AnyTokenDep) -> Response:
    caller.check_model(name)
    routing = ctx.predictor.routing(name, caller.models)
    served = routing.default
    if served is None:
        raise NotFound(f"model {shown_model(name)} has no loaded version")
    return _json(_metadata(routing, served))


@router.get(
    "/v2/models/{name}/versions/{version}",
    tags=["open inference protocol"],
    summary="Version metadata.",
    responses={200: {"model": ModelMetadata, "description": "The version's inputs and outputs."}},
)
async def version_metadata(name: str, version: VersionPath, ctx: ContextDep, caller: AnyTokenDep) -> Response:
    caller.check_model(name)
    number = _path_version(name, version)
    routing = ctx.predictor.routing(name, caller.models)
    found = routing.by_version(number)
    if found is None:
        raise NotFound(
            f"model {shown_model(name)} version {number} is not serving; serving versions: {routing.versions}"
        )
    return _json({**_metadata(routing, found[0]), "versions": [version]})


@router.get(
    "/v2/models/{name}/ready",
    tags=["open inference protocol"],
    summary="The model can answer.",
    responses={200: {"model": ModelReady, "description": "Ready; a model that is not is a 404."}},
)
async def model_ready(name: str, ctx: ContextDep) -> Response:
    routing = ctx.state.table.models.get(name)
    if routing is None or routing.default is None:
        return _json(
            error_body(f"model {shown_model(name)} is not serving", "not-found", name=name, ready=False), 404
        )
    return _json({"name": name, "ready": True})


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    tags=["open inference protocol"],
    summary="The version can answer.",
    responses={200: {"model": VersionReady, "description": "Ready; a version that is not is a 404."}},
)
async def version_ready(name: str, version: VersionPath, ctx: ContextDep) -> Response:
    number = parse_version(version)
    if number is None:
        message = f"model {shown_model(name)} has no version {shown(version)}: {VERSION_TEXT}"
        return _json(error_body(message, "not-found", name=name, version=version, ready=False), 404)
    routing = ctx.state.table.models.get(name)
    if routing is None or routing.by_version(number) is None:
        message = f"model {shown_model(name)} version {number} is not serving"
        return _json(error_body(message, "not-found", name=name, version=version, ready=False), 404)
    return _json({"name": name, "version": version, "ready": True})


async def _infer(
    name: str, version: int | None, request: Request, ctx: ContextDep, scope: frozenset[str] | None
) -> Response:
    started = time.perf_counter()
    response = await _infer_inner(name, version, request, ctx, scope)
    REQUEST_SECONDS.labels(name, "v2").observe(time.perf_counter() - started)
    return response


async def _infer_inner(
    name: str, version: int | None, request: Request, ctx: ContextDep, scope: frozenset[str] | None
) -> Response:
    if request.headers.get("inference-header-content-length") is not None:
        raise InvalidInput(
            "the binary tensor extension is not supported: send JSON tensors (binary_data=False)",
            reason="binary-data",
        )
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise InvalidInput("the request must be a JSON object with 'inputs'", reason="wrong-type")
    refuse_unknown_members(body, _INFER_MEMBERS)
    request_id = _text_member(body.get("id"), "id")
    params = check_parameters(body.get("parameters"), "parameters")
    key = _text_member(params.get("entity_key"), "parameters.entity_key")
    tensors = tensors_from_json(body.get("inputs"))
    rows = tensor_rows(tensors)
    outputs = body.get("outputs")
    wanted = _requested_outputs(outputs)
    if outputs and "predict_proba" in wanted:
        _check_probabilities_given(ctx.predictor.routing(name, scope), version)
    result = ctx.predictor.predict(
        PredictRequest(
            model=name,
            rows=rows,
            parse=lambda sig, idx: columns_from_tensors(sig, tensors, idx),
            # One key (or one random draw) for the whole request: one version answers an OIP request.
            entity_keys=[key] * rows,
            version=version,
            scope=scope,
        )
    )
    return _json(_infer_response(name, request_id, result, wanted))


_INFER_MEMBERS = frozenset({"id", "parameters", "inputs", "outputs"})
"""What an Open Inference Protocol inference request holds (its JSON form; the binary extension aside)."""


def _text_member(value: Any, where: str) -> str | None:
    """An optional string member of the request (null: absent), holding text; 422 naming it otherwise."""
    if value is None:
        return None
    if type(value) is not str:
        raise InvalidInput(f"{where} must be a string, not {json_kind(value)}", reason="wrong-type")
    problem = unstorable_text(value)
    if problem is not None:
        raise InvalidInput(f"{where} {problem}", reason="invalid-text")
    return value


_OUTPUTS = ("predict", "predict_proba")
_OUTPUT_MEMBERS = frozenset({"name", "parameters"})


def _requested_outputs(outputs: Any) -> set[str]:
    """The outputs a request asks for. None named (``outputs`` absent or empty) is every output the model
    gives, as the protocol has it and Triton reads an empty list. An output's ``binary_data`` parameter is
    taken and answered in JSON (the binary extension is optional, and clients read JSON tensors as well);
    ``classification`` is refused: that extension's answer has another datatype and shape, which a client
    asking for it would read wrongly from the probabilities."""
    if outputs is None:
        return set(_OUTPUTS)
    if not isinstance(outputs, list):
        raise InvalidInput("outputs must be a list of {name}", reason="wrong-type")
    if not outputs:
        return set(_OUTPUTS)
    names = set()
    for i, output in enumerate(outputs):
        if not isinstance(output, dict):
            raise InvalidInput(
                f"outputs[{i}] must be an object with a name, not {json_kind(output)}", reason="wrong-type"
            )
        refuse_unknown_members(output, _OUTPUT_MEMBERS, f"outputs[{i}]")
        if "classification" in check_parameters(output.get("parameters"), f"outputs[{i}].parameters"):
            raise InvalidInput(
                f"outputs[{i}].parameters.classification: the classification extension is not "
                "supported; ask for predict_proba (its classes are the answer's parameters.classes)",
                reason="unsupported",
            )
        name = output.get("name")
        if name is None:
            raise InvalidInput(f"outputs[{i}] has no name (predict or predict_proba)", reason="missing")
        if name not in _OUTPUTS:
            shown = repr(name) if type(name) is str else json_kind(name)
            raise InvalidInput(
                f"outputs[{i}]: unknown output {shown}; outputs: predict, predict_proba", reason="unknown"
            )
        names.add(name)
    return names


def _check_probabilities_given(routing: ModelRouting, version: int | None) -> None:
    """Refuse ``predict_proba`` asked of a version that may answer and gives none (a regression model, a
    classifier without ``predict_proba``): the protocol's requested outputs are outputs of the model, as its
    metadata lists them, and an answer silently without one is one a client cannot tell from a broken one."""
    answering: list[ServedModel | None]
    if version is not None:
        found = routing.by_version(version)
        answering = [found[0] if found is not None else None]  # not serving: the predictor's 404
    else:
        answering = [routing.serving(v) for v in answering_variants(routing.view)]
    for served in answering:
        if served is not None and not served.gives_probabilities:
            kind = (
                "a regression model"
                if served.signature.task is Task.REGRESSION
                else "a classifier without predict_proba"
            )
            raise InvalidInput(
                f"output 'predict_proba': model {routing.model!r} version {served.version} is {kind} and "
                "gives no probabilities; its outputs: predict",
                reason="unknown",
            )


def _infer_response(
    name: str, request_id: str | None, result: PredictResult, wanted: set[str]
) -> dict[str, Any]:
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
        "id": request_id if request_id is not None else result.request_id,
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


@hot_router.post(
    "/v2/models/{name}/infer", tags=["open inference protocol"], summary="Score tensors.", **_INFER_DOCS
)
async def infer(name: str, request: Request) -> Response:
    """Needs a predict token whose scope holds the model (checked in the route, see :func:`_caller`)."""
    caller = _caller(request, Role.predict)
    caller.check_model(name)
    return await _infer(name, None, request, _context(request), caller.models)


@hot_router.post(
    "/v2/models/{name}/versions/{version}/infer",
    tags=["open inference protocol"],
    summary="Score tensors with one version.",
    **_INFER_DOCS,
)
async def infer_version(name: str, version: VersionPath, request: Request) -> Response:
    """Needs a predict token whose scope holds the model (checked in the route, see :func:`_caller`)."""
    caller = _caller(request, Role.predict)
    caller.check_model(name)
    return await _infer(name, _path_version(name, version), request, _context(request), caller.models)


# --- simple JSON API ---------------------------------------------------------------------------------------


@hot_router.post(
    "/v1/models/{name}/predict",
    tags=["predict"],
    summary="Score records: {records: [{feature: value}], entity_keys?: [key]}.",
    openapi_extra=json_body(PredictBody, "The rows to score, as records."),
    responses={200: {"model": PredictAnswer, "description": "One prediction per record, in order."}},
)
async def predict(name: str, request: Request) -> Response:
    """Needs a predict token whose scope holds the model (checked in the route, see :func:`_caller`)."""
    started = time.perf_counter()
    caller = _caller(request, Role.predict)
    caller.check_model(name)
    ctx = _context(request)
    check_json_content_type(request, reason="not-json")
    raw = await request.body()
    body, strict = parse_json(raw)
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        raise InvalidInput("the request must be a JSON object with a 'records' list", reason="wrong-type")
    if len(body) > 1:
        refuse_unknown_members(body, _PREDICT_MEMBERS)
    records: list[Any] = body["records"]
    keys = body.get("entity_keys")
    if keys is None:
        entity_keys: list[str | None] = [None] * len(records)
    elif not isinstance(keys, list) or len(keys) != len(records):
        raise InvalidInput(
            "entity_keys must be a list with one key (or null) per record", reason="wrong-shape"
        )
    else:
        entity_keys = check_entity_keys(keys)
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
            scope=caller.models,
        )
    )
    response = _json({"model": name, "request_id": result.request_id, "predictions": _predictions(result)})
    REQUEST_SECONDS.labels(name, "v1").observe(time.perf_counter() - started)
    return response


_PREDICT_MEMBERS = frozenset(PredictBody.model_fields)


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


def _check_label(value: Any) -> Any:
    """A label as sent, if it is one (contracts.common.GroundTruthLabel): a string holding text, an integer,
    a finite number within float32's range or a boolean. One message for every other value, where a union of
    those types would give one per member ("label.bool: Input should be a valid boolean")."""
    t = type(value)
    if t is str:
        problem = unstorable_text(value)
        if problem is not None:
            raise PydanticCustomError("label_text", "the label {problem}", {"problem": problem})
    elif t is int or t is float:
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond a double's range: no consumer could read it as a number
            finite = False
        if not finite:
            raise PydanticCustomError("label_finite", "a numeric label must be a finite number")
        label_within_float32(value)  # the event's own rule, checked here to name the item before any lookup
    elif t is not bool:
        raise PydanticCustomError(
            "label_type",
            "must be a string, integer, number or boolean, not {kind}",
            {"kind": json_kind(value)},
        )
    return value


class FeedbackCreate(BaseModel):
    """A ground-truth label for an earlier prediction."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prediction_id: Text = Field(
        min_length=1,
        max_length=MAX_ATTRIBUTE_CHARS,
        description="The id the predict response gave (another system's: at most 512 characters).",
    )
    label: Annotated[Label, PlainValidator(_check_label, json_schema_input_type=Label)] = Field(
        description="The true class label or value: a string, integer, finite number or boolean; a "
        "number's magnitude at most 3.4028235e38 (float32's range, where models compute)."
    )
    observed_at: UtcDatetime | None = Field(
        default=None, description="When the outcome was observed (with its UTC offset); now if absent."
    )
    model: ModelName | None = Field(
        default=None, description="Model name; read from the prediction id if absent."
    )
    entity_key: Text | None = Field(default=None, description="Caller's entity id, if any.")


class FeedbackAccepted(BaseModel):
    accepted: int = Field(description="Labels published.")
    event_ids: list[str] = Field(description="The GroundTruthReceived events, one per label.")


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
    if isinstance(body, dict):
        raw_items: list[Any] = [body]
    elif isinstance(body, list):
        raw_items = body
    else:
        raise InvalidInput(
            f"the body must be a feedback object or a list of them, not {json_kind(body)}",
            reason="wrong-type",
        )
    if not raw_items:
        raise InvalidInput("no feedback items", reason="empty")
    if len(raw_items) > ctx.max_feedback_items:
        raise InvalidInput(f"at most {ctx.max_feedback_items} feedback items per request", reason="too-many")
    items = [_feedback_item(i, raw) for i, raw in enumerate(raw_items)]
    events: list[CloudEvent[Any]] = []
    now = datetime.now(UTC)
    known: dict[str, bool] = {}
    for i, item in enumerate(items):
        named = parse_prediction_id(item.prediction_id)
        model = item.model or (named[0] if named else None)
        if model is None:
            raise InvalidInput(
                f"[{i}].prediction_id {item.prediction_id!r} is not a driftloop prediction id "
                "(<model>:<version>:<token>-<row>, the version an integer from 1 to 2147483647); "
                "send 'model' too for another system's id",
                reason="unknown-prediction-id",
                item=i,
            )
        if named is not None and item.model is not None and named[0] != item.model:
            raise InvalidInput(
                f"[{i}].model: prediction {item.prediction_id!r} was made by model {named[0]!r}, "
                f"not {item.model!r}",
                reason="invalid-feedback",
                item=i,
            )
        # The model the event will carry, and the one monitoring joins the label to: a scoped token labels
        # only its own models' predictions (another system's id is labelled for the model it names).
        principal.check_model(model, f"[{i}]: ", item=i)
        if model not in known:
            known[model] = model in ctx.state.table.models or await ctx.read_route(model) is not None
        if not known[model]:
            raise NotFound(
                f"[{i}]: model {model!r} is not known to serving: no version of it has served here, so it "
                "made no prediction to label"
            )
        try:
            payload = GroundTruthReceived(
                prediction_id=item.prediction_id,
                model=model,
                model_version=named[1] if named else None,
                label=item.label,
                observed_at=item.observed_at or now,
                entity_key=item.entity_key,
            )
        except ValidationError as exc:  # the checks above should leave nothing for the event to refuse
            raise _feedback_error(i, exc) from exc
        events.append(new_event(payload, source=ctx.source, actor=principal.actor))
    async with ctx.begin() as tx:
        for event in events:
            await tx.publish(event)
    return _json({"accepted": len(events), "event_ids": [e.id for e in events]}, 202)


def _feedback_item(i: int, raw: Any) -> FeedbackCreate:
    """Item ``i`` of a feedback body, validated; 422 naming the item and its field otherwise."""
    if not isinstance(raw, dict):
        raise InvalidInput(
            f"[{i}] must be an object with prediction_id and label, not {json_kind(raw)}",
            reason="invalid-feedback",
            item=i,
        )
    try:
        return FeedbackCreate.model_validate(raw)
    except ValidationError as exc:
        raise _feedback_error(i, exc) from exc


def _feedback_error(i: int, exc: ValidationError) -> InvalidInput:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return InvalidInput(
        f"[{i}].{where}: {first['msg']}" if where else f"[{i}]: {first['msg']}",
        reason="invalid-feedback",
        item=i,
    )


# --- rollout state and operator commands ----------------------------------------------------------------


def _route_public(route: ModelRoute, routing: ModelRouting | None) -> dict[str, Any]:
    r = route.rollout
    return {
        "model": route.model,
        "stable_version": route.stable_version,
        "previous_stable_version": route.previous_stable_version,
        "decided_at": route.decided_at.isoformat() if route.decided_at else None,
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


@router.get(
    "/v1/models",
    tags=["rollouts"],
    summary="Every model's routing state.",
    responses={200: {"model": ModelRoutes, "description": "Every model serving knows."}},
)
async def list_models(ctx: ContextDep, _: ViewerDep) -> Response:
    routes = await ctx.read_routes()
    table = ctx.state.table.models
    return _json({"models": [_route_public(r, table.get(r.model)) for r in routes]})


@router.get(
    "/v1/models/{name}",
    tags=["rollouts"],
    summary="One model's routing state.",
    responses={200: {"model": ModelRoutePublic, "description": "The routing state, and this replica's."}},
)
async def get_model(name: str, ctx: ContextDep, _: ViewerDep) -> Response:
    route = await ctx.read_route(name)
    if route is None:
        raise NotFound(f"model {shown_model(name)} is not known to serving")
    return _json(_route_public(route, ctx.state.table.models.get(name)))


class RollbackCreate(BaseModel):
    """Take a version off traffic."""

    model_config = ConfigDict(extra="forbid")

    model_version: ModelVersion | None = Field(
        default=None,
        strict=True,
        description="Version to take off traffic; default: the live canary, else production.",
    )
    to_version: ModelVersion | None = Field(
        default=None,
        strict=True,
        description="For a production rollback: the version to serve instead (default: the previous stable).",
    )
    reason: Reason = Field(description="Why, for the audit trail (not only white space).")


class PromoteCreate(BaseModel):
    """Give a version all traffic now."""

    model_config = ConfigDict(extra="forbid")

    model_version: ModelVersion | None = Field(
        default=None,
        strict=True,
        description="Version to promote: the live canary (the default). Another registered version is "
        "promoted through the registry, which knows them all.",
    )
    reason: Reason = Field(description="Why, for the audit trail (not only white space).")


_ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {"model": CommandAccepted, "description": "Published; its handler acts on it."}
}


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
    dependencies=[Depends(json_keys_once)],
    responses=_ACCEPTED,
)
async def request_rollback(
    name: str, body: RollbackCreate, ctx: ContextDep, principal: OperatorDep
) -> Response:
    route = await ctx.read_route(name)
    if route is None:
        raise NotFound(f"model {shown_model(name)} is not known to serving")
    # What the routing state shows would change nothing is refused here; the handler checks again, against
    # the state when the command arrives (and that the target version exists and loads).
    live = route.active
    # While a canary is live only it can go; production's turn comes after (the handler's rule).
    if live is not None:
        allowed = [live.canary_version]
    else:
        allowed = [route.stable_version] if route.stable_version is not None else []
    version = body.model_version or (live.canary_version if live else route.stable_version)
    if live is not None and version is not None and version == route.stable_version:
        raise Conflict(
            f"rollout {live.rollout_id} of {shown_model(name)} is live: roll back its canary (version "
            f"{live.canary_version}) first, then the production version {version}",
            allowed=allowed,
        )
    if version is None or version not in allowed:
        raise Conflict(
            f"version {version} of {shown_model(name)} is not serving; it can roll back {allowed}",
            allowed=allowed,
        )
    if live is not None and body.to_version is not None:
        raise Conflict(
            f"to_version is for a production rollback: rolling back the canary (version {version}) of "
            f"{shown_model(name)} gives its traffic back to the stable version {route.stable_version}",
            allowed=allowed,
        )
    if live is None:
        target = body.to_version if body.to_version is not None else route.previous_stable_version
        if target is None:
            raise Conflict(
                f"{shown_model(name)} has no earlier version to go back to: name one with to_version",
                allowed=allowed,
            )
        if target == version:
            raise Conflict(
                f"version {version} of {shown_model(name)} is the version being rolled back: to_version "
                "must name another one",
                allowed=allowed,
            )
    payload = RollbackRequested(
        model=name, model_version=version, to_version=body.to_version, reason=body.reason
    )
    return await _accepted(ctx, new_event(payload, source=ctx.source, actor=principal.actor))


@router.post(
    "/v1/models/{name}/promote",
    tags=["rollouts"],
    summary="Promote a version now.",
    status_code=202,
    dependencies=[Depends(json_keys_once)],
    responses=_ACCEPTED,
)
async def request_promote(
    name: str, body: PromoteCreate, ctx: ContextDep, principal: OperatorDep
) -> Response:
    route = await ctx.read_route(name)
    if route is None:
        raise NotFound(f"model {shown_model(name)} is not known to serving")
    live = route.active
    allowed = [live.canary_version] if live else []
    version = body.model_version or (live.canary_version if live else None)
    if version is None:
        raise Conflict(f"{shown_model(name)} has no live canary to promote", allowed=allowed)
    if version == route.stable_version:
        raise Conflict(f"version {version} of {shown_model(name)} is already stable", allowed=allowed)
    if live is None or version != live.canary_version:
        # Serving knows the versions its routes name, not every registered one: those the registry promotes
        # (its endpoint checks that the version exists and may be promoted).
        canary = f"the live canary is version {live.canary_version}" if live else "no canary is live"
        raise Conflict(
            f"version {version} of {shown_model(name)} is not loaded here ({canary}): this endpoint "
            f"promotes the live canary; promote another registered version through the registry "
            f"(POST /v1/models/{name}/versions/{version}/promote)",
            allowed=allowed,
        )
    payload = PromoteRequested(model=name, model_version=version, reason=body.reason)
    return await _accepted(ctx, new_event(payload, source=ctx.source, actor=principal.actor))


def mount(app: FastAPI, ctx: ServingContext) -> None:
    """Give the routes their context. Their errors have the shape both protocols' clients understand, as
    every service's do (``libs.http.error_body``)."""
    app.state.serving = ctx
