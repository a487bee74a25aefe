-- Each setting of a model's policy numbers it one more than the one it replaces, under the model's policy
-- lock (handlers.set_policy), so in the order the settings commit. The replica that took two PUTs at once puts
-- in force the one with the higher version, whichever request goes on last (it put in force the one whose
-- request finished last, the first's policy after the second's until the next tick's reload). Rows already
-- there are 1.
ALTER TABLE policies ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 1;
