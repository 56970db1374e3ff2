-- The broadcasts view: one row per broadcast, kept by an inline projection (read-your-writes).
CREATE TABLE broadcasts (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    name        text NOT NULL,
    channel     text NOT NULL,
    status      text NOT NULL,
    list_id     uuid,
    provider_id uuid,
    content     jsonb NOT NULL,
    run         integer NOT NULL DEFAULT 0,
    version     bigint NOT NULL,
    deleted     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX broadcasts_tenant_status ON broadcasts (tenant_id, status, created_at DESC) WHERE NOT deleted;
