-- A validation report too large for its event arrives cut (checks_truncated): the registry keeps the totals
-- the event counts, so the version page and the card say the report is partial. Reports received before
-- have no totals (null): their events may have been cut without the registry knowing.
ALTER TABLE validation_reports
    ADD COLUMN checks_truncated    boolean NOT NULL DEFAULT false,
    ADD COLUMN checks_total        integer,
    ADD COLUMN failed_checks_total integer;
