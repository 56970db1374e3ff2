-- Templates: reusable content (shared/kernel/content.py), saved checked (shared/content/checks.py).
-- `templates` holds each one's current state; `template_versions` every content it ever had.

CREATE TABLE templates (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name            text NOT NULL,
    -- false: content kept for one broadcast rather than offered for reuse (left out of a picker).
    is_template     boolean NOT NULL DEFAULT true,
    version         integer NOT NULL DEFAULT 1,  -- the latest of its template_versions
    content         jsonb NOT NULL,  -- that version's content, so a read needs no join
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- Soft delete: a running broadcast may still render a version of a deleted template (below).
    deleted_at      timestamptz
);
-- Listing and searching a tenant's templates by name, case-insensitively: the list's order, and
-- what a name search walks (a substring LIKE cannot seek, but it reads only this tenant's entries).
CREATE INDEX templates_tenant_name ON templates (tenant_id, lower(name)) WHERE deleted_at IS NULL;
CREATE UNIQUE INDEX templates_idempotency ON templates (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Every save writes a new version, and a version is never changed: a broadcast renders the version
-- it started with, so a template edited (or deleted) while a run sends neither changes what that
-- run's remaining recipients get nor leaves the run without its content. Deleted with the template
-- only when the tenant is (templates are never deleted outright otherwise).
CREATE TABLE template_versions (
    template_id uuid NOT NULL REFERENCES templates (id) ON DELETE CASCADE,
    version     integer NOT NULL,
    content     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (template_id, version)
);
