-- A Kafka position can hold another record than the one the trail holds there: a topic deleted and created
-- again starts its offsets at 0, an unclean leader election truncates a log and the offsets are written
-- again. Such a record is new, not a redelivery: it is recorded with `kafka_reuse` one more than the
-- highest at its position (its record's meta says `"reuse": n` in `kafka`; the first record at a position
-- has 0 and says nothing). The position stays unique with it, so a redelivery can still never be recorded
-- twice. Building the new unique index reads the whole trail once.
ALTER TABLE trail ADD COLUMN kafka_reuse integer NOT NULL DEFAULT 0 CHECK (kafka_reuse >= 0);
ALTER TABLE trail ADD CONSTRAINT trail_kafka_position_reuse UNIQUE (topic, kafka_partition, kafka_offset, kafka_reuse);
ALTER TABLE trail DROP CONSTRAINT trail_kafka_position;
