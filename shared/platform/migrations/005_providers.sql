-- Provider accounts per tenant (an SMTP server, the null provider, ...), with their pacing.
-- `config` is kind-specific and holds secrets: the API never returns it as stored.
-- Rows are soft-deleted so broadcasts that used a provider keep their history.
CREATE TABLE providers (
    id              uuid PRIMARY KEY,
    tenant_id       uuid        NOT NULL,
    name            text        NOT NULL,
    channel         text        NOT NULL,
    kind            text        NOT NULL,
    config          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    batch_size      integer     NOT NULL DEFAULT 50   CHECK (batch_size BETWEEN 1 AND 10000),
    batch_delay_ms  integer     NOT NULL DEFAULT 5000 CHECK (batch_delay_ms BETWEEN 0 AND 86400000),
    max_retries     integer     NOT NULL DEFAULT 3    CHECK (max_retries BETWEEN 0 AND 10),
    -- The Idempotency-Key of the POST that created the row: a retried POST returns this row.
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted         boolean     NOT NULL DEFAULT false
);
CREATE INDEX providers_tenant ON providers (tenant_id, created_at, id) WHERE NOT deleted;
CREATE UNIQUE INDEX providers_idempotency ON providers (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
