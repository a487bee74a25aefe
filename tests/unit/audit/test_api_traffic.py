"""Traffic data in the trail (a prediction's inputs and outputs, labels: often personal data) is for auditors:
every route that carries event payloads withholds it from a caller without the auditor role, showing the
event otherwise as recorded, and the export, whose rows go out whole, is the auditor's alone."""

from __future__ import annotations

import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest

from contracts.envelope import CloudEvent, NotJson
from contracts.feedback import GroundTruthReceived
from contracts.monitoring import DriftDetected
from contracts.predictions import TOPIC as PREDICTIONS_TOPIC
from contracts.predictions import PredictionsLogged
from contracts.topics import DEAD_LETTER
from libs.bus.core import Delivery, Record
from libs.http import create_app
from services.audit import api
from services.audit.domain import Signer
from services.audit.settings import AuditSettings
from tests.unit.audit.fakes import SEED, FakeArchive, FakeTrail, delivery, example, record

WITHHELD = ("dev-viewer", "dev-operator")
SHOWN = ("dev-auditor", "dev-admin")
PREDICTION, LABEL, NOT_JSON, DEAD_PREDICTION, DRIFT = 2, 3, 4, 5, 1
TRAFFIC = (PREDICTION, LABEL, NOT_JSON, DEAD_PREDICTION)
"""Sequence numbers of the trail below: the drift first, then a row of each kind of traffic."""


def traffic_cascade() -> tuple[str, list[Delivery]]:
    """A drift, a prediction and a label in one cascade, a prediction record that is not JSON, and a dead
    letter of the prediction (its value the prediction's, its origin topic named only by a header)."""
    drift = example(DriftDetected)
    prediction: CloudEvent[Any] = example(PredictionsLogged, cause=drift)
    label = example(GroundTruthReceived, cause=drift)
    key, value, headers = prediction.to_kafka()
    broken = Record(PREDICTIONS_TOPIC, 0, 9, key, b"inputs, not JSON", tuple(headers))
    dead = Record(
        DEAD_LETTER,
        0,
        0,
        key,
        value,
        (
            *headers,
            ("dlq_reason", b"handler-failed"),
            ("dlq_error", b"inputs[0].tenure: -3 is not a number of months"),  # quotes the record
            ("dlq_origin_topic", PREDICTIONS_TOPIC.encode()),
        ),
    )
    deliveries = [
        delivery(drift),
        delivery(prediction),
        delivery(label),
        Delivery(broken, None, NotJson("value is not JSON")),
        Delivery(dead, prediction),
    ]
    return drift.correlationid, deliveries


@pytest.fixture
async def trail() -> tuple[str, FakeTrail]:
    trail = FakeTrail()
    correlation_id, deliveries = traffic_cascade()

    for one in deliveries:  # a row each, in this order
        await record(trail, Signer(SEED), [one])
    return correlation_id, trail


@pytest.fixture
async def client(
    trail: tuple[str, FakeTrail], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    @asynccontextmanager
    async def reading(*_: Any, **__: Any) -> AsyncIterator[FakeTrail]:
        yield trail[1]

    monkeypatch.setattr(api, "reading", reading)
    settings = AuditSettings(env="test")
    app = create_app(settings, title="audit", description="audit", routers=[api.router])
    app.state.audit = types.SimpleNamespace(
        settings=settings,
        pool=None,
        role="audit_writer",
        archive=FakeArchive([]),
        exports=api.export_slots(settings.export_concurrency),
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit") as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def by_seq(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {e["seq"]: e for e in events}


def trace_events(node: Any) -> list[dict[str, Any]]:
    """Every event of a trace answer, dead letters included, wherever it sits in the tree."""
    found = []
    if isinstance(node, dict):
        if "seq" in node:
            found.append(node)
        for value in node.values():
            found += trace_events(value)
    elif isinstance(node, list):
        for item in node:
            found += trace_events(item)
    return found


def but_payload(view: dict[str, Any]) -> dict[str, Any]:
    """A view without its payload and the texts that may quote it (why it was refused)."""
    kept = {k: v for k, v in view.items() if k not in ("data", "value", "data_withheld", "error", "headers")}
    kept["error"] = view["error"] and {**view["error"], "detail": "-"}
    kept["headers"] = view.get("headers") and {**view["headers"], "dlq_error": "-"}
    return kept


async def all_events(client: httpx.AsyncClient, token: str) -> dict[int, dict[str, Any]]:
    answer = await client.get("/v1/events", params={"order": "oldest"}, headers=bearer(token))
    assert answer.status_code == 200, answer.text
    return by_seq(answer.json()["events"])


@pytest.mark.parametrize("token", WITHHELD)
async def test_traffic_data_is_withheld_from_callers_without_the_auditor_role(
    client: httpx.AsyncClient, token: str
) -> None:
    shown = await all_events(client, "dev-auditor")
    listed = await all_events(client, token)
    for seq in TRAFFIC:
        one = (await client.get(f"/v1/events/{seq}", headers=bearer(token))).json()
        for view in (listed[seq], one):
            assert (view["data"], view["value"]) == (None, None)
            assert "needs the auditor role" in view["data_withheld"]
            assert "not JSON" not in orjson.dumps(view).decode()  # why it was refused, quoting it
            assert "tenure" not in orjson.dumps(view).decode()
            if view["error"] is not None:
                assert view["error"]["detail"] == view["data_withheld"]
                assert view["error"]["reason"] == shown[seq]["error"]["reason"]
            # Everything but the payload as recorded: that it happened, and where it sits in the chain.
            assert but_payload(view) == but_payload(shown[seq])
    assert listed[DRIFT]["data"] == shown[DRIFT]["data"] is not None
    assert listed[DRIFT]["data_withheld"] is None


@pytest.mark.parametrize("token", SHOWN)
async def test_an_auditor_or_an_admin_reads_traffic_data(client: httpx.AsyncClient, token: str) -> None:
    events = await all_events(client, token)
    assert events[PREDICTION]["data"]["model"] == events[DEAD_PREDICTION]["data"]["model"] == "churn"
    assert events[LABEL]["data"] is not None
    assert events[NOT_JSON]["value"] == "inputs, not JSON"
    assert all(e["data_withheld"] is None for e in events.values())
    one = (await client.get(f"/v1/events/{PREDICTION}", headers=bearer(token))).json()
    assert one["data"] == events[PREDICTION]["data"]


@pytest.mark.parametrize("token", WITHHELD + SHOWN)
async def test_a_trace_withholds_traffic_data_as_the_events_do(
    client: httpx.AsyncClient, trail: tuple[str, FakeTrail], token: str
) -> None:
    answer = await client.get(f"/v1/trace/{trail[0]}", headers=bearer(token))
    assert answer.status_code == 200, answer.text
    events = by_seq(trace_events(answer.json()))
    assert set(events) == {DRIFT, *TRAFFIC}
    withheld = {seq for seq, e in events.items() if "auditor role" in e.get("data_withheld", "")}
    assert withheld == (set(TRAFFIC) if token in WITHHELD else set())
    assert all(events[seq]["data"] is None and events[seq].get("value") is None for seq in withheld)
    assert all((events[seq]["data"] or events[seq]["value"]) is not None for seq in set(events) - withheld)


async def test_a_viewer_still_filters_traffic_events_by_type_and_model(client: httpx.AsyncClient) -> None:
    answer = await client.get(
        "/v1/events", params={"type": "PredictionsLogged", "model": "churn"}, headers=bearer("dev-viewer")
    )
    [prediction] = [e for e in answer.json()["events"] if e["kind"] == "event"]
    assert (prediction["seq"], prediction["data"]) == (PREDICTION, None)
    assert "auditor role" in prediction["data_withheld"]


@pytest.mark.parametrize("token", WITHHELD)
async def test_the_export_needs_the_auditor_role(client: httpx.AsyncClient, token: str) -> None:
    for method in ("GET", "HEAD"):
        answer = await client.request(method, "/v1/export", headers=bearer(token))
        assert answer.status_code == 403
    assert "'auditor'" in (await client.get("/v1/export", headers=bearer(token))).json()["detail"]


@pytest.mark.parametrize("token", SHOWN)
async def test_an_auditor_or_an_admin_exports_every_record_whole(
    client: httpx.AsyncClient, token: str
) -> None:
    answer = await client.get("/v1/export", headers=bearer(token))
    assert answer.status_code == 200, answer.text
    rows = [orjson.loads(line) for line in answer.text.splitlines()[1:]]
    assert [row["seq"] for row in rows] == [1, 2, 3, 4, 5]
    assert "inputs, not JSON" in rows[NOT_JSON - 1]["record"]
