-- Serving's own tables. It learns model versions from events only and never reads another service's tables.

-- What serving knows of each model version: where its artifact is (ModelVersionRegistered), whether it
-- passed validation (ValidationPassed; may arrive first), and the registry's stage.
CREATE TABLE IF NOT EXISTS model_versions (
    model                 text        NOT NULL,
    version               integer     NOT NULL,
    artifact_key          text,
    signature             jsonb,
    stage                 text,
    validated_at          timestamptz,
    validation_report_id  text,
    load_error            text,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);

-- The routing state of each model: its stable version and its latest rollout. Every replica rebuilds
-- its in-memory routing table from these rows (woken by NOTIFY at commit), so a restart restores
-- routing exactly.
CREATE TABLE IF NOT EXISTS model_routes (
    model                    text        PRIMARY KEY,
    stable_version           integer,
    previous_stable_version  integer,
    rollout_id               text,
    canary_version           integer,
    rollout_stable_version   integer,
    mode                     text,
    steps                    double precision[],
    step_index               integer,
    min_samples              integer,
    bake_seconds             double precision,
    started_at               timestamptz,
    step_started_at          timestamptz,
    samples_seen             bigint      NOT NULL DEFAULT 0,
    status                   text,
    ended_at                 timestamptz,
    end_reason               text,
    revision                 bigint      NOT NULL DEFAULT 0,
    updated_at               timestamptz NOT NULL DEFAULT now()
);
