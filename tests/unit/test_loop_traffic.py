"""The traffic generator of the demo, the end-to-end tests and the loop benchmark, against a fake server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from deploy.loop import LoopClient, Traffic, poll
from deploy.platform import Platform
from deploy.scenario import REFERENCE


class FakeServing:
    """Answers predictions with version 1 until told to route to a canary, version 2."""

    def __init__(self) -> None:
        self.canary_from: float | None = None
        self.count = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/feedback":
            return httpx.Response(202, json={"accepted": len(json.loads(request.content))})
        rows = json.loads(request.content)["records"]
        canary = self.canary_from is not None
        predictions = []
        for _ in rows:
            self.count += 1
            predictions.append(
                {
                    "prediction_id": f"p{self.count}",
                    "variant": "canary" if canary else "stable",
                    "model_version": 2 if canary else 1,
                }
            )
        return httpx.Response(200, json={"predictions": predictions})


async def _at_least(traffic: Traffic, version: int) -> bool:
    return version in traffic.stats.by_version


async def test_traffic_records_when_each_version_first_answered(tmp_path: Path) -> None:
    serving = FakeServing()
    client = LoopClient(Platform(tmp_path))
    await client.http.aclose()
    client.http = httpx.AsyncClient(transport=httpx.MockTransport(serving), base_url="http://serving")
    traffic = Traffic(client, "churn", phase=REFERENCE, requests_per_s=50, rows_per_request=3)
    traffic.start()
    try:
        await poll(lambda: _at_least(traffic, 1), deadline_s=10, what="stable answers")
        serving.canary_from = time.time()
        await poll(lambda: _at_least(traffic, 2), deadline_s=10, what="canary answers")
    finally:
        await traffic.stop()
        await client.close()

    first = traffic.stats.first_answer_at
    assert set(first) == {1, 2}
    assert first[1] <= serving.canary_from <= first[2]
    assert traffic.stats.failed == 0
