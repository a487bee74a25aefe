-- A route row exists once a version of its model has taken traffic. Serving used to insert an empty row
-- for every model an event named (to lock it) before deciding anything, so a verdict or a command naming a
-- model it never served left a row with no stable version and no rollout, listed by GET /v1/models. Such a
-- row holds nothing that a missing row does not say: a decider for a new model finds no row and starts
-- from the same empty route. A transaction deciding for that model holds the row locked, and DELETE waits
-- for it, then re-checks the condition, so a row it filled in the meantime stays.
DELETE FROM model_routes WHERE stable_version IS NULL AND rollout_id IS NULL;
