-- The event store: one table, message-db shaped. The source of truth for every aggregate.
CREATE TABLE events (
    global_position bigserial PRIMARY KEY,
    -- Assigned at insert, visible at commit: readers use it to never skip a late commit (docs/architecture.md).
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_name     text        NOT NULL,
    position        bigint      NOT NULL,
    id              uuid        NOT NULL UNIQUE,
    type            text        NOT NULL,
    data            jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_name, position)
);
CREATE INDEX events_commit_order ON events (transaction_id, global_position);
CREATE INDEX events_category ON events ((split_part(stream_name, '-', 1)), transaction_id, global_position);

-- Where each reader (the relay, each projection) has got to, in commit order.
CREATE TABLE checkpoints (
    name            text PRIMARY KEY,
    transaction_id  xid8   NOT NULL DEFAULT '0'::xid8,
    global_position bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Wakes tailing readers (relay, projector) when events commit: once per INSERT statement, and
-- delivered only at COMMIT, so a woken reader finds the events. A trigger, not a separate
-- statement in append(): one round trip less per append.
CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('crier_events', '');
    RETURN NULL;
END $$;
CREATE TRIGGER events_notify AFTER INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION events_notify();
