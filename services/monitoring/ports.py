"""What monitoring's handlers need from the outside world, as Protocols (Postgres and the artifact store
implement them in adapters/, fakes in the unit tests)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from contracts.common import ArtifactRef, ModelSignature
from libs.profiles import ReferenceProfile
from services.monitoring.domain import DriftPolicy, ReportPosition


@dataclass
class StoredModel:
    """A registered model version as monitoring recorded it."""

    model: str
    version: int
    signature: ModelSignature
    baseline: dict[str, float]
    profile: ArtifactRef


@dataclass(frozen=True)
class StoredPolicy:
    """A model's policy as stored, and its version: one more at each setting, numbered under the model's
    policy lock, so of two settings the later committed has the higher version."""

    policy: DriftPolicy
    version: int


@dataclass
class WindowState:
    """A model version's open window number and first offsets, and its debounce state."""

    next_seq: int = 1
    starts: dict[int, int] = field(default_factory=dict)
    consecutive: dict[str, int] = field(default_factory=dict)
    last_alert_at: float | None = None


@dataclass
class LabelledRecord:
    """A prediction joined with its label, as stored."""

    prediction_id: str
    model: str
    version: int
    variant: str
    rollout_id: str | None
    predicted_at: datetime
    prediction: Any
    score: float | None
    label: Any
    observed_at: datetime
    late: bool
    inputs: dict[str, Any]
    # When monitoring received the label (a waiting label's, once joined); None: now. Of two labels for one
    # prediction, the one received later is kept.
    received_at: datetime | None = None
    # A classifier's label that names none of the version's classes (counted as a wrong prediction).
    outside_classes: bool = False


@dataclass
class PendingLabel:
    """A label waiting for its prediction."""

    prediction_id: str
    model: str
    label: Any
    observed_at: datetime
    received_at: datetime | None = None  # set by the store


@dataclass
class JoinedLabel:
    """The latest label joined to predictions of an id and model, and the versions (and their variants) whose
    rows it joined."""

    prediction_id: str
    model: str
    label: Any
    observed_at: datetime
    received_at: datetime
    versions: set[int]
    variants: set[str]


@dataclass
class PerformanceState:
    """A model version's next performance window number, last alert time per metric, and how many
    windows in a row were degraded."""

    next_seq: int = 1
    last_alerts: dict[str, float] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)
    degraded_streak: int = 0


@dataclass
class StoredStep:
    """A rollout step monitoring watches (or watched)."""

    rollout_id: str
    step_index: int
    model: str
    stable_version: int | None
    canary_version: int
    started_at: float
    min_samples: int
    bake_seconds: float
    cause_id: str
    correlation_id: str
    actor: str | None
    state: str = "watching"
    verdict: str | None = None
    learned_at: float | None = None
    """When monitoring handled the step's event, on its own clock (the bake time runs from it); None for a
    step stored before it was kept."""


@dataclass
class EarlyStep:
    """A rollout step whose RolloutStepAdvanced came before the rollout's RolloutStarted (events of one
    rollout can arrive out of order): kept until the start comes, which watches the highest step kept, until
    the rollout ends, or until ``rollout_start_wait_seconds`` passed."""

    rollout_id: str
    step_index: int
    model: str
    stable_version: int | None
    canary_version: int
    started_at: float
    """When serving started the step (the event's time, at most ``max_clock_skew_seconds`` ahead)."""
    cause_id: str
    correlation_id: str
    actor: str | None
    received_at: float
    """When monitoring handled the step's event, on its own clock (how long it waited is timed from it)."""
    given_up_at: float | None = None
    """When the step was given up because the start did not come in time (``given_up_steps``); None while
    kept."""


@dataclass
class ReplayReport:
    """What a restart's replay of the predictions topic read, and what it should have read but did not."""

    records: int = 0
    """Prediction events fed to memory."""
    seconds: float = 0.0
    deleted: dict[int, int] = field(default_factory=dict)
    """Per partition: records below the group's committed offset the broker no longer held (deleted by
    retention, or a truncated log)."""
    unread: dict[int, int] = field(default_factory=dict)
    """Per partition: records still to read when the replay's deadline passed."""

    @property
    def complete(self) -> bool:
        """Whether every record the memory depended on was read."""
        return not self.deleted and not self.unread

    def public(self) -> dict[str, Any]:
        """As ``GET /v1/status`` shows it."""
        return {
            "records": self.records,
            "seconds": self.seconds,
            "complete": self.complete,
            "not_replayed": {
                "deadline": {str(p): n for p, n in sorted(self.unread.items())},
                "deleted": {str(p): n for p, n in sorted(self.deleted.items())},
            },
        }


@dataclass(frozen=True)
class JudgedReport:
    """A window's report as stored, with its place in the model's list (for the next page's cursor)."""

    position: ReportPosition
    report: dict[str, Any]


class MonitoringStore(Protocol):
    """Monitoring's tables, inside the caller's transaction."""

    async def now(self) -> datetime:
        """Postgres' clock, which stamps when labels are received and when serving starts a step's bake time:
        monitoring decides by it (read once per tick, see ``Monitor.now``). Timed on this host's clock, a step
        baked from when a process on another host learned of it, or across a clock stepped forward, got its
        one verdict before serving's bake time passed, which serving ignores as premature."""
        ...

    async def save_model(self, model: StoredModel) -> bool:
        """Record a model version; False when it was known already."""
        ...

    async def models(self) -> list[StoredModel]:
        """Every registered model version."""
        ...

    async def model(self, model: str, version: int) -> StoredModel | None:
        """A registered model version as first recorded, or None."""
        ...

    async def policy(self, model: str, *, lock: bool = False) -> DriftPolicy | None:
        """The operator's policy for a model, if one was set; ``lock``: the model's policy is held to commit,
        so another setter reads the policy this transaction leaves (also for a model with none yet)."""
        ...

    async def save_policy(self, model: str, policy: DriftPolicy, actor: str) -> int:
        """Set a model's policy; returns its version (1 for the first, one more than the replaced one's)."""
        ...

    async def policies(self) -> dict[str, StoredPolicy]:
        """Every policy an operator set, with its version, by model."""
        ...

    async def policies_fingerprint(self) -> str:
        """A value that changes whenever any policy is set (cheap: to poll for another replica's change)."""
        ...

    async def window_state(self, model: str, version: int, *, lock: bool = False) -> WindowState:
        """A model version's window state (locked for update when ``lock``)."""
        ...

    async def save_window_state(self, model: str, version: int, state: WindowState) -> None:
        """Store a model version's window state."""
        ...

    async def record_window(
        self, model: str, version: int, seq: int, summary: dict[str, Any], report: dict[str, Any]
    ) -> bool:
        """Record a judged window; False when that window was judged before (a replay)."""
        ...

    async def latest_reports(
        self, model: str, limit: int, *, after: ReportPosition | None = None
    ) -> list[JudgedReport]:
        """The model's most recent window reports, newest first (by judged_at, seq, version), those after
        ``after`` only."""
        ...

    async def window_report(self, model: str, window_id: str) -> dict[str, Any] | None:
        """One judged window's report by its id (``TrafficWindow.id``); None when none was judged."""
        ...

    async def prune_window_reports(
        self, model: str, judged_from: datetime, judged_before: datetime, limit: int
    ) -> tuple[int, datetime | None]:
        """Delete at most ``limit`` of the model's window reports judged from ``judged_from`` on and before
        ``judged_before``, oldest first, never the newest of a model version, remembering per version the
        highest window deleted (:meth:`reports_pruned_through`); returns how many went and when the last of
        them was judged (None when none went)."""
        ...

    async def reports_pruned_through(self, model: str, version: int) -> int | None:
        """The highest window number of the model version whose report the retention deleted; None when it
        deleted none."""
        ...

    async def add_labelled(self, rows: list[LabelledRecord]) -> list[tuple[str, str]]:
        """Store joined labels, one per prediction, model and version (two models' predictions may share an
        id, and a shadow candidate's scoring has the id of the stable prediction it shadows). A label for a
        prediction joined before replaces the stored label when it differs and was received later (a
        correction; the row keeps its performance window, if scored, and its ``late``); returns the
        (prediction id, model) pairs so corrected, each once however many versions' rows it corrected."""
        ...

    async def joined_labels(self, prediction_ids: list[str], models: list[str]) -> list[JoinedLabel]:
        """The latest label joined to predictions of each (id, model) given (``models`` in the same order),
        with the versions whose rows have it; nothing for a pair never joined."""
        ...

    async def labels_joined_since(self, received_since: datetime) -> list[tuple[str, str, datetime, bool]]:
        """(prediction id, model, when its latest label was received, whether it joined a shadow candidate's
        prediction) of the labels joined since a time, oldest first."""
        ...

    async def labelled_for(self, model: str, version: int, prediction_ids: list[str]) -> dict[str, Any]:
        """Labels of the given predictions of a model version, where joined."""
        ...

    async def recent_labelled(self, model: str, limit: int) -> list[LabelledRecord]:
        """The model's most recently labelled rows, any version; not the shadow candidates' (their ids and
        inputs are those of a served prediction's row, labelled too)."""
        ...

    async def registered_models(self) -> list[str]:
        """The models with a version registered: the only ones that may have joined labels or window
        reports."""
        ...

    async def export_horizon(self, model: str, rows: int) -> datetime | None:
        """When the oldest of the ``rows`` rows :meth:`recent_labelled` reads for the model was received (a
        row received before it is exported by no window); None when the model has fewer rows than that."""
        ...

    async def prunable_labels(
        self, model: str, received_from: datetime, received_before: datetime, limit: int
    ) -> list[tuple[str, datetime]]:
        """(prediction id, received) of at most ``limit`` rows, received from ``received_from`` on, oldest
        first, of the model's joined labels no query needs any more: every row of the id and model received
        before ``received_before``, counted into a performance window, and predicted before the start of every
        rollout step of the model watched or kept for its start."""
        ...

    async def prune_labels(self, model: str, prediction_ids: list[str], received_before: datetime) -> int:
        """Delete the rows of these ids of the model that :meth:`prunable_labels` would still find, counting
        their labels for ``label_counts`` and ``labels_outside_classes``; returns the rows deleted."""
        ...

    async def unscored(self, model: str, version: int, limit: int) -> list[LabelledRecord]:
        """Labelled rows of a version not yet in a performance window, oldest first."""
        ...

    async def mark_scored(self, model: str, version: int, prediction_ids: list[str], seq: int) -> None:
        """Put labelled rows of a model version in its performance window ``seq``."""
        ...

    async def performance_state(self, model: str, version: int) -> PerformanceState:
        """A version's performance state (locked for update)."""
        ...

    async def save_performance_state(self, model: str, version: int, state: PerformanceState) -> None:
        """Store a version's performance state."""
        ...

    async def add_pending(self, labels: list[PendingLabel]) -> None:
        """Keep labels whose prediction is not known yet, one per prediction and model named: a later label
        for the pair replaces the one waiting (a correction, or a label sent again), and waits its own time;
        one sent again after the pair's label expired waits anew."""
        ...

    async def take_pending(self, prediction_ids: list[str], models: list[str]) -> list[PendingLabel]:
        """Remove and return the waiting labels of these predictions that name the model that made the
        prediction (``models``, in the same order), with when they were received."""
        ...

    async def pending_labels(self) -> set[tuple[str, str]]:
        """Every label still waiting for its prediction: (the prediction's id, the model the label names)."""
        ...

    async def expire_pending(self, received_before: datetime) -> list[tuple[str, str]]:
        """Give up on labels that waited too long: count them as unmatched (per model) and delete them;
        returns their (prediction id, model)."""
        ...

    async def give_up_oldest_pending(self, count: int) -> list[tuple[str, str]]:
        """Give up on the ``count`` labels waiting longest, as on those whose wait ended (counted as unmatched
        per model, and deleted); returns their (prediction id, model)."""
        ...

    async def labels_outside_classes(self) -> dict[tuple[str, int], int]:
        """Per model version: the joined labels that name none of its classes."""
        ...

    async def label_counts(self) -> dict[str, dict[str, int]]:
        """Per model: labelled, late, unmatched (expired so far) and waiting label counts."""
        ...

    async def save_step(self, step: StoredStep) -> None:
        """Record a rollout step to watch (superseding the rollout's earlier steps)."""
        ...

    async def keep_early_step(self, step: EarlyStep) -> bool:
        """Keep a step that came before its rollout's start; False when that step is kept already."""
        ...

    async def take_early_steps(self, rollout_id: str) -> list[EarlyStep]:
        """Remove and return the rollout's steps kept for its start, lowest step first."""
        ...

    async def expire_early_steps(self, received_before: float) -> list[EarlyStep]:
        """Give up on the steps kept for their start since before a time (epoch seconds): remove and return
        them."""
        ...

    async def expire_early_steps_beyond(self, most: int, *, keeping: EarlyStep) -> list[EarlyStep]:
        """Give up on the steps kept longest (by when they were kept) while more than ``most`` are kept,
        never ``keeping`` (the one being kept): remove and return them, oldest first."""
        ...

    async def kept_steps(self) -> list[EarlyStep]:
        """Every step kept for its rollout's start, by rollout and step."""
        ...

    async def remember_given_up(self, steps: list[EarlyStep], given_up_at: float) -> None:
        """Remember, per rollout, the highest of these steps given up for want of their start (a tombstone
        that a higher step given up later replaces)."""
        ...

    async def take_given_up(self, rollout_id: str) -> EarlyStep | None:
        """Remove and return the rollout's step given up for want of its start; None when there is none."""
        ...

    async def given_up_steps(self) -> list[EarlyStep]:
        """Every rollout's step given up for want of its start, by rollout."""
        ...

    async def finish_rollout(self, rollout_id: str, outcome: str) -> None:
        """Stop watching a rollout and record how it ended ("promoted" or "rolled back"); the first ending
        recorded stays."""
        ...

    async def rollout_outcome(self, rollout_id: str) -> str | None:
        """How the rollout ended; None while it runs (or is unknown)."""
        ...

    async def last_step(self, rollout_id: str) -> StoredStep | None:
        """The rollout's most recent step, whatever its state."""
        ...

    async def watched_steps(self) -> list[StoredStep]:
        """Steps without a verdict of rollouts still running."""
        ...

    async def rollouts_watched(self, *, besides: str) -> int:
        """How many rollouts other than ``besides`` have a step watched (this transaction's included)."""
        ...

    async def watched_beyond(self, most: int) -> list[StoredStep]:
        """The steps watched beyond the first ``most`` started, in the order they started."""
        ...

    async def decide_step(
        self, rollout_id: str, step_index: int, verdict: str, reason: str, event_id: str
    ) -> bool:
        """Record the step's verdict; False when it had one already."""
        ...

    async def labelled_outcomes(
        self, model: str, version: int, since: datetime, *, rollout_id: str | None
    ) -> list[tuple[Any, Any, float | None]]:
        """(prediction, label, score) of a version's labelled rows predicted since a time, of one side of a
        rollout step: with ``rollout_id``, the canary or shadow rows that rollout routed; with None, the
        version's stable rows."""
        ...

    async def labels_received_since(self, model: str, since: datetime) -> bool:
        """Whether any label of the model's predictions was joined since a time."""
        ...

    async def quality_last(self, model: str, version: int, feature: str, kind: str) -> float | None:
        """When this finding was last published (epoch seconds)."""
        ...

    async def save_quality(self, model: str, version: int, feature: str, kind: str, at: float) -> None:
        """Remember a published finding."""
        ...

    async def record_alert(
        self, event_id: str, model: str, version: int | None, kind: str, summary: str
    ) -> None:
        """Remember a published alert for the status page."""
        ...

    async def recent_alerts(self, models: Sequence[str], per_model: int) -> dict[str, list[dict[str, Any]]]:
        """Each of ``models``' ``per_model`` most recent alerts, newest first (a model without one is left
        out)."""
        ...

    async def alerted_models(self) -> list[str]:
        """The models with an alert recorded."""
        ...

    async def alerts_horizon(self, model: str, keep: int) -> datetime | None:
        """When the oldest of the model's ``keep`` newest alerts was recorded; None when it has fewer."""
        ...

    async def prune_alerts(
        self, model: str, created_from: datetime, created_before: datetime, limit: int
    ) -> tuple[int, datetime | None]:
        """Delete at most ``limit`` of the model's alerts recorded from ``created_from`` on and before
        ``created_before``, oldest first; returns how many went and when the last of them was recorded (None
        when none went)."""
        ...

    async def replay_offsets(self, topic: str) -> dict[int, int]:
        """Where a restart re-reads the topic from, per partition."""
        ...

    async def save_replay_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        """Store where a restart re-reads the topic from."""
        ...


class ProfileUnavailable(Exception):
    """A reference profile could not be loaded (missing, corrupted, or not a profile)."""


class Artifacts(Protocol):
    """The shared artifact store, as monitoring uses it."""

    async def profile(self, ref: ArtifactRef) -> ReferenceProfile:
        """Load a reference profile (hash verified); raises :class:`ProfileUnavailable`."""
        ...

    async def put_parquet(self, data: bytes) -> ArtifactRef:
        """Store a Parquet file; returns its reference."""
        ...
