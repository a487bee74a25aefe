"""Settings of the monitoring service (env prefix DRIFTLOOP_MONITORING_, falling back to DRIFTLOOP_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from contracts.feedback import GroundTruthReceived
from contracts.models import ModelVersionRegistered
from contracts.monitoring import JENSEN_SHANNON_MAX, CorrectionMethod
from contracts.predictions import PredictionsLogged
from contracts.rollouts import RolloutStarted
from libs.settings import INTERVAL_MAX_S, SECONDS_MAX, Port, ServiceSettings

LABELLED_ROWS_MAX = 10_000_000
"""The most labelled rows a setting has read into memory at once (a performance window, an export's recent
rows), inputs included: some KB each, so ten million is tens of GB, far past any real use. Each is a count
Postgres takes as a bigint (a LIMIT, an OFFSET), which past 2**63 - 1 failed every read."""

ROLLOUT_STEPS_MAX = 10_000
"""The most rollout steps monitoring collects traffic for at once, watched or kept for their start: each holds
up to ``canary_step_max_rows`` rows of each variant (some 2.6 MB at the default), so ten thousand is tens of
GB, far past any real use. Each bound is a count Postgres takes as a bigint (an OFFSET, a LIMIT), which past
2**63 - 1 failed every restart, or every step that came before its start."""


class MonitoringSettings(ServiceSettings):
    """Windows, drift policy defaults, label joins and canary analysis. A model's policy (HTTP PUT) overrides
    the drift and performance defaults for that model."""

    service: ClassVar[str] = "monitoring"

    @property
    def db_schema(self) -> str:
        """The Postgres schema this service owns."""
        return self.schema_name

    http_port: Port = Field(8105, description="Port of the monitoring HTTP API (1 to 65535).")

    # --- windows -----------------------------------------------------------------------------------------
    window_rows: int = Field(
        5_000,
        ge=10,
        description="A drift window closes once it holds this many rows (at a request boundary).",
    )
    window_seconds: float = Field(
        300.0,
        gt=0,
        description="A drift window also closes when a request arrives this long (event time) after the "
        "window's first one, or when no traffic came for this long (wall clock).",
    )
    min_window_rows: int = Field(
        100,
        ge=1,
        description="A window closed by time is judged only with at least this many rows; one with fewer "
        "whose version got no traffic for label_wait_seconds is set aside unjudged.",
    )

    # --- drift policy defaults ----------------------------------------------------------------------------
    alpha: float = Field(0.05, gt=0, lt=1, description="Family-wise significance level of the p-value tests.")
    correction: CorrectionMethod = Field(
        CorrectionMethod.BONFERRONI, description="Correction of p-values for testing many features."
    )
    small_sample_max: int = Field(
        1_000,
        ge=1,
        le=1_000_000_000,
        description="Up to this many values on the smaller side, p-value tests (KS, chi-square) are used; "
        "above it, distances (Wasserstein, Jensen–Shannon).",
    )
    wasserstein_threshold: float = Field(0.1, gt=0, description="Drift when normalised Wasserstein >= this.")
    jensen_shannon_threshold: float = Field(
        0.1,
        gt=0,
        le=JENSEN_SHANNON_MAX,
        description="Drift when the Jensen–Shannon distance reaches this counted from what sampling alone "
        "measures at the window's size: sqrt(this² + the floor), docs/monitoring.md (the distance is at most "
        "√ln 2 ≈ 0.8326). Until 2026-12-02 this alone, and a feature of a few hundred levels drifted in "
        "every window.",
    )
    psi_threshold: float = Field(
        0.1,
        gt=0,
        description="Drift when PSI reaches this plus what sampling alone measures at the window's size "
        "(only when chosen by policy).",
    )
    share_threshold: float = Field(
        0.1,
        ge=0,
        le=1,
        description="A DriftDetected needs this share of the tested features to have drifted.",
    )
    consecutive_windows: int = Field(
        2,
        ge=1,
        le=1_000,
        description="A feature counts as drifted once it drifted in this many consecutive windows.",
    )
    cooldown_seconds: float = Field(
        1_800.0,
        ge=0,
        description="After a DriftDetected, none other for the version within this long of its event time "
        "(window ends, before or after it); the same for PerformanceDegraded and DataQualityIssue.",
    )
    missing_share_tolerance: float = Field(
        0.05,
        ge=0,
        le=1,
        description="DataQualityIssue when a missing share exceeds the reference's by more than this.",
    )
    quality_issues_per_kind: int = Field(
        10,
        ge=1,
        description="Per window and kind of finding, up to this many features get a DataQualityIssue each; "
        "more (an upstream outage: every feature missing) get one for them all, with no feature, naming how "
        "many and the worst few (the window's report lists every one).",
    )

    # --- labels and performance ----------------------------------------------------------------------------
    label_wait_seconds: float = Field(
        86_400.0,
        gt=0,
        le=SECONDS_MAX,
        description="Predictions are kept this long for their labels; a label for an older one (or one "
        "that waited this long for its prediction) is counted as unmatched. At most 3,153,600,000 (a hundred "
        "years): it is counted back from now into a date, which before year 1 failed every tick.",
    )
    max_cached_predictions: int = Field(
        500_000, ge=1_000, description="Upper bound of predictions kept in memory for label joins."
    )
    max_pending_labels: int = Field(
        500_000,
        ge=1_000,
        description="Upper bound of labels waiting for their prediction (~0.5 KB of memory and a Postgres "
        "row each), checked at every tick: past it, the ones waiting longest are given up as unmatched, as "
        "if their wait had ended, and counted (driftloop_monitoring_labels_not_kept_total, reason "
        "too-many-waiting).",
    )
    max_clock_skew_seconds: float = Field(
        300.0,
        ge=0,
        le=SECONDS_MAX,
        description="A prediction dated further ahead of when monitoring consumed it (on Postgres' clock; a "
        "serving replica's clock ahead) is windowed (its window's boundaries and time range), counted toward "
        "rollout steps and kept for its label as if dated this far ahead, and counted "
        "(driftloop_monitoring_predictions_ahead_of_clock_total); its date is kept as sent. A rollout step "
        "(RolloutStarted, RolloutStepAdvanced) dated further ahead of when monitoring handled it starts this "
        "far ahead (its time range and timeout), and is counted "
        "(driftloop_monitoring_rollout_steps_ahead_of_clock_total). At most 3,153,600,000 (a hundred years): "
        "with twice label_wait_seconds it is counted back from now into the joined labels' retention date.",
    )
    performance_window_labels: int = Field(
        500,
        ge=10,
        le=LABELLED_ROWS_MAX,
        description="Labelled rows per performance window (per model version); a PerformanceDegraded also "
        "needs `consecutive_windows` degraded windows in a row, so sampling noise is not an alert. 10 to "
        "10,000,000: a window's rows are read into memory at once, inputs included, and their count is a "
        "Postgres bigint, which past 2**63 - 1 failed every label join.",
    )
    performance_tolerance: float = Field(
        0.05,
        ge=0,
        description="Degraded when a higher-is-better metric is below baseline - this, or an error metric "
        "above baseline * (1 + this * 4).",
    )
    export_labelled_rows: int = Field(
        50_000,
        ge=0,
        le=LABELLED_ROWS_MAX,
        description="Recent labelled rows added to a window's exported data (for retraining), 0 to "
        "10,000,000: every export reads them into memory at once, inputs included (some KB each: ten million "
        "is tens of GB, far past any real use), and the count is a Postgres bigint, which past 2**63 - 1 "
        "failed every export.",
    )
    labelled_keep_days: float = Field(
        30.0,
        ge=0,
        description="Days a joined label (its row in `labelled`, inputs included) is kept once received; 0 "
        "(or 36500, a hundred years, or more) keeps them for ever. Past it a row is deleted only once no "
        "query needs it: counted into a performance window, received more than twice label_wait_seconds "
        "plus max_clock_skew_seconds and a day ago (no join or correction can reach it), not among the "
        "model's export_labelled_rows most recent ones, and of no rollout step watched or kept; /v1/status "
        "keeps counting it. A round every bus_retention_interval_s, a batch per tick (docs/monitoring.md, "
        '"Retention").',
    )
    window_reports_keep_days: float = Field(
        90.0,
        ge=0,
        description="Days a judged window's report (its row in `window_reports`, about 850 bytes a feature) "
        "is kept; 0 (or 36500, a hundred years, or more) keeps them for ever. Past it "
        "GET /v1/models/{model}/windows/{id}, which a DriftDetected and a grouped DataQualityIssue link to, "
        "answers 404 saying the report was deleted, and /drift lists no older window; the newest report of "
        "every model version is kept however old (/v1/status and the drift report show it). Alerts (what "
        "/v1/status lists) are kept as long, each model's 10 newest however old. A round every "
        'bus_retention_interval_s, a batch per tick (docs/monitoring.md, "Retention").',
    )

    # --- canary analysis ------------------------------------------------------------------------------------
    canary_min_labelled: int = Field(
        100,
        ge=10,
        description="Labelled rows per variant needed before labelled accuracy counts in a verdict.",
    )
    canary_alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Significance of 'canary worse than stable by more than canary_margin' (one-sided "
        "tests).",
    )
    canary_margin: float = Field(
        0.02,
        ge=0,
        description="How much worse a canary may be: unhealthy only when the labelled test shows its "
        "accuracy lower by more than this (MAE higher by more than this share), at canary_alpha. Until "
        "2026-12-02 the tests asked whether the canary was worse at all, and this bounded only the measured "
        "gap.",
    )
    canary_label_grace_seconds: float = Field(
        60.0,
        ge=0,
        le=SECONDS_MAX,
        description="When labels are flowing for a model, a verdict waits up to this long after the bake "
        "time for enough canary labels. At most 3,153,600,000 (a hundred years): it is counted back from now "
        "into a date.",
    )
    canary_latency_ratio: float = Field(
        1.5, ge=1, description="Canary p95 latency may be up to this times stable's (plus the slack)."
    )
    canary_latency_slack_ms: float = Field(5.0, ge=0, description="Absolute slack on the p95 latency check.")
    canary_divergence_threshold: float = Field(
        0.35,
        gt=0,
        description="Largest Jensen–Shannon distance between canary and stable predictions, counted from "
        "what equal models' samples of the step's sizes measure by chance: sqrt(this² + the floor).",
    )
    canary_timeout_seconds: float = Field(
        600.0, gt=0, description="A step whose canary did not get min_samples by then is inconclusive."
    )
    canary_step_max_rows: int = Field(
        50_000,
        ge=1_000,
        description="Per rollout step and variant (canary, stable), the predictions whose scores, "
        "predicted values and latencies are held in memory for its verdict (26 bytes each or more): past it, "
        "a uniform random sample of all the step's rows and requests (reservoir sampling), so a canary that "
        "degrades late in the step is seen; the others count toward min_samples and the verdict's samples "
        "but are left out of its latency and divergence comparisons, counted "
        "(driftloop_monitoring_rollout_step_predictions_not_kept_total) and logged as a warning once per "
        "step.",
    )
    max_watched_rollout_steps: int = Field(
        100,
        ge=1,
        le=ROLLOUT_STEPS_MAX,
        description="At most this many rollouts have a step watched at once (each collecting its canary's "
        "and stable's traffic, up to canary_step_max_rows per variant, until its verdict); the step of a "
        "RolloutStarted or RolloutStepAdvanced that would watch one more (a rollout's step after a healthy "
        "verdict excepted) is not watched but given its one verdict at once, inconclusive, saying why "
        "(serving rolls the canary back), logged as an error at most once a minute and counted "
        "(driftloop_monitoring_rollout_steps_decided_unwatched_total). A restart watches the first started "
        "up to this many and gives the others the same verdict (counted the same way, logged once). 1 to "
        "10,000: the steps' traffic is held in memory, and past 2**63 - 1 (a Postgres bigint) every restart "
        "failed.",
    )
    max_kept_rollout_steps: int = Field(
        100,
        ge=1,
        le=ROLLOUT_STEPS_MAX,
        description="At most this many RolloutStepAdvanced events that came before their rollout's "
        "RolloutStarted are kept for it at once (each collecting its canary's traffic, up to "
        "canary_step_max_rows per variant); keeping one more gives up the one kept longest at once, as "
        "rollout_start_wait_seconds would later: logged as an error and counted "
        "(driftloop_monitoring_rollout_steps_never_watched_total, reason too-many-kept). 1 to 10,000: the "
        "steps' traffic is held in memory, and past 2**63 - 1 (a Postgres bigint) every step that came "
        "before its start failed.",
    )
    rollout_start_wait_seconds: float = Field(
        86_400.0,
        gt=0,
        le=SECONDS_MAX,
        description="A RolloutStepAdvanced that comes before its rollout's RolloutStarted (events out of "
        "order) is kept this long for the start, which then watches the highest step kept (its canary's "
        "traffic collected meanwhile); past it the step is given up, logged as an error and counted "
        "(driftloop_monitoring_rollout_steps_never_watched_total), and a start that still comes watches it "
        "from then on. At most 3,153,600,000 (a hundred years): /v1/status dates when a kept step expires, "
        "which past year 9999 failed the page.",
    )

    # --- plumbing -----------------------------------------------------------------------------------------
    tick_seconds: float = Field(
        1.0,
        gt=0,
        le=INTERVAL_MAX_S,
        description="How often time-driven work runs (idle windows, bake times, timeouts); at most 86,400 (a "
        "day: 1e300 was accepted, and that work then ran only when traffic woke it).",
    )
    replay_on_start: bool = Field(
        True, description="Rebuild in-memory windows and label joins by re-reading predictions at start."
    )
    replay_deadline_seconds: float = Field(
        600.0,
        gt=0,
        description="The replay at start reads until every partition reached the group's committed offset "
        "or this long passed; what it did not read by then is logged as a warning, counted and shown in "
        "/v1/status. Consumers start after it.",
    )
    schema_name: str = Field(
        "monitoring", description="Postgres schema of the service (another name isolates a test or bench)."
    )
    consumer_group: str = Field(
        "monitoring", description="Prefix of the consumer groups (-predictions, -feedback, -control)."
    )
    predictions_topic: str = Field(
        PredictionsLogged.topic,
        description="Topic of PredictionsLogged (another name isolates a test or bench).",
    )
    feedback_topic: str = Field(GroundTruthReceived.topic, description="Topic of GroundTruthReceived.")
    models_topic: str = Field(ModelVersionRegistered.topic, description="Topic of ModelVersionRegistered.")
    rollouts_topic: str = Field(RolloutStarted.topic, description="Topic of the rollout events.")
