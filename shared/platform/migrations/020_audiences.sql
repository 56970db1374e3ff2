-- Broadcast audiences beyond one list, and recipients suppressed at send time.

-- A broadcast's audience when it is more than one list: {lists, segments, exclude_lists,
-- exclude_segments, recipients}; NULL when `list_id` says it all (the two are never both set).
ALTER TABLE broadcasts ADD COLUMN audience jsonb;

-- messages.status gains `suppressed`: the address or contact was suppressed (an unsubscribe, a
-- bounce, by hand) after the snapshot and before its batch was sent. Counted apart: neither sent
-- nor failed, and never retried.
ALTER TABLE batches ADD COLUMN suppressed integer NOT NULL DEFAULT 0;
ALTER TABLE broadcast_counters ADD COLUMN suppressed integer NOT NULL DEFAULT 0;
