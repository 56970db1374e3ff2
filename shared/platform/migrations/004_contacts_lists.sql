-- The audience: contacts (upserted by external id) and static lists of them.

CREATE TABLE contacts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Its per-row check is a third of an import's Postgres time (~4 µs a row, measured); kept, as
    -- the 1M import meets its target with it. Dropping it is the next lever if imports must go faster.
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- COLLATE "C": byte-wise comparisons keep the upsert key's index cheap whatever the database's
    -- collation is; equality (all the key needs) is the same under every deterministic collation.
    external_id text COLLATE "C",
    email       text,
    phone       text,
    locale      text,
    attributes  jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- The upsert key. NULLs are distinct, so contacts without an external id never conflict. It also
    -- serves every "contacts of tenant T" scan (count, filters); no other index is kept on contacts,
    -- because each one slows a million-contact import.
    CONSTRAINT contacts_tenant_external_id UNIQUE (tenant_id, external_id)
);

CREATE TABLE lists (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name            text NOT NULL,
    -- Kept by the list_members triggers below, so reading it never counts a million rows.
    member_count    bigint NOT NULL DEFAULT 0,
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX lists_tenant ON lists (tenant_id, created_at DESC);
CREATE UNIQUE INDEX lists_idempotency ON lists (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- No foreign keys here, on purpose: Postgres checks a foreign key once per inserted row, and the
-- two checks cost twice the insert itself (measured: a 10,000-member add took 96 ms with them,
-- 57 of it in the checks). The same guarantees come set-based instead: a membership is only
-- inserted by shared.lists.change_members, for contacts of the list's tenant that it locks FOR
-- KEY SHARE (as a foreign key check would), and the cascades are the statement triggers below.
CREATE TABLE list_members (
    list_id    uuid   NOT NULL,
    contact_id bigint NOT NULL,
    added_at   timestamptz NOT NULL DEFAULT now(),
    -- Serves the planner's "members of list L after contact id X, in contact id order".
    PRIMARY KEY (list_id, contact_id)
);
-- Serves the cascade when contacts are deleted (otherwise every delete scans all memberships).
CREATE INDEX list_members_contact ON list_members (contact_id);

-- ON DELETE CASCADE, once per statement: a deleted contact leaves every list, a deleted list
-- takes its memberships along.
CREATE FUNCTION contacts_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM list_members m USING deleted_contacts d WHERE m.contact_id = d.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER contacts_deleted AFTER DELETE ON contacts
    REFERENCING OLD TABLE AS deleted_contacts FOR EACH STATEMENT EXECUTE FUNCTION contacts_deleted();

CREATE FUNCTION lists_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM list_members m USING deleted_lists d WHERE m.list_id = d.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER lists_deleted AFTER DELETE ON lists
    REFERENCING OLD TABLE AS deleted_lists FOR EACH STATEMENT EXECUTE FUNCTION lists_deleted();

-- member_count follows every insert and delete of memberships, including the cascades from deleted
-- contacts; once per statement, from the transition tables, so a 10,000-member add is one UPDATE.
CREATE FUNCTION list_members_count() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE lists l SET member_count = l.member_count + n.added
        FROM (SELECT list_id, count(*) AS added FROM added_members GROUP BY list_id) n
        WHERE l.id = n.list_id;
    ELSE
        UPDATE lists l SET member_count = l.member_count - o.removed
        FROM (SELECT list_id, count(*) AS removed FROM removed_members GROUP BY list_id) o
        WHERE l.id = o.list_id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER list_members_added AFTER INSERT ON list_members
    REFERENCING NEW TABLE AS added_members FOR EACH STATEMENT EXECUTE FUNCTION list_members_count();
CREATE TRIGGER list_members_removed AFTER DELETE ON list_members
    REFERENCING OLD TABLE AS removed_members FOR EACH STATEMENT EXECUTE FUNCTION list_members_count();
