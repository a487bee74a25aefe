"""Prometheus series of the bus, labelled by consumer and topic (or by schema for the outbox's)."""

from prometheus_client import Counter, Gauge

CONSUMED = Counter("driftloop_bus_consumed_total", "Records read from Kafka.", ["consumer", "topic"])
PROCESSED = Counter("driftloop_bus_processed_total", "Events handled and committed.", ["consumer", "topic"])
DUPLICATES = Counter(
    "driftloop_bus_duplicates_total", "Redelivered events skipped by the inbox.", ["consumer", "topic"]
)
IGNORED = Counter(
    "driftloop_bus_ignored_total", "Events of types this consumer has no handler for.", ["consumer", "topic"]
)
RETRIED = Counter("driftloop_bus_retried_total", "Handler attempts that were retried.", ["consumer", "topic"])
DEAD_LETTERED = Counter(
    "driftloop_bus_dead_lettered_total",
    "Records sent to the dead-letter topic.",
    ["consumer", "topic", "reason"],
)
DEAD_LETTERS_LEFT = Counter(
    "driftloop_bus_dead_letters_left_total",
    "This consumer's own dead letters, read back from the dead-letter topic, that failed again: left there "
    "as they are instead of being written again (which would loop).",
    ["consumer", "topic"],
)
CONSUMER_LAG = Gauge(
    "driftloop_bus_consumer_lag",
    "Records on a partition after this consumer's settled position (what it reads and commits next): the "
    "partition's end offset minus that position, for each partition assigned to this process, measured every "
    "15 s, also while a handler runs. A partition's series leaves when it is revoked or the consumer stops.",
    ["consumer", "topic", "partition"],
)
PUBLISHED = Counter("driftloop_bus_published_total", "Events published to Kafka.", ["topic"])
OUTBOX_BACKLOG = Gauge("driftloop_bus_outbox_backlog", "Outbox rows not yet published.", ["schema"])
UNREADABLE = Counter(
    "driftloop_bus_unreadable_total",
    "Offsets the Kafka client could not parse, dead-lettered (or, in a raw subscription, delivered) as "
    "unreadable.",
    ["consumer", "topic"],
)
OUTBOX_SET_ASIDE = Counter(
    "driftloop_bus_outbox_set_aside_total",
    "Outbox rows Kafka refused as too large: dead-lettered as output-oversized and marked sent, so the rows "
    "behind them go on.",
    ["schema", "topic"],
)
OUTBOX_RELAY_FAILURES = Counter(
    "driftloop_bus_outbox_relay_failures_total",
    "Rounds of a service's outbox relay that failed (Postgres or Kafka away, or anything else): logged as a "
    "warning and retried with back-off (up to 5 s); the rows stay in the outbox. A count that keeps rising, "
    "with driftloop_bus_outbox_backlog, is a relay that publishes nothing.",
    ["schema"],
)
ROWS_PRUNED = Counter(
    "driftloop_bus_rows_pruned_total",
    "Rows the bus's retention deleted from a service's inbox (events whose records Kafka no longer holds) "
    "or outbox (sent rows past outbox_keep_sent_days).",
    ["schema", "table"],
)
PRUNING_FAILURES = Counter(
    "driftloop_bus_pruning_failures_total",
    "Rounds of a service's bus retention that failed (Postgres away, or anything else): logged as a warning "
    "and tried again at the next round; the rows stay until then.",
    ["schema"],
)
