-- A model's drift windows are listed newest first by (judged_at, seq, version), a unique key the list's
-- cursors name (GET /v1/models/{model}/drift?cursor=, and its page): (judged_at, seq) alone is not, as two
-- versions' windows of one number can be judged in one transaction. In this index's order a page is read
-- from the cursor's position on without sorting the model's reports; it serves what window_reports_latest
-- (model, judged_at DESC, seq DESC) did too: /v1/status and the retention's batches.
CREATE INDEX IF NOT EXISTS window_reports_paged ON window_reports (model, judged_at DESC, seq DESC, version DESC);
DROP INDEX IF EXISTS window_reports_latest;
