-- Per rollout, the highest step given up because its RolloutStarted did not come within
-- rollout_start_wait_seconds (a tombstone of early_steps, written by the tick that drops them). A start that
-- comes even later watches that step (serving is on it, or past it) from when the start came, instead of its
-- own first step, whose verdict serving would ignore as stale. Kept until the start comes or the rollout ends.
CREATE TABLE IF NOT EXISTS given_up_steps (
    rollout_id      text             PRIMARY KEY,
    step_index      integer          NOT NULL,
    model           text             NOT NULL,
    stable_version  integer,
    canary_version  integer          NOT NULL,
    started_at      double precision NOT NULL,
    cause_id        text             NOT NULL,
    correlation_id  text             NOT NULL,
    actor           text,
    received_at     double precision NOT NULL,
    given_up_at     double precision NOT NULL
);
