-- A restart loads the labels joined within label_wait_seconds (by when they were received), so that a
-- prediction of their id and model consumed after them (a shadow candidate's scoring of the served row,
-- logged later) is joined with the label too.
CREATE INDEX IF NOT EXISTS labelled_by_received ON labelled (received_at);
