"""The one settings loader: pydantic-settings, one env prefix per service, shared values under DRIFTLOOP_.

A service reads ``DRIFTLOOP_<SERVICE>_<FIELD>`` first and falls back to ``DRIFTLOOP_<FIELD>``, so the
broker and database URLs are set once for all services and still overridable per service.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ClassVar, Literal, TypedDict
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from contracts.envelope import DEFAULT_MAX_EVENT_BYTES
from libs.bus.core import RETRY_DELAY_MAX_S

MAX_EVENT_BYTES_LIMIT = 256 * 2**20
"""The largest ``max_event_bytes``. An event published in a transaction is one outbox row, which must fit in
one Postgres message (1 GB, the largest it takes) with its key and headers (``libs.bus.postgres``); and a
consumer's fetch may bring four times it (``consumer_options``), which Kafka's protocol carries as a 32-bit
integer: at 512 MiB, 2**31, every fetch failed to encode."""

SECONDS_MAX = 3_153_600_000.0
"""The longest wait a setting in seconds that is counted in dates takes: a hundred years (36,500 days, where
a retention's keep means for ever, ``libs.bus.retention.KEEP_FOR_EVER_DAYS``), far past any real use. Such a
wait is counted back from now (or forward from an event's time) into a date, which Python holds from year 1 to
9999 and Postgres from 4713 BC: monitoring's label wait of some 2,000 years put its cutoffs before year 1, and
every tick failed with OverflowError."""

INTERVAL_MAX_S = 86_400.0
"""The longest interval of a service's periodic work (a retention round, a safety-net poll, a flush, a tick, a
heartbeat): a day, far past any real use. Each is waited for on the event loop, which takes any float: 1e300
was accepted, and the work then never came again in the process's life (after the first round, for those that
run one at start)."""

POSTGRES_CONNECTIONS_MAX = 262_143
"""The largest connection pool a setting asks for: the most connections a Postgres server takes
(``max_connections`` is at most 2**18 - 1, its MAX_BACKENDS), so a larger pool could never fill. asyncpg makes
a slot for every connection of a pool's maximum as the pool is created, before it connects: two million took
8 s and 280 MB, a billion would take an hour and some 140 GB; this bound, a third of a second and 35 MB."""

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCAL_STATE = PROJECT_ROOT / ".driftloop"

# Values that mark a secret as "not chosen yet"; refused outside development.
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "password", "dev", "driftloop"})

# Words in a setting's name that mark its value as secret or able to hold one (a URL's password): such a
# value is never repeated in an error message, which may end up in a terminal log or a CI job's output.
SECRET_NAME_WORDS = ("key", "password", "secret", "token", "url", "dsn")

# A TCP port a service listens on (nothing here asks the system for an ephemeral one with 0).
Port = Annotated[int, Field(ge=1, le=65_535)]

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
"""The names of this machine a client on it calls a service by (`driftloop up` listens on 127.0.0.1)."""

COMPOSE_HOSTS = ("registry", "training", "validation", "serving", "monitoring", "audit")
"""docker-compose.yml's service names: what another container on the compose network calls a service by (the
healthchecks call 127.0.0.1 from inside the container)."""

DEV_ALLOWED_HOSTS = (*LOCAL_HOSTS, *COMPOSE_HOSTS)
"""The Host header names a service answers for outside prod, unless ``allowed_hosts`` says otherwise."""

_ALLOWED_HOST = re.compile(
    r"\*|(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]|[0-9]+(\.[0-9]+){3}/[0-9]+|\[[0-9a-f:.]+/[0-9]+\]"
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_network(entry: str, *, strict: bool = True) -> IPNetwork | None:
    """The IP network an ``allowed_hosts`` entry names (``10.0.0.0/8``, an IPv6 one in brackets as IPv6
    hosts are: ``[fd00::/8]``), or None for a host name or address. Strict, unless told otherwise: a network
    with host bits set (``10.0.0.1/8``) raises ValueError, as it most likely names a host that was not meant
    to stand for its whole network."""
    if "/" not in entry:
        return None
    if entry.startswith("[") and entry.endswith("]"):
        return ipaddress.IPv6Network(entry[1:-1], strict=strict)
    return ipaddress.IPv4Network(entry, strict=strict)


def _a_network_if_one(entry: str) -> None:
    """Refuses an ``allowed_hosts`` entry written as a network that is none, saying why."""
    try:
        network = allowed_network(entry, strict=False)
    except ValueError:
        raise ValueError(
            f"{entry!r} is not an IP network: write an IPv4 one as 10.0.0.0/8 (a prefix of 0 to 32), an IPv6 "
            "one in brackets as [fd00::/8] (0 to 128)"
        ) from None
    if network is None:
        return
    try:
        allowed_network(entry)
    except ValueError:
        written = f"[{network}]" if entry.startswith("[") else str(network)
        raise ValueError(
            f"{entry!r} has host bits set: write a network with its first address ({written}), or the "
            "address alone, without a prefix, for that one host"
        ) from None


class KafkaSettings(BaseSettings):
    """How to reach Kafka; TLS and SASL for a real cluster."""

    # No float setting means anything as nan or inf (a wait that never ends, a check that never holds).
    model_config = SettingsConfigDict(env_prefix="DRIFTLOOP_KAFKA_", extra="ignore", allow_inf_nan=False)

    bootstrap: str = Field("127.0.0.1:19092", description="Comma-separated bootstrap servers.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism when security_protocol is SASL_*."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password.")
    ssl_cafile: Path | None = Field(None, description="CA bundle for TLS to the brokers.")
    ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client key for mutual TLS.")
    max_event_bytes: int = Field(
        DEFAULT_MAX_EVENT_BYTES,
        ge=1,
        le=MAX_EVENT_BYTES_LIMIT,
        description="Events larger than this (value and headers) are dead-lettered; refused when published. "
        "1 to 268,435,456 (256 MiB): an event is one row of a service's outbox (Postgres takes at most 1 GB "
        "in one value or message), and a consumer's fetch takes four times it (at most 2 GiB in Kafka's "
        "protocol).",
    )
    fetch_max_wait_ms: int = Field(
        100,
        ge=1,
        le=30_000,
        description="How long the broker holds a consumer's fetch when its partitions have nothing new. "
        "aiokafka keeps one fetch per broker in flight and leaves out partitions whose records are still "
        "buffered, so while it holds a fetch for idle partitions the busy ones, once drained, wait for "
        "it: Kafka's 500 ms default capped a consumer of idle and busy topics at a few thousand records/s "
        "(docs/benchmarks.md, Audit).",
    )
    metadata_max_age_ms: int = Field(
        30_000,
        ge=1_000,
        le=300_000,
        description="How often a client refreshes the cluster's metadata even when nothing failed. A "
        "consumer whose topic was deleted and created again (an operator's reset) resumes reading it only "
        "once it sees the topic again: Kafka's default of 5 minutes left it idle that long.",
    )
    topic_prefix: str = Field(
        "",
        pattern=r"^[a-z0-9._-]*$",
        description="Prefix of every topic name on the cluster, so platforms (or test runs) can share one.",
    )

    def physical(self, topic: str) -> str:
        """The topic's name on the cluster."""
        return self.topic_prefix + topic

    def logical(self, topic: str) -> str:
        """The topic's name in contracts.topics, from its name on the cluster."""
        return topic[len(self.topic_prefix) :] if topic.startswith(self.topic_prefix) else topic

    def client_options(self) -> dict[str, object]:
        """Keyword arguments shared by aiokafka producers, consumers and admin clients."""
        options: dict[str, object] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.security_protocol,
            "metadata_max_age_ms": self.metadata_max_age_ms,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        if self.security_protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        return options

    def consumer_options(self) -> dict[str, object]:
        """Keyword arguments of every aiokafka consumer: the client's, and how much a fetch may bring
        (room for the largest event) and how long the broker may hold it."""
        return {
            **self.client_options(),
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
            "max_partition_fetch_bytes": max(1_048_576, self.max_event_bytes * 2),
            "fetch_max_bytes": max(52_428_800, self.max_event_bytes * 4),
        }


class ConsumerLimits(TypedDict):
    """A subscription's limits from the settings (the fields of ``libs.bus.core.Subscription`` they set)."""

    max_retries: int
    retry_backoff_s: float
    max_uncertain_retries: int
    max_event_bytes: int


LOG_LEVELS = frozenset({"DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL", "NOTSET"})
"""The log levels Python's logging names itself (``logging.getLevelNamesMapping()`` on its own)."""


class ServiceSettings(BaseSettings):
    """Settings every service has. Subclasses set ``service`` and their own env prefix."""

    service: ClassVar[str] = "service"
    model_config = SettingsConfigDict(
        env_prefix="DRIFTLOOP_", extra="ignore", env_nested_delimiter="__", allow_inf_nan=False
    )

    env: Literal["dev", "test", "prod"] = Field(
        "dev", description="Deployment mode; prod refuses placeholders."
    )
    database_url: str = Field(
        "postgresql://driftloop@127.0.0.1:54329/driftloop",
        description="Postgres URL (asyncpg DSN): postgresql:// or postgres://, a host (or ?host= a socket "
        "folder), ports from 1 to 65535.",
    )
    db_pool_min: int = Field(
        1,
        ge=1,
        description="Minimum connections in the pool, 1 or more (the first is how a service waits "
        "for its database at start); at most db_pool_max.",
    )
    db_pool_max: int = Field(
        8,
        ge=1,
        le=POSTGRES_CONNECTIONS_MAX,
        description="Maximum connections in the pool, 1 to 262,143 (the most a Postgres server takes: "
        "asyncpg makes a slot for each as the pool is created, before it connects, and two million took 8 s "
        "and 280 MB of memory).",
    )
    kafka: KafkaSettings = Field(default_factory=lambda: KafkaSettings(), description="Kafka connection.")
    http_host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    http_port: Port = Field(8100, description="Port the HTTP API binds to (1 to 65535).")
    log_level: str = Field(
        "INFO",
        description="Log level, in any case: DEBUG, INFO, WARNING, ERROR or CRITICAL (or WARN, FATAL, NOTSET,"
        " as Python's logging names them); another name is refused when the settings load.",
    )
    log_json: bool = Field(True, description="JSON logs (true) or console-friendly logs (false).")
    artifacts_url: str = Field(
        str(LOCAL_STATE / "artifacts"), description="Content-addressed artifact store: folder or fsspec URL."
    )
    auth_tokens_file: Path = Field(
        LOCAL_STATE / "tokens.json", description="File with hashed bearer tokens and their roles."
    )
    consumer_max_retries: int = Field(
        3,
        ge=0,
        description="Retries of a failing handler before its event is dead-lettered (so 1 + this many "
        "attempts), 0 or more; the delay between them doubles from consumer_retry_backoff_s up to 5 s, so 20 "
        "retries wait about 80 s at the defaults. The partition waits meanwhile.",
    )
    consumer_retry_backoff_s: float = Field(
        0.2,
        gt=0,
        le=RETRY_DELAY_MAX_S,
        description="First retry delay, above 0 and at most 5 s (the outage retry loop waits this long "
        "first); doubles per attempt up to 5 s (until 2026-12-02 a failing handler's did not stop doubling: "
        "at 20 retries the last waited some 29 hours). 5 s is where the doubling stops (RETRY_DELAY_MAX_S, "
        "libs/bus/core.py), which did not hold the first delay: a larger one was accepted and the first "
        "retry, of a handler's failure or an outage, waited that long with the partition held (at 1e9, 31 "
        "years).",
    )
    consumer_max_uncertain_retries: int = Field(
        20,
        ge=0,
        description="Retries of a handler that keeps raising an OSError or a timeout not known to be an "
        "outage (it may be the handler's own; a statement timeout, SQLSTATE 57014, included), with the "
        "outage's delay (doubling up to 5 s: about 80 s at the defaults), before its event is dead-lettered; "
        "0 or more. An outage is retried without limit.",
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1, description="HTTP request bodies above this get 413; 1 or more."
    )
    outbox_keep_sent_days: float = Field(
        7.0,
        ge=0,
        description="Days an outbox row is kept once it is sent, counted from when it was written; 0 (or "
        "36500, a hundred years, or more) keeps sent rows for ever. Nothing reads a sent row (the relay "
        "reads unsent ones, which are never deleted): they are only there to look at.",
    )
    inbox_retention: Literal["topics", "forever"] = Field(
        "topics",
        description="topics: an inbox row is deleted once its event can no longer be delivered again, twice "
        "its type's topic retention (contracts/topics.py) plus a day after it was handled; rows of types on "
        "topics kept for ever, of unknown types or without a type stay. forever: every row stays (a cluster "
        "whose topics keep records longer than contracts/topics.py says, or whose segment.ms is longer "
        "than a topic's retention).",
    )
    bus_retention_interval_s: float = Field(
        600.0,
        gt=0,
        le=INTERVAL_MAX_S,
        description="Seconds between two rounds of the bus's retention (inbox and outbox), above 0 and at "
        "most 86,400 (a day: 1e300 was accepted, and no round came after the first); the first round runs as "
        "the service starts. A failed round is logged and counted, and tried again at the next.",
    )
    http_max_connections: int = Field(
        1000,
        ge=1,
        description="HTTP connections a service process holds at once, 1 or more; one more is answered 503 "
        "(Retry-After: 1) and closed as it is accepted, and a request gets 503 while this many are being "
        "answered. Lowered at start, with a warning, to the process's open-files limit (ulimit -n) less 640 "
        "(256 for the database pools, Kafka and files, 384 for connections accepted in a burst before they "
        "are refused): past that limit every connection and file the service opens fails, its database's "
        "and Kafka's too.",
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long a client may take to send a request's line and headers, above 0: counted from "
        "the connection's opening for its first request, from the request's first byte for a later one. "
        "Past it the server answers 408 and closes the connection; a connection that sent nothing is closed "
        "without an answer. (Between requests a connection may stay idle 75 s.)",
    )
    http_body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long a request body may take to arrive once its headers have, above 0, plus one "
        "second for every http_body_min_bytes_per_s bytes received (and the time the headers did not use): a "
        "client that sends that fast is never cut off, one that sends a byte every few seconds gets 408 and "
        "the connection closed.",
    )
    http_body_min_bytes_per_s: int = Field(
        1000,
        ge=1,
        le=10**12,
        description="The rate of body that earns a request one more second (http_body_timeout_s), 1 to "
        "1,000,000,000,000 (a terabyte a second, faster than any link: past it a body's time is "
        "http_body_timeout_s alone either way; the server divides by it, and past about 1.8e308 that "
        "stopped it at start with OverflowError).",
    )
    http_send_timeout_s: float = Field(
        60.0,
        gt=0,
        description="How long a client may leave its answer unread (the server's send buffer full, nothing "
        "taken from it) before its connection is dropped, above 0. Without it a client that never reads "
        "held the unread answer in memory, or a streaming answer's task, for ever.",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="The host names the HTTP API answers for, as a request's Host header names them (any "
        "port); a request naming another gets 421, the health, readiness and metrics routes included. `*` "
        "is any host, `*.example.com` any name under example.com; an IPv6 address is written in brackets "
        "(`[::1]`). An IP network in CIDR form, `10.0.0.0/8`, an IPv6 one in brackets `[fd00::/8]` (its "
        "first address: `10.0.0.1/8` is refused; `0.0.0.0/0` is any IPv4 address), answers a Host that is "
        "an address of its version inside it, such as a pod's IP that probes and Prometheus call it by; "
        '`[::ffff:10.1.2.3]` is an IPv6 address, not inside `10.0.0.0/8`. Unset: in prod any host (`["*"]`:'
        " behind an ingress or a proxy, which sets Host); in dev and test localhost, 127.0.0.1, [::1] and "
        "docker-compose.yml's service names (registry, training, validation, serving, monitoring, audit). "
        "There the dev-* tokens work, and a web page the developer opens could otherwise call the services:"
        " its own name made to resolve to 127.0.0.1 (DNS rebinding), the browser sends it the requests as "
        "the page's own, with that name as their Host.",
    )
    http_max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="A request line and headers larger than this get 431 and the connection closed, 1,024 or "
        "more. Counted as each read of the socket (at most 256 KiB) is parsed, so a head may pass it by up "
        "to two reads: the one it begins in and the one it ends in. uvicorn's parser has no limit of its "
        "own.",
    )

    def consumer_limits(self) -> ConsumerLimits:
        """The retry and size limits every subscription of the service takes (``Subscription(**...)``)."""
        return ConsumerLimits(
            max_retries=self.consumer_max_retries,
            retry_backoff_s=self.consumer_retry_backoff_s,
            max_uncertain_retries=self.consumer_max_uncertain_retries,
            max_event_bytes=self.kafka.max_event_bytes,
        )

    def trusted_hosts(self) -> tuple[str, ...] | None:
        """The host names the HTTP API answers for (``allowed_hosts`` or the mode's default), None for any."""
        hosts = self.allowed_hosts
        if hosts is None:
            hosts = ["*"] if self.env == "prod" else list(DEV_ALLOWED_HOSTS)
        return None if "*" in hosts else tuple(hosts)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        service_env = EnvSettingsSource(
            settings_cls, env_prefix=f"DRIFTLOOP_{cls.service.upper()}_", env_nested_delimiter="__"
        )
        return (init_settings, service_env, env_settings, file_secret_settings)

    @property
    def db_schema(self) -> str:
        """The Postgres schema this service owns."""
        return self.service

    @field_validator("database_url")
    @classmethod
    def _a_postgres_url(cls, url: str) -> str:
        # The message never repeats the URL: it may hold a password.
        check_database_url(url)
        return url

    @field_validator("log_level")
    @classmethod
    def _a_log_level(cls, level: str) -> str:
        # Checked here, not when the logging is set up: an unknown name (verbose, trace) passed the settings
        # and stopped the service at its first line with a traceback, again at every restart.
        # Python's own names, not getLevelNamesMapping(): that holds whatever a library imported before
        # registered too (TRACE, under pytest), so whether a name passed hung on the order of imports.
        name = level.upper()
        if name not in LOG_LEVELS:
            raise ValueError("it must be one of DEBUG, INFO, WARNING, ERROR or CRITICAL (in any case)")
        return name

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _a_list(cls, hosts: object) -> object:
        # pydantic-settings passes a value that is not JSON on as text ("localhost,api.example.com").
        if isinstance(hosts, str):
            raise ValueError('it must be a JSON list, e.g. ["localhost", "api.example.com"]')
        return hosts

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, hosts: list[str] | None) -> list[str] | None:
        if hosts is None:
            return None
        if not hosts:
            raise ValueError('name at least one host, or ["*"] for any (unset: the mode\'s default)')
        named = [host.strip().lower() for host in hosts]
        for host in named:
            if _ALLOWED_HOST.fullmatch(host) is None:
                raise ValueError(
                    f"{host!r} is not a host name: write a name (localhost, api.example.com), *.example.com "
                    "for the names under it, * for any, an IPv4 address or network (10.1.2.3, 10.0.0.0/8), "
                    "or an IPv6 address or network in brackets ([::1], [fd00::/8]); no scheme, port or path "
                    "(any port is answered)"
                )
            _a_network_if_one(host)
        return named

    @model_validator(mode="after")
    def _pool_min_within_max(self) -> ServiceSettings:
        if self.db_pool_min > self.db_pool_max:
            raise ValueError(
                f"DRIFTLOOP_DB_POOL_MIN ({self.db_pool_min}) is above DRIFTLOOP_DB_POOL_MAX "
                f"({self.db_pool_max}): the pool cannot hold more connections than its maximum"
            )
        return self

    @model_validator(mode="after")
    def _refuse_placeholders_outside_dev(self) -> ServiceSettings:
        if self.env == "prod":
            for name, value in self._secrets().items():
                if value is None or value.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
                    raise ValueError(
                        f"{name} is unset or a placeholder; set a real secret for DRIFTLOOP_ENV=prod"
                    )
        return self

    def _secrets(self) -> dict[str, SecretStr | None]:
        """Secrets that must be real outside dev; subclasses add theirs."""
        secrets: dict[str, SecretStr | None] = {}
        if self.kafka.security_protocol.startswith("SASL"):
            secrets["DRIFTLOOP_KAFKA_SASL_PASSWORD"] = self.kafka.sasl_password
        # The database password asyncpg will connect with, wherever it is given: none at all is fine (a
        # passfile, a client certificate), the compose file's is not.
        given = database_password(self.database_url)
        if given is not None:
            source, password = given
            secrets[source] = SecretStr(password)
        return secrets


def database_password(url: str) -> tuple[str, str] | None:
    """The password asyncpg connects with for ``url``, and where it is given: None when neither the URL nor
    PGPASSWORD gives one (asyncpg then reads a passfile, or the server asks for none: a client certificate).

    asyncpg's order (``asyncpg.connect_utils._parse_connect_dsn_and_args``): the URL's user info, then its
    last ``?password=``, then PGPASSWORD; an empty one in the URL counts as none. Checking the user info
    alone let ``postgresql://user@host/db?password=driftloop``, or PGPASSWORD set to the compose file's
    password, start in prod. A service file (``?service=``, PGSERVICE), which asyncpg reads between the
    URL and PGPASSWORD, is not read here: a placeholder PGPASSWORD is refused even beside one."""
    parts = urlsplit(url)
    # asyncpg ends the user info at the first "@" (urllib at the last).
    userinfo, at, _ = parts.netloc.partition("@")
    password = userinfo.partition(":")[2] if at else ""
    if password:
        return "the password in DRIFTLOOP_DATABASE_URL", unquote(password)
    # parse_qs drops an empty ?password=, as it does for asyncpg, which parses the query with it.
    in_query = parse_qs(parts.query).get("password")
    if in_query:
        return "the ?password= of DRIFTLOOP_DATABASE_URL", in_query[-1]
    # An empty PGPASSWORD is none either: Postgres gives no role an empty password.
    from_environment = os.environ.get("PGPASSWORD")
    if from_environment:
        return "PGPASSWORD (the database password when DRIFTLOOP_DATABASE_URL gives none)", from_environment
    return None


def check_database_url(url: str) -> None:
    """A ValueError unless ``url`` is a Postgres URL asyncpg can connect with: its scheme, a host (in the
    URL or as ?host=, e.g. a socket folder) and ports from 1 to 65535. Says what is wrong, never the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("it must be a postgresql:// URL, e.g. postgresql://user:password@host:5432/database")
    query = parse_qs(parts.query)
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts and "host" not in query:
        raise ValueError("it names no host: postgresql://user@host:5432/database, or ?host= a socket folder")
    ports = [host.rpartition("]")[2].partition(":")[2] for host in hosts.split(",")]
    ports += [port for value in query.get("port", []) for port in value.split(",")]
    for port in filter(None, ports):
        if not (port.isdigit() and 1 <= int(port) <= 65_535):
            raise ValueError(f"its port {port!r} is not a number from 1 to 65535")


def settings_problems(err: ValidationError | SettingsError) -> list[str]:
    """What a settings class refused, one line per value: the environment variable it came from and why.

    A secret's value is never shown, nor the input of a check across settings (every setting, secrets
    included); such a check's message names its variables itself."""
    if isinstance(err, SettingsError):
        # pydantic-settings names only the field: 'error parsing value for field "topics" from source ...'.
        named = re.search(r'field "([^"]+)"', str(err))
        field = named.group(1) if named else ""
        variable = _variable(field, lambda held: not _is_json(held))
        shown = _shown(field, os.environ.get(variable))
        return [f'{variable}{shown} is not valid: it must be a JSON list, e.g. ["a", "b"]']
    lines = []
    for problem in err.errors():
        message = problem["msg"].removeprefix("Value error, ")
        names = [part for part in problem["loc"] if isinstance(part, str)]
        if not names:
            lines.append(message)
            continue
        field, value = names[-1], problem.get("input")
        variable = _variable(field, str(value).__eq__)
        lines.append(f"{variable}{_shown(field, value)} is not valid: {message}")
    return lines


def _variable(field: str, holds: Callable[[str], bool]) -> str:
    """The DRIFTLOOP_* variable a field's value came from: one whose name ends in the field's and whose
    value ``holds`` accepts."""
    return next(
        (
            name
            for name, held in sorted(os.environ.items())
            if name.startswith("DRIFTLOOP_") and name.lower().endswith(f"_{field}") and holds(held)
        ),
        f"the setting `{field}`",
    )


def _shown(field: str, value: object) -> str:
    """``=<value>`` for a message, or nothing when the field's value is (or may hold) a secret."""
    if value is None or isinstance(value, SecretStr) or any(w in field.lower() for w in SECRET_NAME_WORDS):
        return ""
    return f"={value!r}"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
