-- An outbox relay that dies (or loses its database) between handing a batch to the broker and marking it
-- sent sends the batch again: the same events at new Kafka positions. Before appending, the writer looks
-- each (topic, event id) up here and skips byte-identical copies, so the trail holds every event once.
-- Predictions are left out like in the type and cascade indexes: serving produces them directly, never
-- through an outbox, and they are most rows.
CREATE INDEX trail_event_id ON trail (event_id) WHERE topic <> 'mlops.predictions';
