"""Every service's /metrics keeps to Prometheus's conventions (https://prometheus.io/docs/practices/naming/),
as `promtool check metrics` checks them and a little further (tests/unit/metrics_lint.py), and every series
it exposes is named in the docs. The linter is shown failing on a deliberately bad exposition first."""

from __future__ import annotations

import importlib
import pkgutil

import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase

from tests.unit.metrics_lint import NAMESPACE, SUBSYSTEMS, declared_by, families, lint
from tests.unit.test_doc_references import PAGES, named_series
from tests.unit.test_openapi_errors import SETTINGS, app_of

BAD = """\
# HELP driftloop_serving_requests Predict requests answered.
# TYPE driftloop_serving_requests counter
driftloop_serving_requests 3.0
# TYPE driftloop_serving_latency_ms histogram
driftloop_serving_latency_ms_bucket{le="1.0"} 1.0
driftloop_serving_latency_ms_bucket{le="+Inf"} 1.0
driftloop_serving_latency_ms_count 1.0
driftloop_serving_latency_ms_sum 0.5
# HELP driftloop_serving_shadowQueue_total Shadow scorings waiting.
# TYPE driftloop_serving_shadowQueue_total gauge
driftloop_serving_shadowQueue_total 2.0
# HELP myapp_things_total Things that happened.
# TYPE myapp_things_total counter
myapp_things_total 1.0
# HELP driftloop_training_wait_milliseconds Time waited for the store.
# TYPE driftloop_training_wait_milliseconds gauge
driftloop_training_wait_milliseconds 250.0
# HELP driftloop_bus_backlog_count Outbox rows not yet published.
# TYPE driftloop_bus_backlog_count gauge
driftloop_bus_backlog_count 4.0
# HELP driftloop_serving_errors_total Model calls that failed.
# TYPE driftloop_serving_errors_total counter
driftloop_serving_errors_total{modelName="churn"} 1.0
# HELP driftloop_serving_engine Engine answering.
# TYPE driftloop_serving_engine gauge
driftloop_serving_engine{le="x"} 1.0
# HELP driftloop_serving_request_seconds Whole predict requests.
# TYPE driftloop_serving_request_seconds histogram
driftloop_serving_request_seconds_bucket{le="1.0"} 0.0
driftloop_serving_request_seconds_bucket{le="100.0"} 1.0
driftloop_serving_request_seconds_bucket{le="5000.0"} 1.0
driftloop_serving_request_seconds_bucket{le="+Inf"} 1.0
driftloop_serving_request_seconds_count 1.0
driftloop_serving_request_seconds_sum 42.0
# HELP driftloop_serving_events_counter_total Events seen.
# TYPE driftloop_serving_events_counter_total counter
driftloop_serving_events_counter_total 1.0
# HELP driftloop_audit_reused_total reused
# TYPE driftloop_audit_reused_total counter
driftloop_audit_reused_total 1.0
# HELP driftloop_other_things_total Things of no package of ours.
# TYPE driftloop_other_things_total counter
driftloop_other_things_total 1.0
# HELP driftloop_monitoring_join_latency Time a label join took.
# TYPE driftloop_monitoring_join_latency gauge
driftloop_monitoring_join_latency 0.2
# HELP driftloop_bus_lag Records behind.
# TYPE driftloop_bus_lag gauge
# HELP driftloop_bus_lag Records behind.
# TYPE driftloop_bus_lag gauge
driftloop_bus_lag 1.0
"""

GOOD = """\
# HELP driftloop_serving_requests_total Predict requests answered.
# TYPE driftloop_serving_requests_total counter
driftloop_serving_requests_total{model="churn",version="3"} 3.0
# HELP driftloop_serving_request_seconds Whole predict requests answered.
# TYPE driftloop_serving_request_seconds histogram
driftloop_serving_request_seconds_bucket{le="0.005",model="churn"} 1.0
driftloop_serving_request_seconds_bucket{le="+Inf",model="churn"} 1.0
driftloop_serving_request_seconds_count{model="churn"} 1.0
driftloop_serving_request_seconds_sum{model="churn"} 0.004
# HELP driftloop_bus_outbox_backlog Outbox rows not yet published.
# TYPE driftloop_bus_outbox_backlog gauge
driftloop_bus_outbox_backlog{schema="serving"} 0.0
# HELP python_info Python platform information
# TYPE python_info gauge
python_info{implementation="CPython",major="3"} 1.0
"""


def test_the_linter_finds_each_way_a_metric_breaks_the_conventions() -> None:
    problems = lint(BAD)

    expected = {
        "driftloop_serving_requests": 'counter metrics should have "_total" suffix',
        "driftloop_serving_latency_ms": "no help text",
        "driftloop_serving_shadowQueue_total": "'snake_case' not 'camelCase'",
        "myapp_things_total": "start with the namespace driftloop_",
        "driftloop_training_wait_milliseconds": 'use base unit "seconds" instead of "milliseconds"',
        "driftloop_bus_backlog_count": 'should not have "_count" suffix',
        "driftloop_serving_errors_total": "label name 'modelName'",
        "driftloop_serving_engine": 'should not have "le" label',
        "driftloop_serving_request_seconds": "look like milliseconds",
        "driftloop_serving_events_counter_total": "should not include type 'counter'",
        "driftloop_audit_reused_total": "the help text says what",
        "driftloop_other_things_total": "the package that exposes the series",
        "driftloop_monitoring_join_latency": "a duration is measured in seconds",
        "driftloop_bus_lag": "declared 2 times",
    }
    for name, problem in expected.items():
        assert any(p.startswith(f"{name}: ") and problem in p for p in problems), (name, problem, problems)
    assert "driftloop_serving_latency_ms: metric names should not contain abbreviated units" in problems
    assert (
        'driftloop_serving_shadowQueue_total: non-counter metrics should not have "_total" suffix' in problems
    )
    assert {p.split(": ")[0] for p in problems} == set(expected)


def test_an_exposition_that_keeps_to_the_conventions_lints_clean() -> None:
    assert lint(GOOD) == []


async def scrape(service: str) -> str:
    """What GET /metrics answers on the service's app, once everything its process imports is imported."""
    importlib.import_module(f"services.{service}.bootstrap")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app_of(service)), base_url="http://t"
    ) as c:
        r = await c.get("/metrics")
    assert r.status_code == 200
    return r.text


@pytest.mark.parametrize("service", list(SETTINGS))
async def test_every_service_metrics_keep_to_the_conventions(service: str) -> None:
    text = await scrape(service)
    own = [
        f.name for f in families(text) if f.name.startswith((f"{NAMESPACE}_bus_", f"{NAMESPACE}_{service}_"))
    ]

    assert len(own) >= 12, own  # the bus's series at least: the scrape saw the service's registry
    assert lint(text, declared_by()) == []


def defined_series() -> dict[str, list[str]]:
    """Module -> names of the prometheus_client metrics it defines at its top level, for every module of
    libs and services."""
    out: dict[str, list[str]] = {}
    for top in ("libs", "services"):
        for info in pkgutil.walk_packages(importlib.import_module(top).__path__, f"{top}."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            names = [v._name for v in vars(module).values() if isinstance(v, MetricWrapperBase)]
            if names:
                out[info.name] = names
    return out


def test_each_series_is_named_after_the_package_that_exposes_it() -> None:
    defined = defined_series()
    wrong = []
    for module, names in defined.items():
        package = module.split(".")[1]
        if module.startswith("libs."):  # the shared layers: the bus, and HTTP (libs.http, libs.http_server)
            package = "bus" if package == "bus" else package.split("_")[0]
        wrong += [f"{module}: {n}" for n in names if not n.startswith(f"{NAMESPACE}_{package}_")]

    assert {m.split(".")[1] for m in defined if m.startswith("services.")} >= set(SUBSYSTEMS) - {
        "bus",
        "http",
        "registry",
    }
    assert wrong == []


async def test_every_series_a_service_exposes_is_named_in_the_docs() -> None:
    named = {name for _, name in named_series([p for p in PAGES if p.name != "benchmarks.md"])}
    missing = set()
    for service in SETTINGS:
        for family in families(await scrape(service)):
            if family.name.startswith(f"{NAMESPACE}_") and not family.name.endswith("_created"):
                missing |= {family.name} - named

    assert sorted(missing) == []
