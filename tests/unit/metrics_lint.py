"""What `promtool check metrics` says of an exposition, and the project's own rules on top, for the unit tests
that scrape the services' /metrics (promtool itself is a Go binary, not installed here).

promtool's rules (client_golang's promlint): HELP present; counters end in `_total` and nothing else does;
`_bucket`, `_count`, `_sum` and the labels `le` and `quantile` only where histograms and summaries put them;
no type in the name; no `:`; snake_case names and label names; no abbreviated unit (`_ms`, `_kb`, `_s`, ...);
base units (`seconds`, not `milliseconds`). Ours: one `driftloop_` namespace, then the package that defines
the series (`bus` or a service); a HELP that is a sentence; a duration histogram or gauge names `seconds`; a
`_seconds` histogram whose buckets look like milliseconds; no family declared twice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

NAMESPACE = "driftloop"
SUBSYSTEMS = ("bus", "http", "registry", "training", "validation", "serving", "monitoring", "audit")
CLIENT_DEFAULTS = ("python_", "process_")
"""prometheus_client's own collectors (gc, platform, process): named by the client, as in every Python
exporter."""

SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
TYPES_IN_NAME = ("counter", "gauge", "histogram", "summary", "untyped")
ABBREVIATIONS = (
    "s",
    "ms",
    "us",
    "ns",
    "sec",
    "secs",
    "b",
    "kb",
    "mb",
    "gb",
    "tb",
    "pb",
    "m",
    "h",
    "d",
    "min",
)
UNITS = {
    "seconds": "seconds",
    "bytes": "bytes",
    "meters": "meters",
    "minutes": "seconds",
    "hours": "seconds",
    "days": "seconds",
    "weeks": "seconds",
    "bits": "bytes",
    "percent": "ratio",
    "percentage": "ratio",
}
PREFIXES = (
    "",
    "pico",
    "nano",
    "micro",
    "milli",
    "centi",
    "deci",
    "kilo",
    "kibi",
    "mega",
    "mebi",
    "giga",
    "gibi",
)
DURATION_WORDS = ("latency", "duration", "elapsed", "time")


@dataclass
class Family:
    """One family as the exposition declares it (its `# TYPE` name), with the label names and bucket bounds
    its samples, or its collector, carry."""

    name: str
    type: str
    help: str | None = None
    labels: set[str] = field(default_factory=set)
    buckets: list[float] = field(default_factory=list)
    declared: int = 0


def families(text: str, declared: Mapping[str, tuple[Sequence[str], Sequence[float]]] = {}) -> list[Family]:
    """The families of an exposition in the text format. A labelled family with no series yet shows no label
    or bucket in the text: ``declared`` (exposed name -> label names, bucket bounds) adds its collector's."""
    found: dict[str, Family] = {}
    for line in text.splitlines():
        if m := re.match(r"^# TYPE (\S+) (\S+)$", line):
            family = found.setdefault(m[1], Family(m[1], m[2]))
            family.type = m[2]
            family.declared += 1
        elif m := re.match(r"^# HELP (\S+) ?(.*)$", line):
            found.setdefault(m[1], Family(m[1], "untyped")).help = m[2]
    for parsed in text_string_to_metric_families(text):
        for sample in parsed.samples:
            owner = _family_of(sample.name, found)
            if owner is None:
                continue
            owner.labels |= set(sample.labels) - ({"le"} if owner.type == "histogram" else set())
            if owner.type == "histogram" and "le" in sample.labels:
                owner.buckets.append(float(sample.labels["le"]))
    for name, (labels, buckets) in declared.items():
        if name in found:
            found[name].labels |= set(labels)
            found[name].buckets += list(buckets)
    for family in found.values():
        family.buckets = sorted(set(family.buckets))
    return list(found.values())


def _family_of(sample: str, found: Mapping[str, Family]) -> Family | None:
    if sample in found:
        return found[sample]
    for suffix in ("_bucket", "_count", "_sum", "_created", "_gcount", "_gsum"):
        if sample.endswith(suffix) and sample.removesuffix(suffix) in found:
            return found[sample.removesuffix(suffix)]
    return None


def lint(text: str, declared: Mapping[str, tuple[Sequence[str], Sequence[float]]] = {}) -> list[str]:
    """`name: problem` for each way the exposition breaks the conventions; [] when it keeps to them."""
    problems: list[str] = []
    for family in families(text, declared):
        problems += [f"{family.name}: {problem}" for problem in _problems(family)]
    return sorted(problems)


def _problems(f: Family) -> Iterator[str]:
    name, parts = f.name, f.name.split("_")
    ours = not name.startswith(CLIENT_DEFAULTS)
    # promtool
    if f.help is None:
        yield "no help text"
    if ":" in name:
        yield "metric names should not contain ':'"
    if re.search(r"[a-z][A-Z]", name):
        yield "metric names should be written in 'snake_case' not 'camelCase'"
    if f.type == "counter" and not name.endswith("_total"):
        yield 'counter metrics should have "_total" suffix'
    if f.type not in ("counter", "untyped") and name.endswith("_total"):
        yield 'non-counter metrics should not have "_total" suffix'
    if f.type != "histogram" and name.endswith("_bucket"):
        yield 'non-histogram metrics should not have "_bucket" suffix'
    for suffix in ("_count", "_sum"):
        if f.type not in ("histogram", "summary") and name.endswith(suffix):
            yield f'non-histogram and non-summary metrics should not have "{suffix}" suffix'
    if f.type != "histogram" and "le" in f.labels:
        yield 'non-histogram metrics should not have "le" label'
    if f.type != "summary" and "quantile" in f.labels:
        yield 'non-summary metrics should not have "quantile" label'
    for kind in TYPES_IN_NAME:
        if kind in parts[1:]:
            yield f"metric name should not include type '{kind}'"
    if any(part in ABBREVIATIONS for part in parts[1:]):
        yield "metric names should not contain abbreviated units"
    for part in parts:
        for unit, base in UNITS.items():
            if any(part == prefix + unit != base for prefix in PREFIXES):
                yield f'use base unit "{base}" instead of "{part}"'
    for label in sorted(f.labels):
        if not SNAKE.match(label) or label.startswith("__"):
            yield f"label name {label!r} should be written in 'snake_case'"
    if not ours:
        return
    # ours
    if not SNAKE.match(name):
        yield "metric names should be snake_case: lower-case words joined by single underscores"
    if parts[0] != NAMESPACE:
        yield f"metric names start with the namespace {NAMESPACE}_ (or are the client's: {CLIENT_DEFAULTS})"
    elif len(parts) < 3 or parts[1] not in SUBSYSTEMS:
        yield f"{NAMESPACE}_ is followed by the package that exposes the series: one of {SUBSYSTEMS}"
    if f.declared > 1:
        yield f"declared {f.declared} times"
    help_text = (f.help or "").strip()
    if f.help is not None and (len(help_text.split()) < 2 or not help_text.endswith(".")):
        yield "the help text says what is counted or measured, in a sentence (two words or more, a full stop)"
    if (
        f.type in ("histogram", "gauge", "summary")
        and set(parts) & set(DURATION_WORDS)
        and "seconds" not in parts
    ):
        yield "a duration is measured in seconds: name it ..._seconds"
    finite = [b for b in f.buckets if math.isfinite(b)]
    if f.type == "histogram" and "seconds" in parts and finite and min(finite) >= 1 and max(finite) >= 1000:
        yield f"buckets {finite} look like milliseconds in a _seconds histogram"
    if f.type == "histogram" and finite and min(finite) <= 0 and parts[-1] in ("seconds", "bytes"):
        yield f"a bucket at or below 0 in a histogram of {parts[-1]}, which are never negative"


def declared_by(
    registry: CollectorRegistry = REGISTRY,
) -> dict[str, tuple[tuple[str, ...], tuple[float, ...]]]:
    """Exposed family name -> (label names, bucket bounds) of every prometheus_client metric in ``registry``,
    whether or not it has a series yet."""
    out: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {}
    for collector in list(registry._collector_to_names):
        if isinstance(collector, MetricWrapperBase):
            name = collector._name + ("_total" if collector._type == "counter" else "")
            out[name] = (tuple(collector._labelnames), tuple(getattr(collector, "_upper_bounds", ())))
    return out


def series(registry: CollectorRegistry = REGISTRY) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every driftloop sample (name and labels) the registry exposes now."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        if family.name.startswith(f"{NAMESPACE}_")
        for sample in family.samples
    }
