-- The last numbered ModelStageChanged applied per model (its sequence, and what it moved), so a change
-- older than it, re-sent under a new event id or delayed, is refused instead of moving the champion back.
-- Written in the transaction that applies the change.
CREATE TABLE IF NOT EXISTS stage_changes_applied (
    model           text        PRIMARY KEY,
    sequence        bigint      NOT NULL,
    version         integer     NOT NULL,
    to_stage        text        NOT NULL,
    event_id        text        NOT NULL,
    applied_at      timestamptz NOT NULL DEFAULT now()
);
