-- Rollout steps whose RolloutStepAdvanced came before the rollout's RolloutStarted (events of one rollout can
-- come out of order: another partition, a redelivery, a replica catching up). Kept, in the transaction that
-- claims the event, until the start comes (it watches the highest step kept instead of its own), the rollout
-- ends, or rollout_start_wait_seconds pass (dropped, logged and counted). Before, such a step was
-- dead-lettered and the late start watched step 0 while serving was on a later step.
CREATE TABLE IF NOT EXISTS early_steps (
    rollout_id      text             NOT NULL,
    step_index      integer          NOT NULL,
    model           text             NOT NULL,
    stable_version  integer,
    canary_version  integer          NOT NULL,
    started_at      double precision NOT NULL,
    cause_id        text             NOT NULL,
    correlation_id  text             NOT NULL,
    actor           text,
    received_at     double precision NOT NULL,
    PRIMARY KEY (rollout_id, step_index)
);
CREATE INDEX IF NOT EXISTS early_steps_received_at ON early_steps (received_at);
