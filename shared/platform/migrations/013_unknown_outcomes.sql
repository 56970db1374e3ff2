-- `unknown` is a ledger status of its own: a sender died after handing the message to the
-- provider and before hearing back, so nobody knows whether it went out. Such recipients are not
-- resent (that could send twice); they are counted apart, and a retry may send them on purpose.
-- messages.status: sending (claimed, handed to the provider) | sent | failed | unknown
ALTER TABLE batches ADD COLUMN unknown integer NOT NULL DEFAULT 0;
ALTER TABLE broadcast_counters ADD COLUMN unknown integer NOT NULL DEFAULT 0;
