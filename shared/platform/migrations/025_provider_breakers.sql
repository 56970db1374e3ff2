-- The breaker of each provider account: its provider errors in a row (a refused login, a revoked
-- token, an endpoint gone), counted across every sender. At five, the broadcast whose send met the
-- fifth is paused with the provider's answer; a success anywhere closes it again.
CREATE TABLE provider_breakers (
    provider_id uuid        PRIMARY KEY,
    errors      integer     NOT NULL DEFAULT 0,
    last_error  text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
