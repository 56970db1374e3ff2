-- Fair sending: the planner only snapshots a run into batches; the dispatcher hands them to
-- JetStream a bounded window at a time per run (and per tenant), topping the window up as batches
-- finish, and paces a paced provider by a due time instead of a task asleep for the delay.
ALTER TABLE runs
    ADD COLUMN channel       text NOT NULL DEFAULT 'email',  -- what the run's jobs carry (from BroadcastStarted)
    ADD COLUMN provider_id   uuid,
    ADD COLUMN settled_below integer NOT NULL DEFAULT 0,  -- batches below this seq have an outcome
    ADD COLUMN next_due_at   timestamptz;        -- a paced run's next batch goes out no earlier
-- `published` now means: batches 0 .. published-1 were handed to JetStream (or dropped unsent
-- because the run was called off).
UPDATE runs r SET channel = b.channel, provider_id = b.provider_id FROM broadcasts b WHERE b.id = r.broadcast_id;
ALTER TABLE runs ALTER COLUMN channel DROP DEFAULT;

-- The runs the dispatcher looks at on every wake-up: those with batches not yet handed out.
CREATE INDEX runs_dispatching ON runs (tenant_id) WHERE published < batches;
