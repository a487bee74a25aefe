"""The `driftloop` command line: one function per subcommand, listed in the COMMANDS table at the bottom.

A new subcommand is a ``cmd_*`` function plus one ``Subcommand`` row; a new group (like ``infra``) also
gets one line in GROUPS for its --help text.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.table import Table
from rich.text import Text

from contracts.topics import DEAD_LETTER
from deploy.local.broker import broker_answers, create_platform_topics
from deploy.local.console import say
from deploy.local.errors import InfraError, StartFailed
from deploy.local.infra import (
    EVERYTHING,
    INFRASTRUCTURE,
    KAFKA_ENV,
    PLATFORM,
    InfraLease,
    LeaseEnd,
    LocalInfra,
    UpResult,
)
from deploy.local.interrupts import (
    ChildOutcome,
    DeferredSignals,
    Terminated,
    interruption,
    run_to_completion,
    terminations_raise,
)
from deploy.local.leases import Holder
from deploy.local.processes import wait_until
from deploy.local.settings import PROJECT_ROOT, LocalInfraSettings, StateLayout
from deploy.local.status import ComponentStatus
from deploy.platform import Platform, supervised_state_dir
from libs.output import StdoutConsole, discard_output, output_reader_gone, reader_gone, terminal_text
from libs.settings import KafkaSettings, ServiceSettings, settings_problems

if TYPE_CHECKING:
    from libs.bus.dead_letters import DeadLetterEntry, DeadLetterSelection, Replay, Skip

LINT_TARGETS = ("contracts", "libs", "services", "deploy", "tests")
# How long pytest may take to tear its session down (sandbox platforms, databases, topics) once it was
# interrupted, before it is stopped without finishing.
PYTEST_GRACE_S = 60.0

S = TypeVar("S", bound=ServiceSettings)


@dataclass(frozen=True)
class Subcommand:
    """One row of the command table: where it sits, what it says in --help, what runs."""

    path: tuple[str, ...]
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    # Unknown arguments are handed to the command (e.g. pytest's) instead of being refused.
    passthrough: bool = False


GROUPS: dict[tuple[str, ...], str] = {
    ("infra",): "the local Kafka broker and Postgres (no Docker needed)",
    ("audit",): "the tamper-evident audit trail, read from Postgres (the audit service need not run)",
    ("token",): "bearer tokens for the services' HTTP APIs (stored as sha256 hashes)",
    ("deadletter",): "read the dead-letter topic, and replay dead letters to their topics (on the broker)",
}


# --- output -----------------------------------------------------------------------------------------


def print_status(rows: Sequence[ComponentStatus]) -> None:
    """Print the component table."""
    table = Table(show_edge=False, header_style="bold")
    for column in ("component", "state", "pid", "address", "detail"):
        table.add_column(column)
    for row in rows:
        colour = "green" if row.ready else "red" if row.state != "stopped" else "yellow"
        table.add_row(
            row.name, f"[{colour}]{row.state}[/{colour}]", str(row.pid or "-"), row.address, row.detail
        )
    StdoutConsole().print(table)


# --- infra ------------------------------------------------------------------------------------------


def cmd_infra_up(args: argparse.Namespace) -> int:
    """Start broker and database unless they run, create the topics, show the status. What a `test` or
    `demo` running meanwhile started is taken over: it stays up after they end."""
    infra = LocalInfra()
    infra.up()
    if taken := infra.keep(INFRASTRUCTURE):
        say(
            f"{_names(taken)} stay running after the commands that started them end (`infra down` stops them)"
        )
    rows = infra.status()
    print_status(rows)
    return 0 if all(row.ready for row in rows) else 1


def _infra_down_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--left-behind",
        action="store_true",
        help="stop only what `test`, `demo` or `up` started and left running when they were killed "
        "(SIGKILL), unless a running command uses it",
    )


def cmd_infra_down(args: argparse.Namespace) -> int:
    """Stop our broker and database, whoever uses them (saying who); with --left-behind only what commands
    that have ended left running."""
    infra = LocalInfra()
    if getattr(args, "left_behind", False):
        end = infra.stop_unused(local_platform(), "stopping what commands that have ended left running ...")
        if not end.stopped:
            say("nothing left behind by a command that has ended was running")
        return 0
    warn_users(infra.users(), INFRASTRUCTURE)
    # An `up` that got ready has ended: its platform holds no lease, and would lose them unannounced.
    if (supervisor := local_platform().supervisor_pid()) is not None:
        say(
            f"stopping Kafka and Postgres although this checkout's platform (supervisor pid {supervisor}) "
            "runs on them: its services wait for them to come back; `driftloop down` stops both"
        )
    stopped = infra.down()
    say(f"stopped: {', '.join(stopped)}" if stopped else "nothing of ours was running")
    return 0


def warn_users(users: Sequence[Holder], things: Sequence[str]) -> None:
    """Say which running commands use what is about to be stopped under them (they will fail)."""
    using = [user.describe() for user in users if any(user.needs(thing) for thing in things)]
    if using:
        say(
            f"stopping {_names(things)} although running commands use them (they will fail): "
            + ", ".join(using)
        )


def _names(things: Sequence[str]) -> str:
    """``Kafka and Postgres``, for messages."""
    known = {"kafka": "Kafka", "postgres": "Postgres", PLATFORM: "the platform"}
    names = [known[thing] for thing in EVERYTHING if thing in things]
    return " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def cmd_infra_status(args: argparse.Namespace) -> int:
    """Show each component, and which running commands use them; exit 1 unless all are ready."""
    infra = LocalInfra()
    rows = infra.status()
    print_status(rows)
    say_users(infra)
    return 0 if all(row.ready for row in rows) else 1


def say_users(infra: LocalInfra) -> None:
    """Name the running commands that use the infrastructure or the platform (the last to end stops what
    they started)."""
    if users := infra.users():
        say(f"in use by: {', '.join(user.describe() for user in users)}")


def _topics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=os.environ.get(KAFKA_ENV), help=f"default: ${KAFKA_ENV}")
    parser.add_argument("--replication-factor", type=_count, default=1, help="1 or more (default 1)")
    parser.add_argument("--wait", type=_seconds, default=120.0, help="seconds to wait for the broker")


def cmd_infra_topics(args: argparse.Namespace) -> int:
    """Create the platform topics on a running broker, under DRIFTLOOP_KAFKA_TOPIC_PREFIX (the compose
    topic-init container runs this)."""
    bootstrap = args.bootstrap or LocalInfra().broker.bootstrap
    say(f"waiting for Kafka at {bootstrap} ...")
    if not wait_until(lambda: broker_answers(bootstrap), timeout_s=args.wait, interval_s=1.0):
        raise StartFailed(
            f"no Kafka broker answered at {bootstrap} within {args.wait:.0f}s.",
            hint=f"start one (`driftloop infra up`) or set {KAFKA_ENV}.",
        )
    created = create_platform_topics(bootstrap, args.replication_factor, prefix=KafkaSettings().topic_prefix)
    say(f"created topics: {', '.join(created)}" if created else "all topics already exist")
    return 0


# --- top-level workflows ----------------------------------------------------------------------------


def local_platform() -> Platform:
    """The platform of this checkout: state in the state folder the infrastructure and the leases use
    (.driftloop/ unless DRIFTLOOP_LOCAL_STATE_DIR names another), services on ports 8101-8106."""
    return Platform(StateLayout.from_settings(LocalInfraSettings()).root)


# The local platform runs with windows and canary steps sized for a laptop's traffic (the services'
# defaults are sized for production); any DRIFTLOOP_* variable the caller sets wins, except the broker and
# database, which `infra up` chose (see platform_env).
LOCAL_PROFILE = {
    "DRIFTLOOP_MONITORING_WINDOW_ROWS": "2000",
    "DRIFTLOOP_MONITORING_COOLDOWN_SECONDS": "120",
    "DRIFTLOOP_SERVING_ROLLOUT_MIN_SAMPLES": "200",
    "DRIFTLOOP_SERVING_ROLLOUT_BAKE_SECONDS": "10",
}


def platform_env(result: UpResult) -> dict[str, str]:
    """The services' environment: the broker and database `infra up` chose (it said which; a dead
    DRIFTLOOP_KAFKA_BOOTSTRAP left in the caller's environment must not win over them), then the
    caller's settings, then the state folder's files and the laptop profile. The variables a service reads
    before those two (its own DRIFTLOOP_<SERVICE>_DATABASE_URL, a nested DRIFTLOOP_KAFKA__BOOTSTRAP) are
    left out, saying so."""
    chosen = result.client_env()
    env = {**LOCAL_PROFILE, **state_files_env(), **os.environ, **chosen}
    for name in sorted(read_before(chosen) & env.keys()):
        say(f"ignoring {name}: the services use what `infra up` chose ({', '.join(chosen)})")
        del env[name]
    return env


def state_files_env() -> dict[str, str]:
    """The variables that put the services' files (artifacts, tokens.json, the audit key and checkpoints)
    in the state folder, as the sandboxes' do: their defaults are the checkout's .driftloop/ whatever
    DRIFTLOOP_LOCAL_STATE_DIR says, and a second stack would share them with the default one. One the caller
    sets already, by its name or by one a service reads after it (DRIFTLOOP_CHECKPOINT_FILE, behind
    DRIFTLOOP_AUDIT_CHECKPOINT_FILE), is left out: the caller's setting wins."""
    files = StateLayout.from_settings(LocalInfraSettings()).service_files_env()
    return {
        name: value for name, value in files.items() if not ({name} | read_after([name])) & os.environ.keys()
    }


def platform_settings(cls: type[S]) -> S:
    """``cls()`` as the platform `up` starts reads it: the caller's environment, and for a setting it leaves
    unset the state folder's file (state_files_env), not the checkout's .driftloop/ of the default."""
    from deploy.settings_doc import settings_of

    files = state_files_env()
    values: dict[str, Any] = {}
    for setting in settings_of(cls):
        if os.environ.keys() & set(setting.variables):
            continue  # the caller's: the settings read it themselves
        if ours := [files[name] for name in setting.variables if name in files]:
            values[setting.name] = ours[0]
    return cls(**values)


def read_before(variables: Iterable[str]) -> set[str]:
    """The variables a service reads ahead of any of ``variables`` for the same setting (they would win)."""
    return {ahead for before, _ in _read_around(variables) for ahead in before}


def read_after(variables: Iterable[str]) -> set[str]:
    """The variables a service reads after any of ``variables`` for the same setting (they would lose)."""
    return {behind for _, after in _read_around(variables) for behind in after}


def _read_around(variables: Iterable[str]) -> Iterator[tuple[Sequence[str], Sequence[str]]]:
    """For each of ``variables`` and each service setting that reads it: the variables read before it and
    after it for that setting."""
    from deploy.settings_doc import SERVICE_SETTINGS, settings_of

    names = list(variables)
    for cls in SERVICE_SETTINGS:
        for setting in settings_of(cls):
            for name in names:
                if name in setting.variables:
                    at = setting.variables.index(name)
                    yield setting.variables[:at], setting.variables[at + 1 :]


def print_services(platform: Platform) -> bool:
    """Print each service's state; True when all are ready."""
    health = platform.health()
    state = platform.state()
    table = Table(show_edge=False, header_style="bold")
    for column in ("service", "state", "pid", "restarts", "address"):
        table.add_column(column)
    for name, ready in health.items():
        row = state.get(name, {})
        colour = "green" if ready == "ready" else "red"
        table.add_row(
            name,
            f"[{colour}]{ready}[/{colour}]",
            str(row.get("pid") or "-"),
            str(row.get("restarts", "-")),
            platform.url(name),
        )
    StdoutConsole().print(table)
    return all(v == "ready" for v in health.values())


def end_lease(lease: InfraLease, platform: Platform, why: str | None = None) -> LeaseEnd:
    """End a command's lease: what it and other commands started and no running command uses any more is
    stopped (``why`` is said first), the supervisor before the infrastructure; what it started and leaves
    running, it says why. Another `test`, `demo` or `up` still running keeps what it uses: the last one
    to end stops it.

    A second Ctrl-C or a SIGTERM meanwhile is held until the end, and the infrastructure is stopped
    even when stopping the services failed."""
    with DeferredSignals():
        end = lease.end(platform, why)
    left = [thing for thing in lease.started if thing in end.left_running]
    infrastructure = [thing for thing in left if thing != PLATFORM]
    if end.platform_pid is not None and infrastructure:
        say(
            f"leaving {_names(infrastructure)} running: this checkout's platform (supervisor pid "
            f"{end.platform_pid}) runs on them; `driftloop down` stops both"
        )
        left = [thing for thing in left if thing == PLATFORM]
    if left:
        using = [user.describe() for user in end.users if any(user.needs(thing) for thing in left)]
        say(
            f"leaving {_names(left)} running: still used by {', '.join(using) or 'a running command'}; "
            "the last command using it stops it when it ends"
        )
    if taken := lease.taken_over(end):
        say(
            f"leaving {_names(taken)} running: taken over by `driftloop up`, `infra up` or "
            "`demo --keep-running` meanwhile; `driftloop down` stops it"
        )
    return end


def cmd_up(args: argparse.Namespace) -> int:
    """Bring the infrastructure and all six services up (supervised), and show their health. When they do
    not become ready (or on an error, Ctrl-C), what this `up` started is stopped again, unless a `test` or
    `demo` running meanwhile uses it; when they do, it stays up until `down`, also what a running `test`
    or `demo` started."""
    infra = LocalInfra()
    lease = infra.lease("driftloop up", EVERYTHING)
    platform = local_platform()
    try:
        result = lease.up()
        print_status(infra.status())
        supervision = platform.start(platform_env(result))
        if supervision.started:
            lease.note_started(PLATFORM)
        say(
            f"services already supervised (pid {supervision.pid})"
            if not supervision.started
            else f"starting the six services under a supervisor (pid {supervision.pid}); "
            f"logs in {platform.log.parent}/ ..."
        )
        health = platform.wait_ready(timeout_s=args.wait)
        ok = print_services(platform)
        if ok:
            lease.keep()
        else:
            waiting = ", ".join(name for name, state in health.items() if state != "ready")
            say(f"not ready after {args.wait:.0f}s: {waiting}")
            say(f"see {platform.log.parent}/<service>.log")
    finally:
        end_lease(lease, platform, "stopping what this `up` started (the logs stay) ...")
    return 0 if ok else 1


def _up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", type=_seconds, default=180.0, help="seconds to wait for the services")


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the services, then the infrastructure this checkout started, whoever uses them (saying who)."""
    warn_users(LocalInfra().users(), [PLATFORM])
    if local_platform().stop():
        say("services stopped")
    return cmd_infra_down(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Bring everything up if needed, run the closed-loop demo, stop what it started (also when it fails,
    is interrupted or terminated; --keep-running keeps it once the services were ready)."""
    from deploy import demo  # pandas and friends load only for the demo

    infra = LocalInfra()
    lease = infra.lease("driftloop demo", EVERYTHING)
    platform = local_platform()
    ready = False
    try:
        result = lease.up()
        supervision = platform.start(platform_env(result))
        if supervision.started:
            lease.note_started(PLATFORM)
            say(f"starting the six services under a supervisor; logs in {platform.log.parent}/ ...")
        health = platform.wait_ready(timeout_s=args.wait)
        if not all(v == "ready" for v in health.values()):
            print_services(platform)
            raise StartFailed(
                "the services did not become ready.", hint=f"see {platform.log.parent}/<service>.log"
            )
        ready = True
        return asyncio.run(demo.run(platform, result.kafka_bootstrap))
    finally:
        if ready and args.keep_running:
            lease.keep()
        why = (
            "stopping what the demo started (use --keep-running to explore afterwards) ..."
            if ready
            else "stopping what the demo started ..."
        )
        end_lease(lease, platform, why)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", type=_seconds, default=180.0, help="seconds to wait for the services")
    parser.add_argument("--keep-running", action="store_true", help="leave the platform up afterwards")


def cmd_status(args: argparse.Namespace) -> int:
    """Infrastructure and services, with their health."""
    infra = LocalInfra()
    rows = infra.status()
    print_status(rows)
    services_ok = print_services(local_platform())
    say_users(infra)
    return 0 if services_ok and all(row.ready for row in rows) else 1


def cmd_test(args: argparse.Namespace) -> int:
    """Run pytest against the local infrastructure, starting it (and stopping it after) if needed.

    Ctrl-C, SIGTERM or SIGHUP reach pytest as one SIGINT, and its session clean-up (sandbox platforms,
    databases, topics) runs before the infrastructure it needs is stopped; not before every other command
    using it (another `test`, a `demo`, this checkout's platform) has ended too."""
    lease = LocalInfra().lease("driftloop test")
    outcome: ChildOutcome | None = None
    try:
        result = lease.up()
        env = {**os.environ, **result.client_env()}
        # The plugin keeps a closing terminal's SIGHUP from ending pytest before its clean-up.
        command = [sys.executable, "-m", "pytest", "-p", "deploy.local.pytest_hangup", *args.passthrough]
        say(f"running {' '.join(command[1:])} against Kafka {result.kafka_bootstrap} ...")
        outcome = run_to_completion(command, name="pytest", cwd=PROJECT_ROOT, env=env, grace_s=PYTEST_GRACE_S)
        if outcome.signal_received is not None:
            raise interruption(outcome.signal_received)
        return outcome.returncode
    finally:
        with DeferredSignals():
            try:
                if outcome is not None:
                    stop_platforms_left_behind(outcome.left_behind)
            finally:
                end_lease(lease, local_platform())


def stop_platforms_left_behind(pids: Sequence[int]) -> None:
    """Stop the sandbox platforms whose supervisors are among ``pids`` (what a killed pytest left)."""
    for pid in pids:
        state_dir = supervised_state_dir(pid)
        if state_dir is not None and Platform(state_dir).stop():
            say(f"stopped the platform pytest left running (state in {state_dir})")


def _tool(name: str) -> str:
    # The venv's own tools first, so the locked versions run even when the venv is not activated.
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name) or name


def _run_steps(steps: Sequence[tuple[str, list[str]]]) -> int:
    failed = []
    for label, command in steps:
        say(f"{label}: {' '.join(command)}")
        started = time.monotonic()
        try:
            code = subprocess.run(command, cwd=PROJECT_ROOT, check=False).returncode
        except FileNotFoundError:
            code = 127
            say(f"{label}: `{command[0]}` is not installed (run deploy/local/driftloop to set up .venv)")
        if code != 0:
            failed.append(label)
        say(f"{label}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {time.monotonic() - started:.1f}s")
    if failed:
        say(f"failed: {', '.join(failed)}")
        return 1
    say("all checks passed")
    return 0


def _lint_steps() -> list[tuple[str, list[str]]]:
    return [
        ("ruff check", [_tool("ruff"), "check", "."]),
        ("ruff format", [_tool("ruff"), "format", "--check", "."]),
        ("mypy", [_tool("mypy"), *LINT_TARGETS]),
        ("import boundaries", [_tool("lint-imports")]),
    ]


def cmd_lint(args: argparse.Namespace) -> int:
    """ruff check, ruff format --check, mypy, import-linter."""
    return _run_steps(_lint_steps())


def cmd_check(args: argparse.Namespace) -> int:
    """Everything CI checks before the tests: lint, plus the generated contracts specs and settings reference
    are up to date."""
    steps = _lint_steps()
    if importlib.util.find_spec("contracts.generate") is not None:
        steps.append(("contracts up to date", [sys.executable, "-m", "contracts.generate", "--check"]))
    else:
        say("contracts up to date: skipped (contracts/generate.py does not exist yet)")
    steps.append(("settings reference up to date", [sys.executable, "-m", "deploy.settings_doc", "--check"]))
    return _run_steps(steps)


# --- audit ------------------------------------------------------------------------------------------
# Implemented in services/audit/cli.py, imported on use so other commands never load the service.


def _count(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more (0: look once, do not wait). A wait of nan
    or inf would never end."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, not {text!r}")
    return value


def _text(text: str) -> str:
    """An argparse type: UTF-8 text, as the trail holds. A byte that is not UTF-8 on the command line
    (``$'\\xff'`` in a shell) arrives as a lone surrogate, which no query can carry. Empty text (an unset
    shell variable, ``--model "$MODEL"``) is no filter: refused as the API refuses ``?model=``."""
    if not text:
        raise argparse.ArgumentTypeError("is empty: give a value")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"is not UTF-8 text: {os.fsencode(text)!r}") from None
    return text


def _indexed_text(text: str) -> str:
    """An argparse type: :func:`_text` no longer than the trail indexes an attribute (a correlation id, a
    model, a type) by; the API answers 422 for a longer one."""
    from services.audit.domain import INDEX_TEXT_MAX

    text = _text(text)
    if len(text) > INDEX_TEXT_MAX:
        raise argparse.ArgumentTypeError(
            f"is {len(text):,} characters, more than the {INDEX_TEXT_MAX} the trail indexes it by (only an "
            f"undecodable record has a longer one): give its first {INDEX_TEXT_MAX}"
        )
    return text


def _audit_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="from_seq", type=_count, default=1, help="first sequence number")
    parser.add_argument("--to", dest="to_seq", type=_count, help="last sequence number (default: the end)")
    parser.add_argument("--full", action="store_true", help="hash every record here, check indexed columns")
    parser.add_argument("--checkpoints", action="append", type=Path, default=[], help="more checkpoint files")
    parser.add_argument("--public-key", action="append", default=[], help="another trusted key (base64)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Verify the trail's hash chain, signed checkpoints and seals; exit 1 naming the first bad row."""
    if args.to_seq is not None and args.to_seq < args.from_seq:
        args.usage_of.error(
            f"--to {args.to_seq} is below --from {args.from_seq}: the range would be reversed"
        )
    from services.audit import cli as audit
    from services.audit.settings import AuditSettings

    return audit.verify(
        from_seq=args.from_seq,
        to_seq=args.to_seq,
        full=args.full,
        checkpoint_files=args.checkpoints,
        public_keys=args.public_key,
        as_json=args.json,
        settings=platform_settings(AuditSettings),
    )


def _audit_tail_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-n", "--lines", type=_count, default=20, help="how many of the newest events (1 to the query limit)"
    )
    parser.add_argument("--model", type=_indexed_text, help="only this model's events")
    parser.add_argument("--type", type=_indexed_text, help="only this event type, e.g. DriftDetected")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing new events")


def cmd_audit_tail(args: argparse.Namespace) -> int:
    """The newest events of the trail."""
    from services.audit import cli as audit
    from services.audit.settings import AuditSettings

    settings = platform_settings(AuditSettings)
    if args.lines > settings.query_max_limit:
        args.usage_of.error(
            f"argument -n/--lines: must be {settings.query_max_limit} or less "
            f"(DRIFTLOOP_AUDIT_QUERY_MAX_LIMIT), not {args.lines}"
        )
    return audit.tail(
        limit=args.lines, model=args.model, event_type=args.type, follow=args.follow, settings=settings
    )


def _audit_trace_arguments(parser: argparse.ArgumentParser) -> None:
    # Optional to argparse so the command is reachable by its path alone; required below.
    parser.add_argument(
        "correlation_id",
        nargs="?",
        type=_indexed_text,
        help="the cascade's correlation id (its root event's id)",
    )
    parser.add_argument("--json", action="store_true", help="print the tree as JSON")


def cmd_audit_trace(args: argparse.Namespace) -> int:
    """The causal tree of one cascade: drift -> retrain -> ... -> promotion or rollback."""
    if not args.correlation_id:
        args.usage_of.error("the correlation id of a cascade is required (GET /v1/events shows it)")
    from services.audit import cli as audit
    from services.audit.settings import AuditSettings

    return audit.trace(args.correlation_id, as_json=args.json, settings=platform_settings(AuditSettings))


# --- dead letters -----------------------------------------------------------------------------------
# libs.bus.dead_letters reads and replays; here are the arguments and what is printed.


def _position(text: str) -> tuple[int, int]:
    """An argparse type: ``PARTITION:OFFSET`` on the dead-letter topic, two whole numbers, 0 or more."""
    partition, colon, offset = text.partition(":")
    if not colon or not partition.isdigit() or not offset.isdigit():
        raise argparse.ArgumentTypeError(
            f"not a position: {text!r}; give PARTITION:OFFSET as `deadletter list` shows it, e.g. 0:17"
        )
    return int(partition), int(offset)


def _time(text: str) -> datetime:
    """An argparse type: an RFC 3339 date-time with its UTC offset, e.g. 2026-12-02T08:00:00Z."""
    from contracts.envelope import MalformedEvent, parse_event_time

    try:
        return parse_event_time(text)
    except MalformedEvent:
        raise argparse.ArgumentTypeError(
            f"not an RFC 3339 date-time: {text!r}; give one with its offset, e.g. 2026-12-02T08:00:00Z"
        ) from None


def _deadletter_arguments(parser: argparse.ArgumentParser) -> None:
    """The selection both `deadletter list` and `deadletter replay` take."""
    parser.add_argument(
        "--topic", action="append", type=_text, help="origin topic, e.g. mlops.models (repeat for several)"
    )
    parser.add_argument(
        "--consumer", action="append", type=_text, help="the consumer that dead-lettered it, e.g. registry"
    )
    parser.add_argument(
        "--reason", action="append", type=_text, help="dead-letter reason, e.g. handler-failed (repeatable)"
    )
    parser.add_argument(
        "--type", action="append", type=_text, help="event type, e.g. TrainingCompleted or its full ce_type"
    )
    parser.add_argument("--since", type=_time, help="dead-lettered at or after this time (RFC 3339)")
    parser.add_argument("--until", type=_time, help="dead-lettered before this time (RFC 3339)")
    parser.add_argument(
        "--after",
        type=_position,
        metavar="PARTITION:OFFSET",
        help="go on after this dead letter (what an interrupted replay says): lower partitions are passed "
        "over, higher ones read from their start",
    )
    parser.add_argument(
        "--at",
        action="append",
        type=_position,
        metavar="PARTITION:OFFSET",
        help="only this dead letter (repeatable); replay takes a named one whatever its kind",
    )


def _deadletter_list_arguments(parser: argparse.ArgumentParser) -> None:
    _deadletter_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the dead letters as a JSON array")


def _deadletter_replay_arguments(parser: argparse.ArgumentParser) -> None:
    _deadletter_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="show what would be replayed, send nothing")


def _selection(args: argparse.Namespace) -> DeadLetterSelection:
    from libs.bus.dead_letters import DeadLetterSelection

    if args.since is not None and args.until is not None and args.until <= args.since:
        args.usage_of.error(f"--until {args.until.isoformat()} is not after --since {args.since.isoformat()}")
    return DeadLetterSelection(
        topics=frozenset(args.topic or ()),
        consumers=frozenset(args.consumer or ()),
        reasons=frozenset(args.reason or ()),
        event_types=frozenset(args.type or ()),
        since=args.since,
        until=args.until,
        after=args.after,
        named=frozenset(args.at or ()),
    )


def _on_broker(kafka: KafkaSettings, main: Coroutine[Any, Any, int]) -> int:
    """Run a dead-letter command; what the broker says becomes an error the user can act on."""
    from aiokafka.errors import KafkaError

    from libs.bus.dead_letters import DeadLetterTopicMissing

    try:
        return asyncio.run(main)
    except DeadLetterTopicMissing as exc:
        raise InfraError(
            str(exc),
            hint="create the platform's topics (`driftloop infra topics`), or set "
            "DRIFTLOOP_KAFKA_TOPIC_PREFIX to the prefix the platform runs under.",
        ) from exc
    except (KafkaError, TimeoutError) as exc:
        raise InfraError(
            f"Kafka at {kafka.bootstrap} did not answer: {exc!r}",
            hint="is it running (`driftloop infra status`)? DRIFTLOOP_KAFKA_BOOTSTRAP names the broker.",
        ) from exc


def cmd_deadletter_list(args: argparse.Namespace) -> int:
    """Print the selected dead letters: where each is, why, and where it came from."""
    from libs.bus.dead_letters import read_dead_letters

    selection = _selection(args)
    kafka = KafkaSettings()

    async def main() -> int:
        entries = [entry async for entry in read_dead_letters(kafka, selection)]
        if args.json:
            print(json.dumps([entry.as_json() for entry in entries], indent=2, ensure_ascii=False))
            return 0
        if entries:
            StdoutConsole(width=None if sys.stdout.isatty() else 240).print(_dead_letter_table(entries))
        say(f"{len(entries)} dead letter{'' if len(entries) == 1 else 's'} on {kafka.physical(DEAD_LETTER)}")
        return 0

    return _on_broker(kafka, main())


def _dead_letter_table(entries: Sequence[DeadLetterEntry]) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for column in ("at", "dead-lettered", "reason", "consumer", "origin", "type", "id", "note", "error"):
        table.add_column(column)
    for e in entries:
        when = datetime.fromtimestamp(e.record.timestamp_ms / 1000, UTC).isoformat(timespec="seconds")
        note = ", ".join(
            ([f"cut: {'+'.join(e.truncated)}"] if e.truncated else [])
            + (["tombstone"] if e.record.value is None else [])
        )
        # Text, never markup, and controls escaped: producers and handlers wrote these.
        table.add_row(
            *(
                Text(terminal_text(cell))
                for cell in (
                    e.position,
                    when.replace("+00:00", "Z"),
                    e.reason or "-",
                    e.consumer or "-",
                    e.origin,
                    (e.event_type or "-").removeprefix("io.driftloop."),
                    (e.event_id or "-")[:13],
                    note or "-",
                    (e.error or "-")[:80],
                )
            )
        )
    return table


def cmd_deadletter_replay(args: argparse.Namespace) -> int:
    """Produce the selected dead letters' originals again to their topics; exit 1 if a send failed."""
    from libs.bus.dead_letters import OriginRecords, Replay, read_dead_letters, replay
    from libs.bus.kafka import KafkaPublisher

    selection = _selection(args)
    kafka = KafkaSettings()
    verb = "would replay" if args.dry_run else "replayed"

    def show(step: Replay | Skip) -> None:
        e = step.entry
        if isinstance(step, Replay):
            origin = " (from its origin record)" if step.from_origin else ""
            print(
                terminal_text(
                    f"{verb} {e.position} -> {step.topic}{origin}: {e.event_type or '?'} {e.event_id or '?'}"
                )
            )
        else:
            print(terminal_text(f"skipped {e.position} ({step.reason}): {step.detail}"))

    async def main() -> int:
        publisher = None if args.dry_run else KafkaPublisher(kafka, client_id="driftloop-deadletter-replay")
        if publisher is not None:
            await publisher.start()
        try:
            async with OriginRecords(kafka) as origin_of:
                report = await replay(
                    read_dead_letters(kafka, selection),
                    named=bool(selection.named),
                    origin_of=origin_of,
                    sender=publisher,
                    on_step=show,
                )
        finally:
            if publisher is not None:
                await publisher.stop()
        skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(report.skipped.items()))
        total = sum(report.skipped.values())
        say(f"{verb} {report.replayed}; skipped {total}" + (f" ({skipped})" if skipped else ""))
        if report.failure is None:
            return 0
        last = report.last_replayed
        raise InfraError(
            report.failure,
            hint=(
                f"the last dead letter replayed was {last.position}: once the cause is fixed, go on with "
                f"`--after {last.position}` and the same filters"
                if last is not None
                else "nothing was replayed: once the cause is fixed, run the same command again"
            )
            + " (a dead letter replayed twice is a duplicate to the consumers that handled it).",
        )

    return _on_broker(kafka, main())


# --- tokens -----------------------------------------------------------------------------------------


def _token_issue_arguments(parser: argparse.ArgumentParser) -> None:
    from libs.auth import Role

    # Optional to argparse so the command is reachable by its path alone; required below.
    parser.add_argument("name", nargs="?", help="who holds the token, e.g. a person or a client program")
    parser.add_argument("--role", choices=[r.value for r in Role], help="what the token may do (required)")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="MODEL",
        help="limit a predict token to this model (repeat for several; default: every model)",
    )
    parser.add_argument(
        "--file",
        type=Path,
        help="the token file (default: $DRIFTLOOP_AUTH_TOKENS_FILE, else tokens.json in the state folder, "
        "$DRIFTLOOP_LOCAL_STATE_DIR or .driftloop/)",
    )


def cmd_token_issue(args: argparse.Namespace) -> int:
    """Create a token, add its sha256 to the token file and print the token once (it is not stored)."""
    if not args.name or not args.name.strip() or not args.role:
        args.usage_of.error(
            "a name (not blank) and a --role are required, e.g. `token issue billing-client --role predict`"
        )
    from libs.auth import (
        Role,
        TokenFileInvalid,
        TokenFileNotSynced,
        issue_token,
        token_models_problem,
        token_name_problem,
    )

    if why := token_name_problem(args.name):
        args.usage_of.error(f"the name {why}")
    if args.models is not None and (why := token_models_problem(args.role, args.models)):
        args.usage_of.error(f"--model: the token's models {why}")

    # The state folder's file is the one the services of `driftloop up` read (state_files_env).
    path = args.file or Path(
        os.environ.get("DRIFTLOOP_AUTH_TOKENS_FILE")
        or StateLayout.from_settings(LocalInfraSettings()).tokens_file
    )
    named_by = "--file" if args.file else "DRIFTLOOP_AUTH_TOKENS_FILE"
    try:
        issue_token(
            path,
            name=args.name,
            role=Role(args.role),
            models=args.models,
            named_by=named_by,
            show=show_token,
            waiting=say,
        )
    except TokenFileInvalid as err:
        raise InfraError(
            str(err),
            hint="correct the file (it was left as it was: no token was added), or name another with --file "
            "or DRIFTLOOP_AUTH_TOKENS_FILE.",
        ) from err
    except TokenFileNotSynced as err:
        raise InfraError(
            str(err),
            hint="look for a disk error in the system log; once the disk is sound, check that the file still "
            "holds the token printed above, and issue another if not.",
        ) from err
    scope = f" (models: {', '.join(args.models)})" if args.models else ""
    article = "an" if args.role[0] in "aeiou" else "a"
    say(
        f"added {article} {args.role} token for {args.name!r}{scope} to {path}; "
        "services read the file when they start"
    )
    return 0


def show_token(token: str) -> None:
    """Print a new token, before it is stored: one that cannot be shown (stdout closed, a full disk, its
    reader gone) is an error, and no token is stored that nobody has."""
    try:
        if sys.stdout is None:  # started with stdout closed (`>&-`), where print() writes nothing
            raise OSError(errno.EBADF, "standard output is closed")
        print(token, flush=True)
    except OSError as exc:
        discard_output()
        raise InfraError(
            f"the token could not be written to standard output ({exc.strerror}), so none was stored",
            hint="run it again with its output to a terminal, a file or a program that reads it.",
        ) from exc


# --- the table and the parser ------------------------------------------------------------------------

COMMANDS: list[Subcommand] = [
    Subcommand(("up",), "start Kafka, Postgres and the six services (supervised)", cmd_up, _up_arguments),
    Subcommand(("down",), "stop the services and what `up` started", cmd_down),
    Subcommand(("status",), "infrastructure and services, with their health", cmd_status),
    Subcommand(
        ("demo",),
        "the closed loop, live: drift → retrain → canary → promotion, and a rollback",
        cmd_demo,
        _demo_arguments,
    ),
    Subcommand(
        ("test",),
        "run pytest against local Kafka and Postgres (extra args go to pytest)",
        cmd_test,
        passthrough=True,
    ),
    Subcommand(("lint",), "ruff, ruff format --check, mypy, import boundaries", cmd_lint),
    Subcommand(
        ("check",), "lint plus staleness of the contracts and docs/settings.md: what CI runs first", cmd_check
    ),
    Subcommand(("infra", "up"), "start Kafka and Postgres (idempotent) and create the topics", cmd_infra_up),
    Subcommand(
        ("infra", "down"),
        "stop our Kafka and Postgres (--left-behind: only what killed commands left)",
        cmd_infra_down,
        _infra_down_arguments,
    ),
    Subcommand(
        ("infra", "status"), "show Kafka and Postgres; exit 1 unless both are ready", cmd_infra_status
    ),
    Subcommand(
        ("infra", "topics"),
        "create the platform topics on $DRIFTLOOP_KAFKA_BOOTSTRAP",
        cmd_infra_topics,
        _topics_arguments,
    ),
    Subcommand(
        ("audit", "verify"),
        "verify the chain, checkpoints and seals; exit 1 at the first bad row",
        cmd_audit_verify,
        _audit_verify_arguments,
    ),
    Subcommand(("audit", "tail"), "the newest events of the trail", cmd_audit_tail, _audit_tail_arguments),
    Subcommand(
        ("audit", "trace"), "the causal tree of one correlation id", cmd_audit_trace, _audit_trace_arguments
    ),
    Subcommand(
        ("deadletter", "list"),
        "the dead letters on the broker, with why and where from (filters, --json)",
        cmd_deadletter_list,
        _deadletter_list_arguments,
    ),
    Subcommand(
        ("deadletter", "replay"),
        "produce chosen dead letters' originals to their topics again (--dry-run shows what)",
        cmd_deadletter_replay,
        _deadletter_replay_arguments,
    ),
    Subcommand(
        ("token", "issue"),
        "create a bearer token with a role; prints it once",
        cmd_token_issue,
        _token_issue_arguments,
    ),
]


def build_parser(commands: Sequence[Subcommand] = COMMANDS) -> argparse.ArgumentParser:
    """An argparse tree built from the command table; groups (``infra``) appear as needed."""
    root = argparse.ArgumentParser(
        prog="driftloop", description="driftloop: models that keep themselves healthy.", allow_abbrev=False
    )
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): root}
    children: dict[tuple[str, ...], argparse._SubParsersAction[argparse.ArgumentParser]] = {}

    def parser_for(path: tuple[str, ...], help_text: str) -> argparse.ArgumentParser:
        if path in parsers:
            return parsers[path]
        parent = parser_for(path[:-1], GROUPS.get(path[:-1], ""))
        if path[:-1] not in children:
            children[path[:-1]] = parent.add_subparsers(title="commands", metavar="COMMAND")
        parser = children[path[:-1]].add_parser(
            path[-1], help=help_text, description=help_text, allow_abbrev=False
        )
        parser.set_defaults(usage_of=parser)
        parsers[path] = parser
        return parser

    root.set_defaults(usage_of=root)
    for command in commands:
        parser = parser_for(command.path, command.help)
        if command.arguments:
            command.arguments(parser)
        parser.set_defaults(command=command)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `driftloop` console script: the one place where what went wrong becomes a message
    and an exit status (2, a usage error, is argparse's SystemExit)."""
    try:
        # Building the parser imports what the commands' arguments need (a second or more): a Ctrl-C that
        # early is answered as one during the command.
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        command: Subcommand | None = getattr(args, "command", None)
        if command is None:
            args.usage_of.print_help()
            return 2
        if extra and not command.passthrough:
            args.usage_of.error(f"unrecognized arguments: {' '.join(extra)}")
        args.passthrough = extra
        # SIGTERM and SIGHUP end a command through its clean-up, as Ctrl-C does.
        with terminations_raise():
            status = command.run(args)
        if sys.stdout is not None:  # None: started with stdout closed (`>&-`), and print() writes nothing
            sys.stdout.flush()  # here, where a reader gone is seen, not in Python's last flush
        return status
    except BrokenPipeError:
        if not output_reader_gone():
            raise  # a socket's or a child's pipe: not the command's output
        return reader_gone()
    except InfraError as err:
        print(f"driftloop: error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"driftloop: what to do: {err.hint}", file=sys.stderr)
        return 1
    except ValidationError as err:
        if not err.title.endswith("Settings"):
            raise
        print_invalid_settings(err)
        return 1
    except SettingsError as err:  # a list or other JSON setting that is not JSON
        print_invalid_settings(err)
        return 1
    except Terminated as err:
        say(f"stopped by {signal.Signals(err.signum).name}")  # after a hang-up, to no terminal
        return err.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return 130


def print_invalid_settings(err: ValidationError | SettingsError) -> None:
    """Say which environment variable holds a value a settings class refused, and why (never a secret's
    value); no traceback."""
    for line in settings_problems(err):
        print(f"driftloop: error: {line}", file=sys.stderr)
    settings_class = f"{err.title}: " if isinstance(err, ValidationError) else ""
    print(
        "driftloop: what to do: correct or unset it; every setting is listed in docs/settings.md, from the "
        f"settings.py it belongs to ({settings_class}deploy/local/settings.py for DRIFTLOOP_LOCAL_*, the "
        "services' own settings.py for the others).",
        file=sys.stderr,
    )
