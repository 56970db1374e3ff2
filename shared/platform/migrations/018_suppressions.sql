-- Suppressions (who must not be sent to) and the keys that sign unsubscribe links.

-- An address or a contact (or both: an unsubscribe records the contact and the address the message
-- went to), on one channel or on all ('all'). Channels and reasons are checked by the code that
-- writes (shared/audience/suppressions.py), so a new channel needs no migration.
CREATE TABLE suppressions (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    channel      text NOT NULL,
    -- No foreign key: a deleted contact's id is never reused, so its suppression is inert, and an
    -- address-level one must outlive the contact.
    contact_id   bigint,
    -- Stored in its normal form (email trimmed and in lower case); matched in lower case.
    address      text,
    reason       text NOT NULL,
    broadcast_id uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT suppressions_who CHECK (contact_id IS NOT NULL OR address IS NOT NULL)
);
-- Every recipient of a snapshot or a batch costs two probes (shared/audience/suppressions.py): "is
-- contact C suppressed on channel X or on all", "is this address". Each must stay a probe of its
-- own index whatever the statistics say, so no other index can serve a probe's conditions. An
-- index led by tenant_id alone could: for a tenant the statistics think has no rows (a new one, or
-- stale ones), the planner took such an index as just as good and would have walked all the
-- tenant's suppressions for each recipient once it had some. Hence the key is led by its
-- expressions, and the paging index is partial on `id > 0`, which only the queries that want it
-- say (and "has the tenant any" is a table of its own, below). The probes' indexes are partial on their own column, whose statistics then count only the
-- rows that have one (a coalesce that is mostly 0 once made the planner expect every row to match).
CREATE INDEX suppressions_contact ON suppressions (tenant_id, contact_id, channel) WHERE contact_id IS NOT NULL;
CREATE INDEX suppressions_address ON suppressions (tenant_id, lower(address), channel) WHERE address IS NOT NULL;
-- What makes two suppressions the same one (adding it again keeps the first). coalesce rather than
-- NULLS NOT DISTINCT, so that a request's items can be joined back to their rows by equality.
CREATE UNIQUE INDEX suppressions_key
    ON suppressions (coalesce(lower(address), ''), coalesce(contact_id, 0), channel, tenant_id);
-- GET /v1/suppressions pages a tenant's suppressions newest first.
CREATE INDEX suppressions_page ON suppressions (tenant_id, id) WHERE id > 0;

-- The tenants that have (or had) a suppression: the probes run only for them, so a tenant without
-- any pays one lookup per statement instead of two probes per recipient. A table of its own rather
-- than "EXISTS (SELECT FROM suppressions WHERE tenant_id = T)": for a tenant with many rows the
-- planner expects a sequential scan to find one at once, which is only true if they are not all at
-- the end of the table. Kept once per statement from the inserted rows; never shrinks (a tenant
-- that deleted them all only keeps its probes).
CREATE TABLE suppression_tenants (tenant_id uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE);
CREATE FUNCTION suppressions_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO suppression_tenants SELECT DISTINCT tenant_id FROM added_suppressions ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER suppressions_added AFTER INSERT ON suppressions
    REFERENCING NEW TABLE AS added_suppressions FOR EACH STATEMENT EXECUTE FUNCTION suppressions_added();

-- HMAC keys of signed codes (shared/platform/signing.py): the newest live key signs, every live key
-- verifies. The first is created on first use, so every API and sender process shares them without
-- configuration; `crier keys rotate` adds one, `crier keys retire KID` stops a key's codes working.
-- The secrets are stored as plain bytea: whoever can read this table can forge unsubscribe links
-- (and nothing else), and could read and change the suppressions themselves anyway.
CREATE TABLE signing_keys (
    kid        integer PRIMARY KEY CHECK (kid BETWEEN 1 AND 65535),  -- a code carries it in 2 bytes
    secret     bytea NOT NULL CHECK (octet_length(secret) >= 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz
);
