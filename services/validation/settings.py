"""Settings of the validation service (env prefix DRIFTLOOP_VALIDATION_, falling back to DRIFTLOOP_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from libs.settings import Port, ServiceSettings


class ValidationSettings(ServiceSettings):
    """Settings of validation: its schema and consumer group, and how latency is measured."""

    service: ClassVar[str] = "validation"

    http_port: Port = Field(8103, description="Port of the validation HTTP API (1 to 65535).")
    database_schema: str = Field(
        "validation",
        description="Postgres schema validation owns; tests give each run its own so parallel runs never "
        "meet.",
    )
    consumer_group: str = Field(
        "validation", description="Kafka consumer group: one replica of the group handles each event."
    )
    latency_repeats: int = Field(
        7,
        ge=1,
        description="Timed prediction runs per latency check; the median counts, so a busy moment on a "
        "shared machine does not fail a fast model.",
    )
    latency_batch_rows: int = Field(
        1000,
        ge=1,
        description="Rows per timed prediction batch (the holdout's first rows, repeated to fill the batch "
        "when the holdout has fewer).",
    )

    @property
    def db_schema(self) -> str:
        """The Postgres schema validation owns (configurable, so test runs stay apart)."""
        return self.database_schema
