-- The last numbered ModelStageChanged applied per model (its sequence, and what it moved), so a change
-- older than it, re-sent under a new event id or delayed, is dead-lettered instead of setting a version's
-- stage back (a rolled-back version's `rejected` to an earlier stage, say). Written in the transaction that
-- applies the change; a model's row here says nothing of its routes (a model serving never served has one).
CREATE TABLE stage_changes_applied (
    model           text        PRIMARY KEY,
    sequence        bigint      NOT NULL,
    version         integer     NOT NULL,
    to_stage        text        NOT NULL,
    event_id        text        NOT NULL,
    applied_at      timestamptz NOT NULL DEFAULT now()
);
