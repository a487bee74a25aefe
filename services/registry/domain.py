"""The registry's rules, free of I/O: the stage machine, aliases, manual commands, cursors, model cards."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import orjson

from contracts.common import NAME_PATTERN, VERSION_MAX, FeatureType, ModelSignature, Stage
from contracts.datasets import (
    DATASET_MODELS_MAX,
    HOLDOUT_SUFFIX,
    TRAINING_SET_SUFFIX,
    is_training_output,
)
from contracts.validation import ValidationFailed
from libs import cursors
from libs.cursors import cursor_not_valid, cursor_of_another_list, cursor_position
from libs.errors import Conflict, InvalidInput
from services.registry.schemas import VersionPublic

# --- stages -----------------------------------------------------------------------------------------

TRANSITIONS: dict[Stage, tuple[Stage, ...]] = {
    # A candidate goes to canary (a rollout starts), or straight to production (a manual promote of a
    # validated candidate), or is rejected (validation failed) or archived (nobody wants it).
    Stage.CANDIDATE: (Stage.CANARY, Stage.PRODUCTION, Stage.REJECTED, Stage.ARCHIVED),
    # A live canary is promoted or rolled back; it is never archived while it takes traffic.
    Stage.CANARY: (Stage.PRODUCTION, Stage.REJECTED),
    # Production is archived when another version replaces it, rejected when it is rolled back.
    Stage.PRODUCTION: (Stage.ARCHIVED, Stage.REJECTED),
    # An archived version can come back: rolled out again, or restored by a rollback of its successor.
    Stage.ARCHIVED: (Stage.CANARY, Stage.PRODUCTION),
    # A rejected version never serves again; it can only be put away. (The one exception, a candidate
    # rejected by a verdict that overtook serving's promotion of it, is not a command: verdict_overtaken.)
    Stage.REJECTED: (Stage.ARCHIVED,),
}


class IllegalTransition(Conflict):
    """A stage change the stage machine does not allow (409 over HTTP, dead-lettered from an event)."""


def allowed_targets(stage: Stage) -> list[str]:
    """Stages a version in ``stage`` may move to."""
    return [s.value for s in TRANSITIONS[stage]]


def check_transition(model: str, version: int, current: Stage, target: Stage) -> None:
    """Raise :class:`IllegalTransition` unless ``current -> target`` is allowed (and is a change)."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(
            f"{model} version {version} is {current.value}; it cannot move to {target.value} "
            f"(allowed: {', '.join(allowed_targets(current)) or 'none'})",
            stage=current.value,
            allowed=allowed_targets(current),
        )


CHAMPION = "champion"
CHALLENGER = "challenger"
ALIASES = (CHAMPION, CHALLENGER)
"""Every alias a version can hold: a model's version paths take these besides numbers."""


@dataclass(frozen=True)
class AliasEffect:
    """What a stage change does to the version's aliases: ``take`` moves an alias to it from any other
    version of the model, ``drop`` removes aliases it holds."""

    take: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()


def alias_effect(to_stage: Stage) -> AliasEffect:
    """Champion follows production; challenger is a validated version that does not serve all traffic yet."""
    if to_stage is Stage.PRODUCTION:
        return AliasEffect(take=(CHAMPION,), drop=(CHALLENGER,))
    if to_stage in (Stage.ARCHIVED, Stage.REJECTED):
        return AliasEffect(drop=(CHAMPION, CHALLENGER))
    return AliasEffect()


def may_be_challenger(stage: Stage) -> bool:
    """A passed validation makes a version the challenger only while it is on its way to production."""
    return stage in (Stage.CANDIDATE, Stage.CANARY)


def serves_after_rollback(stage: Stage) -> bool:
    """A rollback's stable version, which serves all traffic once it is done, becomes production when its
    stage may move there: an earlier version (archived), or a production rollback's ``to_version`` that never
    served (a candidate: the rollback command accepts any version that may move to production)."""
    return Stage.PRODUCTION in TRANSITIONS[stage]


def verdict_overtaken(current: Stage, last_from: Stage | None, last_cause: str) -> bool:
    """Serving reports it put on all traffic (promoted, or restored by a rollback) a version the registry
    holds rejected by a failed validation it read while the version was a candidate, that is before the
    version ever served: serving acted on an operator's command accepted while the version was a candidate,
    and the verdict overtook it on its way to the registry. The registry follows serving, as it does in the
    other order (a verdict for a version on traffic leaves its stage, :func:`rejected_by_failed_validation`):
    whichever comes first, the command accepted before the verdict wins, and the registry's production
    version is the one that serves. A version rejected any other way (a rollback took it off traffic) never
    serves again."""
    return (
        current is Stage.REJECTED
        and last_from is Stage.CANDIDATE
        and last_cause == ValidationFailed.event_type()
    )


def rejected_by_failed_validation(stage: Stage) -> bool:
    """A failed validation rejects a version only while it is a candidate. Once serving has put it on
    traffic (canary, production) the registry's stage must keep saying so: taking it off is a rollback,
    serving's act. An archived or rejected version has nothing to lose."""
    return stage is Stage.CANDIDATE


# --- manual commands ----------------------------------------------------------------------------------


class Command(StrEnum):
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    ARCHIVE = "archive"


COMMAND_STAGES: dict[Command, tuple[Stage, ...]] = {
    # Whatever may move to production may be promoted.
    Command.PROMOTE: tuple(s for s, targets in TRANSITIONS.items() if Stage.PRODUCTION in targets),
    # Only a version taking traffic can be taken off it.
    Command.ROLLBACK: (Stage.CANARY, Stage.PRODUCTION),
    # Only a version that does not serve is archived on request (production is archived by its successor).
    Command.ARCHIVE: (Stage.CANDIDATE, Stage.REJECTED),
}


def commands_for(stage: Stage) -> list[str]:
    """Commands that make sense for a version in ``stage``."""
    return [c.value for c, stages in COMMAND_STAGES.items() if stage in stages]


def check_command(command: Command, model: str, version: int, stage: Stage) -> None:
    """Raise :class:`IllegalTransition` (409) when the command cannot apply to a version in ``stage``."""
    if stage not in COMMAND_STAGES[command]:
        wanted = ", ".join(s.value for s in COMMAND_STAGES[command])
        raise IllegalTransition(
            f"cannot {command.value} {model} version {version}: it is {stage.value}, and {command.value} "
            f"applies to {wanted} versions",
            stage=stage.value,
            allowed=allowed_targets(stage),
            commands=commands_for(stage),
        )


# --- names -------------------------------------------------------------------------------------------

_NAME = re.compile(NAME_PATTERN)


def is_name(value: str) -> bool:
    """Whether ``value`` is a model or dataset name (the contracts' rule, the whole string: ``re.match``
    with ``$`` would let a trailing newline through)."""
    return _NAME.fullmatch(value) is not None


def check_name(value: str, *, what: str, field: str) -> str:
    """``value`` when it is a model or dataset name, else 422 saying the rule."""
    if not is_name(value):
        raise InvalidInput(f"{what} {value!r} must match {NAME_PATTERN}", field=field)
    return value


def check_dataset_models(models: list[str]) -> list[str]:
    """``models`` when each is a model name and there are at most
    :data:`~contracts.datasets.DATASET_MODELS_MAX` (the contract's bound), else 422."""
    if len(models) > DATASET_MODELS_MAX:
        raise InvalidInput(
            f"the upload names {len(models):,} models; a dataset is meant for at most {DATASET_MODELS_MAX}",
            field="models",
        )
    for model in models:
        check_name(model, what="model name", field="models")
    return models


def check_upload_name(name: str) -> str:
    """``name`` when a file may be uploaded under it, else 422: not a name, or one reserved for training's
    output (training numbers those versions itself; an upload would take a number training gives too)."""
    check_name(name, what="dataset name", field="name")
    if is_training_output(name):
        raise InvalidInput(
            f"dataset name {name!r} is reserved for training's output: each run registers its training set "
            f"and holdout as <model>{TRAINING_SET_SUFFIX} and <model>{HOLDOUT_SUFFIX}; upload under another "
            "name",
            field="name",
        )
    return name


# --- cursors ------------------------------------------------------------------------------------------


CursorList = Literal["models", "versions", "datasets"]
"""The list a cursor pages through. The versions of one model and the search of every model's versions are
one list (both are sorted by model and version); a model's versions are told apart by its name."""
CURSOR_LISTS: tuple[CursorList, ...] = ("models", "versions", "datasets")


def encode_cursor(of: CursorList, position: Sequence[Any]) -> str:
    """An opaque cursor for the row after ``position`` (the sort key of the page's last row) in the list
    ``of``: the versions and the datasets lists are sorted by the same (name, number) key, so without the
    list's name one's cursor was read as the other's."""
    return cursors.encode_cursor(of, position)


def _position(cursor: str, of: CursorList, size: int) -> list[Any]:
    return cursor_position(cursor, of, size, lists=CURSOR_LISTS)


def decode_name_cursor(cursor: str) -> str:
    """The name inside a cursor of the models list; 422 when :func:`encode_cursor` did not make it for that
    list."""
    [name] = _position(cursor, "models", 1)
    if type(name) is not str:
        raise cursor_of_another_list()
    if not is_name(name):
        raise cursor_not_valid()
    return name


def decode_version_cursor(cursor: str, of: Literal["versions", "datasets"]) -> tuple[str, int]:
    """The (name, version) inside a cursor of the list ``of`` (versions or datasets, both sorted by name and
    version); 422 when :func:`encode_cursor` did not make it for that list."""
    name, version = _position(cursor, of, 2)
    if type(name) is not str or type(version) is not int:
        raise cursor_of_another_list()
    # Names and versions of the registry only: anything else could not be compared with a row in Postgres
    # (a NUL in text, a number beyond its integer).
    if not is_name(name) or not 1 <= version <= VERSION_MAX:
        raise cursor_not_valid()
    return name, version


def check_cursor_in_list(name: str, *, model: str | None = None, prefix: str | None = None) -> None:
    """422 when the name inside a cursor could not be a row of the list it was passed to: another model's
    versions, or a name outside the list's prefix. Such a cursor came from another list (or was made by
    hand): the list answered an empty last page for it, or its first page again."""
    if (model is not None and name != model) or (prefix is not None and not name.startswith(prefix)):
        raise cursor_of_another_list()


def parse_tag_filter(tag: str | None) -> tuple[str, str | None] | None:
    """``key`` or ``key=value`` -> (key, value or None)."""
    if tag is None:
        return None
    key, sep, value = tag.partition("=")
    if not key:
        raise InvalidInput("tag filter must be `key` or `key=value`", field="tag")
    return key, (value if sep else None)


# --- datasets -----------------------------------------------------------------------------------------

NUMERIC_DTYPES = ("int", "uint", "float", "bool", "Int", "UInt", "Float", "boolean")


def dataset_problems(
    columns: dict[str, str], model: str, version: int, signature: ModelSignature
) -> list[tuple[str, str]]:
    """What keeps a dataset from feeding ``model``: missing feature or target columns, text in numeric
    features. Each problem is (column, message naming it)."""
    problems = []
    where = f"{model} (signature of version {version})"
    for feature in signature.features:
        dtype = columns.get(feature.name)
        if dtype is None:
            problems.append((feature.name, f"column {feature.name!r} is missing: it is a feature of {where}"))
        elif feature.type is FeatureType.NUMERIC and not dtype.startswith(NUMERIC_DTYPES):
            problems.append(
                (
                    feature.name,
                    f"column {feature.name!r} must be numeric for {where} but holds {dtype} values",
                )
            )
    if signature.target not in columns:
        problems.append(
            (signature.target, f"column {signature.target!r} is missing: it is the target of {where}")
        )
    return problems


def too_wide_to_announce(columns: dict[str, str], description: str | None, excess: int, limit: int) -> str:
    """Why a dataset whose DatasetRegistered would pass the consumers' size limit by ``excess`` bytes is
    refused, and what to do: the event lists every column's name and type."""
    listed = len(orjson.dumps(columns))
    told = len(description.encode()) if description else 0
    return (
        f"the dataset cannot be announced: its DatasetRegistered would be {limit + excess:,} bytes and "
        f"consumers accept {limit:,} bytes (max_event_bytes). The event lists every column's name and type: "
        + (f"{len(columns):,} columns take" if len(columns) != 1 else "its one column takes")
        + f" {listed:,} bytes"
        + (f", the description {told:,} bytes" if told else "")
        + ". Shorten the column names"
        + (" or the description" if told else "")
        + ", or split the table into narrower datasets"
    )


# --- validation reports ------------------------------------------------------------------------------

FAILED_CHECKS_NAMED_CHARS = 1_000
"""Failed check names a rejection's reason or a card's verdict spells out, in characters; the rest are
counted. A report can fail thousands of slices."""


def failed_checks_phrase(names: Sequence[str], total: int | None = None) -> str:
    """The first failed checks by name (at least one, about 1,000 characters), then how many more failed:
    ``total`` counts every failed check when the event named only some of them."""
    named: list[str] = []
    chars = 0
    for name in names:
        if named and chars + len(name) > FAILED_CHECKS_NAMED_CHARS:
            break
        named.append(name)
        chars += len(name) + 2
    more = max(total or 0, len(names)) - len(named)
    return ", ".join(named) + (f" and {more} more" if more else "")


# --- model cards --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardMarkup:
    """How a card format writes the parts of a paragraph: ``text`` as it is (escaped, so a value from a
    request or an event shows as written and never becomes a link, an image or markup), ``code`` and
    ``strong`` around a value."""

    text: Callable[[str], str]
    code: Callable[[str], str]
    strong: Callable[[str], str]


_MD_SPECIAL = re.compile(r"[\\`*\[\]<&|~]|(?<![^\W_])_|_(?![^\W_])")
"""What starts Markdown inline markup within a line (emphasis, code, links and images, raw HTML and
autolinks, entities, table cells, strikethrough); the card puts no value at the start of a line. An ``_``
between two letters or digits (``roc_auc``) can neither open nor close emphasis, and is left as it is."""
_LINE_BREAK = re.compile(r"\r\n?|\n")


def md_text(text: str) -> str:
    """``text`` as Markdown that shows it as written: on one line, every mark character escaped."""
    return _MD_SPECIAL.sub(r"\\\g<0>", _LINE_BREAK.sub(" ", text))


def md_code(text: str) -> str:
    """``text`` as a Markdown code span, on one line: fenced by more backticks than it holds in a row (no
    backslash escape works inside a code span), padded when it starts or ends with a backtick or space."""
    text = _LINE_BREAK.sub(" ", text)
    if not text.strip():
        return md_text(text)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    padded = text[0] in "` " or text[-1] in "` "
    return f"{fence} {text} {fence}" if padded else f"{fence}{text}{fence}"


MARKDOWN = CardMarkup(text=md_text, code=md_code, strong=lambda t: f"**{md_text(t)}**")
HTML = CardMarkup(
    text=html.escape,
    code=lambda t: f"<code>{html.escape(t)}</code>",
    strong=lambda t: f"<strong>{html.escape(t)}</strong>",
)


@dataclass(frozen=True)
class CardSection:
    """A titled part of a model card: paragraphs (in the card's format), then an optional table (of plain
    text, escaped by the renderer)."""

    title: str
    paragraphs: tuple[str, ...] = ()
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def card_sections(v: VersionPublic, m: CardMarkup) -> list[CardSection]:
    """The content of a version's model card, from lineage, validation reports and stage history, its
    paragraphs written with ``m``."""
    lineage = v.lineage.document
    sig = v.signature
    sections = [
        CardSection(
            "Summary",
            paragraphs=(
                f"Version {v.version} of {m.code(v.model)} is {m.strong(v.stage.value)}"
                + (f" (aliases: {m.text(', '.join(v.aliases))})" if v.aliases else "")
                + f". It is a {m.text(sig.task.value)} model predicting {m.code(sig.target)} from "
                f"{len(sig.features)} features, trained by run {m.code(v.lineage.run_id)} (job "
                f"{m.code(v.lineage.job_id)}) on {v.train_rows} rows and evaluated on {v.holdout_rows} "
                "held-out rows.",
            ),
            header=("field", "value"),
            rows=(
                ("registered", v.created_at.isoformat()),
                ("artifact (skops, sha256)", v.artifact.key),
                ("size", f"{v.artifact.size_bytes} bytes"),
                ("reference profile (sha256)", v.profile.key),
            ),
        ),
        CardSection(
            "Metrics (holdout, from training)",
            header=("metric", "value"),
            rows=tuple((k, _fmt(val)) for k, val in sorted(v.metrics.items())),
        ),
        CardSection(
            "Inputs and output",
            paragraphs=(
                f"Target {m.code(sig.target)}"
                + (f", classes {m.text(', '.join(str(c) for c in sig.classes))}" if sig.classes else "")
                + ".",
            ),
            header=("feature", "type", "categories"),
            rows=tuple(
                (f.name, f.type.value, ", ".join(str(c) for c in f.categories) if f.categories else "—")
                for f in sig.features
            ),
        ),
        CardSection(
            "Training data",
            header=("role", "dataset", "version", "rows", "sha256", "source"),
            rows=tuple(
                (d.role, d.name, str(d.version), _fmt(d.rows), d.sha256, d.source or "not registered")
                for d in v.lineage.datasets
            ),
        ),
        CardSection(
            "How it was made",
            header=("field", "value"),
            rows=(
                ("code version", lineage.code_version),
                ("spec hash", lineage.spec_hash),
                ("seed", str(lineage.seed)),
                ("parent version", _fmt(lineage.parent_version)),
                ("training duration", f"{v.duration_seconds:.1f} s"),
                ("correlation id", v.lineage.correlation_id),
                *((f"param {k}", _fmt(val)) for k, val in sorted(lineage.params.items())),
                *((f"env {k}", val) for k, val in sorted(lineage.environment.items())),
            ),
        ),
    ]
    if v.validation_reports:
        for report in v.validation_reports:
            verdict = (
                "passed"
                if report.passed
                else f"failed ({failed_checks_phrase(report.failed_checks, report.failed_checks_total)})"
            )
            against = (
                f" against champion version {report.champion_version}"
                if report.champion_version is not None
                else ""
            )
            whole = f"validation's {m.code(f'GET {report.full_report_path}')}"
            extent = (
                f"The event carried {len(report.checks)} of the {report.checks_total} checks and named "
                f"{len(report.failed_checks)} of the {report.failed_checks_total} failed ones: the report "
                f"was too large for it. Every check, in full: {whole}."
                if report.checks_truncated
                else f"The whole report: {whole}."
            )
            sections.append(
                CardSection(
                    f"Validation report {report.report_id}",
                    paragraphs=(
                        f"Validation {m.text(verdict)}{against}, received {report.received_at.isoformat()}.",
                        extent,
                    ),
                    header=("check", "kind", "value", "threshold", "passed", "detail"),
                    rows=tuple(
                        (
                            str(c.get("name")),
                            str(c.get("kind")),
                            _fmt(c.get("value")),
                            f"{c.get('comparator') or ''} {_fmt(c.get('threshold'))}".strip(),
                            "yes" if c.get("passed") else "no",
                            str(c.get("detail") or ""),
                        )
                        for c in report.checks
                    ),
                )
            )
    else:
        sections.append(CardSection("Validation", paragraphs=("No validation report received yet.",)))
    sections.append(
        CardSection(
            "Stage history",
            header=("when", "from", "to", "by", "reason", "caused by"),
            rows=tuple(
                (
                    h.changed_at.isoformat(),
                    h.from_stage.value if h.from_stage else "—",
                    h.to_stage.value,
                    h.actor or h.source,
                    h.reason,
                    f"{h.event_type} {h.event_id}",
                )
                for h in v.stage_history
            ),
        )
    )
    return sections


def render_markdown(v: VersionPublic) -> str:
    """The model card as Markdown (every value escaped: free text shows as written, never as markup)."""
    out = [f"# Model card: {md_text(v.model)} version {v.version}", ""]
    for s in card_sections(v, MARKDOWN):
        out += [f"## {md_text(s.title)}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        if s.header:
            out.append("| " + " | ".join(s.header) + " |")
            out.append("|" + "---|" * len(s.header))
            out += ["| " + " | ".join(md_text(c) for c in row) + " |" for row in s.rows]
            out.append("")
    return "\n".join(out)


def render_html(v: VersionPublic) -> str:
    """The model card as a self-contained HTML page (every value escaped)."""
    title = html.escape(f"Model card: {v.model} version {v.version}")
    body: list[str] = [f"<h1>{title}</h1>"]
    for s in card_sections(v, HTML):
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [f"<p>{p}</p>" for p in s.paragraphs]
        if s.header:
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in s.header))
            body.append("</tr></thead><tbody>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in s.rows]
            body.append("</tbody></table>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse;margin-bottom:1rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
        "text-align:left;vertical-align:top}code{background:#f4f4f4}"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
