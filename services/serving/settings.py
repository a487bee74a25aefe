"""Settings of the serving service (env prefix DRIFTLOOP_SERVING_, falling back to DRIFTLOOP_)."""

from __future__ import annotations

import itertools
from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from contracts.rollouts import RolloutMode
from libs.settings import INTERVAL_MAX_S, Port, ServiceSettings


class ServingSettings(ServiceSettings):
    """Settings of serving: HTTP limits, the rollout policy, the prediction log and routing sync."""

    service: ClassVar[str] = "serving"

    http_port: Port = Field(8104, description="Port of the serving HTTP API (1 to 65535).")
    database_schema: str = Field(
        "serving",
        description="Postgres schema serving owns; tests give each run its own so parallel runs never meet.",
    )
    consumer_group: str = Field(
        "serving",
        description="Kafka group of the state consumer: one replica of the group handles each event.",
    )
    instance_id: str = Field(
        "",
        description="Name of this replica in its logs; empty: host name and process id.",
    )
    max_rows_per_request: int = Field(
        10_000, ge=1, description="Predict requests with more rows than this get 413."
    )
    rollout_steps: list[float] = Field(
        default_factory=lambda: [0.1, 0.5, 1.0],
        description="Canary traffic share of each rollout step, strictly increasing, ending at 1.0; in "
        "canary mode the first step is below 1.0 (a canary at 1.0 has no stable traffic to be judged "
        "against).",
    )
    rollout_min_samples: int = Field(
        200,
        ge=0,
        le=2**31 - 1,
        description="Canary predictions (rows) a step needs before a healthy verdict advances it.",
    )
    rollout_bake_seconds: float = Field(
        5.0, ge=0, description="Minimum time on a step before a healthy verdict advances it."
    )
    rollout_mode: RolloutMode = Field(
        RolloutMode.CANARY,
        description="canary: the candidate answers its share; shadow: it scores its share, never answers.",
    )
    error_rate_threshold: float = Field(
        0.05,
        gt=0,
        le=1,
        description="A canary whose failures on a step show it failing more than this share of its requests "
        "(one-sided binomial test at error_rate_alpha, after each failure) is rolled back. Until 2026-12-02 "
        "a measured share over it did, and a canary failing 1% of its requests was rolled back in one step "
        "in twenty.",
    )
    error_rate_min_requests: int = Field(
        20, ge=1, description="Canary requests on a step before its error rate is judged."
    )
    error_rate_alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Significance of 'the canary fails more than error_rate_threshold of its requests'.",
    )
    prediction_log_buffer: int = Field(
        10_000,
        ge=1,
        description="Prediction-log events waiting to be sent; when full, new ones are dropped and counted.",
    )
    prediction_log_batch: int = Field(500, ge=1, description="Prediction-log events sent to Kafka per batch.")
    prediction_log_linger_ms: int = Field(
        100,
        ge=0,
        le=60_000,
        description="Producer linger of the prediction log: fewer, larger produce requests; monitoring's "
        "windows do not notice 100 ms. At most 60,000 (a minute, far past any real use: while predictions "
        "come slowly each waits this long to be sent; aiokafka divides it into seconds, which past about "
        "1.8e311 stopped the producer with OverflowError).",
    )
    prediction_log_process: bool = Field(
        True,
        description="Encode and produce the prediction log in a child process, so the event loop only hands "
        "items over (services/serving/adapters/log_producer.py); off: on the event loop itself, as before "
        "(kept to compare in bench/serving).",
    )
    prediction_log_handoff_bytes: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        le=2**31,
        description="Hand-off bytes the producer process has not read yet beyond its socket's buffer, "
        "which is asked for the same size (Linux caps it at twice net.core.wmem_max); when more wait, new "
        "prediction-log items are dropped and counted. At most 2,147,483,648 (2 GiB, far past any real use): "
        "the socket's buffer is asked for as a C int, which from 4 GiB on failed the producer's start.",
    )
    prediction_log_handoff_flush_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="Prediction-log items queued for up to this long go to the producer process in one "
        "write (one wake-up for many requests), sooner once about 64 KiB wait; 0: every item at once.",
    )
    prediction_log_handoff_poll_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="How often the producer process collects the frames handed over while they flow; "
        "between collections serving's writes wake nobody (woken by each one, the child spent 13-60% more "
        "CPU per 100-row request in bench/serving); idle, it waits for the next write; 0: woken by every "
        "write.",
    )
    prediction_log_stall_s: float = Field(
        10.0,
        ge=1.0,
        le=3600,
        description="A prediction-log producer process that sends serving no report for this long while it "
        "runs (it reports twice a second; the first report, after its start, may take 30 s) is stalled: "
        "killed, what it was handed counted as lost (producer-stalled) and another started; a producer "
        "waiting on a slow broker still reports. At least 1 s, two reports; 10 s leaves a child starved "
        "of CPU on a saturated host (twenty reports late) alone.",
    )
    prediction_log_enabled: bool = Field(
        True, description="Publish PredictionsLogged; off only for benchmarks that measure its cost."
    )
    shadow_buffer: int = Field(
        1_000, ge=1, description="Shadow scorings waiting; when full, new ones are dropped and counted."
    )
    shadow_buffer_bytes: int = Field(
        64 * 1024 * 1024,
        ge=64 * 1024,
        description="About the memory the shadow scorings waiting may hold (each its request's body and "
        "rows, estimated from its length, rows and features); a scoring that would pass it is dropped and "
        "counted, so that a slow candidate under large requests cannot take the replica's memory.",
    )
    compile_models: bool = Field(
        True,
        description="Serve a verified ONNX Runtime copy of each model when it converts and agrees with the "
        "pipeline (services/serving/compiled.py); the pipeline serves otherwise.",
    )
    compile_tolerance: float = Field(
        1e-5,
        gt=0,
        le=0.01,
        description="Largest difference in any probability (or regression output) between a compiled copy "
        "and the pipeline on the verification sample; more and the pipeline serves.",
    )
    routing_poll_s: float = Field(
        2.0,
        gt=0,
        le=INTERVAL_MAX_S,
        description="How often a replica re-reads the routing state without a notification (safety net); at "
        "most 86,400 (a day: 1e300 was accepted, and a lost notification was never made up for).",
    )
    samples_flush_s: float = Field(
        1.0,
        gt=0,
        le=INTERVAL_MAX_S,
        description="How often a replica adds the canary rows it served to the rollout's count; at most "
        "86,400 (a day: 1e300 was accepted, and the count, which a step needs to advance, was only added as "
        "the replica stopped).",
    )

    @field_validator("rollout_steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if not steps:
            raise ValueError("rollout_steps must hold at least one step, e.g. [0.1, 0.5, 1.0]")
        if any(not 0 < w <= 1 for w in steps):
            raise ValueError("rollout_steps must be shares in (0, 1]")
        if any(b <= a for a, b in itertools.pairwise(steps)) or steps[-1] != 1.0:
            raise ValueError("rollout_steps must be strictly increasing and end at 1.0")
        return steps

    @model_validator(mode="after")
    def _a_canary_starts_below_full_traffic(self) -> ServingSettings:
        # A canary at 100 % leaves no stable traffic to judge it against (reaching 100 % is promotion): a
        # first step of 1.0 would put every new version on all traffic before any verdict.
        if self.rollout_mode is RolloutMode.CANARY and self.rollout_steps[0] >= 1.0:
            raise ValueError(
                f"DRIFTLOOP_SERVING_ROLLOUT_STEPS {self.rollout_steps} with "
                "DRIFTLOOP_SERVING_ROLLOUT_MODE=canary would put every new version on all traffic before any "
                "verdict: the first step must be below 1.0 (e.g. [0.1, 0.5, 1.0]), or set the mode to shadow"
            )
        return self

    @property
    def db_schema(self) -> str:
        """The Postgres schema serving owns (configurable, so test runs stay apart)."""
        return self.database_schema
