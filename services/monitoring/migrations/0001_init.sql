-- Monitoring's own state. Windows and the label-join cache live in memory (rebuilt by replay from
-- replay_offsets after a restart); everything an alert, a verdict or a label join depends on is here.

-- Registered model versions: signature, holdout metrics (the performance baseline), profile reference.
CREATE TABLE IF NOT EXISTS model_versions (
    model          text        NOT NULL,
    version        integer     NOT NULL,
    signature      jsonb       NOT NULL,
    baseline       jsonb       NOT NULL,
    profile        jsonb       NOT NULL,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);

-- Per-model drift policy set by an operator (defaults come from the settings).
CREATE TABLE IF NOT EXISTS policies (
    model       text        PRIMARY KEY,
    policy      jsonb       NOT NULL,
    updated_by  text        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Per model version: the open window's sequence number and first offsets, and the debounce state.
CREATE TABLE IF NOT EXISTS window_state (
    model          text             NOT NULL,
    version        integer          NOT NULL,
    next_seq       integer          NOT NULL,
    starts         jsonb            NOT NULL DEFAULT '{}',
    consecutive    jsonb            NOT NULL DEFAULT '{}',
    last_alert_at  double precision,
    PRIMARY KEY (model, version)
);

-- Every judged window, with its report (what the HTTP drift report shows).
CREATE TABLE IF NOT EXISTS window_reports (
    model        text        NOT NULL,
    version      integer     NOT NULL,
    seq          integer     NOT NULL,
    window_id    text        NOT NULL,
    start_at     timestamptz NOT NULL,
    end_at       timestamptz NOT NULL,
    size         integer     NOT NULL,
    drift_share  double precision NOT NULL,
    alerted      boolean     NOT NULL,
    report       jsonb       NOT NULL,
    judged_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version, seq)
);

-- Predictions joined with their labels (inputs kept for retraining exports).
CREATE TABLE IF NOT EXISTS labelled (
    prediction_id  text        PRIMARY KEY,
    model          text        NOT NULL,
    version        integer     NOT NULL,
    variant        text        NOT NULL,
    rollout_id     text,
    predicted_at   timestamptz NOT NULL,
    prediction     jsonb       NOT NULL,
    score          double precision,
    label          jsonb       NOT NULL,
    observed_at    timestamptz NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    late           boolean     NOT NULL,
    inputs         jsonb       NOT NULL,
    perf_seq       integer
);
CREATE INDEX IF NOT EXISTS labelled_unscored ON labelled (model, version) WHERE perf_seq IS NULL;
CREATE INDEX IF NOT EXISTS labelled_recent ON labelled (model, received_at DESC);
CREATE INDEX IF NOT EXISTS labelled_by_time ON labelled (model, version, predicted_at);

-- Labels whose prediction is not in memory (yet): joined when it arrives, expired after the label wait.
CREATE TABLE IF NOT EXISTS pending_labels (
    prediction_id  text        PRIMARY KEY,
    model          text        NOT NULL,
    label          jsonb       NOT NULL,
    observed_at    timestamptz NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    expired        boolean     NOT NULL DEFAULT false
);

-- Per model version: performance windows judged and the last PerformanceDegraded per metric.
CREATE TABLE IF NOT EXISTS performance_state (
    model        text    NOT NULL,
    version      integer NOT NULL,
    next_seq     integer NOT NULL DEFAULT 1,
    last_alerts  jsonb   NOT NULL DEFAULT '{}',
    last_metrics jsonb   NOT NULL DEFAULT '{}',
    PRIMARY KEY (model, version)
);

-- Rollout steps watched, and the one verdict per step.
CREATE TABLE IF NOT EXISTS rollout_steps (
    rollout_id      text             NOT NULL,
    step_index      integer          NOT NULL,
    model           text             NOT NULL,
    stable_version  integer,
    canary_version  integer          NOT NULL,
    started_at      double precision NOT NULL,
    min_samples     integer          NOT NULL,
    bake_seconds    double precision NOT NULL,
    state           text             NOT NULL DEFAULT 'watching',
    verdict         text,
    reason          text,
    cause_id        text             NOT NULL,
    correlation_id  text             NOT NULL,
    actor           text,
    event_id        text,
    decided_at      timestamptz,
    PRIMARY KEY (rollout_id, step_index)
);

-- Last time a data-quality finding was published per model version, feature and kind (one per cooldown).
CREATE TABLE IF NOT EXISTS quality_state (
    model     text             NOT NULL,
    version   integer          NOT NULL,
    feature   text             NOT NULL,
    kind      text             NOT NULL,
    last_at   double precision NOT NULL,
    PRIMARY KEY (model, version, feature, kind)
);

-- Alerts published (for the status page; the events themselves left through the outbox).
CREATE TABLE IF NOT EXISTS alerts (
    event_id    text        PRIMARY KEY,
    model       text        NOT NULL,
    version     integer,
    kind        text        NOT NULL,
    summary     text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS alerts_by_model ON alerts (model, created_at DESC);

-- Per partition of the predictions topic: where a restart re-reads from to rebuild memory.
CREATE TABLE IF NOT EXISTS replay_offsets (
    topic      text    NOT NULL,
    partition  integer NOT NULL,
    offset_    bigint  NOT NULL,
    PRIMARY KEY (topic, partition)
);
