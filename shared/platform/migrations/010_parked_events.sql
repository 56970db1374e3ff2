-- Events the relay set aside because nats-server would never take them (larger than its
-- max_payload): published never, recorded here, and passed by the relay's checkpoint so that the
-- events after them (of every tenant) go on. They stay in `events`, so the projections, which read
-- Postgres and not NATS, still fold them; only subscribers of the event stream miss them.
CREATE TABLE parked_events (
    event_id        uuid        PRIMARY KEY,
    global_position bigint      NOT NULL,
    transaction_id  xid8        NOT NULL,
    stream_name     text        NOT NULL,
    type            text        NOT NULL,
    tenant_id       text,
    size_bytes      integer     NOT NULL,  -- the envelope as it would have been published
    reason          text        NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX parked_events_parked_at ON parked_events (parked_at);
