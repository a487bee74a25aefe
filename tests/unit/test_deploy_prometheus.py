"""deploy/prometheus/: the scrape config reaches every service where it listens, and the alerting rules parse
and read only series and labels the services export, so a renamed series or label fails here rather than
leaving an alert that never fires.

Read from the files themselves (no Prometheus here): the expressions are parsed by promql-parser, the
series and their labels come from the registry of the code (test_doc_references.py's scan).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
import yaml

from deploy.platform import service_ports
from deploy.settings_doc import SERVICE_SETTINGS
from libs.settings import PROJECT_ROOT
from tests.unit.test_doc_references import exported_series, named_series, series_labels, wrong_labels
from tests.unit.test_openapi_errors import app_of

PROMETHEUS = PROJECT_ROOT / "deploy" / "prometheus"
SCRAPE = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
ALERTS = PROMETHEUS / "alerts.yml"
SEVERITIES = {"critical", "warning", "info"}
PROMETHEUS_SERIES: dict[str, tuple[str, ...]] = {"up": ()}
"""Series Prometheus makes itself for each target (its target labels only)."""


def targets() -> dict[str, str]:
    """Each scraped service's `service` label and its target, `host:port`."""
    return {
        config["labels"]["service"]: target
        for job in SCRAPE["scrape_configs"]
        for config in job["static_configs"]
        for target in config["targets"]
    }


def target_labels() -> set[str]:
    """The labels Prometheus puts on every series it scrapes: its own and the scrape config's."""
    given = {
        label
        for job in SCRAPE["scrape_configs"]
        for config in job["static_configs"]
        for label in config["labels"]
    }
    return {"job", "instance", *given}


def test_every_service_is_scraped_at_its_own_port() -> None:
    defaults = {cls.service: cls.model_fields["http_port"].default for cls in SERVICE_SETTINGS}
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]
    published = {name: compose[name]["ports"][0].rsplit(":", 1)[1] for name in defaults}

    assert defaults == service_ports(), "the settings' defaults and the local platform's ports differ"
    assert {name: str(port) for name, port in defaults.items()} == published
    assert targets() == {name: f"{name}:{port}" for name, port in defaults.items()}
    assert {job.get("metrics_path", "/metrics") for job in SCRAPE["scrape_configs"]} == {"/metrics"}


@pytest.mark.parametrize("name", sorted(targets()))
async def test_metrics_answers_the_scrape_without_a_token(name: str) -> None:
    """The scrape config sends no credentials, and the Host header its target names (a compose service name)
    must be one a service in development mode answers for: else the target is down with a 401 or a 421."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app_of(name)), base_url=f"http://{targets()[name]}"
    ) as client:
        answer = await client.get("/metrics")

    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain"), answer.headers


def test_the_alerting_rules_are_loaded_from_beside_the_config() -> None:
    assert SCRAPE["rule_files"] == [ALERTS.name]
    assert ALERTS.parent == PROMETHEUS


def rules(path: Path = ALERTS) -> list[dict[str, Any]]:
    """Every rule of every group of a rule file."""
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    found = rules()
    names = [rule["alert"] for rule in found]

    assert len(found) > 20
    assert len(set(names)) == len(names), "an alert name is given twice"
    assert [
        rule["alert"]
        for rule in found
        if rule.get("labels", {}).get("severity") not in SEVERITIES
        or not rule.get("annotations", {}).get("summary")
        or not rule.get("annotations", {}).get("description")
    ] == []
    for rule in found:
        if "for" in rule:
            promql_parser.parse_duration(rule["for"])


def test_every_expression_parses() -> None:
    unparsed = []
    for rule in rules():
        try:
            promql_parser.parse(rule["expr"])
        except ValueError as error:
            unparsed.append(f"{rule['alert']}: {error}")

    assert unparsed == []


def selectors(expr: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    """The series selectors of an expression, at any depth."""
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(expr, pre_visit=visit)
    return found


def labels_of(name: str, labels: dict[str, tuple[str, ...]], scraped: set[str]) -> set[str]:
    """The labels a series has once scraped: its own, the targets', and `le` on a histogram's buckets."""
    own = labels.get(name, PROMETHEUS_SERIES.get(name, ()))
    return {*own, *scraped, *({"le"} if name.endswith("_bucket") else set())}


def groupings(expr: promql_parser.Expr) -> list[tuple[list[str], list[promql_parser.Expr]]]:
    """The labels each aggregation groups by (`by (...)`, `without (...)`) and each binary operation matches
    on (`on (...)`, `ignoring (...)`, `group_left (...)`), with the expressions they apply to."""
    found: list[tuple[list[str], list[promql_parser.Expr]]] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            found.append((node.modifier.labels, [node.expr]))
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching, grouped = node.modifier.matching, node.modifier.group_labels or []
            found.append(([*(matching.labels if matching else []), *grouped], [node.lhs, node.rhs]))

    promql_parser.walk(expr, pre_visit=visit)
    return found


def expressions(path: Path = ALERTS) -> list[tuple[str, str]]:
    """(alert, expression) of every rule of a rule file."""
    return [(rule["alert"], rule["expr"]) for rule in rules(path)]


def wrong_series(
    named_exprs: list[tuple[str, str]], labels: dict[str, tuple[str, ...]], scraped: set[str]
) -> list[str]:
    """`name: what` for each series an expression reads that the code does not export, each label it
    matches a series on that the series lacks, and each label it groups or matches by that none of the
    series under it has. Shared with test_deploy_grafana.py, whose names are the dashboard's panels."""
    wrong = []
    for where, text in named_exprs:
        expr = promql_parser.parse(text)
        for selector in selectors(expr):
            name = selector.name or ""
            if name not in labels and name not in PROMETHEUS_SERIES:
                wrong.append(f"{where}: {name or selector} (no such series)")
                continue
            have = labels_of(name, labels, scraped)
            wrong += [
                f"{where}: {name}{{{matcher.name}}}"
                for matcher in selector.matchers.matchers
                if matcher.name not in have
            ]
        for named, under in groupings(expr):
            have = {
                label
                for part in under
                for selector in selectors(part)
                for label in labels_of(selector.name or "", labels, scraped)
            }
            wrong += [f"{where}: by {label}" for label in named if label not in have]
    return wrong


def test_every_series_and_label_the_alerts_read_is_exported() -> None:
    labels = series_labels()
    named = [name for _, name in named_series([ALERTS])]

    assert len(set(named)) > 20, "the scan found too few names to prove anything"
    assert [name for name in named if name not in exported_series() | set(labels)] == []
    assert wrong_labels([ALERTS], labels) == []  # `series{label}` in the descriptions
    assert wrong_series(expressions(), labels, target_labels()) == []


def test_a_series_or_label_the_code_lacks_is_found(tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text(
        "groups:\n- name: g\n  rules:\n"
        '  - {alert: Ok, expr: \'up{job="x"} == 0 or rate(driftloop_x_total{model="m"}[5m])\'}\n'
        "  - {alert: Made, expr: 'increase(driftloop_made_up_total[5m]) > 0'}\n"
        "  - {alert: Label, expr: 'driftloop_x_total{reason=\"r\"} > 0'}\n"
        "  - {alert: By, expr: 'sum by (service, reason) (rate(driftloop_x_total[5m]))'}\n"
        "  - {alert: Matched, expr: 'driftloop_x_total / on (topic) driftloop_y_bucket'}\n"
        "  - {alert: Le, expr: 'histogram_quantile(0.9, sum by (le) (rate(driftloop_y_bucket[5m])))'}\n"
    )
    labels: dict[str, tuple[str, ...]] = {"driftloop_x_total": ("model",), "driftloop_y_bucket": ("model",)}

    assert wrong_series(expressions(tmp_path / "alerts.yml"), labels, {"job", "instance", "service"}) == [
        "Made: driftloop_made_up_total (no such series)",
        "Label: driftloop_x_total{reason}",
        "By: by reason",
        "Matched: by topic",
    ]
