-- A label that expires unmatched is counted per model here and its row deleted. Kept in pending_labels
-- (marked expired) only to be counted, such labels made that table grow for as long as the platform ran.
-- The labels that expired before are counted over, then deleted.
CREATE TABLE IF NOT EXISTS unmatched_labels (
    model      text   PRIMARY KEY,
    unmatched  bigint NOT NULL
);
INSERT INTO unmatched_labels (model, unmatched)
SELECT model, count(*) FROM pending_labels WHERE expired GROUP BY model;
DELETE FROM pending_labels WHERE expired;
ALTER TABLE pending_labels DROP COLUMN expired;
-- The housekeeping tick looks for the labels that waited too long.
CREATE INDEX IF NOT EXISTS pending_labels_by_age ON pending_labels (received_at);
