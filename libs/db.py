"""The one database helper: an asyncpg pool bound to a service's schema, and SQL migrations.

Each service owns one schema. Its pool sets ``search_path`` to that schema, so SQL in a service never
names its schema and can never reach another service's tables by accident. Migrations are plain SQL
files applied in name order at start, each recorded with its sha256 so an edited, already-applied
migration is refused instead of silently diverging.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from libs.errors import Outage
from libs.logging import get_logger

log = get_logger(__name__)

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class DatabaseUnreachable(Outage):
    """A new connection to Postgres could not be made: whatever the socket said (refused, a unix socket that
    is gone while the server restarts, a name that does not resolve yet, a timeout), the database is away."""


class MigrationError(RuntimeError):
    """A migration could not be applied, or an applied one was edited afterwards."""


@dataclass(frozen=True)
class Migration:
    """One SQL file to apply: ``id`` is ``<source>/<file name>``."""

    id: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations_in(folder: Path, *, source: str) -> list[Migration]:
    """The ``*.sql`` files of a folder, in name order."""
    return [Migration(f"{source}/{p.name}", p.read_text()) for p in sorted(folder.glob("*.sql"))]


def check_schema_name(schema: str) -> str:
    """Schema names are interpolated into SQL, so only plain identifiers are allowed."""
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"schema name {schema!r} must be a lower-case identifier")
    return schema


CHANNEL_MAX_BYTES = 63
"""The longest NOTIFY channel Postgres takes (NAMEDATALEN - 1): ``pg_notify`` refuses a longer one ("channel
name too long") and ``LISTEN`` cuts it to this length, so the two would never meet."""


def notify_channel(prefix: str, schema: str) -> str:
    """The NOTIFY channel ``prefix`` + ``schema``, within :data:`CHANNEL_MAX_BYTES`: as it reads when it fits;
    a longer one (a schema name of up to 63 characters is valid) keeps the start of the schema's name and
    ends in a hash of the whole of it, so two schemas never share a channel and nothing a service saves fails
    for its schema's name."""
    channel = prefix + check_schema_name(schema)
    if len(channel) <= CHANNEL_MAX_BYTES:
        return channel
    digest = hashlib.blake2b(schema.encode(), digest_size=6).hexdigest()
    return f"{channel[: CHANNEL_MAX_BYTES - len(digest) - 1]}_{digest}"


def shown_dsn(dsn: str) -> str:
    """The DSN for a message or a log: its password, in the URL or in its query, replaced by ***."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hosts = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hosts}"
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


async def _init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
        )


async def _connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect``, its OSErrors and timeouts raised as :class:`DatabaseUnreachable`: connecting
    holds nothing of an event or a request, so a FileNotFoundError here (the server's unix socket, removed
    while it restarts) is an outage, where from a handler it would be the event's fault."""
    try:
        return await asyncpg.connect(*args, **kwargs)
    except ConnectionError:
        raise
    except OSError as exc:  # TimeoutError (asyncio's too) is one
        raise DatabaseUnreachable(f"cannot connect to the database: {type(exc).__name__}: {exc}") from exc


async def create_pool(
    dsn: str, *, schema: str, min_size: int = 1, max_size: int = 8, **kwargs: Any
) -> asyncpg.Pool:
    """A pool whose connections see the service's schema first; JSON columns map to Python values."""
    check_schema_name(schema)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        connect=_connect,
        server_settings={"search_path": f"{schema},public", "application_name": f"driftloop-{schema}"},
        **kwargs,
    )
    assert pool is not None
    return pool


async def database_time(conn: asyncpg.Connection) -> datetime:
    """Postgres' clock, for times that replicas on other hosts compare (a step's bake time, a cooldown): one
    clock for all, whatever each host's says. ``clock_timestamp()``, not ``now()``: the transaction may have
    waited on a lock for another replica's decision, or span several events of one poll."""
    return cast(datetime, await conn.fetchval("SELECT clock_timestamp()"))


def still_open(conn: asyncpg.Connection) -> bool:
    """Whether a connection taken from a pool (a LISTEN connection, held for long) is still open. When the
    server closes it (a Postgres restart, a failover, an idle session's timeout), asyncpg gives it back to its
    pool by itself, and the caller's handle then raises InterfaceError ("released back to the pool") on
    every call, ``is_closed()`` included: read as an error, that failed every later use of it for good."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


async def release_listener(
    pool: asyncpg.Pool, conn: asyncpg.Connection, channel: str, callback: Callable[..., Any]
) -> None:
    """Give a connection that LISTENs on ``channel`` back to ``pool``, whatever removing the listener does
    (the pool's reset drops listeners too): skipped after a removal that failed on a live connection, or never
    made for one the server closed (a Postgres restart), its slot was lost to the pool for good."""
    try:
        await conn.remove_listener(channel, callback)
    except Exception as exc:  # the connection may be gone with the database
        log.debug("listener removal failed", channel=channel, error=repr(exc))
    try:
        await pool.release(conn)
    except Exception as exc:
        log.debug("listener release failed", channel=channel, error=repr(exc))


class Listening:
    """A LISTEN on one channel, over a connection of a pool held for it, made again when the server closed
    that connection (a Postgres restart, a failover): :meth:`ensure` before each use, or every so often."""

    def __init__(self, pool: asyncpg.Pool, channel: str, callback: Callable[..., Any]) -> None:
        self.pool = pool
        self.channel = channel
        self.callback = callback
        self._conn: asyncpg.Connection | None = None

    async def ensure(self) -> bool:
        """Listen, if not listening already; True when it listens anew (notifications sent meanwhile were
        missed: the caller looks for what they would have said). Raises what the pool raises (Postgres
        away), listening on nothing until a later call succeeds."""
        if self._conn is not None and still_open(self._conn):
            return False
        await self.close()
        conn = await self.pool.acquire()
        try:
            await conn.add_listener(self.channel, self.callback)
        except BaseException:
            await release_listener(self.pool, conn, self.channel, self.callback)
            raise
        self._conn = conn
        return True

    async def close(self) -> None:
        """Stop listening and give the connection back."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await release_listener(self.pool, conn, self.channel, self.callback)


async def apply_migrations(pool: asyncpg.Pool, schema: str, migrations: Sequence[Migration]) -> list[str]:
    """Create the schema if needed and apply the migrations not yet recorded; returns the ids applied."""
    check_schema_name(schema)
    applied_now: list[str] = []
    async with pool.acquire() as conn, conn.transaction():
        # Several replicas may start at once; one applies, the others wait and find nothing to do.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"driftloop-migrate-{schema}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(f"SET LOCAL search_path TO {schema}, public")
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   id text PRIMARY KEY,
                   sha256 text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["id"]: r["sha256"] for r in await conn.fetch("SELECT id, sha256 FROM schema_migrations")}
        for m in migrations:
            if m.id in done:
                if done[m.id] != m.sha256:
                    raise MigrationError(
                        f"migration {m.id} was changed after it was applied to schema {schema}; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            try:
                await conn.execute(m.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {m.id} failed in schema {schema}: {exc}") from exc
            await conn.execute("INSERT INTO schema_migrations (id, sha256) VALUES ($1, $2)", m.id, m.sha256)
            applied_now.append(m.id)
    if applied_now:
        log.info("migrations applied", schema=schema, migrations=applied_now)
    return applied_now
