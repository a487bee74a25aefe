-- The bus's own tables, created in every service's schema (search_path points at it).

-- One row per event a consumer has handled: the primary key makes a redelivery a no-op, and the
-- payload hash lets a reused id with a different payload be flagged instead of silently skipped.
CREATE TABLE IF NOT EXISTS inbox (
    consumer        text        NOT NULL,
    event_id        text        NOT NULL,
    payload_sha256  text        NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- Events emitted inside a handler's (or a request's) transaction; the relay publishes them in seq order.
CREATE TABLE IF NOT EXISTS outbox (
    seq         bigserial   PRIMARY KEY,
    event_id    text        NOT NULL UNIQUE,
    topic       text        NOT NULL,
    key         bytea,
    value       bytea       NOT NULL,
    headers     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (seq) WHERE sent_at IS NULL;
