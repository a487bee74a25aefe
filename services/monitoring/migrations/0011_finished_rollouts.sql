-- Rollouts serving promoted or rolled back, and how: a step event of one (sent again under another event id,
-- or read after the ending) is dead-lettered instead of watched. Marking the watched steps 'finished' did
-- not record it when every step was decided already, or when monitoring never saw the rollout start.
CREATE TABLE IF NOT EXISTS finished_rollouts (
    rollout_id   text        PRIMARY KEY,
    outcome      text        NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT now()
);
-- Rollouts whose watched steps were finished before this migration.
INSERT INTO finished_rollouts (rollout_id, outcome)
SELECT DISTINCT rollout_id, 'finished' FROM rollout_steps WHERE state = 'finished'
ON CONFLICT DO NOTHING;
