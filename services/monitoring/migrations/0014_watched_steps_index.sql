-- The rollout steps still watched, found without reading every step ever decided: a rollout event counts them
-- against max_watched_rollout_steps, and a restart loads them (and decides those beyond it, inconclusive).
CREATE INDEX IF NOT EXISTS rollout_steps_watching ON rollout_steps (started_at) WHERE state = 'watching';
