"""A drift policy an operator sets: every value it can hold is one the store can keep and the judgement
can use; anything else is refused with a 422 that names the field, before Postgres is reached."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import ValidationError

from contracts.monitoring import JENSEN_SHANNON_MAX, DriftTest
from libs.bus.core import encode_outgoing
from libs.errors import InvalidInput
from libs.http import create_app
from services.monitoring import api
from services.monitoring.adapters.postgres import _stored_policy
from services.monitoring.bootstrap import make_monitor
from services.monitoring.domain import DriftPolicy
from services.monitoring.handlers import Monitor, refresh_policies, set_policy
from services.monitoring.ports import StoredPolicy
from services.monitoring.settings import MonitoringSettings
from tests.unit.monitoring.test_domain import reference

BIG = 10**20  # beyond the 64-bit integers of orjson, which writes the policy's jsonb


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"small_sample_max": BIG}, "less than or equal to 1000000000"),
        ({"consecutive_windows": BIG}, "less than or equal to 1000"),
        ({"feature_thresholds": {"a\x00": 0.1}}, "feature_thresholds: 'a\\x00' is not a feature name"),
        ({"feature_tests": {"a\x00": "psi"}}, "feature_tests: 'a\\x00' is not a feature name"),
        ({"feature_tests": {"": "psi"}}, "feature_tests: '' is not a feature name"),
        # a lone surrogate has no UTF-8 form: pydantic wrote it as "\ufffd\ufffd\ufffd", another name
        ({"feature_tests": {"x\ud800": "psi"}}, "feature_tests: 'x\\ud800' is not a feature name"),
        ({"feature_thresholds": {"\udfff": 0.1}}, "feature_thresholds: '\\udfff' is not a feature name"),
        ({"feature_thresholds": {"tenure": -1}}, "greater than 0"),
        ({"feature_thresholds": {"tenure": 0}}, "greater than 0"),
        # no test named: an alpha in small windows, a distance in large ones
        ({"feature_thresholds": {"tenure": 7.5}}, "tenure: 7.5 is out of range: it is α in small windows"),
        (
            {"feature_thresholds": {"tenure": 1.0}, "feature_tests": {"tenure": "ks"}},
            "tenure: 1 is out of range: it is the α of ks, so it must be in (0, 1)",
        ),
        (
            {"feature_thresholds": {"plan": 0.9}, "feature_tests": {"plan": "jensen_shannon"}},
            "it is the distance of jensen_shannon, so it must be in (0, 0.8326]",
        ),
        ({"jensen_shannon_threshold": 0.9}, "less than or equal to 0.83255"),
    ],
)
def test_a_policy_the_store_or_the_judgement_could_not_use_is_refused(
    fields: dict[str, Any], words: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        DriftPolicy.model_validate(fields)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("threshold", "test"),
    [
        (0.01, DriftTest.KS),
        (0.99, DriftTest.CHI2),
        (JENSEN_SHANNON_MAX, DriftTest.JENSEN_SHANNON),
        (7.5, DriftTest.WASSERSTEIN),  # distances without an upper end take any positive threshold
        (2.0, DriftTest.PSI),
        (0.5, None),
    ],
)
def test_thresholds_in_their_tests_range_are_kept(threshold: float, test: DriftTest | None) -> None:
    tests = {"tenure": test} if test is not None else {}
    policy = DriftPolicy(feature_thresholds={"tenure": threshold}, feature_tests=tests)
    assert policy.threshold_for("tenure", test or DriftTest.KS) == threshold
    orjson.dumps(policy.model_dump(mode="json"))  # what the jsonb codec does


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = MonitoringSettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
    app = create_app(settings, title="monitoring", description="", routers=[api.router])
    # Neither can do anything: a body that got past validation would fail with a 500.
    app.state.runtime = app.state.monitor = object()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://monitoring") as c:
        yield c


@pytest.mark.parametrize(
    "body",
    [
        {"small_sample_max": BIG},
        {"consecutive_windows": BIG},
        {"feature_thresholds": {"a\x00": 0.1}},
        {"feature_tests": {"a\ud800": "psi"}},
        {"feature_thresholds": {"tenure": -1}},
        {"feature_thresholds": {"tenure": 7.5}},
    ],
)
async def test_putting_such_a_policy_is_422_before_the_database(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    r = await client.put(
        "/v1/models/churn/policy",
        content=json.dumps(body),  # escapes a lone surrogate ("\\ud800"), as a client's JSON writer may
        headers={"Authorization": "Bearer dev-operator", "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("body")


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        ("utf-16", "the JSON body reads as UTF-16, not UTF-8: send it as UTF-8"),
        (
            "utf-8-sig",
            "the JSON body starts with a byte order mark (bytes EF BB BF): send it as UTF-8 without one",
        ),
    ],
)
async def test_a_policy_body_that_is_not_utf8_is_422_not_read_in_its_encoding(
    client: httpx.AsyncClient, encoding: str, message: str
) -> None:
    # FastAPI's reader (Python's json, on bytes) read it: JSON between systems is UTF-8 (RFC 8259).
    r = await client.put(
        "/v1/models/churn/policy",
        content='{"alpha": 0.01}'.encode(encoding),
        headers={"Authorization": "Bearer dev-operator", "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == message


def test_a_stored_policy_that_breaks_a_newer_rule_gives_way_to_the_defaults() -> None:
    """Rows set before a rule existed are read back: one bad row must not stop monitoring judging every
    model (nor fail its policy reload in a loop)."""
    assert _stored_policy("churn", {"feature_thresholds": {"tenure": -1}}) is None
    assert _stored_policy("churn", {"alpha": 0.01}) == DriftPolicy(alpha=0.01)


class PolicyStore:
    """The policy calls of the MonitoringStore, on one dict."""

    def __init__(self) -> None:
        self.rows: dict[str, DriftPolicy] = {}
        self.versions: dict[str, int] = {}

    async def policy(self, model: str, *, lock: bool = False) -> DriftPolicy | None:
        return self.rows.get(model)

    async def save_policy(self, model: str, policy: DriftPolicy, actor: str) -> int:
        self.rows[model] = policy
        self.versions[model] = self.versions.get(model, 0) + 1
        return self.versions[model]


def per_feature(n: int, threshold: float) -> dict[str, Any]:
    names = [f"customer_activity_feature_{i:05d}_last_90_days" for i in range(n)]
    return {
        "feature_tests": dict.fromkeys(names, "wasserstein"),
        "feature_thresholds": dict.fromkeys(names, threshold),
    }


class Operator:
    """``set_policy`` as the PUT route calls it, on a :class:`PolicyStore`; what it publishes is encoded as
    the bus encodes it (refused when larger than consumers accept)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.store = PolicyStore()
        self.published: list[Any] = []

    async def put(self, model: str, fields: dict[str, Any]) -> StoredPolicy:
        async def publish(event: Any) -> None:
            encode_outgoing(event, max_bytes=self.monitor.max_event_bytes)
            self.published.append(event)

        return await set_policy(
            model,
            fields,
            actor="user:alice",
            monitor=self.monitor,
            store=self.store,  # type: ignore[arg-type]
            publish=publish,
        )


async def test_a_policy_too_large_to_be_replaced_later_is_refused_naming_the_limit() -> None:
    # DriftPolicyChanged carries the new policy and the one it replaces. A policy of 560 KB (per-feature
    # tests and thresholds of 5,000 features) was accepted, and then no change to one as large could be
    # announced: a PUT that only moved a threshold was a 413.
    operator = Operator(make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring"))

    with pytest.raises(InvalidInput) as caught:
        await operator.put("wide", per_feature(5_000, 0.2))
    assert "at most 491,808 bytes" in caught.value.message and "1,000,000" in caught.value.message
    assert operator.store.rows == {} and operator.published == []
    # The largest policy accepted can always be replaced by another as large.
    await operator.put("wide", per_feature(4_000, 0.2))
    await operator.put("wide", per_feature(4_000, 0.3))
    assert [
        e.data.policy.feature_thresholds["customer_activity_feature_00000_last_90_days"]
        for e in operator.published
    ] == [
        0.2,
        0.3,
    ]


async def test_a_policy_naming_no_feature_of_a_known_model_is_refused_naming_its_features() -> None:
    # A misspelt feature ("plna") was accepted, stored and announced, and never applied: the feature kept the
    # automatic test and the policy's thresholds while the operator believed it set.
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    monitor.live.add_reference(reference())  # churn version 1: x0, x1, x2, plan
    operator = Operator(monitor)

    with pytest.raises(InvalidInput) as caught:
        await operator.put("churn", {"feature_thresholds": {"x0": 0.2, "plna": 0.3, "x9": 0.3}})
    assert caught.value.message == (
        "feature_thresholds names 'plna' and 'x9', which no version of model 'churn' has (its features: x0, "
        "x1, x2, plan); name features of the model, or set the policy again once a version with them is "
        "registered"
    )
    assert caught.value.extra == {"field": "feature_thresholds"}
    with pytest.raises(InvalidInput, match=r"^feature_tests names 'X0', which no version"):
        await operator.put("churn", {"feature_tests": {"X0": "ks"}})
    assert operator.store.rows == {} and operator.published == []

    await operator.put("churn", {"feature_tests": {"plan": "psi"}, "feature_thresholds": {"x0": 0.2}})
    # A feature of any version of the model counts: the policy is the model's, for every version.
    monitor.live.add_reference(replace(reference(n_numeric=5), version=2))
    await operator.put("churn", {"feature_thresholds": {"x4": 0.2}})
    # A model monitoring knows no version of yet takes any name: its first version may bring them.
    await operator.put("fraud", {"feature_tests": {"amount": "ks"}})
    assert sorted(operator.store.rows) == ["churn", "fraud"] and len(operator.published) == 3


@pytest.fixture
async def viewer(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Monitor]]:
    settings = MonitoringSettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
    app = create_app(settings, title="monitoring", description="", routers=[api.router])
    monitor = make_monitor(settings, artifacts=None, source="/test/monitoring")
    monitor.live.add_reference(reference())  # churn version 1
    app.state.runtime, app.state.monitor = object(), monitor
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://monitoring", headers={"Authorization": "Bearer dev-viewer"}
    ) as c:
        yield c, monitor


async def test_the_policy_of_a_model_monitoring_never_saw_is_404_naming_it(
    viewer: tuple[httpx.AsyncClient, Monitor],
) -> None:
    # A misspelt model name answered 200 with the service defaults, as if that model were watched so.
    client, monitor = viewer
    r = await client.get("/v1/models/churm/policy")
    assert r.status_code == 404, r.text
    assert "'churm'" in r.json()["detail"]

    known = await client.get("/v1/models/churn/policy")  # a registered version: its policy, the defaults
    assert known.status_code == 200 and known.json() == monitor.defaults.model_dump(mode="json")
    # A policy set for a model not registered yet is the one in force for it.
    monitor.policies["fraud"] = DriftPolicy(alpha=0.01)
    set_first = await client.get("/v1/models/fraud/policy")
    assert set_first.status_code == 200 and set_first.json()["alpha"] == 0.01


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("/v1/models/churn/policy", 200),
        ("/v1/models/churm/policy", 404),
        ("/v1/models/churm/drift", 404),
        ("/v1/models/churm/drift.html", 404),
    ],
)
async def test_a_head_answers_as_the_get_without_the_body(
    viewer: tuple[httpx.AsyncClient, Monitor], url: str, status: int
) -> None:
    client, _ = viewer
    got, head = await client.get(url), await client.head(url)
    assert (got.status_code, head.status_code) == (status, status), got.text
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-length"] == got.headers["content-length"]
    assert head.content == b""


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"alpha": 0.01, "alpha": 0.5}', "alpha"),
        (b'{"feature_thresholds": {"tenure": 0.1, "tenure": 0.3}}', "tenure"),
    ],
)
async def test_a_policy_naming_a_key_twice_is_422_not_its_last_value(
    client: httpx.AsyncClient, body: bytes, key: str
) -> None:
    # FastAPI's reader kept the last value, where a reader keeping the first (a proxy, a log) saw another.
    r = await client.put(
        "/v1/models/churn/policy",
        content=body,
        headers={"Authorization": "Bearer dev-operator", "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == (
        f"the JSON body names the key {key!r} more than once in one object; give each key once"
    )


class LockedPolicies(PolicyStore):
    """A PolicyStore whose ``policy(lock=True)`` takes the model's lock, held until the transaction ends."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = asyncio.Lock()

    async def policy(self, model: str, *, lock: bool = False) -> DriftPolicy | None:
        if lock:
            await self.lock.acquire()
        return self.rows.get(model)


class FirstGoesOnLast:
    """A runtime on a :class:`LockedPolicies` whose first transaction, once committed, waits to be let go on:
    the first PUT's request resumes after the second's committed, as on a busy event loop (the connection's
    release after the commit is a round trip of its own)."""

    def __init__(self, table: LockedPolicies) -> None:
        self.table = table
        self.begun = 0
        self.first_committed = asyncio.Event()
        self.first_goes_on = asyncio.Event()

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[Any]:
        self.begun += 1
        first = self.begun == 1

        async def publish(event: Any) -> None:
            return None

        yield type("Tx", (), {"conn": self.table, "publish": staticmethod(publish)})()
        if self.table.lock.locked():  # the commit ends the transaction-scoped lock
            self.table.lock.release()
        if first:
            self.first_committed.set()
            await self.first_goes_on.wait()


async def test_of_two_policies_put_at_once_the_one_set_last_stays_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first PUT committed, then the second took the lock, committed and put its policy in force; the
    # first's request went on last and put its own, older policy in force until the next tick's reload.
    settings = MonitoringSettings(env="test", auth_tokens_file=tmp_path / "tokens.json")
    app = create_app(settings, title="monitoring", description="", routers=[api.router])
    monitor = make_monitor(settings, artifacts=None, source="/test/monitoring")
    table = LockedPolicies()
    runtime = FirstGoesOnLast(table)
    app.state.runtime, app.state.monitor = runtime, monitor
    monkeypatch.setattr(api, "PgMonitoringStore", lambda conn: conn)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://monitoring", headers={"Authorization": "Bearer dev-operator"}
    ) as client:
        first = asyncio.create_task(client.put("/v1/models/churn/policy", json={"psi_threshold": 0.3}))
        await asyncio.wait_for(runtime.first_committed.wait(), timeout=30)
        second = await client.put("/v1/models/churn/policy", json={"psi_threshold": 0.4})
        runtime.first_goes_on.set()
        first_answer = await asyncio.wait_for(first, timeout=30)

    assert (first_answer.status_code, second.status_code) == (200, 200), (first_answer.text, second.text)
    assert first_answer.json()["psi_threshold"] == 0.3  # each PUT answers the policy it set
    assert table.rows["churn"].psi_threshold == 0.4 and table.versions["churn"] == 2
    assert monitor.policy("churn") == table.rows["churn"]


class StoredPolicies:
    """The policies a tick reloads, as another replica left them."""

    def __init__(self, policies: dict[str, StoredPolicy]) -> None:
        self.stored = policies

    async def policies_fingerprint(self) -> str:
        return repr(sorted((m, s.version) for m, s in self.stored.items()))

    async def policies(self) -> dict[str, StoredPolicy]:
        return self.stored


async def test_a_setting_put_in_force_after_a_tick_took_a_later_one_does_not_undo_it() -> None:
    # A PUT here committed version 2; another replica's PUT committed version 3, which this replica's tick
    # took; the first request went on only then. Its older policy stood until a policy changed again: the
    # fingerprint the tick keeps was already the one of version 3.
    monitor = make_monitor(MonitoringSettings(), artifacts=None, source="/test/monitoring")
    later = StoredPolicy(DriftPolicy(psi_threshold=0.4), 3)
    await refresh_policies(monitor=monitor, store=StoredPolicies({"churn": later}))  # type: ignore[arg-type]

    assert not monitor.hold_policy("churn", StoredPolicy(DriftPolicy(psi_threshold=0.3), 2))
    assert monitor.policy("churn") == later.policy
    assert monitor.hold_policy("churn", StoredPolicy(DriftPolicy(psi_threshold=0.5), 4))
    assert monitor.policy("churn").psi_threshold == 0.5
