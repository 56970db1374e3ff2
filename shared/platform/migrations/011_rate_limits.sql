-- Tenant isolation: request rate limits, progress stream leases, per-tenant overrides of the
-- defaults in Settings, and Idempotency-Keys per token (shared/tenants/limits.py).

-- A tenant's own limits where they differ from the defaults, e.g. {"requests_per_s": 50}
-- (keys: requests_per_s, burst, tenant_requests_per_s, tenant_burst, progress_streams_per_token,
-- progress_streams_per_tenant). Set with `crier tenant limits`.
ALTER TABLE tenants ADD COLUMN limits jsonb NOT NULL DEFAULT '{}';

-- GCRA state: per key ('token:<id>', 'tenant:<id>', 'addr:<client address>') the theoretical
-- arrival time of the next request, in epoch seconds of the database clock (one clock for every
-- replica). Unlogged: no WAL on the hot path; a database crash forgets the budgets, which only
-- resets them. Every request updates its token's and its tenant's row in place (HOT updates: the
-- key is the only indexed column), hence the room left on each page.
CREATE UNLOGGED TABLE rate_limits (
    key text PRIMARY KEY,
    tat double precision NOT NULL
) WITH (fillfactor = 50);

-- One row per open progress stream, refreshed by its replica while the stream is open: a replica
-- that dies stops refreshing, and its leases stop counting once they expire.
CREATE UNLOGGED TABLE stream_leases (
    id         uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL,
    token_id   uuid NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX stream_leases_tenant ON stream_leases (tenant_id, expires_at);

-- Idempotency-Keys are per token: a read token must not be replayed a write token's answer, nor
-- a write token a read token's refusal. Refusals (401, 403, 429) are no longer kept at all.
-- A key stored before this migration goes to its tenant's write token when the tenant has exactly
-- one; otherwise to no token (a retry with it runs the request again).
DELETE FROM idempotency_keys WHERE status_code IN (401, 403, 429);
ALTER TABLE idempotency_keys ADD COLUMN token_id uuid;
UPDATE idempotency_keys k SET token_id = coalesce(
    (SELECT (array_agg(t.id))[1] FROM api_tokens t
      WHERE t.tenant_id = k.tenant_id AND t.scope = 'write' AND t.revoked_at IS NULL
     HAVING count(*) = 1),
    '00000000-0000-0000-0000-000000000000');
ALTER TABLE idempotency_keys
    ALTER COLUMN token_id SET NOT NULL,
    DROP CONSTRAINT idempotency_keys_pkey,
    ADD PRIMARY KEY (tenant_id, token_id, key);
