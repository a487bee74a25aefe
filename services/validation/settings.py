"""Settings of the validation service (env prefix DRIFTLOOP_VALIDATION_, falling back to DRIFTLOOP_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from libs.settings import Port, ServiceSettings

LATENCY_BATCH_ROWS_MAX = 1_000_000
"""The largest ``latency_batch_rows``: the batch is made in memory, the holdout's rows repeated to fill it,
and predicted ``latency_repeats`` times; a million rows of a wide holdout is already GBs. At 10**12 every
validation of a holdout with fewer rows failed with MemoryError as the batch was made."""


class ValidationSettings(ServiceSettings):
    """Settings of validation: its schema and consumer group, how latency is measured, and how many slices
    are checked."""

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
        le=LATENCY_BATCH_ROWS_MAX,
        description="Rows per timed prediction batch (the holdout's first rows, repeated to fill the batch "
        "when the holdout has fewer), 1 to 1,000,000: the batch is made in memory, and at 10**12 every "
        "validation of a smaller holdout failed with MemoryError as it was made.",
    )
    max_slice_levels: int = Field(
        10_000,
        ge=1,
        description="Levels of the slice feature checked one by one, those with the most rows (ties in the "
        "levels' text order); the holdout's other levels are summed up in one check, reported, not judged. "
        "Without a bound a feature of a million levels (an id, a postcode) made a report larger than "
        "Postgres stores, and its registration was dead-lettered.",
    )

    @property
    def db_schema(self) -> str:
        """The Postgres schema validation owns (configurable, so test runs stay apart)."""
        return self.database_schema
