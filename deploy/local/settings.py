"""Where the local infrastructure lives and which ports it uses; DRIFTLOOP_LOCAL_* variables override."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.settings import Port

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class LocalInfraSettings(BaseSettings):
    """Ports, versions and limits of the local Kafka broker and Postgres cluster."""

    model_config = SettingsConfigDict(env_prefix="DRIFTLOOP_LOCAL_", extra="ignore")

    state_dir: Path | None = Field(
        default=None,
        description="Folder for jars, data, logs, pids and the platform (made if missing; not empty, not a "
        "file); defaults to .driftloop/ in the project root.",
    )
    kafka_version: str = Field(default="4.4.0", description="Apache Kafka release from Maven Central.")
    kafka_port: Port = Field(default=19092, description="Kafka client listener on 127.0.0.1 (1 to 65535).")
    kafka_controller_port: Port = Field(
        default=19093, description="KRaft controller listener on 127.0.0.1 (1 to 65535)."
    )
    kafka_heap: str = Field(default="768m", description="Maximum JVM heap of the broker (-Xmx).")
    postgres_port: Port = Field(
        default=54329, description="Port of the project-private Postgres cluster (1 to 65535)."
    )
    ready_timeout_s: float = Field(
        default=90.0, gt=0, allow_inf_nan=False, description="How long a component may take to become ready."
    )

    @field_validator("state_dir", mode="before")
    @classmethod
    def _names_a_folder(cls, value: object) -> object:
        # Path("") is the current folder: an empty variable (a script's unset $STATE) would spread the
        # state there.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: name a folder, or unset it for .driftloop/ in the project root")
        return value

    @field_validator("state_dir")
    @classmethod
    def _not_a_file(cls, value: Path | None) -> Path | None:
        if value is not None and value.exists() and not value.is_dir():
            raise ValueError(f"{value} is not a folder: name a folder (it is made if missing)")
        return value


@dataclass(frozen=True)
class StateLayout:
    """The paths under the state folder (.driftloop/), one place so nothing hard-codes them twice."""

    root: Path

    @classmethod
    def from_settings(cls, settings: LocalInfraSettings) -> StateLayout:
        """Resolve the state folder to an absolute path (Kafka's log.dirs must be absolute)."""
        return cls((settings.state_dir or PROJECT_ROOT / ".driftloop").resolve())

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def lock_file(self) -> Path:
        return self.root / "infra.lock"

    @property
    def leases(self) -> Path:
        return self.root / "leases"

    @property
    def kafka(self) -> Path:
        return self.root / "kafka"

    @property
    def kafka_libs(self) -> Path:
        return self.kafka / "libs"

    @property
    def kafka_data(self) -> Path:
        return self.kafka / "data"

    @property
    def kafka_config(self) -> Path:
        return self.kafka / "server.properties"

    @property
    def kafka_pid(self) -> Path:
        return self.kafka / "kafka.pid"

    @property
    def kafka_log(self) -> Path:
        return self.logs / "kafka.log"

    @property
    def kafka_console_log(self) -> Path:
        return self.logs / "kafka.out"

    @property
    def postgres(self) -> Path:
        return self.root / "postgres"

    @property
    def postgres_data(self) -> Path:
        return self.postgres / "data"

    @property
    def postgres_socket_dir(self) -> Path:
        return self.postgres / "run"

    @property
    def postgres_log(self) -> Path:
        return self.logs / "postgres.log"

    @property
    def postgres_log_dir(self) -> Path:
        return self.logs / "postgres"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def tokens_file(self) -> Path:
        return self.root / "tokens.json"

    @property
    def audit_signing_key(self) -> Path:
        return self.root / "audit" / "signing.key"

    @property
    def audit_checkpoints(self) -> Path:
        return self.root / "audit" / "checkpoints.ndjson"

    def service_files_env(self) -> dict[str, str]:
        """The variables that put the services' own files here: the artifact store, the token file, and the
        audit service's signing key and checkpoint copy. Their defaults (libs/settings.py,
        services/audit/settings.py) are the checkout's .driftloop/ whatever the state folder, so without
        these a second stack would share them with the default one."""
        return {
            "DRIFTLOOP_ARTIFACTS_URL": str(self.artifacts),
            "DRIFTLOOP_AUTH_TOKENS_FILE": str(self.tokens_file),
            "DRIFTLOOP_AUDIT_SIGNING_KEY_FILE": str(self.audit_signing_key),
            "DRIFTLOOP_AUDIT_CHECKPOINT_FILE": str(self.audit_checkpoints),
        }
