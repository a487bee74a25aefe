-- CloudEvents identify an event by its source and id together: two publishers may each send an event "1".
-- The inbox now keys on (consumer, event id, source), so the second is handled, not skipped or refused.
--
-- Rows stored before this migration did not record the source. They get source '' (never a real one: the
-- bus refuses an event whose source is empty) and still stand for their event id under any source, so a
-- redelivery of an event handled before the upgrade remains a no-op. The default stays: a replica still
-- running the former code during a rolling upgrade writes such rows too, and they are honoured the same.
ALTER TABLE inbox ADD COLUMN source text NOT NULL DEFAULT '';
ALTER TABLE inbox DROP CONSTRAINT inbox_pkey;
ALTER TABLE inbox ADD PRIMARY KEY (consumer, event_id, source);
-- Each claim looks for such a row per event; this index holds only them, so it is small or empty.
CREATE INDEX inbox_without_source ON inbox (consumer, event_id) WHERE source = '';
