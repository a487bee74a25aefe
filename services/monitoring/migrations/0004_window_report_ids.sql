-- A window's report is looked up by the id its DriftDetected names (GET /v1/models/{model}/windows/{id}).
CREATE INDEX IF NOT EXISTS window_reports_window_id ON window_reports (model, window_id);
