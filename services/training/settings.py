"""Settings of the training service (env prefix DRIFTLOOP_TRAINING_, falling back to DRIFTLOOP_)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from libs.settings import INTERVAL_MAX_S, SECONDS_MAX, Port, ServiceSettings


class TrainingSettings(ServiceSettings):
    """Settings of training: its schema and consumer group, and how jobs are run, watched and resumed."""

    service: ClassVar[str] = "training"

    http_port: Port = Field(8102, description="Port of the training HTTP API (1 to 65535).")
    database_schema: str = Field(
        "training",
        description="Postgres schema training owns; tests give each run its own so parallel runs never meet.",
    )
    consumer_group: str = Field(
        "training", description="Kafka consumer group: one replica of the group handles each event."
    )
    heartbeat_interval_s: float = Field(
        2.0,
        gt=0,
        le=INTERVAL_MAX_S,
        description="How often a running job's heartbeat is written while its fit runs; at most 86,400 (a "
        "day, far past any real use: at 50 years, the most stale_after_s let through, a run another replica "
        "had taken over kept fitting to its end).",
    )
    stale_after_s: float = Field(
        30.0,
        gt=0,
        le=SECONDS_MAX,
        description="A running job whose heartbeat is older than this belongs to a dead worker: it is "
        "resumed. More than twice heartbeat_interval_s, at most 3,153,600,000 (a hundred years): it is "
        "counted back from now into a date in Postgres, which holds none before 4713 BC (some 6,700 years "
        "back): past it every look for work failed.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Runs of one job before it fails for good (worker-lost) instead of resuming."
    )
    job_timeout_s: float = Field(3600.0, gt=0, description="A run longer than this fails with timeout.")
    progress_interval_s: float = Field(
        5.0,
        gt=0,
        le=INTERVAL_MAX_S,
        description="At most one TrainingProgress per job in this many seconds; at most 86,400 (a day: "
        "1e300 was accepted, and a job sent none after its first).",
    )
    runner_poll_s: float = Field(
        5.0,
        gt=0,
        le=INTERVAL_MAX_S,
        description="How often the job runner looks for work without a notification (safety net, and how "
        "soon stale jobs are noticed); at most 86,400 (a day: 1e300 was accepted, and a dead worker's job, "
        "or one whose notification was lost, waited for the next notification).",
    )
    start_method: Literal["forkserver", "spawn"] = Field(
        "forkserver", description="How the fit process is started (never fork: the service has threads)."
    )
    fit_start_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Longest wait for the fit process to start (a fork that never answers: the fork server "
        "stopped or wedged). The start runs beside the event loop; past this the pool and its fork server "
        "are let go and the run handed to a new one; when that does not start either, the run counts as "
        "lost.",
    )
    fit_memory_limit_mb: int | None = Field(
        None,
        gt=0,
        le=2**30,
        description="Bound on the fit process's address space, in MiB (RLIMIT_AS); unset: none. A fit that "
        "outgrows it fails at once with fit-error, saying it ran out of memory, instead of being killed by "
        "the kernel's OOM killer (worker-lost, after every attempt, each taking the memory others need). "
        "It bounds virtual memory, which is more than the fit holds (libraries mapped, a reserve per "
        "thread): set it well above a typical run's, a few GiB at least; at most 1,073,741,824 (a pebibyte, "
        "more than a process can address: it is the bound in bytes setrlimit takes, a C long, which past "
        "8,796,093,022,207 overflowed as each fit process started).",
    )
    overlap_fit: bool = Field(
        True,
        description="Run the work that does not need the fitted model (the features' reference profile, the "
        "holdout and training-set files and their hashes) on a second thread of the fit process while the "
        "fit runs, and write the model file there while the model is evaluated. Same outcome either way; "
        "on a machine with a core to spare it takes most of that work off a job's wall time "
        "(docs/benchmarks.md). Off: one thread, one step after the other.",
    )
    code_version: str = Field(
        "",
        description="Version of the training code recorded in lineage; empty: the package version plus the "
        "git commit when the code runs from a checkout.",
    )

    @model_validator(mode="after")
    def _stale_after_heartbeats(self) -> TrainingSettings:
        # Any replica claims a running job whose heartbeat is older than stale_after_s: within two beats, a
        # live run whose beat is a moment late is taken over, fitted again, and failed as worker-lost once
        # that has happened max_attempts times.
        if self.stale_after_s <= 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"DRIFTLOOP_TRAINING_STALE_AFTER_S ({self.stale_after_s:g}) must be more than twice "
                f"DRIFTLOOP_TRAINING_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s:g}): a running job "
                "with one late heartbeat would be taken for a dead worker's and run again by another replica"
            )
        return self

    @property
    def db_schema(self) -> str:
        """The Postgres schema training owns (configurable, so test runs stay apart)."""
        return self.database_schema
