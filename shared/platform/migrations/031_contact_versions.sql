-- The recipient data a message was made from, with no copy per recipient: when a change reaches
-- what a message renders from (its addresses, locale, external id, attributes), the contact's
-- former row is kept here with the time it stopped being current. GET /v1/messages/{id} renders
-- a message with the version current when it was recorded: the first one that ended after it,
-- else the contact as it is (shared/audience/contact_versions.py).
--
-- Written by a statement trigger from the UPDATE's transition tables, so an import that updates
-- a million contacts adds one INSERT ... SELECT, not a million; a change that leaves those columns
-- as they were (an import of the same data, a status) writes nothing. A contact's versions go with
-- it (erasure, a tenant's deletion: the DELETE trigger below); the housekeeping task drops versions
-- older than CONTACT_VERSIONS_KEPT_DAYS (shared/kernel/limits.py).
CREATE TABLE contact_versions (
    contact_id  bigint      NOT NULL,
    valid_until timestamptz NOT NULL,  -- the updating transaction's now()
    seq         bigint      GENERATED ALWAYS AS IDENTITY,  -- order among changes in one transaction
    tenant_id   uuid        NOT NULL,
    contact     jsonb       NOT NULL,  -- the row as it was (to_jsonb), read back with jsonb_populate_record
    PRIMARY KEY (contact_id, valid_until, seq)
);
-- The housekeeping's sweep by age: valid_until grows with the table, which is what BRIN is for.
CREATE INDEX contact_versions_age ON contact_versions USING brin (valid_until);

CREATE FUNCTION contacts_keep_versions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO contact_versions (contact_id, valid_until, tenant_id, contact)
    SELECT o.id, now(), o.tenant_id, to_jsonb(o)
    FROM old_contacts o JOIN new_contacts n ON n.id = o.id
    WHERE (o.external_id, o.email, o.phone, o.locale, o.attributes, o.whatsapp, o.telegram_chat_id, o.push_tokens)
          IS DISTINCT FROM
          (n.external_id, n.email, n.phone, n.locale, n.attributes, n.whatsapp, n.telegram_chat_id, n.push_tokens);
    RETURN NULL;
END
$$;
CREATE TRIGGER contacts_keep_versions AFTER UPDATE ON contacts
    REFERENCING OLD TABLE AS old_contacts NEW TABLE AS new_contacts
    FOR EACH STATEMENT EXECUTE FUNCTION contacts_keep_versions();

CREATE FUNCTION contacts_deleted_versions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM contact_versions v USING deleted_contacts d WHERE v.contact_id = d.id;
    RETURN NULL;
END
$$;
CREATE TRIGGER contacts_deleted_versions AFTER DELETE ON contacts
    REFERENCING OLD TABLE AS deleted_contacts
    FOR EACH STATEMENT EXECUTE FUNCTION contacts_deleted_versions();
