-- Validation's own tables (search_path points at the service's schema).

-- Every registered version it has seen: the champion's artifact is found here when a challenger arrives.
CREATE TABLE IF NOT EXISTS versions (
    model           text        NOT NULL,
    version         integer     NOT NULL,
    run_id          text        NOT NULL,
    artifact        jsonb       NOT NULL,
    signature       jsonb       NOT NULL,
    metrics         jsonb       NOT NULL,
    lineage         jsonb       NOT NULL,
    registered_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);

-- The production version of each model (the champion), from ModelStageChanged.
CREATE TABLE IF NOT EXISTS champions (
    model           text        PRIMARY KEY,
    version         integer     NOT NULL,
    since           timestamptz NOT NULL DEFAULT now()
);

-- Dataset versions, so a holdout reference resolves to its file and format.
CREATE TABLE IF NOT EXISTS datasets (
    name            text        NOT NULL,
    version         integer     NOT NULL,
    sha256          text        NOT NULL,
    artifact        jsonb       NOT NULL,
    row_count       bigint      NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS datasets_by_sha ON datasets (sha256);

-- One report per candidate version, with every check.
CREATE TABLE IF NOT EXISTS reports (
    report_id       text        PRIMARY KEY,
    model           text        NOT NULL,
    version         integer     NOT NULL,
    passed          boolean     NOT NULL,
    checks          jsonb       NOT NULL,
    failed_checks   text[]      NOT NULL DEFAULT '{}',
    champion_version integer,
    holdout         jsonb,
    duration_seconds double precision NOT NULL,
    event_id        text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (model, version)
);
