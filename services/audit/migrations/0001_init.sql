-- The audit trail: one row per Kafka record, in the order it was recorded, each row's hash chained to
-- the row before it (see services/audit/domain.py and docs/audit.md for the canonical form).
--
-- `record` holds everything that is hashed: the record's meta (Kafka position, headers, kind, error,
-- recorded_at) and its value, byte for byte. The columns after it are copies of record fields for the
-- indexes; queries show fields from `record`, and `driftloop audit verify --full` checks the copies.
CREATE TABLE trail (
    seq             bigint      PRIMARY KEY CHECK (seq > 0),
    record          bytea       NOT NULL,
    row_hash        bytea       NOT NULL CHECK (octet_length(row_hash) = 32),
    seal            bytea       NOT NULL,
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    kind            text        NOT NULL,
    event_id        text,
    event_type      text,
    subject         text,
    correlation_id  text,
    causation_id    text,
    actor           text,
    event_time      timestamptz,
    recorded_at     timestamptz NOT NULL,
    -- A redelivered record finds its position taken: it can never be recorded twice.
    CONSTRAINT trail_kafka_position UNIQUE (topic, kafka_partition, kafka_offset)
);

CREATE INDEX trail_subject ON trail (subject, seq);
-- Predictions are most rows, each its own one-event cascade of one type: the type and cascade indexes
-- leave them out, which halves what indexing costs per prediction. Queries by type or correlation id
-- say `topic <> 'mlops.predictions'` so these indexes serve them; predictions are found by model and time.
CREATE INDEX trail_event_type ON trail (event_type, seq) WHERE topic <> 'mlops.predictions';
CREATE INDEX trail_correlation ON trail (correlation_id) WHERE topic <> 'mlops.predictions';
-- Most rows have no actor and are events: partial indexes keep them out too.
CREATE INDEX trail_actor ON trail (actor, seq) WHERE actor IS NOT NULL;
CREATE INDEX trail_not_event ON trail (kind, seq) WHERE kind <> 'event';
-- Rows arrive roughly in event-time order, so a BRIN index answers time ranges for almost nothing.
CREATE INDEX trail_event_time ON trail USING brin (event_time);

-- Signed checkpoints of the chain's head, as published on mlops.audit.
CREATE TABLE checkpoints (
    seq         bigint      PRIMARY KEY CHECK (seq > 0),
    head_hash   text        NOT NULL,
    row_count   bigint      NOT NULL,
    signed_at   timestamptz NOT NULL,
    key_id      text        NOT NULL,
    signature   text        NOT NULL,
    event_id    text        NOT NULL
);

-- The service's role has no UPDATE, DELETE or TRUNCATE on these tables (granted at start); these
-- triggers refuse them to everyone else too, table owner included. ENABLE ALWAYS: they fire even under
-- session_replication_role = replica. Only a superuser who disables them first can change a row, and
-- verification shows what was changed.
CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit table % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit rows are never changed or removed; a correction is a new event';
END
$$;

CREATE TRIGGER trail_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON trail
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
ALTER TABLE trail ENABLE ALWAYS TRIGGER trail_append_only;

CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
ALTER TABLE checkpoints ENABLE ALWAYS TRIGGER checkpoints_append_only;
