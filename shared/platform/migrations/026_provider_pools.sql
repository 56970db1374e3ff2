-- A broadcast's first channel may be sent through several providers (`provider_ids`, the first
-- of them being `provider_id`): they share the load by weight, and a failing one is skipped.
-- Empty when `provider_id` alone sends it. The run keeps the pool it started with, for the jobs.
ALTER TABLE broadcasts ADD COLUMN provider_ids uuid[] NOT NULL DEFAULT '{}';
ALTER TABLE runs ADD COLUMN provider_ids uuid[] NOT NULL DEFAULT '{}';
