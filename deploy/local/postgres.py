"""A project-private PostgreSQL cluster in .driftloop/postgres, made from Debian's postgresql binaries."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

from deploy.local.console import say
from deploy.local.errors import PermissionProblem, PostgresMissing, StartFailed
from deploy.local.interrupts import DeferredSignals
from deploy.local.processes import (
    command_args,
    command_line,
    ensure_port_free,
    log_sizes,
    log_tails,
    pid_alive,
    read_pid,
    rotate_log,
    run_async,
    runs_exactly,
    terminate,
    text_tail,
    wait_until,
)
from deploy.local.settings import LocalInfraSettings, StateLayout
from deploy.local.status import ComponentStatus

DATABASE = "driftloop"
ROLE = "driftloop"
SERVICE_USER = "driftloop"
# Unix socket paths are limited to 107 bytes; deeper checkouts fall back to TCP only.
MAX_SOCKET_DIR = 90
# A dev cluster: durability across a power cut is not worth the fsync cost in every test transaction.
SERVER_OPTIONS = (
    "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    "-c max_connections=200"
)
# The server's log: its logging collector writes one file per hour of the day into logs/postgres/, and on
# the hour empties the one the same hour wrote the day before and writes it again, so the files hold the last
# 24 hours (the ring Postgres's documentation describes). A size limit cannot bound them: a file rotated for
# its size is written again under the same name, and appended to (log_truncate_on_rotation empties a file
# only on a rotation by time), so it is off. pg_ctl's -l file, logs/postgres.log, keeps only what the server
# says before its collector runs, and is rotated when it starts again.
LOG_FILENAME = "postgres-%H.log"
LOG_GLOB = "postgres-*.log"
COLLECTOR_OPTIONS = (
    f"-c logging_collector=on -c log_filename={LOG_FILENAME} -c log_rotation_age=1h -c log_rotation_size=0 "
    "-c log_truncate_on_rotation=on"
)
# The collector empties a file only when the hour comes round while it runs: one written by a server that
# was stopped before then would be appended to by every start at that hour, for ever.
RING_SPAN_S = 23 * 3600


async def _select_one(url: str, timeout_s: float) -> None:
    connection = await asyncpg.connect(url, timeout=timeout_s)
    try:
        await connection.fetchval("select 1")
    finally:
        await connection.close()


def database_answers(url: str, timeout_s: float = 5.0) -> bool:
    """True when the database at the URL accepts a connection and answers ``select 1``."""
    try:
        run_async(lambda: _select_one(url, timeout_s))
    except Exception:
        # Unreachable, refused, auth failure, unknown database: all mean "not usable now".
        return False
    return True


async def _drop_schemas(url: str, where: Callable[[str], bool]) -> list[str]:
    connection = await asyncpg.connect(url)
    try:
        names = [
            name
            for (name,) in await connection.fetch("SELECT nspname::text FROM pg_namespace")
            if where(name)
        ]
        # A schema still in use (a process not yet gone) fails the drop instead of hanging it.
        await connection.execute("SET lock_timeout = '10s'")
        for name in names:
            await connection.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        return names
    finally:
        await connection.close()


def drop_schemas(url: str, where: Callable[[str], bool]) -> list[str]:
    """Drop every schema of the database whose name ``where`` accepts, with what it holds; returns their
    names. For what tests and benchmarks made, named so they can tell."""
    return run_async(lambda: _drop_schemas(url, where))


def _installed_bin_dirs() -> list[Path]:
    found = [
        path
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if (path / "initdb").exists() and (path / "pg_ctl").exists()
    ]
    found.sort(key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path and (Path(on_path).resolve().parent / "initdb").exists():
        found.append(Path(on_path).resolve().parent)
    return found


def _is_root() -> bool:
    return os.geteuid() == 0


class LocalPostgres:
    """The project's own cluster on 127.0.0.1, trust auth, superuser role and database ``driftloop``."""

    name = "postgres"

    def __init__(self, settings: LocalInfraSettings, layout: StateLayout) -> None:
        self.settings = settings
        self.layout = layout

    @property
    def url(self) -> str:
        """The connection URL clients should use."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.settings.postgres_port}/{DATABASE}"

    @property
    def address(self) -> str:
        """host:port of the cluster."""
        return f"127.0.0.1:{self.settings.postgres_port}"

    def _cluster_version(self) -> str | None:
        """The PostgreSQL version of the cluster, or None when there is none (or only a half-made one)."""
        try:
            if not self._cluster_made():
                return None
            return (self.layout.postgres_data / "PG_VERSION").read_text().strip()
        except OSError:
            return None

    def _cluster_made(self) -> bool:
        # initdb writes PG_VERSION first and global/pg_control near its end: an initdb killed in between
        # (SIGKILL, or Ctrl-C's SIGKILL 0.25 s later) leaves a folder that only looks like a cluster.
        return (self.layout.postgres_data / "global" / "pg_control").exists()

    def _discard_half_made_cluster(self) -> None:
        """Remove what an interrupted initdb left, so the cluster is made again from scratch."""
        data = self.layout.postgres_data
        try:
            if self._cluster_made() or not data.is_dir() or not any(data.iterdir()):
                return
        except PermissionError:
            return  # another user's cluster: not ours to judge (or remove); pg_ctl will say what is wrong
        say(f"{data} holds a cluster whose initdb never finished (no global/pg_control): making it again")
        shutil.rmtree(data)

    def bin_dir(self) -> Path | None:
        """The binaries to use: the version that made the existing cluster, else the newest installed."""
        installed = _installed_bin_dirs()
        version = self._cluster_version()
        if version is None:
            return installed[0] if installed else None
        for path in installed:
            if path.parent.name == version:
                return path
        if installed:
            raise PostgresMissing(
                f"the cluster in {self.layout.postgres_data} was made by PostgreSQL {version}, "
                f"which is not installed (found: {', '.join(str(p) for p in installed)}).",
                hint=f"install postgresql-{version}, or delete {self.layout.postgres} to make a new cluster.",
            )
        return None

    @property
    def _pid_file(self) -> Path:
        return self.layout.postgres_data / "postmaster.pid"

    def _is_our_postmaster(self, pid: int) -> bool:
        # The postmaster keeps its command line (its children rename themselves): `postgres -D <our data>`.
        return runs_exactly(pid, ("-D", str(self.layout.postgres_data)), program="postgres")

    def running_pid(self) -> int | None:
        """The postmaster's pid when our cluster runs: the pid file's, if that process is this data
        folder's server (a stale file may name any process: after a reboot, a `tail -f` of our log)."""
        pid = read_pid(self._pid_file)
        if pid is not None and pid_alive(pid) and self._is_our_postmaster(pid):
            return pid
        return None

    def _discard_stale_pid_file(self) -> None:
        # Postgres refuses to start while postmaster.pid names a live process, whoever it is.
        pid = read_pid(self._pid_file)
        if pid is None or not pid_alive(pid) or self._is_our_postmaster(pid):
            return
        if not command_args(pid):
            return  # hidden from us (another user's, hidepid): not ours to judge; pg_ctl will say
        who = command_line(pid)[:80]
        say(f"removing a stale {self._pid_file.name}: pid {pid} is `{who}`, not this cluster's server")
        self._pid_file.unlink(missing_ok=True)

    def preflight(self) -> None:
        """Check the port and that the binaries are there or can be installed, before anything starts."""
        if self.running_pid() is not None:
            return
        ensure_port_free(self.settings.postgres_port, "Postgres", "DRIFTLOOP_LOCAL_POSTGRES_PORT")
        if self.bin_dir() is None and not (_is_root() and shutil.which("apt-get")):
            raise PostgresMissing(
                "the PostgreSQL server is not installed, and this user cannot install it.",
                hint="run `sudo apt-get update && sudo apt-get install -y postgresql`, or set "
                "DRIFTLOOP_DATABASE_URL to a Postgres you already have.",
            )

    def _install(self) -> Path:
        say("PostgreSQL is not installed: running `apt-get update && apt-get install -y postgresql` ...")
        # Debian's postinst would start its own cluster on 5432; policy-rc.d 101 tells it not to.
        policy = Path("/usr/sbin/policy-rc.d")
        own_policy = not policy.exists()
        if own_policy:
            policy.write_text("#!/bin/sh\n# driftloop: installing postgresql, start no services\nexit 101\n")
            policy.chmod(0o755)
        try:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            install = ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]
            for command in (["apt-get", "update"], install):
                result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
                if result.returncode != 0:
                    raise PostgresMissing(
                        f"`{' '.join(command)}` failed:\n{text_tail(result.stdout + result.stderr)}",
                        hint="fix the package problem above, or set DRIFTLOOP_DATABASE_URL to a Postgres.",
                    )
        finally:
            if own_policy:
                policy.unlink(missing_ok=True)
        found = self.bin_dir()
        if found is None:
            raise PostgresMissing("postgresql was installed but no initdb/pg_ctl were found.")
        say(f"installed PostgreSQL ({found})")
        return found

    def _os_user(self) -> str | None:
        # Postgres refuses to run as root; as root we run it as a system user, otherwise as ourselves.
        if not _is_root():
            return None
        for candidate in ("postgres", SERVICE_USER):
            try:
                pwd.getpwnam(candidate)
                return candidate
            except KeyError:
                continue
        say(f"creating the system user `{SERVICE_USER}` to run Postgres (it refuses to run as root) ...")
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            check=True,
        )
        return SERVICE_USER

    @staticmethod
    def _as_user(command: list[str], user: str | None) -> list[str]:
        return ["runuser", "-u", user, "--", *command] if user else command

    def _prepare_dirs(self, user: str | None) -> None:
        log_dir = self.layout.postgres_log_dir
        for path in (self.layout.postgres, self.layout.postgres_socket_dir, self.layout.logs, log_dir):
            path.mkdir(parents=True, exist_ok=True)
        rotate_log(self.layout.postgres_log)
        self.layout.postgres_log.touch()
        self._drop_logs_of_a_day_before()
        if user is None:
            return
        account = pwd.getpwnam(user)
        for path in (
            self.layout.postgres,
            self.layout.postgres_socket_dir,
            self.layout.postgres_log,
            log_dir,
        ):
            os.chown(path, account.pw_uid, account.pw_gid)
        if self.layout.postgres_data.exists():
            os.chown(self.layout.postgres_data, account.pw_uid, account.pw_gid)
        # The server user must be able to walk down to .driftloop/postgres (e.g. inside a mktemp -d
        # checkout) and to logs/postgres.log, which pg_ctl -l opens as that user (logs/ is 0750 under a
        # umask of 027).
        for target in (self.layout.postgres, self.layout.postgres_log):
            for parent in target.parents:
                self._open_to(parent, user, account.pw_uid, target)

    def _server_logs(self) -> list[Path]:
        """The collector's files, oldest first."""
        found = []
        for path in self.layout.postgres_log_dir.glob(LOG_GLOB):
            with contextlib.suppress(OSError):
                found.append((path.stat().st_mtime, path))
        return [path for _, path in sorted(found)]

    def _drop_logs_of_a_day_before(self) -> None:
        """Remove the collector's files last written more than 23 hours ago: a server that had run meanwhile
        would have emptied them, and one started at their hour again would append to them instead."""
        now = time.time()
        for path in self._server_logs():
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > RING_SPAN_S:
                    path.unlink()

    def _start_logs(self) -> list[Path]:
        """Where a start says what went wrong: pg_ctl's -l file (what the server says before its collector
        runs: a port it cannot bind, a bad setting) and the collector's newest file (what it says after)."""
        return [self.layout.postgres_log, *self._server_logs()[-1:]]

    @staticmethod
    def _open_to(folder: Path, user: str, uid: int, target: Path) -> None:
        mode = folder.stat().st_mode
        if folder.stat().st_uid == uid or mode & stat.S_IXOTH:
            return
        say(f"letting the `{user}` user pass through {folder} (chmod o+x) to reach {target.name}")
        try:
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        except PermissionError as err:
            raise PermissionProblem(
                f"the `{user}` user cannot reach {target}: {folder} is closed to it.",
                hint=f"run `chmod o+x {folder}`, or set DRIFTLOOP_LOCAL_STATE_DIR to an open folder.",
            ) from err

    def _initdb(self, bin_dir: Path, user: str | None) -> None:
        say(f"creating the Postgres cluster in {self.layout.postgres_data} ...")
        command = [
            str(bin_dir / "initdb"), "-D", str(self.layout.postgres_data), "-U", ROLE, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        ]  # fmt: skip
        result = subprocess.run(self._as_user(command, user), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            shutil.rmtree(self.layout.postgres_data, ignore_errors=True)
            raise StartFailed(
                f"initdb failed:\n{text_tail(result.stdout + result.stderr)}",
                hint=f"check that {self.layout.postgres} is writable by {user or 'this user'}.",
            )

    def _server_options(self) -> str:
        socket_dir = str(self.layout.postgres_socket_dir)
        sockets = socket_dir if len(socket_dir) <= MAX_SOCKET_DIR else ""
        log_dir = shlex.quote(str(self.layout.postgres_log_dir))
        return (
            f"-p {self.settings.postgres_port} -k {shlex.quote(sockets)} {SERVER_OPTIONS} "
            f"-c log_directory={log_dir} {COLLECTOR_OPTIONS}"
        )

    def start(self) -> bool:
        """Start the cluster unless it runs (making it on first use); True if started now."""
        if self.running_pid() is not None:
            self._ensure_database()
            return False
        self.preflight()
        self._discard_half_made_cluster()
        bin_dir = self.bin_dir() or self._install()
        user = self._os_user()
        self._prepare_dirs(user)
        if self._cluster_version() is None:
            self._initdb(bin_dir, user)
        self._discard_stale_pid_file()
        say(f"starting Postgres {bin_dir.parent.name} on {self.address} ...")
        started = time.monotonic()
        since = log_sizes(self._start_logs())
        timeout = int(self.settings.ready_timeout_s)
        command = [
            str(bin_dir / "pg_ctl"), "start", "-w", "-t", str(timeout), "-D", str(self.layout.postgres_data),
            "-l", str(self.layout.postgres_log), "-o", self._server_options(),
        ]  # fmt: skip
        try:
            # Own session: the server must not receive the terminal's Ctrl-C meant for this command.
            result = subprocess.run(
                self._as_user(command, user),
                capture_output=True,
                text=True,
                start_new_session=True,
                check=False,
            )
            if result.returncode != 0:
                raise StartFailed(
                    f"Postgres did not start ({result.stdout.strip()} {result.stderr.strip()}). "
                    + log_tails(self._start_logs(), since),
                    hint="fix the cause shown above and run the command again.",
                )
            self._ensure_database()
        except BaseException:
            # pg_ctl launched the server: a timeout, a failure or Ctrl-C after that must not leave it running
            # (pg_ctl -t gives up waiting, not the server). It writes its pid file a moment after launch.
            with DeferredSignals("stopping the Postgres server that was starting"):
                wait_until(lambda: self.running_pid() is not None, timeout_s=3)
                self.stop()
            raise
        elapsed = time.monotonic() - started
        say(f"Postgres is ready on {self.address} (pid {self.running_pid()}, {elapsed:.1f}s)")
        return True

    def _ensure_database(self) -> None:
        admin_url = f"postgresql://{ROLE}@127.0.0.1:{self.settings.postgres_port}/postgres"

        async def create() -> None:
            deadline = time.monotonic() + self.settings.ready_timeout_s
            while True:
                try:
                    connection = await asyncpg.connect(admin_url, timeout=5)
                    break
                except (TimeoutError, OSError, asyncpg.PostgresError):
                    if time.monotonic() >= deadline:
                        raise
                    await asyncio.sleep(0.25)
            try:
                if not await connection.fetchval("select 1 from pg_database where datname = $1", DATABASE):
                    await connection.execute(f'create database "{DATABASE}"')
            finally:
                await connection.close()

        try:
            run_async(create)
        except Exception as err:
            raise StartFailed(
                f"Postgres runs but the `{DATABASE}` database could not be reached or created: {err}",
                hint=f"see the server's log in {self.layout.postgres_log_dir}.",
            ) from err

    def stop(self) -> bool:
        """Stop the cluster with ``pg_ctl stop -m fast``; True if it was running."""
        pid = self.running_pid()
        if pid is None:
            return False
        say(f"stopping Postgres (pid {pid}) ...")
        bin_dir = self.bin_dir()
        user = self._os_user()
        if bin_dir is not None:
            data = str(self.layout.postgres_data)
            command = [str(bin_dir / "pg_ctl"), "stop", "-D", data, "-m", "fast", "-w"]
            # Own session: a second Ctrl-C at the terminal must not cut pg_ctl short.
            subprocess.run(
                self._as_user(command, user),
                capture_output=True,
                text=True,
                start_new_session=True,
                check=False,
            )
        if pid_alive(pid):
            # pg_ctl could not do it (binaries gone, timeout): SIGINT is the server's own "fast" shutdown.
            terminate(pid, timeout_s=30, first_signal=signal.SIGINT)
        return True

    def status(self) -> ComponentStatus:
        """Running or not, answering or not, and where."""
        pid = self.running_pid()
        version = self._cluster_version()
        detail = f"PostgreSQL {version}" if version else ""
        if pid is None:
            return ComponentStatus(self.name, "stopped", False, self.address, None, detail)
        ready = database_answers(self.url)
        return ComponentStatus(self.name, "ready" if ready else "not ready", ready, self.address, pid, detail)


class ExternalPostgres:
    """A database the user pointed us at with DRIFTLOOP_DATABASE_URL: used, never started or stopped."""

    name = "postgres"

    def __init__(self, url: str) -> None:
        self.url = url

    def status(self) -> ComponentStatus:
        """Whether the external database answers ``select 1``."""
        ready = database_answers(self.url)
        host = self.url.rsplit("@", 1)[-1]
        state = "ready" if ready else "unreachable"
        return ComponentStatus(self.name, state, ready, host, None, "external (DRIFTLOOP_DATABASE_URL)")
