-- Delivery receipts (shared/tracking/receipts.py): providers' status callbacks move a sent message on.
--
-- messages.status gains `delivered`, `read`, `bounced` and `complained`: a message the provider took
-- (`sent`) that its receipts moved on, never back (sent < delivered < read; bounced and complained are
-- final). Each still counts as sent (shared/tracking/receipt_statuses.py, HANDED_OVER): the send
-- counters never move on a receipt. When it was delivered and read (a read message was delivered):
ALTER TABLE messages ADD COLUMN delivered_at timestamptz, ADD COLUMN read_at timestamptz;

-- A Twilio or WhatsApp receipt names its message by the provider's id. Partial on the channels whose
-- receipts need it: an email's Message-ID is the ledger key itself, and push, telegram and webhook
-- take no receipts, so only sms and whatsapp rows get an entry (one more index insert per such
-- message, small next to the HTTP request each of them is). Postgres decides whether an update
-- is HOT by the columns any index names, not by a partial index's predicate: the sender's outcome
-- update, which sets the id, can no longer be HOT on any channel whose provider records an id,
-- which costs at most one more primary-key entry per such message when its page had room. The null
-- provider (the 1M bench) records no id and inserts its rows whole: its path is unchanged. A table
-- of its own mapping id to ledger key would spare the other channels that, but cost a heap row and
-- an index entry for every sms and whatsapp message, and a second write on the send path.
CREATE INDEX messages_provider_message_id ON messages (provider_message_id)
    WHERE provider_message_id IS NOT NULL AND channel IN ('sms', 'whatsapp');
