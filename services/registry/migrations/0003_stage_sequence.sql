-- Each model's stage changes are numbered 1, 2, ... (ModelStageChanged.sequence), handed out from the
-- model's row under its lock in the transaction that makes the change, so consumers can tell an old change
-- re-sent under a new event id from a new one. Changes made before are not numbered (null in the history;
-- their events carried no number), and numbering starts at 1 with the first change after this migration.
ALTER TABLE registered_models ADD COLUMN stage_sequence bigint NOT NULL DEFAULT 0;
ALTER TABLE stage_history ADD COLUMN sequence bigint;
