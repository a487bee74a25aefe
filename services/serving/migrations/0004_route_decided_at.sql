-- When the model's traffic was last decided: a rollout started or ended, or the stable version changed (a
-- step advance is not a decision). A PromoteRequested or production RollbackRequested issued (its
-- CloudEvents time) before it was decided on a state that no longer holds, and is dead-lettered instead of
-- undoing the later decision. Rows saved before this column take their last save's time: at most that
-- refuses a command issued between the last decision and a later step advance, once.
ALTER TABLE model_routes ADD COLUMN decided_at timestamptz;
UPDATE model_routes SET decided_at = updated_at;
