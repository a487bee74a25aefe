-- The inbox records each event's type (its ce_type as delivered) beside the payload's hash: a payload with
-- the same bytes under another type is another event (a RollbackRequested that leaves to_version out has
-- the bytes of a PromoteRequested), refused as a reused id instead of skipped as a redelivery.
--
-- Rows stored before this migration, and rows a replica still running the former code writes during a
-- rolling upgrade, have no type (null): they are compared by their payload alone, as before. The former
-- code never reads the column, so it reads the rows this code writes as it always did.
ALTER TABLE inbox ADD COLUMN event_type text;
