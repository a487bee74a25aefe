-- A trace and a query by correlation id read a cascade in seq order up to a limit. Keyed by the correlation
-- id alone, the cascade index gave its rows in no useful order: Postgres read every row of the cascade and
-- sorted them before the limit could stop it, so a cascade of millions of events (a runaway or hostile
-- producer) cost millions of row reads and an on-disk sort per trace, however small the limit. Keyed by
-- (correlation id, seq), the index gives the rows in trail order and the scan stops at the limit, both ways
-- (newest or oldest first), cursors included. Predictions stay out, as before.
--
-- The new index is built first and the old one dropped last: building it takes a lock that lets reads go on
-- (and holds appends back) while it reads the whole trail once; dropping the old index locks the table
-- only for the rest of the transaction, which is then about to commit.
CREATE INDEX trail_correlation_seq ON trail (correlation_id, seq) WHERE topic <> 'mlops.predictions';
DROP INDEX trail_correlation;
ALTER INDEX trail_correlation_seq RENAME TO trail_correlation;
