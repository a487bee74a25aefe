"""`driftloop audit verify | tail | trace`: the trail from a terminal, straight from Postgres (the audit
service need not run). deploy/cli.py registers these; each returns the process exit status."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from libs.db import check_schema_name, create_pool, shown_dsn
from libs.errors import DomainError
from libs.output import StdoutConsole, output_reader_gone, terminal_text
from services.audit import core
from services.audit.adapters.files import CheckpointFile
from services.audit.adapters.postgres import PgChain, reading
from services.audit.domain import EventQuery, KeyRing, Sealer, Signer, event_type_filter
from services.audit.settings import AuditSettings, decode_key
from services.audit.verification import VerifyReport


def _console() -> Console:
    """A terminal's width; a pipe or a file gets wide lines rather than cut columns. A reader gone raises
    BrokenPipeError (rich's own exits with 1, the status of a failed verification)."""
    console = StdoutConsole()
    return console if console.is_terminal else StdoutConsole(width=240)


def markup_text(text: str) -> str:
    """Text a producer wrote, inside rich markup: printed as it is (``[/]`` included), controls escaped."""
    return escape(terminal_text(text))


class TrailUnavailable(Exception):
    """The database or the trail's schema cannot be reached; the message says what to do."""


@asynccontextmanager
async def _pool(settings: AuditSettings) -> AsyncIterator[asyncpg.Pool]:
    check_schema_name(settings.db_schema)
    try:
        pool = await create_pool(settings.database_url, schema=settings.db_schema, min_size=1, max_size=4)
    except (OSError, asyncpg.PostgresError) as exc:
        raise TrailUnavailable(
            f"cannot reach Postgres at {shown_dsn(settings.database_url)}: {exc}. Is it running? "
            "Try `driftloop infra status`."
        ) from exc
    except (ValueError, OverflowError) as exc:  # a port beyond 65535 or not a number, an unknown option
        raise TrailUnavailable(
            f"DRIFTLOOP_DATABASE_URL is not a Postgres URL that can be used "
            f"({shown_dsn(settings.database_url)}): {exc}"
        ) from exc
    try:
        exists = await pool.fetchval("SELECT to_regclass($1)", f"{settings.db_schema}.trail")
        if exists is None:
            raise TrailUnavailable(
                f"there is no audit trail in schema {settings.db_schema!r} yet: start the audit service "
                "(python -m services.audit) so it records the platform's events"
            )
        if not await pool.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", settings.writer_role):
            raise TrailUnavailable(
                f"the database role {settings.writer_role!r} (DRIFTLOOP_AUDIT_WRITER_ROLE) does not exist: "
                "name the role the audit service writes the trail as (it creates it when it starts)"
            )
        yield pool
    finally:
        await pool.close()


def _keys(settings: AuditSettings, extra: Sequence[str]) -> tuple[KeyRing, Sealer | None]:
    """Trusted keys and, when this machine holds the signing key, the sealer (never makes a key)."""
    public = [decode_key(k, "--public-key") for k in [*settings.trusted_public_keys, *extra]]
    seed: bytes | None = None
    if settings.signing_key is not None and settings.signing_key.get_secret_value().strip():
        seed = decode_key(settings.signing_key.get_secret_value(), "DRIFTLOOP_AUDIT_SIGNING_KEY")
    elif settings.signing_key_file.exists():
        path = settings.signing_key_file
        try:
            text = path.read_text()
        except OSError as exc:  # a directory, no permission
            raise ValueError(
                f"DRIFTLOOP_AUDIT_SIGNING_KEY_FILE {path} cannot be read: {exc.strerror}"
            ) from exc
        seed = decode_key(text, f"DRIFTLOOP_AUDIT_SIGNING_KEY_FILE {path}")
    if seed is None:
        return KeyRing(public), None
    signer = Signer(seed)
    return KeyRing([signer.public_raw, *public]), signer.sealer


def _run(main: Any) -> int:
    try:
        return int(asyncio.run(main))
    except (TrailUnavailable, DomainError, ValueError, OSError) as exc:
        if isinstance(exc, BrokenPipeError) and output_reader_gone():
            raise  # the command's own output's, not the trail's: deploy/cli.py's main ends it quietly
        print(f"driftloop: error: {exc}", file=sys.stderr)
        return 1
    except asyncpg.PostgresError as exc:
        # The user of DRIFTLOOP_DATABASE_URL may lack a right (to SET ROLE, to read the trail), or a
        # timeout struck: what Postgres says names it.
        print(
            f"driftloop: error: Postgres refused a query of the trail: {exc} (SQLSTATE {exc.sqlstate})",
            file=sys.stderr,
        )
        return 1


def verify(
    *,
    from_seq: int = 1,
    to_seq: int | None = None,
    full: bool = False,
    checkpoint_files: Sequence[Path] = (),
    public_keys: Sequence[str] = (),
    as_json: bool = False,
    settings: AuditSettings | None = None,
) -> int:
    """Verify the chain, the checkpoints (database, export file, given files) and the seals."""
    settings = settings or AuditSettings()

    async def main() -> int:
        for path in checkpoint_files:
            # The settings' own file may not exist yet (no checkpoint signed); a file named here must.
            if not path.is_file():
                why = "is a directory" if path.is_dir() else "does not exist"
                raise FileNotFoundError(f"--checkpoints {path} {why}: name an NDJSON file of checkpoints")
        keys, sealer = _keys(settings, public_keys)
        # The service's own file is in sequence order (it only appends newer ones): searched. A file named
        # here may come from elsewhere: read through once, so that a line out of order hides no checkpoint
        # (then searched if it was in order). Both are read a page at a time as the rows are verified.
        own = [("DRIFTLOOP_AUDIT_CHECKPOINT_FILE", CheckpointFile(settings.checkpoint_file, in_order=True))]
        given = [("--checkpoints", CheckpointFile(path)) for path in checkpoint_files]
        for name, archive in [*own, *given]:
            try:
                archive.last_sequence()  # read first by the verification: a file that cannot be, said here
            except OSError as exc:  # a directory, no permission
                raise ValueError(f"{name} {archive.path} cannot be read: {exc.strerror}") from exc
        async with _pool(settings) as pool:
            report = await core.verify_trail(
                PgChain(pool, settings.writer_role),
                keys=keys,
                sealer=sealer,
                archives=[archive for _, archive in [*own, *given]],
                from_seq=from_seq,
                to_seq=to_seq,
                full=full,
                parallelism=settings.verify_parallelism,
            )
        if as_json:
            print(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode())
        else:
            _console().print(verdict(report))
        return 0 if report.ok else 1

    return _run(main())


def verdict(report: VerifyReport) -> str:
    """The line (markup) ``verify`` prints for ``report``: OK and what was checked, or the first bad row."""
    if not report.ok:
        where = f"sequence {report.first_bad_seq}" + ("" if report.exact else " (or later)")
        return f"[red]FAILED[/red] at {where}: {report.problem}: {markup_text(report.detail or '')}"
    if report.to_seq < report.from_seq:
        # The empty range from one past the end: only the row it trusts was read.
        why = (
            "the trail has no rows yet"
            if report.to_seq == 0
            else f"the trail ends at row {report.to_seq}, before --from {report.from_seq}"
        )
        return f"[green]OK[/green]: nothing to verify: {why} (the range is empty)"
    return (
        f"[green]OK[/green]: rows {report.from_seq}..{report.to_seq} chain ({report.mode}), "
        f"{report.checkpoints_checked} signed checkpoints match, "
        + (
            f"rows up to {report.covered_by_checkpoint} vouched for"
            if report.covered_by_checkpoint
            else "no row vouched for by one yet"
        )
        + f"; {report.rows_per_s:,.0f} rows/s"
        + ("" if report.seals_checked else " (no signing key here: seals not checked)")
    )


def tail(
    *,
    limit: int = 20,
    model: str | None = None,
    event_type: str | None = None,
    follow: bool = False,
    poll_s: float = 1.0,
    settings: AuditSettings | None = None,
) -> int:
    """Print the newest events; with ``follow``, keep printing new ones until interrupted (KeyboardInterrupt
    is raised, not turned into a status). ``limit`` is checked against ``query_max_limit`` where the command's
    arguments are (deploy/cli.py), as a usage error."""
    settings = settings or AuditSettings()
    console = _console()

    async def main() -> int:
        async with _pool(settings) as pool:
            query = EventQuery(model=model, event_type=event_type_filter(event_type), limit=limit)
            async with reading(pool, settings.writer_role) as trail:
                events, cursor = await core.query_events(trail, query, max_bytes=settings.query_max_bytes)
            events.reverse()
            console.print(_table(events))
            if cursor is not None and len(events) < limit:
                console.print(
                    f"[yellow]... the {len(events)} newest shown: their records reached "
                    f"{settings.query_max_bytes} bytes (DRIFTLOOP_AUDIT_QUERY_MAX_BYTES)[/yellow]"
                )
            last = events[-1]["seq"] if events else 0
            more = False
            while follow:
                if not more:  # the last page was ended by the limit or the bytes: read on at once
                    await asyncio.sleep(poll_s)
                query = EventQuery(
                    model=model,
                    event_type=event_type_filter(event_type),
                    newest_first=False,
                    after=last,
                    limit=settings.query_max_limit,
                )
                async with reading(pool, settings.writer_role) as trail:
                    events, cursor = await core.query_events(trail, query, max_bytes=settings.query_max_bytes)
                more = cursor is not None
                if events:
                    console.print(_table(events, header=False))
                    last = events[-1]["seq"]
        return 0

    # Ctrl-C (the way out of --follow) goes on to deploy/cli.py's main: "interrupted", exit status 130, as
    # every driftloop command.
    return _run(main())


def _table(events: Sequence[dict[str, Any]], *, header: bool = True) -> Table:
    table = Table(show_edge=False, show_header=header, header_style="bold")
    for column in ("seq", "recorded", "kind", "type", "subject", "actor", "id", "cause"):
        table.add_column(column)
    for e in events:
        # Every cell is Text, never markup: producers write these fields, and "[/]" in a subject must
        # print as it is, not end a style (or crash the command); a control character shows as its escape.
        event_type = (e["type"] or "-").removeprefix("io.driftloop.")
        table.add_row(
            Text(str(e["seq"])),
            Text(terminal_text((e["recorded_at"] or "-")[:23])),
            Text(e["kind"] or "unreadable", style="" if e["kind"] == "event" else "red"),
            Text(terminal_text(event_type)),
            Text(terminal_text(e["subject"] or "-")),
            Text(terminal_text(e["actor"] or "-")),
            Text(terminal_text((e["id"] or "-")[:13])),
            Text(terminal_text((e["causationid"] or "-")[:13])),
        )
    return table


def trace(correlation_id: str, *, as_json: bool = False, settings: AuditSettings | None = None) -> int:
    """Print the causal tree of one correlation id."""
    settings = settings or AuditSettings()

    async def main() -> int:
        async with _pool(settings) as pool, reading(pool, settings.writer_role) as trail:
            tree = await core.trace(
                trail,
                correlation_id,
                max_events=settings.trace_max_events,
                max_bytes=settings.trace_max_bytes,
            )
        if as_json:
            # Python's json, not orjson: orjson writes no integer beyond 64 bits (the trail shows them as
            # recorded) and nothing nested past 254 levels (a cascade 100 events deep is 200 before its data).
            print(json.dumps(tree, indent=2, ensure_ascii=False))
            return 0
        root = Tree(f"[bold]cascade {markup_text(correlation_id)}[/bold] ({tree['events']} events)")
        for node in tree.get("roots") or []:
            _branch(root, node)
        for node in tree.get("flat") or []:
            branch = root.add(_label(node) + f"  [dim]<- {markup_text(node['parent'] or 'root')}[/dim]")
            _dead_letters(branch, node)
        for letter in tree["dead_letters"]:
            root.add(f"[red]dead letter[/red] {letter['seq']}: {markup_text(str(letter['error']))}")
        if tree["truncated"]:
            root.add(f"[yellow]... cut: {markup_text(tree['truncated_reason'])}[/yellow]")
        _console().print(root)
        return 0

    return _run(main())


def _label(node: dict[str, Any]) -> str:
    """Markup for one event; every value in it is escaped, since producers write them."""
    event_type = markup_text((node["type"] or "?").removeprefix("io.driftloop."))
    actor = f" by {markup_text(node['actor'])}" if node["actor"] else ""
    missing = (
        f" [yellow](cause {markup_text(node['cause_missing'])} not recorded)[/yellow]"
        if node.get("cause_missing")
        else ""
    )
    if node.get("cause_cycle"):
        missing += (
            f" [yellow](cause {markup_text(node['cause_cycle'])} leads back here: a loop of causes)[/yellow]"
        )
    subject, when = markup_text(node["subject"] or ""), markup_text(node["time"] or "")
    return f"[bold]{event_type}[/bold] {subject} #{node['seq']} {when}{actor}{missing}"


def _branch(parent: Tree, node: dict[str, Any]) -> None:
    branch = parent.add(_label(node))
    _dead_letters(branch, node)
    for child in node.get("children") or []:
        _branch(branch, child)


def _dead_letters(branch: Tree, node: dict[str, Any]) -> None:
    for letter in node.get("dead_letters") or []:
        branch.add(f"[red]dead letter[/red] #{letter['seq']}: {markup_text(str(letter['error']))}")
