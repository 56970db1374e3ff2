-- Reading what was sent (#15, reporting): broadcasts listed by name and time, and the ledger read
-- across a tenant's broadcasts (`GET /v1/messages`, shared/broadcasts/ledger.py).

-- The broadcasts view: when the latest run started (BroadcastStarted) and when it finished
-- (completed, partially failed or failed; null while it runs, or when it was called off).
ALTER TABLE broadcasts ADD COLUMN started_at timestamptz, ADD COLUMN sent_at timestamptz;
-- Filled from the log for broadcasts sent before this migration (`crier rebuild broadcasts` does the same).
WITH started AS (
    SELECT DISTINCT ON (stream_name) stream_name, position, (data->>'at')::timestamptz AS at
    FROM events WHERE type = 'BroadcastStarted' ORDER BY stream_name, position DESC
), finished AS (
    SELECT DISTINCT ON (e.stream_name) e.stream_name, (e.data->>'at')::timestamptz AS at
    FROM events e JOIN started s ON s.stream_name = e.stream_name AND e.position > s.position
    WHERE e.type IN ('BroadcastCompleted', 'BroadcastPartiallyFailed', 'BroadcastFailed')
    ORDER BY e.stream_name, e.position DESC
)
UPDATE broadcasts b SET started_at = s.at, sent_at = f.at
FROM started s LEFT JOIN finished f ON f.stream_name = s.stream_name
WHERE s.stream_name = 'broadcast-' || b.id;

-- The list's sorts, for a tenant with 100k broadcasts: each walks one of these in either direction
-- and stops at the page (ties go by id, in the sort's direction). The status index replaces the
-- one of 003 (status, created_at DESC): the same filter, and now the status sort too.
CREATE INDEX broadcasts_tenant_created ON broadcasts (tenant_id, created_at, id) WHERE NOT deleted;
CREATE INDEX broadcasts_tenant_name ON broadcasts (tenant_id, lower(name), id) WHERE NOT deleted;
CREATE INDEX broadcasts_tenant_status_created ON broadcasts (tenant_id, status, created_at, id) WHERE NOT deleted;
DROP INDEX broadcasts_tenant_status;

-- The name search (`filter[search]`, a substring in any case) seeks trigrams where pg_trgm can be
-- had (it ships with PostgreSQL's contrib, in the embedded server and the postgres image); without
-- it the search reads the tenant's names (25 ms for 100k broadcasts, measured without a match).
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
        CREATE EXTENSION IF NOT EXISTS pg_trgm;
        CREATE INDEX broadcasts_name_trgm ON broadcasts USING gin (lower(name) gin_trgm_ops) WHERE NOT deleted;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'pg_trgm not installed (%): the broadcast name search reads the tenant''s names', SQLERRM;
END $$;

-- When the ledger recorded a message: the attempt (its claim, or its outcome when it was never
-- claimed), the planner's run for a `skipped` one. Every status has it (a failed message has no
-- sent_at), and it never changes (a claim's row keeps it when its outcome is written), so the
-- ledger is read newest first by it, and since/until filter on it. now() as the default: no writer
-- names it, and it is the writing transaction's start, one value per statement.
ALTER TABLE messages ADD COLUMN recorded_at timestamptz;
-- Rows written before this: when they were sent, else when their batch finished, else when their
-- run was planned. One rewrite of the ledger, in this migration's transaction.
UPDATE messages m SET recorded_at = coalesce(
    m.sent_at,
    (SELECT bt.completed_at FROM batches bt
     WHERE bt.broadcast_id = m.broadcast_id AND bt.run = m.run AND bt.seq = m.batch_seq),
    (SELECT r.started_at FROM runs r WHERE r.broadcast_id = m.broadcast_id AND r.run = m.run),
    now());
ALTER TABLE messages ALTER COLUMN recorded_at SET DEFAULT now(), ALTER COLUMN recorded_at SET NOT NULL;

-- One index more on every ledger insert, for what the primary key cannot serve: the ledger newest
-- first across broadcasts, and since/until. recorded_at only grows, so its entries go to the
-- rightmost page (measured, 1M rows written as the worker writes them, 4 connections: Postgres CPU
-- 2.39 -> 2.88 s, WAL 293 -> 365 MiB). A contact's messages across broadcasts are found by a probe
-- of the primary key per run of the tenant (`runs_tenant`, as erasure does) rather than by an
-- index on contact_id, which added twice as much (3.37 s, 410 MiB), for a read the probes serve in
-- milliseconds for a tenant with a few thousand runs (0.25 s with 100,000). recorded_at never changes
-- after the insert, so the senders' and receipts' updates stay HOT where they were.
CREATE INDEX messages_recorded ON messages (recorded_at);
