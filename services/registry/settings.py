"""Settings of the registry (env prefix DRIFTLOOP_REGISTRY_, falling back to DRIFTLOOP_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from libs.settings import POSTGRES_CONNECTIONS_MAX, Port, ServiceSettings

MIB = 1024 * 1024

UPLOAD_BYTES_MAX = 2**40
"""The largest ``max_upload_bytes``, a terabyte: an upload is held in memory whole and decoded into a table
there, so this is far past any machine's use. The limit is read with one byte more (to see a file over it),
which past 2**63 - 2 no C read takes: every upload failed with a 500."""


class RegistrySettings(ServiceSettings):
    """Settings of the registry (env prefix DRIFTLOOP_REGISTRY_, falling back to DRIFTLOOP_)."""

    service: ClassVar[str] = "registry"

    http_port: Port = Field(8101, description="Port of the registry's HTTP API (1 to 65535).")
    consumer_group: str = Field(
        "registry", description="Kafka consumer group of the registry's event handlers (and its inbox name)."
    )
    max_upload_bytes: int = Field(
        64 * MIB,
        ge=1,
        le=UPLOAD_BYTES_MAX,
        description="Dataset uploads whose file is larger than this get 413; 1 to 1,099,511,627,776 (a "
        "terabyte, far past any real use: an upload is held in memory whole; past 2**63 - 2 every upload "
        "failed with a 500).",
    )
    max_request_bytes: int = Field(
        65 * MIB,
        ge=1,
        description="HTTP request bodies above this get 413; raised to max_upload_bytes + 1 MiB when lower, "
        "so the upload limit is the one that speaks.",
    )
    read_pool_max: int = Field(
        4,
        ge=1,
        le=POSTGRES_CONNECTIONS_MAX,
        description="Connections of the HTTP API's read pool (besides db_pool_max), 1 to 262,143 (the most a "
        "Postgres server takes; asyncpg makes a slot for each as the pool is created).",
    )
    max_dataset_columns: int = Field(2000, ge=1, description="Dataset uploads with more columns get 422.")
    max_dataset_rows: int = Field(
        5_000_000, ge=1, description="Dataset uploads with more rows get 413 (Parquet: before decoding)."
    )
    max_dataset_cells: int = Field(
        10_000_000,
        ge=1,
        description="Dataset uploads with more values (rows x columns) get 413, Parquet before decoding. "
        "This bounds an upload's memory: a Parquet file compresses without bound (20 million equal integers "
        "fit in 91 KB), and 10 million values, about what a 64 MiB CSV of numbers holds, take some 300 MB to "
        "read and canonicalise.",
    )
    max_dataset_text_bytes: int = Field(
        64 * MIB,
        ge=1,
        description="Parquet dataset uploads whose text columns hold more bytes of text, decoded, get 413: "
        "checked from the footer before any page is read, from a dictionary's indices before its values "
        "are decoded, and counted as they are. Rows and values do not bound the length of a value (two "
        "strings of 300 MB compress to 9.6 KB); the default is the most text a CSV upload can hold "
        "(max_upload_bytes).",
    )

    @model_validator(mode="after")
    def _body_limit_covers_uploads(self) -> RegistrySettings:
        if self.max_request_bytes < self.max_upload_bytes + MIB:
            self.max_request_bytes = self.max_upload_bytes + MIB
        return self
