"""Settings of the audit service (env prefix DRIFTLOOP_AUDIT_, falling back to DRIFTLOOP_)."""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr, field_validator, model_validator

from contracts.topics import DEAD_LETTER, TOPICS
from libs.settings import INTERVAL_MAX_S, LOCAL_STATE, Port, ServiceSettings

_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
TRACE_EVENTS_MAX = 100_000
QUERY_EVENTS_MAX = 100_000
TRACE_BYTES_MAX = 256 * 1024 * 1024
QUERY_BYTES_MAX = 64 * 1024 * 1024


class AuditSettings(ServiceSettings):
    """Settings of the audit service (env prefix DRIFTLOOP_AUDIT_, falling back to DRIFTLOOP_)."""

    service: ClassVar[str] = "audit"

    http_port: Port = Field(8106, description="Port of the audit service's HTTP API (1 to 65535).")
    consumer_group: str = Field("audit", description="Kafka consumer group the trail is recorded by.")
    schema_name: str = Field(
        "audit", description="Postgres schema of the trail (tests use a fresh one per run)."
    )
    writer_role: str = Field(
        "driftloop_audit_writer",
        description="Database role every trail transaction switches to (SET LOCAL ROLE): it may SELECT and "
        "INSERT on the trail and its checkpoints, never UPDATE, DELETE or TRUNCATE. Created at start when "
        "absent (the connecting user needs CREATEROLE for that, or a DBA creates it beforehand).",
    )
    topics: list[str] = Field(
        default_factory=list,
        description="Topics to record. Empty: every audited topic of contracts/topics.py, plus the "
        "dead-letter topic when record_dead_letters is on, minus the predictions topic when "
        "record_predictions is off.",
    )
    record_predictions: bool = Field(
        True,
        description="Record the high-volume predictions topic too (batched). Off: the trail holds the "
        "control plane only.",
    )
    record_dead_letters: bool = Field(
        True,
        description="Record the dead-letter topic, so a message no service could handle is still on the "
        "record.",
    )
    signing_key: SecretStr | None = Field(
        None,
        description="Ed25519 private key of the checkpoints: the raw 32-byte seed, base64. Required in prod; "
        "in dev and test a key is generated into signing_key_file when neither is set.",
    )
    signing_key_file: Path = Field(
        LOCAL_STATE / "audit" / "signing.key",
        description="Where the dev/test signing key lives (base64 seed, mode 600); ignored when signing_key "
        "is set.",
    )
    trusted_public_keys: list[str] = Field(
        default_factory=list,
        description="Earlier signing keys' public keys (raw 32 bytes, base64), so checkpoints signed "
        "before a key rotation still verify, and the writer builds on the old key's final checkpoint "
        "(docs/audit.md, Which checkpoints the service trusts).",
    )
    checkpoint_every_rows: int = Field(
        10_000,
        ge=1,
        description="Sign a checkpoint once this many rows were appended since the last one the service "
        "trusts.",
    )
    look_ahead: bool = Field(
        False,
        description="While a poll's transaction is in flight, prepare the next poll's rows (when the "
        "consumer has it already). Pays only where this process and Postgres each have a core to "
        "themselves; it costs CPU per row (docs/benchmarks.md, Audit), so it is off by default.",
    )
    checkpoint_every_s: float = Field(
        60.0,
        gt=0,
        le=INTERVAL_MAX_S,
        description="Sign a checkpoint at least this often while rows keep arriving; at most 86,400 (a day: "
        "1e300 was accepted, and the timer never signed one).",
    )
    checkpoint_file: Path = Field(
        LOCAL_STATE / "audit" / "checkpoints.ndjson",
        description="Every checkpoint the service trusts is appended here too (one AuditCheckpoint JSON per "
        "line), so a copy lives outside the database.",
    )
    query_max_limit: int = Field(
        1000,
        ge=1,
        le=QUERY_EVENTS_MAX,
        description="Most events one query page may return (the `limit` a client may ask for: GET "
        "/v1/events, driftloop audit tail -n): the page holds them all at once, so this is at most 100,000.",
    )
    query_max_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024 * 1024,
        le=QUERY_BYTES_MAX,
        description="About how many bytes of records one query page reads (GET /v1/events, driftloop audit "
        "tail): the first event's whole, however large; a page its bytes end before `limit` events still has "
        "a next_cursor, right after its last event. Records can be near the broker's message size and a page "
        "holds them all at once, decoded, in the process that also writes the trail: 1 MiB to 64 MiB.",
    )
    trace_max_events: int = Field(
        10_000,
        ge=1,
        le=TRACE_EVENTS_MAX,
        description="Most events one causal trace returns (it says when it was cut): the trace holds them "
        "all at once, so this is at most 100,000.",
    )
    trace_max_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024 * 1024,
        le=TRACE_BYTES_MAX,
        description="About how many bytes of records one causal trace reads (the first event's whole, "
        "however large; it says when it was cut). Records can be near the broker's message size and the "
        "trace holds them all at once, decoded, in the process that also writes the trail: 1 MiB to 256 MiB.",
    )
    export_concurrency: int = Field(
        2,
        ge=1,
        description="Exports streamed at once (GET /v1/export); one more is a 429 with Retry-After. Each "
        "holds a database connection until its client has read it all, so this must stay below db_pool_max: "
        "slow readers must not take the connections the trail's writer needs.",
    )
    verify_concurrency: int = Field(
        1,
        ge=1,
        description="Verifications run at once (GET /v1/verify); one more is a 429 with Retry-After. Each "
        "holds verify_parallelism database connections until the chain is checked, so verify_concurrency x "
        "verify_parallelism must stay below db_pool_max (and with export_concurrency added, should): the "
        "trail's writer needs one.",
    )
    verify_parallelism: int = Field(
        3,
        ge=1,
        le=16,
        description="Sequence ranges verified at once, each on its own connection (the database hashes the "
        "records while this process chains them).",
    )

    @property
    def db_schema(self) -> str:
        """The Postgres schema the trail lives in."""
        return self.schema_name

    @field_validator("writer_role")
    @classmethod
    def _plain_role_name(cls, value: str) -> str:
        if not _ROLE_NAME.fullmatch(value):  # match() would let a trailing newline through
            raise ValueError("writer_role must be a lower-case SQL identifier")
        return value

    @model_validator(mode="after")
    def _exports_leave_connections(self) -> AuditSettings:
        if self.export_concurrency >= self.db_pool_max:
            raise ValueError(
                f"DRIFTLOOP_AUDIT_EXPORT_CONCURRENCY ({self.export_concurrency}) must be below "
                f"DRIFTLOOP_DB_POOL_MAX ({self.db_pool_max}): exports hold their connections while their "
                "clients read, and the trail's writer needs one"
            )
        held = self.verify_concurrency * self.verify_parallelism
        if held >= self.db_pool_max:
            raise ValueError(
                f"DRIFTLOOP_AUDIT_VERIFY_CONCURRENCY ({self.verify_concurrency}) x "
                f"DRIFTLOOP_AUDIT_VERIFY_PARALLELISM ({self.verify_parallelism}) = {held} must be below "
                f"DRIFTLOOP_DB_POOL_MAX ({self.db_pool_max}): verifications hold their connections while "
                "they run, and the trail's writer needs one"
            )
        return self

    @model_validator(mode="after")
    def _keys_decode(self) -> AuditSettings:
        if self.signing_key is not None and self.signing_key.get_secret_value().strip():
            decode_key(self.signing_key.get_secret_value(), "DRIFTLOOP_AUDIT_SIGNING_KEY")
        for i, key in enumerate(self.trusted_public_keys):
            decode_key(key, f"DRIFTLOOP_AUDIT_TRUSTED_PUBLIC_KEYS[{i}]")
        return self

    def _secrets(self) -> dict[str, SecretStr | None]:
        return {**super()._secrets(), "DRIFTLOOP_AUDIT_SIGNING_KEY": self.signing_key}

    def recorded_topics(self) -> list[str]:
        """The topics this service records, in topic-map order."""
        if self.topics:
            return list(self.topics)
        names = [
            name
            for name, spec in TOPICS.items()
            if spec.audited and (self.record_predictions or not spec.high_volume)
        ]
        if self.record_dead_letters:
            names.append(DEAD_LETTER)
        return names


def decode_key(text: str, name: str) -> bytes:
    """A 32-byte key from base64, or a ValueError naming the setting."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{name} is not base64: {exc}") from exc
    if len(raw) != 32:
        raise ValueError(f"{name} must be 32 bytes (an Ed25519 key), got {len(raw)}")
    return raw
