-- Alerts one window wrote in one transaction share their created_at (now(), the transaction's start): ordered
-- by it alone, GET /v1/status listed them in either order, and its LIMIT per model cut between them as it
-- happened to. seq numbers alerts in the order they were written (rows already there in the table's order),
-- the tie-breaker of the status's read; alerts_latest serves it, and what alerts_by_model served (a model's
-- alerts by created_at: the retention's batches and horizon, the list of alerted models).
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS seq bigint GENERATED ALWAYS AS IDENTITY;
CREATE INDEX IF NOT EXISTS alerts_latest ON alerts (model, created_at DESC, seq DESC);
DROP INDEX IF EXISTS alerts_by_model;
