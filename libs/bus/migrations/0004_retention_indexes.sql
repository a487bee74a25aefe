-- Handled events and sent events are deleted once they are of no more use (libs.bus.postgres.BusRetention):
-- an inbox row once its event can no longer be delivered again, a sent outbox row after a few days. These
-- indexes find them without reading the whole table.
--
-- BRIN: rows are appended in time order, so a range of pages holds a range of times, and the index is one
-- small summary per 128 pages that costs an insert almost nothing (a btree would add an entry per event to
-- the inbox's hot path). minmax-multi, not plain minmax: once retention has deleted old rows and VACUUM has
-- freed their pages, new rows fill them, and a plain summary of such a range spans from the deleted rows'
-- times to the new ones, so every later look for old rows reads it again; minmax-multi keeps the two apart
-- (with the lower bound the retention passes, the range is skipped). autosummarize: a range is summarised
-- as soon as it fills, not at the next VACUUM, so the newest pages never make every look read them.
CREATE INDEX inbox_processed_at ON inbox USING brin (processed_at timestamptz_minmax_multi_ops)
    WITH (autosummarize = on);
CREATE INDEX outbox_created_at ON outbox USING brin (created_at timestamptz_minmax_multi_ops)
    WITH (autosummarize = on);
