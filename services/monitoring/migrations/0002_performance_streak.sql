-- A performance alert needs the metric degraded in several windows in a row, like drift: one noisy
-- window of labels is not a shift.
ALTER TABLE performance_state ADD COLUMN degraded_streak integer NOT NULL DEFAULT 0;
