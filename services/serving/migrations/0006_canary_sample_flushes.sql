-- The last canary sample flush each replica saved (its token: the replica's name for this start of its
-- process, and the flush's sequence number), written in the transaction that adds the flush's rows to
-- model_routes.samples_seen. A flush whose commit went through but whose answer was lost (the connection
-- dropped after COMMIT, a timeout) is saved again under the same token and adds nothing, where it used to
-- be added twice and fill its step's samples early. One row per replica start; rows not written for a day
-- are deleted by the flushes (a replica retries a failed flush every SAMPLES_FLUSH_S).
CREATE TABLE canary_sample_flushes (
    replica     text        PRIMARY KEY,
    sequence    bigint      NOT NULL,
    saved_at    timestamptz NOT NULL DEFAULT now()
);
