"""Audit events: signed checkpoints of the tamper-evident trail, for audit-log consumers outside the platform.

The audit service chains every event it stores (row hash = sha256(previous hash || canonical event)) and
periodically signs the head of the chain. A consumer that keeps the checkpoints can later prove that the
trail was neither altered nor truncated: recompute the chain up to ``sequence`` and compare the hash,
and verify the signature over :meth:`AuditCheckpoint.signing_input` with the public key ``key_id`` names.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import ClassVar, Literal

from pydantic import Field

from contracts.common import PG_BIGINT_MAX, Identifier, Sha256Hex, UtcDatetime
from contracts.envelope import EventPayload

TOPIC = "mlops.audit"

SIGNING_DOMAIN = b"driftloop-audit-checkpoint/v1"


class AuditCheckpoint(EventPayload):
    """The audit trail's head at a sequence number, signed with Ed25519."""

    event_name: ClassVar[str] = "AuditCheckpoint"
    topic: ClassVar[str] = TOPIC
    # Checkpoints are about the whole trail, not one model; the topic has one partition, so order holds.
    subject_field: ClassVar[str | None] = None

    sequence: int = Field(
        ge=0,
        le=PG_BIGINT_MAX,
        description="Sequence number of the last trail row covered.",
        examples=[184467],
    )
    head_hash: Sha256Hex = Field(
        description="Row hash of that row (lowercase hex): it commits to every row before it.",
        examples=["b441775b084d687bec4f2f6be95598a4cf2f017c7043262d359de00b0505d00d"],
    )
    row_count: int = Field(
        ge=0,
        le=PG_BIGINT_MAX,
        description="Rows in the trail up to and including `sequence`.",
        examples=[184467],
    )
    signed_at: UtcDatetime = Field(description="When the checkpoint was signed.")
    key_id: Identifier = Field(
        min_length=1,
        description="Names the signing key: the first 16 hex digits of sha256 of the raw Ed25519 public key.",
        examples=["73518d035cf770e1"],
    )
    algorithm: Literal["ed25519"] = Field(default="ed25519", description="Signature algorithm.")
    signature: str = Field(
        min_length=1,
        pattern=r"^[A-Za-z0-9+/]+={0,2}$",
        description="Base64 (standard alphabet, padded) Ed25519 signature over `signing_input()`.",
        examples=["XJ0ELWGcO+inJT8P5ck6B86hH5td+zb7/achqgnRPMsj5Ykl4WeK61uPXMxn2bdNA9o49VYJn+N/shcy+/GOCw=="],
    )

    def signing_input(self) -> bytes:
        """The exact bytes the signature covers (see :func:`checkpoint_signing_input`)."""
        return checkpoint_signing_input(self.sequence, self.head_hash, self.row_count, self.signed_at)


def checkpoint_signing_input(sequence: int, head_hash: str, row_count: int, signed_at: datetime) -> bytes:
    """The bytes a checkpoint signs: domain, sequence, head hash, row count and UTC time, one per line.

    A function rather than only a method because the signer needs these bytes before the (frozen)
    checkpoint, which requires its signature, can exist.
    """
    when = signed_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return b"\n".join(
        [SIGNING_DOMAIN, str(sequence).encode(), head_hash.encode(), str(row_count).encode(), when.encode()]
    )
