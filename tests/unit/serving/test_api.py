"""Serving's HTTP surface and prediction core on an in-memory routing table with real tiny models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import orjson
import pandas as pd
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from pydantic import BaseModel

from contracts.commands import PromoteRequested, RollbackRequested
from contracts.common import Task
from contracts.envelope import CloudEvent
from contracts.feedback import GroundTruthReceived
from contracts.predictions import Variant
from contracts.rollouts import RolloutMode
from libs.auth import Role, TokenStore, issue_token
from libs.http import create_app
from libs.modelspec import FLOAT32_MAX
from services.serving import api, schemas
from services.serving.adapters.prediction_log import COLUMNWISE_FROM_ROWS, FRAME, Unpacker, encode, pack
from services.serving.domain import ModelRoute, Rollout, RolloutStatus, parse_prediction_id
from services.serving.routing import ModelRouting, RoutingState, RoutingTable, ServedModel
from services.serving.scoring import CanaryStats, LogItem, Predictor, PredictResult
from services.serving.settings import ServingSettings
from tests.unit import metrics_lint
from tests.unit.serving.fakes import Clock, churn_pipeline, churn_signature, record
from tests.unit.test_openapi_errors import conforms

PREDICT = {"Authorization": "Bearer dev-predict"}
VIEWER = {"Authorization": "Bearer dev-viewer"}
OPERATOR = {"Authorization": "Bearer dev-operator"}
PIPELINE = churn_pipeline()


class Broken:
    """An estimator whose every call fails, as a bad canary would."""

    classes_ = PIPELINE.classes_

    def predict_proba(self, frame: Any) -> Any:
        raise RuntimeError("boom")

    def predict(self, frame: Any) -> Any:
        raise RuntimeError("boom")


def served(version: int, estimator: Any = PIPELINE) -> ServedModel:
    return ServedModel("churn", version, f"{version:02x}" * 32, churn_signature(), estimator)


@dataclass
class FakeLog:
    items: list[LogItem] = field(default_factory=list)

    def offer(self, item: LogItem) -> bool:
        self.items.append(item)
        return True


@dataclass
class Outbox:
    events: list[CloudEvent[Any]] = field(default_factory=list)

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        pending: list[CloudEvent[Any]] = []

        class Tx:
            conn = None

            async def publish(self, event: CloudEvent[Any]) -> None:
                pending.append(event)

        yield Tx()
        self.events.extend(pending)


@dataclass
class Service:
    client: httpx.AsyncClient
    state: RoutingState
    log: FakeLog
    outbox: Outbox
    routes: dict[str, ModelRoute]
    breaches: list[tuple[str, str, str]]
    predictor: Predictor
    app: FastAPI

    def route(
        self, stable: ServedModel | None, canary: ServedModel | None = None, weight: float = 0.0, **kw: Any
    ) -> None:
        routing = ModelRouting(
            model="churn",
            stable=stable,
            canary=canary,
            rollout_id="r-1" if canary else None,
            weight=weight,
            mode=kw.get("mode", RolloutMode.CANARY),
            step_index=0,
        )
        self.state.swap(RoutingTable({"churn": routing}))
        clock = Clock()
        rollout = None
        if canary is not None:
            rollout = Rollout(
                rollout_id="r-1",
                canary_version=canary.version,
                stable_version=stable.version if stable else None,
                mode=routing.mode,
                steps=(0.1, 0.5, 1.0),
                step_index=0,
                min_samples=10,
                bake_seconds=1,
                started_at=clock(),
                step_started_at=clock(),
            )
        self.routes["churn"] = ModelRoute(
            "churn",
            stable.version if stable else None,
            None if stable is None or stable.version == 1 else 1,
            rollout,
            decided_at=clock(),
        )


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    settings = ServingSettings(env="test", max_request_bytes=20_000, max_rows_per_request=50)
    state = RoutingState()
    log = FakeLog()
    outbox = Outbox()
    routes: dict[str, ModelRoute] = {}
    breaches: list[tuple[str, str, str]] = []
    stats = CanaryStats(threshold=0.05, min_requests=5, on_breach=lambda *a: breaches.append(a))
    predictor = Predictor(state, log, stats, max_rows=settings.max_rows_per_request)

    async def read_route(model: str) -> ModelRoute | None:
        return routes.get(model)

    async def read_routes() -> list[ModelRoute]:
        return list(routes.values())

    async def ready() -> dict[str, bool]:
        return {"routing": state.synced.is_set()}

    app = create_app(settings, title="t", description="t", hot=[api.hot_router], routers=[api.router])
    api.mount(
        app,
        api.ServingContext(
            predictor=predictor,
            state=state,
            begin=outbox.begin,
            source="/driftloop/serving",
            read_route=read_route,
            read_routes=read_routes,
            ready=ready,
        ),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serving") as client:
        s = Service(client, state, log, outbox, routes, breaches, predictor, app)
        s.route(served(1))
        yield s


async def predict(
    s: Service, records: list[dict[str, Any]], headers: dict[str, str] = PREDICT, **body: Any
) -> httpx.Response:
    return await s.client.post("/v1/models/churn/predict", json={"records": records, **body}, headers=headers)


# --- the simple JSON API --------------------------------------------------------------------------------


async def test_predict_returns_ids_versions_variants_and_probabilities(service: Service) -> None:
    r = await predict(service, [record(), record(tenure_months=60, plan="premium")])
    assert r.status_code == 200, r.text
    body = r.json()
    expected = PIPELINE.predict(
        served(1).frame(churn_signature_columns([record(), record(tenure_months=60, plan="premium")]))
    ).tolist()
    assert [p["prediction"] for p in body["predictions"]] == expected
    for p in body["predictions"]:
        assert parse_prediction_id(p["prediction_id"]) == ("churn", 1)
        assert p["model_version"] == 1 and p["variant"] == "stable"
        assert set(p["probabilities"]) == {"0", "1"} and sum(p["probabilities"].values()) == pytest.approx(1)
    [logged] = service.log.items
    assert logged.variant is Variant.STABLE and logged.prediction_ids == [
        p["prediction_id"] for p in body["predictions"]
    ]


def churn_signature_columns(records: list[dict[str, Any]]) -> Any:
    from services.serving.domain import columns_from_records

    return columns_from_records(churn_signature(), records)


async def test_rows_split_between_variants_log_one_event_per_variant(service: Service) -> None:
    service.route(served(1), served(2), weight=0.5)
    keys = [f"customer-{i}" for i in range(40)]
    r = await predict(service, [record(tenure_months=i) for i in range(40)], entity_keys=keys)
    rows = r.json()["predictions"]
    assert {(p["variant"], p["model_version"]) for p in rows} == {("stable", 1), ("canary", 2)}
    by_variant = {item.variant: item for item in service.log.items}
    assert set(by_variant) == {Variant.STABLE, Variant.CANARY}
    assert by_variant[Variant.CANARY].rollout_id == "r-1" and by_variant[Variant.STABLE].rollout_id is None
    canary_ids = [p["prediction_id"] for p in rows if p["variant"] == "canary"]
    assert by_variant[Variant.CANARY].prediction_ids == canary_ids
    again = await predict(service, [record(tenure_months=i) for i in range(40)], entity_keys=keys)
    assert [p["variant"] for p in again.json()["predictions"]] == [p["variant"] for p in rows]


def _answer(
    versions: list[int],
    variants: list[Variant],
    classes: dict[int, list[Any] | None],
    probabilities: list[list[float] | None],
) -> PredictResult:
    n = len(versions)
    return PredictResult(
        request_id="req-1",
        labels=[i % 2 for i in range(n)],
        probabilities=probabilities,
        classes=classes,
        versions=versions,
        variants=variants,
        prediction_ids=[f"churn:{v}:t-{i}" for i, v in enumerate(versions)],
    )


def _row_by_row(result: PredictResult) -> list[dict[str, Any]]:
    """The v1 answer's rows spelled out one at a time, as the API documents them."""
    rows = []
    for i, version in enumerate(result.versions):
        row: dict[str, Any] = {
            "prediction_id": result.prediction_ids[i],
            "prediction": result.labels[i],
            "model_version": version,
            "variant": result.variants[i],
        }
        names, probs = result.classes[version], result.probabilities[i]
        if names is not None and probs is not None:
            row["probabilities"] = {str(c): p for c, p in zip(names, probs, strict=True)}
        rows.append(row)
    return rows


@pytest.mark.parametrize(
    "result",
    [
        _answer([1] * 3, [Variant.STABLE] * 3, {1: [0, 1]}, [[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]),
        _answer([2] * 2, [Variant.CANARY] * 2, {2: ["a", "b", "c"]}, [[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]),
        _answer([1] * 2, [Variant.STABLE] * 2, {1: None}, [None, None]),
        _answer(
            [1, 2, 1],
            [Variant.STABLE, Variant.CANARY, Variant.STABLE],
            {1: [0, 1], 2: [0, 1]},
            [[0.2, 0.8], [0.7, 0.3], [0.5, 0.5]],
        ),
        _answer([1, 1], [Variant.STABLE, Variant.CANARY], {1: [0, 1]}, [[0.2, 0.8], [0.7, 0.3]]),
    ],
    ids=["binary", "three-classes", "regressor", "split-canary", "one-version-two-variants"],
)
def test_the_answer_rows_are_those_built_one_at_a_time(result: PredictResult) -> None:
    assert api._predictions(result) == _row_by_row(result)


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer nope"}, 401), (VIEWER, 403), (OPERATOR, 403)],
)
async def test_predict_needs_a_predict_token(service: Service, headers: dict[str, str], status: int) -> None:
    assert (await predict(service, [record()], headers=headers)).status_code == status


@pytest.mark.parametrize(
    "path", ["/v1/models/churn/predict", "/v2/models/churn/infer", "/v2/models/churn/versions/1/infer"]
)
async def test_a_hot_lane_request_with_two_authorization_headers_is_401(service: Service, path: str) -> None:
    # The lane read the first and ignored the rest, where every libs.auth route refuses the request.
    body = {"records": [record()]} if path.startswith("/v1") else oip_body()
    for first, second in (("Bearer dev-predict", "Bearer nope"), ("Bearer nope", "Bearer dev-predict")):
        headers = [("Authorization", first), ("Authorization", second)]
        r = await service.client.post(path, json=body, headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["detail"] == "the request has 2 Authorization headers: send one"
    r = await service.client.get("/v2/models/churn", headers=[("Authorization", "Bearer dev-viewer")] * 3)
    assert r.status_code == 401 and r.json()["detail"] == "the request has 3 Authorization headers: send one"


async def test_bad_feature_is_a_422_naming_it(service: Service) -> None:
    r = await predict(service, [record(), record(plan=3.5)])
    assert r.status_code == 422
    assert (
        r.json()["feature"] == "plan"
        and r.json()["reason"] == "wrong-type"
        and "'plan'" in r.json()["detail"]
    )
    r = await predict(service, [{"tenure_months": 1, "plan": "basic"}])
    assert (
        r.status_code == 422 and r.json()["feature"] == "monthly_charges" and r.json()["reason"] == "missing"
    )
    r = await predict(service, [record(), record(plan=["basic"])])
    assert (r.status_code, r.json().get("feature"), r.json()["reason"]) == (422, "plan", "wrong-type"), r.text
    assert r.json()["detail"] == (
        "feature 'plan' (row 1): expected a category (string, integer or boolean), got a list"
    )


async def test_nan_is_missing_and_infinity_is_refused(service: Service) -> None:
    nan = b'{"records": [{"tenure_months": NaN, "monthly_charges": null, "plan": null}]}'
    r = await service.client.post("/v1/models/churn/predict", content=nan, headers=PREDICT)
    assert r.status_code == 200, r.text
    assert service.log.items[-1].raw_rows == [
        {"tenure_months": pytest.approx(float("nan"), nan_ok=True), "monthly_charges": None, "plan": None}
    ]
    inf = b'{"records": [{"tenure_months": Infinity, "monthly_charges": 1, "plan": "basic"}]}'
    r = await service.client.post("/v1/models/churn/predict", content=inf, headers=PREDICT)
    assert r.status_code == 422 and r.json()["reason"] == "infinite"


async def test_the_log_may_cut_records_only_out_of_a_strict_body_holding_nothing_else(
    service: Service,
) -> None:
    await predict(service, [record(), record()])
    assert service.log.items[-1].body_records == 2
    await predict(service, [record(), record()], entity_keys=["a", "b"])
    assert service.log.items[-1].body_records is None
    nan = b'{"records": [{"tenure_months": NaN, "monthly_charges": null, "plan": null}]}'
    await service.client.post("/v1/models/churn/predict", content=nan, headers=PREDICT)
    assert service.log.items[-1].body == nan and service.log.items[-1].body_records is None


async def test_size_and_row_limits_are_413(service: Service) -> None:
    assert (await predict(service, [record()] * 51)).status_code == 413
    big = await predict(service, [record(plan="x" * 30_000)])
    assert big.status_code == 413


async def test_not_json_and_unknown_model(service: Service) -> None:
    r = await service.client.post("/v1/models/churn/predict", content=b"{oops", headers=PREDICT)
    assert r.status_code == 422 and r.json()["reason"] == "not-json"
    r = await service.client.post("/v1/models/other/predict", json={"records": [record()]}, headers=PREDICT)
    assert r.status_code == 404 and "churn" in r.json()["detail"]


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        ("utf-16", "the JSON body reads as UTF-16, not UTF-8: send it as UTF-8"),
        ("utf-32-be", "the JSON body reads as UTF-32BE, not UTF-8: send it as UTF-8"),
        (
            "utf-8-sig",
            "the JSON body starts with a byte order mark (bytes EF BB BF): send it as UTF-8 without one",
        ),
    ],
)
async def test_a_body_that_is_not_utf8_is_422_on_the_predict_and_command_routes(
    service: Service, encoding: str, message: str
) -> None:
    # orjson refuses these, and the fallback for NaN literals (Python's json, on bytes) read them: JSON
    # between systems is UTF-8 without a byte order mark (RFC 8259, section 8.1).
    service.route(served(1), served(2), weight=0.1)
    body = orjson.dumps({"records": [record()]}).decode().encode(encoding)
    headers = {**PREDICT, "content-type": "application/json"}
    r = await service.client.post("/v1/models/churn/predict", content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == message and r.json()["reason"] == "not-json"
    headers = {**OPERATOR, "content-type": "application/json"}
    r = await service.client.post(
        "/v1/models/churn/rollback", content='{"reason": "x"}'.encode(encoding), headers=headers
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == message
    assert service.outbox.events == [] and service.log.items == []


@pytest.mark.parametrize("path", ["/v1/models/churn/predict", "/v2/models/churn/infer", "/v1/feedback"])
@pytest.mark.parametrize("content_type", ["", "text/plain", "application/x-www-form-urlencoded", "json"])
async def test_a_body_sent_as_another_content_type_than_json_is_422_naming_it(
    service: Service, path: str, content_type: str
) -> None:
    # These routes read their body themselves, as JSON whatever the header said: an empty Content-Type, or
    # a form's, was scored as JSON where every other route of the platform refuses it.
    body = orjson.dumps({"records": [record()]})
    r = await service.client.post(path, content=body, headers={**PREDICT, "content-type": content_type})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "content-type" and r.json()["reason"] == "not-json"
    assert r.json()["detail"] == (
        "the request body was not read as JSON: send it with Content-Type: application/json (it came as "
        f"{content_type!r})"
    )


@pytest.mark.parametrize(
    "content_type", [None, "application/json", "Application/JSON; charset=utf-8", "application/x+json"]
)
async def test_a_body_sent_as_json_or_without_a_content_type_is_read(
    service: Service, content_type: str | None
) -> None:
    # Open Inference Protocol clients (tritonclient) send no Content-Type.
    headers = PREDICT if content_type is None else {**PREDICT, "content-type": content_type}
    body = orjson.dumps({"records": [record()]})
    r = await service.client.post("/v1/models/churn/predict", content=body, headers=headers)
    assert r.status_code == 200, r.text


async def test_failing_canary_is_answered_by_the_stable_and_its_error_rate_rolls_it_back(
    service: Service,
) -> None:
    service.route(served(1), served(2, Broken()), weight=1.0)
    for _ in range(6):
        r = await predict(service, [record()])
        assert r.status_code == 200
        assert r.json()["predictions"][0]["model_version"] == 1
    # Reported at each failure over the threshold (from the 5th of 5, min_requests): bootstrap keeps one
    # rollback attempt at a time, and makes another if one fails.
    assert [b[:2] for b in service.breaches] == [("churn", "r-1")] * 2
    assert "failed 5 of 5" in service.breaches[0][2]


def model_errors() -> dict[str, float]:
    """`driftloop_serving_model_errors_total` of churn, by version."""
    return {
        v: REGISTRY.get_sample_value(
            "driftloop_serving_model_errors_total", {"model": "churn", "version": v, "variant": variant}
        )
        or 0.0
        for v, variant in (("1", "stable"), ("2", "canary"))
    }


@pytest.mark.parametrize("canary", [False, True], ids=["stable", "canary"])
async def test_input_the_signature_refuses_is_a_422_not_a_model_error(service: Service, canary: bool) -> None:
    """A model error is a model call that failed: a client sending rows the signature refuses (here with a
    feature the model does not have) called no model, and does not raise any version's error count."""
    if canary:
        service.route(served(1), served(2), weight=1.0)
    before = model_errors()

    for _ in range(3):
        r = await predict(service, [record(colour="red")])
        assert r.status_code == 422 and "colour" in r.json()["detail"]
    body = oip_body()
    body["inputs"] = body["inputs"][:2]  # no plan
    assert (
        await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
    ).status_code == 422

    assert model_errors() == before
    service.route(served(1, Broken()))
    assert (await predict(service, [record()])).status_code == 503
    assert model_errors()["1"] == before["1"] + 1  # a model that fails still counts


async def test_shadow_answers_with_the_stable_and_logs_the_candidate(service: Service) -> None:
    service.route(served(1), served(2), weight=1.0, mode=RolloutMode.SHADOW)
    r = await predict(service, [record(), record(plan="plus")])
    assert {p["variant"] for p in r.json()["predictions"]} == {"stable"}
    service.predictor.score_shadow(service.predictor.shadow_queue.get_nowait())
    stable, shadow = service.log.items
    assert shadow.variant is Variant.SHADOW and shadow.version == 2
    assert (
        shadow.prediction_ids
        == stable.prediction_ids
        == [p["prediction_id"] for p in r.json()["predictions"]]
    )


def shadow_dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("driftloop_serving_shadow_dropped_total", {"reason": reason}) or 0.0


async def test_a_shadow_scoring_over_the_byte_bound_is_dropped_and_counted_while_the_answer_is_served(
    service: Service,
) -> None:
    service.route(served(1), served(2), weight=1.0, mode=RolloutMode.SHADOW)
    service.predictor.shadow_buffer_bytes = 10_000  # a one-row request's job fits, a 50-row one's does not
    before = shadow_dropped("bytes-full")

    r = await predict(service, [record(tenure_months=i) for i in range(50)])

    assert r.status_code == 200, r.text
    assert [p["variant"] for p in r.json()["predictions"]] == ["stable"] * 50
    assert service.predictor.shadow_queue.empty() and service.predictor.shadow_bytes == 0
    assert shadow_dropped("bytes-full") == before + 1
    assert [i.variant for i in service.log.items] == [Variant.STABLE]  # the answer is logged all the same

    assert (await predict(service, [record()])).status_code == 200
    assert service.predictor.shadow_queue.qsize() == 1 and shadow_dropped("bytes-full") == before + 1


async def test_a_scored_shadow_job_releases_its_bytes_for_the_next(service: Service) -> None:
    service.route(served(1), served(2), weight=1.0, mode=RolloutMode.SHADOW)
    records = [record(tenure_months=i) for i in range(20)]
    await predict(service, records)
    held = service.predictor.shadow_bytes
    assert held > 0
    service.predictor.shadow_buffer_bytes = held + held // 2  # room for one such job, not two
    before = shadow_dropped("bytes-full")

    await predict(service, records)
    assert service.predictor.shadow_queue.qsize() == 1 and shadow_dropped("bytes-full") == before + 1

    # The scorer's own loop, run until the queue is empty: the job is scored and its bytes go with it.
    await service.predictor.run_shadow(service.predictor.shadow_queue.empty)
    assert service.predictor.shadow_bytes == 0
    assert [i.variant for i in service.log.items].count(Variant.SHADOW) == 1

    await predict(service, records)
    assert service.predictor.shadow_queue.qsize() == 1 and service.predictor.shadow_bytes == held
    assert shadow_dropped("bytes-full") == before + 1


async def test_a_shadow_scoring_past_the_job_bound_is_dropped_and_counted_as_queue_full(
    service: Service,
) -> None:
    service.route(served(1), served(2), weight=1.0, mode=RolloutMode.SHADOW)
    service.predictor.shadow_queue = asyncio.Queue(maxsize=1)
    before = shadow_dropped("queue-full"), shadow_dropped("bytes-full")

    answers = [await predict(service, [record()]) for _ in range(2)]

    assert [r.status_code for r in answers] == [200, 200]
    assert service.predictor.shadow_queue.qsize() == 1
    assert (shadow_dropped("queue-full"), shadow_dropped("bytes-full")) == (before[0] + 1, before[1])


async def test_what_serving_offers_the_log_reads_back_in_the_producer_as_offered(service: Service) -> None:
    """The hand-off carries the model's arrays and the ids' prefix, not the formatted values: the producer
    must rebuild from them the very events the offered items encode to."""
    await predict(service, [record()])
    service.route(served(1), served(2), weight=0.5)
    await predict(
        service, [record(tenure_months=i) for i in range(40)], entity_keys=[f"c-{i}" for i in range(40)]
    )
    await service.client.post("/v2/models/churn/infer", json=oip_body(3), headers=PREDICT)
    service.route(served(1), served(2), weight=1.0, mode=RolloutMode.SHADOW)
    await predict(service, [record(), record(plan="plus")])
    service.predictor.score_shadow(service.predictor.shadow_queue.get_nowait())
    items = service.log.items
    assert len(items) == 6 and {i.variant for i in items} == set(Variant)

    unpack, last = Unpacker(), None
    for offered in items:
        frame = pack(offered, body_sent=offered.body is not None and offered.body is last)
        last = offered.body
        size, head = FRAME.unpack(frame[: FRAME.size])
        assert size == len(frame) - FRAME.size
        read = unpack(frame[FRAME.size :], head)
        expected = [wire[2] for wire in encode(offered, source="/s", max_bytes=1_000_000)]
        assert [wire[2] for wire in encode(read, source="/s", max_bytes=1_000_000)] == expected
        assert offered.scores.array is not None
        if len(offered.prediction_ids) >= COLUMNWISE_FROM_ROWS:  # smaller items go as lists
            assert b"probabilities" not in frame
            if offered.variant is not Variant.SHADOW:  # a shadow's ids are the answering version's
                assert offered.id_prefix is not None and offered.prediction_ids[-1].encode() not in frame


# --- Open Inference Protocol ------------------------------------------------------------------------------


def oip_body(rows: int = 2, plans: list[Any] | None = None, plan_datatype: str = "BYTES") -> dict[str, Any]:
    return {
        "id": "my-request",
        "inputs": [
            {"name": "tenure_months", "shape": [rows], "datatype": "FP64", "data": [3.0] * rows},
            {"name": "monthly_charges", "shape": [rows], "datatype": "FP64", "data": [50.0] * rows},
            {"name": "plan", "shape": [rows], "datatype": plan_datatype, "data": plans or ["basic"] * rows},
        ],
    }


async def test_oip_infer_gives_predict_and_proba_tensors(service: Service) -> None:
    r = await service.client.post("/v2/models/churn/infer", json=oip_body(), headers=PREDICT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "churn" and body["model_version"] == "1" and body["id"] == "my-request"
    predict_out, proba = body["outputs"]
    assert (
        predict_out["name"] == "predict"
        and predict_out["shape"] == [2]
        and predict_out["datatype"] == "INT64"
    )
    assert proba["shape"] == [2, 2] and len(proba["data"]) == 4
    assert body["parameters"]["variant"] == "stable" and len(body["parameters"]["prediction_ids"]) == 2


async def test_the_openapi_document_describes_the_bodies_the_predict_routes_take_and_give(
    service: Service,
) -> None:
    # The routes read their bodies themselves; the documented models must say what they really do.
    records = [record(), record(tenure_months=60, plan="premium")]
    split = [*records, record(tenure_months=3)]
    service.route(served(1), served(2), weight=0.5)
    asked: list[tuple[str, type[BaseModel], dict[str, Any], type[BaseModel]]] = [
        ("/v1/models/churn/predict", schemas.PredictBody, {"records": records}, schemas.PredictAnswer),
        (
            "/v1/models/churn/predict",
            schemas.PredictBody,
            {"records": split, "entity_keys": ["a", None, "c"]},
            schemas.PredictAnswer,
        ),
        ("/v2/models/churn/infer", schemas.InferBody, oip_body(), schemas.InferAnswer),
    ]
    for path, body_model, body, answer_model in asked:
        body_model.model_validate(body)
        r = await service.client.post(path, json=body, headers=PREDICT)
        assert r.status_code == 200, r.text
        answer_model.model_validate(r.json())
    ids = [p["prediction_id"] for p in (await predict(service, records)).json()["predictions"]]
    labels = [{"prediction_id": ids[0], "label": 1}, {"prediction_id": ids[1], "label": 0}]
    r = await service.client.post("/v1/feedback", json=labels, headers=PREDICT)
    assert r.status_code == 202, r.text
    api.FeedbackAccepted.model_validate(r.json())

    spec = service.app.openapi()
    for path in ("/v1/models/{name}/predict", "/v2/models/{name}/infer", "/v1/feedback"):
        body = spec["paths"][path]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"]
        assert "$ref" not in str(body), "a reference into $defs would not resolve in the OpenAPI document"


async def test_oip_version_routes_and_errors_carry_an_error_field(service: Service) -> None:
    service.route(served(1), served(2), weight=0.1)
    r = await service.client.post("/v2/models/churn/versions/2/infer", json=oip_body(), headers=PREDICT)
    assert (
        r.status_code == 200
        and r.json()["model_version"] == "2"
        and r.json()["parameters"]["variant"] == "canary"
    )
    r = await service.client.post("/v2/models/churn/versions/7/infer", json=oip_body(), headers=PREDICT)
    assert r.status_code == 404 and "[1, 2]" in r.json()["error"]
    bad = oip_body()
    bad["inputs"][2]["datatype"] = "FP32"
    r = await service.client.post("/v2/models/churn/infer", json=bad, headers=PREDICT)
    assert r.status_code == 422 and r.json()["feature"] == "plan" and "error" in r.json()


@pytest.mark.parametrize("mode", [RolloutMode.CANARY, RolloutMode.SHADOW])
async def test_a_request_naming_the_canary_version_is_no_sample_of_the_rollout(
    service: Service, mode: RolloutMode
) -> None:
    # The rollout's weight did not send it there: counted, one client calling the version could fill a step's
    # samples (and dilute its error rate), and the log would show it as the rollout's traffic.
    service.route(served(1), served(2), weight=0.1, mode=mode)
    for _ in range(3):
        r = await service.client.post("/v2/models/churn/versions/2/infer", json=oip_body(), headers=PREDICT)
        assert r.status_code == 200 and r.json()["model_version"] == "2", r.text
        assert r.json()["parameters"]["variant"] == "canary"
    assert service.predictor.stats.counts == {}
    logged = [(i.version, i.variant, i.rollout_id) for i in service.log.items]
    assert logged == [(2, Variant.CANARY, None)] * 3

    service.route(served(1), served(2), weight=1.0)  # routed canary traffic still counts
    r = await service.client.post("/v2/models/churn/infer", json=oip_body(), headers=PREDICT)
    assert r.status_code == 200 and r.json()["model_version"] == "2", r.text
    assert [(c.rows, c.requests) for c in service.predictor.stats.counts.values()] == [(2, 1)]
    assert service.log.items[-1].rollout_id == "r-1"


async def test_oip_metadata_and_health(service: Service) -> None:
    assert (await service.client.get("/v2/health/live")).json() == {"live": True}
    assert (await service.client.get("/v2/health/ready")).status_code == 200
    assert (await service.client.get("/v2")).json()["name"] == "driftloop-serving"
    assert (await service.client.get("/v2/models/churn/ready")).status_code == 200
    not_ready = await service.client.get("/v2/models/other/ready")
    assert not_ready.status_code == 404
    assert not_ready.json() == {
        "error": "model 'other' is not serving",
        "detail": "model 'other' is not serving",
        "code": "not-found",
        "name": "other",
        "ready": False,
    }
    not_ready = await service.client.get("/v2/models/churn/versions/9/ready")
    assert not_ready.status_code == 404
    assert not_ready.json()["error"] == "model 'churn' version 9 is not serving"
    assert (await service.client.get("/v2/models/churn")).status_code == 401
    meta = (await service.client.get("/v2/models/churn", headers=PREDICT)).json()
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [
        ("tenure_months", "FP64"),
        ("monthly_charges", "FP64"),
        ("plan", "BYTES"),
    ]
    assert [o["name"] for o in meta["outputs"]] == ["predict", "predict_proba"] and meta["versions"] == ["1"]
    # These tests serve the pipeline itself (no compiled copy): the metadata says so.
    assert meta["parameters"]["engine"] == "scikit-learn"


async def test_the_metadata_routing_and_command_answers_are_what_the_document_says(service: Service) -> None:
    # Built with orjson, not through a response model: the document's schemas are checked here instead.
    doc = service.app.openapi()
    asked = [
        ("get", "/v2", "/v2", {}),
        ("get", "/v2/health/live", "/v2/health/live", {}),
        ("get", "/v2/models/{name}", "/v2/models/churn", PREDICT),
        ("get", "/v2/models/{name}/versions/{version}", "/v2/models/churn/versions/1", PREDICT),
        ("get", "/v2/models/{name}/ready", "/v2/models/churn/ready", {}),
        ("get", "/v2/models/{name}/versions/{version}/ready", "/v2/models/churn/versions/1/ready", {}),
        ("get", "/v1/models", "/v1/models", VIEWER),
        ("get", "/v1/models/{name}", "/v1/models/churn", VIEWER),
    ]
    answers = []
    service.route(served(1))  # no rollout
    for method, path, url, headers in asked:
        answers.append((method, path, await service.client.request(method, url, headers=headers)))
    service.route(served(1), served(2), weight=0.5)  # a live canary
    for method, path, url, headers in asked:
        answers.append((method, path, await service.client.request(method, url, headers=headers)))
    for command in ("rollback", "promote"):
        service.route(served(1), served(2), weight=0.5)
        r = await service.client.post(f"/v1/models/churn/{command}", json={"reason": "x"}, headers=OPERATOR)
        answers.append(("post", f"/v1/models/{{name}}/{command}", r))
    service.routes["churn"] = replace(service.routes["churn"], rollout=ended_rollout())
    answers.append(("get", "/v1/models/{name}", await service.client.get("/v1/models/churn", headers=VIEWER)))

    wrong = []
    for method, path, r in answers:
        assert r.status_code in (200, 202), f"{method} {path}: {r.text}"
        wrong += [f"{method.upper()} {path}: {e}" for e in conforms(doc, path, method, r)]
    assert wrong == []
    assert answers[-1][2].json()["rollout"]["ended_at"] is not None


def ended_rollout() -> Rollout:
    clock = Clock()
    return Rollout(
        rollout_id="r-0",
        canary_version=2,
        stable_version=1,
        mode=RolloutMode.SHADOW,
        steps=(1.0,),
        step_index=0,
        min_samples=10,
        bake_seconds=1,
        started_at=clock(),
        step_started_at=clock(),
        status=RolloutStatus.ROLLED_BACK,
        ended_at=clock(),
        end_reason="error rate",
    )


@pytest.mark.parametrize(
    ("url", "headers", "status"),
    [
        ("/health/live", {}, 200),
        ("/health/ready", {}, 200),
        ("/v2", {}, 200),
        ("/v2/health/live", {}, 200),
        ("/v2/health/ready", {}, 200),
        ("/v2/models/churn/ready", {}, 200),
        ("/v2/models/churn/versions/1/ready", {}, 200),
        ("/v2/models/other/ready", {}, 404),
        ("/v2/models/churn", PREDICT, 200),
        ("/v2/models/churn", {}, 401),
        ("/v2/models/churn/versions/1", PREDICT, 200),
        ("/v2/models/churn/versions/9", PREDICT, 404),
        ("/v1/models", VIEWER, 200),
        ("/v1/models/churn", VIEWER, 200),
        ("/v1/models/churn", PREDICT, 403),
    ],
)
async def test_every_get_route_answers_head_as_its_get_without_the_body(
    service: Service, url: str, headers: dict[str, str], status: int
) -> None:
    # Load balancers and uptime checkers probe /v2/health/live and /v2/health/ready with HEAD: it was a 405.
    got = await service.client.get(url, headers=headers)
    head = await service.client.head(url, headers=headers)
    assert (got.status_code, head.status_code) == (status, status), got.text
    for name in ("content-type", "content-length", "www-authenticate"):
        assert head.headers.get(name) == got.headers.get(name), name
    assert got.content and head.content == b""


async def test_a_head_on_predict_is_405_allowing_post_and_predicts_nothing(service: Service) -> None:
    r = await service.client.head("/v1/models/churn/predict", headers=PREDICT)
    assert (r.status_code, r.headers["allow"], r.content) == (405, "POST", b"")
    assert service.log.items == []


# --- feedback and operator commands ---------------------------------------------------------------------


async def test_feedback_becomes_ground_truth_events_with_the_actor(service: Service) -> None:
    ids = [p["prediction_id"] for p in (await predict(service, [record(), record()])).json()["predictions"]]
    r = await service.client.post(
        "/v1/feedback",
        json=[{"prediction_id": ids[0], "label": 1}, {"prediction_id": ids[1], "label": 0}],
        headers=PREDICT,
    )
    assert r.status_code == 202 and r.json()["accepted"] == 2
    truths = [e for e in service.outbox.events if isinstance(e.data, GroundTruthReceived)]
    assert [(t.data.prediction_id, t.data.label, t.data.model_version) for t in truths] == [
        (ids[0], 1, 1),
        (ids[1], 0, 1),
    ]
    assert {t.actor for t in truths} == {"user:dev-predict"} and {t.subject for t in truths} == {"churn"}


async def test_a_label_at_float32s_bound_is_ground_truth(service: Service) -> None:
    r = await service.client.post(
        "/v1/feedback",
        json=[
            {"prediction_id": "churn:1:a-0", "label": FLOAT32_MAX},
            {"prediction_id": "churn:1:a-1", "label": -1e38},
        ],
        headers=PREDICT,
    )
    assert r.status_code == 202, r.text
    labels = [e.data.label for e in service.outbox.events if isinstance(e.data, GroundTruthReceived)]
    assert labels == [FLOAT32_MAX, -1e38]


async def test_feedback_refusals(service: Service) -> None:
    r = await service.client.post("/v1/feedback", json={"prediction_id": "p-1", "label": 1}, headers=PREDICT)
    assert r.status_code == 422 and r.json()["reason"] == "unknown-prediction-id"
    r = await service.client.post(
        "/v1/feedback", json={"prediction_id": "other:1:x-0", "label": 1}, headers=PREDICT
    )
    assert r.status_code == 404
    r = await service.client.post("/v1/feedback", json={"prediction_id": "churn:1:x-0"}, headers=PREDICT)
    assert r.status_code == 422
    assert service.outbox.events == []


# --- tokens limited to models ------------------------------------------------------------------------------


@pytest.fixture
def scoped(service: Service, tmp_path: Path) -> dict[str, dict[str, str]]:
    """Headers of two predict tokens from a token file, one limited to churn and one to fraud and billing;
    the dev tokens (unscoped) still work."""
    path = tmp_path / "tokens.json"
    tokens = {
        "churn": issue_token(path, name="churn-client", role=Role.predict, models=["churn"]),
        "fraud": issue_token(path, name="fraud-client", role=Role.predict, models=["fraud", "billing"]),
    }
    service.app.state.tokens = TokenStore.load(path, dev=True)
    return {model: {"Authorization": f"Bearer {token}"} for model, token in tokens.items()}


SCOPED_ROUTES = [
    ("POST", "/v1/models/churn/predict", {"records": [record()]}),
    ("POST", "/v2/models/churn/infer", oip_body()),
    ("POST", "/v2/models/churn/versions/1/infer", oip_body()),
    ("GET", "/v2/models/churn", None),
    ("GET", "/v2/models/churn/versions/1", None),
    ("HEAD", "/v2/models/churn", None),
]


@pytest.mark.parametrize(("method", "path", "body"), SCOPED_ROUTES)
async def test_a_token_limited_to_a_model_uses_it_and_is_refused_another(
    service: Service, scoped: dict[str, dict[str, str]], method: str, path: str, body: Any
) -> None:
    allowed = await service.client.request(method, path, json=body, headers=scoped["churn"])
    refused = await service.client.request(method, path, json=body, headers=scoped["fraud"])
    unscoped = await service.client.request(method, path, json=body, headers=PREDICT)

    assert (allowed.status_code, unscoped.status_code) == (200, 200), (allowed.text, unscoped.text)
    assert refused.status_code == 403
    if method != "HEAD":
        assert refused.json()["code"] == "forbidden"
        assert refused.json()["detail"] == (
            "model 'churn' is outside the scope of the token 'fraud-client', which may use only: "
            "billing, fraud"
        )
    predicted = 2 if method == "POST" else 0  # the scoped and the unscoped token's
    assert len(service.log.items) == predicted


@pytest.mark.parametrize(
    "path",
    ["/v1/models/nosuch/predict", "/v2/models/nosuch/infer", "/v2/models/nosuch/versions/01/infer"],
)
async def test_a_model_outside_the_scope_is_refused_before_anything_about_it_is_said(
    service: Service, scoped: dict[str, dict[str, str]], path: str
) -> None:
    # Not 404 (no such model, no such version): a scoped client learns nothing of the models it may not use.
    r = await service.client.post(path, content=b"not json", headers=scoped["churn"])
    assert (r.status_code, r.json()["code"]) == (403, "forbidden"), r.text
    assert "model 'nosuch' is outside the scope of the token 'churn-client'" in r.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "body"), [(m, p.replace("churn", "fraud"), b) for m, p, b in SCOPED_ROUTES]
)
async def test_a_model_in_the_scope_that_is_not_served_is_a_404_naming_no_model_outside_it(
    service: Service, scoped: dict[str, dict[str, str]], method: str, path: str, body: Any
) -> None:
    # The 404 listed every served model, so a client limited to fraud and billing learnt that churn exists.
    r = await service.client.request(method, path, json=body, headers=scoped["fraud"])
    assert r.status_code == 404
    if method != "HEAD":
        assert (r.json()["code"], r.json()["models"]) == ("not-found", []), r.text
        assert "churn" not in r.text
    unscoped = await service.client.request(method, path, json=body, headers=PREDICT)
    if method != "HEAD":
        assert unscoped.json()["models"] == ["churn"], unscoped.text


async def test_feedback_with_a_scoped_token_is_refused_for_another_models_predictions(
    service: Service, scoped: dict[str, dict[str, str]]
) -> None:
    ids = [p["prediction_id"] for p in (await predict(service, [record()])).json()["predictions"]]
    items = [{"prediction_id": ids[0], "label": 1}, {"prediction_id": "ext-7", "model": "churn", "label": 0}]

    refused = await service.client.post("/v1/feedback", json=items, headers=scoped["fraud"])
    assert refused.status_code == 403
    assert (refused.json()["code"], refused.json()["item"]) == ("forbidden", 0)
    assert refused.json()["detail"].startswith("[0]: model 'churn' is outside the scope of the token")
    assert service.outbox.events == []

    accepted = await service.client.post("/v1/feedback", json=items, headers=scoped["churn"])
    assert (accepted.status_code, accepted.json()["accepted"]) == (202, 2), accepted.text
    assert {e.actor for e in service.outbox.events} == {"user:churn-client"}


def hostile(i: int) -> str:
    """A different name each time, of the kinds a client may send: long, not ASCII, path-like, an id."""
    return ["x" * 300 + str(i), f"m\u00e9t\u00e9o-{i}", f"..%2f{i}%2fadmin", f"churn:{i}:abc-0", f"churn{i}"][
        i % 5
    ]


async def test_hostile_names_and_values_add_no_series(service: Service) -> None:
    """No label takes its value from what a client sends: requests for models serving does not serve, bad
    versions, unknown routes, refused bodies and feedback for unknown models leave /metrics as it was. (A
    series per name would grow /metrics, and Prometheus, without bound: a cardinality bomb.)"""
    assert (await predict(service, [record(plan="never-seen")])).status_code == 200
    assert (await service.client.post("/v2/models/churn/infer", json=oip_body(), headers=PREDICT)).is_success
    before = metrics_lint.series()

    for i in range(100):
        name = quote(hostile(i), safe="")
        answers = [
            await service.client.post(
                f"/v1/models/{name}/predict", json={"records": [record()]}, headers=PREDICT
            ),
            await service.client.post(f"/v2/models/{name}/infer", json=oip_body(), headers=PREDICT),
            await service.client.post(
                f"/v2/models/churn/versions/{i + 2}/infer", json=oip_body(), headers=PREDICT
            ),
            await service.client.post(
                f"/v2/models/{name}/versions/1/infer", json=oip_body(), headers=PREDICT
            ),
            await service.client.get(f"/v2/models/{name}/ready", headers=PREDICT),
            await service.client.post(f"/v1/{name}/predict", json={}, headers=PREDICT),
            await predict(service, [record(**{hostile(i): 1})]),
            await predict(service, [record(plan=hostile(i))], entity_keys=[hostile(i)]),
            await service.client.post(
                "/v1/feedback",
                json={"prediction_id": hostile(i), "model": f"m{i}", "label": 1},
                headers=PREDICT,
            ),
        ]
        assert [a.status_code // 100 for a in answers] == [4, 4, 4, 4, 4, 4, 4, 2, 4], (i, answers[-1].text)

    assert metrics_lint.series() == before


async def test_operator_commands_become_events_with_the_actor(service: Service) -> None:
    service.route(served(1), served(2), weight=0.1)
    url = "/v1/models/churn/rollback"
    assert (await service.client.post(url, json={"reason": "x"}, headers=PREDICT)).status_code == 403
    assert (await service.client.post(url, json={"reason": "x"}, headers=VIEWER)).status_code == 403
    r = await service.client.post(url, json={"reason": "complaints"}, headers=OPERATOR)
    assert r.status_code == 202 and r.json()["model_version"] == 2
    r = await service.client.post(url, json={"model_version": 5, "reason": "x"}, headers=OPERATOR)
    assert r.status_code == 409 and r.json()["allowed"] == [2]
    r = await service.client.post("/v1/models/churn/promote", json={"reason": "looks good"}, headers=OPERATOR)
    assert r.status_code == 202
    rollback, promote = service.outbox.events
    assert isinstance(rollback.data, RollbackRequested) and rollback.actor == "user:dev-operator"
    assert isinstance(promote.data, PromoteRequested) and promote.data.model_version == 2
    state = (await service.client.get("/v1/models/churn", headers=VIEWER)).json()
    assert state["rollout"]["canary_version"] == 2 and state["this_replica"]["weight"] == 0.1
    # What a command must be issued after (serving refuses a promotion issued before it).
    assert state["decided_at"] == Clock()().isoformat()


@pytest.mark.parametrize(
    ("url", "body", "key"),
    [
        ("/v1/models/churn/rollback", b'{"reason": "x", "to_version": 1, "to_version": 3}', "to_version"),
        ("/v1/models/churn/promote", b'{"reason": "first", "reason": "second"}', "reason"),
    ],
)
async def test_a_command_naming_a_key_twice_is_422_not_its_last_value(
    service: Service, url: str, body: bytes, key: str
) -> None:
    # FastAPI's reader kept the last value: a rollback to version 3, which a reader keeping the first (a
    # proxy, a log) saw as a rollback to version 1.
    service.route(served(1), served(2), weight=0.1)
    r = await service.client.post(url, content=body, headers={**OPERATOR, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == (
        f"the JSON body names the key {key!r} more than once in one object; give each key once"
    )
    assert service.outbox.events == []


@pytest.mark.parametrize("url", ["/v1/models/churn/rollback", "/v1/models/churn/promote"])
@pytest.mark.parametrize("reason", [" ", "\t\n", "\u3000\u00a0"])
async def test_a_command_reason_of_only_white_space_is_422_naming_it(
    service: Service, url: str, reason: str
) -> None:
    service.route(served(1), served(2), weight=0.1)
    r = await service.client.post(url, json={"reason": reason}, headers=OPERATOR)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("body.reason: Value error, a reason must say something"), r.text
    assert service.outbox.events == []


async def test_a_swap_between_requests_never_fails_one(service: Service) -> None:
    async def swapper() -> None:
        for i in range(50):
            service.route(served(1), served(2), weight=(i % 10) / 10)
            await asyncio.sleep(0)

    async def caller() -> list[int]:
        return [(await predict(service, [record()] * 3)).status_code for _ in range(30)]

    results = await asyncio.gather(swapper(), caller(), caller())
    assert set(results[1]) | set(results[2]) == {200}


# --- hostile input: every refusal is a 4xx that says what was wrong ------------------------------------


def _json(s: Service, path: str, body: bytes, headers: dict[str, str] = PREDICT) -> Any:
    return s.client.post(path, content=body, headers={**headers, "content-type": "application/json"})


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v1/models/churn/predict", b'{"records":' + b"[" * 5000 + b"]" * 5000 + b"}", PREDICT),
        ("/v2/models/churn/infer", b'{"inputs":' + b"[" * 3000 + b"]" * 3000 + b"}", PREDICT),
        ("/v1/feedback", b"[" * 3000 + b"]" * 3000, PREDICT),
        ("/v1/models/churn/rollback", b'{"reason":' + b"[" * 3000 + b"]" * 3000 + b"}", OPERATOR),
    ],
    ids=["v1", "v2", "feedback", "rollback"],
)
async def test_a_body_nested_too_deeply_is_a_422_on_every_route(
    service: Service, path: str, body: bytes, headers: dict[str, str]
) -> None:
    r = await _json(service, path, body, headers)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == r.json()["detail"] == "the JSON body is nested too deeply"


def test_a_compiled_copy_serves_in_these_tests_when_asked() -> None:
    assert compiled(1).engine == "onnxruntime"


def compiled(version: int) -> ServedModel:
    from services.serving.compiled import compile_model

    return ServedModel(
        "churn",
        version,
        f"{version:02x}" * 32,
        churn_signature(),
        PIPELINE,
        compile_model(PIPELINE, churn_signature()),
    )


@pytest.mark.parametrize("engine", ["scikit-learn", "onnxruntime"])
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"9" * 400, "out-of-range"),
        (b"1e39", "out-of-range"),
        (b"-1e300", "out-of-range"),
        (b"1e400", "infinite"),
    ],
)
async def test_both_engines_refuse_numbers_beyond_float32s_range_naming_feature_and_row(
    service: Service, engine: str, value: bytes, reason: str
) -> None:
    service.route(compiled(1) if engine == "onnxruntime" else served(1))
    row = b'{"tenure_months": %s, "monthly_charges": 1, "plan": "basic"}' % value
    r = await _json(
        service,
        "/v1/models/churn/predict",
        b'{"records": [{"tenure_months": 1, "monthly_charges": 1, "plan": "basic"}, %s]}' % row,
    )
    assert r.status_code == 422, r.text
    assert (r.json()["feature"], r.json()["reason"], r.json()["row"]) == ("tenure_months", reason, 1)
    tensor = b'{"name": "tenure_months", "shape": [1], "datatype": "FP64", "data": [%s]}' % value
    rest = (
        b'{"name": "monthly_charges", "shape": [1], "datatype": "FP64", "data": [1]}, '
        b'{"name": "plan", "shape": [1], "datatype": "BYTES", "data": ["basic"]}'
    )
    r = await _json(service, "/v2/models/churn/infer", b'{"inputs": [%s, %s]}' % (tensor, rest))
    assert r.status_code == 422, r.text
    assert (r.json()["feature"], r.json()["reason"]) == ("tenure_months", reason)
    assert service.log.items == []


def trained(levels: str, *, compile: bool = False) -> ServedModel:
    """A model as training builds one (no imputer before the one-hot encoder), on a plan column of ``levels``:
    text, integers or booleans."""
    from libs.modelspec import build_pipeline, spec_from_data
    from services.serving.compiled import compile_model
    from services.training.worker import signature
    from tests.unit.training.data import churn_spec_data

    features = [
        {"name": "tenure_months", "type": "numeric"},
        {"name": "monthly_charges", "type": "numeric"},
        {"name": "plan", "type": "categorical"},
    ]
    spec = spec_from_data(churn_spec_data(features=features, validation={}))
    rng = np.random.default_rng(0)
    plans = pd.Series(rng.choice(["basic", "plus", "premium"], 300))
    frame = pd.DataFrame(
        {
            "tenure_months": rng.integers(0, 72, 300).astype(float),
            "monthly_charges": rng.normal(60, 20, 300),
            "plan": {
                "text": plans,
                "integers": plans.map({"basic": 0, "plus": 1, "premium": 2}),
                "booleans": plans == "premium",
            }[levels],
        }
    )
    target = (frame["tenure_months"] < 12).astype(int)
    pipeline = build_pipeline(spec).fit(frame, target)
    sig = signature(spec, pipeline, tuple(pipeline.classes_))
    return ServedModel(
        "churn", 1, "01" * 32, sig, pipeline, compile_model(pipeline, sig) if compile else None
    )


_TENSOR_TYPE = {str: "BYTES", int: "INT64", bool: "BOOL"}


@pytest.mark.parametrize(
    ("levels", "plans", "row"),
    [
        ("text", [1, 2], 0),  # all numbers: the model refused them ("ufunc 'isnan' not supported")
        ("text", ["basic", 1], 1),  # beside a string: the model took the same 1 as an unseen level
        ("text", [True], 0),  # "y contains previously unseen labels"
        ("integers", [True, 1], 0),  # the model took true as the level 1, monitoring as a new level
        ("integers", [1, "1"], 1),  # monitoring took "1" as the level 1, the model as unseen
        ("booleans", [1, 0], 0),  # the model took 1 as true, monitoring as a new level
        ("booleans", ["True"], 0),  # monitoring took "True" as the level true, the model as unseen
    ],
)
async def test_a_category_of_another_type_than_the_levels_is_a_422_naming_it_on_both_protocols(
    service: Service, levels: str, plans: list[Any], row: int
) -> None:
    service.route(trained(levels, compile=levels == "text"))
    r = await predict(service, [record(plan=p) for p in plans])
    assert r.status_code == 422, r.text
    assert (r.json()["feature"], r.json()["reason"], r.json()["row"]) == ("plan", "wrong-type", row), r.text
    assert {"text": "text", "integers": "integers", "booleans": "booleans"}[levels] in r.json()["detail"]
    kinds = {type(p) for p in plans}
    body = oip_body(len(plans), plans, _TENSOR_TYPE[kinds.pop()] if len(kinds) == 1 else "BYTES")
    r = await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
    assert r.status_code == 422, r.text
    assert (r.json()["feature"], r.json()["reason"]) == ("plan", "wrong-type"), r.text
    assert service.log.items == []


@pytest.mark.parametrize("levels", ["text", "integers", "booleans"])
async def test_categories_of_the_levels_type_are_answered_and_logged_as_sent(
    service: Service, levels: str
) -> None:
    model = trained(levels, compile=levels == "text")
    service.route(model)
    known = model.signature.features[-1].categories or []
    unseen = {"text": "gold", "integers": 7, "booleans": None}[levels]
    plans = [*known, unseen]
    r = await predict(service, [record(plan=p) for p in plans])
    assert r.status_code == 200, r.text
    assert [row["plan"] for item in service.log.items for row in item.raw_rows or []] == plans
    assert service.log.items[-1].columns.unseen == ({} if unseen is None else {"plan": 1})
    body = oip_body(len(plans), plans, _TENSOR_TYPE[type(known[0])])
    r2 = await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
    assert r2.status_code == 200, r2.text
    assert r2.json()["outputs"][0]["data"] == [p["prediction"] for p in r.json()["predictions"]]


@pytest.mark.parametrize("levels", ["text", "integers", "booleans"])
async def test_a_request_whose_every_category_is_missing_is_answered_as_a_missing_one_beside_a_level(
    service: Service, levels: str
) -> None:
    # Training's pipeline has no imputer before its one-hot encoder. An all-null column went to it as the
    # float64 column pandas makes of NaN, which an encoder of text levels cannot compare with them: a
    # one-row request with a missing category was refused (model-refused, counted as a model error), where
    # the same row beside a known level was answered.
    model = trained(levels)
    service.route(model)
    known = (model.signature.features[-1].categories or [])[0]
    beside = await predict(service, [record(plan=None), record(plan=known)])
    assert beside.status_code == 200, beside.text
    errors = model_errors()
    for rows in (1, 2):
        alone = await predict(service, [record(plan=None)] * rows)
        assert alone.status_code == 200, alone.text
        assert [p["probabilities"] for p in alone.json()["predictions"]] == [
            beside.json()["predictions"][0]["probabilities"]
        ] * rows
    assert model_errors() == errors


class NaNModel:
    """An estimator that answers NaN probabilities, as float overflow inside a model can."""

    classes_ = PIPELINE.classes_

    def predict_proba(self, frame: Any) -> Any:
        return [[float("nan"), float("nan")]] * len(frame)


async def test_non_finite_probabilities_are_a_model_failure_never_an_answer(service: Service) -> None:
    service.route(served(1, NaNModel()))
    r = await predict(service, [record()])
    assert r.status_code == 503 and "non-finite" in r.json()["error"]
    assert service.log.items == []


@pytest.mark.parametrize(
    "bad",
    [
        b'{"tenure_months": 5, "monthly_charges": 1, "plan": "\\ud800"}',
        b'{"tenure_months": 5, "monthly_charges": 1, "plan": "basic\\u0000"}',
        b'{"tenure_months": ' + b"9" * 400 + b', "monthly_charges": 1, "plan": "basic"}',
        b'{"tenure_months": "five", "monthly_charges": 1, "plan": "basic"}',
    ],
    ids=["lone-surrogate", "nul", "huge-integer", "wrong-type"],
)
async def test_bad_input_is_refused_and_never_counted_against_a_healthy_canary(
    service: Service, bad: bytes
) -> None:
    service.route(served(1), served(2), weight=1.0)
    for _ in range(6):
        r = await _json(service, "/v1/models/churn/predict", b'{"records": [%s]}' % bad)
        assert r.status_code == 422, r.text
        assert r.json()["feature"] in ("plan", "tenure_months")
        assert "refused the input" not in r.json()["error"]
    assert service.breaches == []
    assert all(c.errors == 0 for c in service.predictor.stats.counts.values())


async def test_a_canary_failure_counts_when_the_stable_version_answers_the_same_rows(
    service: Service,
) -> None:
    service.route(served(1), served(2, NaNModel()), weight=1.0)
    for _ in range(5):
        assert (await predict(service, [record()])).json()["predictions"][0]["model_version"] == 1
    [counts] = service.predictor.stats.counts.values()
    assert (counts.requests, counts.errors) == (5, 5) and len(service.breaches) == 1


def oip(**changes: Any) -> dict[str, Any]:
    body = oip_body(1)
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (oip(id=5), "id must be a string, not a number"),
        (oip(id={"x": 1}), "id must be a string, not an object"),
        (oip(parameters=5), "parameters must be an object"),
        (oip(parameters="x"), "parameters must be an object"),
        (oip(parameters={"entity_key": True}), "parameters.entity_key must be a string"),
        (oip(parameters={"entity_key": 7}), "parameters.entity_key must be a string"),
        (oip(outputs=[{"name": "predict"}, 5, "x"]), "outputs[1] must be an object with a name"),
        (oip(outputs=[{}]), "outputs[0] has no name"),
        (oip(outputs=[{"name": ["predict"]}]), "outputs[0]: unknown output a list"),
        (oip(extra=1), "unknown member 'extra'"),
        (oip(outputs=[{"name": "predict", "parameters": 5}]), "outputs[0].parameters must be an object"),
        (
            oip(outputs=[{"name": "predict_proba", "parameters": {"classification": 2}}]),
            "outputs[0].parameters.classification: the classification extension is not supported",
        ),
        (
            oip(outputs=[{"name": "predict", "binary_data": True}]),
            "unknown member 'binary_data' in outputs[0]",
        ),
        (
            oip(inputs=[*oip_body(1)["inputs"], oip_body(1)["inputs"][0]]),
            "input tensor 'tenure_months' is given twice",
        ),
    ],
)
async def test_oip_request_members_are_checked_and_named(
    service: Service, body: dict[str, Any], message: str
) -> None:
    r = await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]
    assert service.log.items == []


@pytest.mark.parametrize(
    ("datatype", "message"),
    [
        ("fp64", "datatype 'fp64' is not FP64: datatypes are case-sensitive"),
        ("Bytes", "datatype 'Bytes' is not BYTES: datatypes are case-sensitive"),
        ("FLOAT", "datatype 'FLOAT' is not an Open Inference Protocol datatype"),
        ("BF16", "datatype 'BF16' is not an Open Inference Protocol datatype"),
    ],
)
async def test_a_datatype_the_protocol_does_not_spell_so_is_a_422_naming_it(
    service: Service, datatype: str, message: str
) -> None:
    # The protocol's strings are case-sensitive and the OpenAPI document lists the datatypes as it spells
    # them: a tensor is read as the datatype it names, or refused, never as one it resembles.
    body = oip_body(1)
    body["inputs"][0]["datatype"] = datatype
    r = await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"] and r.json()["feature"] == "tenure_months", r.text
    assert r.json()["reason"] == "wrong-type"


@pytest.mark.parametrize("kind", ["classifier", "regressor"])
async def test_an_empty_outputs_list_is_answered_with_every_output(service: Service, kind: str) -> None:
    # The protocol returns every output when none is asked for, as Triton reads an empty list too: a 200
    # with no output at all answers nothing.
    service.route(served(1) if kind == "classifier" else without_probabilities("regressor"))
    every = await service.client.post("/v2/models/churn/infer", json=oip(), headers=PREDICT)
    r = await service.client.post("/v2/models/churn/infer", json=oip(outputs=[]), headers=PREDICT)
    assert r.status_code == every.status_code == 200, r.text
    schemas.InferAnswer.model_validate(r.json())
    names = [o["name"] for o in r.json()["outputs"]]
    assert names == [o["name"] for o in every.json()["outputs"]]
    assert names == (["predict", "predict_proba"] if kind == "classifier" else ["predict"])


async def test_a_binary_output_request_is_answered_with_json_tensors(service: Service) -> None:
    # tritonclient asks for binary outputs unless told otherwise (binary_data_output with no outputs named,
    # binary_data on each one named). The extension is optional and not offered (GET /v2 lists none): the
    # answer is JSON, which the client reads as well, never a refusal.
    asked = [
        oip(parameters={"binary_data_output": True}),
        oip(outputs=[{"name": "predict", "parameters": {"binary_data": True}}]),
    ]
    for body in asked:
        schemas.InferBody.model_validate(body)  # the OpenAPI document allows it too
        r = await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
        assert r.status_code == 200, r.text
        assert all("data" in o and "parameters" not in o for o in r.json()["outputs"]), r.text
    assert (await service.client.get("/v2")).json()["extensions"] == []


def with_tensor(**changes: Any) -> dict[str, Any]:
    """oip() whose first input tensor (tenure_months) has ``changes``."""
    body = oip()
    body["inputs"][0].update(changes)
    return body


async def test_an_input_tensor_member_the_protocol_does_not_name_is_a_422_naming_it(service: Service) -> None:
    # The protocol's input tensor holds name, shape, datatype, parameters and data, as the request body holds
    # id, parameters, inputs and outputs: a misspelt member ("paramters") is refused, never ignored.
    for member in ("bogus", "paramters", "contents"):
        body = with_tensor(**{member: 1})
        r = await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
        assert r.status_code == 422, r.text
        assert r.json()["error"].startswith(f"unknown member {member!r} in input tensor 'tenure_months'"), (
            r.text
        )
        assert (r.json()["reason"], r.json()["feature"]) == ("unknown", "tenure_months")
        with pytest.raises(ValueError, match=member):  # and the OpenAPI document says so
            schemas.InferBody.model_validate(body)
    assert service.log.items == []


NESTED = [{"a": 1}, [1, 2], []]


@pytest.mark.parametrize("value", NESTED, ids=["object", "list", "empty-list"])
@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("request", "parameters.sequence_id must be a string, a number or a boolean, not a"),
        (
            "tensor",
            "input tensor 'tenure_months': parameters.sequence_id must be a string, a number or a boolean",
        ),
        ("output", "outputs[0].parameters.sequence_id must be a string, a number or a boolean, not a"),
    ],
)
async def test_a_parameter_that_is_not_a_string_number_or_boolean_is_a_422_naming_it(
    service: Service, value: Any, where: str, message: str
) -> None:
    # The protocol's parameter values are strings, numbers and booleans (its gRPC form has nothing else).
    parameters = {"binary_data": False, "sequence_id": value}
    body = {
        "request": oip(parameters=parameters),
        "tensor": with_tensor(parameters=parameters),
        "output": oip(outputs=[{"name": "predict", "parameters": parameters}]),
    }[where]
    r = await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"] and r.json()["reason"] == "wrong-type", r.text
    with pytest.raises(ValueError, match="sequence_id"):
        schemas.InferBody.model_validate(body)
    assert service.log.items == []


async def test_a_parameter_with_an_unusual_name_is_named_quoted_and_cut(service: Service) -> None:
    for parameters, message in (
        ({"ok": 1, "a b": {}, "x" * 100: []}, "parameters['a b'] must be a string"),
        ({"x" * 100: []}, f"parameters[{'x' * 40!r}… (100 characters)] must be a string"),
    ):
        r = await service.client.post(
            "/v2/models/churn/infer", json=oip(parameters=parameters), headers=PREDICT
        )
        assert r.status_code == 422 and message in r.json()["error"], r.text


async def test_parameters_of_strings_numbers_booleans_and_null_are_taken(service: Service) -> None:
    # What clients send (tritonclient: binary_data_output, priority, timeout, sequence_*, binary_data_size,
    # binary_data) and any other scalar: taken and, but for entity_key, ignored; null is absent, as elsewhere.
    scalars = {"s": "x", "i": 7, "f": 0.5, "t": True, "n": None, "binary_data_size": 8}
    body = oip(
        parameters={**scalars, "entity_key": None, "binary_data_output": True, "priority": 1, "timeout": 100},
        outputs=[{"name": "predict", "parameters": {**scalars, "binary_data": True}}],
    )
    body["inputs"][0]["parameters"] = scalars
    schemas.InferBody.model_validate(body)
    r = await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
    assert r.status_code == 200, r.text


async def test_tritonclient_request_bodies_are_taken(service: Service) -> None:
    # The members and parameters tritonclient writes (its own request builder: JSON tensors, binary or JSON
    # outputs, a sequence, a priority, a timeout, custom parameters) are all ones the route takes.
    import tritonclient.http as triton  # a dev dependency (pyproject): missing is a failure, not a skip

    inputs = []
    for name, data, datatype in (
        ("tenure_months", np.array([3.0, 4.0]), "FP64"),
        ("monthly_charges", np.array([50.0, 60.0]), "FP64"),
        ("plan", np.array([b"basic", b"plus"], dtype=np.object_), "BYTES"),
    ):
        tensor = triton.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data, binary_data=False)
        inputs.append(tensor)
    asked: list[dict[str, Any]] = [
        {},
        {"outputs": [triton.InferRequestedOutput("predict", binary_data=False)]},
        {"outputs": [triton.InferRequestedOutput("predict_proba", binary_data=True)], "request_id": "r-1"},
        {"sequence_id": "s-1", "sequence_start": True, "priority": 2, "timeout": 1_000},
        {"parameters": {"entity_key": "customer-7", "note": "x", "ratio": 0.5, "flag": False}},
    ]
    for options in asked:
        raw, header_size = triton.InferenceServerClient.generate_request_body(inputs, **options)
        assert header_size is None  # JSON tensors only: no binary part
        schemas.InferBody.model_validate_json(raw)
        r = await service.client.post("/v2/models/churn/infer", content=raw, headers=PREDICT)
        assert r.status_code == 200, (options, r.text)
        schemas.InferAnswer.model_validate(r.json())


async def test_oip_answers_carry_the_request_id_as_sent(service: Service) -> None:
    r = await service.client.post("/v2/models/churn/infer", json=oip(id="", parameters=None), headers=PREDICT)
    assert r.status_code == 200 and r.json()["id"] == ""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"records": [record()], "entity_keys": [{"a": 1}]}, "entity_keys[0] must be a string or null"),
        ({"records": [record()], "entity_keys": [7]}, "entity_keys[0] must be a string or null"),
        ({"records": [record()], "entity_keys": ["a\x00"]}, "entity_keys[0] holds a NUL character"),
        ({"records": [record()], "extra": 1}, "unknown member 'extra'"),
    ],
)
async def test_v1_request_members_are_checked_and_named(
    service: Service, body: dict[str, Any], message: str
) -> None:
    r = await service.client.post("/v1/models/churn/predict", json=body, headers=PREDICT)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            b'[{"prediction_id": "churn:1:a-0", "label": 1}, {"prediction_id": "churn:1:a-1", "label": NaN}]',
            "[1].label: a numeric label must be a finite number",
        ),
        (
            b'[{"prediction_id": "churn:1:a-0", "label": 1}, {"prediction_id": "churn:1:a-1"}]',
            "[1].label: Field required",
        ),
        (
            b'[{"prediction_id": "churn:1:a-0", "label": 1}, 5]',
            "[1] must be an object with prediction_id and label",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": null}',
            "[0].label: must be a string, integer, number or boolean",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": [1]}',
            "[0].label: must be a string, integer, number or boolean",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": 1e400}',
            "[0].label: a numeric label must be a finite number",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": ' + b"9" * 400 + b"}",
            "[0].label: a numeric label must be a finite number",
        ),
        # Beyond float32's range, where models compute: the event refuses it too (contracts.GroundTruthLabel).
        (
            b'[{"prediction_id": "churn:1:a-0", "label": 1}, {"prediction_id": "churn:1:a-1", "label": 1e300}'
            b"]",
            "[1].label: a numeric label must be within float32's range (magnitude at most 3.4028235e+38)",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": -3.5e38}',
            "[0].label: a numeric label must be within float32's range",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": 1' + b"0" * 39 + b"}",
            "[0].label: a numeric label must be within float32's range",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": "x\\u0000"}',
            "[0].label: the label holds a NUL character",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": "\\ud800"}',
            "[0].label: the label holds a lone surrogate",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": 1, "\\ud800": 1}',
            "[0]: Input should be a valid string",  # pydantic's word for a key that is not text
        ),
        (b'"hello"', "the body must be a feedback object or a list of them"),
        # Ids that monitoring could not store or look up (the event would be schema-invalid).
        (
            b'{"prediction_id": "churn:1:a-0\\u0000", "label": 1}',
            "[0].prediction_id: String should match pattern",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": 1, "entity_key": "c-1\\u0000"}',
            "[0].entity_key: String should match pattern",
        ),
        (
            b'{"prediction_id": "churn:1:a-\\ud800", "label": 1}',
            "[0].prediction_id: Input should be a valid string, unable to parse raw data as a unicode string",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": 1, "entity_key": "c-\\ud800"}',
            "[0].entity_key: Input should be a valid string, unable to parse raw data as a unicode string",
        ),
        # Monitoring keeps waiting labels in an index by their id: a longer one was a 202, then a dead letter.
        (
            b'{"prediction_id": "' + b"x" * 513 + b'", "model": "churn", "label": 1}',
            "[0].prediction_id: String should have at most 512 characters",
        ),
        # Times that have no UTC form: monitoring could not store them (it was 202, then a dead letter).
        (
            b'{"prediction_id": "churn:1:a-0", "label": 1, "observed_at": "0001-01-01T00:00:00+01:00"}',
            "[0].observed_at: Value error, the time has no UTC form",
        ),
        (
            b'{"prediction_id": "churn:1:a-0", "label": 1, "observed_at": "9999-12-31T23:00:00-05:00"}',
            "[0].observed_at: Value error, the time has no UTC form",
        ),
    ],
)
async def test_feedback_refusals_name_the_item_and_the_field(
    service: Service, raw: bytes, message: str
) -> None:
    r = await _json(service, "/v1/feedback", raw)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(message)
    assert service.outbox.events == []


@pytest.mark.parametrize(
    "pid",
    [
        "churn:\u00b2:abc-0",
        "churn:\u0661:abc-0",
        "churn:0:abc-0",
        "churn:01:abc-0",
        "churn:3000000000:abc-0",
        "churn:99999999999999999999:abc-0",
    ],
)
async def test_feedback_for_an_id_with_no_model_version_in_it_is_refused(service: Service, pid: str) -> None:
    r = await service.client.post("/v1/feedback", json={"prediction_id": pid, "label": 1}, headers=PREDICT)
    assert r.status_code == 422, r.text
    assert (
        r.json()["error"].startswith("[0].prediction_id ") and r.json()["reason"] == "unknown-prediction-id"
    )
    assert service.outbox.events == []


async def test_feedback_labels_keep_their_type(service: Service) -> None:
    labels = [True, 1, 2.5, "churned", 2**63 - 1]
    body = [{"prediction_id": f"churn:1:a-{i}", "label": label} for i, label in enumerate(labels)]
    assert (await service.client.post("/v1/feedback", json=body, headers=PREDICT)).status_code == 202
    assert [e.data.label for e in service.outbox.events] == labels
    assert [type(e.data.label) for e in service.outbox.events] == [type(label) for label in labels]


@pytest.mark.parametrize(
    ("canary", "path", "body", "status", "message"),
    [
        (False, "rollback", {"reason": "x", "to_version": 1}, 409, "is the version being rolled back"),
        (
            False,
            "rollback",
            {"reason": "x", "to_version": True},
            422,
            "body.to_version: Input should be a valid integer",
        ),
        (False, "rollback", {"reason": "x", "model_version": "1"}, 422, "body.model_version"),
        (False, "rollback", {"reason": "x", "model_version": 1.0}, 422, "body.model_version"),
        (
            True,
            "rollback",
            {"reason": "x", "model_version": 1},
            409,
            "roll back its canary (version 2) first",
        ),
        (True, "rollback", {"reason": "x", "to_version": 1}, 409, "to_version is for a production rollback"),
        (False, "promote", {"reason": "x", "model_version": 3}, 409, "no canary is live"),
        (True, "promote", {"reason": "x", "model_version": 3}, 409, "the live canary is version 2"),
        (False, "promote", {"reason": "x"}, 409, "has no live canary to promote"),
        (True, "promote", {"reason": "x", "model_version": True}, 422, "body.model_version"),
    ],
)
async def test_operator_commands_that_would_change_nothing_are_refused(
    service: Service, canary: bool, path: str, body: dict[str, Any], status: int, message: str
) -> None:
    service.route(served(1), served(2) if canary else None, weight=0.1)
    r = await service.client.post(f"/v1/models/churn/{path}", json=body, headers=OPERATOR)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert service.outbox.events == []


async def test_a_production_rollback_to_another_version_is_accepted(service: Service) -> None:
    r = await service.client.post(
        "/v1/models/churn/rollback", json={"reason": "x", "to_version": 3}, headers=OPERATOR
    )
    assert r.status_code == 202, r.text
    [event] = service.outbox.events
    assert isinstance(event.data, RollbackRequested) and (
        event.data.model_version,
        event.data.to_version,
    ) == (1, 3)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v2/models/churn/infer", b'{"inputs": [' + b" " * 30_000 + b"]}", 413),
        ("POST", "/v2/models/churn/versions/x/infer", b"{}", 404),
        ("POST", "/v1/models/churn/rollback", b'{"reason":', 422),
        ("GET", "/v2/nothing-here", b"", 404),
        ("GET", "/v1/models/churn/predict", b"", 405),
        ("POST", "/v2/models/churn/infer", b"{}", 422),
    ],
)
async def test_every_error_body_carries_error_detail_and_code(
    service: Service, method: str, path: str, body: bytes, status: int
) -> None:
    headers = {**OPERATOR, "content-type": "application/json"} if "rollback" in path else PREDICT
    r = await service.client.request(method, path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"] == r.json()["detail"] and r.json()["error"] and r.json()["code"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/models/churn/predict",
            b'{"records": [{"tenure_months": NaN, "monthly_charges": 1, "plan": "basic", "\\ud800": 1}]}',
        ),
        (
            "/v2/models/churn/infer",
            b'{"inputs": [{"name": "\\ud800", "shape": [1], "datatype": "FP64", "data": [NaN]}]}',
        ),
        (
            "/v2/models/churn/infer",
            b'{"inputs": [{"name": "tenure_months", "shape": [1], "datatype": "FP\\ud800", "data": [NaN]}]}',
        ),
    ],
    ids=["v1-feature-name", "v2-tensor-name", "v2-datatype"],
)
async def test_a_lone_surrogate_in_a_name_is_refused_not_a_crash(
    service: Service, path: str, body: bytes
) -> None:
    # Bodies with NaN are read by Python's json, which lets a lone surrogate through; the error names it.
    r = await _json(service, path, body)
    assert r.status_code == 422, r.text
    assert "\\ud800" in r.json()["error"]


class Regressor:
    """A regression model: no classes, no probabilities."""

    def predict(self, frame: Any) -> Any:
        return np.full(len(frame), 2.5)


class LabelsOnly:
    """A classifier without predict_proba (an SVC trained without probability=True), labelled by text."""

    classes_ = np.array(["stays", "churns"])

    def predict(self, frame: Any) -> Any:
        return np.array(["churns"] * len(frame), dtype=object)


def without_probabilities(kind: str) -> ServedModel:
    signature = churn_signature()
    if kind == "regressor":
        return ServedModel(
            "churn",
            1,
            "01" * 32,
            signature.model_copy(update={"task": Task.REGRESSION, "classes": None}),
            Regressor(),
        )
    return ServedModel(
        "churn", 1, "01" * 32, signature.model_copy(update={"classes": ["stays", "churns"]}), LabelsOnly()
    )


@pytest.mark.parametrize("kind", ["regressor", "classifier without predict_proba"])
async def test_predict_proba_asked_of_a_version_that_gives_none_is_a_422_naming_it(
    service: Service, kind: str
) -> None:
    service.route(without_probabilities(kind))
    # The protocol's requested outputs are outputs of the model (its metadata lists only predict): a 200
    # with the asked output silently left out is an answer a client cannot tell from a broken one.
    for path in ("/v2/models/churn/infer", "/v2/models/churn/versions/1/infer"):
        body = oip(outputs=[{"name": "predict"}, {"name": "predict_proba"}])
        r = await service.client.post(path, json=body, headers=PREDICT)
        assert r.status_code == 422, r.text
        assert r.json()["reason"] == "unknown" and "predict_proba" in r.json()["error"], r.text
        assert "version 1" in r.json()["error"] and "outputs: predict" in r.json()["error"], r.text
    assert service.log.items == []
    r = await service.client.post("/v2/models/churn/infer", json=oip(), headers=PREDICT)
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["predict"], r.text


async def test_model_metadata_gives_the_datatype_the_predict_output_has(service: Service) -> None:
    for model in (served(1), without_probabilities("regressor"), without_probabilities("classifier")):
        service.route(model)
        meta = (await service.client.get("/v2/models/churn", headers=PREDICT)).json()
        answer = (await service.client.post("/v2/models/churn/infer", json=oip(), headers=PREDICT)).json()
        declared = {o["name"]: o["datatype"] for o in meta["outputs"]}
        assert {o["name"]: o["datatype"] for o in answer["outputs"]} == declared, (meta, answer)


@pytest.mark.parametrize("levels", ["text", "integers", "booleans"])
async def test_model_metadata_gives_each_input_a_datatype_that_carries_its_levels(
    service: Service, levels: str
) -> None:
    # A client builds its tensors from the metadata: the datatype it declares must take the feature's levels.
    model = trained(levels)
    service.route(model)
    meta = (await service.client.get("/v2/models/churn", headers=PREDICT)).json()
    declared = {i["name"]: i["datatype"] for i in meta["inputs"]}
    known = model.signature.features[-1].categories or []
    body = oip_body(len(known), list(known), declared["plan"])
    r = await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
    assert r.status_code == 200, (declared, r.text)


@pytest.mark.parametrize(
    "datatype",
    [
        "FP64",
        "FP32",
        "FP16",
        "INT64",
        "INT32",
        "INT16",
        "INT8",
        "UINT64",
        "UINT32",
        "UINT16",
        "UINT8",
        "BOOL",
    ],
)
async def test_the_openapi_document_allows_every_datatype_the_infer_route_takes(
    service: Service, datatype: str
) -> None:
    # Client generators build requests from the document: a datatype it leaves out is one they cannot send.
    body = oip_body(1)
    body["inputs"][0].update(datatype=datatype, data=[True if datatype == "BOOL" else 1])
    r = await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
    assert r.status_code == 200, r.text
    schemas.InferBody.model_validate(body)


async def test_predict_proba_is_refused_only_when_a_version_that_answers_clients_gives_none(
    service: Service,
) -> None:
    canary = replace(without_probabilities("classifier"), version=2)
    asked = oip(outputs=[{"name": "predict_proba"}])
    service.route(served(1), canary, weight=0.5)
    r = await service.client.post("/v2/models/churn/infer", json=asked, headers=PREDICT)
    assert r.status_code == 422 and "version 2" in r.json()["error"], r.text
    for mode in (RolloutMode.SHADOW, RolloutMode.CANARY):
        service.route(served(1), canary, weight=0.0 if mode is RolloutMode.CANARY else 0.5, mode=mode)
        r = await service.client.post("/v2/models/churn/infer", json=asked, headers=PREDICT)
        assert r.status_code == 200 and r.json()["outputs"][0]["name"] == "predict_proba", r.text


@pytest.mark.parametrize(
    "version",
    ["1.0", "01", "+1", " 1", "1 ", "1_0", "0", "-1", "x", "\u0661", "2147483648", "9" * 5_000],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/churn/versions/{v}"),
        ("GET", "/v2/models/churn/versions/{v}/ready"),
        ("POST", "/v2/models/churn/versions/{v}/infer"),
    ],
    ids=["metadata", "ready", "infer"],
)
async def test_a_path_version_not_written_as_serving_writes_versions_is_a_404_saying_what_one_is(
    service: Service, method: str, path: str, version: str
) -> None:
    """The registry answers these paths' versions alike: 404, as for a version it does not have."""
    r = await service.client.request(
        method, path.format(v=quote(version)), json=oip_body() if method == "POST" else None, headers=PREDICT
    )
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error.startswith("model 'churn' has no version ") and "a version is a whole number" in error
    assert r.json()["code"] == "not-found"
    assert (
        await service.client.request(
            method, path.format(v="1"), json=oip_body() if method == "POST" else None, headers=PREDICT
        )
    ).status_code == 200


LONG = "m" * 10_000


@pytest.mark.parametrize(
    ("method", "path", "headers", "body"),
    [
        ("GET", f"/v2/models/{LONG}", PREDICT, None),
        ("GET", f"/v2/models/{LONG}/versions/1", PREDICT, None),
        ("GET", f"/v2/models/{LONG}/versions/x", PREDICT, None),
        ("GET", f"/v2/models/{LONG}/ready", PREDICT, None),
        ("GET", f"/v2/models/{LONG}/versions/1/ready", PREDICT, None),
        ("POST", f"/v2/models/{LONG}/infer", PREDICT, oip_body()),
        ("POST", f"/v2/models/{LONG}/versions/x/infer", PREDICT, oip_body()),
        ("POST", f"/v1/models/{LONG}/predict", PREDICT, {"records": [record()]}),
        ("GET", f"/v1/models/{LONG}", VIEWER, None),
        ("POST", f"/v1/models/{LONG}/rollback", OPERATOR, {"reason": "x"}),
        ("POST", f"/v1/models/{LONG}/promote", OPERATOR, {"reason": "x"}),
    ],
)
async def test_an_error_quotes_a_long_model_name_short(
    service: Service, method: str, path: str, headers: dict[str, str], body: Any
) -> None:
    # A name of 10,000 characters was repeated in the message, and the message is both error and detail:
    # a 404 of 30 KB.
    service.route(served(1))
    r = await service.client.request(method, path, json=body, headers=headers)
    assert r.status_code == 404, r.text
    detail = r.json()["detail"]
    assert f"{LONG[:128]!r}… (10,000 characters)" in detail and len(detail) < 500, detail


async def test_an_error_quotes_a_model_name_as_long_as_a_name_may_be_whole(service: Service) -> None:
    name = "m" * 128
    r = await service.client.get(f"/v1/models/{name}", headers=VIEWER)
    assert r.status_code == 404, r.text
    assert r.json()["detail"] == f"model {name!r} is not known to serving"


@pytest.mark.parametrize("twice", [False, True])
async def test_an_error_quotes_a_long_tensor_name_short(service: Service, twice: bool) -> None:
    service.route(served(1))
    body = oip_body()
    long = {"name": "t" * 9_000, "shape": [2], "datatype": "FP64", "data": [1.0, 2.0]}
    body["inputs"] += [long, long] if twice else [long]
    r = await service.client.post("/v2/models/churn/infer", json=body, headers=PREDICT)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "… (9,000 characters)" in detail and len(detail) < 600, detail
