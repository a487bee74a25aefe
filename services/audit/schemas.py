"""HTTP schemas of the audit API (not Kafka events: these are what people and client programs read)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts.audit import AuditCheckpoint


class AuditEventPublic(BaseModel):
    """One trail row; every field comes from the row's hashed record."""

    model_config = ConfigDict(extra="forbid")

    seq: int = Field(description="Position in the trail (1, 2, 3, ... without gaps).")
    row_hash: str | None = Field(
        description="The row's chain hash, lowercase hex (null: nulled in the database)."
    )
    recorded_at: str | None = Field(
        description="When the audit service stored it (UTC); null when `unreadable`."
    )
    kind: str | None = Field(description="`event`, `undecodable` or `dead-letter`; null when `unreadable`.")
    topic: str | None = Field(description="Kafka topic it was read from; null when `unreadable`.")
    partition: int | None = Field(description="Kafka partition; null when `unreadable`.")
    offset: int | None = Field(description="Kafka offset; null when `unreadable`.")
    reuse: int | None = Field(
        default=None,
        description="Set only when other records were read at the same Kafka position before this one (its "
        "topic was deleted and created again, or its log truncated): how many. The trail keeps each of them.",
    )
    key: Any = Field(description="Kafka key (the model name on model topics).")
    id: str | None = Field(description="CloudEvents id.")
    type: str | None = Field(description="CloudEvents type, e.g. `io.driftloop.DriftDetected.v1`.")
    source: str | None = Field(description="CloudEvents source.")
    subject: str | None = Field(description="CloudEvents subject: the model name.")
    time: str | None = Field(description="CloudEvents time, as sent.")
    correlationid: str | None = Field(description="Id of the cascade's root event.")
    causationid: str | None = Field(description="Id of the event that caused this one.")
    actor: str | None = Field(description="Who asked, for manual commands.")
    data: Any = Field(
        description="The payload, when it is JSON nested at most 128 levels deep (else it is in `value`); "
        "null when `data_withheld` is set."
    )
    data_withheld: str | None = Field(
        default=None,
        description="Set only on a traffic event (a prediction's inputs and outputs, a label: read from "
        "mlops.predictions or mlops.feedback, or a dead letter of one) shown to a caller without the auditor "
        "role: why `data` and `value` are null. Every other field, the hashes included, is as recorded.",
    )
    error: dict[str, str] | None = Field(description="Why the record is not a valid event (reason, detail).")
    headers: dict[str, Any] | None = Field(
        default=None, description="All Kafka headers, for undecodable records and dead letters."
    )
    value: Any = Field(
        default=None,
        description="The value when it is not JSON, or JSON nested deeper than 128 levels: text or {base64}.",
    )
    integrity: str | None = Field(
        default=None, description="Set when the row's indexed columns disagree with its hashed record."
    )
    unreadable: str | None = Field(
        default=None,
        description="Set when the row's record cannot be read (nulled or replaced in the database): why. "
        "Every field a record gives is then null, never taken from the indexed copies.",
    )


class AuditEventPage(BaseModel):
    """One page of events."""

    events: list[AuditEventPublic] = Field(description="The events, in the order asked for.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class TraceEventPublic(AuditEventPublic):
    """An event of a cascade, with why it has no parent in the tree when its causationid names one."""

    cause_missing: str | None = Field(
        default=None, description="The causationid, when that event is not in this cascade's trail."
    )
    cause_cycle: str | None = Field(
        default=None,
        description="The causationid, when following causes from this event leads back to it (a loop of "
        "causationid links, or an event caused by itself): the loop is cut here, at its earliest event.",
    )


class TraceNodePublic(TraceEventPublic):
    """An event of a cascade, with the dead letters that carry it and the events it caused."""

    dead_letters: list[AuditEventPublic] = Field(description="Dead letters of this event.")
    children: list[TraceNodePublic] = Field(description="Events this event directly caused, in order.")


class FlatTraceNodePublic(TraceEventPublic):
    """An event of a very deep cascade, naming its parent instead of nesting."""

    parent: str | None = Field(description="Id of the causing event (null for a root).")
    dead_letters: list[AuditEventPublic] = Field(description="Dead letters of this event.")


class TracePublic(BaseModel):
    """The causal tree of one correlation id: drift -> retrain -> ... -> promotion or rollback."""

    correlation_id: str = Field(description="The cascade.")
    events: int = Field(description="Events in the tree.")
    truncated: bool = Field(
        description="True when the cascade has more events than the trace holds: more than "
        "trace_max_events, or more than about trace_max_bytes of records."
    )
    truncated_by: Literal["trace_max_events", "trace_max_bytes"] | None = Field(
        description="The bound that cut the trace (null when it is whole): the setting's name."
    )
    truncated_reason: str | None = Field(
        description="Why the trace was cut, and how to read the rest (null when it is whole)."
    )
    dead_letters: list[AuditEventPublic] = Field(description="Dead letters whose event is not in the tree.")
    roots: list[TraceNodePublic] | None = Field(
        default=None, description="Root events with their descendants."
    )
    flat: list[FlatTraceNodePublic] | None = Field(
        default=None, description="Instead of roots, for cascades nested deeper than 100 levels."
    )


class VerifyPublic(BaseModel):
    """The outcome of a verification: OK, or the first bad sequence number and why."""

    ok: bool = Field(description="True when nothing is wrong.")
    mode: str = Field(
        description="`fast` (the database hashes records) or `full` (hashed here, columns too)."
    )
    from_seq: int = Field(description="First row verified.")
    to_seq: int = Field(description="Last row that should exist.")
    rows_checked: int = Field(description="Rows found good.")
    checkpoints_checked: int = Field(description="Signed checkpoints compared with the trail.")
    covered_by_checkpoint: int = Field(
        description="Rows up to here are vouched for by a good checkpoint of the range (0: none was)."
    )
    head_hash: str | None = Field(
        description="When everything is good, the row hash of `to_seq`, lowercase hex: 64 zeros for an empty "
        "trail (as `GET /v1/head` shows it), the hash of the row it trusts for the empty range from one past "
        "the end; null when something is wrong."
    )
    first_bad_seq: int | None = Field(description="The first sequence number found bad.")
    problem: str | None = Field(
        description="missing-row, hash-mismatch, malformed-row, column-mismatch, truncated, rewritten or "
        "bad-checkpoint."
    )
    detail: str | None = Field(description="What exactly is wrong.")
    exact: bool = Field(
        description="False when first_bad_seq is only the start of the range the change is in."
    )
    seals_checked: bool = Field(description="Whether the per-row seals (signing key needed) were checked.")
    elapsed_s: float = Field(description="How long it took.")
    rows_per_s: int = Field(description="Rows verified per second.")


class SigningKeyPublic(BaseModel):
    """A public key checkpoints are verified with."""

    key_id: str = Field(description="First 16 hex digits of SHA-256 of the raw public key.")
    algorithm: str = Field(description="Always `ed25519`.")
    public_key: str = Field(description="Raw 32-byte public key, base64.")
    current: bool = Field(description="True for the key that signs new checkpoints.")


class HeadPublic(BaseModel):
    """The end of the trail and its newest checkpoint."""

    seq: int = Field(description="Last sequence number (0: empty).")
    row_hash: str | None = Field(
        description="Its row hash (64 zeros when empty; null when it was nulled in the database)."
    )
    last_checkpoint: AuditCheckpoint | None = Field(description="The newest signed checkpoint.")


class CheckpointPage(BaseModel):
    """Newest signed checkpoints first."""

    checkpoints: list[AuditCheckpoint] = Field(description="Checkpoints, newest first.")


def trace_model_rebuild() -> None:
    """Resolve the recursive trace schema (pydantic needs the finished class)."""
    TraceNodePublic.model_rebuild()
    TracePublic.model_rebuild()


trace_model_rebuild()
