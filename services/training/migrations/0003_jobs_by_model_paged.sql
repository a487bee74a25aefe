-- A model's jobs are listed newest first by (created_at, job_id), a unique key the list's cursors name
-- (GET /v1/models/{model}/jobs?cursor=): in this index's order, a page is read from the cursor's position on
-- without sorting the model's jobs. It serves what jobs_by_model (model, created_at DESC) did too.
CREATE INDEX IF NOT EXISTS jobs_by_model_paged ON jobs (model, created_at DESC, job_id DESC);
DROP INDEX IF EXISTS jobs_by_model;
