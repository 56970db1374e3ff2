-- Receipts that named no message yet. A provider may report before the sender has written the
-- message's outcome, which is where the provider's message id is first kept (an HTTP provider's
-- answer and its ledger row are a moment apart; a busy database makes the moment longer). Such a
-- receipt is held here, and the housekeeping applies what it holds again every few seconds
-- (shared/tracking/early_receipts.py): each one once its message is found, and those that still
-- name nothing after EARLY_RECEIPT_TTL_S (another system's messages on a shared account) dropped.
-- At most MAX_EARLY_RECEIPTS are held per tenant, and each pass takes a share of each tenant's (the
-- newest untried first), so no tenant's pile holds up another's receipts or its own newest.
CREATE TABLE early_receipts (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid        NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    channel     text        NOT NULL,
    receipt     jsonb       NOT NULL,  -- a Receipt (shared/tracking/receipt_statuses.py) as JSON
    received_at timestamptz NOT NULL DEFAULT now(),
    tried_at    timestamptz  -- when a pass last applied it again (NULL: not yet)
);
CREATE INDEX early_receipts_tenant ON early_receipts (tenant_id, tried_at NULLS FIRST, id);
