-- Erasing a contact (shared/audience/erasure.py) reaches its ledger rows and batches through the
-- tenant's runs; without this that lookup reads every tenant's runs. One entry per run: nothing a
-- send would notice.
CREATE INDEX runs_tenant ON runs (tenant_id);
