"""The docs point at things that exist: every link between them reaches a file and, with an #anchor, a
heading of it; every Prometheus series they name is one the code exports."""

from __future__ import annotations

import builtins
import importlib
import re
from pathlib import Path

from pydantic_settings import BaseSettings

from libs.settings import PROJECT_ROOT

# docs/benchmarks.md is a log of past runs; its links are checked like the others, its series are history.
PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks); a repeated heading's get `-1`, `-2`, ..."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        if match := re.match(r"#{1,6}\s+(.*)", line):
            base = slug(match.group(1))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(pages: list[Path]) -> list[str]:
    """`page:line: target (why)` for each relative link that reaches no file, or no heading of it."""
    broken = []
    for page in pages:
        text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text(encoding="utf-8"))
        for match in LINK.finditer(text):
            target = match.group(1)
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            where = f"{page.relative_to(page.parents[1])}:{text.count(chr(10), 0, match.start()) + 1}"
            reached = (page.parent / path).resolve() if path else page
            if not reached.exists():
                broken.append(f"{where}: {target} (no such file)")
            elif anchor and reached.suffix == ".md" and anchor not in anchors(reached):
                broken.append(f"{where}: {target} (no such heading)")
    return broken


def test_every_link_between_the_docs_resolves() -> None:
    assert sum(len(LINK.findall(p.read_text(encoding="utf-8"))) for p in PAGES) > 50, "too few links found"
    assert broken_links(PAGES) == []


def test_a_link_to_a_missing_file_or_heading_is_found(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\n\n## The `inbox` claim\n\n## Settings\n\n## Settings\n")
    (docs / "b.md").write_text(
        "# B\n\n[ok](a.md#the-inbox-claim) [ok](a.md#settings-1) [ok](#b)\n"
        "[gone](c.md) [no heading](a.md#the-outbox) [own](#nope)\n"
        "```\n[in code](d.md)\n```\n"
    )

    assert broken_links([docs / "b.md"]) == [
        "docs/b.md:4: c.md (no such file)",
        "docs/b.md:4: a.md#the-outbox (no such heading)",
        "docs/b.md:4: #nope (no such heading)",
    ]


def exported_series() -> set[str]:
    """Every `driftloop_*` name given as a string in the code that registers series (libs, services)."""
    found: set[str] = set()
    for top in ("libs", "services"):
        for path in (PROJECT_ROOT / top).rglob("*.py"):
            found |= set(re.findall(r"[\"'](driftloop_[a-z0-9_]+)[\"']", path.read_text(encoding="utf-8")))
    return found


EXPANDED = r"(driftloop_[a-z0-9_]*_)\{([a-z0-9_,]+)\}"


def named_series(pages: list[Path]) -> list[tuple[str, str]]:
    """(page, name) of each series a page names; `driftloop_x_{a,b}` stands for `driftloop_x_a` and
    `driftloop_x_b`. Names that end in `_` are prefixes (the serving replicas' NOTIFY channel)."""
    named = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for stem, options in re.findall(EXPANDED, text):
            named += [(page.name, stem + option) for option in options.split(",")]
        text = re.sub(EXPANDED, "", text)
        named += [(page.name, name) for name in re.findall(r"\bdriftloop_[a-z0-9_]*[a-z0-9]\b", text)]
    return named


NOT_SERIES = {
    "driftloop_audit_writer",  # the audit trail's database role
    "driftloop_lb",  # bench/serving's load-balancer pid, in benchmarks.md
}


def test_every_series_the_docs_name_is_exported() -> None:
    pages = [p for p in PAGES if p.name != "benchmarks.md"]
    named = [(page, name) for page, name in named_series(pages) if not name.startswith("driftloop_sbx")]
    exported = exported_series()

    assert len({name for _, name in named}) > 20, "the scan found too few names to prove anything"
    assert [(page, name) for page, name in named if name not in exported | NOT_SERIES] == []


def series_labels() -> dict[str, tuple[str, ...]]:
    """The label names of every series libs and services register, by series name (a counter's `_total`
    too), from the registry after importing every module of theirs."""
    import pkgutil

    import prometheus_client

    for top in ("libs", "services"):
        for module in pkgutil.walk_packages(importlib.import_module(top).__path__, f"{top}."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
    return {
        name: tuple(getattr(collector, "_labelnames", ()))
        for collector, names in prometheus_client.REGISTRY._collector_to_names.items()
        for name in names
    }


def wrong_labels(pages: list[Path], labels: dict[str, tuple[str, ...]]) -> list[str]:
    """`page: series{label}` for each label a page gives a series (`driftloop_x_total{model, reason}`) that
    the series does not have."""
    wrong = []
    for page in pages:
        for name, given in re.findall(r"\b(driftloop_[a-z0-9_]*[a-z0-9])\{([a-z_, ]+)\}", page.read_text()):
            wrong += [
                f"{page.name}: {name}{{{label}}}"
                for label in (part.strip() for part in given.split(","))
                if label not in labels.get(name, ())
            ]
    return wrong


def test_every_label_the_docs_give_a_series_is_its_own() -> None:
    pages = [p for p in PAGES if p.name != "benchmarks.md"]
    labels = series_labels()

    assert len(re.findall(r"driftloop_\w+\{[a-z_, ]+\}", " ".join(p.read_text() for p in pages))) > 5
    assert wrong_labels(pages, labels) == []


def test_a_label_a_series_lacks_is_found(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text(
        "`driftloop_x_total{model, reason}` `driftloop_y{phase}` `driftloop_x_{a,b}` `driftloop_z{topic}`"
    )
    labels: dict[str, tuple[str, ...]] = {"driftloop_x_total": ("model",), "driftloop_y": ("phase",)}

    assert wrong_labels([tmp_path / "a.md"], labels) == [
        "a.md: driftloop_x_total{reason}",
        "a.md: driftloop_z{topic}",
    ]


# --- what a reader types or calls: HTTP routes, `driftloop` commands, topics, files ---------------------

# The pages a user acts on; docs/benchmarks.md records past runs, which may name what has changed since.
GUIDES = [p for p in PAGES if p.name != "benchmarks.md"]
INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def code_spans(page: Path) -> list[tuple[int, str]]:
    """(line, text) of each inline code span (it may wrap a line) and each line of a fenced block."""
    text = page.read_text(encoding="utf-8")
    spans: list[tuple[int, str]] = []
    for block in FENCE.finditer(text):
        first = text.count("\n", 0, block.start()) + 1
        spans += [(first + i, line) for i, line in enumerate(block.group(0).splitlines()[1:-1], 1)]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    spans += [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in INLINE_CODE.finditer(prose)]
    return spans


def a_page(tmp_path: Path, text: str, name: str = "a.md") -> Path:
    """A page `docs/<name>` of a checkout in ``tmp_path``, holding ``text``."""
    page = tmp_path / "docs" / name
    page.parent.mkdir(exist_ok=True)
    page.write_text(text)
    return page


def where(page: Path, line: int) -> str:
    """`docs/x.md:12`, or `README.md:12` for the checkout's own README."""
    name = page.name if page.parent == PROJECT_ROOT else f"{page.parent.name}/{page.name}"
    return f"{name}:{line}"


# -- HTTP routes

ROUTE = re.compile(r"\b(GET|POST|PUT|DELETE|PATCH) +(/[^\s`|,;)]*)")
BARE_PATH = re.compile(r"(?<![\w./:-])(/(?:v\d+|health|metrics|docs|openapi\.json)\b[^\s`|,;)]*)")


def served_routes() -> dict[tuple[str, str], set[str]]:
    """(method, path template) of every route a service's app answers, `/docs` and `/metrics` included, and
    the names of its query parameters."""
    from tests.unit.test_openapi_errors import SETTINGS, app_of

    served: dict[tuple[str, str], set[str]] = {
        ("GET", path): set() for path in ("/docs", "/redoc", "/openapi.json", "/metrics")
    }
    for service in SETTINGS:
        for path, operations in app_of(service).openapi()["paths"].items():
            for method, operation in operations.items():
                query = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
                # Two services may serve one path (GET /v1/models): either's parameters are taken.
                served.setdefault((method.upper(), path), set()).update(query)
    return served


def route_matches(named: str, template: str) -> bool:
    """Whether a path the docs name is the template's: a `{...}` or `<...>` segment of the docs' path, or any
    value (`1.0`), fills a `{...}` of the template; `.../x` and `…/x` stand for any start."""
    named = re.sub(r"[?#].*", "", named).rstrip(".:")
    if named.startswith(("...", "…")):
        return template.endswith(named.lstrip(".…"))
    want, have = named.rstrip("/").split("/"), template.rstrip("/").split("/")
    return len(want) == len(have) and all(
        w == h or h.startswith("{") or (w[:1] in "{<" and h.startswith("{"))
        for w, h in zip(want, have, strict=True)
    )


def unserved_routes(pages: list[Path], served: dict[tuple[str, str], set[str]]) -> list[str]:
    """`page:line: METHOD path` for each route a page names that no service answers, or with a query
    parameter it does not take (`?limit=&cursor=`); a path named without a method: under any method, and one
    of a single segment, `/v1`, is where routes are and needs one under it."""
    missing = []
    for page in pages:
        for line, span in code_spans(page):
            named = [(m.group(1), m.group(2)) for m in ROUTE.finditer(span)]
            rest = ROUTE.sub("", span)
            named += [("", m.group(1)) for m in BARE_PATH.finditer(rest)]
            for method, path in named:
                # A bare `/v1` or `/health` names where routes are, not one route.
                under = not method and path.count("/") == 1
                query = set(re.findall(r"[?&]([a-z_]+)=", path))
                if not any(
                    (route_matches(path, t) or (under and t.startswith(f"{path}/")))
                    and method in ("", m)
                    and query <= params
                    for (m, t), params in served.items()
                ):
                    missing.append(f"{where(page, line)}: {f'{method} {path}'.strip()}")
    return missing


def test_every_route_the_docs_name_is_served() -> None:
    served = served_routes()
    named = [span for page in GUIDES for _, span in code_spans(page) if ROUTE.search(span)]

    assert len(named) > 50, "the scan found too few routes to prove anything"
    assert unserved_routes(GUIDES, served) == []


def test_a_route_no_service_answers_is_found(tmp_path: Path) -> None:
    page = a_page(
        tmp_path,
        "`GET /v1/models/{model}/versions/7` `GET /v1/models?prefix=&limit=` `GET /v1/models?page=2`"
        " `PUT` / `DELETE /v1/tags/{key}`\n"
        "`POST /v1/models/{name}/drift` `/v1/status` `.../file` `GET /metrics` under `/v1`, not `/v3`\n"
        "```\ncurl http://127.0.0.1:8101/v1/models\ncurl -X POST /v1/modles\n```\n",
    )
    served = {
        ("GET", "/v1/models"): {"prefix", "limit"},
        ("GET", "/v1/models/{model}/versions/{version}"): set(),
        ("GET", "/v1/models/{model}/drift"): set(),
        ("GET", "/v1/datasets/{name}/file"): set(),
        ("GET", "/metrics"): set(),
    }

    assert unserved_routes([page], served) == [
        "docs/a.md:5: POST /v1/modles",
        "docs/a.md:1: GET /v1/models?page=2",
        "docs/a.md:1: DELETE /v1/tags/{key}",
        "docs/a.md:2: POST /v1/models/{name}/drift",
        "docs/a.md:2: /v1/status",
        "docs/a.md:2: /v3",
    ]


def success_statuses() -> dict[tuple[str, str], set[str]]:
    """(method, path template) of every route whose success is not a plain 200, and its other 2xx answers."""
    from tests.unit.test_openapi_errors import SETTINGS, app_of

    found: dict[tuple[str, str], set[str]] = {}
    for service in SETTINGS:
        for path, operations in app_of(service).openapi()["paths"].items():
            for method, operation in operations.items():
                if codes := {c for c in operation.get("responses", {}) if c.startswith("2") and c != "200"}:
                    found.setdefault((method.upper(), path), set()).update(codes)
    return found


def unstated_statuses(pages: list[Path], statuses: dict[tuple[str, str], set[str]]) -> list[str]:
    """`page:line: METHOD path (status)` for each row of a route table (the route in its first cell) whose
    route answers 201, 202 or 204 and the row does not say so: a client that checks for 200 takes the success
    for a failure."""
    unstated = []
    for page in pages:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if not line.startswith("|"):
                continue
            first = re.split(r"(?<!\\)\|", line)[1]
            for method, path in ROUTE.findall(" ".join(INLINE_CODE.findall(first))):
                for (m, template), codes in statuses.items():
                    if m == method and route_matches(path, template):
                        unstated += [
                            f"{where(page, number)}: {method} {path} ({code})"
                            for code in sorted(codes)
                            if not re.search(rf"\b{code}\b", line)
                        ]
    return unstated


def test_every_route_table_says_when_a_success_is_not_200() -> None:
    statuses = success_statuses()

    assert len(statuses) > 5, "the scan found too few routes answering 201, 202 or 204 to prove anything"
    assert unstated_statuses(GUIDES, statuses) == []


def test_a_route_row_without_its_success_status_is_found(tmp_path: Path) -> None:
    page = a_page(
        tmp_path,
        "| route | what |\n| --- | --- |\n"
        "| `POST /v1/feedback` | labels → `GroundTruthReceived` |\n"
        "| `POST /v1/models/{name}/rollback` | → `RollbackRequested` (202) |\n"
        "| `PUT` / `DELETE /v1/tags/{key}` | set or remove a tag |\n"
        "`POST /v1/feedback` in prose is not a row\n"
        "| `mlops.feedback` | one event per label sent to `POST /v1/feedback` |\n",
    )
    statuses = {
        ("POST", "/v1/feedback"): {"202"},
        ("POST", "/v1/models/{name}/rollback"): {"202"},
        ("DELETE", "/v1/tags/{key}"): {"204"},
    }

    assert unstated_statuses([page], statuses) == [
        "docs/a.md:3: POST /v1/feedback (202)",
        "docs/a.md:5: DELETE /v1/tags/{key} (204)",
    ]


# -- `driftloop` commands

# A command starts a span or a line of a block, or follows `(`, `&&`, `;`, `|` or a prompt's `$`: "another
# driftloop command" in a message is prose.
COMMAND = re.compile(
    r"(?:^\s*|(?<=\()|(?:&&|;|\||\$)\s+)"
    r"(?:deploy/local/driftloop|driftloop|python -m deploy)[ \t\n]+([a-z][^`]*)"
)


def wrong_commands(pages: list[Path]) -> list[str]:
    """`page:line: command (why)` for each `driftloop ...` a page shows that the CLI has no command for, or
    that gives it an option its command does not take (what `test` passes on to pytest aside)."""
    from deploy.cli import COMMANDS, build_parser

    parser = build_parser()
    paths = {command.path for command in COMMANDS}
    wrong = []
    for page in pages:
        for line, span in code_spans(page):
            for match in COMMAND.finditer(span):
                # Up to a pipe, `&&`, `;`, a comment or a closing parenthesis: the next command, or prose.
                command = re.split(r"\s(?:\||&&|;|#)|\)", match.group(1))[0]
                words = [word.strip("[].,") for word in command.split()]
                path: tuple[str, ...] = ()
                while words and any(p[: len(path) + 1] == (*path, words[0]) for p in paths):
                    path, words = (*path, words[0]), words[1:]
                shown = f"driftloop {match.group(1).split(chr(10))[0].strip()}"
                if path not in paths:
                    wrong.append(f"{where(page, line)}: {shown} (no such command)")
                    continue
                args, _ = parser.parse_known_args(list(path))
                if args.command.passthrough:
                    continue
                options = set(args.usage_of._option_string_actions)
                for word in words:
                    if word.startswith("-") and word.split("=")[0].rstrip(".") not in options:
                        wrong.append(
                            f"{where(page, line)}: {shown} ({word.split('=')[0]} is not an option of it)"
                        )
    return wrong


def test_every_driftloop_command_the_docs_show_exists_with_its_options() -> None:
    shown = [m for page in GUIDES for _, span in code_spans(page) for m in COMMAND.finditer(span)]

    assert len(shown) > 30, "the scan found too few commands to prove anything"
    assert wrong_commands(GUIDES) == []


def test_a_command_or_option_the_cli_lacks_is_found(tmp_path: Path) -> None:
    page = a_page(
        tmp_path,
        "`driftloop infra up | status | down` `deploy/local/driftloop audit tail -n 5 --follow`\n"
        "`driftloop infra restart` `driftloop up --keep-running` `driftloop test -x --lf`\n"
        "`driftloop <service>: error:` `initdb -U driftloop --auth=trust` (`driftloop test`)\n"
        "```\ndriftloop audit verify [--from N] [--checkpoints FILE]... [--since T]\n```\n"
        "`driftloop infra topics --bootstrap <servers>\n--replication-factor 3 --partitions 6`\n",
    )

    assert wrong_commands([page]) == [
        "docs/a.md:5: driftloop audit verify [--from N] [--checkpoints FILE]... [--since T]"
        " (--since is not an option of it)",
        "docs/a.md:2: driftloop infra restart (no such command)",
        "docs/a.md:2: driftloop up --keep-running (--keep-running is not an option of it)",
        "docs/a.md:7: driftloop infra topics --bootstrap <servers> (--partitions is not an option of it)",
    ]


# -- topics and files


def unknown_topics(pages: list[Path], topics: set[str]) -> list[str]:
    """`page:line: name` for each `mlops.*` topic a page names that contracts/topics.py does not define."""
    unknown = []
    for page in pages:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            unknown += [
                f"{where(page, number)}: {name}"
                for name in re.findall(r"\bmlops\.[a-z0-9_-]*[a-z0-9]", line)
                if name not in topics
            ]
    return unknown


def test_every_topic_the_docs_name_is_in_the_topic_map() -> None:
    from contracts.topics import TOPICS

    assert unknown_topics(GUIDES, set(TOPICS)) == []
    assert unknown_topics(GUIDES, set(TOPICS) - {"mlops.rollouts"}) != [], "the scan found no topic"


# A path of the checkout starts with one of its top-level entries; `.driftloop/...`, `logs/x.log` and the
# like are the running platform's, not the checkout's.
REPO_PATH = re.compile(r"[\w.-]+(?:/[\w.-]+)*/?")


def missing_files(pages: list[Path], root: Path = PROJECT_ROOT) -> list[str]:
    """`page:line: path` for each file or folder of the checkout a page names in code that is not there."""
    tops = {p.name for p in root.iterdir()} - {".driftloop", ".venv", ".git"}
    missing = []
    for page in pages:
        for line, span in code_spans(page):
            for word in span.split():
                path = re.sub(r"(::|:\d).*$", "", word.strip("()[],;:'\""))
                if (
                    REPO_PATH.fullmatch(path)
                    and path.split("/")[0] in tops
                    and ("/" in path or "." in path)
                    and not (root / path).exists()
                ):
                    missing.append(f"{where(page, line)}: {path}")
    return missing


def test_every_file_of_the_checkout_the_docs_name_exists() -> None:
    named = [word for page in GUIDES for _, span in code_spans(page) for word in span.split()]

    assert sum(word.startswith(("services/", "deploy/", "tests/")) for word in named) > 50, (
        "too few paths found"
    )
    assert missing_files(GUIDES) == []


def test_a_file_the_checkout_lacks_is_found(tmp_path: Path) -> None:
    (tmp_path / "deploy" / "local").mkdir(parents=True)
    (tmp_path / "deploy" / "local" / "broker.py").write_text("")
    page = a_page(
        tmp_path,
        "`deploy/local/broker.py` `deploy/local/kafka.py` `deploy/local/` (`deploy/cli.py:12`)\n"
        "`.driftloop/logs/x.log` `logs/kafka.log` `services/<name>/settings.py`\n"
        "```\npython deploy/local/broker.py && cat deploy/tokens.json\n```\n",
    )

    assert missing_files([page], root=tmp_path) == [
        "docs/a.md:4: deploy/tokens.json",
        "docs/a.md:1: deploy/local/kafka.py",
        "docs/a.md:1: deploy/cli.py",
    ]


# -- names in the code

# Names of other projects the docs quote (Kafka's, Postgres's, scikit-learn's, ...), and values, not names.
NOT_OURS = {
    "ArrowInvalid", "ColumnTransformer", "ConvergenceWarning", "DataError", "DescribeCluster",
    "GroupCoordinatorNotAvailableError", "InterfaceError", "JAVA_HOME", "NaN", "PG_VERSION",
    "PR_SET_PDEATHSIG", "RollingFile", "SASL_PLAINTEXT", "SASL_SSL", "SimpleImputer", "StandardScaler",
}  # fmt: skip
CONSTANT = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")
CLASS = re.compile(
    r"[A-Z][a-z0-9]+(?:(?:[A-Z][a-z0-9]*)+(?:\.[a-z_][a-z0-9_]*)?|(?:[A-Z][a-z0-9]*)*\.[a-z_][a-z0-9_]*)"
)
DOTTED = re.compile(r"(?:contracts|libs|services|deploy|bench|tests)(?:\.[A-Za-z_][A-Za-z0-9_]*)+(?:\(\))?")


def defined_names(root: Path = PROJECT_ROOT) -> tuple[set[str], str]:
    """The names our code defines (classes, functions, assignments) and all of its text."""
    text = "\n".join(
        path.read_text(encoding="utf-8")
        for top in ("contracts", "libs", "services", "deploy", "bench", "tests", "docs")
        for path in (root / top).rglob("*.py")
    )
    names = set(re.findall(r"(?m)^\s*(?:class|def|async def)\s+(\w+)", text))
    return names | set(re.findall(r"(?m)^\s*(\w+)\s*(?::[^=\n]*)?=", text)), text


def importable(dotted: str) -> bool:
    """Whether `a.b.c` is a module of ours, or an attribute of one."""
    parts = dotted.removesuffix("()").split(".")
    for i in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        return all((found := getattr(found, part, MISSING)) is not MISSING for part in parts[i:])
    return False


MISSING = object()


def unknown_names(pages: list[Path], defined: set[str], text: str) -> list[str]:
    """`page:line: name` for each constant (`MAX_POLL_RECORDS`), class (`ConsumerRunner`, with an attribute:
    `Subscription.max_uncertain_retries`) or dotted path (`libs.bus.core.is_transient`) a page shows alone
    in code that the code does not have. A settings field's short name (`ROLLOUT_STEPS`) counts; the
    variables are test_settings_doc.py's."""
    from deploy.settings_doc import SERVICE_SETTINGS, KafkaSettings, LocalInfraSettings, settings_of

    classes: list[type[BaseSettings]] = [*SERVICE_SETTINGS, KafkaSettings, LocalInfraSettings]
    fields = {setting.name.split(".")[-1].upper() for cls in classes for setting in settings_of(cls)}
    unknown = []
    for page in pages:
        for line, span in code_spans(page):
            name = span.strip()
            if name in NOT_OURS or name.startswith("DRIFTLOOP_"):
                continue
            if DOTTED.fullmatch(name):
                known = importable(name)
            elif CONSTANT.fullmatch(name):
                known = name in defined | fields
            elif CLASS.fullmatch(name):
                cls, _, attribute = name.partition(".")
                known = (cls in defined or hasattr(builtins, cls)) and (
                    not attribute or re.search(rf"\b{attribute}\b", text) is not None
                )
            else:
                continue
            if not known:
                unknown.append(f"{where(page, line)}: {name}")
    return unknown


def test_every_name_of_the_code_the_docs_show_exists() -> None:
    defined, text = defined_names()

    assert len([s for p in GUIDES for _, s in code_spans(p) if CONSTANT.fullmatch(s.strip())]) > 50
    assert unknown_names(GUIDES, defined, text) == []


def test_a_name_the_code_lacks_is_found(tmp_path: Path) -> None:
    page = a_page(
        tmp_path,
        "`MAX_POLL_RECORDS` `MAX_POLL_ROWS` `ROLLOUT_STEPS` `ConsumerRunner` `ConsumerRunr` `OSError`\n"
        "`Subscription.max_uncertain_retries` `Subscription.max_retries_uncertain` `SASL_SSL`\n"
        "`libs.bus.core.is_transient` `libs.bus.core.is_transient_error` `libs.buss`\n"
        "`services.serving.handlers.handle()`\n",
    )
    defined = {"MAX_POLL_RECORDS", "ConsumerRunner", "Subscription"}

    assert unknown_names([page], defined, "max_uncertain_retries: int = 20") == [
        "docs/a.md:1: MAX_POLL_ROWS",
        "docs/a.md:1: ConsumerRunr",
        "docs/a.md:2: Subscription.max_retries_uncertain",
        "docs/a.md:3: libs.bus.core.is_transient_error",
        "docs/a.md:3: libs.buss",
    ]


# -- examples a reader copies


def test_the_model_spec_docs_training_shows_is_accepted_and_fits() -> None:
    from libs.modelspec import check_fits, parse_spec

    text = (PROJECT_ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    [example] = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    spec = parse_spec(example, content_type="application/yaml")

    check_fits(spec)
    assert spec.validation.slices is not None and spec.retrain.training_set.min_rows == 50


# -- the settings tables of the service pages

UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def documented_default(cell: str) -> object:
    """What a page's default cell says, as a value: `8101`, `5,000,000`, `64 MiB`, `true`, `[]`, `audit`,
    `—` (none); a description in words (`package version + git commit`) is returned as it is written."""
    text = cell.strip().strip("`")
    if number := re.fullmatch(r"(\d[\d,]*(?:\.\d+)?)(?: (KiB|MiB|GiB))?", text):
        return float(number.group(1).replace(",", "")) * UNITS.get(number.group(2) or "", 1)
    return {"true": True, "false": False, "—": None, "[]": []}.get(text, text)


def wrong_settings_rows(page: Path, settings: type[BaseSettings]) -> list[str]:
    """`page:line: setting (why)` for each row of the page's `| setting | default |` tables whose setting
    the class lacks, or whose default is not the class's (a path default: its end, `.driftloop/x`; a default
    described in words is not compared)."""
    wrong = []
    in_table = False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        in_table = bool(re.match(r"\| setting \| default \|", line)) or (in_table and line.startswith("|"))
        if not (in_table and (row := re.match(r"\| `(\w+)` \| ([^|]*) \|", line))):
            continue
        name, said = row.group(1).lower(), documented_default(row.group(2))
        field = settings.model_fields.get(name)
        if field is None:
            wrong.append(f"{where(page, number)}: {row.group(1)} (no such setting)")
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(said, str) and said.startswith(".driftloop/"):
            agrees = str(default).endswith(f"/{said}")  # under the checkout, wherever that is
        elif isinstance(said, str) and " " in said:
            agrees = True  # described, not given
        else:
            agrees = said == default
        if not agrees:
            said_text = row.group(2).strip()
            wrong.append(
                f"{where(page, number)}: {row.group(1)} (the page says {said_text}, the code {default!r})"
            )
    return wrong


def test_the_settings_tables_of_the_service_pages_name_real_settings_and_defaults() -> None:
    from deploy.settings_doc import SERVICE_SETTINGS

    pages = [(PROJECT_ROOT / "docs" / f"{settings.service}.md", settings) for settings in SERVICE_SETTINGS]

    assert sum(page.read_text(encoding="utf-8").count("\n| `") for page, _ in pages) > 30
    assert [wrong for page, settings in pages for wrong in wrong_settings_rows(page, settings)] == []


def test_a_setting_or_default_the_code_does_not_have_is_found(tmp_path: Path) -> None:
    from services.registry.settings import RegistrySettings

    page = a_page(
        tmp_path,
        "| setting | default | what |\n| --- | --- | --- |\n"
        "| `http_port` | 8101 | |\n| `max_upload_bytes` | 64 MiB | |\n| `max_dataset_rows` | 5,000,000 | |\n"
        "| `consumer_group` | `registry` | |\n| `read_pool_max` | 8 | |\n| `max_upload_mb` | 64 | |\n"
        "| `max_request_bytes` | 64 MiB | |\n| `artifacts_url` | `.driftloop/artifacts` | |\n"
        "\n| `read_pool_max` | 9 | outside the table |\n",
        name="registry.md",
    )

    assert wrong_settings_rows(page, RegistrySettings) == [
        "docs/registry.md:7: read_pool_max (the page says 8, the code 4)",
        "docs/registry.md:8: max_upload_mb (no such setting)",
        "docs/registry.md:9: max_request_bytes (the page says 64 MiB, the code 68157440)",
    ]
