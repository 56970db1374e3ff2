-- Media (POST /v1/media): photos and videos a tenant uploads once and names by URL in message
-- content (`/m/{token}`, fetched by Telegram's servers). Kept in Postgres so that every API replica
-- serves every file; shared/content/media.py reads and writes it.

CREATE TABLE media (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- The public URL's credential (secrets.token_urlsafe(32): 256 random bits). Stored as is, not
    -- hashed like API tokens: the API shows the URL again on every read, and whoever holds the URL
    -- can read the file anyway.
    token        text NOT NULL UNIQUE,
    kind         text NOT NULL CHECK (kind IN ('photo', 'video')),
    -- Decided from the bytes (shared/content/media_types.py), never from what the client said.
    content_type text NOT NULL,
    size         bigint NOT NULL CHECK (size > 0),
    sha256       text NOT NULL CHECK (length(sha256) = 64),
    bytes        bytea NOT NULL,
    filename     text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT media_size CHECK (octet_length(bytes) = size)
);
-- JPEG, PNG, WEBP, MP4 ... are compressed already: pglz would spend CPU to gain nothing, and an
-- uncompressed out-of-line value lets substring() read only the TOAST chunks it needs, which is how
-- /m/{token} streams a file a piece at a time.
ALTER TABLE media ALTER COLUMN bytes SET STORAGE EXTERNAL;
-- The same bytes uploaded again by the tenant are the same item (and a concurrent second upload of
-- them waits here for the first, then finds it).
CREATE UNIQUE INDEX media_tenant_sha256 ON media (tenant_id, sha256);
-- GET /v1/media pages a tenant's media newest first.
CREATE INDEX media_tenant_page ON media (tenant_id, created_at DESC, id);

-- What each tenant stores, checked against the quota (bytes, items) by a conditional UPDATE of this
-- one row: concurrent uploads of a tenant queue on its lock for the short final transaction instead
-- of each summing the tenant's media, and two of them cannot both take the last free room. Kept in
-- the transaction of every insert and delete (shared/content/media.py).
CREATE TABLE media_usage (
    tenant_id uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    bytes     bigint NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    items     integer NOT NULL DEFAULT 0 CHECK (items >= 0)
);
