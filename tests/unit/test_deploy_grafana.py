"""deploy/grafana/: the dashboard's panels and template variables parse and read only series and labels the
services export, on the data source that is provisioned, and Grafana loads the dashboard from where
docker-compose.yml mounts it; a renamed series or label fails here rather than leaving a panel empty.

Read from the files themselves (no Grafana here): the expressions are parsed by promql-parser once Grafana's
variables are put in, and checked by test_deploy_prometheus.py's `wrong_series`, as the alerting rules are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import yaml

from libs.settings import PROJECT_ROOT
from tests.unit.test_deploy_prometheus import target_labels, wrong_series
from tests.unit.test_doc_references import series_labels

GRAFANA = PROJECT_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "driftloop.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "driftloop.yml"
COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]
# The last schema version of Grafana's classic dashboard model (its repository's
# apps/dashboard/pkg/migration/schemaversion), so that Grafana has no migration of its own to make.
SCHEMA_VERSION = 42
# Grafana's own interval variables: a duration in a range selector, given one so that the expression parses.
INTERVALS = {"__rate_interval", "__interval", "__range"}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
LABEL_VALUES = re.compile(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*")


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows and those a collapsed row holds included."""
    found = []
    for panel in dashboard["panels"]:
        found += [panel, *panel.get("panels", [])]
    return found


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    """A query variable's query, whichever form Grafana saved it in (text, or the query editor's object)."""
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def promql(text: str) -> str:
    """The expression with Grafana's variables put in (an interval for its own, a value for the dashboard's),
    which PromQL would not parse in a range."""

    def value(match: re.Match[str]) -> str:
        return "5m" if (match.group(1) or match.group(2)) in INTERVALS else "x"

    return VARIABLE.sub(value, text)


def undefined_variables(named_texts: list[tuple[str, str]], defined: set[str]) -> list[str]:
    """`where: $name` for each variable a query uses that neither the dashboard nor Grafana defines (Grafana
    would send it as it is, and the panel match nothing)."""
    return [
        f"{where}: ${name}"
        for where, text in named_texts
        for match in VARIABLE.finditer(text)
        if (name := match.group(1) or match.group(2)) not in defined | INTERVALS
    ]


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, query as written) of every panel target and every variable."""
    return [
        *(
            (f"panel {panel['id']} {panel['title']!r} {target['refId']}", str(target["expr"]))
            for panel in panels(dashboard)
            for target in panel.get("targets", [])
        ),
        *((f"variable {name}", variable_query(variable)) for name, variable in variables(dashboard).items()),
    ]


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every query; `label_values(s, l)` reads as `count by (l) (s)`, so that the label
    is checked against the series as a grouping is (any other variable query is left not to parse)."""
    found = []
    for where, text in queries(dashboard):
        if where.startswith("variable ") and (match := LABEL_VALUES.fullmatch(text)):
            selector, label = match.groups()
            text = f"count by ({label}) ({selector})"
        found.append((where, promql(text)))
    return found


def unparsed(named_exprs: list[tuple[str, str]]) -> list[str]:
    wrong = []
    for where, text in named_exprs:
        try:
            promql_parser.parse(text)
        except ValueError as error:
            wrong.append(f"{where}: {error}")
    return wrong


def test_the_dashboard_is_one_of_current_grafana_with_a_fixed_uid() -> None:
    dashboard = load()

    assert dashboard["schemaVersion"] == SCHEMA_VERSION
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"]), "a fixed uid keeps the dashboard's address"
    assert dashboard["editable"] is False, "the file is the dashboard: an edit in Grafana would be lost"


def test_the_service_and_model_variables_come_from_label_values() -> None:
    found = variables(load())

    assert {"service", "model"} <= found.keys()
    for name in ("service", "model"):
        match = LABEL_VALUES.fullmatch(variable_query(found[name]))
        assert found[name]["type"] == "query" and match and match.group(2) == name, found[name]


def test_every_panel_has_a_unique_id_and_a_row() -> None:
    dashboard = load()
    ids = [panel["id"] for panel in panels(dashboard)]

    assert len(set(ids)) == len(ids), "a panel id is given twice"
    assert dashboard["panels"][0]["type"] == "row", "every panel sits in a row of its concern"
    assert sum(panel["type"] == "row" for panel in dashboard["panels"]) >= 6


def test_every_expression_parses() -> None:
    found = expressions(load())

    assert len(found) > 40
    assert unparsed(found) == []


def test_every_variable_a_query_uses_is_defined() -> None:
    dashboard = load()

    assert undefined_variables(queries(dashboard), set(variables(dashboard))) == []


def test_every_series_and_label_the_dashboard_reads_is_exported() -> None:
    labels = series_labels()
    found = expressions(load())
    read = {name for _, text in found for name in re.findall(r"\bdriftloop_\w+", text)}

    assert len(read) > 40, "the dashboard reads too few series to prove anything"
    assert wrong_series(found, labels, target_labels()) == []


def test_a_made_up_series_label_or_variable_is_found(tmp_path: Path) -> None:
    dashboard = {
        "panels": [
            {"id": 1, "type": "row", "title": "r", "panels": []},
            {
                "id": 2,
                "title": "p",
                "targets": [
                    {
                        "refId": "A",
                        "expr": 'sum by (model) (rate(driftloop_x_total{model=~"$model"}[$__rate_interval]))',
                    },
                    {"refId": "B", "expr": "increase(driftloop_made_up_total[$__rate_interval])"},
                    {"refId": "C", "expr": "sum by (reason) (driftloop_x_total)"},
                    {"refId": "D", "expr": 'driftloop_x_total{model=~"$nope"}'},
                ],
            },
        ],
        "templating": {
            "list": [
                {"name": "model", "query": {"query": "label_values(driftloop_x_total, model)"}},
                {"name": "topic", "query": "label_values(driftloop_x_total, topic)"},
            ]
        },
    }
    (tmp_path / "d.json").write_text(json.dumps(dashboard))
    found = expressions(load(tmp_path / "d.json"))
    labels: dict[str, tuple[str, ...]] = {"driftloop_x_total": ("model",)}

    assert undefined_variables(queries(load(tmp_path / "d.json")), {"model", "topic"}) == [
        "panel 2 'p' D: $nope"
    ]
    assert unparsed(found) == []
    assert wrong_series(found, labels, {"job", "instance", "service"}) == [
        "panel 2 'p' B: driftloop_made_up_total (no such series)",
        "panel 2 'p' C: by reason",
        "variable topic: by topic",
    ]


def test_every_panel_and_variable_queries_the_provisioned_prometheus() -> None:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    dashboard = load()
    used = [
        (where, item.get("datasource", {}).get("uid"))
        for where, items in [
            *(
                (f"panel {p['id']}", [p, *p.get("targets", [])])
                for p in panels(dashboard)
                if p["type"] != "row"
            ),
            *((f"variable {name}", [v]) for name, v in variables(dashboard).items()),
        ]
        for item in items
    ]

    assert source["type"] == "prometheus" and source["uid"]
    assert source["url"] == "http://prometheus:9090", "the compose service's name and Prometheus's port"
    assert COMPOSE["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert [(where, uid) for where, uid in used if uid != source["uid"]] == []


def mounts(service: str) -> dict[str, str]:
    """The container path of each folder of the checkout a compose service mounts, by its path here."""
    found = {}
    for volume in COMPOSE[service]["volumes"]:
        if volume.startswith("./"):
            source, target, *_ = volume.split(":")
            found[source.removeprefix("./")] = target
    return found


def test_grafana_loads_the_dashboards_folder_where_compose_mounts_it() -> None:
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    mounted = mounts("grafana")

    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounted["deploy/grafana/dashboards"]
    assert mounted["deploy/grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    assert mounted["deploy/grafana/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    home = COMPOSE["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{mounted['deploy/grafana/dashboards']}/{DASHBOARD.name}"
