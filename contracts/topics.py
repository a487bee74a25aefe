"""The topic map: every Kafka topic, the events on it, who publishes them and who reacts to them.

Read top to bottom, it is the closed loop:

    serving    ──PredictionsLogged, GroundTruthReceived──> monitoring ──DriftDetected──> training
    training   ──TrainingCompleted──> registry ──ModelVersionRegistered──> validation
    validation ──ValidationPassed──> serving ──RolloutStarted──> monitoring ──CanaryVerdict──> serving
    serving    ──RolloutPromoted | RolloutRolledBack──> registry
    registry   ──RetrainRequested, PromoteRequested, RollbackRequested, ArchiveRequested (from HTTP)──> ...

The audit service records every topic below but its own (the dead letters too, as dead letters) and publishes
signed checkpoints.
Service names are the packages under ``services/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts import audit, commands, datasets, feedback, models, monitoring, predictions, rollouts, training
from contracts import validation as validation_events
from contracts.envelope import EventPayload

REGISTRY = "registry"
TRAINING = "training"
VALIDATION = "validation"
SERVING = "serving"
MONITORING = "monitoring"
AUDIT = "audit"
SERVICES = (REGISTRY, TRAINING, VALIDATION, SERVING, MONITORING, AUDIT)

DEAD_LETTER = "mlops.deadletter"

DAY_MS = 24 * 60 * 60 * 1000
FOREVER = -1  # Kafka's retention.ms for "never delete"


@dataclass(frozen=True)
class Route:
    """One event type on a topic: the services that publish it and the services that react to it."""

    event: type[EventPayload]
    producers: tuple[str, ...]
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class TopicSpec:
    """One Kafka topic: its name, size, key, retention and the routes of the events it carries."""

    name: str
    partitions: int
    description: str
    routes: tuple[Route, ...]
    key: str = "model name"
    high_volume: bool = False
    retention_ms: int = 30 * DAY_MS
    audited: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Services that publish or read the topic without a payload class of their own (the dead-letter topic).
    other_producers: tuple[str, ...] = ()
    other_consumers: tuple[str, ...] = ()

    @property
    def events(self) -> tuple[type[EventPayload], ...]:
        """Payload classes published on this topic."""
        return tuple(route.event for route in self.routes)

    @property
    def producers(self) -> tuple[str, ...]:
        """Services that publish on this topic, sorted."""
        return tuple(
            sorted({p for route in self.routes for p in route.producers} | set(self.other_producers))
        )

    @property
    def consumers(self) -> tuple[str, ...]:
        """Services that consume this topic, sorted (audit included when the topic is audited)."""
        names = {c for route in self.routes for c in route.consumers} | set(self.other_consumers)
        if self.audited:
            names.add(AUDIT)
        return tuple(sorted(names))


_TOPICS = (
    TopicSpec(
        name=datasets.TOPIC,
        partitions=3,
        description="Dataset versions as they become available: uploaded, or materialised by training from "
        "base data plus labelled traffic.",
        key="dataset name",
        retention_ms=FOREVER,
        routes=(Route(datasets.DatasetRegistered, (REGISTRY, TRAINING), (REGISTRY, TRAINING, VALIDATION)),),
    ),
    TopicSpec(
        name=training.TOPIC,
        partitions=3,
        description="The retrain policy's decisions and the life of each training job.",
        routes=(
            # Training consumes its own requests: the policy decides in one transaction, a worker runs the
            # job from the topic, so a crash between the two loses nothing.
            # The spec is registered over training's HTTP API; the event is the audit trail's record of it.
            Route(training.ModelSpecRegistered, (TRAINING,), ()),
            Route(training.TrainingRequested, (TRAINING,), (TRAINING,)),
            Route(training.TrainingSkipped, (TRAINING,), ()),
            Route(training.TrainingStarted, (TRAINING,), ()),
            Route(training.TrainingProgress, (TRAINING,), ()),
            Route(training.TrainingCompleted, (TRAINING,), (REGISTRY,)),
            Route(training.TrainingFailed, (TRAINING,), ()),
        ),
    ),
    TopicSpec(
        name=models.TOPIC,
        partitions=3,
        description="Model versions and their stages, as the registry records them.",
        retention_ms=FOREVER,
        routes=(
            # Serving learns artifact keys and signatures here, monitoring the reference profiles: no service
            # reads the registry's tables or calls it over HTTP.
            Route(models.ModelVersionRegistered, (REGISTRY,), (VALIDATION, SERVING, MONITORING)),
            # Validation needs the champion, training the parent version, serving the production version
            # after a manual change. Monitoring judges whichever versions the predictions name.
            Route(models.ModelStageChanged, (REGISTRY,), (VALIDATION, TRAINING, SERVING)),
            # For the audit trail: who set what on a version (approvals, tickets).
            Route(models.ModelVersionTagged, (REGISTRY,), ()),
        ),
    ),
    TopicSpec(
        name=validation_events.TOPIC,
        partitions=3,
        description="The promotion gate's outcome for each candidate, with every check.",
        routes=(
            Route(validation_events.ValidationPassed, (VALIDATION,), (REGISTRY, SERVING)),
            Route(validation_events.ValidationFailed, (VALIDATION,), (REGISTRY,)),
        ),
    ),
    TopicSpec(
        name=rollouts.TOPIC,
        partitions=3,
        description="Progressive delivery of validated versions: start, each step, promotion or rollback.",
        routes=(
            Route(rollouts.RolloutStarted, (SERVING,), (REGISTRY, MONITORING)),
            Route(rollouts.RolloutStepAdvanced, (SERVING,), (MONITORING,)),
            Route(rollouts.RolloutPromoted, (SERVING,), (REGISTRY, MONITORING)),
            Route(rollouts.RolloutRolledBack, (SERVING,), (REGISTRY, MONITORING)),
        ),
    ),
    TopicSpec(
        name=monitoring.TOPIC,
        partitions=3,
        description="What live traffic says about each model: drift, labelled performance, data quality, "
        "and the canary's health.",
        routes=(
            Route(monitoring.DriftDetected, (MONITORING,), (TRAINING,)),
            Route(monitoring.PerformanceDegraded, (MONITORING,), (TRAINING,)),
            Route(monitoring.CanaryVerdict, (MONITORING,), (SERVING,)),
            Route(monitoring.DataQualityIssue, (MONITORING,), ()),
            # For the audit trail: who changed what decides a drift (set over monitoring's HTTP API).
            Route(monitoring.DriftPolicyChanged, (MONITORING,), ()),
        ),
    ),
    TopicSpec(
        name=predictions.TOPIC,
        partitions=6,
        description="Every prediction served: one event per predict request and variant, with every row's "
        "inputs and outputs.",
        high_volume=True,
        retention_ms=7 * DAY_MS,
        routes=(Route(predictions.PredictionsLogged, (SERVING,), (MONITORING,)),),
        notes=("The audit service consumes this topic in batches; it can be configured off.",),
    ),
    TopicSpec(
        name=feedback.TOPIC,
        partitions=3,
        description="Ground-truth labels for earlier predictions, received by serving's feedback endpoint.",
        routes=(Route(feedback.GroundTruthReceived, (SERVING,), (MONITORING,)),),
    ),
    TopicSpec(
        name=commands.TOPIC,
        partitions=3,
        description="Manual commands accepted over HTTP; the envelope's actor says who asked.",
        routes=(
            Route(commands.RetrainRequested, (REGISTRY,), (TRAINING,)),
            Route(commands.PromoteRequested, (REGISTRY, SERVING), (SERVING,)),
            Route(commands.RollbackRequested, (REGISTRY, SERVING), (SERVING,)),
            Route(commands.ArchiveRequested, (REGISTRY,), (REGISTRY,)),
        ),
    ),
    TopicSpec(
        name=audit.TOPIC,
        partitions=1,
        description="Signed checkpoints of the audit trail, for audit-log consumers outside the platform.",
        key="none (one partition keeps checkpoints in order)",
        retention_ms=FOREVER,
        audited=False,
        routes=(Route(audit.AuditCheckpoint, (AUDIT,), ()),),
        notes=(
            "External audit-log consumers read it: each checkpoint's signature covers `signing_input()`, "
            "and its head hash must match the trail they hold at that sequence number.",
        ),
    ),
    TopicSpec(
        name=DEAD_LETTER,
        partitions=3,
        description="Messages a consumer could not decode, or whose handler refused them or kept failing: "
        "the original key, value and headers (cut to fit when too large, said by `dlq_truncated`), plus "
        "`dlq_reason`, `dlq_error`, `dlq_consumer`, `dlq_origin_topic`, `dlq_origin_partition` and "
        "`dlq_origin_offset` headers.",
        key="the original message's key",
        audited=False,
        routes=(),
        other_producers=SERVICES,
        # Recorded as dead letters (with their reason), not as the events they carry: nothing a service
        # gave up on leaves the platform unrecorded.
        other_consumers=(AUDIT,),
        notes=(
            "Operators read it (and may replay from it); no service acts on it automatically. The audit "
            "service records every dead letter in its trail (configurable).",
            "`driftloop deadletter list` shows it and `driftloop deadletter replay` puts chosen dead letters "
            "back on their topics: docs/operations.md, [Dead letters: reading and "
            "replaying](operations.md#dead-letters-reading-and-replaying).",
        ),
    ),
)

TOPICS: dict[str, TopicSpec] = {spec.name: spec for spec in _TOPICS}
"""Every topic by name, in the order of the loop."""
