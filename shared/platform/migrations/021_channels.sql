-- Broadcasts on several channels, with content from a template.

-- The view: the channels after the first and their providers ({channels, channel_policy,
-- providers}; NULL for one channel), the template the content comes from, and the template version
-- the latest run renders (a template edited while a run sends does not reach that run).
ALTER TABLE broadcasts ADD COLUMN routing jsonb,
                       ADD COLUMN template_id uuid,
                       ADD COLUMN template_version integer NOT NULL DEFAULT 0;
CREATE INDEX broadcasts_template ON broadcasts (template_id) WHERE template_id IS NOT NULL;

-- A batch of a multi-channel run is on one of its channels, through that channel's provider (NULL:
-- the run's own, as for every batch of a one-channel run).
ALTER TABLE batches ADD COLUMN channel text, ADD COLUMN provider_id uuid;

-- messages.status gains `skipped`: a recipient of a multi-channel run with no address on a channel
-- the policy would have used (error `no_address`), written by the planner (batch_seq -1, attempts 0).
-- Counted apart: neither sent nor failed, never retried.
ALTER TABLE broadcast_counters ADD COLUMN skipped integer NOT NULL DEFAULT 0;

-- A multi-channel run's batches carry their channel and provider, which the dispatcher reads when it
-- hands them out; `skipped` counts the planner's skipped rows.
ALTER TABLE runs ADD COLUMN multichannel boolean NOT NULL DEFAULT false,
                 ADD COLUMN skipped integer NOT NULL DEFAULT 0;
