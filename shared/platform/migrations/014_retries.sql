-- Retries: `POST /v1/broadcasts/{id}/retry` starts a run to recipients an earlier run already
-- counted (its failed and/or unknown ones). The retry run's counters row says how many of them had
-- failed / had an unknown outcome in the run retried; the broadcast's counters take those out of
-- that run's figures (shared/broadcasts/counters.py), so a recipient counts once, by its latest outcome.
ALTER TABLE broadcast_counters ADD COLUMN retried_failed integer NOT NULL DEFAULT 0,
                               ADD COLUMN retried_unknown integer NOT NULL DEFAULT 0;

-- Why the latest run ended as it did, for a failed or partially failed one ("2 of 20 recipients
-- failed", "outcome unknown for 1 of 20 recipients", "the broadcast's provider no longer exists").
ALTER TABLE broadcasts ADD COLUMN status_reason text;
