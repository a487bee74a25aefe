-- Training's own tables (search_path points at the service's schema).

-- The current spec of each model; the canonical JSON also lives in the artifact store under spec_hash.
CREATE TABLE IF NOT EXISTS model_specs (
    model           text        PRIMARY KEY,
    spec            jsonb       NOT NULL,
    spec_hash       text        NOT NULL,
    artifact        jsonb       NOT NULL,
    base_datasets   text[]      NOT NULL DEFAULT '{}',
    registered_by   text,
    registered_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS model_specs_base ON model_specs USING gin (base_datasets);

-- Dataset versions seen on mlops.datasets (uploaded ones and training's own materialised sets).
CREATE TABLE IF NOT EXISTS datasets (
    name            text        NOT NULL,
    version         integer     NOT NULL,
    sha256          text        NOT NULL,
    artifact        jsonb       NOT NULL,
    row_count       bigint      NOT NULL,
    columns         jsonb       NOT NULL,
    source          text        NOT NULL,
    models          text[]      NOT NULL DEFAULT '{}',
    registered_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- The production version of each model, learned from ModelStageChanged: the parent of the next version.
CREATE TABLE IF NOT EXISTS production_versions (
    model           text        PRIMARY KEY,
    version         integer     NOT NULL,
    changed_at      timestamptz NOT NULL DEFAULT now()
);

-- One row per training job. A job runs once per attempt (run_id changes); completion and failure are
-- conditional on the run id still owning the job, so a job completes or fails exactly once.
CREATE TABLE IF NOT EXISTS jobs (
    job_id          text        PRIMARY KEY,
    model           text        NOT NULL,
    state           text        NOT NULL CHECK (state IN ('requested', 'running', 'completed', 'failed')),
    trigger         text        NOT NULL,
    request         jsonb       NOT NULL,
    request_event   jsonb       NOT NULL,
    spec_hash       text        NOT NULL,
    spec_artifact   jsonb       NOT NULL,
    dispatched_at   timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    run_id          text,
    heartbeat_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    failure_reason  text,
    failure_message text,
    result          jsonb
);
CREATE INDEX IF NOT EXISTS jobs_by_model ON jobs (model, created_at DESC);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (state, created_at) WHERE state IN ('requested', 'running');
-- The database itself keeps the one-run-in-flight rule, even for two replicas deciding at once.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_in_flight ON jobs (model) WHERE state IN ('requested', 'running');
