-- A model's latest window reports (GET /v1/status once per model, /drift and /drift.html) are read in this
-- order: without the index every call read and sorted all of the model's reports (one per judged window,
-- for as long as the platform ran). The retention of window_reports reads a model's oldest ones through it.
CREATE INDEX IF NOT EXISTS window_reports_latest ON window_reports (model, judged_at DESC, seq DESC);
-- Window reports leave `window_reports` once judged more than window_reports_keep_days ago
-- (handlers.prune_window_reports), the newest of each model version always kept. Per model version the
-- highest window number whose report the retention deleted: GET /v1/models/{model}/windows/{id} says so
-- for a window at or below it, instead of answering that no such window was judged.
CREATE TABLE IF NOT EXISTS window_reports_pruned (
    model    text    NOT NULL,
    version  integer NOT NULL,
    seq      integer NOT NULL,
    PRIMARY KEY (model, version)
);
