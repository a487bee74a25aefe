-- The cascade (correlation id) that started each rollout: every event about the rollout joins it, so a
-- rollback for a newer candidate, for the error rate or by hand shows in the trace of the drift that
-- started the rollout. NULL for rollouts started before this column; their events join their cause's.
ALTER TABLE model_routes ADD COLUMN rollout_correlation_id text;
