-- The registry's own schema (search_path points at it): models, versions, stages, lineage, datasets.

CREATE TABLE registered_models (
    name            text        PRIMARY KEY,
    -- Version numbers are handed out from here under the row lock, so they are monotonic per model.
    latest_version  integer     NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE model_versions (
    model               text             NOT NULL REFERENCES registered_models (name),
    version             integer          NOT NULL CHECK (version >= 1),
    stage               text             NOT NULL
                        CHECK (stage IN ('candidate', 'canary', 'production', 'archived', 'rejected')),
    run_id              text             NOT NULL,
    job_id              text             NOT NULL,
    artifact            jsonb            NOT NULL,
    profile             jsonb            NOT NULL,
    metrics             jsonb            NOT NULL,
    train_rows          bigint           NOT NULL,
    holdout_rows        bigint           NOT NULL,
    duration_seconds    double precision NOT NULL,
    -- The TrainingCompleted event that created the version, and the cascade it belongs to.
    event_id            text             NOT NULL,
    correlation_id      text             NOT NULL,
    -- clock_timestamp(), not now(): a consumer transaction may span several events of one poll.
    created_at          timestamptz      NOT NULL DEFAULT clock_timestamp(),
    stage_changed_at    timestamptz      NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (model, version),
    -- One version per training run, whatever the redelivery.
    UNIQUE (model, run_id)
);
CREATE INDEX model_versions_by_stage ON model_versions (stage, model, version);

CREATE TABLE signatures (
    model       text    NOT NULL,
    version     integer NOT NULL,
    features    jsonb   NOT NULL,  -- [{name, type, categories}] in the model's order
    target      text    NOT NULL,
    task        text    NOT NULL,
    classes     jsonb,
    PRIMARY KEY (model, version),
    FOREIGN KEY (model, version) REFERENCES model_versions (model, version)
);

CREATE TABLE lineage (
    model           text    NOT NULL,
    version         integer NOT NULL,
    spec_hash       text    NOT NULL,
    code_version    text    NOT NULL,
    parent_version  integer,
    seed            bigint  NOT NULL,
    params          jsonb   NOT NULL,
    environment     jsonb   NOT NULL,
    document        json    NOT NULL,  -- the Lineage exactly as training sent it (json keeps key order)
    PRIMARY KEY (model, version),
    FOREIGN KEY (model, version) REFERENCES model_versions (model, version)
);

-- Version -> dataset versions, so "which models were trained on churn-base v3?" is one index scan. No
-- foreign key to datasets: lineage may name a dataset version whose DatasetRegistered is still on its way.
CREATE TABLE lineage_datasets (
    model           text    NOT NULL,
    version         integer NOT NULL,
    role            text    NOT NULL CHECK (role IN ('training', 'holdout')),
    position        integer NOT NULL,
    dataset_name    text    NOT NULL,
    dataset_version integer NOT NULL,
    sha256          text    NOT NULL,
    rows            bigint,
    PRIMARY KEY (model, version, role, position),
    FOREIGN KEY (model, version) REFERENCES model_versions (model, version)
);
CREATE INDEX lineage_datasets_by_dataset ON lineage_datasets (dataset_name, dataset_version);

-- Every stage a version went through, registration included (from_stage NULL), in id order.
CREATE TABLE stage_history (
    id              bigserial   PRIMARY KEY,
    model           text        NOT NULL,
    version         integer     NOT NULL,
    from_stage      text,
    to_stage        text        NOT NULL,
    reason          text        NOT NULL,
    actor           text,                -- the envelope's actor (user:alice) when a person asked
    source          text        NOT NULL, -- the service whose event caused it (/driftloop/serving)
    event_id        text        NOT NULL, -- the event that caused it
    event_type      text        NOT NULL,
    correlation_id  text        NOT NULL,
    changed_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    FOREIGN KEY (model, version) REFERENCES model_versions (model, version)
);
CREATE INDEX stage_history_by_version ON stage_history (model, version, id);

CREATE TABLE aliases (
    model       text        NOT NULL,
    alias       text        NOT NULL,
    version     integer     NOT NULL,
    event_id    text        NOT NULL,
    set_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, alias),
    FOREIGN KEY (model, version) REFERENCES model_versions (model, version)
);
CREATE INDEX aliases_by_version ON aliases (model, version);

CREATE TABLE tags (
    model       text        NOT NULL,
    version     integer     NOT NULL,
    key         text        NOT NULL,
    value       text        NOT NULL,
    set_by      text        NOT NULL,
    set_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version, key),
    FOREIGN KEY (model, version) REFERENCES model_versions (model, version)
);
CREATE INDEX tags_by_key ON tags (key, value);

CREATE TABLE datasets (
    name            text        NOT NULL,
    version         integer     NOT NULL CHECK (version >= 1),
    sha256          text        NOT NULL,
    artifact        jsonb       NOT NULL,
    row_count       bigint      NOT NULL,
    columns         json        NOT NULL,  -- {column: dtype} in file order (json keeps the order)
    source          text        NOT NULL,
    derived_from    jsonb       NOT NULL,
    models          text[]      NOT NULL,
    description     text,
    event_id        text        NOT NULL,  -- the DatasetRegistered event
    registered_by   text,                  -- the actor of an upload
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);
CREATE INDEX datasets_by_sha ON datasets (name, sha256);
CREATE INDEX datasets_by_model ON datasets USING gin (models);

-- Validation outcomes as received (ValidationPassed / ValidationFailed), for the version page and the card.
CREATE TABLE validation_reports (
    event_id            text             PRIMARY KEY,
    model               text             NOT NULL,
    version             integer          NOT NULL,
    report_id           text             NOT NULL,
    passed              boolean          NOT NULL,
    checks              jsonb            NOT NULL,
    failed_checks       jsonb            NOT NULL,
    champion_version    integer,
    holdout             jsonb,
    duration_seconds    double precision NOT NULL,
    received_at         timestamptz      NOT NULL DEFAULT now(),
    FOREIGN KEY (model, version) REFERENCES model_versions (model, version)
);
CREATE INDEX validation_reports_by_version ON validation_reports (model, version, received_at);
