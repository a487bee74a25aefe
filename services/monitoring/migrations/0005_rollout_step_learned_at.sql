-- When monitoring handled a step's event, on its own clock: the step's bake time runs from it (or from the
-- step's start, serving's clock, if later), so that a restart judges the step no earlier than before it.
-- NULL for steps stored before: they bake from their start, as they did.
ALTER TABLE rollout_steps ADD COLUMN IF NOT EXISTS learned_at double precision;
