-- Idempotency-Key on POST commands: the first response is stored and replayed for a retry with
-- the same key (per tenant), so a retried command does nothing twice.
CREATE TABLE idempotency_keys (
    tenant_id    uuid        NOT NULL,
    key          text        NOT NULL,
    fingerprint  text        NOT NULL,      -- sha256 of method, path and body
    status_code  integer,                   -- NULL while the first request is in flight
    content_type text,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key)
);
