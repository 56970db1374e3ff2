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
    reset_run   integer NOT NULL DEFAULT 0,      -- runs up to this one no longer count as reached
    resumes     integer NOT NULL DEFAULT 0,      -- times the current run was resumed
    scheduled_at timestamptz,                    -- the next occurrence while scheduled
    schedule    jsonb,                           -- timezone, recurrence (cron), missed policy
    version     bigint NOT NULL,
    deleted     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX broadcasts_tenant_status ON broadcasts (tenant_id, status, created_at DESC) WHERE NOT deleted;
-- The scheduler's scan: scheduled broadcasts by due time.
CREATE INDEX broadcasts_due ON broadcasts (scheduled_at) WHERE status = 'scheduled' AND NOT deleted;
