"""Driving the closed loop from outside, as a user's programs would: over HTTP and by reading events.

Shared by the demo (`driftloop demo`), the end-to-end tests and the loop benchmark, so all three
exercise the platform the same way: a :class:`LoopClient` for the HTTP surfaces, an :class:`EventTail`
that reads every platform topic, and :class:`Traffic` that sends predictions and, later, their labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pandas as pd
from aiokafka import AIOKafkaConsumer

from contracts.envelope import CloudEvent, EventPayload, MalformedEvent
from contracts.registry import EVENT_TYPES
from contracts.topics import DEAD_LETTER, TOPICS
from deploy.platform import Platform
from deploy.scenario import TARGET, Phase, base_features, generate

OPERATOR = {"Authorization": "Bearer dev-operator"}
VIEWER = {"Authorization": "Bearer dev-viewer"}
PREDICT = {"Authorization": "Bearer dev-predict"}


def spec_yaml(
    model: str,
    *,
    dataset: str,
    n_noise: int = 0,
    cooldown_s: float = 5.0,
    estimator: str = "logistic_regression",
    params: str = "{max_iter: 300}",
) -> str:
    """The demo's model spec: the scenario's features, a quick estimator, a short cooldown."""
    features = "\n".join(f"  - {{name: {n}, type: {t}}}" for n, t in base_features(n_noise))
    return f"""name: {model}
description: Will this customer leave? (the demo's synthetic churn world)
features:
{features}
target: {TARGET}
task: classification
estimator: {estimator}
params: {params}
seed: 7
base_datasets: [{dataset}]
retrain:
  cooldown_seconds: {cooldown_s}
  daily_budget: 100
  train_on_new_dataset: true
  training_set: {{mode: weighted, traffic_weight: 4.0}}
validation:
  thresholds: {{roc_auc: 0.7}}
  champion: {{max_degradation: 0.02, resamples: 200}}
  latency_budget_ms_per_row: 5.0
"""


class LoopClient:
    """The platform's HTTP surfaces, with the development tokens."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.http = httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=32))

    async def close(self) -> None:
        await self.http.aclose()

    def url(self, service: str, path: str) -> str:
        return f"{self.platform.url(service)}{path}"

    async def put_spec(self, model: str, spec: str) -> dict[str, Any]:
        r = await self.http.put(
            self.url("training", f"/v1/models/{model}/spec"),
            content=spec.encode(),
            headers={**OPERATOR, "Content-Type": "application/yaml"},
        )
        r.raise_for_status()
        return dict(r.json())

    async def upload_dataset(self, name: str, frame: pd.DataFrame, models: Sequence[str]) -> dict[str, Any]:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        r = await self.http.post(
            self.url("registry", "/v1/datasets"),
            files={"file": (f"{name}.parquet", buffer.getvalue(), "application/octet-stream")},
            data={"name": name, "models": ",".join(models)},
            headers=OPERATOR,
        )
        r.raise_for_status()
        return dict(r.json())

    async def predict(self, model: str, records: list[dict[str, Any]], keys: list[str]) -> httpx.Response:
        return await self.http.post(
            self.url("serving", f"/v1/models/{model}/predict"),
            json={"records": records, "entity_keys": keys},
            headers=PREDICT,
        )

    async def feedback(self, items: list[dict[str, Any]]) -> httpx.Response:
        return await self.http.post(self.url("serving", "/v1/feedback"), json=items, headers=PREDICT)

    async def wait_served(self, model: str, *, timeout_s: float = 30) -> None:
        """Until serving answers for ``model`` (``GET /v2/models/{model}/ready``, 200): a version's
        RolloutPromoted is published when the route is decided, and the replica serves it once its routing
        re-read has loaded it, a moment later; a client sending at once may get 404 until then."""
        deadline = time.monotonic() + timeout_s
        while (await self.http.get(self.url("serving", f"/v2/models/{model}/ready"))).status_code != 200:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"serving did not answer for model {model!r} within {timeout_s:g}s")
            await asyncio.sleep(0.05)

    async def route(self, model: str) -> dict[str, Any] | None:
        r = await self.http.get(self.url("serving", f"/v1/models/{model}"), headers=VIEWER)
        return None if r.status_code == 404 else dict(r.json())

    async def rollback(self, model: str, reason: str) -> httpx.Response:
        return await self.http.post(
            self.url("serving", f"/v1/models/{model}/rollback"), json={"reason": reason}, headers=OPERATOR
        )

    async def audit_trace(self, correlation_id: str) -> dict[str, Any]:
        r = await self.http.get(self.url("audit", f"/v1/trace/{correlation_id}"), headers=VIEWER)
        r.raise_for_status()
        return dict(r.json())

    async def audit_verify(self) -> dict[str, Any]:
        r = await self.http.get(self.url("audit", "/v1/verify"), headers=VIEWER)
        return dict(r.json())


@dataclass
class Seen:
    """One event read off a topic, with when this process saw it."""

    event: CloudEvent[Any]
    topic: str
    seen_at: float


class EventTail:
    """Reads every platform topic (all but predictions) from the moment it starts, decoding each event.

    ``on_event`` is called for each one (the demo narrates with it); :meth:`wait_for` polls the events
    seen so far with a deadline.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        prefix: str = "",
        on_event: Callable[[Seen], None] | None = None,
        from_beginning: bool = False,
    ) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.on_event = on_event
        self.from_beginning = from_beginning
        self.seen: list[Seen] = []
        self.dead_letters: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), timeout=60)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        topics = [self.prefix + name for name, spec in TOPICS.items() if not spec.high_volume]
        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if self.from_beginning else "latest",
        )
        await consumer.start()
        try:
            # Without a group the consumer assigns itself every partition on its first fetch; "latest" is
            # pinned then, so nothing published after start() returns is missed.
            while not consumer.assignment():
                self._take_all(await consumer.getmany(timeout_ms=100))
            for tp in consumer.assignment():
                await consumer.position(tp)
            self._ready.set()
            while True:
                self._take_all(await consumer.getmany(timeout_ms=200))
        finally:
            await consumer.stop()

    def _take_all(self, batch: dict[Any, list[Any]]) -> None:
        for records in batch.values():
            for r in records:
                self._take(r)

    def _take(self, record: Any) -> None:
        topic = record.topic[len(self.prefix) :]
        if topic == DEAD_LETTER:
            self.dead_letters.append(record)
            return
        try:
            event = EVENT_TYPES.decode(record.value, record.headers)
        except MalformedEvent:
            return
        seen = Seen(event, topic, time.monotonic())
        self.seen.append(seen)
        if self.on_event is not None:
            self.on_event(seen)

    def events(self, of: type[EventPayload] | tuple[type[EventPayload], ...]) -> list[CloudEvent[Any]]:
        return [s.event for s in self.seen if isinstance(s.event.data, of)]

    async def wait_for(
        self,
        of: type[EventPayload] | tuple[type[EventPayload], ...],
        where: Callable[[CloudEvent[Any]], bool] = lambda e: True,
        *,
        deadline_s: float = 120.0,
    ) -> CloudEvent[Any]:
        """The first event of the type(s) matching ``where``, waiting up to ``deadline_s``."""
        until = time.monotonic() + deadline_s
        while True:
            for s in self.seen:
                if isinstance(s.event.data, of) and where(s.event):
                    return s.event
            if time.monotonic() > until:
                names = of.__name__ if isinstance(of, type) else "/".join(c.__name__ for c in of)
                raise TimeoutError(f"no {names} within {deadline_s:.0f}s")
            await asyncio.sleep(0.1)


@dataclass
class TrafficStats:
    """What the traffic generator sent and what came back."""

    requests: int = 0
    rows: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    by_variant: dict[str, int] = field(default_factory=dict)
    by_version: dict[int, int] = field(default_factory=dict)
    labels_sent: int = 0
    # Model version -> when (epoch seconds) its first answer came back: when a canary began serving.
    first_answer_at: dict[int, float] = field(default_factory=dict)


class Traffic:
    """Predict requests at a steady rate from the scenario's world, and their true labels a little later.

    The phase can be switched while it runs (that is the shift). Each row carries an entity key (a
    customer id), so routing is sticky per customer.
    """

    def __init__(
        self,
        client: LoopClient,
        model: str,
        *,
        phase: Phase,
        requests_per_s: float = 40.0,
        rows_per_request: int = 10,
        label_delay_s: float = 1.0,
        label_share: float = 1.0,
        n_noise: int = 0,
        seed: int = 1000,
    ) -> None:
        self.client = client
        self.model = model
        self.phase = phase
        self.interval = 1.0 / requests_per_s
        self.rows = rows_per_request
        self.label_delay_s = label_delay_s
        self.label_share = label_share
        self.n_noise = n_noise
        self.seeds = itertools.count(seed)
        self.customers = itertools.count(1)
        self.stats = TrafficStats()
        self._labels: list[tuple[float, dict[str, Any]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._label())]

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _send(self) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        next_at = time.monotonic()
        while not self._stopping:
            next_at += self.interval
            task = asyncio.create_task(self._one())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*in_flight, return_exceptions=True)

    async def _one(self) -> None:
        frame = generate(self.rows, self.phase, seed=next(self.seeds), n_noise=self.n_noise)
        labels = frame.pop(TARGET).tolist()
        records = frame.to_dict(orient="records")
        keys = [f"customer-{next(self.customers)}" for _ in records]
        try:
            response = await self.client.predict(self.model, records, keys)
        except httpx.HTTPError as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        if response.status_code != 200:
            self._fail(f"{response.status_code}: {response.text[:200]}")
            return
        self.stats.requests += 1
        self.stats.rows += len(records)
        answered_at = time.time()
        due = time.monotonic() + self.label_delay_s
        for i, p in enumerate(response.json()["predictions"]):
            self.stats.by_variant[p["variant"]] = self.stats.by_variant.get(p["variant"], 0) + 1
            self.stats.by_version[p["model_version"]] = self.stats.by_version.get(p["model_version"], 0) + 1
            self.stats.first_answer_at.setdefault(p["model_version"], answered_at)
            if (hash(keys[i]) % 1000) / 1000 < self.label_share:
                self._labels.append((due, {"prediction_id": p["prediction_id"], "label": labels[i]}))

    def _fail(self, why: str) -> None:
        self.stats.failed += 1
        if len(self.stats.failures) < 20:
            self.stats.failures.append(why)

    async def _label(self) -> None:
        while not self._stopping or self._labels:
            now = time.monotonic()
            due = [item for at, item in self._labels if at <= now]
            self._labels = [(at, item) for at, item in self._labels if at > now]
            for chunk in range(0, len(due), 500):
                batch = due[chunk : chunk + 500]
                try:
                    response = await self.client.feedback(batch)
                    if response.status_code == 202:
                        self.stats.labels_sent += len(batch)
                except httpx.HTTPError:
                    pass  # labels are best effort, like real ground truth; monitoring counts what arrives
            if self._stopping and not due:
                return
            await asyncio.sleep(0.25)


async def poll(
    check: Callable[[], Awaitable[Any]],
    *,
    deadline_s: float,
    interval_s: float = 0.25,
    what: str = "",
    error: type[Exception] = TimeoutError,
) -> Any:
    """Poll until ``check`` returns something truthy; at the deadline raise ``error`` naming ``what`` and
    the last value (tests raise AssertionError, through tests/waiting.py)."""
    until = time.monotonic() + deadline_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > until:
            raise error(f"{what or 'condition'} not met within {deadline_s:g}s (last value: {value!r})")
        await asyncio.sleep(interval_s)
