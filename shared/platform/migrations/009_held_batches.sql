-- `held`: a batch a worker put aside (acked unsent) while its broadcast was paused. A resume
-- publishes exactly these again; a `queued` batch may still be in a worker's hands, and
-- publishing it again made a second attempt that failed the first one's in-flight recipients
-- as "outcome unknown".
ALTER TABLE batches DROP CONSTRAINT IF EXISTS batches_status_check;
ALTER TABLE batches ADD CONSTRAINT batches_status_check
    CHECK (status IN ('queued', 'sending', 'held', 'done', 'dropped'));
DROP INDEX IF EXISTS batches_unfinished;
CREATE INDEX batches_unfinished ON batches (broadcast_id, run) WHERE status IN ('queued', 'sending', 'held');
